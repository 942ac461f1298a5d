"""Prefix-cache state inside the cache pytree, and the allocator's hooks into it.

Every full block gets a chained hash when it fills (`register_blocks`) and its metadata (salt,
parent, depth) is recorded with its page; it is then registered in the hash table unless an
equal block is already registered (a *duplicate*: two sequences computed the same block), the
table is full around its key, or ``max_cached_blocks`` is reached. A registered page is
*cached*: when its last reference goes, it is not freed but becomes *evictable*, and a later
prompt with the same prefix can take it back (`jaxpaged.match_prefix`). The allocator uses
never-cached free pages first and evicts only when it must, least recently used first and,
among blocks released together, the chain's tail before its head (`choose_victims`).

One page per block content: a block's parent is the *registered* page holding the previous
block (its *canonical* page), not necessarily the sequence's own page. So when two sequences
compute the same prefix at once, the blocks that follow in either sequence chain onto the one
registered copy and a later prompt sharing both hits every block.

A hit is trusted only if the page still holds exactly that block: its token ids, salt and hash
are stored with it, and each page records its parent page *and the parent's generation*, a
counter bumped every time a page is handed out. So a stale table entry, a hash collision or a
reused parent page can never put another prompt's K/V under a request. And a block is served
only once its K/V are written: ``page_written`` records, per page, layer and offset, what
`jaxpaged.write_kv` (or a swap-in) wrote since the page was handed out; a registered block that
was never fully written is dropped when its last sequence releases it, so what is evictable (and
so what is demoted to host RAM) was always written.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpaged._src import hashing
from jaxpaged._src import table

# Counters in PrefixState.stats.
STATS = ("lookup_blocks", "hit_blocks", "lookup_tokens", "hit_tokens", "evictions",
         "registered", "not_registered", "duplicate_blocks")
STAT = {name: i for i, name in enumerate(STATS)}
# The PrefixState fields indexed by page (leading axis num_pages): what follows a page that
# `jaxpaged.defragment` moves; of them, the ones whose values are page ids.
PAGE_FIELDS = ("page_hash", "page_tokens", "page_salt", "page_parent", "page_parent_gen",
               "page_gen", "page_cached", "page_last_use", "page_depth", "page_written",
               "page_priority", "page_priority_gen")
PAGE_ID_FIELDS = ("page_parent",)
# page_parent of a first block, and of a block whose prefix is not registered (never matched).
NO_PARENT, UNLINKED = -1, -2
_RESOLVE = -3  # register_blocks: a row's parent not looked up yet


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["page_hash", "page_tokens", "page_salt", "page_parent", "page_parent_gen",
                 "page_gen", "page_cached", "page_last_use", "page_depth", "page_written",
                 "seq_salt", "seq_hashable", "table_lo", "table_hi", "table_pages",
                 "num_evictable", "num_cached", "clock", "stats", "page_priority",
                 "page_priority_gen", "expire_before"],
    meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PrefixState:
  """Prefix-cache arrays of a `PagedKVCache` (``cache.prefix``; None when disabled).

  Attributes (P pages, S sequences, C table slots, L layers):
    page_hash: ``uint32[P, 2]`` chained hash of the full block a page holds.
    page_tokens: ``int32[P, page_size]`` token ids written into each page.
    page_salt: ``uint32[P, 2]`` the block's 64-bit salt (low, high lanes).
    page_parent, page_parent_gen, page_depth: ``int32[P]`` the registered page of the previous
      block (`NO_PARENT` for a first block, `UNLINKED` if that block is not registered), its
      generation when this block was hashed, block index.
    page_gen: ``int32[P]`` bumped whenever the page is handed out.
    page_cached: ``bool[P]`` registered in the table. page_last_use: ``int32[P]`` clock.
    page_written: ``bool[P, L, page_size]`` K/V written since the page was handed out.
    seq_salt: ``uint32[S, 2]``; seq_hashable: ``bool[S]`` every token of the sequence came
      with its id, so its blocks can be hashed and registered.
    table_lo, table_hi, table_pages: ``int32[C]`` the hash table (`jaxpaged._src.table`).
    num_evictable, num_cached, clock: ``int32[]``. stats: ``int32[len(STATS)]``.
    page_priority, page_priority_gen: ``int32[P]`` the retention priority of the block a page
      holds (`jaxpaged.CacheManager.admit`'s ``priority``, the highest of the requests that
      released it), valid while ``page_priority_gen`` equals ``page_gen`` (0 otherwise: see
      `effective_priority`); lower priorities are evicted first.
    expire_before: ``int32[]`` pages last used at a clock below it are expired (their prefix
      TTL passed): evicted before any other (`jaxpaged._src.retention` sets it; 0: none).
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
  page_written: jax.Array
  seq_salt: jax.Array
  seq_hashable: jax.Array
  table_lo: jax.Array
  table_hi: jax.Array
  table_pages: jax.Array
  num_evictable: jax.Array
  num_cached: jax.Array
  clock: jax.Array
  stats: jax.Array
  page_priority: jax.Array
  page_priority_gen: jax.Array
  expire_before: jax.Array


