"""The allocator's hooks into the prefix cache: what `extend`, `release` and `fork` change in
`PrefixState`. `jaxpaged._src.allocator` calls only these (and only with prefix caching on), so
the allocator knows nothing else of prefix caching.

Internal API: `evictable`, `evict_for_allocation`, `note_extend`, `note_release`, `note_fork`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpaged._src.prefix_state import (PrefixState, choose_victims, evict_if, fully_written,
                                        register_blocks, unregister)


def evictable(prefix: PrefixState | None) -> jax.Array:
  """``int32[]`` unreferenced pages that keep a cached block (0 without prefix caching)."""
  return prefix.num_evictable if prefix is not None else jnp.int32(0)


def evict_for_allocation(prefix: PrefixState | None, ref_counts, shortfall, max_count: int):
  """``(prefix, victims)``: past the never-cached free pages, evicts ``shortfall`` cached blocks
  nobody uses (only when needed: the choice sorts all pages); ``victims`` is
  ``int32[max_count]``, -1 padded (None without prefix caching)."""
  if prefix is None:
    return None, None
  return evict_if(shortfall > 0, prefix,
                  lambda p: choose_victims(p, ref_counts, shortfall, max_count), max_count)


def note_extend(prefix: PrefixState, cache, seq_ids, plan, row_ok, tokens, slots, copies,
                handed_out, width: int) -> PrefixState:
  """Prefix bookkeeping of an `extend`: new pages get a new generation, token ids are stored,
  copied pages keep theirs, and blocks that filled are hashed and registered. ``copies`` is
  ``(cow_src, cow_dst)``, the copy-on-write pages; ``cache`` the cache after allocation."""
  cow_src, cow_dst = copies
  spec = cache.spec
  ps, num_pages = spec.page_size, spec.num_pages
  rows = jnp.where(row_ok, seq_ids, spec.max_seqs)
  if tokens is None:
    hashable = jnp.zeros(seq_ids.shape, bool)
  else:  # a sequence stays hashable only while every token comes with its id
    hashable = jnp.where(plan.old_len == 0, True,
                         prefix.seq_hashable[jnp.clip(seq_ids, 0, spec.max_seqs - 1)])
  page_tokens = prefix.page_tokens.at[cow_dst].set(prefix.page_tokens[cow_src], mode="drop")
  if tokens is not None:
    at = jnp.where(slots >= 0, slots // ps, num_pages)
    page_tokens = page_tokens.at[at, slots % ps].set(tokens, mode="drop")
  # A page handed out holds nothing written yet; a copy holds what its source held.
  page_written = prefix.page_written.at[handed_out].set(False, mode="drop")
  # (cow_src pages were not handed out: reading them from the updated array saves a copy)
  page_written = page_written.at[cow_dst].set(page_written[cow_src], mode="drop")
  prefix = dataclasses.replace(
      prefix, page_tokens=page_tokens, page_written=page_written,
      page_gen=prefix.page_gen.at[handed_out].add(1, mode="drop"),
      seq_hashable=prefix.seq_hashable.at[rows].set(hashable, mode="drop"),
      clock=prefix.clock + jnp.any(row_ok))  # a refused call changes nothing, the clock neither
  if tokens is None:
    return prefix
  return register_blocks(
      prefix, cache.page_table, seq_ids, plan.old_len, plan.new_len, row_ok,
      page_size=ps, max_blocks=width, hash_fn=spec.block_hash,
      max_cached=spec.max_cached_blocks)


def note_release(prefix: PrefixState, held, freed, rows, any_live):
  """``(prefix, freed)`` after a release drops the references of ``held`` (``int32[N]``,
  sorted; ``freed`` marks those now unreferenced, once each) and empties ``rows``.

  Cached blocks stay, evictable, for later prompts, if their K/V were written; a block
  registered but never written (its sequence ended first) must never be served: dropped. The
  returned ``freed`` leaves out the pages kept."""
  num_pages = prefix.page_cached.shape[0]
  safe = jnp.clip(held, 0, num_pages - 1)
  cached = freed & prefix.page_cached[safe]
  kept = cached & fully_written(prefix, safe)
  prefix = unregister(prefix, held, cached & ~kept)
  prefix = dataclasses.replace(
      prefix,
      page_last_use=prefix.page_last_use.at[jnp.where(kept, held, num_pages)].set(
          prefix.clock, mode="drop"),
      num_evictable=prefix.num_evictable + jnp.sum(kept, dtype=jnp.int32),
      seq_salt=prefix.seq_salt.at[rows].set(0, mode="drop"),
      seq_hashable=prefix.seq_hashable.at[rows].set(False, mode="drop"),
      clock=prefix.clock + any_live)  # releasing nothing changes nothing
  return prefix, freed & ~kept


def note_fork(prefix: PrefixState, src, dst) -> PrefixState:
  """A fork continues its source's chain, salt included (``dst`` out of range: skipped)."""
  return dataclasses.replace(
      prefix, seq_salt=prefix.seq_salt.at[dst].set(prefix.seq_salt[src], mode="drop"),
      seq_hashable=prefix.seq_hashable.at[dst].set(prefix.seq_hashable[src], mode="drop"))
