"""A tiered host store: byte-capacity tiers, pluggable policies, recency and frequency tracking.

Plain host-side Python, no JAX: `jaxpaged.CacheManager` keeps swapped-out sequences and demoted
prefix blocks in one, but it holds any sized values. Tiers are ordered fastest first (say pinned
host RAM, then pageable RAM). A new entry goes into the fastest tier that can hold it; making
room there moves the policy's eviction candidates one tier down, and out of the store from the
last tier, counting every eviction. An entry marked ``pinned`` (a swapped-out sequence: its only
copy) is never evicted unless the policy explicitly allows it, and then the eviction is reported
to ``on_evict`` with the entry.

A `TieredStore.put` is all or nothing: every move and eviction is planned first, on a simulated
view of the store, asking the policy as often as needed; only then is the plan applied, and only
once the store is consistent again is ``on_evict`` called. A policy that raises (or answers with
a key it was not offered) leaves the store exactly as it was. `TieredStore.snapshot` and
`TieredStore.restore` roll back a longer sequence of operations.

>>> store = TieredStore([Tier("ram", capacity=100)])
>>> store.put("a", "A", size=60)
>>> store.put("b", "B", size=60)  # "a" is evicted to make room
>>> "a" in store, store.get("b"), store.stats()["evictions"]
(False, 'B', 1)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Hashable, Iterable, NamedTuple, Protocol

import numpy as np

from jaxpaged._src.spec import JaxPagedError


class TierError(JaxPagedError):
  """A host-tier operation that cannot be done: the message says how to fix it."""


def _byte_count(where: str, name: str, value: Any, fix: str) -> int:
  """``value`` as a Python int if it is an integer >= 0 (numpy integers too, bools not)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < 0):  # numpy bools are not `numbers.Integral`
    raise TierError(f"{where}: {name} must be a byte count, an int >= 0, got {value!r} "
                    f"({type(value).__name__}); {fix}")
  return int(value)


def _type_name(value: Any) -> str:
  return type(value).__name__


@dataclasses.dataclass(frozen=True)
class AccessStats:
  """What a policy knows of an entry.

  Attributes:
    frequency: accesses recorded (the `put` counts as one).
    recency_rank: position from the most recently used entry of the whole store (0 = most recent).
    last_access: store clock at the last access (higher = more recent).
    size: bytes.
    pinned: the entry is the only copy of something (a swapped-out sequence).
  """
  frequency: int
  recency_rank: int
  last_access: int
  size: int
  pinned: bool


@dataclasses.dataclass(frozen=True)
class Tier:
  """One tier of a `TieredStore`: a name and a capacity in bytes.

  Args:
    name: a non-empty str, unique among the tiers of a store.
    capacity: bytes, an int >= 0 (a numpy integer is converted to int).
  """
  name: str
  capacity: int

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise TierError(f"Tier: name must be a non-empty str, got {self.name!r} "
                      f"({_type_name(self.name)}); name each tier, e.g. "
                      "Tier('ram', capacity=8 << 30).")
    capacity = _byte_count(f"Tier {self.name!r}", "capacity", self.capacity,
                           f"give the tier's size in bytes, e.g. Tier({self.name!r}, "
                           "capacity=8 << 30).")
    object.__setattr__(self, "capacity", capacity)


class TierPolicy(Protocol):
  """Decides promotion and eviction for a `TieredStore` (and for `CacheManager`'s device tier).

  ``should_promote(key, stats)``: bring this entry to a faster tier (the device) on a hit?
  ``eviction_candidate(tier, stats)``: the key to evict from ``tier`` given ``{key: AccessStats}``
  of that tier's entries, or None if nothing may go. Returning a pinned entry is an explicit
  decision to drop the only copy of it; the store reports it. Returning anything else (a key
  that is not in ``stats``, an unhashable value) makes the `TieredStore.put` fail with a
  `TierError`, the store unchanged; so does an exception the policy raises, which propagates
  as it is.
  """

  def should_promote(self, key: Hashable, stats: AccessStats) -> bool: ...

  def eviction_candidate(self, tier: int, stats: dict[Hashable, AccessStats]) -> Hashable | None:
    ...


