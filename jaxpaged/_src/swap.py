"""Moving sequences' K/V between the device pool and host RAM: swap out and swap in (cached
prefix blocks are demoted and promoted by `jaxpaged._src.blocks`).

The device half is `jaxpaged._src.transfer` (jitted, pure and atomic). This module is the host
half: its public functions check their arguments, start
device-to-host copies without waiting (into ``pinned_host`` memory when the device has it) and
keeps what a sequence or a block needs to come back bit-exactly: K/V, token ids, the 64-bit salt
and which K/V were written.

Internal API (for `CacheManager`, which runs the device half in its own donating steps):
`copy_out`, `swap_in_args`, `one_id`, `bucket`, `host_copy`.

A swapped-out sequence comes back through `match_prefix` when its token ids are known: its full
blocks usually stay cached on device after the swap-out (they were only released), so only what
was evicted meanwhile is copied in again.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import sharding
from jaxpaged._src import checks
from jaxpaged._src import transfer
from jaxpaged._src.cache import (HOST_FIELDS, PagedKVCache, check_cache, check_host_pools,
                                 check_index, host_pools, pools)
from jaxpaged._src.paging import release
from jaxpaged._src.spec import JaxPagedError, next_pow2


def host_copy(x: jax.Array):
  """Starts copying ``x`` to host memory and returns the host array without waiting: pinned host
  memory (``memory_kind="pinned_host"``) where the device has it, else a NumPy array."""
  device = next(iter(x.devices()))
  if "pinned_host" in {m.kind for m in device.addressable_memories()}:
    return jax.device_put(x, jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"))
  x.copy_to_host_async()
  return np.asarray(x)


def bucket(n: int, cap: int) -> int:
  """``n`` rounded up to a power of two (capped): a serving loop swaps sequences of every length,
  and each size compiles its own copy programs (seconds each); padding costs less."""
  return min(cap, next_pow2(n))


def _pad(x, size: int, axis: int):
  """``x`` padded with zeros to ``size`` along ``axis`` (host arrays; device ones as they are)."""
  if x.shape[axis] == size or not isinstance(x, np.ndarray):
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return np.pad(x, pad)


@dataclasses.dataclass(frozen=True, eq=False)
class SwappedSequence:
  """A sequence swapped out to host RAM; `swap_in` brings it back bit-exactly.

  Attributes:
    seq_id: the slot it came from (and returns to by default).
    length: tokens it holds.
    k, v: host arrays ``[num_layers, num_kv_heads, pages, page_size, head_dim]`` (``pages`` >=
      ``ceil(length / page_size)``) in the cache's dtype: NumPy on the CPU backend, else
      ``pinned_host`` arrays where the device has that memory (a few padded sizes), else NumPy.
    tokens: host ``int32`` array of its token ids (first ``length`` valid), or None when they
      are unknown (it was extended without ids, or prefix caching is off).
    salt: its prefix-cache salt, an int in ``[0, 2**64)``.
    written: host ``bool[pages, num_layers, page_size]``, which K/V had been written (None
      without prefix caching: all of its tokens count as written).
    k_scales, v_scales: host ``float32[num_layers, num_kv_heads, pages, page_size]``, the
      per-token scales of 8-bit K/V (None for other caches).
    num_evicted: tokens `compress` had dropped from it (its positions continue after them).
    static_scales: the `CacheSpec.static_scales` its 8-bit K/V were stored with (None for
      other caches): it comes back only into a cache that reads them alike.

  Example: `swap_in`.

  >>> [f.name for f in dataclasses.fields(SwappedSequence)][:3]
  ['seq_id', 'length', 'k']
  """
  seq_id: int
  length: int
  k: object
  v: object
  tokens: object | None
  salt: int
  written: object | None = None
  k_scales: object | None = None
  v_scales: object | None = None
  num_evicted: int = 0
  static_scales: tuple | None = None

  @property
  def nbytes(self) -> int:
    """Host bytes held (K, V, their scales, token ids and written flags)."""
    return int(sum(x.nbytes for x in (*host_pools(self).values(), self.tokens, self.written)
                   if x is not None))


# ----------------------------------------------------------------------------- host half

def one_id(spec, seq_id) -> int:
  """A checked sequence id of ``spec``."""
  return int(check_index("seq_id", seq_id, spec.max_seqs, "max_seqs"))


def swap_out(cache: sharding.AnyCache, seq_ids: Sequence[int] | np.ndarray
             ) -> tuple[sharding.AnyCache, list[SwappedSequence]]:
  """Copies sequences' K/V to host RAM and releases them on device.

  The device-to-host copies start without waiting. The sequences' slots are empty afterwards;
  with prefix caching their full blocks stay cached (unreferenced) until evicted, so a `swap_in`
  soon after copies little back.

  Args:
    cache: the cache; it is not changed (a new one is returned).
    seq_ids: ids of sequences holding tokens.

  Returns:
    ``(cache, [SwappedSequence])`` in the order of ``seq_ids``.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([6]), num_slots=6)
  >>> cache, (swapped,) = swap_out(cache, [0])
  >>> swapped.length, int(num_free_pages(cache))
  (6, 8)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.swap_out(cache, seq_ids)
  swapped = copy_out(cache, seq_ids)
  return release(cache, jnp.asarray([s.seq_id for s in swapped], jnp.int32)), swapped


