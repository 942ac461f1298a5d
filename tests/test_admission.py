"""Admission is one host hash and one jitted call (two when blocks must be demoted first).

Programs are counted as XLA compilations after `jax.clear_caches()`: every program a call runs
is compiled anew then, so the count is the number of distinct programs it ran.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged._src import admission

_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def _counting(monkeypatch):
  """Yields ``counts``: programs compiled and host hashes computed inside the block."""
  counts = dict(programs=0, hashes=0)
  hash_fn = admission.block_hashes_numpy

  def counted_hash(*args, **kwargs):
    counts["hashes"] += 1
    return hash_fn(*args, **kwargs)

  def listener(event, duration, **kwargs):
    del duration, kwargs
    counts["programs"] += event == _COMPILE

  monkeypatch.setattr(admission, "block_hashes_numpy", counted_hash)
  jax.clear_caches()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _spec(**overrides):
  fields = dict(num_layers=2, num_kv_heads=1, head_dim=8, page_size=4, num_pages=16, max_seqs=4,
                max_pages_per_seq=8, prefix_caching=True)
  return jp.CacheSpec(**{**fields, **overrides})


def _write(manager, admission, value):
  k = jnp.full((admission.num_new, 1, 8), value, jnp.float32)
  slots = admission.slots[:admission.num_new]
  for layer in range(manager.spec.num_layers):
    manager.cache = jp.write_kv(manager.cache, layer, k, k, slots)


def test_an_admission_with_device_and_host_hits_hashes_once_and_runs_one_program(monkeypatch):
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  prompt = list(range(1, 18))  # 4 full blocks before the last token
  first = manager.admit(prompt)
  _write(manager, first, 1.0)
  manager.release([first.seq_id])
  manager.gc()  # every cached block to host RAM ...
  again = manager.admit(prompt[:9])  # ... and the first two back on device
  _write(manager, again, 2.0)
  manager.release([again.seq_id])
  assert manager.stats()["host_entries"] == 2
  with _counting(monkeypatch) as counts:
    admission = manager.admit(prompt)
  assert (admission.num_cached, admission.host_hit_tokens, admission.num_new) == (16, 8, 1)
  assert counts == dict(programs=1, hashes=1)
  k, _ = jp.gather_kv(manager.cache, 1, admission.seq_id)
  np.testing.assert_array_equal(np.asarray(k[:16, 0, 0]), [1.0] * 16)  # written once, moved twice


def test_an_admission_that_must_demote_blocks_first_runs_two_programs(monkeypatch):
  manager = jp.CacheManager(_spec(num_pages=4), host_bytes=1 << 20)
  first = manager.admit(list(range(1, 14)))  # 4 pages, 3 full blocks cached when released
  _write(manager, first, 1.0)
  manager.release([first.seq_id])
  with _counting(monkeypatch) as counts:
    admission = manager.admit(list(range(50, 60)))  # 3 pages: 3 cached blocks must go to host
  assert admission is not None and admission.num_cached == 0
  assert counts == dict(programs=2, hashes=1)
  assert manager.stats()["demoted_blocks"] == 2 and manager.stats()["host_entries"] == 2


def test_a_refused_admission_changes_nothing(monkeypatch):
  manager = jp.CacheManager(_spec(num_pages=4), host_bytes=1 << 20)
  held = manager.admit(list(range(1, 9)))
  before = jax.device_get(manager.cache)
  with _counting(monkeypatch) as counts:
    assert manager.admit(list(range(20, 30)), room_tokens=32) is None
  assert counts["hashes"] == 1
  after = jax.device_get(manager.cache)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  assert manager.active == [held.seq_id] and manager.stats()["allocation_failures"] == 1


class _Declining(jp.LRUPolicy):
  """LRU, except that it keeps the keys in ``deny`` on host."""

  def __init__(self):
    super().__init__()
    self.deny = set()

  def should_promote(self, key, stats):
    return key not in self.deny and super().should_promote(key, stats)


def test_a_declined_host_copy_of_a_block_the_device_serves_does_not_stop_later_host_hits():
  policy = _Declining()
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20, policy=policy)
  prompt = list(range(1, 10))  # blocks 0 and 1 before the last token
  keys = [("block", jp.block_key(h)) for h in jp.block_hashes(prompt[:8], page_size=4)]
  first = manager.admit(prompt)
  _write(manager, first, 1.0)
  manager.release([first.seq_id])
  manager.gc()  # host: blocks 0, 1
  policy.deny = {keys[0]}
  again = manager.admit(prompt[:5])  # block 0 recomputed on device (its host copy declined)
  _write(manager, again, 2.0)
  manager.release([again.seq_id])
  assert sorted(manager.store.keys()) == sorted(keys)
  admission = manager.admit(prompt)  # block 0 on device, block 1 on host
  assert (admission.num_cached, admission.host_hit_tokens) == (8, 4)
  k, _ = jp.gather_kv(manager.cache, 0, admission.seq_id)
  np.testing.assert_array_equal(np.asarray(k[:8, 0, 0]), [2.0] * 4 + [1.0] * 4)
