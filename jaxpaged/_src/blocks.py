"""Cached prefix blocks between the device pool and host RAM: demotion and promotion.

A demoted block (`CachedBlock`) keeps what a host hit needs to be verified and brought back
bit-exactly: its K/V, the whole prefix of token ids it ends, and its 64-bit salt. The device
programs are in `jaxpaged._src.transfer`; sequences swap out and in with `jaxpaged._src.swap`.

Internal API: `cached_blocks`, `sequence_blocks`, `keep_pages`, `promote_args`, `promote_arrays`, `stack_blocks`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import sharding
from jaxpaged._src import checks
from jaxpaged._src import transfer
from jaxpaged._src.cache import (HOST_FIELDS, PagedKVCache, check_cache, check_host_pools,
                                 host_pools, num_cached_free_pages, pools)
from jaxpaged._src.hashing import block_hashes_numpy
from jaxpaged._src.prefix_state import fully_written
from jaxpaged._src.spec import JaxPagedError, next_pow2
from jaxpaged._src.swap import bucket, one_id


def block_key(page_hash: np.ndarray | jax.Array | Sequence[int]) -> int:
  """The 64-bit host key of a chained block hash (``uint32[2]``, as `jaxpaged.block_hashes`
  and the device compute it).

  >>> from jaxpaged import block_hashes
  >>> block_key(block_hashes([1, 2, 3, 4], page_size=4)[0]) > 0
  True
  """
  try:
    lanes = np.asarray(page_hash)
  except ValueError:
    lanes = np.asarray(None)
  if (lanes.shape != (2,) or lanes.dtype.kind not in "iu"
      or not all(0 <= int(x) < 1 << 32 for x in lanes.tolist())):
    raise JaxPagedError(f"page_hash must be a block hash: two uint32 lanes (a row of "
                        f"block_hashes), got {page_hash!r}.")
  lo, hi = (int(x) for x in lanes.tolist())
  return lo | hi << 32


@dataclasses.dataclass(frozen=True, eq=False)
class CachedBlock:
  """A full prefix block demoted from the device to host RAM.

  Attributes:
    key: 64-bit chained hash (`block_key`), what the host tier looks it up by.
    salt: the salt it was registered under, an int in ``[0, 2**64)``.
    tokens: ``int32[(depth + 1) * page_size]`` the whole prefix it ends, so a host hit is verified
      against every token before it, not only its hash.
    k, v: ``[num_layers, num_kv_heads, page_size, head_dim]`` NumPy arrays, the cache's dtype.
    k_scales, v_scales: ``float32[num_layers, num_kv_heads, page_size]``, the per-token scales
      of 8-bit K/V (None for other caches).
    static_scales: the `CacheSpec.static_scales` its 8-bit K/V were stored with (None for other
      caches): it is promoted only into a cache that reads them alike.

  Example: `demote_blocks`.

  >>> [f.name for f in dataclasses.fields(CachedBlock)]
  ['key', 'salt', 'tokens', 'k', 'v', 'k_scales', 'v_scales', 'static_scales']
  """
  key: int
  salt: int
  tokens: np.ndarray
  k: np.ndarray
  v: np.ndarray
  k_scales: np.ndarray | None = None
  v_scales: np.ndarray | None = None
  static_scales: tuple | None = None

  @property
  def depth(self) -> int:
    """Index of the block in its sequence."""
    return len(self.tokens) // self.k.shape[2] - 1

  @property
  def nbytes(self) -> int:
    return int(sum(x.nbytes for x in host_pools(self).values()) + self.tokens.nbytes)


def cached_blocks(spec, contents) -> list[CachedBlock]:
  """The host `CachedBlock`s of `demote_plan`'s contents (those whose prefix is complete)."""
  contents = jax.device_get(contents)
  blocks = []
  for i in np.flatnonzero(contents["complete"]):
    end = (int(contents["depths"][i]) + 1) * spec.page_size
    blocks.append(CachedBlock(block_key(contents["hashes"][i]),
                              checks.salt_int(contents["salts"][i]),
                              np.array(contents["tokens"][i, :end]),
                              static_scales=spec.static_scales,
                              **{HOST_FIELDS[name]: np.array(x[:, :, i])
                                 for name, x in contents["kv"].items()}))
  return blocks


