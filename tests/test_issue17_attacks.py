"""Adversarial checks of issue 17 at the manager level: a `CacheManager` with a `DiskStore`, KV
event subscribers, pins, a prefix TTL and priorities together (what tests/test_disk.py,
test_events.py and test_retention.py do not already cover).

Oracles are independent of the code under test: K/V that are a pure NumPy function of the
whole prefix they belong to (so another prefix's K/V differ), compared bit for bit; page counts
that must add up; `replay_events` against what each tier holds.
"""

import os
import shutil
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged import DiskStore

PS = 4
MB = 1 << 20


def _spec(**kw):
  return jp.CacheSpec(**{**dict(num_layers=1, num_kv_heads=1, head_dim=2, page_size=PS,
                                num_pages=8, max_seqs=3, max_pages_per_seq=4,
                                prefix_caching=True), **kw})


def _kv(prompt, salt=0):
  """K/V of each position: a function of the whole prefix up to it and the salt."""
  k = np.empty((len(prompt), 1, 2), np.float32)
  for j in range(len(prompt)):
    seed = zlib.crc32(np.asarray(prompt[:j + 1], np.int64).tobytes() + str(salt).encode())
    k[j] = np.random.default_rng(seed).standard_normal((1, 2)).astype(np.float32)
  return k, -2 * k


def _admit_write(manager, prompt, salt=0, **kw):
  """Admits ``prompt``, checks its cached tokens bit-exactly, writes the new tokens' K/V."""
  a = manager.admit(prompt, salt=salt, **kw)
  assert a is not None
  k, v = _kv(prompt, salt)
  if a.num_cached:
    gk, gv = (np.asarray(x)[:a.num_cached] for x in jp.gather_kv(manager.cache, 0, a.seq_id))
    np.testing.assert_array_equal(gk, k[:a.num_cached])
    np.testing.assert_array_equal(gv, v[:a.num_cached])
  new = slice(a.num_cached, a.num_cached + a.num_new)
  manager.cache = jp.write_kv(manager.cache, 0, jnp.asarray(k[new]), jnp.asarray(v[new]),
                              a.slots[:a.num_new])
  return a


def _actual(manager):
  prefix = manager.cache.prefix
  cached, hashes = jax.device_get((prefix.page_cached, prefix.page_hash))
  return {"device": {jp.block_key(hashes[p]) for p in np.flatnonzero(cached)},
          "ram": {k[1] for k in manager.store.keys() if k[0] == "block"},
          "disk": set(manager.disk.keys())}


def _pages_add_up(manager):
  st = manager.stats()
  assert st["used_pages"] + st["free_pages"] + st["cached_free_pages"] == st["total_pages"]
  assert min(st["used_pages"], st["free_pages"], st["cached_free_pages"]) >= 0


def _restart_hits(path, spec, prompt, salt=0):
  """A fresh manager on a fresh store of ``path`` admits ``prompt``: tokens hit (bit-exact)."""
  manager = jp.CacheManager(spec, host_bytes=0, disk=DiskStore(path, MB, spec=spec))
  return _admit_write(manager, prompt, salt).num_cached


A = list(range(1, 10))  # two full blocks before the last token
B = list(range(20, 29))


def test_a_pinned_disk_block_is_not_overwritten_by_a_colliding_write_through(tmp_path):
  # Every block has one key: B's write-through used to replace pinned A's file (the pin then
  # held B's block, and A was lost from disk although pinned).
  spec = _spec(block_hash="constant")
  manager = jp.CacheManager(spec, host_bytes=0, disk=DiskStore(tmp_path, MB, spec=spec))
  manager.release([_admit_write(manager, A[:5]).seq_id])
  assert manager.pin(A[:4]).disk_blocks == 1
  manager.release([_admit_write(manager, B[:5]).seq_id])
  assert manager.disk.holds(manager.disk.keys()[0], np.array(A[:4], np.int32), 0)
  assert _restart_hits(tmp_path, spec, A[:5]) == 4  # A's K/V, bit-exact
  assert _restart_hits(tmp_path, spec, B[:5]) == 0  # a collision is a miss
  manager.unpin(A[:4])
  manager.release([_admit_write(manager, B[:5]).seq_id])  # unpinned: B may take the key now
  assert _restart_hits(tmp_path, spec, B[:5]) == 4


def test_a_store_whose_directory_was_removed_writes_again(tmp_path):
  # A store emptied by hand (rm -rf) while a server runs used to refuse every write from then
  # on (its temporary directory was gone: ENOENT forever).
  spec = _spec()
  path = tmp_path / "kv"
  manager = jp.CacheManager(spec, host_bytes=0, disk=DiskStore(path, MB, spec=spec))
  manager.release([_admit_write(manager, A).seq_id])
  shutil.rmtree(path)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "block was not written" warning
    manager.release([_admit_write(manager, B).seq_id])
  assert manager.disk.stats()["write_errors"] == 0
  assert _restart_hits(path, spec, B) == 8
  assert _restart_hits(path, spec, A) == 0  # (removed with the directory)


