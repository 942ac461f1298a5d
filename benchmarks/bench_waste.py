"""KV-waste benchmark (issue 18; the vLLM paper's headline figure): how much of the K/V memory a
paged cache has allocated holds no token, under continuous batching of a realistic request mix,
for page sizes 8/16/32/64, against a contiguous cache that reserves ``max_seq_len`` per request.

Measured with the real allocator: a host scheduler (NumPy) plans every step of a continuous-
batching run (requests arrive, are admitted into free sequence slots, prefill in chunks within a
token budget, decode one token a step, finish and are released, their slots reused); the plan is
replayed on a `jaxpaged` cache with `jaxpaged.release` then `jaxpaged.extend` per step, in one
jitted `lax.scan` per page size (fixed shapes: one compilation). After every step it samples

  allocated = ``jaxpaged.num_used_pages(cache) * page_size``, held = ``sum(cache.seq_lens)``,

and the figure is ``waste = 1 - held / allocated`` averaged over the steps (steps with nothing
allocated skipped). An independent NumPy computation of the same two numbers from the
scheduler's own sequence lengths (``sum(ceil(len / ps) * ps)`` and ``sum(len)``) must agree at
every step, or the benchmark raises. Prefix caching is off (no sharing: every held token is one
sequence's own), and the pool is big enough that nothing is ever preempted.

Baselines, same schedule, computed in NumPy (jaxpaged has no contiguous cache): a contiguous
cache reserving ``max_seq_len`` per live request (what the vLLM paper's "Orca (Max)" does; it
could not actually fit this many requests, so its figure flatters it), and one reserving exactly
``prompt + output`` (the paper's "Orca (Oracle)": it still holds the not-yet-generated part).

Workloads:

(a) ``sharegpt-fit``: prompt and output lengths from log-normal distributions fitted to the
    means the vLLM paper publishes for ShareGPT (Kwon et al., "Efficient Memory Management for
    Large Language Model Serving with PagedAttention", SOSP 2023, Fig. 11(a): mean input 161.31,
    mean output 337.99 tokens; its text: 8.4x longer inputs and 5.8x longer outputs than Alpaca,
    whose means in Fig. 11(b) are 19.31 and 58.45). No trace can be downloaded here, so the
    spread is an assumption, not a published figure: log-normal sigma 1.0 for both lengths.
    Requests are filtered as vLLM's ShareGPT benchmark sampler does (prompt and output >= 4
    tokens, prompt <= 1024, prompt + output <= 2048 = ``max_seq_len``, OPT's context), and each
    log-normal's location is fitted (fixed-point, seeded) so that the *filtered* means equal the
    published ones. Arrivals: Poisson at 1.2x the rate the batch can serve (``max_seqs /
    (mean_output + 1)`` a step), so the batch stays full; token budget 2048 a step.
(b) ``built-in chat``: the library's own chat workload (`examples.chat_workload`, as
    ``bench_serve`` runs it: 16 requests + 4 second turns, 32 new tokens, mean gap 0.25 on the
    step clock; quick 8 + 2, 16 tokens), prompt lengths from SmolLM2's tokenizer; a second turn
    holds its first turn's prompt and answer plus its own tokens, and arrives 1 step after its
    first turn ends. Every answer is taken to run to ``max_new_tokens``. `jaxpaged.models.serving
    .Server`'s defaults: 16 sequences, ``max_seq_len`` 1024, token budget 128.

The default page size is 16 (`Server`, `generate`, `LlamaConfig.cache_spec`; `CacheSpec` itself
has no default); the issue's target is waste <= 2% there (vLLM reports < 4%).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from benchmarks.harness import Row

DEFAULT_PAGE_SIZE = 16  # Server / generate / LlamaConfig.cache_spec default
PAGE_SIZES = (8, 16, 32, 64)
TARGET = 0.02

SHAREGPT_MEAN_PROMPT = 161.31  # Kwon et al. 2023, Fig. 11(a)
SHAREGPT_MEAN_OUTPUT = 337.99
SHAREGPT_SIGMA = 1.0  # assumed (not published)
SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_LEN, SHAREGPT_MIN = 1024, 2048, 4  # vLLM's sampler filter


@dataclasses.dataclass(frozen=True)
class Workload:
  """Requests (``prompt[i]`` tokens to prefill, then ``output[i]`` decoded one a step) and the
  server's sizes. A request with ``follows[i] = j >= 0`` arrives ``arrival[i]`` steps after
  request ``j`` finishes; otherwise at step ``arrival[i]``."""
  name: str
  prompt: np.ndarray
  output: np.ndarray
  arrival: np.ndarray
  follows: np.ndarray
  max_seqs: int
  max_seq_len: int
  token_budget: int


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A planned run, one row per step: ``release`` (slots released before the step, -1 padded),
  ``ids``/``counts`` (the step's extend), ``lens`` (every slot's length after the step) and
  ``reserved`` (per slot, its request's ``prompt + output`` while live, else 0)."""
  release: np.ndarray
  ids: np.ndarray
  counts: np.ndarray
  lens: np.ndarray
  reserved: np.ndarray


