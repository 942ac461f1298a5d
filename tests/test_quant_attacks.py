"""Adversarial tests of 8-bit K/V (jaxpaged/_src/quant.py and what moves its scales).

Oracles: NumPy float32 arithmetic (what a static scale can be on device and what a stored value
reads back as), the K/V each cache was given (what a host copy must read back as), the XLA write
path for the Pallas one, and a float64 attention over the visible tokens only.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
F32 = np.finfo(np.float32)


def _spec(dtype=jnp.int8, **overrides):
  sizes = dict(num_layers=2, num_kv_heads=2, head_dim=16, page_size=16, num_pages=24,
               max_seqs=4, max_pages_per_seq=6, dtype=dtype)
  return jp.CacheSpec(**dict(sizes, **overrides))


def _filled(spec, lengths, kv, seqs=None):
  """``spec``'s cache holding sequences of ``lengths``, both layers written with ``kv [T, H, D]``
  (K) and ``-kv`` (V); returns it and the slots."""
  seqs = jnp.arange(len(lengths)) if seqs is None else jnp.asarray(seqs)
  cache, slots, ok = jp.extend(jp.init_cache(spec), seqs, jnp.asarray(lengths),
                               num_slots=sum(lengths))
  assert bool(ok)
  for layer in range(spec.num_layers):
    cache = jp.write_kv(cache, layer, jnp.asarray(kv), jnp.asarray(-kv), slots)
  return cache, slots


def _read(cache, seq):
  """Every layer's dequantized K and V of one sequence (gather_kv), as NumPy."""
  n = int(cache.seq_lens[seq])
  return [np.asarray(x)[:n] for layer in range(cache.spec.num_layers)
          for x in jp.gather_kv(cache, layer, seq)]


def _leaves(x):
  return [np.asarray(a) for a in jax.tree.leaves(x)]


# ----------------------------------------------------------------------------- static scales

def _usable_on_device(scale, dtype):
  """The NumPy oracle: a static scale works on device iff it is a normal float32 and the
  largest stored value times it (what saturated values read back as) is finite in float32."""
  with np.errstate(over="ignore"):
    s = np.float32(scale)
    return bool(s >= F32.tiny and np.isfinite(s * np.float32(QMAX[jnp.dtype(dtype).name])))


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e5m2])
def test_static_scales_that_float32_cannot_use_are_refused(dtype):
  """Scales are float32 on device: 1e300 became inf (every value read back NaN) and 1e-300 or
  1e-45 became 0 (every value read back 0); float8_e5m2 saturates at 57344, so a scale of 1e36
  read a saturated value back as inf. Each accepted scale must read values back as the NumPy
  model does, finite."""
  top = F32.max / np.float32(QMAX[jnp.dtype(dtype).name])
  candidates = [1e300, 1e-300, 1e-45, 1e36, float(F32.tiny), float(np.nextafter(F32.tiny, 0)),
                float(top), float(np.nextafter(np.float32(top), np.float32(np.inf))), 0.02]
  for scale in candidates:
    if not _usable_on_device(scale, dtype):
      with pytest.raises(jp.JaxPagedError, match="static_scales"):
        _spec(dtype, static_scales=(scale, scale))
      continue
    spec = _spec(dtype, static_scales=(scale, scale))
    x = np.zeros((2, 2, 16), np.float32)
    x[0] = np.float32(scale) * 3  # stored as 3
    x[1] = F32.max  # saturates at qmax
    cache, _ = _filled(spec, [2], x)
    k = _read(cache, 0)[0]
    qmax = np.float32(QMAX[jnp.dtype(dtype).name])
    np.testing.assert_array_equal(k[0], np.full((2, 16), np.float32(scale) * 3, np.float32))
    np.testing.assert_array_equal(k[1], np.full((2, 16), qmax * np.float32(scale)))
    assert np.isfinite(k).all(), scale


@pytest.mark.parametrize("bad", [(True, 0.5), ((0.1, np.bool_(True)), (0.1, 0.1)), ("0.1", 0.2),
                                 (b"1", 1.0), (0.1, None)])
def test_static_scales_that_are_not_numbers_are_refused(bad):
  """NumPy turned True into 1.0 and "0.1" into 0.1: a bool or a string is not a scale."""
  with pytest.raises(jp.JaxPagedError, match="static_scales must be"):
    _spec(static_scales=bad)


