"""Prefix caching: admitting new sequences onto cached blocks, resetting, statistics.

`match_prefix` starts new sequences: for each prompt it finds the longest run of cached full
blocks that verifiably hold that prompt's prefix, attaches them (reference count +1, no copy)
and, in the same atomic call, makes room for the prompt tokens that remain to be computed. If
that allocation cannot be satisfied nothing changes at all: no reference count, no statistic.

A hit is a block registered in the table that verifiably holds the prompt's block (hash, salt,
token ids, parent page and its generation: `prefix_state.holds_block`) and whose K/V were all
written (`prefix_state.fully_written`): a block registered by a request whose K/V are not
written yet is not served, so a hit never reads K/V that were not computed for that block.

Internal API: `match_plan`, `match_core`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpaged._src import sharding
from jaxpaged._src import checks, hashing, prefix_state, table
from jaxpaged._src.allocator import EXTEND_REASONS, any_problem, extend_core, extend_plan
from jaxpaged._src.cache import (check_cache, check_num_slots, duplicated,
                                 keep_unless_pools, pools, token_rows, with_pools)
from jaxpaged._src.prefix_state import STATS, bump, init_prefix_state
from jaxpaged._src.spec import JaxPagedError


class PrefixMatch(NamedTuple):
  """What `match_prefix` did for each row (example: `match_prefix`).

  >>> PrefixMatch._fields
  ('num_cached', 'num_new', 'slots', 'ok')

  Attributes:
    num_cached: ``int32[B]`` prompt tokens served from the cache (a multiple of page_size, at
      most ``length - 1``: the last prompt token is always computed).
    num_new: ``int32[B]`` tokens appended after them, to be computed now: row b's are
      ``tokens[b, num_cached[b] : num_cached[b] + num_new[b]]``.
    slots: ``int32[T]`` their cache slots, in `jaxpaged.extend`'s layout with counts ``num_new``.
    ok: ``bool[]`` False if the call was refused (then nothing changed).
  """
  num_cached: jax.Array
  num_new: jax.Array
  slots: jax.Array
  ok: jax.Array


MATCH_REASONS = {
    "bad_id": ("seq_ids", "is out of range [-1, {max_seqs}) (use -1 for padding rows)"),
    "duplicate": ("seq_ids", "appears twice; give each sequence one row per call"),
    "in_use": ("seq_ids", "is a sequence that holds tokens; match_prefix starts new sequences "
               "(release it first, or extend it)"),
    "bad_length": ("lengths", "must be in [1, tokens.shape[1]] for live rows"),
    "negative_new": ("max_prompt_tokens", "is negative; it is how many prompt tokens to "
                     "append now (>= 0)"),
}


class MatchPlan(NamedTuple):
  """What `match_prefix` decides, per row (``[B]`` arrays unless said); nothing changed yet."""
  problems: dict  # reason (`MATCH_REASONS`) -> bool[B]
  ok: jax.Array  # bool[]: no problem
  live: jax.Array  # bool[B]: a row that starts a sequence (False for all when refused)
  pages: jax.Array  # int32[B, n]: the table's page for each full block (-1: none)
  matched: jax.Array  # leading verified blocks, attached
  usable: jax.Array  # full blocks before the last prompt token (the ones looked up)
  num_cached: jax.Array  # matched * page_size
  num_new: jax.Array  # prompt tokens appended after them


def match_plan(cache, seq_ids, tokens, lengths, salts, max_prompt_tokens, num_slots, impl,
               interpret, hashes=None) -> MatchPlan:
  """The `MatchPlan` of a `match_prefix` on checked arguments (``salts`` as ``uint32[B, 2]``
  lanes; ``hashes`` the prompts' block hashes ``uint32[B, L // page_size, 2]`` when the caller
  computed them already, e.g. on the host). Traceable."""
  spec = cache.spec
  ps = spec.page_size
  rows_count, width = tokens.shape
  live = seq_ids >= 0
  in_range = seq_ids < spec.max_seqs
  rows = jnp.where(live & in_range, seq_ids, 0)
  problems = {
      "bad_id": (seq_ids < -1) | ~in_range,
      "duplicate": duplicated(seq_ids, live),
      "in_use": live & in_range & (cache.seq_lens[rows] > 0),
      "bad_length": live & ((lengths < 1) | (lengths > width)),
      "negative_new": live & (max_prompt_tokens < 0 if max_prompt_tokens is not None else False),
  }
  prefix = cache.prefix
  num_blocks = width // ps
  if prefix is not None and num_blocks:
    usable = jnp.where(live, (jnp.clip(lengths, 1) - 1) // ps, 0)  # the last token is computed
    if hashes is None:
      hashes = hashing.chain_block_hashes(jnp, tokens[:, :num_blocks * ps], salts, ps,
                                          spec.block_hash)
    pages = table.lookup(prefix.table_lo, prefix.table_hi, prefix.table_pages, hashes,
                         impl=impl, interpret=interpret)  # [B, n]
    parent = jnp.concatenate([jnp.full((rows_count, 1), prefix_state.NO_PARENT, jnp.int32),
                              pages[:, :-1]], axis=1)
    j = jnp.arange(num_blocks)
    blocks = tokens[:, :num_blocks * ps].reshape(rows_count, num_blocks, ps)
    verified = (prefix_state.holds_block(prefix_state.block_view(prefix, pages), hashes,
                                         salts[:, None], blocks, parent,
                                         prefix.page_gen[jnp.clip(parent, 0)])
                & prefix_state.fully_written(prefix, pages)
                & (j < usable[:, None]))
    matched = jnp.sum(jnp.cumprod(verified, axis=1), axis=1)  # the leading verified run
    matched = jnp.where(matched * ps >= spec.min_prefix_tokens, matched, 0)
  else:
    usable = jnp.zeros((rows_count,), jnp.int32)
    pages = jnp.full((rows_count, max(num_blocks, 1)), -1, jnp.int32)
    matched = jnp.zeros((rows_count,), jnp.int32)
  num_cached = matched * ps
  num_new = jnp.where(live, lengths - num_cached, 0)
  if max_prompt_tokens is not None:
    num_new = jnp.minimum(num_new, max_prompt_tokens)
  ok = ~any_problem(problems)
  return MatchPlan(problems, ok, live & ok, pages, jnp.where(live & ok, matched, 0), usable,
                   num_cached, jnp.clip(num_new, 0))


def _attach(cache, seq_ids, plan, salts):
  """Puts each row's verified cached blocks in its page table (reference +1, no copy)."""
  spec = cache.spec
  prefix = cache.prefix
  num_blocks = plan.pages.shape[1]
  j = jnp.arange(num_blocks)
  attach = plan.live[:, None] & (j < plan.matched[:, None])
  at_page = jnp.where(attach, plan.pages, spec.num_pages)
  seq = jnp.where(plan.live, seq_ids, spec.max_seqs)
  page_table = cache.page_table.at[jnp.where(attach, seq_ids[:, None], spec.max_seqs),
                                   j].set(plan.pages, mode="drop")
  # Pages nobody referred to leave the evictable set (once, even if two rows take them).
  revived = jnp.sort(jnp.where(attach & (cache.ref_counts[jnp.clip(plan.pages, 0)] == 0),
                               plan.pages, spec.num_pages).reshape(-1))
  distinct = (revived < spec.num_pages) & jnp.ones(revived.shape, bool).at[1:].set(
      revived[1:] != revived[:-1])
  cache = dataclasses.replace(
      cache, page_table=page_table,
      ref_counts=cache.ref_counts.at[at_page].add(1, mode="drop"),
      seq_lens=cache.seq_lens.at[seq].set(plan.num_cached, mode="drop"))
  if prefix is None:
    return cache
  return dataclasses.replace(cache, prefix=dataclasses.replace(
      prefix,
      num_evictable=prefix.num_evictable - jnp.sum(distinct, dtype=jnp.int32),
      page_last_use=prefix.page_last_use.at[at_page].set(prefix.clock, mode="drop"),
      seq_salt=prefix.seq_salt.at[seq].set(salts, mode="drop"),
      seq_hashable=prefix.seq_hashable.at[seq].set(True, mode="drop"),
      stats=_count(prefix.stats, plan)))