def sequence_blocks(cache: PagedKVCache, seq_ids: Sequence[int],
                    wanted: Callable[[int, np.ndarray, int], bool]) -> list[CachedBlock]:
  """Host copies of the leading full, fully written blocks of active sequences (what a disk
  tier keeps when they end): for each sequence whose token ids are all known (or, for one
  extended without ids, its blocks registered in the prefix cache), block by block from its
  first while the page is written in every layer, those for which
  ``wanted(key, prefix_tokens, salt)`` is true. A page that duplicates a registered block
  counts: it holds the same prefix's K/V. One gather reads them all."""
  spec, prefix = cache.spec, cache.prefix
  if prefix is None or not len(seq_ids):
    return []
  ps = spec.page_size
  lens, table = jax.device_get((cache.seq_lens, cache.page_table))
  chosen, meta = [], []
  for s in seq_ids:
    n = int(lens[s]) // ps
    if not n:
      continue
    pages = np.asarray(table[s, :n])
    tokens, cached, written, salt, hashable = jax.device_get((
        prefix.page_tokens[pages], prefix.page_cached[pages], fully_written(prefix, pages),
        prefix.seq_salt[s], prefix.seq_hashable[s]))
    tokens, salt = np.asarray(tokens).reshape(-1), checks.salt_int(salt)
    run = int(np.argmin(np.append((cached | hashable) & written, False)))
    hashes = block_hashes_numpy(tokens[:run * ps], ps, salt, spec.block_hash)
    for i in range(run):
      key, end = block_key(hashes[i]), (i + 1) * ps
      if wanted(key, tokens[:end], salt):
        chosen.append(int(pages[i]))
        meta.append((key, salt, tokens[:end]))
  if not chosen:
    return []
  index = jnp.asarray(np.pad(chosen, (0, next_pow2(len(chosen)) - len(chosen))))
  kv = jax.device_get({name: x[:, :, index] for name, x in pools(cache).items()})
  return [CachedBlock(key, salt, np.array(tokens), static_scales=spec.static_scales,
                      **{HOST_FIELDS[name]: np.array(x[:, :, i]) for name, x in kv.items()})
          for i, (key, salt, tokens) in enumerate(meta)]


def keep_pages(spec, keep) -> jax.Array:
  """``keep`` (page ids) as ``int32[K]``, -1 padded to a power of two (few compiles)."""
  keep = np.asarray(checks.host_token_ids("keep", np.asarray(keep).reshape(-1)))
  bad = [int(p) for p in keep if not 0 <= p < spec.num_pages]
  if bad:
    raise JaxPagedError(f"keep holds pages {bad[:4]} outside [0, {spec.num_pages}); pass page "
                        "ids of this cache.")
  return jnp.asarray(np.pad(keep, (0, next_pow2(max(len(keep), 1)) - len(keep)),
                            constant_values=-1))


