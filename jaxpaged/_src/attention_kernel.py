"""Paged attention as a Pallas GPU kernel (Triton; see `jaxpaged._src.gpu` for the backend).

One program per (query block, KV head, split): flash-decoding, a long context is split across
programs whose partial softmax states are merged afterwards (`softmax.merge_splits`). A program
walks its split's pages one page per step, reading them in place from the pool.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpaged._src import attention_softmax as softmax
from jaxpaged._src import gpu
from jaxpaged._src import quant
from jaxpaged._src.attention_blocks import NO_QUERY, QueryBlocks, query_span
from jaxpaged._src.spec import next_pow2

# Triton dots need every dimension to be a power of two of at least this size: query rows are
# padded up to it, pages must hold at least this many tokens, head_dim must be a multiple of it.
TRITON_MIN_DIM = 16
# Triton launch parameters of every program: warps per program, software-pipeline stages.
NUM_WARPS = 4
NUM_STAGES = 2
# Default flash-decoding splits: about one per TOKENS_PER_SPLIT cached tokens (enough programs
# to fill the GPU for few, long sequences), at most MAX_SPLITS (each adds a partial state to
# merge).
TOKENS_PER_SPLIT = 1024
MAX_SPLITS = 16


def pallas_supported(page_size: int, head_dim: int) -> str | None:
  """Why the Triton kernel cannot take these shapes, or None if it can."""
  if page_size < TRITON_MIN_DIM or page_size & (page_size - 1):
    return (f"page_size must be a power of two >= {TRITON_MIN_DIM} for the Pallas kernel, got "
            f"{page_size}")
  if head_dim % TRITON_MIN_DIM:
    return (f"head_dim must be a multiple of {TRITON_MIN_DIM} for the Pallas kernel, got "
            f"{head_dim}")
  return None


def default_num_splits(max_pages: int, page_size: int) -> int:
  """Flash-decoding splits of a context of ``max_pages`` pages (see TOKENS_PER_SPLIT)."""
  return max(1, min(MAX_SPLITS, max_pages * page_size // TOKENS_PER_SPLIT))


class _Program(NamedTuple):
  """What every page step of one program reads: its refs, its block's values, static options."""
  page_table_ref: Any  # [B, max_pages_per_seq] int32
  k_pages_ref: Any  # [L, Hkv, P, page_size, head_dim]
  v_pages_ref: Any  # [L, Hkv, P, page_size, head_dim]
  k_scales_ref: Any  # 8-bit pools: [L, Hkv, P, page_size] per token, or [L] static; else None
  v_scales_ref: Any
  layer: jax.Array  # int32 scalar
  head: jax.Array  # int32 scalar: this program's KV head
  row: jax.Array  # int32 scalar: the batch row of this program's query block
  kv_len: jax.Array  # int32 scalar: that row's length
  position: jax.Array  # [R] int32: position of each query row
  q: list[jax.Array]  # per head_dim chunk, [R, dc]
  chunks: list[tuple[int, int]]  # (start, size) power-of-two pieces of head_dim
  sm_scale: float
  soft_cap: float | None
  sliding_window: int | None


def _read(prog: _Program, pages_ref, scales_ref, page, d0: int, dc: int) -> jax.Array:
  """``[ps, dc]`` of one page's K or V rows, in place from the pool; 8-bit ones dequantized."""
  x = pages_ref[prog.layer, prog.head, page, :, pl.ds(d0, dc)]
  if scales_ref is None:
    return x
  if len(scales_ref.shape) == 1:  # static: one scale per layer
    return quant.dequantize(x, scales_ref[prog.layer])
  return quant.dequantize(x, scales_ref[prog.layer, prog.head, page, :])


def _page_scores(prog: _Program, page) -> jax.Array:
  """[R, page_size] float32 scores of this program's queries against one page's keys."""
  page_size = prog.k_pages_ref.shape[3]
  s = jnp.zeros((prog.position.shape[0], page_size), jnp.float32)
  for qc, (d0, dc) in zip(prog.q, prog.chunks):
    k = _read(prog, prog.k_pages_ref, prog.k_scales_ref, page, d0, dc)  # [ps, dc]
    s += gpu.dot(qc.astype(k.dtype), k, trans_b=True)
  s *= prog.sm_scale
  return softmax.cap_scores(s, prog.soft_cap)


