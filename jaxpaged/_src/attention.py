"""Paged attention: decode and ragged (chunked-prefill) attention over the page pool.

One formulation serves both: queries are grouped into **query blocks**, each holding up to
``q_block`` consecutive new tokens of one sequence (decode: one token, one block per row). A
block attends to its sequence's pages, causally: the query at position ``p`` sees keys at
positions ``k <= p`` (and ``k > p - sliding_window``). Both implementations consume the same
block description:

- the XLA path (CPU, and GPU fallback) loops over chunks of KV pages with an online softmax.
  The loop's trip count is the longest sequence in the batch, not ``max_pages_per_seq``. Each
  step gathers one chunk of pages for every block into ``[kv_heads, blocks, tokens, head_dim]``
  and contracts with ``einsum`` in the orientation measured fastest on XLA:CPU (see the README);
- the Pallas GPU kernel (Triton, see `jaxpaged._src.gpu` for the backend choice) runs one
  program per (query block, KV head, split) — flash-decoding: a long context is split across
  programs whose partial softmax states are merged afterwards.

Both mask values read from outside a sequence (pages that are not its own are never trusted:
their scores are -inf and their V rows zero, so even NaN there cannot reach the output).
Softmax and accumulation run in float32 whatever the K/V dtype.

Non-finite values propagate as in a dense softmax over the keys each query sees (its own
sequence, causally, within the sliding window) and reach no other query: NaN in a query, a NaN
or +inf score, or only -inf scores make that query's output NaN; a NaN or +-inf V entry of a
seen key makes that output element NaN or +-inf as ``p @ v`` would with positive weights (NaN
when NaN, or both infinities, are among them). Loops accumulate with plain ``p @ v``, exact when
every V value loaded is finite; when the result is not finite (it may hold 0 * NaN from a key
that some query of the block does not see), the work is done again (``lax.cond``) with V's
non-finite entries taken apart (`_nonfinite_output`). Finite inputs pay one sum over the result.

`ragged_paged_attention_reference` is the plain-``jnp`` statement of the same math on contiguous
K/V.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

from jaxpaged._src import checks
from jaxpaged._src import gpu
from jaxpaged._src.cache import check_cache, check_layer, token_rows
from jaxpaged._src.spec import JaxPagedError


# ----------------------------------------------------------------------------- query blocks

def _decode_blocks(kv_lens):
  """Decode: block b is row b's single query, at the last cached position."""
  num_rows = kv_lens.shape[0]
  return dict(row=jnp.arange(num_rows, dtype=jnp.int32),
              token=jnp.arange(num_rows, dtype=jnp.int32)[:, None],  # [NB, 1] index into q
              position=(kv_lens - 1)[:, None])  # [NB, 1]; -1 = no query (empty sequence)