def demote_blocks(cache: sharding.AnyCache, count: int, *, keep: Sequence[int] = ()
                  ) -> tuple[sharding.AnyCache, list[CachedBlock]]:
  """Evicts up to ``count`` cached blocks nobody uses (least recently used first, a chain's tail
  first, as the allocator would) and returns their contents for the host tier. Pages in ``keep``
  stay (the blocks an operation about to run will hit).

  Args:
    cache: the cache; it is not changed (a new one is returned).
    count: an int >= 0; at most the blocks that can be evicted are.
    keep: page ids not to evict.

  Returns:
    ``(cache, [CachedBlock])``: the freed pages are free again. A block whose prefix can no
    longer be read back (a parent page was reused since) is evicted but not returned; a host hit
    could not be verified against it.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
  >>> cache, found = match_prefix(init_cache(spec), jnp.array([0]),
  ...                             jnp.array([[1, 2, 3, 4, 5, 6, 7, 8, 9]]), jnp.array([9]))
  >>> k = jnp.ones((9, 1, 8))
  >>> cache = release(write_kv(cache, 0, k, k, found.slots), jnp.array([0]))
  >>> cache, blocks = demote_blocks(cache, 2)
  >>> [b.tokens.tolist() for b in blocks]  # the tail of the chain first
  [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4]]
  >>> cache, started = match_prefix(cache, jnp.array([0]), jnp.array([[1, 2, 3, 4, 5]]),
  ...                               jnp.array([5]), max_prompt_tokens=jnp.array([0]))
  >>> cache, ok = promote_blocks(cache, 0, blocks[1:])  # block 0 back on device
  >>> bool(ok), int(cache.seq_lens[0])
  (True, 4)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.demote_blocks(cache, count, keep=keep)
  spec = check_cache(cache)
  if cache.prefix is None:
    raise JaxPagedError("demote_blocks needs prefix caching: build the cache with "
                        "CacheSpec(..., prefix_caching=True).")
  count = min(checks.count("count", count), int(num_cached_free_pages(cache)))
  keep = keep_pages(spec, keep)
  if count == 0:
    return cache, []
  victims, contents = transfer.demote_plan(cache, jnp.int32(count), keep,
                                           max_count=next_pow2(count))
  return transfer.evict_jit(cache, victims), cached_blocks(spec, contents)


def promote_args(cache: PagedKVCache, seq_id: int, blocks):
  """Checks a `promote_blocks` and returns ``(args, match)`` for `restore_core`."""
  spec = check_cache(cache)
  seq = one_id(spec, seq_id)
  if cache.prefix is None:
    raise JaxPagedError("promote_blocks needs prefix caching: build the cache with "
                        "CacheSpec(..., prefix_caching=True).")
  length = int(cache.seq_lens[seq])
  if length % spec.page_size or not bool(cache.prefix.seq_hashable[seq]):
    raise JaxPagedError(f"seq_id {seq} must hold whole blocks with known token ids (started by "
                        "match_prefix) to take promoted blocks.")
  held_pages = jnp.clip(cache.page_table[seq, :length // spec.page_size], 0)
  held_tokens = np.asarray(cache.prefix.page_tokens[held_pages]).reshape(-1)
  salt = checks.salt_int(np.asarray(cache.prefix.seq_salt[seq]))
  return promote_arrays(spec, seq, held_tokens, salt, blocks), False


def promote_arrays(spec, seq: int, held_tokens, salt: int, blocks):
  """`restore_core` arguments appending ``blocks`` to sequence ``seq``, which holds the whole
  blocks ``held_tokens`` under ``salt``; each block is checked to continue exactly them."""
  blocks = list(blocks) if isinstance(blocks, (list, tuple)) else None
  if not blocks or not all(isinstance(b, CachedBlock) for b in blocks):
    raise JaxPagedError("blocks must be a non-empty list of CachedBlock (from demote_blocks).")
  ps, length = spec.page_size, len(held_tokens)
  if length + len(blocks) * ps > spec.max_seq_len:
    raise JaxPagedError(f"blocks: {len(blocks)} blocks after {length} tokens exceed "
                        f"max_seq_len={spec.max_seq_len}; promote fewer blocks.")
  for i, block in enumerate(blocks):
    check_host_pools(spec, block, f"blocks[{i}]")
    tokens = checks.host_token_ids(f"blocks[{i}].tokens", block.tokens)
    full = length + (i + 1) * ps
    if (len(tokens) != full
        or block.salt != salt or not np.array_equal(tokens[:length], held_tokens)
        or (i and not np.array_equal(tokens[:full - ps], blocks[i - 1].tokens))):
      raise JaxPagedError(f"blocks[{i}] does not continue seq_id {seq}: its prefix tokens or salt "
                          "differ; promote only blocks whose prefix the sequence holds.")
  pages = bucket(len(blocks), spec.max_pages_per_seq)
  kv = stack_blocks(blocks, pages)
  tokens = np.zeros(pages * ps, np.int32)
  tokens[:len(blocks) * ps] = np.concatenate([b.tokens[-ps:] for b in blocks])
  lanes = jnp.asarray(np.array(checks.split_salt(salt), np.uint32))
  return (jnp.int32(seq), jnp.int32(len(blocks) * ps), jnp.asarray(tokens), lanes,
          {name: jnp.asarray(x) for name, x in kv.items()}, None)


def stack_blocks(blocks, pages: int) -> dict[str, np.ndarray]:
  """The blocks' pools (`host_pools`) stacked on the page axis (2) and zero-padded to
  ``pages`` pages: what `transfer.restore_core` writes."""
  def stack(arrays):
    x = np.stack(arrays)
    x = np.concatenate([x, np.zeros((pages - len(arrays),) + x.shape[1:], x.dtype)])
    return np.moveaxis(x, 0, 2)
  per_block = [host_pools(b) for b in blocks]
  return {name: stack([kv[name] for kv in per_block]) for name in per_block[0]}


def promote_blocks(cache: sharding.AnyCache, seq_id: int, blocks: Sequence[CachedBlock]
                   ) -> tuple[sharding.AnyCache, jax.Array]:
  """Appends host blocks to a sequence that holds exactly the prefix before them, and registers
  them in the device prefix cache again.

  Each block's prefix tokens and salt are checked against the sequence's own token ids first, so
  K/V computed after another prefix can never be attached.

  Args:
    cache: the cache; it is not changed (a new one is returned).
    seq_id: a sequence holding whole blocks with known token ids.
    blocks: consecutive `CachedBlock`s continuing it.

  Returns:
    ``(cache, ok)``; atomic, ``ok`` False when the pool has no room. Example: `demote_blocks`.

  >>> promote_blocks(init_cache(CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4,
  ...                num_pages=8, max_seqs=2, max_pages_per_seq=4)), 0, [])
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: promote_blocks needs prefix caching: ...
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.promote_blocks(cache, seq_id, blocks)
  args, match = promote_args(cache, seq_id, blocks)
  return transfer.restore_jit(cache, *args, match=match)