def _page_step(j, carry, prog: _Program, exact: bool):
  """Page ``j`` of the row into the softmax state ``(m, l, acc[, nonfinite])``; acc and
  nonfinite hold one ``[R, dc]`` array per head_dim chunk."""
  m, l, acc = carry[:3]
  _, _, num_pages, page_size, _ = prog.k_pages_ref.shape
  page = jnp.clip(prog.page_table_ref[prog.row, j], 0, num_pages - 1)
  page_ok = prog.page_table_ref[prog.row, j] >= 0
  key_pos = j * page_size + jnp.arange(page_size)
  key_ok = page_ok & (key_pos < prog.kv_len)  # [ps]
  s = _page_scores(prog, page)
  visible = softmax.visible_keys(key_ok[None, :], key_pos[None, :], prog.position[:, None],
                                 prog.sliding_window)
  s = jnp.where(visible, s, softmax.MASKED)
  m, l, p, correction = softmax.online_softmax_step(m, l, s)
  new_acc, new_nonfinite = [], []
  for i, (a, (d0, dc)) in enumerate(zip(acc, prog.chunks)):
    v = _read(prog, prog.v_pages_ref, prog.v_scales_ref, page, d0, dc)  # [ps, dc]
    v = jnp.where(key_ok[:, None], v, jnp.zeros_like(v))  # foreign rows never reach the output
    if exact:  # V's non-finite entries reach only the queries that see them
      v, nonfinite = softmax.split_nonfinite(v, functools.partial(gpu.dot,
                                                                  visible.astype(v.dtype)))
      new_nonfinite.append(carry[3][i] + nonfinite)
    new_acc.append(a * correction[:, None] + gpu.dot(p.astype(v.dtype), v))
  return (m, l, tuple(new_acc)) + ((tuple(new_nonfinite),) if exact else ())


def _run_split(prog: _Program, lo, hi, exact: bool):
  """This split's softmax state ``(m, l, acc)`` over pages ``[lo, hi)``; exact: non-finite V
  entries apart, added to acc at the end."""
  rows = prog.position.shape[0]
  init = (jnp.full((rows,), softmax.MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32),
          tuple(jnp.zeros((rows, dc), jnp.float32) for _, dc in prog.chunks))
  init += init[2:] if exact else ()
  m, l, acc, *nonfinite = jax.lax.fori_loop(lo, jnp.maximum(hi, lo),
                                            functools.partial(_page_step, prog=prog, exact=exact),
                                            init)
  return m, l, (tuple(map(jnp.add, acc, nonfinite[0])) if exact else acc)


