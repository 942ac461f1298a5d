"""The device half of `CacheManager.admit`: one plan, applied in one jitted step.

The host hashes the prompt once (`jaxpaged.block_hashes`, bit-identical to the device's hash) and
hands the hashes, the prompt and the host tier's candidate blocks (verified copies of this
prompt's blocks, in block order) to `admit_step`, which in one program: matches the prompt's
leading blocks cached on device, continues that run with the candidates that follow it
(promotion), checks the pool has room, then attaches, promotes and makes room for the next
prompt tokens, or changes nothing. `plan_admission` is the same decision as a read, for the one
case that needs it first: when cached blocks must be demoted to host RAM to make room, their K/V
must be on host before the device evicts them.

Internal API: `AdmitRequest`, `HostBlocks`, `AdmissionPlan`, `make_request`, `host_blocks`,
`plan_admission`, `admit_plan`, `admit_step`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import checks
from jaxpaged._src import swap
from jaxpaged._src import transfer
from jaxpaged._src.blocks import stack_blocks
from jaxpaged._src.allocator import extend_core
from jaxpaged._src.cache import cdiv
from jaxpaged._src.prefix import match_core, match_plan
from jaxpaged._src.hashing import block_hashes_numpy
from jaxpaged._src.prefix_hooks import evictable
from jaxpaged._src.spec import JaxPagedError, next_pow2


class AdmitRequest(NamedTuple):
  """One prompt to admit, as device arrays."""
  seq: jax.Array  # int32[]: the free sequence slot
  row: jax.Array  # int32[1, W]: the prompt, zero-padded
  hashes: jax.Array  # uint32[1, W // page_size, 2]: its block hashes (zero past the full blocks)
  length: jax.Array  # int32[]: prompt tokens
  salt: jax.Array  # uint32[2]: salt lanes
  limit: jax.Array  # int32[]: at most this many prompt tokens appended now
  room_pages: jax.Array  # int32[]: pages the sequence must find room for (prefix hits count)


class HostBlocks(NamedTuple):
  """Host copies of some of the prompt's blocks, ascending block index (padding: a large
  index)."""
  index: jax.Array  # int32[N]
  kv: dict  # the pools' pages by name (`cache.pools`): K/V [L, H, N, page_size, D], scales


class AdmissionPlan(NamedTuple):
  """What an admission does (``int32[]`` each, ``ok`` ``bool[]``)."""
  ok: jax.Array  # there is room; the admission goes ahead
  matched: jax.Array  # leading blocks found on device
  promoted: jax.Array  # blocks after them brought from host
  num_new: jax.Array  # prompt tokens appended now, after the cached ones
  need: jax.Array  # new pages the admission takes (promoted blocks, new tokens)


# ----------------------------------------------------------------------------- host half

def make_request(spec, tokens, salt, max_prompt_tokens, room_tokens, num_slots
                 ) -> tuple[AdmitRequest, np.ndarray, int, int]:
  """The checked `AdmitRequest` of `CacheManager.admit`'s arguments (``seq`` -1: the slot is
  chosen later), the prompt's ids, the salt and ``num_slots``. NumPy values: the step's call
  moves them (no staging programs of their own). The prompt is hashed here, once."""
  ps = spec.page_size
  tokens = checks.host_token_ids("tokens", tokens)
  length = len(tokens)
  if not 1 <= length <= spec.max_seq_len:
    raise JaxPagedError(f"tokens must hold 1..{spec.max_seq_len} ids (max_pages_per_seq * "
                        f"page_size), got {length}.")
  salt = checks.salt("salt", salt)
  limit = (length if max_prompt_tokens is None
           else checks.count("max_prompt_tokens", max_prompt_tokens))
  room = 0 if room_tokens is None else cdiv(checks.count("room_tokens", room_tokens), ps)
  width = max(next_pow2(length), ps)
  hashes = np.zeros((1, width // ps, 2), np.uint32)
  usable = (length - 1) // ps  # the last prompt token is always computed
  if spec.prefix_caching and usable:  # the prompt's one hash
    hashes[0, :usable] = block_hashes_numpy(tokens[:usable * ps], ps, salt, spec.block_hash)
  row = np.zeros((1, width), np.int32)
  row[0, :length] = tokens
  # NumPy arguments: the step's call moves them (no staging programs of their own).
  request = AdmitRequest(
      np.int32(-1), row, hashes, np.int32(length),
      np.array(checks.split_salt(salt), np.uint32), np.int32(min(limit, length)),
      np.int32(room))
  if num_slots is None:
    num_slots = min(max(next_pow2(min(length, limit)), 1), spec.max_seq_len)
  num_slots = checks.count("num_slots", num_slots, minimum=1, maximum=spec.max_seq_len)
  return request, tokens, salt, num_slots


def host_blocks(spec, blocks) -> HostBlocks | None:
  """``(index, block)`` candidates (`HostTier.candidates`) as `HostBlocks` of NumPy arrays, padded
  to a power of two (few compiles); None without candidates."""
  if not blocks:
    return None
  size = swap.bucket(len(blocks), spec.max_pages_per_seq)
  index = np.full((size,), np.iinfo(np.int32).max, np.int32)
  index[:len(blocks)] = [i for i, _ in blocks]
  return HostBlocks(index, stack_blocks([b for _, b in blocks], size))


# ----------------------------------------------------------------------------- device half

def _host_run(host: HostBlocks | None, matched, max_blocks: int):
  """Blocks of ``host`` that continue the device hits: the run of consecutive indices from
  ``matched`` on (0 without host blocks)."""
  if host is None:
    return jnp.int32(0)
  present = jnp.zeros((max_blocks + 1,), bool).at[host.index].set(True, mode="drop")
  following = present[jnp.clip(matched + jnp.arange(max_blocks), 0, max_blocks)]
  return jnp.sum(jnp.cumprod(following), dtype=jnp.int32)


def plan_admission(cache, request: AdmitRequest, host: HostBlocks | None, num_slots: int
                   ) -> tuple[AdmissionPlan, jax.Array]:
  """The `AdmissionPlan` and the device hit pages (``int32[W // page_size]``, -1 past the
  hits). A read: changes nothing. Traceable."""
  spec = cache.spec
  ps = spec.page_size
  found = match_plan(cache, request.seq[None], request.row, request.length[None],
                     request.salt[None], None, 0, "auto", False, request.hashes)
  matched = found.matched[0]
  promoted = _host_run(host, matched, spec.max_pages_per_seq)
  cached = (matched + promoted) * ps
  num_new = jnp.clip(jnp.minimum(jnp.minimum(request.length - cached, request.limit),
                                 num_slots), 0)
  need = cdiv(cached + num_new, ps) - matched
  hits = jnp.where(jnp.arange(found.pages.shape[1]) < matched, found.pages[0], -1)
  idle = jnp.sum((hits >= 0) & (cache.ref_counts[jnp.clip(hits, 0)] == 0), dtype=jnp.int32)
  room = jnp.maximum(need, request.room_pages - matched)
  ok = found.ok & (room <= cache.num_free + evictable(cache.prefix) - idle)
  return AdmissionPlan(ok, matched, promoted, num_new, need), hits


@functools.partial(jax.jit, static_argnames=("num_slots", "max_victims"))
def admit_plan(cache, request: AdmitRequest, host: HostBlocks | None, *, num_slots: int,
               max_victims: int):
  """``(plan, victims, contents)``: `plan_admission`, and the cached blocks to demote so that
  the free pages cover ``plan.need`` (never the hit pages), with their contents
  (`transfer.demote_plan`). A read: changes nothing."""
  plan, hits = plan_admission(cache, request, host, num_slots)
  victims, contents = transfer.demote_plan(cache, plan.need - cache.num_free, hits,
                                           max_count=max_victims)
  return plan, victims, contents


@functools.partial(jax.jit, static_argnames=("num_slots",), donate_argnames=("cache",))
def admit_step(cache, victims, request: AdmitRequest, host: HostBlocks | None, *,
               num_slots: int):
  """Evicts ``victims`` (demoted already), then admits the request as `plan_admission` plans
  it: attaches the device hits, appends the promoted host blocks (copying their K/V in), and
  makes room for the next ``plan.num_new`` prompt tokens. Refused (``plan.ok`` False): changes
  nothing but the eviction. Returns ``(cache, plan, slots int32[num_slots], done)``; ``done``
  False after a planned ``ok`` would be a bug."""
  cache = transfer.evict_blocks(cache, victims)
  plan, _ = plan_admission(cache, request, host, num_slots)
  seq = jnp.where(plan.ok, request.seq, -1)[None]  # refused: every step below sees padding
  cache, found = match_core(cache, seq, request.row, request.length[None], request.salt[None],
                            jnp.zeros((1,), jnp.int32), num_slots=1, impl="auto",
                            interpret=False, hashes=request.hashes)
  done = found.ok & (found.num_cached[0] == jnp.where(plan.ok, plan.matched * cache.spec.page_size,
                                                      0))
  cached = (plan.matched + plan.promoted) * cache.spec.page_size
  if host is not None:
    cache, promoted = _promote(cache, seq[0], request, host, plan)
    done &= promoted
  tokens = _window(request.row[0], cached, num_slots, plan.num_new)
  cache, slots, extended = extend_core(cache, seq, jnp.where(plan.ok, plan.num_new, 0)[None],
                                       tokens, num_slots=num_slots)
  return cache, plan, slots, done & extended


def _promote(cache, seq, request: AdmitRequest, host: HostBlocks, plan: AdmissionPlan):
  """Appends the ``plan.promoted`` host blocks after the hits (`transfer.restore_core`)."""
  ps = cache.spec.page_size
  count = host.index.shape[0]
  order = jnp.searchsorted(host.index, plan.matched + jnp.arange(count))
  kv = {name: jnp.take(x, jnp.clip(order, 0, count - 1), axis=2) for name, x in host.kv.items()}
  tokens = _window(request.row[0], plan.matched * ps, count * ps, plan.promoted * ps)
  return transfer.restore_core(cache, seq, plan.promoted * ps, tokens, request.salt, kv, None,
                               match=False)


def _window(row, start, size: int, count):
  """``int32[size]``: ``row[start:start + count]``, zero past ``count``."""
  i = jnp.arange(size)
  return jnp.where(i < count, row[jnp.clip(start + i, 0, row.shape[0] - 1)], 0)
