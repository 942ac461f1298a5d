"""Token eviction: `compress` keeps part of each sequence's stored tokens and repacks them.

A sequence of ``n`` stored tokens keeps ``k = max(1, ceil(ratio * n))`` of them (``ratio`` in
``(0, 1]``, computed in float32), chosen by a policy, in their original order, in fresh pages;
the pages it held are released (so pages shared with a fork, or kept as cached prefix blocks, are
never changed: a released cached block stays cached and keeps serving other prompts). The
sequence is re-extended *without* token ids, so it is never registered for prefix caching again
(its K/V no longer belong to the prompt prefix they would hash as). Kept tokens keep their
positions: RoPE is already in the stored keys, and ``num_evicted`` grows by ``n - k`` so that
`token_positions` continues after the last position the sequence ever had.

Policies are frozen, hashable dataclasses (static arguments of the jitted core). All share one
rule, for a sequence of ``n`` tokens keeping ``k``: the first ``s = min(sinks, k)`` tokens
(attention sinks, Xiao et al. 2023), the last ``r`` tokens (a recent window) and the ``k - s -
r`` highest-priority tokens between them (ties: the earlier token):

- `StreamingLLM`: no priority; ``r = k - s`` (sinks plus the most recent tokens).
- `KeyNorm`: priority = minus the L2 norm of the token's key, averaged over every layer and KV
  head; ``r = min(recent, k - s)``.
- `H2O`: priority = user scores (e.g. attention each token received, accumulated over decoding
  steps: the heavy hitters of Zhang et al. 2023), passed to `compress` as ``scores``.

Why `KeyNorm` is the score-based default: Devoto et al. (2024, "A Simple and Effective L2
Norm-Based Strategy for KV Cache Compression") find that keys with a low L2 norm draw high
attention, so keeping the lowest-norm keys approximates H2O's accumulated-attention ranking
without any attention statistics. It reads only the cache, so `compress` stays a pure function
of its arguments and needs no change to the model's attention. One set of tokens is kept for
every layer (pages hold all layers of a token), hence the average over layers and heads. `H2O`
is there for callers that do collect attention scores. Measured on SmolLM2-135M
(`benchmarks/bench_compress.py`, 1,536-token contexts, 4 text windows): `KeyNorm` finds a
passkey hidden at any of 5 depths after keeping a quarter of the tokens, where `StreamingLLM`
loses it unless it is recent; on running text `StreamingLLM`'s perplexity is lower (ratio 0.5:
9.73 against 10.81; 0.25: 10.03 against 11.76; 9.54 uncompressed). See the README.

Internal API: `compress_core`, `COMPRESS_REASONS`, `check_ratio`, `check_policy`,
`check_scores`, `Policy`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import allocator
from jaxpaged._src import checks
from jaxpaged._src import quant
from jaxpaged._src import sharding
from jaxpaged._src.cache import (check_cache, duplicated, keep_unless_pools, pools,
                                 with_pools)
from jaxpaged._src.spec import JaxPagedError

COMPRESS_REASONS = {
    "bad_ratio": ("ratio", "must be a number in (0, 1] (the fraction of tokens kept), got "
                  "{ratio}; pass e.g. 0.5"),
    **{reason: allocator.EXTEND_REASONS[reason] for reason in ("bad_id", "duplicate")},
    "empty": ("seq_ids", "is a sequence that holds no tokens; compress only sequences in use"),
    "out_of_pages": ("cache", "has too few free pages for the compressed copies (the "
                     "sequence's pages are shared with a fork or cached, so they are not "
                     "reused); release sequences or compress after the sharers end"),
}


# ----------------------------------------------------------------------------- policies

@dataclasses.dataclass(frozen=True)
class Policy:
  """Base of the eviction policies: keep ``sinks`` first tokens, a recent window and the
  highest-priority tokens between them (see the module docstring)."""
  sinks: int = 4

  def __post_init__(self):
    for field in dataclasses.fields(self):
      checks.count(field.name, getattr(self, field.name))

  uses_keys = False  # priority from the cached keys
  uses_scores = False  # priority from the caller's scores

  def recent_tokens(self) -> int | None:
    """Size of the recent window (None: all the budget left after the sinks)."""
    return None


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
  """StreamingLLM (Xiao et al. 2023): the first ``sinks`` tokens plus the most recent ones.

  >>> StreamingLLM(sinks=2)
  StreamingLLM(sinks=2)
  """


@dataclasses.dataclass(frozen=True)
class KeyNorm(Policy):
  """Score-based eviction by key L2 norm (Devoto et al. 2024): sinks, the ``recent`` last
  tokens, then the tokens whose keys have the lowest L2 norm (averaged over layers and heads),
  which draw the most attention. Reads only the cache.

  ``skip_layers``: the first layers left out of the average (Devoto et al. find the norm-
  attention correlation weakest in the first two layers); all layers are used when the model
  has no more than that.

  >>> KeyNorm(sinks=4, recent=8).recent_tokens()
  8
  """
  recent: int = 32
  skip_layers: int = 0
  uses_keys = True

  def recent_tokens(self) -> int:
    return self.recent


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
  """Heavy-hitter eviction (Zhang et al. 2023) on scores the caller gives `compress`
  (``scores``: e.g. accumulated attention per stored token; higher is kept): sinks, the
  ``recent`` last tokens, then the highest-scoring ones. NaN scores rank last.

  >>> H2O(recent=0)
  H2O(sinks=4, recent=0)
  """
  recent: int = 32
  uses_scores = True

  def recent_tokens(self) -> int:
    return self.recent


def check_policy(policy) -> Policy:
  """``policy`` (default `StreamingLLM()`), checked."""
  if policy is None:
    return StreamingLLM()
  if not isinstance(policy, Policy):
    raise JaxPagedError(f"policy must be a jaxpaged compression policy (StreamingLLM(), "
                        f"KeyNorm(), H2O()), got {type(policy).__name__}.")
  return policy


def check_ratio(ratio):
  """``ratio`` as a float32 scalar: a known value must be a real number in (0, 1]; a traced
  float scalar is taken as it is (out of range there: the call is refused, ``ok`` False)."""
  if isinstance(ratio, jax.Array) and checks.is_traced(ratio):
    if ratio.ndim != 0 or not jnp.issubdtype(ratio.dtype, jnp.floating):
      raise JaxPagedError(f"ratio must be a float scalar, got {ratio.dtype}{list(ratio.shape)}.")
    return ratio.astype(jnp.float32)
  bad = isinstance(ratio, (bool, np.bool_)) or np.ndim(ratio) != 0
  if not bad:
    try:
      value = float(ratio)
    except (TypeError, ValueError):
      bad = True
  if bad or not (math.isfinite(value) and 0 < value <= 1):
    raise JaxPagedError(f"ratio must be a number in (0, 1] (the fraction of each sequence's "
                        f"tokens kept), got {ratio!r}; pass e.g. 0.5 (1.0 keeps every token).")
  return jnp.asarray(value, jnp.float32)


def check_scores(policy: Policy, scores, rows: int, max_seq_len: int):
  """`H2O`'s ``scores`` as ``float32[rows, max_seq_len]``; None for the other policies."""
  if not policy.uses_scores:
    if scores is not None:
      raise JaxPagedError(f"scores are read only by the H2O policy, not {policy}; leave them "
                          "out or pass policy=H2O().")
    return None
  shape = getattr(scores, "shape", None)
  if shape is None or tuple(shape) != (rows, max_seq_len) or not jnp.issubdtype(
      scores.dtype, jnp.floating):
    raise JaxPagedError(f"scores must be a float array [len(seq_ids), max_seq_len] = "
                        f"[{rows}, {max_seq_len}] (one per stored token, higher kept) for "
                        f"{policy}, got {getattr(scores, 'dtype', type(scores).__name__)}"
                        f"{list(shape) if shape is not None else ''}.")
  return jnp.asarray(scores, jnp.float32)


