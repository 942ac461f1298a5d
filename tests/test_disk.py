"""The disk tier (`jaxpaged.DiskStore`, `CacheManager(disk=...)`): bit-exact round trips, restarts
(in-process and across real processes), never a false hit under forced hash collisions, corrupt
files, disk full / read-only / killed writers, concurrent processes, capacity, policies, TTL,
argument checks, and a state machine against a dict-and-LRU model.

Oracles are independent of the store: the K/V a test wrote (NumPy, random *bits*, so NaNs,
-0.0 and subnormals must survive too), compared byte for byte; the documented LRU rule; the file
system itself (which files exist). Subprocesses run this file as a script (``python -m
tests.test_disk MODE ...``, `_worker_main`); permission tests fork and drop to uid 65534 when run
as root (root ignores permission bits, and the interpreter under /root is not executable by
other users, so a forked child is used rather than a new interpreter).
"""

import dataclasses
import errno
import json
import math
import os
import pathlib
import random
import resource
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import jaxpaged as jp
from jaxpaged import DiskError, DiskStore, JaxPagedError
from jaxpaged._src import disk as disk_lib
from jaxpaged._src.blocks import CachedBlock, block_key
from jaxpaged._src.hashing import block_hashes_numpy
from jaxpaged._src.tier_spec import TierError

ROOT = pathlib.Path(__file__).resolve().parent.parent
PS = 4
MB = 1 << 20
SPEC = dict(num_layers=2, num_kv_heads=1, head_dim=8, page_size=PS, num_pages=16, max_seqs=2,
            max_pages_per_seq=8, prefix_caching=True)
WORKER_SPEC = dict(SPEC, num_layers=1)
SALT_HIGH = 2**63 + 7  # a salt with the top bit set (int64 would make it negative)
# A block file's 32-byte prefix, as disk.py documents it: magic, format version, header bytes,
# payload bytes, CRC-32 of the rest, 4 reserved bytes.
PREFIX = struct.Struct("<8sIIQI4x")
# Manager tests share one spec and prompts of 17..32 tokens: the compiled steps are reused.
MSPEC = jp.CacheSpec(**{**SPEC, "num_pages": 8})


def spec_of(**kw) -> jp.CacheSpec:
  return jp.CacheSpec(**{**SPEC, **kw})


# ----------------------------------------------------------------------------- block oracles

def random_bits(rng, shape, dtype) -> np.ndarray:
  """Random bit patterns of ``dtype`` (every NaN payload, -0.0, subnormal included)."""
  dtype = np.dtype(dtype)
  count = int(np.prod(shape)) * dtype.itemsize
  return rng.integers(0, 256, count, dtype=np.uint8).view(dtype).reshape(shape)


def key_of(spec, tokens, salt) -> int:
  """The key of the block ending ``tokens`` (a whole prefix) under ``salt``."""
  return block_key(block_hashes_numpy(np.asarray(tokens, np.int32), spec.page_size, salt,
                                      spec.block_hash)[-1])


def make_block(spec, tokens, salt=0, seed=(0,)) -> CachedBlock:
  """A block ending ``tokens`` with random K/V (and scales) from ``seed``: the oracle."""
  tokens = np.asarray(tokens, np.int32)
  rng = np.random.default_rng([*seed, len(tokens), salt & 0xFFFFFFFF, salt >> 32])
  shape = (spec.num_layers, spec.num_kv_heads, spec.page_size, spec.head_dim)
  fields = dict(k=random_bits(rng, shape, spec.dtype), v=random_bits(rng, shape, spec.dtype))
  if spec.token_scales:
    fields.update(k_scales=random_bits(rng, shape[:3], np.float32),
                  v_scales=random_bits(rng, shape[:3], np.float32))
  return CachedBlock(key_of(spec, tokens, salt), salt, tokens, static_scales=spec.static_scales,
                     **fields)


