"""CacheManager: admission with device and host prefix hits, demotion instead of silent eviction,
swapping under pressure, statistics and memory-pressure callbacks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from tests.helpers import key_values, prefill_manager, write_prefix_kv
from tests.workloads import toy_workload

PS = 4


def _spec(**kw):
  return jp.CacheSpec(**{**dict(num_layers=2, num_kv_heads=1, head_dim=2, page_size=PS,
                                num_pages=10, max_seqs=6, max_pages_per_seq=8,
                                prefix_caching=True), **kw})


_write, _prefill = write_prefix_kv, prefill_manager


def _assert_holds(manager, seq, tokens):
  assert int(manager.cache.seq_lens[seq]) == len(tokens)
  for layer in range(manager.spec.num_layers):
    k, v = jp.gather_kv(manager.cache, layer, seq)
    np.testing.assert_array_equal(np.asarray(k)[:len(tokens), 0, 0],
                                  key_values(tokens) + layer)
    np.testing.assert_array_equal(np.asarray(v)[:len(tokens), 0, 1], -key_values(tokens))


def test_device_hits_then_demoted_blocks_come_back_from_host_as_host_hits():
  manager = jp.CacheManager(_spec(max_pages_per_seq=10), host_bytes=1 << 20)
  system = list(range(1, 13))  # three full blocks
  first = _prefill(manager, system + [20, 21])
  assert (first.num_cached, first.num_new) == (0, 14)
  second = _prefill(manager, system + [30])
  assert (second.num_cached, second.host_hit_tokens) == (12, 0)  # a device hit
  manager.release([first.seq_id, second.seq_id])
  assert manager.stats()["cached_free_pages"] == 3

  # Others fill the pool: the cached system prompt is demoted to host, not dropped.
  filler = _prefill(manager, list(range(100, 140)))
  stats = manager.stats()
  assert stats["demoted_blocks"] == 3 and stats["host_entries"] == 3
  assert stats["device_evictions"] == 3 and stats["cached_free_pages"] == 0
  manager.release([filler.seq_id])

  third = _prefill(manager, system + [40, 41])
  assert (third.num_cached, third.num_new, third.host_hit_tokens) == (12, 2, 12)
  _assert_holds(manager, third.seq_id, system + [40, 41])
  stats = manager.stats()
  # The system blocks left the host; the filler's cached blocks made room for them (4 pages).
  assert stats["promoted_blocks"] == 3 and stats["host_entries"] == 4
  # Hit rates over the looked-up prompt blocks: 3 + 3 + 9 + 3 of them.
  assert stats["lookup_blocks"] == 3 + 3 + 9 + 3
  assert stats["device_hit_rate"] == pytest.approx(3 / 18)
  assert stats["host_hit_rate"] == pytest.approx(3 / 18)
  assert stats["prompt_tokens"] == 14 + 13 + 40 + 14
  # Promoted blocks are registered on device again.
  fourth = _prefill(manager, system + [50])
  assert (fourth.num_cached, fourth.host_hit_tokens) == (12, 0)


def test_host_blocks_are_verified_token_by_token_and_salted():
  manager = jp.CacheManager(_spec(block_hash="constant"), host_bytes=1 << 20)
  a = _prefill(manager, list(range(1, 10)))
  manager.release([a.seq_id])
  manager.gc()  # both blocks to host (every key collides: one host entry survives)
  assert manager.stats()["cached_free_pages"] == 0
  other = _prefill(manager, list(range(101, 110)))  # same keys, other tokens: no hit
  assert other.num_cached == 0
  _assert_holds(manager, other.seq_id, list(range(101, 110)))
  manager.release([other.seq_id])
  manager.gc()
  salted = _prefill(manager, list(range(101, 110)), salt=7)  # other tenant: no hit
  assert salted.num_cached == 0
  assert manager.stats()["host_hit_blocks"] == 0


def test_admission_refused_without_room_changes_nothing():
  manager = jp.CacheManager(_spec(prefix_caching=False), host_bytes=1 << 20)
  _prefill(manager, list(range(1, 33)))  # 8 of 10 pages
  assert manager.can_allocate(8) and not manager.can_allocate(9)
  assert manager.estimate_bytes(9) == 3 * manager.spec.page_bytes
  before = jax.tree.map(np.asarray, manager.cache)
  assert manager.admit(list(range(9))) is None
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, manager.cache), before)
  assert manager.stats()["allocation_failures"] == 1
  with pytest.raises(jp.JaxPagedError, match="tokens must hold 1..32 ids"):
    manager.admit(list(range(33)))


def test_room_tokens_counts_prefix_pages_held_by_others_as_already_held():
  """A serving loop admits a request only with room for its whole prompt plus headroom. Prefix
  hits on pages another sequence holds take nothing from the pool; idle cached ones do."""
  manager = jp.CacheManager(_spec(num_pages=8), host_bytes=1 << 20)
  prompt = list(range(1, 13))
  _prefill(manager, prompt)  # 3 full blocks, held by sequence 0; 5 pages free
  longer = prompt + [20, 21, 22, 23]
  before = jax.tree.map(np.asarray, manager.cache)
  # 9 pages of room, 3 of them the shared hits: 6 more than the 5 available.
  assert manager.admit(longer, max_prompt_tokens=0, room_tokens=36) is None
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, manager.cache), before)
  admission = manager.admit(longer, max_prompt_tokens=0, room_tokens=32)  # 8 pages: 3 + 5
  assert admission.num_cached == 12 and admission.num_new == 0
  assert manager.stats()["free_pages"] == 5  # attached, not allocated
  # Once both end, the blocks are idle cached pages: a hit on them takes them from the pool.
  manager.release([0, admission.seq_id])
  assert manager.available_pages == 8
  assert manager.admit(longer, max_prompt_tokens=0, room_tokens=36) is None
  assert manager.admit(longer, max_prompt_tokens=0, room_tokens=32).num_cached == 12


def test_swap_out_and_in_through_the_manager_keep_every_token():
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  a = _prefill(manager, list(range(1, 15)))
  b = _prefill(manager, list(range(50, 60)))
  manager.swap_out([a.seq_id])
  assert manager.swapped == [a.seq_id] and manager.active == [b.seq_id]
  stats = manager.stats()
  assert stats["swapped_sequences"] == 1 and stats["host_used_bytes"] > 0
  # The swapped id stays reserved: a new request takes another slot.
  c = _prefill(manager, [7, 7, 7])
  assert c.seq_id not in (a.seq_id, b.seq_id)
  assert manager.swap_in([a.seq_id]) == [True]
  _assert_holds(manager, a.seq_id, list(range(1, 15)))
  _assert_holds(manager, b.seq_id, list(range(50, 60)))
  assert manager.stats()["host_used_bytes"] == 0
  with pytest.raises(jp.JaxPagedError, match="not swapped out"):
    manager.swap_in([a.seq_id])
  with pytest.raises(jp.JaxPagedError, match="not active sequences"):
    manager.swap_out([5])


def test_extend_preempts_the_least_recently_used_sequence_when_asked():
  manager = jp.CacheManager(_spec(prefix_caching=False, num_pages=6), host_bytes=1 << 20)
  old = _prefill(manager, list(range(1, 9)))    # 2 pages, used first
  new = _prefill(manager, list(range(20, 28)))  # 2 pages
  grow = _prefill(manager, list(range(40, 48)))  # 2 pages: the pool is full
  slots, ok, preempted = manager.extend([grow.seq_id], [1])
  assert not bool(ok) and preempted == []
  assert manager.reserve([grow.seq_id], [1]) == (False, [])
  slots, ok, preempted = manager.extend([grow.seq_id], [1], preempt=True)
  assert bool(ok) and preempted == [old.seq_id]
  assert manager.swapped == [old.seq_id]
  manager.release([new.seq_id])
  assert manager.swap_in([old.seq_id]) == [True]
  _assert_holds(manager, old.seq_id, list(range(1, 9)))


def test_a_full_host_tier_refuses_swap_out_and_nothing_is_lost():
  spec = _spec()
  manager = jp.CacheManager(spec, host_bytes=3 * spec.page_bytes)
  a = _prefill(manager, list(range(1, 15)))  # 4 pages do not fit in 3 pages of host RAM
  before = jax.tree.map(np.asarray, manager.cache)
  with pytest.raises(jp.TierError, match="no tier can make room|larger than every tier"):
    manager.swap_out([a.seq_id])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, manager.cache), before)
  assert manager.active == [a.seq_id] and manager.swapped == []
  _assert_holds(manager, a.seq_id, list(range(1, 15)))


def test_a_policy_that_drops_a_swapped_sequence_is_reported_and_never_silent():

  @dataclasses.dataclass(frozen=True)
  class Reckless(jp.LRUPolicy):
    def eviction_candidate(self, tier, stats):
      return min(stats, key=lambda k: stats[k].last_access)

  spec = _spec(prefix_caching=False)
  manager = jp.CacheManager(spec, host_bytes=int(1.5 * spec.page_bytes), policy=Reckless())
  a = _prefill(manager, [1, 2, 3])
  b = _prefill(manager, [4, 5, 6])
  manager.swap_out([a.seq_id])
  manager.swap_out([b.seq_id])  # no room for both: the policy drops a
  stats = manager.stats()
  assert stats["dropped_sequences"] == 1 and manager.swapped == [b.seq_id]
  with pytest.raises(jp.JaxPagedError, match=r"sequence 0 was dropped .*evicted by Reckless"):
    manager.swap_in([a.seq_id])
  manager.release([a.seq_id])  # acknowledged: the slot is free again
  assert manager.swap_in([b.seq_id]) == [True]


def test_pressure_callbacks_fire_once_per_level_change_in_order():
  manager = jp.CacheManager(_spec(num_pages=20, prefix_caching=False), host_bytes=1 << 20)
  changes = []
  manager.on_pressure(lambda old, new: changes.append((old.name, new.name)))
  seqs = [_prefill(manager, [1] * 24).seq_id for _ in range(2)]  # 12 of 20 pages: 0.6
  seqs.append(_prefill(manager, [1] * 16).seq_id)  # 16 / 20 = 0.8
  seqs.append(_prefill(manager, [1] * 12).seq_id)  # 19 / 20 = 0.95
  _prefill(manager, [1])  # 20 / 20: still critical, no call
  assert changes == [("LOW", "MEDIUM"), ("MEDIUM", "HIGH"), ("HIGH", "CRITICAL")]
  assert manager.pressure == jp.MemoryPressure.CRITICAL
  manager.release(manager.active)
  assert changes[3:] == [("CRITICAL", "LOW")]
  assert manager.stats()["used_pages"] == 0 and manager.stats()["pressure"] == "LOW"


def test_gc_moves_unused_cached_blocks_to_host():
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  a = _prefill(manager, list(range(1, 14)))
  manager.release([a.seq_id])
  result = manager.gc()
  assert result == dict(pages_freed=3, bytes_freed=3 * manager.spec.page_bytes, blocks_demoted=3)
  assert manager.stats()["free_pages"] == manager.spec.num_pages
  again = _prefill(manager, list(range(1, 14)))
  assert again.host_hit_tokens == 12
  _assert_holds(manager, again.seq_id, list(range(1, 14)))


def test_a_workload_three_times_the_pool_completes_through_swapping_with_identical_outputs():
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 64, rng.integers(3, 8)).tolist() for _ in range(6)]
  pages = sum(-(-(len(p) + 10) // 4) for p in prompts)
  reference, _ = toy_workload(pages, prompts, 10)
  outputs, manager = toy_workload(-(-pages // 3), prompts, 10)
  stats = manager.stats()
  assert outputs == reference
  assert stats["swap_outs"] > 0 and stats["swap_ins"] == stats["swap_outs"]
  assert stats["used_pages"] == 0 and stats["host_used_bytes"] == 0


# ----------------------------------------------------------------------------- contract

def _pages_of(manager, seq):
  table = np.asarray(manager.cache.page_table)[seq]
  return set(table[table >= 0].tolist())


def test_a_prompt_admitted_twice_before_its_key_values_are_written_is_not_a_hit():
  """The second request must not read the first one's pages before they hold its K/V: those
  pages were just freed by another tenant and still hold that tenant's K/V."""
  manager = jp.CacheManager(_spec(num_pages=12), host_bytes=1 << 20)
  other = list(range(200, 214))
  secret = manager.admit(other, salt=7)
  kv = jnp.full((secret.slots.shape[0], 1, 2), 1e6, jnp.float32)  # the other tenant's K/V
  for layer in range(2):
    manager.cache = jp.write_kv(manager.cache, layer, kv, kv, secret.slots)
  manager.release([secret.seq_id])
  manager.gc()  # its blocks go to host RAM; the pages are free again, their K/V still there
  prompt = list(range(1, 14))
  first = manager.admit(prompt)
  assert first.num_cached == 0
  assert _pages_of(manager, first.seq_id) & {int(p) for p in np.asarray(secret.slots) // PS}
  second = manager.admit(prompt)  # before `first` wrote anything
  assert (second.num_cached, second.host_hit_tokens) == (0, 0)
  _write(manager, prompt, 0, second.slots, second.num_new)
  _write(manager, prompt, 0, first.slots, first.num_new)
  third = _prefill(manager, prompt)  # now written: a hit, on the prompt's own K/V
  assert third.num_cached == 12
  for seq in (first.seq_id, second.seq_id, third.seq_id):
    _assert_holds(manager, seq, prompt[:13])


def test_different_salts_never_share_a_page_on_device_in_host_ram_or_through_a_swap():
  manager = jp.CacheManager(_spec(num_pages=16, max_seqs=6), host_bytes=1 << 20)
  prompt = list(range(1, 14))
  a = _prefill(manager, prompt, salt=1 << 32)
  b = _prefill(manager, prompt, salt=0)  # 2**32 and 0 would collide if truncated to 32 bits
  assert b.num_cached == 0 and not _pages_of(manager, a.seq_id) & _pages_of(manager, b.seq_id)
  again = _prefill(manager, prompt, salt=1 << 32)
  assert again.num_cached == 12 and _pages_of(manager, a.seq_id) & _pages_of(manager,
                                                                               again.seq_id)
  manager.swap_out([a.seq_id])  # a's blocks stay cached under its salt
  c = _prefill(manager, prompt, salt=5)
  assert c.num_cached == 0
  assert manager.swap_in([a.seq_id]) == [True]
  _assert_holds(manager, a.seq_id, prompt)
  assert not _pages_of(manager, a.seq_id) & (_pages_of(manager, b.seq_id)
                                             | _pages_of(manager, c.seq_id))
  manager.release(manager.active)
  manager.gc()  # every block to host RAM
  assert manager.stats()["cached_free_pages"] == 0
  d = _prefill(manager, prompt, salt=6)
  assert (d.num_cached, d.host_hit_tokens) == (0, 0)
  e = _prefill(manager, prompt, salt=1 << 32)
  assert e.host_hit_tokens == 12
  _assert_holds(manager, e.seq_id, prompt)


def test_blocks_computed_twice_at_once_demote_with_their_exact_prefix_and_never_hit_falsely():
  """Equal blocks after different prefixes collide under the unchained hash. Two requests
  compute the same prefix X before either is written, then their own tails; demoted to host,
  every block carries its exact prefix, and a request whose tail follows another prefix gets
  no host hit for it (the false hit this used to give)."""
  manager = jp.CacheManager(_spec(block_hash="unchained", num_pages=16, max_pages_per_seq=6),
                            host_bytes=1 << 20)
  x, t1, t2, y = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9], [4, 3, 2, 1]
  first = manager.admit(x + t1 + [0])
  second = manager.admit(x + t2 + [0])  # computes X again: a duplicate of first's X
  _write(manager, x + t1 + [0], 0, first.slots, first.num_new)
  _write(manager, x + t2 + [0], 0, second.slots, second.num_new)
  manager.release([first.seq_id, second.seq_id])
  assert manager.gc()["blocks_demoted"] == 3  # X once, T1, T2
  blocks = {tuple(manager.store.peek(k).tokens) for k in manager.store.keys()}
  assert blocks == {tuple(x), tuple(x + t1), tuple(x + t2)}
  both = _prefill(manager, x + t2 + [0])  # X then T2 from host: every block that should hit
  assert both.host_hit_tokens == 8
  _assert_holds(manager, both.seq_id, x + t2 + [0])
  wrong = manager.admit(y + t2 + [0])  # T2's key, after another prefix
  assert (wrong.num_cached, wrong.host_hit_tokens) == (0, 0)
