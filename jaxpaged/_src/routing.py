"""Routers: which data shard (replica of the cache, on one device) takes a new request.

Data parallelism on the host: every shard is a `CacheManager` on one device of the mesh's
``data`` axis, with its own prefix cache. A router sees, per shard, a `ShardLoad`: the work the
shard holds and how many of the request's leading prompt tokens it has cached
(`CacheManager.cached_prefix_tokens`, device and host tiers), and returns a shard index.

- `RoundRobinRouter`: shards in turn, blind to load and cache.
- `LeastLoadedRouter`: the least loaded shard (lowest index on ties).
- `PrefixAwareRouter`: SGLang's cache-aware routing: the shard holding the longest cached prefix
  of the request, unless its load exceeds the least loaded shard's by more than
  ``balance_threshold``; then (or when no shard holds any of it) the least loaded shard.

Any object with a ``choose(request, shards) -> int`` method is a router (`Router` is the base
class to subclass); the caller checks the index it returns.

Public API: `ShardLoad`, `Router`, `RoundRobinRouter`, `LeastLoadedRouter`, `PrefixAwareRouter`.
Internal API: `check_router`, `checked_choice`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

from jaxpaged._src.spec import JaxPagedError


@dataclasses.dataclass(frozen=True)
class ShardLoad:
  """What a router knows of one shard for one request.

  Attributes:
    load: the work the shard holds, in the caller's unit (`jaxpaged.models.Server`: requests
      assigned and not finished; `MultiDeviceCacheManager`: pages in use), >= 0.
    cached_tokens: the request's leading prompt tokens the shard holds cached, >= 0.

  >>> ShardLoad(load=3, cached_tokens=32)
  ShardLoad(load=3, cached_tokens=32)
  """
  load: float
  cached_tokens: int


class Router:
  """Base class of routers: `choose` returns the index of the shard that takes ``request``.

  >>> class First(Router):
  ...   def choose(self, request, shards):
  ...     return 0
  >>> First().choose([1, 2, 3], [ShardLoad(0, 0), ShardLoad(0, 0)])
  0
  """

  def choose(self, request: Any, shards: Sequence[ShardLoad]) -> int:
    """The index into ``shards`` of the shard that takes ``request`` (its prompt's token ids;
    a router may ignore it)."""
    raise NotImplementedError(f"{type(self).__name__} must define choose(request, shards)")


class RoundRobinRouter(Router):
  """Shards in turn (0, 1, ..., then 0 again), blind to load and cache.

  >>> router, shards = RoundRobinRouter(), [ShardLoad(0, 0)] * 2
  >>> [router.choose([1], shards) for _ in range(3)]
  [0, 1, 0]
  """

  def __init__(self):
    self.next = 0

  def choose(self, request: Any, shards: Sequence[ShardLoad]) -> int:
    """The next shard in turn."""
    shards = check_shards(shards)
    index = self.next % len(shards)
    self.next = index + 1
    return index


class LeastLoadedRouter(Router):
  """The shard with the least load (the lowest index among equals).

  >>> LeastLoadedRouter().choose([1], [ShardLoad(2, 0), ShardLoad(1, 8), ShardLoad(1, 0)])
  1
  """

  def choose(self, request: Any, shards: Sequence[ShardLoad]) -> int:
    """The least loaded shard."""
    return least_loaded(check_shards(shards))


class PrefixAwareRouter(Router):
  """Cache-aware routing (SGLang's): the shard that holds the longest cached prefix of the
  request (the less loaded, then the lower index, among equals), unless its load exceeds the
  least loaded shard's by more than ``balance_threshold``, or no shard holds any of it: then the
  least loaded shard.

  Args:
    balance_threshold: the load above the least loaded shard's that a prefix hit still
      justifies, >= 0 (in the unit of `ShardLoad.load`). Default 4 (requests, for the server).

  >>> router = PrefixAwareRouter(balance_threshold=2)
  >>> router.choose([1], [ShardLoad(1, 0), ShardLoad(3, 16)])  # 2 more: still the hit
  1
  >>> router.choose([1], [ShardLoad(1, 0), ShardLoad(4, 16)])  # 3 more: balance instead
  0
  """

  def __init__(self, balance_threshold: float = 4):
    if (isinstance(balance_threshold, bool) or not isinstance(balance_threshold, (int, float))
        or not math.isfinite(balance_threshold) or balance_threshold < 0):
      raise JaxPagedError(f"balance_threshold must be a finite number >= 0 (load above the least "
                          f"loaded shard's a prefix hit may cost), got {balance_threshold!r}; "
                          "e.g. 4.")
    self.balance_threshold = balance_threshold

  def choose(self, request: Any, shards: Sequence[ShardLoad]) -> int:
    """The shard with the longest cached prefix, unless that unbalances the load."""
    shards = check_shards(shards)
    lightest = least_loaded(shards)
    best = min(range(len(shards)),
               key=lambda i: (-shards[i].cached_tokens, shards[i].load, i))
    if (shards[best].cached_tokens == 0
        or shards[best].load - shards[lightest].load > self.balance_threshold):
      return lightest
    return best


# ----------------------------------------------------------------------------- internal

def least_loaded(shards: Sequence[ShardLoad]) -> int:
  """Index of the least loaded shard (the lowest among equals)."""
  return min(range(len(shards)), key=lambda i: (shards[i].load, i))


def check_shards(shards: Sequence[ShardLoad]) -> list[ShardLoad]:
  """``shards`` as a non-empty list of `ShardLoad` with loads and cached tokens >= 0."""
  shards = list(shards) if isinstance(shards, (list, tuple)) else None
  if not shards or not all(isinstance(s, ShardLoad) and s.load >= 0 and s.cached_tokens >= 0
                           for s in shards):
    raise JaxPagedError(f"shards must be a non-empty list of jaxpaged.ShardLoad with load and "
                        f"cached_tokens >= 0, one per data shard, got {shards!r}.")
  return shards


def check_router(router: Any) -> Any:
  """``router``, checked to have a callable ``choose``."""
  if not callable(getattr(router, "choose", None)):
    raise JaxPagedError(f"router must have a choose(request, shards) -> int method (e.g. "
                        f"jaxpaged.PrefixAwareRouter()), got {type(router).__name__}.")
  return router


def checked_choice(router: Any, request: Any, shards: Sequence[ShardLoad]) -> int:
  """``router.choose(request, shards)``, checked to be a shard index."""
  index = router.choose(request, list(shards))
  if (isinstance(index, bool) or not isinstance(index, numbers.Integral)
      or not 0 <= index < len(shards)):
    raise JaxPagedError(f"{type(router).__name__}.choose must return a shard index in "
                        f"[0, {len(shards)}), got {index!r}; fix the router.")
  return int(index)
