"""Adversarial tests of `defragment` / `resize` (and the manager's): every page-indexed field
checked against a NumPy model of the moves, 8-bit pools and their scales, more moves than one
chunk, copy-on-write after moves, stale prefix links across a shrink and a regrowth under forced
hash collisions, unwritten blocks, swap-in, host promotion and KV events across a resize, jit,
and a 4-device sharded cache (in a subprocess)."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged._src import table as jtable
from jaxpaged._src.prefix_state import PAGE_FIELDS, UNLINKED
from tests.helpers import check_defragmented, key_values, prefill_manager

POOLS = ("k_pages", "v_pages", "k_scales", "v_scales")
TINY = dict(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, prefix_caching=True)


def expected_moves(cache):
  """NumPy model of `defragment`'s renaming: ``(live bool[P], num_live, new_of_old int[P])``,
  the live pages above the line swapped, ascending, with the free pages below it."""
  n = cache.spec.num_pages
  free = set(np.asarray(cache.free_pages)[:int(cache.num_free)].tolist())
  live = np.array([p not in free for p in range(n)])
  num_live = int(live.sum())
  above = [p for p in range(n) if live[p] and p >= num_live]
  holes = [p for p in range(n) if not live[p] and p < num_live]
  new_of_old = np.arange(n)
  for s, d in zip(above, holes):
    new_of_old[s], new_of_old[d] = d, s
  return live, num_live, new_of_old


def check_moved(old, new):
  """``new`` is `defragment(old)` or `resize(old, new.spec.num_pages)`, field by field: every
  pool (K/V and scales, bit for bit), reference count and prefix record of each live page is at
  its new id, parent links renamed (a link to a page cut off unlinked, none out of range), the
  hash table maps exactly the cached pages, nothing else changed. Returns ``new_of_old``."""
  live, num_live, m = expected_moves(old)
  n_old, n_new = old.spec.num_pages, new.spec.num_pages
  if n_new > n_old:  # growing moves nothing: the new pages are free
    m = np.arange(n_old)
  assert int(new.num_free) == n_new - num_live
  free = sorted(np.asarray(new.free_pages)[:int(new.num_free)].tolist())
  assert free == sorted(set(range(n_new)) - set(m[live].tolist()))
  pt_old, pt_new = np.asarray(old.page_table), np.asarray(new.page_table)
  np.testing.assert_array_equal(np.where(pt_old >= 0, m[np.clip(pt_old, 0, None)], pt_old),
                                pt_new)
  pages = np.flatnonzero(live)
  for name in POOLS:
    a, b = getattr(old, name), getattr(new, name)
    assert (a is None) == (b is None), name
    if a is not None:
      a, b = np.asarray(a), np.asarray(b)
      assert a.dtype == b.dtype and b.shape[2] == n_new
      np.testing.assert_array_equal(a[:, :, pages].view(np.uint8),
                                    b[:, :, m[pages]].view(np.uint8), err_msg=name)
  refs = np.asarray(new.ref_counts)
  np.testing.assert_array_equal(np.asarray(old.ref_counts)[pages], refs[m[pages]])
  assert refs.sum() == np.asarray(old.ref_counts).sum()
  for name in ("seq_lens", "num_evicted"):
    np.testing.assert_array_equal(np.asarray(getattr(old, name)), np.asarray(getattr(new, name)))
  if old.prefix is None:
    return m
  po, pn = old.prefix, new.prefix
  for name in PAGE_FIELDS:
    a, b = np.asarray(getattr(po, name))[pages], np.asarray(getattr(pn, name))[m[pages]]
    if name == "page_parent":
      a = np.where(a >= 0, m[np.clip(a, 0, None)], a)
      a = np.where(a >= n_new, UNLINKED, a)
    np.testing.assert_array_equal(a, b, err_msg=name)
  assert (np.asarray(pn.page_parent) < n_new).all()  # no link to a page that does not exist
  for name in ("seq_salt", "seq_hashable", "num_evictable", "num_cached", "clock", "stats",
               "expire_before"):
    np.testing.assert_array_equal(np.asarray(getattr(po, name)), np.asarray(getattr(pn, name)))
  cached = np.flatnonzero(np.asarray(pn.page_cached))
  slots = np.asarray(pn.table_pages)
  assert sorted(slots[slots >= 0].tolist()) == cached.tolist()
  found = jtable.lookup(pn.table_lo, pn.table_hi, pn.table_pages, pn.page_hash[cached])
  np.testing.assert_array_equal(np.asarray(found), cached)
  return m


def _snapshot(cache):
  return jax.tree.map(np.asarray, cache)


def _assert_same(cache, snapshot):
  jax.tree.map(np.testing.assert_array_equal, _snapshot(cache), snapshot)


# ----------------------------------------------------------------------------- pure functions

def _fragmented_8bit(spec):
  """Sequences on pages handed out highest first (so they sit above the holes), a fork sharing
  a partly filled page, a released sequence (its full blocks cached), one released unhashed."""
  cache = jp.init_cache(spec)
  cache = dataclasses.replace(cache, free_pages=jnp.arange(spec.num_pages, dtype=jnp.int32))
  rng = np.random.default_rng(0)
  lens = jnp.array([5, 7, 4, 0])
  cache, slots, ok = jp.extend(cache, jnp.arange(4), lens, num_slots=16,
                               tokens=jnp.asarray(rng.integers(0, 9, 16), jnp.int32))
  assert bool(ok)
  kv = jnp.asarray(rng.normal(size=(16, spec.num_kv_heads, spec.head_dim)) * 3, jnp.float32)
  for layer in range(spec.num_layers):
    cache = jp.write_kv(cache, layer, kv + layer, -kv, slots)
  cache, ok = jp.fork(cache, jnp.array([0]), jnp.array([3]))
  assert bool(ok)
  cache = jp.release(cache, jnp.array([1]))  # 3 full blocks cached (evictable), 1 page freed
  cache, _, ok = jp.extend(cache, jnp.array([1]), jnp.array([6]), num_slots=8)  # no ids
  assert bool(ok)
  return jp.release(cache, jnp.array([1, 2]))


@pytest.mark.parametrize("dtype,static", [(jnp.int8, False)])
def test_8bit_pools_and_scales_move_with_their_pages(dtype, static):
  spec = jp.CacheSpec(num_pages=20, max_seqs=4, max_pages_per_seq=6, dtype=dtype,
                      static_scales=((0.05, 0.1),) * 2 if static else None,
                      **{**TINY, "num_layers": 2, "num_kv_heads": 2, "head_dim": 4})
  old = _fragmented_8bit(spec)
  assert (old.k_scales is None) == static
  before = _snapshot(old)
  _, num_live, m = expected_moves(old)
  assert (m != np.arange(20)).sum() >= 4  # pages really move
  new = jp.defragment(old)
  _assert_same(old, before)
  check_moved(old, new)
  check_defragmented(old, new)
  small = jp.resize(old, num_live)  # exactly the live pages: no free page left
  check_moved(old, small)
  assert int(small.num_free) == 0
  _assert_same(old, before)


def test_more_moves_than_one_chunk_in_a_pool_not_a_multiple_of_it():
  """200 pages (not a multiple of MOVE_CHUNK = 64), the 100 live ones all above the line: 100
  moves, two loop trips; the same under the caller's jit with donation, and resized to the
  exact live count."""
  spec = jp.CacheSpec(num_pages=200, max_seqs=6, max_pages_per_seq=100,
                      **{**TINY, "page_size": 1})
  rng = np.random.default_rng(1)
  cache = jp.init_cache(spec)
  cache = dataclasses.replace(cache, free_pages=jnp.arange(200, dtype=jnp.int32))
  cache, _, ok = jp.extend(cache, jnp.arange(4), jnp.array([30, 30, 20, 20]), num_slots=100,
                           tokens=jnp.asarray(rng.integers(0, 1000, 100), jnp.int32))
  assert bool(ok)
  cache, _, ok = jp.extend(cache, jnp.array([4]), jnp.array([100]), num_slots=100)
  assert bool(ok)
  cache = jp.release(cache, jnp.array([4, 0]))  # seq 0's blocks, never written, are dropped
  cache = dataclasses.replace(
      cache, k_pages=jnp.asarray(rng.normal(size=spec.pages_shape), jnp.float32),
      v_pages=jnp.asarray(rng.normal(size=spec.pages_shape), jnp.float32))
  _, num_live, m = expected_moves(cache)
  assert num_live == 70 and (m != np.arange(200)).sum() == 140  # 70 moves: two loop trips
  new = jp.defragment(cache)
  check_moved(cache, new)
  donated = jax.jit(jp.defragment, donate_argnums=0)(jax.tree.map(jnp.copy, cache))
  jax.tree.map(np.testing.assert_array_equal, _snapshot(donated), _snapshot(new))
  check_moved(cache, jp.resize(cache, 70))
  with pytest.raises(jp.JaxPagedError, match="cannot hold the 70 live pages"):
    jp.resize(cache, 69)


def test_copy_on_write_after_defragment_keeps_forks_apart():
  """A fork shares a partly filled page that moves; appending to either afterwards copies it
  first: neither sees the other's new token, and the shared prefix reads the same."""
  spec = jp.CacheSpec(num_pages=10, max_seqs=3, max_pages_per_seq=4,
                      **{**TINY, "prefix_caching": False})
  cache = jp.init_cache(spec)
  cache = dataclasses.replace(cache, free_pages=jnp.arange(10, dtype=jnp.int32))
  cache, slots, ok = jp.extend(cache, jnp.array([2, 0]), jnp.array([4, 3]), num_slots=8)
  assert bool(ok)  # seq 2 on pages 9, 8; seq 0 on 7, 6
  cache = jp.write_kv(cache, 0, (jnp.arange(8.0) + 1).reshape(8, 1, 1) * jnp.ones((1, 1, 2)),
                      -jnp.ones((8, 1, 2)), slots)
  cache, ok = jp.fork(cache, jnp.array([0]), jnp.array([1]))
  cache = jp.release(cache, jnp.array([2]))  # holes at pages 9 and 8: 0 and 1 move below
  old = cache
  cache = jp.defragment(cache)
  check_moved(old, cache)
  shared_page = int(cache.page_table[0, 1])
  assert shared_page == int(cache.page_table[1, 1]) and int(cache.ref_counts[shared_page]) == 2
  before = [np.asarray(jp.gather_kv(cache, 0, s)[0]) for s in (0, 1)]
  cache, slots, ok = jp.extend(cache, jnp.array([0, 1]), jnp.array([1, 1]), num_slots=2)
  assert bool(ok)
  cache = jp.write_kv(cache, 0, jnp.array([[[100.0, 100.0]], [[200.0, 200.0]]]),
                      jnp.zeros((2, 1, 2)), slots)
  k0, k1 = (np.asarray(jp.gather_kv(cache, 0, s)[0]) for s in (0, 1))
  np.testing.assert_array_equal(k0[:3], before[0][:3])
  np.testing.assert_array_equal(k1[:3], before[1][:3])
  assert k0[3, 0, 0] == 100 and k1[3, 0, 0] == 200
  assert int(cache.page_table[0, 1]) != int(cache.page_table[1, 1])


