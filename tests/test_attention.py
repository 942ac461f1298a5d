"""Paged attention (decode and ragged) against a float64 NumPy oracle on contiguous K/V."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from tests.helpers import ATOL, numpy_attention, random_cache

PAGE = 16


def _spec(head_dim=64, kv_heads=2, dtype=jnp.float32, max_pages=6, num_pages=64, layers=2):
  return jp.CacheSpec(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                      page_size=PAGE, num_pages=num_pages, max_seqs=8,
                      max_pages_per_seq=max_pages, dtype=dtype)


# Lengths the issue names: 0, 1, page_size - 1, page_size, page_size + 1 and the maximum.
EDGE_LENGTHS = [0, 1, PAGE - 1, PAGE, PAGE + 1, 6 * PAGE]


def _decode_expected(cache, layer, q, lengths, **options):
  return np.concatenate([
      numpy_attention(cache, layer, b, q[b:b + 1], [n - 1], **options)
      for b, n in enumerate(lengths)])


def _q(shape, dtype, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("head_dim,q_heads,kv_heads", [
    (64, 8, 2), (80, 4, 4), (128, 4, 1), (256, 6, 2)])  # GQA 4, MHA, MQA, GQA 3
def test_decode_matches_float64_oracle(dtype, head_dim, q_heads, kv_heads):
  spec = _spec(head_dim, kv_heads, dtype)
  cache = random_cache(spec, EDGE_LENGTHS, seed=head_dim)
  q = _q((len(EDGE_LENGTHS), q_heads, head_dim), dtype)
  out = jp.paged_attention(q, cache, 1, jnp.arange(len(EDGE_LENGTHS)), impl="xla")
  assert out.dtype == dtype and out.shape == q.shape
  expected = _decode_expected(cache, 1, q, EDGE_LENGTHS)
  np.testing.assert_allclose(np.asarray(out, np.float64), expected,
                             atol=ATOL[jnp.dtype(dtype).name], rtol=0)
  np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0)  # length 0: nothing to see


@pytest.mark.parametrize("options", [
    dict(soft_cap=1.5), dict(sliding_window=5), dict(sliding_window=PAGE + 3),
    dict(sm_scale=0.3), dict(soft_cap=0.7, sliding_window=20, sm_scale=0.05)])
def test_decode_options_match_oracle(options):
  cache = random_cache(_spec(), EDGE_LENGTHS, seed=3)
  q = _q((len(EDGE_LENGTHS), 4, 64), jnp.float32) * 3  # larger scores make the cap matter
  out = jp.paged_attention(q, cache, 0, jnp.arange(len(EDGE_LENGTHS)), impl="xla", **options)
  np.testing.assert_allclose(out, _decode_expected(cache, 0, q, EDGE_LENGTHS, **options),
                             atol=2e-5, rtol=0)


def test_padding_and_out_of_range_rows_return_zeros_and_read_nothing():
  cache = random_cache(_spec(), [20, 30], seed=4)
  q = _q((4, 4, 64), jnp.float32)
  out = jp.paged_attention(q, cache, 0, jnp.array([1, -1, 8, 0]), impl="xla")
  np.testing.assert_array_equal(out[1:3], 0)
  np.testing.assert_allclose(out[3], _decode_expected(cache, 0, q[3:4], [20])[0], atol=2e-5)


def _ragged_case(spec, seed):
  """Rows mixing a prefill chunk on an empty history, a chunk after history, decode tokens,
  a padding row and a zero-token row."""
  lengths = [40, 7, 1, 0, 33, 96]
  q_lens = [40, 5, 1, 0, 1, 17]
  ids = [0, 1, 2, -1, 4, 5]
  cache = random_cache(spec, lengths, seed=seed)
  return cache, lengths, q_lens, ids


def _ragged_expected(cache, layer, q, lengths, q_lens, ids, **options):
  expected, t = np.zeros(q.shape), 0
  for seq, n, ql in zip(ids, lengths, q_lens):
    if seq >= 0 and ql:
      expected[t:t + ql] = numpy_attention(cache, layer, seq, q[t:t + ql],
                                           list(range(n - ql, n)), **options)
    t += ql if seq >= 0 else 0
  return expected


@pytest.mark.parametrize("dtype,head_dim,q_heads,kv_heads,options", [
    (jnp.float32, 64, 4, 2, {}),
    (jnp.float32, 80, 2, 1, dict(sliding_window=9)),
    (jnp.bfloat16, 128, 4, 4, dict(soft_cap=2.0)),
    (jnp.float16, 256, 8, 2, {}),
])
@pytest.mark.parametrize("q_block", [None, 4])
def test_ragged_matches_float64_oracle(dtype, head_dim, q_heads, kv_heads, options, q_block):
  spec = _spec(head_dim, kv_heads, dtype)
  cache, lengths, q_lens, ids = _ragged_case(spec, seed=head_dim)
  num_tokens = sum(q_lens) + 3  # trailing slots past the last token return zeros
  q = _q((num_tokens, q_heads, head_dim), dtype)
  out = jp.ragged_paged_attention(q, cache, 0, jnp.array(ids), jnp.array(q_lens), impl="xla",
                                  q_block=q_block, **options)
  expected = _ragged_expected(cache, 0, q, lengths, q_lens, ids, **options)
  np.testing.assert_allclose(np.asarray(out, np.float64), expected,
                             atol=ATOL[jnp.dtype(dtype).name], rtol=0)


def test_ragged_with_one_token_per_row_equals_decode():
  cache = random_cache(_spec(), EDGE_LENGTHS[1:], seed=5)
  q = _q((len(EDGE_LENGTHS) - 1, 4, 64), jnp.float32)
  ids = jnp.arange(len(EDGE_LENGTHS) - 1)
  decode = jp.paged_attention(q, cache, 0, ids, impl="xla")
  ragged = jp.ragged_paged_attention(q, cache, 0, ids, jnp.ones_like(ids), impl="xla")
  np.testing.assert_allclose(decode, ragged, atol=1e-6)


def _poison_foreign_slots(cache):
  """NaN in every page that is no sequence's, and in every slot past a sequence's length."""
  table, lens = np.asarray(cache.page_table), np.asarray(cache.seq_lens)
  spec = cache.spec
  keep = np.zeros((spec.num_pages, spec.page_size), bool)
  for seq in range(spec.max_seqs):
    for pos in range(lens[seq]):
      keep[table[seq, pos // spec.page_size], pos % spec.page_size] = True
  poison = lambda x: jnp.where(jnp.asarray(keep)[None, None, :, :, None], x, jnp.nan)
  return dataclasses.replace(cache, k_pages=poison(cache.k_pages), v_pages=poison(cache.v_pages))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_nan_in_foreign_pages_and_stale_slots_changes_nothing(impl):
  """Attention never reads another sequence's pages or stale slots: a cross-tenant leak."""
  spec = _spec(dtype=jnp.float32)
  cache, lengths, q_lens, ids = _ragged_case(spec, seed=6)
  poisoned = _poison_foreign_slots(cache)
  assert np.isnan(np.asarray(poisoned.k_pages)).any()
  q = _q((sum(q_lens), 4, 64), jnp.float32)
  attend = functools.partial(jp.ragged_paged_attention, q, layer=0, seq_ids=jnp.array(ids),
                             q_lens=jnp.array(q_lens), impl=impl, interpret=True,
                             sliding_window=30)
  clean, dirty = attend(cache=cache), attend(cache=poisoned)
  assert not np.isnan(np.asarray(dirty)).any()
  np.testing.assert_array_equal(clean, dirty)
  decode_ids = jnp.arange(len(lengths))
  qd = _q((len(lengths), 4, 64), jnp.float32)
  np.testing.assert_array_equal(
      jp.paged_attention(qd, cache, 1, decode_ids, impl=impl, interpret=True),
      jp.paged_attention(qd, poisoned, 1, decode_ids, impl=impl, interpret=True))


