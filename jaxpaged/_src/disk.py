"""A disk tier of prefix blocks that survives restarts: one verified file per block.

`DiskStore` keeps `CachedBlock`s (a full block's K/V, its whole prefix of token ids and its
salt) in a directory, below the host RAM tiers of `jaxpaged.CacheManager`. A hit is served only
after the file's checksum, its format version, its layout (layers, KV heads, head_dim, page
size, dtype, static scales, hash function, model identity), its salt and *every token of its
prefix* match the request: never by hash alone. A file that fails a structural check (torn,
truncated, corrupt, another layout under this layout's name) is a miss and is removed; a valid
block of another prefix under the same hash (a collision) is a miss and stays.

**Layout on disk** (``FORMAT_VERSION`` 1)::

  DIR/v1/<layout digest>/<2 hex>/<16 hex key>.kvb   one block per file
  DIR/v1/<layout digest>/layout.json                the layout, for people
  DIR/v1/tmp/<pid>.<random>.tmp                     writes in progress

The key is the block's chained 64-bit hash (`jaxpaged.block_hashes`, `blocks.block_key`): a
pure function of the prefix's token ids, the salt and the page size, the same in every process
and on every machine. The layout digest is the first 16 hex digits of the SHA-256 of the
layout's canonical JSON, so stores of different models, dtypes or page sizes share a directory
without ever reading each other's blocks, and a new format version uses a new ``vN`` directory.

**A block file** is a 32-byte prefix (magic ``JPKVBLK1``, format version, header length,
payload length, CRC-32 of everything after the prefix), a JSON header (key, salt, number of
tokens, layout, and each array's name, dtype, shape and offset), then the arrays (token ids,
K, V, and the scales of 8-bit K/V), each 64-byte aligned. CRC-32 runs at about 4 GB/s here,
so checking a block costs a fraction of reading it.

**Writes are atomic**: a temporary file in ``DIR/v1/tmp`` is written, flushed, ``fsync``-ed
and renamed over the block's name (`os.replace`). A reader sees a whole old file, a whole new
one, or none; a process killed mid-write leaves only a temporary file, removed by the next
store that opens the directory once its writer is gone. Files are never changed in place, so
several processes share one directory safely: two writing the same block each rename a whole
copy, and a reader holding an open file keeps reading it after a rename or removal.

**Capacity** is in bytes of block files, per layout, enforced with a one-tier `TieredStore`
and the same pluggable `TierPolicy` (LRU by default) as the RAM tiers; the index is rebuilt on
open from the files (their modification time, touched on every hit, is the last use), so a
restart keeps what the last run used most recently. Other processes' writes count once this
process sees them (a lookup that finds their file).

Failures of the disk (``ENOSPC``, permission denied, an I/O error) never raise from `put`: the
block is not stored (the cache only loses a hit it could have had), ``stats()`` counts it, and
the store is as before.

>>> import tempfile
>>> from jaxpaged._src.spec import CacheSpec
>>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2, num_pages=4,
...                  max_seqs=1, max_pages_per_seq=2, prefix_caching=True)
>>> store = DiskStore(tempfile.mkdtemp(), 1 << 20, spec=spec, model="doc")
>>> block = CachedBlock(block_key(block_hashes_numpy([7, 8], 2)[0]), 0,
...                     np.array([7, 8], np.int32), np.ones((1, 1, 2, 4), np.float32),
...                     np.zeros((1, 1, 2, 4), np.float32))
>>> store.put(block)
True
>>> hit = store.get(block.key, np.array([7, 8, 9]), salt=0)
>>> bool(np.array_equal(hit.k, block.k)), store.get(block.key, np.array([7, 9]), salt=0)
(True, None)
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import pathlib
import struct
import time
import uuid
import warnings
import zlib
from typing import Any, Callable, Hashable

import numpy as np

from jaxpaged._src import checks
from jaxpaged._src.blocks import CachedBlock, block_key, sequence_blocks
from jaxpaged._src.cache import HOST_FIELDS, check_host_pools, pool_layouts
from jaxpaged._src.hashing import block_hashes_numpy
from jaxpaged._src.spec import CacheSpec, JaxPagedError
from jaxpaged._src.tier import Tier, TieredStore, TierPolicy
from jaxpaged._src.tier_spec import TierError, byte_count

FORMAT_VERSION = 1
MAGIC = b"JPKVBLK1"
_PREFIX = struct.Struct("<8sIIQI4x")  # magic, version, header bytes, payload bytes, crc32
_ALIGN = 64
SUFFIX = ".kvb"
# (event, key, block): "stored" with the block, "removed" with None, "cleared" with key None.
OnDiskEvent = Callable[[str, Any, Any], None]


class DiskError(TierError):
  """A disk store that cannot be used as asked (the message says how to fix it).

  >>> import tempfile
  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2, num_pages=4,
  ...                  max_seqs=1, max_pages_per_seq=2, prefix_caching=True)
  >>> DiskStore(tempfile.mkdtemp(), 100, spec=spec)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxpaged._src.disk.DiskError: DiskStore: capacity=100 bytes is below one block file ...
  """


@dataclasses.dataclass(frozen=True)
class DiskLayout:
  """What a block's bytes mean: a hit must match all of it. `layout_of` makes one from a spec.

  Attributes:
    num_layers, num_kv_heads, head_dim, page_size: the K/V shape of one block.
    dtype: K/V storage dtype name (``"float32"``, ``"int8"``, ...).
    static_scales: `CacheSpec.static_scales` as lists, or None.
    block_hash: the `CacheSpec.block_hash` that keyed the blocks.
    model: the model's identity (any string; `jaxpaged.models.llama.model_fingerprint` for the
      bundled model): K/V of another model's weights are another model's.

  >>> spec = CacheSpec(num_layers=2, num_kv_heads=1, head_dim=8, page_size=4, num_pages=4,
  ...                  max_seqs=1, max_pages_per_seq=2, dtype=np.int8)
  >>> layout = layout_of(spec, model="my-model")
  >>> layout.dtype, len(layout.digest), layout_of(spec, "other").digest == layout.digest
  ('int8', 16, False)
  """
  num_layers: int
  num_kv_heads: int
  head_dim: int
  page_size: int
  dtype: str
  static_scales: Any
  block_hash: str
  model: str

  @functools.cached_property
  def fields(self) -> dict[str, Any]:
    """The layout as a dict, as block headers hold it (computed once: every read compares it)."""
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.fields, sort_keys=True, separators=(",", ":"))

  @property
  def digest(self) -> str:
    """16 hex digits naming this layout's directory."""
    return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def layout_of(spec: CacheSpec, model: str = "") -> DiskLayout:
  """The `DiskLayout` of ``spec``'s blocks for ``model``."""
  if not isinstance(model, str):
    raise DiskError(f"model must be a str naming the model whose K/V are stored (e.g. "
                    f"model_fingerprint(params, config)), got {model!r} ({type(model).__name__}).")
  scales = None if spec.static_scales is None else [list(map(float, p))
                                                      for p in spec.static_scales]
  return DiskLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.page_size,
                    np.dtype(spec.dtype).name, scales, spec.block_hash, model)


