"""Prefix caching: hashing, the hash table, and the scenarios vLLM's prefix-caching tests cover
(tests/v1/core/test_prefix_caching.py), in jaxpaged's functional form."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from tests.helpers import key_values
from jaxpaged._src import hashing, table

PS = 4


def _spec(**kw):
  return jp.CacheSpec(**{**dict(num_layers=2, num_kv_heads=1, head_dim=2, page_size=PS,
                                num_pages=16, max_seqs=6, max_pages_per_seq=8,
                                prefix_caching=True), **kw})


def _copy(cache):
  return jax.tree.map(jnp.copy, cache)


def _admit(cache, seq, prompt, salt=0, **kw):
  tokens = np.zeros((1, 32), np.int32)
  tokens[0, :len(prompt)] = prompt
  return jp.match_prefix(cache, jnp.array([seq]), jnp.asarray(tokens), jnp.array([len(prompt)]),
                         salts=jnp.array([salt]), **kw)


def _admit_and_write(cache, seq, prompt, salt=0):
  """match_prefix, then write the K/V of the tokens it appended (as a model's prefill would)."""
  cache, match = _admit(cache, seq, prompt, salt)
  assert bool(match.ok)
  start, n = int(match.num_cached[0]), int(match.num_new[0])
  values = key_values(prompt)[start:start + n]
  slots = match.slots[:n]
  for layer in range(cache.spec.num_layers):
    kv = jnp.broadcast_to(jnp.asarray(values)[:, None, None], (n, 1, 2))
    cache = jp.write_kv(cache, layer, kv, -kv, slots)
  return cache, start


def _append_and_write(cache, seq, tokens, held):
  """extend ``seq`` (holding ``held``) by ``tokens`` with their ids, then write their K/V."""
  n = len(tokens)
  cache, slots, ok = jp.extend(cache, jnp.array([seq]), jnp.array([n]), num_slots=n,
                               tokens=jnp.array(tokens))
  assert bool(ok)
  values = key_values(held + tokens)[len(held):]
  for layer in range(cache.spec.num_layers):
    kv = jnp.broadcast_to(jnp.asarray(values)[:, None, None], (n, 1, 2))
    cache = jp.write_kv(cache, layer, kv, -kv, slots)
  return cache


def _assert_holds(cache, seq, prompt):
  k, v = jp.gather_kv(cache, 1, seq)
  n = int(cache.seq_lens[seq])
  assert n == len(prompt)
  np.testing.assert_array_equal(np.asarray(k[:n, 0, 0]), key_values(prompt))
  np.testing.assert_array_equal(np.asarray(v[:n, 0, 1]), -key_values(prompt))


# ----------------------------------------------------------------------------- hashing, table

def test_block_hashes_are_bit_identical_on_host_and_device_and_chain():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50_000, (3, 5 * PS)).astype(np.int32)
  salts = [0, 0, 9 + (5 << 32)]  # 64-bit: the high lane counts too
  lanes = np.array([[s & 0xFFFFFFFF, s >> 32] for s in salts], np.uint32)
  device = jax.jit(lambda t, s: hashing.chain_block_hashes(jnp, t, s, PS))(tokens, lanes)
  for row in range(3):
    host = jp.block_hashes(tokens[row].tolist() + [1, 2], PS, salt=salts[row])
    np.testing.assert_array_equal(host, np.asarray(device[row]))
    assert host.dtype == np.uint32 and host.shape == (5, 2)  # 64 bits a block
  # A changed token changes its block and every later one (the chain), nothing before.
  changed = tokens.copy()
  changed[0, 2 * PS + 1] += 1
  other = jp.block_hashes(changed[0].tolist(), PS)
  same = (other == jp.block_hashes(tokens[0].tolist(), PS)).all(axis=1)
  assert same.tolist() == [True, True, False, False, False]
  # The salt changes every block.
  assert not (np.asarray(device[2]) == jp.block_hashes(tokens[2].tolist(), PS)).all(axis=1).any()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_table_lookup_matches_a_dict_through_inserts_and_deletes(impl):
  rng = np.random.default_rng(1)
  capacity = 1024  # roomy: a full neighbourhood is the next test's subject
  state = (jnp.zeros(capacity, jnp.int32), jnp.zeros(capacity, jnp.int32),
           jnp.full(capacity, table.EMPTY, jnp.int32))
  model = {}
  keys = rng.integers(0, 2**32, (300, 2), dtype=np.uint64).astype(np.uint32)
  keys[150:160] = keys[150]  # repeated keys are inserted once
  for step in range(6):
    batch = keys[step * 50:(step + 1) * 50]
    pages = np.arange(step * 50, (step + 1) * 50, dtype=np.int32)
    *state, inserted = table.insert(*state, jnp.asarray(batch), jnp.asarray(pages),
                                    jnp.ones(50, bool))
    for key, page, ok in zip(map(tuple, batch), pages, np.asarray(inserted)):
      assert ok == (key not in model)
      model.setdefault(key, page)
    gone = [k for k in list(model)[::3]]
    state[2] = table.delete(*state, jnp.asarray(np.array(gone, np.uint32)),
                            jnp.asarray([model[k] for k in gone], jnp.int32),
                            jnp.ones(len(gone), bool))
    for k in gone:
      del model[k]
    found = table.lookup(*state, jnp.asarray(keys), impl=impl, interpret=True)
    np.testing.assert_array_equal(found, [model.get(tuple(k), -1) for k in keys])