@dataclasses.dataclass(frozen=True)
class LRUPolicy:
  """Evicts the least recently used unpinned entry; promotes an entry once it has been accessed
  ``promote_threshold`` times (1: on every hit; vyre's default is 3)."""
  promote_threshold: int = 1

  def should_promote(self, key, stats: AccessStats) -> bool:
    del key
    return stats.frequency >= self.promote_threshold

  def eviction_candidate(self, tier, stats):
    del tier
    unpinned = [(s.last_access, key) for key, s in stats.items() if not s.pinned]
    return min(unpinned, key=lambda item: item[0])[1] if unpinned else None


@dataclasses.dataclass(frozen=True)
class LFUPolicy(LRUPolicy):
  """Evicts the least frequently used unpinned entry (least recent among equals): scan-resistant,
  a long prompt seen once does not push out a system prompt seen a thousand times."""

  def eviction_candidate(self, tier, stats):
    del tier
    unpinned = [((s.frequency, s.last_access), key) for key, s in stats.items() if not s.pinned]
    return min(unpinned, key=lambda item: item[0])[1] if unpinned else None


class _Entry(NamedTuple):
  """An entry, immutable (a move replaces it), so a snapshot is a shallow copy of the dict. What
  changes on every access lives in `TieredStore._freq` and `TieredStore._recency`."""
  value: Any
  size: int
  tier: int
  pinned: bool


class TierSnapshot:
  """The whole state of one `TieredStore` at one moment, from `TieredStore.snapshot`: opaque,
  only for `TieredStore.restore` of the store that made it. Values are held by reference."""

  __slots__ = ("_store", "_state")

  def __init__(self, store: TieredStore, state: tuple):
    self._store = store
    self._state = state

  def __repr__(self) -> str:
    return f"<TierSnapshot of {len(self._state[0])} entries>"


_MISSING = object()


class _Plan:
  """A simulated `put`: decides every move and eviction on a view of the store without changing
  it (the policy sees exactly what it would see if each step were applied at once)."""

  def __init__(self, store: TieredStore, key):
    self.store = store
    self.key = key  # the key being put: its old entry, if any, is out of the view
    self.used = list(store._used)
    old = store._entries.get(key)
    if old is not None:
      self.used[old.tier] -= old.size
    self.tier_of: dict = {}  # entries moved so far -> their tier in the view
    self.gone: set = set()  # entries evicted so far (and the key being put)
    self.gone.add(key)
    self.ops: list = []  # (key, new tier or None for out of the store), in order
    self._ranks = None

  def _recency_ranks(self) -> dict:
    if self._ranks is None:  # recomputed only after an eviction changed the order
      gone = self.gone
      self._ranks = {k: i for i, k in enumerate(k for k in reversed(self.store._recency)
                                                if k not in gone)}
    return self._ranks

  def make_room(self, tier: int, size: int) -> bool:
    """Frees ``size`` bytes in ``tier`` (in the view) by moving policy candidates down (or out).
    Nothing moves unless the whole room can be made."""
    need = size - (self.store.tiers[tier].capacity - self.used[tier])
    if need <= 0:
      return True
    gone, tier_of = self.gone, self.tier_of
    candidates = {k: e for k, e in self.store._entries.items()
                  if k not in gone and tier_of.get(k, e.tier) == tier}
    ranks = self._recency_ranks()
    plan, freed = [], 0
    while freed < need:
      if not candidates:
        return False
      freq, last = self.store._freq, self.store._recency
      stats = {k: AccessStats(freq[k], ranks[k], last[k], e.size, e.pinned)
               for k, e in candidates.items()}
      key = self.store.policy.eviction_candidate(tier, stats)
      if key is None:
        return False
      try:
        entry = candidates.pop(key, _MISSING)
      except TypeError:  # unhashable
        entry = _MISSING
      if entry is _MISSING:
        policy = self.store.policy
        raise TierError(
            f"{type(policy).__name__}.eviction_candidate(tier={tier}, stats) returned {key!r}, "
            f"which is not one of the keys of stats (the {len(stats)} remaining entries of tier "
            f"{tier}); return one of them, or None if none may go. The put changed nothing.")
      plan.append(key)
      freed += entry.size
    for key in plan:
      self._move_down(key, tier)
    return True

  def _move_down(self, key, tier: int) -> None:
    entry = self.store._entries[key]
    self.used[tier] -= entry.size
    for lower in range(tier + 1, len(self.store.tiers)):
      if entry.size <= self.store.tiers[lower].capacity and self.make_room(lower, entry.size):
        self.tier_of[key] = lower
        self.used[lower] += entry.size
        self.ops.append((key, lower))
        return
    self.gone.add(key)
    self._ranks = None
    self.ops.append((key, None))


