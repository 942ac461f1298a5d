"""Retention control for `CacheManager`: prefix TTL, pinned prefixes, priority classes, on every
tier (device pool, host RAM, disk).

**Prefix TTL** (``CacheManager(prefix_ttl_seconds=..., clock=...)``): a cached block unused for
longer is expired: dropped (not demoted) from the device and from host RAM by `expire`, which
also runs the disk's own `jaxpaged.DiskStore.expire`, and which `admit`, `extend` and `reserve`
run themselves at most every ``ttl / 4`` seconds. Between those sweeps, expired blocks are the
first to be evicted on device and in RAM. The device's recency clock (``prefix.clock``) counts
operations, not seconds, so the manager notes when it first saw each clock value (after every
operation) and bounds each page's last use by it: a page is expired only once it surely was
not used for ``ttl`` seconds (never early; late by at most the time between two operations).
RAM blocks' last uses are noted as they are demoted and hit. A disk without a TTL of its own
takes the manager's, on its own clock (pass the disk the same clock).

**Pins** (`CacheManager.pin`, `CacheManager.unpin`): the prompt's full blocks cached *now* are
kept, on each tier that holds them, until unpinned: on device a reference is held on their
pages (the allocator cannot evict a referenced page, and they count as used pages); in RAM and
on disk their entries are marked pinned (never chosen by the eviction policies, never
expired). Blocks not cached when `pin` runs are not pinned later. Pins nest: each `pin` of a
prompt (its full blocks and salt) takes its own hold, each `unpin` lets go of the latest one.
Pins are bounded (``max_pinned_pages`` device pages, default half the pool;
``max_pinned_host_bytes`` of RAM, default half of the RAM tiers; half the disk's capacity), so
that sequences and swaps still find room; a pin over a bound is refused and changes nothing.

**Priorities** (``admit(..., priority=p)``, an int, default 0): a block's retention priority is
the highest of the requests that released it on device (set when they end, are swapped out or
preempted); lower priorities are evicted first, before recency, on device and in RAM
(`PriorityPolicy` over the manager's policy), and on disk for the blocks whose priority the
host knows (those demoted through RAM, and the prompt blocks of admissions with a priority).
An expired block goes before any priority.

Without a TTL, a pin or a nonzero priority nothing here runs and every choice is the one the
manager made before.

Internal API: `Retention` (``manager.retention``), `RetentionMixin` (`CacheManager`'s methods),
`PinnedPrefix`, `check_priority`, `check_prefix_ttl`.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import checks, prefix_state, table
from jaxpaged._src.blocks import CachedBlock, block_key
from jaxpaged._src.hashing import block_hashes_numpy
from jaxpaged._src.policy import PriorityPolicy
from jaxpaged._src.spec import JaxPagedError, next_pow2
from jaxpaged._src.transfer import evict_blocks


def check_priority(priority: Any) -> int:
  """``priority`` as an int in ``[MIN_PRIORITY, MAX_PRIORITY]`` (+-2**30)."""
  if not checks.is_int(priority):
    raise JaxPagedError(f"priority must be an int (higher: kept longer; default 0), got "
                        f"{priority!r} ({type(priority).__name__}).")
  if not prefix_state.MIN_PRIORITY <= priority <= prefix_state.MAX_PRIORITY:
    raise JaxPagedError(f"priority must be an int in [-2**30, 2**30], got {priority}.")
  return int(priority)


def check_prefix_ttl(ttl_seconds: Any) -> float | None:
  """``prefix_ttl_seconds`` as a float > 0, or None."""
  if ttl_seconds is None:
    return None
  if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float, np.integer,
                                                                   np.floating)):
    raise JaxPagedError(f"prefix_ttl_seconds must be a number of seconds > 0, or None for no "
                        f"expiry, got {ttl_seconds!r} ({type(ttl_seconds).__name__}).")
  value = float(ttl_seconds)
  if not 0 < value < float("inf"):
    raise JaxPagedError(f"prefix_ttl_seconds must be a finite number of seconds > 0, or None "
                        f"for no expiry, got {ttl_seconds!r}.")
  return value


@dataclasses.dataclass(frozen=True)
class PinnedPrefix:
  """What one `CacheManager.pin` holds (and `CacheManager.unpin` let go of).

  Attributes:
    full_blocks: the prompt's full blocks (``len(tokens) // page_size``).
    tokens: leading prompt tokens whose blocks are pinned on some tier (a later admission of
      the prompt finds them cached, unless a tier's copy is lost to a failure).
    device_blocks: leading blocks pinned on the device (their pages held).
    host_blocks: blocks pinned in host RAM.
    disk_blocks: blocks pinned on disk.

  >>> [f.name for f in dataclasses.fields(PinnedPrefix)]
  ['full_blocks', 'tokens', 'device_blocks', 'host_blocks', 'disk_blocks']
  """
  full_blocks: int
  tokens: int
  device_blocks: int
  host_blocks: int
  disk_blocks: int


@dataclasses.dataclass(frozen=True)
class _Pin:
  """One pin's holds: device pages, RAM keys (with bytes), disk keys (with bytes)."""
  pages: tuple[int, ...]
  ram: tuple[tuple[int, int], ...]
  disk: tuple[tuple[int, int], ...]
  result: PinnedPrefix


# ----------------------------------------------------------------------------- device programs

@jax.jit
def _device_run(cache, hashes, tokens, salt, count):
  """``int32[n]`` the pages of the leading run of the first ``count`` blocks (``hashes``
  ``uint32[n, 2]``, ``tokens`` ``int32[n, page_size]``, ``salt`` ``uint32[2]``) verifiably cached
  and written on device, as `match_prefix` would attach them; -1 past it. A read."""
  prefix = cache.prefix
  pages = table.lookup(prefix.table_lo, prefix.table_hi, prefix.table_pages, hashes)
  parent = jnp.concatenate([jnp.full((1,), prefix_state.NO_PARENT, jnp.int32), pages[:-1]])
  ok = (prefix_state.holds_block(prefix_state.block_view(prefix, pages), hashes, salt[None],
                                 tokens, parent, prefix.page_gen[jnp.clip(parent, 0)])
        & prefix_state.fully_written(prefix, pages) & (jnp.arange(pages.shape[0]) < count))
  return jnp.where(jnp.cumprod(ok).astype(bool), pages, -1)


@functools.partial(jax.jit, static_argnames=("pin",))
def _hold(cache, pages, *, pin: bool):
  """The fields a pin (``pin``) or unpin of ``pages`` (``int32[N]`` distinct, -1 padded)
  changes: ``(cache fields, prefix fields)``. A pin takes a reference on each page (those
  nobody referred to leave the evictable set); an unpin lets go of it: a page nobody refers to
  any more is evictable again, used now (or freed, if its block is no longer cached)."""
  num_pages, prefix = cache.spec.num_pages, cache.prefix
  valid = pages >= 0
  safe = jnp.clip(pages, 0)
  before = cache.ref_counts[safe]
  ref_counts = cache.ref_counts.at[jnp.where(valid, pages, num_pages)].add(
      1 if pin else -1, mode="drop")
  if pin:
    left = jnp.sum(valid & (before == 0), dtype=jnp.int32)
    return dict(ref_counts=ref_counts), dict(num_evictable=prefix.num_evictable - left)
  back = valid & (before == 1)
  cached = back & prefix.page_cached[safe]
  freed = back & ~cached
  push_to = jnp.where(freed, cache.num_free + jnp.cumsum(freed) - 1, num_pages)
  return (dict(ref_counts=ref_counts, num_free=cache.num_free + jnp.sum(freed, dtype=jnp.int32),
               free_pages=cache.free_pages.at[push_to].set(pages, mode="drop")),
          dict(num_evictable=prefix.num_evictable + jnp.sum(cached, dtype=jnp.int32),
               page_last_use=prefix.page_last_use.at[jnp.where(cached, pages, num_pages)].set(
                   prefix.clock, mode="drop"),
               clock=prefix.clock + jnp.any(back)))  # as a release: stamp, then tick


@jax.jit
def _stamp(cache, seq_ids, priorities):
  """``(page_priority, page_priority_gen)`` once sequences ``seq_ids`` (``int32[S]``, -1
  padded) of retention ``priorities`` (``int32[S]``) used their pages: each page's priority
  becomes the highest of theirs and its own (valid since it was handed out)."""
  prefix, num_pages = cache.prefix, cache.spec.num_pages
  live = seq_ids >= 0
  pages = cache.page_table[jnp.where(live, seq_ids, 0)]  # [S, max_pages_per_seq]
  at = jnp.where(live[:, None] & (pages >= 0), pages, num_pages)
  fresh = prefix.page_priority_gen == prefix.page_gen
  floor = prefix_state.MIN_PRIORITY - 1
  stamped = jnp.where(fresh, prefix.page_priority, floor).at[at].max(
      jnp.broadcast_to(priorities[:, None], at.shape), mode="drop")
  touched = jnp.zeros((num_pages,), bool).at[at].set(True, mode="drop")
  return (jnp.where(touched, stamped, prefix_state.effective_priority(prefix)), prefix.page_gen)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _expire_step(cache, expire_before):
  """Sets ``prefix.expire_before`` and drops (frees) every unreferenced cached page last used
  before it. ``(cache, dropped int32[])``."""
  prefix = dataclasses.replace(cache.prefix, expire_before=expire_before)
  pages = jnp.arange(cache.spec.num_pages, dtype=jnp.int32)
  expired = (prefix.page_cached & (cache.ref_counts == 0)
             & (prefix.page_last_use < expire_before))
  cache = evict_blocks(dataclasses.replace(cache, prefix=prefix), jnp.where(expired, pages, -1))
  return cache, jnp.sum(expired, dtype=jnp.int32)


def _replace(cache, fields):
  """``cache`` with ``(cache fields, prefix fields)`` replaced (host side: no copy)."""
  top, inner = fields
  return dataclasses.replace(cache, **top, prefix=dataclasses.replace(cache.prefix, **inner))


# ----------------------------------------------------------------------------- state

class Retention:
  """A `CacheManager`'s retention state (``manager.retention``): see the module docstring.

  Attributes:
    ttl: ``prefix_ttl_seconds`` (None: no expiry). clock: the clock (seconds).
    max_pinned_pages, max_pinned_host_bytes, max_pinned_disk_bytes: the pin bounds.
    counters: ``expired_device_blocks``, ``expired_host_blocks``, ``expired_disk_blocks``.
  """

  def __init__(self, spec, host, *, ttl_seconds=None, clock=None, max_pinned_pages=None,
               max_pinned_host_bytes=None):
    self.spec, self.host = spec, host
    self.ttl = check_prefix_ttl(ttl_seconds)
    clock = time.monotonic if clock is None else clock
    if not callable(clock):
      raise JaxPagedError(f"clock must be a callable returning seconds (e.g. time.monotonic), "
                          f"got {clock!r}.")
    self.clock = clock
    self.max_pinned_pages = (spec.num_pages // 2 if max_pinned_pages is None else checks.count(
        "max_pinned_pages", max_pinned_pages, maximum=spec.num_pages))
    ram = sum(t.capacity for t in host.store.tiers)
    self.max_pinned_host_bytes = (ram // 2 if max_pinned_host_bytes is None else checks.count(
        "max_pinned_host_bytes", max_pinned_host_bytes, maximum=ram))
    disk = host.disk
    self.max_pinned_disk_bytes = 0 if disk is None else disk.index.tiers[0].capacity // 2
    # (device clock, time first seen), increasing clocks; pruned to the horizon.
    self._ticks: list[tuple[int, float]] = []
    self.last_sweep = self.clock() if self.ttl is not None else None
    self.seq_priority: dict[int, int] = {}  # active or swapped sequence -> priority (nonzero)
    self.priorities_used = False  # some admission had a priority: releases stamp them
    self.block_priority: dict[int, int] = {}  # host block key -> priority (those known)
    self.pins: dict[tuple[bytes, int], list[_Pin]] = {}
    self.device_pins: collections.Counter = collections.Counter()  # page -> holds
    self.ram_pins: collections.Counter = collections.Counter()  # block key -> holds
    self.disk_pins: collections.Counter = collections.Counter()
    self._bytes: dict[tuple[str, int], int] = {}  # ("ram" | "disk", key) -> bytes pinned
    self.counters = dict(expired_device_blocks=0, expired_host_blocks=0,
                         expired_disk_blocks=0)
    self._ranked = False
    if self.ttl is not None:
      host.clock = self.clock
      self._rank_host_tiers()
      if disk is not None and disk.ttl_seconds is None:
        disk.ttl_seconds = self.ttl

  def _rank_host_tiers(self) -> None:
    """Puts `PriorityPolicy` (expired first, then lower priority) over the RAM store's and the
    disk's policies, once a TTL or a priority is in use (until then they are left alone)."""
    if self._ranked:
      return
    self._ranked = True
    self.host.store.policy = PriorityPolicy(self.host.store.policy, self._rank)
    if self.host.disk is not None:
      self.host.disk.index.policy = PriorityPolicy(self.host.disk.index.policy, self._rank)

  # --------------------------------------------------------------------------- ranks

  def _rank(self, key, stats) -> tuple[int, int]:
    """A host entry's eviction rank, lower first: (0 if expired else 1, priority)."""
    del stats
    if isinstance(key, tuple):  # the RAM store: ("block", key) or ("seq", id)
      if key[0] != "block":
        return (1, 0)
      key = key[1]
      if self.ttl is not None:
        used = self.host.block_use.get(key)
        if used is not None and used < self.clock() - self.ttl:
          return (0, 0)
    return (1, self.block_priority.get(key, 0))

  # --------------------------------------------------------------------------- TTL

  def observe(self, cache) -> None:
    """Notes the device clock now (after each operation; with a TTL only)."""
    if self.ttl is None or cache.prefix is None:
      return
    tick = int(cache.prefix.clock)
    if not self._ticks or tick > self._ticks[-1][0]:
      self._ticks.append((tick, self.clock()))

  def expire_before(self, now: float) -> int:
    """The device clock below which a page's last use is surely over ``ttl`` seconds ago.

    A page's last-use stamp ``x`` is written by an operation that moves the clock past ``x``
    (a release, an attach) or to ``x`` (a registration): so its use happened before the clock
    was first seen above ``x``, or, for the current clock, first seen at ``x``."""
    horizon = now - self.ttl
    times = [t for _, t in self._ticks]
    j = bisect.bisect_left(times, horizon) - 1  # the last one seen before the horizon
    if j < 0:
      return 0
    self._ticks = self._ticks[j:]
    tick = self._ticks[0][0]
    return tick + 1 if len(self._ticks) == 1 else tick

  def stats(self) -> dict:
    """Pins and expiry counters, as Python values."""
    return dict(pins=sum(len(v) for v in self.pins.values()),
                pinned_pages=len(self.device_pins), pinned_host_blocks=len(self.ram_pins),
                pinned_host_bytes=self._pinned_bytes("ram"), pinned_disk_blocks=len(self.disk_pins),
                pinned_disk_bytes=self._pinned_bytes("disk"), **self.counters)

  # --------------------------------------------------------------------------- priorities

  def admitted(self, seq: int, priority: int, hashes) -> None:
    """An admission of ``priority`` started ``seq``; ``hashes`` its prompt's block hashes."""
    if priority:
      self.priorities_used = True
      self._rank_host_tiers()
      self.seq_priority[seq] = priority
    else:
      self.seq_priority.pop(seq, None)
    if self.priorities_used:
      for h in np.asarray(hashes):
        key = block_key(h)
        self.block_priority[key] = max(self.block_priority.get(key, priority), priority)
      self._prune()

  def released(self, seq_ids) -> None:
    for s in seq_ids:
      self.seq_priority.pop(s, None)

  def stamp(self, cache, seq_ids):
    """``cache`` once sequences ``seq_ids`` (about to end, be swapped out or preempted) gave
    their pages their priority; the same cache without priorities in use."""
    ids = [int(s) for s in seq_ids]
    if not self.priorities_used or not ids or cache.prefix is None:
      return cache
    size = self.spec.max_seqs
    padded = np.full((size,), -1, np.int32)
    padded[:len(ids)] = ids
    prios = np.zeros((size,), np.int32)
    prios[:len(ids)] = [self.seq_priority.get(s, 0) for s in ids]
    priority, gen = _stamp(cache, padded, prios)
    return _replace(cache, ({}, dict(page_priority=priority, page_priority_gen=gen)))

  def demoted(self, contents) -> None:
    """Notes the priorities of the blocks a `transfer.demote_plan` moves to host."""
    if not self.priorities_used:
      return
    hashes, complete, priorities = jax.device_get(
        (contents["hashes"], contents["complete"], contents["priorities"]))
    for i in np.flatnonzero(complete):
      key, priority = block_key(hashes[i]), int(priorities[i])
      if priority:
        self.block_priority[key] = priority
      else:
        self.block_priority.pop(key, None)
    self._prune()

  def _prune(self) -> None:
    """Forgets the priorities of blocks no host tier holds, once there are many."""
    disk = self.host.disk
    held = len(self.host.store) + (0 if disk is None else len(disk)) + self.spec.num_pages
    if len(self.block_priority) > 2 * held + 64:
      self.block_priority = {
          k: p for k, p in self.block_priority.items()
          if ("block", k) in self.host.store or (disk is not None and k in disk.index)}

  # --------------------------------------------------------------------------- pins

  def _pinned_bytes(self, tier: str) -> int:
    return sum(b for (t, _), b in self._bytes.items() if t == tier)

  def snapshot(self):
    return ({k: list(v) for k, v in self.pins.items()}, self.device_pins.copy(),
            self.ram_pins.copy(), self.disk_pins.copy(), dict(self._bytes))

  def restore(self, snapshot) -> None:
    pins, self.device_pins, self.ram_pins, self.disk_pins, self._bytes = snapshot
    self.pins = {k: list(v) for k, v in pins.items()}
    self._sync_host()

  def _sync_host(self) -> None:
    self.host.ram_pins = set(self.ram_pins)
    self.host.disk_pins = set(self.disk_pins)

  def add(self, key, pin: _Pin) -> None:
    self.pins.setdefault(key, []).append(pin)
    self.device_pins.update(pin.pages)
    for tier, counter, held in (("ram", self.ram_pins, pin.ram), ("disk", self.disk_pins,
                                                                   pin.disk)):
      for k, nbytes in held:
        counter[k] += 1
        self._bytes[(tier, k)] = nbytes
    self._sync_host()

  def remove(self, key) -> _Pin:
    pin = self.pins[key].pop()
    if not self.pins[key]:
      del self.pins[key]
    self.device_pins.subtract(pin.pages)
    for tier, counter, held in (("ram", self.ram_pins, pin.ram), ("disk", self.disk_pins,
                                                                   pin.disk)):
      for k, _ in held:
        counter[k] -= 1
        if not counter[k]:
          del self._bytes[(tier, k)]
    self.device_pins, self.ram_pins, self.disk_pins = (
        +self.device_pins, +self.ram_pins, +self.disk_pins)  # drops the zeros
    self._sync_host()
    return pin

  def rename_pages(self, new_of_old) -> None:
    """The device pins follow pages `jaxpaged.defragment` moved (``new_of_old[page]``)."""
    self.pins = {k: [dataclasses.replace(p, pages=tuple(int(new_of_old[q]) for q in p.pages))
                     for p in v] for k, v in self.pins.items()}
    self.device_pins = collections.Counter(
        {int(new_of_old[q]): n for q, n in self.device_pins.items()})

  def check_bounds(self, pages, ram, disk) -> None:
    """Raises if pinning these would pass a bound (nothing changed)."""
    new_pages = len(set(pages) - set(self.device_pins))
    if len(self.device_pins) + new_pages > self.max_pinned_pages:
      raise JaxPagedError(
          f"pin refused: it would hold {len(self.device_pins) + new_pages} device pages, over "
          f"max_pinned_pages={self.max_pinned_pages} ({len(self.device_pins)} pinned already); "
          "unpin other prompts, or build the CacheManager with a larger max_pinned_pages. "
          "Nothing was pinned.")
    for tier, held, counter, bound, name in (
        ("ram", ram, self.ram_pins, self.max_pinned_host_bytes, "max_pinned_host_bytes"),
        ("disk", disk, self.disk_pins, self.max_pinned_disk_bytes, "half the disk capacity")):
      total = self._pinned_bytes(tier) + sum(b for k, b in held if k not in counter)
      if total > bound:
        where = "host RAM" if tier == "ram" else "disk"
        fix = ("build the CacheManager with a larger max_pinned_host_bytes (or more host_bytes)"
               if tier == "ram" else "give the DiskStore more capacity")
        raise JaxPagedError(
            f"pin refused: it would pin {total} bytes of {where}, over {name} = {bound} bytes; "
            f"unpin other prompts, or {fix}. Nothing was pinned.")


