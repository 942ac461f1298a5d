"""8-bit K/V pages (int8, float8_e4m3fn, float8_e5m2) with scales.

Oracles: a NumPy model of the quantization (per-token scale = max|row| * float32(1 / qmax), int8 rounded half
to even, fp8 cast by ml_dtypes), a float64 attention over the model's dequantized K/V, and
single-device caches for the sharded one. Everything that moves K/V must move the scales with
them bit-exactly; the compiled decode step must not dequantize a pool or a sequence at once.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxpaged as jp
from tests.helpers import numpy_attention

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
DTYPES = [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2]


def _spec(dtype, **overrides):
  sizes = dict(num_layers=2, num_kv_heads=2, head_dim=16, page_size=16, num_pages=24,
               max_seqs=4, max_pages_per_seq=6, dtype=dtype)
  return jp.CacheSpec(**dict(sizes, **overrides))


def numpy_quantize(x, dtype, static=None):
  """The NumPy model: ``(stored values, float32 scales or None)`` of float rows ``x [..., D]``."""
  name = jnp.dtype(dtype).name
  x = np.asarray(x, np.float32)
  if static is None:
    scale = (np.abs(x).max(-1) * np.float32(1 / QMAX[name])).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale)
    y = x / scale[..., None]
  else:
    scale, y = None, np.clip(x / np.float32(static), -QMAX[name], QMAX[name])
  if name == "int8":
    return np.clip(np.round(y), -127, 127).astype(np.int8), scale
  return y.astype(getattr(ml_dtypes, name)), scale


def numpy_dequantize(values, scale, static=None):
  x = np.asarray(values).astype(np.float64)
  return x * (np.float64(static) if scale is None else np.asarray(scale, np.float64)[..., None])


def _written(spec, lengths, seed=0, impl="xla"):
  """A cache holding sequences of ``lengths`` with random float K/V written in both layers;
  returns it and the float K/V ``[layers, tokens, H, D]`` in slot order."""
  rng = np.random.default_rng(seed)
  cache, slots, ok = jp.extend(jp.init_cache(spec), jnp.arange(len(lengths)),
                               jnp.asarray(lengths), num_slots=sum(lengths))
  assert bool(ok)
  shape = (spec.num_layers, sum(lengths), spec.num_kv_heads, spec.head_dim)
  # Rows of very different magnitudes: per-token scales follow each.
  k = rng.normal(size=shape) * rng.choice([0.01, 1.0, 30.0], size=shape[:3] + (1,))
  v = rng.normal(size=shape) * 3
  interpret = impl == "pallas"
  for layer in range(spec.num_layers):
    cache = jp.write_kv(cache, layer, jnp.asarray(k[layer], jnp.float32),
                        jnp.asarray(v[layer], jnp.float32), slots, impl=impl, interpret=interpret)
  return cache, np.asarray(slots), k.astype(np.float32), v.astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_write_kv_stores_what_the_numpy_model_quantizes(dtype, impl):
  spec = _spec(dtype)
  cache, slots, k, v = _written(spec, [20, 5, 33], impl=impl)
  ps = spec.page_size
  for layer in range(spec.num_layers):
    for pool, scales, x in ((cache.k_pages, cache.k_scales, k), (cache.v_pages, cache.v_scales, v)):
      values, scale = numpy_quantize(x[layer], dtype)
      stored = np.asarray(pool)[layer][:, slots // ps, slots % ps]  # [H, T, D]
      np.testing.assert_array_equal(stored.swapaxes(0, 1).view(np.uint8),
                                    values.view(np.uint8))
      np.testing.assert_array_equal(np.asarray(scales)[layer][:, slots // ps, slots % ps].T,
                                    scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_scales_saturate_and_store_the_model(dtype):
  spec = _spec(dtype, static_scales=((0.01, 0.02), (0.03, 0.04)))
  assert spec.static_scales == ((0.01, 0.02), (0.03, 0.04))
  cache, slots, k, v = _written(spec, [17, 9])
  assert cache.k_scales is None and cache.v_scales is None
  ps = spec.page_size
  for layer, (ks, vs) in enumerate(spec.static_scales):
    for pool, x, s in ((cache.k_pages, k, ks), (cache.v_pages, v, vs)):
      values, _ = numpy_quantize(x[layer], dtype, static=np.float32(s))
      stored = np.asarray(pool)[layer][:, slots // ps, slots % ps].swapaxes(0, 1)
      np.testing.assert_array_equal(stored.view(np.uint8), values.view(np.uint8))
    got, _ = jp.gather_kv(cache, layer, 0)
    np.testing.assert_allclose(np.asarray(got)[:17], numpy_dequantize(
        numpy_quantize(k[layer][:17], dtype, static=np.float32(ks))[0], None, np.float32(ks)),
                               rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("static", [False, True])
def test_attention_equals_float64_attention_over_the_dequantized_kv(dtype, impl, static):
  """Both attentions (decode and ragged) read the stored values times their scales: the float64
  oracle over the NumPy model's dequantized K/V agrees to float32 accuracy."""
  scales = (0.05, 0.02) if static else None
  spec = _spec(dtype, static_scales=scales)
  lengths = [40, 7, 90]
  cache, _, k, v = _written(spec, lengths, seed=1)
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(3, 4, spec.head_dim)), jnp.float32)
  seq_ids = jnp.arange(3)
  starts = np.concatenate([[0], np.cumsum(lengths)])
  for layer in range(spec.num_layers):
    out = np.asarray(jp.paged_attention(q, cache, layer, seq_ids, impl=impl,
                                        interpret=impl == "pallas"))
    for s, n in enumerate(lengths):
      rows = slice(starts[s], starts[s] + n)
      kq, ks = numpy_quantize(k[layer][rows], dtype, None if not static else np.float32(scales[0]))
      vq, vs = numpy_quantize(v[layer][rows], dtype, None if not static else np.float32(scales[1]))
      kd = numpy_dequantize(kq, ks, None if not static else np.float32(scales[0]))
      vd = numpy_dequantize(vq, vs, None if not static else np.float32(scales[1]))
      qi = np.asarray(q[s], np.float64).reshape(spec.num_kv_heads, -1, spec.head_dim)
      logits = np.einsum("hgd,shd->hgs", qi, kd) * spec.head_dim ** -0.5
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      expected = np.einsum("hgs,shd->hgd", w, vd).reshape(q.shape[1:])
      np.testing.assert_allclose(out[s], expected, atol=2e-5 * max(1, np.abs(vd).max()))
  # Ragged (prefill chunks): the last 5 tokens of each row, causal, against gather_kv's
  # dequantized K/V, which the first part checked against the model.
  q_lens = jnp.array([5, 5, 5])
  qr = jnp.asarray(rng.normal(size=(15, 4, spec.head_dim)), jnp.float32)
  out = np.asarray(jp.ragged_paged_attention(qr, cache, 1, seq_ids, q_lens, impl=impl,
                                             interpret=impl == "pallas"))
  for s, n in enumerate(lengths):
    positions = np.arange(n - 5, n)
    expected = numpy_attention(cache, 1, s, qr[5 * s:5 * s + 5], positions)
    np.testing.assert_allclose(out[5 * s:5 * s + 5], expected, atol=1e-4)