def test_numpy_and_jax_scalar_static_scales_are_accepted():
  spec = _spec(static_scales=(np.float32(0.5), jnp.float32(0.25)))
  assert spec.static_scales == ((0.5, 0.25), (0.5, 0.25))


def _swapped_out(spec, seed=0):
  rng = np.random.default_rng(seed)
  kv = (rng.normal(size=(20, 2, 16)) * 0.3).astype(np.float32)
  cache, _ = _filled(spec, [20], kv)
  expected = _read(cache, 0)
  _, (swapped,) = jp.swap_out(cache, [0])
  return swapped, expected


def test_host_copies_come_back_only_into_caches_with_the_same_static_scales():
  """A sequence swapped out of a cache with static scales (0.1, 0.1) was swapped into one with
  (0.2, 0.2), its stored values read back at twice their value; so were demoted blocks promoted
  and `CacheManager.adopt`. A spec whose scales are equal as float32 reads them alike."""
  source = _spec(static_scales=(0.1, 0.1), prefix_caching=True)
  other = _spec(static_scales=(0.2, 0.2), prefix_caching=True)
  swapped, expected = _swapped_out(source)
  _refused_by_swap_in_and_adopt(other, swapped, "static_scales")
  # The same float32 scales, spelled differently: bit-exact.
  alike = _spec(static_scales=(np.float32(0.1), np.float32(0.1)), prefix_caching=True)
  restored, ok = jp.swap_in(jp.init_cache(alike), swapped)
  assert bool(ok)
  for got, want in zip(_read(restored, 0), expected):
    np.testing.assert_array_equal(got, want)
  # Demoted blocks.
  tokens = np.arange(1, 34, dtype=np.int32)
  cache, found = jp.match_prefix(jp.init_cache(source), jnp.array([0]),
                                 jnp.asarray(tokens[None]), jnp.array([33]))
  for layer in range(2):
    cache = jp.write_kv(cache, layer, jnp.ones((33, 2, 16)), jnp.ones((33, 2, 16)), found.slots)
  cache, blocks = jp.demote_blocks(jp.release(cache, jnp.array([0])), 2)
  assert len(blocks) == 2
  target, _ = jp.match_prefix(jp.init_cache(other), jnp.array([0]), jnp.asarray(tokens[None]),
                              jnp.array([33]), max_prompt_tokens=jnp.array([0]))
  with pytest.raises(jp.JaxPagedError, match="static_scales"):
    jp.promote_blocks(target, 0, sorted(blocks, key=lambda b: b.depth))
  target, _ = jp.match_prefix(jp.init_cache(alike), jnp.array([0]), jnp.asarray(tokens[None]),
                              jnp.array([33]), max_prompt_tokens=jnp.array([0]))
  target, ok = jp.promote_blocks(target, 0, sorted(blocks, key=lambda b: b.depth))
  assert bool(ok)
  np.testing.assert_array_equal(_read(target, 0)[0], np.full((32, 2, 16), np.float32(0.1) * 10))


# ----------------------------------------------------------------------------- host copies

def test_host_copy_with_more_pages_than_a_sequence_can_hold_is_refused_clearly():
  """swap_in and CacheManager.adopt raised NumPy's ValueError (a negative pad) for a copy
  holding more pages than max_pages_per_seq."""
  spec = _spec()
  swapped, _ = _swapped_out(spec)
  pad = lambda x: np.concatenate([x, np.zeros(x.shape[:2] + (8,) + x.shape[3:], x.dtype)], 2)
  big = dataclasses.replace(swapped, **{f: pad(getattr(swapped, f))
                                        for f in ("k", "v", "k_scales", "v_scales")})
  _refused_by_swap_in_and_adopt(spec, big, "swapped.k is")


def _refused_by_swap_in_and_adopt(spec, swapped, match):
  """`swap_in` into a cache of ``spec`` and `CacheManager.adopt` both refuse ``swapped`` with
  ``match``; the manager's cache is unchanged."""
  with pytest.raises(jp.JaxPagedError, match=match):
    jp.swap_in(jp.init_cache(spec), swapped)
  manager = jp.CacheManager(spec)
  before = _leaves(manager.cache)
  with pytest.raises(jp.JaxPagedError, match=match):
    manager.adopt(swapped)
  assert all(np.array_equal(a, b) for a, b in zip(before, _leaves(manager.cache)))


# ----------------------------------------------------------------------------- cache pools