def _count(stats, plan):
  stats = bump(stats, "lookup_blocks", jnp.sum(plan.usable))
  stats = bump(stats, "hit_blocks", jnp.sum(plan.matched))
  stats = bump(stats, "lookup_tokens", jnp.sum(jnp.where(plan.live, plan.num_new
                                                          + plan.num_cached, 0)))
  return bump(stats, "hit_tokens", jnp.sum(jnp.where(plan.live, plan.num_cached, 0)))


def match_args(cache, seq_ids, tokens, lengths, salts, max_prompt_tokens, num_slots):
  spec = check_cache(cache)
  seq_ids = checks.index_vector("seq_ids", seq_ids)
  rows = seq_ids.shape[0]
  tokens = checks.token_ids("tokens", tokens, ndim=2)
  if tokens.shape[0] != rows:
    raise JaxPagedError(f"tokens must be int32[{rows}, max_prompt_len] (each row's prompt, "
                        f"padded), got {tokens.dtype}{list(tokens.shape)}.")
  lengths = checks.index_vector("lengths", lengths, rows)
  salts = checks.salt_lanes("salts", salts, rows)
  if max_prompt_tokens is not None:
    max_prompt_tokens = checks.index_vector("max_prompt_tokens", max_prompt_tokens, rows)
  num_slots = check_num_slots(spec, num_slots, rows, default=rows * tokens.shape[1])
  return spec, seq_ids, tokens, lengths, salts, max_prompt_tokens, num_slots


