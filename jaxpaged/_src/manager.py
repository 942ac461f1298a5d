"""`CacheManager`: the host-side object serving code talks to.

It owns a `PagedKVCache`, a `HostTier` (`jaxpaged._src.host_tier`) and a `PressureMonitor`
(`jaxpaged._src.pressure`), and runs the jitted core (`jaxpaged._src.admission`,
`jaxpaged._src.manager_steps`): it admits
requests (prefix hits on device, then on host), extends and releases sequences, swaps sequences
out and in, demotes cached blocks to host RAM when the device pool must make room (instead of
letting the allocator drop them), reports statistics and memory-pressure levels.

Every operation runs in three phases, so that it either completes or changes nothing:

1. **plan**: argument checks, reads of the device state (pure jitted calls), and every call
   into user code — the tier policy (`TierPolicy.should_promote`, `eviction_candidate`) while
   host entries are looked up and stored. A policy that raises, a full host tier or a refused
   request rolls the host store and the manager's bookkeeping back; the device was not touched.
   Admission needs no read before its step (one host hash, one jitted call) unless cached
   blocks must first be demoted to host RAM (`jaxpaged._src.admission`).
2. **apply**: one jitted step that donates the manager's own cache (updated in place, no pool
   copy) and runs what was planned: it cannot be refused, and no user code runs inside it.
3. **notify**: pressure callbacks, after the state is consistent (a callback that raises does so
   after the operation completed, and the other callbacks still run).

Model code that runs jitted steps on the cache takes ``manager.cache`` and gives the new one back
(``manager.cache = new_cache``); allocation goes through the manager so that it can make room
first (`reserve`). Which sequences to preempt is the scheduler's decision (it asks
`pages_needed`, then calls `swap_out` or `release`); ``preempt=True`` in `reserve` and `extend`
is a convenience for loops without a scheduler: least recently used first.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import admission as steps_admit
from jaxpaged._src import checks
from jaxpaged._src import manager_steps as steps
from jaxpaged._src import swap
from jaxpaged._src.cache import PagedKVCache, check_cache, check_num_slots, init_cache, cdiv
from jaxpaged._src.host_tier import HostTier
from jaxpaged._src.prefix import prefix_stats
from jaxpaged._src.prefix_hooks import evictable
from jaxpaged._src.pressure import DEFAULT_THRESHOLDS, MemoryPressure, PressureMonitor
from jaxpaged._src.spec import CacheSpec, JaxPagedError, next_pow2
from jaxpaged._src.tier import LRUPolicy, Tier, TierPolicy


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


_ENOUGH_SLOTS = object()  # `CacheManager.pages_needed`: as many slots as the rows' tokens


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
               thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS):
    if not isinstance(spec, CacheSpec):
      raise JaxPagedError(f"spec must be a jaxpaged.CacheSpec, got {type(spec).__name__}.")
    if tiers is None:
      tiers = [Tier("host", checks.count("host_bytes", host_bytes))]
    self._monitor = PressureMonitor(thresholds)
    self.spec = spec
    self._cache: PagedKVCache = init_cache(spec)
    self.policy = LRUPolicy() if policy is None else policy
    self.host = HostTier(tiers, self.policy)
    self._active: dict[int, int] = {}  # seq -> clock of last use (preemption picks the oldest)
    self._clock = 0
    self._refused = False
    self.counters = dict(allocations=0, allocation_failures=0, swap_outs=0, swap_ins=0,
                         swap_in_failures=0, demoted_blocks=0, demote_dropped=0,
                         promoted_blocks=0, prompt_tokens=0, device_hit_tokens=0,
                         host_hit_tokens=0, lookup_blocks=0, device_hit_blocks=0,
                         host_hit_blocks=0)

  @property
  def store(self):
    """The host tier's `TieredStore`."""
    return self.host.store

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

  # --------------------------------------------------------------------------- requests

  def estimate_bytes(self, num_tokens: int) -> int:
    """Device bytes ``num_tokens`` tokens take (whole pages, K and V, all layers).

    >>> spec = CacheSpec(num_layers=2, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> CacheManager(spec).estimate_bytes(5) == 2 * spec.page_bytes
    True
    """
    return self._pages(checks.count("num_tokens", num_tokens)) * self.spec.page_bytes

  def can_allocate(self, num_tokens: int) -> bool:
    """Whether a new sequence of ``num_tokens`` fits now: a free slot and enough pages (free or
    held only by cached blocks, which are demoted to make room). Prefix hits only help.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=8)
    >>> manager = CacheManager(spec)
    >>> manager.can_allocate(32), manager.can_allocate(33)
    (True, False)
    """
    num_tokens = checks.count("num_tokens", num_tokens)
    return (self._free_slot() is not None and num_tokens <= self.spec.max_seq_len
            and self._pages(num_tokens) <= self.available_pages)

  def admit(self, tokens: Sequence[int] | np.ndarray, *, salt: int = 0,
            max_new_tokens: int | None = None, room_tokens: int | None = None,
            num_slots: int | None = None) -> Admission | None:
    """Starts a request: attaches its cached prefix (device hits, then host hits the policy
    promotes), then makes room for up to ``max_new_tokens`` of the remaining prompt tokens.

    The prompt is hashed once, on the host; the admission is one jitted call (two when cached
    blocks must first be demoted to host RAM to make room).

    Args:
      tokens: the prompt's token ids (1-D).
      salt: prefix-cache salt (tenant), an int in ``[0, 2**64)``; blocks are shared only under
        equal salts.
      max_new_tokens: chunked prefill: at most this many prompt tokens are appended now
        (continue with `extend`). Default: all.
      room_tokens: admit only if the pages of a sequence this long are available now (prefix
        hits count as held), e.g. the whole prompt plus headroom for decoding, so that a serving
        loop does not admit what it would preempt at once. Default: the tokens appended now.
      num_slots: static length of ``slots``: at most this many tokens are appended now (default:
        a power of two >= the prompt tokens that may be appended).

    Returns:
      The `Admission`, or None (nothing changed) when no slot or too few pages are free: wait for
      releases, or `swap_out` running sequences.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
    >>> manager = CacheManager(spec)
    >>> first = manager.admit([1, 2, 3, 4, 5, 6])
    >>> k = jnp.ones((first.num_new, 1, 8))
    >>> manager.cache = write_kv(manager.cache, 0, k, k, first.slots[:first.num_new])
    >>> manager.release([first.seq_id])
    >>> again = manager.admit([1, 2, 3, 4, 9])  # the first block is cached
    >>> again.num_cached, again.num_new
    (4, 1)
    """
    request, tokens, salt = steps_admit.make_request(self.spec, tokens, salt, max_new_tokens,
                                               room_tokens)
    seq = self._free_slot()
    if seq is None:
      self.counters["allocation_failures"] += 1
      self._update_pressure()
      return None
    length, limit = len(tokens), int(request.limit)
    num_slots = checks.count("num_slots", min(max(next_pow2(min(length, limit)), 1),
                                              self.spec.max_seq_len)
                             if num_slots is None else num_slots, minimum=1,
                             maximum=self.spec.max_seq_len)
    request = request._replace(seq=np.int32(seq))
    with self._atomic():
      blocks = self._host_candidates(tokens, salt, request)
      host = steps_admit.host_blocks(self.spec, blocks)
      victims, demoted = self._admission_room(request, host, num_slots, length)
      cache, plan, slots, done = steps_admit.admit_step(self.cache, victims, request, host,
                                                        num_slots=num_slots)
      self.cache = cache
      plan, done = jax.device_get((plan, done))
      if not plan.ok:
        raise _Refused
      if not done:
        raise RuntimeError("jaxpaged bug: a planned admission was refused by the device")
      promoted = [b for i, b in blocks if plan.matched <= i < plan.matched + plan.promoted]
      self.host.take_blocks(promoted)
      self._count_demoted(demoted)
      self._active[seq] = self._tick()
      self._count_admission(length, int(plan.matched), len(promoted))
    self._update_pressure()
    if self._refused:
      self.counters["allocation_failures"] += 1
      return None
    ps = self.spec.page_size
    cached = (int(plan.matched) + int(plan.promoted)) * ps
    return Admission(seq, cached, int(plan.num_new), slots, int(plan.promoted) * ps)

  def _host_candidates(self, tokens, salt, request):
    if not self.spec.prefix_caching or not len(self.host.store):
      return []
    usable = (len(tokens) - 1) // self.spec.page_size
    hashes = request.hashes[0, :usable]
    return self.host.candidates(tokens, hashes, salt, self.spec.page_size)

  def _admission_room(self, request, host, num_slots: int, length: int):
    """``(victims, demoted)``: when the pool may run short (the most the admission can take
    is over the free pages), plans it first and demotes the cached blocks it needs to host
    RAM; otherwise nothing (no device call)."""
    bound = max(self._pages(length), int(request.room_pages))
    free = int(self.cache.num_free)
    if self.cache.prefix is None or bound <= free:
      return steps.NO_VICTIMS, (0, 0)
    plan, victims, contents = steps_admit.admit_plan(
        self.cache, request, host, num_slots=num_slots, max_victims=next_pow2(bound - free))
    if not bool(plan.ok):
      raise _Refused
    return victims, self.host.store_blocks(swap.cached_blocks(self.spec, contents))

  def _count_admission(self, length: int, matched: int, promoted: int) -> None:
    ps, c = self.spec.page_size, self.counters
    c["allocations"] += 1
    c["prompt_tokens"] += length
    c["device_hit_tokens"] += matched * ps
    c["host_hit_tokens"] += promoted * ps
    c["lookup_blocks"] += (length - 1) // ps
    c["device_hit_blocks"] += matched
    c["host_hit_blocks"] += promoted
    c["promoted_blocks"] += promoted

  def reserve(self, seq_ids, num_new_tokens, *, num_slots: int | None = None,
              preempt: bool = False):
    """Makes room for an `extend` the caller runs itself (inside a jitted model step): demotes
    cached blocks to host RAM while the free pages fall short and, with ``preempt``, swaps out
    the least recently used sequences not in the call until it fits.

    Args:
      seq_ids: ``int32[B]`` active sequences of this manager; -1 for padding rows.
      num_new_tokens: ``int32[B]`` tokens each row appends (>= 0).
      num_slots: the ``num_slots`` the `extend` will use (default B).
      preempt: swap other sequences out if that is what it takes.

    Returns:
      ``(fits, preempted)``: whether the free pages now cover the call, and the sequences
      swapped out to get there. When it cannot fit (even preempting), nothing changes.

    Raises:
      JaxPagedError: a row names a sequence that is not active here (never admitted, released
        or swapped out), repeats one, or would grow it past ``max_seq_len``; nothing changed.
      TierError: preempting needs host room the host tier cannot give; nothing changed.
    """
    plan = self._plan_rows(seq_ids, num_new_tokens, num_slots, preempt)
    if not plan.fits or (not plan.released and not plan.shortfall):  # nothing to move
      if plan.fits:
        self._touch(plan)
      self._update_pressure()
      return plan.fits, []
    with self._atomic():
      victims, demoted = self._stage(plan)
      self.cache = steps.room_step(self.cache, plan.released_ids, victims)
      self._commit(plan, demoted)
    self._update_pressure()
    return True, list(plan.released)

  def pages_needed(self, seq_ids, num_new_tokens) -> int:
    """Pages an `extend` of these rows would take now (new pages, copies of shared last
    pages). A scheduler compares it with `available_pages` to choose what to preempt
    (`swap_out` or `release`) before it calls `reserve`; the manager never chooses for it.

    Arguments as `reserve` (any ``num_slots``); raises as `reserve` does.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> manager = CacheManager(spec, host_bytes=1 << 20)
    >>> seq = manager.admit([1, 2, 3]).seq_id  # 3 tokens: one page, one slot left
    >>> manager.pages_needed([seq], [1]), manager.pages_needed([seq], [2])
    (0, 1)
    """
    return self._plan_rows(seq_ids, num_new_tokens, _ENOUGH_SLOTS, False).need

  def extend(self, seq_ids, num_new_tokens, *, tokens=None, num_slots: int | None = None,
             preempt: bool = False):
    """`jaxpaged.extend` on the managed cache, after making room for it as `reserve` does.

    Returns:
      ``(slots, ok, preempted)``: ``preempted`` lists the sequences swapped out to make room.
      When ``ok`` is False (the pool cannot hold the call), nothing changed.
    """
    plan = self._plan_rows(seq_ids, num_new_tokens, num_slots, preempt)
    if tokens is not None:
      tokens = checks.token_ids("tokens", tokens, (plan.num_slots,))
      if self.cache.prefix is None:
        tokens = None
    if not plan.fits:
      self.counters["allocation_failures"] += 1
      self._update_pressure()
      return jnp.full((plan.num_slots,), -1, jnp.int32), jnp.bool_(False), []
    with self._atomic():
      victims, demoted = self._stage(plan)
      cache, slots, ok = steps.extend_step(self.cache, plan.released_ids, victims, plan.seq_ids,
                                      plan.counts, tokens, num_slots=plan.num_slots)
      self.cache = cache
      if not bool(ok):
        raise RuntimeError("jaxpaged bug: a planned extend was refused by the device")
      self._commit(plan, demoted)
    self._update_pressure()
    return slots, ok, list(plan.released)

  def release(self, seq_ids) -> None:
    """Ends sequences (their full blocks stay cached); a swapped-out one is dropped from host.
    Ids this manager does not hold are ignored."""
    ids = self._ids(seq_ids)
    held = [s for s in ids if s in self._active]
    with self._atomic():
      for s in ids:
        self.host.forget(s)
        self._active.pop(s, None)
      if held:
        self.cache = steps.room_step(self.cache, steps.padded_ids(held, self.spec.max_seqs),
                                     steps.NO_VICTIMS)
    self._update_pressure()

  # --------------------------------------------------------------------------- swapping

  def swap_out(self, seq_ids) -> None:
    """Moves sequences to host RAM, freeing their device pages; their ids stay reserved.

    Raises:
      TierError: the host tier cannot hold them without dropping other swapped sequences;
        nothing changed.
    """
    ids = self._ids(seq_ids)
    unknown = [s for s in ids if s not in self._active]
    if unknown:
      raise JaxPagedError(f"seq_ids {unknown} are not active sequences of this manager; swap out "
                          "sequences that were admitted and not released or swapped out.")
    if len(set(ids)) != len(ids):
      raise JaxPagedError(f"seq_ids {ids} repeat a sequence; name each one once.")
    with self._atomic():
      self.host.put_sequences(swap.copy_out(self.cache, ids))
      self.cache = steps.room_step(self.cache, steps.padded_ids(ids, self.spec.max_seqs),
                                   steps.NO_VICTIMS)
      for s in ids:
        del self._active[s]
      self.counters["swap_outs"] += len(ids)
    self._update_pressure()

  def swap_in(self, seq_ids) -> list[bool]:
    """Brings swapped-out sequences back into their slots, as room allows (demoting cached
    blocks first). A sequence that does not fit stays on host, intact; returns ``ok`` for each."""
    ids = self._ids(seq_ids)
    if len(set(ids)) != len(ids):
      raise JaxPagedError(f"seq_ids {ids} repeat a sequence; name each one once.")
    for s in ids:
      if s in self.host.dropped:
        raise JaxPagedError(f"sequence {s} was dropped from host RAM ({self.host.dropped[s]}); "
                            "it must be recomputed. Use a policy that never evicts pinned entries "
                            "to keep swapped sequences.")
      if s not in self.host.swapped:
        raise JaxPagedError(f"sequence {s} is not swapped out; swap_in takes ids given to "
                            "swap_out.")
    # Plan every sequence first (in order, each as room allows), then one device step for all.
    ref_counts = np.asarray(self.cache.ref_counts)
    available, need, keep, restores, chosen = self.available_pages, 0, set(), [], []
    for s in ids:
      swapped = self.host.sequence(s)
      args, match = swap.swap_in_args(self.cache, swapped)
      # Its blocks still cached on device are attached, not copied: keep them while making room.
      hits = np.zeros((0,), np.int32)
      if match:
        matched, pages = steps.device_matches(
            self.cache, jnp.array([s], jnp.int32), self._row(swapped.tokens[:swapped.length]),
            jnp.array([swapped.length], jnp.int32), self._salt_lanes(swapped.salt)[None])
        hits = np.asarray(pages)[0, :int(matched[0])]
      idle = {int(p) for p in hits if ref_counts[p] == 0} - keep  # attached: not reclaimable
      pages = self._pages(swapped.length) - len(hits)
      if need + pages > available - len(idle):
        continue
      available -= len(idle)
      need += pages
      keep |= {int(p) for p in hits}
      restores.append((args, match))
      chosen.append(s)
    self.counters["swap_in_failures"] += len(ids) - len(chosen)
    if chosen:
      with self._atomic():
        victims, demoted = self._plan_demotion(need, keep=sorted(keep))
        for s in chosen:
          self.host.take_sequence(s)
        cache, ok = steps.restore_step(self.cache, victims, tuple(a for a, _ in restores),
                                  matches=tuple(m for _, m in restores))
        self.cache = cache
        if not bool(ok):
          raise RuntimeError("jaxpaged bug: a planned swap-in was refused by the device")
        self._count_demoted(demoted)
        for s in chosen:
          self._active[s] = self._tick()
        self.counters["swap_ins"] += len(chosen)
    self._update_pressure()
    return [s in chosen for s in ids]

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
    return sorted(self._active)

  def gc(self) -> dict:
    """Moves every cached block nobody uses from the device to host RAM, freeing its page.

    Returns ``{"pages_freed", "bytes_freed", "blocks_demoted"}``.
    """
    before_free = int(self.cache.num_free)
    before = self.counters["demoted_blocks"]
    with self._atomic():
      victims, demoted = self._plan_demotion(before_free + int(evictable(self.cache.prefix)))
      self.cache = steps.room_step(self.cache, steps.padded_ids([], self.spec.max_seqs), victims)
      self._count_demoted(demoted)
    freed = int(self.cache.num_free) - before_free
    self._update_pressure()
    return dict(pages_freed=freed, bytes_freed=freed * self.spec.page_bytes,
                blocks_demoted=self.counters["demoted_blocks"] - before)

  # --------------------------------------------------------------------------- planning

  def _plan_rows(self, seq_ids, num_new_tokens, num_slots, preempt) -> _RowsPlan:
    """Checks an extend of active rows and plans its room: which other sequences to swap out
    (with ``preempt``, least recently used first) and how many pages to free."""
    seq_ids = checks.index_vector("seq_ids", seq_ids)
    counts = checks.index_vector("num_new_tokens", num_new_tokens, seq_ids.shape[0])
    ids, n = np.asarray(seq_ids), np.asarray(counts)
    if num_slots is _ENOUGH_SLOTS:
      num_slots = max(int(np.maximum(n, 0).sum()), 1)
    num_slots = check_num_slots(self.spec, num_slots, seq_ids.shape[0])
    rows = [int(s) for s in ids if s != -1]
    strangers = [s for s in rows if s not in self._active]
    if strangers:
      raise JaxPagedError(f"seq_ids {strangers} are not active sequences of this manager "
                          "(admitted, not released or swapped out); admit or swap_in them "
                          "first, or use -1 for padding rows.")
    if len(set(rows)) != len(rows):
      raise JaxPagedError(f"seq_ids {rows} repeat a sequence; give each one row per call.")
    if (n < 0).any():
      raise JaxPagedError(f"num_new_tokens {n.tolist()} must be >= 0.")
    lengths = np.asarray(self.cache.seq_lens)
    too_long = [s for s, k in zip(ids.tolist(), n.tolist())
                if s != -1 and lengths[s] + k > self.spec.max_seq_len]
    if too_long:
      raise JaxPagedError(f"num_new_tokens would grow sequences {too_long} past max_seq_len = "
                          f"{self.spec.max_seq_len} (max_pages_per_seq * page_size); release "
                          "them or build the cache with a larger max_pages_per_seq.")
    if int(n.sum()) > num_slots:
      raise JaxPagedError(f"num_new_tokens sums to {int(n.sum())}, more than num_slots = "
                          f"{num_slots}; pass a larger num_slots.")
    plan = _RowsPlan(seq_ids, counts, num_slots, [], self.spec.max_seqs)
    need, free, spare = self._room_after(plan)
    others = sorted((t, s) for s, t in self._active.items() if s not in rows)
    while need > free + spare and preempt and others:
      plan.released.append(others.pop(0)[1])
      need, free, spare = self._room_after(plan)
    plan.fits = need <= free + spare
    plan.need, plan.shortfall = need, max(need - free, 0)
    return plan

  def _room_after(self, plan) -> tuple[int, int, int]:
    return tuple(int(x) for x in steps.room(self.cache, plan.released_ids, plan.seq_ids,
                                            plan.counts, num_slots=plan.num_slots))

  def _stage(self, plan):
    """Host half of a rows plan: the preempted sequences go to host RAM (pinned), the blocks
    to demote are chosen and stored. Returns ``(victims, demoted)`` (`_plan_demotion`)."""
    if plan.released:
      self.host.put_sequences(swap.copy_out(self.cache, plan.released))
    return self._plan_demotion(plan.shortfall, released=plan.released_ids, absolute=True)

  def _commit(self, plan, demoted) -> None:
    self._count_demoted(demoted)
    for s in plan.released:
      del self._active[s]
    self.counters["swap_outs"] += len(plan.released)
    self._touch(plan)

  def _touch(self, plan) -> None:
    """The rows of a call were used now (the preemption order)."""
    tick = self._tick()
    for s in np.asarray(plan.seq_ids).tolist():
      if s in self._active:
        self._active[s] = tick

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
                                       swap.keep_pages(self.spec, keep),
                                       max_count=next_pow2(shortfall))
    return victims, self.host.store_blocks(swap.cached_blocks(self.spec, contents))

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
        active_sequences=len(self._active), swapped_sequences=len(self.host.swapped),
        device_hit_rate=self.counters["device_hit_blocks"] / lookups,
        host_hit_rate=self.counters["host_hit_blocks"] / lookups,
        device_evictions=int(prefix_stats(cache)["evictions"]),
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
    """Every operation ends here (pages the caller's own steps took since are counted now)."""
    used = self.spec.num_pages - int(self.cache.num_free) - int(evictable(self.cache.prefix))
    self._monitor.update(used / self.spec.num_pages)

  # --------------------------------------------------------------------------- helpers

  @contextlib.contextmanager
  def _atomic(self):
    """Rolls the host tier and the manager's bookkeeping back if the block raises. The device
    cache too: it is only replaced by the block's last, planned step, and a step that refuses
    (a `_Refused` after it) returns it unchanged. A `_Refused` ends the block quietly, with
    everything else rolled back and ``self._refused`` set."""
    saved = (self._cache, dict(self._active), dict(self.counters), self._clock,
             self.host.snapshot())
    self._refused = False
    try:
      yield
    except BaseException as e:
      cache = self._cache
      (self._cache, self._active, self.counters, self._clock, host) = saved
      self.host.restore(host)
      if not isinstance(e, _Refused):
        raise
      self._cache = cache  # the unchanged cache a refusing step gave back (or the same one)
      self._refused = True

  def _ids(self, seq_ids) -> list[int]:
    array = np.atleast_1d(np.asarray(seq_ids))
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
      raise JaxPagedError(f"seq_ids must be sequence ids (ints), got {seq_ids!r}.")
    ids = [int(s) for s in array.tolist()]
    bad = [s for s in ids if not 0 <= s < self.spec.max_seqs]
    if bad:
      raise JaxPagedError(f"seq_ids {bad} are out of range [0, {self.spec.max_seqs}).")
    return ids

  def _pages(self, num_tokens: int) -> int:
    return cdiv(num_tokens, self.spec.page_size)

  def _free_slot(self) -> int | None:
    taken = set(self._active) | self.host.swapped | set(self.host.dropped)
    return next((s for s in range(self.spec.max_seqs) if s not in taken), None)

  def _row(self, tokens) -> jax.Array:
    """``int32[1, width]``: token ids zero-padded to a power of two (few shapes, few compiles)."""
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    width = max(next_pow2(len(tokens)), self.spec.page_size)
    return jnp.asarray(np.pad(tokens, (0, width - len(tokens))))[None]

  @staticmethod
  def _salt_lanes(salt: int) -> jax.Array:
    return jnp.asarray(np.array([salt & 0xFFFFFFFF, salt >> 32], np.uint32))

  def _tick(self) -> int:
    self._clock += 1
    return self._clock


class _Refused(Exception):
  """Raised inside `CacheManager._atomic` to roll back a refused request quietly."""


@dataclasses.dataclass
class _RowsPlan:
  """An extend's rows and the room it needs: sequences to swap out, pages to free."""
  seq_ids: jax.Array
  counts: jax.Array
  num_slots: int
  released: list
  max_seqs: int
  fits: bool = False
  need: int = 0
  shortfall: int = 0

  @property
  def released_ids(self) -> jax.Array:
    return steps.padded_ids(self.released, self.max_seqs)
