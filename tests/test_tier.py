"""The tiered host store: policies, capacity accounting, pinned entries, errors."""

import copy
import dataclasses
from collections.abc import Hashable

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import jaxpaged as jp
from jaxpaged import LFUPolicy, LRUPolicy, Tier, TieredStore, TierError
from jaxpaged._src.tier import TierSnapshot


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


# --------------------------------------------------------------------------- all or nothing

class _Boom(Exception):
  """What a faulty policy or callback raises: tests check the very object comes out."""


@dataclasses.dataclass(frozen=True)
class _Reckless(LRUPolicy):
  """Evicts the least recently used entry, pinned or not."""

  def eviction_candidate(self, tier, stats):
    return min(stats, key=lambda k: stats[k].last_access) if stats else None


class _Faulty:
  """Wraps a policy: call n does what ``script[n % len(script)]`` says, "ok" asks the policy.
  Records the questions it was asked."""

  def __init__(self, inner, script):
    self.inner, self.script, self.raised, self.questions = inner, list(script) or ["ok"], [], []

  @property
  def calls(self):
    return len(self.questions)

  def _next(self, *question):
    action = self.script[self.calls % len(self.script)]
    self.questions.append(question)
    if action == "raise":
      self.raised.append(_Boom(f"policy call {self.calls}"))
      raise self.raised[-1]
    return action

  def should_promote(self, key, stats):
    self._next("promote", key, stats)
    return self.inner.should_promote(key, stats)

  def eviction_candidate(self, tier, stats):
    action = self._next("evict", tier, list(stats.items()))
    if action == "missing":
      return "no such key"
    if action == "unhashable":
      return ["not", "hashable"]
    if action == "other":  # a key of another tier, or of none
      return next(k for k in range(7) if k not in stats)
    if action == "none":
      return None
    return self.inner.eviction_candidate(tier, stats)


class _Model:
  """Oracle on plain lists and dicts: the documented algorithm as it was first written, moving
  entries while it still asks the policy, made all or nothing by copying its whole state first.
  A policy answer that is not a key of the stats it was given is an error."""

  def __init__(self, capacities, policy):
    self.caps, self.policy = list(capacities), policy
    self.entries = {}  # key -> [value, size, tier, pinned, frequency, last_access]
    self.recency = []  # least recent first
    self.used = [0] * len(self.caps)
    self.clock = self.evictions = self.pinned_evictions = self.demotions = 0
    self.evicted = []  # (key, value, pinned), in order

  def _stats(self, key):
    value, size, _, pinned, frequency, last = self.entries[key]
    del value
    rank = len(self.recency) - 1 - self.recency.index(key)
    return jp.AccessStats(frequency, rank, last, size, pinned)

  def _touch(self, key):
    self.clock += 1
    if key in self.recency:
      self.recency.remove(key)
    self.recency.append(key)
    self.entries[key][5] = self.clock

  def put(self, key, value, size, *, pinned):
    if all(size > c for c in self.caps):
      raise TierError("larger than every tier")
    saved = copy.deepcopy({k: v for k, v in vars(self).items() if k not in ("caps", "policy")})
    try:
      if key in self.entries:
        old = self.entries.pop(key)
        self.used[old[2]] -= old[1]
        self.recency.remove(key)
      for tier, cap in enumerate(self.caps):
        if size <= cap and self._make_room(tier, size):
          self.entries[key] = [value, size, tier, pinned, 1, 0]
          self.used[tier] += size
          self._touch(key)
          return
      raise TierError("no tier can make room")
    except BaseException:
      vars(self).update(saved)
      raise

  def _make_room(self, tier, size):
    need = size - (self.caps[tier] - self.used[tier])
    candidates = [k for k, e in self.entries.items() if e[2] == tier]
    plan, freed = [], 0
    while freed < need:
      stats = {k: self._stats(k) for k in candidates}
      key = self.policy.eviction_candidate(tier, stats) if stats else None
      if key is None:
        return False
      if not isinstance(key, Hashable) or key not in candidates:
        raise TierError("not one of the keys of stats")
      candidates.remove(key)
      plan.append(key)
      freed += self.entries[key][1]
    for key in plan:
      self._move_down(key, tier)
    return True

  def _move_down(self, key, tier):
    entry = self.entries[key]
    self.used[tier] -= entry[1]
    for lower in range(tier + 1, len(self.caps)):
      if entry[1] <= self.caps[lower] and self._make_room(lower, entry[1]):
        entry[2] = lower
        self.used[lower] += entry[1]
        self.demotions += 1
        return
    del self.entries[key]
    self.recency.remove(key)
    self.evictions += 1
    self.pinned_evictions += entry[3]
    self.evicted.append((key, entry[0], entry[3]))

  def get(self, key):
    if key not in self.entries:
      return None
    self.entries[key][4] += 1
    self._touch(key)
    return self.entries[key][0]

  def peek(self, key):
    return self.entries[key][0] if key in self.entries else None

  def pop(self, key):
    if key not in self.entries:
      raise TierError("not in the store")
    value, size, tier, *_ = self.entries.pop(key)
    self.recency.remove(key)
    self.used[tier] -= size
    return value

  def should_promote(self, key):
    if key not in self.entries:
      raise TierError("not in the store")
    return self.policy.should_promote(key, self._stats(key))

  def observe(self):
    return dict(
        stats=dict(tiers=[dict(name=f"t{i}", capacity=c, used=self.used[i],
                               entries=sum(e[2] == i for e in self.entries.values()))
                          for i, c in enumerate(self.caps)],
                   entries=len(self.entries), evictions=self.evictions,
                   pinned_evictions=self.pinned_evictions, demotions=self.demotions),
        used=list(self.used),
        entries=[(k, e[2], self._stats(k), e[0]) for k, e in self.entries.items()],
        clock=self.clock)


