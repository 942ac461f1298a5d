"""The paged KV cache: an immutable pytree of arrays and the pure functions that update it.

Layout (chosen by measurement, see README "Design"): K and V pages for all layers are two arrays
``[num_layers, num_kv_heads, num_pages, page_size, head_dim]``. Head-major pages keep each
(head, page) a contiguous ``[page_size, head_dim]`` tile, which is what both the Pallas GPU kernels
and XLA's CPU dot want; a token-major layout was 2-6x slower for decode attention on CPU.

The allocator is a stack of free page ids (``free_pages[:num_free]``) plus a reference count per
page. Every update touches only the rows, pages and stack entries it changes (scatters with
out-of-bounds indices for "nothing"), so its cost does not grow with ``num_pages`` and a cache
donated by the caller's own jitted step is updated in place. Refused calls route every scatter out
of bounds: the cache comes back exactly as it went in.

Every public function is pure: it never deletes or changes its input (nothing here donates).
Called eagerly, an update therefore copies the pools; jit your step and donate the cache there
(``jax.jit(step, donate_argnames="cache")``) to update it in place.

Internal API (for the other ``jaxpaged._src`` modules): `check_cache`, `duplicated`,
`extend_plan`, `extend_core`, `release_core`, `token_rows`, `check_layer`, `check_index`,
`check_num_slots`, `EXTEND_REASONS`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import checks
from jaxpaged._src import prefix_state
from jaxpaged._src.prefix_state import PrefixState, init_prefix_state
from jaxpaged._src.spec import CacheSpec, JaxPagedError


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k_pages", "v_pages", "page_table", "seq_lens", "ref_counts", "free_pages",
                 "num_free", "prefix"],
    meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """Paged KV cache state: arrays, plus its static `CacheSpec`. Create with `init_cache`,
  update with jaxpaged functions.

  Attributes:
    k_pages: ``[num_layers, num_kv_heads, num_pages, page_size, head_dim]`` keys.
    v_pages: same shape, values.
    page_table: ``int32[max_seqs, max_pages_per_seq]``, physical page of each logical page,
      -1 where unmapped.
    seq_lens: ``int32[max_seqs]`` tokens held by each sequence (0 = empty slot).
    ref_counts: ``int32[num_pages]`` page-table entries referring to each page.
    free_pages: ``int32[num_pages]`` stack of free, never-cached page ids; entries
      ``[0, num_free)`` are valid.
    num_free: ``int32[]`` pages on that stack.
    prefix: the prefix cache's `PrefixState` (None unless ``spec.prefix_caching``).
    spec: the static `CacheSpec` (pytree metadata, not a leaf).
  """

  k_pages: jax.Array
  v_pages: jax.Array
  page_table: jax.Array
  seq_lens: jax.Array
  ref_counts: jax.Array
  free_pages: jax.Array
  num_free: jax.Array
  prefix: PrefixState | None
  spec: CacheSpec


def init_cache(spec: CacheSpec) -> PagedKVCache:
  """An empty cache: every page free, every sequence slot empty. Works under `jax.eval_shape`.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> int(num_free_pages(init_cache(spec)))
  8
  """
  if not isinstance(spec, CacheSpec):
    raise JaxPagedError(f"init_cache expects a CacheSpec, got {type(spec).__name__}; "
                        "build one with jaxpaged.CacheSpec(...).")
  return PagedKVCache(
      k_pages=jnp.zeros(spec.pages_shape, spec.dtype),
      v_pages=jnp.zeros(spec.pages_shape, spec.dtype),
      page_table=jnp.full((spec.max_seqs, spec.max_pages_per_seq), -1, jnp.int32),
      seq_lens=jnp.zeros((spec.max_seqs,), jnp.int32),
      ref_counts=jnp.zeros((spec.num_pages,), jnp.int32),
      # Popped from the top, so page 0 is handed out first.
      free_pages=jnp.arange(spec.num_pages - 1, -1, -1, dtype=jnp.int32),
      num_free=jnp.asarray(spec.num_pages, jnp.int32),
      prefix=init_prefix_state(spec) if spec.prefix_caching else None,
      spec=spec,
  )


def num_free_pages(cache: PagedKVCache) -> jax.Array:
  """``int32[]`` pages holding nothing (cached blocks that could be evicted not included)."""
  check_cache(cache)
  return cache.num_free


def num_cached_free_pages(cache: PagedKVCache) -> jax.Array:
  """``int32[]`` unreferenced pages that keep a cached block until evicted (0 without prefix
  caching)."""
  check_cache(cache)
  return cache.prefix.num_evictable if cache.prefix is not None else jnp.int32(0)


def num_used_pages(cache: PagedKVCache) -> jax.Array:
  """``int32[]`` pages referred to by at least one sequence."""
  check_cache(cache)
  return cache.spec.num_pages - cache.num_free - num_cached_free_pages(cache)


# ----------------------------------------------------------------------------- validation

def check_cache(cache, name: str = "cache") -> CacheSpec:
  """The cache's spec, after checking it is a live `PagedKVCache` (not one whose arrays a
  donating call deleted)."""
  if not isinstance(cache, PagedKVCache):
    raise JaxPagedError(f"{name} must be a jaxpaged.PagedKVCache, got {type(cache).__name__}; "
                        "create one with jaxpaged.init_cache(spec).")
  for leaf in jax.tree.leaves(cache):
    if isinstance(leaf, jax.Array) and not checks.is_traced(leaf) and leaf.is_deleted():
      raise JaxPagedError(
          f"{name} was donated: its arrays were deleted by a jitted call that donated it "
          "(donate_argnames='cache'). Use the cache that call returned; to keep this one, do "
          "not donate it (jaxpaged's own functions never donate their input).")
  return cache.spec


def check_num_slots(spec: CacheSpec, num_slots, rows: int, default: int | None = None) -> int:
  """The static length of a call's token layout (default ``rows``, one token a row): at most
  ``rows`` sequences' worth of tokens, since no row can hold more."""
  limit = max(rows, 1) * spec.max_seq_len
  return checks.count("num_slots", (rows if default is None else default) if num_slots is None
                      else num_slots, maximum=limit,
                      why=f" ({max(rows, 1)} rows x max_seq_len {spec.max_seq_len}: more slots "
                      "than any call can fill)")


