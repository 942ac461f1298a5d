"""Retention control (`jaxpaged._src.retention`): prefix TTL, pins and priority classes on the
device pool, host RAM and disk, with an injected clock. Oracles are independent of the code
under test: which blocks each tier holds is read from its raw state (the device's registered
pages, the RAM store's entries, the disk's files), and hits are checked token by token against
`key_values`."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged import JaxPagedError
from jaxpaged._src import prefix_state
from jaxpaged._src.disk import DiskStore, block_file_bytes
from tests.helpers import key_values, prefill_manager, write_prefix_kv

PS = 4


def _spec(**kw):
  return jp.CacheSpec(**{**dict(num_layers=1, num_kv_heads=1, head_dim=2, page_size=PS,
                                num_pages=8, max_seqs=4, max_pages_per_seq=8,
                                prefix_caching=True), **kw})


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _block_bytes(depth, spec=None):
  """Host bytes of a demoted block at ``depth`` (K and V in float32, its prefix's ids)."""
  spec = spec or _spec()
  return 2 * spec.num_layers * spec.num_kv_heads * PS * spec.head_dim * 4 + 4 * PS * (depth + 1)


_write, _prefill = write_prefix_kv, prefill_manager


def _cache(manager, tokens, **kw):
  """Computes a prompt and ends it: its full blocks stay cached on device."""
  admission = _prefill(manager, tokens, **kw)
  manager.release([admission.seq_id])
  return admission


def _assert_holds(manager, seq, tokens):
  assert int(manager.cache.seq_lens[seq]) == len(tokens)
  for layer in range(manager.spec.num_layers):
    k, v = jp.gather_kv(manager.cache, layer, seq)
    np.testing.assert_array_equal(np.asarray(k)[:len(tokens), 0, 0], key_values(tokens) + layer)
    np.testing.assert_array_equal(np.asarray(v)[:len(tokens), 0, 1], -key_values(tokens))


def _device_blocks(manager):
  """Token ids of every block registered on device (the raw prefix state)."""
  prefix = manager.cache.prefix
  cached, tokens = np.asarray(prefix.page_cached), np.asarray(prefix.page_tokens)
  return {tuple(tokens[p].tolist()) for p in np.flatnonzero(cached)}


def _ram_blocks(manager):
  """Token ids of the last block of every block entry of the RAM store."""
  return {tuple(manager.store.peek(k).tokens[-PS:].tolist()) for k in manager.store.keys()
          if k[0] == "block"}


def _blocks(tokens):
  """The full blocks of a prompt, as token-id tuples."""
  return {tuple(tokens[i:i + PS]) for i in range(0, len(tokens) // PS * PS, PS)}


def _disk_keys(tokens, salt=0):
  return {jp.block_key(h) for h in jp.block_hashes(tokens[:len(tokens) // PS * PS], PS, salt)}


def _state(manager):
  """What a refused call must leave as it was."""
  cache = manager.cache
  return (np.asarray(cache.ref_counts).tolist(), int(cache.num_free),
          int(cache.prefix.num_evictable), sorted(map(str, manager.store.keys())),
          manager.retention.stats(), dict(manager.counters))


SYSTEM = list(range(1, 9))  # two full blocks


# ----------------------------------------------------------------------------- TTL

def test_ttl_drops_device_blocks_unused_longer_and_keeps_the_others():
  clock = Clock()
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20, prefix_ttl_seconds=10, clock=clock)
  old, recent = list(range(1, 10)), list(range(20, 29))
  _cache(manager, old)
  clock.now = 6.0
  _cache(manager, recent)
  assert _device_blocks(manager) == _blocks(old) | _blocks(recent)
  clock.now = 12.0  # old: unused for 12 s; recent: 6 s
  assert manager.expire() == dict(device_blocks=2, host_blocks=0, disk_blocks=0)
  assert _device_blocks(manager) == _blocks(recent)
  assert _ram_blocks(manager) == set()  # dropped, not demoted
  assert manager.stats()["free_pages"] == 6
  clock.now = 17.0
  assert manager.expire()["device_blocks"] == 2
  assert _device_blocks(manager) == set() and manager.stats()["free_pages"] == 8
  assert manager.stats()["retention"]["expired_device_blocks"] == 4


def test_a_block_used_again_before_its_ttl_lives_on_and_admissions_sweep_by_themselves():
  clock = Clock()
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20, prefix_ttl_seconds=10, clock=clock)
  _cache(manager, SYSTEM + [9])
  clock.now = 8.0
  again = _prefill(manager, SYSTEM + [50])  # a hit: used again at 8 s
  assert again.num_cached == 8
  manager.release([again.seq_id])
  clock.now = 15.0  # 15 s after the first use, 7 s after the last: kept
  assert manager.expire()["device_blocks"] == 0
  assert _device_blocks(manager) == _blocks(SYSTEM)
  clock.now = 30.0  # no expire() call: the admission sweeps first
  late = _prefill(manager, SYSTEM + [60])
  assert late.num_cached == 0
  assert manager.stats()["retention"]["expired_device_blocks"] == 2


def test_ttl_drops_host_ram_blocks():
  clock = Clock()
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20, prefix_ttl_seconds=10, clock=clock)
  old, recent = list(range(1, 10)), list(range(20, 29))
  _cache(manager, old)
  manager.gc()  # to RAM at 0 s
  clock.now = 5.0
  _cache(manager, recent)
  manager.gc()  # to RAM at 5 s
  assert _device_blocks(manager) == set()
  assert _ram_blocks(manager) == _blocks(old) | _blocks(recent)
  clock.now = 11.0
  assert manager.expire() == dict(device_blocks=0, host_blocks=2, disk_blocks=0)
  assert _ram_blocks(manager) == _blocks(recent)
  clock.now = 16.0
  assert manager.expire()["host_blocks"] == 2 and _ram_blocks(manager) == set()


def test_ttl_drops_disk_blocks(tmp_path):
  clock = Clock()
  spec = _spec()
  disk = DiskStore(tmp_path, 1 << 20, spec=spec, clock=clock, fsync=False)
  manager = jp.CacheManager(spec, host_bytes=1 << 20, disk=disk, prefix_ttl_seconds=10,
                            clock=clock)
  assert disk.ttl_seconds == 10  # a disk without a TTL of its own takes the manager's
  old, recent = list(range(1, 10)), list(range(20, 29))
  _cache(manager, old)  # written through to disk on release
  clock.now = 5.0
  _cache(manager, recent)
  assert set(disk.keys()) == _disk_keys(old) | _disk_keys(recent)
  clock.now = 11.0
  assert manager.expire() == dict(device_blocks=2, host_blocks=0, disk_blocks=2)
  assert set(disk.keys()) == _disk_keys(recent)
  assert sorted(p.name for p in tmp_path.rglob("*.kvb")) == sorted(
      f"{k:016x}.kvb" for k in _disk_keys(recent))


def test_expired_pages_are_the_first_victims_then_lower_priorities_then_least_recent():
  spec = _spec(max_seqs=4)
  cache = jp.init_cache(spec)
  prompts = [list(range(10 * i + 1, 10 * i + 5)) + [99] for i in range(4)]  # one block each
  for seq, prompt in enumerate(prompts):  # seq i's block is used at clock 2 i + 1
    cache, found = jp.match_prefix(cache, jnp.array([seq]), jnp.array([prompt]),
                                   jnp.array([len(prompt)]))
    k = jnp.ones((found.slots.shape[0], 1, 2))
    cache = jp.write_kv(cache, 0, k, k, found.slots)
    cache = jp.release(cache, jnp.array([seq]))
  prefix = cache.prefix
  page_of = {int(np.asarray(prefix.page_tokens)[p][0]): p
             for p in np.flatnonzero(np.asarray(prefix.page_cached))}
  pages = [page_of[prompt[0]] for prompt in prompts]
  last_use = np.asarray(prefix.page_last_use)[pages]
  assert list(last_use) == sorted(last_use) and len(set(last_use)) == 4

  def order(priorities, expire_before):
    p = prefix.page_priority.at[jnp.array(pages)].set(jnp.array(priorities))
    state = dataclasses.replace(prefix, page_priority=p, page_priority_gen=prefix.page_gen,
                                expire_before=jnp.int32(expire_before))
    victims = prefix_state.choose_victims(state, cache.ref_counts, 4, 4)
    return [pages.index(int(v)) for v in victims]

  assert order([0, 0, 0, 0], 0) == [0, 1, 2, 3]  # least recently used first
  assert order([5, 0, 5, 0], 0) == [1, 3, 0, 2]  # lower priority first, then LRU
  # Expired (used before the second block's use) goes first, whatever its priority.
  assert order([9, 0, 5, 0], int(last_use[1])) == [0, 1, 3, 2]


# ----------------------------------------------------------------------------- pins

def test_a_pinned_prefix_survives_device_pressure_hits_bit_exactly_and_unpin_frees_it():
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  _cache(manager, SYSTEM + [9])
  pinned = manager.pin(SYSTEM + [9])  # the partial block does not count
  assert pinned == jp.PinnedPrefix(full_blocks=2, tokens=8, device_blocks=2, host_blocks=0,
                                   disk_blocks=0)
  assert manager.stats()["cached_free_pages"] == 0 and manager.available_pages == 6
  for i in range(4):  # others fill every page that is not pinned, twice over
    _cache(manager, list(range(100 + 20 * i, 109 + 20 * i)))
    assert _blocks(SYSTEM) <= _device_blocks(manager)
  assert manager.stats()["demoted_blocks"] >= 2
  hit = _prefill(manager, SYSTEM + [70])
  assert (hit.num_cached, hit.host_hit_tokens) == (8, 0)  # from the device
  _assert_holds(manager, hit.seq_id, SYSTEM + [70])
  manager.release([hit.seq_id])  # releasing never unpins
  assert manager.available_pages == 6 and _blocks(SYSTEM) <= _device_blocks(manager)
  assert manager.unpin(SYSTEM) == pinned
  assert manager.available_pages == 8
  manager.gc()  # every evictable block to RAM: the system blocks too, now
  assert _device_blocks(manager) == set()
  assert _blocks(SYSTEM) <= _ram_blocks(manager)


def test_a_prefix_pinned_in_host_ram_survives_ram_pressure_and_promotes_bit_exactly():
  # RAM for four blocks of depth <= 1: half of it holds the two pinned ones.
  ram = 2 * (_block_bytes(0) + _block_bytes(1))
  manager = jp.CacheManager(_spec(), host_bytes=ram)
  _cache(manager, SYSTEM + [9])
  manager.gc()
  assert _ram_blocks(manager) == _blocks(SYSTEM)
  pinned = manager.pin(SYSTEM)
  assert (pinned.device_blocks, pinned.host_blocks, pinned.tokens) == (0, 2, 8)
  for i in range(3):  # others fill RAM twice over
    _cache(manager, list(range(100 + 20 * i, 109 + 20 * i)))
    manager.gc()
    assert _blocks(SYSTEM) <= _ram_blocks(manager)
  assert manager.stats()["host_evictions"] >= 4
  hit = _prefill(manager, SYSTEM + [70])
  assert (hit.num_cached, hit.host_hit_tokens) == (8, 8)
  _assert_holds(manager, hit.seq_id, SYSTEM + [70])
  assert _blocks(SYSTEM) <= _ram_blocks(manager)  # promoted, and its pinned copy stays
  manager.release([hit.seq_id])
  manager.unpin(SYSTEM)
  _cache(manager, list(range(300, 309)))
  _cache(manager, list(range(320, 329)))
  manager.gc()  # the system blocks on device go, their RAM copies are evictable again
  _cache(manager, list(range(340, 349)))
  manager.gc()
  assert not _blocks(SYSTEM) <= _ram_blocks(manager)


def test_a_prefix_pinned_on_disk_survives_disk_pressure_and_expiry(tmp_path):
  clock = Clock()
  spec = _spec()
  probe = DiskStore(tmp_path / "probe", 1 << 20, spec=spec, fsync=False)
  file_bytes = block_file_bytes(spec, PS, probe.layout) + block_file_bytes(spec, 2 * PS,
                                                                          probe.layout)
  disk = DiskStore(tmp_path / "disk", 2 * file_bytes, spec=spec, clock=clock, fsync=False)
  manager = jp.CacheManager(spec, host_bytes=1 << 20, disk=disk, prefix_ttl_seconds=100,
                            clock=clock)
  _cache(manager, SYSTEM + [9])
  pinned = manager.pin(SYSTEM)
  assert (pinned.device_blocks, pinned.disk_blocks) == (2, 2)
  for i in range(4):  # others fill the disk twice over
    _cache(manager, list(range(100 + 20 * i, 109 + 20 * i)))
    assert _disk_keys(SYSTEM) <= set(disk.keys())
  assert disk.stats()["evictions"] >= 4
  clock.now = 500.0
  expired = manager.expire()
  assert expired["disk_blocks"] >= 1 and expired["device_blocks"] >= 2
  assert set(disk.keys()) == _disk_keys(SYSTEM) and _blocks(SYSTEM) <= _device_blocks(manager)
  found = disk.run(np.array(SYSTEM), 0)
  assert len(found) == 2
  for i, block in enumerate(found):  # bit-exact K/V of each block
    np.testing.assert_array_equal(block.k[0, 0, :, 0], key_values(SYSTEM)[i * PS:(i + 1) * PS])
    np.testing.assert_array_equal(block.v[0, 0, :, 1], -key_values(SYSTEM)[i * PS:(i + 1) * PS])
  manager.unpin(SYSTEM)
  clock.now = 1000.0
  manager.expire()
  assert set(disk.keys()) == set() and _device_blocks(manager) == set()


def test_pins_nest_and_unpin_of_what_is_not_pinned_is_refused():
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  _cache(manager, SYSTEM + [9])
  manager.pin(SYSTEM)
  manager.pin(SYSTEM + [5, 6])  # the same full blocks: a second hold
  assert np.asarray(manager.cache.ref_counts).max() == 2
  assert manager.stats()["retention"]["pins"] == 2
  manager.unpin(SYSTEM)
  assert manager.stats()["cached_free_pages"] == 0  # still held once
  manager.unpin(SYSTEM)
  assert manager.stats()["cached_free_pages"] == 2
  with pytest.raises(JaxPagedError, match="not pinned"):
    manager.unpin(SYSTEM)
  with pytest.raises(JaxPagedError, match="not pinned under salt 7"):
    manager.pin(SYSTEM)
    manager.unpin(SYSTEM, salt=7)


def test_a_prompt_not_cached_pins_nothing_and_a_later_computation_is_not_pinned():
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  assert manager.pin(SYSTEM) == jp.PinnedPrefix(2, 0, 0, 0, 0)
  _cache(manager, SYSTEM + [9])
  assert manager.stats()["cached_free_pages"] == 2  # evictable: not pinned
  manager.unpin(SYSTEM)


def test_pins_over_a_bound_are_refused_clearly_and_change_nothing():
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20, max_pinned_pages=1)
  _cache(manager, SYSTEM + [9])
  before = _state(manager)
  with pytest.raises(JaxPagedError, match=r"max_pinned_pages=1.*Nothing was pinned"):
    manager.pin(SYSTEM)
  assert _state(manager) == before
  assert manager.pin(SYSTEM[:4]).device_blocks == 1  # one page fits

  small = jp.CacheManager(_spec(), host_bytes=1 << 20, max_pinned_host_bytes=100)
  _cache(small, SYSTEM + [9])
  small.gc()
  before = _state(small)
  with pytest.raises(JaxPagedError, match=r"host RAM, over max_pinned_host_bytes = 100"):
    small.pin(SYSTEM)  # 80 + 96 bytes
  assert _state(small) == before
  with pytest.raises(JaxPagedError, match="max_pinned_pages"):
    jp.CacheManager(_spec(), max_pinned_pages=9)


# ----------------------------------------------------------------------------- priorities

@pytest.mark.parametrize("first_priority,kept", [(0, "second"), (5, "first")])
def test_lower_priority_device_blocks_are_evicted_first_even_when_more_recently_used(
    first_priority, kept):
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  first, second = list(range(1, 10)), list(range(20, 29))
  _cache(manager, first, priority=first_priority)
  _cache(manager, second)  # priority 0, used after the first
  _prefill(manager, list(range(40, 49)))  # 3 of the 4 free pages
  _prefill(manager, list(range(60, 69)))  # 3 pages more: two cached blocks must go
  survivors = {"first": first, "second": second}
  gone = second if kept == "first" else first
  assert _blocks(survivors[kept]) <= _device_blocks(manager)
  assert not _blocks(gone) & _device_blocks(manager)
  assert _ram_blocks(manager) == _blocks(gone)  # demoted to RAM


@pytest.mark.parametrize("first_priority,kept", [(0, "second"), (5, "first")])
def test_lower_priority_ram_blocks_are_evicted_first_even_when_more_recently_used(
    first_priority, kept):
  manager = jp.CacheManager(_spec(), host_bytes=2 * _block_bytes(0))  # two one-block entries
  first, second, third = [1, 2, 3, 4, 5], [20, 21, 22, 23, 24], [40, 41, 42, 43, 44]
  _cache(manager, first, priority=first_priority)
  manager.gc()
  _cache(manager, second)
  manager.gc()
  _cache(manager, third)
  manager.gc()  # RAM holds two: the third evicts one
  kept_blocks = _blocks(first) if kept == "first" else _blocks(second)
  assert _ram_blocks(manager) == kept_blocks | _blocks(third)


def test_a_block_keeps_the_highest_priority_of_the_requests_that_used_it():
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  first, second = list(range(1, 10)), list(range(20, 29))
  a = _prefill(manager, first, priority=5)
  b = _prefill(manager, first[:8] + [77], priority=-3)  # shares the first's blocks
  assert b.num_cached == 8
  manager.release([a.seq_id])
  manager.release([b.seq_id])  # the blocks keep 5
  _cache(manager, second, priority=1)
  _prefill(manager, list(range(40, 49)))
  _prefill(manager, list(range(60, 69)))  # two blocks go: the second's (1 < 5)
  assert _blocks(first) <= _device_blocks(manager)
  assert not _blocks(second) & _device_blocks(manager)


# ----------------------------------------------------------------------------- bad input, atomicity

def test_bad_retention_arguments_are_refused_clearly():
  manager = jp.CacheManager(_spec())
  with pytest.raises(JaxPagedError, match="at least one full block"):
    manager.pin([])
  with pytest.raises(JaxPagedError, match=r"at least one full block \(4 tokens\).*got 3"):
    manager.pin([1, 2, 3])
  for ttl in (-1, 0, float("inf"), "10", True):
    with pytest.raises(JaxPagedError, match="prefix_ttl_seconds"):
      jp.CacheManager(_spec(), prefix_ttl_seconds=ttl)
  with pytest.raises(JaxPagedError, match="clock must be a callable"):
    jp.CacheManager(_spec(), prefix_ttl_seconds=1, clock=5)
  for priority in ("high", 1.5, True, None, 1 << 31):
    with pytest.raises(JaxPagedError, match="priority must be an int"):
      manager.admit([1, 2, 3], priority=priority)
  assert manager.active == [] and manager.stats()["allocations"] == 0


def test_refused_admissions_and_a_raising_policy_leave_everything_as_before():
  class Raising:
    def should_promote(self, key, stats):
      return True

    def eviction_candidate(self, tier, stats):
      raise RuntimeError("policy failure")

  manager = jp.CacheManager(_spec(), tiers=[jp.Tier("ram", _block_bytes(1))], policy=Raising())
  _cache(manager, SYSTEM + [9], priority=3)
  _prefill(manager, list(range(200, 209)), priority=2)
  _prefill(manager, list(range(220, 229)), priority=2)  # no page free, 2 cached left
  before = _state(manager)
  with pytest.raises(RuntimeError, match="policy failure"):
    manager.gc()  # two blocks to RAM with room for one: the policy is asked, and raises
  assert _state(manager) == before
  assert _device_blocks(manager) >= _blocks(SYSTEM)
  assert manager.admit(list(range(50, 59)), priority=7) is None  # 3 pages: no room
  after = _state(manager)
  assert after[:5] == before[:5] and manager.retention.seq_priority == {0: 2, 1: 2}
  assert after[5] == dict(before[5], allocation_failures=1)  # counted, nothing else