@pytest.mark.parametrize("fault", ["replace", "fsync", "unlink"])
def test_disk_faults_in_write_through_and_eviction_never_escape(tmp_path, monkeypatch, fault):
  spec = _spec()
  store = DiskStore(tmp_path, 3 * DiskStore(tmp_path / "x", MB, spec=spec).block_bytes + 64,
                    spec=spec)
  manager = jp.CacheManager(spec, host_bytes=0, disk=store)
  log = jp.KVEventLog()
  manager.subscribe(log)
  manager.release([_admit_write(manager, A).seq_id])  # 2 blocks on disk

  def fail(*args, **kwargs):
    raise OSError(5, "Input/output error")

  monkeypatch.setattr(os, fault, fail)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    manager.release([_admit_write(manager, B).seq_id])  # writes B, evicts A's oldest
  monkeypatch.undo()
  assert manager.active == []
  _pages_add_up(manager)
  manager.release([_admit_write(manager, list(range(40, 49))).seq_id])  # a good operation
  assert jp.replay_events(log.events, strict=True) == _actual(manager)
  _pages_add_up(manager)
  assert _restart_hits(tmp_path, spec, list(range(40, 49))) == 8
  assert store.stats()["used"] <= store.stats()["capacity"]


def test_two_managers_on_one_directory_only_ever_hit_their_own_prefix(tmp_path):
  spec = _spec()
  block = DiskStore(tmp_path / "x", MB, spec=spec).block_bytes
  stores = [DiskStore(tmp_path, 3 * block + 100, spec=spec, fsync=False) for _ in range(2)]
  managers = [jp.CacheManager(spec, host_bytes=0, disk=s) for s in stores]
  logs = [jp.KVEventLog() for _ in managers]
  for m, log in zip(managers, logs):
    m.subscribe(log)
  rng = np.random.default_rng(0)
  systems = [[int(x) for x in rng.integers(1, 9, 8)] for _ in range(4)]
  hits = 0
  for step in range(24):
    i = step % 2
    m, other = managers[i], stores[1 - i]
    salt = [0, 2**64 - 1][int(rng.integers(0, 2))]
    prompt = systems[int(rng.integers(0, 4))] + [int(rng.integers(1, 50))]
    a = _admit_write(m, prompt, salt)  # checks the cached tokens bit-exactly
    hits += a.num_cached
    m.release([a.seq_id])
    if step % 5 == 2 and other.keys():  # a file the other store indexed disappears
      try:
        os.unlink(other.path_of(other.keys()[0]))
      except FileNotFoundError:
        pass
    _pages_add_up(m)
    for s in stores:
      assert 0 <= s.stats()["used"] <= s.stats()["capacity"]
  assert hits > 0
  for m, log in zip(managers, logs):
    m.expire()  # (an operation: publishes)
    assert jp.replay_events(log.events, strict=True) == _actual(m)


def test_pin_release_ttl_keeps_the_prefix_on_every_tier_until_unpinned(tmp_path):
  now = [0.0]
  clock = lambda: now[0]
  spec = _spec()
  block = DiskStore(tmp_path / "x", MB, spec=spec).block_bytes
  store = DiskStore(tmp_path, 8 * block, spec=spec, clock=clock)
  manager = jp.CacheManager(spec, host_bytes=0, disk=store, prefix_ttl_seconds=10,
                            clock=clock)
  manager.release([_admit_write(manager, A, salt=2**63).seq_id])
  pinned = manager.pin(A[:8], salt=2**63)
  assert (pinned.device_blocks, pinned.disk_blocks) == (2, 2)
  with pytest.raises(jp.JaxPagedError, match="not pinned"):
    manager.unpin(A[:8], salt=0)
  now[0] = 100.0
  assert manager.expire() == dict(device_blocks=0, host_blocks=0, disk_blocks=0)
  assert _admit_write(manager, A, salt=2**63).num_cached == 8  # device hit, bit-exact
  assert _restart_hits(tmp_path, spec, A, salt=2**63) == 8  # disk hit, bit-exact
  assert _restart_hits(tmp_path, spec, A, salt=2**63 + 1) == 0
  manager.unpin(A[:8], salt=2**63)
  now[0] = 300.0
  assert manager.expire()["disk_blocks"] == 2 and len(store) == 0


def test_a_raising_subscriber_does_not_lose_the_admissions_priority(tmp_path):
  spec = _spec()
  manager = jp.CacheManager(spec, host_bytes=0, disk=DiskStore(tmp_path, MB, spec=spec))

  def bad(event):
    raise ValueError("subscriber failed")

  manager.subscribe(bad)
  with pytest.raises(ValueError):
    manager.admit(A, priority=5)
  assert manager.active == [0]  # completed, as documented
  assert manager.retention.seq_priority == {0: 5}