def test_a_full_table_refuses_inserts_and_never_overwrites():
  # capacity == PROBES: with an odd double-hashing step every key can reach every slot, so the
  # table takes exactly `capacity` keys and refuses the rest.
  capacity = table.PROBES
  state = (jnp.zeros(capacity, jnp.int32), jnp.zeros(capacity, jnp.int32),
           jnp.full(capacity, table.EMPTY, jnp.int32))
  keys = np.random.default_rng(2).integers(0, 2**32, (capacity + 5, 2),
                                           dtype=np.uint64).astype(np.uint32)
  *state, inserted = table.insert(*state, jnp.asarray(keys),
                                  jnp.arange(len(keys), dtype=jnp.int32), jnp.ones(len(keys), bool))
  assert np.asarray(inserted).tolist() == [True] * capacity + [False] * 5
  found = table.lookup(*state, jnp.asarray(keys), impl="xla")
  assert np.asarray(found).tolist() == list(range(capacity)) + [-1] * 5


# ----------------------------------------------------------------------------- scenarios

def test_two_requests_share_their_common_prefix_with_reference_counts():
  cache = jp.init_cache(_spec())
  common = list(range(100, 110))  # 2 full blocks + 2 tokens
  cache, _ = _admit_and_write(cache, 0, common + [1, 2, 3])  # 13 tokens: 3 full blocks
  cache, cached = _admit_and_write(cache, 1, common + [7, 8, 9, 10, 11])
  assert cached == 2 * PS  # the 3rd block differs ([108, 109, 7, 8] vs [108, 109, 1, 2])
  shared = np.asarray(cache.page_table[0, :2])
  np.testing.assert_array_equal(cache.page_table[1, :2], shared)
  np.testing.assert_array_equal(np.asarray(cache.ref_counts)[shared], 2)
  own = np.asarray(cache.page_table[1, 2:4])
  np.testing.assert_array_equal(np.asarray(cache.ref_counts)[own], 1)
  _assert_holds(cache, 0, common + [1, 2, 3])
  _assert_holds(cache, 1, common + [7, 8, 9, 10, 11])
  stats = jp.prefix_stats(cache)
  assert int(stats["hit_blocks"]) == 2 and int(stats["lookup_blocks"]) == 3 + 3


def test_the_last_prompt_token_is_always_computed():
  cache = jp.init_cache(_spec())
  prompt = list(range(3 * PS))  # exactly 3 blocks
  cache, _ = _admit_and_write(cache, 0, prompt)
  cache = jp.release(cache, jnp.array([0]))
  cache, cached = _admit_and_write(cache, 1, prompt)
  assert cached == 2 * PS  # not 3: the last token's logits must come from a forward pass
  _assert_holds(cache, 1, prompt)


