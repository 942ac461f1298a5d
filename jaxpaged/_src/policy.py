"""Tier policies: what a policy sees of an entry (`AccessStats`), the contract (`TierPolicy`), and
the two policies jaxpaged ships (`LRUPolicy`, `LFUPolicy`), and `PriorityPolicy`, retention
classes over any of them.

A policy makes two decisions: whether a hit should bring an entry to a faster tier
(`jaxpaged.TieredStore.should_promote` asks; `jaxpaged.CacheManager` then moves a host hit back
to the device), and which entry leaves a tier that must make room (`TieredStore.put` asks, and
moves it). It only decides. Plain host-side Python, no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Protocol


@dataclasses.dataclass(frozen=True)
class AccessStats:
  """What a policy knows of an entry.

  Attributes:
    frequency: accesses recorded (the `put` counts as one).
    recency_rank: position from the most recently used entry of the whole store (0 = most recent).
    last_access: store clock at the last access (higher = more recent).
    size: bytes.
    pinned: the entry is the only copy of something (a swapped-out sequence).

  >>> store = TieredStore([Tier("ram", capacity=100)])
  >>> store.put("a", "A", size=10)
  >>> _ = store.get("a")
  >>> stats = store.access_stats("a")
  >>> stats.frequency, stats.recency_rank, stats.size, stats.pinned
  (2, 0, 10, False)
  """
  frequency: int
  recency_rank: int
  last_access: int
  size: int
  pinned: bool


class TierPolicy(Protocol):
  """Decides promotion and eviction for a `TieredStore` (and host-hit promotion for a
  `CacheManager`).

  ``should_promote(key, stats)``: bring this entry to a faster tier (the device) on a hit?
  ``eviction_candidate(tier, stats)``: the key to evict from ``tier`` given ``{key: AccessStats}``
  of that tier's entries, or None if nothing may go. Returning a pinned entry is an explicit
  decision to drop the only copy of it; the store reports it. Returning anything else (a key
  that is not in ``stats``, an unhashable value) makes the `TieredStore.put` fail with a
  `TierError`, the store unchanged; so does an exception the policy raises, which propagates
  as it is.

  Any object with these two methods is a policy; it need not inherit from this class:

  >>> class LargestFirst:  # evicts the largest unpinned entry, never promotes
  ...   def should_promote(self, key, stats):
  ...     return False
  ...   def eviction_candidate(self, tier, stats):
  ...     sizes = {key: s.size for key, s in stats.items() if not s.pinned}
  ...     return max(sizes, key=sizes.get) if sizes else None
  >>> store = TieredStore([Tier("ram", capacity=100)], policy=LargestFirst())
  >>> store.put("big", 1, size=60)
  >>> store.put("small", 2, size=30)
  >>> store.put("new", 3, size=30)  # the largest, "big", makes room
  >>> sorted(store.keys())
  ['new', 'small']
  """

  def should_promote(self, key: Hashable, stats: AccessStats) -> bool:
    """Whether a hit on ``key`` brings it to a faster tier."""
    ...

  def eviction_candidate(self, tier: int, stats: dict[Hashable, AccessStats]) -> Hashable | None:
    """The key of ``stats`` to evict from ``tier`` (its index, fastest first), or None."""
    ...


def _least(ranked: list[tuple[tuple[int, ...], Hashable]]) -> Hashable | None:
  """The key of the ``(order, key)`` pair of smallest order (the first one on ties), or None."""
  return min(ranked, key=lambda item: item[0])[1] if ranked else None


@dataclasses.dataclass(frozen=True)
class LRUPolicy:
  """Evicts the least recently used unpinned entry; promotes an entry once it has been accessed
  ``promote_threshold`` times (1: on every hit; the vyre ``TieredCache`` this store re-creates
  uses 3).

  >>> store = TieredStore([Tier("ram", capacity=20)], policy=LRUPolicy(promote_threshold=2))
  >>> store.put("a", 1, size=10)
  >>> store.put("b", 2, size=10)
  >>> store.should_promote("a")  # one access so far: the put
  False
  >>> _ = store.get("a")  # "b" is now the least recently used
  >>> store.put("c", 3, size=10)
  >>> sorted(store.keys()), store.should_promote("a")
  (['a', 'c'], True)
  """
  promote_threshold: int = 1

  def should_promote(self, key: Hashable, stats: AccessStats) -> bool:
    """True once ``key`` has been accessed ``promote_threshold`` times."""
    del key
    return stats.frequency >= self.promote_threshold

  def eviction_candidate(self, tier: int, stats: dict[Hashable, AccessStats]) -> Hashable | None:
    """The least recently used unpinned key of ``stats``, or None if all are pinned."""
    del tier
    return _least([((s.last_access,), key) for key, s in stats.items() if not s.pinned])


@dataclasses.dataclass(frozen=True)
class LFUPolicy(LRUPolicy):
  """Evicts the least frequently used unpinned entry (least recent among equals): scan-resistant,
  a long prompt seen once does not push out a system prompt seen a thousand times. Promotes as
  `LRUPolicy` does.

  >>> store = TieredStore([Tier("ram", capacity=20)], policy=LFUPolicy())
  >>> store.put("system", 1, size=10)
  >>> _ = [store.get("system") for _ in range(3)]
  >>> store.put("scan1", 2, size=10)
  >>> store.put("scan2", 3, size=10)  # "scan1" goes: LRUPolicy would drop "system"
  >>> sorted(store.keys())
  ['scan2', 'system']
  """

  def eviction_candidate(self, tier: int, stats: dict[Hashable, AccessStats]) -> Hashable | None:
    """The least frequently used unpinned key (least recent among equals), or None."""
    del tier
    return _least([((s.frequency, s.last_access), key)
                    for key, s in stats.items() if not s.pinned])


@dataclasses.dataclass(frozen=True)
class PriorityPolicy:
  """Retention classes over another policy: evicts only among the unpinned entries of the lowest
  rank, and lets ``policy`` choose among them (and decide promotion). ``rank(key, stats)`` is any
  comparable value, lower evicted first (`jaxpaged.CacheManager` ranks blocks by prefix TTL
  expiry, then by retention priority: `jaxpaged._src.retention`). When every unpinned entry has
  the same rank, ``policy`` sees exactly the ``stats`` it would see alone.

  >>> ranks = {"system": 1, "chat": 0}
  >>> policy = PriorityPolicy(LRUPolicy(), lambda key, stats: ranks.get(key, 0))
  >>> store = TieredStore([Tier("ram", capacity=20)], policy=policy)
  >>> store.put("system", 1, size=10)
  >>> store.put("chat", 2, size=10)
  >>> store.put("scan", 3, size=10)  # "system" is the least recent, but ranks higher
  >>> sorted(store.keys())
  ['scan', 'system']
  """
  policy: TierPolicy
  rank: Callable[[Hashable, AccessStats], Any]

  def should_promote(self, key: Hashable, stats: AccessStats) -> bool:
    """``policy``'s decision."""
    return self.policy.should_promote(key, stats)

  def eviction_candidate(self, tier: int, stats: dict[Hashable, AccessStats]) -> Hashable | None:
    """``policy``'s choice among the pinned entries and the unpinned ones of the lowest rank."""
    ranks = {key: self.rank(key, s) for key, s in stats.items() if not s.pinned}
    if ranks:
      low = min(ranks.values())
      if any(r != low for r in ranks.values()):
        stats = {key: s for key, s in stats.items() if s.pinned or ranks[key] == low}
    return self.policy.eviction_candidate(tier, stats)
