"""Moving K/V between the device pool and host RAM: sequences swap out and in, cached prefix
blocks are demoted and promoted back.

The device half is jitted and atomic like the rest of the core: `_restore` makes room (through
`match_prefix` or `extend`) and writes the K/V it brings in one call, so a refused call changes
nothing; `_demote` evicts blocks exactly as the allocator would (least recently used first, a
chain's tail first), frees their pages and returns their contents. The host half (this module's
public functions) starts device-to-host copies without waiting (into ``pinned_host`` memory when
the device has it) and keeps what a sequence or a block needs to come back bit-exactly.

A swapped-out sequence comes back through `match_prefix` when its token ids are known: its full
blocks usually stay cached on device after the swap-out (they were only released), so only what
was evicted meanwhile is copied in again.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import prefix_state
from jaxpaged._src.cache import PagedKVCache, _check_cache, _extend, release
from jaxpaged._src.prefix import _match_prefix
from jaxpaged._src.spec import JaxPagedError, next_pow2


def host_copy(x: jax.Array):
  """Starts copying ``x`` to host memory and returns the host array without waiting: pinned host
  memory (``memory_kind="pinned_host"``) where the device has it, else a NumPy array."""
  device = next(iter(x.devices()))
  if "pinned_host" in {m.kind for m in device.addressable_memories()}:
    return jax.device_put(x, jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"))
  x.copy_to_host_async()
  return np.asarray(x)


def _bucket(n: int, cap: int) -> int:
  """``n`` rounded up to a power of two (capped): a serving loop swaps sequences of every length,
  and each size compiles its own copy programs (seconds each); padding costs less."""
  return min(cap, next_pow2(n))


def _pad_pages(x, size: int, axis: int = 2):
  """``x`` padded with zeros to ``size`` along ``axis`` (host arrays; device ones as they are)."""
  if x.shape[axis] == size or not isinstance(x, np.ndarray):
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return np.pad(x, pad)


def block_key(page_hash) -> int:
  """The 64-bit host key of a chained block hash (``uint32[2]``, as `jaxpaged.block_hashes`
  and the device compute it)."""
  lo, hi = (int(x) for x in np.asarray(page_hash, np.uint32))
  return lo | hi << 32


@dataclasses.dataclass(frozen=True, eq=False)
class SwappedSequence:
  """A sequence swapped out to host RAM; `swap_in` brings it back bit-exactly.

  Attributes:
    seq_id: the slot it came from (and returns to by default).
    length: tokens it holds.
    k, v: host arrays ``[num_layers, num_kv_heads, pages, page_size, head_dim]`` (``pages`` >=
      ``ceil(length / page_size)``): NumPy on the CPU backend, else ``pinned_host`` arrays
      where the device has that memory (a few padded sizes), else NumPy.
    tokens: host ``int32`` array of its token ids (first ``length`` valid), or None when they
      are unknown (it was extended without ids, or prefix caching is off).
    salt: its prefix-cache salt.
  """
  seq_id: int
  length: int
  k: object
  v: object
  tokens: object | None
  salt: int

  @property
  def nbytes(self) -> int:
    """Host bytes held (K, V and token ids)."""
    return int(self.k.nbytes + self.v.nbytes + (0 if self.tokens is None else self.tokens.nbytes))


@dataclasses.dataclass(frozen=True, eq=False)
class CachedBlock:
  """A full prefix block demoted from the device to host RAM.

  Attributes:
    key: 64-bit chained hash (`block_key`), what the host tier looks it up by.
    salt: the salt it was registered under.
    tokens: ``int32[(depth + 1) * page_size]`` the whole prefix it ends, so a host hit is verified
      against every token before it, not only its hash.
    k, v: ``[num_layers, num_kv_heads, page_size, head_dim]`` NumPy arrays.
  """
  key: int
  salt: int
  tokens: np.ndarray
  k: np.ndarray
  v: np.ndarray

  @property
  def depth(self) -> int:
    """Index of the block in its sequence."""
    return len(self.tokens) // self.k.shape[2] - 1

  @property
  def nbytes(self) -> int:
    return int(self.k.nbytes + self.v.nbytes + self.tokens.nbytes)


# ----------------------------------------------------------------------------- device half

@functools.partial(jax.jit, static_argnames=("num_pages",))
def _gather_sequence(cache, seq_id, *, num_pages):
  """K/V pages ``[L, H, num_pages, ps, D]`` and token ids of one sequence, in logical order."""
  pages = cache.page_table[seq_id, :num_pages]
  tokens = None if cache.prefix is None else cache.prefix.page_tokens[pages].reshape(-1)
  take = lambda pool: jnp.take(pool, pages, axis=2, mode="clip")  # the fastest gather on CPU
  return take(cache.k_pages), take(cache.v_pages), tokens


@functools.partial(jax.jit, static_argnames=("match",), donate_argnames=("cache",))
def _restore(cache, seq_id, length, tokens, salt, k, v, *, match):
  """Makes room for ``length`` tokens of ``seq_id`` and writes their K/V ``[L, H, n, ps, D]``.

  ``match``: the sequence is new and its ``tokens`` are known, so blocks still cached on device
  are attached (`match_prefix`) and only the rest is copied. Otherwise the tokens are appended
  (`extend`, registering full blocks when ``tokens`` are given). Atomic: ``(cache, ok)``.
  """
  ps = cache.spec.page_size
  width = k.shape[2] * ps
  seq_ids = seq_id[None]
  if match:
    cache, found = _match_prefix(cache, seq_ids, tokens[None], length[None], salt[None], None,
                                 num_slots=width, impl="auto", interpret=False)
    start, slots, ok = found.num_cached[0], found.slots, found.ok
  else:
    cache, slots, ok = _extend(cache, seq_ids, length[None], tokens, num_slots=width)
    start = 0
  # New tokens start on a page boundary (hits and promoted blocks are whole pages), so whole
  # pages are copied: source page i goes where the new range's page i - skip starts (skip: pages
  # attached as hits). Only page ids are gathered; the K/V move once, in one scatter.
  i = jnp.arange(k.shape[2]) - start // ps
  first = slots[jnp.clip(i * ps, 0, width - 1)]
  page = jnp.where((i >= 0) & (first >= 0), first // ps, cache.spec.num_pages)  # else dropped

  def write(pool, new):
    return pool.at[:, :, page].set(new, mode="drop")

  return dataclasses.replace(cache, k_pages=write(cache.k_pages, k),
                             v_pages=write(cache.v_pages, v)), ok


def _prefix_tokens(prefix, pages, max_blocks: int, page_size: int):
  """Token ids of the whole prefix each cached page ends, by walking its parent links.

  Returns ``(tokens int32[M, max_blocks * page_size], complete bool[M])``; a walk is incomplete
  when a parent page was handed out again since (its generation moved on).
  """
  rows = jnp.arange(pages.shape[0])[:, None]
  width = max_blocks * page_size

  def step(_, carry):
    page, alive, complete, out = carry
    depth = prefix.page_depth[page]
    cols = jnp.where(alive[:, None], depth[:, None] * page_size + jnp.arange(page_size), width)
    out = out.at[rows, cols].set(prefix.page_tokens[page], mode="drop")
    parent = prefix.page_parent[page]
    linked = (parent >= 0) & (prefix.page_gen[jnp.clip(parent, 0)] == prefix.page_parent_gen[page])
    complete |= alive & (depth == 0)
    alive &= linked
    return jnp.where(linked, parent, page), alive, complete, out

  start = (pages, jnp.ones(pages.shape, bool), jnp.zeros(pages.shape, bool),
           jnp.zeros((pages.shape[0], width), jnp.int32))
  _, _, complete, out = jax.lax.fori_loop(0, max_blocks, step, start)
  return out, complete


@functools.partial(jax.jit, static_argnames=("max_count",), donate_argnames=("cache",))
def _demote(cache, count, keep, *, max_count):
  """Evicts ``min(count, evictable)`` cached blocks nobody uses, as the allocator would, except
  the pages listed in ``keep`` (``int32[K]``, -1 padded); frees their pages and returns their
  contents (``max_count`` rows; rows past the count have page -1)."""
  spec, prefix = cache.spec, cache.prefix
  protect = jnp.zeros((spec.num_pages,), bool).at[
      jnp.where(keep >= 0, keep, spec.num_pages)].set(True, mode="drop")
  kept = jnp.sum(protect & prefix.page_cached & (cache.ref_counts == 0), dtype=jnp.int32)
  count = jnp.minimum(count, prefix.num_evictable - kept)
  evicted, victims = prefix_state.select_victims(prefix, cache.ref_counts, count, max_count,
                                                 protect)
  safe = jnp.clip(victims, 0)
  tokens, complete = _prefix_tokens(prefix, safe, spec.max_pages_per_seq, spec.page_size)
  push_to = jnp.where(victims >= 0, cache.num_free + jnp.arange(max_count), spec.num_pages)
  contents = dict(pages=victims, hashes=prefix.page_hash[safe], salts=prefix.page_salt[safe],
                  depths=prefix.page_depth[safe], tokens=tokens,
                  complete=complete & (victims >= 0),
                  k=cache.k_pages[:, :, safe], v=cache.v_pages[:, :, safe])
  return dataclasses.replace(
      cache, prefix=evicted, num_free=cache.num_free + count,
      free_pages=cache.free_pages.at[push_to].set(victims, mode="drop")), contents


# ----------------------------------------------------------------------------- host half

def _seq_ids(cache, seq_ids) -> list[int]:
  spec = _check_cache(cache)
  ids = [int(s) for s in np.atleast_1d(np.asarray(seq_ids))]
  bad = [s for s in ids if not 0 <= s < spec.max_seqs]
  if bad:
    raise JaxPagedError(f"seq_ids {bad} are out of range [0, {spec.max_seqs}); pass the ids of "
                        "sequences in the cache.")
  if len(set(ids)) != len(ids):
    raise JaxPagedError(f"seq_ids {ids} repeat an id; name each sequence once.")
  return ids


def swap_out(cache: PagedKVCache, seq_ids):
  """Copies sequences' K/V to host RAM and releases them on device.

  The device-to-host copies start without waiting. The sequences' slots are empty afterwards;
  with prefix caching their full blocks stay cached (unreferenced) until evicted, so a `swap_in`
  soon after copies little back.

  Args:
    cache: the cache (donated).
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
  swapped = copy_out(cache, seq_ids)
  return release(cache, jnp.asarray([s.seq_id for s in swapped], jnp.int32)), swapped