def test_decode_filling_a_block_registers_it():
  cache = jp.init_cache(_spec())
  prompt = [5, 6, 7, 8, 9, 10]  # 1 full block + 2
  cache, _ = _admit_and_write(cache, 0, prompt)
  assert int(jp.prefix_stats(cache)["registered"]) == 1
  held = list(prompt)
  for token in (11, 12, 13):  # the 2nd block fills at 12
    cache = _append_and_write(cache, 0, [token], held)
    held.append(token)
  assert int(jp.prefix_stats(cache)["registered"]) == 2
  cache, cached = _admit_and_write(cache, 1, prompt + [11, 12, 99, 98])
  assert cached == 2 * PS


def test_released_blocks_stay_cached_and_a_hit_revives_them():
  cache = jp.init_cache(_spec())
  prompt = list(range(20, 31))  # 2 full blocks + 3
  cache, _ = _admit_and_write(cache, 0, prompt)
  cache = jp.release(cache, jnp.array([0]))
  assert int(jp.num_cached_free_pages(cache)) == 2 and int(jp.num_used_pages(cache)) == 0
  assert int(jp.num_free_pages(cache)) == 14
  cache, cached = _admit_and_write(cache, 3, prompt)
  assert cached == 2 * PS and int(jp.num_cached_free_pages(cache)) == 0
  np.testing.assert_array_equal(np.asarray(cache.ref_counts)[np.asarray(cache.page_table[3, :2])],
                                1)
  _assert_holds(cache, 3, prompt)


def test_eviction_takes_free_pages_first_then_lru_then_tail_first():
  cache = jp.init_cache(_spec(num_pages=8))
  a = list(range(10, 10 + 3 * PS + 1))  # 3 full blocks + 1 (4 pages)
  b = list(range(50, 50 + 2 * PS + 1))  # 2 full blocks + 1 (3 pages)
  cache, _ = _admit_and_write(cache, 0, a)
  cache, _ = _admit_and_write(cache, 1, b)
  a_pages = np.asarray(cache.page_table[0, :3]).tolist()
  b_pages = np.asarray(cache.page_table[1, :2]).tolist()
  cache = jp.release(cache, jnp.array([0]))  # A's blocks become the least recently used
  cache = jp.release(cache, jnp.array([1]))
  assert int(jp.num_free_pages(cache)) == 3  # 1 never-used + the two partial last pages
  # 5 new pages: the 3 free ones first, then 2 evictions: A's tail (block 2, then block 1).
  cache, match = _admit(cache, 2, list(range(200, 200 + 4 * PS + 1)))
  assert bool(match.ok) and int(jp.prefix_stats(cache)["evictions"]) == 2
  taken = set(np.asarray(cache.page_table[2, :5]).tolist())
  assert {a_pages[2], a_pages[1]} <= taken and not taken & set(b_pages + a_pages[:1])
  # What is left still serves: all of B (no eviction needed), then A's first block.
  cache = jp.release(cache, jnp.array([2]))
  cache, cached_b = _admit_and_write(cache, 4, b)
  cache, cached_a = _admit_and_write(cache, 3, a)
  assert (cached_a, cached_b) == (PS, 2 * PS)
  _assert_holds(cache, 3, a)
  _assert_holds(cache, 4, b)


def test_blocks_a_request_hits_are_not_evicted_by_its_own_allocation():
  cache = jp.init_cache(_spec(num_pages=6))
  prompt = list(range(30, 30 + 4 * PS + 1))  # 4 full blocks + 1: 5 pages
  cache, _ = _admit_and_write(cache, 0, prompt)
  cache = jp.release(cache, jnp.array([0]))  # 4 cached free pages, 2 free
  # The same 4 blocks plus 2 more pages of new tokens: the 2 free pages suffice, no eviction.
  cache, cached = _admit_and_write(cache, 1, prompt + list(range(5)))
  assert cached == 4 * PS and int(jp.prefix_stats(cache)["evictions"]) == 0
  _assert_holds(cache, 1, prompt + list(range(5)))