def duplicated(ids: jax.Array, live: jax.Array) -> jax.Array:
  """``bool[B]``: live rows whose id already appears in an earlier live row."""
  same = (ids[:, None] == ids[None, :]) & live[:, None] & live[None, :]
  earlier = jnp.tril(jnp.ones_like(same), k=-1)
  return jnp.any(same & earlier, axis=1)


def _cdiv(a, b):
  return (a + b - 1) // b


# Each refusal reason: (argument it blames, message). Traced code computes one boolean mask per
# reason; `ok` is "no mask set" and the eager `check_*` helpers turn set masks into errors.
EXTEND_REASONS = {
    "bad_id": ("seq_ids", "is out of range [-1, {max_seqs}) (use -1 for padding rows)"),
    "duplicate": ("seq_ids", "appears twice; give each sequence one row per call"),
    "negative": ("num_new_tokens", "is negative; new token counts must be >= 0"),
    "too_long": ("num_new_tokens", "would grow the sequence past max_pages_per_seq * page_size "
                 "= {max_seq_len} tokens; release it or build the cache with a larger "
                 "max_pages_per_seq"),
    "too_many_tokens": ("num_new_tokens", "sums to more than num_slots = {num_slots}; pass a "
                        "larger num_slots (the static length of the returned slots)"),
    "out_of_pages": ("cache", "has too few free pages for this call; release sequences, "
                     "swap some out, or build the cache with more pages"),
}

_FORK_REASONS = {
    "bad_src": ("src_ids", "is out of range [0, {max_seqs}) for a live row"),
    "bad_dst": ("dst_ids", "is out of range [-1, {max_seqs}) (use -1 for padding rows)"),
    "duplicate": ("dst_ids", "appears twice; each destination can be forked into once"),
    "dst_in_use": ("dst_ids", "is a sequence that still holds tokens; release it before "
                   "forking into it"),
}