def keep_counts(ratio, length):
  """``int32``: tokens kept of ``length`` stored: ``max(1, ceil(ratio * length))`` (float32),
  at most ``length``."""
  kept = jnp.ceil(ratio * length.astype(jnp.float32)).astype(jnp.int32)
  return jnp.clip(kept, jnp.minimum(1, length), length)


def keep_mask(length, keep, priority, *, sinks: int, recent: int | None, size: int):
  """``bool[B, size]``: the tokens kept (the rule of the module docstring). ``priority`` is
  ``float32[B, size]`` (higher kept), or None (sinks and the most recent tokens only)."""
  pos = jnp.arange(size)[None]
  length, keep = length[:, None], keep[:, None]
  s = jnp.minimum(sinks, keep)
  r = keep - s if recent is None else jnp.minimum(recent, keep - s)
  sink = pos < s
  tail = (pos >= length - r) & (pos < length)
  if priority is None:
    return sink | tail
  middle = (pos >= s) & (pos < length - r)
  big = jnp.finfo(jnp.float32).max
  key = jnp.where(jnp.isnan(priority), big, jnp.clip(-priority, -big, big))
  key = jnp.where(middle, key, jnp.inf)  # middle tokens sort first, by priority, then position
  order = jnp.argsort(key, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1)
  return sink | tail | (middle & (rank < keep - s - r))


