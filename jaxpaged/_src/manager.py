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

import dataclasses
import time
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import admission as steps_admit
from jaxpaged._src import checks
from jaxpaged._src import compress as compress_lib
from jaxpaged._src import defrag
from jaxpaged._src import disk
from jaxpaged._src import manager_steps as steps
from jaxpaged._src import planning
from jaxpaged._src import blocks
from jaxpaged._src import swap
from jaxpaged._src.cache import cdiv, check_host_pools
from jaxpaged._src.manager_core import ManagerCore, Refused
from jaxpaged._src.prefix import match_plan
from jaxpaged._src.prefix_hooks import evictable
from jaxpaged._src.retention import RetentionMixin, check_priority
from jaxpaged._src.spec import JaxPagedError, next_pow2

@jax.jit
def _device_prefix_blocks(cache, request):
  """Leading verified device blocks of ``request``'s prompt, as `admit` would match them
  (whatever its slot: the lookup sees every slot free). A read."""
  view = dataclasses.replace(cache, seq_lens=jnp.zeros_like(cache.seq_lens))
  plan = match_plan(view, jnp.zeros((1,), jnp.int32), request.row, request.length[None],
                    request.salt[None], None, 0, "auto", False, request.hashes)
  return plan.matched[0]


IdsLike = Union[Sequence[int], np.ndarray, jax.Array]  # ids or counts, one per row


@dataclasses.dataclass(frozen=True)
class Admission:
  """A request `CacheManager.admit` started.

  Attributes:
    seq_id: its sequence slot.
    num_cached: prompt tokens already in the cache (device hits plus promoted host hits).
    num_new: prompt tokens appended now, to compute: ``tokens[num_cached:num_cached + num_new]``.
    slots: ``int32[num_slots]`` their cache slots (`jaxpaged.extend` layout, one row).
    host_hit_tokens: the part of ``num_cached`` brought back from host RAM.

  Example: `CacheManager.admit`.

  >>> [f.name for f in dataclasses.fields(Admission)]
  ['seq_id', 'num_cached', 'num_new', 'slots', 'host_hit_tokens']
  """
  seq_id: int
  num_cached: int
  num_new: int
  slots: jax.Array
  host_hit_tokens: int



@dataclasses.dataclass(frozen=True)
class CompressionStats:
  """What `CacheManager.compress_cache` did so far (automatic compressions included).

  Attributes:
    compressed_caches: sequences compressed (calls that went ahead).
    memory_saved_bytes: device pages the compressions let go of (freed, or left to cached
      blocks that may be evicted), times ``spec.page_bytes``.
    avg_compression_ratio: mean of tokens kept / tokens stored, per compression (0 if none).
    avg_compression_time_ms: mean wall time of one compression, device step included.

  >>> [f.name for f in dataclasses.fields(CompressionStats)]
  ['compressed_caches', 'memory_saved_bytes', 'avg_compression_ratio', 'avg_compression_time_ms']
  """
  compressed_caches: int
  memory_saved_bytes: int
  avg_compression_ratio: float
  avg_compression_time_ms: float