def test_a_failed_allocation_after_a_hit_changes_nothing():
  cache = jp.init_cache(_spec(num_pages=6))
  prompt = list(range(30, 30 + 2 * PS + 1))  # 2 full blocks + 1
  cache, _ = _admit_and_write(cache, 0, prompt)
  cache = jp.release(cache, jnp.array([0]))
  before = _copy(cache)
  too_long = prompt[:2 * PS] + list(range(5 * PS))  # hits 2 blocks, then needs 5 more pages
  cache, match = _admit(cache, 1, too_long)
  assert not bool(match.ok)
  chex.assert_trees_all_equal(cache, before)  # reference counts and statistics included
  with pytest.raises(jp.JaxPagedError, match="^cache: has too few free pages"):
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, :len(too_long)] = too_long
    jp.check_match_prefix(cache, jnp.array([1]), tokens, jnp.array([len(too_long)]))


def test_different_salts_never_share_a_page():
  cache = jp.init_cache(_spec())
  prompt = list(range(40, 53))
  cache, _ = _admit_and_write(cache, 0, prompt, salt=1)
  cache, cached_other = _admit_and_write(cache, 1, prompt, salt=2)
  cache, cached_same = _admit_and_write(cache, 2, prompt, salt=1)
  assert cached_other == 0 and cached_same == 3 * PS
  assert not set(np.asarray(cache.page_table[1, :3]).tolist()) & set(
      np.asarray(cache.page_table[0, :3]).tolist())


def test_a_degenerate_hash_gives_no_false_hits():
  """Every block hashes alike: hits come only from verified content, outputs stay right.
  (One block holds the single key, so only prompts starting with it hit, and only that block.)"""
  cache = jp.init_cache(_spec(block_hash="constant", num_pages=32))
  prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9, 9, 9, 9], [2, 2, 3, 4, 5],
             [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]]
  expected_cached = [0, PS, 0, PS]
  for seq, (prompt, want) in enumerate(zip(prompts, expected_cached)):
    cache, cached = _admit_and_write(cache, seq, prompt)
    assert cached == want, (seq, cached)
  for seq, prompt in enumerate(prompts):
    _assert_holds(cache, seq, prompt)


def test_reset_is_refused_while_pages_are_used_then_forgets_everything():
  cache = jp.init_cache(_spec())
  prompt = list(range(70, 83))
  cache, _ = _admit_and_write(cache, 0, prompt)
  before = _copy(cache)
  cache, ok = jp.reset_prefix_cache(cache)
  assert not bool(ok)
  chex.assert_trees_all_equal(cache, before)
  cache = jp.release(cache, jnp.array([0]))
  cache, ok = jp.reset_prefix_cache(cache)
  assert bool(ok) and int(jp.num_free_pages(cache)) == 16
  assert int(jp.prefix_stats(cache)["cached_blocks"]) == 0
  cache, cached = _admit_and_write(cache, 1, prompt)
  assert cached == 0


def test_options_minimum_prefix_maximum_blocks_and_disabled():
  prompt = list(range(90, 90 + 3 * PS + 1))
  cache = jp.init_cache(_spec(min_prefix_tokens=3 * PS))
  cache, _ = _admit_and_write(cache, 0, prompt)
  cache, cached = _admit_and_write(cache, 1, prompt[:2 * PS + 1])  # 2 blocks < minimum
  assert cached == 0
  cache, cached = _admit_and_write(cache, 2, prompt)
  assert cached == 3 * PS
  cache = jp.init_cache(_spec(max_cached_blocks=2))
  cache, _ = _admit_and_write(cache, 0, prompt)
  stats = jp.prefix_stats(cache)
  assert int(stats["registered"]) == 2 and int(stats["not_registered"]) == 1
  cache = jp.init_cache(_spec(prefix_caching=False))
  cache, _ = _admit_and_write(cache, 0, prompt)
  cache, cached = _admit_and_write(cache, 1, prompt)
  assert cached == 0 and cache.prefix is None
  _assert_holds(cache, 1, prompt)


