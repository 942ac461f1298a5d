"""Paged attention in plain XLA: the CPU path (and the GPU fallback).

It loops over chunks of KV pages with an online softmax. The loop's trip count is the longest
sequence in the batch, not ``max_pages_per_seq``. Each step gathers one chunk of pages for every
query block into ``[kv_heads, blocks, tokens, head_dim]`` and contracts with ``einsum`` in the
orientation measured fastest on XLA:CPU (see the README). A long context runs as independent
loops over disjoint chunk ranges (XLA:CPU runs them on different cores), merged like
flash-decoding splits.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpaged._src import attention_softmax as softmax
from jaxpaged._src import quant
from jaxpaged._src.attention_blocks import POSITION_MAX, UNMAPPED, QueryBlocks, query_span

# Default KV tokens a step, measured on XLA:CPU: the whole context in one step while the
# gathered token-rows (blocks x context tokens) stay within WHOLE_CONTEXT_ROWS; else about
# ROWS_PER_STEP token-rows a step, between MIN_BLOCK_KV and MAX_BLOCK_KV keys.
WHOLE_CONTEXT_ROWS = 8192
ROWS_PER_STEP = 512
MIN_BLOCK_KV = 64
MAX_BLOCK_KV = 1024
# 8-bit pools: about QUANTIZED_ROWS_PER_STEP token-rows a step, between QUANTIZED_MIN_BLOCK_KV
# and QUANTIZED_MAX_BLOCK_KV keys per query block, so that the dequantized (float32) chunk is a
# bounded part of a long sequence: never a float copy of a whole context. Measured on XLA:CPU
# (bench_quant): B8 x 2k fastest at 256 keys (512: 3.0x, 1024: 2.5x its time), B1 x 32k at 1024
# (256: 1.45x its time).
QUANTIZED_ROWS_PER_STEP = 2048
QUANTIZED_MIN_BLOCK_KV = 256
QUANTIZED_MAX_BLOCK_KV = 1024
# Default splits: two independent loops (XLA:CPU runs them on two cores) pay off once a context
# spans SPLIT_MIN_CHUNKS chunks or more.
DEFAULT_SPLITS = 2
SPLIT_MIN_CHUNKS = 8
# Dots accumulate in float32 whatever the K/V dtype.
_F32 = dict(preferred_element_type=jnp.float32)


def default_block_kv(context: int, num_blocks: int, quantized: bool = False) -> int:
  """KV tokens a step gathers per query block, for ``context`` tokens a row (see above)."""
  if context * num_blocks <= WHOLE_CONTEXT_ROWS:
    block = context
  else:
    block = min(MAX_BLOCK_KV, max(MIN_BLOCK_KV, ROWS_PER_STEP // num_blocks))
  if not quantized:
    return block
  return min(block, max(QUANTIZED_MIN_BLOCK_KV,
                        min(QUANTIZED_MAX_BLOCK_KV, QUANTIZED_ROWS_PER_STEP // num_blocks)))


def default_num_splits(max_pages: int, chunk_pages: int) -> int:
  """Independent loops over a context of ``max_pages`` pages, ``chunk_pages`` a step."""
  return DEFAULT_SPLITS if max_pages >= SPLIT_MIN_CHUNKS * chunk_pages else 1


class _Loop(NamedTuple):
  """What every chunk step reads: loop-invariant arrays and static options."""
  q: jax.Array  # [Hkv, NB, R, D] in the dot dtype, scaled; R = group * q_block, head-major
  position: jax.Array  # [NB, R] int32: position of each query row
  # [NB, max_pages_per_seq + chunk_pages] int32: page-table rows, padded with one chunk of
  # UNMAPPED so that the last chunk's slice stays in bounds (dynamic_slice would shift it)
  pages: jax.Array
  kv_len: jax.Array  # [NB] int32: length of each block's sequence
  k_pages: jax.Array  # [L, Hkv, P, page_size, D]
  v_pages: jax.Array  # [L, Hkv, P, page_size, D]
  k_scales: jax.Array | None  # 8-bit pools: [L, Hkv, P, page_size] per token, or [L] static
  v_scales: jax.Array | None
  layer: jax.Array  # int32 scalar
  chunk_pages: int
  soft_cap: float | None
  sliding_window: int | None


def _head_major(q: jax.Array, num_kv_heads: int, sm_scale: float, dot_dtype) -> jax.Array:
  """[NB, qb, Hq, D] -> [Hkv, NB, group * qb, D], scaled: every query row of one KV head, for
  one dot per chunk. Low-precision K/V meet a query rounded to their dtype: 16-bit dots with
  float32 accumulation. (Upcasting each chunk to float32 instead was measured slower: bf16
  attention 0.78-0.84x float32's time against 0.62-0.72x, JAX 0.10 XLA:CPU.)"""
  num_blocks, q_block, num_q_heads, head_dim = q.shape
  group = num_q_heads // num_kv_heads
  q = q.reshape(num_blocks, q_block, num_kv_heads, group, head_dim).astype(jnp.float32)
  q = jnp.transpose(q, (2, 0, 3, 1, 4)).reshape(num_kv_heads, num_blocks, group * q_block,
                                                 head_dim) * sm_scale
  return q.astype(dot_dtype)


def _block_major(out: jax.Array, q_block: int) -> jax.Array:
  """[Hkv, NB, group * qb, D] -> [NB, qb, Hq, D], the inverse of `_head_major`'s layout."""
  num_kv_heads, num_blocks, rows, head_dim = out.shape
  group = rows // q_block
  out = out.reshape(num_kv_heads, num_blocks, group, q_block, head_dim)
  return jnp.transpose(out, (1, 3, 0, 2, 4)).reshape(num_blocks, q_block,
                                                     num_kv_heads * group, head_dim)


def _gather_view(pool: jax.Array, c) -> tuple[jax.Array, jnp.dtype | None]:
  """``(pool to gather from, its float dtype to view each gathered chunk back as, or None)``.

  XLA:CPU gathers 16- and 8-bit floats by converting the operand to float32 first, and hoists
  that convert out of the chunk loop: every call converted the whole pool (bf16 and fp8
  attention took 3-4x float32's time). Gathering the same bits as unsigned ints, then viewing
  the gathered chunk as floats, keeps the reads at the pool's width. The view is taken inside
  the step, tied to ``c`` by an optimization barrier: hoisted, XLA:CPU materializes even the
  bitcast as a copy of the pool (bf16 then 2.2x float32's time; inside the step, 0.9x).
  """
  if jnp.issubdtype(pool.dtype, jnp.floating) and pool.dtype.itemsize < 4:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[pool.dtype.itemsize]
    pool, _ = jax.lax.optimization_barrier((pool, c))  # ties the view to the step: not hoisted
    return jax.lax.bitcast_convert_type(pool, unsigned), pool.dtype
  return pool, None


def _from_bits(bits: jax.Array, dtype) -> jax.Array:
  """Gathered unsigned-int bits (`_gather_view`) as ``dtype``'s values; fp8 straight to float32
  through float16 (exact; XLA:CPU converts fp8 elementwise in software, float16 in hardware)."""
  if dtype == jnp.float8_e5m2:  # the top byte of a float16
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16) << 8,
                                        jnp.float16).astype(jnp.float32)
  if dtype == jnp.float8_e4m3fn:  # s.eeee.mmm -> float16 s.0eeee.mmm0000000, times 2^(15 - 7)
    u = bits.astype(jnp.uint16)
    half = jax.lax.bitcast_convert_type(((u & 0x80) << 8) | ((u & 0x7F) << 7), jnp.float16)
    return jnp.where((u & 0x7F) == 0x7F, jnp.nan, half.astype(jnp.float32) * 256.0)
  return jax.lax.bitcast_convert_type(bits, dtype)


