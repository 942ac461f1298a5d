"""A `jaxpaged.TieredStore`'s configuration: its `Tier`s, and the checks of its arguments.

Also `TierError`, the error of every host-tier operation. Plain host-side Python, no JAX.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Hashable, Iterable

from jaxpaged._src.policy import LRUPolicy, TierPolicy
from jaxpaged._src.spec import JaxPagedError

OnEvict = Callable[[Hashable, Any, bool], None]
_TIERS_EXAMPLE = "e.g. TieredStore([Tier('ram', capacity=8 << 30)])"


class TierError(JaxPagedError):
  """A host-tier operation that cannot be done: the message says how to fix it.

  >>> try:
  ...   TieredStore([Tier("ram", capacity=10)]).put("k", "v", size=11)
  ... except TierError as e:
  ...   print(isinstance(e, JaxPagedError), str(e).split(";")[0])
  True entry 'k' of 11 bytes is larger than every tier (largest 10 bytes)
  """


def type_name(value: Any) -> str:
  """The name of ``value``'s type, as error messages quote it: ``3 (int)``."""
  return type(value).__name__


def byte_count(where: str, name: str, value: Any, fix: str) -> int:
  """``value`` as a Python int if it is an integer >= 0 (numpy integers too, bools not)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < 0):  # numpy bools are not `numbers.Integral`
    raise TierError(f"{where}: {name} must be a byte count, an int >= 0, got {value!r} "
                    f"({type_name(value)}); {fix}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class Tier:
  """One tier of a `TieredStore`: a name and a capacity in bytes.

  Args:
    name: a non-empty str, unique among the tiers of a store.
    capacity: bytes, an int >= 0 (a numpy integer is converted to int).

  >>> import numpy as np
  >>> tier = Tier("pinned", capacity=np.int64(8 << 30))
  >>> tier.capacity, type(tier.capacity).__name__
  (8589934592, 'int')
  """
  name: str
  capacity: int

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise TierError(f"Tier: name must be a non-empty str, got {self.name!r} "
                      f"({type_name(self.name)}); name each tier, e.g. "
                      "Tier('ram', capacity=8 << 30).")
    capacity = byte_count(f"Tier {self.name!r}", "capacity", self.capacity,
                          f"give the tier's size in bytes, e.g. Tier({self.name!r}, "
                          "capacity=8 << 30).")
    object.__setattr__(self, "capacity", capacity)


def check_tiers(tiers: Iterable[Tier]) -> tuple[Tier, ...]:
  """``tiers`` as a tuple, if it is a non-empty iterable of `Tier`s with distinct names."""
  if isinstance(tiers, Tier):
    raise TierError(f"TieredStore: tiers must be a sequence of Tier, fastest first, got one "
                    f"Tier ({tiers.name!r}); wrap it in a list, {_TIERS_EXAMPLE}.")
  try:
    tiers = tuple(tiers)
  except TypeError:
    raise TierError(f"TieredStore: tiers must be a sequence of Tier, fastest first, got "
                    f"{tiers!r} ({type_name(tiers)}); {_TIERS_EXAMPLE}.") from None
  bad = [t for t in tiers if not isinstance(t, Tier)]
  if not tiers or bad:
    got = "none" if not tiers else f"{bad[0]!r} ({type_name(bad[0])})"
    raise TierError(f"TieredStore needs at least one jaxpaged.Tier, and only Tiers, "
                    f"fastest first, got {got}; {_TIERS_EXAMPLE}.")
  names = [t.name for t in tiers]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise TierError(f"TieredStore: tier names must be unique, got {names} ({twice} more than "
                    "once); give each tier its own name, e.g. 'pinned' and 'pageable'.")
  return tiers


def check_policy(policy: TierPolicy | None) -> TierPolicy:
  """``policy`` if it is a `TierPolicy` instance, `LRUPolicy()` if it is None."""
  policy = LRUPolicy() if policy is None else policy
  missing = [m for m in ("should_promote", "eviction_candidate")
             if not callable(getattr(policy, m, None))]
  if missing or isinstance(policy, type):
    what = (f"the class {policy.__name__}, not an instance" if isinstance(policy, type)
            else f"{policy!r} ({type_name(policy)}), without {' or '.join(missing)}")
    raise TierError(f"TieredStore: policy must be a TierPolicy, an object with callable "
                    f"should_promote(key, stats) and eviction_candidate(tier, stats) methods, "
                    f"got {what}; pass LRUPolicy(), LFUPolicy(), your own TierPolicy "
                    "instance, or None for LRUPolicy().")
  return policy


def check_on_evict(on_evict: OnEvict | None) -> OnEvict | None:
  """``on_evict`` if it is callable or None."""
  if on_evict is not None and not callable(on_evict):
    raise TierError(f"TieredStore: on_evict must be callable as on_evict(key, value, pinned) "
                    f"or None, got {on_evict!r} ({type_name(on_evict)}); pass a function "
                    "or None.")
  return on_evict
