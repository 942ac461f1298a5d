"""`defragment` and `resize` (the state machines of test_stateful run them at random too): the
real model decoding across them gives bit-identical logits; prefix hits, pins and the manager
follow moved pages; bad input is refused with nothing changed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged.models import gguf, llama
from tests.helpers import check_defragmented, key_values, prefill_manager

SMALL = dict(num_layers=2, num_kv_heads=1, head_dim=2, page_size=4, max_seqs=4,
             max_pages_per_seq=6, prefix_caching=True)


def _snapshot(cache):
  return jax.tree.map(np.asarray, cache)


def _assert_same(cache, snapshot):
  jax.tree.map(np.testing.assert_array_equal, _snapshot(cache), snapshot)


def _fragmented(num_pages=16):
  """A manager whose live pages sit above holes: a shared prefix (cached, then re-used), a
  released long sequence, a fork."""
  manager = jp.CacheManager(jp.CacheSpec(num_pages=num_pages, **SMALL))
  a = prefill_manager(manager, list(range(1, 14)))
  b = prefill_manager(manager, [9] * 11)
  manager.release([a.seq_id])  # its 3 full blocks stay cached, its last page is freed
  c = prefill_manager(manager, list(range(1, 14)) + [5, 5])  # hits the cached prefix
  d = prefill_manager(manager, [7] * 6, salt=1 << 40)
  manager.release([b.seq_id])
  return manager, (c, d)


# ----------------------------------------------------------------------------- pure functions

def test_defragment_packs_pages_and_keeps_what_every_sequence_reads():
  manager, _ = _fragmented()
  old = manager.cache
  before = _snapshot(old)
  assert np.asarray(old.page_table).max() >= jp.num_used_pages(old) + jp.num_cached_free_pages(old)
  new = jp.defragment(old)
  _assert_same(old, before)  # pure
  check_defragmented(old, new)
  # Defragmenting twice moves nothing.
  again = jp.defragment(new)
  jax.tree.map(np.testing.assert_array_equal, _snapshot(again), _snapshot(new))


def test_defragmented_cache_still_serves_prefix_hits_and_keeps_salts_apart():
  manager, (c, d) = _fragmented()
  manager.cache = jp.defragment(manager.cache)
  prompt = list(range(1, 14)) + [8]
  hit = manager.admit(prompt)
  assert hit.num_cached == 12  # the three full blocks, found at their new pages
  k, _ = jp.gather_kv(manager.cache, 1, hit.seq_id)
  np.testing.assert_array_equal(np.asarray(k)[:12, 0, 0], key_values(prompt)[:12] + 1)
  # The salted prompt's block is not served under another salt.
  assert manager.cached_prefix_tokens([7] * 6 + [1], salt=0) == 0
  assert manager.cached_prefix_tokens([7] * 6 + [1], salt=1 << 40) == 4


def test_defragment_under_the_callers_jit_with_donation():
  manager, _ = _fragmented()
  old = manager.cache
  expected = jp.defragment(old)
  step = jax.jit(jp.defragment, donate_argnums=0)
  copy = jax.tree.map(jnp.copy, old)
  moved = step(copy)
  jax.tree.map(np.testing.assert_array_equal, _snapshot(moved), _snapshot(expected))


def test_resize_grows_and_shrinks_keeping_blocks_and_outputs():
  manager, (c, d) = _fragmented(num_pages=10)
  old, before = manager.cache, _snapshot(manager.cache)
  big = jp.resize(old, 40)
  _assert_same(old, before)
  assert big.spec.num_pages == 40 and big.spec.max_cached_blocks == 40
  assert big.spec.table_capacity == 128  # the default follows, and the table is rebuilt
  check_defragmented(old, big, packed=False)  # growing moves no page
  assert int(jp.num_free_pages(big)) == int(jp.num_free_pages(old)) + 30
  live = 10 - int(old.num_free)
  small = jp.resize(big, live)
  check_defragmented(big, small)
  assert int(jp.num_free_pages(small)) == 0 and small.spec.table_capacity == 16
  # Blocks are found through the rebuilt tables: a prompt sharing c's prefix hits them.
  tokens = jnp.zeros((1, 16), jnp.int32).at[0, :14].set(jnp.arange(1, 15))
  for cache in (big, small):
    free_seq = int(np.flatnonzero(np.asarray(cache.seq_lens) == 0)[0])
    _, match = jp.match_prefix(cache, jnp.array([free_seq]), tokens, jnp.array([14]),
                               num_slots=16)
    # (small has no free page: the new tokens' page is taken from an evictable block)
    assert bool(match.ok) and int(match.num_cached[0]) == 12


def test_resize_keeps_set_sizes_and_refuses_what_does_not_fit():
  spec = jp.CacheSpec(num_pages=16, table_capacity=256, max_cached_blocks=6, **SMALL)
  manager = jp.CacheManager(spec, max_pinned_pages=10)
  prefill_manager(manager, list(range(20)))
  old, before = manager.cache, _snapshot(manager.cache)
  grown = jp.resize(old, 24)
  assert (grown.spec.table_capacity, grown.spec.max_cached_blocks) == (256, 6)
  shrunk = jp.resize(old, 5)
  assert (shrunk.spec.table_capacity, shrunk.spec.max_cached_blocks) == (256, 5)
  for bad, message in [(4, "cannot hold the 5 live pages"), (0, "at least 1"),
                       (-3, "num_pages"), (2.5, "num_pages"), ("8", "num_pages")]:
    with pytest.raises(jp.JaxPagedError, match=message):
      jp.resize(old, bad)
  _assert_same(old, before)
  with pytest.raises(jp.JaxPagedError, match="PagedKVCache"):
    jp.defragment("not a cache")
  manager.resize(5)  # a set pin bound is capped at the pool
  assert (manager.spec.num_pages, manager.retention.max_pinned_pages) == (5, 5)
  mesh = jp.make_mesh(1, 1)
  with pytest.raises(jp.JaxPagedError, match="ShardedCache"):
    jp.resize(jp.init_sharded_cache(spec, mesh), 8)


def test_defragment_a_sharded_cache_shard_by_shard():
  spec = jp.CacheSpec(num_pages=8, **{**SMALL, "prefix_caching": False})
  cache = jp.init_sharded_cache(spec, jp.make_mesh(1, 1))
  cache, _, ok = jp.extend(cache, jnp.array([0, 1]), jnp.array([9, 3]), num_slots=12)
  assert bool(ok)
  cache = jp.release(cache, jnp.array([0]))
  packed = jp.defragment(cache)
  check_defragmented(jp.shard_view(cache, 0), jp.shard_view(packed, 0))
  assert np.asarray(packed.shards.page_table)[0, 1, 0] == 0


# ----------------------------------------------------------------------------- the manager

def test_manager_defragment_and_resize_follow_pins_and_report_no_events():
  manager, (c, d) = _fragmented()
  pinned = list(range(1, 14))
  manager.pin(pinned)
  log = jp.KVEventLog()
  manager.subscribe(log)
  told = len(log.events)
  before = jax.tree.map(jnp.copy, manager.cache)  # (the manager donates its cache)
  result = manager.defragment()
  assert result["pages_moved"] > 0 and result["live_pages"] == 16 - int(manager.cache.num_free)
  check_defragmented(before, manager.cache)
  manager.resize(result["live_pages"] + 2)
  assert manager.spec.num_pages == result["live_pages"] + 2
  assert manager.stats()["total_pages"] == manager.spec.num_pages
  assert len(log.events) == told  # the same blocks on every tier: nothing to report
  # The pin holds the moved pages: unpinning lets go of exactly them.
  manager.release([c.seq_id, d.seq_id])
  assert manager.stats()["cached_free_pages"] < manager.spec.num_pages - int(manager.cache.num_free)
  manager.unpin(pinned)
  assert (np.asarray(manager.cache.ref_counts) == 0).all()
  # Cached blocks are live pages: too small a pool is refused, with nothing changed...
  before, spec = _snapshot(manager.cache), manager.spec
  with pytest.raises(jp.JaxPagedError, match="cannot hold the"):
    manager.resize(1)
  _assert_same(manager.cache, before)
  assert manager.spec == spec
  # ...until gc moves them to host RAM; then the pool shrinks to one page, and they come back.
  manager.gc()
  manager.resize(1)
  assert manager.spec.num_pages == 1 and manager.retention.max_pinned_pages == 0
  manager.resize(16)
  assert manager.admit(pinned + [1]).num_cached == 12


# ----------------------------------------------------------------------------- the real model

def test_real_model_decodes_bit_identically_across_defragment_and_resize():
  """SmolLM2 decodes three prompts greedily; mid-generation a finished fourth sequence leaves
  holes, the cache is defragmented, shrunk, then grown. Every step's logits equal, bit for bit,
  those of the same run without them."""
  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  prompts = [tokenizer.encode(tokenizer.chat_prompt(q)) for q in
             ["Name a colour.", "What is two plus two?", "Say hello in French.", "Count to ten."]]
  spec = config.cache_spec(num_pages=96, max_seqs=4, max_seq_len=256, page_size=16)
  step = jax.jit(llama.forward, static_argnames=("config", "decode"))

  def run(reshape):
    cache = jp.init_cache(spec)
    lens = [len(p) for p in prompts]
    cache, logits, ok = step(params, cache, jnp.asarray(sum(prompts, []), jnp.int32),
                             jnp.arange(4, dtype=jnp.int32), jnp.asarray(lens, jnp.int32),
                             config=config, decode=False)
    assert bool(ok)
    seen, rows = [np.asarray(logits)], jnp.array([-1, 1, 2, 3], jnp.int32)
    cache = jp.release(cache, jnp.array([0]))  # leaves holes below the others' pages
    for i in range(12):
      if i in reshape:
        cache = reshape[i](cache)
      tokens = jnp.argmax(jnp.asarray(seen[-1]), axis=-1).astype(jnp.int32).at[0].set(0)
      cache, logits, ok = step(params, cache, tokens, rows, jnp.array([0, 1, 1, 1]),
                               config=config, decode=True)
      assert bool(ok)
      seen.append(np.asarray(logits).copy())
      seen[-1][0] = 0
    return seen, cache

  def packed(cache):  # the pages really move: the sequences' pages sat above the holes
    new = jp.defragment(cache)
    top = lambda c: int(np.asarray(c.page_table).max())
    assert top(new) == spec.num_pages - int(new.num_free) - 1 < top(cache)
    return new

  plain, _ = run({})
  moved, cache = run({2: packed, 5: lambda c: jp.resize(c, 40),
                      9: lambda c: jp.resize(c, 200)})
  assert cache.spec.num_pages == 200
  for a, b in zip(plain, moved):
    np.testing.assert_array_equal(a[1:], b[1:])
