"""Chained block hashes, bit-identical on the host (NumPy) and on device (jnp).

A block's hash is 64 bits held as two uint32 lanes (JAX runs without 64-bit integers by
default). Each block's token ids are first absorbed, in order, into a 64-bit digest of the block
alone (all blocks in parallel), its length absorbed last; the chain then links digests: block i's
hash absorbs block i's digest into block i-1's hash, and block 0 starts from fixed seeds mixed
with the request's salt. Mixing uses the murmur3 32-bit finalizer with the lanes cross-fed, so
every bit of the state depends on every token. The hash only spreads blocks over the table: a
hit is always verified against the block's stored token ids, salt, parent page and that page's
generation (`jaxpaged._src.prefix_state.holds_block`), so even a forced collision cannot serve
another prompt's K/V.

Two degenerate functions exist to test that collisions are harmless: ``"constant"`` hashes
every block alike; ``"unchained"`` ignores the parent, so equal blocks after different prefixes
collide (what the parent and generation checks guard against). The table keeps one block per
key, so a colliding block is not cached: collisions cost hits, never correctness.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # jax is imported only where the device path needs it
  from jax.typing import ArrayLike

HASH_FUNCTIONS = ("mix64", "constant", "unchained")
# The start of every chain: the two 32-bit halves of 2**64 / golden ratio (splitmix64's
# increment), nothing-up-my-sleeve constants with bits spread over both lanes.
_SEED = (0x9E3779B9, 0x7F4A7C15)
# murmur3's fmix32 multipliers (its shifts, 16, 13, 16, are written out in `_fmix`).
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
# xxHash32's PRIME32_1, a prime near 2**32 / golden ratio: spreads a token over lane 2.
_GOLDEN = 0x9E3779B1
# How far lane 2 is rotated before it is XORed into lane 1, so that equal lanes do not cancel
# out (13, as murmur3's body rotates its state).
_CROSS_ROTATION = 13
LANE_BITS = 32  # a 64-bit hash or salt is two uint32 lanes


def _u32(xp: types.ModuleType, value: Any) -> Any:
  return xp.asarray(value, dtype=xp.uint32)


def _fmix(xp: types.ModuleType, h: Any) -> Any:
  """murmur3's 32-bit finalizer: every input bit flips about half the output bits."""
  h = h ^ (h >> _u32(xp, 16))
  h = h * _u32(xp, _M1)
  h = h ^ (h >> _u32(xp, 13))
  h = h * _u32(xp, _M2)
  return h ^ (h >> _u32(xp, 16))


def _rotl(xp: types.ModuleType, h: Any, r: int) -> Any:
  return (h << _u32(xp, r)) | (h >> _u32(xp, LANE_BITS - r))


def _absorb(xp: types.ModuleType, h1: Any, h2: Any, word: Any) -> tuple[Any, Any]:
  """Mixes one uint32 ``word`` into the state ``(h1, h2)``, each lane feeding the other."""
  h1 = _fmix(xp, h1 ^ word) ^ _rotl(xp, h2, _CROSS_ROTATION)
  h2 = _fmix(xp, h2 + word * _u32(xp, _GOLDEN)) + h1
  return h1, h2


def _digest(xp: types.ModuleType, blocks: Any) -> tuple[Any, Any]:
  """Per-block digest of ``blocks [..., page_size]`` token ids: two uint32 lanes, every block
  independently (so all blocks are digested at once)."""
  blocks = xp.asarray(blocks).astype(xp.uint32)
  h1 = xp.broadcast_to(_u32(xp, _SEED[0]), blocks.shape[:-1])
  h2 = xp.broadcast_to(_u32(xp, _SEED[1]), blocks.shape[:-1])
  for i in range(blocks.shape[-1]):
    h1, h2 = _absorb(xp, h1, h2, blocks[..., i])
  return _absorb(xp, h1, h2, _u32(xp, blocks.shape[-1]))  # ends the block


def _link(xp: types.ModuleType, parent1: Any, parent2: Any,
          digest: tuple[Any, Any]) -> tuple[Any, Any]:
  """Chains a block's digest onto its parent's hash."""
  h1, h2 = _absorb(xp, parent1, parent2, digest[0])
  return _absorb(xp, h1, h2, digest[1])


def _start(xp: types.ModuleType, salts: Any) -> tuple[Any, Any]:
  """Where a first block's chain starts: the seeds, with both 32-bit lanes of the request's
  64-bit salt (``uint32[..., 2]``) absorbed."""
  salts = xp.asarray(salts).astype(xp.uint32)
  h1 = xp.broadcast_to(_u32(xp, _SEED[0]), salts.shape[:-1])
  h2 = xp.broadcast_to(_u32(xp, _SEED[1]), salts.shape[:-1])
  return _absorb(xp, *_absorb(xp, h1, h2, salts[..., 0]), salts[..., 1])


