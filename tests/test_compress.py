"""compress (token eviction): every result against an independent NumPy model of the rule."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp

SPEC = jp.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, num_pages=32,
                    max_seqs=4, max_pages_per_seq=8, dtype=jnp.float32)
S = SPEC.max_seq_len
POLICIES = (jp.StreamingLLM(sinks=2), jp.KeyNorm(sinks=2, recent=3),
            jp.KeyNorm(sinks=1, recent=0, skip_layers=1), jp.H2O(sinks=2, recent=3))


# ----------------------------------------------------------------------------- the oracle

def numpy_keep(n, ratio, policy, priority=None):
  """Indices kept of n tokens: sinks, a recent window, the highest priority between."""
  k = max(1, math.ceil(np.float32(ratio) * np.float32(n)))
  k = min(k, n)
  s = min(policy.sinks, k)
  if isinstance(policy, jp.StreamingLLM):
    return list(range(s)) + list(range(n - (k - s), n))
  r = min(policy.recent, k - s)
  middle = list(range(s, n - r))
  ranked = sorted(middle, key=lambda i: (-priority[i] if not np.isnan(priority[i]) else np.inf,
                                         i))
  return sorted(list(range(s)) + ranked[:k - s - r] + list(range(n - r, n)))


def pages_of(n):
  return -(-n // SPEC.page_size)


def filled(spec, lengths, seed=0):
  """A cache with sequences 0.. of ``lengths``; returns it and each one's K/V (float64,
  ``[L, n, H, D]``) as written."""
  rng = np.random.default_rng(seed)
  cache = jp.init_cache(spec)
  # Always 2 rows and max_seq_len slots: every test reuses the same compiled programs.
  ids = jnp.array([0, 1 if len(lengths) > 1 else -1])
  counts = jnp.asarray((list(lengths) + [0])[:2])
  cache, slots, ok = jp.extend(cache, ids, counts, num_slots=spec.max_seq_len)
  assert bool(ok)
  total = spec.max_seq_len
  # Each token's rows scaled by its own factor: key norms far apart (no near ties).
  scale = rng.permutation(total)[:, None, None] + 1.0
  kv = [(rng.normal(size=(total, spec.num_kv_heads, spec.head_dim)) * scale,
         rng.normal(size=(total, spec.num_kv_heads, spec.head_dim)))
        for _ in range(spec.num_layers)]
  for layer, (k, v) in enumerate(kv):
    cache = jp.write_kv(cache, layer, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                        slots)
  starts = np.cumsum([0] + list(lengths))
  per_seq = [(np.stack([np.float32(kv[l][0][a:b]) for l in range(spec.num_layers)]),
              np.stack([np.float32(kv[l][1][a:b]) for l in range(spec.num_layers)]))
             for a, b in zip(starts[:-1], starts[1:])]
  return cache, per_seq


def key_norms(k, skip_layers=0):  # [L, n, H, D] -> [n]: mean over layers and heads of the L2 norm
  return np.linalg.norm(np.asarray(k, np.float64)[skip_layers:], axis=-1).mean(axis=(0, 2))


def stored(cache, seq, n):
  """The sequence's K/V as stored, ``[L, n, H, D]`` each (gather_kv)."""
  kv = [jp.gather_kv(cache, layer, seq) for layer in range(cache.spec.num_layers)]
  return (np.stack([np.asarray(k)[:n] for k, _ in kv]),
          np.stack([np.asarray(v)[:n] for _, v in kv]))


