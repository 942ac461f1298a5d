"""KV events: what a `CacheManager` caches, block by block, per tier, as a stream a router replays.

A subscriber (`CacheManager.subscribe`) hears, in order:

- `BlockStored(tier, block_hash, parent_hash, token_ids, salt)`: a full prefix block is now
  cached in ``tier``. ``block_hash`` is the block's 64-bit chained hash (`jaxpaged.block_key` of
  its `jaxpaged.block_hashes` row: a pure function of the whole prefix's token ids, the salt and
  the page size, so a router hashes a prompt itself and looks its blocks up);
  ``parent_hash`` the previous block's (None for a first block); ``token_ids`` the block's own
  ``page_size`` token ids; ``salt`` its 64-bit salt (tenant).
- `BlockRemoved(tier, block_hash)`: it is no longer cached there (evicted, demoted, promoted,
  dropped).
- `AllBlocksCleared(tier)`: everything in ``tier`` is gone (`DiskStore.clear`); the blocks that
  the tier holds afterwards follow as `BlockStored`.

Tiers: ``"device"`` (the accelerator's pool: registered pages of the prefix cache, vLLM's medium
``"GPU"``), ``"ram"`` (host RAM tiers: demoted blocks, vLLM's ``"CPU"``), ``"disk"`` (the
`jaxpaged.DiskStore` below them, vLLM's disk/offloading connectors). vLLM reports what its GPU
block pool registers; these events report every tier, with the salt, one block per event.

**Replaying the stream reconstructs the tiers exactly** (`replay_events`): after any operation,
the blocks a subscriber replayed are, per tier, the keys of the registered device pages
(``page_cached``), the ``("block", key)`` entries of ``manager.store`` and
``manager.disk.keys()``. A subscriber that joins late first hears the blocks already cached
(``initial=True``), so its replay is exact from its first event.

**How they are produced.** The device's prefix table changes inside jitted steps (registration
when a block fills, eviction when pages are needed, promotion), so the events are not raised
where things happen: at the end of every manager operation (where its pressure level is
updated: `ManagerCore._update_pressure`), `KVEvents.publish` compares, on the host, what each tier
holds now with what it last reported, and reports the difference. So events describe committed
state only: an operation that fails is rolled back and reports nothing, a block stored and
evicted within one operation is never reported, and a subscriber never sees a half-done
operation. A block registered by the caller's own jitted steps (`jaxpaged.extend` with token ids
on ``manager.cache``) is reported at the next manager operation, or at `publish_events`.

Within one operation's batch, every `AllBlocksCleared` comes first, then every `BlockStored`
(device, RAM, disk; a chain's blocks in order), then every `BlockRemoved`: a block that moves
between tiers (demotion, promotion, RAM eviction to disk) is never, in between, in no tier.

**Cost**: nothing until someone subscribes. Then, per operation: when the cache changed, one
``device_get`` of ``page_cached`` and ``page_hash`` (9 bytes a page; the operation reads the
device anyway for its pressure level) and, when blocks were registered, one small gather of their
token ids, salts and parents; a pass over the RAM store's keys and the disk index's keys (host
dictionaries). A block reaching RAM or disk reuses what its device event carried (else its
parent hash is hashed again from its prefix on the host). Subscribing when the disk store
already holds blocks reads the header and token ids of each of their files once.

**Subscribers** are called as ``callback(event)``, one event at a time, in order, after the
operation completed and the state is consistent. One that raises does not stop the others or
the rest of the stream: every event is delivered to every subscriber, then the first exception
is raised from the operation (which completed; as `CacheManager.on_pressure` callbacks). A
subscriber may call the manager: the events of that call are queued after the current ones.

Public API: `BlockStored`, `BlockRemoved`, `AllBlocksCleared`, `KVEventLog`, `replay_events`,
`TIERS`.
Internal API: `KVEvents` (one per manager).

>>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
>>> manager, log = CacheManager(spec), KVEventLog()
>>> unsubscribe = manager.subscribe(log)
>>> first = manager.admit([1, 2, 3, 4, 5, 6])  # the first block fills: registered
>>> [(e.tier, e.token_ids, e.parent_hash) for e in log.events]
[('device', (1, 2, 3, 4), None)]
>>> log.events[0].block_hash == block_key(jaxpaged.block_hashes([1, 2, 3, 4], page_size=4)[0])
True
>>> replay_events(log.events)["device"] == {log.events[0].block_hash}
True
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterable, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import checks
from jaxpaged._src.blocks import CachedBlock, block_key
from jaxpaged._src.hashing import block_hashes_numpy
from jaxpaged._src.spec import JaxPagedError, next_pow2

TIERS = ("device", "ram", "disk")


@dataclasses.dataclass(frozen=True)
class BlockStored:
  """A full prefix block is now cached in ``tier`` (see the module docstring).

  Attributes:
    tier: ``"device"``, ``"ram"`` or ``"disk"``.
    block_hash: its 64-bit chained hash (`jaxpaged.block_key`).
    parent_hash: the previous block's, or None for a sequence's first block.
    token_ids: the block's own ``page_size`` token ids (empty only for a disk block whose file
      could not be read when it was reported).
    salt: its salt, an int in ``[0, 2**64)``.

  >>> [f.name for f in dataclasses.fields(BlockStored)]
  ['tier', 'block_hash', 'parent_hash', 'token_ids', 'salt']
  """
  tier: str
  block_hash: int
  parent_hash: int | None
  token_ids: tuple[int, ...]
  salt: int


@dataclasses.dataclass(frozen=True)
class BlockRemoved:
  """The block ``block_hash`` is no longer cached in ``tier``.

  >>> BlockRemoved("ram", 7)
  BlockRemoved(tier='ram', block_hash=7)
  """
  tier: str
  block_hash: int


@dataclasses.dataclass(frozen=True)
class AllBlocksCleared:
  """Every block of ``tier`` is gone (those it holds afterwards follow as `BlockStored`).

  >>> AllBlocksCleared("disk")
  AllBlocksCleared(tier='disk')
  """
  tier: str


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


def apply_event(state: dict[str, set[int]], event: KVEvent, *, strict: bool = False) -> None:
  """Applies one event to ``state`` (tier -> block hashes), in place. ``strict``: a block stored
  twice in a tier, or removed where it is not, raises `JaxPagedError` (a stream out of order)."""
  if isinstance(event, AllBlocksCleared):
    state.setdefault(event.tier, set()).clear()
  elif isinstance(event, BlockStored):
    held = state.setdefault(event.tier, set())
    if strict and event.block_hash in held:
      raise JaxPagedError(f"{event} stores a block its tier already holds.")
    held.add(event.block_hash)
  elif isinstance(event, BlockRemoved):
    held = state.setdefault(event.tier, set())
    if strict and event.block_hash not in held:
      raise JaxPagedError(f"{event} removes a block its tier does not hold.")
    held.discard(event.block_hash)
  else:
    raise JaxPagedError(f"events must be BlockStored, BlockRemoved or AllBlocksCleared, got "
                        f"{type(event).__name__}.")


def replay_events(events: Iterable[KVEvent], *, strict: bool = False) -> dict[str, set[int]]:
  """The blocks cached per tier after ``events`` (from a subscription's first event):
  ``{"device": {hash, ...}, "ram": {...}, "disk": {...}}``. ``strict``: raise `JaxPagedError`
  on a block stored twice or removed where it is not.

  >>> replay_events([BlockStored("ram", 1, None, (5, 6), 0),
  ...                BlockStored("disk", 1, None, (5, 6), 0), BlockRemoved("ram", 1)])
  {'device': set(), 'ram': set(), 'disk': {1}}
  """
  state = {tier: set() for tier in TIERS}
  for event in events:
    apply_event(state, event, strict=strict)
  return state


class KVEventLog:
  """A subscriber that keeps the events it hears (a pull API): ``manager.subscribe(log)``, then
  read ``log.events`` or take them with `drain`.

  >>> log = KVEventLog()
  >>> log(AllBlocksCleared("disk")); log.drain(), log.events
  ([AllBlocksCleared(tier='disk')], [])
  """

  def __init__(self):
    self.events: list[KVEvent] = []

  def __call__(self, event: KVEvent) -> None:
    self.events.append(event)

  def drain(self) -> list[KVEvent]:
    """The events heard since the last `drain`, oldest first; forgets them."""
    events, self.events = self.events, []
    return events

  def blocks(self) -> dict[str, set[int]]:
    """`replay_events` of the events kept."""
    return replay_events(self.events)


# ----------------------------------------------------------------------------- producing them

@jax.jit
def _page_meta(page_tokens, page_salt, page_parent, page_parent_gen, page_gen, page_hash,
               page_depth, pages):
  """What a `BlockStored` needs of registered ``pages`` (and of their parents)."""
  parent = page_parent[pages]
  safe = jnp.clip(parent, 0)
  return dict(tokens=page_tokens[pages], salt=page_salt[pages], parent=parent,
              linked=(parent >= 0) & (page_gen[safe] == page_parent_gen[pages]),
              parent_hash=page_hash[safe], depth=page_depth[pages])


def _keys(lanes: np.ndarray) -> np.ndarray:
  """``uint64[...]`` block keys of ``uint32[..., 2]`` hashes (as `block_key`)."""
  lanes = np.asarray(lanes, np.uint32).astype(np.uint64)
  return lanes[..., 0] | (lanes[..., 1] << np.uint64(32))


class _Subscriber:
  """A callback and whether it is still subscribed."""

  def __init__(self, callback: Callable[[KVEvent], Any]):
    self.callback, self.live = callback, True


class KVEvents:
  """The event bus of one `CacheManager`: its subscribers, and what they were last told.

  ``_told[tier]`` maps each block key the subscribers believe cached in ``tier`` to
  ``(depth, BlockStored)``; it is None while nobody subscribes (then nothing is read).
  """

  def __init__(self, manager):
    self._manager = manager
    self._subscribers: list[_Subscriber] = []
    self._told: dict[str, dict[int, tuple[int, BlockStored]]] | None = None
    self._device_seen: tuple[Any, Any] | None = None  # (page_cached, page_hash) last read
    self._queue: collections.deque = collections.deque()  # (event, subscriber or None: all)
    self._delivering = False
    self._disk_hook = None
    self._disk_original = None
    self._disk_blocks: dict[int, CachedBlock] = {}  # stored on disk since the last publish
    self._disk_cleared = False

  @property
  def active(self) -> bool:
    return self._told is not None

  # --------------------------------------------------------------------------- subscribers

  def subscribe(self, callback: Callable[[KVEvent], Any], *, initial: bool = True
                ) -> Callable[[], None]:
    """Adds ``callback``; returns a function that removes it (idempotent). ``initial``: it
    first hears a `BlockStored` for every block cached now (per tier; a chain's blocks in
    order), so that replaying what it hears reconstructs the tiers exactly. What changed since
    the last report goes to the other subscribers first. If a subscriber raises meanwhile, the
    new one is not subscribed, and the first exception is raised (once all was delivered)."""
    if not callable(callback):
      raise JaxPagedError(f"callback must be callable(event), e.g. a jaxpaged.KVEventLog(), got "
                          f"{type(callback).__name__}.")
    checks.flag("initial", initial)
    error = None
    if self.active:
      try:
        self.publish()
      except Exception as e:  # pylint: disable=broad-exception-caught
        error = e
    else:
      self._activate()
    subscriber = _Subscriber(callback)
    self._subscribers.append(subscriber)

    def unsubscribe() -> None:
      if subscriber.live:
        subscriber.live = False
        self._subscribers.remove(subscriber)
        if not self._subscribers:
          self._deactivate()

    if initial:
      for tier in TIERS:
        for _, event in sorted(self._told[tier].values(), key=lambda de: de[0]):
          self._queue.append((event, subscriber))
    try:
      self._deliver()
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = error or e
    if error is not None:
      unsubscribe()
      raise error
    return unsubscribe

  def _activate(self) -> None:
    self._told = {tier: {} for tier in TIERS}
    self._device_seen = None
    disk = self._manager.disk
    if disk is not None:
      original = disk.on_event

      def hook(event, key, block):
        if not self.active:  # (unsubscribed under another hook that chained this one)
          pass
        elif event == "stored" and block is not None:
          self._disk_blocks[int(key)] = block
        elif event == "cleared":
          self._disk_cleared = True
        if original is not None:
          original(event, key, block)

      self._disk_hook, self._disk_original = hook, original
      disk.on_event = hook
    self._diff()  # what is cached now: told to nobody
    self._disk_cleared = False

  def _deactivate(self) -> None:
    self._told, self._device_seen = None, None
    self._disk_blocks, self._disk_cleared = {}, False
    disk = self._manager.disk
    if disk is not None and self._disk_hook is not None and disk.on_event is self._disk_hook:
      disk.on_event = self._disk_original
    self._disk_hook = self._disk_original = None

  def _deliver(self) -> None:
    """Delivers the queue in order (unless a delivery is under way: it will); raises the first
    exception a subscriber raised once every event was delivered."""
    if self._delivering:
      return
    self._delivering, first = True, None
    try:
      while self._queue:
        event, target = self._queue.popleft()
        for subscriber in ([target] if target is not None else list(self._subscribers)):
          if not subscriber.live:
            continue
          try:
            subscriber.callback(event)
          except Exception as exc:  # pylint: disable=broad-exception-caught
            if first is None:
              first = exc
            else:
              first.add_note(f"a KV event subscriber also raised {exc!r} on {event}.")
    finally:
      self._delivering = False
    if first is not None:
      raise first

  # --------------------------------------------------------------------------- diffing

  def publish(self) -> None:
    """Reports what changed in every tier since the last report (nothing without subscribers).
    """
    if not self.active:
      return
    events = self._diff()
    self._queue.extend((event, None) for event in events)
    self._deliver()

  def _diff(self) -> list[KVEvent]:
    """The events that bring ``_told`` to what the tiers hold now; updates ``_told``."""
    cleared, stored, removed = [], [], []
    for tier, now in (("device", self._device_now()), ("ram", self._ram_now()),
                      ("disk", self._disk_now())):
      if now is None:  # unchanged
        continue
      told = self._told[tier]
      wipe = tier == "disk" and self._disk_cleared
      if wipe:
        cleared.append(AllBlocksCleared(tier))
        gone, new = list(told), list(now)
      else:
        gone, new = [k for k in told if k not in now], [k for k in now if k not in told]
      infos = now.resolve(new) if hasattr(now, "resolve") else {k: now[k]() for k in new}
      for key in gone:
        del told[key]
      if not wipe:
        removed.extend(BlockRemoved(tier, key) for key in gone)
      for key in new:  # (after the removals: a key reported again stays)
        told[key] = infos[key]
      stored.extend(event for _, event in sorted((infos[k] for k in new), key=lambda de: de[0]))
    self._disk_blocks, self._disk_cleared = {}, False
    return cleared + stored + removed

  def _known(self, key: int) -> tuple[int, BlockStored] | None:
    """What a tier already reported of block ``key`` (the same block in every tier)."""
    for told in self._told.values():
      if key in told and told[key][1].token_ids:
        return told[key]
    return None

  def _host_info(self, tier: str, key: int, tokens, salt: int) -> tuple[int, BlockStored]:
    """``(depth, BlockStored)`` of a host block ending the prefix ``tokens``."""
    ps = self._manager.spec.page_size
    depth = len(tokens) // ps - 1
    known = self._known(key)
    if known is not None:
      _, event = known
      return depth, dataclasses.replace(event, tier=tier)
    parent = None
    if depth > 0:
      parent = block_key(block_hashes_numpy(np.asarray(tokens)[:depth * ps], ps, salt,
                                            self._manager.spec.block_hash)[-1])
    own = tuple(int(t) for t in np.asarray(tokens)[depth * ps:(depth + 1) * ps])
    return depth, BlockStored(tier, key, parent, own, salt)

  def _device_now(self):
    """The device's registered blocks now (a `_DeviceNow`), or None when the cache's prefix
    arrays are the very ones last read (nothing changed)."""
    prefix = self._manager.cache.prefix
    if prefix is None:
      return _DeviceNow(self, None, {}, None)
    seen = (prefix.page_cached, prefix.page_hash)
    if (self._device_seen is not None and seen[0] is self._device_seen[0]
        and seen[1] is self._device_seen[1]):
      return None
    self._device_seen = seen
    cached, hashes = jax.device_get(seen)
    pages = np.flatnonzero(cached)
    keys = _keys(hashes[pages]).tolist()
    return _DeviceNow(self, prefix, dict(zip(keys, pages.tolist())), hashes)

  def _ram_now(self) -> dict[int, Callable[[], tuple[int, BlockStored]]]:
    store = self._manager.store
    now = {}
    for k in store.keys():
      if isinstance(k, tuple) and len(k) == 2 and k[0] == "block":
        now[k[1]] = lambda k=k: self._ram_info(store.peek(k))
    return now

  def _ram_info(self, block: CachedBlock) -> tuple[int, BlockStored]:
    return self._host_info("ram", block.key, block.tokens, block.salt)

  def _disk_now(self) -> dict[int, Callable[[], tuple[int, BlockStored]]] | None:
    disk = self._manager.disk
    if disk is None:
      return None
    return {k: (lambda k=k: self._disk_info(disk, k)) for k in disk.keys()}

  def _disk_info(self, disk, key: int) -> tuple[int, BlockStored]:
    block = self._disk_blocks.get(key)
    if block is not None:
      return self._host_info("disk", key, block.tokens, block.salt)
    known = self._known(key)
    if known is not None:
      return known[0], dataclasses.replace(known[1], tier="disk")
    read = disk.prefix_of(key)  # (no event carried it: on disk before, or another process's)
    if read is None:
      return 0, BlockStored("disk", key, None, (), 0)
    return self._host_info("disk", key, *read)


class _DeviceNow(dict):
  """The device's registered blocks (key -> page); `resolve` reads what new ones' events need
  in one gather."""

  def __init__(self, events: KVEvents, prefix, pages: dict[int, int], hashes):
    super().__init__(pages)
    self.events, self.prefix, self.hashes = events, prefix, hashes

  def resolve(self, keys: list[int]) -> dict[int, tuple[int, BlockStored]]:
    if not keys:
      return {}
    p = self.prefix
    pages = np.array([self[k] for k in keys], np.int32)
    padded = np.zeros(next_pow2(len(pages)), np.int32)
    padded[:len(pages)] = pages
    meta = jax.device_get(_page_meta(p.page_tokens, p.page_salt, p.page_parent,
                                     p.page_parent_gen, p.page_gen, p.page_hash, p.page_depth,
                                     jnp.asarray(padded)))
    out = {}
    for i, key in enumerate(keys):
      parent = None
      if int(meta["parent"][i]) >= 0:
        if bool(meta["linked"][i]):
          parent = block_key(meta["parent_hash"][i])
        else:  # its parent's page was reused since: what another tier said of it, if any
          known = self.events._known(key)
          parent = None if known is None else known[1].parent_hash
      event = BlockStored("device", key, parent, tuple(meta["tokens"][i].tolist()),
                          checks.salt_int(meta["salt"][i]))
      out[key] = (int(meta["depth"][i]), event)
    return out
