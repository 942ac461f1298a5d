"""Adversarial tests of `ShardedCache` (jaxpaged/_src/sharding.py) against its oracle: one ordinary
single-device cache per data shard, driven with the same sequences (local ids)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp

M, PS, PAGES, L = 3, 4, 6, 1


def _spec(heads=2, prefix=True, block_hash="mix64", pages=PAGES):
  return jp.CacheSpec(num_layers=L, num_kv_heads=heads, head_dim=8, page_size=PS,
                      num_pages=pages, max_seqs=M, max_pages_per_seq=4, prefix_caching=prefix,
                      block_hash=block_hash)


def _leaves(x):
  return [np.asarray(a) for a in jax.tree.leaves(x)]


def _same(a, b, tag=""):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=f"{tag} {jax.tree_util.keystr(path)}")


class Pair:
  def __init__(self, data=2, model=4, **kw):
    self.spec = _spec(**kw)
    self.sc = jp.init_sharded_cache(self.spec, jp.make_mesh(data, model))
    self.one = [jp.init_cache(self.spec) for _ in range(data)]
    self.n = data

  def loc(self, ids, s):
    ids = np.asarray(ids)
    return jnp.asarray(np.where((ids >= 0) & (ids // M == s), ids % M, -1), jnp.int32)

  def loc_slots(self, slots, s):
    slots = np.asarray(slots)
    per = PAGES * PS
    return jnp.asarray(np.where((slots >= 0) & (slots // per == s), slots % per, -1), jnp.int32)

  def check(self, tag=""):
    for s in range(self.n):
      _same(jp.shard_view(self.sc, s), self.one[s], f"{tag} shard {s}")
    kp = np.asarray(self.sc.shards.k_pages)
    r = self.sc.replicas
    for i in range(1, r):  # every replica of a head holds the same K/V
      np.testing.assert_array_equal(kp[:, :, i::r], kp[:, :, ::r])

  def extend(self, ids, counts, num_slots, tokens=None):
    self.sc, slots, ok = jp.extend(self.sc, ids, counts, num_slots=num_slots, tokens=tokens)
    for s in range(self.n):
      self.one[s], ls, lok = jp.extend(self.one[s], self.loc(ids, s), counts, num_slots=num_slots,
                                       tokens=tokens)
    return slots, ok

  def write(self, kv, slots):
    self.sc = jp.write_kv(self.sc, 0, kv, kv * 2, slots)
    for s in range(self.n):
      self.one[s] = jp.write_kv(self.one[s], 0, kv, kv * 2, self.loc_slots(slots, s))


def _filled_pair(**kw):
  """Shard 1's pool full (seqs 3, 4: 12 tokens each), shard 0 holds seq 0 (5 tokens)."""
  p = Pair(**kw)
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(0, 50, 32), jnp.int32)
  slots, ok = p.extend([0, 3, 4], [5, 12, 12], 32, tokens=toks)
  assert bool(ok)
  p.write(jnp.asarray(rng.normal(size=(32, p.spec.num_kv_heads, 8)), jnp.float32), slots)
  p.check("filled")
  assert jp.num_free_pages(p.sc).tolist() == [4, 0]
  return p


# ------------------------------------------------------------------------------- bugs these found (fixed)

def test_write_kv_slot_past_every_shard_is_refused_not_dropped():
  """A global slot >= num_shards * shard_slots is owned by no shard: refused, as the single cache
  refuses a slot past its pool ("their K/V would be lost"), not silently dropped."""
  p = Pair()
  k = jnp.ones((1, 2, 8), jnp.float32)
  with pytest.raises(jp.JaxPagedError):
    jp.write_kv(p.one[0], 0, k, k, [PAGES * PS + 1])  # the oracle refuses
  with pytest.raises(jp.JaxPagedError, match="slots"):
    jp.write_kv(p.sc, 0, k, k, [2 * PAGES * PS + 1])  # sharded: silently dropped