@pytest.mark.parametrize("change", ["no scales", "float16 scales", "scales on a float cache",
                                    "bfloat16 K"])
def test_cache_whose_pools_do_not_match_its_spec_is_refused(change):
  """An int8 cache without its scale pools was written (values stored, scales dropped: they
  read back with whatever scales were there) and float16 scale pools were accepted."""
  spec = _spec(jnp.float32 if change in ("scales on a float cache", "bfloat16 K") else jnp.int8)
  cache, slots, _ = jp.extend(jp.init_cache(spec), jnp.array([0]), jnp.array([3]), num_slots=3)
  if change == "no scales":
    cache = dataclasses.replace(cache, k_scales=None, v_scales=None)
  elif change == "float16 scales":
    cache = dataclasses.replace(cache, k_scales=cache.k_scales.astype(jnp.float16))
  elif change == "scales on a float cache":
    cache = dataclasses.replace(cache, k_scales=jnp.ones(spec.scales_shape),
                                v_scales=jnp.ones(spec.scales_shape))
  else:
    cache = dataclasses.replace(cache, k_pages=cache.k_pages.astype(jnp.bfloat16))
  kv = jnp.ones((3, 2, 16))
  with pytest.raises(jp.JaxPagedError, match="pools"):
    jp.write_kv(cache, 0, kv, kv, slots)
  with pytest.raises(jp.JaxPagedError, match="pools"):
    jp.paged_attention(jnp.ones((1, 4, 16)), cache, 0, jnp.array([0]))
  with pytest.raises(jp.JaxPagedError, match="pools"):
    jp.swap_out(cache, [0])


def test_reference_attention_refuses_8bit_pools():
  """ops.ragged_paged_attention_reference read int8 pools as their stored numbers (the scales
  have nowhere to go): the oracle itself answered wrongly, silently."""
  k = jnp.ones((1, 2, 16, 16), jnp.int8)
  with pytest.raises(jp.JaxPagedError, match="float pools only"):
    jp.ops.ragged_paged_attention_reference(jnp.ones((1, 2, 16)), k, k, jnp.array([[0]]),
                                            jnp.array([4]), jnp.array([1]))


# ----------------------------------------------------------------------------- guards

def _canonical(x):
  """Bytes of ``x`` with every NaN's payload made one (NaN bits are not a result)."""
  x = np.asarray(x)
  if x.dtype.kind == "f" or x.dtype.name.startswith("float8"):
    x = np.where(np.isnan(x.astype(np.float32)), np.array(np.nan, x.dtype), x)
  return np.atleast_1d(x).view(np.uint8)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_special_rows_pallas_writes_equal_xla_and_non_finite_rows_read_nan(dtype):
  rng = np.random.default_rng(1)
  k = rng.normal(size=(6, 2, 16)).astype(np.float32)
  k[0] = 0
  k[1, 0, 3] = np.nan
  k[2, 1, 0] = np.inf
  k[3] = 1e-39  # denormal
  k[4, 0] = -np.inf
  k[5, 1] = F32.max
  spec = _spec(dtype)
  cache, slots, _ = jp.extend(jp.init_cache(spec), jnp.array([0]), jnp.array([6]), num_slots=6)
  xla = jp.write_kv(cache, 1, jnp.asarray(k), jnp.asarray(-k), slots, impl="xla")
  pallas = jp.write_kv(cache, 1, jnp.asarray(k), jnp.asarray(-k), slots, impl="pallas",
                       interpret=True)
  for a, b in zip(_leaves(xla), _leaves(pallas)):
    np.testing.assert_array_equal(_canonical(a), _canonical(b))
  got_k, got_v = (np.asarray(x)[:6] for x in jp.gather_kv(xla, 1, 0))
  for got in (got_k, got_v):
    np.testing.assert_array_equal(got[0], 0)
    for t, h in ((1, 0), (2, 1), (4, 0)):  # a non-finite entry: the whole row is NaN
      assert np.isnan(got[t, h]).all(), (t, h)
    assert np.isfinite(got[[1, 2, 4], [1, 0, 1]]).all()  # the other head's rows are not
    assert np.isfinite(got[5]).all() and np.abs(got[5, 1, 0]) > F32.max / 2


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("which", ["k", "v"])
def test_a_nan_token_reaches_only_the_queries_that_see_it(impl, which):
  """Ragged prefill, causal: a NaN in token 12's K or V (one KV head) leaves every query
  before it, and the other head's queries, equal to float64 attention over the stored K/V."""
  spec = _spec(jnp.float8_e4m3fn)
  rng = np.random.default_rng(2)
  k, v = (rng.normal(size=(20, 2, 16)).astype(np.float32) for _ in range(2))
  (k if which == "k" else v)[12, 1, 5] = np.nan
  cache, slots, _ = jp.extend(jp.init_cache(spec), jnp.array([0]), jnp.array([20]), num_slots=20)
  cache = jp.write_kv(cache, 0, jnp.asarray(k), jnp.asarray(v), slots)
  q = rng.normal(size=(20, 4, 16)).astype(np.float32)
  out = np.asarray(jp.ragged_paged_attention(jnp.asarray(q), cache, 0, jnp.array([0]),
                                             jnp.array([20]), impl=impl,
                                             interpret=impl == "pallas"))
  kd, vd = (np.asarray(x, np.float64)[:20] for x in jp.gather_kv(cache, 0, 0))
  expected = np.full(out.shape, np.nan)
  for t in range(20):
    for head in range(4):
      kv_head = head // 2
      s = kd[:t + 1, kv_head] @ q[t, head] / 4
      w = np.exp(s - s.max())
      expected[t, head] = (w / w.sum()) @ vd[:t + 1, kv_head]
  np.testing.assert_allclose(out[:12], expected[:12], atol=1e-4)
  np.testing.assert_allclose(out[:, :2], expected[:, :2], atol=1e-4)
  assert np.isnan(out[12:, 2:]).all()