@pytest.mark.parametrize("dtype,head_dim,num_splits", [
    (jnp.float32, 64, 1), (jnp.float32, 80, 3), (jnp.bfloat16, 128, 2)])
def test_pallas_interpret_equals_xla(dtype, head_dim, num_splits):
  spec = _spec(head_dim, 2, dtype)
  cache, lengths, q_lens, ids = _ragged_case(spec, seed=7)
  tol = 1e-5 if dtype == jnp.float32 else ATOL[jnp.dtype(dtype).name]
  q = _q((sum(q_lens), 4, head_dim), dtype)
  run = lambda impl, **kw: jp.ragged_paged_attention(
      q, cache, 1, jnp.array(ids), jnp.array(q_lens), impl=impl, interpret=True,
      sliding_window=25, soft_cap=3.0, **kw)
  np.testing.assert_allclose(np.asarray(run("pallas", num_splits=num_splits), np.float32),
                             np.asarray(run("xla"), np.float32), atol=tol, rtol=0)
  qd = _q((len(lengths), 4, head_dim), dtype)
  decode = lambda impl, **kw: jp.paged_attention(qd, cache, 0, jnp.arange(len(lengths)),
                                                 impl=impl, interpret=True, **kw)
  np.testing.assert_allclose(np.asarray(decode("pallas", num_splits=num_splits), np.float32),
                             np.asarray(decode("xla"), np.float32), atol=tol, rtol=0)


