"""The page allocator: traceable plan/apply cores of `extend`, `release` and `fork`.

Each operation first computes a plan (a NamedTuple of arrays: which rows are refused and why,
how many pages each row takes) and then applies it. Every update touches only the rows, pages
and stack entries it changes (scatters with out-of-bounds indices for "nothing"), so its cost
does not grow with ``num_pages`` and a cache donated by the caller's own jitted step is updated
in place. A refused call routes every scatter out of bounds: the cache comes back exactly as it
went in. Prefix caching is reached only through `jaxpaged._src.prefix_hooks`.

Internal API (for the other ``jaxpaged._src`` modules): `ExtendPlan`, `extend_plan`,
`extend_core`, `release_core`, `fork_problems`, `fork_core`, `EXTEND_REASONS`, `FORK_REASONS`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpaged._src import prefix_hooks
from jaxpaged._src.cache import PagedKVCache, cdiv, duplicated, pools, token_rows, with_pools

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

FORK_REASONS = {
    "bad_src": ("src_ids", "is out of range [0, {max_seqs}) for a live row"),
    "bad_dst": ("dst_ids", "is out of range [-1, {max_seqs}) (use -1 for padding rows)"),
    "duplicate": ("dst_ids", "appears twice; each destination can be forked into once"),
    "dst_in_use": ("dst_ids", "is a sequence that still holds tokens; release it before "
                   "forking into it"),
}


def any_problem(problems: dict) -> jax.Array:
  """``bool[]``: some mask of a problems dict (reason -> ``bool[B]``) is set."""
  return jnp.any(jnp.stack([jnp.any(m) for m in problems.values()]))


# ----------------------------------------------------------------------------- extend

class ExtendPlan(NamedTuple):
  """Everything `extend` decides, per row (``[B]`` arrays unless said); nothing written yet."""
  problems: dict  # reason (`EXTEND_REASONS`) -> bool[B] (bool[] for the whole-call ones)
  ok: jax.Array  # bool[]: no problem; the call goes ahead
  live: jax.Array  # bool[B]: not a padding row
  counts: jax.Array  # tokens appended (0 for padding rows)
  layout: jax.Array  # entries the row owns in the token layout (padding rows keep theirs)
  old_len: jax.Array
  new_len: jax.Array
  old_pages: jax.Array
  cow: jax.Array  # bool[B]: appends into a shared, partly filled page: copies it first
  last_page: jax.Array  # the row's last page before the call
  need: jax.Array  # pages the row takes (new pages plus its copy)


def extend_plan(cache: PagedKVCache, seq_ids, num_new_tokens, num_slots: int) -> ExtendPlan:
  """The `ExtendPlan` of an `extend` on checked arguments (traceable)."""
  spec = cache.spec
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
  old_pages = cdiv(old_len, spec.page_size)
  last_page = cache.page_table[rows, jnp.maximum(old_pages - 1, 0)]
  cow = _copies_on_write(cache, n, old_len, last_page)
  need = cdiv(new_len, spec.page_size) - old_pages + cow
  problems["out_of_pages"] = jnp.sum(need) > cache.num_free + prefix_hooks.evictable(cache.prefix)
  ok = ~any_problem(problems)
  return ExtendPlan(problems, ok, live, n, layout, old_len, new_len, old_pages, cow & ok,
                    last_page, need)


def _copies_on_write(cache, counts, old_len, last_page):
  """``bool[B]``: the row's new tokens land in a partly filled page some other sequence also
  holds. When several sharers append in one call, each takes a copy except the last, which
  keeps the page."""
  appends_into = (counts > 0) & (old_len % cache.spec.page_size != 0)
  same = appends_into[:, None] & appends_into[None, :] & (last_page[:, None] == last_page[None, :])
  earlier_copies = jnp.sum(jnp.tril(same, k=-1), axis=1)
  return appends_into & (cache.ref_counts[jnp.clip(last_page, 0)] - earlier_copies > 1)


def _new_pages(cache, plan: ExtendPlan, width: int):
  """``(prefix, new_page int32[B, width], allocated bool[B, width])``: the pages each row takes,
  popped from the free stack and, past its end, evicted cached blocks (prefix caching)."""
  k = jnp.arange(width)
  allocated = (k < plan.need[:, None]) & plan.ok
  alloc_index = (jnp.cumsum(plan.need) - plan.need)[:, None] + k
  top = cache.num_free - 1 - alloc_index
  new_page = cache.free_pages[jnp.clip(top, 0, cache.spec.num_pages - 1)]
  total = jnp.where(plan.ok, jnp.sum(plan.need), 0)
  prefix, victims = prefix_hooks.evict_for_allocation(
      cache.prefix, cache.ref_counts, jnp.maximum(total - cache.num_free, 0), new_page.size)
  if victims is not None:
    past_stack = jnp.clip(alloc_index - cache.num_free, 0, victims.shape[0] - 1)
    new_page = jnp.where(alloc_index >= cache.num_free, victims[past_stack], new_page)
  return prefix, new_page, allocated


def extend_core(cache, seq_ids, num_new_tokens, tokens, *, num_slots):
  """`extend` on checked arguments (``int32`` vectors, ``tokens`` None or ``int32[num_slots]``):
  traceable, for composite operations. Returns ``(cache, slots, ok)`` as `jaxpaged.extend`."""
  if seq_ids.shape[0] == 0:  # no rows: nothing to do (and nothing to index)
    return cache, jnp.full((num_slots,), -1, jnp.int32), jnp.bool_(True)
  spec = cache.spec
  plan = extend_plan(cache, seq_ids, num_new_tokens, num_slots)
  # New pages per row, as a [B, K] grid: K bounds any row's new pages (plus a copy-on-write page).
  width = min(spec.max_pages_per_seq, cdiv(num_slots, spec.page_size) + 1)
  prefix, new_page, allocated = _new_pages(cache, plan, width)
  logical = plan.old_pages[:, None] - plan.cow[:, None] + jnp.arange(width)  # [B, K]
  write_row = jnp.where(allocated, seq_ids[:, None], spec.max_seqs)  # out of bounds: dropped
  handed_out = jnp.where(allocated, new_page, spec.num_pages)
  cow_dst = jnp.where(plan.cow, new_page[:, 0], spec.num_pages)
  cow_src = jnp.clip(plan.last_page, 0)
  ref_counts = cache.ref_counts.at[handed_out].add(1, mode="drop")
  total = jnp.sum(jnp.where(plan.ok, plan.need, 0))
  cache = with_pools(cache, _copy_shared_pages(plan.cow, cow_src, cow_dst, pools(cache)))
  cache = dataclasses.replace(
      cache,
      page_table=cache.page_table.at[write_row, logical].set(new_page, mode="drop"),
      seq_lens=cache.seq_lens.at[jnp.where(plan.live & plan.ok, seq_ids, spec.max_seqs)].set(
          plan.new_len, mode="drop"),
      ref_counts=ref_counts.at[jnp.where(plan.cow, plan.last_page, spec.num_pages)].add(
          -1, mode="drop"),
      num_free=cache.num_free - jnp.minimum(total, cache.num_free))
  row_ok = plan.ok & plan.live
  slots = token_slots(cache, seq_ids, plan.layout, plan.old_len, row_ok, num_slots)
  if prefix is not None:
    prefix = prefix_hooks.note_extend(prefix, cache, seq_ids, plan, row_ok, tokens, slots,
                                      (cow_src, cow_dst), handed_out, width)
  return dataclasses.replace(cache, prefix=prefix), slots, plan.ok


def _copy_shared_pages(cow, cow_src, cow_dst, pools):
  """Copy-on-write: the pools (K/V and their scales) with each ``cow_src`` page copied to
  ``cow_dst``. The copy is skipped (no pool traffic at all) on the common steps that need
  none."""
  def copy(pools):
    return {k: p.at[:, :, cow_dst].set(p[:, :, cow_src], mode="drop") for k, p in pools.items()}

  return jax.lax.cond(jnp.any(cow), copy, lambda pools: pools, pools)


def token_slots(cache, seq_ids, counts, old_len, row_ok, num_slots: int) -> jax.Array:
  """``int32[num_slots]`` slot of each layout entry; -1 for refused or padding rows, past the
  end."""
  ps = cache.spec.page_size
  row, offset, valid = token_rows(counts, num_slots)
  position = old_len[row] + offset
  page = cache.page_table[jnp.clip(seq_ids[row], 0), position // ps]
  return jnp.where(valid & row_ok[row], page * ps + position % ps, -1).astype(jnp.int32)


# ----------------------------------------------------------------------------- release

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
  freed = first & (held < num_pages) & (ref_counts[jnp.clip(held, 0, num_pages - 1)] == 0)
  rows = jnp.where(live, seq_ids, spec.max_seqs)
  prefix = cache.prefix
  if prefix is not None:  # cached blocks stay, evictable: not freed
    prefix, freed = prefix_hooks.note_release(prefix, held, freed, rows, jnp.any(live))
  push_to = jnp.where(freed, cache.num_free + jnp.cumsum(freed) - 1, num_pages)
  return dataclasses.replace(
      cache,
      page_table=cache.page_table.at[rows].set(-1, mode="drop"),
      seq_lens=cache.seq_lens.at[rows].set(0, mode="drop"),
      num_evicted=cache.num_evicted.at[rows].set(0, mode="drop"),
      ref_counts=ref_counts,
      free_pages=cache.free_pages.at[push_to].set(held, mode="drop"),
      num_free=cache.num_free + jnp.sum(freed, dtype=jnp.int32),
      prefix=prefix,
  )


# ----------------------------------------------------------------------------- fork

def fork_problems(cache, src_ids, dst_ids) -> dict:
  """`FORK_REASONS` -> ``bool[N]`` masks of a `fork` on checked arguments."""
  max_seqs = cache.spec.max_seqs
  live = dst_ids >= 0
  dst_ok = live & (dst_ids < max_seqs)
  return {
      "bad_src": live & ((src_ids < 0) | (src_ids >= max_seqs)),
      "bad_dst": (dst_ids < -1) | (dst_ids >= max_seqs),
      "duplicate": duplicated(dst_ids, live),
      "dst_in_use": dst_ok & (cache.seq_lens[jnp.where(dst_ok, dst_ids, 0)] > 0),
  }


def fork_core(cache, src_ids, dst_ids):
  """`fork` on checked ``int32`` vectors: traceable. Returns ``(cache, ok)``."""
  spec = cache.spec
  ok = ~any_problem(fork_problems(cache, src_ids, dst_ids))
  live = (dst_ids >= 0) & ok
  src = jnp.where(live, src_ids, 0)
  rows = cache.page_table[src]  # [N, max_pages_per_seq]
  dst = jnp.where(live, dst_ids, spec.max_seqs)
  shared = jnp.where(live[:, None] & (rows >= 0), rows, spec.num_pages)
  prefix = cache.prefix
  if prefix is not None:
    prefix = prefix_hooks.note_fork(prefix, src, dst)
  return dataclasses.replace(
      cache,
      page_table=cache.page_table.at[dst].set(rows, mode="drop"),
      seq_lens=cache.seq_lens.at[dst].set(cache.seq_lens[src], mode="drop"),
      num_evicted=cache.num_evicted.at[dst].set(cache.num_evicted[src], mode="drop"),
      ref_counts=cache.ref_counts.at[shared].add(1, mode="drop"),
      prefix=prefix,
  ), ok
