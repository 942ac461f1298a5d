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
  with pytest.raises(jp.JaxPagedError, match="block_tables has 1 rows but 2 are needed"):
    jp.paged_attention(_q((2, 4, 64), jnp.float32), cache, 0, ids)
  with pytest.raises(jp.JaxPagedError, match="layer must be in"):
    jp.paged_attention(_q((1, 4, 64), jnp.float32), cache, 2, ids)
  with pytest.raises(jp.JaxPagedError, match="sliding_window must be a positive int"):
    jp.paged_attention(_q((1, 4, 64), jnp.float32), cache, 0, ids, sliding_window=0)
  with pytest.raises(jp.JaxPagedError, match="soft_cap must be a positive finite float"):
    jp.paged_attention(_q((1, 4, 64), jnp.float32), cache, 0, ids, soft_cap=-1.0)
  with pytest.raises(jp.JaxPagedError, match="q_lens must have 1 entries"):
    jp.ragged_paged_attention(_q((3, 4, 64), jnp.float32), cache, 0, ids, jnp.array([1, 2]))
  small = random_cache(dataclasses.replace(_spec(), page_size=8), [5], seed=10)
  with pytest.raises(jp.JaxPagedError, match="power of two >= 16 .* use impl='xla'"):
    jp.paged_attention(_q((1, 4, 64), jnp.float32), small, 0, ids, impl="pallas")


# ----------------------------------------------------------------------------- non-finite values