def _ram_holds(store, key: int, tokens: np.ndarray, salt: int, end: int) -> bool:
  block = store.peek(("block", key))
  return (isinstance(block, CachedBlock) and block.salt == salt and len(block.tokens) == end
          and np.array_equal(block.tokens, tokens[:end]))


def _repin(host, key: int, pinned: bool, now: float | None) -> None:
  """Marks the RAM block ``key`` pinned or not (a put again: a use)."""
  store_key = ("block", key)
  if store_key in host.store:
    block = host.store.pop(store_key)
    host.store.put(store_key, block, block.nbytes, pinned=pinned)
    if now is not None:
      host.block_use[key] = now


# ----------------------------------------------------------------------------- the manager's

class RetentionMixin:
  """`CacheManager`'s retention methods (`pin`, `unpin`, `expire`); the state is
  ``self.retention`` (`Retention`)."""

  def pin(self, tokens, *, salt: int = 0) -> PinnedPrefix:
    """Keeps the prompt's full blocks cached now from eviction and expiry, on every tier that
    holds them (device, host RAM, disk), until `unpin`.

    Only blocks cached when it is called are pinned (a block computed later is not); on device,
    the leading run that `admit` would attach. Pins nest: each call takes its own hold (pinned
    pages count as used), and `unpin` of the same prompt and salt lets go of the latest one.
    Releasing sequences never unpins.

    Args:
      tokens: the prompt's token ids; its full blocks (``len(tokens) // page_size``) count.
      salt: its prefix-cache salt.

    Returns:
      The `PinnedPrefix`: how many blocks were pinned on each tier.

    Raises:
      JaxPagedError: no full block, bad ids or salt, or over a pin bound
        (``max_pinned_pages``, ``max_pinned_host_bytes``, half the disk); nothing changed.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
    >>> manager = CacheManager(spec)
    >>> first = manager.admit([1, 2, 3, 4, 5, 6, 7, 8, 9])
    >>> k = jnp.ones((first.num_new, 1, 8))
    >>> manager.cache = write_kv(manager.cache, 0, k, k, first.slots[:first.num_new])
    >>> manager.release([first.seq_id])
    >>> manager.pin([1, 2, 3, 4, 5, 6, 7, 8]).device_blocks
    2
    >>> manager.stats()["cached_free_pages"]  # held: not evictable
    0
    >>> manager.unpin([1, 2, 3, 4, 5, 6, 7, 8]).tokens
    8
    >>> manager.stats()["cached_free_pages"]
    2
    """
    r, spec = self.retention, self.spec
    tokens = checks.host_token_ids("tokens", tokens)
    salt = checks.salt("salt", salt)
    ps = spec.page_size
    n = len(tokens) // ps
    if not n:
      raise JaxPagedError(f"pin needs a prompt of at least one full block ({ps} tokens): only "
                          f"full blocks are cached, got {len(tokens)} tokens.")
    tokens = tokens[:n * ps]
    hashes = block_hashes_numpy(tokens, ps, salt, spec.block_hash)
    keys = [block_key(h) for h in hashes]
    pages = self._device_pages(tokens, hashes, salt, n)
    # (by block index: keys repeat across depths under an unchained or constant hash)
    at_ram = [i for i, k in enumerate(keys) if _ram_holds(self.store, k, tokens, salt,
                                                          (i + 1) * ps)]
    ram = [(keys[i], self.store.peek(("block", keys[i])).nbytes) for i in at_ram]
    disk = self.disk
    at_disk = [] if disk is None else [
        i for i, k in enumerate(keys)
        if k in disk.index and disk.holds(k, tokens[:(i + 1) * ps], salt)]
    on_disk = [(keys[i], int(disk.index.peek(keys[i]))) for i in at_disk]
    r.check_bounds(pages, ram, on_disk)
    held = set(range(len(pages))) | set(at_ram) | set(at_disk)
    run = next((i for i in range(n) if i not in held), n)
    result = PinnedPrefix(n, run * ps, len(pages), len(ram), len(on_disk))
    saved = r.snapshot()
    try:
      with self._atomic():
        if pages:
          self.cache = _replace(self.cache, _hold(self.cache, _padded(pages), pin=True))
        for k, _ in ram:
          if k not in r.ram_pins:
            _repin(self.host, k, True, None)
        for k, _ in on_disk:
          if k not in r.disk_pins:
            disk.pin(k)
        r.add((tokens.tobytes(), salt), _Pin(tuple(pages), tuple(ram), tuple(on_disk), result))
    except BaseException:
      r.restore(saved)
      raise
    self._update_pressure()
    return result

  def unpin(self, tokens, *, salt: int = 0) -> PinnedPrefix:
    """Lets go of the latest `pin` of this prompt (its full blocks) and salt; returns what that
    pin held. Blocks no other pin holds become evictable again, counted as used now.

    Raises:
      JaxPagedError: the prompt is not pinned under this salt; nothing changed.

    Example: `pin`.
    """
    r = self.retention
    tokens = checks.host_token_ids("tokens", tokens)
    salt = checks.salt("salt", salt)
    n = len(tokens) // self.spec.page_size
    key = (tokens[:n * self.spec.page_size].tobytes(), salt)
    if key not in r.pins:
      raise JaxPagedError(f"unpin: this prompt ({len(tokens)} tokens, {n} full blocks) is not "
                          f"pinned under salt {salt} ({sum(map(len, r.pins.values()))} pins "
                          "held); unpin the tokens and salt given to pin, once per pin.")
    pin = r.pins[key][-1]
    saved = r.snapshot()
    now = None if r.ttl is None else r.clock()
    try:
      with self._atomic():
        r.remove(key)
        if pin.pages:
          self.cache = _replace(self.cache, _hold(self.cache, _padded(list(pin.pages)),
                                                  pin=False))
        for k, _ in pin.ram:
          if k not in r.ram_pins:
            _repin(self.host, k, False, now)
        for k, _ in pin.disk:
          if k not in r.disk_pins and self.disk is not None:
            self.disk.unpin(k)
    except BaseException:
      r.restore(saved)
      raise
    self._update_pressure()
    return pin.result

  def expire(self) -> dict:
    """Drops the cached blocks unused for over ``prefix_ttl_seconds``, nobody uses and nobody
    pinned: from the device (freed, not demoted) and host RAM, and runs the disk tier's
    `jaxpaged.DiskStore.expire`. `admit`, `extend` and `reserve` run it themselves, at most
    every ``ttl / 4`` seconds. Returns ``{"device_blocks", "host_blocks", "disk_blocks"}``
    dropped (all 0 without a TTL).

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
    >>> now = [0.0]
    >>> manager = CacheManager(spec, prefix_ttl_seconds=60, clock=lambda: now[0])
    >>> first = manager.admit([1, 2, 3, 4, 5])
    >>> k = jnp.ones((first.num_new, 1, 8))
    >>> manager.cache = write_kv(manager.cache, 0, k, k, first.slots[:first.num_new])
    >>> manager.release([first.seq_id])
    >>> now[0] = 61.0
    >>> manager.expire()
    {'device_blocks': 1, 'host_blocks': 0, 'disk_blocks': 0}
    """
    done = self._expire(None if self.retention.ttl is None else self.retention.clock())
    self._update_pressure()
    return done

  def _retain(self) -> None:
    """Start of `admit`, `extend`, `reserve`: with a TTL, a sweep if ``ttl / 4`` passed since
    the last, else the device's expiry clock brought up to date (expired pages go first)."""
    r = self.retention
    if r.ttl is None:
      return
    now = r.clock()
    if now - r.last_sweep >= r.ttl / 4:
      self._expire(now)
      return
    prefix = self.cache.prefix
    if prefix is not None:
      r.observe(self.cache)
      before = r.expire_before(now)
      if before > int(prefix.expire_before):
        self.cache = _replace(self.cache, ({}, dict(expire_before=jnp.asarray(before,
                                                                             jnp.int32))))

  def _expire(self, now) -> dict:
    r = self.retention
    done = dict(device_blocks=0, host_blocks=0, disk_blocks=0)
    if r.ttl is None:
      return done
    r.last_sweep = now
    if self.cache.prefix is not None:
      r.observe(self.cache)
      before = max(r.expire_before(now), int(self.cache.prefix.expire_before))
      self.cache, dropped = _expire_step(self.cache, jnp.asarray(before, jnp.int32))
      done["device_blocks"] = int(dropped)
    host, horizon = self.host, now - r.ttl
    for key in [k for k in self.store.keys() if isinstance(k, tuple) and k[0] == "block"]:
      used = host.block_use.setdefault(key[1], now)
      if used < horizon and key[1] not in r.ram_pins:
        self.store.pop(key)
        done["host_blocks"] += 1
    host.block_use = {k: t for k, t in host.block_use.items() if ("block", k) in self.store}
    if self.disk is not None:
      done["disk_blocks"] = self.disk.expire()
    for name, count in done.items():
      r.counters[f"expired_{name}"] += count
    return done

  def _device_pages(self, tokens, hashes, salt: int, n: int) -> list[int]:
    """The pages of the leading run of the prompt's blocks cached on device."""
    if self.cache.prefix is None:
      return []
    ps, size = self.spec.page_size, next_pow2(n)
    padded_hashes = np.zeros((size, 2), np.uint32)
    padded_hashes[:n] = hashes
    padded_tokens = np.zeros((size, ps), np.int32)
    padded_tokens[:n] = tokens.reshape(n, ps)
    pages = np.asarray(_device_run(self.cache, padded_hashes, padded_tokens,
                                   np.array(checks.split_salt(salt), np.uint32), np.int32(n)))
    return [int(p) for p in pages[:n] if p >= 0]


def _padded(pages: list[int]) -> np.ndarray:
  out = np.full((next_pow2(len(pages)),), -1, np.int32)
  out[:len(pages)] = pages
  return out