# ----------------------------------------------------------------------------- extend

def extend_plan(cache: PagedKVCache, seq_ids, num_new_tokens, num_slots: int):
  """Everything `extend` decides, as arrays; nothing is written yet."""
  spec = cache.spec
  ps, num_pages = spec.page_size, spec.num_pages
  live = seq_ids >= 0
  in_range = seq_ids < spec.max_seqs
  rows = jnp.where(live & in_range, seq_ids, 0)
  n = jnp.where(live, num_new_tokens, 0)
  old_len = jnp.where(live, cache.seq_lens[rows], 0)
  problems = {
      "bad_id": (seq_ids < -1) | ~in_range,
      "duplicate": duplicated(seq_ids, live),
      "negative": n < 0,
      "too_long": n > spec.max_seq_len - old_len,  # no int32 overflow, unlike old_len + n
  }
  n = jnp.clip(n, 0, num_slots + 1)  # keeps the sums below from overflowing
  # Padding rows keep their entries in the token layout (so a decode batch stays row-aligned).
  layout = jnp.clip(num_new_tokens, 0, num_slots + 1)
  problems["too_many_tokens"] = jnp.sum(layout) > num_slots
  new_len = old_len + n
  old_pages, new_pages = _cdiv(old_len, ps), _cdiv(new_len, ps)
  last_page = cache.page_table[rows, jnp.maximum(old_pages - 1, 0)]
  # Copy-on-write: new tokens land in a partly filled page some other sequence also holds. When
  # several sharers append in one call, each takes a copy except the last, which keeps the page.
  appends_into = (n > 0) & (old_len % ps != 0)
  same = appends_into[:, None] & appends_into[None, :] & (last_page[:, None] == last_page[None, :])
  earlier_copies = jnp.sum(jnp.tril(same, k=-1), axis=1)
  cow = appends_into & (cache.ref_counts[jnp.clip(last_page, 0)] - earlier_copies > 1)
  need = new_pages - old_pages + cow
  problems["out_of_pages"] = jnp.sum(need) > cache.num_free + num_cached_free_pages(cache)
  ok = ~jnp.any(jnp.stack([jnp.any(m) for m in problems.values()]))
  return dict(problems=problems, ok=ok, live=live, n=n, layout=layout, old_len=old_len,
              new_len=new_len,
              old_pages=old_pages, cow=cow & ok, last_page=last_page, need=need)


def check_extend(cache: PagedKVCache, seq_ids, num_new_tokens, *, num_slots: int | None = None):
  """Eagerly explains why `extend` would refuse these arguments; returns None if it would not.

  Raises:
    JaxPagedError: naming the first wrong argument, its rows and how to fix it.
  """
  spec = check_cache(cache)
  seq_ids, num_new_tokens, num_slots, _ = _extend_args(cache, seq_ids, num_new_tokens, num_slots,
                                                       None)
  plan = extend_plan(cache, seq_ids, num_new_tokens, num_slots)
  checks.raise_first(EXTEND_REASONS, plan["problems"], max_seqs=spec.max_seqs,
               max_seq_len=spec.max_seq_len, num_slots=num_slots)


def extend(cache: PagedKVCache, seq_ids, num_new_tokens, *, num_slots: int | None = None,
           tokens=None):
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
  check_cache(cache)
  seq_ids, num_new_tokens, num_slots, tokens = _extend_args(cache, seq_ids, num_new_tokens,
                                                            num_slots, tokens)
  return _extend_jit(cache, seq_ids, num_new_tokens, tokens, num_slots=num_slots)


def _extend_args(cache, seq_ids, num_new_tokens, num_slots, tokens):
  seq_ids = checks.index_vector("seq_ids", seq_ids)
  num_new_tokens = checks.index_vector("num_new_tokens", num_new_tokens, seq_ids.shape[0])
  num_slots = check_num_slots(cache.spec, num_slots, seq_ids.shape[0])
  if tokens is not None:
    tokens = checks.token_ids("tokens", tokens, (num_slots,))
    if not cache.spec.prefix_caching:
      tokens = None  # only prefix caching keeps token ids
  return seq_ids, num_new_tokens, num_slots, tokens