def init_prefix_state(spec) -> PrefixState:
  pages, seqs, capacity = spec.num_pages, spec.max_seqs, spec.table_capacity
  zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
  return PrefixState(
      page_hash=jnp.zeros((pages, 2), jnp.uint32), page_tokens=zeros(pages, spec.page_size),
      page_salt=jnp.zeros((pages, 2), jnp.uint32),
      page_parent=jnp.full((pages,), NO_PARENT, jnp.int32),
      page_parent_gen=zeros(pages), page_gen=zeros(pages),
      page_cached=jnp.zeros((pages,), bool), page_last_use=zeros(pages),
      page_depth=zeros(pages),
      page_written=jnp.zeros((pages, spec.num_layers, spec.page_size), bool),
      seq_salt=jnp.zeros((seqs, 2), jnp.uint32), seq_hashable=jnp.zeros((seqs,), bool),
      table_lo=zeros(capacity), table_hi=zeros(capacity),
      table_pages=jnp.full((capacity,), table.EMPTY, jnp.int32),
      num_evictable=jnp.int32(0), num_cached=jnp.int32(0), clock=jnp.int32(0),
      stats=zeros(len(STATS)), page_priority=zeros(pages), page_priority_gen=zeros(pages),
      expire_before=jnp.int32(0))


def bump(stats, name, amount):
  return stats.at[STAT[name]].add(jnp.asarray(amount, jnp.int32))


def fully_written(prefix: PrefixState, pages) -> jax.Array:
  """``bool[...]``: every layer's K/V of every slot of ``pages`` was written."""
  return jnp.all(prefix.page_written[jnp.clip(pages, 0)], axis=(-2, -1))


class BlockView(NamedTuple):
  """What a page records of the block it holds (``...`` the pages' shape)."""
  cached: jax.Array  # bool[...] registered in the table
  hash: jax.Array  # uint32[..., 2]
  salt: jax.Array  # uint32[..., 2]
  tokens: jax.Array  # int32[..., page_size]
  parent: jax.Array  # int32[...]
  parent_gen: jax.Array  # int32[...]


def block_view(prefix: PrefixState, pages) -> BlockView:
  """The recorded blocks of ``pages`` (-1: not registered)."""
  safe = jnp.clip(pages, 0)
  return BlockView((pages >= 0) & prefix.page_cached[safe], prefix.page_hash[safe],
                   prefix.page_salt[safe], prefix.page_tokens[safe], prefix.page_parent[safe],
                   prefix.page_parent_gen[safe])


def holds_block(view: BlockView, hashes, salts, tokens, parent, parent_gen):
  """``bool[...]``: the page of ``view`` is registered and holds exactly this block: the same
  hash (``uint32[..., 2]``), salt (``uint32[..., 2]``), token ids (``int32[..., page_size]``),
  and parent page at generation ``parent_gen`` (``parent`` is `NO_PARENT` for a first block)."""
  return (view.cached & jnp.all(view.hash == hashes, axis=-1)
          & jnp.all(view.salt == salts, axis=-1) & jnp.all(view.tokens == tokens, axis=-1)
          & (view.parent == parent) & ((parent < 0) | (view.parent_gen == parent_gen)))


# Bounds of a retention priority (`effective_priority`): the ranks past them order expired and
# unevictable pages in `choose_victims`.
MIN_PRIORITY, MAX_PRIORITY = -(1 << 30), 1 << 30


def effective_priority(prefix: PrefixState) -> jax.Array:
  """``int32[P]`` each page's retention priority: ``page_priority`` if it was set since the page
  was last handed out, else 0."""
  return jnp.where(prefix.page_priority_gen == prefix.page_gen, prefix.page_priority, 0)