# ----------------------------------------------------------------------------- workloads

def _filtered_lognormal(mu, n, rng):
  """``n`` (prompt, output) pairs from log-normals at locations ``mu``, kept as vLLM's ShareGPT
  sampler keeps them (rejection: draws until ``n`` pass)."""
  prompts, outputs = [], []
  while sum(map(len, prompts)) < n:
    z = rng.standard_normal((2, 2 * n))
    p = np.maximum(np.rint(np.exp(mu[0] + SHAREGPT_SIGMA * z[0])), 1).astype(np.int64)
    o = np.maximum(np.rint(np.exp(mu[1] + SHAREGPT_SIGMA * z[1])), 1).astype(np.int64)
    keep = ((p >= SHAREGPT_MIN) & (o >= SHAREGPT_MIN) & (p <= SHAREGPT_MAX_PROMPT)
            & (p + o <= SHAREGPT_MAX_LEN))
    prompts.append(p[keep])
    outputs.append(o[keep])
  return np.concatenate(prompts)[:n], np.concatenate(outputs)[:n]


def fit_sharegpt(seed: int = 1234, samples: int = 200_000, iters: int = 30) -> np.ndarray:
  """Log-normal locations ``(mu_prompt, mu_output)`` whose filtered means are the published
  ShareGPT means (fixed-point iteration on a seeded sample)."""
  target = np.array([SHAREGPT_MEAN_PROMPT, SHAREGPT_MEAN_OUTPUT])
  mu = np.log(target) - SHAREGPT_SIGMA ** 2 / 2
  for _ in range(iters):
    p, o = _filtered_lognormal(mu, samples, np.random.default_rng(seed))
    mu = mu + np.log(target / np.array([p.mean(), o.mean()]))
  return mu


def sharegpt_workload(num_requests: int, *, max_seqs: int, seed: int = 0) -> Workload:
  """(a): ``num_requests`` ShareGPT-like requests (see the module docstring), seeded."""
  rng = np.random.default_rng(seed)
  prompt, output = _filtered_lognormal(fit_sharegpt(), num_requests, rng)
  rate = 1.2 * max_seqs / (SHAREGPT_MEAN_OUTPUT + 1)
  arrival = np.floor(np.cumsum(rng.exponential(1 / rate, num_requests))).astype(np.int64)
  return Workload("sharegpt-fit", prompt, output, arrival - arrival[0],
                  np.full(num_requests, -1), max_seqs=max_seqs, max_seq_len=SHAREGPT_MAX_LEN,
                  token_budget=2048)


