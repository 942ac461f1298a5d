"""Array-level paged attention, for users who manage their own pages.

Shapes follow JAX's own ``jax.experimental.pallas.ops.gpu.paged_attention``:
``k_pages``/``v_pages`` are ``[num_kv_heads, total_pages, page_size, head_dim]`` and
``block_tables`` is ``int32[batch, pages_per_seq]`` (-1 or any value past a row's length for
unused entries: they are never read as data). A `jaxpaged.PagedKVCache` stores every layer's
pages as ``cache.k_pages[layer]`` in exactly this layout.

8-bit pools (int8, float8_e4m3fn, float8_e5m2) come with ``k_scales``/``v_scales``: float32
``[num_kv_heads, total_pages, page_size]`` (one per stored token and head, as
``cache.k_scales[layer]``) or a float32 scalar (one static scale); a stored value times its scale
is the real value, dequantized inside the loop, one chunk of pages at a time.
"""

import jax
import jax.numpy as jnp

from jaxpaged._src.attention import paged_attention_arrays
from jaxpaged._src.attention import pool_array
from jaxpaged._src.attention import ragged_paged_attention_arrays
from jaxpaged._src.attention import ragged_paged_attention_reference


def _one_layer(k_pages: jax.Array, v_pages: jax.Array, k_scales, v_scales) -> dict:
  """One layer's checked ``[num_kv_heads, total_pages, page_size, head_dim]`` pools (and scales),
  as a single-layer pool (the layout of the cache-level functions)."""
  def scale(x):  # per token [H, P, ps] -> [1, H, P, ps]; a static scalar -> [1]; else checked
    return x if not hasattr(x, "ndim") else x[None] if x.ndim else x.reshape(1)
  return dict(k_pages=pool_array("k_pages", k_pages, 4)[None],
              v_pages=pool_array("v_pages", v_pages, 4)[None],
              k_scales=scale(k_scales), v_scales=scale(v_scales))


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    block_tables: jax.Array, lengths: jax.Array, *,
                    sm_scale: float | None = None, soft_cap: float | None = None,
                    sliding_window: int | None = None, impl: str = "auto",
                    interpret: bool = False, num_splits: int | None = None,
                    block_kv: int | None = None, k_scales: jax.Array | None = None,
                    v_scales: jax.Array | None = None) -> jax.Array:
  """Decode attention: ``q [B, num_q_heads, head_dim]`` over each row's ``lengths[b]`` tokens.

  The query sits at position ``lengths[b] - 1``; rows with length 0 return zeros, and a batch
  of 0 rows an empty output. Keyword arguments, and NaN/inf handling, as
  `jaxpaged.paged_attention`.

  >>> k_pages = jnp.ones((1, 2, 4, 8))  # [num_kv_heads, total_pages, page_size, head_dim]
  >>> v_pages = jnp.broadcast_to(jnp.arange(8.0).reshape(1, 2, 4, 1), (1, 2, 4, 8))
  >>> block_tables = jnp.array([[0, 1], [1, -1]])  # row 0 on pages 0, 1; row 1 on page 1
  >>> out = ops.paged_attention(jnp.ones((2, 2, 8)), k_pages, v_pages, block_tables,
  ...                           jnp.array([6, 3]))
  >>> out.shape, out[:, 0, 0].tolist()  # equal scores: the mean of 0..5 and of 4, 5, 6
  ((2, 2, 8), [2.5, 5.0])
  """
  pools = _one_layer(k_pages, v_pages, k_scales, v_scales)
  return paged_attention_arrays(
      q, pools.pop("k_pages"), pools.pop("v_pages"), jnp.int32(0), block_tables, lengths,
      sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, impl=impl,
      interpret=interpret, num_splits=num_splits, block_kv=block_kv, **pools)


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           block_tables: jax.Array, kv_lens: jax.Array, q_lens: jax.Array, *,
                           sm_scale: float | None = None, soft_cap: float | None = None,
                           sliding_window: int | None = None, impl: str = "auto",
                           interpret: bool = False, q_block: int | None = None,
                           num_splits: int | None = None,
                           block_kv: int | None = None, k_scales: jax.Array | None = None,
                           v_scales: jax.Array | None = None) -> jax.Array:
  """Mixed prefill/decode attention: ``q [T, num_q_heads, head_dim]`` holds ``q_lens[b]`` new
  tokens of each row, concatenated; they are the last ``q_lens[b]`` of the row's ``kv_lens[b]``
  tokens, causal among themselves; entries past ``sum(q_lens)`` (all of them with 0 rows) return
  zeros. Keyword arguments as `jaxpaged.ragged_paged_attention`.

  >>> import numpy as np
  >>> k_pages, v_pages = (jnp.sin(jnp.arange(n, n + 128.0)).reshape(1, 4, 4, 8) for n in (0, 1))
  >>> q = jnp.cos(jnp.arange(5 * 2 * 8.0)).reshape(5, 2, 8)  # 2 query heads share 1 KV head
  >>> args = (q, k_pages, v_pages, jnp.array([[2, 0], [1, 3]]),  # block_tables
  ...         jnp.array([6, 2]), jnp.array([3, 2]))  # kv_lens, q_lens: 3 + 2 new tokens
  >>> out = ops.ragged_paged_attention(*args)
  >>> out.shape, bool(np.allclose(out, ops.ragged_paged_attention_reference(*args), atol=1e-5))
  ((5, 2, 8), True)
  """
  pools = _one_layer(k_pages, v_pages, k_scales, v_scales)
  return ragged_paged_attention_arrays(
      q, pools.pop("k_pages"), pools.pop("v_pages"), jnp.int32(0), block_tables, kv_lens, q_lens,
      sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, impl=impl,
      interpret=interpret, q_block=q_block, num_splits=num_splits, block_kv=block_kv, **pools)


__all__ = ("paged_attention", "ragged_paged_attention", "ragged_paged_attention_reference")
