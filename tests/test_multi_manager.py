"""MultiDeviceCacheManager: shards on their devices, bit-exact and atomic moves between them,
rebalancing, per-shard stats, and CacheManager's read of a prompt's cached prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp

PS = 4


def _spec(**kw):
  # One spec for most tests (sized for the rebalance test's five sequences): the cache's shapes,
  # and so the compiled admission and move programs, are shared between tests.
  return jp.CacheSpec(**{**dict(num_layers=2, num_kv_heads=1, head_dim=8, page_size=PS,
                                num_pages=16, max_seqs=6, max_pages_per_seq=6,
                                prefix_caching=True), **kw})


def _write_random(manager, admission, seed):
  """Random K/V for the admission's new tokens, every layer."""
  rng = np.random.default_rng(seed)
  n = admission.num_new
  for layer in range(manager.spec.num_layers):
    k, v = (jnp.asarray(rng.standard_normal((n, 1, 8)), jnp.float32) for _ in range(2))
    manager.cache = jp.write_kv(manager.cache, layer, k, v, admission.slots[:n])


def _prefill(multi, tokens, seed=0, **kw):
  seq, admission = multi.admit(tokens, **kw)
  shard, _ = multi.locate(seq)
  _write_random(multi.managers[shard], admission, seed)
  return seq


def _kv(multi, seq):
  """Host copies of a global sequence's K/V, every layer (from its shard)."""
  shard, local = multi.locate(seq)
  cache = multi.managers[shard].cache
  n = int(cache.seq_lens[local])
  return [tuple(np.asarray(x)[:n] for x in jp.gather_kv(cache, layer, local))
          for layer in range(cache.spec.num_layers)]


def _state(multi):
  """Everything observable of every shard, on host, to compare before and after."""
  out = []
  for m in multi.managers:
    c = m.cache
    out.append((m.stats(), m.active, m.swapped, sorted(map(str, m.store.keys())),
                [np.asarray(x) for x in (c.k_pages, c.v_pages, c.page_table, c.seq_lens,
                                         c.ref_counts, c.num_free)]))
  return out, {s: multi.locate(s) for s in multi.seq_ids}


def _assert_same(before, after):
  (shards0, where0), (shards1, where1) = before, after
  assert where0 == where1
  for a, b in zip(shards0, shards1):
    assert a[:4] == b[:4]
    for x, y in zip(a[4], b[4]):
      np.testing.assert_array_equal(x, y)


def test_each_shard_lives_on_its_device():
  multi = jp.MultiDeviceCacheManager(_spec(), mesh=jp.make_mesh(2, 1))
  assert multi.supported_devices == jax.devices()[:2]
  for manager, device in zip(multi.managers, jax.devices()[:2]):
    assert manager.cache.k_pages.devices() == {device}
  seq = _prefill(multi, list(range(1, 10)))
  manager = multi.managers[multi.shard_of(seq)]
  assert manager.cache.k_pages.devices() == {multi.supported_devices[multi.shard_of(seq)]}


def test_move_sequence_is_bit_exact_on_the_other_device_and_registers_its_blocks():
  multi = jp.MultiDeviceCacheManager(_spec(), jax.devices()[:2])
  multi.set_device_preference(0)
  tokens = list(range(1, 15))  # 14 tokens: 3 full blocks
  seq = _prefill(multi, tokens, seed=1)
  other = _prefill(multi, [50, 51, 52], seed=2)
  before, other_before = _kv(multi, seq), _kv(multi, other)
  assert multi.cached_prefix_tokens(tokens + [99]) == [12, 0]

  assert multi.move_sequence(seq, jax.devices()[1])
  assert multi.shard_of(seq) == 1
  target = multi.managers[1]
  assert target.cache.k_pages.devices() == {jax.devices()[1]}
  after = _kv(multi, seq)
  for (k0, v0), (k1, v1) in zip(before, after):
    np.testing.assert_array_equal(k0, k1)
    np.testing.assert_array_equal(v0, v1)
  for (k0, v0), (k1, v1) in zip(other_before, _kv(multi, other)):  # the other one untouched
    np.testing.assert_array_equal(k0, k1)
  # Its blocks are in the target's prefix cache; the source keeps them cached (released).
  assert multi.cached_prefix_tokens(tokens + [99]) == [12, 12]
  stats = multi.device_stats()
  assert stats[0]["active_sequences"] == 1 and stats[1]["active_sequences"] == 1
  # The moved sequence keeps growing on its new shard.
  shard, local = multi.locate(seq)
  slots, ok, _ = target.extend([local], [1], tokens=[77])
  assert bool(ok) and int(target.cache.seq_lens[local]) == len(tokens) + 1


