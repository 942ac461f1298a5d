"""The prefix cache's device hash table: block hash -> page, open addressing, double hashing.

The table is three ``int32[capacity]`` arrays (capacity a power of two): the two 32-bit lanes of
each key (hash bits, bitcast to int32) and the page it maps to, or `EMPTY` / `DELETED`. A key's
probe sequence is ``(lane0 + i * (lane1 | 1)) mod capacity`` for ``i < PROBES`` (double
hashing). Lookup stops at the first empty slot; deletion leaves a tombstone so later keys stay
reachable. An insert that finds no free slot within its probes fails and says so: a live entry
is never overwritten.

`lookup` is the hot path (every prompt block of every new request): a Pallas GPU kernel that
unrolls every probe, and an XLA path that takes one probe step for all queries at once and stops
when every query is resolved. Both return the same pages.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpaged._src import gpu

# Pages are >= 0, so negative values mark free slots: EMPTY was never used (a lookup stops there),
# DELETED is a tombstone (a lookup probes past it, an insert reuses it).
EMPTY, DELETED = -1, -2
NOT_FOUND = -1  # the page `lookup` and `probe` return for a key that is not in the table
# Probes per key. At the default capacity (2 * num_pages rounded up, so at most half the slots
# hold live keys) an insert finds no free slot in 32 probes with probability at most ~2**-32.
PROBES = 32
# The lookup kernel's queries per program: with 4 warps (128 threads), one query per thread.
_LOOKUP_BLOCK = 128
_LOOKUP_WARPS = 4


def keys_of(hashes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``uint32[..., 2]`` hashes -> two ``int32[...]`` key lanes."""
  lanes = jax.lax.bitcast_convert_type(hashes, jnp.int32)
  return lanes[..., 0], lanes[..., 1]


def _slot(lo: jax.Array, hi: jax.Array, i: jax.Array | int, capacity: int) -> jax.Array:
  """The i-th probe of a key: double hashing, the step being the key's second lane made odd, so
  coprime with the power-of-two capacity (no slot repeats before every slot was probed). Keys
  that collide once part ways, unlike with linear probing's step of 1, so probe runs stay short
  (the batched lookup waits for its longest)."""
  return (lo + i * (hi | 1)) & (capacity - 1)


def _probe_slots(lo: jax.Array, hi: jax.Array, capacity: int) -> jax.Array:
  """Every probe of each key: ``int32[..., PROBES]`` slots."""
  return _slot(lo[..., None], hi[..., None], jnp.arange(PROBES, dtype=jnp.int32), capacity)


# ----------------------------------------------------------------------------- lookup

def _lookup_xla(table_lo: jax.Array, table_hi: jax.Array, table_pages: jax.Array, lo: jax.Array,
                hi: jax.Array) -> jax.Array:
  """Probes step by step for every query at once, and stops as soon as all are resolved (at
  the default load, at most half the slots live, after one or two steps for most keys)."""
  capacity = table_pages.shape[0]

  def probe(state):
    i, result, searching = state
    slot = _slot(lo, hi, i, capacity)
    page = table_pages[slot]
    hit = searching & (page >= 0) & (table_lo[slot] == lo) & (table_hi[slot] == hi)
    return (i + 1, jnp.where(hit, page, result), searching & ~hit & (page != EMPTY))

  _, result, _ = jax.lax.while_loop(
      lambda state: (state[0] < PROBES) & jnp.any(state[2]), probe,
      (jnp.int32(0), jnp.full(lo.shape, NOT_FOUND, jnp.int32), jnp.ones(lo.shape, bool)))
  return result


def _lookup_kernel(
    lo_ref,  # [block] int32: key lane 0 of each query
    hi_ref,  # [block] int32: key lane 1
    table_lo_ref,  # [capacity] int32
    table_hi_ref,  # [capacity] int32
    table_pages_ref,  # [capacity] int32
    out_ref,  # [block] int32: page, or NOT_FOUND
):
  """One program per block of queries; the probes are unrolled, each a gather of the block."""
  capacity = table_pages_ref.shape[0]
  lo, hi = lo_ref[...], hi_ref[...]
  result = jnp.full(lo.shape, NOT_FOUND, jnp.int32)
  searching = jnp.ones(lo.shape, jnp.bool_)
  for i in range(PROBES):
    slot = _slot(lo, hi, i, capacity)
    page = table_pages_ref[slot]
    hit = searching & (page >= 0) & (table_lo_ref[slot] == lo) & (table_hi_ref[slot] == hi)
    result = jnp.where(hit, page, result)
    searching &= ~hit & (page != EMPTY)
  out_ref[...] = result