def same_tree(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- single cache

@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_each_policy_keeps_what_the_numpy_rule_keeps_bit_exactly_and_frees_pages(policy):
  lengths = [19, 7]
  cache, per_seq = filled(SPEC, lengths)
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(2, S)).astype(np.float32)
  scores[0, 5] = np.nan  # ranks last
  for ratio in (1.0, 0.5, 0.3, 0.05):
    new, ok = jp.compress(cache, jnp.array([0, 1]), ratio, policy=policy,
                          scores=jnp.asarray(scores) if policy.uses_scores else None)
    assert bool(ok)
    used = 0
    for seq, n in enumerate(lengths):
      k, v = per_seq[seq]
      priority = (-key_norms(k, policy.skip_layers) if policy.uses_keys else scores[seq, :n]
                  if policy.uses_scores else None)
      kept = numpy_keep(n, ratio, policy, priority)
      assert int(new.seq_lens[seq]) == len(kept)
      assert int(new.num_evicted[seq]) == n - len(kept)
      got_k, got_v = stored(new, seq, len(kept))
      np.testing.assert_array_equal(got_k, k[:, kept])
      np.testing.assert_array_equal(got_v, v[:, kept])
      used += pages_of(len(kept))
    assert int(jp.num_used_pages(new)) == used
    assert int(jp.num_free_pages(new)) == SPEC.num_pages - used
  # Pure: the input is alive and unchanged.
  np.testing.assert_array_equal(stored(cache, 0, 19)[0], per_seq[0][0])


def test_int8_kept_rows_and_scales_are_bit_exact():
  spec = jp.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, num_pages=32,
                      max_seqs=4, max_pages_per_seq=8, dtype=jnp.int8)
  cache, _ = filled(spec, [13])

  def raw(cache, n):  # every pool's rows of sequence 0, token order: [L, H, n, ...]
    pos = np.arange(n)
    pages = np.asarray(cache.page_table)[0, pos // spec.page_size]
    return {name: np.asarray(pool)[:, :, pages, pos % spec.page_size]
            for name, pool in [("k", cache.k_pages), ("v", cache.v_pages),
                               ("ks", cache.k_scales), ("vs", cache.v_scales)]}

  before = raw(cache, 13)
  new, ok = jp.compress(cache, jnp.array([0, -1]), 0.5, policy=jp.StreamingLLM(sinks=3))
  assert bool(ok)
  kept = numpy_keep(13, 0.5, jp.StreamingLLM(sinks=3))
  after = raw(new, len(kept))
  for name in before:
    np.testing.assert_array_equal(after[name], before[name][:, :, kept])


def test_positions_continue_and_attention_equals_float64_over_the_kept_tokens():
  cache, per_seq = filled(SPEC, [22])
  new, ok = jp.compress(cache, jnp.array([0, -1]), 0.4, policy=jp.KeyNorm(sinks=2, recent=2))
  assert bool(ok)
  k, v = per_seq[0]
  kept = numpy_keep(22, 0.4, jp.KeyNorm(sinks=2, recent=2), -key_norms(k))
  q = np.random.default_rng(3).normal(size=(1, 4, SPEC.head_dim)).astype(np.float32)
  for layer in range(SPEC.num_layers):
    out = np.asarray(jp.paged_attention(jnp.asarray(q), new, layer, jnp.array([0])))
    keys, values = (np.float64(x[layer, kept]) for x in (k, v))  # [n, H, D]
    qi = np.float64(q[0]).reshape(2, 2, -1)
    s = np.einsum("hgd,shd->hgs", qi, keys) / np.sqrt(SPEC.head_dim)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    want = np.einsum("hgs,shd->hgd", w, values).reshape(4, -1)
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-5)
  grown, _, ok = jp.extend(new, jnp.array([0]), jnp.array([2]), num_slots=2)
  assert jp.token_positions(grown, jnp.array([0]), jnp.array([2]), num_slots=2).tolist() == [22, 23]