def check_match_prefix(cache: sharding.AnyCache, seq_ids: jax.Array, tokens: jax.Array,
                       lengths: jax.Array, *, salts: int | jax.Array | None = None,
                       max_prompt_tokens: jax.Array | None = None, num_slots: int | None = None,
                       impl: str = "auto", interpret: bool = False,
                       max_new_tokens: jax.Array | None = checks.UNSET) -> None:
  """Eagerly explains why `match_prefix` would refuse these arguments; None if it would not.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
  >>> check_match_prefix(init_cache(spec), jnp.array([0]), jnp.ones((1, 6), jnp.int32),
  ...                    jnp.array([7]))
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: lengths at rows [0]: must be in [1, tokens.shape[1]] ...
  """
  max_prompt_tokens = checks.renamed("max_prompt_tokens", max_prompt_tokens, "max_new_tokens",
                                     max_new_tokens)
  if isinstance(cache, sharding.ShardedCache):
    return sharding.check_each(cache, check_match_prefix, {"seq_ids": seq_ids}, tokens=tokens,
                               lengths=lengths, salts=salts, max_prompt_tokens=max_prompt_tokens,
                               num_slots=num_slots)
  spec, seq_ids, tokens, lengths, salts, max_prompt_tokens, num_slots = match_args(
      cache, seq_ids, tokens, lengths, salts, max_prompt_tokens, num_slots)
  plan = match_plan(cache, seq_ids, tokens, lengths, salts, max_prompt_tokens, num_slots, impl,
                    interpret)
  checks.raise_first(MATCH_REASONS, plan.problems, max_seqs=spec.max_seqs)
  attached = _attach(cache, seq_ids, plan, salts)
  extension = extend_plan(attached, seq_ids, plan.num_new, num_slots)
  checks.raise_first(EXTEND_REASONS, extension.problems, max_seqs=spec.max_seqs,
                     max_seq_len=spec.max_seq_len, num_slots=num_slots)


