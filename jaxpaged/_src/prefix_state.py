"""Prefix-cache state inside the cache pytree, and the allocator's hooks into it.

Every full block gets a chained hash when it fills (`register_blocks`); it is then registered in
the hash table unless an equal block is already cached, the table is full around its key, or
``max_cached_blocks`` is reached. A registered page is *cached*: when its last reference goes,
it is not freed but becomes *evictable*, and a later prompt with the same prefix can take it
back (`jaxpaged.match_prefix`). The allocator uses never-cached free pages first and evicts only
when it must, least recently used first and, among blocks released together, the chain's tail
before its head (`select_victims`).

A hit is trusted only if the page still holds exactly that block: its token ids, salt and hash
are stored with it, and each page records its parent page *and the parent's generation*, a
counter bumped every time a page is handed out. So a stale table entry, a hash collision or a
reused parent page can never put another prompt's K/V under a request.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxpaged._src import hashing
from jaxpaged._src import table

# Counters in PrefixState.stats.
STATS = ("lookup_blocks", "hit_blocks", "lookup_tokens", "hit_tokens", "evictions",
         "registered", "not_registered")
STAT = {name: i for i, name in enumerate(STATS)}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["page_hash", "page_tokens", "page_salt", "page_parent", "page_parent_gen",
                 "page_gen", "page_cached", "page_last_use", "page_depth", "seq_salt",
                 "seq_hashable", "table_lo", "table_hi", "table_pages", "num_evictable",
                 "num_cached", "clock", "stats"],
    meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PrefixState:
  """Prefix-cache arrays of a `PagedKVCache` (``cache.prefix``; None when disabled).

  Attributes (P pages, S sequences, C table slots):
    page_hash: ``uint32[P, 2]`` chained hash of the full block a page holds.
    page_tokens: ``int32[P, page_size]`` token ids written into each page.
    page_salt, page_parent, page_parent_gen, page_depth: ``int32[P]`` the block's salt, parent
      page (-1 for a first block), the parent's generation when registered, block index.
    page_gen: ``int32[P]`` bumped whenever the page is handed out.
    page_cached: ``bool[P]`` registered in the table. page_last_use: ``int32[P]`` clock.
    seq_salt: ``int32[S]``; seq_hashable: ``bool[S]`` every token of the sequence came with
      its id, so its blocks can be hashed and registered.
    table_lo, table_hi, table_pages: ``int32[C]`` the hash table (`jaxpaged._src.table`).
    num_evictable, num_cached, clock: ``int32[]``. stats: ``int32[len(STATS)]``.
  """

  page_hash: jax.Array
  page_tokens: jax.Array
  page_salt: jax.Array
  page_parent: jax.Array
  page_parent_gen: jax.Array
  page_gen: jax.Array
  page_cached: jax.Array
  page_last_use: jax.Array
  page_depth: jax.Array
  seq_salt: jax.Array
  seq_hashable: jax.Array
  table_lo: jax.Array
  table_hi: jax.Array
  table_pages: jax.Array
  num_evictable: jax.Array
  num_cached: jax.Array
  clock: jax.Array
  stats: jax.Array


def init_prefix_state(spec) -> PrefixState:
  pages, seqs, capacity = spec.num_pages, spec.max_seqs, spec.table_capacity
  zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
  return PrefixState(
      page_hash=jnp.zeros((pages, 2), jnp.uint32), page_tokens=zeros(pages, spec.page_size),
      page_salt=zeros(pages), page_parent=jnp.full((pages,), -1, jnp.int32),
      page_parent_gen=zeros(pages), page_gen=zeros(pages),
      page_cached=jnp.zeros((pages,), bool), page_last_use=zeros(pages),
      page_depth=zeros(pages), seq_salt=zeros(seqs), seq_hashable=jnp.zeros((seqs,), bool),
      table_lo=zeros(capacity), table_hi=zeros(capacity),
      table_pages=jnp.full((capacity,), table.EMPTY, jnp.int32),
      num_evictable=jnp.int32(0), num_cached=jnp.int32(0), clock=jnp.int32(0),
      stats=zeros(len(STATS)))


def bump(stats, name, amount):
  return stats.at[STAT[name]].add(jnp.asarray(amount, jnp.int32))


def select_victims(prefix: PrefixState, ref_counts, count, max_count: int, protect=None):
  """Evicts ``count`` (<= ``max_count``, static) unreferenced cached pages: least recently
  used first, deeper blocks first among equals. Their table entries are removed. Pages in the
  optional ``bool[P]`` ``protect`` mask are not taken (``count`` must leave them out).

  Costs a sort over all pages, so the allocator runs it only when the free pages run short.

  Returns ``(prefix, victims int32[max_count])``; entries past ``count`` are -1.
  """
  evictable = prefix.page_cached & (ref_counts == 0)
  if protect is not None:
    evictable &= ~protect
  order = jnp.lexsort((-prefix.page_depth, prefix.page_last_use, ~evictable))
  order = jnp.pad(order, (0, max(0, max_count - order.shape[0])), constant_values=-1)
  take = jnp.arange(max_count) < count
  victims = jnp.where(take, order[:max_count], -1)
  safe = jnp.clip(victims, 0)
  nowhere = prefix.page_cached.shape[0]
  table_pages = table.delete(prefix.table_lo, prefix.table_hi, prefix.table_pages,
                             prefix.page_hash[safe], safe, take)
  return dataclasses.replace(
      prefix, table_pages=table_pages,
      page_cached=prefix.page_cached.at[jnp.where(take, victims, nowhere)].set(False, mode="drop"),
      num_evictable=prefix.num_evictable - count, num_cached=prefix.num_cached - count,
      stats=bump(prefix.stats, "evictions", count)), victims


def register_blocks(prefix: PrefixState, page_table, seq_ids, old_len, new_len, row_ok, *,
                    page_size: int, max_blocks: int, hash_fn: str, max_cached: int):
  """Hashes the blocks that became full (rows in ``row_ok`` whose sequences are hashable), in
  chain order, and registers them in the table.

  ``max_blocks`` (static) bounds the blocks one row can fill in this call.
  """
  rows = jnp.clip(seq_ids, 0)
  hashable = row_ok & prefix.seq_hashable[rows]
  first_full = old_len // page_size  # logical pages [first_full, last_full) just filled
  last_full = jnp.where(hashable, new_len // page_size, first_full)
  nowhere = prefix.page_hash.shape[0]

  def hash_column(k, page_hash):
    j = first_full + k
    valid = j < last_full
    page = page_table[rows, jnp.clip(j, 0, page_table.shape[1] - 1)]
    parent = page_table[rows, jnp.clip(j - 1, 0, page_table.shape[1] - 1)]
    h = hashing.next_block_hash(jnp, page_hash[jnp.clip(parent, 0)],
                                prefix.page_tokens[jnp.clip(page, 0)], prefix.seq_salt[rows],
                                j == 0, hash_fn)
    return page_hash.at[jnp.where(valid, page, nowhere)].set(h, mode="drop")

  # Column k is every row's k-th new full block; a column's parents are the previous column's.
  page_hash = jax.lax.fori_loop(0, jnp.max(last_full - first_full), hash_column,
                                prefix.page_hash)
  k = jnp.arange(max_blocks)
  j = first_full[:, None] + k  # [B, K]
  valid = j < last_full[:, None]
  page = jnp.where(valid, page_table[rows[:, None], jnp.clip(j, 0, page_table.shape[1] - 1)], -1)
  parent = jnp.where(valid & (j > 0),
                     page_table[rows[:, None], jnp.clip(j - 1, 0, page_table.shape[1] - 1)], -1)
  page, parent, j, valid = (x.reshape(-1) for x in (page, parent, j, valid))
  room = max_cached - prefix.num_cached
  want = valid & (jnp.cumsum(valid) <= room)
  hashes = page_hash[jnp.clip(page, 0)]
  table_lo, table_hi, table_pages, inserted = table.insert(
      prefix.table_lo, prefix.table_hi, prefix.table_pages, hashes, page, want)
  at = jnp.where(inserted, page, nowhere)
  count = jnp.sum(inserted, dtype=jnp.int32)
  salt = jnp.repeat(prefix.seq_salt[rows], max_blocks)
  return dataclasses.replace(
      prefix, page_hash=page_hash, table_lo=table_lo, table_hi=table_hi,
      table_pages=table_pages,
      page_cached=prefix.page_cached.at[at].set(True, mode="drop"),
      page_salt=prefix.page_salt.at[at].set(salt, mode="drop"),
      page_parent=prefix.page_parent.at[at].set(parent, mode="drop"),
      page_parent_gen=prefix.page_parent_gen.at[at].set(
          jnp.where(parent >= 0, prefix.page_gen[jnp.clip(parent, 0)], 0), mode="drop"),
      page_depth=prefix.page_depth.at[at].set(j, mode="drop"),
      page_last_use=prefix.page_last_use.at[at].set(prefix.clock, mode="drop"),
      num_cached=prefix.num_cached + count,
      stats=bump(bump(prefix.stats, "registered", count), "not_registered",
                 jnp.sum(valid) - count))
