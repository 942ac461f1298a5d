"""Pure means pure: every public function leaves its inputs alive and bit-identical, refused
calls included; a cache the caller donated is refused with an error that says so."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from tests.helpers import key_values

SPEC = jp.CacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, page_size=4, num_pages=16,
                    max_seqs=4, max_pages_per_seq=6, prefix_caching=True)


def _cache():
  """Sequence 0 (10 tokens, K/V written) and sequence 1 (a fork of it); one cached block idle."""
  cache = jp.init_cache(SPEC)
  prompt = list(range(1, 11))
  tokens = np.zeros((1, 16), np.int32)
  tokens[0, :10] = prompt
  cache, match = jp.match_prefix(cache, jnp.array([0]), jnp.asarray(tokens), jnp.array([10]))
  values = np.zeros(16, np.float32)
  values[:10] = key_values(prompt)
  for layer in range(SPEC.num_layers):
    kv = jnp.broadcast_to(jnp.asarray(values)[:, None, None], (16, 1, 4))
    cache = jp.write_kv(cache, layer, kv, -kv, match.slots)
  cache, _ = jp.fork(cache, jnp.array([0]), jnp.array([1]))
  tokens[0, :6] = [50, 51, 52, 53, 54, 55]
  cache, match = jp.match_prefix(cache, jnp.array([2]), jnp.asarray(tokens), jnp.array([6]))
  for layer in range(SPEC.num_layers):
    kv = jnp.ones((16, 1, 4))
    cache = jp.write_kv(cache, layer, kv, kv, match.slots)
  return jp.release(cache, jnp.array([2]))


def _swapped():
  return jp.swap_out(_cache(), [0])[1][0]


def _blocks():
  cache = jp.release(_cache(), jnp.array([0, 1]))
  return jp.demote_blocks(cache, 8)[1]


q = jnp.ones((2, 2, 4))
CALLS = {
    "extend": lambda c: jp.extend(c, jnp.array([0, 3]), jnp.array([3, 2]), num_slots=5,
                                  tokens=jnp.arange(5)),
    "extend refused": lambda c: jp.extend(c, jnp.array([0]), jnp.array([99]), num_slots=99),
    "write_kv": lambda c: jp.write_kv(c, 1, jnp.ones((3, 1, 4)), jnp.ones((3, 1, 4)),
                                      jnp.array([0, 1, -1])),
    "fork": lambda c: jp.fork(c, jnp.array([0]), jnp.array([3])),
    "fork refused": lambda c: jp.fork(c, jnp.array([0]), jnp.array([1])),
    "release": lambda c: jp.release(c, jnp.array([0, 1])),
    "match_prefix": lambda c: jp.match_prefix(c, jnp.array([3]), jnp.arange(12)[None] + 1,
                                              jnp.array([12])),
    "match_prefix refused": lambda c: jp.match_prefix(c, jnp.array([0]), jnp.ones((1, 4), int),
                                                      jnp.array([4])),
    "reset_prefix_cache refused": jp.reset_prefix_cache,
    "swap_out": lambda c: jp.swap_out(c, [0]),
    "swap_in": lambda c: jp.swap_in(jp.release(c, jnp.array([0])), _swapped()),
    "demote_blocks": lambda c: jp.demote_blocks(c, 3),
    "promote_blocks refused": lambda c: jp.promote_blocks(c, 0, _blocks()[:1]),
    "paged_attention": lambda c: jp.paged_attention(q, c, 0, jnp.array([0, 1])),
    "ragged_paged_attention": lambda c: jp.ragged_paged_attention(q, c, 1, jnp.array([0, 1]),
                                                                  jnp.array([1, 1])),
    "gather_kv": lambda c: jp.gather_kv(c, 1, 0),
    "token_positions": lambda c: jp.token_positions(c, jnp.array([0]), jnp.array([1])),
    "prefix_stats": jp.prefix_stats,
    "counters": lambda c: (jp.num_free_pages(c), jp.num_used_pages(c),
                           jp.num_cached_free_pages(c)),
    "check_extend": lambda c: jp.check_extend(c, jnp.array([0]), jnp.array([1])),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_every_public_function_leaves_its_input_alive_and_unchanged(name):
  cache = _cache()
  before = jax.tree.map(np.array, cache)
  try:
    CALLS[name](cache)
  except jp.JaxPagedError:
    assert name.endswith("refused")
  assert not any(x.is_deleted() for x in jax.tree.leaves(cache))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, cache), before)


def test_promote_blocks_input_stays_alive_too():
  """The promote input is a sequence holding a prefix: check the cache given to promote."""
  cache = jp.release(_cache(), jnp.array([0, 1]))
  cache, blocks = jp.demote_blocks(cache, 8)
  first = [b for b in blocks if b.depth == 0 and b.tokens[0] == 1]
  tokens = np.zeros((1, 16), np.int32)
  tokens[0, :5] = first[0].tokens.tolist() + [9]
  cache, match = jp.match_prefix(cache, jnp.array([0]), jnp.asarray(tokens), jnp.array([5]),
                                 max_prompt_tokens=jnp.array([0]), num_slots=1)
  before = jax.tree.map(np.array, cache)
  promoted, ok = jp.promote_blocks(cache, 0, first)
  assert bool(ok) and int(promoted.seq_lens[0]) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, cache), before)


def test_a_cache_the_caller_donated_is_refused_with_a_clear_error():
  @functools.partial(jax.jit, donate_argnames=("cache",))
  def step(cache):
    cache, _, _ = jp.extend(cache, jnp.array([0]), jnp.array([1]))
    return cache

  cache = _cache()
  new = step(cache)
  for call in (lambda c: jp.extend(c, jnp.array([0]), jnp.array([1])),
               lambda c: jp.release(c, jnp.array([0])), lambda c: jp.gather_kv(c, 0, 0),
               lambda c: jp.paged_attention(q, c, 0, jnp.array([0, 1])),
               lambda c: jp.swap_out(c, [0]), jp.prefix_stats):
    with pytest.raises(jp.JaxPagedError, match="cache was donated.*Use the cache that call "
                       "returned"):
      call(cache)
  assert int(new.seq_lens[0]) == 11  # the returned one is the live one
