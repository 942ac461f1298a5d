"""Paged attention: decode and ragged (chunked-prefill) attention over the page pool.

One formulation serves both: new tokens are grouped into query blocks of one sequence
(`attention_blocks`; decode: one token, one block per row), and two implementations take the
same blocks:

- `attention_xla`: the XLA path (CPU, and GPU fallback), loops over chunks of KV pages with an
  online softmax;
- `attention_kernel`: the Pallas GPU kernel (flash-decoding), one program per (query block,
  KV head, split).

Both share their softmax math and the handling of non-finite values (`attention_softmax`);
`attention_reference` states the same math in plain ``jnp`` on contiguous K/V. This module
checks the arguments (`attention_checks`), builds the query blocks and dispatches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import sharding
from jaxpaged._src import checks
from jaxpaged._src import gpu
from jaxpaged._src.attention_blocks import UNMAPPED, decode_blocks, ragged_blocks
from jaxpaged._src import quant
from jaxpaged._src.attention_checks import (check_attention_args, check_known, check_options,
                                            check_scales, check_tables, pool_array)
from jaxpaged._src.attention_kernel import attention_pallas, pallas_supported
from jaxpaged._src.attention_kernel import default_num_splits as default_pallas_splits
from jaxpaged._src.attention_reference import ragged_paged_attention_reference
from jaxpaged._src.attention_xla import attention_xla
from jaxpaged._src.cache import PagedKVCache, check_cache, check_layer
from jaxpaged._src.spec import JaxPagedError, next_pow2

# Names other modules import from here (they moved to the modules above).
__all__ = ("paged_attention", "ragged_paged_attention", "paged_attention_arrays",
           "ragged_paged_attention_arrays", "pool_array", "ragged_paged_attention_reference")

# Most query tokens a block holds by default (prefill chunks): a block's queries share every page
# it gathers, and 16 rows fill the Triton kernel's smallest dot even without GQA.
MAX_Q_BLOCK = 16


def _default_q_block(num_tokens: int, num_rows: int) -> int:
  """Query tokens per block: 1 for pure decode, the next power of two of the tokens a row
  brings, up to MAX_Q_BLOCK for prefill chunks."""
  per_row = max(1, num_tokens // max(num_rows, 1))
  return min(MAX_Q_BLOCK, next_pow2(per_row))


def _resolve_impl(impl: str, k_pages: jax.Array) -> str:
  """The implementation ``impl`` names here ("auto": by backend); JaxPagedError if the Pallas
  kernel is asked for shapes it cannot take."""
  impl = gpu.resolve_impl(impl)
  if impl == "pallas":
    why = pallas_supported(k_pages.shape[3], k_pages.shape[4])
    if why:
      raise JaxPagedError(f"{why}; use impl='xla' for these shapes.")
  return impl


@functools.partial(jax.jit, static_argnames=(
    "decode", "q_block", "sm_scale", "soft_cap", "sliding_window", "impl", "interpret",
    "num_splits", "block_kv"))
def _attention(q, k_pages, v_pages, k_scales, v_scales, layer, page_table, kv_lens, q_lens, *,
               decode, q_block, sm_scale, soft_cap, sliding_window, impl, interpret, num_splits,
               block_kv):
  """Checked arguments -> query blocks -> the implementation -> outputs in q's token order."""
  num_tokens = q.shape[0]
  if 0 in (num_tokens, *page_table.shape):  # no query, or nothing to see: with no row, every
    return jnp.zeros_like(q)  # entry is past the last row
  if decode:
    blocks = decode_blocks(kv_lens)
    q_blocks = q[:, None]
  else:
    blocks = ragged_blocks(kv_lens, q_lens, num_tokens, q_block)
    q_blocks = jnp.concatenate([q, jnp.zeros_like(q[:1])])[blocks.token]
  options = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
  if impl == "pallas":
    out = attention_pallas(q_blocks, k_pages, v_pages, k_scales, v_scales, layer, page_table,
                           kv_lens, blocks,
                           num_splits=num_splits or default_pallas_splits(page_table.shape[1],
                                                                          k_pages.shape[3]),
                           interpret=interpret, **options)
  else:
    out = attention_xla(q_blocks, k_pages, v_pages, k_scales, v_scales, layer, page_table,
                        kv_lens, blocks,
                        block_kv=block_kv, num_splits=num_splits, **options)
  if decode:
    return out[:, 0].astype(q.dtype)
  out = jnp.zeros((num_tokens + 1,) + q.shape[1:], out.dtype).at[blocks.token].set(out)
  return out[:num_tokens].astype(q.dtype)