def choose_victims(prefix: PrefixState, ref_counts, count, max_count: int, protect=None):
  """The ``count`` (<= ``max_count``, static) unreferenced cached pages to evict next: expired
  ones (last used before ``expire_before``) first, then lower retention priority first, then
  least recently used first, deeper blocks first among equals; never pages in the optional
  ``bool[P]`` ``protect`` mask (``count`` must leave them out). Costs a sort over all pages.

  Returns ``int32[max_count]``, -1 past ``count``.
  """
  evictable = prefix.page_cached & (ref_counts == 0)
  if protect is not None:
    evictable &= ~protect
  # One key for "evictable, expired, priority": with no priority and no TTL it is 0 or the
  # top rank, the order of ~evictable alone.
  expired = prefix.page_last_use < prefix.expire_before
  rank = jnp.where(~evictable, MAX_PRIORITY + 1,
                   jnp.where(expired, MIN_PRIORITY - 1, effective_priority(prefix)))
  order = jnp.lexsort((-prefix.page_depth, prefix.page_last_use, rank))
  order = jnp.pad(order, (0, max(0, max_count - order.shape[0])), constant_values=-1)
  return jnp.where(jnp.arange(max_count) < count, order[:max_count], -1).astype(jnp.int32)


def unregister(prefix: PrefixState, pages, mask) -> PrefixState:
  """Removes the blocks of ``pages`` where ``mask`` from the table (their pages stay as they
  are). ``pages`` must be distinct where ``mask``."""
  safe = jnp.clip(pages, 0)
  nowhere = prefix.page_cached.shape[0]
  return dataclasses.replace(
      prefix,
      table_pages=table.delete(prefix.table_lo, prefix.table_hi, prefix.table_pages,
                               prefix.page_hash[safe], safe, mask),
      page_cached=prefix.page_cached.at[jnp.where(mask, pages, nowhere)].set(False, mode="drop"),
      num_cached=prefix.num_cached - jnp.sum(mask, dtype=jnp.int32))


def evict(prefix: PrefixState, victims) -> PrefixState:
  """Evicts the evictable cached pages ``victims`` (``int32[N]``, -1 padded, distinct)."""
  take = victims >= 0
  count = jnp.sum(take, dtype=jnp.int32)
  prefix = unregister(prefix, victims, take)
  return dataclasses.replace(prefix, num_evictable=prefix.num_evictable - count,
                             stats=bump(prefix.stats, "evictions", count))


_EVICTED_FIELDS = ("table_pages", "page_cached", "num_evictable", "num_cached", "stats")


def evict_if(needed, prefix: PrefixState, choose, max_count: int):
  """``(prefix, victims int32[max_count])``: evicts the pages ``choose(prefix)`` picks, only
  when ``needed`` (choosing sorts all pages). Only the fields eviction changes go through the
  branch, so the big ones (token ids, written flags) are never copied."""
  def evict_chosen(fields):
    victims = choose(prefix)
    evicted = evict(dataclasses.replace(prefix, **fields), victims)
    return {name: getattr(evicted, name) for name in _EVICTED_FIELDS}, victims

  fields, victims = jax.lax.cond(
      needed, evict_chosen, lambda fields: (fields, jnp.full((max_count,), -1, jnp.int32)),
      {name: getattr(prefix, name) for name in _EVICTED_FIELDS})
  return dataclasses.replace(prefix, **fields), victims