def _ragged_blocks(kv_lens, q_lens, num_tokens: int, q_block: int):
  """Splits each row's ``q_lens`` new tokens (rows concatenated in ``q``) into query blocks.

  Returns ``row [NB]``, ``token [NB, q_block]`` (index into the flat q, or num_tokens for an
  empty slot) and ``position [NB, q_block]`` (the token's position in its sequence, -1 if empty).
  ``NB = cdiv(num_tokens, q_block) + num_rows`` bounds the blocks of any split (each row adds at
  most one partial block; none when ``q_block`` is 1). Empty blocks still cost a gather each
  step, so the bound is kept tight.
  """
  num_rows = q_lens.shape[0]
  num_blocks = num_tokens if q_block == 1 else -(-num_tokens // q_block) + num_rows
  per_row = -(-q_lens // q_block)
  block_end = jnp.cumsum(per_row)
  block = jnp.arange(num_blocks)
  row = jnp.minimum(jnp.searchsorted(block_end, block, side="right"), num_rows - 1)
  in_row = block - (block_end[row] - per_row[row])  # block index within its row
  offset = in_row[:, None] * q_block + jnp.arange(q_block)  # [NB, q_block] token within row
  valid = (block < block_end[-1])[:, None] & (offset < q_lens[row][:, None])
  row_start = (jnp.cumsum(q_lens) - q_lens)[row][:, None]
  token = jnp.where(valid, row_start + offset, num_tokens)
  position = jnp.where(valid, (kv_lens - q_lens)[row][:, None] + offset, -1)
  return dict(row=row.astype(jnp.int32), token=token.astype(jnp.int32),
              position=position.astype(jnp.int32))


# ----------------------------------------------------------------------------- non-finite values

def _sees_a_key(page_table, blocks, page_size: int, sliding_window):
  """[NB, qb] bool: whether each query sees a key. Its keys ``(p - window, p]`` are all within its
  sequence's length, so it sees one exactly when one of their pages is mapped. A query that sees
  keys but scores every one -inf ends with l == 0 like one that sees none, yet a dense softmax
  gives NaN there, not zeros; counting pages here keeps that test out of the loops."""
  mapped = jnp.cumsum(page_table[blocks["row"]] >= 0, axis=1)
  mapped = jnp.pad(mapped, ((0, 0), (1, 0)))  # [NB, 1 + pages]: mapped pages before each page
  before = lambda page: jnp.take_along_axis(mapped, jnp.clip(page, 0, mapped.shape[1] - 1), 1)
  position = blocks["position"]
  first = (jnp.maximum(position - sliding_window + 1, 0) if sliding_window
           else jnp.zeros_like(position))
  return (position >= 0) & (before(position // page_size + 1) > before(first // page_size))


def _all_finite(*xs):
  """A scalar bool: whether the sum of every element is finite, which it is unless an element is
  not (or, harmlessly, the sum overflows). A plain sum is one fused pass on XLA:CPU and lowers
  on Triton, one axis at a time (a multi-axis reduction fails there under JAX 0.12's abstract
  mesh)."""
  total = 0.0
  for x in xs:
    while x.ndim:
      x = jnp.sum(x, axis=-1)
    total += x
  return jnp.isfinite(total)


def _finite_part(v):
  return jnp.where(jnp.isfinite(v), v, jnp.zeros_like(v))


def _nonfinite_indicators(v):
  """0/1 of the V entries that drive an output element to +inf and to -inf (NaN: to both)."""
  bad = ~jnp.isfinite(v)
  return (bad & ~(v < 0)).astype(v.dtype), (bad & ~(v > 0)).astype(v.dtype)


def _nonfinite_output(up, down):
  """From counts of seen keys with +inf (or NaN) and -inf (or NaN) V entries, what they add to each
  output element: 0, +inf, -inf or NaN (inf - inf), as ``p @ v`` does with positive weights."""
  return jnp.where(up > 0, jnp.inf, 0.0) + jnp.where(down > 0, -jnp.inf, 0.0)


def _normalise(acc, l, seen):
  """Output rows from merged softmax states: acc / l; where l == 0, NaN for a query that sees
  keys (all scoring -inf) and zeros for one that sees none."""
  out = acc / jnp.where(l == 0, 1.0, l)[..., None]
  return jnp.where((l == 0)[..., None], jnp.where(seen, jnp.nan, 0.0)[..., None], out)


# ----------------------------------------------------------------------------- XLA path

def _merge_splits(acc, m, l, axis, seen):
  """Merges partial softmax states computed over disjoint key ranges (flash-decoding); `seen`
  as `_sees_a_key`, broadcast to the merged l."""
  m_max = jnp.max(m, axis=axis, keepdims=True)
  weight = jnp.exp(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))  # -inf: nothing seen anywhere
  # An inf in acc comes from V (see `_nonfinite_output`): a weight that underflows to 0 would make
  # it NaN. The smallest normal float instead changes no finite result visibly.
  weight = jnp.maximum(weight, jnp.finfo(jnp.float32).tiny)
  l = jnp.sum(l * weight, axis=axis)
  acc = jnp.sum(acc * jnp.expand_dims(weight, -1), axis=axis)
  return _normalise(acc, l, seen)


def _attention_xla(q, k_pages, v_pages, layer, page_table, kv_lens, blocks, *, sm_scale,
                   soft_cap, sliding_window, block_kv, num_splits):
  """q: [NB, qb, Hq, D] gathered query blocks. Returns [NB, qb, Hq, D] float32."""
  num_blocks, q_block, num_q_heads, head_dim = q.shape
  _, num_kv_heads, num_pages, page_size, _ = k_pages.shape
  group = num_q_heads // num_kv_heads
  max_pages = page_table.shape[1]
  if block_kv is None:  # measured on XLA:CPU: the whole context in one step when it is small,
    # else >= 64 keys and about 512 token-rows a step
    whole = max_pages * page_size
    block_kv = whole if whole * num_blocks <= 8192 else min(1024, max(64, 512 // num_blocks))
  chunk_pages = max(1, min(block_kv // page_size, max_pages))
  chunk = chunk_pages * page_size
  if num_splits is None:  # two loops (two cores) pay off once a context spans 8+ chunks
    num_splits = 2 if page_table.shape[1] >= 8 * chunk_pages else 1
  # Low-precision K/V meet a query rounded to their dtype; the dots accumulate in float32.
  dot_dtype = jnp.promote_types(k_pages.dtype, jnp.float32 if q.dtype == jnp.float32 else
                                k_pages.dtype)
  f32 = dict(preferred_element_type=jnp.float32)
  # [Hkv, NB, group * qb, D]: every query row of one KV head, for one dot per chunk.
  q = q.reshape(num_blocks, q_block, num_kv_heads, group, head_dim).astype(jnp.float32)
  q = jnp.transpose(q, (2, 0, 3, 1, 4)).reshape(num_kv_heads, num_blocks, group * q_block,
                                                 head_dim) * sm_scale
  q = q.astype(dot_dtype)
  position = jnp.tile(blocks["position"], (1, group))  # [NB, group * qb], head-major like q
  rows = page_table[blocks["row"]]  # [NB, max_pages_per_seq]
  block_kv_len = kv_lens[blocks["row"]]
  last = jnp.max(position, axis=1)  # newest query of each block; -1: no query
  first = jnp.min(jnp.where(position >= 0, position, jnp.iinfo(jnp.int32).max), axis=1)
  seen_from = jnp.maximum(first - sliding_window + 1, 0) if sliding_window else 0
  live = last >= 0
  lo = jnp.min(jnp.where(live, seen_from // chunk, jnp.iinfo(jnp.int32).max))
  hi = jnp.maximum(jnp.max(jnp.where(live, last // chunk + 1, 0)), lo)
  padded = jnp.pad(rows, ((0, 0), (0, chunk_pages)), constant_values=-1)
  seen = jnp.tile(_sees_a_key(page_table, blocks, page_size, sliding_window), (1, group))

  def body(c, carry, exact):
    m, l, acc = carry[:3]
    pages = jax.lax.dynamic_slice_in_dim(padded, c * chunk_pages, chunk_pages, axis=1)
    safe = jnp.clip(pages, 0, num_pages - 1)
    key_pos = c * chunk + jnp.arange(chunk)  # [chunk]
    key_ok = (jnp.repeat(pages >= 0, page_size, axis=1)
              & (key_pos[None] < block_kv_len[:, None]))  # [NB, chunk]
    k = k_pages[layer][:, safe].reshape(num_kv_heads, num_blocks, chunk, head_dim)
    v = v_pages[layer][:, safe].reshape(num_kv_heads, num_blocks, chunk, head_dim)
    v = jnp.where(key_ok[None, :, :, None], v, 0).astype(dot_dtype)
    s = jnp.einsum("hnqd,hnsd->hnqs", q, k.astype(dot_dtype), **f32)
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    visible = key_ok[:, None, :] & (key_pos[None, None, :] <= position[:, :, None])
    if sliding_window:
      visible &= key_pos[None, None, :] > position[:, :, None] - sliding_window
    s = jnp.where(visible[None], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing yet
    p = jnp.exp(s - m_safe[..., None])
    correction = jnp.exp(m - m_safe)
    extra = ()
    if exact:  # V's non-finite entries reach only the queries that see them
      count = functools.partial(jnp.einsum, "nqs,hnsd->hnqd", visible.astype(dot_dtype), **f32)
      extra = (carry[3] + _nonfinite_output(*map(count, _nonfinite_indicators(v))),)
      v = _finite_part(v)
    acc = acc * correction[..., None] + jnp.einsum("hnqs,hnsd->hnqd", p.astype(dot_dtype), v,
                                                   **f32)
    return (m_new, l * correction + jnp.sum(p, axis=-1), acc) + extra

  shape = (num_kv_heads, num_blocks, group * q_block)

  def attend(exact):
    """[Hkv, NB, group * qb, D]; exact: V's non-finite entries taken apart."""
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    init += init[2:] if exact else ()
    step = functools.partial(body, exact=exact)
    if chunk_pages == max_pages:  # one chunk holds every page: no loop
      parts = [step(0, init)]
    else:  # independent loops over disjoint chunk ranges: XLA:CPU runs them on different cores
      per_split = (hi - lo + num_splits - 1) // num_splits
      parts = [jax.lax.fori_loop(jnp.minimum(lo + i * per_split, hi),
                                 jnp.minimum(lo + (i + 1) * per_split, hi), step, init)
               for i in range(num_splits)]
    m, l, acc, *nonfinite = (jnp.stack(x, axis=0) for x in zip(*parts))
    return _merge_splits(acc + nonfinite[0] if exact else acc, m, l, 0, seen)

  out = attend(exact=False)
  out = jax.lax.cond(_all_finite(out), lambda: out, lambda: attend(exact=True))
  out = out.reshape(num_kv_heads, num_blocks, group, q_block, head_dim)
  return jnp.transpose(out, (1, 3, 0, 2, 4)).reshape(num_blocks, q_block, num_q_heads, head_dim)


# ----------------------------------------------------------------------------- Pallas kernel

def _attention_kernel(
    layer_ref,  # [1] int32
    block_row_ref,  # [NB] int32: batch row of each query block
    position_ref,  # [NB, R] int32: position of each query row, -1 for none
    page_table_ref,  # [B, max_pages_per_seq] int32
    kv_lens_ref,  # [B] int32
    q_ref,  # [NB, Hkv, R, Dp]: R = group * q_block rows, padded; Dp = head_dim padded
    k_pages_ref,  # [L, Hkv, P, page_size, head_dim]
    v_pages_ref,  # [L, Hkv, P, page_size, head_dim]
    acc_ref,  # [NB, Hkv, S, R, Dp] float32: unnormalised output of each split
    m_ref,  # [NB, Hkv, S, R] float32: running max of each split
    l_ref,  # [NB, Hkv, S, R] float32: softmax denominator of each split
    *, pages_per_split: int, sm_scale: float, soft_cap: float | None,
    sliding_window: int | None):
  """Flash-decoding over one split of one block's pages, one page per step."""
  n, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  _, _, num_pages, page_size, head_dim = k_pages_ref.shape
  rows = q_ref.shape[2]
  layer = layer_ref[0]
  row = block_row_ref[n]
  kv_len = kv_lens_ref[row]
  position = position_ref[n, :]  # [R]
  last = jnp.max(position)
  first = jnp.min(jnp.where(position >= 0, position, jnp.iinfo(jnp.int32).max))
  start = split * pages_per_split
  lo = jnp.maximum(start, jnp.maximum(first - sliding_window + 1, 0) // page_size
                   if sliding_window else start)
  hi = jnp.minimum(start + pages_per_split, last // page_size + 1)
  chunks = gpu.pow2_chunks(head_dim)
  q = [q_ref[n, h, :, pl.ds(d0, dc)] for d0, dc in chunks]  # each [R, dc]

  def body(j, carry, exact):
    m, l, acc = carry[:3]
    page = jnp.clip(page_table_ref[row, j], 0, num_pages - 1)
    page_ok = page_table_ref[row, j] >= 0
    key_pos = j * page_size + jnp.arange(page_size)
    key_ok = page_ok & (key_pos < kv_len)  # [ps]
    s = jnp.zeros((rows, page_size), jnp.float32)
    for qc, (d0, dc) in zip(q, chunks):
      k = k_pages_ref[layer, h, page, :, pl.ds(d0, dc)]  # [ps, dc]
      s += gpu.dot(qc.astype(k.dtype), k, trans_b=True)
    s *= sm_scale
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    visible = key_ok[None, :] & (key_pos[None, :] <= position[:, None])
    if sliding_window:
      visible &= key_pos[None, :] > position[:, None] - sliding_window
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    correction = jnp.exp(m - m_safe)
    new_acc, new_nonfinite = [], []
    for i, (a, (d0, dc)) in enumerate(zip(acc, chunks)):
      v = v_pages_ref[layer, h, page, :, pl.ds(d0, dc)]  # [ps, dc]
      v = jnp.where(key_ok[:, None], v, jnp.zeros_like(v))  # foreign rows never reach the output
      if exact:  # V's non-finite entries reach only the queries that see them
        count = functools.partial(gpu.dot, visible.astype(v.dtype))
        new_nonfinite.append(carry[3][i] + _nonfinite_output(*map(count,
                                                                  _nonfinite_indicators(v))))
        v = _finite_part(v)
      new_acc.append(a * correction[:, None] + gpu.dot(p.astype(v.dtype), v))
    return (m_new, l * correction + jnp.sum(p, axis=1), tuple(new_acc)) + (
        (tuple(new_nonfinite),) if exact else ())

  def run(exact):
    """This split's softmax state; exact: non-finite V entries apart, added to acc at the end."""
    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            tuple(jnp.zeros((rows, dc), jnp.float32) for _, dc in chunks))
    init += init[2:] if exact else ()
    m, l, acc, *nonfinite = jax.lax.fori_loop(lo, jnp.maximum(hi, lo),
                                              functools.partial(body, exact=exact), init)
    return m, l, (tuple(map(jnp.add, acc, nonfinite[0])) if exact else acc)

  fast = run(exact=False)  # as in `_attention_xla`, for this program's split
  m, l, acc = jax.lax.cond(_all_finite(*fast[2]), lambda: fast, lambda: run(exact=True))
  for a, (d0, dc) in zip(acc, chunks):
    acc_ref[n, h, split, :, pl.ds(d0, dc)] = a
  m_ref[n, h, split, :] = m
  l_ref[n, h, split, :] = l


def _pallas_supported(page_size: int, head_dim: int) -> str | None:
  """Why the Triton kernel cannot take these shapes (Triton dots need power-of-two >= 16)."""
  if page_size < 16 or page_size & (page_size - 1):
    return f"page_size must be a power of two >= 16 for the Pallas kernel, got {page_size}"
  if head_dim % 16:
    return f"head_dim must be a multiple of 16 for the Pallas kernel, got {head_dim}"
  return None


def _attention_pallas(q, k_pages, v_pages, layer, page_table, kv_lens, blocks, *, sm_scale,
                      soft_cap, sliding_window, num_splits, interpret):
  """q: [NB, qb, Hq, D] query blocks. Returns [NB, qb, Hq, D] float32."""
  num_blocks, q_block, num_q_heads, head_dim = q.shape
  _, num_kv_heads, _, page_size, _ = k_pages.shape
  group = num_q_heads // num_kv_heads
  rows = max(16, 1 << (group * q_block - 1).bit_length())  # Triton dots need >= 16 rows
  padded_dim = 1 << (head_dim - 1).bit_length()
  q = q.reshape(num_blocks, q_block, num_kv_heads, group, head_dim)
  q = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(num_blocks, num_kv_heads, group * q_block,
                                                 head_dim)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group * q_block), (0, padded_dim - head_dim)))
  position = jnp.pad(jnp.tile(blocks["position"], (1, group)),
                     ((0, 0), (0, rows - group * q_block)), constant_values=-1)
  max_pages = page_table.shape[1]
  pages_per_split = -(-max_pages // num_splits)
  kernel = functools.partial(_attention_kernel, pages_per_split=pages_per_split,
                             sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
  partial_shape = (num_blocks, num_kv_heads, num_splits, rows)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(num_blocks, num_kv_heads, num_splits),
      out_shape=(jax.ShapeDtypeStruct(partial_shape + (padded_dim,), jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32)),
      compiler_params=gpu.compiler_params(num_warps=4, num_stages=2),
      interpret=interpret,
      name="jaxpaged_paged_attention",
  )(layer.reshape(1), blocks["row"], position, page_table, kv_lens, q, k_pages, v_pages)
  seen = jnp.tile(_sees_a_key(page_table, blocks, page_size, sliding_window), (1, group))
  seen = jnp.pad(seen, ((0, 0), (0, rows - group * q_block)))[:, None]
  out = _merge_splits(acc, m, l, 2, seen)[:, :, :group * q_block, :head_dim]
  out = out.reshape(num_blocks, num_kv_heads, group, q_block, head_dim)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(num_blocks, q_block, num_q_heads, head_dim)


# ----------------------------------------------------------------------------- reference

def ragged_paged_attention_reference(q, k_pages, v_pages, page_table, kv_lens, q_lens, *,
                                     sm_scale=None, soft_cap=None, sliding_window=None):
  """Plain-``jnp`` ragged paged attention, one query token at a time on contiguous K/V.

  Shapes as `jaxpaged.ops.ragged_paged_attention`; float32 math, the same handling of non-finite
  values (a dense softmax over the keys each query sees). For tests and small inputs.
  """
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  group = num_q_heads // num_kv_heads
  options = _check_options(head_dim, sm_scale=sm_scale, soft_cap=soft_cap,
                           sliding_window=sliding_window)
  sm_scale, soft_cap, sliding_window = (options[k] for k in ("sm_scale", "soft_cap",
                                                             "sliding_window"))
  if 0 in (num_tokens, *page_table.shape):  # no query, or nothing to see (as `_attention`)
    return jnp.zeros_like(q)
  row, offset, valid = token_rows(q_lens, num_tokens)
  position = kv_lens[row] - q_lens[row] + offset

  def one(q_t, row, position):
    pages = jnp.clip(page_table[row], 0)
    k = k_pages[:, pages].reshape(num_kv_heads, -1, head_dim)  # [H, S, D]
    v = v_pages[:, pages].reshape(num_kv_heads, -1, head_dim).astype(jnp.float32)
    key_pos = jnp.arange(k.shape[1])
    visible = (key_pos <= position) & (key_pos < kv_lens[row])
    visible &= jnp.repeat(page_table[row] >= 0, page_size)
    if sliding_window:
      visible &= key_pos > position - sliding_window
    q_t = q_t.reshape(num_kv_heads, group, head_dim).astype(jnp.float32)
    s = jnp.einsum("hgd,hsd->hgs", q_t, k.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    # IEEE softmax over the seen keys: NaN or +inf scores, or only -inf ones, give NaN.
    s = jnp.where(visible, s, -jnp.inf)
    p = jnp.where(visible, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0)
    l = jnp.sum(p, -1)[..., None]
    count = lambda x: jnp.einsum("s,hsd->hd", visible.astype(jnp.float32), x)[:, None]
    out = (jnp.einsum("hgs,hsd->hgd", p, _finite_part(v)) / jnp.where(l == 0, 1, l)
           + _nonfinite_output(*map(count, _nonfinite_indicators(v))))
    return out.reshape(num_q_heads, head_dim)

  out = jax.vmap(one)(q, row, position)
  return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


# ----------------------------------------------------------------------------- public wrappers

def pool_array(name: str, x, ndim: int):
  """A K/V pool argument, checked to be an array of ``ndim`` dimensions (not a list)."""
  if not isinstance(x, (jax.Array, np.ndarray)) or x.ndim != ndim:
    raise JaxPagedError(f"{name} must be a {ndim}-D float array [num_kv_heads, num_pages, "
                        f"page_size, head_dim], got {type(x).__name__}"
                        f"{list(getattr(x, 'shape', []))}; pass the cache's pages, e.g. "
                        f"cache.{name}[layer].")
  return x


def _check_attention_args(q, k_pages, v_pages, kind):
  """Static shape checks shared by every entry point."""
  if k_pages.shape != v_pages.shape or k_pages.ndim != 5:
    raise JaxPagedError(f"k_pages and v_pages must both be [num_kv_heads, num_pages, page_size, "
                        f"head_dim], got {k_pages.shape[1:]} and {v_pages.shape[1:]}.")
  _, num_kv_heads, _, _, head_dim = k_pages.shape
  if getattr(q, "ndim", None) != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
    raise JaxPagedError(
        f"q must be [{'batch' if kind == 'decode' else 'tokens'}, num_q_heads, "
        f"head_dim={head_dim}] with num_q_heads a multiple of num_kv_heads={num_kv_heads}, got "
        f"{getattr(q, 'shape', type(q).__name__)}; for GQA/MQA give every query head (KV head i "
        "serves query heads i*group ... (i+1)*group-1).")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise JaxPagedError(f"q must be a float array, got {q.dtype}.")


_FIX = {
    "sm_scale": "pass a positive float, or None for head_dim ** -0.5",
    "soft_cap": "pass the cap scores are squashed to (Gemma 2: 50.0), or None for no cap",
    "sliding_window": "pass how many of the latest keys each query sees (e.g. 4096), or None "
                      "for full attention",
    "q_block": "pass query tokens per block (e.g. 16), or None for the default",
    "num_splits": "pass how many ranges to split each context into (e.g. 2), or None for the "
                  "default",
    "block_kv": "pass KV tokens per loop step (e.g. 512), or None for the default",
}


def _static_positive(name, value, integer):
  """A positive finite Python int (or float) from a static option; JaxPagedError otherwise."""
  kind = "int" if integer else "finite float"
  if isinstance(value, jax.Array):  # traced, or on a device: either way not a compile-time value
    raise JaxPagedError(
        f"{name} must be a positive {kind} or None, got a JAX array ({value.dtype}"
        f"{list(value.shape)}); it is a static option (it shapes the compiled program), so it "
        f"cannot be traced or come from a device: {_FIX[name]}, as a Python number.")
  types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, types):
    raise JaxPagedError(f"{name} must be a positive {kind} or None, got {value!r} of type "
                        f"{type(value).__name__}; {_FIX[name]}.")
  value = int(value) if integer else float(value)
  if not (math.isfinite(value) and value > 0):
    raise JaxPagedError(f"{name} must be a positive {kind} or None, got {value!r}; "
                        f"{_FIX[name]}.")
  return value


def _check_options(head_dim, *, impl="auto", interpret=False, **options):
  """Static options as plain Python values (jit cache keys), sm_scale resolved; JaxPagedError
  naming the option otherwise."""
  if not isinstance(impl, str) or impl not in gpu.IMPLS:
    raise JaxPagedError(f"impl must be one of {gpu.IMPLS}, got {impl!r}; 'auto' runs the Pallas "
                        "kernel on GPU and the XLA path elsewhere.")
  if not isinstance(interpret, (bool, np.bool_)):
    raise JaxPagedError(f"interpret must be a bool, got {interpret!r}; pass True to run the "
                        "Pallas kernel in interpret mode (CPU tests), else False.")
  out = {name: None if value is None else _static_positive(
      name, value, integer=name not in ("sm_scale", "soft_cap"))
         for name, value in options.items()}
  if "sm_scale" in out and out["sm_scale"] is None:
    out["sm_scale"] = float(head_dim ** -0.5)
  return dict(out, impl=impl, interpret=bool(interpret))


def _resolve_impl(impl, k_pages):
  impl = gpu.resolve_impl(impl)
  if impl == "pallas":
    why = _pallas_supported(k_pages.shape[3], k_pages.shape[4])
    if why:
      raise JaxPagedError(f"{why}; use impl='xla' for these shapes.")
  return impl


def _default_splits(max_pages: int, page_size: int) -> int:
  """Pallas flash-decoding splits: about one per 1024 cached tokens, at most 16."""
  return max(1, min(16, max_pages * page_size // 1024))


@functools.partial(jax.jit, static_argnames=(
    "decode", "q_block", "sm_scale", "soft_cap", "sliding_window", "impl", "interpret",
    "num_splits", "block_kv"))
def _attention(q, k_pages, v_pages, layer, page_table, kv_lens, q_lens, *, decode, q_block,
               sm_scale, soft_cap, sliding_window, impl, interpret, num_splits, block_kv):
  num_tokens = q.shape[0]
  if 0 in (num_tokens, *page_table.shape):  # no query, or nothing to see: with no row, every
    return jnp.zeros_like(q)  # entry is past the last row
  if decode:
    blocks = _decode_blocks(kv_lens)
    q_blocks = q[:, None]
  else:
    blocks = _ragged_blocks(kv_lens, q_lens, num_tokens, q_block)
    q_blocks = jnp.concatenate([q, jnp.zeros_like(q[:1])])[blocks["token"]]
  options = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
  if impl == "pallas":
    out = _attention_pallas(q_blocks, k_pages, v_pages, layer, page_table, kv_lens, blocks,
                            num_splits=num_splits or _default_splits(page_table.shape[1],
                                                                      k_pages.shape[3]),
                            interpret=interpret, **options)
  else:
    out = _attention_xla(q_blocks, k_pages, v_pages, layer, page_table, kv_lens, blocks,
                         block_kv=block_kv, num_splits=num_splits, **options)
  if decode:
    return out[:, 0].astype(q.dtype)
  out = jnp.zeros((num_tokens + 1,) + q.shape[1:], out.dtype).at[blocks["token"]].set(out)
  return out[:num_tokens].astype(q.dtype)


def _default_q_block(num_tokens: int, num_rows: int) -> int:
  """Query tokens per block: 1 for pure decode, up to 16 for prefill chunks."""
  per_row = max(1, num_tokens // max(num_rows, 1))
  return min(16, 1 << (per_row - 1).bit_length())


def paged_attention_arrays(q, k_pages, v_pages, layer, page_table, kv_lens, *, sm_scale=None,
                           soft_cap=None, sliding_window=None, impl="auto", interpret=False,
                           num_splits=None, block_kv=None):
  """Decode attention on arrays; k_pages/v_pages carry a leading layer axis. See `ops`."""
  _check_attention_args(q, k_pages, v_pages, "decode")
  options = _check_options(k_pages.shape[4], sm_scale=sm_scale, soft_cap=soft_cap,
                           sliding_window=sliding_window, impl=impl, interpret=interpret,
                           num_splits=num_splits, block_kv=block_kv)
  page_table, kv_lens = _check_tables(page_table, kv_lens, q.shape[0], k_pages.shape)
  options["impl"] = _resolve_impl(impl, k_pages)
  return _attention(q, k_pages, v_pages, layer, page_table, kv_lens, None, decode=True,
                    q_block=1, **options)


def ragged_paged_attention_arrays(q, k_pages, v_pages, layer, page_table, kv_lens, q_lens, *,
                                  sm_scale=None, soft_cap=None, sliding_window=None,
                                  impl="auto", interpret=False, q_block=None, num_splits=None,
                                  block_kv=None):
  """Ragged attention on arrays; k_pages/v_pages carry a leading layer axis. See `ops`."""
  _check_attention_args(q, k_pages, v_pages, "ragged")
  options = _check_options(k_pages.shape[4], sm_scale=sm_scale, soft_cap=soft_cap,
                           sliding_window=sliding_window, impl=impl, interpret=interpret,
                           q_block=q_block, num_splits=num_splits, block_kv=block_kv)
  page_table, kv_lens = _check_tables(page_table, kv_lens, None, k_pages.shape)
  num_rows = page_table.shape[0]
  q_lens = checks.index_vector("q_lens", q_lens, num_rows, per="row: new tokens of each row, "
                               "as given to extend")
  if not checks.is_traced(kv_lens):
    _check_known(q_lens, "q_lens", lambda n: (n >= 0) & (n <= np.asarray(kv_lens)),
                 "must be in [0, that row's length]: a row's new tokens are its last ones")
  options["q_block"] = options["q_block"] or _default_q_block(q.shape[0], num_rows)
  options["impl"] = _resolve_impl(impl, k_pages)
  return _attention(q, k_pages, v_pages, layer, page_table, kv_lens, q_lens, decode=False,
                    **options)


def _check_known(x, name, ok, message):
  """Checks concrete values (traced ones cannot be): ``ok(values)`` for every row."""
  if checks.is_traced(x):
    return
  bad = np.flatnonzero(~ok(np.asarray(x)))
  if bad.size:
    raise JaxPagedError(f"{name} at rows {bad.tolist()[:8]}: {message}; got "
                        f"{np.asarray(x)[bad].tolist()[:8]}.")


def _check_tables(page_table, kv_lens, num_rows, pool_shape):
  """Block tables and lengths as int32, exactly; known lengths within the table's capacity and
  the pages they use within the pool (-1 marks an unmapped page)."""
  _, _, num_pages, page_size, _ = pool_shape
  page_table = checks.index_table("block_tables", page_table, num_rows)
  kv_lens = checks.index_vector("lengths", kv_lens, page_table.shape[0],
                                per="block_tables row")
  capacity = page_table.shape[1] * page_size
  _check_known(kv_lens, "lengths", lambda n: (n >= 0) & (n <= capacity),
               f"must be in [0, pages_per_seq * page_size = {capacity}]: a row cannot hold more "
               "tokens than its block table names")
  if not checks.is_traced(page_table) and not checks.is_traced(kv_lens):
    used = np.arange(page_table.shape[1]) < -(-np.asarray(kv_lens)[:, None] // page_size)
    pages = np.asarray(page_table)
    _check_known(kv_lens, "block_tables", lambda _: ~np.any(
        used & ((pages < -1) | (pages >= num_pages)), axis=1),
                 f"name pages outside [0, {num_pages}) (or -1, unmapped) within the row's length")
  return page_table, kv_lens


# ----------------------------------------------------------------------------- on a cache

def _rows_of(cache, seq_ids):
  """Page-table rows and lengths of a batch's sequences; padding and bad ids see nothing."""
  seq_ids = checks.index_vector("seq_ids", seq_ids)
  live = (seq_ids >= 0) & (seq_ids < cache.spec.max_seqs)
  rows = jnp.where(live, seq_ids, 0)
  page_table = jnp.where(live[:, None], cache.page_table[rows], -1)
  return page_table, jnp.where(live, cache.seq_lens[rows], 0)


def paged_attention(q, cache, layer, seq_ids, *, sm_scale=None, soft_cap=None,
                    sliding_window=None, impl="auto", interpret=False, num_splits=None,
                    block_kv=None):
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
    num_splits: the context is split into this many independent ranges whose partial softmax
      states are merged (flash-decoding). Default: Pallas one per ~1k tokens; XLA 2 (two
      loops XLA:CPU runs on two cores) when the context spans 8 or more steps, else 1.
    block_kv: XLA path: KV tokens a loop step gathers per query block (default: at least 64,
      and ``512 // batch`` for small batches).

  Returns:
    ``[B, num_q_heads, head_dim]`` in q's dtype; softmax and accumulation are float32. NaN and
    inf propagate as in a dense softmax over the keys a query sees, and never to other queries:
    NaN in q or in a seen key's K makes the query's output NaN, NaN/+-inf in a seen key's V
    makes those output elements NaN/+-inf (NaN if NaN, or both infinities, are among them). An
    empty batch returns an empty output.
  """
  spec = check_cache(cache)
  layer = check_layer(spec, layer)
  page_table, kv_lens = _rows_of(cache, seq_ids)
  return paged_attention_arrays(q, cache.k_pages, cache.v_pages, layer, page_table, kv_lens,
                                sm_scale=sm_scale, soft_cap=soft_cap,
                                sliding_window=sliding_window, impl=impl, interpret=interpret,
                                num_splits=num_splits, block_kv=block_kv)


def ragged_paged_attention(q, cache, layer, seq_ids, q_lens, *, sm_scale=None, soft_cap=None,
                           sliding_window=None, impl="auto", interpret=False, q_block=None,
                           num_splits=None, block_kv=None):
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
    ``[T, num_q_heads, head_dim]`` in q's dtype (NaN/inf as `paged_attention`). With no rows,
    every entry is past the last row: zeros (an empty output for ``T = 0``).
  """
  spec = check_cache(cache)
  layer = check_layer(spec, layer)
  page_table, kv_lens = _rows_of(cache, seq_ids)
  return ragged_paged_attention_arrays(
      q, cache.k_pages, cache.v_pages, layer, page_table, kv_lens, q_lens, sm_scale=sm_scale,
      soft_cap=soft_cap, sliding_window=sliding_window, impl=impl, interpret=interpret,
      q_block=q_block, num_splits=num_splits, block_kv=block_kv)
