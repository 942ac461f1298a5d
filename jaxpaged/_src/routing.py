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

The cached prefix of each shard comes from a `PrefixIndex`: per shard, the blocks each tier
holds, as the shard's KV events (`jaxpaged._src.events`) report them. A prompt is hashed once on
the host and its chain of block hashes is walked in every shard's sets; no shard is queried.
`jaxpaged.MultiDeviceCacheManager` and `jaxpaged.models.Server` route with one; a fleet router
feeds one from remote shards' event streams (`PrefixIndex.apply`).

Public API: `ShardLoad`, `Router`, `RoundRobinRouter`, `LeastLoadedRouter`, `PrefixAwareRouter`,
`PrefixIndex`. Internal API: `check_router`, `checked_choice`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Sequence

import numpy as np

from jaxpaged._src import checks
from jaxpaged._src import events as kv_events
from jaxpaged._src.hashing import block_hashes_numpy
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


class PrefixIndex:
  """Per shard, the cached prefix blocks of each tier, fed by the shards' KV events; answers how
  many of a prompt's leading tokens each shard holds cached, without querying any shard.

  A shard's cached prefix is counted as `CacheManager.cached_prefix_tokens` counts it: the
  leading run of the prompt's full blocks (before its last token) on the device, then the run
  after it held in RAM or on disk. Blocks are matched by their chained 64-bit hash, which
  covers the whole prefix and the salt. Unlike `CacheManager.cached_prefix_tokens`, a device
  block counts from its registration, before its K/V are written (as vLLM reports blocks), and a
  disk block counts for the shards whose `DiskStore` indexed it (a directory several shards
  share is read by each, but its blocks count where they were written or read).

  Args:
    num_shards: how many shards, >= 1.
    page_size: tokens per block, their `CacheSpec.page_size`.
    block_hash: their `CacheSpec.block_hash`.

  Use `follow` for managers in this process; `apply` (or `subscriber`) to feed events from
  elsewhere.

  >>> index = PrefixIndex(2, page_size=2)
  >>> hashes = jaxpaged.block_hashes([1, 2, 3, 4], page_size=2)
  >>> for h in hashes:
  ...   index.apply(1, BlockStored("device", block_key(h), None, (), 0))
  >>> index.cached_tokens([1, 2, 3, 4, 5]), index.cached_tokens([1, 2, 9, 9, 5])
  ([0, 4], [0, 2])
  """

  def __init__(self, num_shards: int, *, page_size: int, block_hash: str = "mix64"):
    self.num_shards = checks.integer("num_shards", num_shards, minimum=1,
                                     fix="pass how many shards the index follows")
    self.page_size = checks.integer("page_size", page_size, minimum=1,
                                    fix="pass the shards' CacheSpec.page_size")
    self.block_hash = block_hash
    block_hashes_numpy([], self.page_size, 0, block_hash)  # (checks block_hash)
    self._blocks = [{tier: set() for tier in kv_events.TIERS} for _ in range(self.num_shards)]
    self._managers: list[Any] = []
    self._unsubscribe: list[Callable[[], None]] = []

  @classmethod
  def follow(cls, managers: Sequence[Any]) -> "PrefixIndex":
    """An index subscribed to the KV events of each `CacheManager` in ``managers`` (shard ``i``
    is ``managers[i]``; equal page sizes and hash functions). `close` unsubscribes.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
    >>> managers = [CacheManager(spec), CacheManager(spec)]
    >>> index = PrefixIndex.follow(managers)
    >>> _ = managers[1].admit([1, 2, 3, 4, 5, 6])
    >>> index.cached_tokens([1, 2, 3, 4, 7])
    [0, 4]
    >>> index.close()
    """
    managers = list(managers) if isinstance(managers, (list, tuple)) else None
    if not managers or not all(callable(getattr(m, "subscribe", None)) for m in managers):
      raise JaxPagedError(f"managers must be a non-empty list of jaxpaged.CacheManager, got "
                          f"{managers!r}.")
    specs = {(m.spec.page_size, m.spec.block_hash) for m in managers}
    if len(specs) != 1:
      raise JaxPagedError(f"managers must share one page size and block hash, got {specs}; an "
                          "index matches one prompt hash against every shard.")
    index = cls(len(managers), page_size=managers[0].spec.page_size,
                block_hash=managers[0].spec.block_hash)
    index._managers = managers
    index._unsubscribe = [m.subscribe(index.subscriber(i)) for i, m in enumerate(managers)]
    return index

  def subscriber(self, shard: int) -> Callable[[kv_events.KVEvent], None]:
    """A callback feeding shard ``shard``'s events into the index (for
    `CacheManager.subscribe`, or a remote stream)."""
    shard = checks.integer("shard", shard, minimum=0, below=self.num_shards)
    return lambda event: self.apply(shard, event)

  def apply(self, shard: int, event: kv_events.KVEvent) -> None:
    """Applies one of shard ``shard``'s events (in its stream's order)."""
    kv_events.apply_event(self._blocks[shard], event)

  def blocks(self, shard: int) -> dict[str, set[int]]:
    """Shard ``shard``'s cached block hashes per tier (``"device"``, ``"ram"``, ``"disk"``), as
    its events told."""
    return {tier: set(keys) for tier, keys in self._blocks[shard].items()}

  def refresh(self) -> None:
    """For followed managers: reports what their callers' own jitted steps changed since their
    last operation (`CacheManager.publish_events`), so that the index is current."""
    for manager in self._managers:
      manager.publish_events()

  def cached_tokens(self, tokens: Sequence[int] | np.ndarray, *, salt: int = 0) -> list[int]:
    """Per shard, the prompt's leading tokens it holds cached (see the class docstring): whole
    blocks, before the prompt's last token. The prompt is hashed once, on the host."""
    tokens = checks.host_token_ids("tokens", tokens)
    salt = checks.salt("salt", salt)
    ps = self.page_size
    usable = max(len(tokens) - 1, 0) // ps
    if not usable:
      return [0] * self.num_shards
    lanes = block_hashes_numpy(tokens[:usable * ps], ps, salt, self.block_hash).astype(np.uint64)
    keys = (lanes[:, 0] | (lanes[:, 1] << np.uint64(32))).tolist()
    out = []
    for held in self._blocks:
      device, ram, disk = held["device"], held["ram"], held["disk"]
      i = 0
      while i < usable and keys[i] in device:
        i += 1
      while i < usable and (keys[i] in ram or keys[i] in disk):
        i += 1
      out.append(i * ps)
    return out

  def close(self) -> None:
    """Unsubscribes from the followed managers (the index keeps what it knows)."""
    for unsubscribe in self._unsubscribe:
      unsubscribe()
    self._unsubscribe = []


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