def _chunk_range(position: jax.Array, chunk: int,
                 sliding_window: int | None) -> tuple[jax.Array, jax.Array]:
  """``[lo, hi)``: the chunks that any block's queries see (empty when no block has a query)."""
  first, last = query_span(position)  # each [NB]; last < 0: no query
  live = last >= 0
  lo = jnp.min(jnp.where(live, softmax.oldest_key(first, sliding_window) // chunk,
                         POSITION_MAX))
  hi = jnp.maximum(jnp.max(jnp.where(live, last // chunk + 1, 0)), lo)
  return lo, hi


def _gather_chunk(c, loop: _Loop):
  """Chunk ``c`` of every block's pages: ``(k, v, key_ok, key_pos)``, K and V
  ``[Hkv, NB, chunk, D]`` in the dot dtype, V zero outside each block's sequence."""
  _, num_kv_heads, num_pages, page_size, head_dim = loop.k_pages.shape
  num_blocks, chunk = loop.pages.shape[0], loop.chunk_pages * page_size
  pages = jax.lax.dynamic_slice_in_dim(loop.pages, c * loop.chunk_pages, loop.chunk_pages, axis=1)
  safe = jnp.clip(pages, 0, num_pages - 1)
  key_pos = c * chunk + jnp.arange(chunk)  # [chunk]
  key_ok = (jnp.repeat(pages >= 0, page_size, axis=1)
            & (key_pos[None] < loop.kv_len[:, None]))  # [NB, chunk]
  shape = (num_kv_heads, num_blocks, chunk)

  def read(pool, scales):
    # The layer is indexed here, inside the step: the loops take the whole pools as operands,
    # never a layer-sized slice made before them. 8-bit pages are dequantized here, one chunk.
    pool, pool_dtype = _gather_view(pool, c)
    x = pool[loop.layer][:, safe].reshape(shape + (head_dim,))
    if pool_dtype is not None:
      x = _from_bits(x, pool_dtype)
    if scales is not None:
      scale = scales[loop.layer]
      x = quant.dequantize(x, scale[:, safe].reshape(shape) if scale.ndim else scale)
    return x.astype(loop.q.dtype)

  v = jnp.where(key_ok[None, :, :, None],
                read(loop.v_pages, loop.v_scales), 0)
  return read(loop.k_pages, loop.k_scales), v, key_ok, key_pos


def _chunk_step(c, carry, loop: _Loop, exact: bool):
  """One loop step: chunk ``c`` into the softmax state ``(m, l, acc[, nonfinite])``."""
  m, l, acc = carry[:3]
  k, v, key_ok, key_pos = _gather_chunk(c, loop)
  s = softmax.cap_scores(jnp.einsum("hnqd,hnsd->hnqs", loop.q, k, **_F32), loop.soft_cap)
  visible = softmax.visible_keys(key_ok[:, None, :], key_pos[None, None, :],
                                 loop.position[:, :, None], loop.sliding_window)
  s = jnp.where(visible[None], s, softmax.MASKED)
  m, l, p, correction = softmax.online_softmax_step(m, l, s)
  extra = ()
  if exact:  # V's non-finite entries reach only the queries that see them
    count = functools.partial(jnp.einsum, "nqs,hnsd->hnqd", visible.astype(v.dtype), **_F32)
    v, nonfinite = softmax.split_nonfinite(v, count)
    extra = (carry[3] + nonfinite,)
  acc = acc * correction[..., None] + jnp.einsum("hnqs,hnsd->hnqd", p.astype(v.dtype), v, **_F32)
  return (m, l, acc) + extra


def _attend(loop: _Loop, lo, hi, seen, *, num_splits: int, one_chunk: bool,
            exact: bool) -> jax.Array:
  """[Hkv, NB, R, D] output rows over chunks ``[lo, hi)`` (one_chunk: chunk 0 holds every
  page); exact: V's non-finite entries taken apart (`softmax.split_nonfinite`)."""
  shape = loop.q.shape[:3]
  init = (jnp.full(shape, softmax.MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(loop.q.shape, jnp.float32))
  init += init[2:] if exact else ()
  step = functools.partial(_chunk_step, loop=loop, exact=exact)
  if one_chunk:  # no loop
    parts = [step(0, init)]
  else:  # independent loops over disjoint chunk ranges: XLA:CPU runs them on different cores
    per_split = (hi - lo + num_splits - 1) // num_splits
    parts = [jax.lax.fori_loop(jnp.minimum(lo + i * per_split, hi),
                               jnp.minimum(lo + (i + 1) * per_split, hi), step, init)
             for i in range(num_splits)]
  m, l, acc, *nonfinite = (jnp.stack(x, axis=0) for x in zip(*parts))
  return softmax.merge_splits(acc + nonfinite[0] if exact else acc, m, l, 0, seen)


def attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, k_scales, v_scales,
                  layer: jax.Array, page_table: jax.Array, kv_lens: jax.Array,
                  blocks: QueryBlocks, *, sm_scale: float, soft_cap: float | None,
                  sliding_window: int | None, block_kv: int | None,
                  num_splits: int | None) -> jax.Array:
  """Attention of query blocks ``q [NB, qb, Hq, D]`` over ``k_pages[layer]``/``v_pages[layer]``
  (8-bit: with their ``k_scales``/``v_scales``, else None).

  Returns ``[NB, qb, Hq, D]`` float32. ``block_kv`` and ``num_splits`` default as measured on
  XLA:CPU (`default_block_kv`, `default_num_splits`).
  """
  num_blocks, q_block, num_q_heads, _ = q.shape
  _, num_kv_heads, _, page_size, _ = k_pages.shape
  group = num_q_heads // num_kv_heads
  max_pages = page_table.shape[1]
  if block_kv is None:
    block_kv = default_block_kv(max_pages * page_size, num_blocks, k_scales is not None)
  chunk_pages = max(1, min(block_kv // page_size, max_pages))
  if num_splits is None:
    num_splits = default_num_splits(max_pages, chunk_pages)
  dot_dtype = jnp.float32 if k_scales is not None else jnp.promote_types(
      k_pages.dtype, jnp.float32 if q.dtype == jnp.float32 else k_pages.dtype)
  loop = _Loop(q=_head_major(q, num_kv_heads, sm_scale, dot_dtype),
               position=jnp.tile(blocks.position, (1, group)),  # head-major like q
               pages=jnp.pad(page_table[blocks.row], ((0, 0), (0, chunk_pages)),
                             constant_values=UNMAPPED),
               kv_len=kv_lens[blocks.row], k_pages=k_pages, v_pages=v_pages,
               k_scales=k_scales, v_scales=v_scales, layer=layer,
               chunk_pages=chunk_pages, soft_cap=soft_cap, sliding_window=sliding_window)
  lo, hi = _chunk_range(loop.position, chunk_pages * page_size, sliding_window)
  seen = jnp.tile(softmax.sees_a_key(page_table, blocks, page_size, sliding_window), (1, group))
  attend = functools.partial(_attend, loop, lo, hi, seen, num_splits=num_splits,
                             one_chunk=chunk_pages == max_pages)
  out = attend(exact=False)
  out = jax.lax.cond(softmax.all_finite(out), lambda: out, lambda: attend(exact=True))
  return _block_major(out, q_block)