def test_resize_inside_jit_is_refused_with_a_clear_error():
  spec = jp.CacheSpec(num_pages=8, max_seqs=2, max_pages_per_seq=4, **TINY)
  cache = jp.init_cache(spec)
  with pytest.raises(jp.JaxPagedError, match="inside jax.jit"):
    jax.jit(lambda c: jp.resize(c, 4))(cache)
  with pytest.raises(jp.JaxPagedError, match="num_pages"):
    jax.jit(lambda n: jp.resize(cache, n))(4)
  with pytest.raises(jp.JaxPagedError, match="overflows int32"):
    jp.resize(cache, 2 ** 31)
  for bad in (True, None, 4.0):
    with pytest.raises(jp.JaxPagedError, match="num_pages"):
      jp.resize(cache, bad)
  jax.jit(jp.defragment, donate_argnums=0)(cache)
  for call in (jp.defragment, lambda c: jp.resize(c, 4)):
    with pytest.raises(jp.JaxPagedError, match="donated"):
      call(cache)


# ----------------------------------------------------------------------------- the prefix cache

def _written(cache, seq_ids, lens, tokens, num_slots, *, hashed=True):
  """`extend` of rows ``seq_ids`` with ``tokens`` (concatenated) and, when ``hashed``, their
  K/V written as a causal model would (`key_values` of each row's tokens: prefix-dependent)."""
  ids = np.asarray(tokens, np.int32)
  padded = jnp.zeros((num_slots,), jnp.int32).at[:len(ids)].set(jnp.asarray(ids))
  cache, slots, ok = jp.extend(cache, jnp.asarray(seq_ids), jnp.asarray(lens),
                               num_slots=num_slots, tokens=padded if hashed else None)
  assert bool(ok)
  if hashed:
    values, start = np.zeros(num_slots, np.float32), 0
    for n in lens:
      values[start:start + n] = key_values(ids[start:start + n])
      start += n
    kv = jnp.broadcast_to(jnp.asarray(values)[:, None, None], (num_slots, 1, 2))
    cache = jp.write_kv(cache, 0, kv, -kv, slots)
  return cache


