"""The manager's sequence registry: which slots hold active sequences and when each was last
used (the least-recently-used order of `CacheManager.reserve(..., preempt=True)`).

Internal API: `SequenceRegistry` (owned by `CacheManager`).
"""

from __future__ import annotations

from typing import Iterable

from jaxpaged._src import checks


class SequenceRegistry:
  """Active sequence ids and a use clock.

  >>> registry = SequenceRegistry(max_seqs=4)
  >>> registry.add(2); registry.add(0); registry.touch([2])
  >>> sorted(registry.active), registry.least_recent(excluding=[])
  ([0, 2], [0, 2])
  """

  def __init__(self, max_seqs: int):
    self.max_seqs = max_seqs
    self.active: dict[int, int] = {}  # seq -> clock of last use
    self.clock = 0

  def add(self, seq_id: int) -> None:
    """``seq_id`` is active from now on (and used now)."""
    self.clock += 1
    self.active[seq_id] = self.clock

  def remove(self, seq_id: int) -> None:
    """``seq_id`` is no longer active (released or swapped out); unknown ids are ignored."""
    self.active.pop(seq_id, None)

  def touch(self, seq_ids: Iterable[int]) -> None:
    """The active ones of ``seq_ids`` were used now, together."""
    self.clock += 1
    for s in seq_ids:
      if s in self.active:
        self.active[s] = self.clock

  def least_recent(self, excluding: Iterable[int]) -> list[int]:
    """Active ids not in ``excluding``, least recently used first."""
    excluded = set(excluding)
    return [s for _, s in sorted((t, s) for s, t in self.active.items() if s not in excluded)]

  def free_slot(self, taken: Iterable[int]) -> int | None:
    """The lowest slot neither active nor in ``taken`` (held on host), or None."""
    busy = set(self.active) | set(taken)
    return next((s for s in range(self.max_seqs) if s not in busy), None)

  def check_ids(self, seq_ids) -> list[int]:
    """``seq_ids`` (an int or a 1-D sequence of ints) as a list, each in ``[0, max_seqs)``."""
    return checks.id_list("seq_ids", seq_ids, self.max_seqs)

  def snapshot(self):
    """Everything, to `restore` after a failed operation."""
    return dict(self.active), self.clock

  def restore(self, snapshot) -> None:
    active, self.clock = snapshot
    self.active = dict(active)
