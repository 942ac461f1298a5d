"""What `jaxpaged.models.serving.Server.run` takes and gives: `Request`, `Result`, `Report`.

`check_requests` checks a list of requests against a model's vocabulary and a cache's sizes
before anything runs; every refusal is a `jaxpaged.JaxPagedError` naming the request.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Sequence

import numpy as np

import jaxpaged as jp
from jaxpaged._src import checks
from jaxpaged.models import llama

_SALTS = 1 << 64  # salts are 64-bit: [0, 2**64)
_NO_TIME = 1e-9  # a run that took no time has a finite throughput


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation request.

  Attributes:
    prompt: token ids in the model's vocabulary (for a follow-up turn: only the new turn's
      tokens, which may be none); a first turn needs at least one.
    max_new_tokens: at most this many tokens are generated, an int >= 1 (the end-of-sequence
      token ends the answer earlier and is not part of the output).
    arrival: seconds (or steps) after the start of the run (follow-up: after the earlier turn
      finished), a finite number >= 0.
    follows: index of the earlier request this one continues, or None.
    salt: prefix-cache salt, an int in [0, 2**64): blocks are shared only between requests with
      equal salts.

  `Server.run` checks every field before it starts.

  >>> first = Request([1, 2, 3], max_new_tokens=4)
  >>> second = Request([5], max_new_tokens=2, arrival=1.0, follows=0)  # asked 1 s after the answer
  >>> first.arrival, first.follows, second.follows
  (0.0, None, 0)
  """
  prompt: Sequence[int]
  max_new_tokens: int
  arrival: float = 0.0
  follows: int | None = None
  salt: int = 0


@dataclasses.dataclass
class Result:
  """What happened to one request. Times are seconds since the start of the run (in steps when
  the run used the step clock).

  >>> result = Result(prompt=[1, 2], output=[7, 8, 9], arrival=1.0, first_token=1.5,
  ...                 finished=4.0, cached_tokens=0, host_hit_tokens=0, admissions=1,
  ...                 preemptions=0)
  >>> result.ttft, result.latency
  (0.5, 3.0)
  """
  prompt: list[int]
  output: list[int]
  arrival: float
  first_token: float
  finished: float
  cached_tokens: int  # prompt tokens attached from the prefix cache at admission(s)
  host_hit_tokens: int  # the part of cached_tokens promoted from host RAM
  admissions: int  # 1, plus one per recomputation after a preemption without swap space
  preemptions: int

  @property
  def ttft(self) -> float:
    """Time to first token: from arrival to the first output token."""
    return self.first_token - self.arrival

  @property
  def latency(self) -> float:
    """From arrival to the last output token."""
    return self.finished - self.arrival


@dataclasses.dataclass
class Report:
  """A run of `Server.run`: the requests' results, a timeline of the steps, the cache's stats.

  >>> result = Result([1, 2], [7, 8, 9], 0.0, 1.0, 4.0, 0, 0, 1, 0)
  >>> report = Report([result], duration=6.0, timeline=[], stats={}, num_pages=8, unit="step",
  ...                 step_shapes=2)
  >>> report.generated_tokens, report.throughput, report.mean_ttft
  (3, 0.5, 1.0)
  """
  results: list[Result]
  duration: float  # of the run, in `unit`
  timeline: list[dict]  # per step: time, used_pages, running, waiting, swapped,
  # decode_rows, prefill_tokens
  stats: dict  # `CacheManager.stats()` at the end
  num_pages: int
  unit: str  # of times: "s", or "step" under the step clock
  step_shapes: int  # distinct (tokens, decode) step shapes run: each compiled once

  @property
  def generated_tokens(self) -> int:
    """Output tokens of all requests."""
    return sum(len(r.output) for r in self.results)

  @property
  def throughput(self) -> float:
    """Generated tokens per second (per step under the step clock) of the whole run."""
    return self.generated_tokens / max(self.duration, _NO_TIME)

  @property
  def mean_ttft(self) -> float:
    """Mean time to first token, over the requests."""
    return statistics.fmean(r.ttft for r in self.results)

  @property
  def mean_latency(self) -> float:
    """Mean latency, over the requests."""
    return statistics.fmean(r.latency for r in self.results)

  def summary(self) -> str:
    """A few lines of text: throughput, TTFT and latency, prefix hits, pages, swaps."""
    s = self.stats
    u, ttfts = self.unit, [r.ttft for r in self.results]
    lines = [
        f"{len(self.results)} requests, {self.generated_tokens} tokens generated in "
        f"{self.duration:.1f} {u} ({len(self.timeline)} steps): {self.throughput:.1f} tokens/{u}",
        f"TTFT mean {self.mean_ttft:.2f} {u}, p90 {_percentile(ttfts, 90):.2f} {u}; latency mean "
        f"{self.mean_latency:.2f} {u}, max {max(r.latency for r in self.results):.2f} {u}",
        f"prefix cache: {s['prompt_tokens']} prompt tokens looked up, {s['device_hit_tokens']} hit "
        f"on device, {s['host_hit_tokens']} in host RAM (block hit rates: device "
        f"{s['device_hit_rate']:.0%}, host {s['host_hit_rate']:.0%})",
        f"pool of {self.num_pages} pages: peak {max(t['used_pages'] for t in self.timeline)} in "
        f"use, {s['used_pages']} at the end; {s['swap_outs']} swap-outs, {s['swap_ins']} "
        f"swap-ins, {sum(r.admissions - 1 for r in self.results)} recomputations; "
        f"{s['demoted_blocks'] - s['demote_dropped']} cached blocks moved to host RAM "
        f"({s['demote_dropped']} dropped: host full), {s['promoted_blocks']} brought back",
        f"{self.step_shapes} step shapes (each compiled once per pool size)",
    ]
    return "\n".join(lines)