def _num_cached(cache, seq, prompt, width):
  """`match_prefix` of ``prompt`` into the free slot ``seq``: tokens served from the cache."""
  tokens = jnp.zeros((1, width), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))
  new, match = jp.match_prefix(cache, jnp.array([seq]), tokens, jnp.array([len(prompt)]),
                               num_slots=width)
  assert bool(match.ok)
  hits = int(match.num_cached[0])
  k, _ = jp.gather_kv(new, 0, seq)
  np.testing.assert_array_equal(np.asarray(k)[:hits, 0, 0], key_values(prompt)[:hits])
  return hits


def test_a_stale_parent_link_survives_no_shrink_and_regrowth():
  """Forced collisions (``block_hash="unchained"``: a block's hash ignores its prefix). Block
  [2, 2] is cached with its parent [1, 1] on page P; P is evicted, so the link is stale (P's
  generation moves on when it is handed out again). A shrink cut P off and a regrowth brought a
  fresh page back under P's id at generation 0: a new prompt's block lands there at generation
  1, the very one the stale link recorded, and [2, 2] after that new prefix was served the K/V
  computed after [1, 1] (fixed: `resize` unlinks links to pages it cuts off)."""
  spec = jp.CacheSpec(num_pages=8, max_seqs=4, max_pages_per_seq=6, block_hash="unchained",
                      **TINY)
  cache = jp.init_cache(spec)
  # Computed together: seq 0's [1, 1] is registered (on P), seq 1's is a duplicate, and seq 1's
  # [2, 2] links to P, the registered copy.
  cache = _written(cache, [0, 1], [3, 5], [1, 1, 9, 1, 1, 2, 2, 9], 8)
  cache = jp.release(cache, jnp.array([0]))
  cache = _written(cache, [2], [10], [0] * 10, 10, hashed=False)  # evicts P
  cache = jp.release(cache, jnp.array([2]))
  live = spec.num_pages - int(cache.num_free)
  assert live == 3 and int(jp.num_cached_free_pages(cache)) == 0
  cache_before_shrink = cache
  small = jp.resize(cache, live)
  regrown = jp.resize(small, 8)
  # A prompt whose blocks take every new page (each at generation 1), then room for a match.
  filler = [50, 50, 51, 51, 52, 52, 53, 53]
  cache = jp.resize(_written(regrown, [0], [9], filler + [77], 10), 12)
  for j in range(4):
    assert _num_cached(cache, 2, filler[:2 * j + 2] + [2, 2, 9], 12) == 2 * j + 2, j
  assert _num_cached(cache, 2, [1, 1, 2, 2, 9], 12) == 0  # (P's block was evicted)
  check_moved(cache_before_shrink, small)  # the link to the page cut off is unlinked
  check_moved(small, regrown)


