"""extend / release / fork / gather_kv: semantics, atomic refusal, errors, compilation."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp

SPEC = jp.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, num_pages=10,
                    max_seqs=4, max_pages_per_seq=5)


def _copy(cache):
  return jax.tree.map(jnp.copy, cache)  # the jaxpaged entry points donate their input


def _extend(cache, ids, counts, num_slots=None):
  num_slots = max(sum(counts), 1) if num_slots is None else num_slots
  return jp.extend(cache, jnp.asarray(ids, jnp.int32), jnp.asarray(counts, jnp.int32),
                   num_slots=num_slots)


def _assert_slots_follow_page_table(cache, ids, counts, old_lens, slots):
  """Row b owns the next counts[b] entries; token i of a row sits at position old_len + i: its
  slot is page_table[pos // ps] and offset. Padding rows' entries are -1."""
  ps = cache.spec.page_size
  t = 0
  for seq, n, old in zip(ids, counts, old_lens):
    for pos in range(old, old + n):
      if seq < 0:
        assert int(slots[t]) == -1
      else:
        page = int(cache.page_table[seq, pos // ps])
        assert page >= 0 and int(slots[t]) == page * ps + pos % ps
      t += 1
  assert np.all(np.asarray(slots[t:]) == -1)


def test_extend_allocates_distinct_pages_and_returns_slots_in_row_order():
  cache = jp.init_cache(SPEC)
  cache, slots, ok = _extend(cache, [2, -1, 0], [6, 3, 1], num_slots=11)
  assert bool(ok)
  _assert_slots_follow_page_table(cache, [2, -1, 0], [6, 3, 1], [0, 0, 0], slots)
  np.testing.assert_array_equal(cache.seq_lens, [1, 0, 6, 0])
  used = np.asarray(cache.page_table)[np.asarray(cache.page_table) >= 0]
  assert len(used) == 3 == len(set(used.tolist())) == int(jp.num_used_pages(cache))
  np.testing.assert_array_equal(np.asarray(cache.ref_counts)[used], 1)
  # A second call continues each sequence where it stopped, taking pages only at boundaries.
  cache, slots, ok = _extend(cache, [0, 2], [4, 2], num_slots=6)
  assert bool(ok)
  _assert_slots_follow_page_table(cache, [0, 2], [4, 2], [1, 6], slots)
  assert int(jp.num_used_pages(cache)) == 4  # seq 0: 5 tokens -> 2 pages; seq 2: 8 -> 2 pages


@pytest.mark.parametrize("ids,counts,num_slots,argument,rows", [
    ([0, 4], [1, 1], None, "seq_ids", "\\[1\\]"),
    ([-2, 0], [1, 1], None, "seq_ids", "\\[0\\]"),
    ([1, 1], [1, 1], None, "seq_ids", "\\[1\\]"),
    ([0, 1], [1, -1], None, "num_new_tokens", "\\[1\\]"),
    ([0, 1], [1, 21], 30, "num_new_tokens", "\\[1\\]"),  # past 5 pages * 4 tokens
    ([0, 1], [3, 3], 5, "num_new_tokens", ""),  # more tokens than num_slots
    ([0, 1], [3, 3], None, "num_new_tokens", ""),  # default num_slots: one token a row
    ([0, 1, 2], [20, 20, 1], 41, "cache", ""),  # 11 pages wanted, 10 exist
])
def test_refused_extend_changes_nothing_and_check_extend_says_why(ids, counts, num_slots,
                                                                  argument, rows):
  cache, _, _ = _extend(jp.init_cache(SPEC), [3], [2])
  before = _copy(cache)
  after, slots, ok = jp.extend(cache, jnp.asarray(ids), jnp.asarray(counts), num_slots=num_slots)
  assert not bool(ok)
  chex.assert_trees_all_equal(after, before)
  np.testing.assert_array_equal(slots, -1)
  with pytest.raises(jp.JaxPagedError, match=f"^{argument}{' at rows ' + rows if rows else ''}:"):
    jp.check_extend(after, jnp.asarray(ids), jnp.asarray(counts), num_slots=num_slots)


def test_check_extend_accepts_what_extend_accepts():
  cache = jp.init_cache(SPEC)
  assert jp.check_extend(cache, jnp.array([0, -1]), jnp.array([20, 3]), num_slots=23) is None


def test_extend_rejects_bad_argument_types_at_trace_time():
  cache = jp.init_cache(SPEC)
  with pytest.raises(jp.JaxPagedError, match=r"seq_ids must be a 1-D integer array .*got int32\[2, 2\]"):
    jp.extend(cache, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(jp.JaxPagedError, match="num_new_tokens must have an integer dtype"):
    jp.extend(cache, jnp.array([0]), jnp.array([1.0]))
  with pytest.raises(jp.JaxPagedError, match="num_new_tokens must have 1 entries"):
    jp.extend(cache, jnp.array([0]), jnp.array([1, 1]))
  with pytest.raises(jp.JaxPagedError, match="num_slots must be a Python int >= 0, got 2.5"):
    jp.extend(cache, jnp.array([0]), jnp.array([1]), num_slots=2.5)
  with pytest.raises(jp.JaxPagedError, match="cache must be a jaxpaged.PagedKVCache"):
    jp.extend({"k": 1}, jnp.array([0]), jnp.array([1]))


def test_release_frees_pages_and_ignores_padding_repeats_and_unknown_ids():
  cache, _, _ = _extend(jp.init_cache(SPEC), [0, 1], [9, 4], num_slots=13)
  assert int(jp.num_used_pages(cache)) == 4
  cache = jp.release(cache, jnp.array([0, -1, 0, 7, 3]))
  assert int(jp.num_used_pages(cache)) == 1
  np.testing.assert_array_equal(cache.seq_lens, [0, 4, 0, 0])
  np.testing.assert_array_equal(cache.page_table[0], -1)
  # The freed pages are handed out again, each once.
  cache, _, ok = _extend(cache, [0, 2], [20, 16], num_slots=36)
  assert bool(ok) and int(jp.num_free_pages(cache)) == 0
  pages = np.asarray(cache.page_table)[np.asarray(cache.page_table) >= 0]
  assert sorted(pages.tolist()) == list(range(10))


def _write_tokens(cache, slots, values):
  """Writes value i into every element of token i's K (and -value into V), all layers."""
  for layer in range(cache.spec.num_layers):
    k = jnp.broadcast_to(values[:, None, None], (len(values), 2, 4)).astype(jnp.float32)
    cache = jp.write_kv(cache, layer, k, -k, slots)
  return cache


def _tokens(cache, seq, layer=0):
  k, v = jp.gather_kv(cache, layer, seq)
  n = int(cache.seq_lens[seq])
  np.testing.assert_array_equal(v[:n], -k[:n])
  return np.asarray(k[:n, 0, 0]).tolist()


def test_fork_shares_pages_and_copy_on_write_keeps_forks_apart():
  cache, slots, _ = _extend(jp.init_cache(SPEC), [0], [6], num_slots=6)
  cache = _write_tokens(cache, slots, jnp.arange(1.0, 7.0))
  cache, ok = jp.fork(cache, jnp.array([0, 0]), jnp.array([1, 2]))
  assert bool(ok)
  np.testing.assert_array_equal(cache.page_table[1], cache.page_table[0])
  assert int(jp.num_used_pages(cache)) == 2  # shared, not copied
  np.testing.assert_array_equal(np.asarray(cache.ref_counts)[np.asarray(cache.page_table[0, :2])],
                                3)
  # All three append into the shared, partly filled second page in one call: two copies are made,
  # the last sharer keeps the original and fills it, then takes one new page.
  cache, slots, ok = _extend(cache, [0, 1, 2], [1, 1, 3], num_slots=5)
  assert bool(ok) and int(jp.num_used_pages(cache)) == 2 + 2 + 1
  cache = _write_tokens(cache, slots, jnp.array([10.0, 20.0, 30.0, 31.0, 32.0]))
  base = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
  assert _tokens(cache, 0) == base + [10.0]
  assert _tokens(cache, 1) == base + [20.0]
  assert _tokens(cache, 2) == base + [30.0, 31.0, 32.0]
  assert _tokens(cache, 2, layer=1) == base + [30.0, 31.0, 32.0]
  first_page = int(cache.page_table[0, 0])
  assert int(cache.ref_counts[first_page]) == 3  # the full first page is still shared
  cache = jp.release(cache, jnp.array([0, 1, 2]))
  assert int(jp.num_free_pages(cache)) == SPEC.num_pages
  np.testing.assert_array_equal(cache.ref_counts, 0)


def test_append_after_a_full_shared_page_needs_no_copy():
  cache, slots, _ = _extend(jp.init_cache(SPEC), [0], [4], num_slots=4)
  cache, _ = jp.fork(cache, jnp.array([0]), jnp.array([1]))
  cache, _, ok = _extend(cache, [1], [1])
  assert bool(ok) and int(jp.num_used_pages(cache)) == 2
  assert int(cache.page_table[1, 0]) == int(cache.page_table[0, 0])


def test_copy_on_write_is_refused_atomically_when_no_page_is_free():
  cache, _, _ = _extend(jp.init_cache(SPEC), [0, 1], [18, 18], num_slots=36)  # 5 + 5 pages
  cache = jp.release(cache, jnp.array([1]))
  cache, _, _ = _extend(cache, [1], [19], num_slots=19)
  cache, ok = jp.fork(cache, jnp.array([1]), jnp.array([2]))
  assert bool(ok) and int(jp.num_free_pages(cache)) == 0
  before = _copy(cache)
  cache, _, ok = _extend(cache, [2], [1])
  assert not bool(ok)
  chex.assert_trees_all_equal(cache, before)
  with pytest.raises(jp.JaxPagedError, match="^cache: has too few free pages"):
    jp.check_extend(cache, jnp.array([2]), jnp.array([1]))


@pytest.mark.parametrize("src,dst,message", [
    ([0], [4], "^dst_ids at rows \\[0\\]: is out of range"),
    ([5], [2], "^src_ids at rows \\[0\\]: is out of range"),
    ([0, 0], [2, 2], "^dst_ids at rows \\[1\\]: appears twice"),
    ([0], [1], "^dst_ids at rows \\[0\\]: is a sequence that still holds tokens"),
])
def test_refused_fork_changes_nothing(src, dst, message):
  cache, _, _ = _extend(jp.init_cache(SPEC), [0, 1], [3, 2])
  before = _copy(cache)
  after, ok = jp.fork(cache, jnp.asarray(src), jnp.asarray(dst))
  assert not bool(ok)
  chex.assert_trees_all_equal(after, before)
  with pytest.raises(jp.JaxPagedError, match=message):
    jp.check_fork(after, jnp.asarray(src), jnp.asarray(dst))
  assert jp.check_fork(after, jnp.array([0, 7]), jnp.array([2, -1])) is None


def test_gather_kv_rejects_a_bad_layer():
  with pytest.raises(jp.JaxPagedError, match="layer must be in \\[0, 2\\), got 2"):
    jp.gather_kv(jp.init_cache(SPEC), 2, 0)


# ----------------------------------------------------------------------------- in jitted loops

def _decode_step(cache, seq_ids, token_values):
  cache, slots, ok = jp.extend(cache, seq_ids, jnp.ones_like(seq_ids))
  k = jnp.broadcast_to(token_values[:, None, None], (seq_ids.shape[0], 2, 4))
  for layer in range(cache.spec.num_layers):
    cache = jp.write_kv(cache, layer, k, -k, slots)
  return cache, ok


def test_decode_loop_in_scan_and_while_loop_matches_token_by_token_writes():
  ids = jnp.array([0, 2, -1])

  @jax.jit
  def scan_decode(cache):
    def body(cache, step):
      cache, ok = _decode_step(cache, ids, (step * 10 + jnp.arange(3)).astype(jnp.float32))
      return cache, ok
    return jax.lax.scan(body, cache, jnp.arange(7))

  @jax.jit
  def while_decode(cache):
    def body(state):
      step, cache, all_ok = state
      cache, ok = _decode_step(cache, ids, (step * 10 + jnp.arange(3)).astype(jnp.float32))
      return step + 1, cache, all_ok & ok
    return jax.lax.while_loop(lambda s: s[0] < 7, body, (0, cache, True))[1:]

  for decode in (scan_decode, while_decode):
    cache, ok = decode(jp.init_cache(SPEC))
    assert bool(jnp.all(ok))
    assert _tokens(cache, 0) == [s * 10.0 for s in range(7)]
    assert _tokens(cache, 2, layer=1) == [s * 10.0 + 1 for s in range(7)]
    assert int(jp.num_used_pages(cache)) == 4


def test_decode_steps_with_changing_lengths_compile_once():
  step = jax.jit(chex.assert_max_traces(_decode_step, n=1), donate_argnames=("cache",))
  cache = jp.init_cache(SPEC)
  for i in range(9):  # crosses page boundaries, then runs out of room (ok False): same program
    cache, ok = step(cache, jnp.array([i % 3, 3]), jnp.array([1.0, 2.0]))
  assert int(cache.seq_lens[3]) == 9


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_donated_decode_step_never_copies_the_page_pool(prefix_caching):
  """Structural check behind the benchmark: the compiled step updates the pool in place."""
  spec = jp.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, num_pages=1000,
                      max_seqs=4, max_pages_per_seq=5, prefix_caching=prefix_caching)

  def step(cache, seq_ids, token_values):
    cache, slots, ok = jp.extend(cache, seq_ids, jnp.ones_like(seq_ids),
                                 tokens=token_values.astype(jnp.int32))
    k = jnp.broadcast_to(token_values[:, None, None], (seq_ids.shape[0], 2, 4))
    for layer in range(cache.spec.num_layers):
      cache = jp.write_kv(cache, layer, k, -k, slots)
    return cache, ok

  step = jax.jit(step, donate_argnames=("cache",))
  hlo = step.lower(jp.init_cache(spec), jnp.array([0, 1]), jnp.array([1.0, 2.0])).compile()
  pool = r"f32\[2,2,1000,4,4\]"
  copies = re.findall(rf"= {pool}\{{[^}}]*\}} copy\(", hlo.as_text())
  assert not copies, copies
