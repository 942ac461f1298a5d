"""The cache on a device mesh (`jaxpaged.ShardedCache`) against its oracle: one ordinary
single-device cache per data shard, driven with the same sequences.

Every op runs on meshes (data, model) = (1, 8), (8, 1), (2, 3) of 8 CPU host devices
(tests/conftest.py), with KV heads split over "model" and, where the axis is larger than the
heads, replicated (vLLM's rule). After every step the allocator state and K/V of each shard must
equal its oracle bit for bit; attention outputs agree within float tolerance.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp

# (data, model, num_kv_heads): model only, heads replicated 4x; data only, 2 heads per device;
# both axes (on 6 of the 8 devices), heads split 1:1. (Each mesh compiles every op anew: a fourth,
# (2, 4) with 4 heads, took the (2, 3) mesh's code paths again; the tests below run on (2, 4) and
# (2, 2) meshes.)
MESHES = [(1, 8, 2), (8, 1, 2), (2, 3, 3)]
PS, PAGES, SEQS = 4, 12, 3


def _spec(heads, prefix=True):
  return jp.CacheSpec(num_layers=2, num_kv_heads=heads, head_dim=8, page_size=PS,
                      num_pages=PAGES, max_seqs=SEQS, max_pages_per_seq=4, prefix_caching=prefix)


class Pair:
  """A sharded cache and its oracle (a list of single caches), updated together."""

  def __init__(self, data, model, heads, prefix=True):
    self.spec = _spec(heads, prefix)
    self.mesh = jp.make_mesh(data, model)
    self.sharded = jp.init_sharded_cache(self.spec, self.mesh)
    self.single = [jp.init_cache(self.spec) for _ in range(data)]
    self.n = data

  def local(self, ids):
    """Per shard: the global ids as its local ids (-1 for other shards' rows)."""
    ids = np.asarray(ids)
    return [jnp.asarray(np.where((ids >= 0) & (ids // SEQS == s), ids % SEQS, -1), jnp.int32)
            for s in range(self.n)]

  def check(self):
    for s in range(self.n):
      view = jp.shard_view(self.sharded, s)
      for path, got, want in zip(jax.tree_util.tree_leaves_with_path(view),
                                 jax.tree.leaves(view), jax.tree.leaves(self.single[s])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                      err_msg=f"shard {s} {jax.tree_util.keystr(path[0])}")


def _kv(rng, tokens, heads):
  return (jnp.asarray(rng.normal(size=(tokens, heads, 8)), jnp.float32),
          jnp.asarray(rng.normal(size=(tokens, heads, 8)), jnp.float32))


@pytest.mark.parametrize("data,model,heads", MESHES)
def test_every_op_equals_one_cache_per_shard(data, model, heads):
  rng = np.random.default_rng(data * 10 + model)
  pair = Pair(data, model, heads)
  total = data * SEQS
  ids = rng.permutation(total)[:min(total, 4)]
  ids = np.concatenate([ids, [-1]])
  counts = np.array([5, 3, 9, 2, 0][:len(ids) - 1] + [0])
  num_slots = int(counts.sum()) + 2
  tokens = jnp.asarray(rng.integers(0, 5, num_slots), jnp.int32)

  # extend: global slots are the owning shard's slots, offset by shard * shard_slots.
  pair.sharded, slots, ok = jp.extend(pair.sharded, ids, counts, num_slots=num_slots,
                                      tokens=tokens)
  want = np.full(num_slots, -1)
  for s, local in enumerate(pair.local(ids)):
    pair.single[s], local_slots, local_ok = jp.extend(pair.single[s], local, counts,
                                                      num_slots=num_slots, tokens=tokens)
    assert bool(local_ok)
    local_slots = np.asarray(local_slots)
    want = np.where(local_slots >= 0, s * PAGES * PS + local_slots, want)
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(slots), want)
  pair.check()
  positions = jp.token_positions(pair.sharded, ids, counts, num_slots=num_slots)
  want_positions = np.full(num_slots, -1)
  for s, local in enumerate(pair.local(ids)):
    p = np.asarray(jp.token_positions(pair.single[s], local, counts, num_slots=num_slots))
    want_positions = np.where(p >= 0, p, want_positions)
  np.testing.assert_array_equal(np.asarray(positions), want_positions)

  # write_kv into both layers (the oracle gets the same K/V at its local slots).
  for layer in range(2):
    k, v = _kv(rng, num_slots, heads)
    pair.sharded = jp.write_kv(pair.sharded, layer, k, v, slots)
    for s in range(data):
      mine = (np.asarray(slots) >= 0) & (np.asarray(slots) // (PAGES * PS) == s)
      local_slots = jnp.asarray(np.where(mine, np.asarray(slots) % (PAGES * PS), -1))
      pair.single[s] = jp.write_kv(pair.single[s], layer, k, v, local_slots)
  pair.check()
  for s in range(data):  # gather_kv with global ids reads the shard's own K/V
    for g in ids[(ids >= 0) & (ids // SEQS == s)]:
      np.testing.assert_array_equal(np.asarray(jp.gather_kv(pair.sharded, 1, int(g))[0]),
                                    np.asarray(jp.gather_kv(pair.single[s], 1, int(g) % SEQS)[0]))

  # both attentions: each row from its own shard, heads split over "model".
  q_heads = heads * 2 if (heads * 2) % model == 0 else model
  q = jnp.asarray(rng.normal(size=(len(ids), q_heads, 8)), jnp.float32)
  out = jp.paged_attention(q, pair.sharded, 1, ids)
  q_ragged = jnp.asarray(rng.normal(size=(num_slots, q_heads, 8)), jnp.float32)
  ragged = jp.ragged_paged_attention(q_ragged, pair.sharded, 0, ids, counts)
  want, want_ragged = np.zeros(out.shape), np.zeros(ragged.shape)
  for s, local in enumerate(pair.local(ids)):
    want += np.asarray(jp.paged_attention(q, pair.single[s], 1, local))
    want_ragged += np.asarray(jp.ragged_paged_attention(q_ragged, pair.single[s], 0, local, counts))
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ragged), want_ragged, rtol=1e-5, atol=1e-5)

  # fork within a shard, then release a source.
  src = int(ids[0])
  shard = src // SEQS
  free = [g for g in range(shard * SEQS, (shard + 1) * SEQS) if g not in ids]
  if free:
    pair.sharded, ok = jp.fork(pair.sharded, [src], [free[0]])
    pair.single[shard], local_ok = jp.fork(pair.single[shard], [src % SEQS], [free[0] % SEQS])
    assert bool(ok) and bool(local_ok)
    pair.check()
  pair.sharded = jp.release(pair.sharded, ids[:2])
  for s, local in enumerate(pair.local(ids[:2])):
    pair.single[s] = jp.release(pair.single[s], local)
  pair.check()

  # match_prefix: the released sequences' blocks are hits on their own shard, under their own
  # salt only (row 1 asks under another salt: a miss).
  prompts = np.zeros((2, 12), np.int32)
  lengths = np.zeros(2, np.int32)
  targets = [int(ids[0]), int(ids[1])]
  for row, g in enumerate(targets):
    n = int(counts[row])
    start = int(np.concatenate([[0], np.cumsum(counts)])[row])
    prompts[row, :n] = np.asarray(tokens[start:start + n])
    prompts[row, n:n + 3] = 1
    lengths[row] = n + 3
  pair.sharded, found = jp.match_prefix(pair.sharded, targets, prompts, lengths, salts=[0, 2**63])
  cached = np.zeros(2, np.int32)
  for s, local in enumerate(pair.local(targets)):
    pair.single[s], local_found = jp.match_prefix(pair.single[s], local, prompts, lengths,
                                                  salts=[0, 2**63])
    cached += np.where(np.asarray(local) >= 0, np.asarray(local_found.num_cached), 0)
  np.testing.assert_array_equal(np.asarray(found.num_cached), cached)
  assert cached[0] == PS * (int(counts[0]) // PS) and cached[1] == 0
  pair.check()
  stats = jp.prefix_stats(pair.sharded)
  np.testing.assert_array_equal(
      np.asarray(stats["hit_blocks"]),
      [int(jp.prefix_stats(c)["hit_blocks"]) for c in pair.single])
  np.testing.assert_array_equal(np.asarray(jp.num_free_pages(pair.sharded)),
                                [int(jp.num_free_pages(c)) for c in pair.single])
  np.testing.assert_array_equal(np.asarray(jp.num_used_pages(pair.sharded)),
                                [int(jp.num_used_pages(c)) for c in pair.single])

  # swap out and back in, bit-exact; then demote and promote cached blocks.
  g = targets[0]
  s = g // SEQS
  pair.sharded, (swapped,) = jp.swap_out(pair.sharded, [g])
  pair.single[s], (local_swapped,) = jp.swap_out(pair.single[s], [g % SEQS])
  assert swapped.seq_id == g
  np.testing.assert_array_equal(np.asarray(swapped.k), np.asarray(local_swapped.k))
  pair.check()
  pair.sharded, ok = jp.swap_in(pair.sharded, swapped)
  pair.single[s], local_ok = jp.swap_in(pair.single[s], local_swapped)
  assert bool(ok) == bool(local_ok)
  pair.check()
  pair.sharded = jp.release(pair.sharded, [g])
  pair.single[s] = jp.release(pair.single[s], jnp.array([g % SEQS]))
  pair.sharded, blocks = jp.demote_blocks(pair.sharded, 2)
  want_blocks = []
  for t in range(data):
    pair.single[t], local_blocks = jp.demote_blocks(pair.single[t], 2)
    want_blocks += local_blocks
  assert [b.tokens.tolist() for b in blocks] == [b.tokens.tolist() for b in want_blocks]
  for got, want in zip(blocks, want_blocks):
    np.testing.assert_array_equal(np.asarray(got.k), np.asarray(want.k))
  pair.check()


@pytest.mark.parametrize("data,model,heads", [(2, 4, 4)])
def test_a_call_refused_on_one_shard_changes_no_shard(data, model, heads):
  pair = Pair(data, model, heads, prefix=False)
  before = jax.tree.map(np.asarray, pair.sharded.shards)
  # shard 0's row fits; shard 1's asks for more pages than its pool has.
  cache, slots, ok = jp.extend(pair.sharded, [0, SEQS], [4, 17], num_slots=21)
  assert not bool(ok) and (np.asarray(slots) == -1).all()
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, cache.shards), before)
  cache, slots, ok = jp.extend(pair.sharded, [0, SEQS], [4, 3], num_slots=7)
  assert bool(ok)
  again, found = jp.fork(cache, [0, SEQS], [1, SEQS])  # shard 1's destination is in use
  assert not bool(found)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again.shards),
               jax.tree.map(np.asarray, cache.shards))


def test_pools_are_sharded_over_heads_and_shards():
  cache = jp.init_sharded_cache(_spec(2), jp.make_mesh(2, 4))
  assert cache.replicas == 2 and cache.shards.k_pages.shape == (2, 2, 4, PAGES, PS, 8)
  shard_shape = cache.shards.k_pages.sharding.shard_shape(cache.shards.k_pages.shape)
  assert shard_shape == (1, 2, 1, PAGES, PS, 8)  # one stored head of one shard per device
  assert len(cache.shards.k_pages.addressable_shards) == 8


def test_bad_input_is_refused_clearly():
  with pytest.raises(jp.JaxPagedError, match="model axis"):
    jp.init_sharded_cache(_spec(2), jp.make_mesh(1, 3))
  with pytest.raises(jp.JaxPagedError, match="devices"):
    jp.make_mesh(4, 4)
  cache = jp.init_sharded_cache(_spec(2), jp.make_mesh(2, 2))
  with pytest.raises(jp.JaxPagedError, match=r"seq_ids.*out of range \[-1, 6\)"):
    jp.extend(cache, [6], [1])
  cache, _, _ = jp.extend(cache, [0], [2])
  with pytest.raises(jp.JaxPagedError, match="different data shards"):
    jp.fork(cache, [0], [SEQS])
  with pytest.raises(jp.JaxPagedError, match="num_new_tokens"):
    jp.check_extend(cache, [0], [99])


def _decode_step(local_ids_per_shard):
  """A decode step written with `map_shards`: each shard extends, writes and attends its own
  batch on its local cache."""
  from jax.sharding import PartitionSpec as P
  heads = P("data", None, "model", None)

  def step(cache, q, k, v):
    def shard(local, q, k, v):
      ids = jnp.arange(local_ids_per_shard, dtype=jnp.int32)
      local, slots, _ = jp.extend(local, ids, jnp.ones_like(ids))
      outs = []
      for layer in range(2):
        local = jp.write_kv(local, layer, k[0], v[0], slots)
        outs.append(jp.paged_attention(q[0], local, layer, ids))
      return local, jnp.stack(outs)[None]
    return jp.map_shards(shard, cache, q, k, v, in_specs=(heads,) * 3,
                         out_specs=P("data", None, None, "model", None))
  return step


def test_a_map_shards_decode_step_moves_no_kv_between_devices():
  data, model, heads, rows = 2, 4, 4, 2
  pair = Pair(data, model, heads, prefix=False)
  rng = np.random.default_rng(0)
  for g in range(data * SEQS):  # some history on every sequence
    pair.sharded, slots, _ = jp.extend(pair.sharded, [g], [g + 2], num_slots=g + 2)
    for s in range(data):
      local = [g % SEQS if g // SEQS == s else -1]
      pair.single[s], _, _ = jp.extend(pair.single[s], local, [g + 2], num_slots=g + 2)
  q = jnp.asarray(rng.normal(size=(data, rows, 8, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(data, rows, heads, 8)), jnp.float32) for _ in range(2))
  step = jax.jit(_decode_step(rows))
  compiled = step.lower(pair.sharded, q, k, v).compile()
  pool = pair.sharded.shards.k_pages.sharding.shard_shape(pair.sharded.shards.k_pages.shape)
  moved = jp.collectives(compiled)
  assert not [c for c in moved if any(len(shape) >= 3 for _, shape in c.shapes)], moved
  pair.sharded, out = step(pair.sharded, q, k, v)
  for s in range(data):  # the same step on each shard's own single cache
    ids = jnp.arange(rows, dtype=jnp.int32)
    pair.single[s], slots, _ = jp.extend(pair.single[s], ids, jnp.ones_like(ids))
    for layer in range(2):
      pair.single[s] = jp.write_kv(pair.single[s], layer, k[s], v[s], slots)
      np.testing.assert_allclose(np.asarray(out[s, layer]),
                                 np.asarray(jp.paged_attention(q[s], pair.single[s], layer, ids)),
                                 rtol=1e-5, atol=1e-5)
  pair.check()

  # The detector is not blind: a step that gathers the pools across shards is caught.
  def gathers(cache):
    return jp.map_shards(lambda local: jax.lax.all_gather(local.k_pages, "data")[None], cache,
                         updates=False, out_specs=jax.sharding.PartitionSpec("data"))
  leaked = jp.collectives(jax.jit(gathers).lower(pair.sharded).compile())
  assert any(c.op == "all-gather" and any(shape[-4:] == pool[-4:] for _, shape in c.shapes)
             for c in leaked), leaked


# ----------------------------------------------------------------------------- state machine

from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

ROWS, SLOTS = 3, 12


class ShardedCacheMachine(RuleBasedStateMachine):
  """Random extend / write / fork / release / swap on a (2, 2) mesh with prefix caching,
  each step mirrored on one single cache per shard; after every step each shard equals its
  single cache bit for bit (tests/test_stateful.py checks the single cache against a NumPy
  model)."""

  def __init__(self):
    super().__init__()
    self.pair = Pair(2, 2, 2)
    self.rng = np.random.default_rng(0)
    self.swapped = {}

  @rule(ids=st.lists(st.integers(-1, 2 * SEQS - 1), min_size=ROWS, max_size=ROWS),
        counts=st.lists(st.integers(0, 4), min_size=ROWS, max_size=ROWS),
        token=st.integers(0, 3))
  def extend_and_write(self, ids, counts, token):
    pair = self.pair
    tokens = jnp.full((SLOTS,), token, jnp.int32)
    pair.sharded, slots, ok = jp.extend(pair.sharded, ids, counts, num_slots=SLOTS,
                                        tokens=tokens)
    results = [jp.extend(pair.single[s], local, counts, num_slots=SLOTS, tokens=tokens)
               for s, local in enumerate(pair.local(ids))]
    assert bool(ok) == all(bool(r[2]) for r in results)
    if bool(ok):  # a refusal on one shard changes no shard
      pair.single = [r[0] for r in results]
      k = jnp.asarray(self.rng.normal(size=(SLOTS, 2, 8)), jnp.float32)
      pair.sharded = jp.write_kv(pair.sharded, 0, k, -k, slots)
      for s in range(2):
        mine = (np.asarray(slots) >= 0) & (np.asarray(slots) // (PAGES * PS) == s)
        pair.single[s] = jp.write_kv(pair.single[s], 0, k, -k,
                                     jnp.asarray(np.where(mine, np.asarray(slots) % (PAGES * PS),
                                                          -1)))

  @rule(src=st.integers(0, 2 * SEQS - 1), dst=st.integers(0, SEQS - 1))
  def fork(self, src, dst):
    dst = (src // SEQS) * SEQS + dst  # a destination on the source's shard
    pair, s = self.pair, src // SEQS
    pair.sharded, ok = jp.fork(pair.sharded, [src], [dst])
    pair.single[s], local_ok = jp.fork(pair.single[s], [src % SEQS], [dst % SEQS])
    assert bool(ok) == bool(local_ok)

  @rule(ids=st.lists(st.integers(-1, 2 * SEQS - 1), min_size=1, max_size=ROWS))
  def release(self, ids):
    pair = self.pair
    pair.sharded = jp.release(pair.sharded, ids)
    pair.single = [jp.release(c, local) for c, local in zip(pair.single, pair.local(ids))]

  @rule(g=st.integers(0, 2 * SEQS - 1))
  def swap_out_and_in(self, g):
    pair, s = self.pair, g // SEQS
    if int(np.asarray(jp.shard_view(pair.sharded, s).seq_lens)[g % SEQS]) == 0:
      return
    pair.sharded, (swapped,) = jp.swap_out(pair.sharded, [g])
    pair.single[s], (local_swapped,) = jp.swap_out(pair.single[s], [g % SEQS])
    pair.sharded, ok = jp.swap_in(pair.sharded, swapped)
    pair.single[s], local_ok = jp.swap_in(pair.single[s], local_swapped)
    assert bool(ok) == bool(local_ok)

  @invariant()
  def every_shard_equals_its_single_cache(self):
    self.pair.check()


TestShardedCacheMachine = ShardedCacheMachine.TestCase
TestShardedCacheMachine.settings = settings(max_examples=10, stateful_step_count=16,
                                            deadline=None, derandomize=True, database=None)


def test_pallas_kernels_run_on_each_shard():
  """The Pallas kernels (interpreted on CPU) inside shard_map give what the XLA path gives."""
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, page_size=16, num_pages=8,
                      max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
  cache = jp.init_sharded_cache(spec, jp.make_mesh(2, 2))
  rng = np.random.default_rng(3)
  prompts = jnp.asarray(rng.integers(0, 9, (3, 40)), jnp.int32)
  ids, lengths = jnp.array([0, 3, 2]), jnp.array([40, 21, 17])
  k = jnp.asarray(rng.normal(size=(3 * 40, 2, 16)), jnp.float32)  # match_prefix's 3 x 40 slots
  q = jnp.asarray(rng.normal(size=(3, 4, 16)), jnp.float32)
  outs = {}
  for impl in ("xla", "pallas"):
    c, found = jp.match_prefix(cache, ids, prompts, lengths, impl=impl, interpret=True)
    c = jp.write_kv(c, 0, k, -k, found.slots, impl=impl, interpret=True)
    outs[impl] = (jax.tree.map(np.asarray, c.shards), found,
                  jp.paged_attention(q, c, 0, ids, impl=impl, interpret=True))
  (xla_state, xla_found, xla_out), (pl_state, pl_found, pl_out) = outs["xla"], outs["pallas"]
  jax.tree.map(np.testing.assert_array_equal, xla_state, pl_state)
  jax.tree.map(np.testing.assert_array_equal, tuple(xla_found), tuple(pl_found))
  np.testing.assert_allclose(np.asarray(pl_out), np.asarray(xla_out), rtol=1e-5, atol=1e-5)


def test_demoted_blocks_come_back_on_their_shard():
  pair = Pair(2, 2, 2)
  prompt = jnp.arange(1, 10, dtype=jnp.int32)[None]
  rng = np.random.default_rng(5)
  kv = [jnp.asarray(rng.normal(size=(9, 2, 8)), jnp.float32) for _ in range(2)]

  def fill(cache, seq):
    cache, found = jp.match_prefix(cache, [seq], prompt, [9])
    for layer in range(2):
      cache = jp.write_kv(cache, layer, kv[layer], -kv[layer], found.slots)
    return jp.release(cache, [seq])

  pair.sharded = fill(pair.sharded, SEQS)  # global id SEQS: shard 1's sequence 0
  pair.single[1] = fill(pair.single[1], 0)
  pair.sharded, blocks = jp.demote_blocks(pair.sharded, 2)
  pair.single[1], want = jp.demote_blocks(pair.single[1], 2)
  assert [b.tokens.tolist() for b in blocks] == [b.tokens.tolist() for b in want] != []
  pair.check()
  start = dict(max_prompt_tokens=[0])
  pair.sharded, _ = jp.match_prefix(pair.sharded, [SEQS + 1], prompt[:, :5], [5], **start)
  pair.single[1], _ = jp.match_prefix(pair.single[1], [1], prompt[:, :5], [5], **start)
  pair.sharded, ok = jp.promote_blocks(pair.sharded, SEQS + 1, blocks[1:])
  pair.single[1], local_ok = jp.promote_blocks(pair.single[1], 1, want[1:])
  assert bool(ok) and bool(local_ok)
  pair.check()
  np.testing.assert_array_equal(np.asarray(jp.gather_kv(pair.sharded, 1, SEQS + 1)[0][:4]),
                                np.asarray(kv[1][:4]))


def test_traced_bad_ids_are_refused_like_one_cache():
  """Inside jit the ids are not known: a bad row refuses the call on every shard."""
  cache = jp.init_sharded_cache(_spec(2, prefix=False), jp.make_mesh(2, 2))
  cache, _, _ = jp.extend(cache, [0, SEQS], [2, 2], num_slots=4)
  fork = jax.jit(jp.fork)
  for src, dst in (([-1], [1]), ([0], [SEQS + 1]), ([2 * SEQS], [1]), ([0], [-2])):
    again, ok = fork(cache, jnp.array(src), jnp.array(dst))
    assert not bool(ok), (src, dst)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again.shards),
                 jax.tree.map(np.asarray, cache.shards))
  again, ok = fork(cache, jnp.array([SEQS, 0]), jnp.array([SEQS + 1, -1]))
  assert bool(ok) and int(jp.shard_view(again, 1).seq_lens[1]) == 2
  extend = jax.jit(jp.extend, static_argnames="num_slots")
  for ids in ([2 * SEQS], [-2]):
    again, slots, ok = extend(cache, jnp.array(ids), jnp.array([1]), num_slots=1)
    assert not bool(ok) and int(slots[0]) == -1
