"""Array-level paged attention, for users who manage their own pages.

Shapes follow JAX's own ``jax.experimental.pallas.ops.gpu.paged_attention``:
``k_pages``/``v_pages`` are ``[num_kv_heads, total_pages, page_size, head_dim]`` and
``block_tables`` is ``int32[batch, pages_per_seq]`` (-1 or any value past a row's length for
unused entries: they are never read as data). A `jaxpaged.PagedKVCache` stores every layer's
pages as ``cache.k_pages[layer]`` in exactly this layout.
"""

import jax.numpy as jnp

from jaxpaged._src import attention as _attention
from jaxpaged._src.attention import ragged_paged_attention_reference


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale=None, soft_cap=None,
                    sliding_window=None, impl="auto", interpret=False, num_splits=None,
                    block_kv=None):
  """Decode attention: ``q [B, num_q_heads, head_dim]`` over each row's ``lengths[b]`` tokens.

  The query sits at position ``lengths[b] - 1``; rows with length 0 return zeros, and a batch
  of 0 rows an empty output. Keyword arguments, and NaN/inf handling, as
  `jaxpaged.paged_attention`.
  """
  k_pages, v_pages = (_attention.pool_array(n, x, 4) for n, x in (("k_pages", k_pages),
                                                                  ("v_pages", v_pages)))
  return _attention.paged_attention_arrays(
      q, k_pages[None], v_pages[None], jnp.int32(0), block_tables, lengths, sm_scale=sm_scale,
      soft_cap=soft_cap, sliding_window=sliding_window, impl=impl, interpret=interpret,
      num_splits=num_splits, block_kv=block_kv)


def ragged_paged_attention(q, k_pages, v_pages, block_tables, kv_lens, q_lens, *, sm_scale=None,
                           soft_cap=None, sliding_window=None, impl="auto", interpret=False,
                           q_block=None, num_splits=None, block_kv=None):
  """Mixed prefill/decode attention: ``q [T, num_q_heads, head_dim]`` holds ``q_lens[b]`` new
  tokens of each row, concatenated; they are the last ``q_lens[b]`` of the row's ``kv_lens[b]``
  tokens, causal among themselves; entries past ``sum(q_lens)`` (all of them with 0 rows) return
  zeros. Keyword arguments as `jaxpaged.ragged_paged_attention`.
  """
  k_pages, v_pages = (_attention.pool_array(n, x, 4) for n, x in (("k_pages", k_pages),
                                                                  ("v_pages", v_pages)))
  return _attention.ragged_paged_attention_arrays(
      q, k_pages[None], v_pages[None], jnp.int32(0), block_tables, kv_lens, q_lens,
      sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, impl=impl,
      interpret=interpret, q_block=q_block, num_splits=num_splits, block_kv=block_kv)


__all__ = ("paged_attention", "ragged_paged_attention", "ragged_paged_attention_reference")