@pytest.mark.parametrize("dtype,rel_error", [(jnp.int8, 0.025), (jnp.float8_e4m3fn, 0.12),
                                             (jnp.float8_e5m2, 0.25)])
def test_attention_error_against_the_unquantized_float64_attention_is_small(dtype, rel_error):
  """The error 8-bit storage itself costs, against float64 attention over the original K/V
  (measured here: mean error / mean |V| 0.011-0.012 int8, 0.055-0.060 e4m3, 0.064-0.14 e5m2,
  with keys of magnitudes up to 30 that make the softmax sharp; bounds about twice that)."""
  spec = _spec(dtype, num_kv_heads=1, head_dim=64, max_pages_per_seq=13)
  lengths = [200, 64]
  cache, _, k, v = _written(spec, lengths, seed=3)
  q = jnp.asarray(np.random.default_rng(4).normal(size=(2, 2, 64)) * 0.2, jnp.float32)
  out = np.asarray(jp.paged_attention(q, cache, 0, jnp.arange(2)))
  start = 0
  for s, n in enumerate(lengths):
    kd, vd = (x[0][start:start + n].astype(np.float64) for x in (k, v))
    start += n
    qi = np.asarray(q[s], np.float64).reshape(1, 2, 64)
    logits = np.einsum("hgd,shd->hgs", qi, kd) / 8
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    expected = np.einsum("hgs,shd->hgd", w, vd).reshape(2, 64)
    err = np.abs(out[s] - expected).mean() / np.abs(vd).mean()  # relative to V's magnitude
    assert err < rel_error, (s, err)


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _seq_rows(cache, seq):
  """Stored values and scales of one sequence's tokens, in token order."""
  n = int(cache.seq_lens[seq])
  pages = np.asarray(cache.page_table)[seq]
  t = np.arange(n)
  page, offset = pages[t // cache.spec.page_size], t % cache.spec.page_size
  return [np.asarray(p)[:, :, page, offset] for p in
          (cache.k_pages, cache.v_pages, cache.k_scales, cache.v_scales)]


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_fork_copy_on_write_carries_scales(dtype):
  spec = _spec(dtype)
  cache, _, _, _ = _written(spec, [21])  # the last page is partly filled: CoW on append
  cache, ok = jp.fork(cache, jnp.array([0]), jnp.array([1]))
  assert bool(ok)
  cache, slots, ok = jp.extend(cache, jnp.array([1]), jnp.array([1]))
  assert bool(ok) and int(cache.page_table[1, 1]) != int(cache.page_table[0, 1])
  for a, b in zip(_seq_rows(cache, 0), _seq_rows(cache, 1)[:]):
    np.testing.assert_array_equal(a, b[:, :, :21])


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e5m2])
def test_swap_out_and_in_is_bit_exact_with_scales(dtype):
  spec = _spec(dtype)
  cache, _, _, _ = _written(spec, [30, 12])
  before = _seq_rows(cache, 0)
  out, (swapped,) = jp.swap_out(cache, [0])
  assert swapped.k_scales is not None and swapped.k_scales.dtype == np.float32
  assert swapped.nbytes == sum(x.nbytes for x in (swapped.k, swapped.v, swapped.k_scales,
                                                  swapped.v_scales))
  restored, ok = jp.swap_in(out, swapped, seq_id=3)
  assert bool(ok)
  for a, b in zip(before, _seq_rows(restored, 3)):
    np.testing.assert_array_equal(a, b)
  # The same sequence swapped into a float cache (or one without scales) is refused clearly.
  with pytest.raises(jp.JaxPagedError, match="k_scales"):
    jp.swap_in(jp.init_cache(_spec(jnp.float32)), swapped)
  with pytest.raises(jp.JaxPagedError, match="swapped.k is"):
    jp.swap_in(jp.init_cache(_spec(jnp.float8_e4m3fn if dtype == jnp.int8 else jnp.int8)),
               swapped)


