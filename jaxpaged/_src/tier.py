"""A tiered host store: byte-capacity tiers, pluggable policies, recency and frequency tracking.

Plain host-side Python, no JAX: `jaxpaged.CacheManager` keeps swapped-out sequences and demoted
prefix blocks in one, but it holds any sized values. Tiers are ordered fastest first (say pinned
host RAM, then pageable RAM). A new entry goes into the fastest tier that can hold it; making
room there moves the policy's eviction candidates one tier down, and out of the store from the
last tier, counting every eviction. An entry marked ``pinned`` (a swapped-out sequence: its only
copy) is never evicted unless the policy explicitly allows it, and then the eviction is reported
to ``on_evict`` with the entry.

>>> store = TieredStore([Tier("ram", capacity=100)])
>>> store.put("a", "A", size=60)
>>> store.put("b", "B", size=60)  # "a" is evicted to make room
>>> "a" in store, store.get("b"), store.stats()["evictions"]
(False, 'B', 1)
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Hashable, Iterable, Protocol

from jaxpaged._src.spec import JaxPagedError


class TierError(JaxPagedError):
  """A host-tier operation that cannot be done: the message says how to fix it."""


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
  """One tier of a `TieredStore`: a name and a capacity in bytes."""
  name: str
  capacity: int

  def __post_init__(self):
    if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 0:
      raise TierError(f"Tier {self.name!r}: capacity must be a byte count >= 0, got "
                      f"{self.capacity!r}.")


class TierPolicy(Protocol):
  """Decides promotion and eviction for a `TieredStore` (and for `CacheManager`'s device tier).

  ``should_promote(key, stats)``: bring this entry to a faster tier (the device) on a hit?
  ``eviction_candidate(tier, stats)``: the key to evict from ``tier`` given ``{key: AccessStats}``
  of that tier's entries, or None if nothing may go. Returning a pinned entry is an explicit
  decision to drop the only copy of it; the store reports it.
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


@dataclasses.dataclass
class _Entry:
  value: Any
  size: int
  tier: int
  pinned: bool
  frequency: int = 1
  last_access: int = 0


class TieredStore:
  """Host-side key-value store over byte-capacity tiers (fastest first) with a `TierPolicy`.

  Args:
    tiers: `Tier`s, fastest first.
    policy: the eviction/promotion policy (default `LRUPolicy()`).
    on_evict: called as ``on_evict(key, value, pinned)`` when an entry leaves the store for lack
      of room (not on `pop`).
  """

  def __init__(self, tiers: Iterable[Tier], policy: TierPolicy | None = None,
               on_evict: Callable[[Hashable, Any, bool], None] | None = None):
    self.tiers = tuple(tiers)
    if not self.tiers or not all(isinstance(t, Tier) for t in self.tiers):
      raise TierError("TieredStore needs at least one jaxpaged.tier.Tier, fastest first, e.g. "
                      "TieredStore([Tier('ram', capacity=8 << 30)]).")
    self.policy = LRUPolicy() if policy is None else policy
    self.on_evict = on_evict
    self._entries: dict[Hashable, _Entry] = {}
    self._recency: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
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
    """Bytes held by ``tier``."""
    return self._used[tier]

  def _tick(self, key) -> int:
    self._clock += 1
    self._recency[key] = None
    self._recency.move_to_end(key)
    return self._clock

  def _entry(self, key) -> _Entry:
    try:
      return self._entries[key]
    except KeyError:
      raise TierError(f"key {key!r} is not in the store; put it first (or check `key in "
                      "store`).") from None

  def access_stats(self, key) -> AccessStats:
    """The policy's view of ``key``."""
    entry = self._entry(key)
    rank = list(reversed(self._recency)).index(key)
    return AccessStats(entry.frequency, rank, entry.last_access, entry.size, entry.pinned)

  def can_put(self, size: int, *, pinned: bool = False) -> bool:
    """Whether a `put` of this many bytes would succeed without evicting a pinned entry."""
    del pinned
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

    Raises:
      TierError: the entry is larger than every tier, or no tier can make room without dropping
        a pinned entry the policy will not evict. The store is unchanged then.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
      raise TierError(f"size must be a byte count >= 0, got {size!r}.")
    if all(size > t.capacity for t in self.tiers):
      raise TierError(f"entry {key!r} of {size} bytes is larger than every tier (largest "
                      f"{max(t.capacity for t in self.tiers)} bytes); give a tier more capacity "
                      "or store smaller entries.")
    old = self._entries.pop(key, None)
    if old is not None:
      self._used[old.tier] -= old.size
      self._recency.pop(key, None)
    for tier, spec in enumerate(self.tiers):
      if size <= spec.capacity and self._make_room(tier, size):
        self._entries[key] = _Entry(value, size, tier, pinned)
        self._used[tier] += size
        self._entries[key].last_access = self._tick(key)
        return
    if old is not None:  # put it back: a failed put changes nothing
      self._entries[key] = old
      self._used[old.tier] += old.size
      self._recency[key] = None
    raise TierError(f"no tier can make room for {size} bytes under {key!r}: the rest is pinned "
                    "(swapped-out sequences); swap some in, release them, or add capacity.")

  def get(self, key, default=None):
    """The value of ``key`` (recorded as an access), or ``default``."""
    entry = self._entries.get(key)
    if entry is None:
      return default
    entry.frequency += 1
    entry.last_access = self._tick(key)
    return entry.value

  def peek(self, key, default=None):
    """The value of ``key`` without recording an access."""
    entry = self._entries.get(key)
    return default if entry is None else entry.value

  def pop(self, key):
    """Removes ``key`` and returns its value (not counted as an eviction)."""
    entry = self._entry(key)
    del self._entries[key]
    self._recency.pop(key, None)
    self._used[entry.tier] -= entry.size
    return entry.value

  def should_promote(self, key) -> bool:
    """The policy's decision for a hit on ``key``."""
    return self.policy.should_promote(key, self.access_stats(key))

  def _make_room(self, tier: int, size: int) -> bool:
    """Frees ``size`` bytes in ``tier`` by moving policy candidates down (or out). Nothing moves
    unless the whole room can be made."""
    plan, freed = [], 0
    need = size - (self.tiers[tier].capacity - self._used[tier])
    candidates = {k: e for k, e in self._entries.items() if e.tier == tier}
    ranks = {k: i for i, k in enumerate(reversed(self._recency))}
    while freed < need:
      stats = {k: AccessStats(e.frequency, ranks[k], e.last_access, e.size, e.pinned)
               for k, e in candidates.items()}
      key = self.policy.eviction_candidate(tier, stats) if stats else None
      if key is None or key not in candidates:
        return False
      plan.append(key)
      freed += candidates.pop(key).size
    for key in plan:
      self._move_down(key, tier)
    return True

  def _move_down(self, key, tier: int) -> None:
    entry = self._entries[key]
    self._used[tier] -= entry.size
    lower = tier + 1
    while lower < len(self.tiers):
      if entry.size <= self.tiers[lower].capacity and self._make_room(lower, entry.size):
        entry.tier = lower
        self._used[lower] += entry.size
        self.demotions += 1
        return
      lower += 1
    del self._entries[key]
    self._recency.pop(key, None)
    self.evictions += 1
    self.pinned_evictions += entry.pinned
    if self.on_evict is not None:
      self.on_evict(key, entry.value, entry.pinned)

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