def test_replicated_heads_keep_identical_scales_and_match_one_cache():
  """model axis 2 > 1 KV head: both replicas of the head hold the same values and scales, and
  each shard equals a single-device cache given its sequences."""
  spec = _spec(num_kv_heads=1)
  sharded = jp.init_sharded_cache(spec, jp.make_mesh(2, 2))
  assert sharded.replicas == 2
  lengths = jnp.array([9, 0, 0, 0, 13, 0, 0, 0])
  sharded, slots, ok = jp.extend(sharded, jnp.arange(8), lengths, num_slots=22)
  rng = np.random.default_rng(3)
  kv = (rng.normal(size=(22, 1, 16)) * rng.choice([0.01, 30.0], size=(22, 1, 1))).astype(np.float32)
  for layer in range(2):
    sharded = jp.write_kv(sharded, layer, jnp.asarray(kv), jnp.asarray(-kv), slots)
  sharded, ok = jp.fork(sharded, jnp.array([4]), jnp.array([5]))
  sharded, slots, ok = jp.extend(sharded, jnp.array([5]), jnp.array([2]), num_slots=2)  # CoW
  for name in ("k_pages", "v_pages", "k_scales", "v_scales"):
    pool = np.asarray(getattr(sharded.shards, name))
    np.testing.assert_array_equal(_canonical(pool[:, :, 0]), _canonical(pool[:, :, 1]))
  for shard, rows in ((0, slice(0, 9)), (1, slice(9, 22))):
    single, _ = _filled(spec, [rows.stop - rows.start], kv[rows])
    view = jp.shard_view(sharded, shard)
    for got, want in zip(_read(view, 0), _read(single, 0)):
      np.testing.assert_array_equal(got, want)


def test_functions_never_change_or_delete_an_8bit_cache():
  spec = _spec(prefix_caching=True)
  tokens = jnp.arange(1, 22)[None]
  cache, found = jp.match_prefix(jp.init_cache(spec), jnp.array([0]), tokens, jnp.array([21]))
  kv = jnp.ones((21, 2, 16))
  cache = jp.write_kv(cache, 0, kv, kv, found.slots)
  before = _leaves(cache)
  jp.write_kv(cache, 1, kv, kv, found.slots, impl="pallas", interpret=True)
  forked, _ = jp.fork(cache, jnp.array([0]), jnp.array([1]))
  jp.extend(forked, jnp.array([1]), jnp.array([3]), num_slots=3)
  out, (swapped,) = jp.swap_out(cache, [0])
  jp.swap_in(out, swapped, seq_id=2)
  jp.paged_attention(jnp.ones((1, 4, 16)), cache, 0, jnp.array([0]), impl="pallas",
                     interpret=True)
  assert not any(x.is_deleted() for x in jax.tree.leaves(cache))
  assert all(np.array_equal(a, b) for a, b in zip(before, _leaves(cache)))