def test_a_forked_sibling_sharing_pages_is_unchanged():
  cache, _ = filled(SPEC, [18])
  cache, ok = jp.fork(cache, jnp.array([0]), jnp.array([1]))
  before = stored(cache, 1, 18)
  pages = np.asarray(cache.page_table[1])
  new, ok = jp.compress(cache, jnp.array([0, -1]), 0.5)
  assert bool(ok)
  after = stored(new, 1, 18)
  np.testing.assert_array_equal(after[0], before[0])
  np.testing.assert_array_equal(after[1], before[1])
  np.testing.assert_array_equal(np.asarray(new.page_table[1]), pages)
  live = pages[pages >= 0]
  np.testing.assert_array_equal(np.asarray(new.k_pages)[:, :, live],
                                np.asarray(cache.k_pages)[:, :, live])
  assert set(np.asarray(new.page_table[0])[:3]).isdisjoint(live)  # copies, not the shared pages
  assert np.asarray(new.ref_counts)[live].tolist() == [1] * len(live)
  assert int(new.num_evicted[1]) == 0 and int(new.seq_lens[1]) == 18


def test_prefix_cached_blocks_stay_unchanged_and_hit_and_no_new_block_is_registered():
  spec = jp.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, num_pages=32,
                      max_seqs=4, max_pages_per_seq=8, prefix_caching=True)
  tokens = jnp.arange(100, 118)
  cache, slots, ok = jp.extend(jp.init_cache(spec), jnp.array([0]), jnp.array([18]),
                               num_slots=18, tokens=tokens)
  k = jax.random.normal(jax.random.key(0), (18, 2, 8))
  for layer in range(2):
    cache = jp.write_kv(cache, layer, k, -k, slots)
  blocks = np.asarray(cache.page_table[0, :4])
  registered = int(jp.prefix_stats(cache)["registered"])
  new, ok = jp.compress(cache, jnp.array([0, -1]), 0.5)
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(new.k_pages)[:, :, blocks],
                                np.asarray(cache.k_pages)[:, :, blocks])
  # Grow the compressed sequence by a block's worth with ids: still nothing registered.
  new, _, ok = jp.extend(new, jnp.array([0]), jnp.array([4]), num_slots=4,
                         tokens=jnp.arange(200, 204))
  assert bool(ok) and int(jp.prefix_stats(new)["registered"]) == registered
  new, found = jp.match_prefix(new, jnp.array([1]), tokens[None], jnp.array([18]),
                               num_slots=18)
  assert bool(found.ok) and int(found.num_cached[0]) == 16
  assert np.asarray(new.page_table[1, :4]).tolist() == blocks.tolist()


def test_refused_calls_explain_and_change_nothing():
  cache, _ = filled(SPEC, [9])
  for ratio in (0, 0.0, 1.5, float("nan"), True, -0.5, "half"):
    with pytest.raises(jp.JaxPagedError, match="ratio must be a number in"):
      jp.compress(cache, jnp.array([0, -1]), ratio)
    with pytest.raises(jp.JaxPagedError, match="ratio"):
      jp.check_compress(cache, jnp.array([0]), ratio)
  with pytest.raises(jp.JaxPagedError, match="policy must be"):
    jp.compress(cache, jnp.array([0, -1]), 0.5, policy="h2o")
  with pytest.raises(jp.JaxPagedError, match=r"scores must be a float array \[len\(seq_ids\)"):
    jp.compress(cache, jnp.array([0, -1]), 0.5, policy=jp.H2O())
  for ids, message in (([7, -1], "out of range"), ([2, -1], "holds no tokens"),
                       ([0, 0], "twice")):
    new, ok = jp.compress(cache, jnp.array(ids), 0.5)
    assert not bool(ok) and same_tree(new, cache)
    with pytest.raises(jp.JaxPagedError, match=message):
      jp.check_compress(cache, jnp.array(ids), 0.5)
  assert jp.check_compress(cache, jnp.array([0, -1]), 0.5) is None


def test_traced_bad_ids_and_ratios_under_jit_give_ok_false_and_the_input_back():
  cache, _ = filled(SPEC, [9, 5])
  step = jax.jit(lambda c, ids, r: jp.compress(c, ids, r, policy=jp.KeyNorm()))
  for ids, ratio in (([7, -1], 0.5), ([-3, -1], 0.5), ([1, 1], 0.5), ([0, -1], 0.0),
                     ([0, -1], jnp.nan), ([0, -1], 1.5)):
    new, ok = step(cache, jnp.array(ids), jnp.float32(ratio))
    assert not bool(ok) and same_tree(new, cache)
  new, ok = step(cache, jnp.array([1, -1]), jnp.float32(0.5))
  assert bool(ok) and new.seq_lens.tolist()[:2] == [9, 3]