def test_a_swapped_out_sequence_moves_too():
  multi = jp.MultiDeviceCacheManager(_spec(), jax.devices()[:2])
  seq = _prefill(multi, list(range(1, 11)), seed=3)
  before = _kv(multi, seq)
  multi.swap_out(seq)
  assert multi.move_sequence(seq, 1)
  assert multi.managers[1].active == [multi.locate(seq)[1]] and multi.managers[0].swapped == []
  for (k0, v0), (k1, v1) in zip(before, _kv(multi, seq)):
    np.testing.assert_array_equal(k0, k1)
    np.testing.assert_array_equal(v0, v1)


def test_a_refused_move_changes_nothing_when_the_target_is_full():
  multi = jp.MultiDeviceCacheManager(_spec(num_pages=6), jax.devices()[:2])
  multi.set_device_preference(0)
  seq = _prefill(multi, list(range(1, 14)))  # 4 pages
  multi.set_device_preference(1)
  _prefill(multi, list(range(30, 43)))  # 4 of the target's 6 pages
  before = _state(multi)
  assert not multi.move_sequence(seq, 1)
  _assert_same(before, _state(multi))


class _Raising(jp.LRUPolicy):
  def eviction_candidate(self, tier, stats):
    raise RuntimeError("policy failure")


def test_a_raising_policy_on_the_target_leaves_both_shards_as_before():
  spec = _spec()
  # Bytes of a sequence of 9 tokens on host, and of the target's demoted blocks, measured alone.
  probe = jp.CacheManager(spec)
  probe.admit(list(range(1, 10)))
  probe.swap_out([0])
  seq_bytes = probe.stats()["host_used_bytes"]
  multi = jp.MultiDeviceCacheManager(spec, jax.devices()[:2], host_bytes=seq_bytes + 400,
                                     policies=[jp.LRUPolicy(), _Raising()])
  multi.set_device_preference(1)
  filler = _prefill(multi, list(range(60, 69)))
  multi.release([filler])
  assert multi.managers[1].gc()["blocks_demoted"] == 2  # the target's host tier: 2 blocks
  assert multi.managers[1].stats()["host_used_bytes"] > 400
  multi.set_device_preference(0)
  seq = _prefill(multi, list(range(1, 10)))
  before = _state(multi)
  with pytest.raises(RuntimeError, match="policy failure"):
    multi.move_sequence(seq, 1)
  _assert_same(before, _state(multi))
  assert multi.move_sequence(seq, 0)  # (already there)


def test_a_raising_pressure_callback_on_the_target_raises_after_the_move_completed():
  multi = jp.MultiDeviceCacheManager(_spec(num_pages=4), jax.devices()[:2])
  seq = _prefill(multi, list(range(1, 15)))  # 4 of 4 pages: CRITICAL once moved
  before = _kv(multi, seq)

  def callback(shard, old, new):
    raise RuntimeError(f"shard {shard} is {new.name}")
  multi.on_pressure(callback)
  with pytest.raises(RuntimeError, match="shard 1 is CRITICAL"):
    multi.move_sequence(seq, 1)
  assert multi.shard_of(seq) == 1 and multi.managers[0].active == []
  for (k0, v0), (k1, v1) in zip(before, _kv(multi, seq)):
    np.testing.assert_array_equal(k0, k1)
    np.testing.assert_array_equal(v0, v1)


