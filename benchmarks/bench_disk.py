"""Disk tier benchmarks (disk-tier issue): which storage to build the persistent KV tier on.

The issue asks to choose the storage library by measurement, and for disk write and read GB/s
per block against a plain file copy of the same bytes, in the same run. Sections (`SECTIONS`):

``storage`` -- candidate storages, one KV block per key, in a fresh
  `tempfile.TemporaryDirectory` (the default temp dir's filesystem: the conclusion names it).
  Blocks: one SmolLM2-135M page (30 layers x 3 KV heads x 64 head_dim x 16 tokens x K and V):
  float32 (737,280 bytes), int8 (195,840 bytes: 184,320 of K/V plus its float32 per-token
  scales, `CacheSpec.page_bytes`), and a float32 block 4x larger (2,949,120 bytes).
  Each block size: ``n`` blocks (200; 40 with ``--quick``) written by every contender in turn,
  round robin (block i by each contender, then block i + 1), so that load drifts hit all alike;
  then read back the same way. Figures are medians of the per-block times, as GB/s of block
  bytes, and ratios to the baseline of the same run.

  Writes:
    - ``copyfile`` (the baseline): `shutil.copyfile` of a block file to a new name (sendfile in
      the kernel, no fsync: what a plain copy of the same bytes costs).
    - ``atomic file + fsync``: open a temp file in the store dir, write, `os.fsync`, close,
      `os.replace` to the final name (a crash leaves the old block or the new, never half; the
      directory is not fsynced, so a crash may lose the name: a cache miss, not corruption).
    - ``atomic file, no fsync``: the same without fsync (what fsync costs).
    - ``lmdb put``: one write transaction per block, default ``sync=True``: each commit
      fdatasyncs the data pages, then writes the meta page through an O_DSYNC descriptor
      (strace shows both), so two flushes where the atomic file has one fsync.
  Reads (page-cache warm: the blocks were just written, and a cold cache needs root to get):
    - ``open().read()`` (the baseline): bytes.
    - ``readinto np.empty``: open unbuffered, `readinto` a fresh `np.empty` buffer.
    - ``np.memmap + copy``: `np.array(np.memmap(...))`.
    - ``lmdb get``: a read transaction with ``buffers=True``, `np.frombuffer(...).copy()`.
  ``zlib.crc32`` of a block in memory: the per-block checksum a store verifies on read.

  Before measuring, the page cache's growth is prefaulted (`_prefault`: this VM's first touch
  of guest memory is slow, and would land on whichever contender touched it first).

  Concurrency: 2 processes (multiprocessing, spawn) each write 100 distinct float32 blocks at
  once, atomic files + fsync against LMDB puts, as total GB/s from the first start to the last
  end; 1 process writing all 200 is the baseline (median of 3 trials; 1 with ``--quick``).

  LMDB is optional (CI does not install it): without it the LMDB rows are skipped and a line
  says so.

``diskstore`` -- the library's own `jaxpaged.DiskStore`, for the same SmolLM2-135M blocks
  (float32, and int8 with its per-token scales; each block ends an 8-block prefix, so its file
  also holds 128 token ids and a JSON header: 738,336 and 197,024 bytes). Per block size, ``n``
  distinct blocks (keyed by their chained hash) by every contender in turn, round robin, medians,
  as GB/s of *block-file* bytes (every contender moves the same bytes):
    - writes: ``copyfile`` of a block file (the baseline), the storage section's ``atomic file
      + fsync`` and ``atomic file, no fsync`` of its bytes, ``DiskStore.put`` (encodes: header
      JSON, CRC-32; temp file, fsync, rename) and ``DiskStore.put, no fsync`` (``fsync=False``:
      what fsync costs, also as ms per block);
    - reads: ``open().read()`` (the baseline), ``readinto np.empty``, ``DiskStore.get`` (reads,
      verifies CRC-32, format, layout, every token id and the salt, builds the `CachedBlock`,
      touches the file's mtime), and ``zlib.crc32`` of the bytes in memory.
  Then each operation is profiled (cProfile, 40 calls; 100 in full) and the printed profile says
  where its time goes: crc32, fsync, file syscalls, json, numpy, other Python.

  What it found (this 2-core VM, ext4, other engineers' test runs loading it; a quick and a full
  run, so ranges): ``DiskStore.put`` runs at 0.6-0.9x the raw atomic write + fsync (f32: 1.4 vs
  0.8 ms a block in one run, 2.5 vs 2.1 ms in the other: fsync's own cost swings with the load)
  and, without fsync, at 0.35-0.65x the raw write without fsync (f32: 0.7-0.8 vs 0.25-0.5 ms).
  Profiled, a put without fsync is 40-50% file syscalls (the block goes out in 8 writes, one
  per chunk; the temp file is created in ``v1/tmp`` and renamed into another directory; the
  key's 2-hex subdirectory is ``mkdir``-ed on every put), 20-25% CRC-32 for f32 (0.17 ms a
  block: zlib.crc32 runs at ~4.3 GB/s here) and 25-45% Python (layout `dataclasses.asdict`, the
  checks, the index). fsync is 30-75% of a put with it: 0.4-0.7 ms a block in one run, 1.6 ms
  (f32) in the other, 3 ms in a trial earlier the same day. ``DiskStore.get`` runs at
  0.13-0.17x ``readinto`` of a page-cache-warm file (f32: 0.33 vs 0.05 ms): CRC-32 is ~40% of
  it for f32 (verifying caps a get at crc32's ~4.3 GB/s, while reads of cached pages run at
  10-14 GB/s), the read ~15%, the rest mostly Python (header JSON, the layout compared as a
  dict, the token ids compared, the mtime touched); for int8 blocks Python is half. Per block
  that is ~0.3 ms on a read and ~0.5 ms on a write besides fsync: small next to computing 16
  tokens of prefill, and on a page-cache-cold disk the read itself dominates. Not measured by
  this section (it would need gigabytes of block files): a put also snapshots the whole index
  (`TieredStore.snapshot`, to restore it if the write fails), O(entries); measured once by
  filling a store's index with fake entries, a put without fsync took 0.8 ms with 10,000
  entries and 3-5 ms with 22,000 (the 16 GiB default capacity in f32 blocks), the snapshot
  alone 1.6-4 ms of it.

``restart`` -- what a warm disk store saves a restarted server: the built-in chat workload
  (`examples/chat_workload.py`: 8 requests and their 2 follow-ups, 16 new tokens, in quick; 16
  and 4, 32 tokens, in full; mean gap 0.25 s, served in real time) on
  `jaxpaged.models.serving.Server` with ``examples/serve.py``'s pool (40 pages of 16 tokens,
  16 sequences, token budget 128) and ``disk_cache=DIR``, each run in a fresh Python process
  (`_restart_worker`, ``python -m benchmarks.bench_disk --restart-worker``): **cold**, on an
  empty DIR (it writes its blocks there), then **warm**, a new process on the DIR the cold one
  filled. Each process compiles and rehearses the run before the measured one (see
  `_restart_worker`: a plain `Server.warmup` left programs of the disk's paths and of real-time
  admission shapes to compile during the measured run), so the difference is serving, not
  compiling; the table says how many programs still compiled during each measured run (0 so
  far). Printed: mean and median TTFT, prompt tokens computed (``prompt_tokens -
  device_hit_tokens - host_hit_tokens``: ``host_hit_tokens`` counts every block promoted into the
  pool, the disk's included, ``disk_hit_tokens`` is that part), tokens read from disk, blocks
  written and found, and cold / warm ratios; and whether the two runs' outputs are identical
  (greedy decoding: they must be). The two processes share JAX's persistent compilation cache
  (in the run's temp dir), which only shortens the second one's untimed compiling.

  What it found (same loaded VM): quick, cold / warm mean TTFT 2.00 / 0.44 s (4.6x), median
  4.8x, prompt tokens computed 693 / 85 (8.2x), 352 tokens read from disk; full, mean TTFT
  3.56 / 0.51 s (7.0x), median 15x, computed 951 / 167 (5.7x), 528 tokens from disk. The cold
  run already shares the system prompt between its requests on device, so the disk saves the
  first request's whole prompt and each question's own blocks. Both runs compiled nothing while
  serving and gave identical outputs. Time: ~3 minutes for ``--quick`` (two processes of ~80 s,
  mostly compiling), ~6 minutes in full.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import zlib
from typing import Callable

import numpy as np

from benchmarks.harness import Row

try:
  import lmdb  # pylint: disable=g-import-not-at-top
except ImportError:
  lmdb = None

LMDB_MAP_SIZE = 8 << 30  # address space, not disk: the file grows with its contents
SKIP_LMDB = "lmdb not installed: row skipped (pip install lmdb to measure it)"


def _block_sizes() -> list[tuple[str, int]]:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top

  def page_bytes(dtype):
    return jp.CacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, page_size=16, num_pages=4,
                        max_seqs=1, max_pages_per_seq=4, dtype=dtype).page_bytes
  f32 = page_bytes(jnp.float32)
  return [("f32 block", f32), ("int8 block", page_bytes(jnp.int8)), ("f32 block x4", 4 * f32)]


def _prefault(nbytes: int) -> None:
  """Touch and free ``nbytes`` of anonymous memory (at most half of what is free). On a VM whose
  memory the host backs lazily (this one), the first touch of guest memory runs at ~0.5 GB/s:
  without this, whichever contender first grows the page cache past memory used before pays
  it, and a x4 block write measured 0.5 GB/s against 3 GB/s once the memory had been used."""
  try:
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return
  np.ones(min(nbytes, free // 2), np.uint8)


def _filesystem(path: str) -> str:
  """The type of the filesystem holding ``path`` (Linux /proc/mounts), or '?'."""
  path, best = os.path.realpath(path), ("", "?")
  try:
    with open("/proc/mounts") as f:
      for line in f:
        _, mount, fstype = line.split()[:3]
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best[0]):
          best = (mount, fstype)
  except OSError:
    pass
  return best[1]


# ----------------------------------------------------------------------------- the contenders


def write_atomic(directory: str, name: str, data, *, fsync: bool = True) -> None:
  """Temp file in ``directory``, write, fsync, rename over ``name``: all of the block or none."""
  tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
  with open(tmp, "wb", buffering=0) as f:
    f.write(data)
    if fsync:
      os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, name))


def read_into(path: str, size: int) -> np.ndarray:
  buf = np.empty(size, np.uint8)
  with open(path, "rb", buffering=0) as f:
    if f.readinto(buf) != size:
      raise OSError(f"short read: {path}")
  return buf


def read_memmap(path: str, size: int) -> np.ndarray:
  return np.array(np.memmap(path, np.uint8, "r", shape=(size,)))


def read_plain(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def lmdb_open(path: str):
  return lmdb.open(path, map_size=LMDB_MAP_SIZE)  # sync=True, metasync=True: the defaults


def lmdb_put(env, key: bytes, data) -> None:
  with env.begin(write=True) as txn:
    txn.put(key, data)


def lmdb_get(env, key: bytes) -> np.ndarray:
  with env.begin(buffers=True) as txn:
    return np.frombuffer(txn.get(key), np.uint8).copy()


def _name(i: int) -> str:
  return f"{i:08d}.kv"


# ----------------------------------------------------------------------------- storage: 1 process


def _round_robin(ops: dict[str, Callable[[int], object]], n: int, warmup: int = 3
                 ) -> dict[str, float]:
  """Median seconds of ``op(i)`` for i in [warmup, warmup + n), contenders interleaved per i."""
  times = {name: [] for name in ops}
  for i in range(warmup + n):
    for name, op in ops.items():
      start = time.perf_counter()
      op(i)
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _measure_size(root: str, size: int, n: int) -> tuple[dict[str, float], dict[str, float]]:
  """Medians (seconds per block) of the writes and of the reads, for blocks of ``size`` bytes."""
  data = np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes()
  dirs = {k: os.path.join(root, k) for k in ("copy", "fsync", "nofsync", "lmdb")}
  for d in dirs.values():
    os.makedirs(d)
  source = os.path.join(root, "source.kv")
  with open(source, "wb") as f:
    f.write(data)
  env = lmdb_open(dirs["lmdb"]) if lmdb is not None else None
  try:
    writes = {
        "copyfile": lambda i: shutil.copyfile(source, os.path.join(dirs["copy"], _name(i))),
        "atomic file + fsync": lambda i: write_atomic(dirs["fsync"], _name(i), data),
        "atomic file, no fsync": lambda i: write_atomic(dirs["nofsync"], _name(i), data,
                                                        fsync=False),
    }
    if env is not None:
      writes["lmdb put"] = lambda i: lmdb_put(env, _name(i).encode(), data)
    write_s = _round_robin(writes, n)

    expected = np.frombuffer(data, np.uint8)
    for i in (0, n - 1):  # every contender gives back the bytes written
      assert read_plain(os.path.join(dirs["copy"], _name(i))) == data
      assert np.array_equal(read_into(os.path.join(dirs["fsync"], _name(i)), size), expected)
      assert np.array_equal(read_memmap(os.path.join(dirs["nofsync"], _name(i)), size), expected)
      if env is not None:
        assert np.array_equal(lmdb_get(env, _name(i).encode()), expected)
    reads = {
        "open().read()": lambda i: read_plain(os.path.join(dirs["copy"], _name(i))),
        "readinto np.empty": lambda i: read_into(os.path.join(dirs["fsync"], _name(i)), size),
        "np.memmap + copy": lambda i: read_memmap(os.path.join(dirs["nofsync"], _name(i)), size),
        "zlib.crc32": lambda i: zlib.crc32(data),
    }
    if env is not None:
      reads["lmdb get"] = lambda i: lmdb_get(env, _name(i).encode())
    read_s = _round_robin(reads, n)
  finally:
    if env is not None:
      env.close()
  for d in dirs.values():
    shutil.rmtree(d)
  os.remove(source)
  return write_s, read_s


WRITE_RATIOS = [("atomic file + fsync", "copyfile"), ("atomic file, no fsync", "copyfile"),
                ("lmdb put", "copyfile"), ("lmdb put", "atomic file + fsync")]
READ_RATIOS = [("readinto np.empty", "open().read()"), ("np.memmap + copy", "open().read()"),
               ("lmdb get", "open().read()"), ("lmdb get", "readinto np.empty"),
               ("zlib.crc32", "readinto np.empty")]


def _storage_rows(label: str, size: int, write_s: dict, read_s: dict) -> list[Row]:
  b = "disk-storage"
  kb = f"{label} {size / 1024:.0f} KiB"
  rows = [Row(b, f"{kb}: write {name}", size / t / 1e9, "GB/s") for name, t in write_s.items()]
  rows += [Row(b, f"{kb}: write {a} / {base}", write_s[base] / write_s[a], "x")
           for a, base in WRITE_RATIOS if a in write_s]
  rows += [Row(b, f"{kb}: read {name}", size / t / 1e9, "GB/s") for name, t in read_s.items()]
  rows += [Row(b, f"{kb}: read {a} / {base}", read_s[base] / read_s[a], "x")
           for a, base in READ_RATIOS if a in read_s]
  return rows


# ----------------------------------------------------------------------------- storage: 2 processes


def _writer(commands, results, go) -> None:
  """A worker process: runs ``(kind, path, first, n, size)`` commands until None. It writes its
  own blocks ``first .. first + n - 1`` after ``go`` is set and reports (start, end)."""
  while (command := commands.get()) is not None:
    kind, path, first, n, size = command
    data = os.urandom(size)
    env = lmdb_open(path) if kind == "lmdb" else None
    results.put("ready")
    go.wait()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable between processes
    for i in range(first, first + n):
      if env is None:
        write_atomic(path, _name(i), data)
      else:
        lmdb_put(env, _name(i).encode(), data)
    end = time.perf_counter()
    if env is not None:
      env.close()
    results.put((start, end))


def _concurrency_rows(root: str, size: int, trials: int) -> list[Row]:
  ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs JAX's threads
  commands, results, go = [ctx.Queue(), ctx.Queue()], ctx.Queue(), ctx.Event()
  workers = [ctx.Process(target=_writer, args=(q, results, go), daemon=True) for q in commands]
  for w in workers:
    w.start()
  total = 200
  kinds = ["files"] + (["lmdb"] if lmdb is not None else [])
  gbs = {}
  try:
    for trial in range(trials):
      for kind in kinds:
        for procs in (1, 2):
          path = os.path.join(root, f"{kind}-{procs}-{trial}")
          os.makedirs(path)
          per = total // procs
          for p in range(procs):
            commands[p].put((kind, path, p * per, per, size))
          for _ in range(procs):
            assert results.get(timeout=600) == "ready"
          go.set()
          spans = [results.get(timeout=600) for _ in range(procs)]
          go.clear()
          seconds = max(e for _, e in spans) - min(s for s, _ in spans)
          gbs.setdefault((kind, procs), []).append(total * size / seconds / 1e9)
          shutil.rmtree(path)
  finally:
    for q in commands:
      q.put(None)
    for w in workers:
      w.join(timeout=60)
  med = {key: statistics.median(v) for key, v in gbs.items()}
  b, kb = "disk-concurrency", f"{total} f32 blocks of {size / 1024:.0f} KiB"
  names = {"files": "atomic files + fsync", "lmdb": "lmdb puts"}
  rows = []
  for kind in kinds:
    rows += [Row(b, f"{kb}, {names[kind]}: 1 process", med[(kind, 1)], "GB/s"),
             Row(b, f"{kb}, {names[kind]}: 2 processes at once", med[(kind, 2)], "GB/s"),
             Row(b, f"{names[kind]}: 2 processes / 1", med[(kind, 2)] / med[(kind, 1)], "x")]
  if lmdb is not None:
    rows.append(Row(b, "2 processes: lmdb puts / atomic files", med[("lmdb", 2)] /
                    med[("files", 2)], "x"))
  return rows


def _print_speeds(labels: list[str], columns: list[tuple[int, dict, dict]], name_width: int,
                  cell_width: int, *, per_block: bool) -> None:
  """The write and read tables: one row per contender, one column per block size (``(size,
  write seconds, read seconds)`` by contender), GB/s and the ratio to the baseline (copyfile,
  plain read); ``per_block`` adds the milliseconds per block."""
  print(f"{'':<{name_width}}" + "".join(f"{s:>{cell_width}}" for s in labels))
  for kind, idx, base in (("write", 1, "copyfile"), ("read", 2, "open().read()")):
    for name in columns[0][idx]:
      cells = []
      for column in columns:
        size, t = column[0], column[idx]
        mark = "=" if name == base else f"{t[base] / t[name]:.2f}x"
        cell = f"{size / t[name] / 1e9:7.2f} ({mark:>6})"
        cells.append(cell + (f" {t[name] * 1e3:6.2f}ms" if per_block else ""))
      print(f"{kind + ' ' + name:<{name_width}}" + "".join(f"{c:>{cell_width}}" for c in cells))


def _print_conclusion(fs: str, per_size: list[tuple[str, int, dict, dict]],
                      concurrency: list[Row]) -> None:
  labels = [f"{label} {size / 1024:.0f}K" for label, size, _, _ in per_size]
  print(f"\ndisk storage, {fs} filesystem under {tempfile.gettempdir()}; reads page-cache warm. "
        "GB/s (ratio to the baseline, marked =)")
  _print_speeds(labels, [(e[1], e[2], e[3]) for e in per_size], 28, 22, per_block=False)
  if lmdb is None:
    print(SKIP_LMDB)
  else:
    for kind, idx, a, base in (("write", 2, "lmdb put", "atomic file + fsync"),
                               ("read", 3, "lmdb get", "readinto np.empty")):
      cells = [f"{e[idx][base] / e[idx][a]:.2f}x" for e in per_size]
      print(f"{kind + ': ' + a + ' / ' + base:<40}" + "".join(f"{c:>18}" for c in cells))
  for row in concurrency:
    print(f"{row.name:<68} {row.value:8.2f} {row.unit}")


def bench_storage(quick: bool) -> list[Row]:
  n = 40 if quick else 200
  if lmdb is None:
    print(f"disk-storage: {SKIP_LMDB}", flush=True)
  rows, per_size = [], []
  with tempfile.TemporaryDirectory(prefix="jaxpaged-bench-disk-") as root:
    fs = _filesystem(root)
    sizes = _block_sizes()
    _prefault(max(s for _, s in sizes) * (n + 3) * 5)  # 4 writers' page cache, and LMDB's slack
    for label, size in sizes:
      write_s, read_s = _measure_size(_fresh(root, label), size, n)
      per_size.append((label, size, write_s, read_s))
      rows += _storage_rows(label, size, write_s, read_s)
    concurrency = _concurrency_rows(_fresh(root, "concurrency"), per_size[0][1], 1 if quick else 3)
  rows += concurrency
  _print_conclusion(fs, per_size, concurrency)
  return rows


def _fresh(root: str, label: str) -> str:
  path = os.path.join(root, label.replace(" ", "-"))
  os.makedirs(path)
  return path


# ----------------------------------------------------------------------------- diskstore

DISKSTORE_DEPTH = 7  # each block ends a prefix of 8 blocks (128 token ids in its file)
PROFILE_TOP = 6  # functions listed per profiled operation


def _store_spec(dtype):
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  return jp.CacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, page_size=16, num_pages=4,
                      max_seqs=1, max_pages_per_seq=DISKSTORE_DEPTH + 1, dtype=dtype,
                      prefix_caching=True)


def _store_blocks(spec, count: int) -> list:
  """``count`` `CachedBlock`s of ``spec`` with distinct prefixes (keyed by their chained hash,
  as the manager keys them); they share one set of random K/V (and scales) arrays."""
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(spec.page_bytes)
  shape = (spec.num_layers, spec.num_kv_heads, spec.page_size, spec.head_dim)
  if np.dtype(spec.dtype) == np.int8:
    kv = {f: rng.integers(-127, 128, shape, np.int8) for f in ("k", "v")}
    kv.update({f: rng.uniform(0.01, 0.1, shape[:3]).astype(np.float32)
               for f in ("k_scales", "v_scales")})
  else:
    kv = {f: rng.normal(size=shape).astype(spec.dtype) for f in ("k", "v")}
  blocks = []
  for _ in range(count):
    tokens = rng.integers(0, 49152, (DISKSTORE_DEPTH + 1) * spec.page_size).astype(np.int32)
    key = jp.block_key(jp.block_hashes(tokens, spec.page_size)[-1])
    blocks.append(jp.CachedBlock(key, 0, tokens, **kv))
  return blocks


_IO_CALLS = ("open", "read", "write", "readinto", "mkdir", "replace", "utime", "stat", "fstat",
             "close", "unlink", "flush", "seek")


def _kind_of(filename: str, func: str) -> str:
  """The part of a block write or read a profiled function belongs to."""
  if "zlib.crc32" in func:
    return "crc32"
  if "posix.fsync" in func:
    return "fsync"
  if filename == "~" and any(f"{c}" in func for c in _IO_CALLS) and (
      "posix" in func or "_io" in func or "io.open" in func):
    return "file syscalls"
  if "json" in filename or "json" in func:
    return "json"
  if "numpy" in filename or "numpy" in func or "ufunc" in func:
    return "numpy"
  return "other Python"


def _profile(op: Callable[[int], object], items: range
             ) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
  """cProfile of ``op(i)`` for i in ``items``: (profiled seconds per call, each part's share of
  the profiled total (`_kind_of`), the `PROFILE_TOP` functions by own time as (name, share))."""
  import cProfile  # pylint: disable=g-import-not-at-top
  import pstats  # pylint: disable=g-import-not-at-top
  profiler = cProfile.Profile()
  profiler.enable()
  for i in items:
    op(i)
  profiler.disable()
  stats = pstats.Stats(profiler)
  total = stats.total_tt
  kinds: dict[str, float] = {}
  for (filename, _, func), (_, _, tottime, _, _) in stats.stats.items():
    kind = _kind_of(filename, func)
    kinds[kind] = kinds.get(kind, 0.0) + tottime / total
  top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:PROFILE_TOP]
  names = []
  for (filename, line, func), (_, _, tottime, _, _) in top:
    func = func.replace("<built-in method ", "").replace("<method ", "").rstrip(">")
    where = "" if filename == "~" else f" ({os.path.basename(filename)}:{line})"
    names.append((f"{func}{where}", tottime / total))
  return total / len(items), dict(sorted(kinds.items(), key=lambda kv: -kv[1])), names


def _measure_store(root: str, dtype, n: int, profiled: int, warmup: int = 3):
  """Medians (seconds per block) of the writes and reads of ``n`` blocks of ``dtype``, the file
  size, the K/V bytes per block, and the profiles of put (fsync, no fsync) and get."""
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  spec = _store_spec(dtype)
  blocks = _store_blocks(spec, warmup + n + profiled)
  dirs = {k: os.path.join(root, k) for k in ("copy", "fsync", "nofsync", "store", "store-nofsync",
                                              "scratch")}
  for d in dirs.values():
    os.makedirs(d)
  capacity = 1 << 40  # bytes: every block stays (eviction is not what is measured)
  stores = {
      "fsync": jp.DiskStore(dirs["store"], capacity, spec=spec, model="bench"),
      "nofsync": jp.DiskStore(dirs["store-nofsync"], capacity, spec=spec, model="bench",
                              fsync=False)}
  # The bytes of a block file, copied and written raw by the baselines.
  scratch = jp.DiskStore(dirs["scratch"], capacity, spec=spec, model="bench", fsync=False)
  assert scratch.put(blocks[-1])
  source = str(scratch.path_of(blocks[-1].key))
  data = read_plain(source)
  size = len(data)

  def put(store):
    def op(i):
      if not store.put(blocks[i]):
        raise RuntimeError(f"DiskStore.put refused a block: {store.last_error}")
    return op

  def get(i):
    b = blocks[i]
    if stores["fsync"].get(b.key, b.tokens, b.salt, end=len(b.tokens)) is None:
      raise RuntimeError(f"DiskStore.get missed a block it holds: {stores['fsync'].last_error}")

  writes = {
      "copyfile": lambda i: shutil.copyfile(source, os.path.join(dirs["copy"], _name(i))),
      "atomic file + fsync": lambda i: write_atomic(dirs["fsync"], _name(i), data),
      "atomic file, no fsync": lambda i: write_atomic(dirs["nofsync"], _name(i), data,
                                                      fsync=False),
      "DiskStore.put": put(stores["fsync"]),
      "DiskStore.put, no fsync": put(stores["nofsync"]),
  }
  write_s = _round_robin(writes, n, warmup)
  for i in (0, warmup + n - 1):  # the store's file holds the same bytes as the raw copies
    hit = stores["nofsync"].get(blocks[i].key, blocks[i].tokens, 0)
    assert hit is not None and np.array_equal(hit.k, blocks[i].k) and np.array_equal(
        hit.tokens, blocks[i].tokens)
    assert os.path.getsize(stores["fsync"].path_of(blocks[i].key)) == size
  reads = {
      "open().read()": lambda i: read_plain(os.path.join(dirs["copy"], _name(i))),
      "readinto np.empty": lambda i: read_into(os.path.join(dirs["fsync"], _name(i)), size),
      "DiskStore.get": get,
      "zlib.crc32": lambda i: zlib.crc32(data),
  }
  read_s = _round_robin(reads, n, warmup)
  extra = range(warmup + n, warmup + n + profiled)
  profiles = {
      "put": _profile(put(stores["fsync"]), extra),
      "put, no fsync": _profile(put(stores["nofsync"]), extra),
      "get": _profile(get, range(warmup, warmup + profiled)),
  }
  kv_bytes = spec.page_bytes
  for d in dirs.values():
    shutil.rmtree(d)
  return write_s, read_s, size, kv_bytes, profiles


STORE_WRITE_RATIOS = [("DiskStore.put", "copyfile"), ("DiskStore.put", "atomic file + fsync"),
                      ("DiskStore.put, no fsync", "copyfile"),
                      ("DiskStore.put, no fsync", "atomic file, no fsync"),
                      ("DiskStore.put, no fsync", "DiskStore.put"),
                      ("atomic file, no fsync", "atomic file + fsync")]
STORE_READ_RATIOS = [("DiskStore.get", "open().read()"), ("DiskStore.get", "readinto np.empty"),
                     ("zlib.crc32", "DiskStore.get")]


def _store_rows(label: str, size: int, write_s: dict, read_s: dict) -> list[Row]:
  b, kb = "disk-store", f"{label} {size / 1024:.0f} KiB file"
  rows = [Row(b, f"{kb}: write {name}", size / t / 1e9, "GB/s") for name, t in write_s.items()]
  rows += [Row(b, f"{kb}: {a} / {base} (speed)", write_s[base] / write_s[a], "x")
           for a, base in STORE_WRITE_RATIOS]
  rows.append(Row(b, f"{kb}: fsync cost in DiskStore.put",
                  (write_s["DiskStore.put"] - write_s["DiskStore.put, no fsync"]) * 1e3, "ms"))
  rows += [Row(b, f"{kb}: read {name}", size / t / 1e9, "GB/s") for name, t in read_s.items()]
  rows += [Row(b, f"{kb}: {a} / {base} (speed)", read_s[base] / read_s[a], "x")
           for a, base in STORE_READ_RATIOS]
  return rows


def bench_diskstore(quick: bool) -> list[Row]:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n, profiled = (40, 40) if quick else (200, 100)
  rows, results = [], []
  with tempfile.TemporaryDirectory(prefix="jaxpaged-bench-diskstore-") as root:
    fs = _filesystem(root)
    _prefault(_store_spec(jnp.float32).page_bytes * (n + profiled + 3) * 6)
    for label, dtype in (("f32 block", jnp.float32), ("int8 block", jnp.int8)):
      write_s, read_s, size, kv, profiles = _measure_store(_fresh(root, label), dtype, n,
                                                             profiled)
      results.append((label, size, kv, write_s, read_s, profiles))
      rows += _store_rows(label, size, write_s, read_s)
  print(f"\nDiskStore put/get vs plain copies of the same block-file bytes, {fs} filesystem under "
        f"{tempfile.gettempdir()}; {n} blocks per contender, round robin, medians; reads "
        "page-cache warm. GB/s of file bytes (ratio: speed vs the baseline, marked =)")
  labels = [f"{label} {size / 1024:.0f}K file ({kv / 1024:.0f}K K/V)"
            for label, size, kv, *_ in results]
  _print_speeds(labels, [(e[1], e[3], e[4]) for e in results], 30, 30, per_block=True)
  for a, base in STORE_WRITE_RATIOS[1:2] + STORE_WRITE_RATIOS[3:5] + STORE_READ_RATIOS[1:]:
    idx = 4 if a in results[0][4] else 3
    cells = [f"{e[idx][base] / e[idx][a]:.2f}x" for e in results]
    print(f"  {a + ' / ' + base + ' (speed)':<58}" + "".join(f"{c:>10}" for c in cells))
  print("cProfile (own time per function, share of the profiled total; cProfile inflates "
        "Python calls against C ones):")
  for label, size, _, _, _, profiles in results:
    for op, (per_call, kinds, top) in profiles.items():
      print(f"  {label} {op}: {per_call * 1e3:.2f} ms/call profiled: " +
            ", ".join(f"{kind} {share:.0%}" for kind, share in kinds.items()))
      print("      top: " + ", ".join(f"{name} {share:.0%}" for name, share in top[:4]))
  return rows


# ----------------------------------------------------------------------------- restart

RESTART_POOL = dict(num_pages=40, page_size=16, max_seqs=16, token_budget=128)  # serve.py's
RESTART_GAP = 0.25  # seconds between arrivals on average (serve.py's --mean-gap)


def _restart_worker(disk_dir: str, scratch_dir: str, out: str, num_requests: int,
                    max_new_tokens: int) -> None:
  """One server process (``python -m benchmarks.bench_disk --restart-worker ...``): loads the
  model, opens ``disk_dir`` as the disk cache of the server it measures, compiles everything a
  run needs, serves the chat workload in real time and writes what happened to ``out`` (JSON).

  Compiling: `Server.warmup(requests)` compiles the model steps and serves the workload once on
  the step clock without the disk, so it does not compile the disk's paths (blocks gathered for
  writing, host blocks promoted: programs of the workload's shapes), nor every shape of
  admission a real-time schedule meets (measured with ``jax_log_compiles``: with it alone, a cold
  run's serving compiled 63 programs, and a warm one `admit_plan` and `admit_step` for shapes
  the step clock never met, stalling 3 requests 16 s each). So the process rehearses: a second
  server (same spec and model: the same jitted programs) compiles every step shape
  (`Server.warmup()`), then serves the workload in real time twice, each time on a fresh copy of
  ``disk_dir`` as it was when the process started (empty for the cold run, the cold run's blocks
  for the warm one): the situation the measured run meets. Then the measured server, whose disk
  was opened first and left untouched, serves; ``compiles`` lists what still compiled during its
  run."""
  import json  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from examples.chat_workload import chat_workload  # pylint: disable=g-import-not-at-top
  from jaxpaged.models import gguf, serving  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  log = lambda line: print(f"  restart worker {os.getpid()}: {line}", file=sys.stderr, flush=True)
  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  requests = chat_workload(tokenizer, num_requests=num_requests, max_new_tokens=max_new_tokens,
                           mean_gap=RESTART_GAP)
  loaded = time.perf_counter()
  for rehearsal in range(2):  # copies of the disk as the measured run will find it
    shutil.copytree(disk_dir, f"{scratch_dir}-{rehearsal}")
  server = serving.Server(params, config, eos_id=tokenizer.eos_token_id, disk_cache=disk_dir,
                          **RESTART_POOL)
  found = server.disks[0].stats()["entries"]  # blocks indexed when the store was opened
  opened = time.perf_counter()
  log(f"model loaded in {loaded - start:.1f}s, disk cache opened ({found} blocks) in "
      f"{opened - loaded:.1f}s; compiling and rehearsing ...")
  for rehearsal in range(2):
    scratch = serving.Server(params, config, eos_id=tokenizer.eos_token_id,
                             disk_cache=f"{scratch_dir}-{rehearsal}", **RESTART_POOL)
    if not rehearsal:
      scratch.warmup()
    scratch.run(requests, realtime=True)
  compiled = time.perf_counter()
  log(f"compiled and rehearsed in {compiled - opened:.1f}s; serving ...")

  compiles = []

  class _Compiles(logging.Handler):  # compilations during the timed run (should be none)

    def emit(self, record):
      message = record.getMessage()
      if message.startswith("Compiling "):
        compiles.append(message.split(" ", 2)[1])

  jax_logger = logging.getLogger("jax")
  handler, propagate = _Compiles(), jax_logger.propagate
  jax_logger.addHandler(handler)
  jax_logger.propagate = False  # (no log lines on stderr)
  jax.config.update("jax_log_compiles", True)
  try:
    report = server.run(requests, realtime=True)
  finally:
    jax.config.update("jax_log_compiles", False)
    jax_logger.removeHandler(handler)
    jax_logger.propagate = propagate
  log(f"served in {report.duration:.1f}s ({len(compiles)} programs compiled while serving)")
  stats, disk = report.stats, server.disks[0].stats()
  with open(out, "w") as f:
    json.dump(dict(
        ttft=[r.ttft for r in report.results], prompt=[len(r.prompt) for r in report.results],
        cached=[r.cached_tokens for r in report.results],
        outputs=[r.output for r in report.results], duration=report.duration,
        counters={k: stats[k] for k in ("prompt_tokens", "device_hit_tokens", "host_hit_tokens",
                                         "disk_hit_tokens", "disk_hit_blocks",
                                         "disk_saved_blocks")},
        disk={k: disk[k] for k in ("hits", "misses", "bytes_read", "bytes_written", "writes")},
        found=found, compiles=compiles, load_s=loaded - start, open_s=opened - loaded,
        warmup_s=compiled - opened, total_s=time.perf_counter() - start), f)


def _serve_in_fresh_process(root: str, kind: str, num_requests: int, max_new_tokens: int,
                            env: dict) -> dict:
  """Runs `_restart_worker` in a new Python process on ``root``/disk; its result."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out, scratch = os.path.join(root, f"{kind}.json"), os.path.join(root, f"rehearsal-{kind}")
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.bench_disk", "--restart-worker",
       os.path.join(root, "disk"), scratch, out, str(num_requests), str(max_new_tokens)],
      cwd=repo, capture_output=True, text=True, check=False, env=env)
  if done.returncode:
    raise RuntimeError(f"restart worker ({kind}) failed ({done.returncode}):\n"
                       f"{done.stderr[-4000:]}")
  for line in done.stderr.splitlines():
    if line.startswith("  restart worker"):
      print(f"{line} [{kind}]", file=sys.stderr, flush=True)
  for rehearsal in range(2):
    shutil.rmtree(f"{scratch}-{rehearsal}", ignore_errors=True)
  with open(out) as f:
    return json.load(f)