def builtin_workload(quick: bool) -> Workload:
  """(b): the lengths of `examples.chat_workload` as ``bench_serve`` runs it (needs SmolLM2's
  tokenizer: `jaxpaged.models.gguf.load`)."""
  from examples.chat_workload import chat_workload  # pylint: disable=g-import-not-at-top
  from jaxpaged.models import gguf  # pylint: disable=g-import-not-at-top
  _, _, tokenizer = gguf.load()
  num_requests, new_tokens = (8, 16) if quick else (16, 32)
  requests = chat_workload(tokenizer, num_requests=num_requests, max_new_tokens=new_tokens,
                           mean_gap=0.25)
  prompt, follows, arrival = [], [], []
  for r in requests:
    if r.follows is None:
      prompt.append(len(r.prompt))
      follows.append(-1)
      arrival.append(int(np.ceil(r.arrival)))
    else:  # the second turn holds its first turn's prompt and answer, then its own tokens
      first = requests[r.follows]
      prompt.append(len(first.prompt) + first.max_new_tokens + len(r.prompt))
      follows.append(r.follows)
      arrival.append(1)
  return Workload("built-in chat", np.array(prompt), np.array([r.max_new_tokens for r in requests]),
                  np.array(arrival), np.array(follows), max_seqs=16, max_seq_len=1024,
                  token_budget=128)


# ----------------------------------------------------------------------------- the schedule

def plan(w: Workload) -> Schedule:
  """Continuous batching on the host: each step releases the requests that finished, admits
  arrived requests (first come, first served) into free slots, then spends the token budget on
  one token for every decoding request and prefill chunks for the rest, in admission order."""
  n, m = len(w.prompt), w.max_seqs
  if np.any(w.prompt + w.output > w.max_seq_len) or np.any(w.prompt < 1) or np.any(w.output < 1):
    raise ValueError(f"{w.name}: every request needs 1 <= prompt, 1 <= output and prompt + "
                     f"output <= max_seq_len = {w.max_seq_len}")
  # (arrival step, request) heap; second turns are pushed when their first turn ends.
  pending = [(int(w.arrival[i]), i) for i in range(n) if w.follows[i] < 0]
  heapq.heapify(pending)
  queue: list[int] = []              # arrived, not admitted, first come first served
  done = np.zeros(n, bool)
  slot_req = np.full(m, -1)          # request in each slot
  length = np.zeros(m, np.int64)     # tokens each slot holds
  finished_slots: list[int] = []
  order: list[int] = []              # slots in admission order
  rows = {k: [] for k in ("release", "ids", "counts", "lens", "reserved")}
  step = 0
  while not done.all():
    release = np.full(m, -1)
    for i, s in enumerate(finished_slots):
      release[i] = s
      done[slot_req[s]] = True
      for j in np.nonzero(w.follows == slot_req[s])[0]:
        heapq.heappush(pending, (step + int(w.arrival[j]), int(j)))
      slot_req[s], length[s] = -1, 0
      order.remove(s)
    finished_slots = []
    if done.all():
      break
    while pending and pending[0][0] <= step:
      queue.append(heapq.heappop(pending)[1])
    while queue and (slot_req < 0).any():
      s = int(np.argmax(slot_req < 0))
      slot_req[s] = queue.pop(0)
      order.append(s)
    ids, counts, budget = np.full(m, -1), np.zeros(m, np.int64), w.token_budget
    decoding = [s for s in order if length[s] >= w.prompt[slot_req[s]]]
    prefilling = [s for s in order if length[s] < w.prompt[slot_req[s]]]
    for s in decoding + prefilling:
      r = slot_req[s]
      want = 1 if length[s] >= w.prompt[r] else w.prompt[r] - length[s]
      take = min(want, budget)
      if take <= 0:
        continue
      ids[s], counts[s], budget = s, take, budget - take
      length[s] += take
      if length[s] == w.prompt[r] + w.output[r]:
        finished_slots.append(s)
    rows["release"].append(release)
    rows["ids"].append(ids)
    rows["counts"].append(counts)
    rows["lens"].append(length.copy())
    rows["reserved"].append(np.where(slot_req >= 0, (w.prompt + w.output)[slot_req], 0))
    step += 1
  return Schedule(**{k: np.array(v, np.int64) for k, v in rows.items()})