class TieredStore:
  """Host-side key-value store over byte-capacity tiers (fastest first) with a `TierPolicy`.

  Args:
    tiers: `Tier`s, fastest first, with distinct names.
    policy: the eviction/promotion policy (default `LRUPolicy()`): an object with
      ``should_promote`` and ``eviction_candidate`` methods.
    on_evict: called as ``on_evict(key, value, pinned)`` when an entry leaves the store for lack
      of room (not on `pop`), after the `put` that evicted it is complete, or None.
  """

  def __init__(self, tiers: Iterable[Tier], policy: TierPolicy | None = None,
               on_evict: Callable[[Hashable, Any, bool], None] | None = None):
    example = "e.g. TieredStore([Tier('ram', capacity=8 << 30)])"
    if isinstance(tiers, Tier):
      raise TierError(f"TieredStore: tiers must be a sequence of Tier, fastest first, got one "
                      f"Tier ({tiers.name!r}); wrap it in a list, {example}.")
    try:
      self.tiers = tuple(tiers)
    except TypeError:
      raise TierError(f"TieredStore: tiers must be a sequence of Tier, fastest first, got "
                      f"{tiers!r} ({_type_name(tiers)}); {example}.") from None
    if not self.tiers or not all(isinstance(t, Tier) for t in self.tiers):
      bad = [t for t in self.tiers if not isinstance(t, Tier)]
      got = "none" if not self.tiers else f"{bad[0]!r} ({_type_name(bad[0])})"
      raise TierError(f"TieredStore needs at least one jaxpaged.tier.Tier, and only Tiers, "
                      f"fastest first, got {got}; {example}.")
    names = [t.name for t in self.tiers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
      raise TierError(f"TieredStore: tier names must be unique, got {names} ({twice} more than "
                      "once); give each tier its own name, e.g. 'pinned' and 'pageable'.")
    self.policy = LRUPolicy() if policy is None else policy
    missing = [m for m in ("should_promote", "eviction_candidate")
               if not callable(getattr(self.policy, m, None))]
    if missing or isinstance(self.policy, type):
      what = (f"the class {self.policy.__name__}, not an instance" if isinstance(self.policy, type)
              else f"{self.policy!r} ({_type_name(self.policy)}), without {' or '.join(missing)}")
      raise TierError(f"TieredStore: policy must be a TierPolicy, an object with callable "
                      f"should_promote(key, stats) and eviction_candidate(tier, stats) methods, "
                      f"got {what}; pass LRUPolicy(), LFUPolicy(), your own TierPolicy "
                      "instance, or None for LRUPolicy().")
    if on_evict is not None and not callable(on_evict):
      raise TierError(f"TieredStore: on_evict must be callable as on_evict(key, value, pinned) "
                      f"or None, got {on_evict!r} ({_type_name(on_evict)}); pass a function "
                      "or None.")
    self.on_evict = on_evict
    self._entries: dict[Hashable, _Entry] = {}
    self._freq: dict[Hashable, int] = {}  # key -> accesses
    self._recency: dict[Hashable, int] = {}  # key -> last access, least recently used first
    self._used = [0] * len(self.tiers)
    self._clock = 0
    self.evictions = 0
    self.pinned_evictions = 0
    self.demotions = 0

  def __contains__(self, key) -> bool:
    return key in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def keys(self):
    return list(self._entries)

  def used(self, tier: int) -> int:
    """Bytes held by ``tier`` (its index, fastest first)."""
    if isinstance(tier, bool) or not isinstance(tier, int) or not 0 <= tier < len(self.tiers):
      raise TierError(f"TieredStore.used: tier must be an index in [0, {len(self.tiers)}), got "
                      f"{tier!r}.")
    return self._used[tier]

  def _tick(self, key) -> int:
    self._clock += 1
    self._recency.pop(key, None)
    self._recency[key] = self._clock  # to the end: most recent
    return self._clock

  @staticmethod
  def _unhashable(method: str, key) -> TierError:
    return TierError(f"TieredStore.{method}: key must be hashable (a str, int, tuple, ...), got "
                     f"{key!r} ({_type_name(key)}); use a hashable key, e.g. a tuple instead of "
                     "a list.")

  def _entry(self, key, method: str) -> _Entry:
    try:
      return self._entries[key]
    except KeyError:
      raise TierError(f"key {key!r} is not in the store; put it first (or check `key in "
                      "store`).") from None
    except TypeError:
      raise self._unhashable(method, key) from None

  def access_stats(self, key) -> AccessStats:
    """The policy's view of ``key``."""
    entry = self._entry(key, "access_stats")
    rank = list(reversed(self._recency)).index(key)
    return AccessStats(self._freq[key], rank, self._recency[key], entry.size, entry.pinned)

  def can_put(self, size: int, *, pinned: bool = False) -> bool:
    """Whether a `put` of this many bytes would succeed without evicting a pinned entry."""
    del pinned
    size = _byte_count("TieredStore.can_put", "size", size, "pass the entry's size in bytes.")
    for tier, spec in enumerate(self.tiers):
      if size > spec.capacity:
        continue
      free = spec.capacity - self._used[tier]
      movable = sum(e.size for e in self._entries.values() if e.tier == tier and not e.pinned)
      if size <= free + movable:
        return True
    return False

  def put(self, key, value, size: int, *, pinned: bool = False) -> None:
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
    try:
      hash(key)
    except TypeError:
      raise self._unhashable("put", key) from None
    size = _byte_count("TieredStore.put", "size", size,
                       "pass the value's size in bytes, e.g. value.nbytes.")
    if not isinstance(pinned, (bool, np.bool_)):
      raise TierError(f"TieredStore.put: pinned must be True or False, got {pinned!r}.")
    pinned = bool(pinned)
    if all(size > t.capacity for t in self.tiers):
      raise TierError(f"entry {key!r} of {size} bytes is larger than every tier (largest "
                      f"{max(t.capacity for t in self.tiers)} bytes); give a tier more capacity "
                      "or store smaller entries.")
    plan = _Plan(self, key)
    for tier, spec in enumerate(self.tiers):
      if size <= spec.capacity and plan.make_room(tier, size):
        break
    else:
      raise TierError(f"no tier can make room for {size} bytes under {key!r}: the rest is pinned "
                      "(swapped-out sequences); swap some in, release them, or add capacity.")
    # Apply the plan: nothing below calls user code until the store is consistent.
    old = self._entries.pop(key, None)
    if old is not None:
      self._used[old.tier] -= old.size
      del self._freq[key], self._recency[key]
    evicted = []
    for moved, lower in plan.ops:
      entry = self._entries[moved]
      self._used[entry.tier] -= entry.size
      if lower is None:
        del self._entries[moved], self._freq[moved], self._recency[moved]
        self.evictions += 1
        self.pinned_evictions += entry.pinned
        evicted.append((moved, entry.value, entry.pinned))
      else:
        self._entries[moved] = entry._replace(tier=lower)
        self._used[lower] += entry.size
        self.demotions += 1
    self._used[tier] += size
    self._entries[key] = _Entry(value, size, tier, pinned)
    self._freq[key] = 1
    self._tick(key)
    self._report(evicted)

  def _report(self, evicted: list) -> None:
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

  def get(self, key, default=None):
    """The value of ``key`` (recorded as an access), or ``default``."""
    try:
      entry = self._entries.get(key)
    except TypeError:
      raise self._unhashable("get", key) from None
    if entry is None:
      return default
    self._freq[key] += 1
    self._tick(key)
    return entry.value

  def peek(self, key, default=None):
    """The value of ``key`` without recording an access."""
    try:
      entry = self._entries.get(key)
    except TypeError:
      raise self._unhashable("peek", key) from None
    return default if entry is None else entry.value

  def pop(self, key):
    """Removes ``key`` and returns its value (not counted as an eviction)."""
    entry = self._entry(key, "pop")
    del self._entries[key], self._freq[key], self._recency[key]
    self._used[entry.tier] -= entry.size
    return entry.value

  def should_promote(self, key) -> bool:
    """The policy's decision for a hit on ``key`` (changes nothing, even if the policy raises)."""
    answer = self.policy.should_promote(key, self.access_stats(key))
    if not isinstance(answer, (bool, np.bool_)) and answer is not None:
      raise TierError(f"{type(self.policy).__name__}.should_promote returned {answer!r}; it must "
                      "return True or False.")
    return bool(answer)

  def snapshot(self) -> TierSnapshot:
    """The whole state of the store, for `restore`: entries (value, size, tier, pinned,
    frequency, last access), recency order, bytes used per tier, clock and counters.

    Cheap: a shallow copy, O(entries) in C (about 0.1 ms for 5,000 entries); values are held by
    reference, not copied. Configuration (``tiers``, ``policy``, ``on_evict``) is not part of it.
    The snapshot is valid only for this store, any number of times.
    """
    return TierSnapshot(self, (self._entries.copy(), self._freq.copy(), self._recency.copy(),
                               tuple(self._used), self._clock, self.evictions,
                               self.pinned_evictions, self.demotions))

  def restore(self, snapshot: TierSnapshot) -> None:
    """Puts the store back exactly as it was when ``snapshot`` (from this store's `snapshot`)
    was taken: every entry, recency order, bytes per tier, clock and counters. Calls no policy
    and no ``on_evict``; entries added since are dropped without being reported.

    Raises:
      TierError: ``snapshot`` is not a snapshot of this store.
    """
    if not isinstance(snapshot, TierSnapshot):
      raise TierError(f"TieredStore.restore: snapshot must be a value returned by this store's "
                      f"snapshot(), got {snapshot!r} ({_type_name(snapshot)}); take one with "
                      "snap = store.snapshot() and pass it back.")
    if snapshot._store is not self:  # pylint: disable=protected-access
      raise TierError("TieredStore.restore: snapshot was taken of another TieredStore; a "
                      "snapshot restores only the store whose snapshot() made it. Restore it "
                      "into that store, or take one of this store.")
    (entries, freq, recency, used, self._clock, self.evictions, self.pinned_evictions,
     self.demotions) = snapshot._state  # pylint: disable=protected-access
    self._entries = entries.copy()
    self._freq = freq.copy()
    self._recency = recency.copy()
    self._used = list(used)

  def stats(self) -> dict:
    """``tiers`` (name, capacity, used bytes, entries each), ``entries``, ``evictions``,
    ``pinned_evictions`` (only copies dropped by an explicit policy decision), ``demotions``
    (moves to a slower tier)."""
    return dict(
        tiers=[dict(name=t.name, capacity=t.capacity, used=self._used[i],
                    entries=sum(e.tier == i for e in self._entries.values()))
               for i, t in enumerate(self.tiers)],
        entries=len(self._entries), evictions=self.evictions,
        pinned_evictions=self.pinned_evictions, demotions=self.demotions)