def _observe(store):
  """Everything a user or a policy sees of the store, in order, plus each entry's tier and the
  clock (internal: the next access's stamp)."""
  return dict(stats=store.stats(), used=[store.used(t) for t in range(len(store.tiers))],
              entries=[(k, store._entries[k].tier, store.access_stats(k), store.peek(k))
                       for k in store.keys()],
              clock=store._clock)


def _check_bytes(store):
  for t, spec in enumerate(store.tiers):
    held = sum(e.size for e in store._entries.values() if e.tier == t)
    assert store.used(t) == held <= spec.capacity


def _outcome(fn):
  try:
    return "ok", fn()
  except Exception as exc:  # pylint: disable=broad-exception-caught
    return "raised", exc


def _apply(target, op, key, size, pinned, value):
  if op == "put":
    return target.put(key, value, size, pinned=pinned)
  return getattr(target, op)(key)


_OPS = st.lists(st.tuples(st.sampled_from(["put"] * 4 + ["get", "peek", "pop", "should_promote"]),
                          st.integers(0, 5), st.integers(0, 30), st.booleans()),
                min_size=5, max_size=50)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=3), _OPS,
       st.lists(st.sampled_from(["ok"] * 4 + ["raise", "raise", "missing", "unhashable", "other",
                                              "none"]), max_size=12),
       st.lists(st.booleans(), max_size=6),
       st.sampled_from([LRUPolicy(), LFUPolicy(), _Reckless()]))
def test_a_raising_or_lying_policy_or_callback_leaves_the_store_exactly_as_before(
    capacities, ops, script, evict_faults, inner):
  reported, callback_raised = [], []

  def on_evict(key, value, pinned):
    reported.append((key, value, pinned))
    if evict_faults and evict_faults[len(reported) % len(evict_faults)]:
      callback_raised.append(_Boom(f"on_evict {key!r}"))
      raise callback_raised[-1]

  policy = _Faulty(inner, script)
  store = TieredStore([Tier(f"t{i}", c) for i, c in enumerate(capacities)], policy, on_evict)
  model = _Model(capacities, _Faulty(inner, script))
  for step, (op, key, size, pinned) in enumerate(ops):
    before = _observe(store)
    reported.clear(), callback_raised.clear(), policy.raised.clear()
    model.evicted = []
    value = (key, step)
    got = _outcome(lambda: _apply(store, op, key, size, pinned, value))
    want = _outcome(lambda: _apply(model, op, key, size, pinned, value))
    assert policy.questions == model.policy.questions  # it saw the same views, in order
    event(f"{op}: {'on_evict raised' if callback_raised else got[0]} {type(got[1]).__name__} "
          f"{str(got[1]).split('(')[0].split()[0] if isinstance(got[1], TierError) else ''}")
    if want[0] == "raised":  # the operation failed: nothing changed, nothing was reported
      assert got[0] == "raised" and type(got[1]) is type(want[1]), (got, want)
      if isinstance(want[1], _Boom):
        assert got[1] is policy.raised[-1]  # the policy's own exception, unchanged
      assert _observe(store) == before and reported == []
    elif callback_raised:  # done, then the first callback exception
      assert got == ("raised", callback_raised[0])
    else:
      assert got == want
    assert reported == model.evicted  # every evicted entry reported, in order, exactly once
    assert _observe(store) == model.observe()
    _check_bytes(store)


