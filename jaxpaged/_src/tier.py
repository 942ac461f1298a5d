"""A tiered host store: byte-capacity tiers, pluggable policies, recency and frequency tracking.

Plain host-side Python, no JAX: `jaxpaged.CacheManager` keeps swapped-out sequences and demoted
prefix blocks in one, but it holds any sized values. Tiers are ordered fastest first (say pinned
host RAM, then pageable RAM). A new entry goes into the fastest tier that can hold it; making
room there moves the policy's eviction candidates one tier down, and out of the store from the
last tier, counting every eviction. An entry marked ``pinned`` (a swapped-out sequence: its only
copy) is never evicted unless the policy explicitly allows it, and then the eviction is reported
to ``on_evict`` with the entry.

A `TieredStore.put` is all or nothing: every move and eviction is planned first, on a simulated
view of the store, asking the policy as often as needed (`jaxpaged._src.placement`); only then is
the plan applied, and only once the store is consistent again is ``on_evict`` called. A policy
that raises (or answers with a key it was not offered) leaves the store exactly as it was.
`TieredStore.snapshot` and `TieredStore.restore` roll back a longer sequence of operations.

This module is the store. The policies (`TierPolicy`, `LRUPolicy`, `LFUPolicy`, `AccessStats`)
live in `jaxpaged._src.policy`, `Tier` and `TierError` in `jaxpaged._src.tier_spec`; all are
re-exported here.

>>> store = TieredStore([Tier("ram", capacity=100)])
>>> store.put("a", "A", size=60)
>>> store.put("b", "B", size=60)  # "a" is evicted to make room
>>> "a" in store, store.get("b"), store.stats()["evictions"]
(False, 'B', 1)
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable, NamedTuple

import numpy as np

from jaxpaged._src.placement import Entry, NotOffered, PutPlan
from jaxpaged._src.policy import AccessStats, TierPolicy
# Re-exported, so that `from jaxpaged._src.tier import LFUPolicy` (and the others) keeps working.
from jaxpaged._src.policy import LFUPolicy, LRUPolicy  # pylint: disable=unused-import
from jaxpaged._src.tier_spec import OnEvict, Tier, TierError, byte_count, check_on_evict
from jaxpaged._src.tier_spec import check_policy, check_tiers, type_name


def _unhashable(method: str, key: Any) -> TierError:
  return TierError(f"TieredStore.{method}: key must be hashable (a str, int, tuple, ...), got "
                   f"{key!r} ({type_name(key)}); use a hashable key, e.g. a tuple instead of "
                   "a list.")


class StoreState(NamedTuple):
  """Everything of a `TieredStore` that its operations change (see `TieredStore.snapshot`)."""
  entries: dict[Hashable, Entry]
  frequency: dict[Hashable, int]  # key -> accesses
  last_access: dict[Hashable, int]  # key -> clock at its last access, least recent first
  used: tuple[int, ...]  # bytes per tier
  clock: int
  evictions: int
  pinned_evictions: int
  demotions: int


class TierSnapshot:
  """The whole state of one `TieredStore` at one moment, from `TieredStore.snapshot`: only for
  `TieredStore.restore` of the store that made it. Values are held by reference.

  Attributes:
    store: the store it was taken of.
    state: what `TieredStore.restore` puts back (do not change it).
  """

  __slots__ = ("store", "state")

  def __init__(self, store: TieredStore, state: StoreState):
    self.store = store
    self.state = state

  def __repr__(self) -> str:
    return f"<TierSnapshot of {len(self.state.entries)} entries>"


class TieredStore:
  """Host-side key-value store over byte-capacity tiers (fastest first) with a `TierPolicy`.

  Args:
    tiers: `Tier`s, fastest first, with distinct names.
    policy: the eviction/promotion policy (default `LRUPolicy()`): an object with
      ``should_promote`` and ``eviction_candidate`` methods.
    on_evict: called as ``on_evict(key, value, pinned)`` when an entry leaves the store for lack
      of room (not on `pop`), after the `put` that evicted it is complete, or None.

  >>> store = TieredStore([Tier("pinned", capacity=100), Tier("pageable", capacity=100)])
  >>> store.put("a", "A", size=60)
  >>> store.put("b", "B", size=60)  # "a" moves down to make room
  >>> [t["entries"] for t in store.stats()["tiers"]], store.stats()["demotions"]
  ([1, 1], 1)
  """

  def __init__(self, tiers: Iterable[Tier], policy: TierPolicy | None = None,
               on_evict: OnEvict | None = None):
    self.tiers = check_tiers(tiers)
    self.policy = check_policy(policy)
    self.on_evict = check_on_evict(on_evict)
    self._entries: dict[Hashable, Entry] = {}
    self._frequency: dict[Hashable, int] = {}  # key -> accesses
    self._last_access: dict[Hashable, int] = {}  # key -> clock then, least recently used first
    self._used = [0] * len(self.tiers)
    self._clock = 0
    self.evictions = 0
    self.pinned_evictions = 0
    self.demotions = 0

  def __contains__(self, key: Hashable) -> bool:
    return key in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def keys(self) -> list[Hashable]:
    """The keys held, in the order of their latest `put`."""
    return list(self._entries)

  def used(self, tier: int) -> int:
    """Bytes held by ``tier`` (its index, fastest first)."""
    if isinstance(tier, bool) or not isinstance(tier, int) or not 0 <= tier < len(self.tiers):
      raise TierError(f"TieredStore.used: tier must be an index in [0, {len(self.tiers)}), got "
                      f"{tier!r}.")
    return self._used[tier]

  def _tick(self, key: Hashable) -> None:
    """Records an access of ``key``: it becomes the most recently used."""
    self._clock += 1
    self._last_access.pop(key, None)
    self._last_access[key] = self._clock  # to the end: most recent

  def _entry(self, key: Hashable, method: str) -> Entry:
    try:
      return self._entries[key]
    except KeyError:
      raise TierError(f"key {key!r} is not in the store; put it first (or check `key in "
                      "store`).") from None
    except TypeError:
      raise _unhashable(method, key) from None

  def access_stats(self, key: Hashable) -> AccessStats:
    """The policy's view of ``key``."""
    entry = self._entry(key, "access_stats")
    rank = list(reversed(self._last_access)).index(key)
    return AccessStats(self._frequency[key], rank, self._last_access[key], entry.size,
                       entry.pinned)

  def can_put(self, size: int, *, pinned: bool = False) -> bool:
    """Whether a `put` of this many bytes would succeed without evicting a pinned entry, if the
    policy lets unpinned entries go (it is not asked). ``pinned`` is accepted as `put` takes it,
    and does not change the answer."""
    del pinned
    size = byte_count("TieredStore.can_put", "size", size, "pass the entry's size in bytes.")
    for tier, spec in enumerate(self.tiers):
      if size > spec.capacity:
        continue
      free = spec.capacity - self._used[tier]
      movable = sum(e.size for e in self._entries.values() if e.tier == tier and not e.pinned)
      if size <= free + movable:
        return True
    return False

  def put(self, key: Hashable, value: Any, size: int, *, pinned: bool = False) -> None:
    """Stores ``value`` (``size`` bytes) under ``key``, replacing an older value of that key.

    All or nothing: the moves and evictions that make room are planned first (the policy is
    asked then), and applied only if the entry can be placed. ``on_evict`` is then called for each
    evicted entry, in eviction order, once the store is consistent and holds the new entry.

    Raises:
      TierError: ``key`` is unhashable, ``size`` is not an int >= 0, the entry is larger than
        every tier, no tier can make room without dropping a pinned entry the policy will not
        evict, or the policy named an entry it was not offered. The store is unchanged then.
      Exception: whatever the policy raises, as it is; the store is unchanged then. Whatever
        ``on_evict`` raises (the first exception, once every evicted entry has been reported);
        the put is complete then.
    """
    size, pinned = self._check_put(key, size, pinned)
    plan = PutPlan(key, entries=self._entries, frequency=self._frequency,
                   last_access=self._last_access, used=self._used,
                   capacities=[t.capacity for t in self.tiers],
                   eviction_candidate=self.policy.eviction_candidate)
    try:
      tier = plan.place(size)
    except NotOffered as e:
      raise self._not_offered(e) from None
    if tier is None:
      raise TierError(f"no tier can make room for {size} bytes under {key!r}: the rest is pinned "
                      "(swapped-out sequences); swap some in, release them, or add capacity.")
    # Apply the plan: nothing below calls user code until the store is consistent.
    old = self._entries.pop(key, None)
    if old is not None:
      self._used[old.tier] -= old.size
      del self._frequency[key], self._last_access[key]
    evicted = self._apply(plan.ops)
    self._used[tier] += size
    self._entries[key] = Entry(value, size, tier, pinned)
    self._frequency[key] = 1
    self._tick(key)
    self._report(evicted)

  def _check_put(self, key: Any, size: Any, pinned: Any) -> tuple[int, bool]:
    """`put`'s ``size`` and ``pinned`` as int and bool, if the entry can be put at all."""
    try:
      hash(key)
    except TypeError:
      raise _unhashable("put", key) from None
    size = byte_count("TieredStore.put", "size", size,
                      "pass the value's size in bytes, e.g. value.nbytes.")
    if not isinstance(pinned, (bool, np.bool_)):
      raise TierError(f"TieredStore.put: pinned must be True or False, got {pinned!r}.")
    if all(size > t.capacity for t in self.tiers):
      raise TierError(f"entry {key!r} of {size} bytes is larger than every tier (largest "
                      f"{max(t.capacity for t in self.tiers)} bytes); give a tier more capacity "
                      "or store smaller entries.")
    return size, bool(pinned)

  def _not_offered(self, e: NotOffered) -> TierError:
    return TierError(
        f"{type_name(self.policy)}.eviction_candidate(tier={e.tier}, stats) returned "
        f"{e.key!r}, which is not one of the keys of stats (the {e.offered} remaining entries "
        f"of tier {e.tier}); return one of them, or None if none may go. The put changed "
        "nothing.")

  def _apply(self, ops: list[tuple[Hashable, int | None]]) -> list[tuple[Hashable, Any, bool]]:
    """Makes a `PutPlan`'s moves and evictions; returns the evicted ``(key, value, pinned)``."""
    evicted = []
    for key, lower in ops:
      entry = self._entries[key]
      self._used[entry.tier] -= entry.size
      if lower is None:
        del self._entries[key], self._frequency[key], self._last_access[key]
        self.evictions += 1
        self.pinned_evictions += entry.pinned
        evicted.append((key, entry.value, entry.pinned))
      else:
        self._entries[key] = entry._replace(tier=lower)
        self._used[lower] += entry.size
        self.demotions += 1
    return evicted

  def _report(self, evicted: list[tuple[Hashable, Any, bool]]) -> None:
    """Calls ``on_evict`` for every evicted entry; re-raises the first exception afterwards."""
    if self.on_evict is None:
      return
    first = None
    for key, value, pinned in evicted:
      try:
        self.on_evict(key, value, pinned)
      except Exception as exc:  # pylint: disable=broad-exception-caught
        if first is None:
          first = exc
        else:
          first.add_note(f"on_evict also raised {exc!r} for key {key!r}.")
    if first is not None:
      raise first

  def get(self, key: Hashable, default: Any = None) -> Any:
    """The value of ``key`` (recorded as an access), or ``default``."""
    try:
      entry = self._entries.get(key)
    except TypeError:
      raise _unhashable("get", key) from None
    if entry is None:
      return default
    self._frequency[key] += 1
    self._tick(key)
    return entry.value

  def peek(self, key: Hashable, default: Any = None) -> Any:
    """The value of ``key`` without recording an access."""
    try:
      entry = self._entries.get(key)
    except TypeError:
      raise _unhashable("peek", key) from None
    return default if entry is None else entry.value

  def pop(self, key: Hashable) -> Any:
    """Removes ``key`` and returns its value (not counted as an eviction)."""
    entry = self._entry(key, "pop")
    del self._entries[key], self._frequency[key], self._last_access[key]
    self._used[entry.tier] -= entry.size
    return entry.value

  def should_promote(self, key: Hashable) -> bool:
    """The policy's decision for a hit on ``key`` (changes nothing, even if the policy raises)."""
    answer = self.policy.should_promote(key, self.access_stats(key))
    if not isinstance(answer, (bool, np.bool_)) and answer is not None:
      raise TierError(f"{type_name(self.policy)}.should_promote returned {answer!r}; it must "
                      "return True or False.")
    return bool(answer)

  def snapshot(self) -> TierSnapshot:
    """The whole state of the store, for `restore`: entries (value, size, tier, pinned,
    frequency, last access), recency order, bytes used per tier, clock and counters.

    Cheap: a shallow copy, O(entries) in C (about 0.1 ms for 5,000 entries); values are held by
    reference, not copied. Configuration (``tiers``, ``policy``, ``on_evict``) is not part of it.
    The snapshot is valid only for this store, any number of times.
    """
    return TierSnapshot(self, StoreState(
        self._entries.copy(), self._frequency.copy(), self._last_access.copy(),
        tuple(self._used), self._clock, self.evictions, self.pinned_evictions, self.demotions))

  def restore(self, snapshot: TierSnapshot) -> None:
    """Puts the store back exactly as it was when ``snapshot`` (from this store's `snapshot`)
    was taken: every entry, recency order, bytes per tier, clock and counters. Calls no policy
    and no ``on_evict``; entries added since are dropped without being reported.

    Raises:
      TierError: ``snapshot`` is not a snapshot of this store.
    """
    if not isinstance(snapshot, TierSnapshot):
      raise TierError(f"TieredStore.restore: snapshot must be a value returned by this store's "
                      f"snapshot(), got {snapshot!r} ({type_name(snapshot)}); take one with "
                      "snap = store.snapshot() and pass it back.")
    if snapshot.store is not self:
      raise TierError("TieredStore.restore: snapshot was taken of another TieredStore; a "
                      "snapshot restores only the store whose snapshot() made it. Restore it "
                      "into that store, or take one of this store.")
    state = snapshot.state
    self._entries = state.entries.copy()
    self._frequency = state.frequency.copy()
    self._last_access = state.last_access.copy()
    self._used = list(state.used)
    self._clock = state.clock
    self.evictions, self.pinned_evictions = state.evictions, state.pinned_evictions
    self.demotions = state.demotions

  def stats(self) -> dict[str, Any]:
    """``tiers`` (name, capacity, used bytes, entries each), ``entries``, ``evictions``,
    ``pinned_evictions`` (only copies dropped by an explicit policy decision), ``demotions``
    (moves to a slower tier)."""
    return dict(
        tiers=[dict(name=t.name, capacity=t.capacity, used=self._used[i],
                    entries=sum(e.tier == i for e in self._entries.values()))
               for i, t in enumerate(self.tiers)],
        entries=len(self._entries), evictions=self.evictions,
        pinned_evictions=self.pinned_evictions, demotions=self.demotions)