def match_prefix(cache: sharding.AnyCache, seq_ids: jax.Array, tokens: jax.Array,
                 lengths: jax.Array, *, salts: int | jax.Array | None = None,
                 max_prompt_tokens: jax.Array | None = None, num_slots: int | None = None,
                 impl: str = "auto", interpret: bool = False,
                 max_new_tokens: jax.Array | None = checks.UNSET
                 ) -> tuple[sharding.AnyCache, PrefixMatch]:
  """Starts new sequences on the longest verified run of cached blocks of their prompts.

  Args:
    cache: the cache; it is not changed (a new one is returned).
    seq_ids: ``int32[B]`` empty sequence slots to start; -1 = padding.
    tokens: ``int32[B, L]`` each row's prompt token ids (padded past ``lengths``).
    lengths: ``int32[B]`` prompt lengths, 1..L.
    salts: per-request 64-bit salt (tenant isolation): blocks are shared only between requests
      with the same salt. Integers in ``[0, 2**64)``, one per row (a Python int applies to
      every row), or ``uint32[B, 2]`` (low, high) lanes; inside jit, 32-bit integer arrays are
      taken as unsigned. Default 0, shared by everyone (see the README, "Isolation").
    max_prompt_tokens: ``int32[B]`` at most this many of the remaining prompt tokens are
      appended now (chunked prefill; continue with `extend`). Default: all of them. (Its old
      name ``max_new_tokens`` still works, with a `DeprecationWarning`.)
    num_slots: static length of the returned slots (default ``B * L``).
    impl, interpret: the hash-table lookup's implementation (Pallas kernel or XLA).

  Returns:
    ``(cache, PrefixMatch)``. Without prefix caching in the spec nothing is ever cached and this
    is `extend` of the prompts (with their ids). Refused calls (bad ids, a slot in use, too few
    pages for the tokens to append) change nothing; `check_match_prefix` says why.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
  >>> prompt = jnp.array([[1, 2, 3, 4, 5, 6]])
  >>> cache, first = match_prefix(init_cache(spec), jnp.array([0]), prompt, jnp.array([6]))
  >>> k = jnp.ones((6, 1, 8))
  >>> cache = release(write_kv(cache, 0, k, k, first.slots), jnp.array([0]))
  >>> cache, again = match_prefix(cache, jnp.array([1]), prompt, jnp.array([6]))
  >>> int(again.num_cached[0]), int(again.num_new[0])  # the full first block is a hit
  (4, 2)
  """
  max_prompt_tokens = checks.renamed("max_prompt_tokens", max_prompt_tokens, "max_new_tokens",
                                     max_new_tokens)
  if isinstance(cache, sharding.ShardedCache):
    return sharding.match_prefix(cache, seq_ids, tokens, lengths, salts=salts,
                                 max_prompt_tokens=max_prompt_tokens, num_slots=num_slots,
                                 impl=impl, interpret=interpret)
  _, seq_ids, tokens, lengths, salts, max_prompt_tokens, num_slots = match_args(
      cache, seq_ids, tokens, lengths, salts, max_prompt_tokens, num_slots)
  return _match_jit(cache, seq_ids, tokens, lengths, salts, max_prompt_tokens,
                    num_slots=num_slots, impl=impl, interpret=interpret)


def match_core(cache, seq_ids, tokens, lengths, salts, max_prompt_tokens, *, num_slots, impl,
               interpret, hashes=None):
  """`match_prefix` on checked arguments (``salts`` as ``uint32[B, 2]``; ``hashes`` as
  `match_plan`): traceable. Returns ``(cache, PrefixMatch)``."""
  plan = match_plan(cache, seq_ids, tokens, lengths, salts, max_prompt_tokens, num_slots, impl,
                    interpret, hashes)
  attached = _attach(cache, seq_ids, plan, salts)
  row, offset, valid = token_rows(plan.num_new, num_slots)
  new_tokens = jnp.where(valid, tokens[row, jnp.clip(plan.num_cached[row] + offset, 0,
                                                     tokens.shape[1] - 1)], 0)
  # Refused here: extend sees only padding, so the pools are untouched either way.
  extended, slots, ok = extend_core(attached, jnp.where(plan.ok, seq_ids, -1),
                                   plan.num_new, new_tokens, num_slots=num_slots)
  ok = ok & plan.ok
  keep = lambda new, old: jnp.where(ok, new, old)
  result = with_pools(keep_unless_pools(keep, extended, cache), pools(extended))
  zero = lambda x: jnp.where(ok, x, jnp.zeros_like(x))
  return result, PrefixMatch(zero(plan.num_cached), zero(plan.num_new),
                             jnp.where(ok, slots, -1), ok)