def _set_kv(cache, layer, seq, position, which, kv_head, dim, value):
  """Writes ``value`` into one element of a cached token's K or V."""
  page = int(cache.page_table[seq, position // PAGE])
  name = "k_pages" if which == "k" else "v_pages"
  pool = getattr(cache, name).at[layer, kv_head, page, position % PAGE, dim].set(value)
  return dataclasses.replace(cache, **{name: pool})


def _assert_same_nonfinite(out, expected, atol):
  """NaN, +inf and -inf exactly where the oracle has them; finite values within atol."""
  out = np.asarray(out, np.float64)
  for where in (np.isnan, np.isposinf, np.isneginf):
    np.testing.assert_array_equal(where(out), where(expected), err_msg=where.__name__)
  finite = np.isfinite(expected)
  np.testing.assert_allclose(out[finite], expected[finite], atol=atol, rtol=0)


def _nonfinite_case():
  """`_ragged_case` with NaN/inf in q, K and V, at keys some queries see and others do not.

  Row 0: prefill of 40 tokens (positions 0-39); V[30] NaN in one element: rows before 30 (and,
  with a window of 9, rows after 38) must not see it. Row 1: positions 2-6 after a history of
  2; K[4] NaN (kv head 1): its query heads' rows 4-6 are NaN, rows 2-3 finite. Row 2: one token
  whose every score is -inf (K[0, :, 0] = -inf, q[..., 0] > 0): NaN, as a dense softmax gives.
  Row 4: decode at 32; V +inf and -inf in one element (NaN), -inf alone in another, +inf alone
  in a third, and K[10] -inf in dim 0 (weight 0, nothing changes). Row 5: positions 79-95; q NaN
  in one head of one token, and V[80] -inf: seen by rows 80-88 only with the window.
  """
  spec = _spec()
  cache, lengths, q_lens, ids = _ragged_case(spec, seed=11)
  for seq, position, which, kv_head, dim, value in [
      (0, 30, "v", 0, 5, np.nan), (1, 4, "k", 1, 7, np.nan),
      (2, 0, "k", 0, 0, -np.inf), (2, 0, "k", 1, 0, -np.inf),
      (4, 3, "v", 1, 2, np.inf), (4, 20, "v", 1, 2, -np.inf), (4, 21, "v", 0, 9, -np.inf),
      (4, 32, "v", 0, 11, np.inf), (4, 10, "k", 0, 0, -np.inf), (5, 80, "v", 1, 60, -np.inf)]:
    cache = _set_kv(cache, 0, seq, position, which, kv_head, dim, value)
  return cache, lengths, q_lens, ids


def _nonfinite_q(num_tokens, nan_token):
  q = np.array(_q((num_tokens, 4, 64), jnp.float32, seed=12))
  q[..., 0] = np.abs(q[..., 0]) + 0.1  # scores against a -inf in dim 0 are -inf
  q[nan_token, 1, 3] = np.nan
  return jnp.asarray(q)


def _reference_args(cache, ids, q_lens):
  """Page-table rows, lengths and q_lens of `ids` for the array-level functions."""
  ids = jnp.array(ids)
  live, safe = ids >= 0, jnp.clip(ids, 0)
  return (jnp.where(live[:, None], cache.page_table[safe], -1),
          jnp.where(live, cache.seq_lens[safe], 0), jnp.where(live, jnp.array(q_lens), 0))


@pytest.mark.parametrize("impl,options", [
    ("xla", {}), ("xla", dict(block_kv=PAGE, num_splits=2)), ("pallas", dict(num_splits=2)),
    ("reference", {})])
@pytest.mark.parametrize("q_block,window", [(4, 9), (None, None)])
def test_ragged_nonfinite_values_propagate_like_a_dense_softmax(impl, options, q_block, window):
  cache, lengths, q_lens, ids = _nonfinite_case()
  q = _nonfinite_q(sum(q_lens), nan_token=sum(q_lens) - 3)
  if impl == "reference":
    out = jp.ops.ragged_paged_attention_reference(
        q, cache.k_pages[0], cache.v_pages[0], *_reference_args(cache, ids, q_lens),
        sliding_window=window)
  else:
    out = jp.ragged_paged_attention(q, cache, 0, jnp.array(ids), jnp.array(q_lens), impl=impl,
                                    interpret=True, q_block=q_block, sliding_window=window,
                                    **options)
  with np.errstate(invalid="ignore"):
    expected = _ragged_expected(cache, 0, q, lengths, q_lens, ids, sliding_window=window)
  _assert_same_nonfinite(out, expected, atol=2e-5)
  # The case is what it says: NaN, +inf and -inf all occur, and only where they are seen.
  assert np.isnan(expected).any() and np.isposinf(expected).any() and np.isneginf(expected).any()
  assert np.isfinite(expected[:30]).all()  # row 0 before its NaN V (a future key)
  assert np.isnan(expected[30, :2, 5]).all() and np.isfinite(expected[30, 2:]).all()
  assert np.isfinite(expected[40:42]).all() and np.isnan(expected[42:45, 2:]).all()  # row 1
  assert np.isnan(expected[45]).all()  # row 2: only -inf scores
  assert np.isnan(expected[61, 1]).all() and np.isfinite(expected[61, 0]).all()  # NaN q
  if window:
    assert np.isfinite(expected[39]).all()  # V[30] is before its window


@pytest.mark.parametrize("impl,options", [
    ("xla", {}), ("xla", dict(block_kv=PAGE, num_splits=3)), ("pallas", {}),
    ("pallas", dict(num_splits=3))])
def test_decode_nonfinite_values_propagate_like_a_dense_softmax(impl, options):
  cache, lengths, _, _ = _nonfinite_case()
  q = _nonfinite_q(len(lengths), nan_token=5)
  out = jp.paged_attention(q, cache, 0, jnp.arange(len(lengths)), impl=impl, interpret=True,
                           **options)
  with np.errstate(invalid="ignore"):
    expected = _decode_expected(cache, 0, q, lengths)
  _assert_same_nonfinite(out, expected, atol=2e-5)
  assert np.isnan(expected[4, 2:, 2]).all()  # +inf and -inf in one element
  assert np.isneginf(expected[4, :2, 9]).all() and np.isposinf(expected[4, :2, 11]).all()
  assert np.isfinite(np.delete(expected[4], [2, 9, 11], axis=1)).all()
  np.testing.assert_array_equal(out[3], 0)  # length 0 sees nothing


def test_nonfinite_future_value_does_not_reach_earlier_rows_of_its_block():
  """Inside one query block, V and K of a key only later rows see (a future key) and of a key
  before the window never reach the rows that do not see them: a 0 weight times NaN is NaN."""
  spec = _spec()
  cache = random_cache(spec, [32], seed=13)
  clean = cache
  for which in ("k", "v"):
    cache = _set_kv(cache, 0, 0, 20, which, 0, 0, np.nan)
  q = _q((32, 4, 64), jnp.float32)
  run = lambda cache, **kw: np.asarray(jp.ragged_paged_attention(
      q, cache, 0, jnp.array([0]), jnp.array([32]), q_block=16, interpret=True, **kw))
  for impl in ("xla", "pallas"):
    out, ref = run(cache, impl=impl), run(clean, impl=impl)
    np.testing.assert_array_equal(out[:20], ref[:20])  # rows before position 20: unchanged
    assert np.isnan(out[20:, :2]).all() and np.isfinite(out[20:, 2:]).all()
    out, ref = (run(c, impl=impl, sliding_window=4) for c in (cache, clean))
    np.testing.assert_array_equal(out[24:], ref[24:])  # position 20 is before their window
    assert np.isnan(out[20:24, :2]).all()


@pytest.mark.parametrize("impl,options", [
    ("xla", dict(block_kv=PAGE, num_splits=2)), ("pallas", dict(num_splits=2)), ("reference", {})])
def test_infinite_value_survives_a_weight_that_underflows(impl, options):
  """Key 5 scores 300 above key 60 (in the other split), whose V holds +inf: its float32 weight
  is 0, but a softmax weight is positive, so the output is +inf (not 0 * inf = NaN)."""
  cache = random_cache(_spec(), [96], seed=15)
  q = np.array(_q((1, 4, 64), jnp.float32))
  q[0, 1] = q[0, 0]  # both query heads of KV head 0
  key = 300 / 64 ** -0.5 * q[0, 0] / np.sum(q[0, 0] ** 2)
  page = int(cache.page_table[0, 0])
  cache = dataclasses.replace(cache, k_pages=cache.k_pages.at[0, 0, page, 5].set(key))
  cache = _set_kv(cache, 0, 0, 60, "v", 0, 3, np.inf)
  if impl == "reference":
    out = jp.ops.ragged_paged_attention_reference(
        jnp.asarray(q), cache.k_pages[0], cache.v_pages[0], *_reference_args(cache, [0], [1]))
  else:
    out = jp.paged_attention(jnp.asarray(q), cache, 0, jnp.array([0]), impl=impl,
                             interpret=True, **options)
  expected = _decode_expected(cache, 0, q, [96])
  assert np.isposinf(expected[0, :2, 3]).all() and np.isfinite(expected).sum() == 4 * 64 - 2
  _assert_same_nonfinite(out, expected, atol=2e-5)


# ----------------------------------------------------------------------------- options, empty

_ENTRY_POINTS = {
    "paged_attention": lambda q, cache, **kw: jp.paged_attention(q, cache, 0, jnp.array([0]),
                                                                  **kw),
    "ragged_paged_attention": lambda q, cache, **kw: jp.ragged_paged_attention(
        q, cache, 0, jnp.array([0]), jnp.array([1]), **kw),
    "ops.paged_attention": lambda q, cache, **kw: jp.ops.paged_attention(
        q, cache.k_pages[0], cache.v_pages[0], cache.page_table[:1], cache.seq_lens[:1], **kw),
    "ops.ragged_paged_attention": lambda q, cache, **kw: jp.ops.ragged_paged_attention(
        q, cache.k_pages[0], cache.v_pages[0], cache.page_table[:1], cache.seq_lens[:1],
        jnp.array([1]), **kw),
    "ops.ragged_paged_attention_reference": (
        lambda q, cache, **kw: jp.ops.ragged_paged_attention_reference(
            q, cache.k_pages[0], cache.v_pages[0], cache.page_table[:1], cache.seq_lens[:1],
            jnp.array([1]), **kw)),
}

_BAD_OPTIONS = [
    (dict(sm_scale=float("nan")), "sm_scale must be a positive finite float or None, got nan"),
    (dict(sm_scale=float("inf")), "sm_scale must be a positive finite float"),
    (dict(sm_scale=-float("inf")), "sm_scale must be a positive finite float"),
    (dict(sm_scale=0.0), "sm_scale must be a positive finite float or None, got 0.0; pass"),
    (dict(sm_scale=-0.1), "sm_scale must be .*got -0.1"),
    (dict(sm_scale=True), "sm_scale must be .*got True of type bool"),
    (dict(sm_scale="0.1"), "sm_scale must be .*got '0.1' of type str"),
    (dict(sm_scale=jnp.float32(0.1)), "sm_scale .*got a JAX array .*static option"),
    (dict(soft_cap=0), "soft_cap must be a positive finite float or None, got 0"),
    (dict(soft_cap=-1.0), "soft_cap must be .*got -1.0; pass the cap"),
    (dict(soft_cap=float("inf")), "soft_cap must be .*got inf"),
    (dict(soft_cap=float("nan")), "soft_cap must be .*got nan"),
    (dict(soft_cap=False), "soft_cap must be .*got False of type bool"),
    (dict(sliding_window=True), "sliding_window must be a positive int or None, got True of type "
                                "bool; pass how many"),
    (dict(sliding_window=0), "sliding_window must be a positive int or None, got 0"),
    (dict(sliding_window=-4), "sliding_window must be .*got -4"),
    (dict(sliding_window=4.0), "sliding_window must be .*got 4.0 of type float"),
    (dict(sliding_window=np.float32(4)), "sliding_window must be .*of type float32"),
    (dict(sliding_window=jnp.int32(4)), "sliding_window .*JAX array .*cannot be traced"),
]

_BAD_KERNEL_OPTIONS = [
    (dict(num_splits=0), "num_splits must be a positive int or None, got 0; pass"),
    (dict(num_splits=True), "num_splits must be .*got True of type bool"),
    (dict(block_kv=-16), "block_kv must be .*got -16"),
    (dict(block_kv=64.0), "block_kv must be .*of type float"),
    (dict(impl="cuda"), "impl must be one of .*got 'cuda'; 'auto'"),
    (dict(impl=None), "impl must be one of .*got None"),
    (dict(interpret=1), "interpret must be a bool, got 1; pass True"),
    (dict(interpret="yes"), "interpret must be a bool"),
]


@pytest.mark.parametrize("entry", list(_ENTRY_POINTS))
def test_static_options_are_checked_with_a_fix(entry):
  cache = random_cache(_spec(), [5], seed=10)
  q = _q((1, 4, 64), jnp.float32)
  attend = functools.partial(_ENTRY_POINTS[entry], q, cache)
  cases = _BAD_OPTIONS + ([] if entry.endswith("reference") else _BAD_KERNEL_OPTIONS)
  if entry.endswith("ragged_paged_attention"):
    cases += [(dict(q_block=0), "q_block must be a positive int or None, got 0; pass"),
              (dict(q_block=True), "q_block must be .*got True of type bool"),
              (dict(q_block=2.0), "q_block must be .*got 2.0 of type float")]
  for kwargs, match in cases:
    with pytest.raises(jp.JaxPagedError, match=match):
      attend(**kwargs)
  # NumPy scalars are as good as Python numbers (and give the same program).
  numpy_kw = dict(sm_scale=np.float32(0.5), soft_cap=np.float64(3.0), sliding_window=np.int64(3))
  python_kw = dict(sm_scale=0.5, soft_cap=3.0, sliding_window=3)
  np.testing.assert_array_equal(attend(**numpy_kw), attend(**python_kw))


def test_traced_options_are_refused_inside_jit():
  cache = random_cache(_spec(), [5], seed=10)
  q = _q((1, 4, 64), jnp.float32)
  with pytest.raises(jp.JaxPagedError, match="sm_scale .*JAX array .*static option"):
    jax.jit(lambda scale: jp.paged_attention(q, cache, 0, jnp.array([0]), sm_scale=scale))(0.5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_empty_batches_return_empty_outputs(impl):
  cache = random_cache(_spec(dtype=jnp.bfloat16), [5], seed=14)
  none = jnp.zeros((0,), jnp.int32)
  attend = functools.partial(jp.paged_attention, impl=impl, interpret=True)
  ragged = functools.partial(jp.ragged_paged_attention, impl=impl, interpret=True)
  q = _q((0, 4, 64), jnp.bfloat16)
  k, v, table = cache.k_pages[0], cache.v_pages[0], cache.page_table[:0]
  outs = [attend(q, cache, 0, none), ragged(q, cache, 0, none, none), attend(q, cache, 0, []),
          ragged(q, cache, 0, [], []),
          jp.ops.paged_attention(q, k, v, table, none, impl=impl, interpret=True),
          jp.ops.ragged_paged_attention(q, k, v, table, none, none, impl=impl, interpret=True),
          jp.ops.ragged_paged_attention_reference(q, k, v, table, none, none)]
  for out in outs:
    assert out.shape == (0, 4, 64) and out.dtype == jnp.bfloat16
  # Tokens but no rows: every entry is past the last row, so zeros (as in any ragged batch).
  q = _q((3, 4, 64), jnp.bfloat16)
  for out in [ragged(q, cache, 0, none, none),
              jp.ops.ragged_paged_attention(q, k, v, table, none, none, impl=impl,
                                            interpret=True),
              jp.ops.ragged_paged_attention_reference(q, k, v, table, none, none)]:
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), 0)
  # Rows but no tokens (every q_lens 0).
  out = ragged(q[:0], cache, 0, jnp.array([0]), jnp.array([0]))
  assert out.shape == (0, 4, 64)