def test_demote_promote_and_prefix_hits_carry_scales():
  spec = _spec(jnp.int8, prefix_caching=True)
  tokens = np.arange(1, 41, dtype=np.int32)
  cache, found = jp.match_prefix(jp.init_cache(spec), jnp.array([0]), jnp.asarray(tokens[None]),
                                 jnp.array([40]))
  rng = np.random.default_rng(5)
  for layer in range(2):
    kv = jnp.asarray(rng.normal(size=(40, 2, 16)), jnp.float32)
    cache = jp.write_kv(cache, layer, kv, kv * 2, found.slots)
  before = _seq_rows(cache, 0)
  cache = jp.release(cache, jnp.array([0]))
  # A device prefix hit attaches the same pages: values and scales as written.
  hit, found = jp.match_prefix(cache, jnp.array([1]), jnp.asarray(tokens[None]), jnp.array([40]))
  assert int(found.num_cached[0]) == 32
  for a, b in zip(before, _seq_rows(hit, 1)):
    np.testing.assert_array_equal(a[:, :, :32], b[:, :, :32])
  # Demoted to host and promoted back: the same bits.
  cache, blocks = jp.demote_blocks(cache, 2)
  assert len(blocks) == 2 and blocks[0].k_scales.shape == (2, 2, 16)
  assert blocks[0].nbytes == sum(x.nbytes for x in (blocks[0].k, blocks[0].v, blocks[0].k_scales,
                                                    blocks[0].v_scales, blocks[0].tokens))
  cache, _ = jp.match_prefix(cache, jnp.array([0]), jnp.asarray(tokens[None, :17]),
                             jnp.array([17]), max_prompt_tokens=jnp.array([0]))
  cache, ok = jp.promote_blocks(cache, 0, blocks[::-1])
  assert bool(ok) and int(cache.seq_lens[0]) == 32
  for a, b in zip(before, _seq_rows(cache, 0)):
    np.testing.assert_array_equal(a[:, :, :32], b[:, :, :32])
  bad = dataclasses.replace(blocks[1], k_scales=None)
  with pytest.raises(jp.JaxPagedError, match="k_scales"):
    jp.promote_blocks(cache, 0, [bad])