def test_out_of_pages_for_the_copies_is_refused_atomically():
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=4,
                      max_seqs=2, max_pages_per_seq=4)
  cache, _, _ = jp.extend(jp.init_cache(spec), jnp.array([0]), jnp.array([16]), num_slots=16)
  cache, _ = jp.fork(cache, jnp.array([0]), jnp.array([1]))  # every page shared, none free
  new, ok = jp.compress(cache, jnp.array([0, -1]), 0.5)
  assert not bool(ok) and same_tree(new, cache)
  with pytest.raises(jp.JaxPagedError, match="too few free pages"):
    jp.check_compress(cache, jnp.array([0]), 0.5)


def test_swap_out_and_in_after_compression_keep_num_evicted():
  cache, _ = filled(SPEC, [15])
  cache, ok = jp.compress(cache, jnp.array([0, -1]), 0.5)
  before = stored(cache, 0, 8)
  cache, (swapped,) = jp.swap_out(cache, [0])
  assert swapped.num_evicted == 7
  cache, ok = jp.swap_in(cache, swapped, seq_id=2)
  assert bool(ok) and int(cache.num_evicted[2]) == 7 and int(cache.seq_lens[2]) == 8
  np.testing.assert_array_equal(stored(cache, 2, 8)[0], before[0])


def test_sharded_cache_equals_one_single_cache_per_shard():
  mesh = jp.make_mesh(2, 2)
  cache = jp.init_sharded_cache(SPEC, mesh)
  ids = jnp.array([0, 5])  # shard 0 seq 0, shard 1 seq 1
  cache, slots, ok = jp.extend(cache, ids, jnp.array([17, 11]), num_slots=28)
  rng = np.random.default_rng(0)
  scale = jnp.asarray(rng.permutation(28)[:, None, None] + 1.0, jnp.float32)
  for layer in range(2):
    k = jnp.asarray(rng.normal(size=(28, 2, 8)), jnp.float32) * scale
    cache = jp.write_kv(cache, layer, k, -k, slots)
  policy = jp.KeyNorm(sinks=1, recent=2)
  new, ok = jp.compress(cache, ids, 0.5, policy=policy)
  assert bool(ok)
  for shard, local in ((0, 0), (1, 1)):
    want, ok1 = jp.compress(jp.shard_view(cache, shard), jnp.array([local]), 0.5, policy=policy)
    assert bool(ok1)
    assert same_tree(jp.shard_view(new, shard), want)
  # A refusal on one shard changes no shard.
  bad, ok = jp.compress(cache, jnp.array([0, 6]), 0.5)  # 6: shard 1's empty seq 2
  assert not bool(ok) and same_tree(bad, cache)
  with pytest.raises(jp.JaxPagedError, match="holds no tokens"):
    jp.check_compress(cache, jnp.array([0, 6]), 0.5)


# ----------------------------------------------------------------------------- the manager

def test_manager_compress_cache_stats_and_refusals():
  manager = jp.CacheManager(SPEC)
  seq = manager.admit(list(range(1, 21))).seq_id  # 20 tokens: 5 pages
  other = manager.admit(list(range(1, 6))).seq_id
  for ratio in (0, 1.5, float("nan"), True):
    with pytest.raises(jp.JaxPagedError, match="ratio"):
      manager.compress_cache(seq, ratio)
  with pytest.raises(jp.JaxPagedError, match="not an active sequence"):
    manager.compress_cache(3, 0.5)
  manager.swap_out([other])
  with pytest.raises(jp.JaxPagedError, match="swapped out"):
    manager.compress_cache(other, 0.5)
  assert manager.compression_stats().compressed_caches == 0
  assert manager.compress_cache(seq, 0.25, jp.KeyNorm())
  assert int(manager.cache.seq_lens[seq]) == 5 and int(manager.cache.num_evicted[seq]) == 15
  stats = manager.compression_stats()
  assert stats.compressed_caches == 1
  assert stats.memory_saved_bytes == 3 * SPEC.page_bytes
  assert stats.avg_compression_ratio == 0.25 and stats.avg_compression_time_ms > 0
  assert manager.swap_in([other]) == [True]