# ----------------------------------------------------------------------------- measuring

CHUNK = 512  # steps per jitted call: every schedule is replayed in calls of one shape


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The replay cache's capacity, shared by every workload of a run (so each page size compiles
  once): sequence slots, longest sequence, and extend's static ``num_slots`` (>= any step's
  tokens). Capacity never changes what is allocated, only what could be."""
  max_seqs: int
  max_seq_len: int
  num_slots: int

  @staticmethod
  def covering(workloads) -> "Sizes":
    """The smallest sizes that hold every one of ``workloads``."""
    return Sizes(max(w.max_seqs for w in workloads), max(w.max_seq_len for w in workloads),
                 max(w.token_budget for w in workloads))


@functools.lru_cache(maxsize=None)
def _replayer(spec: jp.CacheSpec, num_slots: int):
  """The jitted replay of ``CHUNK`` steps on a cache of ``spec`` (one compilation each)."""

  def step(cache, xs):
    release, seq_ids, counts = xs
    cache = jp.release(cache, release)
    cache, _, ok = jp.extend(cache, seq_ids, counts, num_slots=num_slots)
    return cache, (jp.num_used_pages(cache), jnp.sum(cache.seq_lens), ok)

  return jax.jit(lambda cache, xs: jax.lax.scan(step, cache, xs), donate_argnums=0)


def measure(schedule: Schedule, page_size: int, sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
  """Replays ``schedule`` on a real cache of ``page_size``: ``(allocated, held)`` slots after
  every step, from `jaxpaged.num_used_pages` and the cache's ``seq_lens``."""
  steps, slots = schedule.ids.shape
  if sizes.max_seq_len % page_size or slots > sizes.max_seqs:
    raise ValueError(f"sizes {sizes} do not fit page size {page_size} and {slots} slots")
  pages_per_seq = sizes.max_seq_len // page_size
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=page_size,
                      num_pages=sizes.max_seqs * pages_per_seq, max_seqs=sizes.max_seqs,
                      max_pages_per_seq=pages_per_seq)  # never runs out of pages
  replay = _replayer(spec, sizes.num_slots)
  padded = -(-steps // CHUNK) * CHUNK  # no-op steps (padding rows only) after the schedule
  pad = lambda x, fill: np.pad(x, ((0, padded - steps), (0, sizes.max_seqs - slots)),
                               constant_values=fill).astype(np.int32)
  xs = (pad(schedule.release, -1), pad(schedule.ids, -1), pad(schedule.counts, 0))
  cache, outs = jp.init_cache(spec), []
  for start in range(0, padded, CHUNK):
    cache, out = replay(cache, tuple(jnp.asarray(x[start:start + CHUNK]) for x in xs))
    outs.append(jax.device_get(out))
  used, held, ok = (np.concatenate(o)[:steps] for o in zip(*outs))
  if not ok.all():
    raise RuntimeError(f"page size {page_size}: extend refused step {int(np.argmin(ok))} of the "
                       "schedule (the pool is sized never to run out: an allocator bug)")
  return used.astype(np.int64) * page_size, held.astype(np.int64)


def oracle(schedule: Schedule, page_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The same two numbers in NumPy from the scheduler's lengths: ``(sum(ceil(len / ps) * ps),
  sum(len))`` per step."""
  lens = schedule.lens
  return (-(-lens // page_size) * page_size).sum(axis=1), lens.sum(axis=1)


def check_against_oracle(name: str, page_size: int, measured, expected) -> None:
  """Raises RuntimeError unless the cache's per-step (allocated, held) equal the oracle's."""
  for what, got, want in zip(("allocated", "held"), measured, expected):
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or not np.array_equal(got, want):
      bad = int(np.argmax(got != want)) if got.shape == want.shape else -1
      raise RuntimeError(f"{name}, page size {page_size}: the cache's {what} slots differ from "
                         f"the NumPy oracle (first at step {bad}: "
                         f"{got[bad] if bad >= 0 else got.shape} vs "
                         f"{want[bad] if bad >= 0 else want.shape})")


def waste(allocated, held) -> float:
  """``1 - held / allocated`` averaged over the steps where something is allocated."""
  allocated, held = np.asarray(allocated, np.float64), np.asarray(held, np.float64)
  live = allocated > 0
  return float(np.mean(1 - held[live] / allocated[live]))


def slot_weighted_waste(allocated, held) -> float:
  """The fraction of slot-steps allocated but empty: ``1 - sum(held) / sum(allocated)``."""
  return float(1 - np.sum(held) / np.sum(allocated))


def measured_waste(w: Workload, schedule: Schedule, page_size: int, sizes: Sizes | None = None
                   ) -> tuple[float, float]:
  """(time-averaged waste, slot-weighted waste) of the real cache at ``page_size``, after the
  oracle check."""
  got = measure(schedule, page_size, sizes or Sizes.covering([w]))
  check_against_oracle(w.name, page_size, got, oracle(schedule, page_size))
  return waste(*got), slot_weighted_waste(*got)


def contiguous_waste(w: Workload, schedule: Schedule) -> tuple[float, float]:
  """Time-averaged waste of a contiguous cache reserving ``max_seq_len`` per live request, and
  of one reserving exactly ``prompt + output``."""
  held = schedule.lens.sum(axis=1)
  live = (schedule.reserved > 0).sum(axis=1)
  return (waste(live * w.max_seq_len, held), waste(schedule.reserved.sum(axis=1), held))


def bench_workload(w: Workload, sizes: Sizes) -> list[Row]:
  """Waste at every page size and of the contiguous baselines, for one workload."""
  schedule = plan(w)
  name = f"kv-waste {w.name}"
  rows = [Row(name, f"{len(w.prompt)} requests, {w.max_seqs} slots, {len(schedule.lens)} steps: "
                    "mean prompt tokens", float(w.prompt.mean()), "tokens"),
          Row(name, "mean output tokens", float(w.output.mean()), "tokens")]
  for ps in PAGE_SIZES:
    avg, weighted = measured_waste(w, schedule, ps, sizes)
    default = ps == DEFAULT_PAGE_SIZE
    rows.append(Row(name, f"paged, page size {ps}{' (default)' if default else ''}: waste",
                    100 * avg, "%", "<= 2%" if default else "", avg <= TARGET if default else None))
    if default:
      rows.append(Row(name, f"paged, page size {ps}: slot-step-weighted waste", 100 * weighted,
                      "%"))
      print(f"kv-waste {w.name}: {100 * avg:.2f}% at the default page size {ps}: target <= 2% "
            f"{'met' if avg <= TARGET else 'MISSED'}", file=sys.stderr)
  max_len, oracle_len = contiguous_waste(w, schedule)
  return rows + [
      Row(name, f"contiguous, max_seq_len {w.max_seq_len} reserved a request: waste",
          100 * max_len, "%"),
      Row(name, "contiguous, prompt + output reserved a request: waste", 100 * oracle_len, "%"),
  ]


def run(quick: bool = False) -> list[Row]:
  """Both workloads (see the module docstring); quick: fewer requests."""
  workloads = [sharegpt_workload(200, max_seqs=32) if quick
               else sharegpt_workload(1000, max_seqs=64), builtin_workload(quick)]
  sizes = Sizes.covering(workloads)
  return [row for w in workloads for row in bench_workload(w, sizes)]


if __name__ == "__main__":
  from benchmarks.harness import print_table  # pylint: disable=g-import-not-at-top
  print_table(run("--quick" in sys.argv))