def _flat(pool):
  """``[L, H, P, ps, ...] -> [L, H, P * ps, ...]``: slots on axis 2."""
  return pool.reshape(pool.shape[:2] + (-1,) + pool.shape[4:])


def _key_norms(cache, slot_grid, axis: str | None, skip_layers: int = 0):
  """``float32[B, S]``: each stored token's key L2 norm, averaged over layers and KV heads
  (``axis``: the mesh axis the heads are split over, summed across)."""
  idx = jnp.clip(slot_grid, 0).reshape(-1)
  first = skip_layers if cache.spec.num_layers > skip_layers else 0
  k = jnp.take(_flat(cache.k_pages[first:]), idx, axis=2, mode="clip")  # [L', H, B*S, D]
  k_scales, _ = quant.attention_scales(cache)
  if k_scales is not None:
    k_scales = k_scales[first:]
    scale = (jnp.take(_flat(k_scales), idx, axis=2, mode="clip") if k_scales.ndim > 1
             else k_scales[:, None, None])
    k = quant.dequantize(k, scale)
  norms = jnp.sqrt(jnp.sum(jnp.square(k.astype(jnp.float32)), axis=-1))  # [L, H, B*S]
  total, count = jnp.sum(norms, axis=(0, 1)), jnp.float32(norms.shape[0] * norms.shape[1])
  if axis is not None:
    total, count = jax.lax.psum(total, axis), jax.lax.psum(count, axis)
  return (total / count).reshape(slot_grid.shape)


def compress_plan(cache, seq_ids, ratio):
  """``(problems, live, rows, length, keep)`` of a `compress` on checked arguments."""
  spec = cache.spec
  live = seq_ids >= 0
  in_range = seq_ids < spec.max_seqs
  rows = jnp.where(live & in_range, seq_ids, 0)
  length = jnp.where(live & in_range, cache.seq_lens[rows], 0)
  ratio_ok = (ratio > 0) & (ratio <= 1)  # NaN: False
  problems = {
      "bad_ratio": ~ratio_ok,
      "bad_id": (seq_ids < -1) | ~in_range,
      "duplicate": duplicated(seq_ids, live),
      "empty": live & in_range & (length == 0),
  }
  keep = jnp.where(ratio_ok, keep_counts(jnp.where(ratio_ok, ratio, 1.0), length), length)
  return problems, live, rows, length, keep


