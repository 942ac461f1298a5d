"""Defragmenting and resizing the page pool: `defragment` and `resize` (seed ferrum's
``BlockAllocator.defragment``).

A *live* page is one not on the free stack: referenced by a sequence, or unreferenced but holding a
cached prefix block (evictable). `defragment` moves the live pages to the lowest page ids,
``[0, num_live)``, so the free pages are the tail ``[num_live, num_pages)``. Only the live pages
above ``num_live`` move, each into a free page below it (the fewest moves; in place when the
caller donates the cache), in chunks of `MOVE_CHUNK` pages, so the copy never needs more than a
chunk of extra memory. Everything that names a page follows it: page tables, reference counts,
the prefix cache's per-page records (`prefix_state.PAGE_FIELDS`), parent links and the hash
table's entries. A page shared by several sequences is one page before and after, so shared
pages stay shared, and every sequence reads the very same K/V: attention over the cache gives
bit-identical outputs.

`resize` changes the pool's size: it grows the pool with free pages at its end (no page moves),
or shrinks it when the live pages fit, packing them as `defragment` would in one gather (else
it refuses, changing nothing). The spec's derived sizes follow
(``max_cached_blocks`` left at its default follows ``num_pages``; a default ``table_capacity``
follows too, and the hash table is rebuilt). It changes array shapes, so it runs between steps,
not inside a jitted loop: a server calls it to give memory back or to take more without a
restart (`jaxpaged.CacheManager.resize` does so for a managed cache).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import checks
from jaxpaged._src import sharding
from jaxpaged._src import table
from jaxpaged._src.cache import PagedKVCache, check_cache, init_cache, pools, with_pools
from jaxpaged._src.prefix_state import PAGE_FIELDS, PAGE_ID_FIELDS, UNLINKED
from jaxpaged._src.spec import JaxPagedError

# Pages copied per loop trip of a defragmentation: the extra memory it needs (a few MiB at
# typical sizes), whatever the pool's size.
MOVE_CHUNK = 64


def live_pages(cache) -> jax.Array:
  """``bool[num_pages]``: the pages not on the free stack (referenced, or holding a cached
  block). Traceable."""
  num_pages = cache.spec.num_pages
  on_stack = jnp.arange(num_pages) < cache.num_free
  free = jnp.zeros((num_pages,), bool).at[jnp.where(on_stack, cache.free_pages, num_pages)].set(
      True, mode="drop")
  return ~free


def moves(cache) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The moves that defragment ``cache``: ``(src, dst, count)``, each live page ``src[i]`` at or
  above the number of live pages goes to the free page ``dst[i]`` below it, for ``i < count``
  (``int32[num_pages]`` each, ``num_pages`` past ``count``). Ascending, so the lowest live page
  above the line fills the lowest hole. Traceable."""
  num_pages = cache.spec.num_pages
  live = live_pages(cache)
  num_live = jnp.sum(live, dtype=jnp.int32)
  ids = jnp.arange(num_pages, dtype=jnp.int32)
  above = live & (ids >= num_live)
  hole = ~live & (ids < num_live)
  # Sorting puts the wanted ids first, ascending; the rest are num_pages.
  src = jnp.sort(jnp.where(above, ids, num_pages))
  dst = jnp.sort(jnp.where(hole, ids, num_pages))
  return src, dst, jnp.sum(above, dtype=jnp.int32)


