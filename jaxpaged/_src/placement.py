"""Planning a `jaxpaged.TieredStore.put`: every move and eviction, decided before any is made.

The store hands a `PutPlan` what it holds (entries, access counts, recency order, bytes per tier),
the tiers' capacities and its policy's ``eviction_candidate``. The plan changes none of them: it
keeps its own view (bytes per tier, entries moved down or gone) and records each decision in
`PutPlan.ops`, which the store applies only once a tier for the new entry was found. The policy
is asked on that view, so it sees exactly what it would see if each step were applied at once.
Plain host-side Python, no JAX.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, NamedTuple, Sequence

from jaxpaged._src.policy import AccessStats

EvictionCandidate = Callable[[int, dict[Hashable, AccessStats]], Hashable | None]


class Entry(NamedTuple):
  """A stored entry, immutable (a move replaces it), so a snapshot of the store is a shallow copy
  of its dict. What changes on every access (frequency, recency) the store keeps beside it."""
  value: Any
  size: int
  tier: int
  pinned: bool


class NotOffered(Exception):
  """The policy answered ``eviction_candidate(tier, stats)`` with ``key``, which is not one of
  the ``offered`` keys of ``stats`` (or is unhashable). The plan is abandoned."""

  def __init__(self, tier: int, key: Any, offered: int):
    super().__init__(tier, key, offered)
    self.tier, self.key, self.offered = tier, key, offered


class PutPlan:
  """A simulated `put` of ``key``: where it goes and what moves or leaves to make room.

  Args:
    key: the key being put; its old entry, if any, is out of the view (the put replaces it).
    entries: the store's entries (read only).
    frequency: accesses of each entry (read only).
    last_access: clock of each entry's last access, least recently used first (read only).
    used: bytes held by each tier, fastest first.
    capacities: bytes each tier holds at most.
    eviction_candidate: the policy's choice of whom to evict (see `jaxpaged.TierPolicy`).

  Attributes:
    ops: the decisions so far, in order: ``(key, new tier)`` for a move down, ``(key, None)``
      for an eviction.
  """

  def __init__(self, key: Hashable, *, entries: Mapping[Hashable, Entry],
               frequency: Mapping[Hashable, int], last_access: Mapping[Hashable, int],
               used: Sequence[int], capacities: Sequence[int],
               eviction_candidate: EvictionCandidate):
    self._entries, self._frequency, self._last_access = entries, frequency, last_access
    self._capacities = capacities
    self._eviction_candidate = eviction_candidate
    self._used = list(used)  # in the view
    old = entries.get(key)
    if old is not None:
      self._used[old.tier] -= old.size
    self._tier_of: dict[Hashable, int] = {}  # entries moved so far -> their tier in the view
    self._gone: set[Hashable] = {key}  # entries evicted so far, and the key being put
    self._ranks: dict[Hashable, int] | None = None
    self.ops: list[tuple[Hashable, int | None]] = []

  def place(self, size: int) -> int | None:
    """The fastest tier that can make room for ``size`` bytes (moving entries down in the view),
    or None if none can."""
    for tier, capacity in enumerate(self._capacities):
      if size <= capacity and self.make_room(tier, size):
        return tier
    return None

  def make_room(self, tier: int, size: int) -> bool:
    """Frees ``size`` bytes in ``tier`` (in the view) by moving policy candidates down (or out).
    Nothing moves unless the whole room can be made.

    Raises:
      NotOffered: the policy named a key that is not a candidate.
    """
    need = size - (self._capacities[tier] - self._used[tier])
    if need <= 0:
      return True
    candidates = {k: e for k, e in self._entries.items()
                  if k not in self._gone and self._tier_of.get(k, e.tier) == tier}
    chosen, freed = [], 0
    while freed < need:
      key = self._choose(tier, candidates) if candidates else None
      if key is None:
        return False
      chosen.append(key)
      freed += candidates.pop(key).size
    for key in chosen:
      self._move_down(key, tier)
    return True

  def _choose(self, tier: int, candidates: dict[Hashable, Entry]) -> Hashable | None:
    """Asks the policy which of ``candidates`` leaves ``tier``; checks it was offered."""
    ranks = self._recency_ranks()
    stats = {k: AccessStats(self._frequency[k], ranks[k], self._last_access[k], e.size, e.pinned)
             for k, e in candidates.items()}
    key = self._eviction_candidate(tier, stats)
    if key is None:
      return None
    try:
      offered = key in candidates
    except TypeError:  # unhashable
      offered = False
    if not offered:
      raise NotOffered(tier, key, len(stats))
    return key

  def _recency_ranks(self) -> dict[Hashable, int]:
    """Each entry of the view's position from the most recently used one (0)."""
    if self._ranks is None:  # recomputed only after an eviction changed the order
      self._ranks = {k: i for i, k in enumerate(k for k in reversed(self._last_access)
                                                if k not in self._gone)}
    return self._ranks

  def _move_down(self, key: Hashable, tier: int) -> None:
    """Moves ``key`` out of ``tier`` to the fastest slower tier that can make room, else out."""
    size = self._entries[key].size
    self._used[tier] -= size
    for lower in range(tier + 1, len(self._capacities)):
      if size <= self._capacities[lower] and self.make_room(lower, size):
        self._tier_of[key] = lower
        self._used[lower] += size
        self.ops.append((key, lower))
        return
    self._gone.add(key)
    self._ranks = None
    self.ops.append((key, None))
