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

A later section ``diskstore`` (the library's own `DiskStore.put/get`) goes in `SECTIONS`: a
function ``bench_diskstore(quick) -> list[Row]``, appended as ``("diskstore", bench_diskstore)``.
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


def _print_conclusion(fs: str, per_size: list[tuple[str, int, dict, dict]],
                      concurrency: list[Row]) -> None:
  labels = [f"{label} {size / 1024:.0f}K" for label, size, _, _ in per_size]
  print(f"\ndisk storage, {fs} filesystem under {tempfile.gettempdir()}; reads page-cache warm. "
        "GB/s (ratio to the baseline, marked =)")
  print(f"{'':<28}" + "".join(f"{s:>22}" for s in labels))
  for kind, idx, base in (("write", 2, "copyfile"), ("read", 3, "open().read()")):
    for name in per_size[0][idx]:
      cells = []
      for entry in per_size:
        size, t = entry[1], entry[idx]
        mark = "=" if name == base else f"{t[base] / t[name]:.2f}x"
        cells.append(f"{size / t[name] / 1e9:8.2f} ({mark:>6})")
      print(f"{kind + ' ' + name:<28}" + "".join(f"{c:>22}" for c in cells))
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


# ----------------------------------------------------------------------------- sections

# (name, bench(quick) -> rows). A `diskstore` section (rows for `DiskStore.put/get`, against
# the same copyfile / read baselines) is appended here as ("diskstore", bench_diskstore).
SECTIONS: list[tuple[str, Callable[[bool], list[Row]]]] = [
    ("storage", bench_storage),
]


def run(quick: bool = False) -> list[Row]:
  rows = []
  for _, bench in SECTIONS:
    rows += bench(quick)
  return rows


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  from benchmarks.harness import print_table  # pylint: disable=g-import-not-at-top
  print_table(run("--quick" in sys.argv))