@pytest.mark.parametrize("fault", ["raise", "missing", "unhashable", "other"])
def test_a_policy_failing_in_the_middle_of_a_cascade_changes_nothing(fault):
  # t0 holds a, b; putting c moves a down to t1, which must first push x out of t1.
  calls = []

  @dataclasses.dataclass(frozen=True)
  class FailsOnTier1(LRUPolicy):
    def eviction_candidate(self, tier, stats):
      calls.append(tier)
      if tier == 1:
        return _Faulty(LRUPolicy(), [fault]).eviction_candidate(tier, stats)
      return super().eviction_candidate(tier, stats)

  store, evicted = _store(20, 10, policy=FailsOnTier1())
  store.put("x", "X", 10)
  store.put("a", "A", 10)  # x goes down to t1
  store.put("b", "B", 10)
  store.get("x")
  before = _observe(store)
  with pytest.raises((_Boom, TierError)) as info:
    store.put("c", "C", 10)
  assert calls[-2:] == [0, 1]  # it failed after planning t0, while planning t1
  if fault != "raise":
    assert info.type is TierError and "FailsOnTier1.eviction_candidate(tier=1, stats) returned" \
        in str(info.value) and "return one of them, or None" in str(info.value)
  assert _observe(store) == before and evicted == [] and "c" not in store
  _check_bytes(store)


def test_the_policy_sees_each_step_of_a_cascade_as_if_it_were_already_done():
  policy = _Faulty(LRUPolicy(), ["ok"])
  store = TieredStore([Tier("t0", 10), Tier("t1", 20)], policy)
  store.put("P", "only copy", 15, pinned=True)  # too big for t0
  for key in "ABX":
    store.put(key, key, 5)  # A goes down to t1 for X: t0 holds B, X; t1 holds P, A (full)
  del policy.questions[:]
  store.put("Y", "Y", 10)  # B and X go down; each needs an eviction from t1

  def rank(key, stats):
    return dict(stats)[key].recency_rank

  asked = [(q[1], [k for k, _ in q[2]]) for q in policy.questions]
  assert asked == [(0, ["B", "X"]), (0, ["X"]), (1, ["P", "A"]), (1, ["P", "B"])]
  # After A left the store, P (the least recent) is second from X, the most recent left.
  assert rank("P", policy.questions[2][2]) == 3 and rank("P", policy.questions[3][2]) == 2
  assert rank("B", policy.questions[3][2]) == 1
  assert store.stats()["evictions"] == 2 and sorted(store.keys()) == ["P", "X", "Y"]
  assert [store._entries[k].tier for k in ("P", "X", "Y")] == [1, 1, 0]


def test_should_promote_raising_propagates_and_changes_nothing():
  store = TieredStore([Tier("ram", 100)], _Faulty(LRUPolicy(), ["raise"]))
  store.put("a", 1, 10)  # no room to make: the policy is not asked
  before = _observe(store)
  with pytest.raises(_Boom) as info:
    store.should_promote("a")
  assert info.value is store.policy.raised[-1] and _observe(store) == before


def test_every_eviction_is_reported_after_the_put_even_if_on_evict_raises():
  seen, raised = [], []

  def on_evict(key, value, pinned):
    # The store is complete when it is told: the new entry is in, the evicted one is gone.
    seen.append((key, value, pinned, "new" in store, key in store, store.used(0)))
    raised.append(_Boom(key))
    raise raised[-1]

  store = TieredStore([Tier("ram", 30)], on_evict=on_evict)
  for key in "abc":
    store.put(key, key.upper(), 10)
  with pytest.raises(_Boom) as info:
    store.put("new", "N", 25)
  assert info.value is raised[0]  # the first one, unchanged
  assert seen == [("a", "A", False, True, False, 25), ("b", "B", False, True, False, 25),
                  ("c", "C", False, True, False, 25)]
  assert any("on_evict also raised" in note and "'c'" in note for note in info.value.__notes__)
  assert store.keys() == ["new"] and store.peek("new") == "N" and store.used(0) == 25
  assert store.stats()["evictions"] == 3
  store.put("more", "M", 5)  # and the store goes on working
  assert sorted(store.keys()) == ["more", "new"] and store.used(0) == 30


def test_a_failed_replace_keeps_the_old_entry_where_and_as_it_was():
  store, _ = _store(30)
  store.put("a", 1, 10)
  store.put("p", "pinned", 15, pinned=True)
  store.put("b", 2, 5)
  store.get("a")
  before = _observe(store)
  with pytest.raises(TierError, match="no tier can make room"):
    store.put("a", 3, 20)
  assert _observe(store) == before  # same order, recency, frequency, clock


# --------------------------------------------------------------------------- snapshots

def _run(store, ops, values):
  for op, key, size, pinned in ops:
    try:
      _apply(store, op, key, size, pinned, values.setdefault((key, size), object()))
    except TierError:
      pass


@given(st.lists(st.integers(0, 60), min_size=1, max_size=3), _OPS, _OPS, _OPS,
       st.sampled_from([LRUPolicy(), LFUPolicy(), _Reckless()]))