class CacheManager(RetentionMixin, ManagerCore):
  """Paged KV cache plus host RAM tier, for serving loops.

  Args:
    spec: the device cache's `CacheSpec` (``prefix_caching=True`` for block demotion/promotion).
    host_bytes: capacity of the single host tier when ``tiers`` is not given.
    tiers: host `Tier`s, fastest first (overrides ``host_bytes``).
    policy: `TierPolicy` for the host tiers and for promoting host hits (default `LRUPolicy()`).
    thresholds: pressure thresholds (medium, high, critical) on the fraction of pages in use.
    device: the `jax.Device` the cache lives on (committed there, so every step of this manager
      runs there); default: JAX's default device.
    disk: a `jaxpaged.DiskStore` of this spec below the host tiers, or None (default): blocks
      evicted from host RAM go there, `admit` reads it after the device's and RAM's hits, and
      `release` writes the sequences' full blocks it lacks (write-through), so that a restarted
      process finds them. ``stats()["disk"]`` and the ``disk_*`` counters report it.
    auto_compress: None (default: off), or a ratio, or ``(ratio, policy)``: when an `extend` or
      `reserve` does not fit, or would preempt, the least recently used active sequences not in
      the call are compressed first (`compress_cache`, default policy `StreamingLLM()`), one at
      a time until it fits; a sequence that already dropped tokens is not compressed again.
      If the call still cannot fit, the compressions are rolled back (the cache as before the
      call: one copy of the pool is kept while trying). Compressing discards tokens, so it is
      only done when asked.
    prefix_ttl_seconds: None (default: no expiry), or seconds: a cached block unused for longer
      is dropped from every tier (`expire`, run by `admit`, `extend` and `reserve` at most
      every ttl / 4 s) and evicted before any other until then. A ``disk`` without a TTL of
      its own takes this one. See `jaxpaged._src.retention`.
    clock: the TTL's clock, a callable returning seconds (default `time.monotonic`).
    max_pinned_pages: at most this many device pages held by `pin` (default num_pages // 2).
    max_pinned_host_bytes: at most this many bytes of host RAM pinned by `pin` (default half
      of the RAM tiers); on disk, at most half its capacity.

  Retention: `pin` / `unpin` keep a prompt's cached blocks on every tier; ``admit(...,
  priority=)`` ranks blocks (lower evicted first); a prefix TTL expires unused ones.

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

  def cached_prefix_tokens(self, tokens: Sequence[int] | np.ndarray, *, salt: int = 0) -> int:
    """How many of the prompt's leading tokens this manager holds cached: the verified device
    hits `admit` would attach, then the run of blocks after them the host tier holds (whether
    or not its policy would promote them). Only full blocks before the last prompt token count,
    as in `admit`. A read: the prompt is hashed once on the host, one jitted call looks it up on
    device; nothing changes (no statistics, no LRU order).

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
    >>> manager = CacheManager(spec)
    >>> first = manager.admit([1, 2, 3, 4, 5, 6])
    >>> k = jnp.ones((first.num_new, 1, 8))
    >>> manager.cache = write_kv(manager.cache, 0, k, k, first.slots[:first.num_new])
    >>> manager.cached_prefix_tokens([1, 2, 3, 4, 9]), manager.cached_prefix_tokens([7, 8])
    (4, 0)
    """
    request, tokens, salt, _ = steps_admit.make_request(self.spec, tokens, salt, None, None, None)
    if not self.spec.prefix_caching:
      return 0
    ps = self.spec.page_size
    matched = int(_device_prefix_blocks(self.cache, request))
    usable = (len(tokens) - 1) // ps
    for i in range(matched, usable):  # the host's run that continues the device hits
      key = blocks.block_key(request.hashes[0, i])
      block = self.store.peek(("block", key))
      end = (i + 1) * ps
      if not (isinstance(block, blocks.CachedBlock) and block.salt == salt
              and len(block.tokens) == end and np.array_equal(block.tokens, tokens[:end])) and (
                  self.disk is None or not self.disk.holds(key, tokens[:end], salt)):
        break
      matched += 1
    return matched * ps

  def admit(self, tokens: Sequence[int] | np.ndarray, *, salt: int = 0,
            max_prompt_tokens: int | None = None, room_tokens: int | None = None,
            num_slots: int | None = None, max_new_tokens: int | None = checks.UNSET,
            priority: int = 0) -> Admission | None:
    """Starts a request: attaches its cached prefix (device hits, then host hits the policy
    promotes), then makes room for up to ``max_prompt_tokens`` of the remaining prompt tokens.

    The prompt is hashed once, on the host; the admission is one jitted call (two when cached
    blocks must first be demoted to host RAM to make room).

    Args:
      tokens: the prompt's token ids (1-D).
      salt: prefix-cache salt (tenant), an int in ``[0, 2**64)``; blocks are shared only under
        equal salts.
      max_prompt_tokens: chunked prefill: at most this many prompt tokens are appended now
        (continue with `extend`). Default: all. (Old name: ``max_new_tokens``, deprecated.)
      room_tokens: admit only if the pages of a sequence this long are available now (prefix
        hits count as held), e.g. the whole prompt plus headroom for decoding, so that a serving
        loop does not admit what it would preempt at once. Default: the tokens appended now.
      num_slots: static length of ``slots``: at most this many tokens are appended now (default:
        a power of two >= the prompt tokens that may be appended).
      priority: retention class, an int (default 0): the request's blocks are kept longer than
        those of lower priorities (evicted after them, on device, in RAM and on disk).

    Returns:
      The `Admission`, or None (nothing changed) when no slot or too few pages are free: wait for
      releases, or `swap_out` running sequences. A pressure callback that raises does so after
      the admission completed (the sequence is in `active`).

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
    limit = checks.renamed("max_prompt_tokens", max_prompt_tokens, "max_new_tokens",
                           max_new_tokens)
    request, tokens, salt, num_slots = steps_admit.make_request(
        self.spec, tokens, salt, limit, room_tokens, num_slots)
    priority = check_priority(priority)
    self._retain()
    seq = self._free_slot()
    if seq is None:
      self.counters["allocation_failures"] += 1
      self._update_pressure()
      return None
    with self._atomic():
      plan, slots = self._admit_step(request._replace(seq=np.int32(seq)), tokens, salt,
                                     num_slots)
    if self._refused:
      self.counters["allocation_failures"] += 1
    else:  # (before the callbacks, which may raise once the admission is complete)
      self.retention.admitted(seq, priority, request.hashes[0, :(len(tokens) - 1) //
                                                            self.spec.page_size])
    self._update_pressure()
    if self._refused:
      return None
    ps = self.spec.page_size
    return Admission(seq, (int(plan.matched) + int(plan.promoted)) * ps, int(plan.num_new), slots,
                     int(plan.promoted) * ps)

  def _admit_step(self, request, tokens, salt: int, num_slots: int):
    """Inside a transaction: host candidates, room (demoting first if need be), the step, and
    the bookkeeping of what it did. Returns the device's ``(plan, slots)``."""
    blocks, held = self._host_candidates(tokens, salt, request)
    host = steps_admit.host_blocks(self.spec, blocks)
    victims, demoted = self._admission_room(request, host, num_slots, len(tokens))
    self.registry.add(int(request.seq))  # before the step: an interrupt after it keeps it
    cache, plan, slots, done = steps_admit.admit_step(self.cache, victims, request, host,
                                                      num_slots=num_slots)
    self.cache = cache
    plan, done = jax.device_get((plan, done))
    if not plan.ok:
      raise Refused
    if not done:
      raise RuntimeError("jaxpaged bug: a planned admission was refused by the device")
    promoted = [b for i, b in blocks if plan.matched <= i < plan.matched + plan.promoted]
    from_disk = sum(b.key in self.host.read_from_disk for b in promoted)
    self.counters["disk_hit_blocks"] += from_disk
    self.counters["disk_hit_tokens"] += from_disk * self.spec.page_size
    if held:
      usable = (len(tokens) - 1) // self.spec.page_size
      self.host.record_hits(request.hashes[0, :usable], held, int(plan.matched), len(promoted))
    self.host.take_blocks(promoted)
    self._count_demoted(demoted)
    self._count_admission(len(tokens), int(plan.matched), len(promoted))
    return plan, slots

  def adopt(self, swapped: swap.SwappedSequence) -> int | None:
    """Takes in a sequence swapped out of another manager of the same spec (`swap.copy_out`
    of its cache; e.g. `jaxpaged.MultiDeviceCacheManager.move_sequence`): puts it in a free
    slot and swaps it in here, bit-exactly, its full blocks registered in this prefix cache.

    Returns:
      Its sequence id here, or None when no slot or too few pages are free (nothing changed).

    Raises:
      JaxPagedError: ``swapped`` is not a `jaxpaged.SwappedSequence` of this spec.
      TierError: the host tier cannot stage it; nothing changed. A policy that raises leaves
        everything as before too.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> source, target = CacheManager(spec), CacheManager(spec)
    >>> seq = source.admit([1, 2, 3, 4, 5]).seq_id
    >>> _, (moved,) = swap_out(source.cache, [seq])
    >>> target.adopt(moved), target.stats()["used_pages"]
    (0, 2)
    """
    if not isinstance(swapped, swap.SwappedSequence):
      raise JaxPagedError(f"swapped must be a jaxpaged.SwappedSequence (from swap_out), got "
                          f"{type(swapped).__name__}.")
    if not 1 <= swapped.length <= self.spec.max_seq_len:
      raise JaxPagedError(f"swapped.length must be in [1, {self.spec.max_seq_len}], got "
                          f"{swapped.length}; move sequences only between equal specs.")
    check_host_pools(self.spec, swapped, "swapped", min_pages=cdiv(swapped.length,
                                                                    self.spec.page_size))
    seq = self._free_slot()
    if seq is None:
      self._update_pressure()
      return None
    with self._atomic():  # (no user callback inside: pressure is updated after it)
      self.host.put_sequences([dataclasses.replace(swapped, seq_id=seq)])
      if not self._restore([seq]):
        raise Refused
    self._update_pressure()
    return None if self._refused else seq

  def _host_candidates(self, tokens, salt, request):
    if not self.spec.prefix_caching or (not len(self.host.store) and self.disk is None):
      return [], []
    usable = (len(tokens) - 1) // self.spec.page_size
    hashes = request.hashes[0, :usable]
    # The disk is read only after the device's hits (one lookup finds where they end).
    start = 0 if self.disk is None else int(_device_prefix_blocks(self.cache, request))
    return self.host.candidates(tokens, hashes, salt, self.spec.page_size, start)

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
      raise Refused
    self.retention.demoted(contents)
    return victims, self.host.store_blocks(blocks.cached_blocks(self.spec, contents))

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

  def reserve(self, seq_ids: IdsLike, num_new_tokens: IdsLike, *, num_slots: int | None = None,
              preempt: bool = False) -> tuple[bool, list[int]]:
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
    self._retain()
    plan = self._plan_rows(seq_ids, num_new_tokens, num_slots, preempt)
    plan = self._compress_for_room(plan, seq_ids, num_new_tokens, num_slots, preempt)
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

  def pages_needed(self, seq_ids: IdsLike, num_new_tokens: IdsLike) -> int:
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
    return self._plan_rows(seq_ids, num_new_tokens, planning.ENOUGH_SLOTS, False).need

  def extend(self, seq_ids: IdsLike, num_new_tokens: IdsLike, *, tokens: IdsLike | None = None,
             num_slots: int | None = None, preempt: bool = False
             ) -> tuple[jax.Array, jax.Array, list[int]]:
    """`jaxpaged.extend` on the managed cache, after making room for it as `reserve` does.

    Returns:
      ``(slots, ok, preempted)``: ``preempted`` lists the sequences swapped out to make room.
      When ``ok`` is False (the pool cannot hold the call), nothing changed.
    """
    self._retain()
    plan = self._plan_rows(seq_ids, num_new_tokens, num_slots, preempt)
    plan = self._compress_for_room(plan, seq_ids, num_new_tokens, num_slots, preempt)
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

  def release(self, seq_ids: IdsLike) -> None:
    """Ends sequences (their full blocks stay cached); a swapped-out one is dropped from host.
    Ids this manager does not hold are ignored."""
    ids = self.registry.check_ids(seq_ids)
    held = [s for s in ids if s in self.registry.active]
    self.cache = self.retention.stamp(self.cache, held)  # their blocks' priority
    with self._atomic():
      self._save_to_disk(held)
      for s in ids:
        self.host.forget(s)
        self.registry.remove(s)
      if held:
        self.cache = steps.room_step(self.cache, steps.padded_ids(held, self.spec.max_seqs),
                                     steps.NO_VICTIMS)
    self.retention.released(ids)
    self._update_pressure()

  def _save_to_disk(self, seq_ids: list[int]) -> None:
    """Writes the sequences' registered, written blocks the disk tier lacks (write-through on
    release, so that another process finds them)."""
    if self.disk is not None and seq_ids:
      self.counters["disk_saved_blocks"] += disk.save_prefixes(self.cache, self.disk, seq_ids)

  # --------------------------------------------------------------------------- swapping

  def swap_out(self, seq_ids: IdsLike) -> None:
    """Moves sequences to host RAM, freeing their device pages; their ids stay reserved.

    Raises:
      TierError: the host tier cannot hold them without dropping other swapped sequences;
        nothing changed.
    """
    ids = self.registry.check_ids(seq_ids)
    unknown = [s for s in ids if s not in self.registry.active]
    if unknown:
      raise JaxPagedError(f"seq_ids {unknown} are not active sequences of this manager; swap out "
                          "sequences that were admitted and not released or swapped out.")
    if len(set(ids)) != len(ids):
      raise JaxPagedError(f"seq_ids {ids} repeat a sequence; name each one once.")
    self.cache = self.retention.stamp(self.cache, ids)  # their blocks' priority
    with self._atomic():
      self.host.put_sequences(swap.copy_out(self.cache, ids))
      self.cache = steps.room_step(self.cache, steps.padded_ids(ids, self.spec.max_seqs),
                                   steps.NO_VICTIMS)
      for s in ids:
        self.registry.remove(s)
      self.counters["swap_outs"] += len(ids)
    self._update_pressure()

  def swap_in(self, seq_ids: IdsLike) -> list[bool]:
    """Brings swapped-out sequences back into their slots, as room allows (demoting cached
    blocks first). A sequence that does not fit stays on host, intact; returns ``ok`` for each."""
    ids = self.registry.check_ids(seq_ids)
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
    chosen = self._restore(ids)
    self._update_pressure()
    return [s in chosen for s in ids]

  def _restore(self, ids: list[int]) -> list[int]:
    """`swap_in`'s work on checked ids, without the pressure update (no user callback runs):
    plans every sequence first (in order, each as room allows), then one device step for all.
    Returns the ids brought back."""
    need, keep, restores, chosen = planning.plan_swap_ins(self.spec, self.cache, self.host, ids,
                                                          self.available_pages)
    self.counters["swap_in_failures"] += len(ids) - len(chosen)
    if chosen:
      with self._atomic():
        victims, demoted = self._plan_demotion(need, keep=keep)
        for s in chosen:
          self.host.take_sequence(s)
        cache, ok = steps.restore_step(self.cache, victims, tuple(a for a, _ in restores),
                                  matches=tuple(m for _, m in restores))
        self.cache = cache
        if not bool(ok):
          raise RuntimeError("jaxpaged bug: a planned swap-in was refused by the device")
        self._count_demoted(demoted)
        for s in chosen:
          self.registry.add(s)
        self.counters["swap_ins"] += len(chosen)
    return chosen

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

  def defragment(self) -> dict:
    """Moves the live pages (in use, or holding cached blocks) to the lowest page ids
    (`jaxpaged.defragment`, in this manager's own donating step): outputs are unchanged, and
    the free pages are the pool's tail, which `resize` can give back.

    Returns ``{"pages_moved", "live_pages"}``.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=4, max_pages_per_seq=4)
    >>> manager = CacheManager(spec)
    >>> first, second = manager.admit([1] * 8), manager.admit([2] * 4)
    >>> manager.release([first.seq_id])
    >>> manager.defragment()
    {'pages_moved': 1, 'live_pages': 1}
    """
    self._cache, new_of_old = steps.defragment_step(self.cache)
    new_of_old = np.asarray(new_of_old)
    moved = int(np.sum(new_of_old != np.arange(new_of_old.size))) // 2  # each move is a swap
    self.retention.rename_pages(new_of_old)
    self._update_pressure()
    return dict(pages_moved=moved, live_pages=self.spec.num_pages - int(self.cache.num_free))

  def resize(self, num_pages: int) -> None:
    """Grows the device pool to ``num_pages`` pages, or shrinks it to that when its live pages
    fit (`jaxpaged.resize`: defragments to shrink), so a server gives memory back or takes more
    without a restart. The manager's spec becomes `jaxpaged.resize`'s; a default
    ``max_pinned_pages`` (half the pool) follows, a set one is capped at the new size. Jitted
    steps compile once for the new spec.

    Raises:
      JaxPagedError: the live pages do not fit in ``num_pages`` (nothing changed; `gc` first
        moves unused cached blocks to host RAM).

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=4, max_pages_per_seq=4)
    >>> manager = CacheManager(spec)
    >>> request = manager.admit([1] * 6)
    >>> manager.resize(4); manager.stats()["total_pages"], manager.stats()["free_pages"]
    (4, 2)
    """
    old = self.spec.num_pages
    new, new_of_old = defrag.resize_core(self.cache, num_pages)
    self.retention.rename_pages(new_of_old)
    r = self.retention
    r.max_pinned_pages = (new.spec.num_pages // 2 if r.max_pinned_pages == old // 2
                          else min(r.max_pinned_pages, new.spec.num_pages))
    self.spec = r.spec = new.spec
    self._cache = new
    self._update_pressure()

  # --------------------------------------------------------------------------- compression

  def compress_cache(self, seq_id: int, ratio: float, policy=None, *, scores=None) -> bool:
    """Keeps about ``ratio`` of an active sequence's tokens (`jaxpaged.compress`, in this
    manager's own donating step) and frees the rest of its pages.

    Args:
      seq_id: an active sequence of this manager (admitted, not released or swapped out).
      ratio: the fraction kept, in ``(0, 1]``.
      policy: `StreamingLLM()` (default), `KeyNorm()` or `H2O()` (with ``scores``).
      scores: `H2O` only, ``float[max_seq_len]`` per stored token, higher kept.

    Returns:
      True, or False when the pool has no room for the compressed copies (its pages are
      shared or cached, so they are not reused); then nothing changed.

    Raises:
      JaxPagedError: an unknown, swapped-out or empty sequence, a bad ratio or policy;
        nothing changed.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> manager = CacheManager(spec)
    >>> seq = manager.admit(list(range(1, 17))).seq_id  # 16 tokens, 4 pages
    >>> manager.compress_cache(seq, 0.5)
    True
    >>> stats = manager.compression_stats()
    >>> stats.compressed_caches, stats.memory_saved_bytes == 2 * spec.page_bytes
    (1, True)
    """
    seq = checks.integer("seq_id", seq_id, minimum=0, below=self.spec.max_seqs)
    if seq in self.host.swapped:
      raise JaxPagedError(f"seq_id {seq} is swapped out; swap_in([{seq}]) before compressing "
                          "it.")
    if seq not in self.registry.active:
      raise JaxPagedError(f"seq_id {seq} is not an active sequence of this manager (active: "
                          f"{self.active}); compress sequences that were admitted and not "
                          "released.")
    ratio = compress_lib.check_ratio(ratio)
    policy = compress_lib.check_policy(policy)
    if scores is not None:
      scores = jnp.asarray(scores)[None] if getattr(scores, "ndim", 1) == 1 else scores
    scores = compress_lib.check_scores(policy, scores, 1, self.spec.max_seq_len)
    if int(self.cache.seq_lens[seq]) == 0:
      raise JaxPagedError(f"seq_id {seq} holds no tokens yet; compress it after its tokens "
                          "are appended.")
    ok = self._compress(seq, ratio, policy, scores)
    self._update_pressure()
    return ok

  def _compress(self, seq: int, ratio, policy, scores=None, *, donate: bool = True) -> bool:
    """`compress_cache`'s work on checked arguments, without the pressure update (``donate``
    False: the cache before it stays alive, for a rollback)."""
    before_len = int(self.cache.seq_lens[seq])
    before_used = self._used_pages()
    start = time.perf_counter()
    step = steps.compress_step if donate else steps.compress_copy_step
    with self._atomic():
      cache, ok = step(self.cache, jnp.asarray([seq], jnp.int32), ratio, scores, policy=policy)
      self.cache = cache
      if not bool(ok):
        raise Refused
    if self._refused:
      return False
    jax.block_until_ready(self.cache.seq_lens)
    c = self._compression
    c["calls"] += 1
    c["ms"] += (time.perf_counter() - start) * 1e3
    c["ratio"] += int(self.cache.seq_lens[seq]) / before_len
    c["pages"] += before_used - self._used_pages()
    return True

  def _used_pages(self) -> int:
    return self.spec.num_pages - int(self.cache.num_free) - int(evictable(self.cache.prefix))

  def compression_stats(self) -> CompressionStats:
    """The `CompressionStats` of every compression so far."""
    c = self._compression
    n = max(c["calls"], 1)
    return CompressionStats(compressed_caches=c["calls"],
                            memory_saved_bytes=c["pages"] * self.spec.page_bytes,
                            avg_compression_ratio=c["ratio"] / n,
                            avg_compression_time_ms=c["ms"] / n)

  def _compress_for_room(self, plan, seq_ids, num_new_tokens, num_slots, preempt):
    """With ``auto_compress``: while the rows do not fit (or would preempt), compresses the
    least recently used active sequences not in the call that never dropped tokens, then plans
    again. Returns the last plan. If the rows still do not fit, every compression is rolled
    back (the first one kept its input alive) and the first plan is returned."""
    if self._auto_compress is None or (plan.fits and not plan.released):
      return plan
    ratio, policy = self._auto_compress
    in_call = set(np.asarray(plan.seq_ids).tolist())
    evicted = np.asarray(self.cache.num_evicted)
    before, before_stats, first_plan = self.cache, dict(self._compression), plan
    compressed = False
    for s in self.registry.least_recent(in_call):
      if evicted[s] > 0 or int(self.cache.seq_lens[s]) == 0:
        continue
      compressed |= self._compress(s, jnp.float32(ratio), policy, donate=compressed)
      plan = self._plan_rows(seq_ids, num_new_tokens, num_slots, preempt)
      if plan.fits and not plan.released:
        break
    if compressed and not plan.fits:  # the call fails: it changes nothing
      self.cache, self._compression = before, before_stats
      return first_plan
    return plan

  # --------------------------------------------------------------------------- planning

  def _plan_rows(self, seq_ids, num_new_tokens, num_slots, preempt) -> planning.RowsPlan:
    return planning.plan_rows(self.spec, self.cache, self.registry, seq_ids, num_new_tokens,
                              num_slots, preempt)

  def _stage(self, plan):
    """Host half of a rows plan: the preempted sequences go to host RAM (pinned), the blocks
    to demote are chosen and stored. Returns ``(victims, demoted)`` (`_plan_demotion`)."""
    if plan.released:
      self.cache = self.retention.stamp(self.cache, plan.released)  # their blocks' priority
      self.host.put_sequences(swap.copy_out(self.cache, plan.released))
    return self._plan_demotion(plan.shortfall, released=plan.released_ids, absolute=True)

  def _commit(self, plan, demoted) -> None:
    self._count_demoted(demoted)
    for s in plan.released:
      self.registry.remove(s)
    self.counters["swap_outs"] += len(plan.released)
    self._touch(plan)
