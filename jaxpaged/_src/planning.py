"""Host-side plans of the manager's operations: the room an extend needs (and whom to preempt
for it), which swapped sequences fit back, which cached blocks to demote. Plans read the
device state and change nothing; `CacheManager` applies them in its own steps.

Internal API: `RowsPlan`, `plan_rows`, `plan_swap_ins`, `ENOUGH_SLOTS`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import checks
from jaxpaged._src import manager_steps as steps
from jaxpaged._src import swap
from jaxpaged._src.cache import cdiv, check_num_slots
from jaxpaged._src.registry import SequenceRegistry
from jaxpaged._src.spec import JaxPagedError, next_pow2

ENOUGH_SLOTS = object()  # `plan_rows`: as many slots as the rows' tokens


@dataclasses.dataclass
class RowsPlan:
  """An extend's rows and the room it needs: sequences to swap out, pages to free."""
  seq_ids: jax.Array
  counts: jax.Array
  num_slots: int
  released: list
  max_seqs: int
  fits: bool = False
  need: int = 0
  shortfall: int = 0

  @property
  def released_ids(self) -> jax.Array:
    """``int32[max_seqs]``: the sequences to swap out, -1 padded."""
    return steps.padded_ids(self.released, self.max_seqs)


def _check_rows(spec, cache, registry: SequenceRegistry, seq_ids, num_new_tokens, num_slots):
  """The checked ``(seq_ids, counts, num_slots)`` of an extend of active rows."""
  seq_ids = checks.index_vector("seq_ids", seq_ids)
  counts = checks.index_vector("num_new_tokens", num_new_tokens, seq_ids.shape[0])
  ids, n = np.asarray(seq_ids), np.asarray(counts)
  if num_slots is ENOUGH_SLOTS:
    num_slots = max(int(np.maximum(n, 0).sum()), 1)
  num_slots = check_num_slots(spec, num_slots, seq_ids.shape[0])
  rows = [int(s) for s in ids if s != -1]
  strangers = [s for s in rows if s not in registry.active]
  if strangers:
    raise JaxPagedError(f"seq_ids {strangers} are not active sequences of this manager "
                        "(admitted, not released or swapped out); admit or swap_in them "
                        "first, or use -1 for padding rows.")
  if len(set(rows)) != len(rows):
    raise JaxPagedError(f"seq_ids {rows} repeat a sequence; give each one row per call.")
  if (n < 0).any():
    raise JaxPagedError(f"num_new_tokens {n.tolist()} must be >= 0.")
  lengths = np.asarray(cache.seq_lens)
  too_long = [s for s, k in zip(ids.tolist(), n.tolist())
              if s != -1 and lengths[s] + k > spec.max_seq_len]
  if too_long:
    raise JaxPagedError(f"num_new_tokens would grow sequences {too_long} past max_seq_len = "
                        f"{spec.max_seq_len} (max_pages_per_seq * page_size); release "
                        "them or build the cache with a larger max_pages_per_seq.")
  if int(n.sum()) > num_slots:
    raise JaxPagedError(f"num_new_tokens sums to {int(n.sum())}, more than num_slots = "
                        f"{num_slots}; pass a larger num_slots.")
  return seq_ids, counts, num_slots


def plan_rows(spec, cache, registry: SequenceRegistry, seq_ids, num_new_tokens, num_slots,
              preempt: bool) -> RowsPlan:
  """Checks an extend of active rows and plans its room: which other sequences to swap out
  (with ``preempt``, least recently used first) and how many pages to free."""
  seq_ids, counts, num_slots = _check_rows(spec, cache, registry, seq_ids, num_new_tokens,
                                           num_slots)
  plan = RowsPlan(seq_ids, counts, num_slots, [], spec.max_seqs)
  room = lambda: tuple(int(x) for x in steps.room(cache, plan.released_ids, plan.seq_ids,
                                                  plan.counts, num_slots=plan.num_slots))
  need, free, spare = room()
  others = registry.least_recent(excluding=np.asarray(seq_ids).tolist())
  while need > free + spare and preempt and others:
    plan.released.append(others.pop(0))
    need, free, spare = room()
  plan.fits = need <= free + spare
  plan.need, plan.shortfall = need, max(need - free, 0)
  return plan


def plan_swap_ins(spec, cache, host, ids: list[int], available: int):
  """Which swapped sequences fit back, in order, each as room allows: ``(need, keep,
  restores, chosen)``: pages they take, device pages to keep (their blocks still cached,
  attached instead of copied), `transfer.restore_core` arguments, and the ids chosen."""
  ref_counts = np.asarray(cache.ref_counts)
  need, keep, restores, chosen = 0, set(), [], []
  for s in ids:
    swapped = host.sequence(s)
    args, match = swap.swap_in_args(cache, swapped)
    hits = _device_hits(spec, cache, s, swapped) if match else np.zeros((0,), np.int32)
    idle = {int(p) for p in hits if ref_counts[p] == 0} - keep  # attached: not reclaimable
    pages = cdiv(swapped.length, spec.page_size) - len(hits)
    if need + pages > available - len(idle):
      continue
    available -= len(idle)
    need += pages
    keep |= {int(p) for p in hits}
    restores.append((args, match))
    chosen.append(s)
  return need, sorted(keep), restores, chosen


def _device_hits(spec, cache, seq_id: int, swapped) -> np.ndarray:
  """The device pages of the swapped sequence's blocks still cached (attached on swap-in)."""
  tokens = np.asarray(swapped.tokens[:swapped.length], np.int32)
  width = max(next_pow2(len(tokens)), spec.page_size)
  row = np.pad(tokens, (0, width - len(tokens)))[None]
  lanes = np.array(checks.split_salt(swapped.salt), np.uint32)[None]
  matched, pages = steps.device_matches(cache, jnp.array([seq_id], jnp.int32), row,
                                        jnp.array([swapped.length], jnp.int32), lanes)
  return np.asarray(pages)[0, :int(matched[0])]
