"""The public update functions of a `PagedKVCache`: `extend`, `release`, `fork`, their eager
`check_*` explanations, and read-backs (`token_positions`, `gather_kv`).

Every function here is pure: it never deletes or changes its input (nothing here donates).
Called eagerly, an update therefore copies the pools; jit your step and donate the cache there
(``jax.jit(step, donate_argnames="cache")``) to update it in place. Each validates its
arguments eagerly (clear errors naming the argument), then runs the traceable core of
`jaxpaged._src.allocator` under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged._src import sharding
from jaxpaged._src import allocator
from jaxpaged._src import checks
from jaxpaged._src import quant
from jaxpaged._src.cache import (check_cache, check_index, check_layer,
                                 check_num_slots, token_rows)

_extend_jit = jax.jit(allocator.extend_core, static_argnames=("num_slots",))
_release_jit = jax.jit(allocator.release_core)
_fork_jit = jax.jit(allocator.fork_core)


# ----------------------------------------------------------------------------- extend

def check_extend(cache: sharding.AnyCache, seq_ids: jax.Array, num_new_tokens: jax.Array, *,
                 num_slots: int | None = None) -> None:
  """Eagerly explains why `extend` would refuse these arguments; returns None if it would not.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([12]), num_slots=12)
  >>> check_extend(cache, jnp.array([0]), jnp.array([5]), num_slots=5)
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: num_new_tokens at rows [0]: would grow the sequence past ...

  Raises:
    JaxPagedError: naming the first wrong argument, its rows and how to fix it.
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.check_each(cache, check_extend, {"seq_ids": seq_ids},
                               num_new_tokens=num_new_tokens, num_slots=num_slots)
  spec = check_cache(cache)
  seq_ids, num_new_tokens, num_slots, _ = extend_args(cache, seq_ids, num_new_tokens, num_slots,
                                                       None)
  plan = allocator.extend_plan(cache, seq_ids, num_new_tokens, num_slots)
  checks.raise_first(allocator.EXTEND_REASONS, plan.problems, max_seqs=spec.max_seqs,
                     max_seq_len=spec.max_seq_len, num_slots=num_slots)


