"""Memory-pressure levels of the device pool and the callbacks that hear of their changes.

Internal API: `PressureMonitor` (owned by `CacheManager`).
"""

from __future__ import annotations

import enum
from typing import Callable

from jaxpaged._src.spec import JaxPagedError

DEFAULT_THRESHOLDS = (0.6, 0.8, 0.95)  # vLLM-like: act well before the pool is full


class MemoryPressure(enum.IntEnum):
  """How full the device pool is: pages held by sequences over all pages, against thresholds.

  >>> MemoryPressure(2).name, MemoryPressure.HIGH > MemoryPressure.MEDIUM
  ('HIGH', True)
  """
  LOW = 0
  MEDIUM = 1
  HIGH = 2
  CRITICAL = 3


class PressureMonitor:
  """The current level, from the used fraction of pages, and its callbacks.

  >>> levels = []
  >>> monitor = PressureMonitor((0.5, 0.75, 0.9))
  >>> monitor.on_change(lambda old, new: levels.append(new.name))
  >>> monitor.update(0.8); monitor.update(0.8); monitor.update(0.1)
  >>> levels
  ['HIGH', 'LOW']
  """

  def __init__(self, thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS):
    try:
      thresholds = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
      thresholds = ()
    if not (len(thresholds) == 3 and 0 < thresholds[0] <= thresholds[1] <= thresholds[2] <= 1):
      raise JaxPagedError(f"thresholds must be (medium, high, critical) with 0 < medium <= high "
                          f"<= critical <= 1, got {thresholds!r}; the default is "
                          f"{DEFAULT_THRESHOLDS}.")
    self.thresholds = thresholds
    self.level = MemoryPressure.LOW
    self._callbacks: list[Callable[[MemoryPressure, MemoryPressure], None]] = []

  def on_change(self, callback: Callable[[MemoryPressure, MemoryPressure], None]) -> None:
    """Registers ``callback(old_level, new_level)``, called once on every level change."""
    if not callable(callback):
      raise JaxPagedError(f"callback must be callable as callback(old_level, new_level), got "
                          f"{callback!r}.")
    self._callbacks.append(callback)

  def update(self, used_fraction: float) -> None:
    """Sets the level of ``used_fraction``; on a change every callback hears of it, and then
    the first exception a callback raised is raised (the level stays changed)."""
    level = MemoryPressure(sum(used_fraction >= t for t in self.thresholds))
    if level == self.level:
      return
    old, self.level = self.level, level
    errors = []
    for callback in list(self._callbacks):  # every callback hears of the change
      try:
        callback(old, level)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
    if errors:
      raise errors[0]
