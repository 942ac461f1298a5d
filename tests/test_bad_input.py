"""Bad input to the core and the manager: a clear error (argument, expected, given, fix) or an
exact use, never a silent truncation or a bare crash, and nothing changes when refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from tests.helpers import key_values, random_cache

SPEC = jp.CacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, page_size=4, num_pages=16,
                    max_seqs=4, max_pages_per_seq=6, prefix_caching=True)


def _snapshot(cache):
  return jax.tree.map(np.array, cache)


def _assert_unchanged(cache, before):
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, cache), before)


# ----------------------------------------------------------------------------- empty batches

def test_empty_batches_are_no_ops():
  cache = random_cache(SPEC, [5, 9])
  before = _snapshot(cache)
  none = jnp.zeros((0,), jnp.int32)
  new, slots, ok = jp.extend(cache, none, none, num_slots=3)
  assert bool(ok) and np.asarray(slots).tolist() == [-1, -1, -1]
  _assert_unchanged(new, before)
  _assert_unchanged(jp.release(cache, []), before)
  new, ok = jp.fork(cache, none, none)
  assert bool(ok)
  _assert_unchanged(new, before)
  assert np.asarray(jp.token_positions(cache, none, none, num_slots=2)).tolist() == [-1, -1]
  new, match = jp.match_prefix(cache, none, jnp.zeros((0, 8), jnp.int32), none)
  assert bool(match.ok) and match.num_cached.shape == (0,)
  _assert_unchanged(new, before)
  assert jp.write_kv(cache, 0, jnp.zeros((0, 1, 4)), jnp.zeros((0, 1, 4)), none) is cache


# ----------------------------------------------------------------------------- integer widths

@pytest.mark.parametrize("seq_ids, message", [
    (np.array([1 << 32], np.int64), r"seq_ids holds \[4294967296\], outside int32"),
    (np.array([1 << 31], np.uint32), r"seq_ids holds \[2147483648\], outside int32"),
    (np.array([(1 << 64) - 1], np.uint64), r"seq_ids holds \[18446744073709551615\]"),
    ([1 << 40], r"seq_ids holds \[1099511627776\]"),
    (np.array([0.0]), "seq_ids must have an integer dtype, got float64"),
    (np.array([True]), "seq_ids must have an integer dtype, got bool"),
])
def test_wide_integers_are_refused_not_truncated(seq_ids, message):
  cache = random_cache(SPEC, [5])
  with pytest.raises(jp.JaxPagedError, match=message):
    jp.extend(cache, seq_ids, np.array([1]))
  with pytest.raises(jp.JaxPagedError, match=message):
    jp.release(cache, seq_ids)


def test_integers_that_fit_are_used_exactly_whatever_their_width():
  cache = random_cache(SPEC, [5, 2])
  for dtype in (np.int64, np.uint32, np.uint64, np.int16, np.uint8):
    new, slots, ok = jp.extend(cache, np.array([1], dtype), np.array([3], dtype), num_slots=3)
    assert bool(ok) and int(new.seq_lens[1]) == 5
  # A traced uint32 id past int32 is out of range (refused), not a wrapped-around -1 padding.
  new, _, ok = jax.jit(jp.extend)(cache, jnp.array([0xFFFFFFFF], jnp.uint32),
                                  jnp.array([1], jnp.uint32))
  assert not bool(ok)


def test_salts_are_64_bit_and_never_truncated():
  cache = jp.init_cache(SPEC)
  tokens = jnp.arange(1, 10, dtype=jnp.int32)[None]
  cache, _ = jp.match_prefix(cache, jnp.array([0]), tokens, jnp.array([9]), salts=[1 << 32])
  cache = jax.tree.map(jnp.asarray, cache)
  for layer in range(SPEC.num_layers):
    kv = jnp.ones((9, 1, 4))
    cache = jp.write_kv(cache, layer, kv, kv, jnp.arange(9, dtype=jnp.int32))
  for salt, hit in ((0, 0), (1 << 32, 8), ((1 << 32) + 0, 8), ((1 << 64) - 1, 0), (1, 0)):
    _, match = jp.match_prefix(cache, jnp.array([1]), tokens, jnp.array([9]), salts=[salt])
    assert int(match.num_cached[0]) == hit, salt
  lanes = jnp.array([[0, 1]], jnp.uint32)  # (low, high) lanes of 2**32
  _, match = jp.match_prefix(cache, jnp.array([1]), tokens, jnp.array([9]), salts=lanes)
  assert int(match.num_cached[0]) == 8
  for bad, message in ((-1, r"salts is -1: salts are unsigned 64-bit"),
                       (1 << 64, "salts is 18446744073709551616"),
                       (1.5, "salts must have an integer dtype, got float64")):
    with pytest.raises(jp.JaxPagedError, match=message):
      jp.match_prefix(cache, jnp.array([1]), tokens, jnp.array([9]), salts=[bad])
  assert not (jp.block_hashes([1, 2, 3, 4], 4, salt=1 << 32)
              == jp.block_hashes([1, 2, 3, 4], 4, salt=0)).all()
  with pytest.raises(jp.JaxPagedError, match="salt is -3"):
    jp.block_hashes([1, 2, 3, 4], 4, salt=-3)


def test_token_ids_past_int32_are_refused():
  cache = jp.init_cache(SPEC)
  with pytest.raises(jp.JaxPagedError, match="tokens holds .*outside int32"):
    jp.match_prefix(cache, jnp.array([0]), np.array([[1, 1 << 33]], np.int64), jnp.array([2]))
  with pytest.raises(jp.JaxPagedError, match="tokens holds .*outside int32"):
    jp.extend(cache, jnp.array([0]), jnp.array([1]), tokens=np.array([1 << 33], np.int64))


# ----------------------------------------------------------------------------- reads, swaps

def test_gather_kv_refuses_an_id_out_of_range():
  cache = random_cache(SPEC, [5, 9])
  for bad in (4, -1, 1 << 32):
    with pytest.raises(jp.JaxPagedError, match=r"seq_id must be in \[0, 4\)"):
      jp.gather_kv(cache, 0, bad)
  with pytest.raises(jp.JaxPagedError, match="seq_id must be an int"):
    jp.gather_kv(cache, 0, 1.0)
  k, _ = jax.jit(jp.gather_kv)(cache, 0, jnp.int32(7))  # traced: reads nothing
  assert not np.asarray(k).any()


def test_swap_in_refuses_key_values_that_do_not_fit_and_changes_nothing():
  cache = random_cache(SPEC, [9, 5])
  cache, (swapped,) = jp.swap_out(cache, [0])
  before = _snapshot(cache)
  cases = {
      "fewer pages": dataclasses.replace(swapped, k=swapped.k[:, :, :2], v=swapped.v[:, :, :2]),
      "head_dim": dataclasses.replace(swapped, k=swapped.k[..., :2], v=swapped.v[..., :2]),
      "dtype": dataclasses.replace(swapped, k=swapped.k.astype(np.float16),
                                   v=swapped.v.astype(np.float16)),
      "k and v differ": dataclasses.replace(swapped, v=swapped.v[:, :, :2]),
      "length": dataclasses.replace(swapped, length=0),
      "tokens": dataclasses.replace(swapped, tokens=np.zeros(3, np.int32)),
      "salt": dataclasses.replace(swapped, salt=-1),
  }
  for what, bad in cases.items():
    with pytest.raises(jp.JaxPagedError, match="swapped"):
      jp.swap_in(cache, bad)
    _assert_unchanged(cache, before)
  cache, ok = jp.swap_in(cache, swapped)
  assert bool(ok)


def test_demote_blocks_clamps_huge_counts_and_refuses_negative_ones():
  cache = jp.release(random_cache(SPEC, [9]), jnp.array([0]))  # no token ids: nothing cached
  assert jp.demote_blocks(cache, 10**12)[1] == []
  cache = jp.init_cache(SPEC)
  tokens = jnp.arange(1, 10, dtype=jnp.int32)[None]
  cache, match = jp.match_prefix(cache, jnp.array([0]), tokens, jnp.array([9]))
  for layer in range(SPEC.num_layers):
    kv = jnp.asarray(key_values(np.arange(1, 10)))[:, None, None] * jnp.ones((1, 1, 4))
    cache = jp.write_kv(cache, layer, kv, kv, match.slots)
  cache = jp.release(cache, jnp.array([0]))
  new, blocks = jp.demote_blocks(cache, 10**12)  # no gigabytes, no hang: the 2 evictable ones
  assert len(blocks) == 2 and int(jp.num_free_pages(new)) == SPEC.num_pages
  for bad, message in ((-1, "count must be >= 0"), (2.5, "count must be a Python int")):
    with pytest.raises(jp.JaxPagedError, match=message):
      jp.demote_blocks(cache, bad)


def test_promote_blocks_refuses_blocks_of_another_shape():
  cache = jp.init_cache(SPEC)
  tokens = jnp.arange(1, 10, dtype=jnp.int32)[None]
  cache, match = jp.match_prefix(cache, jnp.array([0]), tokens, jnp.array([9]))
  for layer in range(SPEC.num_layers):
    cache = jp.write_kv(cache, layer, jnp.ones((9, 1, 4)), jnp.ones((9, 1, 4)), match.slots)
  cache, blocks = jp.demote_blocks(jp.release(cache, jnp.array([0])), 4)
  first = [b for b in blocks if b.depth == 0]
  cache, match = jp.match_prefix(cache, jnp.array([1]), jnp.zeros((1, 4), jnp.int32),
                                 jnp.array([1]), max_prompt_tokens=jnp.array([0]), num_slots=1)
  cache = jax.tree.map(jnp.asarray, cache)
  before = _snapshot(cache)
  for change, message in ((dict(k=first[0].k[..., :2]), r"blocks\[0\].k is float32\[2, 1, 4, 2\]"),
                          (dict(v=first[0].v.astype(np.float16)), r"blocks\[0\].v is float16"),
                          (dict(salt=1), r"blocks\[0\] does not continue")):
    with pytest.raises(jp.JaxPagedError, match=message):
      jp.promote_blocks(cache, 1, [dataclasses.replace(first[0], **change)])
  with pytest.raises(jp.JaxPagedError, match="blocks must be a non-empty list of CachedBlock"):
    jp.promote_blocks(cache, 1, [])
  _assert_unchanged(cache, before)


# ----------------------------------------------------------------------------- the manager

def _manager():
  manager = jp.CacheManager(SPEC, host_bytes=1 << 20)
  a = manager.admit(list(range(1, 10)))
  b = manager.admit(list(range(20, 26)))
  manager.swap_out([b.seq_id])
  return manager, a.seq_id, b.seq_id


def test_manager_refuses_rows_it_does_not_hold_and_growth_past_capacity():
  manager, active, swapped = _manager()
  before = _snapshot(manager.cache)
  cases = [
      (lambda: manager.reserve([active], [10**6]), "past max_seq_len = 24"),
      (lambda: manager.extend([active], [16], num_slots=16), "past max_seq_len = 24"),
      (lambda: manager.extend([swapped], [1]), rf"seq_ids \[{swapped}\] are not active"),
      (lambda: manager.reserve([3], [1]), r"seq_ids \[3\] are not active"),
      (lambda: manager.extend([active, active], [1, 1]), "repeat a sequence"),
      (lambda: manager.reserve([active], [-1]), "must be >= 0"),
      (lambda: manager.reserve([active], [5], num_slots=2), "more than num_slots = 2"),
      (lambda: manager.admit([]), "tokens must hold 1..24 ids"),
      (lambda: manager.admit([1, 2], salt=-1), "salt is -1"),
      (lambda: manager.admit([1, 1 << 40]), "tokens holds"),
      (lambda: manager.on_pressure(None), "callback must be callable"),
      (lambda: manager.swap_in([active]), "is not swapped out"),
      (lambda: manager.swap_out([swapped]), "not active sequences"),
  ]
  for call, message in cases:
    with pytest.raises(jp.JaxPagedError, match=message):
      call()
  _assert_unchanged(manager.cache, before)
  assert manager.active == [active] and manager.swapped == [swapped]