def _move_pages(pool: jax.Array, src: jax.Array, dst: jax.Array, count: jax.Array) -> jax.Array:
  """``pool`` (page axis 2) with page ``src[i]`` copied to ``dst[i]`` for ``i < count``, a chunk
  of `MOVE_CHUNK` pages per loop trip (in place under donation). Sources and destinations are
  disjoint, so the chunks' order does not matter."""
  num_pages = pool.shape[2]
  chunk = min(MOVE_CHUNK, num_pages)
  pad = (-num_pages) % chunk
  src = jnp.pad(src, (0, pad), constant_values=num_pages)
  dst = jnp.pad(dst, (0, pad), constant_values=num_pages)

  def body(i, pool):
    s = jax.lax.dynamic_slice_in_dim(src, i * chunk, chunk)
    d = jax.lax.dynamic_slice_in_dim(dst, i * chunk, chunk)
    pages = jnp.take(pool, jnp.clip(s, 0, num_pages - 1), axis=2)
    return pool.at[:, :, d].set(pages, mode="drop")

  return jax.lax.fori_loop(0, (count + chunk - 1) // chunk, body, pool)


def _renamed(cache):
  """``cache`` with every page reference renamed as `defragment` moves its pages (the pools
  themselves not moved): ``(cache, new_of_old int32[num_pages], (src, dst, count))``, the
  page each old page id becomes and `moves`. Traceable."""
  num_pages = cache.spec.num_pages
  src, dst, count = moves(cache)
  ids = jnp.arange(num_pages, dtype=jnp.int32)
  # The moves swap each source with its hole (a hole is free: what it held does not matter).
  new_of_old = ids.at[src].set(dst, mode="drop").at[dst].set(src, mode="drop")
  old_of_new = new_of_old  # a product of disjoint swaps is its own inverse
  rename = lambda x: jnp.where(x >= 0, new_of_old[jnp.clip(x, 0, num_pages - 1)], x)
  prefix = cache.prefix
  if prefix is not None:
    fields = {name: getattr(prefix, name)[old_of_new] for name in PAGE_FIELDS}
    fields.update({name: rename(fields[name]) for name in PAGE_ID_FIELDS})
    prefix = dataclasses.replace(prefix, **fields, table_pages=rename(prefix.table_pages))
  cache = dataclasses.replace(
      cache, page_table=rename(cache.page_table), ref_counts=cache.ref_counts[old_of_new],
      # The free pages are now the tail; the lowest is handed out first.
      free_pages=jnp.where(ids < cache.num_free, num_pages - 1 - ids, cache.free_pages),
      prefix=prefix)
  return cache, new_of_old, (src, dst, count)


def defragment_core(cache):
  """`defragment` on a checked single-device cache: ``(cache, new_of_old int32[num_pages])``,
  the page each old page id became. Traceable."""
  renamed, new_of_old, (src, dst, count) = _renamed(cache)
  moved = {name: _move_pages(pool, src, dst, count) for name, pool in pools(cache).items()}
  return with_pools(renamed, moved), new_of_old


_defragment_jit = jax.jit(defragment_core)


def defragment(cache: sharding.AnyCache) -> sharding.AnyCache:
  """The same cache with its live pages moved to the lowest page ids, so the free pages are the
  tail of the pool (which `resize` can then cut off).

  Live pages are the ones referenced by sequences and the cached prefix blocks; page tables,
  reference counts, prefix records, parent links and the hash table follow each moved page, so
  shared pages stay shared and every sequence reads bit-identical K/V. Only live pages above the
  line move, into free pages below it. Pure: the input is not changed (donate the cache in your
  own jitted step, ``jax.jit(defragment_core, donate_argnums=0)``-style, to move pages in place;
  `jaxpaged.CacheManager.defragment` does). A `ShardedCache` is defragmented shard by shard.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=6,
  ...                  max_seqs=3, max_pages_per_seq=2)
  >>> cache, _, _ = extend(init_cache(spec), jnp.arange(3), jnp.array([4, 2, 4]), num_slots=10)
  >>> cache = release(cache, jnp.array([0]))  # frees pages 0 and 1: holes below pages 2-4
  >>> cache.page_table.tolist()
  [[-1, -1], [2, -1], [3, 4]]
  >>> k0, _ = gather_kv(cache, 0, 2)
  >>> packed = defragment(cache)
  >>> packed.page_table.tolist(), packed.free_pages[:int(packed.num_free)].tolist()
  ([[-1, -1], [2, -1], [0, 1]], [5, 4, 3])
  >>> bool(jnp.array_equal(gather_kv(packed, 0, 2)[0], k0))
  True
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.map_shards(lambda local: (defragment_core(local)[0], None), cache,
                               out_specs=sharding.P())[0]
  check_cache(cache)
  return _defragment_jit(cache)[0]


def resized_spec(spec, num_pages: int):
  """``spec`` with ``num_pages`` pages: a default ``max_cached_blocks`` (``num_pages``) and a
  default ``table_capacity`` (``2 * num_pages`` rounded up to a power of two) follow it; set
  values are kept (``max_cached_blocks`` capped at the new size)."""
  default_table = spec.table_capacity == type(spec)(**{
      **_fields(spec), "table_capacity": None}).table_capacity
  max_cached = (num_pages if spec.max_cached_blocks == spec.num_pages
                else min(spec.max_cached_blocks, num_pages))
  return dataclasses.replace(spec, num_pages=num_pages, max_cached_blocks=max_cached,
                             table_capacity=None if default_table else spec.table_capacity)


def _fields(spec) -> dict:
  return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def resize(cache: PagedKVCache, num_pages: int) -> PagedKVCache:
  """The same cache in a pool of ``num_pages`` pages: a growing pool gets free pages at its end
  (no page moves); a shrinking one is defragmented, then its free tail is cut off. The new spec
  is `resized_spec`.

  It changes array shapes, so call it between steps (not inside jit); it reads how many pages
  are live. Pure: the input is not changed. A growing pool is copied into a new one (XLA cannot
  grow an array in place); a shrinking one keeps its first ``num_pages`` pages.

  Raises:
    JaxPagedError: ``num_pages`` is not a positive int, or fewer than the live pages (release
      sequences or evict cached blocks first, e.g. `jaxpaged.CacheManager.gc`), or the hash
      table of the new size could not hold every cached block; nothing changed.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0, 1]), jnp.array([4, 3]), num_slots=7)
  >>> small = resize(release(cache, jnp.array([0])), 3)
  >>> small.spec.num_pages, small.page_table.tolist(), int(num_free_pages(small))
  (3, [[-1, -1, -1, -1], [0, 1, -1, -1]], 1)
  >>> resize(small, 1)
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: resize: num_pages=1 cannot hold the 2 live pages ...
  """
  return resize_core(cache, num_pages)[0]


def resize_core(cache: PagedKVCache, num_pages: int) -> tuple[PagedKVCache, np.ndarray]:
  """`resize`, and the page each old page id became (``new_of_old``, `defragment_core`'s)."""
  if isinstance(cache, sharding.ShardedCache):
    raise JaxPagedError("resize takes a single-device PagedKVCache; a ShardedCache's pools are "
                        "laid out over its mesh: build a new one with init_sharded_cache and "
                        "the larger spec, or defragment it (jaxpaged.defragment works per shard).")
  spec = check_cache(cache)
  if any(checks.is_traced(x) for x in jax.tree.leaves(cache)):
    raise JaxPagedError("resize changes the pool's shape and reads how many pages are live, so "
                        "it cannot run inside jax.jit (or another transformation): call it "
                        "between jitted steps (jaxpaged.defragment is traceable).")
  num_pages = checks.count("num_pages", num_pages)
  if num_pages == 0:
    raise JaxPagedError("resize: num_pages must be at least 1, got 0; release the cache instead.")
  num_live = spec.num_pages - int(cache.num_free)
  if num_live > num_pages:
    raise JaxPagedError(
        f"resize: num_pages={num_pages} cannot hold the {num_live} live pages (referenced by "
        f"sequences or holding cached prefix blocks); release sequences or evict cached blocks "
        f"first (e.g. CacheManager.gc()), or resize to at least {num_live}.")
  new_spec = resized_spec(spec, num_pages)
  if num_pages >= spec.num_pages:  # growing: no page moves, the new ones are free
    renamed, new_of_old = cache, jnp.arange(spec.num_pages, dtype=jnp.int32)
  else:  # the references renamed here; the pools are gathered once, into the smaller ones
    renamed, new_of_old = _renamed_jit(_without_pools(cache))
    renamed = with_pools(renamed, pools(cache))
  new, ok = _resize_jit(renamed, new_of_old, new_spec)
  if not bool(ok):
    raise JaxPagedError(
        f"resize: the hash table of {new_spec.table_capacity} slots could not hold every cached "
        f"block; pass a larger table_capacity in the spec, or evict cached blocks first.")
  return new, np.asarray(new_of_old)


_renamed_jit = jax.jit(lambda cache: _renamed(cache)[:2])


def _without_pools(cache):
  """``cache`` without its pools (None): what `_renamed` reads and changes."""
  return dataclasses.replace(cache, **{name: None for name in pools(cache)})


@functools.partial(jax.jit, static_argnums=2)
def _resize_jit(cache, old_of_new, spec):
  """``cache`` moved into a pool of ``spec.num_pages`` pages: a larger one (the new pages free,
  handed out after the old free ones), or a smaller one when ``cache``'s references are
  `_renamed` (pages still at ``old_of_new[page]``) and its live pages fit: ``(cache, ok)``, ``ok`` False if the rebuilt hash table could not take every cached
  block."""
  old, new = cache.spec.num_pages, spec.num_pages
  keep = min(old, new)
  fresh = init_cache(spec)

  def pages_into(fresh_x, x, axis):  # the first `keep` pages of x into fresh_x
    index = (slice(None),) * axis + (slice(0, keep),)
    return fresh_x.at[index].set(x[index])

  def pool_of(pool):  # one pass over the new pool (a zero-fill then a copy would be two)
    if new >= old:
      return jnp.pad(pool, [(0, new - old) if axis == 2 else (0, 0) for axis in range(pool.ndim)])
    return jnp.take(pool, old_of_new[:new], axis=2)  # the live pages, packed: one gather

  moved = {name: pool_of(pool) for name, pool in pools(cache).items()}
  num_live = old - cache.num_free
  ids = jnp.arange(new, dtype=jnp.int32)
  out = dataclasses.replace(
      fresh, page_table=cache.page_table, seq_lens=cache.seq_lens,
      num_evicted=cache.num_evicted, ref_counts=pages_into(fresh.ref_counts, cache.ref_counts, 0),
      # Growing: the new pages go under the old free stack; shrinking: the packed free tail.
      free_pages=(jnp.concatenate([jnp.arange(new - 1, old - 1, -1, dtype=jnp.int32),
                                   cache.free_pages]) if new >= old else new - 1 - ids),
      num_free=new - num_live)
  ok = jnp.bool_(True)
  if cache.prefix is not None:
    prefix, fresh_prefix = cache.prefix, fresh.prefix
    fields = {name: pages_into(getattr(fresh_prefix, name), getattr(prefix, name), 0)
              for name in PAGE_FIELDS}
    # A link to a page cut off (free, so its block is gone) is unlinked: a grown pool's new
    # pages restart at generation 0, and a link left pointing there could match a new block
    # at the generation it recorded (serving K/V computed after another prefix).
    for name in PAGE_ID_FIELDS:
      fields[name] = jnp.where(fields[name] >= new, UNLINKED, fields[name])
    prefix = dataclasses.replace(prefix, **fields)
    if spec.table_capacity != cache.spec.table_capacity:
      lo, hi, pages, inserted = table.insert(
          fresh_prefix.table_lo, fresh_prefix.table_hi, fresh_prefix.table_pages,
          prefix.page_hash, jnp.arange(new, dtype=jnp.int32), prefix.page_cached)
      ok = jnp.all(inserted == prefix.page_cached)
      prefix = dataclasses.replace(prefix, table_lo=lo, table_hi=hi, table_pages=pages)
    out = dataclasses.replace(out, prefix=prefix)
  return with_pools(out, moved), ok