def note_written(prefix: PrefixState, layer, slots, page_size: int) -> PrefixState:
  """Records that ``layer``'s K/V of ``slots`` (``int32[T]``; out-of-range ones skipped) were
  written."""
  num_pages, num_layers = prefix.page_written.shape[:2]
  valid = (slots >= 0) & (slots < num_pages * page_size) & (layer >= 0) & (layer < num_layers)
  page = jnp.where(valid, slots // page_size, num_pages)
  return dataclasses.replace(prefix, page_written=prefix.page_written.at[
      page, layer, slots % page_size].set(True, mode="drop"))


def register_blocks(prefix: PrefixState, page_table, seq_ids, old_len, new_len, row_ok, *,
                    page_size: int, max_blocks: int, hash_fn: str, max_cached: int):
  """Hashes the blocks that became full (rows in ``row_ok`` whose sequences are hashable), in
  chain order, records their metadata and registers them in the table.

  A block equal to a registered one (same hash, salt, token ids and parent) is a duplicate: not
  registered again, and the row's next block chains onto the registered copy. A block's parent
  is the registered page holding the previous block (for a row's first new block, looked up now:
  another row of this very call may have registered it). A block whose key is taken by another
  block, or that finds the table or ``max_cached`` full, is not registered, and neither is
  anything after it in its row (no prompt could reach it). ``max_blocks`` (static) bounds the
  blocks one row fills in this call.
  """
  walk = _new_blocks(prefix, page_table, seq_ids, old_len, new_len, row_ok,
                     page_size=page_size, max_blocks=max_blocks, hash_fn=hash_fn)
  num_rows = seq_ids.shape[0]
  size = num_rows * max_blocks
  # Block by block in chain order (rows in order), since each block's parent and each insert
  # depend on the ones before. Only the table and small per-block results are carried; the
  # pages' metadata is written after the loop. A decode step usually fills no block.
  start = _Inserts(prefix.table_lo, prefix.table_hi, prefix.table_pages,
                   jnp.full((num_rows,), _RESOLVE, jnp.int32), jnp.zeros((size,), jnp.int32),
                   jnp.zeros((size,), jnp.int32), jnp.zeros((size,), bool),
                   jnp.zeros((size,), bool), jnp.int32(max_cached) - prefix.num_cached)
  done = jax.lax.fori_loop(0, jnp.sum(walk.valid, dtype=jnp.int32),
                           functools.partial(_insert_block, walk), start)
  return _record_blocks(prefix, walk, done, max_cached)


class _Walk(NamedTuple):
  """`register_blocks`'s new full blocks, one entry per (row, k-th new block), row-major."""
  prefix: PrefixState
  page_hash: jax.Array  # uint32[P, 2], the new blocks hashed
  salts: jax.Array  # uint32[B, 2]
  row: jax.Array  # int32[N]
  j: jax.Array  # int32[N] logical block index
  valid: jax.Array  # bool[N] the entry is a block that just filled
  page: jax.Array  # int32[N] its page (num_pages when not valid)
  order: jax.Array  # int32[N] valid entries first, in order
  previous: jax.Array  # int32[B] the page before each row's first new block


class _Inserts(NamedTuple):
  """The insert loop's carry."""
  lo: jax.Array
  hi: jax.Array
  slots: jax.Array
  parents: jax.Array  # int32[B] each row's page for its next block's parent (or _RESOLVE)
  ent_parent: jax.Array  # int32[N]
  ent_gen: jax.Array  # int32[N]
  inserted: jax.Array  # bool[N]
  duplicates: jax.Array  # bool[N]
  room: jax.Array  # int32[] blocks max_cached still allows


def _new_blocks(prefix, page_table, seq_ids, old_len, new_len, row_ok, *, page_size: int,
                max_blocks: int, hash_fn: str) -> _Walk:
  """The `_Walk` of the blocks that became full, with their chained hashes computed."""
  num_pages, max_pages = prefix.page_hash.shape[0], page_table.shape[1]
  rows = jnp.clip(seq_ids, 0)
  hashable = row_ok & prefix.seq_hashable[rows]
  first_full = old_len // page_size  # logical pages [first_full, last_full) just filled
  last_full = jnp.where(hashable, new_len // page_size, first_full)
  salts = prefix.seq_salt[rows]  # [B, 2]
  at = lambda j: page_table[rows, jnp.clip(j, 0, max_pages - 1)]

  def hash_column(k, page_hash):
    j = first_full + k
    page, parent = at(j), at(j - 1)
    h = hashing.next_block_hash(jnp, page_hash[jnp.clip(parent, 0)],
                                prefix.page_tokens[jnp.clip(page, 0)], salts, j == 0, hash_fn)
    return page_hash.at[jnp.where(j < last_full, page, num_pages)].set(h, mode="drop")

  # Column k is every row's k-th new full block; a column's parents are the previous column's.
  page_hash = jax.lax.fori_loop(0, jnp.max(last_full - first_full, initial=0), hash_column,
                                prefix.page_hash)
  j = (first_full[:, None] + jnp.arange(max_blocks)).reshape(-1)  # [N = B * K], row-major
  row = jnp.repeat(jnp.arange(seq_ids.shape[0]), max_blocks)
  valid = j < last_full[row]
  page = jnp.where(valid, page_table[rows[row], jnp.clip(j, 0, max_pages - 1)], num_pages)
  return _Walk(prefix, page_hash, salts, row, j, valid, page,
               jnp.argsort(~valid, stable=True), at(first_full - 1))


def _recorded(walk: _Walk, pages) -> BlockView:
  """The blocks of ``pages`` as recorded, with this call's hashes."""
  return block_view(walk.prefix, pages)._replace(hash=walk.page_hash[jnp.clip(pages, 0)])


def _view(walk: _Walk, state: _Inserts, found) -> BlockView:
  """The block of page ``found`` as recorded, or as registered earlier in this call."""
  new = state.inserted & (walk.page == found)
  k = jnp.argmax(new)
  recorded, any_new = _recorded(walk, found), jnp.any(new)
  return recorded._replace(
      cached=recorded.cached | any_new,
      salt=jnp.where(any_new, walk.salts[walk.row[k]], recorded.salt),
      parent=jnp.where(any_new, state.ent_parent[k], recorded.parent),
      parent_gen=jnp.where(any_new, state.ent_gen[k], recorded.parent_gen))


def _parent_of(walk: _Walk, state: _Inserts, e):
  """``(parent, parent_gen)`` of entry ``e``: the registered page holding the block before."""
  b = walk.row[e]
  prev = _recorded(walk, walk.previous[b])
  prev_found = table.lookup(state.lo, state.hi, state.slots, prev.hash, impl="xla")
  resolved = jnp.where(prev.cached, walk.previous[b], jnp.where(holds_block(
      _view(walk, state, prev_found), prev.hash, prev.salt, prev.tokens, prev.parent,
      prev.parent_gen), prev_found, UNLINKED))
  parent = jnp.where(state.parents[b] != _RESOLVE, state.parents[b],
                     jnp.where(walk.j[e] > 0, resolved, NO_PARENT))
  return parent, jnp.where(parent >= 0, walk.prefix.page_gen[jnp.clip(parent, 0)], 0)


def _insert_block(walk: _Walk, i, state: _Inserts) -> _Inserts:
  """Registers the ``i``-th valid block (or finds its duplicate)."""
  e = walk.order[i]
  b, p = walk.row[e], walk.page[e]
  capacity = state.slots.shape[0]
  parent, parent_gen = _parent_of(walk, state, e)
  found, free_slot = table.probe(state.lo, state.hi, state.slots, walk.page_hash[p])
  linked = parent != UNLINKED
  duplicate = linked & holds_block(_view(walk, state, found), walk.page_hash[p], walk.salts[b],
                                   walk.prefix.page_tokens[p], parent, parent_gen)
  insert = linked & (found < 0) & (state.room > 0) & (free_slot < capacity)
  lo, hi, slots = table.put(state.lo, state.hi, state.slots,
                            jnp.where(insert, free_slot, capacity), walk.page_hash[p], p)
  parents = state.parents.at[b].set(jnp.where(duplicate, found,
                                              jnp.where(insert, p, UNLINKED)))
  return _Inserts(lo, hi, slots, parents, state.ent_parent.at[e].set(parent),
                  state.ent_gen.at[e].set(parent_gen), state.inserted.at[e].set(insert),
                  state.duplicates.at[e].set(duplicate), state.room - insert)


def _record_blocks(prefix: PrefixState, walk: _Walk, done: _Inserts, max_cached: int):
  """Every hashed block records its metadata; the registered ones are cached. (The mask reads
  the loop's output, which keeps the scatters after the loop: scheduled before it, they would
  force a copy of what it reads.)"""
  num_pages = prefix.page_hash.shape[0]
  at_page = jnp.where(walk.valid & (done.ent_parent != _RESOLVE), walk.page, num_pages)
  registered = jnp.where(done.inserted, walk.page, num_pages)
  count = jnp.sum(done.inserted, dtype=jnp.int32)
  set_ = lambda field, values, where=at_page: getattr(prefix, field).at[where].set(
      values, mode="drop")
  stats = bump(bump(bump(prefix.stats, "registered", count), "duplicate_blocks",
                    jnp.sum(done.duplicates)), "not_registered",
               jnp.sum(walk.valid & ~done.inserted & ~done.duplicates))
  return dataclasses.replace(
      prefix, page_hash=walk.page_hash, table_lo=done.lo, table_hi=done.hi,
      table_pages=done.slots, page_salt=set_("page_salt", walk.salts[walk.row]),
      page_parent=set_("page_parent", done.ent_parent),
      page_parent_gen=set_("page_parent_gen", done.ent_gen),
      page_depth=set_("page_depth", walk.j),
      page_cached=set_("page_cached", True, registered),
      page_last_use=set_("page_last_use", prefix.clock, registered),
      num_cached=max_cached - done.room, stats=stats)
