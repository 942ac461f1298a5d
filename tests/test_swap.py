"""Swap out/in and demote/promote: K/V leave the device and come back bit-exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from tests.helpers import key_values, random_cache
from tests.test_prefix import _admit, _admit_and_write


def _contents(cache, seqs):
  """Every sequence's length and K/V, per layer, as NumPy (the oracle: what was there)."""
  out = {}
  for s in seqs:
    n = int(cache.seq_lens[s])
    out[s] = [n] + [np.asarray(x)[:n] for layer in range(cache.spec.num_layers)
                    for x in jp.gather_kv(cache, layer, s)]
  return out


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for s in a:
    assert a[s][0] == b[s][0]
    for x, y in zip(a[s][1:], b[s][1:]):
      np.testing.assert_array_equal(x, y)


def _snapshot(cache):
  return jax.tree.map(np.asarray, cache)


def _decode_attention(cache, seqs, num_q_heads, seed=0):
  q = jax.random.normal(jax.random.key(seed), (len(seqs), num_q_heads, cache.spec.head_dim),
                        cache.spec.dtype)
  return [np.asarray(jp.paged_attention(q, cache, layer, jnp.asarray(seqs, jnp.int32),
                                        impl="xla"))
          for layer in range(cache.spec.num_layers)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swap_round_trip_is_bit_exact_with_shared_pages_and_partial_pages(dtype):
  spec = jp.CacheSpec(num_layers=3, num_kv_heads=2, head_dim=16, page_size=4, num_pages=24,
                      max_seqs=5, max_pages_per_seq=8, dtype=dtype)
  cache = random_cache(spec, [5, 9, 4, 13], seed=3)
  cache, ok = jp.fork(cache, jnp.array([1]), jnp.array([4]))  # seq 4 shares seq 1's pages
  assert bool(ok)
  seqs = [0, 1, 2, 3, 4]
  before = _contents(cache, seqs)
  attention = _decode_attention(cache, seqs, num_q_heads=4)
  free = int(jp.num_free_pages(cache))

  cache, swapped = jp.swap_out(cache, [1, 3, 0])
  assert [s.seq_id for s in swapped] == [1, 3, 0]
  assert [s.length for s in swapped] == [5 + 4, 13, 5]
  # Seq 1's pages stay with its fork; 3's and 0's come back to the pool.
  assert int(jp.num_free_pages(cache)) == free + 4 + 2
  assert all(int(cache.seq_lens[s]) == 0 for s in (0, 1, 3))
  _assert_same(_contents(cache, [2, 4]), {s: before[s] for s in (2, 4)})

  for s in reversed(swapped):  # any order, into the slots they left
    cache, ok = jp.swap_in(cache, s)
    assert bool(ok)
  _assert_same(_contents(cache, seqs), before)
  for x, y in zip(_decode_attention(cache, seqs, num_q_heads=4), attention):
    np.testing.assert_array_equal(x, y)
  # The swapped-in copy of the shared sequence is private now: a write to it leaves the fork.
  cache, slots, ok = jp.extend(cache, jnp.array([1]), jnp.array([1]))
  cache = jp.write_kv(cache, 0, jnp.full((1, 2, 16), 7, dtype), jnp.full((1, 2, 16), 7, dtype),
                      slots)
  _assert_same(_contents(cache, [4]), {4: before[4]})


def test_a_swap_in_without_room_changes_nothing_and_can_be_retried():
  spec = jp.CacheSpec(num_layers=2, num_kv_heads=1, head_dim=8, page_size=4, num_pages=6,
                      max_seqs=3, max_pages_per_seq=6)
  cache = random_cache(spec, [10, 8])
  before = _contents(cache, [0])
  cache, (swapped,) = jp.swap_out(cache, [0])
  cache, _, ok = jp.extend(cache, jnp.array([2]), jnp.array([12]), num_slots=12)
  assert bool(ok) and int(jp.num_free_pages(cache)) == 1
  snapshot = _snapshot(cache)
  cache, ok = jp.swap_in(cache, swapped)
  assert not bool(ok)
  jax.tree.map(np.testing.assert_array_equal, _snapshot(cache), snapshot)
  cache = jp.release(cache, jnp.array([2]))
  cache, ok = jp.swap_in(cache, swapped, seq_id=2)  # another slot works too
  assert bool(ok)
  assert _contents(cache, [2])[2][0] == before[0][0]
  _assert_same({0: _contents(cache, [2])[2]}, before)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_swap_round_trip_leaves_the_cache_placed_as_it_was_so_nothing_recompiles(
    prefix_caching):
  """A committed input commits every output of a jitted call, and jit compiles again for
  committed arguments: swap_in must not commit a cache that was not, or a serving loop's
  jitted step compiles again after its first swap."""
  spec = _prefix_spec(prefix_caching=prefix_caching)
  step = jax.jit(lambda cache: jp.extend(cache, jnp.array([1]), jnp.array([1]), num_slots=1))
  cache, _ = _admit_and_write(jp.init_cache(spec), 0, list(range(1, 11)))
  cache = jp.release(step(cache)[0], jnp.array([1]))
  for committed in (False, True):
    if committed:  # a cache placed on its device explicitly stays so
      cache = jax.device_put(cache, jax.devices()[0])
    assert all(x.committed == committed for x in jax.tree.leaves(cache))
    cache, (swapped,) = jp.swap_out(cache, [0])
    cache, ok = jp.swap_in(cache, swapped)
    assert bool(ok) and all(x.committed == committed for x in jax.tree.leaves(cache))
    cache = jp.release(step(cache)[0], jnp.array([1]))
    assert step._cache_size() == 1 + committed  # one program per placement, no more


def test_swap_rejects_bad_input_with_a_fix():
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
                      max_seqs=3, max_pages_per_seq=4)
  cache = random_cache(spec, [6, 3])
  with pytest.raises(jp.JaxPagedError, match="hold no tokens"):
    jp.swap_out(cache, [2])
  with pytest.raises(jp.JaxPagedError, match=r"out of range \[0, 3\)"):
    jp.swap_out(cache, [3])
  with pytest.raises(jp.JaxPagedError, match="repeat"):
    jp.swap_out(cache, [0, 0])
  cache, (swapped,) = jp.swap_out(cache, [0])
  with pytest.raises(jp.JaxPagedError, match="holds tokens; swap in into an empty slot"):
    jp.swap_in(cache, swapped, seq_id=1)
  other = jp.init_cache(dataclasses.replace(spec, head_dim=16))
  with pytest.raises(jp.JaxPagedError, match="same spec"):
    jp.swap_in(other, swapped)
  with pytest.raises(jp.JaxPagedError, match="SwappedSequence"):
    jp.swap_in(cache, "seq 0")