def paged_attention_arrays(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           layer: int | jax.Array, page_table: jax.Array, kv_lens: jax.Array, *,
                           sm_scale: float | None = None, soft_cap: float | None = None,
                           sliding_window: int | None = None, impl: str = "auto",
                           interpret: bool = False, num_splits: int | None = None,
                           block_kv: int | None = None, k_scales: jax.Array | None = None,
                           v_scales: jax.Array | None = None) -> jax.Array:
  """Decode attention on arrays; k_pages/v_pages (and scales) carry a leading layer axis. See
  `ops`."""
  check_attention_args(q, k_pages, v_pages, "decode")
  k_scales, v_scales = check_scales(k_pages, k_scales, v_scales)
  options = check_options(k_pages.shape[4], sm_scale=sm_scale, soft_cap=soft_cap,
                          sliding_window=sliding_window, impl=impl, interpret=interpret,
                          num_splits=num_splits, block_kv=block_kv)
  page_table, kv_lens = check_tables(page_table, kv_lens, q.shape[0], k_pages.shape)
  options["impl"] = _resolve_impl(impl, k_pages)
  return _attention(q, k_pages, v_pages, k_scales, v_scales, layer, page_table, kv_lens, None,
                    decode=True, q_block=1, **options)


def ragged_paged_attention_arrays(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                  layer: int | jax.Array, page_table: jax.Array,
                                  kv_lens: jax.Array, q_lens: jax.Array, *,
                                  sm_scale: float | None = None, soft_cap: float | None = None,
                                  sliding_window: int | None = None, impl: str = "auto",
                                  interpret: bool = False, q_block: int | None = None,
                                  num_splits: int | None = None,
                                  block_kv: int | None = None,
                                  k_scales: jax.Array | None = None,
                                  v_scales: jax.Array | None = None) -> jax.Array:
  """Ragged attention on arrays; k_pages/v_pages (and scales) carry a leading layer axis. See
  `ops`."""
  check_attention_args(q, k_pages, v_pages, "ragged")
  k_scales, v_scales = check_scales(k_pages, k_scales, v_scales)
  options = check_options(k_pages.shape[4], sm_scale=sm_scale, soft_cap=soft_cap,
                          sliding_window=sliding_window, impl=impl, interpret=interpret,
                          q_block=q_block, num_splits=num_splits, block_kv=block_kv)
  page_table, kv_lens = check_tables(page_table, kv_lens, None, k_pages.shape)
  num_rows = page_table.shape[0]
  q_lens = checks.index_vector("q_lens", q_lens, num_rows, per="row: new tokens of each row, "
                               "as given to extend")
  if not checks.is_traced(kv_lens):
    lens = np.asarray(kv_lens)  # a row holding nothing (padding) gives zeros for its entries
    check_known(q_lens, "q_lens", lambda n: (n >= 0) & ((n <= lens) | (lens == 0)),
                "must be in [0, that row's length]: a row's new tokens are its last ones")
  options["q_block"] = options["q_block"] or _default_q_block(q.shape[0], num_rows)
  options["impl"] = _resolve_impl(impl, k_pages)
  return _attention(q, k_pages, v_pages, k_scales, v_scales, layer, page_table, kv_lens, q_lens,
                    decode=False, **options)


# ----------------------------------------------------------------------------- on a cache

def _rows_of(cache: PagedKVCache, layer, seq_ids):
  """``(layer, page_table, kv_lens)`` of a batch's sequences, checked; padding and bad ids see
  nothing. (A sequence's keys are at their storage indices: after `compress` the causal mask
  and a sliding window count stored tokens.)"""
  layer = check_layer(check_cache(cache), layer)
  seq_ids = checks.index_vector("seq_ids", seq_ids)
  live = (seq_ids >= 0) & (seq_ids < cache.spec.max_seqs)
  rows = jnp.where(live, seq_ids, 0)
  page_table = jnp.where(live[:, None], cache.page_table[rows], UNMAPPED)
  return layer, page_table, jnp.where(live, cache.seq_lens[rows], 0)