def test_jitted_fork_across_shards_into_shard_0_is_refused():
  """Under jit (ids traced, no host check), fork(src=3 on shard 1, dst=1 on shard 0) must be
  refused (ok False, nothing changed), as the eager call raises. Instead shard 0 forks its own
  local sequence 3 % max_seqs = 0 into 1: ok True and seq 1 now shares seq 0's K/V (5 tokens),
  not seq 3's (12): another sequence's K/V served (the bug this caught: a split row's source
  was made out of range only on shards not holding the destination)."""
  p = _filled_pair()
  fork = jax.jit(lambda c, s, d: jp.fork(c, s, d))
  sc, ok = fork(p.sc, jnp.array([3]), jnp.array([1]))
  assert not bool(ok)
  _same(sc, p.sc, "refused fork")

def test_check_fork_refuses_a_cross_shard_fork_as_fork_does():
  """check_fork refuses a source on shard 0 with its destination on shard 1, as fork does (it
  once checked shard 1's own local sequence 0 instead)."""
  p = _filled_pair()
  with pytest.raises(jp.JaxPagedError):
    jp.fork(p.sc, [0], [5])
  with pytest.raises(jp.JaxPagedError):
    jp.check_fork(p.sc, [0], [5])


def test_gather_kv_under_jit_with_traced_id():
  """gather_kv works under jax.jit with a traced seq_id, on a ShardedCache as on a single
  cache."""
  p = _filled_pair()
  g = jax.jit(lambda c, i: jp.gather_kv(c, 0, i))
  want = g(p.one[1], jnp.int32(1))
  got = g(p.sc, jnp.int32(4))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------- held up (pass)

def test_refusal_on_one_shard_changes_no_shard_eager_and_jit():
  """Shard 1's pool is full: extend / match_prefix rows for shard 0 and 1 are refused together;
  a fork into an occupied destination on shard 1 refuses shard 0's good row too."""
  p = _filled_pair()
  before = _leaves(p.sc)
  sc, slots, ok = jp.extend(p.sc, [0, 5], [4, 4], num_slots=8)
  assert not bool(ok) and (np.asarray(slots) == -1).all()
  _same(sc, p.sc, "extend")
  ext = jax.jit(lambda c, i, n: jp.extend(c, i, n, num_slots=8))
  sc, slots, ok = ext(p.sc, jnp.array([0, 5]), jnp.array([4, 4]))
  assert not bool(ok)
  _same(sc, p.sc, "jit extend")
  toks = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  sc, found = jp.match_prefix(p.sc, [1, 5], toks, [8, 8], salts=[2**64 - 1, 7])
  assert not bool(found.ok)
  _same(sc, p.sc, "match_prefix")
  sc, ok = jp.fork(p.sc, [0, 3], [1, 4])  # row 1: destination 4 is occupied
  assert not bool(ok)
  _same(sc, p.sc, "fork")
  # and a bad id on one row (another shard's duplicate, out of range) under jit is refused whole
  for ids in ([0, 0], [6, 1], [-2, 1], [1, 1 + M * 5]):
    sc, slots, ok = ext(p.sc, jnp.array(ids), jnp.array([1, 1]))
    assert not bool(ok), ids
    _same(sc, p.sc, f"jit extend {ids}")
  for a, b in zip(before, _leaves(p.sc)):  # inputs untouched (purity)
    np.testing.assert_array_equal(a, b)


def test_demote_keep_with_pages_outside_every_shard_is_refused():
  """keep holds global page ids [0, num_shards * num_pages); -1 or 15 belong to no shard and are
  refused, as the single cache refuses "keep holds pages [...] outside [0, 6)"."""
  p = _filled_pair()
  sc = jp.release(p.sc, [3])
  with pytest.raises(jp.JaxPagedError):
    jp.demote_blocks(jp.shard_view(sc, 1), 1, keep=[-1])  # the oracle refuses
  for bad in (-1, 2 * PAGES + 3):
    with pytest.raises(jp.JaxPagedError, match="keep"):
      jp.demote_blocks(sc, 1, keep=[bad])