def test_forks_inherit_the_salt_and_keep_registering():
  cache = jp.init_cache(_spec())
  prompt = [1, 2, 3, 4, 5, 6]
  cache, _ = _admit_and_write(cache, 0, prompt, salt=5)
  cache, ok = jp.fork(cache, jnp.array([0]), jnp.array([1]))
  cache = _append_and_write(cache, 1, [7, 8], prompt)
  cache, cached = _admit(cache, 2, prompt + [7, 8, 9], salt=5)
  assert int(cached.num_cached[0]) == 2 * PS
  cache, cached = _admit(cache, 3, prompt + [7, 8, 9], salt=0)
  assert int(cached.num_cached[0]) == 0


def test_match_prefix_rejects_bad_input_with_a_fix():
  cache = jp.init_cache(_spec())
  cache, _ = _admit_and_write(cache, 0, [1, 2, 3])
  tokens = jnp.zeros((2, 8), jnp.int32)
  with pytest.raises(jp.JaxPagedError, match="tokens must be a 2-D integer array"):
    jp.match_prefix(cache, jnp.array([1, 2]), tokens[0], jnp.array([1, 1]))
  with pytest.raises(jp.JaxPagedError, match="tokens must be int32\\[2, max_prompt_len\\]"):
    jp.match_prefix(cache, jnp.array([1, 2]), tokens[:1], jnp.array([1, 1]))
  before = _copy(cache)
  cache, match = jp.match_prefix(cache, jnp.array([0, 2]), tokens, jnp.array([3, 3]))
  assert not bool(match.ok)
  chex.assert_trees_all_equal(cache, before)
  with pytest.raises(jp.JaxPagedError, match="^seq_ids at rows \\[0\\]: is a sequence that holds"):
    jp.check_match_prefix(cache, jnp.array([0, 2]), tokens, jnp.array([3, 3]))
  with pytest.raises(jp.JaxPagedError, match="^lengths at rows \\[1\\]: must be in"):
    jp.check_match_prefix(cache, jnp.array([1, 2]), tokens, jnp.array([3, 9]))


def test_a_refilled_parent_page_cannot_vouch_for_an_old_child():
  """With an unchained hash, block T after prefix X and after prefix B share a key. T was
  computed after X, and chains onto X's registered page; once that page is evicted and refilled
  with B, a prompt [B, T] finds T under its key, with the right tokens, salt and parent *page*,
  yet T's K/V were computed after X. Only the parent's generation tells."""
  cache = jp.init_cache(_spec(block_hash="unchained", num_pages=12))
  x, t = [1, 2, 3, 4], [9, 9, 8, 8]
  # Both compute X in one call: row 1's copy is a duplicate, not registered, and its T chains
  # onto row 0's registered X page.
  prompts = [x + [0], x + t + [0]]
  tokens = np.zeros((2, 32), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  cache, match = jp.match_prefix(cache, jnp.array([0, 1]), jnp.asarray(tokens),
                                 jnp.array([5, 9]))
  values = np.concatenate([key_values(p) for p in prompts])
  for layer in range(cache.spec.num_layers):
    kv = jnp.broadcast_to(jnp.asarray(values)[:, None, None], (14, 1, 2))
    cache = jp.write_kv(cache, layer, kv, -kv, match.slots[:14])
  x_page, t_page = int(cache.page_table[0, 0]), int(cache.page_table[1, 1])
  assert not bool(cache.prefix.page_cached[cache.page_table[1, 0]])  # the duplicate
  assert bool(cache.prefix.page_cached[t_page])
  # Sequence 1 still holds T; X's page goes idle, then every other page is taken, so the next
  # allocation evicts X's page and B lands on it.
  cache = jp.release(cache, jnp.array([0]))
  cache, match = _admit(cache, 2, list(range(100, 132)))
  assert bool(match.ok) and int(jp.num_free_pages(cache)) == 0
  b = [5, 6, 7, 10]
  cache, _ = _admit_and_write(cache, 3, b)
  assert int(cache.page_table[3, 0]) == x_page  # refilled with B
  assert int(cache.prefix.page_parent[t_page]) == x_page  # the hazard is set up
  cache, match = _admit(cache, 4, b + t + [0], max_prompt_tokens=jnp.array([0]), num_slots=1)
  assert bool(match.ok) and int(match.num_cached[0]) == PS  # B only: T's K/V are X's