def paged_attention(q: jax.Array, cache: sharding.AnyCache, layer: int | jax.Array,
                    seq_ids: jax.Array, *, sm_scale: float | None = None,
                    soft_cap: float | None = None, sliding_window: int | None = None,
                    impl: str = "auto", interpret: bool = False, num_splits: int | None = None,
                    block_kv: int | None = None) -> jax.Array:
  """Decode attention: one query token per sequence over all of its cached tokens.

  Args:
    q: ``[B, num_q_heads, head_dim]``, the query of each row's newest token, whose K/V must
      already be written (`extend` then `write_kv`): it sits at position ``seq_len - 1``.
    cache: the `PagedKVCache`.
    layer: layer index (Python int, or int32 scalar inside a scan over layers).
    seq_ids: ``int32[B]``; -1 (padding) and out-of-range ids give zeros.
    sm_scale: softmax scale, default ``head_dim ** -0.5``.
    soft_cap: if set, scores become ``soft_cap * tanh(scores / soft_cap)`` (Gemma 2).
    sliding_window: if set, a query at position ``p`` sees keys in ``(p - window, p]``.
    impl: ``"auto"`` (Pallas on GPU, XLA elsewhere), ``"xla"`` or ``"pallas"``.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    num_splits: independent ranges of each context, their softmax states merged (flash-
      decoding). Default: Pallas one per 1024 tokens; XLA 2 (two cores) from 8 steps, else 1.
    block_kv: XLA path: KV tokens a loop step gathers per query block (default: measured).

  Returns:
    ``[B, num_q_heads, head_dim]`` in q's dtype (empty for an empty batch); float32 softmax.
    NaN/inf propagate as a dense softmax over the keys a query sees would, to no other query:
    NaN in q or a seen K makes the output NaN; NaN/+-inf in a seen V, those elements NaN/+-inf.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=4, num_pages=4,
  ...                  max_seqs=2, max_pages_per_seq=2)
  >>> cache, slots, _ = extend(init_cache(spec), jnp.arange(2), jnp.array([3, 5]), num_slots=8)
  >>> cache = write_kv(cache, 0, jnp.ones((8, 1, 16)), jnp.full((8, 1, 16), 2.0), slots)
  >>> out = paged_attention(jnp.ones((2, 4, 16)), cache, 0, jnp.arange(2))
  >>> out.shape, out[:, 0, 0].tolist()  # V is 2 everywhere, so is every weighted mean of it
  ((2, 4, 16), [2.0, 2.0])
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.attention(q, cache, layer, seq_ids, sm_scale=sm_scale, soft_cap=soft_cap,
                              sliding_window=sliding_window, impl=impl, interpret=interpret,
                              num_splits=num_splits, block_kv=block_kv)
  layer, page_table, kv_lens = _rows_of(cache, layer, seq_ids)
  k_scales, v_scales = quant.attention_scales(cache)
  return paged_attention_arrays(
      q, cache.k_pages, cache.v_pages, layer, page_table, kv_lens, sm_scale=sm_scale,
      soft_cap=soft_cap, sliding_window=sliding_window, impl=impl, interpret=interpret,
      num_splits=num_splits, block_kv=block_kv, k_scales=k_scales, v_scales=v_scales)


def ragged_paged_attention(q: jax.Array, cache: sharding.AnyCache, layer: int | jax.Array,
                           seq_ids: jax.Array, q_lens: jax.Array, *, sm_scale: float | None = None,
                           soft_cap: float | None = None, sliding_window: int | None = None,
                           impl: str = "auto", interpret: bool = False, q_block: int | None = None,
                           num_splits: int | None = None, block_kv: int | None = None) -> jax.Array:
  """Attention for a mixed batch of prefill chunks and decode tokens (chunked prefill).

  Row ``b`` brings ``q_lens[b]`` new tokens, already appended to the cache (`extend` with the
  same counts, then `write_kv`): they are the last ``q_lens[b]`` of its ``seq_len`` tokens. Each
  attends causally among the new tokens and fully to the sequence's earlier tokens.

  Args:
    q: ``[T, num_q_heads, head_dim]``, the new tokens of all rows concatenated in row order (the
      layout of `extend`'s slots); entries past ``sum(q_lens)`` are ignored and return zeros.
    seq_ids, q_lens: ``int32[B]``; padding rows (id -1) keep their ``q_lens`` entries in the
      layout and get zeros there.
    q_block: query tokens per block (default: 1 for pure decode, up to 16 for prefill).
    Other arguments as `paged_attention`.

  Returns:
    ``[T, num_q_heads, head_dim]`` in q's dtype (NaN/inf as `paged_attention`); zeros past the
    last row (everywhere with no rows).

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=4,
  ...                  max_seqs=2, max_pages_per_seq=2)
  >>> seq_ids, q_lens = jnp.array([0, 1]), jnp.array([3, 5])  # prompts of 3 and 5 tokens
  >>> cache, slots, _ = extend(init_cache(spec), seq_ids, q_lens, num_slots=8)
  >>> k, v, q = jnp.sin(jnp.arange(3 * 8 * 8.0)).reshape(3, 8, 1, 8)  # [8 tokens, 1 head, 8]
  >>> cache = write_kv(cache, 0, k, v, slots)
  >>> out = ragged_paged_attention(q, cache, 0, seq_ids, q_lens)
  >>> expected = ops.ragged_paged_attention_reference(
  ...     q, cache.k_pages[0], cache.v_pages[0], cache.page_table[seq_ids], q_lens, q_lens)
  >>> out.shape, bool(jnp.allclose(out, expected, atol=1e-5))
  ((8, 1, 8), True)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.attention(q, cache, layer, seq_ids, q_lens, sm_scale=sm_scale,
                              soft_cap=soft_cap, sliding_window=sliding_window, impl=impl,
                              interpret=interpret, q_block=q_block, num_splits=num_splits,
                              block_kv=block_kv)
  layer, page_table, kv_lens = _rows_of(cache, layer, seq_ids)
  k_scales, v_scales = quant.attention_scales(cache)
  return ragged_paged_attention_arrays(
      q, cache.k_pages, cache.v_pages, layer, page_table, kv_lens, q_lens, sm_scale=sm_scale,
      soft_cap=soft_cap, sliding_window=sliding_window, impl=impl, interpret=interpret,
      q_block=q_block, num_splits=num_splits, block_kv=block_kv, k_scales=k_scales,
      v_scales=v_scales)
