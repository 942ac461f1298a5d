"""The state and bookkeeping under `CacheManager`: its parts, transactions, demotion, pressure.

`ManagerCore` owns the manager's parts — the device cache, a `HostTier`
(`jaxpaged._src.host_tier`), a `SequenceRegistry` (`jaxpaged._src.registry`) and a
`PressureMonitor` (`jaxpaged._src.pressure`) — and the few things every operation shares. Its
subclass `CacheManager` (`jaxpaged._src.manager`) holds the operations; the protected methods
here (`_atomic`, `_update_pressure`, `_plan_demotion`, `_count_demoted`, `_touch`, `_pages`,
`_free_slot`) are that subclass's interface, and `Refused` ends a transaction quietly.

Internal API: `ManagerCore`, `Refused`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import checks
from jaxpaged._src import events as kv_events
from jaxpaged._src import manager_steps as steps
from jaxpaged._src import retention
from jaxpaged._src import blocks
from jaxpaged._src.cache import PagedKVCache, cdiv, check_cache, init_cache
from jaxpaged._src.disk import DiskStore, check_disk_store, layout_of
from jaxpaged._src.host_tier import HostTier
from jaxpaged._src.prefix import prefix_stats
from jaxpaged._src.prefix_hooks import evictable
from jaxpaged._src.pressure import DEFAULT_THRESHOLDS, MemoryPressure, PressureMonitor
from jaxpaged._src.registry import SequenceRegistry
from jaxpaged._src.spec import CacheSpec, JaxPagedError, next_pow2
from jaxpaged._src.tier import LRUPolicy, Tier, TierPolicy


class ManagerCore:
  """`CacheManager`'s state: see `CacheManager` for the arguments."""

  def __init__(self, spec: CacheSpec, *, host_bytes: int = 1 << 30,
               tiers: Sequence[Tier] | None = None, policy: TierPolicy | None = None,
               thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS,
               device: jax.Device | None = None, auto_compress=None,
               disk: DiskStore | None = None, prefix_ttl_seconds: float | None = None,
               clock: Callable[[], float] | None = None, max_pinned_pages: int | None = None,
               max_pinned_host_bytes: int | None = None):
    if not isinstance(spec, CacheSpec):
      raise JaxPagedError(f"spec must be a jaxpaged.CacheSpec, got {type(spec).__name__}.")
    self._auto_compress = _check_auto_compress(auto_compress)
    # compressed_caches, pages_saved, sum of kept/stored ratios, sum of milliseconds
    self._compression = dict(calls=0, pages=0, ratio=0.0, ms=0.0)
    if tiers is None:
      tiers = [Tier("host", checks.count("host_bytes", host_bytes))]
    self._monitor = PressureMonitor(thresholds)
    self.spec = spec
    if device is not None and not isinstance(device, jax.Device):
      raise JaxPagedError(f"device must be a jax.Device (e.g. jax.devices()[1]) or None for the "
                          f"default device, got {type(device).__name__}.")
    self.device = device
    if device is None:
      self._cache: PagedKVCache = init_cache(spec)
    else:  # built there, and committed: every step of this manager then runs there
      with jax.default_device(device):
        self._cache = jax.device_put(init_cache(spec), device)
    self.policy = LRUPolicy() if policy is None else policy
    disk = check_disk_store(disk)
    if disk is not None and not spec.prefix_caching:
      raise JaxPagedError("disk= keeps prefix blocks: build the spec with "
                          "CacheSpec(..., prefix_caching=True), or pass disk=None.")
    if disk is not None and disk.layout != layout_of(spec, disk.layout.model):
      raise JaxPagedError(f"disk holds blocks of layout {disk.layout} but this manager's spec "
                          "stores another; open the DiskStore with this manager's spec.")
    self.host = HostTier(tiers, self.policy, disk)
    self.retention = retention.Retention(  # TTL, pins, priorities (`jaxpaged._src.retention`)
        spec, self.host, ttl_seconds=prefix_ttl_seconds, clock=clock,
        max_pinned_pages=max_pinned_pages, max_pinned_host_bytes=max_pinned_host_bytes)
    self.registry = SequenceRegistry(spec.max_seqs)
    self._kv_events = kv_events.KVEvents(self)  # reads nothing until someone subscribes
    self._refused = False
    self.counters = dict(allocations=0, allocation_failures=0, swap_outs=0, swap_ins=0,
                         swap_in_failures=0, demoted_blocks=0, demote_dropped=0,
                         promoted_blocks=0, prompt_tokens=0, device_hit_tokens=0,
                         host_hit_tokens=0, lookup_blocks=0, device_hit_blocks=0,
                         host_hit_blocks=0, disk_hit_tokens=0, disk_hit_blocks=0,
                         disk_saved_blocks=0)

  @property
  def store(self):
    """The host tier's `TieredStore`."""
    return self.host.store

  @property
  def disk(self) -> DiskStore | None:
    """The disk tier (`jaxpaged.DiskStore`), or None."""
    return self.host.disk

  @property
  def thresholds(self) -> tuple[float, float, float]:
    """The pressure thresholds (medium, high, critical)."""
    return self._monitor.thresholds

  @property
  def cache(self) -> PagedKVCache:
    """The managed cache. A model step that ran on it gives the new one back by assignment
    (``manager.cache = new_cache``); it must be a live cache of this manager's spec."""
    check_cache(self._cache, "manager.cache")
    return self._cache

  @cache.setter
  def cache(self, cache: PagedKVCache) -> None:
    if check_cache(cache, "manager.cache") != self.spec:
      raise JaxPagedError(f"manager.cache must be a cache of this manager's spec {self.spec}, "
                          f"got one of {cache.spec}; give back what your step returned for "
                          "manager.cache.")
    self._cache = cache

  @property
  def available_pages(self) -> int:
    """Pages an allocation can take now: free ones plus those held only by cached blocks
    (demoted to host RAM first)."""
    return int(self.cache.num_free) + int(evictable(self.cache.prefix))

  @property
  def swapped(self) -> list[int]:
    """Ids of the sequences on host."""
    return sorted(self.host.swapped)

  @property
  def active(self) -> list[int]:
    """Ids of the sequences on device."""
    return sorted(self.registry.active)

  def _touch(self, plan) -> None:
    """The rows of a call were used now (the preemption order)."""
    self.registry.touch(np.asarray(plan.seq_ids).tolist())

  def _plan_demotion(self, pages: int, keep=(), released=None, absolute=False):
    """Chooses the cached blocks to demote so that ``pages`` pages are free (``absolute``:
    ``pages`` is already the shortfall, after releasing ``released``), reads them and puts them
    in the host store (the device step evicts them). Returns ``(victims, (demoted, dropped))``:
    the victims for the device step, blocks stored, blocks the host had no room for."""
    shortfall = pages if absolute else pages - int(self.cache.num_free)
    if shortfall <= 0 or self.cache.prefix is None:
      return steps.NO_VICTIMS, (0, 0)
    released = steps.padded_ids([], self.spec.max_seqs) if released is None else released
    victims, contents = steps.demotion_plan(self.cache, released, jnp.int32(shortfall),
                                       blocks.keep_pages(self.spec, keep),
                                       max_count=next_pow2(shortfall))
    self.retention.demoted(contents)
    return victims, self.host.store_blocks(blocks.cached_blocks(self.spec, contents))

  def _count_demoted(self, demoted) -> None:
    self.counters["demoted_blocks"] += demoted[0]
    self.counters["demote_dropped"] += demoted[1]

  # --------------------------------------------------------------------------- stats, pressure

  def stats(self) -> dict:
    """Device pages and bytes, host tiers, sequences, hit rates and counters, as Python values.

    Hit rates are over the prompt blocks looked up by `admit` (full blocks before the last token):
    ``device_hit_rate`` found on device, ``host_hit_rate`` brought back from host RAM.
    """
    spec, cache = self.spec, self.cache
    used = spec.num_pages - int(cache.num_free) - int(evictable(cache.prefix))
    lookups = max(self.counters["lookup_blocks"], 1)
    host = self.store.stats()
    return dict(
        total_pages=spec.num_pages, free_pages=int(cache.num_free),
        cached_free_pages=int(evictable(cache.prefix)), used_pages=used,
        total_bytes=spec.num_pages * spec.page_bytes, used_bytes=used * spec.page_bytes,
        host_tiers=host["tiers"], host_used_bytes=sum(t["used"] for t in host["tiers"]),
        host_entries=host["entries"], host_evictions=host["evictions"],
        dropped_sequences=host["pinned_evictions"],
        active_sequences=len(self.registry.active), swapped_sequences=len(self.host.swapped),
        device_hit_rate=self.counters["device_hit_blocks"] / lookups,
        host_hit_rate=self.counters["host_hit_blocks"] / lookups,
        device_evictions=int(prefix_stats(cache)["evictions"]),
        disk=None if self.disk is None else self.disk.stats(),
        retention=self.retention.stats(),
        pressure=self.pressure.name, **self.counters)

  def on_pressure(self, callback: Callable[[MemoryPressure, MemoryPressure], None]) -> None:
    """Registers ``callback(old_level, new_level)``, called once on every level change, after
    the operation that changed the level completed.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=4,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> manager, heard = CacheManager(spec), []
    >>> manager.on_pressure(lambda old, new: heard.append(new.name))
    >>> _ = manager.admit(list(range(1, 15)))  # 4 of 4 pages
    >>> heard, manager.pressure.name
    (['CRITICAL'], 'CRITICAL')
    """
    self._monitor.on_change(callback)

  @property
  def pressure(self) -> MemoryPressure:
    """The current `MemoryPressure` level."""
    return self._monitor.level

  def _update_pressure(self) -> None:
    """Every operation ends here (pages the caller's own steps took since are counted now), and
    reports its KV events (those of the caller's own steps since too)."""
    try:
      self._kv_events.publish()
    finally:
      self.retention.observe(self.cache)  # the device clock's times, for a prefix TTL
      used = self.spec.num_pages - int(self.cache.num_free) - int(evictable(self.cache.prefix))
      self._monitor.update(used / self.spec.num_pages)

  # --------------------------------------------------------------------------- KV events

  def subscribe(self, callback: Callable[[kv_events.KVEvent], None], *, initial: bool = True
                ) -> Callable[[], None]:
    """Registers ``callback(event)`` for this manager's KV events (`jaxpaged.BlockStored`,
    `jaxpaged.BlockRemoved`, `jaxpaged.AllBlocksCleared`, for the ``"device"``, ``"ram"`` and
    ``"disk"`` tiers; `jaxpaged._src.events`), delivered in order after each operation
    completed. ``initial``: it first hears every block cached now, so that
    `jaxpaged.replay_events` of what it hears is exactly what each tier holds. Returns a
    function that unsubscribes it. Costs nothing until someone subscribes; then a small device
    read per operation.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
    >>> manager, heard = CacheManager(spec), []
    >>> unsubscribe = manager.subscribe(heard.append)
    >>> _ = manager.admit([1, 2, 3, 4, 5])
    >>> [(type(e).__name__, e.tier, e.token_ids) for e in heard]
    [('BlockStored', 'device', (1, 2, 3, 4))]
    >>> unsubscribe()
    """
    return self._kv_events.subscribe(callback, initial=initial)

  def publish_events(self) -> None:
    """Reports now what the caller's own jitted steps changed in the cache since the last
    operation (blocks registered by `jaxpaged.extend` with token ids), instead of at the next
    operation. Nothing to do without subscribers."""
    self._kv_events.publish()

  # --------------------------------------------------------------------------- helpers

  @contextlib.contextmanager
  def _atomic(self):
    """Rolls the host tier and the manager's bookkeeping back if the block raises. The device
    cache too: it is only replaced by the block's last, planned step, and a step that refuses
    (a `Refused` after it) returns it unchanged. A `Refused` ends the block quietly, with
    everything else rolled back and ``self._refused`` set."""
    saved = (self._cache, self.registry.snapshot(), dict(self.counters), self.host.snapshot())
    live = not self._cache.k_pages.is_deleted()  # (a caller may have donated it: refused later)
    self._refused = False
    try:
      yield
    except BaseException as e:
      if not isinstance(e, Refused) and live and saved[0].k_pages.is_deleted():
        raise  # interrupted after our device step committed: there is no state before it
      cache = self._cache
      self._cache, registry, self.counters, host = saved
      self.registry.restore(registry)
      self.host.restore(host)
      if not isinstance(e, Refused):
        raise
      self._cache = cache  # the unchanged cache a refusing step gave back (or the same one)
      self._refused = True

  def _pages(self, num_tokens: int) -> int:
    return cdiv(num_tokens, self.spec.page_size)

  def _free_slot(self) -> int | None:
    return self.registry.free_slot(self.host.swapped | set(self.host.dropped))


def _check_auto_compress(value):
  """``auto_compress`` as ``(ratio, policy)`` or None: a ratio, or a (ratio, policy) pair."""
  from jaxpaged._src import compress
  if value is None:
    return None
  ratio, policy = (value if isinstance(value, tuple) and len(value) == 2 else (value, None))
  try:
    compress.check_ratio(ratio)
  except JaxPagedError as e:
    raise JaxPagedError(f"auto_compress must be None (off), a ratio in (0, 1] or a (ratio, "
                        f"policy) pair, got {value!r}: {e}") from None
  return float(ratio), compress.check_policy(policy)


class Refused(Exception):
  """Raised inside `CacheManager._atomic` to roll back a refused request quietly."""