def _computed(run: dict) -> int:
  """Prompt tokens the model computed: admitted prompt tokens less those attached from the
  prefix cache. ``host_hit_tokens`` counts every block promoted into the pool, the disk's too
  (`CacheManager._count_admission` is given all promoted blocks; ``disk_hit_tokens`` is the part
  of them read from disk), so disk hits are not subtracted twice."""
  c = run["counters"]
  return c["prompt_tokens"] - c["device_hit_tokens"] - c["host_hit_tokens"]


def bench_restart(quick: bool) -> list[Row]:
  num_requests, max_new_tokens = (8, 16) if quick else (16, 32)
  runs = {}
  with tempfile.TemporaryDirectory(prefix="jaxpaged-bench-restart-") as root:
    os.makedirs(os.path.join(root, "disk"))
    # JAX's persistent compilation cache, shared by the two processes: the second one's
    # compiling (never timed) loads the first one's programs instead of compiling them again.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for kind in ("cold", "warm"):  # warm: a new process on the directory the cold one filled
      runs[kind] = _serve_in_fresh_process(root, kind, num_requests, max_new_tokens, env)
  cold, warm = runs["cold"], runs["warm"]
  b = "disk-restart"
  rows = []
  summary = {}
  for kind, run in runs.items():
    c = run["counters"]
    summary[kind] = dict(
        mean=statistics.fmean(run["ttft"]), median=statistics.median(run["ttft"]),
        computed=_computed(run), disk_tokens=c["disk_hit_tokens"], prompt=c["prompt_tokens"],
        device=c["device_hit_tokens"], ram=c["host_hit_tokens"] - c["disk_hit_tokens"],
        saved=c["disk_saved_blocks"], found=run["found"], compiles=len(run["compiles"]),
        elapsed=run["duration"], warmup=run["warmup_s"], total=run["total_s"])
    s = summary[kind]
    rows += [Row(b, f"{kind}: mean TTFT", s["mean"], "s"),
             Row(b, f"{kind}: median TTFT", s["median"], "s"),
             Row(b, f"{kind}: prompt tokens computed", s["computed"], "tokens"),
             Row(b, f"{kind}: prompt tokens read from disk", s["disk_tokens"], "tokens")]
  sc, sw = summary["cold"], summary["warm"]
  rows += [Row(b, "mean TTFT cold / warm", sc["mean"] / sw["mean"], "x"),
           Row(b, "median TTFT cold / warm", sc["median"] / sw["median"], "x"),
           Row(b, "prompt tokens computed cold / warm", sc["computed"] / max(sw["computed"], 1),
               "x")]
  same = cold["outputs"] == warm["outputs"]
  print(f"\nrestart: the chat workload ({num_requests} requests + follow-ups = "
        f"{len(cold['ttft'])}, {max_new_tokens} new tokens, mean gap {RESTART_GAP}s, real time), "
        f"pool {RESTART_POOL['num_pages']} pages of {RESTART_POOL['page_size']}, max_seqs "
        f"{RESTART_POOL['max_seqs']}, token budget {RESTART_POOL['token_budget']}; each run a "
        "fresh process, compiled before it serves")
  cols = ("mean TTFT", "median TTFT", "computed", "from disk", "device hit", "RAM hit", "prompt",
          "saved blk", "found blk", "compiles", "serve s")
  print(f"{'':<6}" + "".join(f"{c:>12}" for c in cols))
  for kind in ("cold", "warm"):
    s = summary[kind]
    cells = [f"{s['mean']:.3f}s", f"{s['median']:.3f}s", s["computed"], s["disk_tokens"],
             s["device"], s["ram"], s["prompt"], s["saved"], s["found"], s["compiles"],
             f"{s['elapsed']:.1f}"]
    print(f"{kind:<6}" + "".join(f"{c:>12}" for c in cells))
    if runs[kind]["compiles"]:
      print(f"  WARNING: compiled while serving {kind}: {', '.join(runs[kind]['compiles'])}")
  print(f"cold / warm: mean TTFT {sc['mean'] / sw['mean']:.2f}x, median TTFT "
        f"{sc['median'] / sw['median']:.2f}x, prompt tokens computed "
        f"{sc['computed'] / max(sw['computed'], 1):.2f}x ({sc['computed']} vs {sw['computed']}); "
        f"outputs identical: {'yes' if same else 'NO'}; per process: compile "
        f"{sc['warmup']:.0f}s / {sw['warmup']:.0f}s, total {sc['total']:.0f}s / {sw['total']:.0f}s")
  return rows


# ----------------------------------------------------------------------------- sections

# (name, bench(quick) -> rows), run in this order by `run` (``--only disk``).
SECTIONS: list[tuple[str, Callable[[bool], list[Row]]]] = [
    ("storage", bench_storage),
    ("diskstore", bench_diskstore),
    ("restart", bench_restart),
]


def run(quick: bool = False) -> list[Row]:
  rows = []
  for _, bench in SECTIONS:
    rows += bench(quick)
  return rows


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  from benchmarks.harness import print_table  # pylint: disable=g-import-not-at-top
  if sys.argv[1:2] == ["--restart-worker"]:  # DIR SCRATCH OUT NUM_REQUESTS MAX_NEW_TOKENS
    _restart_worker(*sys.argv[2:5], int(sys.argv[5]), int(sys.argv[6]))
  else:  # [--quick] [SECTION ...]
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    print_table([row for name, bench in SECTIONS if not names or name in names
                 for row in bench("--quick" in sys.argv)])
