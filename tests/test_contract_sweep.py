"""A sweep of the contract ("The contract holds") from an attacker's and a careless user's side.

Part 1 holds tests of defects found by the sweep: each fails today and passes once the defect is
fixed. Part 2 ("holds today") pins promises that hold but are easy to regress. Every oracle is
independent of the code under test: NumPy, the cache's own earlier snapshot, or plain Python.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged.models import LlamaConfig, forward
from jaxpaged.models import generation, serving
from jaxpaged.models.generation import param_shapes


def _spec(**kw):
  return jp.CacheSpec(**{**dict(num_layers=2, num_kv_heads=1, head_dim=2, page_size=2,
                                num_pages=8, max_seqs=4, max_pages_per_seq=4,
                                prefix_caching=True), **kw})


def _snap(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_same(before, after):
  a, b = jax.tree.leaves(before), jax.tree.leaves(after)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def _two_sequences():
  """Sequences 0 (3 tokens, K/V = 1) and 1 (2 tokens, K/V = 100), all layers written."""
  spec = _spec(prefix_caching=False)
  cache = jp.init_cache(spec)
  cache, slots, ok = jp.extend(cache, jnp.array([0, 1]), jnp.array([3, 2]), num_slots=5)
  assert bool(ok)
  kv = jnp.asarray(np.array([1, 1, 1, 100, 100], np.float32)[:, None, None]
                   * np.ones((5, 1, 2), np.float32))
  for layer in range(spec.num_layers):
    cache = jp.write_kv(cache, layer, kv, kv, slots)
  return cache


def _kv_values(tokens):
  return np.asarray(tokens, np.float32) * 0.5 + 1


def _prefill(manager, tokens, **kw):
  """Admits a prompt and writes K/V that depend on its tokens (every layer)."""
  admission = manager.admit(tokens, **kw)
  assert admission is not None
  values = np.zeros(admission.slots.shape[0], np.float32)
  values[:admission.num_new] = _kv_values(tokens)[admission.num_cached:
                                                  admission.num_cached + admission.num_new]
  kv = jnp.broadcast_to(jnp.asarray(values)[:, None, None], (values.shape[0], 1, 2))
  for layer in range(manager.spec.num_layers):
    manager.cache = jp.write_kv(manager.cache, layer, kv + layer, -kv, admission.slots)
  return admission


def _manager_state(manager):
  return dict(cache=_snap(manager.cache), active=dict(manager.registry.active),
              swapped=sorted(manager.swapped), counters=dict(manager.counters),
              store=sorted(map(repr, manager.store.keys())), host=manager.store.stats())


def _assert_manager_unchanged(before, manager):
  after = _manager_state(manager)
  _assert_same(before.pop("cache"), after.pop("cache"))
  assert before == after


# =============================================================================== part 1: defects

# ----------------------------------------------------------------------------- attention ids

@pytest.mark.parametrize("seq_ids", [np.array([2**32], np.int64),          # wraps to sequence 0
                                     np.array([2**32 + 1], np.uint64),     # wraps to sequence 1
                                     np.array([2**63 + 1], np.uint64)])
def test_paged_attention_never_truncates_a_64_bit_seq_id_into_another_sequence(seq_ids):
  cache = _two_sequences()
  q = jnp.ones((1, 1, 2))
  try:
    out = jp.paged_attention(q, cache, 0, seq_ids)
  except jp.JaxPagedError as e:
    assert "seq_ids" in str(e)
    return
  # Used as it is, the id is out of range: padding, zeros. Never sequence 0's or 1's output.
  np.testing.assert_array_equal(np.asarray(out), np.zeros((1, 1, 2), np.float32))


def test_paged_attention_with_a_huge_python_int_seq_id_raises_jaxpaged_error():
  cache = _two_sequences()
  with pytest.raises(jp.JaxPagedError, match="seq_ids"):
    jp.paged_attention(jnp.ones((1, 1, 2)), cache, 0, [2**32])


def test_ragged_paged_attention_never_truncates_64_bit_q_lens():
  cache = _two_sequences()
  q = jnp.ones((2, 1, 2))
  reference = jp.ragged_paged_attention(q, cache, 0, jnp.array([0]), jnp.array([2]))
  try:
    out = jp.ragged_paged_attention(q, cache, 0, jnp.array([0]),
                                    np.array([2**32 + 2], np.int64))
  except jp.JaxPagedError as e:
    assert "q_lens" in str(e)
    return
  # 2**32 + 2 new tokens is not 2 new tokens: it must not silently give the answer for 2.
  assert not np.array_equal(np.asarray(out), np.asarray(reference))


def test_ops_paged_attention_never_truncates_64_bit_lengths_or_page_ids():
  cache = _two_sequences()
  q = jnp.ones((1, 1, 2))
  k, v = cache.k_pages[0], cache.v_pages[0]
  for tables, lengths in [(np.array([[0, 1]]), np.array([2**32 + 3], np.int64)),
                          (np.array([[2**32, 1]], np.int64), np.array([3]))]:
    with pytest.raises(jp.JaxPagedError):
      jp.ops.paged_attention(q, k, v, tables, lengths)


def test_ops_paged_attention_refuses_lengths_past_its_block_table():
  """A length past ``pages_per_seq * page_size`` would read pages the table does not name."""
  cache = _two_sequences()
  with pytest.raises(jp.JaxPagedError, match="lengths"):
    jp.ops.paged_attention(jnp.ones((1, 1, 2)), cache.k_pages[0], cache.v_pages[0],
                           np.array([[0, 1]], np.int32), np.array([100], np.int32))


@pytest.mark.parametrize("case", ["list block_tables", "list k_pages"])
def test_ops_paged_attention_plain_lists_give_jaxpaged_errors(case):
  cache = _two_sequences()
  k, v = cache.k_pages[0], cache.v_pages[0]
  q = jnp.ones((1, 1, 2))
  if case == "list block_tables":  # used exactly, as the arrays would be
    np.testing.assert_array_equal(
        jp.ops.paged_attention(q, k, v, [[0, 1]], [3]),
        jp.ops.paged_attention(q, k, v, np.array([[0, 1]]), np.array([3])))
    return
  with pytest.raises(jp.JaxPagedError, match="k_pages must be a 4-D float array"):
    jp.ops.paged_attention(q, np.asarray(k).tolist(), v, np.array([[0, 1]]), np.array([3]))


# ----------------------------------------------------------------------------- manager

def test_manager_swap_in_with_a_repeated_id_changes_nothing_when_it_raises():
  manager = jp.CacheManager(_spec(max_pages_per_seq=8), host_bytes=1 << 20)
  a = _prefill(manager, [1, 2, 3, 4, 5])
  b = _prefill(manager, [7, 8, 9])
  manager.swap_out([a.seq_id, b.seq_id])
  before = _manager_state(manager)
  try:
    result = manager.swap_in([a.seq_id, a.seq_id])
  except jp.JaxPagedError:
    _assert_manager_unchanged(before, manager)  # refused: a is still on host
    assert manager.swapped == [a.seq_id, b.seq_id]
    return
  assert result[0] and manager.swapped == [b.seq_id]  # or: taken once, as release does


class _RaisesOnSecondEviction:
  """LRU, except that once armed, its second eviction_candidate call raises."""

  def __init__(self):
    self.inner, self.armed, self.calls = jp.LRUPolicy(), False, 0

  def should_promote(self, key, stats):
    return self.inner.should_promote(key, stats)

  def eviction_candidate(self, tier, stats):
    if self.armed:
      self.calls += 1
      if self.calls == 2:
        raise RuntimeError("policy fault")
    return self.inner.eviction_candidate(tier, stats)


def test_manager_swap_in_of_two_ids_rolls_back_the_first_when_the_policy_raises_on_the_second():
  policy = _RaisesOnSecondEviction()
  manager = jp.CacheManager(_spec(max_pages_per_seq=8), host_bytes=500, policy=policy)
  a = _prefill(manager, [1, 2, 3, 4])
  b = _prefill(manager, [5, 6, 7, 8, 9])
  manager.swap_out([a.seq_id, b.seq_id])
  for length, base in [(4, 20), (2, 40), (6, 60)]:  # cached blocks fill the device pool
    manager.release([_prefill(manager, [base + j for j in range(length)]).seq_id])
  assert manager.stats()["free_pages"] == 0
  before = _manager_state(manager)
  policy.armed = True
  with pytest.raises(RuntimeError, match="policy fault"):
    manager.swap_in([a.seq_id, b.seq_id])
  assert policy.calls == 2  # the fault came while bringing in the second sequence
  _assert_manager_unchanged(before, manager)


def _donated_manager():
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  admission = _prefill(manager, [1, 2, 3, 4, 5])
  step = jax.jit(lambda cache, s: jp.extend(cache, s, jnp.array([1]))[0],
                 donate_argnames="cache")
  new_cache = step(manager.cache, jnp.array([admission.seq_id]))  # not handed back
  return manager, admission, new_cache


@pytest.mark.parametrize("operation", ["extend", "reserve", "admit", "release", "gc", "stats",
                                       "can_allocate"])
def test_manager_holding_a_cache_its_caller_donated_says_so(operation):
  manager, admission, new_cache = _donated_manager()
  calls = {
      "extend": lambda: manager.extend([admission.seq_id], [1]),
      "reserve": lambda: manager.reserve([admission.seq_id], [1]),
      "admit": lambda: manager.admit([1, 2, 3]),
      "release": lambda: manager.release([admission.seq_id]),
      "gc": manager.gc,
      "stats": manager.stats,
      "can_allocate": lambda: manager.can_allocate(3),
  }
  with pytest.raises(jp.JaxPagedError, match="donated"):
    calls[operation]()
  manager.cache = new_cache  # handed back: the manager works again, nothing lost
  assert manager.active == [admission.seq_id]
  assert int(manager.cache.seq_lens[admission.seq_id]) == 6


def test_manager_refuses_a_cache_of_another_spec():
  manager = jp.CacheManager(_spec(), host_bytes=1 << 20)
  with pytest.raises(jp.JaxPagedError):
    manager.cache = jp.init_cache(_spec(num_pages=16))
    manager.admit([1, 2, 3])


# ----------------------------------------------------------------------------- counters

@pytest.mark.parametrize("bad", [None, {"k_pages": 1}])
def test_num_used_pages_of_a_non_cache_raises_jaxpaged_error(bad):
  with pytest.raises(jp.JaxPagedError):
    jp.num_used_pages(bad)


def test_num_used_pages_of_a_donated_cache_says_so():
  cache, _, _ = jp.extend(jp.init_cache(_spec()), jnp.array([0]), jnp.array([3]), num_slots=3)
  jax.jit(lambda cache: jp.release(cache, jnp.array([0])), donate_argnames="cache")(cache)
  with pytest.raises(jp.JaxPagedError, match="donated"):
    int(jp.num_used_pages(cache))


# ----------------------------------------------------------------------------- prefix salts

def test_reset_prefix_cache_does_not_move_a_started_request_to_salt_zero():
  """A request of tenant 7 started in chunks (nothing appended yet) survives a reset; its blocks
  must stay under salt 7, never be served to a salt-0 request."""
  spec = _spec(num_layers=1, max_seqs=3)
  prompt = jnp.array([[1, 2, 3, 4, 5]])
  cache = jp.init_cache(spec)
  cache, started = jp.match_prefix(cache, jnp.array([0]), prompt, jnp.array([5]), salts=7,
                                   max_prompt_tokens=jnp.array([0]), num_slots=5)
  assert bool(started.ok) and int(started.num_new[0]) == 0
  cache, ok = jp.reset_prefix_cache(cache)
  if not bool(ok):
    return  # refused while a request is under way: fine too
  cache, slots, ok = jp.extend(cache, jnp.array([0]), jnp.array([5]), num_slots=5,
                               tokens=prompt[0])  # chunked prefill continues
  assert bool(ok)
  cache = jp.write_kv(cache, 0, jnp.ones((5, 1, 2)), jnp.ones((5, 1, 2)), slots)
  cache, other = jp.match_prefix(cache, jnp.array([1]), prompt, jnp.array([5]), salts=0,
                                 num_slots=5)
  assert int(other.num_cached[0]) == 0, "a salt-0 request was served tenant 7's K/V"
  cache, same = jp.match_prefix(cache, jnp.array([2]), prompt, jnp.array([5]), salts=7,
                                num_slots=5)
  assert int(same.num_cached[0]) == 4


def test_the_old_name_of_max_prompt_tokens_still_works_with_a_deprecation_warning():
  cache = jp.init_cache(_spec())
  args = (cache, jnp.array([0]), jnp.array([[1, 2, 3]]), jnp.array([3]))
  _, new = jp.match_prefix(*args, max_prompt_tokens=jnp.array([1]))
  with pytest.warns(DeprecationWarning, match="max_new_tokens is renamed max_prompt_tokens"):
    _, old = jp.match_prefix(*args, max_new_tokens=jnp.array([1]))
  assert int(old.num_new[0]) == int(new.num_new[0]) == 1
  with pytest.raises(jp.JaxPagedError, match="pass max_prompt_tokens only"):
    jp.match_prefix(*args, max_prompt_tokens=jnp.array([1]), max_new_tokens=jnp.array([1]))
  manager = jp.CacheManager(_spec())
  with pytest.warns(DeprecationWarning, match="max_new_tokens is renamed"):
    assert manager.admit([1, 2, 3], max_new_tokens=1).num_new == 1


def test_match_prefix_refuses_negative_max_prompt_tokens():
  cache = jp.init_cache(_spec())
  with pytest.raises(jp.JaxPagedError, match="max_prompt_tokens"):
    jp.check_match_prefix(cache, jnp.array([0]), jnp.array([[1, 2, 3]]), jnp.array([3]),
                          max_prompt_tokens=jnp.array([-1]))
  before = _snap(cache)
  try:
    new, match = jp.match_prefix(cache, jnp.array([0]), jnp.array([[1, 2, 3]]), jnp.array([3]),
                                 max_prompt_tokens=jnp.array([-1]))
  except jp.JaxPagedError as e:
    assert "max_prompt_tokens" in str(e)
    return
  assert not bool(match.ok)  # refused in jit: nothing changed
  _assert_same(before, _snap(new))


def test_promote_blocks_never_truncates_a_blocks_token_ids():
  spec = _spec(num_layers=1, max_seqs=3)
  cache = jp.init_cache(spec)
  cache, m = jp.match_prefix(cache, jnp.array([0]), jnp.array([[1, 2, 3, 4, 5]]),
                             jnp.array([5]), num_slots=5)
  cache = jp.write_kv(cache, 0, jnp.ones((5, 1, 2)), jnp.ones((5, 1, 2)), m.slots)
  cache, blocks = jp.demote_blocks(jp.release(cache, jnp.array([0])), 8)
  second = next(b for b in blocks if b.depth == 1)
  cache, m = jp.match_prefix(cache, jnp.array([1]), jnp.array([[1, 2, 9]]), jnp.array([3]),
                             max_prompt_tokens=jnp.array([2]), num_slots=3)
  cache = jp.write_kv(cache, 0, jnp.ones((3, 1, 2)), jnp.ones((3, 1, 2)), m.slots)
  forged = dataclasses.replace(second, tokens=np.array([1, 2, 3, 2**32 + 4], np.int64))
  before = _snap(cache)
  try:
    new, ok = jp.promote_blocks(cache, 1, [forged])
  except jp.JaxPagedError:
    _assert_same(before, _snap(cache))
    return
  held = np.asarray(new.prefix.page_tokens)[np.asarray(new.page_table)[1, :2]].reshape(-1)
  assert not (bool(ok) and held.tolist() == [1, 2, 3, 4]), "token 2**32 + 4 stored as 4"


# ----------------------------------------------------------------------------- static sizes

@pytest.mark.parametrize("call", ["extend", "check_extend", "match_prefix", "manager.extend"])
def test_a_huge_num_slots_is_refused_before_anything_is_allocated(call):
  spec = _spec()
  cache = jp.init_cache(spec)
  huge = 2**34  # int32[2**34] slots would be 64 GiB
  with pytest.raises(jp.JaxPagedError, match="num_slots"):
    if call == "extend":
      jp.extend(cache, jnp.array([0]), jnp.array([1]), num_slots=huge)
    elif call == "check_extend":
      jp.check_extend(cache, jnp.array([0]), jnp.array([1]), num_slots=huge)
    elif call == "match_prefix":
      jp.match_prefix(cache, jnp.array([0]), jnp.array([[1, 2, 3]]), jnp.array([3]),
                      num_slots=huge)
    else:
      manager = jp.CacheManager(spec, host_bytes=1 << 20)
      admission = manager.admit([1, 2, 3])
      manager.extend([admission.seq_id], [1], num_slots=huge)


@pytest.mark.parametrize("field", [dict(table_capacity=2**33), dict(max_cached_blocks=2**40),
                                   dict(min_prefix_tokens=2**70)])
def test_cache_spec_refuses_sizes_past_int32(field):
  """Each is accepted today and then fails later with a bare OverflowError (or, for the table,
  asks init_cache for 96 GiB that int32 slot arithmetic could not even index)."""
  with pytest.raises(jp.JaxPagedError):
    jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=8,
                 max_seqs=3, max_pages_per_seq=4, prefix_caching=True, **field)


# ----------------------------------------------------------------------------- models

_CONFIG = LlamaConfig(vocab_size=16, hidden=8, num_layers=1, num_heads=2, num_kv_heads=1, ffn=8,
                      max_position=64)


def _params():
  rng = np.random.default_rng(0)
  shapes = param_shapes(_CONFIG)
  del shapes["unembed"]
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3),
                      shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("option", [dict(prefill_chunk=2**62), dict(steps_per_call=2**40)])
def test_generate_refuses_absurd_static_sizes(option):
  """prefill_chunk is accepted and becomes np.zeros(prefill_chunk) (2**40: 4 TiB; 2**62 fails
  at once, whatever the machine); steps_per_call=2**40 overflows inside jit."""
  with pytest.raises(jp.JaxPagedError):
    generation.generate(_params(), _CONFIG, [[1, 2, 3]], max_new_tokens=2, eos_id=0, **option)


def test_server_refuses_a_token_budget_no_step_can_use():
  """Every step feeds at most max_seqs * max_seq_len tokens. 2**40 is accepted today and
  `warmup` then compiles a step of 2**40 tokens: a bare JaxRuntimeError after trying to
  allocate tens of GiB (not called here for that reason)."""
  with pytest.raises(jp.JaxPagedError, match="token_budget"):
    serving.Server(_params(), _CONFIG, eos_id=0, num_pages=16, max_seqs=2, page_size=2,
                   max_seq_len=16, token_budget=2**40)


@pytest.mark.parametrize("case", ["list tokens", "config None", "params {}", "token past vocab"])
def test_model_forward_checks_what_it_is_given(case):
  spec = _CONFIG.cache_spec(num_pages=8, max_seqs=2, max_seq_len=8, page_size=2)
  cache = jp.init_cache(spec)
  args = dict(params=_params(), cache=cache, tokens=jnp.array([1, 2, 3]),
              seq_ids=jnp.array([0]), q_lens=jnp.array([3]), config=_CONFIG, decode=False)
  if case == "list tokens":  # used exactly, as the array would be
    _, expected, _ = forward(**args)
    _, logits, _ = forward(**dict(args, cache=jp.init_cache(spec), tokens=[1, 2, 3]))
    np.testing.assert_array_equal(logits, expected)
    return
  args.update({"config None": dict(config=None), "params {}": dict(params={}),
               "token past vocab": dict(tokens=jnp.array([99, 2, 3]))}[case])
  with pytest.raises(jp.JaxPagedError):
    forward(**args)


# ----------------------------------------------------------------------------- small leaks

@pytest.mark.parametrize("call", ["gather_kv seq_id", "write_kv layer", "paged_attention layer"])
def test_a_string_index_gives_jaxpaged_error(call):
  cache = _two_sequences()
  kv = jnp.ones((1, 1, 2))
  with pytest.raises(jp.JaxPagedError):
    if call == "gather_kv seq_id":
      jp.gather_kv(cache, 0, "0")
    elif call == "write_kv layer":
      jp.write_kv(cache, "0", kv, kv, jnp.array([0]))
    else:
      jp.paged_attention(kv, cache, "0", jnp.array([0]))


@pytest.mark.parametrize("page_hash", [[1, 2, 3], "x", [2**33, 0], np.array([-1, 2])])
def test_block_key_checks_its_hash(page_hash):
  with pytest.raises(jp.JaxPagedError):
    jp.block_key(page_hash)


def test_promote_blocks_with_two_seq_ids_gives_jaxpaged_error():
  cache = jp.init_cache(_spec())
  with pytest.raises(jp.JaxPagedError):
    jp.promote_blocks(cache, [1, 2], [])


def test_match_prefix_with_ragged_token_rows_gives_jaxpaged_error():
  cache = jp.init_cache(_spec())
  with pytest.raises(jp.JaxPagedError, match="tokens"):
    jp.match_prefix(cache, [0, 1], [[1, 2, 3], [1]], [3, 1])


# =============================================================================== part 2: holds today

@pytest.mark.parametrize("block_hash", ["mix64", "constant", "unchained"])
@pytest.mark.parametrize("salt_a, salt_b", [(0, 2**32), (2**32, 0), (1, 2**32 + 1),
                                            (2**64 - 1, 2**32 - 1), (2**63, 0)])
def test_holds_salts_equal_in_their_low_32_bits_never_share_a_page(block_hash, salt_a, salt_b):
  spec = _spec(num_layers=1, num_pages=16, block_hash=block_hash)
  prompt = jnp.array([[1, 2, 3, 4, 5]])
  cache = jp.init_cache(spec)
  cache, m = jp.match_prefix(cache, jnp.array([0]), prompt, jnp.array([5]), salts=salt_a,
                             num_slots=5)
  cache = jp.write_kv(cache, 0, jnp.ones((5, 1, 2)), jnp.ones((5, 1, 2)), m.slots)
  cache, other = jp.match_prefix(cache, jnp.array([1]), prompt, jnp.array([5]), salts=salt_b,
                                 num_slots=5)
  assert int(other.num_cached[0]) == 0
  table = np.asarray(cache.page_table)
  assert not set(table[0][table[0] >= 0]) & set(table[1][table[1] >= 0])
  cache, again = jp.match_prefix(cache, jnp.array([2]), prompt, jnp.array([5]), salts=salt_a,
                                 num_slots=5)
  assert int(again.num_cached[0]) > 0  # the same salt does hit


@pytest.mark.parametrize("bad", [-1, 2**64, 1.0, True, np.array([-1])])
def test_holds_bad_salts_are_refused_not_wrapped(bad):
  cache = jp.init_cache(_spec())
  with pytest.raises(jp.JaxPagedError, match="salt"):
    jp.match_prefix(cache, jnp.array([0]), jnp.array([[1, 2, 3]]), jnp.array([3]), salts=bad)


@pytest.mark.parametrize("block_hash", ["mix64", "constant", "unchained"])
def test_holds_a_sequence_swapped_out_before_its_key_values_were_written_is_no_hit(block_hash):
  spec = _spec(num_pages=12, block_hash=block_hash)
  prompt = jnp.array([[1, 2, 3, 4, 5]])
  cache = jp.init_cache(spec)
  cache, m = jp.match_prefix(cache, jnp.array([0]), prompt, jnp.array([5]), num_slots=5)
  cache = jp.write_kv(cache, 0, jnp.ones((5, 1, 2)), jnp.ones((5, 1, 2)), m.slots)  # layer 0 only
  cache, (swapped,) = jp.swap_out(cache, [0])
  cache, ok = jp.swap_in(cache, swapped)
  assert bool(ok)
  cache, other = jp.match_prefix(cache, jnp.array([1]), prompt, jnp.array([5]), num_slots=5)
  assert int(other.num_cached[0]) == 0
  table = np.asarray(cache.page_table)[0]
  slots = np.array([table[i // 2] * 2 + i % 2 for i in range(5)], np.int32)
  cache = jp.write_kv(cache, 1, jnp.ones((5, 1, 2)), jnp.ones((5, 1, 2)), slots)
  cache, third = jp.match_prefix(cache, jnp.array([2]), prompt, jnp.array([5]), num_slots=5)
  assert int(third.num_cached[0]) > 0  # written now: served


@pytest.mark.parametrize("block_hash", ["mix64", "constant", "unchained"])
def test_holds_refused_calls_change_nothing_and_keep_their_input(block_hash):
  spec = _spec(num_pages=6, block_hash=block_hash)
  cache = jp.init_cache(spec)
  cache, m = jp.match_prefix(cache, jnp.array([0, 1]), jnp.array([[1, 2, 3, 4, 5]] * 2),
                             jnp.array([5, 5]), num_slots=10)
  for layer in range(2):
    cache = jp.write_kv(cache, layer, jnp.ones((10, 1, 2)), jnp.ones((10, 1, 2)), m.slots)
  before = _snap(cache)
  refused = [
      jp.extend(cache, jnp.array([2]), jnp.array([8]), num_slots=8, tokens=jnp.arange(8)),
      jp.extend(cache, jnp.array([2, 9]), jnp.array([1, 1]), num_slots=2, tokens=jnp.arange(2)),
      jp.fork(cache, jnp.array([0]), jnp.array([1])),
      jp.match_prefix(cache, jnp.array([2, 3]), jnp.array([[1, 2, 3, 4, 6, 0, 0, 0],
                                                           [9] * 8]),
                      jnp.array([5, 8]), num_slots=16),
      jp.reset_prefix_cache(cache),
  ]
  for result in refused:
    new, ok = result[0], result[-1]
    ok = ok.ok if isinstance(ok, jp.PrefixMatch) else ok
    assert not bool(ok)
    _assert_same(before, _snap(new))
  _assert_same(before, _snap(cache))


@pytest.mark.parametrize("seq_ids", [np.array([2**32], np.int64), np.array([2**32 - 1], np.uint32),
                                     [2**70], jnp.array([2**32 - 1], jnp.uint32)])
def test_holds_extend_release_fork_refuse_ids_past_int32(seq_ids):
  cache = _two_sequences()
  before = _snap(cache)
  for call in (lambda: jp.extend(cache, seq_ids, [1]), lambda: jp.release(cache, seq_ids),
               lambda: jp.fork(cache, [0], seq_ids)):
    with pytest.raises(jp.JaxPagedError, match="int32"):
      call()
  _assert_same(before, _snap(cache))


def test_holds_a_cache_its_caller_donated_is_refused_by_name():
  cache, _, _ = jp.extend(jp.init_cache(_spec()), jnp.array([0]), jnp.array([3]), num_slots=3)
  jax.jit(lambda cache: jp.release(cache, jnp.array([0])), donate_argnames="cache")(cache)
  for call in (lambda: jp.extend(cache, [0], [1]), lambda: jp.gather_kv(cache, 0, 0),
               lambda: jp.swap_out(cache, [0]), lambda: jp.prefix_stats(cache)):
    with pytest.raises(jp.JaxPagedError, match="donated"):
      call()


class _RaisingPromotion(jp.LRUPolicy):

  def should_promote(self, key, stats):
    raise RuntimeError("policy fault")


def test_holds_a_policy_raising_in_admit_leaves_the_manager_as_it_was():
  manager = jp.CacheManager(_spec(max_pages_per_seq=8), host_bytes=1 << 20,
                            policy=_RaisingPromotion())
  manager.release([_prefill(manager, [1, 2, 3, 4, 5, 6, 7]).seq_id])
  manager.gc()  # its blocks are on host now: the next admit asks the policy
  before = _manager_state(manager)
  with pytest.raises(RuntimeError, match="policy fault"):
    manager.admit([1, 2, 3, 4, 5, 6, 9])
  _assert_manager_unchanged(before, manager)