def _prefix_spec(**kw):
  return jp.CacheSpec(**{**dict(num_layers=2, num_kv_heads=1, head_dim=2, page_size=4,
                                num_pages=12, max_seqs=4, max_pages_per_seq=8,
                                prefix_caching=True), **kw})


def test_swapped_out_blocks_stay_cached_and_come_back_without_a_copy():
  cache = jp.init_cache(_prefix_spec())
  prompt = list(range(1, 15))  # 3 full blocks and 2 tokens
  cache, _ = _admit_and_write(cache, 0, prompt)
  before = _contents(cache, [0])
  cache, (swapped,) = jp.swap_out(cache, [0])
  np.testing.assert_array_equal(np.asarray(swapped.tokens)[:14], prompt)
  assert int(jp.num_cached_free_pages(cache)) == 3
  hits = int(jp.prefix_stats(cache)["hit_blocks"])
  cache, ok = jp.swap_in(cache, swapped)
  assert bool(ok)
  assert int(jp.prefix_stats(cache)["hit_blocks"]) == hits + 3  # attached, not copied
  _assert_same(_contents(cache, [0]), before)
  # Its blocks are still registered: a new request with the same prefix shares them.
  cache, match = _admit(cache, 1, prompt[:13])
  assert int(match.num_cached[0]) == 12


def test_a_swapped_sequence_whose_blocks_were_evicted_is_copied_back_and_registered():
  cache = jp.init_cache(_prefix_spec())
  prompt = list(range(1, 15))
  cache, _ = _admit_and_write(cache, 0, prompt)
  before = _contents(cache, [0])
  cache, (swapped,) = jp.swap_out(cache, [0])
  cache, _ = _admit_and_write(cache, 1, list(range(100, 132)))
  cache, _ = _admit_and_write(cache, 2, list(range(200, 216)))  # 12 pages: all three evicted
  assert int(jp.prefix_stats(cache)["evictions"]) == 3
  cache = jp.release(cache, jnp.array([1, 2]))
  cache, ok = jp.swap_in(cache, swapped)
  assert bool(ok)
  _assert_same(_contents(cache, [0]), before)
  cache, match = _admit(cache, 1, prompt)
  assert int(match.num_cached[0]) == 12