def test_auto_compress_is_off_by_default_and_frees_room_when_turned_on():
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
                      max_seqs=4, max_pages_per_seq=8)
  results = {}
  for auto in (None, (0.5, jp.StreamingLLM(sinks=1))):
    manager = jp.CacheManager(spec, auto_compress=auto)
    manager.admit(list(range(1, 17)))  # 4 pages
    b = manager.admit(list(range(1, 13))).seq_id  # 3 pages: 1 free
    _, ok, preempted = manager.extend([b], [8], num_slots=8)  # needs 2
    results[auto is None] = (bool(ok), preempted, manager.cache.num_evicted.tolist()[:2],
                             manager.compression_stats().compressed_caches)
  assert results[True] == (False, [], [0, 0], 0)
  assert results[False] == (True, [], [8, 0], 1)
  with pytest.raises(jp.JaxPagedError, match="auto_compress must be"):
    jp.CacheManager(spec, auto_compress=2.0)


def test_auto_compress_that_cannot_make_room_rolls_back_every_compression():
  """A call that fails changes nothing, the compressions tried for it included."""
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
                      max_seqs=4, max_pages_per_seq=8)
  manager = jp.CacheManager(spec, auto_compress=(0.5, jp.StreamingLLM(sinks=1)))
  manager.admit(list(range(1, 17)))  # 4 pages
  b = manager.admit(list(range(1, 13))).seq_id  # 3 pages: 1 free
  before = jax.tree.map(np.asarray, manager.cache)
  _, ok, preempted = manager.extend([b], [20], num_slots=20)  # needs 5: compressing frees 2
  assert not bool(ok) and preempted == []
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before),
                                                  jax.tree.leaves(manager.cache)))
  assert manager.compression_stats().compressed_caches == 0
  _, ok, _ = manager.extend([b], [8], num_slots=8)  # this one fits after compressing
  assert bool(ok) and manager.compression_stats().compressed_caches == 1


# ----------------------------------------------------------------------------- the real model

def test_smollm2_decodes_the_same_tokens_after_compress_with_ratio_one():
  from jaxpaged.models import gguf, llama
  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog because")
  spec = config.cache_spec(num_pages=16, max_seqs=1, max_seq_len=64, page_size=8)
  prefill = jax.jit(functools.partial(llama.forward, config=config, decode=False))
  decode = jax.jit(functools.partial(llama.forward, config=config, decode=True),
                   donate_argnames="cache")
  compress = jax.jit(functools.partial(jp.compress, policy=jp.StreamingLLM()))

  cache, first, _ = prefill(params, jp.init_cache(spec), jnp.asarray(prompt), jnp.array([0]),
                            jnp.array([len(prompt)]))

  def run(cache):
    cache, logits, out = jax.tree.map(jnp.copy, cache), first, []  # decode donates its cache
    for _ in range(8):
      token = jnp.argmax(logits, -1).astype(jnp.int32)
      out.append(int(token[0]))
      cache, logits, _ = decode(params, cache, token, jnp.array([0]), jnp.array([1]))
    return out

  compressed, ok = compress(cache, jnp.array([0]), jnp.float32(1.0))
  assert bool(ok) and int(compressed.num_evicted[0]) == 0
  assert not np.array_equal(np.asarray(compressed.page_table), np.asarray(cache.page_table))
  assert run(compressed) == run(cache)
