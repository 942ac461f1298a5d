"""The tiered host store: policies, capacity accounting, pinned entries, errors."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxpaged as jp
from jaxpaged import LFUPolicy, LRUPolicy, Tier, TieredStore, TierError


def _store(*capacities, policy=None):
  evicted = []
  store = TieredStore([Tier(f"t{i}", c) for i, c in enumerate(capacities)], policy,
                      on_evict=lambda key, value, pinned: evicted.append((key, pinned)))
  return store, evicted


def test_lru_evicts_the_least_recently_used_entry_first():
  store, evicted = _store(30)
  for key in "abc":
    store.put(key, key.upper(), 10)
  assert store.get("a") == "A"  # b is now the least recently used
  store.put("d", "D", 10)
  store.put("e", "E", 10)
  assert evicted == [("b", False), ("c", False)]
  assert sorted(store.keys()) == ["a", "d", "e"]
  assert store.stats()["evictions"] == 2
  assert store.access_stats("e").recency_rank == 0
  assert store.access_stats("a").recency_rank == 2


def test_lfu_keeps_frequently_used_entries_over_recent_ones():
  store, evicted = _store(30, policy=LFUPolicy())
  for key in "abc":
    store.put(key, key, 10)
  for _ in range(3):
    store.get("a")
  store.get("b")
  store.put("d", "d", 10)  # c: used once, least
  store.put("e", "e", 10)  # d: used once, older than e... but e is new; d goes
  assert [key for key, _ in evicted] == ["c", "d"]


def test_frequency_threshold_decides_promotion():
  store, _ = _store(100, policy=LRUPolicy(promote_threshold=3))
  store.put("a", 1, 10)  # the put counts as the first access
  assert not store.should_promote("a")
  store.get("a")
  assert not store.should_promote("a")
  store.get("a")
  assert store.should_promote("a") and store.access_stats("a").frequency == 3
  assert store.peek("a") == 1 and store.access_stats("a").frequency == 3  # peek is no access


def test_entries_overflow_down_the_tiers_then_out():
  store, evicted = _store(20, 20)
  for key in "abcde":
    store.put(key, key, 10)
  stats = store.stats()
  assert [t["used"] for t in stats["tiers"]] == [20, 20]
  assert [t["entries"] for t in stats["tiers"]] == [2, 2]
  assert stats["demotions"] == 3 and stats["evictions"] == 1
  assert evicted == [("a", False)]  # the oldest left through the slowest tier


def test_pinned_entries_are_never_dropped_by_the_builtin_policies():
  store, evicted = _store(30)
  store.put("seq", "only copy", 20, pinned=True)
  store.put("blk", "cache", 10)
  assert store.can_put(10) and not store.can_put(11)
  store.put("blk2", "cache", 10)  # evicts blk, not the pinned entry
  assert evicted == [("blk", False)]
  before = store.stats()
  with pytest.raises(TierError, match="swap some in, release them, or add capacity"):
    store.put("seq2", "other", 25, pinned=True)
  assert store.stats() == before and store.peek("blk2") == "cache"


def test_a_policy_may_drop_pinned_entries_but_it_is_reported():

  @dataclasses.dataclass(frozen=True)
  class Reckless(LRUPolicy):
    def eviction_candidate(self, tier, stats):
      return min(stats, key=lambda k: stats[k].last_access)

  store, evicted = _store(30, policy=Reckless())
  store.put("seq", "only copy", 20, pinned=True)
  store.put("other", "x", 20)
  assert evicted == [("seq", True)] and store.stats()["pinned_evictions"] == 1


def test_errors_say_how_to_fix_them():
  store, _ = _store(10, 20)
  with pytest.raises(TierError, match="larger than every tier .largest 20 bytes.; give a tier"):
    store.put("big", 0, 21)
  with pytest.raises(TierError, match="not in the store; put it first"):
    store.pop("missing")
  with pytest.raises(TierError, match="capacity must be a byte count"):
    Tier("t", -1)
  with pytest.raises(TierError, match="at least one"):
    TieredStore([])
  assert issubclass(TierError, jp.JaxPagedError)


def test_replacing_a_key_keeps_one_entry_and_a_failed_replace_keeps_the_old_value():
  store, _ = _store(30)
  store.put("a", 1, 10)
  store.put("a", 2, 15)
  assert len(store) == 1 and store.used(0) == 15 and store.peek("a") == 2
  store.put("p", "pinned", 15, pinned=True)
  with pytest.raises(TierError):
    store.put("a", 3, 20)
  assert store.peek("a") == 2 and store.used(0) == 30


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "put", "get", "pop"]), st.integers(0, 7),
                          st.integers(1, 40), st.booleans()), max_size=60),
       st.sampled_from([LRUPolicy(), LFUPolicy()]))
def test_capacity_is_never_exceeded_and_bytes_add_up(ops, policy):
  store, evicted = _store(50, 70, policy=policy)
  model = {}  # key -> (size, pinned): what must still be there unless evicted
  for op, key, size, pinned in ops:
    if op == "put":
      try:
        store.put(key, size, size, pinned=pinned)
        model[key] = (size, pinned)
      except TierError:
        pass
    elif op == "get":
      store.get(key)
    elif key in store:
      store.pop(key)
      model.pop(key)
    for gone, was_pinned in evicted:
      assert not was_pinned
      model.pop(gone, None)
    evicted.clear()
    stats = store.stats()
    for tier, spec in zip(stats["tiers"], store.tiers):
      assert 0 <= tier["used"] <= spec.capacity
    assert sum(t["used"] for t in stats["tiers"]) == sum(s for s, _ in model.values())
    assert sorted(store.keys()) == sorted(model)  # pinned entries all still there