def test_demote_evicts_like_the_allocator_and_promote_restores_and_registers():
  cache = jp.init_cache(_prefix_spec(max_pages_per_seq=12))
  cache, _ = _admit_and_write(cache, 0, list(range(1, 14)))   # blocks A0 A1 A2
  cache, _ = _admit_and_write(cache, 1, list(range(50, 59)))  # blocks B0 B1
  cache = jp.release(cache, jnp.array([1]))
  cache = jp.release(cache, jnp.array([0]))  # A released last: B is least recently used
  # What the allocator would evict for 3 pages beyond the free ones...
  short = int(jp.num_free_pages(cache)) + 3
  allocated, _, ok = jp.extend(jax.tree.map(jnp.copy, cache), jnp.array([3]),
                               jnp.array([short * 4]), num_slots=short * 4)
  assert bool(ok)
  evicted_by_extend = np.flatnonzero(np.asarray(cache.prefix.page_cached)
                                     & ~np.asarray(allocated.prefix.page_cached))
  # ... is what demote_blocks evicts: B's tail, B's head, then A's tail.
  cached_before = np.asarray(cache.prefix.page_cached)
  free_before = int(jp.num_free_pages(cache))
  cache, blocks = jp.demote_blocks(cache, 3)
  demoted = np.flatnonzero(cached_before & ~np.asarray(cache.prefix.page_cached))
  np.testing.assert_array_equal(demoted, evicted_by_extend)
  assert int(jp.num_free_pages(cache)) == free_before + 3
  assert [(b.depth, b.tokens[:4].tolist()) for b in blocks] == [
      (1, [50, 51, 52, 53]), (0, [50, 51, 52, 53]), (2, [1, 2, 3, 4])]
  # Host keys are the host hash of the block's whole prefix.
  for b in blocks:
    assert b.key == jp.block_key(jp.block_hashes(b.tokens, 4)[-1])
    np.testing.assert_array_equal(b.k[:, 0, :, 0], np.stack(
        [key_values(b.tokens)[-4:] + 0 * layer for layer in range(2)]))

  # A device hit on A0 A1, then the host's A2 is promoted after them.
  prompt = list(range(1, 14))
  cache, match = _admit(cache, 2, prompt, max_prompt_tokens=jnp.array([0]))
  assert int(match.num_cached[0]) == 8
  a2 = next(b for b in blocks if b.depth == 2)
  b1 = next(b for b in blocks if b.depth == 1)
  with pytest.raises(jp.JaxPagedError, match=r"blocks\[0\] does not continue seq_id 2"):
    jp.promote_blocks(cache, 2, [b1])
  cache, ok = jp.promote_blocks(cache, 2, [a2])
  assert bool(ok) and int(cache.seq_lens[2]) == 12
  k, _ = jp.gather_kv(cache, 1, 2)
  np.testing.assert_array_equal(np.asarray(k)[:12, 0, 0], key_values(prompt)[:12])
  cache = jp.release(cache, jnp.array([2]))
  cache, match = _admit(cache, 3, prompt)
  assert int(match.num_cached[0]) == 12  # registered again


def test_promote_without_room_changes_nothing():
  cache = jp.init_cache(_prefix_spec(num_pages=4))
  cache, _ = _admit_and_write(cache, 0, list(range(1, 10)))
  cache = jp.release(cache, jnp.array([0]))
  cache, blocks = jp.demote_blocks(cache, 1)
  (block,) = blocks
  cache, match = _admit(cache, 1, list(range(1, 10)), max_prompt_tokens=jnp.array([0]))
  assert int(match.num_cached[0]) == 4 * block.depth
  cache, _, ok = jp.extend(cache, jnp.array([2]), jnp.array([12]), num_slots=12)
  assert bool(ok)
  snapshot = _snapshot(cache)
  cache, ok = jp.promote_blocks(cache, 1, [block])
  assert not bool(ok)
  jax.tree.map(np.testing.assert_array_equal, _snapshot(cache), snapshot)