def extend_core(cache, seq_ids, num_new_tokens, tokens, *, num_slots):
  """`extend` on checked arguments (``int32`` vectors, ``tokens`` None or ``int32[num_slots]``):
  traceable, for composite operations."""
  if seq_ids.shape[0] == 0:  # no rows: nothing to do (and nothing to index)
    return cache, jnp.full((num_slots,), -1, jnp.int32), jnp.bool_(True)
  spec = cache.spec
  ps, num_pages = spec.page_size, spec.num_pages
  plan = extend_plan(cache, seq_ids, num_new_tokens, num_slots)
  ok, live, cow = plan["ok"], plan["live"], plan["cow"]
  prefix = cache.prefix
  # New pages per row, as a [B, K] grid: K bounds any row's new pages (plus a copy-on-write page).
  width = min(spec.max_pages_per_seq, _cdiv(num_slots, ps) + 1)
  k = jnp.arange(width)
  allocated = (k < plan["need"][:, None]) & ok
  alloc_index = (jnp.cumsum(plan["need"]) - plan["need"])[:, None] + k
  new_page = cache.free_pages[jnp.clip(cache.num_free - 1 - alloc_index, 0, num_pages - 1)]
  total = jnp.where(ok, jnp.sum(plan["need"]), 0)
  if prefix is not None:
    # Past the never-cached free pages, evict cached blocks nobody uses (only when needed: the
    # choice sorts all pages).
    max_victims = seq_ids.shape[0] * width
    shortfall = jnp.maximum(total - cache.num_free, 0)
    prefix, victims = prefix_state.evict_if(
        shortfall > 0, prefix,
        lambda p: prefix_state.choose_victims(p, cache.ref_counts, shortfall, max_victims),
        max_victims)
    from_victims = alloc_index >= cache.num_free
    new_page = jnp.where(
        from_victims, victims[jnp.clip(alloc_index - cache.num_free, 0, max_victims - 1)],
        new_page)
  logical = plan["old_pages"][:, None] - cow[:, None] + k  # [B, K]
  write_row = jnp.where(allocated, seq_ids[:, None], spec.max_seqs)  # out of bounds: dropped
  handed_out = jnp.where(allocated, new_page, num_pages)
  page_table = cache.page_table.at[write_row, logical].set(new_page, mode="drop")
  ref_counts = cache.ref_counts.at[handed_out].add(1, mode="drop")
  ref_counts = ref_counts.at[jnp.where(cow, plan["last_page"], num_pages)].add(-1, mode="drop")
  seq_lens = cache.seq_lens.at[jnp.where(live & ok, seq_ids, spec.max_seqs)].set(
      plan["new_len"], mode="drop")
  num_free = cache.num_free - jnp.minimum(total, cache.num_free)

  cow_dst = jnp.where(cow, new_page[:, 0], num_pages)
  cow_src = jnp.clip(plan["last_page"], 0)

  def copy_shared_pages(pages):
    return tuple(p.at[:, :, cow_dst].set(p[:, :, cow_src], mode="drop") for p in pages)

  # The copy is skipped (no pool traffic at all) on the common steps that need none.
  k_pages, v_pages = jax.lax.cond(jnp.any(cow), copy_shared_pages, lambda pages: pages,
                                  (cache.k_pages, cache.v_pages))
  cache = dataclasses.replace(cache, k_pages=k_pages, v_pages=v_pages, page_table=page_table,
                              seq_lens=seq_lens, ref_counts=ref_counts, num_free=num_free)
  row_ok = ok & live
  slots = _token_slots(cache, seq_ids, plan["layout"], plan["old_len"], row_ok, num_slots)
  if prefix is not None:
    cache = dataclasses.replace(cache, prefix=_note_tokens(
        prefix, cache, seq_ids, plan, row_ok, tokens, slots, cow_src, cow_dst, handed_out,
        width))
  return cache, slots, ok


_extend_jit = jax.jit(extend_core, static_argnames=("num_slots",))