def _arrays_of(spec: CacheSpec) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """A block's arrays in file order, without tokens: ``(CachedBlock field, shape, dtype)``."""
  return [(HOST_FIELDS[name], shape[:2] + shape[3:], np.dtype(dtype))
          for name, (shape, dtype) in pool_layouts(spec).items()]


def _aligned(n: int) -> int:
  return -(-n // _ALIGN) * _ALIGN


def encode_block(block: CachedBlock, layout: DiskLayout, spec: CacheSpec) -> list[bytes]:
  """The bytes of ``block``'s file, as chunks (nothing is copied into one buffer)."""
  arrays = [("tokens", np.ascontiguousarray(block.tokens, np.int32))]
  arrays += [(field, np.ascontiguousarray(getattr(block, field)))
             for field, _, _ in _arrays_of(spec)]
  specs, offset = [], 0
  for name, x in arrays:
    specs.append(dict(name=name, dtype=x.dtype.name, shape=list(x.shape), offset=offset))
    offset = _aligned(offset + x.nbytes)
  header = json.dumps(dict(key=block.key, salt=block.salt, num_tokens=len(block.tokens),
                           layout=layout.fields, arrays=specs),
                      sort_keys=True).encode()
  header += b" " * (_aligned(len(header)) - len(header))
  chunks = [header]
  for (_, x), s in zip(arrays, specs):
    chunks.append(memoryview(x.reshape(-1).view(np.uint8)))  # bfloat16/float8: no buffer
    pad = _aligned(s["offset"] + x.nbytes) - s["offset"] - x.nbytes
    chunks.append(b"\0" * pad)
  crc = 0
  for c in chunks:
    crc = zlib.crc32(c, crc)
  payload = sum(len(c) for c in chunks) - len(header)
  return [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), payload, crc)] + chunks