def paged_attention_kernel(
    layer_ref,  # [1] int32
    block_row_ref,  # [NB] int32: batch row of each query block
    position_ref,  # [NB, R] int32: position of each query row, NO_QUERY for none
    page_table_ref,  # [B, max_pages_per_seq] int32
    kv_lens_ref,  # [B] int32
    q_ref,  # [NB, Hkv, R, Dp]: R = group * q_block rows, padded; Dp = head_dim padded
    k_pages_ref,  # [L, Hkv, P, page_size, head_dim]
    v_pages_ref,  # [L, Hkv, P, page_size, head_dim]
    *refs,  # (k_scales_ref, v_scales_ref if scaled), then the outputs acc_ref, m_ref, l_ref
    scaled: bool, pages_per_split: int, sm_scale: float, soft_cap: float | None,
    sliding_window: int | None):
  """Flash-decoding over one split of one block's pages, one page per step.

  Outputs: ``acc_ref [NB, Hkv, S, R, Dp]`` float32, the unnormalised output of each split;
  ``m_ref``, ``l_ref [NB, Hkv, S, R]`` float32, its running max and softmax denominator.
  """
  k_scales_ref, v_scales_ref = refs[:2] if scaled else (None, None)
  acc_ref, m_ref, l_ref = refs[-3:]
  n, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  page_size, head_dim = k_pages_ref.shape[3:]
  layer, row = layer_ref[0], block_row_ref[n]
  kv_len = kv_lens_ref[row]
  position = position_ref[n, :]  # [R]
  first, last = query_span(position)
  start = split * pages_per_split
  lo = jnp.maximum(start, softmax.oldest_key(first, sliding_window) // page_size
                   if sliding_window else start)
  hi = jnp.minimum(start + pages_per_split, last // page_size + 1)
  chunks = gpu.pow2_chunks(head_dim)
  prog = _Program(page_table_ref=page_table_ref, k_pages_ref=k_pages_ref,
                  v_pages_ref=v_pages_ref, k_scales_ref=k_scales_ref,
                  v_scales_ref=v_scales_ref, layer=layer, head=h, row=row, kv_len=kv_len,
                  position=position, q=[q_ref[n, h, :, pl.ds(d0, dc)] for d0, dc in chunks],
                  chunks=chunks, sm_scale=sm_scale, soft_cap=soft_cap,
                  sliding_window=sliding_window)
  fast = _run_split(prog, lo, hi, exact=False)  # as in the XLA path, for this program's split
  m, l, acc = jax.lax.cond(softmax.all_finite(*fast[2]), lambda: fast,
                           lambda: _run_split(prog, lo, hi, exact=True))
  for a, (d0, dc) in zip(acc, chunks):
    acc_ref[n, h, split, :, pl.ds(d0, dc)] = a
  m_ref[n, h, split, :] = m
  l_ref[n, h, split, :] = l


def _paged_attention_call(q, k_pages, v_pages, scales, layer, page_table, kv_lens, block_row,
                          position, *, num_splits: int, interpret: bool, **options):
  """Binds the kernel's statics and runs it over the grid (query block, KV head, split).

  ``q [NB, Hkv, R, Dp]`` and ``position [NB, R]`` in the kernel's padded layout. Returns the
  splits' unmerged states ``acc [NB, Hkv, S, R, Dp]``, ``m`` and ``l [NB, Hkv, S, R]``.
  """
  num_blocks, num_kv_heads, rows, padded_dim = q.shape
  pages_per_split = -(-page_table.shape[1] // num_splits)
  kernel = functools.partial(paged_attention_kernel, scaled=bool(scales),
                             pages_per_split=pages_per_split, **options)
  partial_shape = (num_blocks, num_kv_heads, num_splits, rows)
  return pl.pallas_call(
      kernel,
      grid=(num_blocks, num_kv_heads, num_splits),
      out_shape=(jax.ShapeDtypeStruct(partial_shape + (padded_dim,), jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32)),
      compiler_params=gpu.compiler_params(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="jaxpaged_paged_attention",
  )(layer.reshape(1), block_row, position, page_table, kv_lens, q, k_pages, v_pages, *scales)


def attention_pallas(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, k_scales, v_scales,
                     layer: jax.Array, page_table: jax.Array, kv_lens: jax.Array,
                     blocks: QueryBlocks, *, sm_scale: float, soft_cap: float | None,
                     sliding_window: int | None, num_splits: int,
                     interpret: bool) -> jax.Array:
  """Attention of query blocks ``q [NB, qb, Hq, D]`` over ``k_pages[layer]``/``v_pages[layer]``
  (8-bit: with their ``k_scales``/``v_scales``, else None) with the Pallas kernel. Returns
  ``[NB, qb, Hq, D]`` float32."""
  num_blocks, q_block, num_q_heads, head_dim = q.shape
  _, num_kv_heads, _, page_size, _ = k_pages.shape
  group = num_q_heads // num_kv_heads
  rows = max(TRITON_MIN_DIM, next_pow2(group * q_block))
  pad_rows = ((0, 0), (0, rows - group * q_block))
  q = q.reshape(num_blocks, q_block, num_kv_heads, group, head_dim)
  q = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(num_blocks, num_kv_heads, group * q_block,
                                                 head_dim)
  q = jnp.pad(q, ((0, 0),) + pad_rows + ((0, next_pow2(head_dim) - head_dim),))
  position = jnp.pad(jnp.tile(blocks.position, (1, group)), pad_rows, constant_values=NO_QUERY)
  acc, m, l = _paged_attention_call(
      q, k_pages, v_pages, () if k_scales is None else (k_scales, v_scales), layer, page_table,
      kv_lens, blocks.row, position,
      num_splits=num_splits, interpret=interpret, sm_scale=sm_scale, soft_cap=soft_cap,
      sliding_window=sliding_window)
  seen = jnp.tile(softmax.sees_a_key(page_table, blocks, page_size, sliding_window), (1, group))
  seen = jnp.pad(seen, pad_rows)[:, None]
  out = softmax.merge_splits(acc, m, l, 2, seen)[:, :, :group * q_block, :head_dim]
  out = out.reshape(num_blocks, num_kv_heads, group, q_block, head_dim)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(num_blocks, q_block, num_q_heads, head_dim)