def test_an_unwritten_block_that_moved_is_dropped_not_served():
  """Blocks registered when their tokens arrived, whose K/V were never written, move with their
  pages; released, they are dropped (not cached), so no later prompt is served garbage."""
  spec = jp.CacheSpec(num_pages=10, max_seqs=3, max_pages_per_seq=4, **TINY)
  cache = _written(jp.init_cache(spec), [0], [5], [3, 3, 3, 3, 3], 6)
  cache = _written(cache, [1], [5], [4, 4, 5, 5, 6], 6, hashed=False)
  tokens = jnp.zeros((6,), jnp.int32).at[:5].set(jnp.array([4, 4, 5, 5, 6]))
  cache, _, ok = jp.extend(jp.release(cache, jnp.array([1])), jnp.array([1]), jnp.array([5]),
                           num_slots=6, tokens=tokens)  # registered, never written
  assert bool(ok)
  cache = jp.release(cache, jnp.array([0]))  # frees seq 0's last page: a hole below seq 1
  cached_before = int(jp.num_cached_free_pages(cache))
  new = jp.defragment(cache)
  m = check_moved(cache, new)
  pages = np.asarray(cache.page_table[1, :2])
  assert (m[pages] != pages).any()  # an unwritten block moved
  assert not np.asarray(new.prefix.page_written)[m[pages]].any()
  assert np.asarray(new.prefix.page_cached)[m[pages]].all()
  new = jp.release(new, jnp.array([1]))
  assert int(jp.num_cached_free_pages(new)) == cached_before  # dropped, not cached
  assert _num_cached(new, 2, [4, 4, 5, 5, 6], 6) == 0
  assert _num_cached(new, 2, [3, 3, 3, 3, 7], 6) == 4


