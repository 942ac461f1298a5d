"""KV events: replaying a manager's event stream gives exactly the blocks each tier (device, RAM,
disk) holds, after long random runs; the stream's order and commit rules; subscribers that raise
or leave; and the prefix index the data-parallel routers read."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged._src.disk import DiskStore

PS = 2


def _spec(**kw):
  return jp.CacheSpec(**{**dict(num_layers=1, num_kv_heads=1, head_dim=2, page_size=PS,
                                num_pages=8, max_seqs=3, max_pages_per_seq=4,
                                prefix_caching=True), **kw})


def _write(manager, slots, count):
  """K/V for the first ``count`` slots (every layer): written blocks are cached on release."""
  if count <= 0:
    return
  slots = np.array(slots)
  slots[count:] = -1
  kv = np.ones((len(slots), 1, 2), np.float32)
  for layer in range(manager.spec.num_layers):
    manager.cache = jp.write_kv(manager.cache, layer, kv, -kv, slots)


def _actual(manager):
  """What each tier holds now: registered device pages, RAM block entries, disk index."""
  prefix = manager.cache.prefix
  cached, hashes = jax.device_get((prefix.page_cached, prefix.page_hash))
  device = {jp.block_key(hashes[p]) for p in np.flatnonzero(cached)}
  ram = {k[1] for k in manager.store.keys() if k[0] == "block"}
  disk = set(manager.disk.keys()) if manager.disk is not None else set()
  return {"device": device, "ram": ram, "disk": disk}


def _block_bytes(spec, depth):
  kv = 2 * spec.num_layers * spec.num_kv_heads * spec.page_size * spec.head_dim * 4
  return kv + (depth + 1) * spec.page_size * 4


def _manager(tmp_path, disk_blocks=6, ram_blocks=4, **kw):
  spec = _spec(**kw)
  disk = DiskStore(tmp_path, disk_blocks * DiskStore(tmp_path, 1 << 20, spec=spec).block_bytes
                   + 200, spec=spec, fsync=False)
  tiers = [jp.Tier("ram", ram_blocks * _block_bytes(spec, 2))]
  return jp.CacheManager(spec, tiers=tiers, disk=disk)


class _Run:
  """Seeded random admit/release/swap/reserve/gc on one manager, prompts drawn from a few shared
  prefixes (so blocks are hit, demoted to RAM, evicted to disk and promoted). Every prompt here
  (in every test of this module) has 4 tokens: few programs to compile."""

  def __init__(self, manager, seed):
    self.m, self.rng = manager, random.Random(seed)
    self.systems = [[self.rng.randrange(1, 50) for _ in range(4)] for _ in range(4)]
    self.active: set[int] = set()
    self.swapped: set[int] = set()

  def prompt(self):  # two full blocks (the first can be a hit), often shared
    system = self.rng.choice(self.systems)[:self.rng.choice([2, 4])]
    return system + [self.rng.randrange(1, 50) for _ in range(4 - len(system))]

  def step(self):
    m, rng = self.m, self.rng
    op = rng.choice(["admit"] * 5 + ["release"] * 3 + ["swap_out", "swap_in", "reserve", "gc"])
    try:
      if op == "admit":
        a = m.admit(self.prompt())
        if a is not None:
          _write(m, a.slots, a.num_new)
          self.active.add(a.seq_id)
      elif op == "release" and (self.active or self.swapped):
        seq = rng.choice(sorted(self.active | self.swapped))
        m.release([seq])
        self.active.discard(seq)
        self.swapped.discard(seq)
      elif op == "swap_out" and self.active:
        seq = rng.choice(sorted(self.active))
        m.swap_out([seq])
        self._preempted([seq])
      elif op == "swap_in" and self.swapped:
        seq = rng.choice(sorted(self.swapped))
        if seq in m.host.dropped:
          m.release([seq])
          self.swapped.discard(seq)
        elif m.swap_in([seq])[0]:
          self.swapped.discard(seq)
          self.active.add(seq)
      elif op == "reserve" and self.active:
        _, pre = m.reserve([rng.choice(sorted(self.active))], [0], preempt=True)
        self._preempted(pre)
      elif op == "gc":
        m.gc()
    except jp.TierError:
      pass  # (rolled back: no events)

  def _preempted(self, seqs):
    for s in seqs:
      self.active.discard(s)
      self.swapped.add(s)


def test_replaying_the_events_gives_every_tier_exactly_after_a_long_random_run(tmp_path):
  manager = _manager(tmp_path)
  log = jp.KVEventLog()
  manager.subscribe(log)
  run = _Run(manager, seed=0)
  seen = {tier: set() for tier in jp.replay_events([])}
  late = None
  for i in range(100):
    run.step()
    actual = _actual(manager)
    assert jp.replay_events(log.events, strict=True) == actual, f"after step {i}"
    for tier, keys in actual.items():
      seen[tier] |= keys
    if i == 60:  # a late subscriber first hears what is cached: its replay is exact too
      late = jp.KVEventLog()
      manager.subscribe(late)
    if late is not None:
      assert jp.replay_events(late.events, strict=True) == actual, f"after step {i}"
  # The run exercised every tier, and blocks moved between them.
  assert all(len(keys) >= 3 for keys in seen.values()), {t: len(k) for t, k in seen.items()}
  kinds = {(type(e).__name__, e.tier) for e in log.events}
  assert {("BlockRemoved", t) for t in ("device", "ram", "disk")} <= kinds
  stats = manager.stats()
  assert stats["demoted_blocks"] and stats["promoted_blocks"] and stats["disk_hit_blocks"]
  assert stats["host_evictions"] and stats["disk"]["evictions"]


def _prefilled(manager, prompt, **kw):
  a = manager.admit(prompt, **kw)
  _write(manager, a.slots, a.num_new)
  return a


def test_stored_events_carry_the_chain_and_come_before_the_removals_of_a_move(tmp_path):
  manager = _manager(tmp_path)
  log = jp.KVEventLog()
  manager.subscribe(log)
  prompt = [1, 2, 3, 4]  # two full blocks
  a = _prefilled(manager, prompt)
  stored = log.drain()
  hashes = [jp.block_key(h) for h in jp.block_hashes(prompt, page_size=PS)]
  assert stored == [jp.BlockStored("device", hashes[0], None, (1, 2), 0),
                    jp.BlockStored("device", hashes[1], hashes[0], (3, 4), 0)]
  manager.release([a.seq_id])  # still cached on device; written through to disk
  assert [(type(e).__name__, e.tier) for e in log.events] == [("BlockStored", "disk")] * 2
  assert [e.parent_hash for e in log.drain()] == [None, hashes[0]]
  manager.gc()  # every cached block to RAM: stored there before removed from the device
  moved = log.drain()
  assert [(type(e).__name__, e.tier) for e in moved] == (
      [("BlockStored", "ram")] * 2 + [("BlockRemoved", "device")] * 2)
  assert [(e.block_hash, e.parent_hash, e.token_ids) for e in moved[:2]] == [
      (e.block_hash, e.parent_hash, e.token_ids) for e in stored]
  again = manager.admit(prompt)  # the first block promoted from RAM, the second recomputed
  assert again.host_hit_tokens == 2
  back = log.drain()
  assert back == [jp.BlockStored("device", hashes[0], None, (1, 2), 0),
                  jp.BlockStored("device", hashes[1], hashes[0], (3, 4), 0),
                  jp.BlockRemoved("ram", hashes[0])]


def test_a_salt_is_reported_and_separates_blocks(tmp_path):
  manager = _manager(tmp_path)
  log = jp.KVEventLog()
  manager.subscribe(log)
  manager.admit([1, 2, 3, 4], salt=7)
  first = log.drain()[0]
  assert first.salt == 7
  assert first.block_hash == jp.block_key(jp.block_hashes([1, 2], page_size=PS, salt=7)[0])


def test_nothing_changes_no_events(tmp_path):
  manager = _manager(tmp_path)
  a = _prefilled(manager, [1, 2, 3, 4])
  log = jp.KVEventLog()
  manager.subscribe(log, initial=False)
  manager.publish_events()
  manager.cached_prefix_tokens([1, 2, 3, 4])
  manager.pages_needed([a.seq_id], [1])
  manager.stats()
  manager.reserve([a.seq_id], [0])  # fits: nothing moves
  manager.gc()  # nothing to demote: a new cache, the same blocks
  manager.publish_events()
  assert log.events == []


def test_a_failed_operation_reports_nothing():
  manager = jp.CacheManager(_spec(), tiers=[jp.Tier("ram", 64)])  # too small for a sequence
  a = _prefilled(manager, [1, 2, 3, 4])
  log = jp.KVEventLog()
  manager.subscribe(log, initial=False)
  with pytest.raises(jp.TierError):
    manager.swap_out([a.seq_id])
  manager.publish_events()
  assert log.events == [] and manager.active == [a.seq_id]


def test_blocks_registered_by_the_callers_own_steps_are_reported_at_the_next_operation(tmp_path):
  manager = _manager(tmp_path)
  log = jp.KVEventLog()
  manager.subscribe(log)
  a = manager.admit([1, 2, 3, 4], max_prompt_tokens=1, num_slots=4)  # token 1 only
  assert log.events == []
  manager.cache, _, _ = jp.extend(manager.cache, jnp.array([a.seq_id]), jnp.array([3]),
                                  num_slots=4, tokens=jnp.array([2, 3, 4, 0]))
  assert log.events == []
  manager.publish_events()
  assert [e.token_ids for e in log.events] == [(1, 2), (3, 4)]


def test_a_subscriber_that_raises_leaves_the_manager_consistent_and_the_others_served(tmp_path):
  manager = _manager(tmp_path)
  good = jp.KVEventLog()
  calls = []

  def bad(event):
    calls.append(event)
    raise ValueError("subscriber failed")

  manager.subscribe(good)
  unsubscribe_bad = manager.subscribe(bad)
  with pytest.raises(ValueError, match="subscriber failed"):
    manager.admit([1, 2, 3, 4])
  # The admission completed; every event reached both subscribers.
  assert manager.active == [0] and manager.stats()["allocations"] == 1
  assert len(calls) == len(good.events) == 2
  assert jp.replay_events(good.events) == _actual(manager)
  assert manager.pressure.name == "LOW"  # (the pressure update ran)
  with pytest.raises(ValueError, match="subscriber failed"):
    manager.release([0])  # nothing written: the blocks are dropped
  assert len(calls) == 4 and manager.active == []
  assert jp.replay_events(good.events, strict=True) == _actual(manager)
  # A subscriber that raises on the blocks cached when it subscribes is not subscribed.
  unsubscribe_bad()
  _prefilled(manager, [1, 2, 3, 4])
  late = []

  def bad_late(event):
    late.append(event)
    raise KeyError("late")

  with pytest.raises(KeyError, match="late"):
    manager.subscribe(bad_late)
  assert len(late) == 2
  manager.admit([5, 6, 7, 8])
  assert len(late) == 2 and len(calls) == 4
  assert jp.replay_events(good.events, strict=True) == _actual(manager)


def test_unsubscribe_stops_the_events_and_the_reads(tmp_path):
  manager = _manager(tmp_path)
  log = jp.KVEventLog()
  unsubscribe = manager.subscribe(log)
  manager.admit([1, 2, 3, 4])
  assert len(log.events) == 2
  unsubscribe()
  unsubscribe()  # idempotent
  manager.admit([5, 6, 7, 8])
  assert len(log.events) == 2
  assert manager.disk.on_event is None  # the disk hook is gone too
  again = jp.KVEventLog()
  manager.subscribe(again)
  assert jp.replay_events(again.events, strict=True) == _actual(manager)
  assert len(again.events) == 4


def test_clearing_the_disk_is_one_event(tmp_path):
  manager = _manager(tmp_path)
  manager.release([_prefilled(manager, [1, 2, 3, 4]).seq_id])  # written through to disk
  log = jp.KVEventLog()
  manager.subscribe(log)
  assert len(jp.replay_events(log.drain())["disk"]) == 2
  manager.disk.clear()
  manager.publish_events()
  assert log.events == [jp.AllBlocksCleared("disk")]


def test_a_disk_that_already_holds_blocks_is_reported_on_subscribe(tmp_path):
  first = _manager(tmp_path)
  first.release([_prefilled(first, [1, 2, 3, 4]).seq_id])
  second = _manager(tmp_path)  # a restart: the files are there
  log = jp.KVEventLog()
  second.subscribe(log)
  hashes = [jp.block_key(h) for h in jp.block_hashes([1, 2, 3, 4], page_size=PS)]
  assert log.events == [jp.BlockStored("disk", hashes[0], None, (1, 2), 0),
                        jp.BlockStored("disk", hashes[1], hashes[0], (3, 4), 0)]


def test_replay_strict_refuses_a_stream_out_of_order():
  with pytest.raises(jp.JaxPagedError, match="does not hold"):
    jp.replay_events([jp.BlockRemoved("ram", 1)], strict=True)
  with pytest.raises(jp.JaxPagedError, match="already holds"):
    jp.replay_events([jp.BlockStored("ram", 1, None, (), 0)] * 2, strict=True)
  with pytest.raises(jp.JaxPagedError, match="BlockStored"):
    jp.replay_events(["stored"])
  with pytest.raises(jp.JaxPagedError, match="callable"):
    jp.CacheManager(_spec()).subscribe("log")


# ----------------------------------------------------------------------------- routing

def test_the_prefix_index_agrees_with_the_managers_and_routing_picks_the_holder(tmp_path):
  """(`MultiDeviceCacheManager.admit` and the `Server` route with this index: their tests run it
  on two devices; here two managers on one device keep the compiles shared.)"""
  managers = [jp.CacheManager(_spec()), _manager(tmp_path)]
  index = jp.PrefixIndex.follow(managers)
  router = jp.PrefixAwareRouter(balance_threshold=100)

  def route(prompt, loads=(1, 0)):  # shard 1 less loaded
    shards = [jp.ShardLoad(load, c) for load, c in zip(loads, index.cached_tokens(prompt))]
    return router.choose(prompt, shards)

  system = [9, 8]
  seq = _prefilled(managers[0], system + [1, 1]).seq_id
  prompts = [system + [2, 2], system + [1, 1], [1, 2, 3, 4], [9, 7, 1, 1]]
  for p in prompts:  # the index (fed by events) says what the managers say
    assert index.cached_tokens(p) == [m.cached_prefix_tokens(p) for m in managers]
  assert index.cached_tokens(system + [2, 2]) == [2, 0]
  assert route(system + [2, 2]) == 0 and route([1, 2, 3, 4]) == 1
  # Demoted to RAM, the prefix is still that shard's (as the managers count it).
  managers[0].release([seq])
  managers[0].gc()
  assert index.blocks(0)["ram"] and not index.blocks(0)["device"]
  for p in prompts:
    assert index.cached_tokens(p) == [m.cached_prefix_tokens(p) for m in managers]
  assert route(system + [2, 2]) == 0
  # On disk only (shard 1 wrote it through on release, then dropped it from device and RAM).
  managers[1].release([_prefilled(managers[1], [5, 5, 5, 5]).seq_id])
  managers[1].gc()
  for block in list(managers[1].store.keys()):
    managers[1].store.pop(block)
  managers[1].publish_events()
  assert index.blocks(1)["disk"] and not index.blocks(1)["ram"] | index.blocks(1)["device"]
  assert index.cached_tokens([5, 5, 5, 5]) == [0, 2] == [
      m.cached_prefix_tokens([5, 5, 5, 5]) for m in managers]
  assert route([5, 5, 5, 5], loads=(0, 1)) == 1
  index.close()
  managers[0].admit([7, 7, 7, 7])
  assert index.cached_tokens([7, 7, 7, 7]) == [0, 0]  # closed: no longer fed


def test_a_fed_index_follows_a_remote_stream():
  index = jp.PrefixIndex(3, page_size=PS)
  log = jp.KVEventLog()
  manager = jp.CacheManager(_spec())
  manager.subscribe(log)
  manager.admit([4, 4, 4, 4])
  for event in log.drain():  # (as if it came over the network from shard 2)
    index.apply(2, event)
  assert index.cached_tokens([4, 4, 4, 4]) == [0, 0, 2]
  assert index.cached_tokens([4, 4, 4, 4], salt=1) == [0, 0, 0]
  with pytest.raises(jp.JaxPagedError, match="managers"):
    jp.PrefixIndex.follow([])