def test_manager_host_tier_counts_scale_bytes_and_round_trips():
  spec = _spec(jnp.int8, num_pages=8, max_seqs=4)
  manager = jp.CacheManager(spec, host_bytes=1 << 20)
  admitted = manager.admit(list(range(1, 61)))
  rng = np.random.default_rng(6)
  slots = np.asarray(admitted.slots)[:60]
  cache = manager.cache
  for layer in range(2):
    kv = jnp.asarray(rng.normal(size=(60, 2, 16)), jnp.float32)
    cache = jp.write_kv(cache, layer, kv, -kv, jnp.asarray(slots))
  manager.cache = cache
  before = _seq_rows(manager.cache, admitted.seq_id)
  manager.swap_out([admitted.seq_id])
  held = manager.stats()["host_used_bytes"]
  per_page = 2 * 2 * 16 * (16 + 4) * 2  # layers x heads x page x (D int8 + f32 scale) x (K, V)
  assert spec.page_bytes == per_page and manager.stats()["total_bytes"] == 8 * per_page
  assert 4 * per_page <= held < 5 * per_page  # 4 pages of K/V and scales, plus token ids
  assert manager.swap_in([admitted.seq_id]) == [True]
  for a, b in zip(before, _seq_rows(manager.cache, admitted.seq_id)):
    np.testing.assert_array_equal(a, b)


def test_sharded_cache_quantizes_like_one_cache_per_shard():
  spec = _spec(jnp.int8, num_kv_heads=2)
  mesh = jp.make_mesh(2, 2)
  sharded = jp.init_sharded_cache(spec, mesh)
  lengths = jnp.array([9, 0, 0, 0, 13, 0, 0, 0])
  sharded, slots, ok = jp.extend(sharded, jnp.arange(8), lengths, num_slots=22)
  single, single_slots = [], []
  for shard in range(2):
    c, s, _ = jp.extend(jp.init_cache(spec), jnp.arange(4), lengths[4 * shard:4 * shard + 4],
                        num_slots=22)
    single.append(c)
    single_slots.append(s)
  rng = np.random.default_rng(7)
  kv = jnp.asarray(rng.normal(size=(22, 2, 16)), jnp.float32)
  sharded = jp.write_kv(sharded, 0, kv, kv, slots)
  single[0] = jp.write_kv(single[0], 0, kv[:9], kv[:9], single_slots[0][:9])
  single[1] = jp.write_kv(single[1], 0, kv[9:], kv[9:], single_slots[1][:13])
  for shard in range(2):
    view = jp.shard_view(sharded, shard)
    assert _leaves_equal(dataclasses.replace(view, prefix=None),
                         dataclasses.replace(single[shard], prefix=None))
  q = jnp.asarray(rng.normal(size=(8, 4, 16)), jnp.float32)
  out = jp.paged_attention(q, sharded, 0, jnp.arange(8))
  np.testing.assert_allclose(out[4], jp.paged_attention(q[4:5], single[1], 0, jnp.array([0]))[0],
                             atol=1e-5)


def _f32_buffers(hlo_text: str) -> list[int]:
  """Element counts of every f32 array shape in an HLO module's text."""
  sizes = []
  for dims in re.findall(r"f32\[([0-9,]*)\]", hlo_text):
    sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1)
  return sizes


def test_decode_step_never_dequantizes_a_pool_or_a_sequence_at_once():
  """The compiled decode step dequantizes one chunk of pages at a time: its largest float32
  buffer is the batch's chunk (`default_block_kv` tokens a row: 512 here), half of the batch's
  sequences here. Its control, a step that dequantizes the layer's pool first (what
  jax-llm-examples does), is caught by the same check."""
  from jaxpaged._src.attention_xla import default_block_kv  # pylint: disable=g-import-not-at-top
  spec = jp.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16, num_pages=256,
                      max_seqs=4, max_pages_per_seq=64, dtype=jnp.int8)
  cache = jax.eval_shape(jp.init_cache, spec)
  q = jax.ShapeDtypeStruct((4, 4, 64), jnp.float32)
  ids = jax.ShapeDtypeStruct((4,), jnp.int32)
  layer_pool = spec.num_kv_heads * spec.num_pages * spec.page_size * spec.head_dim
  sequences = 4 * spec.num_kv_heads * spec.max_seq_len * spec.head_dim  # the batch's K, whole

  def step(q, cache, ids):
    return jp.paged_attention(q, cache, 1, ids)

  def dequantize_first(q, cache, ids):
    k = cache.k_pages[1].astype(jnp.float32) * cache.k_scales[1][..., None]
    return jp.ops.paged_attention(q, k, k, cache.page_table[ids], cache.seq_lens[ids])

  largest = max(_f32_buffers(jax.jit(step).lower(q, cache, ids).compile().as_text()))
  block = default_block_kv(spec.max_seq_len, 4, quantized=True)
  chunk = 4 * spec.num_kv_heads * block * spec.head_dim
  assert block < spec.max_seq_len and largest <= chunk <= sequences // 2 < layer_pool, (
      largest, chunk)
  control = max(_f32_buffers(jax.jit(dequantize_first).lower(q, cache, ids).compile().as_text()))
  assert control >= layer_pool


