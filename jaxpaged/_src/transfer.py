"""The device half of moving K/V between the pool and host RAM: jitted, pure and atomic.

`restore_core` makes room for a sequence (attaching its blocks still cached on device, when its
tokens are known) and writes its K/V in one step, or changes nothing; `demote_plan` chooses the
blocks to evict exactly as the allocator would (least recently used first, a chain's tail first)
and reads their contents, and `evict_blocks` frees them; `gather_sequence` reads one sequence.
The host half (what to move, the host copies) is `jaxpaged._src.swap`.

Internal API: `gather_sequence`, `restore_core`, `restore_jit`, `prefix_tokens`, `demote_plan`,
`evict_blocks`, `evict_jit`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxpaged._src import prefix_state
from jaxpaged._src.allocator import extend_core
from jaxpaged._src.cache import pools, with_pools
from jaxpaged._src.prefix import match_core


@functools.partial(jax.jit, static_argnames=("num_pages",))
def gather_sequence(cache, seq_id, *, num_pages):
  """The pools' pages of one sequence (a dict like `cache.pools`: K/V ``[L, H, num_pages, ps,
  D]``, scales ``[L, H, num_pages, ps]``), its token ids and written flags, in logical order."""
  pages = cache.page_table[seq_id, :num_pages]
  prefix = cache.prefix
  tokens = None if prefix is None else prefix.page_tokens[pages].reshape(-1)
  written = None if prefix is None else prefix.page_written[pages]
  take = lambda pool: jnp.take(pool, pages, axis=2, mode="clip")  # the fastest gather on CPU
  return {name: take(pool) for name, pool in pools(cache).items()}, tokens, written


def restore_core(cache, seq_id, length, tokens, salt, kv, written, num_evicted=None, *,
                 match: bool):
  """Makes room for ``length`` tokens of ``seq_id`` and writes their pages ``kv`` (a dict of
  every pool of `cache.pools`, K/V ``[L, H, n, ps, D]``, scales ``[L, H, n, ps]``).

  ``match``: the sequence is new and its ``tokens`` are known, so blocks still cached on device
  are attached (`match_prefix`) and only the rest is copied. Otherwise the tokens are appended
  (`extend`, registering full blocks when ``tokens`` are given). ``salt`` is ``uint32[2]``;
  ``written`` ``bool[n, L, ps]`` says which copied K/V count as written (None: every token
  below ``length``). ``num_evicted`` (an int32 scalar, or None to leave it): the tokens
  `compress` had dropped from it. Traceable and atomic: ``(cache, ok)``.
  """
  spec = cache.spec
  ps = spec.page_size
  num_pages = kv["k_pages"].shape[2]
  width = num_pages * ps
  seq_ids = seq_id[None]
  if match:
    cache, found = match_core(cache, seq_ids, tokens[None], length[None], salt[None], None,
                              num_slots=width, impl="auto", interpret=False)
    start, slots, ok = found.num_cached[0], found.slots, found.ok
  else:
    cache, slots, ok = extend_core(cache, seq_ids, length[None], tokens, num_slots=width)
    start = 0
  # New tokens start on a page boundary (hits and promoted blocks are whole pages), so whole
  # pages are copied: source page i goes where the new range's page i - skip starts (skip: pages
  # attached as hits). Only page ids are gathered; the K/V move once, in one scatter.
  i = jnp.arange(num_pages) - start // ps
  first = slots[jnp.clip(i * ps, 0, width - 1)]
  page = jnp.where((i >= 0) & (first >= 0), first // ps, spec.num_pages)  # else dropped
  write = lambda pool, new: pool.at[:, :, page].set(new, mode="drop")
  prefix = cache.prefix
  if prefix is not None:
    if written is None:
      below = jnp.arange(width).reshape(-1, 1, ps) < length
      written = jnp.broadcast_to(below, (num_pages, spec.num_layers, ps))
    prefix = dataclasses.replace(prefix, page_written=prefix.page_written.at[page].set(
        written, mode="drop"))
  new = {name: write(pool, kv[name]) for name, pool in pools(cache).items()}
  cache = dataclasses.replace(with_pools(cache, new), prefix=prefix)
  if num_evicted is not None:
    cache = dataclasses.replace(cache, num_evicted=cache.num_evicted.at[seq_id].set(
        jnp.where(ok, num_evicted, cache.num_evicted[seq_id])))
  return cache, ok


restore_jit = jax.jit(restore_core, static_argnames=("match",))


def prefix_tokens(prefix, pages, max_blocks: int, page_size: int):
  """Token ids of the whole prefix each cached page ends, by walking its parent links.

  Returns ``(tokens int32[M, max_blocks * page_size], complete bool[M])``; a walk is incomplete
  when a parent page was handed out again since (its generation moved on).
  """
  rows = jnp.arange(pages.shape[0])[:, None]
  width = max_blocks * page_size

  def step(_, carry):
    page, alive, complete, out = carry
    depth = prefix.page_depth[page]
    cols = jnp.where(alive[:, None], depth[:, None] * page_size + jnp.arange(page_size), width)
    out = out.at[rows, cols].set(prefix.page_tokens[page], mode="drop")
    parent = prefix.page_parent[page]
    linked = (parent >= 0) & (prefix.page_gen[jnp.clip(parent, 0)] == prefix.page_parent_gen[page])
    complete |= alive & (depth == 0)
    alive &= linked
    return jnp.where(linked, parent, page), alive, complete, out

  start = (pages, jnp.ones(pages.shape, bool), jnp.zeros(pages.shape, bool),
           jnp.zeros((pages.shape[0], width), jnp.int32))
  _, _, complete, out = jax.lax.fori_loop(0, max_blocks, step, start)
  return out, complete


@functools.partial(jax.jit, static_argnames=("max_count",))
def demote_plan(cache, count, keep, *, max_count: int):
  """The ``min(count, evictable)`` cached blocks nobody uses that the allocator would evict
  next, except the pages listed in ``keep`` (``int32[K]``, -1 padded), and their contents.
  Changes nothing (apply with `evict_blocks`).

  Returns ``(victims int32[max_count], contents)``: victims -1 past the count; ``contents`` a
  dict of ``hashes``, ``salts``, ``depths``, ``tokens`` (the whole prefix), ``complete`` (that
  prefix could be read back), ``priorities`` (retention priority), ``kv`` (the pools' pages, by `cache.pools` name) per victim.
  """
  spec, prefix = cache.spec, cache.prefix
  protect = jnp.zeros((spec.num_pages,), bool).at[
      jnp.where(keep >= 0, keep, spec.num_pages)].set(True, mode="drop")
  kept = jnp.sum(protect & prefix.page_cached & (cache.ref_counts == 0), dtype=jnp.int32)
  count = jnp.clip(jnp.minimum(count, prefix.num_evictable - kept), 0, max_count)
  victims = prefix_state.choose_victims(prefix, cache.ref_counts, count, max_count, protect)
  safe = jnp.clip(victims, 0)
  tokens, complete = prefix_tokens(prefix, safe, spec.max_pages_per_seq, spec.page_size)
  # Evictable blocks were all written (release drops the others); checked again all the same.
  complete &= (victims >= 0) & prefix_state.fully_written(prefix, safe)
  return victims, dict(hashes=prefix.page_hash[safe], salts=prefix.page_salt[safe],
                       depths=prefix.page_depth[safe], tokens=tokens, complete=complete,
                       priorities=prefix_state.effective_priority(prefix)[safe],
                       kv={name: pool[:, :, safe] for name, pool in pools(cache).items()})


def evict_blocks(cache, victims):
  """Evicts the unreferenced cached pages ``victims`` (``int32[N]``, -1 padded at the end, as
  `demote_plan` returns them) and frees them. Traceable."""
  if cache.prefix is None:  # nothing is ever cached
    return cache
  take = victims >= 0
  count = jnp.sum(take, dtype=jnp.int32)
  push_to = jnp.where(take, cache.num_free + jnp.cumsum(take) - 1, cache.spec.num_pages)
  return dataclasses.replace(
      cache, prefix=prefix_state.evict(cache.prefix, victims), num_free=cache.num_free + count,
      free_pages=cache.free_pages.at[push_to].set(victims, mode="drop"))


evict_jit = jax.jit(evict_blocks)
