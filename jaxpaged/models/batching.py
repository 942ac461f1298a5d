"""How `jaxpaged.models.serving.Server` builds one model step out of the requests in flight.

Every running request feeds the tokens its cache does not hold yet: one (its last output token)
when it is decoding, a chunk of its prompt when it is prefilling (`schedule`). The rows are
packed in `jaxpaged.extend`'s layout, and the step's token count is padded to one of a few
sizes (`step_sizes`), so that a handful of programs is compiled (`pack`). Who runs, and who is
preempted when a step does not fit, is the server's decision, not this module's.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from jaxpaged._src.spec import next_pow2
from jaxpaged.models.requests import Result

# Smallest ragged step, in tokens (unless the budget is smaller): shorter steps would save little
# compute and each compile a program of its own.
_MIN_STEP_TOKENS = 16
_MAX_DOUBLINGS = 32  # step sizes tried: smallest * 2**i for i < 32, past any int32 budget


@dataclasses.dataclass
class InFlight:
  """A request in flight (host side). ``tokens`` = prompt + output so far; the cache holds the
  first ``length`` of them in sequence ``seq``; the request feeds ``tokens[length:]`` (the last
  output token when decoding).

  >>> state = InFlight(index=0, tokens=[1, 2, 3], prompt_len=3, arrival=0.0)
  >>> state.tokens.append(7)  # its first output token
  >>> state.output, state.result(finished=2.0).output
  ([7], [7])
  """
  index: int  # of the request
  tokens: list[int]
  prompt_len: int
  arrival: float
  seq: int = -1
  length: int = 0
  first_token: float | None = None
  cached_tokens: int = 0
  host_hit_tokens: int = 0
  admissions: int = 0
  preemptions: int = 0

  @property
  def output(self) -> list[int]:
    """The tokens generated so far."""
    return self.tokens[self.prompt_len:]

  def result(self, finished: float) -> Result:
    """Its `Result`, finished at ``finished``."""
    return Result(self.tokens[:self.prompt_len], self.output, self.arrival, self.first_token,
                  finished, self.cached_tokens, self.host_hit_tokens, self.admissions,
                  self.preemptions)


class Step(NamedTuple):
  """One model step, packed (`pack`)."""
  rows: list[tuple[InFlight, int]]  # (request, tokens fed), in row order
  seq_ids: np.ndarray  # int32[max_seqs]: each row's sequence; -1 for padding rows
  q_lens: np.ndarray  # int32[max_seqs]: tokens each row feeds
  tokens: np.ndarray  # int32[num_tokens]: the rows' tokens concatenated, then zeros
  decode: bool  # every row feeds one token
  decode_rows: int  # rows that feed an answer token
  prefill_tokens: int  # prompt tokens fed


def step_sizes(max_seqs: int, token_budget: int) -> list[int]:
  """A ragged step's token counts: powers of two up to the budget, from max(16, max_seqs) (or the
  budget itself, when it is smaller), so the list is never empty and its last entry is the
  budget (a power of two).

  >>> step_sizes(max_seqs=4, token_budget=64), step_sizes(max_seqs=2, token_budget=4)
  ([16, 32, 64], [4])
  """
  smallest = min(max(_MIN_STEP_TOKENS, next_pow2(max_seqs)), token_budget)
  return [b for b in (smallest << i for i in range(_MAX_DOUBLINGS)) if b <= token_budget]


def schedule(running: Sequence[InFlight], budget: int) -> list[tuple[InFlight, int]]:
  """A step's rows ``(request, tokens fed)``: every decoding request feeds its last token, then
  prefilling requests feed prompt chunks, in admission order, while the ``budget`` of tokens
  lasts.

  >>> decoding = InFlight(0, tokens=[1, 2, 3, 9], prompt_len=3, arrival=0.0, length=3)
  >>> prefilling = InFlight(1, tokens=[4, 5, 6, 7, 8], prompt_len=5, arrival=0.0)
  >>> [(state.index, fed) for state, fed in schedule([prefilling, decoding], budget=4)]
  [(0, 1), (1, 3)]
  """
  rows = [(s, 1) for s in running if len(s.tokens) - s.length == 1]
  budget -= len(rows)
  for state in running:
    left = len(state.tokens) - state.length
    if left > 1 and budget > 0:
      rows.append((state, min(left, budget)))
      budget -= rows[-1][1]
  return rows


def pack(rows: list[tuple[InFlight, int]], max_seqs: int, sizes: Sequence[int]) -> Step:
  """The step's arrays: ``max_seqs`` rows (the given ones, then padding rows: -1, 0 tokens), the
  rows' tokens concatenated (`jaxpaged.extend`'s layout) and padded to the first of ``sizes``
  that holds them, or, when every row feeds one token, a decode step of ``max_seqs`` tokens.

  >>> prefilling = InFlight(0, tokens=[4, 5, 6, 7, 8], prompt_len=5, arrival=0.0, seq=3)
  >>> step = pack([(prefilling, 3)], max_seqs=2, sizes=[4, 8])
  >>> step.seq_ids.tolist(), step.q_lens.tolist(), step.tokens.tolist(), step.decode
  ([3, -1], [3, 0], [4, 5, 6, 0], False)
  """
  seq_ids = np.full(max_seqs, -1, np.int32)
  q_lens = np.zeros(max_seqs, np.int32)
  for row, (state, q) in enumerate(rows):
    seq_ids[row], q_lens[row] = state.seq, q
  chunk = [t for state, q in rows for t in state.tokens[state.length:state.length + q]]
  decode = all(q == 1 for _, q in rows)
  decode_rows = sum(q == 1 and s.length >= s.prompt_len for s, q in rows)  # answer tokens
  num_tokens = max_seqs if decode else next(b for b in sizes if b >= len(chunk))
  tokens = np.zeros(num_tokens, np.int32)
  tokens[:len(chunk)] = chunk
  return Step(rows, seq_ids, q_lens, tokens, decode, decode_rows, len(chunk) - decode_rows)


def with_spare_row(seq_ids: np.ndarray, q_lens: np.ndarray,
                   num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """The rows plus one padding row (-1) holding the token slots they leave free of
  ``num_tokens`` (`jaxpaged.extend`'s layout keeps a padding row's entries; it appends nothing).
  A check sized to its rows' token total (`jaxpaged.CacheManager.pages_needed`) is then sized
  to the step: one compiled program per step size instead of one per token total.

  >>> with_spare_row(np.array([3, -1]), np.array([3, 0]), num_tokens=4)
  (array([ 3, -1, -1]), array([3, 0, 1]))
  """
  return (np.append(seq_ids, np.int32(-1)),
          np.append(q_lens, np.int32(num_tokens - int(q_lens.sum()))))