def chain_block_hashes(xp: types.ModuleType, tokens: ArrayLike, salts: ArrayLike,
                       page_size: int, hash_fn: str = "mix64") -> Any:
  """Hashes of the full blocks of each row, each chaining the previous block's hash.

  Args:
    xp: ``numpy`` or ``jax.numpy`` (both give the same bits).
    tokens: ``int32[B, width]`` token ids; each of the ``n = width // page_size`` full blocks is
      hashed (callers mask blocks past a row's length), a partial last block is not.
    salts: ``uint32[B, 2]`` per-request 64-bit salt as (low, high) lanes (0 = none); different
      salts give unrelated chains.
    page_size: tokens per block.
    hash_fn: one of `HASH_FUNCTIONS` (``CacheSpec.block_hash``).

  Returns:
    ``uint32[B, n, 2]``, a NumPy array for ``numpy``, a JAX array for ``jax.numpy``.
  """
  if hash_fn not in HASH_FUNCTIONS:
    raise ValueError(f"hash_fn must be one of {HASH_FUNCTIONS}, got {hash_fn!r}")
  tokens = xp.asarray(tokens)
  rows, width = tokens.shape
  num_blocks = width // page_size
  if hash_fn == "constant" or num_blocks == 0:
    return xp.zeros((rows, num_blocks, 2), xp.uint32)
  d1, d2 = _digest(xp, tokens[:, :num_blocks * page_size].reshape(rows, num_blocks, page_size))
  start = _start(xp, salts)
  if hash_fn == "unchained":
    h1, h2 = _link(xp, start[0][:, None], start[1][:, None], (d1, d2))
    return xp.stack([h1, h2], axis=-1)
  return _walk_chain(xp, start, d1, d2)


def _walk_chain(xp: types.ModuleType, start: tuple[Any, Any], d1: Any, d2: Any) -> Any:
  """Links each block's digest (``d1, d2: uint32[B, n]``) onto the previous block's hash, the
  first onto ``start``: ``uint32[B, n, 2]``."""
  if xp is np:  # the host walks the chain block by block
    out, parent = [], start
    for block in range(d1.shape[1]):
      parent = _link(xp, *parent, (d1[:, block], d2[:, block]))
      out.append(xp.stack(parent, axis=-1))
    return np.stack(out, axis=1)
  import jax  # pylint: disable=g-import-not-at-top  # on device, one compiled link, scanned

  def step(parent, digest):
    h = _link(xp, *parent, digest)
    return h, xp.stack(h, axis=-1)

  _, out = jax.lax.scan(step, start, (d1.T, d2.T))
  return xp.swapaxes(out, 0, 1)


def next_block_hash(xp: types.ModuleType, parent_hash: ArrayLike, block_tokens: ArrayLike,
                    salts: ArrayLike, is_first: ArrayLike, hash_fn: str = "mix64") -> Any:
  """One chain step for a batch of blocks: ``parent_hash uint32[N, 2]`` (ignored where
  ``is_first``), ``block_tokens int32[N, page_size]``, ``salts uint32[N, 2]``. Equals the
  corresponding column of `chain_block_hashes`."""
  if hash_fn == "constant":
    return xp.zeros((xp.asarray(block_tokens).shape[0], 2), xp.uint32)
  start = _start(xp, salts)
  if hash_fn != "unchained":
    start = (xp.where(is_first, start[0], parent_hash[:, 0]),
             xp.where(is_first, start[1], parent_hash[:, 1]))
  return xp.stack(_link(xp, *start, _digest(xp, block_tokens)), axis=-1)


def block_hashes_numpy(tokens: ArrayLike, page_size: int, salt: int = 0,
                       hash_fn: str = "mix64") -> np.ndarray:
  """The chained 64-bit hashes of a prompt's full blocks, on the host, bit-identical to the
  device's: ``uint32[len(tokens) // page_size, 2]``.

  Args:
    tokens: the prompt's token ids (int32 values).
    page_size: tokens per block.
    salt: the request's salt, an int in ``[0, 2**64)``.
    hash_fn: the cache's ``CacheSpec.block_hash``.

  >>> hashes = jaxpaged.block_hashes([1, 2, 3, 4, 5], page_size=2)  # token 5: no full block
  >>> hashes.shape, hashes.dtype.name
  ((2, 2), 'uint32')
  >>> other = jaxpaged.block_hashes([9, 2, 3, 4], page_size=2)  # block 1 equal, its parent not
  >>> bool((other[1] == hashes[1]).all())
  False
  """
  from jaxpaged._src import checks  # pylint: disable=g-import-not-at-top  # checks imports this
  if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
    raise checks.JaxPagedError(f"page_size must be a positive int, got {page_size!r}.")
  if hash_fn not in HASH_FUNCTIONS:
    raise checks.JaxPagedError(f"hash_fn must be one of {HASH_FUNCTIONS}, got {hash_fn!r}.")
  tokens = checks.host_token_ids("tokens", tokens)
  salt = checks.salt("salt", salt)
  lanes = np.array([checks.split_salt(salt)], np.uint32)
  full = len(tokens) // page_size * page_size
  with np.errstate(over="ignore"):
    return chain_block_hashes(np, tokens[:full].astype(np.int64).reshape(1, full), lanes,
                              page_size, hash_fn)[0]
