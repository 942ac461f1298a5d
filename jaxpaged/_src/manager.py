"""`CacheManager`: the host-side object serving code talks to.

It owns a `PagedKVCache` and a `TieredStore` of host RAM and calls the jitted core: it admits
requests (prefix hits on device, then on host), extends and releases sequences, swaps sequences
out and in, demotes cached blocks to host RAM when the device pool must make room (instead of
letting the allocator drop them), reports statistics and memory-pressure levels.

Model code that runs jitted steps on the cache takes ``manager.cache`` and gives the new one back
(``manager.cache = new_cache``); allocation goes through the manager so that it can make room
first.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import swap
from jaxpaged._src.cache import (PagedKVCache, _extend_plan, extend, init_cache,
                                 num_cached_free_pages, num_used_pages, release)
from jaxpaged._src.hashing import block_hashes_numpy
from jaxpaged._src.prefix import _match_plan, match_prefix, prefix_stats
from jaxpaged._src.spec import CacheSpec, JaxPagedError, next_pow2
from jaxpaged._src.tier import LRUPolicy, Tier, TieredStore, TierError, TierPolicy


class MemoryPressure(enum.IntEnum):
  """How full the device pool is: pages held by sequences over all pages, against thresholds."""
  LOW = 0
  MEDIUM = 1
  HIGH = 2
  CRITICAL = 3


@dataclasses.dataclass(frozen=True)
class Admission:
  """A request `CacheManager.admit` started.

  Attributes:
    seq_id: its sequence slot.
    num_cached: prompt tokens already in the cache (device hits plus promoted host hits).
    num_new: prompt tokens appended now, to compute: ``tokens[num_cached:num_cached + num_new]``.
    slots: ``int32[num_slots]`` their cache slots (`jaxpaged.extend` layout, one row).
    host_hit_tokens: the part of ``num_cached`` brought back from host RAM.
  """
  seq_id: int
  num_cached: int
  num_new: int
  slots: jax.Array
  host_hit_tokens: int


@functools.partial(jax.jit, static_argnames=("num_slots",))
def _pages_needed(cache, seq_ids, num_new_tokens, *, num_slots):
  """Pages an `extend` would take (0 if it would be refused for another reason)."""
  plan = _extend_plan(cache, seq_ids, num_new_tokens, num_slots)
  return jnp.sum(jnp.where(seq_ids >= 0, plan["need"], 0))


@jax.jit
def _device_matches(cache, seq_ids, tokens, lengths, salts):
  """How many blocks `match_prefix` would attach, and their pages, without attaching them."""
  plan = _match_plan(cache, seq_ids, tokens, lengths, salts, None, 0, "auto", False)
  return plan["matched"], plan["pages"]


class CacheManager:
  """Paged KV cache plus host RAM tier, for serving loops.

  Args:
    spec: the device cache's `CacheSpec` (``prefix_caching=True`` for block demotion/promotion).
    host_bytes: capacity of the single host tier when ``tiers`` is not given.
    tiers: host `Tier`s, fastest first (overrides ``host_bytes``).
    policy: `TierPolicy` for the host tiers and for promoting host hits (default `LRUPolicy()`).
    thresholds: pressure thresholds (medium, high, critical) on the fraction of pages in use.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=4, max_pages_per_seq=4, prefix_caching=True)
  >>> manager = CacheManager(spec, host_bytes=1 << 20)
  >>> request = manager.admit([5, 6, 7, 8, 9, 10])
  >>> request.seq_id, request.num_new, manager.stats()["used_pages"]
  (0, 6, 2)
  >>> manager.swap_out([0]); manager.stats()["swapped_sequences"]
  1
  >>> manager.swap_in([0])
  [True]
  """

  def __init__(self, spec: CacheSpec, *, host_bytes: int = 1 << 30,
               tiers: Sequence[Tier] | None = None, policy: TierPolicy | None = None,
               thresholds: tuple[float, float, float] = (0.6, 0.8, 0.95)):
    if not isinstance(spec, CacheSpec):
      raise JaxPagedError(f"CacheManager expects a CacheSpec, got {type(spec).__name__}.")
    if not (len(thresholds) == 3 and 0 < thresholds[0] <= thresholds[1] <= thresholds[2] <= 1):
      raise JaxPagedError(f"thresholds must be (medium, high, critical) with 0 < medium <= high "
                          f"<= critical <= 1, got {thresholds!r}; the default is (0.6, 0.8, 0.95).")
    self.spec = spec
    self.cache: PagedKVCache = init_cache(spec)
    self.policy = LRUPolicy() if policy is None else policy
    self.store = TieredStore(tiers if tiers is not None else [Tier("host", host_bytes)],
                             self.policy, on_evict=self._on_host_evict)
    self.thresholds = tuple(thresholds)
    self._active: dict[int, int] = {}  # seq -> clock of last use (preemption picks the oldest)
    self._swapped: set[int] = set()
    self._dropped: dict[int, str] = {}
    self._callbacks: list[Callable[[MemoryPressure, MemoryPressure], None]] = []
    self._pressure = MemoryPressure.LOW
    self._clock = 0
    self.counters = dict(allocations=0, allocation_failures=0, swap_outs=0, swap_ins=0,
                         swap_in_failures=0, demoted_blocks=0, demote_dropped=0,
                         promoted_blocks=0, prompt_tokens=0, device_hit_tokens=0,
                         host_hit_tokens=0, lookup_blocks=0, device_hit_blocks=0,
                         host_hit_blocks=0)

  # --------------------------------------------------------------------------- requests

  def estimate_bytes(self, num_tokens: int) -> int:
    """Device bytes ``num_tokens`` tokens take (whole pages, K and V, all layers)."""
    return -(-int(num_tokens) // self.spec.page_size) * self.spec.page_bytes

  def can_allocate(self, num_tokens: int) -> bool:
    """Whether a new sequence of ``num_tokens`` fits now: a free slot and enough pages (free or
    held only by cached blocks, which are demoted to make room). Prefix hits only help."""
    pages = -(-int(num_tokens) // self.spec.page_size)
    return (self._free_slot() is not None and num_tokens <= self.spec.max_seq_len
            and pages <= self.available_pages)

  def admit(self, tokens, *, salt: int = 0, max_new_tokens: int | None = None,
            room_tokens: int | None = None, num_slots: int | None = None) -> Admission | None:
    """Starts a request: attaches its cached prefix (device hits, then host hits the policy
    promotes), then makes room for up to ``max_new_tokens`` of the remaining prompt tokens.

    Args:
      tokens: the prompt's token ids (1-D).
      salt: prefix-cache salt (tenant); blocks are shared only under equal salts.
      max_new_tokens: chunked prefill: at most this many prompt tokens are appended now
        (continue with `extend`). Default: all.
      room_tokens: admit only if the pages of a sequence this long are available now (prefix
        hits count as held), e.g. the whole prompt plus headroom for decoding, so that a serving
        loop does not admit what it would preempt at once. Default: the tokens appended now.
      num_slots: static length of ``slots`` (default: a power of two >= the tokens appended).

    Returns:
      The `Admission`, or None (nothing changed) when no slot or too few pages are free: wait for
      releases, or `swap_out` running sequences.
    """
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    length, ps = len(tokens), self.spec.page_size
    if not 1 <= length <= self.spec.max_seq_len:
      raise JaxPagedError(f"tokens must hold 1..{self.spec.max_seq_len} ids (max_pages_per_seq * "
                          f"page_size), got {length}.")
    seq = self._free_slot()
    args = (self._row(tokens), jnp.array([length], jnp.int32), jnp.array([salt], jnp.int32))
    matched = idle = 0  # blocks found on device; those of them no sequence holds (reclaimable)
    if seq is not None and self.cache.prefix is not None:
      found, pages = _device_matches(self.cache, jnp.array([seq], jnp.int32), *args)
      matched = int(found[0])
      idle = int(np.sum(np.asarray(self.cache.ref_counts)[np.asarray(pages)[0, :matched]] == 0))
    host_blocks = self._host_hits(tokens, salt, matched) if seq is not None else []
    cached = (matched + len(host_blocks)) * ps
    new = length - cached if max_new_tokens is None else min(length - cached, max_new_tokens)
    need = -(-(cached + new) // ps) - matched
    room = need if room_tokens is None else max(need, -(-int(room_tokens) // ps) - matched)
    if seq is None or room > self.available_pages - idle:
      self.counters["allocation_failures"] += 1
      return None
    self.cache, found = match_prefix(self.cache, jnp.array([seq], jnp.int32), *args[:2],
                                     salts=args[2], max_new_tokens=jnp.zeros((1,), jnp.int32),
                                     num_slots=1)
    assert bool(found.ok) and int(found.num_cached[0]) == matched * ps, "prefix probe disagreed"
    if host_blocks:
      self._make_room(len(host_blocks))
      self.cache, ok = swap.promote_blocks(self.cache, seq, host_blocks)
      assert bool(ok), "room was made for the promoted blocks"
      self.counters["promoted_blocks"] += len(host_blocks)
      for block in host_blocks:  # on device again (making room may have evicted it from host)
        if ("block", block.key) in self.store:
          self.store.pop(("block", block.key))
    num_slots = max(next_pow2(new), 1) if num_slots is None else num_slots
    self._make_room(need - len(host_blocks))
    self.cache, slots, ok = extend(self.cache, jnp.array([seq], jnp.int32),
                                   jnp.array([new], jnp.int32), num_slots=num_slots,
                                   tokens=jnp.asarray(np.pad(tokens[cached:cached + new],
                                                             (0, num_slots - new))))
    assert bool(ok), "room was made for the prompt"
    self._active[seq] = self._tick()
    self.counters["allocations"] += 1
    self.counters["prompt_tokens"] += length
    self.counters["device_hit_tokens"] += matched * ps
    self.counters["host_hit_tokens"] += len(host_blocks) * ps
    self.counters["lookup_blocks"] += (length - 1) // ps
    self.counters["device_hit_blocks"] += matched
    self.counters["host_hit_blocks"] += len(host_blocks)
    self._update_pressure()
    return Admission(seq, cached, new, slots, len(host_blocks) * ps)

  def reserve(self, seq_ids, num_new_tokens, *, num_slots: int | None = None,
              preempt: bool = False):
    """Makes room for an `extend` the caller runs itself (inside a jitted model step): demotes
    cached blocks to host RAM while the free pages fall short and, with ``preempt``, swaps out
    the least recently used sequences not in the call until it fits.

    Returns:
      ``(fits, preempted)``: whether the free pages now cover the call, and the sequences
      swapped out to get there.
    """
    seq_ids = jnp.asarray(seq_ids, jnp.int32)
    counts = jnp.asarray(num_new_tokens, jnp.int32)
    num_slots = seq_ids.shape[0] if num_slots is None else num_slots
    rows = [int(s) for s in np.asarray(seq_ids) if s >= 0]
    preempted = []
    need = int(_pages_needed(self.cache, seq_ids, counts, num_slots=num_slots))
    while preempt and need > self.available_pages:
      others = sorted((t, s) for s, t in self._active.items() if s not in rows)
      if not others:
        break
      self.swap_out([others[0][1]])
      preempted.append(others[0][1])
      need = int(_pages_needed(self.cache, seq_ids, counts, num_slots=num_slots))
    self._make_room(need)
    tick = self._tick()
    for s in rows:
      if s in self._active:
        self._active[s] = tick
    return need <= int(self.cache.num_free), preempted

  def extend(self, seq_ids, num_new_tokens, *, tokens=None, num_slots: int | None = None,
             preempt: bool = False):
    """`jaxpaged.extend` on the managed cache, after `reserve` made room for it.

    Returns:
      ``(slots, ok, preempted)``: ``preempted`` lists the sequences swapped out to make room.
    """
    _, preempted = self.reserve(seq_ids, num_new_tokens, num_slots=num_slots, preempt=preempt)
    self.cache, slots, ok = extend(self.cache, jnp.asarray(seq_ids, jnp.int32),
                                   jnp.asarray(num_new_tokens, jnp.int32), num_slots=num_slots,
                                   tokens=tokens)
    if not bool(ok):
      self.counters["allocation_failures"] += 1
    self._update_pressure()
    return slots, ok, preempted

  def release(self, seq_ids) -> None:
    """Ends sequences (their full blocks stay cached); a swapped-out one is dropped from host."""
    ids = [int(s) for s in np.atleast_1d(np.asarray(seq_ids))]
    for s in ids:
      if s in self._swapped:
        self.store.pop(("seq", s))
        self._swapped.discard(s)
      self._active.pop(s, None)
      self._dropped.pop(s, None)
    self.cache = release(self.cache, jnp.asarray(ids, jnp.int32))
    self._update_pressure()

  # --------------------------------------------------------------------------- swapping

  def swap_out(self, seq_ids) -> None:
    """Moves sequences to host RAM, freeing their device pages; their ids stay reserved.

    Raises:
      TierError: the host tier cannot hold them without dropping other swapped sequences;
        nothing changed.
    """
    ids = [int(s) for s in np.atleast_1d(np.asarray(seq_ids))]
    unknown = [s for s in ids if s not in self._active]
    if unknown:
      raise JaxPagedError(f"seq_ids {unknown} are not active sequences of this manager; swap out "
                          "sequences that were admitted and not released or swapped out.")
    swapped = swap.copy_out(self.cache, ids)
    stored = []
    try:
      for s in swapped:
        self.store.put(("seq", s.seq_id), s, s.nbytes, pinned=True)
        stored.append(s.seq_id)
    except TierError:
      for s in stored:
        self.store.pop(("seq", s))
      raise
    self.cache = release(self.cache, jnp.asarray(ids, jnp.int32))
    for s in ids:
      del self._active[s]
      self._swapped.add(s)
    self.counters["swap_outs"] += len(ids)
    self._update_pressure()

  def swap_in(self, seq_ids) -> list[bool]:
    """Brings swapped-out sequences back into their slots, as room allows (demoting cached
    blocks first). A sequence that does not fit stays on host, intact; returns ``ok`` for each."""
    results = []
    for s in [int(s) for s in np.atleast_1d(np.asarray(seq_ids))]:
      if s in self._dropped:
        raise JaxPagedError(f"sequence {s} was dropped from host RAM ({self._dropped[s]}); "
                            "it must be recomputed. Use a policy that never evicts pinned entries "
                            "to keep swapped sequences.")
      if s not in self._swapped:
        raise JaxPagedError(f"sequence {s} is not swapped out; swap_in takes ids given to "
                            "swap_out.")
      swapped = self.store.peek(("seq", s))
      # Its blocks still cached on device are attached, not copied: keep them while making room.
      hits = np.zeros((0,), np.int32)
      if self.cache.prefix is not None and swapped.tokens is not None:
        matched, pages = _device_matches(self.cache, jnp.array([s], jnp.int32),
                                         self._row(swapped.tokens),
                                         jnp.array([swapped.length], jnp.int32),
                                         jnp.array([swapped.salt], jnp.int32))
        hits = np.asarray(pages)[0, :int(matched[0])]
      self._make_room(-(-swapped.length // self.spec.page_size) - len(hits), keep=hits)
      self.cache, ok = swap.swap_in(self.cache, swapped)
      if bool(ok):
        self.store.pop(("seq", s))
        self._swapped.discard(s)
        self._active[s] = self._tick()
        self.counters["swap_ins"] += 1
      else:
        self.counters["swap_in_failures"] += 1
      results.append(bool(ok))
    self._update_pressure()
    return results

  @property
  def available_pages(self) -> int:
    """Pages an allocation can take now: free ones plus those held only by cached blocks
    (demoted to host RAM first)."""
    return int(self.cache.num_free) + int(num_cached_free_pages(self.cache))

  @property
  def swapped(self) -> list[int]:
    """Ids of the sequences on host."""
    return sorted(self._swapped)

  @property
  def active(self) -> list[int]:
    """Ids of the sequences on device."""
    return sorted(self._active)

  # --------------------------------------------------------------------------- host tier

  def _host_hits(self, tokens, salt: int, matched: int) -> list:
    """Consecutive blocks after the device hits that the host holds for exactly this prefix and
    the policy promotes."""
    if self.cache.prefix is None:
      return []
    ps = self.spec.page_size
    usable = (len(tokens) - 1) // ps
    hashes = block_hashes_numpy(tokens[:usable * ps], ps, salt, self.spec.block_hash)
    blocks = []
    for i in range(matched, usable):
      key = ("block", swap.block_key(hashes[i]))
      block = self.store.peek(key)
      if (block is None or block.salt != salt or len(block.tokens) != (i + 1) * ps
          or not np.array_equal(block.tokens, tokens[:(i + 1) * ps])):
        break
      self.store.get(key)  # an access, for recency and frequency
      if not self.store.should_promote(key):
        break
      blocks.append(block)
    return blocks

  def _make_room(self, pages: int, keep=()) -> None:
    """Demotes cached blocks nobody uses (but those in ``keep``) to host RAM until ``pages``
    pages are free."""
    shortfall = pages - int(self.cache.num_free)
    if shortfall <= 0 or self.cache.prefix is None:
      return
    self.cache, blocks = swap.demote_blocks(self.cache, shortfall, keep=keep)
    self.counters["demoted_blocks"] += len(blocks)
    for block in blocks:
      try:
        self.store.put(("block", block.key), block, block.nbytes)
      except TierError:  # the host tier is full of swapped sequences: the block is recomputable
        self.counters["demote_dropped"] += 1

  def _on_host_evict(self, key, value, pinned: bool) -> None:
    if pinned and key[0] == "seq":
      self._swapped.discard(key[1])
      self._dropped[key[1]] = f"evicted by {type(self.policy).__name__} to make room"

  def gc(self) -> dict:
    """Moves every cached block nobody uses from the device to host RAM, freeing its page.

    Returns ``{"pages_freed", "bytes_freed", "blocks_demoted"}``.
    """
    before_free = int(self.cache.num_free)
    before = self.counters["demoted_blocks"]
    self._make_room(before_free + int(num_cached_free_pages(self.cache)))
    freed = int(self.cache.num_free) - before_free
    self._update_pressure()
    return dict(pages_freed=freed, bytes_freed=freed * self.spec.page_bytes,
                blocks_demoted=self.counters["demoted_blocks"] - before)

  # --------------------------------------------------------------------------- stats, pressure

  def stats(self) -> dict:
    """Device pages and bytes, host tiers, sequences, hit rates and counters, as Python values.

    Hit rates are over the prompt blocks looked up by `admit` (full blocks before the last token):
    ``device_hit_rate`` found on device, ``host_hit_rate`` brought back from host RAM.
    """
    spec, cache = self.spec, self.cache
    used = int(num_used_pages(cache))
    lookups = max(self.counters["lookup_blocks"], 1)
    host = self.store.stats()
    return dict(
        total_pages=spec.num_pages, free_pages=int(cache.num_free),
        cached_free_pages=int(num_cached_free_pages(cache)), used_pages=used,
        total_bytes=spec.num_pages * spec.page_bytes, used_bytes=used * spec.page_bytes,
        host_tiers=host["tiers"], host_used_bytes=sum(t["used"] for t in host["tiers"]),
        host_entries=host["entries"], host_evictions=host["evictions"],
        dropped_sequences=host["pinned_evictions"],
        active_sequences=len(self._active), swapped_sequences=len(self._swapped),
        device_hit_rate=self.counters["device_hit_blocks"] / lookups,
        host_hit_rate=self.counters["host_hit_blocks"] / lookups,
        device_evictions=int(prefix_stats(cache)["evictions"]),
        pressure=self._pressure.name, **self.counters)

  def on_pressure(self, callback: Callable[[MemoryPressure, MemoryPressure], None]) -> None:
    """Registers ``callback(old_level, new_level)``, called once on every level change."""
    self._callbacks.append(callback)

  @property
  def pressure(self) -> MemoryPressure:
    """The current `MemoryPressure` level."""
    return self._pressure

  def _update_pressure(self) -> None:
    fraction = int(num_used_pages(self.cache)) / self.spec.num_pages
    level = MemoryPressure(sum(fraction >= t for t in self.thresholds))
    if level != self._pressure:
      old, self._pressure = self._pressure, level
      for callback in self._callbacks:
        callback(old, level)

  # --------------------------------------------------------------------------- helpers

  def _free_slot(self) -> int | None:
    taken = set(self._active) | self._swapped | set(self._dropped)
    return next((s for s in range(self.spec.max_seqs) if s not in taken), None)

  def _row(self, tokens) -> jax.Array:
    """``int32[1, width]``: token ids zero-padded to a power of two (few shapes, few compiles)."""
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    width = max(next_pow2(len(tokens)), self.spec.page_size)
    return jnp.asarray(np.pad(tokens, (0, width - len(tokens))))[None]

  def _tick(self) -> int:
    self._clock += 1
    return self._clock