def test_non_finite_rows_read_back_nan_and_reach_only_their_queries():
  spec = _spec(jnp.int8, num_kv_heads=1)
  cache, slots, ok = jp.extend(jp.init_cache(spec), jnp.arange(2), jnp.array([4, 4]),
                               num_slots=8)
  k = np.ones((8, 1, 16), np.float32)
  v = np.ones((8, 1, 16), np.float32)
  v[5, 0, 3] = np.inf  # sequence 1's second token
  for layer in range(2):
    cache = jp.write_kv(cache, layer, jnp.asarray(k), jnp.asarray(v), slots)
  _, v_read = jp.gather_kv(cache, 0, 1)
  assert np.isnan(np.asarray(v_read)[1]).all() and np.isfinite(np.asarray(v_read)[[0, 2, 3]]).all()
  out = np.asarray(jp.paged_attention(jnp.ones((2, 1, 16)), cache, 0, jnp.arange(2)))
  assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_bytes_per_token_counts_scales():
  for dtype, row in ((jnp.float32, 64 * 4), (jnp.bfloat16, 64 * 2), (jnp.int8, 64 + 4),
                     (jnp.float8_e4m3fn, 64 + 4)):
    spec = _spec(dtype, head_dim=64, num_layers=3, num_kv_heads=5)
    assert spec.token_bytes == 2 * 3 * 5 * row
    assert spec.page_bytes == spec.page_size * spec.token_bytes
    cache = jp.init_cache(spec)
    pool_bytes = sum(x.nbytes for x in (cache.k_pages, cache.v_pages, cache.k_scales,
                                        cache.v_scales) if x is not None)
    assert pool_bytes == spec.num_pages * spec.page_bytes
  static = _spec(jnp.int8, head_dim=64, static_scales=(0.1, 0.1))
  assert static.token_bytes == 2 * 2 * 2 * 64


@pytest.mark.parametrize("bad,match", [
    (dict(dtype=jnp.int16), "dtype must be one of"),
    (dict(dtype=jnp.float32, static_scales=(0.1, 0.1)), "static_scales applies to 8-bit"),
    (dict(dtype=jnp.int8, static_scales=(0.1, -1.0)), "positive finite"),
    (dict(dtype=jnp.int8, static_scales=((0.1, 0.1),) * 3), "one pair per layer"),
    (dict(dtype=jnp.int8, static_scales="big"), "static_scales must be"),
])
def test_bad_specs_are_refused_with_a_fix(bad, match):
  with pytest.raises(jp.JaxPagedError, match=match):
    _spec(**bad)


def test_bad_writes_and_scales_are_refused_with_a_fix():
  spec = _spec(jnp.int8)
  cache, slots, _ = jp.extend(jp.init_cache(spec), jnp.array([0]), jnp.array([2]), num_slots=2)
  with pytest.raises(jp.JaxPagedError, match="quantizes float K/V"):
    jp.write_kv(cache, 0, jnp.ones((2, 2, 16), jnp.int8), jnp.ones((2, 2, 16), jnp.int8), slots)
  k = jnp.ones((1, 2, 4, 16), jnp.int8)
  table, lens = jnp.array([[0]]), jnp.array([4])
  with pytest.raises(jp.JaxPagedError, match="k_scales must be float32"):
    jp.ops.paged_attention(jnp.ones((1, 2, 16)), k, k, table, lens)
  with pytest.raises(jp.JaxPagedError, match="k_scales/v_scales are for 8-bit pools"):
    f = jnp.ones((2, 4, 4, 16))
    jp.ops.paged_attention(jnp.ones((1, 2, 16)), f, f, table, lens,
                           k_scales=jnp.ones((2, 4, 4)), v_scales=jnp.ones((2, 4, 4)))