def compress_core(cache, seq_ids, ratio, scores, *, policy: Policy, axis: str | None = None,
                  problems_only: bool = False):
  """`compress` on checked arguments (``int32[B]`` ids, a float32 ratio, ``scores`` None or
  ``float32[B, max_seq_len]``): traceable and atomic. Returns ``(cache, ok)`` (or the problems
  dict, ``problems_only``). ``axis``: inside `shard_map`, the mesh axis the KV heads are split
  over (`KeyNorm` averages over every head)."""
  spec = cache.spec
  ps, S, B = spec.page_size, spec.max_seq_len, seq_ids.shape[0]
  problems, live, rows, length, keep = compress_plan(cache, seq_ids, ratio)
  plan_ok = ~allocator.any_problem(problems)
  # Every position's slot, [B, S] (-1 past the mapped pages).
  pos = jnp.arange(S)
  page = cache.page_table[rows][:, pos // ps]
  slot_grid = jnp.where((page >= 0) & (pos < length[:, None]), page * ps + pos % ps, -1)
  if policy.uses_keys:
    priority = -_key_norms(cache, slot_grid, axis, policy.skip_layers)
  elif policy.uses_scores:
    priority = scores
  else:
    priority = None
  mask = keep_mask(length, keep, priority, sinks=policy.sinks, recent=policy.recent_tokens(),
                   size=S)
  mask &= pos < length[:, None]
  # The kept tokens' source slots, compacted in order: [B, S], -1 past each row's count.
  b = jnp.arange(B)[:, None]
  dest_col = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, S)
  src = jnp.full((B, S), -1, jnp.int32).at[b, dest_col].set(slot_grid, mode="drop")
  # Release, then extend by the kept counts (no token ids: never registered again).
  go = live & plan_ok
  counts = jnp.where(go, keep, 0)
  released = allocator.release_core(cache, jnp.where(go, seq_ids, -1))
  if problems_only:
    plan = allocator.extend_plan(released, jnp.where(go, seq_ids, -1), counts, B * S)
    problems["out_of_pages"] = plan.problems["out_of_pages"] & plan_ok
    return problems
  new, slots, ext_ok = allocator.extend_core(released, jnp.where(go, seq_ids, -1), counts, None,
                                             num_slots=B * S)
  ok = plan_ok & ext_ok
  start = jnp.cumsum(counts) - counts
  j = jnp.arange(S)[None]
  dest = jnp.where(ok & (j < counts[:, None]),
                   slots[jnp.clip(start[:, None] + j, 0, B * S - 1)], -1).reshape(-1)
  to = jnp.where(dest >= 0, dest, spec.num_pages * ps)  # out of bounds: dropped
  idx = jnp.clip(src, 0).reshape(-1)

  def move(pool):
    flat = _flat(pool)
    rows_ = jnp.take(flat, idx, axis=2, mode="clip")
    return flat.at[:, :, to].set(rows_, mode="drop").reshape(pool.shape)

  moved = {name: move(pool) for name, pool in pools(cache).items()}
  prefix = new.prefix
  if prefix is not None:  # the copied K/V are written, in every layer
    prefix = dataclasses.replace(prefix, page_written=prefix.page_written.at[
        to // ps, :, to % ps].set(True, mode="drop"))
  evicted = cache.num_evicted[rows] + length - keep
  new = dataclasses.replace(new, prefix=prefix, num_evicted=new.num_evicted.at[
      jnp.where(go, seq_ids, spec.max_seqs)].set(evicted, mode="drop"))
  out = keep_unless_pools(lambda n, o: jnp.where(ok, n, o), new, cache)
  return with_pools(out, moved), ok


_compress_jit = jax.jit(compress_core, static_argnames=("policy", "axis", "problems_only"))


# ----------------------------------------------------------------------------- public

def _args(cache, seq_ids, ratio, policy, scores):
  seq_ids = checks.index_vector("seq_ids", seq_ids)
  policy = check_policy(policy)
  return (seq_ids, check_ratio(ratio), policy,
          check_scores(policy, scores, seq_ids.shape[0], cache.spec.max_seq_len))


def check_compress(cache: sharding.AnyCache, seq_ids: jax.Array, ratio, *, policy=None,
                   scores=None) -> None:
  """Eagerly explains why `compress` would refuse these arguments; returns None if it would not.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([6]), num_slots=6)
  >>> check_compress(cache, jnp.array([1]), 0.5)
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: seq_ids at rows [0]: is a sequence that holds no tokens; ...

  Raises:
    JaxPagedError: naming the first wrong argument, its rows and how to fix it.
  """
  if isinstance(cache, sharding.ShardedCache):
    check_ratio(ratio)
    return sharding.check_each(cache, check_compress, {"seq_ids": seq_ids}, ratio=ratio,
                               policy=policy, scores=scores)
  spec = check_cache(cache)
  seq_ids, ratio_a, policy, scores = _args(cache, seq_ids, ratio, policy, scores)
  problems = _compress_jit(cache, seq_ids, ratio_a, scores, policy=policy, problems_only=True)
  checks.raise_first(COMPRESS_REASONS, problems, max_seqs=spec.max_seqs, ratio=ratio)


def compress(cache: sharding.AnyCache, seq_ids: jax.Array, ratio, *, policy: Policy | None = None,
             scores: jax.Array | None = None) -> tuple[sharding.AnyCache, jax.Array]:
  """Keeps about ``ratio`` of each sequence's stored tokens and repacks them into fewer pages.

  Each row keeps ``max(1, ceil(ratio * n))`` of its ``n`` tokens, chosen by ``policy``, in
  order, in fresh pages, and frees the rest (see the module docstring for the rule and the
  policies). Pages shared with other sequences or cached as prefix blocks are never changed:
  the sequence lets go of them (a cached block stays cached and keeps serving `match_prefix`).
  The sequence is never registered for prefix caching again. Its positions continue:
  ``num_evicted`` grows by the tokens dropped (`token_positions`). Attention masks work on
  storage indices, so decoding goes on as before over the kept tokens. ``ratio`` 1 keeps every
  token but still moves them into private pages.

  Args:
    cache: the cache (a `PagedKVCache` or `ShardedCache`, global ids); it is not changed.
    seq_ids: ``int32[B]`` sequences to compress; -1 marks a padding row.
    ratio: the fraction kept, in ``(0, 1]`` (a known value is checked now; a traced float32
      scalar out of range refuses the call).
    policy: `StreamingLLM()` (default), `KeyNorm()` or `H2O()`; static (hashable).
    scores: `H2O` only: ``float[B, max_seq_len]`` per stored token, higher kept.

  Returns:
    ``(cache, ok)``; if ``ok`` is False (bad id, repeated or empty sequence, ratio out of range,
    too few free pages for the copies) the returned cache equals the input; `check_compress`
    says why.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([16]), num_slots=16)
  >>> cache, ok = compress(cache, jnp.array([0]), 0.25, policy=StreamingLLM(sinks=1))
  >>> bool(ok), int(cache.seq_lens[0]), int(cache.num_evicted[0]), int(num_used_pages(cache))
  (True, 4, 12, 1)
  >>> cache, _, _ = extend(cache, jnp.array([0]), jnp.array([1]))
  >>> token_positions(cache, jnp.array([0]), jnp.array([1])).tolist()  # positions continue
  [16]
  """
  if isinstance(cache, sharding.ShardedCache):
    sharding.check_sharded(cache)
    shape_only = dataclasses.replace(cache.shards, spec=cache.spec)  # reads only the spec
    seq_ids, ratio, policy, scores = _args(shape_only, seq_ids, ratio, policy, scores)
    return sharding.compress(cache, seq_ids, ratio, scores, policy=policy)
  check_cache(cache)
  seq_ids, ratio, policy, scores = _args(cache, seq_ids, ratio, policy, scores)
  return _compress_jit(cache, seq_ids, ratio, scores, policy=policy)
