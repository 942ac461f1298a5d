"""The manager's host tier: swapped-out sequences and demoted prefix blocks in host RAM, and
below it, optionally, a `jaxpaged.DiskStore` of blocks.

Internal API: `HostTier` (owned by `CacheManager`). Keys: ``("seq", seq_id)`` for a swapped
sequence (pinned: evicting it loses the sequence, which is then recorded as dropped) and
``("block", block_key)`` for a cached block (recomputable, so the store may evict it freely).
A block evicted from the last RAM tier (or too large for any) goes to the disk store; a lookup
reads the disk for the blocks RAM does not hold, after the device's hits, up to the first block
neither holds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxpaged._src import swap
from jaxpaged._src.blocks import CachedBlock, block_key
from jaxpaged._src.disk import DiskStore
from jaxpaged._src.tier import Tier, TieredStore, TierError, TierPolicy


class HostTier:
  """Sequences and blocks on host, in a `TieredStore` under ``policy``.

  Attributes:
    store: the `TieredStore`.
    swapped: ids of the sequences held here.
    dropped: id -> why, for swapped sequences the store evicted (they must be recomputed).
  """

  def __init__(self, tiers: Sequence[Tier], policy: TierPolicy, disk: DiskStore | None = None):
    self.policy = policy
    self.store = TieredStore(tiers, policy, on_evict=self._on_evict)
    self.disk = disk
    self.read_from_disk: set[int] = set()  # (`candidates`)
    self.swapped: set[int] = set()
    self.dropped: dict[int, str] = {}
    # Retention (`jaxpaged._src.retention` maintains them): block keys pinned in RAM and on
    # disk, and with a prefix TTL a clock and each RAM block's last use by it.
    self.ram_pins: set[int] = set()
    self.disk_pins: set[int] = set()
    self.clock = None
    self.block_use: dict[int, float] = {}

  # --------------------------------------------------------------------------- sequences

  def put_sequences(self, sequences: Sequence[swap.SwappedSequence]) -> None:
    """Holds swapped-out sequences (pinned). Raises `TierError` when the tiers cannot."""
    for s in sequences:
      self.store.put(("seq", s.seq_id), s, s.nbytes, pinned=True)
      self.swapped.add(s.seq_id)

  def sequence(self, seq_id: int) -> swap.SwappedSequence:
    """The swapped sequence ``seq_id`` (no access recorded)."""
    return self.store.peek(("seq", seq_id))

  def take_sequence(self, seq_id: int) -> None:
    """Forgets a swapped sequence (it went back to the device, or was released)."""
    self.store.pop(("seq", seq_id))
    self.swapped.discard(seq_id)

  def forget(self, seq_id: int) -> None:
    """Forgets a sequence on release, wherever it is on host (held or dropped)."""
    if seq_id in self.swapped:
      self.take_sequence(seq_id)
    self.dropped.pop(seq_id, None)

  # --------------------------------------------------------------------------- blocks

  def candidates(self, tokens: np.ndarray, hashes: np.ndarray, salt: int, page_size: int,
                 start: int = 0) -> tuple[list[tuple[int, CachedBlock]], list[int]]:
    """The host copies of the prompt's full blocks (``hashes``, one each) that an admission may
    promote: ``(found, held)``: ``found`` the ``(block index, block)`` the host holds for
    exactly this prefix and salt and the policy promotes, ``held`` the indices of every block
    held so. Which of them continue the device's hits is decided on device
    (`jaxpaged._src.admission`); a declined block only ends the run it is in.

    The policy is asked as on a hit (after an access), but the accesses are undone here:
    `record_hits` records those of the blocks the admission actually looked at.

    Blocks from ``start`` (the device's hits end there) that RAM does not hold are read from the
    disk store, if any, up to the first block neither holds; a disk hit is found (promoted) when
    the disk's policy promotes it, and counts as a use there."""
    mark = self.store.snapshot()
    found, held = [], []
    self.read_from_disk: set[int] = set()  # the keys of ``found`` that came from disk
    for i, page_hash in enumerate(hashes):
      key = ("block", block_key(page_hash))
      if not self._holds(key, tokens, salt, (i + 1) * page_size):
        if self.disk is None or i < start:
          continue
        block = self.disk.get(key[1], tokens, salt, end=(i + 1) * page_size)
        if block is None:
          break
        held.append(i)
        if key[1] not in self.disk.index or self.disk.index.should_promote(key[1]):
          found.append((i, block))
          self.read_from_disk.add(key[1])
        continue
      held.append(i)
      self.store.get(key)  # an access, for recency and frequency, as the policy expects
      if self.store.should_promote(key):
        found.append((i, self.store.peek(key)))
    self.store.restore(mark)
    return found, held

  def record_hits(self, hashes: np.ndarray, held: list[int], start: int, promoted: int) -> None:
    """Records the accesses of an admission's host lookups: from block ``start`` (after the
    device's hits), each block held, up to the ``promoted`` ones and the one that ended the
    run (declined by the policy), as a lookup block by block would."""
    held = set(held)
    for i in range(start, len(hashes)):
      key = ("block", block_key(hashes[i]))
      if i not in held or key not in self.store:
        break
      self.store.get(key)
      self.used(key[1])
      if i >= start + promoted:
        break

  def _holds(self, key, tokens: np.ndarray, salt: int, end: int) -> bool:
    """The store holds ``key`` as the block ending ``tokens[:end]`` under ``salt``."""
    block = self.store.peek(key)
    return (isinstance(block, CachedBlock) and block.salt == salt and len(block.tokens) == end
            and np.array_equal(block.tokens, tokens[:end]))

  def store_blocks(self, blocks: Sequence[CachedBlock]) -> tuple[int, int]:
    """Holds demoted blocks; ``(demoted, dropped)``: of the ``demoted`` blocks, those the RAM
    tiers have no room for (they are full of swapped sequences) go to the disk store, else are
    dropped, since they can be recomputed."""
    dropped = 0
    for block in blocks:
      try:
        self.store.put(("block", block.key), block, block.nbytes,
                       pinned=block.key in self.ram_pins)
        self.used(block.key)
      except TierError:
        if self.disk is None or not self.disk.put(block, pinned=block.key in self.disk_pins):
          dropped += 1
    return len(blocks), dropped

  def take_blocks(self, blocks: Sequence[CachedBlock]) -> None:
    """Forgets blocks that went back to the device (if making room did not evict them), but
    keeps those pinned in RAM."""
    for block in blocks:
      if ("block", block.key) in self.store and block.key not in self.ram_pins:
        self.store.pop(("block", block.key))

  def used(self, key: int) -> None:
    """Records a use of the RAM block ``key`` now (with a prefix TTL)."""
    if self.clock is not None:
      self.block_use[key] = self.clock()

  # --------------------------------------------------------------------------- state

  def snapshot(self):
    """Everything, to `restore` after a failed operation (the disk's index, not its files: a
    block written stays a valid block)."""
    disk = None if self.disk is None else self.disk.snapshot()
    return self.store.snapshot(), set(self.swapped), dict(self.dropped), disk

  def restore(self, snapshot) -> None:
    store, self.swapped, self.dropped, disk = snapshot
    self.store.restore(store)
    if disk is not None:
      self.disk.restore(disk)

  def _on_evict(self, key, value, pinned: bool) -> None:
    if key[0] == "block" and self.disk is not None:
      self.disk.put(value, pinned=value.key in self.disk_pins)
    if pinned and key[0] == "seq":
      self.swapped.discard(key[1])
      self.dropped[key[1]] = f"evicted by {type(self.policy).__name__} to make room"