def test_rebalance_reaches_the_tolerance_and_moves_exactly():
  multi = jp.MultiDeviceCacheManager(_spec(), mesh=jp.make_mesh(2, 1))
  multi.set_device_preference(0)
  # 1, 3, 4, 3, 1 pages (12 of 16) on shard 0, three moves to 6 and 6. Prompts of 3-4 or 9-16
  # tokens: the two prompt shapes the tests above compiled already.
  lengths = [4, 9, 13, 11, 3]
  seqs = [_prefill(multi, [100 * i + t for t in range(1, n + 1)], seed=i)
          for i, n in enumerate(lengths)]
  kv = {s: _kv(multi, s) for s in seqs}
  moves = multi.rebalance(tolerance=0.1)
  fractions = [s["used_fraction"] for s in multi.device_stats()]
  assert abs(fractions[0] - fractions[1]) <= 0.1
  assert moves and all(src == 0 and dst == 1 for _, src, dst in moves)
  assert sorted(s for s, _, _ in moves) == sorted(s for s in seqs if multi.shard_of(s) == 1)
  for s in seqs:  # every sequence, moved or not, holds what it held
    for (k0, v0), (k1, v1) in zip(kv[s], _kv(multi, s)):
      np.testing.assert_array_equal(k0, k1)
      np.testing.assert_array_equal(v0, v1)
  assert multi.rebalance(tolerance=0.1) == []  # balanced already: nothing to do


def test_device_stats_are_each_managers_stats():
  multi = jp.MultiDeviceCacheManager(_spec(), jax.devices()[:2])
  a = _prefill(multi, list(range(1, 10)))
  _prefill(multi, list(range(1, 10)) + [42])  # a hit: on a's shard (prefix-aware)
  multi.release([a])
  _prefill(multi, list(range(20, 30)))
  for i, (stats, manager) in enumerate(zip(multi.device_stats(), multi.managers)):
    own = manager.stats()
    assert {k: stats[k] for k in own} == own
    assert stats["shard"] == i and stats["device"] == str(jax.devices()[i])
    assert stats["used_fraction"] == own["used_pages"] / own["total_pages"]
  assert multi.pressure == [m.pressure for m in multi.managers]


def test_cached_prefix_tokens_is_a_read_that_admission_agrees_with():
  spec = _spec()
  manager = jp.CacheManager(spec, host_bytes=1 << 20)
  system = list(range(1, 13))  # three full blocks
  first = manager.admit(system + [20, 21])
  _write_random(manager, first, 5)
  manager.release([first.seq_id])
  manager.gc()  # the blocks go to host RAM: the read counts the host tier too
  prompt = system[:8] + [7, 7, 7, 7, 9]
  cache_before = [np.asarray(x) for x in (manager.cache.k_pages, manager.cache.page_table)]
  stats_before, order = manager.stats(), list(manager.store.keys())
  assert manager.cached_prefix_tokens(prompt) == 8
  assert manager.cached_prefix_tokens(prompt, salt=1) == 0  # another tenant
  assert manager.stats() == stats_before and list(manager.store.keys()) == order
  for x, y in zip(cache_before, (manager.cache.k_pages, manager.cache.page_table)):
    np.testing.assert_array_equal(x, np.asarray(y))
  admission = manager.admit(prompt)  # the oracle: what admission finds
  assert admission.num_cached == 8 and admission.host_hit_tokens == 8


def test_bad_input_names_the_argument():
  spec = _spec()
  with pytest.raises(jp.JaxPagedError, match="devices"):
    jp.MultiDeviceCacheManager(spec, [jax.devices()[0], jax.devices()[0]])
  with pytest.raises(jp.JaxPagedError, match="model=1"):
    jp.MultiDeviceCacheManager(spec, mesh=jp.make_mesh(2, 2))
  with pytest.raises(jp.JaxPagedError, match="spec"):
    jp.MultiDeviceCacheManager("spec", jax.devices()[:2])
  with pytest.raises(jp.JaxPagedError, match="device"):
    jp.CacheManager(spec, device="gpu:0")
  multi = jp.MultiDeviceCacheManager(spec, jax.devices()[:2])
  seq = _prefill(multi, [1, 2, 3])
  with pytest.raises(jp.JaxPagedError, match="target_shard"):
    multi.move_sequence(seq, 2)
  with pytest.raises(jp.JaxPagedError, match="not one of"):
    multi.move_sequence(seq, jax.devices()[5])
  with pytest.raises(jp.JaxPagedError, match="seq_id"):
    multi.move_sequence(seq + 1, 1)
  with pytest.raises(jp.JaxPagedError, match="tolerance"):
    multi.rebalance(1.5)
  with pytest.raises(jp.JaxPagedError, match="device"):
    multi.set_device_preference(7)
  with pytest.raises(jp.JaxPagedError, match="repeat"):
    multi.release([seq, seq])
  with pytest.raises(jp.JaxPagedError, match="swapped"):
    multi.managers[0].adopt("not a sequence")
  assert multi.seq_ids == [seq]