def prefix_blocks(spec, tokens, salt=0, seed=(0,)) -> list[CachedBlock]:
  """One block per full page of ``tokens``, each ending its prefix."""
  ps = spec.page_size
  return [make_block(spec, tokens[:(i + 1) * ps], salt, (*seed, i))
          for i in range(len(tokens) // ps)]


def same_block(got, want) -> bool:
  """``got`` is bit for bit ``want`` (fields, dtypes, shapes, bytes)."""
  if got is None or got.key != want.key or got.salt != want.salt:
    return False
  if got.static_scales != want.static_scales:
    return False
  for field in ("tokens", "k", "v", "k_scales", "v_scales"):
    a, b = getattr(got, field), getattr(want, field)
    if (a is None) != (b is None):
      return False
    if a is not None and (a.dtype != b.dtype or a.shape != b.shape
                          or np.ascontiguousarray(a).tobytes() != b.tobytes()):
      return False
  return True


def lookup(store, block):
  """`DiskStore.get` for exactly ``block``'s place (its key, its prefix, its depth)."""
  return store.get(block.key, block.tokens, block.salt, end=len(block.tokens))


def universe(spec, seed=0) -> list[CachedBlock]:
  """4 prompts x 3 blocks, under salts 0 and `SALT_HIGH`: the blocks the workers write."""
  rng = np.random.default_rng(seed)
  blocks = []
  for p in range(4):
    blocks += prefix_blocks(spec, rng.integers(0, 1000, 3 * PS), [0, SALT_HIGH][p % 2],
                            (seed, p))
  return blocks


def block_files(store) -> dict[int, int]:
  """key -> size of every block file of the store's layout (what the file system holds)."""
  return {int(p.name[:-len(disk_lib.SUFFIX)], 16): p.stat().st_size
          for p in store.dir.glob(f"*/*{disk_lib.SUFFIX}")}


def file_size(store, block) -> int:
  return sum(len(c) for c in disk_lib.encode_block(block, store.layout, store.spec))


def index_state(store):
  return sorted(store.keys()), store.stats()["entries"], store.stats()["used"]


# ----------------------------------------------------------------------------- 1. round trip

ROUND_TRIP_SPECS = {
    "float32": dict(),
    "bfloat16": dict(dtype="bfloat16"),
    "int8": dict(dtype="int8"),
    "float8_e4m3fn": dict(dtype="float8_e4m3fn"),
    "int8-static": dict(dtype="int8", static_scales=(0.05, 0.02)),
}


@pytest.mark.parametrize("name", ROUND_TRIP_SPECS)
def test_round_trip_is_bit_exact(tmp_path, name):
  spec = spec_of(**ROUND_TRIP_SPECS[name])
  rng = np.random.default_rng(1)
  blocks = []
  for salt in (0, 1, SALT_HIGH, 2**64 - 1):
    blocks += prefix_blocks(spec, rng.integers(0, 2**31 - 1, 3 * PS), salt, (salt % 97,))
  store = DiskStore(tmp_path, MB, spec=spec, model="m")
  assert all(store.put(b) for b in blocks)
  assert spec.token_scales == (blocks[0].k_scales is not None)
  for b in blocks:
    got = lookup(store, b)
    assert same_block(got, b), b.tokens
    assert got.static_scales == spec.static_scales
    # a longer prompt that starts with the block's prefix hits it too
    longer = np.concatenate([b.tokens, [5, 6, 7]])
    assert same_block(store.get(b.key, longer, b.salt, end=len(b.tokens)), b)
  stats = store.stats()
  assert stats["hits"] == 2 * len(blocks) and stats["hit_tokens"] == 2 * len(blocks) * PS
  assert stats["writes"] == len(blocks) and stats["entries"] == len(blocks)
  assert stats["used"] == sum(block_files(store).values())
  # the same bytes after a restart (a new store on the same directory)
  again = DiskStore(tmp_path, MB, spec=spec, model="m")
  assert all(same_block(lookup(again, b), b) for b in blocks)


def test_layouts_never_read_each_other(tmp_path):
  """Stores of another dtype, page size, model or static scale share a directory safely."""
  base = spec_of(dtype="int8", static_scales=(0.05, 0.02))
  tokens = np.arange(2 * PS)
  block = make_block(base, tokens)
  store = DiskStore(tmp_path, MB, spec=base, model="m")
  assert store.put(block)
  others = [DiskStore(tmp_path, MB, spec=base, model="another model"),
            DiskStore(tmp_path, MB, spec=spec_of(dtype="int8", static_scales=(0.05, 0.03)),
                      model="m"),
            DiskStore(tmp_path, MB, spec=spec_of(dtype="int8"), model="m"),
            DiskStore(tmp_path, MB, spec=spec_of(num_layers=1, dtype="int8",
                                                 static_scales=(0.05, 0.02)), model="m")]
  for other in others:
    assert other.dir != store.dir and len(other) == 0
    assert other.get(block.key, tokens, 0) is None
  assert same_block(lookup(store, block), block)


# ----------------------------------------------------------------------------- 2. manager

def prompt_kv(spec, length, seed):
  """Random float32 K/V per layer (``[layers, length, heads, dim]``): what a model computed."""
  rng = np.random.default_rng(seed)
  shape = (spec.num_layers, length, spec.num_kv_heads, spec.head_dim)
  return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(
      np.float32)


def admit_and_write(manager, prompt, k, v, *, salt=0):
  """Admits ``prompt`` and writes its new tokens' K/V (all layers)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = manager.admit(prompt, salt=salt)
  assert a is not None
  new = slice(a.num_cached, a.num_cached + a.num_new)
  for layer in range(manager.spec.num_layers):
    manager.cache = jp.write_kv(manager.cache, layer, jnp.asarray(k[layer, new]),
                                jnp.asarray(v[layer, new]), a.slots[:a.num_new])
  return a


def gathered(manager, seq, n):
  """The sequence's first ``n`` tokens of K and V, ``[layers, n, heads, dim]`` each."""
  kv = [jp.gather_kv(manager.cache, layer, seq) for layer in range(manager.spec.num_layers)]
  return tuple(np.stack([np.asarray(x[i])[:n] for x in kv]) for i in (0, 1))


def test_manager_restart_hits_the_disk_bit_exactly(tmp_path):
  spec = MSPEC
  prompt = list(range(100, 117))  # 4 full blocks before the last token
  k, v = prompt_kv(spec, len(prompt), 0)
  first = jp.CacheManager(spec, host_bytes=MB, disk=DiskStore(tmp_path, MB, spec=spec))
  a = admit_and_write(first, prompt, k, v)
  first.release([a.seq_id])
  assert first.stats()["disk_saved_blocks"] == 4 and first.stats()["disk"]["writes"] == 4
  del first

  manager = jp.CacheManager(spec, host_bytes=MB, disk=DiskStore(tmp_path, MB, spec=spec))
  assert manager.cached_prefix_tokens(prompt) == 16
  b = manager.admit(prompt)
  stats = manager.stats()
  assert b.num_cached == 16 and b.host_hit_tokens == 16 and b.num_new == 1
  assert stats["disk_hit_tokens"] == 16 and stats["disk_hit_blocks"] == 4
  assert stats["disk"]["hits"] == 4
  gk, gv = gathered(manager, b.seq_id, 16)
  np.testing.assert_array_equal(gk, k[:, :16])
  np.testing.assert_array_equal(gv, v[:, :16])


def _demotion_run(tmp_path, host_bytes):
  """Fills prompt A, drops its write-through copies, then admits B, which makes the small pool
  demote A's blocks (device -> RAM -> disk); A is admitted again. Returns what to check."""
  spec = MSPEC
  a_prompt, b_prompt = list(range(1, 22)), list(range(500, 525))  # 6 and 7 pages
  k, v = prompt_kv(spec, len(a_prompt), 2)
  store = DiskStore(tmp_path, MB, spec=spec)
  manager = jp.CacheManager(spec, host_bytes=host_bytes, disk=store)
  a = admit_and_write(manager, a_prompt, k, v)
  manager.release([a.seq_id])
  assert store.stats()["writes"] == 5
  store.clear()  # only the demotions can bring A's blocks to disk now
  assert len(store) == 0 and not block_files(store)
  b = manager.admit(b_prompt)
  assert b is not None and b.num_cached == 0
  demoted = dict(manager=manager.stats(), disk=store.stats())
  manager.release([b.seq_id])
  again = manager.admit(a_prompt)
  got = gathered(manager, again.seq_id, again.num_cached)
  return spec, k, v, demoted, again, manager.stats(), got


def test_manager_device_evictions_go_straight_to_disk_without_ram(tmp_path):
  spec, k, v, demoted, again, stats, (gk, gv) = _demotion_run(tmp_path, host_bytes=0)
  assert demoted["manager"]["host_entries"] == 0
  assert demoted["disk"]["writes"] >= 4 and demoted["disk"]["entries"] >= 4
  assert again.num_cached == 20
  assert stats["disk_hit_tokens"] == stats["host_hit_tokens"] >= 16
  assert stats["device_hit_tokens"] + stats["host_hit_tokens"] == 20
  np.testing.assert_array_equal(gk, k[:, :20])
  np.testing.assert_array_equal(gv, v[:, :20])


def test_manager_blocks_go_device_to_ram_to_disk_and_come_back(tmp_path):
  one = make_block(MSPEC, np.arange(5 * PS)).nbytes  # the deepest of A's blocks
  spec, k, v, demoted, again, stats, (gk, gv) = _demotion_run(tmp_path, host_bytes=2 * one)
  assert demoted["manager"]["host_entries"] >= 1  # some of A's blocks in RAM
  assert demoted["disk"]["writes"] >= 1  # and some pushed on to disk
  assert again.num_cached == 20
  assert stats["disk_hit_tokens"] >= PS
  assert stats["device_hit_tokens"] + stats["host_hit_tokens"] == 20
  np.testing.assert_array_equal(gk, k[:, :20])
  np.testing.assert_array_equal(gv, v[:, :20])


def test_manager_refuses_a_disk_of_another_layout(tmp_path):
  with pytest.raises(JaxPagedError, match="open the DiskStore with this manager's spec"):
    jp.CacheManager(MSPEC, disk=DiskStore(tmp_path, MB, spec=spec_of(page_size=8)))
  with pytest.raises(JaxPagedError, match="jaxpaged.DiskStore or None"):
    jp.CacheManager(MSPEC, disk=str(tmp_path))
  with pytest.raises(JaxPagedError, match="prefix_caching=True"):
    jp.CacheManager(spec_of(prefix_caching=False), disk=DiskStore(tmp_path, MB, spec=MSPEC))


# ----------------------------------------------------------------------------- subprocesses

def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")


def _spawn(mode, *args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "tests.test_disk", mode, *map(str, args)],
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _result(proc, timeout=60.0) -> dict:
  """The JSON last line a worker printed (it must exit 0 within ``timeout`` seconds)."""
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    pytest.fail(f"worker {proc.args[3:]} did not finish in {timeout} s")
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def _read_line(proc, timeout) -> str:
  ready, _, _ = select.select([proc.stdout], [], [], timeout)
  if not ready:
    proc.kill()
    pytest.fail(f"worker {proc.args[3:]} printed nothing in {timeout} s")
  return proc.stdout.readline()


def _wait_for(path, timeout=60.0):
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(path)
    time.sleep(0.01)


def _worker_main(argv) -> None:
  """Subprocess entry points (``python -m tests.test_disk MODE ARGS``), one JSON line out."""
  mode, path = argv[0], argv[1]
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = universe(spec)
  if mode == "fill":  # another process stores a prompt's blocks, built from its K/V, and exits
    store = DiskStore(path, MB, spec=MSPEC)
    blocks = kv_blocks(MSPEC, RESTART_PROMPT, *prompt_kv(MSPEC, len(RESTART_PROMPT), 3),
                       SALT_HIGH)
    print(json.dumps(dict(saved=sum(store.put(b) for b in blocks), pid=os.getpid())))
  elif mode == "fsize":  # writes past RLIMIT_FSIZE fail with EFBIG
    store = DiskStore(path, MB, spec=spec)
    assert store.put(blocks[0])
    before = index_state(store)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    with warnings.catch_warnings(record=True) as heard:
      warnings.simplefilter("always")
      ok = store.put(blocks[1])
    stats = store.stats()
    print(json.dumps(dict(
        ok=ok, write_errors=stats["write_errors"], last_error=stats["last_error"],
        warned=[str(w.message) for w in heard], index_same=index_state(store) == before,
        file=store.path_of(blocks[1].key).exists(), tmp=os.listdir(store.tmp),
        hit=same_block(lookup(store, blocks[0]), blocks[0]))))
  elif mode == "loop":  # writes and removes blocks until killed (or 30 s)
    store = DiskStore(path, MB, spec=spec)
    rng = random.Random(os.getpid())
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      block = rng.choice(blocks)
      store.put(block)
      if rng.random() < 0.5:
        store.remove(rng.choice(blocks).key)
  elif mode in ("writer", "reader"):
    rounds, go = int(argv[2]), argv[3]
    store = DiskStore(path, MB, spec=spec, fsync=False)
    rng = random.Random(os.getpid())
    print("ready", flush=True)
    _wait_for(go)
    wrong = hits = 0
    for _ in range(rounds):
      order = rng.sample(blocks, len(blocks))
      for block in order:
        if mode == "writer":
          store.put(block)
        got = lookup(store, block)
        hits += got is not None
        wrong += got is not None and not same_block(got, block)
      if mode == "writer":
        for block in order[:len(order) // 2]:
          store.remove(block.key)
    if mode == "writer":
      for block in blocks:
        assert store.put(block)
    stats = store.stats()
    print(json.dumps(dict(wrong=wrong, hits=hits, corrupt=stats["corrupt_removed"],
                          collisions=stats["collisions"], errors=stats["write_errors"])))
  else:
    raise SystemExit(f"unknown mode {mode}")


RESTART_PROMPT = list(range(40, 57))  # 4 full blocks before the last token


def kv_blocks(spec, prompt, k, v, salt):
  """The `CachedBlock`s of a prompt's full blocks, built from its K/V ``[layers, tokens, heads,
  dim]`` here (the manager's own demotion is not used): an independent statement of what a
  block holds."""
  ps, tokens = spec.page_size, np.asarray(prompt, np.int32)
  out = []
  for i in range((len(tokens) - 1) // ps):
    part = slice(i * ps, (i + 1) * ps)
    out.append(CachedBlock(key_of(spec, tokens[:part.stop], salt), salt, tokens[:part.stop],
                           np.ascontiguousarray(k[:, part].transpose(0, 2, 1, 3)),
                           np.ascontiguousarray(v[:, part].transpose(0, 2, 1, 3))))
  return out


def test_restart_across_processes(tmp_path):
  """Another process fills the store and exits; a manager here hits every block."""
  done = _result(_spawn("fill", tmp_path))
  assert done["saved"] == 4 and done["pid"] != os.getpid()
  k, v = prompt_kv(MSPEC, len(RESTART_PROMPT), 3)
  manager = jp.CacheManager(MSPEC, disk=DiskStore(tmp_path, MB, spec=MSPEC))
  a = manager.admit(RESTART_PROMPT)  # salt 0: not its blocks
  assert a.num_cached == 0
  manager.release([a.seq_id])
  a = manager.admit(RESTART_PROMPT, salt=SALT_HIGH)
  assert a.num_cached == 16 and manager.stats()["disk_hit_tokens"] == 16
  gk, gv = gathered(manager, a.seq_id, 16)
  np.testing.assert_array_equal(gk, k[:, :16])
  np.testing.assert_array_equal(gv, v[:, :16])


# ----------------------------------------------------------------------------- 4. security

@pytest.mark.parametrize("hash_fn", ["constant", "unchained"])
def test_forced_collisions_never_serve_another_prefix_or_salt(tmp_path, hash_fn):
  spec = spec_of(block_hash=hash_fn)
  rng = np.random.default_rng(4)
  repeated = np.tile(rng.integers(0, 50, PS), 3)  # equal blocks: unchained keys collide too
  prompts = [rng.integers(0, 50, 3 * PS), rng.integers(0, 50, 3 * PS), repeated]
  # salts equal in their low 32 bits, or in their low 63 bits: only a full 64-bit salt tells
  salts = [1, 1 + 2**32, 1 + 2**63, 2**64 - 1]
  blocks = [b for i, p in enumerate(prompts) for s in salts
            for b in prefix_blocks(spec, p, s, (i,))]
  store = DiskStore(tmp_path, 64 * MB, spec=spec)
  for n, block in enumerate(blocks):
    assert store.put(block)
    for earlier in blocks[:n + 1]:  # every block put so far: its own K/V or a miss
      got = lookup(store, earlier)
      assert got is None or same_block(got, earlier)
      # without `end`, a hit is still a block whose whole prefix the query starts with
      got = store.get(earlier.key, earlier.tokens, earlier.salt)
      assert got is None or (got.salt == earlier.salt and np.array_equal(
          got.tokens, earlier.tokens[:len(got.tokens)]))
    assert same_block(lookup(store, block), block)  # the last one written is served
  assert store.stats()["collisions"] > 0 and store.stats()["corrupt_removed"] == 0
  # run(): each block at its own depth, never another depth's block under the same key
  runs = 0
  for p, prompt in enumerate(prompts):
    for s in salts:
      found = store.run(np.append(prompt, 7), s)
      runs += len(found)
      for i, block in enumerate(found):
        assert same_block(block, make_block(spec, prompt[:(i + 1) * PS], s, (p, i)))
  assert runs > 0 or hash_fn == "constant"  # constant: one file, the repeated prompt's last


def test_salts_are_64_bit_and_never_truncated(tmp_path):
  spec = spec_of()
  tokens = np.arange(PS)
  store = DiskStore(tmp_path, MB, spec=spec)
  keys = {key_of(spec, tokens, s) for s in (1, 1 + 2**32, 1 + 2**63, 2**64 - 1)}
  assert len(keys) == 4  # every bit of the salt is in the key
  block = make_block(spec, tokens, 2**64 - 1)
  assert store.put(block)
  assert same_block(lookup(store, block), block)
  for salt in (2**64 - 1 - 2**63, 2**32 - 1, 2**63 - 1, 0):
    assert store.get(block.key, tokens, salt) is None  # the same key, another salt
    assert not store.holds(block.key, tokens, salt)
  assert store.holds(block.key, tokens, 2**64 - 1)


def _planted(store, key, block):
  """Puts ``block``'s contents under another ``key``: a 64-bit hash collision, made by hand
  (`DiskStore.put` trusts the key it is given, as a colliding hash would make it)."""
  store.remove(key)
  assert store.put(dataclasses.replace(block, key=key))


def test_manager_never_serves_a_colliding_block_of_another_prefix_or_salt(tmp_path):
  prompt, other = list(range(60, 77)), list(range(80, 97))
  k, v = prompt_kv(MSPEC, len(prompt), 5)
  store = DiskStore(tmp_path, MB, spec=MSPEC)
  own = kv_blocks(MSPEC, prompt, k, v, SALT_HIGH)
  for block in own:
    assert store.put(block)
    # the same block under the keys of another prompt, and of its own tokens under salts that
    # agree with its salt in the low 63 or 32 bits
    for tokens, salt in [(other, SALT_HIGH), (prompt, SALT_HIGH - 2**63),
                         (prompt, SALT_HIGH & 0xFFFFFFFF), (prompt, 0)]:
      _planted(store, key_of(MSPEC, tokens[:len(block.tokens)], salt), block)
  manager = jp.CacheManager(MSPEC, disk=DiskStore(tmp_path, MB, spec=MSPEC))
  for tokens, salt in [(other, SALT_HIGH), (prompt, SALT_HIGH - 2**63),
                       (prompt, SALT_HIGH & 0xFFFFFFFF), (prompt, 0)]:
    a = manager.admit(tokens, salt=salt)
    assert a.num_cached == 0 and manager.stats()["disk_hit_tokens"] == 0
    manager.release([a.seq_id])
  assert manager.stats()["disk"]["collisions"] == 4
  a = manager.admit(prompt, salt=SALT_HIGH)  # its own blocks still hit
  assert a.num_cached == 16
  gk, gv = gathered(manager, a.seq_id, 16)
  np.testing.assert_array_equal(gk, k[:, :16])
  np.testing.assert_array_equal(gv, v[:, :16])


@pytest.mark.parametrize("victim,planted,hits", [(3, 1, 3), (0, 3, 0)])
def test_manager_never_serves_another_depth_under_a_colliding_key(tmp_path, victim, planted,
                                                                   hits):
  """Block ``victim``'s key holds block ``planted`` of the same prompt (a prefix of it, or
  longer): a valid block, of another depth. It must be a miss, not that depth's K/V."""
  prompt = list(range(30, 47))
  k, v = prompt_kv(MSPEC, len(prompt), 6)
  store = DiskStore(tmp_path, MB, spec=MSPEC)
  blocks = kv_blocks(MSPEC, prompt, k, v, 0)
  assert all(store.put(b) for b in blocks)
  _planted(store, blocks[victim].key, blocks[planted])
  manager = jp.CacheManager(MSPEC, disk=DiskStore(tmp_path, MB, spec=MSPEC))
  a = manager.admit(prompt)
  assert a.num_cached == hits * PS
  gk, gv = gathered(manager, a.seq_id, a.num_cached)
  np.testing.assert_array_equal(gk, k[:, :a.num_cached])
  np.testing.assert_array_equal(gv, v[:, :a.num_cached])
  assert manager.stats()["disk"]["collisions"] == 1


# ----------------------------------------------------------------------------- 5. integrity

@pytest.fixture
def filled(tmp_path):
  """A store holding `universe` (mix64 keys, all distinct)."""
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = universe(spec)
  store = DiskStore(tmp_path, MB, spec=spec, fsync=False)
  assert all(store.put(b) for b in blocks)
  return spec, store, blocks


def _others_hit(store, blocks, bad):
  return all(same_block(lookup(store, b), b) for b in blocks if b.key != bad.key)


def test_every_single_byte_flip_is_a_miss_that_removes_the_file(filled):
  spec, store, blocks = filled
  victim = blocks[4]
  path = store.path_of(victim.key)
  good = path.read_bytes()
  undetected = []
  for offset in range(len(good)):
    bad = bytearray(good)
    bad[offset] ^= 0x5A
    path.write_bytes(bad)
    got = lookup(store, victim)
    if got is None:
      assert not path.exists(), offset
    else:  # an undetected flip must not have changed anything served
      assert same_block(got, victim), offset
      undetected.append(offset)
  # only the 4 reserved bytes at the end of the 32-byte prefix carry no data
  assert undetected == [28, 29, 30, 31]
  assert store.stats()["corrupt_removed"] == len(good) - 4
  assert store.stats()["collisions"] == 0
  assert _others_hit(store, blocks, victim)


def _layout_copy(tmp_path, spec, victim, spec_change=None, **store_args):
  """The file another layout's store writes for ``victim``'s tokens (its own K/V)."""
  other_spec = dataclasses.replace(spec, **(spec_change or {}))
  other = DiskStore(tmp_path / "other", MB, spec=other_spec, **store_args)
  block = make_block(other_spec, victim.tokens, victim.salt, (9,))
  assert other.put(block)
  return other.path_of(block.key).read_bytes()


def _version(data: bytes, version: int) -> bytes:
  """A valid file's bytes under another format version (its checksum still matches)."""
  magic, _, header, payload, crc = PREFIX.unpack_from(data)
  return PREFIX.pack(magic, version, header, payload, crc) + data[PREFIX.size:]


def test_damaged_and_foreign_files_are_misses_and_removed(filled, tmp_path):
  spec, store, blocks = filled
  victim, donor = blocks[1], blocks[5]
  good = store.path_of(victim.key).read_bytes()
  header_at = PREFIX.size + 10
  cases = {
      "payload byte": good[:-20] + bytes([good[-20] ^ 1]) + good[-19:],
      "header byte": good[:header_at] + b"X" + good[header_at + 1:],
      "truncated by one": good[:-1],
      "truncated to the prefix": good[:PREFIX.size],
      "truncated mid-prefix": good[:13],
      "one byte longer": good + b"\0",
      "zero length": b"",
      "garbage": np.random.default_rng(0).integers(0, 256, len(good), np.uint8).tobytes(),
      "another format version": _version(good, disk_lib.FORMAT_VERSION + 1),
      "another model's layout": _layout_copy(tmp_path, spec, victim, model="other"),
      "another dtype's layout": _layout_copy(tmp_path, spec, victim,
                                             spec_change=dict(dtype=np.dtype("bfloat16"))),
      "another block's file": store.path_of(donor.key).read_bytes(),
  }
  for n, (name, data) in enumerate(cases.items(), 1):
    path = store.path_of(victim.key)
    path.write_bytes(data)
    assert lookup(store, victim) is None, name
    assert not path.exists(), name
    assert store.stats()["corrupt_removed"] == n, name
    assert victim.key not in store.keys(), name
    assert _others_hit(store, blocks, victim), name
    assert store.put(victim), name  # the block can be stored again
    assert same_block(lookup(store, victim), victim), name
  assert store.stats()["collisions"] == 0


def test_a_colliding_valid_block_is_a_miss_and_stays(tmp_path):
  spec = spec_of(block_hash="constant")
  a, b = make_block(spec, np.arange(PS)), make_block(spec, np.arange(PS) + 9)
  store = DiskStore(tmp_path, MB, spec=spec)
  assert a.key == b.key and store.put(a)
  assert lookup(store, b) is None
  assert store.path_of(a.key).exists() and store.stats()["collisions"] == 1
  assert store.stats()["corrupt_removed"] == 0
  assert same_block(lookup(store, a), a)


def test_damaged_files_found_on_open_are_misses(filled):
  spec, store, blocks = filled
  for b in blocks[:3]:
    path = store.path_of(b.key)
    path.write_bytes(path.read_bytes()[:-7])
  (store.dir / "zz").mkdir()
  (store.dir / "zz" / "not-a-key.kvb").write_bytes(b"?")
  (store.dir / "00" / "0000000000000001.txt").parent.mkdir(exist_ok=True)
  (store.dir / "00" / "0000000000000001.txt").write_bytes(b"?")
  again = DiskStore(store.root, MB, spec=spec)
  for b in blocks[:3]:
    assert lookup(again, b) is None and not again.path_of(b.key).exists()
  assert all(same_block(lookup(again, b), b) for b in blocks[3:])
  assert again.stats()["corrupt_removed"] == 3


# ----------------------------------------------------------------------------- 6. faults

def _failing_open(after_bytes: int, code=errno.ENOSPC):
  """An `open` whose files accept ``after_bytes`` bytes, then fail with ``code``."""
  real = open

  class Full:
    def __init__(self, f):
      self.f, self.left = f, after_bytes

    def write(self, data):
      data = memoryview(data).cast("B")
      if len(data) > self.left:
        self.f.write(data[:self.left])
        self.left = 0
        raise OSError(code, os.strerror(code))
      self.left -= len(data)
      return self.f.write(data)

    def __getattr__(self, name):
      return getattr(self.f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return self.f.__exit__(*exc)

  return lambda *a, **kw: Full(real(*a, **kw))


@pytest.mark.parametrize("after_bytes", [0, 100])
def test_disk_full_leaves_the_store_as_before(tmp_path, monkeypatch, after_bytes):
  spec = jp.CacheSpec(**WORKER_SPEC)
  a = make_block(spec, np.arange(PS))
  b = dataclasses.replace(make_block(spec, np.arange(PS) + 1), key=a.key)  # a collision
  fresh = make_block(spec, np.arange(2 * PS))
  store = DiskStore(tmp_path, MB, spec=spec)
  assert store.put(a)
  before, files = index_state(store), block_files(store)
  monkeypatch.setattr(disk_lib, "open", _failing_open(after_bytes), raising=False)
  for block in (b, fresh):  # one replacing a's file, one new
    with pytest.warns(RuntimeWarning, match="ENOSPC"):
      assert store.put(block) is False
  stats = store.stats()
  assert stats["write_errors"] == 2 and stats["last_error"].startswith("ENOSPC")
  assert index_state(store) == before and block_files(store) == files
  assert not os.listdir(store.tmp)  # the partial temporary file is gone
  monkeypatch.undo()
  assert same_block(lookup(store, a), a)  # nothing lost
  assert lookup(store, b) is None


def test_disk_full_while_evicting_loses_nothing(tmp_path, monkeypatch):
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = [make_block(spec, np.arange(PS) + i) for i in range(4)]
  store = DiskStore(tmp_path, 3 * file_size(DiskStore(tmp_path / "x", MB, spec=spec), blocks[0]),
                    spec=spec)
  assert all(store.put(b) for b in blocks[:3])
  before, files = index_state(store), block_files(store)
  monkeypatch.setattr(disk_lib, "open", _failing_open(10), raising=False)
  with pytest.warns(RuntimeWarning):
    assert not store.put(blocks[3])  # would have evicted blocks[0]
  monkeypatch.undo()
  assert index_state(store) == before and block_files(store) == files
  assert all(same_block(lookup(store, b), b) for b in blocks[:3])
  assert store.stats()["evictions"] == 0


def test_file_size_limit_efbig_in_a_real_process(tmp_path):
  got = _result(_spawn("fsize", tmp_path))
  assert got["ok"] is False and got["write_errors"] == 1
  assert got["last_error"].startswith("EFBIG") and any("EFBIG" in w for w in got["warned"])
  assert got["index_same"] and not got["file"] and got["tmp"] == [] and got["hit"]
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = universe(spec)
  store = DiskStore(tmp_path, MB, spec=spec)
  assert same_block(lookup(store, blocks[0]), blocks[0]) and lookup(store, blocks[1]) is None
  assert list(block_files(store)) == [blocks[0].key]


# The forked child runs only NumPy and file code (no JAX), so JAX's threads do not matter there.
def no_fork_warning(test):
  return pytest.mark.filterwarnings("ignore:os.fork.. was called:RuntimeWarning")(
      pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")(test))


def _as_nobody(fn, timeout=60.0):
  """``fn()`` in a forked child, as uid/gid 65534 when this process is root (root ignores
  permission bits). Returns what it returned (JSON-able); its exception fails the test."""
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:  # the child: never returns into pytest
    code = 0
    try:
      os.close(read)
      if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
      out = json.dumps(dict(value=fn()))
    except BaseException:  # pylint: disable=broad-exception-caught
      out, code = json.dumps(dict(error=traceback.format_exc())), 1
    try:
      os.write(write, out.encode())
    finally:
      os._exit(code)  # pylint: disable=protected-access
  os.close(write)
  chunks, deadline = [], time.monotonic() + timeout
  try:
    while True:
      ready, _, _ = select.select([read], [], [], max(deadline - time.monotonic(), 0))
      if not ready:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the forked child did not finish in {timeout} s")
      chunk = os.read(read, 1 << 16)
      if not chunk:
        break
      chunks.append(chunk)
  finally:
    os.close(read)
    os.waitpid(pid, 0)
  result = json.loads(b"".join(chunks) or b'{"error": "no output"}')
  assert "error" not in result, result["error"]
  return result["value"]


@pytest.fixture
def shared_dir():
  """A directory uid 65534 can reach (pytest's tmp_path is under a 0700 directory)."""
  path = pathlib.Path(tempfile.mkdtemp(prefix="jaxpaged-disk-test-"))
  path.chmod(0o755)
  if os.geteuid() == 0:
    for parent in path.parents:
      if not parent.stat().st_mode & stat.S_IXOTH:
        shutil.rmtree(path)
        pytest.skip(f"{parent} is not searchable by other users")
  yield path
  for d, _, _ in os.walk(path):
    os.chmod(d, 0o755)
  shutil.rmtree(path)


@no_fork_warning
def test_permission_denied_is_a_disk_error_naming_the_path_and_fix(shared_dir):
  locked = shared_dir / "locked"
  locked.mkdir()
  # root-owned 0o755 for uid 65534; a non-root owner is refused by 0o555 alike
  locked.chmod(0o755 if os.geteuid() == 0 else 0o555)
  spec = jp.CacheSpec(**WORKER_SPEC)

  def child():
    messages = []
    for path in (locked, locked / "deeper" / "store"):
      try:
        DiskStore(path, MB, spec=spec)
        messages.append(None)
      except DiskError as e:
        messages.append(str(e))
    return messages

  for path, message in zip((locked, locked / "deeper" / "store"), _as_nobody(child)):
    assert message is not None and repr(str(path)) in message
    assert "Permission denied" in message
    assert "pass a directory this process can create and write" in message
  assert not any(locked.iterdir())


@no_fork_warning
def test_directory_read_only_mid_run_refuses_writes_and_loses_nothing(shared_dir):
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = universe(spec)
  if os.geteuid() == 0:
    os.chown(shared_dir, 65534, 65534)

  def child():
    store = DiskStore(shared_dir, MB, spec=spec)
    assert store.put(blocks[0]) and store.put(blocks[1])
    results = []
    # first the block directories (the temporary file is written, the rename fails), then the
    # temporary directory too (the open fails)
    for locked in ([store.dir, *store.dir.iterdir()], [store.tmp]):
      for d in locked:
        if d.is_dir():
          d.chmod(0o555)
      before = index_state(store)
      with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        ok = store.put(blocks[2]), store.put(blocks[3])
      results.append(dict(
          ok=ok, errors=store.stats()["write_errors"], last=store.stats()["last_error"],
          warned=len(heard), same=index_state(store) == before, tmp=os.listdir(store.tmp),
          files=sorted(block_files(store)),
          hits=[same_block(lookup(store, b), b) for b in blocks[:2]]))
    return results

  results = _as_nobody(child)
  keys = sorted(b.key for b in blocks[:2])
  for n, got in enumerate(results, 1):
    assert got["ok"] == [False, False] and got["errors"] == 2 * n and got["warned"] == 2
    assert got["last"].startswith("EACCES") and got["same"]
    assert got["tmp"] == [] and got["files"] == keys and got["hits"] == [True, True]


def test_writers_killed_mid_write_leave_no_false_hit(tmp_path):
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = universe(spec)
  rng = random.Random(7)
  for _ in range(3):
    proc = _spawn("loop", tmp_path)
    try:
      assert _read_line(proc, 60).strip() == "ready"
      time.sleep(rng.uniform(0.0, 0.3))
    finally:
      proc.kill()
      proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = DiskStore(tmp_path, MB, spec=spec)  # opening works and cleans the dead one's files
    assert not [n for n in os.listdir(store.tmp) if n.startswith(f"{proc.pid}.")]
    files = block_files(store)
    assert set(files) <= {b.key for b in blocks}
    for b in blocks:
      got = lookup(store, b)
      assert (got is None) == (b.key not in files)  # a file under a block's name is whole
      assert got is None or same_block(got, b)
    assert store.stats()["corrupt_removed"] == 0


def test_open_removes_only_the_temporary_files_of_dead_writers(tmp_path):
  spec = jp.CacheSpec(**WORKER_SPEC)
  store = DiskStore(tmp_path, MB, spec=spec)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                        capture_output=True, text=True, timeout=60)
  alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    names = [f"{dead.stdout.strip()}.a.tmp", f"{alive.pid}.b.tmp", f"{os.getpid()}.c.tmp"]
    for name in names:
      (store.tmp / name).write_bytes(b"half a block")
    DiskStore(tmp_path, MB, spec=spec)
    assert sorted(os.listdir(store.tmp)) == sorted(names[1:])
  finally:
    alive.kill()
    alive.wait(timeout=30)


# ----------------------------------------------------------------------------- 7. concurrency

def test_two_writers_and_a_reader_at_once(tmp_path):
  go = tmp_path / "go"
  procs = [_spawn(mode, tmp_path / "store", 10, go) for mode in ("writer", "writer", "reader")]
  try:
    for proc in procs:
      assert _read_line(proc, 60).strip() == "ready"
    go.touch()
    results = [_result(proc, 120) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for got in results:
    assert got["wrong"] == 0 and got["corrupt"] == 0 and got["collisions"] == 0, got
    assert got["errors"] == 0
  assert results[0]["hits"] > 0 and results[1]["hits"] > 0
  spec = jp.CacheSpec(**WORKER_SPEC)
  store = DiskStore(tmp_path / "store", MB, spec=spec)
  assert all(same_block(lookup(store, b), b) for b in universe(spec))
  assert not os.listdir(store.tmp)


# ----------------------------------------------------------------------------- 8. capacity

def _depth0(spec, n):
  return [make_block(spec, np.arange(PS) + 10 * i, 0, (i,)) for i in range(n)]


def test_capacity_is_enforced_and_lru_evicts_the_least_recently_used(tmp_path):
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = _depth0(spec, 8)
  events = []
  probe = DiskStore(tmp_path / "probe", MB, spec=spec)
  size = file_size(probe, blocks[0])
  assert all(file_size(probe, b) == size for b in blocks)
  store = DiskStore(tmp_path / "s", 3 * size + size // 2, spec=spec,
                    on_event=lambda e, k, b: events.append((e, k)))
  for b in blocks[:3]:
    assert store.put(b)
  assert same_block(lookup(store, blocks[0]), blocks[0])  # 1 is now the least recently used
  assert store.put(blocks[3])
  assert set(block_files(store)) == {blocks[i].key for i in (0, 2, 3)}
  assert ("removed", blocks[1].key) in events and store.stats()["evictions"] == 1
  assert lookup(store, blocks[1]) is None
  assert store.put(blocks[2])  # already held: a use, not a write
  assert store.stats()["writes"] == 4
  assert store.put(blocks[4])  # 0 was used before 2 and 3
  assert set(block_files(store)) == {blocks[i].key for i in (2, 3, 4)}
  for b in blocks:
    store.put(b)
    stats = store.stats()
    assert stats["used"] <= stats["capacity"] and stats["used"] == sum(block_files(store).values())
    assert stats["entries"] == len(block_files(store)) == 3


class _MostRecentFirst:
  """Evicts the most recently used unpinned entry (the opposite of LRU)."""

  def __init__(self):
    self.asked = []

  def should_promote(self, key, stats):
    return True

  def eviction_candidate(self, tier, stats):
    self.asked.append(tier)
    free = {k: s for k, s in stats.items() if not s.pinned}
    return max(free, key=lambda k: free[k].last_access) if free else None


class _Raising(_MostRecentFirst):
  def eviction_candidate(self, tier, stats):
    raise RuntimeError("policy failed")


def test_a_custom_policy_is_honoured(tmp_path):
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = _depth0(spec, 4)
  size = file_size(DiskStore(tmp_path / "probe", MB, spec=spec), blocks[0])
  policy = _MostRecentFirst()
  store = DiskStore(tmp_path / "s", 3 * size, spec=spec, policy=policy)
  for b in blocks[:3]:
    assert store.put(b)
  assert lookup(store, blocks[0]) is not None  # 0 is now the most recently used
  assert store.put(blocks[3])
  assert set(block_files(store)) == {blocks[i].key for i in (1, 2, 3)}
  assert policy.asked == [0]


def test_a_policy_that_raises_leaves_the_store_as_before(tmp_path):
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = _depth0(spec, 4)
  size = file_size(DiskStore(tmp_path / "probe", MB, spec=spec), blocks[0])
  store = DiskStore(tmp_path / "s", 3 * size, spec=spec, policy=_Raising())
  for b in blocks[:3]:
    assert store.put(b)  # fits: the policy is not asked
  before, files = index_state(store), block_files(store)
  with pytest.raises(RuntimeError, match="policy failed"):
    store.put(blocks[3])
  # the index is updated before the file is written: nothing was written
  assert index_state(store) == before and block_files(store) == files
  assert not os.listdir(store.tmp)
  assert all(same_block(lookup(store, b), b) for b in blocks[:3])


def test_pinned_blocks_stay_and_a_full_pinned_store_refuses(tmp_path):
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = _depth0(spec, 4)
  size = file_size(DiskStore(tmp_path / "probe", MB, spec=spec), blocks[0])
  store = DiskStore(tmp_path / "s", 2 * size, spec=spec)
  assert store.put(blocks[0], pinned=True) and store.put(blocks[1])
  assert store.put(blocks[2])  # evicts 1, not the pinned 0
  assert set(block_files(store)) == {blocks[0].key, blocks[2].key}
  assert store.pin(blocks[2].key) and not store.pin(blocks[3].key)
  before = index_state(store)
  assert store.put(blocks[3]) is False
  assert store.stats()["write_errors"] == 1 and "pinned" in store.stats()["last_error"]
  assert index_state(store) == before and not store.path_of(blocks[3].key).exists()
  store.unpin(blocks[0].key)
  assert store.put(blocks[3])
  assert set(block_files(store)) == {blocks[2].key, blocks[3].key}


def test_capacity_below_one_block_is_refused_with_the_fix(tmp_path):
  spec = jp.CacheSpec(**WORKER_SPEC)
  one = disk_lib.block_file_bytes(spec, PS, disk_lib.layout_of(spec))
  with pytest.raises(DiskError, match=f"below one block file .*pass at least {one}"):
    DiskStore(tmp_path, one - 1, spec=spec)
  store = DiskStore(tmp_path, one, spec=spec)
  block = _depth0(spec, 1)[0]
  assert store.put(block) and store.stats()["used"] <= one
  # the longest key and salt fit too (their digits are in the file's header)
  widest = dataclasses.replace(block, key=2**64 - 1, salt=2**64 - 1)
  assert store.put(widest) and same_block(lookup(store, widest), widest)
  assert store.stats()["used"] <= one and store.stats()["evictions"] == 1
  deep = make_block(spec, np.arange(16 * PS), 2**64 - 1)  # larger than the whole store
  assert file_size(store, deep) > one
  assert store.put(deep) is False and same_block(lookup(store, widest), widest)


def test_restart_rebuilds_the_index_in_last_use_order(tmp_path):
  spec = jp.CacheSpec(**WORKER_SPEC)
  blocks = _depth0(spec, 5)
  size = file_size(DiskStore(tmp_path / "probe", MB, spec=spec), blocks[0])
  store = DiskStore(tmp_path / "s", 4 * size, spec=spec)
  for b in blocks[:4]:
    assert store.put(b)
  # last uses, oldest first: 2, 0, 3, 1 (file times are what a new process sees)
  for when, i in enumerate((2, 0, 3, 1)):
    os.utime(store.path_of(blocks[i].key), (1000 + when, 1000 + when))
  before = store.stats()
  again = DiskStore(tmp_path / "s", 4 * size, spec=spec)
  stats = again.stats()
  assert (stats["entries"], stats["used"]) == (before["entries"], before["used"]) == (4, 4 * size)
  assert again.keys() == [blocks[i].key for i in (2, 0, 3, 1)]
  assert again.put(blocks[4])  # evicts 2, the least recently used
  assert lookup(again, blocks[2]) is None and blocks[2].key not in block_files(again)
  # a hit is a use that the next process sees: 0 (oldest now) is touched, so 3 goes next
  assert lookup(again, blocks[0]) is not None
  assert store.path_of(blocks[0].key).stat().st_mtime > 1000 + 3
  third = DiskStore(tmp_path / "s", 4 * size, spec=spec)
  assert third.put(blocks[2])
  assert blocks[3].key not in block_files(third) and lookup(third, blocks[0]) is not None
  # a smaller capacity on open keeps the most recently used files that fit
  small = DiskStore(tmp_path / "s", 2 * size, spec=spec)
  assert small.stats()["used"] <= 2 * size and len(block_files(small)) == 2


# ----------------------------------------------------------------------------- 9. TTL

def test_ttl_expires_unused_unpinned_blocks(tmp_path):
  now = [1000.0]
  spec = jp.CacheSpec(**WORKER_SPEC)
  a, b, c, d = _depth0(spec, 4)
  store = DiskStore(tmp_path, MB, spec=spec, ttl_seconds=10, clock=lambda: now[0])
  assert store.put(a) and store.put(c) and store.pin(c.key)
  now[0] = 1005.0
  assert store.put(b)
  now[0] = 1010.0  # a unused for exactly 10 s: not longer than the TTL
  assert store.expire() == 0
  now[0] = 1010.5
  assert store.expire() == 1 and not store.path_of(a.key).exists()
  assert lookup(store, a) is None and store.stats()["expired"] == 1
  assert same_block(lookup(store, b), b)  # a use at 1010.5
  now[0] = 1020.0
  assert store.put(d) and store.path_of(b.key).exists()
  now[0] = 1021.0  # b unused for 10.5 s: removed before the next put
  assert store.put(a)
  assert not store.path_of(b.key).exists() and store.stats()["expired"] == 2
  now[0] = 5000.0
  assert store.expire() == 2  # a and d; the pinned c stays
  assert same_block(lookup(store, c), c)
  store.unpin(c.key)
  now[0] = 6000.0
  assert store.expire() == 1 and not block_files(store)
  no_ttl = DiskStore(tmp_path / "x", MB, spec=spec, clock=lambda: now[0])
  assert no_ttl.put(a)
  now[0] = 1e12
  assert no_ttl.expire() == 0 and lookup(no_ttl, a) is not None


# ----------------------------------------------------------------------------- 10. bad input

def test_bad_arguments_are_refused_naming_them(tmp_path):
  spec = jp.CacheSpec(**WORKER_SPEC)
  a_file = tmp_path / "file"
  a_file.write_bytes(b"x")
  cases = [
      (dict(path=b"/tmp/x"), DiskError, "path must be a directory path"),
      (dict(path=3), DiskError, "path must be a directory path"),
      (dict(path=None), DiskError, "path must be a directory path"),
      (dict(path=""), DiskError, "path must be a directory path"),
      (dict(path=a_file), DiskError, f"cannot write the directory {str(a_file)!r}"),
      (dict(path=a_file / "below"), DiskError, "cannot write the directory"),
      (dict(capacity=-1), TierError, "capacity must be a byte count"),
      (dict(capacity=True), TierError, "capacity must be a byte count"),
      (dict(capacity=1.5e6), TierError, "capacity must be a byte count"),
      (dict(capacity="1000000"), TierError, "capacity must be a byte count"),
      (dict(spec=dataclasses.asdict(spec)), DiskError, "spec must be the CacheSpec"),
      (dict(spec=None), DiskError, "spec must be the CacheSpec"),
      (dict(model=1), DiskError, "model must be a str"),
      (dict(model=None), DiskError, "model must be a str"),
      (dict(ttl_seconds=0), JaxPagedError, "ttl_seconds must be a finite number"),
      (dict(ttl_seconds=-1.0), JaxPagedError, "ttl_seconds must be a finite number"),
      (dict(ttl_seconds=math.nan), JaxPagedError, "ttl_seconds must be a finite number"),
      (dict(ttl_seconds=math.inf), JaxPagedError, "ttl_seconds must be a finite number"),
      (dict(ttl_seconds=True), JaxPagedError, "ttl_seconds must be a number"),
      (dict(ttl_seconds="10"), JaxPagedError, "ttl_seconds must be a number"),
      (dict(fsync="yes"), JaxPagedError, "fsync must be True or False"),
      (dict(clock=5), DiskError, "clock must be a callable"),
      (dict(on_event="print"), DiskError, "on_event must be callable"),
      (dict(policy="lru"), TierError, "policy"),
  ]
  for change, error, message in cases:
    args = dict(path=tmp_path / "s", capacity=MB, spec=spec) | change
    with pytest.raises(error, match=message):
      DiskStore(args.pop("path"), args.pop("capacity"), **args)
  assert issubclass(DiskError, JaxPagedError) and issubclass(TierError, JaxPagedError)
  store = DiskStore(tmp_path / "ok", MB, spec=spec, ttl_seconds=np.float32(2.5))
  assert store.ttl_seconds == 2.5
  with pytest.raises(DiskError, match="block must be a CachedBlock"):
    store.put("block")
  with pytest.raises(JaxPagedError, match="block.k is float32.2, 1, 4, 8. but this cache needs"):
    store.put(make_block(spec_of(), np.arange(PS)))  # two layers, the store one


# ----------------------------------------------------------------------------- 11. state machine

class DiskModel(RuleBasedStateMachine):
  """put / get / remove / reopen against a model: the block each key's file holds, in LRU
  order, with the sizes the store counts. Every get must be exactly the model's answer."""

  HASH = "mix64"

  def __init__(self):
    super().__init__()
    self.spec = jp.CacheSpec(**WORKER_SPEC, block_hash=self.HASH)
    pages = [np.arange(PS) + 1, np.arange(PS) + 2]  # prompts from 2 pages: many repeats
    self.blocks = []
    for n in range(1, 4):
      for combo in np.ndindex(*(2,) * n):
        tokens = np.concatenate([pages[c] for c in combo])
        for salt in (0, SALT_HIGH):
          self.blocks.append(make_block(self.spec, tokens, salt, (len(self.blocks),)))
    self.root = tempfile.mkdtemp(prefix="jaxpaged-disk-model-")
    self.store = DiskStore(self.root, MB, spec=self.spec, fsync=False)
    self.sizes = [file_size(self.store, b) for b in self.blocks]
    self.capacity = 3 * max(self.sizes)
    self.store = self._open()
    self.model = {}  # key -> block index, least recently used first

  def _open(self):
    return DiskStore(self.root, self.capacity, spec=self.spec, fsync=False)

  def teardown(self):
    shutil.rmtree(self.root, ignore_errors=True)

  def _use(self, key):
    self.model[key] = self.model.pop(key)

  @rule(i=st.integers(0, 27))
  def put(self, i):
    block = self.blocks[i]
    assert self.store.put(block)
    held = self.model.get(block.key)
    if held is not None and np.array_equal(self.blocks[held].tokens, block.tokens) and (
        self.blocks[held].salt == block.salt):
      self._use(block.key)
      return
    self.model.pop(block.key, None)
    used = sum(self.sizes[j] for j in self.model.values())
    while used + self.sizes[i] > self.capacity:
      oldest = next(iter(self.model))
      used -= self.sizes[self.model.pop(oldest)]
    self.model[block.key] = i

  @rule(i=st.integers(0, 27), extra=st.booleans(), exact=st.booleans())
  def get(self, i, extra, exact):
    block = self.blocks[i]
    tokens = np.concatenate([block.tokens, [9] * PS]) if extra else block.tokens
    held = self.model.get(block.key)
    want = None
    if held is not None:
      h = self.blocks[held]
      n = len(h.tokens)
      if h.salt == block.salt and len(tokens) >= n and np.array_equal(h.tokens, tokens[:n]) and (
          not exact or n == len(block.tokens)):
        want = h
    got = self.store.get(block.key, tokens, block.salt, end=len(block.tokens) if exact else None)
    if want is None:
      assert got is None
    else:
      assert same_block(got, want)
      self._use(block.key)

  @precondition(lambda self: self.model)
  @rule(pick=st.integers(0, 27), j=st.integers(0, 27), deeper=st.booleans())
  def get_under_a_held_key(self, pick, j, deeper):
    """A held key asked for block ``j`` (another prefix, depth or salt, most often: a forced
    collision under any hash), or for a deeper block of the held one's prompt (``deeper``):
    only the block it holds, exactly, is served."""
    key = list(self.model)[pick % len(self.model)]
    held, block = self.blocks[self.model[key]], self.blocks[j]
    n = len(held.tokens)
    longer = [b for b in self.blocks if len(b.tokens) > n and b.salt == held.salt
              and np.array_equal(b.tokens[:n], held.tokens)]
    if deeper and longer:
      block = longer[j % len(longer)]
    got = self.store.get(key, block.tokens, block.salt, end=len(block.tokens))
    if held is block:
      assert same_block(got, held)
      self._use(key)
    else:
      assert got is None

  @rule(i=st.integers(0, 27))
  def remove(self, i):
    self.store.remove(self.blocks[i].key)
    self.model.pop(self.blocks[i].key, None)

  @rule()
  def reopen(self):
    self.store = self._open()
    order = sorted((self.store.path_of(k).stat().st_mtime, k) for k in self.model)
    self.model = {k: self.model[k] for _, k in order}

  @rule(i=st.integers(0, 27))
  def holds(self, i):
    block = self.blocks[i]
    held = self.model.get(block.key)
    assert self.store.holds(block.key, block.tokens, block.salt) == (
        held is not None and same_block(self.blocks[held], block))

  @invariant()
  def matches_the_model(self):
    stats = self.store.stats()
    assert sorted(self.store.keys()) == sorted(self.model)
    assert block_files(self.store) == {k: self.sizes[i] for k, i in self.model.items()}
    assert stats["used"] == sum(self.sizes[i] for i in self.model.values()) <= self.capacity
    assert stats["corrupt_removed"] == 0


class DiskModelUnchained(DiskModel):
  HASH = "unchained"  # equal pages collide across prefixes and depths


class DiskModelConstant(DiskModel):
  HASH = "constant"  # one key for everything


TestDiskModel = DiskModel.TestCase
TestDiskModelUnchained = DiskModelUnchained.TestCase
TestDiskModelConstant = DiskModelConstant.TestCase
for _case in (TestDiskModel, TestDiskModelUnchained, TestDiskModelConstant):
  _case.settings = settings(settings.default, max_examples=25, stateful_step_count=30)
del _case  # a TestCase under any name is collected


if __name__ == "__main__":
  _worker_main(sys.argv[1:])