def _percentile(values, q):
  return float(np.percentile(np.asarray(values, np.float64), q))




def _check_time(name: str, value: Any) -> float:
  """``value``, if it is a finite number >= 0 (a time: seconds, or steps under the step clock)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, float, np.integer, np.floating)) or not (np.isfinite(value) and value >= 0):
    raise jp.JaxPagedError(f"{name} must be a finite number >= 0 (seconds, or steps under the "
                           f"step clock), got {value!r}.")
  return float(value)


def check_requests(requests: Sequence[Request], vocab_size: int, spec: jp.CacheSpec) -> None:
  """Checks a list of requests for a model of ``vocab_size`` tokens serving on a cache of
  ``spec``: every field of every request, and that each sequence (earlier turns included) fits
  in one sequence of the cache and in its pool.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> check_requests([Request([1, 2], 4), Request([3], 4, follows=0)], 64, spec)  # fine
  >>> check_requests([Request([1, 2], 15)], 64, spec)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: request 0 may reach 17 tokens ... holds at most 16 ...

  Raises:
    JaxPagedError: naming the first request that is wrong and what to change.
  """
  if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
    raise jp.JaxPagedError(f"requests must be a list of serving.Request, got "
                           f"{type(requests).__name__}.")
  if not requests:
    raise jp.JaxPagedError("requests is empty; pass at least one serving.Request.")
  lengths = []  # the most tokens each request's sequence may reach
  for i, r in enumerate(requests):
    where = f"request {i}"
    prompt = _check_request(where, i, r, vocab_size)
    history = 0 if r.follows is None else lengths[r.follows] + 1
    lengths.append(history + len(prompt) + r.max_new_tokens)
    if lengths[-1] > min(spec.max_seq_len, spec.num_pages * spec.page_size):
      raise jp.JaxPagedError(
          f"{where} may reach {lengths[-1]} tokens (prompt, earlier turns and max_new_tokens) "
          f"but one sequence holds at most {spec.max_seq_len} (max_seq_len) and the pool "
          f"{spec.num_pages * spec.page_size} tokens: raise them or shorten the request.")


def _check_request(where: str, index: int, r: Any, vocab_size: int) -> list[int]:
  """Request ``index``'s fields; returns its prompt as a list of ints."""
  if not isinstance(r, Request):
    raise jp.JaxPagedError(f"{where} must be a serving.Request, got {type(r).__name__}.")
  if r.follows is not None:
    checks.integer(f"{where}: follows", r.follows, minimum=0,
                   fix="pass the index of an earlier request, or None")
    if r.follows >= index:
      earlier = f"an index in [0, {index})" if index else "request 0 has none"
      raise jp.JaxPagedError(f"{where}: follows={r.follows} must name an earlier request "
                             f"({earlier}), or be None for a first turn.")
  prompt = llama.check_tokens("prompt", r.prompt, vocab_size,
                              allow_empty=r.follows is not None, where=f"{where}: ")
  checks.integer(f"{where}: max_new_tokens", r.max_new_tokens, minimum=1,
                 fix="a request generates at least one token")
  _check_time(f"{where}: arrival", r.arrival)
  checks.integer(f"{where}: salt", r.salt, minimum=0, below=_SALTS,
                 fix="salts are 64-bit: use e.g. a tenant id, or hash it to 64 bits")
  return prompt
