"""Query blocks: the unit of work both attention implementations take.

A query block holds up to ``q_block`` consecutive new tokens of one sequence (decode: one token,
one block per row). A block attends to its sequence's pages, causally: the query at position
``p`` sees keys at positions ``k <= p`` (and ``k > p - sliding_window``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The position of an empty query slot (padding, or a row with no token): below every key, so it
# sees nothing, and below every real position, so a max over a block ignores it.
NO_QUERY = -1
# A page-table entry that names no page (the page tables' convention): its keys are never seen.
UNMAPPED = -1
# The identity of a min over int32 positions: a min that stands it in for empty slots ignores them.
POSITION_MAX = np.iinfo(np.int32).max


class QueryBlocks(NamedTuple):
  """NB query blocks of up to ``q_block`` queries each, in the layout both implementations read."""
  row: jax.Array  # [NB] int32: the batch row of each block
  token: jax.Array  # [NB, q_block] int32: index into the flat q; num_tokens for an empty slot
  position: jax.Array  # [NB, q_block] int32: position in its sequence; NO_QUERY for an empty slot


def decode_blocks(kv_lens: jax.Array) -> QueryBlocks:
  """Decode: block b is row b's single query, at the last cached position."""
  num_rows = kv_lens.shape[0]
  return QueryBlocks(row=jnp.arange(num_rows, dtype=jnp.int32),
                     token=jnp.arange(num_rows, dtype=jnp.int32)[:, None],  # [NB, 1]
                     position=(kv_lens - 1)[:, None])  # [NB, 1]; an empty sequence: NO_QUERY


def ragged_blocks(kv_lens: jax.Array, q_lens: jax.Array, num_tokens: int,
                  q_block: int) -> QueryBlocks:
  """Splits each row's ``q_lens`` new tokens (rows concatenated in ``q``) into query blocks.

  ``NB = cdiv(num_tokens, q_block) + num_rows`` bounds the blocks of any split (each row adds at
  most one partial block; none when ``q_block`` is 1). Empty blocks still cost a gather each
  step, so the bound is kept tight.
  """
  num_rows = q_lens.shape[0]
  num_blocks = num_tokens if q_block == 1 else -(-num_tokens // q_block) + num_rows
  per_row = -(-q_lens // q_block)
  block_end = jnp.cumsum(per_row)
  block = jnp.arange(num_blocks)
  row = jnp.minimum(jnp.searchsorted(block_end, block, side="right"), num_rows - 1)
  in_row = block - (block_end[row] - per_row[row])  # block index within its row
  offset = in_row[:, None] * q_block + jnp.arange(q_block)  # [NB, q_block] token within row
  valid = (block < block_end[-1])[:, None] & (offset < q_lens[row][:, None])
  row_start = (jnp.cumsum(q_lens) - q_lens)[row][:, None]
  token = jnp.where(valid, row_start + offset, num_tokens)
  position = jnp.where(valid, (kv_lens - q_lens)[row][:, None] + offset, NO_QUERY)
  return QueryBlocks(row=row.astype(jnp.int32), token=token.astype(jnp.int32),
                     position=position.astype(jnp.int32))


def query_span(position: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(first, last)``: the oldest and newest query position along the last axis (``last`` is
  NO_QUERY and ``first`` POSITION_MAX where there is no query)."""
  last = jnp.max(position, axis=-1)
  first = jnp.min(jnp.where(position >= 0, position, POSITION_MAX), axis=-1)
  return first, last
