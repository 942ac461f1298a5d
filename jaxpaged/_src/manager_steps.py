"""The device programs of `CacheManager` other than admission (`jaxpaged._src.admission`).

Plans are pure reads; the apply steps donate the manager's own cache (it owns it), so the pools
are updated in place. Sequence lists are padded to ``max_seqs`` (-1), page lists to powers of
two, so few programs compile.

Internal API: `room`, `demotion_plan`, `device_matches`, `room_step`, `extend_step`,
`restore_step`, `compress_step`, `compress_copy_step`, `padded_ids`, `NO_VICTIMS`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import defrag
from jaxpaged._src import compress as compress_lib
from jaxpaged._src import transfer
from jaxpaged._src.allocator import extend_core, extend_plan, release_core
from jaxpaged._src.prefix import match_plan
from jaxpaged._src.prefix_hooks import evictable

NO_VICTIMS = jnp.full((1,), -1, jnp.int32)  # no cached block to evict


def padded_ids(ids, size: int) -> jax.Array:
  """``int32[size]``: ``ids`` then -1 (few shapes: few compiles)."""
  return jnp.asarray(np.pad(np.asarray(ids, np.int32), (0, size - len(ids)), constant_values=-1))


@functools.partial(jax.jit, static_argnames=("num_slots",))
def room(cache, released, seq_ids, counts, *, num_slots):
  """After releasing ``released``: pages an `extend` of the rows takes, free pages, evictable
  pages."""
  cache = release_core(cache, released)
  need = extend_plan(cache, seq_ids, counts, num_slots).need
  return jnp.sum(jnp.where(seq_ids >= 0, need, 0)), cache.num_free, evictable(cache.prefix)


@functools.partial(jax.jit, static_argnames=("max_count",))
def demotion_plan(cache, released, count, keep, *, max_count):
  """`transfer.demote_plan` after releasing ``released``."""
  return transfer.demote_plan(release_core(cache, released), count, keep, max_count=max_count)


@jax.jit
def device_matches(cache, seq_ids, tokens, lengths, salts):
  """How many blocks `match_prefix` would attach, and their pages, without attaching them."""
  plan = match_plan(cache, seq_ids, tokens, lengths, salts, None, 0, "auto", False)
  return plan.matched, plan.pages


def _make_room(cache, released, victims):
  return transfer.evict_blocks(release_core(cache, released), victims)


room_step = jax.jit(_make_room, donate_argnames=("cache",))
# `jaxpaged.defragment` in place: ``(cache, new_of_old)``.
defragment_step = jax.jit(defrag.defragment_core, donate_argnums=0)
room_step.__doc__ = "Releases ``released``, then evicts ``victims`` (demoted already)."


@functools.partial(jax.jit, static_argnames=("num_slots",), donate_argnames=("cache",))
def extend_step(cache, released, victims, seq_ids, counts, tokens, *, num_slots):
  """`room_step`, then `extend` of the rows."""
  return extend_core(_make_room(cache, released, victims), seq_ids, counts, tokens,
                     num_slots=num_slots)


@functools.partial(jax.jit, static_argnames=("matches",), donate_argnames=("cache",))
def restore_step(cache, victims, restores, *, matches):
  """Evicts the planned victims, then restores each swapped sequence (`transfer.restore_core`)."""
  cache = transfer.evict_blocks(cache, victims)
  oks = []
  for args, match in zip(restores, matches):
    cache, ok = transfer.restore_core(cache, *args, match=match)
    oks.append(ok)
  return cache, jnp.all(jnp.stack(oks))


compress_step = jax.jit(compress_lib.compress_core, static_argnames=("policy", "axis",
                                                                     "problems_only"),
                        donate_argnames=("cache",))
compress_step.__doc__ = "`compress` of the rows, in place (`compress.compress_core`)."
compress_copy_step = jax.jit(compress_lib.compress_core, static_argnames=("policy", "axis",
                                                                          "problems_only"))
compress_copy_step.__doc__ = ("`compress` of the rows into a new cache, the input kept (to roll "
                              "an automatic compression back).")
