"""`MultiDeviceCacheManager`: host-level data parallelism, one `CacheManager` per device.

Each data shard is a full `CacheManager` (its own cache, prefix cache, host RAM tier and
pressure level) whose cache is committed to one device of the mesh's ``data`` axis, so its
jitted steps run there. Sequences are addressed by a global id (``shard``, local id) the
manager hands out on `MultiDeviceCacheManager.admit`; a router (`jaxpaged._src.routing`) or a
device preference decides which shard takes a new sequence. `move_sequence` moves one between
shards bit-exactly (a swap-out of the source, a swap-in on the target), `rebalance` moves
sequences until the shards' used-page fractions are within a tolerance.

This is the host-level layer; `jaxpaged.ShardedCache` (`jaxpaged._src.sharding`) is the
single-program (SPMD) one, where one jitted program runs every shard.

Public API: `MultiDeviceCacheManager`. Internal API: `data_devices`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from jaxpaged._src import checks
from jaxpaged._src import routing
from jaxpaged._src import swap
from jaxpaged._src.manager import Admission, CacheManager
from jaxpaged._src.pressure import DEFAULT_THRESHOLDS
from jaxpaged._src.spec import CacheSpec, JaxPagedError
from jaxpaged._src.tier import TierPolicy


def data_devices(devices: Sequence[jax.Device] | None = None, mesh: Any = None,
                 name: str = "devices") -> list[jax.Device]:
  """The devices of the data shards: ``devices``, or those along ``mesh``'s ``data`` axis (its
  ``model`` axis must be 1: one device per shard), or every device; checked."""
  if mesh is not None:
    if devices is not None:
      raise JaxPagedError(f"pass {name} or mesh, not both; the mesh's data axis gives the "
                          "devices.")
    shape = dict(getattr(mesh, "shape", {}))
    if set(shape) != {"data", "model"}:
      raise JaxPagedError(f"mesh must be a jax.sharding.Mesh with axes ('data', 'model') "
                          f"(jaxpaged.make_mesh), got {type(mesh).__name__} with axes "
                          f"{tuple(shape)}.")
    if shape["model"] != 1:
      raise JaxPagedError(f"mesh must have model=1 here (one device per data shard), got "
                          f"model={shape['model']}; use jaxpaged.make_mesh(data, 1), or "
                          "jaxpaged.ShardedCache for tensor parallelism.")
    grid = np.asarray(mesh.devices)
    return list(grid[:, 0]) if grid.ndim == 2 else list(grid.reshape(-1))
  devices = list(jax.devices()) if devices is None else devices
  if (not isinstance(devices, (list, tuple)) or not devices
      or not all(isinstance(d, jax.Device) for d in devices)):
    raise JaxPagedError(f"{name} must be a non-empty list of jax.Device (e.g. jax.devices()[:2]), "
                        f"got {devices!r}.")
  if len(set(devices)) != len(devices):
    raise JaxPagedError(f"{name} must name each device once, got {list(devices)}; one shard per "
                        "device.")
  return list(devices)


class MultiDeviceCacheManager:
  """Data-parallel paged KV caches: one `CacheManager` per device, sequences by global id.

  Args:
    spec: every shard's `CacheSpec`.
    devices: one `jax.Device` per data shard (default: all of JAX's devices), or
    mesh: a ``(data, model=1)`` mesh (`jaxpaged.make_mesh`): its data axis.
    router: chooses the shard of a new sequence (default `PrefixAwareRouter`; load: pages in
      use); `set_device_preference` overrides it.
    host_bytes: each shard's host RAM tier, in bytes.
    policies: one `TierPolicy` per shard (default `LRUPolicy` each).
    thresholds: each shard's pressure thresholds.

  Attributes:
    managers: the shards' `CacheManager`, in device order.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=4, max_pages_per_seq=4, prefix_caching=True)
  >>> multi = MultiDeviceCacheManager(spec, mesh=make_mesh(2, 1))
  >>> a, _ = multi.admit([1, 2, 3, 4, 5])
  >>> b, _ = multi.admit([6, 7, 8])  # least loaded: the other shard
  >>> multi.shard_of(a), multi.shard_of(b)
  (0, 1)
  >>> multi.move_sequence(b, 0)
  True
  >>> [s["used_pages"] for s in multi.device_stats()]
  [3, 0]
  """

  def __init__(self, spec: CacheSpec, devices: Sequence[jax.Device] | None = None, *,
               mesh: Any = None, router: routing.Router | None = None,
               host_bytes: int = 1 << 30, policies: Sequence[TierPolicy] | None = None,
               thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS):
    if not isinstance(spec, CacheSpec):
      raise JaxPagedError(f"spec must be a jaxpaged.CacheSpec, got {type(spec).__name__}.")
    self._devices = data_devices(devices, mesh)
    if policies is not None and (not isinstance(policies, (list, tuple))
                                 or len(policies) != len(self._devices)):
      raise JaxPagedError(f"policies must be a list of one TierPolicy per shard "
                          f"({len(self._devices)}), got {policies!r}; or None for LRU each.")
    self.router = routing.check_router(routing.PrefixAwareRouter() if router is None else router)
    self.spec = spec
    self.managers = [
        CacheManager(spec, host_bytes=host_bytes, thresholds=thresholds, device=d,
                     policy=None if policies is None else policies[i])
        for i, d in enumerate(self._devices)]
    self._where: dict[int, tuple[int, int]] = {}  # global id -> (shard, local id)
    self._next_id = 0
    self._preference: int | None = None
    self._index: routing.PrefixIndex | None = None  # fed by the shards' KV events, from the
    # first routed admission on

  # --------------------------------------------------------------------------- placement

  @property
  def supported_devices(self) -> list[jax.Device]:
    """The shards' devices, in shard order.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> import jax
    >>> MultiDeviceCacheManager(spec, jax.devices()[:2]).supported_devices == jax.devices()[:2]
    True
    """
    return list(self._devices)

  @property
  def num_shards(self) -> int:
    """How many data shards."""
    return len(self.managers)

  def set_device_preference(self, device: jax.Device | int | None) -> None:
    """New sequences go to ``device`` (a supported device, or a shard index) first, the other
    shards (least loaded first) only when it has no room; None: the router decides again.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> multi = MultiDeviceCacheManager(spec, mesh=make_mesh(2, 1))
    >>> multi.set_device_preference(1)
    >>> [multi.shard_of(multi.admit([1, 2])[0]) for _ in range(2)]
    [1, 1]
    """
    self._preference = None if device is None else self._shard_index("device", device)

  def _shard_index(self, name: str, shard) -> int:
    if isinstance(shard, jax.Device):
      if shard not in self._devices:
        raise JaxPagedError(f"{name} {shard} is not one of this manager's devices "
                            f"{self._devices}; pass one of supported_devices or a shard index.")
      return self._devices.index(shard)
    return checks.integer(name, shard, minimum=0, below=len(self.managers),
                          fix="pass a shard index or one of supported_devices")

  def shard_of(self, seq_id: int) -> int:
    """The shard holding global sequence ``seq_id``. Example: the class's."""
    return self.locate(seq_id)[0]

  def locate(self, seq_id: int) -> tuple[int, int]:
    """``(shard, local id)`` of global sequence ``seq_id``: ``managers[shard]`` holds it as
    ``local id`` (model code runs its steps there).

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> multi = MultiDeviceCacheManager(spec, mesh=make_mesh(2, 1))
    >>> multi.locate(multi.admit([1, 2, 3])[0])
    (0, 0)
    """
    if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)) \
        or int(seq_id) not in self._where:
      raise JaxPagedError(f"seq_id must be a global id this manager gave out (admit) and that "
                          f"was not released, got {seq_id!r}; live ids: {sorted(self._where)}.")
    return self._where[int(seq_id)]

  @property
  def seq_ids(self) -> list[int]:
    """The live global ids (active or swapped out)."""
    return sorted(self._where)

  def cached_prefix_tokens(self, tokens: Sequence[int] | np.ndarray, *, salt: int = 0
                           ) -> list[int]:
    """Per shard, `CacheManager.cached_prefix_tokens` (a read). Example: `admit`."""
    return [m.cached_prefix_tokens(tokens, salt=salt) for m in self.managers]

  def admit(self, tokens: Sequence[int] | np.ndarray, *, salt: int = 0,
            **kwargs: Any) -> tuple[int, Admission] | None:
    """Admits a request on the preferred device, else on the router's shard (the shards'
    `ShardLoad`: pages in use, cached prefix tokens from a `jaxpaged.PrefixIndex` that follows
    the shards' KV events): `CacheManager.admit` there (same keyword arguments). Returns
    ``(global id, Admission)`` (its ``seq_id`` is the shard's local id), or None when the
    chosen shard has no room (nothing changed).

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=4, max_pages_per_seq=4, prefix_caching=True)
    >>> multi = MultiDeviceCacheManager(spec, mesh=make_mesh(2, 1))
    >>> first, admission = multi.admit([1, 2, 3, 4, 5, 6])
    >>> k = jnp.ones((admission.num_new, 1, 8))
    >>> shard = multi.managers[multi.shard_of(first)]
    >>> shard.cache = write_kv(shard.cache, 0, k, k, admission.slots[:admission.num_new])
    >>> multi.cached_prefix_tokens([1, 2, 3, 4, 9])
    [4, 0]
    >>> _ = multi.admit([7, 8, 9, 10, 11])  # goes to the empty shard
    >>> again, admission = multi.admit([1, 2, 3, 4, 9])  # the shard holding its prefix
    >>> multi.shard_of(again), admission.num_cached
    (0, 4)
    """
    if self._preference is not None:
      order = [self._preference] + sorted(
          (i for i in range(len(self.managers)) if i != self._preference),
          key=lambda i: (self._load(i), i))
    else:
      if self._index is None:
        self._index = routing.PrefixIndex.follow(self.managers)
      self._index.refresh()  # (blocks the caller's own steps registered since)
      loads = [routing.ShardLoad(self._load(i), c)
               for i, c in enumerate(self._index.cached_tokens(tokens, salt=salt))]
      order = [routing.checked_choice(self.router, tokens, loads)]
    for shard in order:
      admission = self.managers[shard].admit(tokens, salt=salt, **kwargs)
      if admission is not None:
        return self._register(shard, admission.seq_id), admission
    return None

  def _load(self, shard: int) -> int:
    return self.managers[shard].stats()["used_pages"]

  def _register(self, shard: int, local: int) -> int:
    seq_id, self._next_id = self._next_id, self._next_id + 1
    self._where[seq_id] = (shard, local)
    return seq_id

  def release(self, seq_ids: Sequence[int]) -> None:
    """Ends global sequences (their full blocks stay cached on their shard); all ids are
    checked first.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> multi = MultiDeviceCacheManager(spec, mesh=make_mesh(2, 1))
    >>> seq, _ = multi.admit([1, 2, 3])
    >>> multi.release([seq]); multi.seq_ids
    []
    """
    where = [self.locate(s) for s in seq_ids]
    if len(set(where)) != len(where):
      raise JaxPagedError(f"seq_ids {list(seq_ids)} repeat a sequence; name each one once.")
    for s, (shard, local) in zip(seq_ids, where):
      del self._where[int(s)]
      self.managers[shard].release([local])

  def swap_out(self, seq_id: int) -> None:
    """`CacheManager.swap_out` of one global sequence on its shard (atomic as there).

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> multi = MultiDeviceCacheManager(spec, mesh=make_mesh(2, 1))
    >>> seq, _ = multi.admit([1, 2, 3])
    >>> multi.swap_out(seq); multi.swap_in(seq)
    True
    """
    shard, local = self.locate(seq_id)
    self.managers[shard].swap_out([local])

  def swap_in(self, seq_id: int) -> bool:
    """`CacheManager.swap_in` of one global sequence on its shard: whether it fit. Example:
    `swap_out`."""
    shard, local = self.locate(seq_id)
    return self.managers[shard].swap_in([local])[0]

  # --------------------------------------------------------------------------- moving

  def move_sequence(self, seq_id: int, target_shard: jax.Device | int) -> bool:
    """Moves a global sequence (active, or swapped out) to another shard, active there: its
    K/V bit-exact, its page table rebuilt and its full blocks registered in the target's prefix
    cache (`CacheManager.adopt` of a host copy); then the source releases it (its full blocks
    stay cached there). Its global id is kept.

    Returns:
      True when moved (or already there); False when the target has no free slot or too few
      pages: nothing changed on either shard.

    Raises:
      JaxPagedError: an unknown ``seq_id`` or ``target_shard``; nothing changed.
      TierError, or what a tier policy raises: from the target's host tier; nothing changed on
        either shard. A pressure callback that raises does so after the move completed.

    Example: the class's.
    """
    shard, local = self.locate(seq_id)
    target = self._shard_index("target_shard", target_shard)
    if target == shard:
      return True
    source = self.managers[shard]
    if local in source.registry.active:
      moved = swap.copy_out(source.cache, [local])[0]  # a read: the source is unchanged
    else:
      moved = source.host.sequence(local)
      if moved is None:
        raise JaxPagedError(f"sequence {seq_id} was dropped from host RAM on shard {shard}; it "
                            "must be recomputed (release it), it cannot be moved.")
    before = set(self.managers[target].active)
    try:
      new_local = self.managers[target].adopt(moved)
    except BaseException as error:
      added = set(self.managers[target].active) - before
      if added:  # adopted; a pressure callback raised after it: the move completes, then raises
        try:
          self._moved(seq_id, source, local, target, added.pop())
        except Exception:  # (a source's callback, after its release: the first error is raised)
          pass
      raise error
    if new_local is None:
      return False
    self._moved(seq_id, source, local, target, new_local)
    return True

  def _moved(self, seq_id: int, source: CacheManager, local: int, target: int,
             new_local: int) -> None:
    self._where[int(seq_id)] = (target, new_local)
    source.release([local])

  def rebalance(self, tolerance: float = 0.1) -> list[tuple[int, int, int]]:
    """Moves sequences from the fullest shard to the emptiest until their used-page fractions
    differ by at most ``tolerance`` (in [0, 1]), or no move narrows the gap (each move is a
    `move_sequence`: the sequence whose pages best halve the gap).

    Returns:
      The moves, ``(global id, from shard, to shard)`` in order.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=4, max_pages_per_seq=4)
    >>> multi = MultiDeviceCacheManager(spec, mesh=make_mesh(2, 1))
    >>> multi.set_device_preference(0)
    >>> ids = [multi.admit([1, 2, 3, 4, 5])[0] for _ in range(3)]  # 2 pages each, on shard 0
    >>> multi.rebalance(0.25)
    [(0, 0, 1)]
    >>> [s["used_pages"] for s in multi.device_stats()]
    [4, 2]
    """
    if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
        or not 0 <= tolerance <= 1):
      raise JaxPagedError(f"tolerance must be a number in [0, 1] (a difference of used-page "
                          f"fractions), got {tolerance!r}; e.g. 0.1.")
    moves = []
    total = self.spec.num_pages
    for _ in range(self.spec.max_seqs * len(self.managers)):  # each move narrows the gap
      used = [self._load(i) for i in range(len(self.managers))]
      full = max(range(len(used)), key=lambda i: (used[i], -i))
      empty = min(range(len(used)), key=lambda i: (used[i], i))
      gap = used[full] - used[empty]
      if gap / total <= tolerance:
        break
      manager = self.managers[full]
      lengths = np.asarray(manager.cache.seq_lens)
      ps = self.spec.page_size
      best = None
      for seq_id, (shard, local) in sorted(self._where.items()):
        if shard != full or local not in manager.registry.active:
          continue
        pages = -(-int(lengths[local]) // ps)
        after = abs(gap - 2 * pages)
        if after < gap and (best is None or after < best[0]):
          best = (after, seq_id)
      if best is None or not self.move_sequence(best[1], empty):
        break
      moves.append((best[1], full, empty))
    return moves

  # --------------------------------------------------------------------------- stats

  def device_stats(self) -> list[dict]:
    """Per shard: its `CacheManager.stats` (pages used and free, bytes, hit rates, pressure,
    host tier bytes, ...) plus ``shard``, ``device`` and ``used_fraction``.

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> multi = MultiDeviceCacheManager(spec, mesh=make_mesh(2, 1))
    >>> _ = multi.admit([1, 2, 3, 4, 5])
    >>> [(s["shard"], s["used_pages"], s["used_fraction"], s["pressure"])
    ...  for s in multi.device_stats()]
    [(0, 2, 0.25, 'LOW'), (1, 0, 0.0, 'LOW')]
    """
    out = []
    for i, (manager, device) in enumerate(zip(self.managers, self._devices)):
      stats = manager.stats()
      out.append(dict(stats, shard=i, device=str(device),
                      used_fraction=stats["used_pages"] / stats["total_pages"]))
    return out

  @property
  def pressure(self) -> list:
    """Each shard's `MemoryPressure` level. Example: `device_stats`."""
    return [m.pressure for m in self.managers]

  def on_pressure(self, callback: Any) -> None:
    """Registers ``callback(shard, old_level, new_level)`` on every shard (see
    `CacheManager.on_pressure`).

    >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=4,
    ...                  max_seqs=2, max_pages_per_seq=4)
    >>> multi, heard = MultiDeviceCacheManager(spec, mesh=make_mesh(2, 1)), []
    >>> multi.on_pressure(lambda shard, old, new: heard.append((shard, new.name)))
    >>> _ = multi.admit(list(range(1, 15)))
    >>> heard
    [(0, 'CRITICAL')]
    """
    if not callable(callback):
      raise JaxPagedError(f"callback must be callable(shard, old, new), got "
                          f"{type(callback).__name__}.")
    for i, manager in enumerate(self.managers):
      manager.on_pressure(lambda old, new, i=i: callback(i, old, new))