class _Corrupt(Exception):
  """A block file that fails a structural check (why in the message)."""


def decode_block(data: bytes | bytearray | memoryview, layout: DiskLayout,
                 spec: CacheSpec) -> CachedBlock:
  """The `CachedBlock` in a block file's bytes; `_Corrupt` for anything but a whole,
  checksummed block of ``layout``."""
  data = memoryview(data)
  if len(data) < _PREFIX.size:
    raise _Corrupt(f"{len(data)} bytes: shorter than the block prefix")
  magic, version, header_len, payload_len, crc = _PREFIX.unpack_from(data)
  if magic != MAGIC:
    raise _Corrupt("not a jaxpaged block file")
  if version != FORMAT_VERSION:
    raise _Corrupt(f"format version {version}, not {FORMAT_VERSION}")
  if len(data) != _PREFIX.size + header_len + payload_len:
    raise _Corrupt(f"{len(data)} bytes, the prefix says "
                   f"{_PREFIX.size + header_len + payload_len}: torn or truncated")
  body = data[_PREFIX.size:]
  if zlib.crc32(body) != crc:
    raise _Corrupt("checksum mismatch")
  try:
    header = json.loads(bytes(body[:header_len]))
    if header["layout"] != layout.fields:
      raise _Corrupt("another layout")
    expected = [("tokens", None, np.dtype(np.int32))] + _arrays_of(spec)
    arrays, payload = {}, body[header_len:]
    if [a["name"] for a in header["arrays"]] != [name for name, _, _ in expected]:
      raise _Corrupt("unexpected arrays")
    for a, (name, shape, dtype) in zip(header["arrays"], expected):
      if np.dtype(a["dtype"]) != dtype or (shape is not None and tuple(a["shape"]) != shape):
        raise _Corrupt(f"{name} is {a['dtype']}{a['shape']}")
      count = int(np.prod(a["shape"]))
      if a["offset"] < 0 or a["offset"] + count * dtype.itemsize > len(payload):
        raise _Corrupt(f"{name} runs past the file")
      arrays[name] = np.frombuffer(payload, dtype, count, a["offset"]).reshape(a["shape"])
    tokens = arrays.pop("tokens")
    key, salt = int(header["key"]), int(header["salt"])
  except (ValueError, KeyError, TypeError) as e:  # JSON, shapes, fields
    raise _Corrupt(f"bad header: {e}") from None
  if len(tokens) != header["num_tokens"] or len(tokens) % spec.page_size or not len(tokens):
    raise _Corrupt(f"{len(tokens)} token ids for a block of page size {spec.page_size}")
  return CachedBlock(key, salt, tokens, static_scales=spec.static_scales, **arrays)


def block_file_bytes(spec: CacheSpec, num_tokens: int, layout: DiskLayout) -> int:
  """The size of the largest block file ending a prefix of ``num_tokens`` tokens (the
  longest key and salt: their digits are in the header)."""
  block = CachedBlock(2**64 - 1, 2**64 - 1, np.zeros(num_tokens, np.int32), **{
      field: np.zeros(s, d) for (field, s, d) in _arrays_of(spec)})
  return sum(len(c) for c in encode_block(block, layout, spec))