def test_restore_brings_back_exactly_what_snapshot_saw(capacities, first, between, after, policy):
  values = {}

  def fresh():
    return _store(*capacities, policy=policy)

  store, evicted = fresh()
  _run(store, first, values)
  snap = store.snapshot()
  before = _observe(store)
  held = {k: store.peek(k) for k in store.keys()}
  _run(store, between, values)
  store.restore(snap)
  assert _observe(store) == before
  assert all(store.peek(k) is v for k, v in held.items())  # values by reference
  _run(store, between, values)  # the snapshot did not change with the store: restore it again
  store.restore(snap)
  assert _observe(store) == before
  # From here on it behaves as a store that never saw `between`.
  oracle, oracle_evicted = fresh()
  _run(oracle, first, values)
  evicted.clear(), oracle_evicted.clear()
  _run(store, after, values)
  _run(oracle, after, values)
  assert _observe(store) == _observe(oracle) and evicted == oracle_evicted
  _check_bytes(store)


def test_a_snapshot_restores_only_its_own_store():
  store, _ = _store(30)
  other, _ = _store(30)
  store.put("a", 1, 10)
  snap = store.snapshot()
  assert isinstance(snap, TierSnapshot) and "1 entries" in repr(snap)
  other.put("b", 2, 10)
  before = _observe(other)
  with pytest.raises(TierError, match="snapshot was taken of another TieredStore"):
    other.restore(snap)
  with pytest.raises(TierError, match=r"snapshot must be a value returned by this store's "
                     r"snapshot\(\), got \{\} \(dict\); take one"):
    other.restore({})
  assert _observe(other) == before


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("make, match", [
    (lambda: Tier("", 10), r"Tier: name must be a non-empty str, got '' \(str\); name each"),
    (lambda: Tier(3, 10), r"name must be a non-empty str, got 3 \(int\)"),
    (lambda: Tier("t", True), r"Tier 't': capacity must be a byte count, an int >= 0, got True "
     r"\(bool\); give the tier's size in bytes"),
    (lambda: Tier("t", 1.5), r"capacity must be a byte count, an int >= 0, got 1.5 \(float\)"),
    (lambda: Tier("t", np.int64(-1)), r"capacity must be a byte count, an int >= 0, got "),
    (lambda: TieredStore(Tier("t", 1)), r"tiers must be a sequence of Tier.*got one Tier "
     r"\('t'\); wrap it in a list"),
    (lambda: TieredStore(5), r"tiers must be a sequence of Tier.*got 5 \(int\)"),
    (lambda: TieredStore([Tier("t", 1), "u"]), r"only Tiers.*got 'u' \(str\)"),
    (lambda: TieredStore([Tier("a", 1), Tier("b", 2), Tier("a", 3)]),
     r"tier names must be unique, got \['a', 'b', 'a'\] \(\['a'\] more than once\); give each"),
    (lambda: TieredStore([Tier("t", 1)], object()),
     r"policy must be a TierPolicy.*got <object object at .*> \(object\), without "
     r"should_promote or eviction_candidate; pass LRUPolicy\(\)"),
    (lambda: TieredStore([Tier("t", 1)], LRUPolicy),
     r"policy must be a TierPolicy.*got the class LRUPolicy, not an instance"),
    (lambda: TieredStore([Tier("t", 1)], on_evict="log"),
     r"on_evict must be callable as on_evict\(key, value, pinned\) or None, got 'log' \(str\)"),
])
def test_bad_arguments_are_refused_with_what_was_expected_given_and_the_fix(make, match):
  with pytest.raises(TierError, match=match):
    make()


def test_numpy_integers_are_byte_counts_and_bools_are_not():
  tier = Tier("t", np.int64(100))
  assert tier.capacity == 100 and type(tier.capacity) is int
  store = TieredStore([tier])
  store.put("a", 1, np.int32(10))
  assert store.used(0) == 10 and type(store.used(0)) is int
  assert type(store.access_stats("a").size) is int
  store.put("p", 3, 5, pinned=np.bool_(True))
  assert store.access_stats("p").pinned is True
  before = _observe(store)
  for size in (True, -1, 2.0, "10", None, np.bool_(True)):
    with pytest.raises(TierError, match=r"TieredStore.put: size must be a byte count, an int >= 0,"
                       r" got .* \(\w+\); pass the value's size in bytes"):
      store.put("b", 2, size)
  assert _observe(store) == before


@pytest.mark.parametrize("method", ["put", "get", "peek", "pop", "access_stats"])
def test_an_unhashable_key_is_a_tier_error_not_a_type_error(method):
  store, _ = _store(30)
  store.put("a", 1, 10)
  before = _observe(store)
  args = (["k"], 2, 10) if method == "put" else (["k"],)
  with pytest.raises(TierError, match=rf"TieredStore.{method}: key must be hashable .*got "
                     r"\['k'\] \(list\); use a hashable key"):
    getattr(store, method)(*args)
  assert _observe(store) == before