def _note_tokens(prefix, cache, seq_ids, plan, row_ok, tokens, slots, cow_src, cow_dst,
                 handed_out, width):
  """Prefix bookkeeping of an `extend`: new pages get a new generation, token ids are stored,
  copied pages keep theirs, and blocks that filled are hashed and registered."""
  spec = cache.spec
  ps, num_pages = spec.page_size, spec.num_pages
  rows = jnp.where(row_ok, seq_ids, spec.max_seqs)
  if tokens is None:
    hashable = jnp.zeros(seq_ids.shape, bool)
  else:  # a sequence stays hashable only while every token comes with its id
    hashable = jnp.where(plan["old_len"] == 0, True,
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
  return prefix_state.register_blocks(
      prefix, cache.page_table, seq_ids, plan["old_len"], plan["new_len"], row_ok,
      page_size=ps, max_blocks=width, hash_fn=spec.block_hash,
      max_cached=spec.max_cached_blocks)


def token_rows(counts, num_tokens: int):
  """The token layout shared by `extend`, `write_kv` and `ragged_paged_attention`: row b owns
  entries ``[start_b, start_b + counts[b])``, ``start`` the running sum of ``counts``.

  Returns ``(row, offset, valid)``, each ``[num_tokens]``: the row owning each entry, the entry's
  index within that row, and whether the entry is before the end of the last row.
  """
  t = jnp.arange(num_tokens)
  if counts.shape[0] == 0:  # no rows: no entry is valid
    return jnp.zeros_like(t), t, jnp.zeros(t.shape, bool)
  ends = jnp.cumsum(counts)
  row = jnp.minimum(jnp.searchsorted(ends, t, side="right"), counts.shape[0] - 1)
  return row, t - (ends[row] - counts[row]), t < ends[-1]


def _token_slots(cache, seq_ids, counts, old_len, row_ok, num_slots):
  """``int32[T]`` slot of each layout entry; -1 for refused or padding rows, past the end."""
  ps = cache.spec.page_size
  row, offset, valid = token_rows(counts, num_slots)
  position = old_len[row] + offset
  page = cache.page_table[jnp.clip(seq_ids[row], 0), position // ps]
  return jnp.where(valid & row_ok[row], page * ps + position % ps, -1).astype(jnp.int32)


def token_positions(cache: PagedKVCache, seq_ids, num_new_tokens, *,
                    num_slots: int | None = None) -> jax.Array:
  """Position within its sequence of every new token, in `extend`'s layout, for a cache that
  `extend` has already grown (so for RoPE): ``seq_len - num_new_tokens + offset``; -1 for
  padding rows and entries past the last row.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([3]), num_slots=3)
  >>> cache, _, _ = extend(cache, jnp.array([0, 1]), jnp.array([2, 1]), num_slots=4)
  >>> token_positions(cache, jnp.array([0, 1]), jnp.array([2, 1]), num_slots=4).tolist()
  [3, 4, 0, -1]
  """
  check_cache(cache)
  seq_ids = checks.index_vector("seq_ids", seq_ids)
  counts = jnp.clip(checks.index_vector("num_new_tokens", num_new_tokens, seq_ids.shape[0]), 0)
  num_slots = check_num_slots(cache.spec, num_slots, seq_ids.shape[0])
  if seq_ids.shape[0] == 0:
    return jnp.full((num_slots,), -1, jnp.int32)
  live = (seq_ids >= 0) & (seq_ids < cache.spec.max_seqs)
  row, offset, valid = token_rows(counts, num_slots)
  length = cache.seq_lens[jnp.where(live, seq_ids, 0)]
  position = (length - counts)[row] + offset
  return jnp.where(valid & live[row], position, -1).astype(jnp.int32)


# ----------------------------------------------------------------------------- release

def release(cache: PagedKVCache, seq_ids) -> PagedKVCache:
  """Ends sequences: drops their page references and empties their slots.

  A page becomes free when nothing refers to it any more. Padding (-1), out-of-range ids, empty
  sequences and repeats are ignored, so releasing never fails and never double-frees.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([9]), num_slots=9)
  >>> int(num_free_pages(cache)), int(num_free_pages(release(cache, jnp.array([0]))))
  (5, 8)
  """
  check_cache(cache)
  return _release_jit(cache, checks.index_vector("seq_ids", seq_ids))


def release_core(cache, seq_ids):
  """`release` on a checked ``int32`` vector: traceable, for composite operations."""
  spec = cache.spec
  num_pages = spec.num_pages
  live = (seq_ids >= 0) & (seq_ids < spec.max_seqs)
  live = live & ~duplicated(seq_ids, live)
  pages = cache.page_table[jnp.where(live, seq_ids, 0)]  # [R, max_pages_per_seq]
  held = jnp.where(live[:, None] & (pages >= 0), pages, num_pages).reshape(-1)
  ref_counts = cache.ref_counts.at[held].add(-1, mode="drop")
  # A page shared by two released sequences appears twice: sort so it is freed once.
  held = jnp.sort(held)
  first = jnp.ones(held.shape, bool).at[1:].set(held[1:] != held[:-1])
  safe = jnp.clip(held, 0, num_pages - 1)
  freed = first & (held < num_pages) & (ref_counts[safe] == 0)
  prefix = cache.prefix
  rows = jnp.where(live, seq_ids, spec.max_seqs)
  if prefix is not None:
    # Cached blocks stay, evictable, for later prompts, if their K/V were written; a block
    # registered but never written (its sequence ended first) must never be served: dropped.
    cached = freed & prefix.page_cached[safe]
    kept = cached & prefix_state.fully_written(prefix, safe)
    freed &= ~kept
    prefix = prefix_state.unregister(prefix, held, cached & ~kept)
    prefix = dataclasses.replace(
        prefix,
        page_last_use=prefix.page_last_use.at[jnp.where(kept, held, num_pages)].set(
            prefix.clock, mode="drop"),
        num_evictable=prefix.num_evictable + jnp.sum(kept, dtype=jnp.int32),
        seq_salt=prefix.seq_salt.at[rows].set(0, mode="drop"),
        seq_hashable=prefix.seq_hashable.at[rows].set(False, mode="drop"),
        clock=prefix.clock + jnp.any(live))  # releasing nothing changes nothing
  push_to = jnp.where(freed, cache.num_free + jnp.cumsum(freed) - 1, num_pages)
  return dataclasses.replace(
      cache,
      page_table=cache.page_table.at[rows].set(-1, mode="drop"),
      seq_lens=cache.seq_lens.at[rows].set(0, mode="drop"),
      ref_counts=ref_counts,
      free_pages=cache.free_pages.at[push_to].set(held, mode="drop"),
      num_free=cache.num_free + jnp.sum(freed, dtype=jnp.int32),
      prefix=prefix,
  )


_release_jit = jax.jit(release_core)


# ----------------------------------------------------------------------------- fork

def _fork_problems(cache, src_ids, dst_ids):
  max_seqs = cache.spec.max_seqs
  live = dst_ids >= 0
  dst_ok = live & (dst_ids < max_seqs)
  return {
      "bad_src": live & ((src_ids < 0) | (src_ids >= max_seqs)),
      "bad_dst": (dst_ids < -1) | (dst_ids >= max_seqs),
      "duplicate": duplicated(dst_ids, live),
      "dst_in_use": dst_ok & (cache.seq_lens[jnp.where(dst_ok, dst_ids, 0)] > 0),
  }


def check_fork(cache: PagedKVCache, src_ids, dst_ids) -> None:
  """Eagerly explains why `fork` would refuse these arguments; returns None if it would not."""
  spec = check_cache(cache)
  dst_ids = checks.index_vector("dst_ids", dst_ids)
  src_ids = checks.index_vector("src_ids", src_ids, dst_ids.shape[0], per="row of dst_ids")
  checks.raise_first(_FORK_REASONS, _fork_problems(cache, src_ids, dst_ids), max_seqs=spec.max_seqs)


def fork(cache: PagedKVCache, src_ids, dst_ids):
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
  """
  check_cache(cache)
  dst_ids = checks.index_vector("dst_ids", dst_ids)
  src_ids = checks.index_vector("src_ids", src_ids, dst_ids.shape[0], per="row of dst_ids")
  return _fork_jit(cache, src_ids, dst_ids)


@jax.jit
def _fork_jit(cache, src_ids, dst_ids):
  spec = cache.spec
  problems = _fork_problems(cache, src_ids, dst_ids)
  ok = ~jnp.any(jnp.stack([jnp.any(m) for m in problems.values()]))
  live = (dst_ids >= 0) & ok
  src = jnp.where(live, src_ids, 0)
  rows = cache.page_table[src]  # [N, max_pages_per_seq]
  dst = jnp.where(live, dst_ids, spec.max_seqs)
  shared = jnp.where(live[:, None] & (rows >= 0), rows, spec.num_pages)
  prefix = cache.prefix
  if prefix is not None:  # a fork continues its source's chain, salt included
    prefix = dataclasses.replace(
        prefix, seq_salt=prefix.seq_salt.at[dst].set(prefix.seq_salt[src], mode="drop"),
        seq_hashable=prefix.seq_hashable.at[dst].set(prefix.seq_hashable[src], mode="drop"))
  return dataclasses.replace(
      cache,
      page_table=cache.page_table.at[dst].set(rows, mode="drop"),
      seq_lens=cache.seq_lens.at[dst].set(cache.seq_lens[src], mode="drop"),
      ref_counts=cache.ref_counts.at[shared].add(1, mode="drop"),
      prefix=prefix,
  ), ok


# ----------------------------------------------------------------------------- read back

def gather_kv(cache: PagedKVCache, layer, seq_id):
  """One sequence's K and V, contiguous and in token order (for tests and debugging).

  Returns:
    ``(k, v)``, each ``[max_pages_per_seq * page_size, num_kv_heads, head_dim]``; positions at or
    past the sequence's length are zero, so ``k[:cache.seq_lens[seq_id]]`` is its keys.
  """
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

  def gather(pool):  # [H, P, ps, D] -> [max_seq_len, H, D]
    x = pool[layer][:, jnp.clip(pages, 0)]
    x = jnp.moveaxis(x, 0, 2).reshape(spec.max_seq_len, spec.num_kv_heads, spec.head_dim)
    return jnp.where(valid, x, 0)

  return gather(cache.k_pages), gather(cache.v_pages)


def check_layer(spec: CacheSpec, layer):
  """Validates a layer index: a known value is range-checked now; a traced int32 scalar is
  accepted (inside `lax.scan` over layers) and an out-of-range value there touches nothing."""
  return check_index("layer", layer, spec.num_layers, "num_layers")


def check_index(name: str, value, size: int, size_name: str) -> jax.Array:
  """A scalar index in ``[0, size)`` as an int32 scalar: checked now when its value is known
  (Python, NumPy or concrete JAX integer); a traced one is taken as it is."""
  integer = isinstance(value, (int, np.integer)) or (
      isinstance(value, (jax.Array, np.ndarray)) and jnp.issubdtype(value.dtype, jnp.integer))
  if isinstance(value, (bool, np.bool_)) or not integer or np.ndim(value) != 0:
    raise JaxPagedError(f"{name} must be an int (or an int32 scalar inside jit), got "
                        f"{getattr(value, 'dtype', type(value).__name__)}"
                        f"{list(np.shape(value))}; pass the index as a scalar.")
  if isinstance(value, jax.Array) and checks.is_traced(value):
    if value.dtype.itemsize > 4 or value.dtype == jnp.uint32:  # out of int32: out of range
      low = 0 if jnp.issubdtype(value.dtype, jnp.unsignedinteger) else checks.INT32_MIN
      value = jnp.clip(value, jnp.asarray(low, value.dtype),
                       jnp.asarray(checks.INT32_MAX, value.dtype))
    return value.astype(jnp.int32)
  if not 0 <= int(value) < size:
    raise JaxPagedError(f"{name} must be in [0, {size}), got {int(value)}; the cache was built "
                        f"with {size_name}={size}.")
  return jnp.asarray(int(value), jnp.int32)