def test_errors_name_the_global_id_the_caller_passed():
  """swap_in into an occupied global id 4 names seq_id 4, the id the caller passed (not shard 1's
  local id 1)."""
  p = _filled_pair()
  sc, (swapped,) = jp.swap_out(p.sc, [3])
  with pytest.raises(jp.JaxPagedError, match=r"seq_id 4\b"):
    jp.swap_in(sc, swapped, seq_id=4)


def test_salts_isolate_prefixes_on_every_shard_under_forced_collisions(block_hash="constant"):
  """Same tokens on both shards; salts differing only in their high 32 bits never hit each
  other, other tokens never hit; the same salt hits. Every step equals the oracle bit for bit,
  the replicated heads (2 KV heads on model=4) stay identical."""
  p = Pair(block_hash=block_hash)
  rng = np.random.default_rng(1)
  toks = jnp.asarray(rng.integers(0, 50, (2, 8)), jnp.int32)
  a, b = 2**63 + 5, 2**63 + 5 + 2**32

  def match(ids, tokens, salt):
    p.sc, found = jp.match_prefix(p.sc, ids, tokens, [8, 8], salts=[salt] * 2)
    want = np.full(16, -1)
    for s in range(p.n):
      p.one[s], f = jp.match_prefix(p.one[s], p.loc(ids, s), tokens, [8, 8], salts=[salt] * 2)
      ls = np.asarray(f.slots)
      # the oracle lays out its own rows' slots only: place them at the sharded rows' offsets
      starts = np.cumsum(np.asarray(found.num_new)) - np.asarray(found.num_new)
      row = int(np.flatnonzero(np.asarray(p.loc(ids, s)) >= 0)[0])
      n = int(f.num_new[row])
      want[starts[row]:starts[row] + n] = s * PAGES * PS + ls[:n]
      assert int(f.num_cached[row]) == int(found.num_cached[row])
    np.testing.assert_array_equal(np.asarray(found.slots), want)
    p.check(f"match {ids}")
    return found

  found = match([0, 3], toks, a)
  assert bool(found.ok) and found.num_cached.tolist() == [0, 0]
  p.write(jnp.asarray(rng.normal(size=(16, 2, 8)), jnp.float32), found.slots)
  p.check("write")
  p.sc = jp.release(p.sc, [0, 3])
  p.one = [jp.release(p.one[s], p.loc([0, 3], s)) for s in range(p.n)]
  assert match([1, 4], toks, b).num_cached.tolist() == [0, 0]
  assert match([2, 5], toks.at[:, 1].add(1), a).num_cached.tolist() == [0, 0]
  p.sc = jp.release(p.sc, [1, 4, 2, 5])
  p.one = [jp.release(p.one[s], p.loc([1, 4, 2, 5], s)) for s in range(p.n)]
  hit = match([0, 3], toks, a)
  assert min(hit.num_cached.tolist()) >= PS  # the same salt and tokens do hit
  # the hit serves the very K/V written for this prefix, on each shard
  for gid in (0, 3):
    k, v = jp.gather_kv(p.sc, 0, gid)[:2]
    k1, v1 = jp.gather_kv(p.one[gid // M], 0, gid % M)[:2]
    np.testing.assert_array_equal(np.asarray(k), np.asarray(k1))


def test_swap_and_blocks_move_across_shards_like_the_oracle():
  """swap_out on shard 0, swap_in into shard 1's id (room) and into a full shard (refused, no
  change); demoted blocks promote only into a sequence with the same prefix and salt."""
  p = _filled_pair()
  sc, (sw,) = jp.swap_out(p.sc, [0])
  sc0, before = sc, _leaves(sc)
  full, ok = jp.swap_in(sc, sw, seq_id=5)  # shard 1 is full
  assert not bool(ok)
  _same(full, sc, "refused swap_in")
  sc = jp.release(sc, [3])
  one1 = jp.release(p.one[1], [0])
  sc2, ok = jp.swap_in(sc, sw, seq_id=5)
  assert bool(ok)
  one1, ok1 = jp.swap_in(one1, sw, seq_id=2)
  assert bool(ok1)
  _same(jp.shard_view(sc2, 1), one1, "swap_in on shard 1")
  _same(jp.shard_view(sc2, 0), jp.shard_view(sc, 0), "shard 0 untouched")
  kp = np.asarray(sc2.shards.k_pages)
  np.testing.assert_array_equal(kp[:, :, 1::2], kp[:, :, ::2])
  for a, b in zip(before, _leaves(sc0)):  # the inputs of swap_in / release are untouched
    np.testing.assert_array_equal(a, b)
  # blocks: demote shard 1's cached blocks, promote them into a salted sequence -> refused
  d, blocks = jp.demote_blocks(jp.release(sc2, [5]), 8)
  assert blocks
  toks = jnp.asarray(blocks[0].tokens[None], jnp.int32)
  d2, f = jp.match_prefix(d, [4], jnp.pad(toks, ((0, 0), (0, 4))), [PS], salts=[2**64 - 1])
  with pytest.raises(jp.JaxPagedError):
    jp.promote_blocks(d2, 4, blocks[1:2])  # does not continue seq 4 (wrong prefix / salt)


def test_pallas_interpret_with_replicated_heads_equals_the_oracle():
  """1 KV head on model=4 (stored 4 times): Pallas write_kv and both attentions, interpreted,
  inside shard_map give the oracle's K/V bit for bit and its attention outputs."""
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=16, num_pages=4,
                      max_seqs=2, max_pages_per_seq=2)
  sc = jp.init_sharded_cache(spec, jp.make_mesh(2, 4))
  one = [jp.init_cache(spec) for _ in range(2)]
  rng = np.random.default_rng(7)
  ids, counts = np.array([3, 0, -1]), np.array([20, 9, 0])
  sc, slots, ok = jp.extend(sc, ids, counts, num_slots=32)
  assert bool(ok)
  k = jnp.asarray(rng.normal(size=(32, 1, 16)), jnp.float32)
  sc = jp.write_kv(sc, 0, k, -k, slots, impl="pallas", interpret=True)
  per = 4 * 16
  for s in range(2):
    local = jnp.asarray(np.where((ids >= 0) & (ids // 2 == s), ids % 2, -1), jnp.int32)
    one[s], _, _ = jp.extend(one[s], local, counts, num_slots=32)
    sl = np.asarray(slots)
    one[s] = jp.write_kv(one[s], 0, k, -k, jnp.asarray(np.where((sl >= 0) & (sl // per == s),
                                                                   sl % per, -1), jnp.int32),
                         impl="pallas", interpret=True)
    _same(jp.shard_view(sc, s), one[s], f"shard {s}")
  kp = np.asarray(sc.shards.k_pages)
  assert kp.shape[2] == 4 and all(np.array_equal(kp[:, :, i], kp[:, :, 0]) for i in range(4))
  q = jnp.asarray(rng.normal(size=(3, 4, 16)), jnp.float32)
  got = jp.paged_attention(q, sc, 0, ids, impl="pallas", interpret=True)
  want = np.zeros((3, 4, 16), np.float32)
  for s in range(2):
    local = jnp.asarray(np.where((ids >= 0) & (ids // 2 == s), ids % 2, -1), jnp.int32)
    out = np.asarray(jp.paged_attention(q, one[s], 0, local, impl="pallas", interpret=True))
    want += np.where((np.asarray(local) >= 0)[:, None, None], out, 0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert np.abs(want[:2]).max() > 0