class DiskStore:
  """Prefix blocks on disk, shared by processes and kept across restarts (module docstring).

  Args:
    path: the store's directory (created if missing; it must be writable).
    capacity: bytes of block files this layout may keep, an int >= one block file.
    spec: the `CacheSpec` of the caches whose blocks are stored (its layout is checked on
      every hit).
    model: the model's identity (see `DiskLayout.model`).
    policy: the eviction `TierPolicy` (default `LRUPolicy()`).
    clock: seconds, for ``ttl_seconds`` (default `time.time`; inject one in tests).
    ttl_seconds: blocks unused longer than this are removed by `expire` (and by every `put`);
      None: no expiry.
    fsync: ``fsync`` each file before renaming it (default True; False trades durability on a
      power loss, never consistency, for speed).
    on_event: called as ``on_event("stored", key, block)``, ``on_event("removed", key, None)``
      after each change (`jaxpaged.KVEvents` subscribes here).

  Raises:
    DiskError: ``path`` cannot be created or written, ``capacity`` is below one block, or
      another argument is malformed.

  >>> import tempfile
  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2, num_pages=4,
  ...                  max_seqs=1, max_pages_per_seq=2, prefix_caching=True)
  >>> path = tempfile.mkdtemp()
  >>> tokens = np.array([7, 8], np.int32)
  >>> block = CachedBlock(block_key(block_hashes_numpy(tokens, 2)[0]), 0, tokens,
  ...                     np.ones((1, 1, 2, 4), np.float32), np.zeros((1, 1, 2, 4), np.float32))
  >>> DiskStore(path, 1 << 20, spec=spec).put(block)
  True
  >>> restarted = DiskStore(path, 1 << 20, spec=spec)  # a new process: the index is rebuilt
  >>> len(restarted), restarted.get(block.key, [7, 8, 9], salt=0).tokens.tolist()
  (1, [7, 8])
  >>> restarted.get(block.key, [7, 8, 9], salt=1) is None  # another tenant: a miss
  True
  """

  def __init__(self, path: str | os.PathLike, capacity: int, *, spec: CacheSpec,
               model: str = "", policy: TierPolicy | None = None,
               clock: Callable[[], float] = time.time, ttl_seconds: float | None = None,
               fsync: bool = True, on_event: OnDiskEvent | None = None):
    if not isinstance(spec, CacheSpec):
      raise DiskError(f"DiskStore: spec must be the CacheSpec of the cache whose blocks are "
                      f"stored, got {type(spec).__name__}.")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
      raise DiskError(f"DiskStore: path must be a directory path (str or pathlib.Path), got "
                      f"{path!r}.")
    if not callable(clock):
      raise DiskError(f"DiskStore: clock must be a callable returning seconds, got {clock!r}.")
    if on_event is not None and not callable(on_event):
      raise DiskError(f"DiskStore: on_event must be callable or None, got {on_event!r}.")
    self.spec, self.layout = spec, layout_of(spec, model)
    self.block_bytes = block_file_bytes(spec, spec.page_size, self.layout)
    capacity = byte_count("DiskStore", "capacity", capacity, "pass the bytes the store may use, "
                          "e.g. 8 << 30.")
    if capacity < self.block_bytes:
      raise DiskError(f"DiskStore: capacity={capacity} bytes is below one block file "
                      f"({self.block_bytes} bytes for this layout, more for deeper blocks); "
                      f"pass at least {self.block_bytes}, e.g. 1 << 30.")
    self.ttl_seconds = check_ttl(ttl_seconds)
    self.fsync = checks.flag("fsync", fsync)
    self.clock, self.on_event = clock, on_event
    self.root = pathlib.Path(path)
    self._made: set[pathlib.Path] = set()  # subdirectories known to exist
    self.dir = self.root / f"v{FORMAT_VERSION}" / self.layout.digest
    self.tmp = self.root / f"v{FORMAT_VERSION}" / "tmp"
    try:
      self.dir.mkdir(parents=True, exist_ok=True)
      self.tmp.mkdir(parents=True, exist_ok=True)
      self._write_atomic(self.dir / "layout.json", [self.layout.to_json().encode()])
    except OSError as e:
      raise DiskError(f"DiskStore: cannot write the directory {str(path)!r} ({e.strerror or e}); "
                      "pass a directory this process can create and write.") from None
    self.index = TieredStore([Tier("disk", capacity)], policy, on_evict=self._evicted)
    self._last_use: dict[int, float] = {}  # key -> clock() at its last put or hit
    self._doomed: list[int] = []  # evicted by the index during a put: files to remove after it
    self.counters = dict.fromkeys(
        ("hits", "misses", "hit_tokens", "writes", "write_errors", "corrupt_removed",
         "collisions", "evictions", "expired", "bytes_read", "bytes_written"), 0)
    self.last_error: str | None = None
    self._clean_tmp()
    self._scan()

  # ------------------------------------------------------------------------- files

  def path_of(self, key: int) -> pathlib.Path:
    """The file of the block keyed ``key``."""
    return self.dir / f"{key >> 56:02x}" / f"{key:016x}{SUFFIX}"

  def _write_atomic(self, final: pathlib.Path, chunks) -> int:
    tmp = self.tmp / f"{os.getpid()}.{uuid.uuid4().hex}.tmp"
    written = 0
    try:
      try:
        f = open(tmp, "wb")
      except FileNotFoundError:  # the directory was removed (emptied by hand): made again
        self._made.clear()
        self.tmp.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
      with f:
        for c in chunks:
          written += f.write(c)
        f.flush()
        if self.fsync:
          os.fsync(f.fileno())
      if final.parent not in self._made:
        final.parent.mkdir(parents=True, exist_ok=True)
        self._made.add(final.parent)
      os.replace(tmp, final)
    except BaseException:
      self._made.discard(final.parent)  # (it may have been removed)
      _unlink(tmp)
      raise
    return written

  def _clean_tmp(self) -> None:
    """Removes temporary files whose writing process is gone (killed mid-write)."""
    for entry in os.scandir(self.tmp):
      pid = entry.name.split(".", 1)[0]
      if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
        try:
          os.unlink(entry.path)
        except OSError:
          pass

  def _scan(self) -> None:
    """Indexes the block files of this layout, least recently used first."""
    found = []
    for sub in os.scandir(self.dir):
      if not sub.is_dir():
        continue
      for entry in os.scandir(sub.path):
        name = entry.name
        if not name.endswith(SUFFIX):
          continue
        try:
          key, stat = int(name[:-len(SUFFIX)], 16), entry.stat()
        except (ValueError, OSError):
          continue
        found.append((stat.st_mtime, key, stat.st_size))
    shift = self.clock() - time.time()  # file times are time.time()'s: last uses on self.clock
    for mtime, key, size in sorted(found):
      self._index(key, size, mtime + shift)
    self._remove_doomed()

  def _index(self, key: int, size: int, when: float, *, pinned: bool = False) -> bool:
    """Counts a file in the index (the policy may evict others); False if it does not fit.
    All or nothing, as `TieredStore.put`, without copying the index."""
    try:
      self.index.put(key, size, size, pinned=pinned)
    except TierError:
      return False
    self._last_use[key] = when
    return True

  def _evicted(self, key: Hashable, value: Any, pinned: bool) -> None:
    del value, pinned
    self._doomed.append(key)

  def _remove_doomed(self) -> None:
    doomed, self._doomed = self._doomed, []
    for key in doomed:
      self.counters["evictions"] += 1
      self._remove_file(key)

  def _remove_file(self, key: int, inode: int | None = None) -> None:
    """Removes a block's file (only if it is still file ``inode``, when given)."""
    self._last_use.pop(key, None)
    path = self.path_of(key)
    try:
      if inode is None or os.stat(path).st_ino == inode:
        os.unlink(path)
    except OSError:
      return
    self._emit("removed", key, None)

  def _emit(self, event: str, key, block) -> None:
    if self.on_event is not None:
      self.on_event(event, key, block)

  # ------------------------------------------------------------------------- blocks

  def __contains__(self, key: int) -> bool:
    return key in self.index or self.path_of(key).exists()

  def __len__(self) -> int:
    return len(self.index)

  def keys(self) -> list[int]:
    """The keys indexed, in the order of their latest put (the policy keeps recency)."""
    return [k for k in self.index.keys() if k in self._last_use]

  def put(self, block: CachedBlock, *, pinned: bool = False) -> bool:
    """Stores ``block`` (a write is atomic; an equal block already there is only touched).
    ``pinned``: pin it (`pin`); a put never unpins a pinned block.

    Returns:
      True when the block is on disk; False when the disk refused it (full, permission denied,
      I/O error: counted in ``stats()["write_errors"]``, ``last_error`` says why) or the
      capacity is all pinned. The store is then as before.

    Raises:
      JaxPagedError: ``block`` is not a `CachedBlock` of this store's spec.
    """
    if not isinstance(block, CachedBlock):
      raise DiskError(f"DiskStore.put: block must be a CachedBlock, got {type(block).__name__}.")
    check_host_pools(self.spec, block, "block")
    self.expire()
    known = block.key in self.index
    if known and self.holds(block.key, block.tokens, block.salt):
      self._touch(block.key, pinned=True if pinned else None)  # (never unpins)
      return True
    if known and self.index.access_stats(block.key).pinned and self.prefix_of(block.key):
      self.counters["collisions"] += 1  # another prefix's pinned block holds this key: it stays
      return False
    pinned = pinned or (known and self.index.access_stats(block.key).pinned)
    chunks = encode_block(block, self.layout, self.spec)
    path = self.path_of(block.key)
    try:  # written first: a failed write leaves the index (and every other file) as it was
      written = self._write_atomic(path, chunks)
    except OSError as e:
      self.counters["write_errors"] += 1
      self.last_error = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror or e}"
      warnings.warn(f"jaxpaged DiskStore: a block was not written to {self.root} "
                    f"({self.last_error}); it will be recomputed when needed.", RuntimeWarning,
                    stacklevel=2)
      return False
    try:  # then counted: the policy may evict others (their files go once this succeeded)
      fitted = self._index(block.key, written, self.clock(), pinned=pinned)
    except BaseException:
      self._doomed = []
      if not known:
        _unlink(path)
      raise
    if not fitted:
      if not known:
        _unlink(path)
      self.counters["write_errors"] += 1
      self.last_error = "no room: the store's capacity is pinned"
      return False
    self.counters["writes"] += 1
    self.counters["bytes_written"] += written
    self._remove_doomed()
    self._emit("stored", block.key, block)
    return True

  def prefix_of(self, key: int) -> tuple[np.ndarray, int] | None:
    """``(prefix token ids, salt)`` of the block file keyed ``key`` if it is one of this layout,
    else None: a cheap read of its header and token ids only (no checksum, no use recorded), for
    deciding what to write, for routing and for events. `get` verifies everything before
    serving."""
    try:
      with open(self.path_of(key), "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
          return None
        magic, version, header_len, _, _ = _PREFIX.unpack(prefix)
        if magic != MAGIC or version != FORMAT_VERSION:
          return None
        header = json.loads(f.read(header_len))
        first = header["arrays"][0]
        if (header["layout"] != self.layout.fields or first["name"] != "tokens"
            or first["dtype"] != "int32"):
          return None
        f.seek(_PREFIX.size + header_len + first["offset"])
        tokens = np.frombuffer(f.read(4 * header["num_tokens"]), np.int32)
        salt = int(header["salt"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
      return None
    return (tokens, salt) if len(tokens) == header["num_tokens"] else None

  def holds(self, key: int, tokens: np.ndarray, salt: int) -> bool:
    """Whether the block file keyed ``key`` holds exactly the prefix ``tokens`` (all its token
    ids, the block's last) under ``salt`` (`prefix_of`: no checksum)."""
    found = self.prefix_of(key)
    return found is not None and found[1] == salt and np.array_equal(found[0], tokens)

  def get(self, key: int, tokens: np.ndarray, salt: int, *, end: int | None = None
          ) -> CachedBlock | None:
    """The block keyed ``key`` if it ends ``tokens`` under ``salt`` (the block's tokens equal
    ``tokens[:len(block.tokens)]``, all of them), else None. A hit counts as a use.

    ``end``: the block must end exactly there (``(index + 1) * page_size`` for block ``index``
    of ``tokens``). Pass it whenever the hit is used as a given block of the prompt: keys can
    collide across depths (a prompt whose blocks repeat, ``block_hash="constant"``), and
    without it a block of another depth that is a prefix of ``tokens`` is a hit."""
    block = self._read(key, tokens, salt, count=True, end=end)
    if block is not None:
      self._touch(key)
    return block

  def _read(self, key: int, tokens, salt: int, *, count: bool, end: int | None = None
            ) -> CachedBlock | None:
    path = self.path_of(key)
    try:
      with open(path, "rb") as f:
        inode = os.fstat(f.fileno()).st_ino
        data = f.read()
    except FileNotFoundError:
      if key in self.index:  # removed by another process
        self.index.pop(key)
        self._last_use.pop(key, None)
      if count:
        self.counters["misses"] += 1
      return None
    except OSError as e:
      self.last_error = f"read {path}: {e.strerror or e}"
      if count:
        self.counters["misses"] += 1
      return None
    try:
      block = decode_block(data, self.layout, self.spec)
      if block.key != key:
        raise _Corrupt(f"holds key {block.key:016x}")
    except _Corrupt as e:
      self.last_error = f"{path.name}: {e}"
      self.counters["corrupt_removed"] += 1
      if key in self.index:
        self.index.pop(key)
      self._remove_file(key, inode)
      if count:
        self.counters["misses"] += 1
      return None
    wanted, end = end, len(block.tokens)
    tokens = np.asarray(tokens)
    if (block.salt != salt or len(tokens) < end or (wanted is not None and end != wanted)
        or not np.array_equal(block.tokens, tokens[:end])):
      if count:
        self.counters["collisions"] += 1
        self.counters["misses"] += 1
      return None
    if count:
      self.counters["hits"] += 1
      self.counters["hit_tokens"] += self.spec.page_size
      self.counters["bytes_read"] += len(data)
    if key not in self.index:  # written by another process since we opened
      self._index(key, len(data), self.clock())
      self._remove_doomed()
    return block

  def _touch(self, key: int, *, pinned: bool | None = None) -> None:
    now = self.clock()
    self._last_use[key] = now
    if key in self.index:
      if pinned is not None and pinned != self.index.access_stats(key).pinned:
        size = self.index.pop(key)
        self.index.put(key, size, size, pinned=pinned)
      else:
        self.index.get(key)
    try:
      os.utime(self.path_of(key))  # the last use, for the next process's index
    except OSError:
      pass

  def run(self, tokens: np.ndarray, salt: int, start: int = 0, stop: int | None = None
          ) -> list[CachedBlock]:
    """The blocks of ``tokens`` under ``salt`` held here from block ``start`` on, up to the
    first missing one (or block ``stop``): what a prefix lookup can promote."""
    ps = self.spec.page_size
    hashes = block_hashes_numpy(tokens, ps, salt, self.spec.block_hash)
    stop = len(hashes) if stop is None else min(stop, len(hashes))
    found = []
    for i in range(start, stop):
      block = self.get(block_key(hashes[i]), tokens, salt, end=(i + 1) * ps)
      if block is None:
        break
      found.append(block)
    return found

  def pin(self, key: int) -> bool:
    """Keeps the block ``key`` from eviction and expiry until `unpin`; False if not held."""
    if key not in self.index:
      return False
    self._touch(key, pinned=True)
    return True

  def unpin(self, key: int) -> None:
    if key in self.index:
      self._touch(key, pinned=False)

  def remove(self, key: int) -> None:
    """Removes a block (no-op if absent)."""
    if key in self.index:
      self.index.pop(key)
    self._remove_file(key)

  def clear(self) -> None:
    """Removes every block of this layout (other layouts' are left alone)."""
    for key in list(self.index.keys()):
      self.index.pop(key)
      self._remove_file(key)
    self._emit("cleared", None, None)

  def expire(self) -> int:
    """Removes the unpinned blocks unused for more than ``ttl_seconds``; returns how many."""
    if self.ttl_seconds is None:
      return 0
    horizon = self.clock() - self.ttl_seconds
    old = [k for k, t in self._last_use.items()
           if t < horizon and k in self.index and not self.index.access_stats(k).pinned]
    for key in old:
      self.index.pop(key)
      self._remove_file(key)
    self.counters["expired"] += len(old)
    return len(old)

  def snapshot(self):
    """The index's state (files are not part of it: a block written stays valid)."""
    return self.index.snapshot(), dict(self._last_use)

  def restore(self, snapshot) -> None:
    index, last_use = snapshot
    self.index.restore(index)
    self._last_use = dict(last_use)

  def stats(self) -> dict[str, Any]:
    """Counters (hits, misses, hit_tokens, writes, write_errors, corrupt_removed, collisions,
    evictions, expired, bytes_read, bytes_written), ``entries``, ``used`` and ``capacity``
    bytes, ``path`` and ``last_error``."""
    return dict(self.counters, entries=len(self.index), used=self.index.used(0),
                capacity=self.index.tiers[0].capacity, path=str(self.dir),
                last_error=self.last_error)


def _unlink(path: pathlib.Path) -> None:
  try:
    os.unlink(path)
  except OSError:
    pass


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def check_disk_store(value: Any, what: str = "disk") -> DiskStore | None:
  """``value`` if it is a `DiskStore` or None."""
  if value is not None and not isinstance(value, DiskStore):
    raise JaxPagedError(f"{what} must be a jaxpaged.DiskStore or None, got "
                        f"{type(value).__name__}; open one with DiskStore(path, capacity, "
                        "spec=spec).")
  return value


def check_ttl(ttl_seconds: Any) -> float | None:
  """``ttl_seconds`` as a float > 0, or None."""
  if ttl_seconds is None:
    return None
  value = checks.real("ttl_seconds", ttl_seconds)
  if not value > 0 or value == float("inf"):
    raise JaxPagedError(f"ttl_seconds must be a finite number of seconds > 0, or None for no "
                        f"expiry, got {ttl_seconds!r}.")
  return value


def load_prefixes(cache, store: DiskStore, prompts, *, salt: int = 0):
  """Brings each prompt's blocks held by ``store`` onto the device as cached prefix blocks, so
  that `jaxpaged.match_prefix` (and `jaxpaged.models.prefill`) hits them. Sequence slot ``row``
  is used for prompt ``row`` and left empty again; blocks already on the device are not read.

  Args:
    cache: a `PagedKVCache` with prefix caching and ``len(prompts)`` free slots from 0; it is
      not changed (a new one is returned).
    store: the `DiskStore`, of this cache's layout.
    prompts: token-id lists; only full blocks before each prompt's last token are looked up.
    salt: the requests' salt.

  Returns:
    ``(cache, loaded)``: ``loaded[row]`` prompt tokens brought from disk. A block the pool has no
    room for is not loaded (it is computed instead).

  Example: `save_prefixes`.
  >>> load_prefixes  # doctest: +ELLIPSIS
  <function load_prefixes at ...>
  """
  from jaxpaged._src import paging, prefix  # pylint: disable=g-import-not-at-top (cycle)
  from jaxpaged._src.blocks import promote_blocks  # pylint: disable=g-import-not-at-top
  ps, loaded = cache.spec.page_size, []
  for row, prompt in enumerate(prompts):
    tokens = np.asarray(prompt, np.int32)
    usable = (len(tokens) - 1) // ps
    if not usable:
      loaded.append(0)
      continue
    seq = np.array([row], np.int32)
    started, match = prefix.match_prefix(cache, seq, tokens[None, :usable * ps],
                                         np.array([usable * ps], np.int32), salts=salt,
                                         max_prompt_tokens=np.zeros(1, np.int32))
    found = store.run(tokens, salt, int(match.num_cached[0]) // ps, usable) if bool(
        match.ok) else []
    ok = False
    if found:
      started, ok = promote_blocks(started, row, found)
    loaded.append(len(found) * ps if bool(ok) else 0)
    if found and bool(ok):
      cache = paging.release(started, seq)
  return cache, loaded


def save_prefixes(cache, store: DiskStore, seq_ids) -> int:
  """Writes the full, fully written blocks of sequences ``seq_ids`` that ``store`` does not
  hold yet (`blocks.sequence_blocks`). Returns how many were written.

  >>> import tempfile
  >>> import jax.numpy as jnp
  >>> from jaxpaged import init_cache, match_prefix, write_kv
  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
  >>> store = DiskStore(tempfile.mkdtemp(), 1 << 20, spec=spec)
  >>> prompt = jnp.array([[1, 2, 3, 4, 5]])
  >>> cache, found = match_prefix(init_cache(spec), jnp.array([0]), prompt, jnp.array([5]))
  >>> k = jnp.arange(20.0).reshape(5, 1, 4)
  >>> save_prefixes(write_kv(cache, 0, k, -k, found.slots), store, [0])  # two full blocks
  2
  >>> fresh, loaded = load_prefixes(init_cache(spec), store, [[1, 2, 3, 4, 5]])  # a restart
  >>> loaded  # tokens read from disk, now cached on the device for match_prefix to hit
  [4]
  """
  missing = lambda key, tokens, salt: not store.holds(key, tokens, salt)
  return sum(store.put(block) for block in sequence_blocks(cache, list(seq_ids), missing))
