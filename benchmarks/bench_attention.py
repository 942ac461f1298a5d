"""Decode attention benchmarks (attention issue).

Decode attention, B=8, 32 query heads, 8 KV heads, head_dim 128, 2048 tokens a sequence, on
pages in random order: GB/s of K/V read; that as a fraction of this machine's streaming read
bandwidth (the faster of a NumPy and a jitted jnp sum over the same bytes, same run); and paged
time over the best dense contiguous-cache attention in XLA (the fastest of three layouts /
contractions, same tokens, same run). Repeated at bfloat16 and at 32k tokens for one sequence.
Then one interleaved run of the paged contenders alone, for the ratios the issue's targets name:
page_size 16 / 64, bfloat16 / float32 and int8 / float32 time for the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from benchmarks.harness import Row, block, median_times_interleaved

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GROUP = Q_HEADS // KV_HEADS


def _dense_variants(batch):
  """Dense-cache decode attention, v [B, Hkv, S, D], with K in two layouts and QK written two
  ways; the benchmark compares against the fastest."""
  def attend(q, k, v, qk):
    qq = q.reshape(batch, KV_HEADS, GROUP, HEAD_DIM) * HEAD_DIM ** -0.5
    p = jax.nn.softmax(qk(qq, k), axis=-1).astype(v.dtype)
    return jnp.einsum("bhgs,bhsd->bhgd", p, v, preferred_element_type=jnp.float32).reshape(
        batch, Q_HEADS, HEAD_DIM)

  f32 = dict(preferred_element_type=jnp.float32)
  return {
      "dense [B,H,S,D], q.kT": (False, lambda q, k: jnp.einsum("bhgd,bhsd->bhgs", q, k, **f32)),
      "dense [B,H,S,D], k.qT": (False, lambda q, k: jnp.swapaxes(
          jnp.einsum("bhsd,bhgd->bhsg", k, q, **f32), -1, -2)),
      "dense K^T [B,H,D,S]": (True, lambda q, k: jnp.einsum("bhgd,bhds->bhgs", q, k, **f32)),
  }, attend


def _paged_case(*, batch, tokens, dtype, page_size):
  """A one-layer cache of ``batch`` sequences of ``tokens`` random K/V (written through
  `write_kv`: 8-bit pools quantize per token) on pages in random order, a query and the ids."""
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                      page_size=page_size, num_pages=batch * tokens // page_size,
                      max_seqs=batch, max_pages_per_seq=tokens // page_size, dtype=dtype)
  rng = np.random.default_rng(0)
  cache = jp.init_cache(spec)
  cache = dataclasses.replace(cache, free_pages=jnp.asarray(  # pages in random order
      rng.permutation(spec.num_pages).astype(np.int32)))
  ids = jnp.arange(batch, dtype=jnp.int32)
  cache, slots, ok = jp.extend(cache, ids, jnp.full((batch,), tokens, jnp.int32),
                               num_slots=batch * tokens)
  assert bool(ok)
  key = jax.random.split(jax.random.key(0), 3)
  store = jnp.float32 if spec.quantized else dtype
  shape = (batch * tokens, KV_HEADS, HEAD_DIM)
  cache = jax.jit(jp.write_kv, donate_argnums=0)(
      cache, 0, jax.random.normal(key[0], shape, store), jax.random.normal(key[1], shape, store),
      slots)
  q = jax.random.normal(key[2], (batch, Q_HEADS, HEAD_DIM), store)
  return cache, q, ids


def _ratio_rows(*, batch, tokens, repeats) -> list[Row]:
  """Paged decode attention alone, interleaved in one run: page_size 16 / 64 (float32), and
  bfloat16 / float32 and int8 / float32 (page_size 64), the same tokens."""
  paged = jax.jit(functools.partial(jp.paged_attention, impl="xla"))
  cases = {"f32": (jnp.float32, 64), "f32 page_size 16": (jnp.float32, 16),
           "bf16": (jnp.bfloat16, 64), "int8": (jnp.int8, 64)}
  contenders = {}
  for label, (dtype, page_size) in cases.items():
    cache, q, ids = _paged_case(batch=batch, tokens=tokens, dtype=dtype, page_size=page_size)
    contenders[label] = functools.partial(lambda c, q, i: block(paged(q, c, 0, i)), cache, q, ids)
  times = median_times_interleaved(contenders, repeats=repeats)
  where = f"B{batch} x {tokens // 1024}k tokens"
  ratio = lambda a, b: times[a] / times[b]
  return [
      Row("decode-attention", f"{where}: page_size 16 / page_size 64 time (f32)",
          ratio("f32 page_size 16", "f32"), "x", "<= 1.2",
          ratio("f32 page_size 16", "f32") <= 1.2),
      Row("decode-attention", f"{where}: bf16 / f32 time (page_size 64)", ratio("bf16", "f32"),
          "x", "<= 1", ratio("bf16", "f32") <= 1),
      Row("decode-attention", f"{where}: int8 / f32 time (page_size 64)", ratio("int8", "f32"),
          "x", "<= 1", ratio("int8", "f32") <= 1),
  ]


def _decode_case(label, *, batch, tokens, dtype, page_size, repeats):
  cache, q, ids = _paged_case(batch=batch, tokens=tokens, dtype=dtype, page_size=page_size)
  # The same tokens, contiguous: [B, Hkv, S, D] (and transposed K for the K^T variant).
  dense_k, dense_v = jax.vmap(lambda s: jp.gather_kv(cache, 0, s))(ids)  # [B, S, Hkv, D]
  dense_k, dense_v = (jnp.swapaxes(x, 1, 2) for x in (dense_k, dense_v))
  nbytes = 2 * batch * tokens * KV_HEADS * HEAD_DIM * jnp.dtype(dtype).itemsize

  paged = jax.jit(functools.partial(jp.paged_attention, impl="xla"))
  reference = paged(q, cache, 0, ids)
  contenders = {"paged": lambda: block(paged(q, cache, 0, ids))}
  variants, attend = _dense_variants(batch)
  for name, (transposed, qk) in variants.items():
    k = jnp.swapaxes(dense_k, -1, -2) if transposed else dense_k
    fn = jax.jit(functools.partial(attend, qk=qk))
    np.testing.assert_allclose(np.asarray(fn(q, k, dense_v), np.float32),
                               np.asarray(reference, np.float32),
                               atol=1e-4 if dtype == jnp.float32 else 5e-2)
    contenders[name] = functools.partial(lambda fn, k: block(fn(q, k, dense_v)), fn, k)
  flat = np.ones(nbytes // 4, np.float32)
  flat_jnp = jnp.ones(nbytes // 4, jnp.float32)
  jnp_sum = jax.jit(jnp.sum)
  contenders["stream numpy"] = lambda: flat.sum()
  contenders["stream jnp"] = lambda: block(jnp_sum(flat_jnp))
  times = median_times_interleaved(contenders, repeats=repeats)

  stream = nbytes / min(times["stream numpy"], times["stream jnp"]) / 1e9
  best_dense = min((t, name) for name, t in times.items() if name.startswith("dense"))
  gbps = nbytes / times["paged"] / 1e9
  main = label == "f32"
  return [
      Row("decode-attention", f"{label}: paged GB/s of K/V read (page_size {page_size})", gbps,
          "GB/s"),
      Row("decode-attention", f"{label}: streaming read bandwidth, same bytes", stream, "GB/s"),
      Row("decode-attention", f"{label}: paged / streaming bandwidth", gbps / stream, "x",
          ">= 0.6" if main else "", gbps / stream >= 0.6 if main else None),
      Row("decode-attention", f"{label}: paged / best dense time ({best_dense[1]})",
          times["paged"] / best_dense[0], "x", "<= 1.1" if main else "",
          times["paged"] / best_dense[0] <= 1.1 if main else None),
  ]


def run(quick: bool = False) -> list[Row]:
  repeats = 5 if quick else 15
  rows = _decode_case("f32", batch=8, tokens=2048, dtype=jnp.float32, page_size=64,
                      repeats=repeats)
  rows += _decode_case("f32 page_size 16", batch=8, tokens=2048, dtype=jnp.float32,
                       page_size=16, repeats=repeats)
  rows += _decode_case("bf16", batch=8, tokens=2048, dtype=jnp.bfloat16, page_size=64,
                       repeats=repeats)
  rows += _decode_case("f32 32k tokens, 1 sequence", batch=1, tokens=32768, dtype=jnp.float32,
                       page_size=64, repeats=repeats)
  rows += _ratio_rows(batch=8, tokens=2048, repeats=repeats)
  return rows