def copy_out(cache: PagedKVCache, seq_ids) -> list[SwappedSequence]:
  """`swap_out` without the release: the cache is not changed (nor donated)."""
  spec = _check_cache(cache)
  ids = _seq_ids(cache, seq_ids)
  lengths = np.asarray(cache.seq_lens)[ids]
  if (lengths == 0).any():
    raise JaxPagedError(f"seq_ids {[s for s, n in zip(ids, lengths) if n == 0]} hold no tokens; "
                        "swap out only sequences in use.")
  known = (np.asarray(cache.prefix.seq_hashable)[ids] if cache.prefix is not None
           else np.zeros(len(ids), bool))
  salts = (np.asarray(cache.prefix.seq_salt)[ids] if cache.prefix is not None
           else np.zeros(len(ids), np.int32))
  # On the CPU backend the pool already is host memory: NumPy copies the pages out of it (4-5x
  # faster than an XLA gather there). Elsewhere the device gathers and copies to host async.
  on_cpu = next(iter(cache.k_pages.devices())).platform == "cpu"
  if on_cpu:
    table = np.asarray(cache.page_table)
    pools = [np.asarray(x) for x in (cache.k_pages, cache.v_pages)]
    page_tokens = None if cache.prefix is None else np.asarray(cache.prefix.page_tokens)
  swapped = []
  for seq, length, has_tokens, salt in zip(ids, lengths.tolist(), known, salts.tolist()):
    pages = -(-length // spec.page_size)
    if on_cpu:
      held = table[seq, :pages]
      k, v = (np.take(pool, held, axis=2) for pool in pools)
      tokens = page_tokens[held].reshape(-1) if has_tokens else None
    else:
      k, v, tokens = _gather_sequence(cache, jnp.int32(seq),
                                      num_pages=_bucket(pages, spec.max_pages_per_seq))
      k, v, tokens = host_copy(k), host_copy(v), host_copy(tokens) if has_tokens else None
    swapped.append(SwappedSequence(seq, length, k, v, tokens, salt))
  return swapped


def swap_in(cache: PagedKVCache, swapped: SwappedSequence, *, seq_id: int | None = None):
  """Brings a swapped-out sequence back: allocates pages and restores its K/V bit-exactly.

  Blocks of it still cached on device are attached instead of copied (when its token ids are
  known). Atomic: if the pool has no room, nothing changes and ``ok`` is False; ``swapped`` is
  never modified, so it can be retried later.

  Args:
    cache: the cache (donated).
    swapped: what `swap_out` returned for the sequence.
    seq_id: the empty slot to restore into (default: the one it left).

  Returns:
    ``(cache, ok)``.
  """
  spec = _check_cache(cache)
  if not isinstance(swapped, SwappedSequence):
    raise JaxPagedError(f"swapped must be a SwappedSequence from swap_out, got "
                        f"{type(swapped).__name__}.")
  (target,) = _seq_ids(cache, swapped.seq_id if seq_id is None else seq_id)
  if int(cache.seq_lens[target]) > 0:
    raise JaxPagedError(f"seq_id {target} holds tokens; swap in into an empty slot (release it, "
                        "or pass another seq_id).")
  if (swapped.k.shape[:2] + swapped.k.shape[3:] != spec.pages_shape[:2] + spec.pages_shape[3:]
      or swapped.k.dtype != spec.dtype):
    raise JaxPagedError(f"swapped K/V {swapped.k.dtype}{list(swapped.k.shape)} does not fit this "
                        f"cache's pages {spec.dtype}{list(spec.pages_shape)}; swap in into a "
                        "cache with the same spec.")
  # On the cache's device, committed only if the cache is: one committed input commits every
  # output of a jitted call, and jit compiles each function again for committed arguments.
  place = ((lambda x: jax.device_put(x, cache.k_pages.sharding)) if cache.k_pages.committed
           else jnp.asarray)
  pages = _bucket(swapped.k.shape[2], spec.max_pages_per_seq)  # few shapes: few compiles
  k, v = (place(_pad_pages(x, pages)) for x in (swapped.k, swapped.v))
  match = cache.prefix is not None and swapped.tokens is not None
  tokens = place(_pad_pages(swapped.tokens, pages * spec.page_size, axis=0)) if match else None
  return _restore(cache, jnp.int32(target), jnp.int32(swapped.length), tokens,
                  jnp.int32(swapped.salt), k, v, match=match)


def demote_blocks(cache: PagedKVCache, count: int, *, keep=()):
  """Evicts up to ``count`` cached blocks nobody uses (least recently used first, a chain's tail
  first, as the allocator would) and returns their contents for the host tier. Pages in ``keep``
  stay (the blocks an operation about to run will hit).

  Returns:
    ``(cache, [CachedBlock])``: the freed pages are free again. A block whose prefix can no
    longer be read back (a parent page was reused since) is evicted but not returned; a host hit
    could not be verified against it.
  """
  spec = _check_cache(cache)
  if cache.prefix is None:
    raise JaxPagedError("demote_blocks needs prefix caching: build the cache with "
                        "CacheSpec(..., prefix_caching=True).")
  count = int(count)
  if count <= 0:
    return cache, []
  keep = np.asarray(keep, np.int32).reshape(-1)
  keep = np.pad(keep, (0, _bucket(max(len(keep), 1), 1 << 30) - len(keep)), constant_values=-1)
  cache, out = _demote(cache, jnp.int32(count), jnp.asarray(keep),
                       max_count=next_pow2(count))
  out = jax.device_get(out)
  blocks = []
  for i in np.flatnonzero(out["complete"]):
    end = (int(out["depths"][i]) + 1) * spec.page_size
    blocks.append(CachedBlock(block_key(out["hashes"][i]), int(out["salts"][i]),
                              np.array(out["tokens"][i, :end]), np.array(out["k"][:, :, i]),
                              np.array(out["v"][:, :, i])))
  return cache, blocks


def promote_blocks(cache: PagedKVCache, seq_id: int, blocks):
  """Appends host blocks to a sequence that holds exactly the prefix before them, and registers
  them in the device prefix cache again.

  Each block's prefix tokens and salt are checked against the sequence's own token ids first, so
  K/V computed after another prefix can never be attached.

  Returns:
    ``(cache, ok)``; atomic, ``ok`` False when the pool has no room.
  """
  spec = _check_cache(cache)
  (seq,) = _seq_ids(cache, seq_id)
  if cache.prefix is None or not blocks:
    raise JaxPagedError("promote_blocks needs prefix caching and at least one CachedBlock.")
  ps = spec.page_size
  length = int(cache.seq_lens[seq])
  held_pages = jnp.clip(cache.page_table[seq, :length // ps], 0)
  held_tokens = np.asarray(cache.prefix.page_tokens[held_pages]).reshape(-1)
  salt = int(cache.prefix.seq_salt[seq])
  if length % ps or not bool(cache.prefix.seq_hashable[seq]):
    raise JaxPagedError(f"seq_id {seq} must hold whole blocks with known token ids (started by "
                        "match_prefix) to take promoted blocks.")
  for i, block in enumerate(blocks):
    expected = length + (i + 1) * ps
    if (len(block.tokens) != expected or block.salt != salt
        or not np.array_equal(block.tokens[:length], held_tokens)
        or (i and not np.array_equal(block.tokens[:expected - ps], blocks[i - 1].tokens))):
      raise JaxPagedError(f"blocks[{i}] does not continue seq_id {seq}: its prefix tokens or salt "
                          "differ; promote only blocks whose prefix the sequence holds.")
  pages = _bucket(len(blocks), spec.max_pages_per_seq)
  pad = lambda x: np.concatenate([x, np.zeros((pages - len(blocks),) + x.shape[1:], x.dtype)])
  k = pad(np.stack([b.k for b in blocks])).transpose(1, 2, 0, 3, 4)
  v = pad(np.stack([b.v for b in blocks])).transpose(1, 2, 0, 3, 4)
  tokens = np.zeros(pages * ps, np.int32)
  tokens[:len(blocks) * ps] = np.concatenate([b.tokens[-ps:] for b in blocks])
  return _restore(cache, jnp.int32(seq), jnp.int32(len(blocks) * ps), jnp.asarray(tokens),
                  jnp.int32(salt), jnp.asarray(k), jnp.asarray(v), match=False)