def _lookup_pallas(table_lo: jax.Array, table_hi: jax.Array, table_pages: jax.Array,
                   lo: jax.Array, hi: jax.Array, *, block: int, interpret: bool) -> jax.Array:
  num = lo.shape[0]
  padded = -(-num // block) * block  # whole blocks; the padding queries' results are cut off
  pad = lambda x: jnp.pad(x, (0, padded - num))
  query = pl.BlockSpec((block,), lambda i: (i,))
  table = pl.BlockSpec(table_pages.shape, lambda i: (0,))
  out = pl.pallas_call(
      _lookup_kernel,
      grid=(padded // block,),
      in_specs=[query, query, table, table, table],
      out_specs=query,
      out_shape=jax.ShapeDtypeStruct((padded,), jnp.int32),
      # One stage: the probes are unrolled gathers, there is no loop of loads to pipeline.
      compiler_params=gpu.compiler_params(num_warps=_LOOKUP_WARPS, num_stages=1),
      interpret=interpret,
      name="jaxpaged_prefix_lookup",
  )(pad(lo), pad(hi), table_lo, table_hi, table_pages)
  return out[:num]


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "block"))
def lookup(table_lo: jax.Array, table_hi: jax.Array, table_pages: jax.Array, hashes: jax.Array,
           *, impl: str = "auto", interpret: bool = False,
           block: int = _LOOKUP_BLOCK) -> jax.Array:
  """Pages of a batch of block hashes (``uint32[..., 2]``), `NOT_FOUND` where absent:
  ``int32[...]``."""
  lo, hi = keys_of(hashes)
  shape = lo.shape
  lo, hi = lo.reshape(-1), hi.reshape(-1)
  if gpu.resolve_impl(impl) == "pallas":
    pages = _lookup_pallas(table_lo, table_hi, table_pages, lo, hi, block=block,
                           interpret=interpret)
  else:
    pages = _lookup_xla(table_lo, table_hi, table_pages, lo, hi)
  return pages.reshape(shape)


# ----------------------------------------------------------------------------- insert, delete

def probe(table_lo: jax.Array, table_hi: jax.Array, table_pages: jax.Array,
          hash_: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One key (``uint32[2]``): ``(page, free_slot)``, the page it maps to (`NOT_FOUND` if absent)
  and the first free slot (empty or deleted) of its probe sequence (``capacity`` if none)."""
  lo, hi = keys_of(hash_)
  capacity = table_pages.shape[0]
  slots = _probe_slots(lo, hi, capacity)
  page = _lookup_xla(table_lo, table_hi, table_pages, lo[None], hi[None])[0]
  free = table_pages[slots] < 0
  return page, jnp.where(jnp.any(free), slots[jnp.argmax(free)], capacity)


def put(table_lo: jax.Array, table_hi: jax.Array, table_pages: jax.Array, slot: jax.Array,
        hash_: jax.Array, page: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Writes ``hash_ -> page`` at ``slot`` (dropped when ``slot`` is ``capacity``)."""
  lo, hi = keys_of(hash_)
  return (table_lo.at[slot].set(lo, mode="drop"), table_hi.at[slot].set(hi, mode="drop"),
          table_pages.at[slot].set(page, mode="drop"))


def insert(table_lo: jax.Array, table_hi: jax.Array, table_pages: jax.Array, hashes: jax.Array,
           pages: jax.Array, want: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Inserts ``hashes[i] -> pages[i]`` where ``want[i]``, one key after another (inserts are
  few per step; probing each is vectorised). A key already present is left alone.

  Returns:
    ``(table_lo, table_hi, table_pages, inserted bool[N])``: ``inserted`` False where not
    wanted, where the key was present, or where no free slot was within its probes (the table
    is full there).
  """
  capacity = table_pages.shape[0]

  def one(i, state):
    table_lo, table_hi, table_pages, inserted = state
    present, free_slot = probe(table_lo, table_hi, table_pages, hashes[i])
    slot = jnp.where(want[i] & (present < 0), free_slot, capacity)
    return put(table_lo, table_hi, table_pages, slot, hashes[i], pages[i]) + (
        inserted.at[i].set(slot < capacity),)

  # Only the wanted keys take a step each: a decode step usually inserts none.
  order = jnp.argsort(~want, stable=True)
  count = jnp.sum(want)

  def step(j, state):
    return one(order[j], state)

  return jax.lax.fori_loop(0, count, step,
                           (table_lo, table_hi, table_pages, jnp.zeros(want.shape, bool)))


def delete(table_lo: jax.Array, table_hi: jax.Array, table_pages: jax.Array, hashes: jax.Array,
           pages: jax.Array, want: jax.Array) -> jax.Array:
  """Removes the entries mapping ``hashes[i]`` to ``pages[i]`` where ``want[i]`` (tombstones)."""
  lo, hi = keys_of(hashes)
  slots = _probe_slots(lo, hi, table_pages.shape[0])  # [N, PROBES]
  hit = ((table_pages[slots] == pages[:, None]) & (table_lo[slots] == lo[:, None])
         & (table_hi[slots] == hi[:, None]) & want[:, None])
  slot = jnp.where(jnp.any(hit, axis=1), jnp.take_along_axis(
      slots, jnp.argmax(hit, axis=1)[:, None], axis=1)[:, 0], table_pages.shape[0])
  return table_pages.at[slot].set(DELETED, mode="drop")