def test_eviction_after_defragment_takes_the_same_blocks():
  """The same allocations on a cache and on its defragmented copy evict the same blocks (least
  recently used first, a chain's tail first): what stays cached does not depend on where the
  pages sit."""
  spec = jp.CacheSpec(num_pages=12, max_seqs=4, max_pages_per_seq=10, **TINY)
  cache = _written(jp.init_cache(spec), [0, 1, 2], [5, 5, 3],
                   [1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 9, 9, 9], 16)
  cache = jp.release(cache, jnp.array([1]))
  cache = _written(cache, [1], [3], [7, 7, 7], 16)  # a later use: seq 1's blocks are older
  cache = jp.release(cache, jnp.array([0, 2]))
  packed = jp.defragment(cache)
  assert (expected_moves(cache)[2] != np.arange(12)).any()
  keys = lambda c: sorted(jp.block_key(h) for h in np.asarray(c.prefix.page_hash)[
      np.asarray(c.prefix.page_cached)])
  for need in (7, 9):  # evicts some of the 6 cached blocks, then more
    outs = []
    for c in (cache, packed):
      c = _written(c, [3], [2 * need], list(range(20, 20 + 2 * need)), 18, hashed=False)
      outs.append((keys(c), int(c.num_free), int(jp.num_cached_free_pages(c))))
    assert outs[0] == outs[1], need


def test_manager_swap_in_and_host_promotion_after_a_shrink():
  """A sequence swapped out before the pool shrinks comes back bit for bit; blocks demoted to
  host RAM are promoted into the smaller pool with their K/V; a KV-event subscriber's replay
  equals what each tier holds throughout."""
  spec = jp.CacheSpec(num_pages=12, max_seqs=3, max_pages_per_seq=5, **TINY)
  manager = jp.CacheManager(spec, host_bytes=1 << 20)
  log = jp.KVEventLog()
  manager.subscribe(log)

  def replay_matches():
    state = jp.replay_events(log.events)
    prefix = manager.cache.prefix
    cached = np.flatnonzero(np.asarray(prefix.page_cached))
    assert state["device"] == {jp.block_key(h) for h in np.asarray(prefix.page_hash)[cached]}
    assert state["ram"] == {k[1] for k in manager.store.keys() if k[0] == "block"}

  a_tokens, b_tokens = list(range(1, 8)), [7, 7, 8, 8, 9]
  b = prefill_manager(manager, b_tokens)
  a = prefill_manager(manager, a_tokens)
  k_a = np.asarray(jp.gather_kv(manager.cache, 0, a.seq_id)[0])
  manager.swap_out([a.seq_id])
  manager.release([b.seq_id])
  manager.gc()  # b's blocks (and a's, cached at swap-out) to host RAM
  replay_matches()
  old = jax.tree.map(jnp.copy, manager.cache)
  manager.resize(8)  # (a shrink: no page is live, a's blocks are in host RAM)
  check_moved(old, manager.cache)
  replay_matches()
  assert manager.swap_in([a.seq_id]) == [True]
  np.testing.assert_array_equal(np.asarray(jp.gather_kv(manager.cache, 0, a.seq_id)[0]), k_a)
  again = manager.admit(b_tokens[:4] + [1])
  assert again.num_cached == 4 and again.host_hit_tokens == 4
  k, _ = jp.gather_kv(manager.cache, 0, again.seq_id)
  np.testing.assert_array_equal(np.asarray(k)[:4, 0, 0], key_values(b_tokens)[:4])
  replay_matches()


# ----------------------------------------------------------------------------- several devices

_SHARDED = textwrap.dedent("""
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  import jax, jax.numpy as jnp, numpy as np
  jax.config.update("jax_platforms", "cpu")
  import jaxpaged as jp
  from tests.helpers import check_defragmented
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=8,
                      max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
  mesh = jp.make_mesh(4, 1)
  cache = jp.init_sharded_cache(spec, mesh)
  ids = jnp.arange(8, dtype=jnp.int32)
  toks = jnp.arange(48, dtype=jnp.int32) % 5
  cache, slots, ok = jp.extend(cache, ids, jnp.array([5, 7, 3, 6, 2, 8, 4, 5]), num_slots=48,
                               tokens=toks)
  assert bool(jnp.all(ok)), ok
  kv = jnp.arange(48.0)[:, None, None] * jnp.ones((1, 1, 2))
  cache = jp.write_kv(cache, 0, kv, -kv, slots)
  cache = jp.release(cache, jnp.array([0, 3, 4]))
  packed = jp.defragment(cache)
  for shard in range(jp.shard_view(cache, 0).spec.num_pages and 4):
    old, new = jp.shard_view(cache, shard), jp.shard_view(packed, shard)
    check_defragmented(old, new)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new),
                 jax.tree.map(np.asarray, jp.defragment(old)))
  print("SHARDED-OK")
""")


def test_a_sharded_cache_over_four_devices_defragments_each_shard():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root}
  out = subprocess.run([sys.executable, "-c", _SHARDED], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
  assert "SHARDED-OK" in out.stdout, out.stderr[-3000:]