_match_jit = jax.jit(match_core, static_argnames=("num_slots", "impl", "interpret"))


def reset_prefix_cache(cache: sharding.AnyCache) -> tuple[sharding.AnyCache, jax.Array]:
  """Forgets every cached block (statistics are kept). Refused while any page is in use.

  Returns ``(cache, ok)``.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
  >>> cache, found = match_prefix(init_cache(spec), jnp.array([0]), jnp.ones((1, 5), jnp.int32),
  ...                             jnp.array([5]))
  >>> k = jnp.ones((5, 1, 8))
  >>> cache = release(write_kv(cache, 0, k, k, found.slots), jnp.array([0]))
  >>> int(num_cached_free_pages(cache))
  1
  >>> cache, ok = reset_prefix_cache(cache)
  >>> bool(ok), int(num_cached_free_pages(cache)), int(num_free_pages(cache))
  (True, 0, 8)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.reset_prefix_cache(cache)
  check_cache(cache)
  return _reset(cache)


@jax.jit
def _reset(cache):
  spec, prefix = cache.spec, cache.prefix
  ok = jnp.all(cache.ref_counts == 0)
  if prefix is None:
    return cache, ok
  fresh = init_prefix_state(spec)
  # Blocks are forgotten; sequences are not: one started with no token yet (match_prefix
  # appending 0 tokens) keeps its salt, so what it appends later stays under that salt.
  reset = dataclasses.replace(
      cache,
      free_pages=jnp.arange(spec.num_pages - 1, -1, -1, dtype=jnp.int32),
      num_free=jnp.int32(spec.num_pages),
      prefix=dataclasses.replace(fresh, page_gen=prefix.page_gen + 1, clock=prefix.clock,
                                 stats=prefix.stats, seq_salt=prefix.seq_salt,
                                 seq_hashable=prefix.seq_hashable))
  keep = lambda new, old: jnp.where(ok, new, old)
  return with_pools(keep_unless_pools(keep, reset, cache), pools(cache)), ok


def prefix_stats(cache: sharding.AnyCache) -> dict:
  """Prefix-cache counters as int32/float32 scalars (usable in jit): ``lookup_blocks``,
  ``hit_blocks``, ``hit_rate`` (hit / lookup blocks), ``lookup_tokens``, ``hit_tokens``,
  ``evictions``, ``registered``, ``not_registered`` (table full, duplicate or over
  ``max_cached_blocks``), ``cached_blocks`` and ``cached_free_pages``.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
  >>> cache, _ = match_prefix(init_cache(spec), jnp.array([0]), jnp.ones((1, 9), jnp.int32),
  ...                         jnp.array([9]))
  >>> stats = prefix_stats(cache)
  >>> int(stats["lookup_blocks"]), int(stats["registered"]), float(stats["hit_rate"])
  (2, 2, 0.0)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.per_shard(cache, prefix_stats)
  check_cache(cache)
  prefix = cache.prefix
  if prefix is None:
    stats = {name: jnp.int32(0) for name in STATS}
    stats.update(cached_blocks=jnp.int32(0), cached_free_pages=jnp.int32(0))
  else:
    stats = {name: prefix.stats[i] for i, name in enumerate(STATS)}
    stats.update(cached_blocks=prefix.num_cached, cached_free_pages=prefix.num_evictable)
  stats["hit_rate"] = stats["hit_blocks"] / jnp.maximum(stats["lookup_blocks"], 1)
  return stats