@pytest.mark.parametrize("q_heads,kv_heads,soft_cap", [(8, 2, None), (4, 4, 2.5), (8, 1, None)])
def test_decode_agrees_with_jax_paged_attention_reference(q_heads, kv_heads, soft_cap):
  """An independent implementation: JAX's own reference, on the same tokens made contiguous."""
  jax_paged = pytest.importorskip("jax.experimental.pallas.ops.gpu.paged_attention")
  lengths = [1, 17, 50, 96]
  cache = random_cache(_spec(64, kv_heads), lengths, seed=8)
  q = _q((4, q_heads, 64), jnp.float32)
  k, v = jax.vmap(lambda s: jp.gather_kv(cache, 0, s))(jnp.arange(4))  # [B, S, Hkv, D]
  expected = jax_paged.paged_attention_reference(q, k, v, jnp.asarray(lengths),
                                                 attn_logits_soft_cap=soft_cap)
  ours = jp.ops.paged_attention(q, cache.k_pages[0], cache.v_pages[0], cache.page_table[:4],
                                cache.seq_lens[:4], sm_scale=1.0, soft_cap=soft_cap, impl="xla")
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_ops_reference_agrees_with_the_fast_path():
  cache, lengths, q_lens, ids = _ragged_case(_spec(), seed=9)
  q = _q((sum(q_lens), 4, 64), jnp.float32)
  rows = jnp.where(jnp.array(ids)[:, None] >= 0, cache.page_table[jnp.clip(jnp.array(ids), 0)],
                   -1)
  kv_lens = jnp.where(jnp.array(ids) >= 0, cache.seq_lens[jnp.clip(jnp.array(ids), 0)], 0)
  q_lens = jnp.where(jnp.array(ids) >= 0, jnp.array(q_lens), 0)
  args = (q, cache.k_pages[1], cache.v_pages[1], rows, kv_lens, q_lens)
  np.testing.assert_allclose(jp.ops.ragged_paged_attention(*args, impl="xla", sliding_window=11),
                             jp.ops.ragged_paged_attention_reference(*args, sliding_window=11),
                             atol=2e-6)


def test_decode_loop_over_many_layers_compiles_once():
  """extend + (write_kv + attention per layer, in a scan over layers) in a scan over steps."""
  spec = jp.CacheSpec(num_layers=6, num_kv_heads=2, head_dim=16, page_size=PAGE, num_pages=32,
                      max_seqs=3, max_pages_per_seq=8)
  wk = _q((spec.num_layers, 8, 2, 16), jnp.float32, seed=2)

  @functools.partial(jax.jit, donate_argnames=("cache",))
  @chex.assert_max_traces(n=1)
  def decode(cache, x):
    def step(carry, _):
      cache, x = carry
      cache, slots, ok = jp.extend(cache, jnp.arange(3), jnp.ones(3, jnp.int32))

      def layer(carry, w):
        cache, x, i = carry
        k = jnp.einsum("bm,mhd->bhd", x, w)
        cache = jp.write_kv(cache, i, k, -k, slots)
        out = jp.paged_attention(jnp.concatenate([k, k], axis=1), cache, i, jnp.arange(3))
        return (cache, x + jnp.tanh(out.sum(axis=1))[:, :8], i + 1), None

      (cache, x, _), _ = jax.lax.scan(layer, (cache, x, jnp.int32(0)), wk)
      return (cache, x), ok

    return jax.lax.scan(step, (cache, x), None, length=4)

  cache, x = jp.init_cache(spec), _q((3, 8), jnp.float32, seed=3)
  for _ in range(3):  # lengths grow across calls; the program is the same
    (cache, x), ok = decode(cache, x)
    assert bool(jnp.all(ok))
  assert cache.seq_lens[:3].tolist() == [12, 12, 12]
  assert np.isfinite(np.asarray(x)).all()


def test_attention_rejects_bad_input_with_a_fix():
  cache = random_cache(_spec(), [5], seed=10)
  ids = jnp.array([0])
  with pytest.raises(jp.JaxPagedError, match="num_q_heads a multiple of num_kv_heads=2"):
    jp.paged_attention(_q((1, 3, 64), jnp.float32), cache, 0, ids)
  with pytest.raises(jp.JaxPagedError, match="head_dim=64"):
    jp.paged_attention(_q((1, 4, 32), jnp.float32), cache, 0, ids)
  with pytest.raises(jp.JaxPagedError, match="batch rows of q"):
    jp.paged_attention(_q((2, 4, 64), jnp.float32), cache, 0, ids)
  with pytest.raises(jp.JaxPagedError, match="layer must be in"):
    jp.paged_attention(_q((1, 4, 64), jnp.float32), cache, 2, ids)
  with pytest.raises(jp.JaxPagedError, match="sliding_window must be a positive int"):
    jp.paged_attention(_q((1, 4, 64), jnp.float32), cache, 0, ids, sliding_window=0)
  with pytest.raises(jp.JaxPagedError, match="soft_cap must be a positive float"):
    jp.paged_attention(_q((1, 4, 64), jnp.float32), cache, 0, ids, soft_cap=-1.0)
  with pytest.raises(jp.JaxPagedError, match="q_lens must be int32\\[1\\]"):
    jp.ragged_paged_attention(_q((3, 4, 64), jnp.float32), cache, 0, ids, jnp.array([1, 2]))
  small = random_cache(dataclasses.replace(_spec(), page_size=8), [5], seed=10)
  with pytest.raises(jp.JaxPagedError, match="power of two >= 16 .* use impl='xla'"):
    jp.paged_attention(_q((1, 4, 64), jnp.float32), small, 0, ids, impl="pallas")