def test_blocks_found_on_restart_expire_on_the_managers_clock(tmp_path):
  # The index rebuilt on open took the files' modification times (time.time()'s seconds since
  # 1970) as last uses on the store's clock: with the manager's clock (time.monotonic by
  # default, or an injected one, as the docs ask the disk to share) they were ~1.8e9 s in the
  # future, so no block that survived a restart ever expired.
  now = [0.0]
  clock = lambda: now[0]
  spec = _spec()

  def manager():
    return jp.CacheManager(spec, host_bytes=0, prefix_ttl_seconds=10, clock=clock,
                           disk=DiskStore(tmp_path, MB, spec=spec, clock=clock))

  first = manager()
  first.release([_admit_write(first, A).seq_id])
  assert len(first.disk) == 2
  now[0] = 5.0
  again = manager()  # a restart: the index is rebuilt from the files
  assert len(again.disk) == 2 and again.expire()["disk_blocks"] == 0
  now[0] = 1000.0
  assert again.expire()["disk_blocks"] == 2 and len(again.disk) == 0
  assert _restart_hits(tmp_path, spec, A) == 0


@pytest.mark.parametrize("block_hash,seed", [("constant", 20)])  # (mix64 passes too: slower)
def test_two_managers_with_faults_pins_ttl_and_priorities_stay_exact_and_consistent(
    tmp_path, monkeypatch, block_hash, seed):
  """A seeded random run: two managers on two stores of one small directory (RAM tiers, a
  prefix TTL on one injected clock, 64-bit salts, priorities, pins, and write-throughs that hit
  a failing disk). Every hit is bit-exact, pages add up, no store passes its capacity, and the
  events replay to each manager's tiers."""
  rng = np.random.default_rng(seed)
  now = [0.0]
  clock = lambda: now[0]
  spec = _spec(block_hash=block_hash)
  block = DiskStore(tmp_path / "x", MB, spec=spec).block_bytes
  stores = [DiskStore(tmp_path, 5 * block, spec=spec, clock=clock, fsync=False)
            for _ in range(2)]
  managers = [jp.CacheManager(spec, host_bytes=2 * block, disk=s, prefix_ttl_seconds=50,
                              clock=clock) for s in stores]
  logs = [jp.KVEventLog() for _ in managers]
  for m, log in zip(managers, logs):
    m.subscribe(log)
  systems = [[int(x) for x in rng.integers(1, 9, 8)] for _ in range(4)]
  active, pins = [[], []], [[], []]

  def fail(*args, **kwargs):
    raise OSError(28, "No space left on device")

  for _ in range(50):
    i = int(rng.integers(0, 2))
    m = managers[i]
    now[0] += float(rng.choice([0, 1, 5, 20]))
    op = rng.choice(["admit"] * 4 + ["release"] * 3 + ["pin", "unpin", "fault"])
    salt = [0, 2**64 - 1][int(rng.integers(0, 2))]
    prompt = systems[int(rng.integers(0, 4))][:int(rng.choice([4, 8]))]
    prompt = prompt + [int(x) for x in rng.integers(1, 50, 9 - len(prompt))]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # (the failing writes)
      if op == "admit" and len(active[i]) < 2:
        active[i].append(_admit_write(m, prompt, salt,
                                      priority=int(rng.choice([0, 0, 3]))).seq_id)
      elif op == "release" and active[i]:
        m.release([active[i].pop(int(rng.integers(0, len(active[i]))))])
      elif op == "fault" and active[i]:
        with monkeypatch.context() as patch:
          patch.setattr(os, str(rng.choice(["replace", "unlink", "fsync"])), fail)
          m.release([active[i].pop()])
      elif op == "pin":
        try:
          m.pin(prompt[:8], salt=salt)
          pins[i].append((prompt[:8], salt))
        except jp.JaxPagedError:  # (over a bound)
          pass
      elif op == "unpin" and pins[i]:
        tokens, s = pins[i].pop()
        m.unpin(tokens, salt=s)
    _pages_add_up(m)
    for s in stores:
      assert 0 <= s.stats()["used"] <= s.stats()["capacity"]
  for m, log in zip(managers, logs):
    m.expire()
    assert jp.replay_events(log.events, strict=True) == _actual(m)


def test_pin_reports_only_the_leading_tokens_held_when_keys_repeat_across_depths(tmp_path):
  # Under an unchained hash a prompt whose blocks repeat has one key for both: the disk file
  # holds the deeper block only (written last). pin used to map the held key back to the
  # first block of that key and report 4 leading tokens pinned, while block 0 is nowhere.
  spec = _spec(block_hash="unchained")
  prompt = [1, 2, 3, 4, 1, 2, 3, 4, 9]
  first = jp.CacheManager(spec, host_bytes=0, disk=DiskStore(tmp_path, MB, spec=spec))
  first.release([_admit_write(first, prompt).seq_id])
  assert len(first.disk) == 1  # one key: the deeper block's file
  manager = jp.CacheManager(spec, host_bytes=0, disk=DiskStore(tmp_path, MB, spec=spec))
  assert manager.cached_prefix_tokens(prompt) == 0
  pinned = manager.pin(prompt[:8])
  assert (pinned.disk_blocks, pinned.tokens) == (1, 0)
  assert _admit_write(manager, prompt).num_cached == 0  # (no false hit either)