def extend(cache: sharding.AnyCache, seq_ids: jax.Array, num_new_tokens: jax.Array, *,
           num_slots: int | None = None, tokens: jax.Array | None = None
           ) -> tuple[sharding.AnyCache, jax.Array, jax.Array]:
  """Makes room for the new tokens of a ragged batch: atomic, vectorised, in-graph.

  Args:
    cache: the cache; it is not changed (a new one is returned).
    seq_ids: ``int32[B]`` sequence ids; -1 marks a padding row. An empty slot becomes a new
      sequence by being extended.
    num_new_tokens: ``int32[B]`` tokens each row appends.
    num_slots: static length ``T`` of the returned ``slots`` (default ``B``: one token a row, the
      decode case). Must be at least ``sum(num_new_tokens)``.
    tokens: ``int32[T]`` the new tokens' ids, in the same layout (prefix caching only: blocks
      that fill are hashed and registered for `match_prefix`). A sequence extended once without
      ids is never registered again. Write the tokens' K/V (`write_kv`) before the next
      `match_prefix` call: a registered block is served from then on.

  Returns:
    ``(cache, slots, ok)``: ``slots`` is ``int32[T]``, the cache slot (``page * page_size +
    offset``) of every new token. Row ``b`` owns entries ``[start_b, start_b +
    num_new_tokens[b])`` with ``start`` the running sum of ``num_new_tokens``, rows in order;
    padding rows keep their entries (slot -1), so a decode step with one token a row is
    row-aligned. Entries past the last row are -1. This is the ``[T, ...]`` layout of the K/V
    given to `write_kv` and of the queries given to `ragged_paged_attention`. If ``ok`` is False
    (bad ids, a sequence past its capacity, too few free pages), the returned cache equals the
    input and every slot is -1; `check_extend` says why. A new token landing in a partly filled
    page that other sequences share first gets a private copy of that page (copy-on-write).
    With prefix caching, never-cached free pages are used first; cached blocks nobody uses are
    evicted only when those run out (least recently used first, a chain's tail first).

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, slots, ok = extend(init_cache(spec), jnp.array([0, -1]), jnp.array([5, 0]),
  ...                           num_slots=6)
  >>> slots.tolist(), bool(ok)
  ([0, 1, 2, 3, 4, -1], True)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.extend(cache, seq_ids, num_new_tokens, num_slots=num_slots, tokens=tokens)
  check_cache(cache)
  seq_ids, num_new_tokens, num_slots, tokens = extend_args(cache, seq_ids, num_new_tokens,
                                                            num_slots, tokens)
  return _extend_jit(cache, seq_ids, num_new_tokens, tokens, num_slots=num_slots)


def extend_args(cache, seq_ids, num_new_tokens, num_slots, tokens):
  """The checked arguments of an `extend`."""
  seq_ids = checks.index_vector("seq_ids", seq_ids)
  num_new_tokens = checks.index_vector("num_new_tokens", num_new_tokens, seq_ids.shape[0])
  num_slots = check_num_slots(cache.spec, num_slots, seq_ids.shape[0])
  if tokens is not None:
    tokens = checks.token_ids("tokens", tokens, (num_slots,))
    if not cache.spec.prefix_caching:
      tokens = None  # only prefix caching keeps token ids
  return seq_ids, num_new_tokens, num_slots, tokens


def token_positions(cache: sharding.AnyCache, seq_ids: jax.Array, num_new_tokens: jax.Array, *,
                    num_slots: int | None = None) -> jax.Array:
  """Position within its sequence of every new token, in `extend`'s layout, for a cache that
  `extend` has already grown (so for RoPE): ``seq_len + num_evicted - num_new_tokens +
  offset`` (``num_evicted``: tokens `compress` dropped before); -1 for padding rows and entries
  past the last row.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([3]), num_slots=3)
  >>> cache, _, _ = extend(cache, jnp.array([0, 1]), jnp.array([2, 1]), num_slots=4)
  >>> token_positions(cache, jnp.array([0, 1]), jnp.array([2, 1]), num_slots=4).tolist()
  [3, 4, 0, -1]
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.token_positions(cache, seq_ids, num_new_tokens, num_slots=num_slots)
  check_cache(cache)
  seq_ids = checks.index_vector("seq_ids", seq_ids)
  counts = jnp.clip(checks.index_vector("num_new_tokens", num_new_tokens, seq_ids.shape[0]), 0)
  num_slots = check_num_slots(cache.spec, num_slots, seq_ids.shape[0])
  if seq_ids.shape[0] == 0:
    return jnp.full((num_slots,), -1, jnp.int32)
  live = (seq_ids >= 0) & (seq_ids < cache.spec.max_seqs)
  row, offset, valid = token_rows(counts, num_slots)
  rows = jnp.where(live, seq_ids, 0)
  length = cache.seq_lens[rows] + cache.num_evicted[rows]
  position = (length - counts)[row] + offset
  return jnp.where(valid & live[row], position, -1).astype(jnp.int32)



# ----------------------------------------------------------------------------- release

def release(cache: sharding.AnyCache, seq_ids: jax.Array) -> sharding.AnyCache:
  """Ends sequences: drops their page references and empties their slots.

  A page becomes free when nothing refers to it any more. Padding (-1), out-of-range ids, empty
  sequences and repeats are ignored, so releasing never fails and never double-frees.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([9]), num_slots=9)
  >>> int(num_free_pages(cache)), int(num_free_pages(release(cache, jnp.array([0]))))
  (5, 8)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.release(cache, seq_ids)
  check_cache(cache)
  return _release_jit(cache, checks.index_vector("seq_ids", seq_ids))



# ----------------------------------------------------------------------------- fork

def check_fork(cache: sharding.AnyCache, src_ids: jax.Array, dst_ids: jax.Array) -> None:
  """Eagerly explains why `fork` would refuse these arguments; returns None if it would not.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0, 1]), jnp.array([2, 2]), num_slots=4)
  >>> check_fork(cache, jnp.array([0]), jnp.array([1]))
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: dst_ids at rows [0]: is a sequence that still holds tokens; ...
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.check_fork(cache, src_ids, dst_ids)
  spec = check_cache(cache)
  dst_ids = checks.index_vector("dst_ids", dst_ids)
  src_ids = checks.index_vector("src_ids", src_ids, dst_ids.shape[0], per="row of dst_ids")
  checks.raise_first(allocator.FORK_REASONS, allocator.fork_problems(cache, src_ids, dst_ids),
                     max_seqs=spec.max_seqs)