def copy_out(cache: PagedKVCache, seq_ids) -> list[SwappedSequence]:
  """`swap_out` without the release: the cache is not changed."""
  spec = check_cache(cache)
  ids = checks.id_list("seq_ids", seq_ids, spec.max_seqs, distinct=True)
  lengths = np.asarray(cache.seq_lens)[ids]
  if (lengths == 0).any():
    raise JaxPagedError(f"seq_ids {[s for s, n in zip(ids, lengths) if n == 0]} hold no tokens; "
                        "swap out only sequences in use.")
  prefix = cache.prefix
  known = (np.asarray(prefix.seq_hashable)[ids] if prefix is not None
           else np.zeros(len(ids), bool))
  salts = ([checks.salt_int(x) for x in np.asarray(prefix.seq_salt)[ids]] if prefix is not None
           else [0] * len(ids))
  # On the CPU backend the pool already is host memory: NumPy copies the pages out of it (4-5x
  # faster than an XLA gather there). Elsewhere the device gathers and copies to host async.
  on_cpu = next(iter(cache.k_pages.devices())).platform == "cpu"
  evicted = np.asarray(cache.num_evicted)[ids]
  if on_cpu:
    table = np.asarray(cache.page_table)
    host = {name: np.asarray(x) for name, x in pools(cache).items()}
    page_tokens = None if prefix is None else np.asarray(prefix.page_tokens)
    page_written = None if prefix is None else np.asarray(prefix.page_written)
  swapped = []
  for seq, length, has_tokens, salt, gone in zip(ids, lengths.tolist(), known, salts,
                                                 evicted.tolist()):
    pages = -(-length // spec.page_size)
    if on_cpu:
      held = table[seq, :pages]
      kv = {name: np.take(pool, held, axis=2) for name, pool in host.items()}
      tokens = page_tokens[held].reshape(-1) if has_tokens else None
      written = None if prefix is None else page_written[held]
    else:
      kv, tokens, written = transfer.gather_sequence(cache, jnp.int32(seq),
                                                 num_pages=bucket(pages, spec.max_pages_per_seq))
      kv = {name: host_copy(x) for name, x in kv.items()}
      tokens = host_copy(tokens) if has_tokens else None
      written = None if written is None else np.asarray(written)
    swapped.append(SwappedSequence(seq, length, tokens=tokens, salt=salt, written=written,
                                   num_evicted=gone, static_scales=spec.static_scales,
                                   **{HOST_FIELDS[name]: x for name, x in kv.items()}))
  return swapped


def _check_swapped(spec, cache, swapped, seq_id):
  """``(target slot, match, written)`` of a valid `swap_in`, or a `JaxPagedError`."""
  if not isinstance(swapped, SwappedSequence):
    raise JaxPagedError(f"swapped must be a SwappedSequence from swap_out, got "
                        f"{type(swapped).__name__}.")
  target = one_id(spec, swapped.seq_id if seq_id is None else seq_id)
  if int(cache.seq_lens[target]) > 0:
    raise JaxPagedError(f"seq_id {target} holds tokens; swap in into an empty slot (release it, "
                        "or pass another seq_id).")
  length = swapped.length
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not (
      1 <= length <= spec.max_seq_len):
    raise JaxPagedError(f"swapped.length must be an int in [1, {spec.max_seq_len}], got "
                        f"{length!r}; pass what swap_out returned.")
  pages = -(-int(length) // spec.page_size)
  check_host_pools(spec, swapped, "swapped", min_pages=pages)
  evicted = swapped.num_evicted
  if isinstance(evicted, bool) or not isinstance(evicted, (int, np.integer)) or not (
      0 <= evicted <= checks.INT32_MAX - spec.max_seq_len):
    raise JaxPagedError(f"swapped.num_evicted must be an int >= 0 (tokens compress dropped), "
                        f"got {evicted!r}; pass what swap_out returned.")
  match = cache.prefix is not None and swapped.tokens is not None
  tokens = swapped.tokens
  if match and (getattr(tokens, "ndim", None) != 1 or len(tokens) < length
                or tokens.dtype != np.int32):
    raise JaxPagedError(f"swapped.tokens must be int32[>= {length}] token ids, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}"
                        f"{list(getattr(tokens, 'shape', ()))}.")
  written = swapped.written if cache.prefix is not None else None
  if written is not None and (getattr(written, "shape", None) != (
      swapped.k.shape[2], spec.num_layers, spec.page_size) or written.dtype != bool):
    raise JaxPagedError(f"swapped.written must be bool[{swapped.k.shape[2]}, {spec.num_layers}, "
                        f"{spec.page_size}], got {getattr(written, 'dtype', None)}"
                        f"{list(getattr(written, 'shape', ()))}.")
  return target, match, written


def swap_in_args(cache: PagedKVCache, swapped, seq_id=None):
  """Checks a `swap_in` and returns ``(args, match)`` for `restore_core`: device arrays padded
  to a few bucketed page counts, placed as the cache is."""
  spec = check_cache(cache)
  target, match, written = _check_swapped(spec, cache, swapped, seq_id)
  salt = checks.salt("swapped.salt", swapped.salt)
  # On the cache's device, committed only if the cache is: one committed input commits every
  # output of a jitted call, and jit compiles each function again for committed arguments.
  # On a mesh (a shard of a `ShardedCache`), K/V go where the pools' heads are and the rest is
  # replicated over the pools' devices.
  def place(x):
    if not cache.k_pages.committed:
      return jnp.asarray(x)
    where = cache.k_pages.sharding
    if isinstance(where, jax.sharding.NamedSharding) and np.ndim(x) != cache.k_pages.ndim:
      where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(x, where)
  size = bucket(swapped.k.shape[2], spec.max_pages_per_seq)  # few shapes: few compiles
  kv = {name: place(_pad(x, size, axis=2)) for name, x in host_pools(swapped).items()}
  tokens = place(_pad(np.asarray(swapped.tokens), size * spec.page_size, axis=0)) if match else None
  if written is not None:
    written = place(_pad(np.asarray(written), size, axis=0))
  lanes = jnp.asarray(np.array(checks.split_salt(salt), np.uint32))
  return (jnp.int32(target), jnp.int32(swapped.length), tokens, lanes, kv, written,
          jnp.int32(swapped.num_evicted)), match


def swap_in(cache: sharding.AnyCache, swapped: SwappedSequence, *, seq_id: int | None = None
            ) -> tuple[sharding.AnyCache, jax.Array]:
  """Brings a swapped-out sequence back: allocates pages and restores its K/V bit-exactly.

  Blocks of it still cached on device are attached instead of copied (when its token ids are
  known). Atomic: if the pool has no room, nothing changes and ``ok`` is False; ``swapped`` is
  never modified, so it can be retried later.

  Args:
    cache: the cache; it is not changed (a new one is returned).
    swapped: what `swap_out` returned for the sequence.
    seq_id: the empty slot to restore into (default: the one it left).

  Returns:
    ``(cache, ok)``.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, slots, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([3]), num_slots=3)
  >>> k = jnp.arange(6.0).reshape(3, 1, 2)
  >>> cache, (swapped,) = swap_out(write_kv(cache, 0, k, k, slots), [0])
  >>> cache, ok = swap_in(cache, swapped, seq_id=1)  # into another slot
  >>> bool(ok), gather_kv(cache, 0, 1)[0][:3, 0, 1].tolist()
  (True, [1.0, 3.0, 5.0])
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.swap_in(cache, swapped, seq_id=seq_id)
  args, match = swap_in_args(cache, swapped, seq_id)
  return transfer.restore_jit(cache, *args, match=match)