def fork(cache: sharding.AnyCache, src_ids: jax.Array, dst_ids: jax.Array
         ) -> tuple[sharding.AnyCache, jax.Array]:
  """Each ``dst_ids[i]`` becomes a copy of ``src_ids[i]`` that shares all its pages (no K/V copy).

  Shared pages are reference counted; the first `extend` that appends into a shared, partly filled
  page gives the appending sequence its own copy first (copy-on-write), so forks never see each
  other's new tokens: beam search and parallel sampling.

  Args:
    src_ids: ``int32[N]`` sequences to copy. All rows read the sources as they were before the
      call, so a row whose source is another row's destination copies that slot's old state.
    dst_ids: ``int32[N]`` empty sequence slots to fill; -1 marks a padding row.

  Returns:
    ``(cache, ok)``; if ``ok`` is False (an id out of range, a destination repeated or not empty)
    nothing changed and `check_fork` says why.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([6]), num_slots=6)
  >>> cache, ok = fork(cache, jnp.array([0]), jnp.array([1]))
  >>> bool(ok), cache.page_table[1, :2].tolist() == cache.page_table[0, :2].tolist()
  (True, True)
  >>> cache, slots, _ = extend(cache, jnp.array([1]), jnp.array([1]))  # copy-on-write
  >>> int(slots[0]) // 4 != int(cache.page_table[0, 1]), int(num_used_pages(cache))
  (True, 3)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.fork(cache, src_ids, dst_ids)
  check_cache(cache)
  dst_ids = checks.index_vector("dst_ids", dst_ids)
  src_ids = checks.index_vector("src_ids", src_ids, dst_ids.shape[0], per="row of dst_ids")
  return _fork_jit(cache, src_ids, dst_ids)



# ----------------------------------------------------------------------------- read back

def gather_kv(cache: sharding.AnyCache, layer: int | jax.Array, seq_id: int | jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """One sequence's K and V, contiguous and in token order (for tests and debugging).

  Returns:
    ``(k, v)``, each ``[max_pages_per_seq * page_size, num_kv_heads, head_dim]``; positions at or
    past the sequence's length are zero, so ``k[:cache.seq_lens[seq_id]]`` is its keys. 8-bit
    K/V come back dequantized, as float32 (`quant.dequantize`).

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=2)
  >>> cache, slots, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([3]), num_slots=3)
  >>> k = jnp.arange(6.0).reshape(3, 1, 2)
  >>> k_read, _ = gather_kv(write_kv(cache, 0, k, -k, slots), 0, 0)
  >>> k_read[:4, 0].tolist()
  [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [0.0, 0.0]]
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.gather_kv(cache, layer, seq_id)
  spec = check_cache(cache)
  layer = check_layer(spec, layer)
  seq_id = check_index("seq_id", seq_id, spec.max_seqs, "max_seqs")
  return _gather_kv(cache, layer, seq_id)


@jax.jit
def _gather_kv(cache, layer, seq_id):
  spec = cache.spec
  in_range = (seq_id >= 0) & (seq_id < spec.max_seqs)  # a traced id out of range reads nothing
  seq_id = jnp.clip(seq_id, 0, spec.max_seqs - 1)
  pages = cache.page_table[seq_id]
  valid = in_range & (jnp.arange(spec.max_seq_len) < cache.seq_lens[seq_id])[:, None, None]

  def gather(pool):  # [H, P, ps, ...] -> [max_seq_len, H, ...]
    x = pool[layer][:, jnp.clip(pages, 0)]
    return jnp.moveaxis(x, 0, 2).reshape((spec.max_seq_len, spec.num_kv_heads) + x.shape[3:])

  def read(pages, scales):
    x = gather(pages)
    if scales is not None:
      x = quant.dequantize(x, gather(scales) if scales.ndim > 1 else scales[layer])
    return jnp.where(valid, x, 0)

  k_scales, v_scales = quant.attention_scales(cache)
  return read(cache.k_pages, k_scales), read(cache.v_pages, v_scales)


