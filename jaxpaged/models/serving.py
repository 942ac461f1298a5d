"""Continuous batching on the paged cache: a serving loop over requests that arrive over time.

Every step runs one jitted model call over a ragged batch (`models.llama.forward`): sequences
that are decoding feed one token each, sequences still prefilling feed a chunk of their prompt in
the rest of the step's token budget (chunked prefill mixed with decode, as vLLM and SGLang do).
The step's token count is bucketed to powers of two, so a handful of programs is compiled.

A request joins when a sequence slot is free and the pool can hold its prompt (prefix hits on
device and in host RAM attached by `jaxpaged.CacheManager.admit`), and leaves when it produced
its end-of-sequence token or its token budget (`release`: its full blocks stay cached for the
next request with the same prefix). When a step needs more pages than the pool has, the latest
admitted running request is preempted: swapped out to host RAM (or, if the host tier is full,
released and recomputed later from its cached prefix) and resumed before new requests are
admitted. Decoding is greedy, so a request's output does not depend on what it was batched with.

A request may be the next turn of an earlier one (``follows``): its prompt is the earlier
request's prompt, answer and end-of-sequence token, then its own tokens; it arrives ``arrival``
seconds after the earlier one finished, and the conversation so far is a prefix-cache hit.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged._src import checks
from jaxpaged._src.spec import next_pow2
from jaxpaged.models import llama
from jaxpaged.models.llama import LlamaConfig, forward

_SALTS = 1 << 64  # salts are 64-bit: [0, 2**64)


def _check_time(name: str, value) -> float:
  """``value``, if it is a finite number >= 0 (a time: seconds, or steps under the step clock)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, float, np.integer, np.floating)) or not (np.isfinite(value) and value >= 0):
    raise jp.JaxPagedError(f"{name} must be a finite number >= 0 (seconds, or steps under the "
                           f"step clock), got {value!r}.")
  return float(value)


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
  """
  prompt: Sequence[int]
  max_new_tokens: int
  arrival: float = 0.0
  follows: int | None = None
  salt: int = 0


@dataclasses.dataclass
class Result:
  """What happened to one request. Times are seconds since the start of the run (in steps when
  the run used the step clock)."""
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
    return self.first_token - self.arrival

  @property
  def latency(self) -> float:
    return self.finished - self.arrival


@dataclasses.dataclass
class Report:
  """A run of `Server.run`: the requests' results, a timeline of the steps, the cache's stats."""
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
    return sum(len(r.output) for r in self.results)

  @property
  def throughput(self) -> float:
    """Generated tokens per second (per step under the step clock) of the whole run."""
    return self.generated_tokens / max(self.duration, 1e-9)

  @property
  def mean_ttft(self) -> float:
    return statistics.fmean(r.ttft for r in self.results)

  @property
  def mean_latency(self) -> float:
    return statistics.fmean(r.latency for r in self.results)

  def summary(self) -> str:
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


@functools.partial(jax.jit, static_argnames=("config", "decode"), donate_argnames=("cache",))
def _step(params, cache, tokens, seq_ids, q_lens, *, config, decode):
  """One model step: appends the rows' tokens, returns each row's greedy next token."""
  cache, logits, ok = forward(params, cache, tokens, seq_ids, q_lens, config=config,
                              decode=decode)
  return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32), ok


@dataclasses.dataclass
class _State:
  """A request in flight (host side). ``tokens`` = prompt + output so far; the cache holds the
  first ``length`` of them; the sequence feeds ``tokens[length:]`` (the last output token when
  decoding)."""
  index: int
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
    return self.tokens[self.prompt_len:]


class Server:
  """Continuous batching of greedy generation on one paged cache with a host RAM tier.

  Args:
    params, config: the model (`jaxpaged.models.gguf.load`, weights as jnp arrays).
    eos_id: end-of-sequence token.
    num_pages: the device pool, in pages of ``page_size`` tokens.
    max_seqs: sequences in flight (rows of every step).
    max_seq_len: longest sequence (prompt plus answer).
    token_budget: most tokens one step feeds, a power of two >= ``max_seqs`` (every running
      sequence feeds a token each step): decode tokens first, then prompt chunks. A step's token
      count is padded to a power of two (``buckets``): at most ``token_budget``, at least
      ``max(16, next_pow2(max_seqs))``, or ``token_budget`` itself when that is smaller.
    prefix_caching: share full prompt blocks between requests (device and host RAM).
    host_bytes: host RAM for swapped sequences and demoted blocks, >= 0.

  Every count (``num_pages``, ``max_seqs``, ``page_size``, ``max_seq_len``, ``token_budget``)
  is an int >= 1; bad arguments raise `jaxpaged.JaxPagedError`.
  """

  def __init__(self, params, config: LlamaConfig, *, eos_id: int, num_pages: int,
               max_seqs: int = 16, page_size: int = 16, max_seq_len: int = 1024,
               token_budget: int = 128, prefix_caching: bool = True, host_bytes: int = 1 << 30,
               cache_dtype=jnp.float32):
    config = llama.check_config(config)
    llama.check_params(params, config)
    eos_id = checks.integer("eos_id", eos_id, minimum=0, below=config.vocab_size,
                            fix="pass the tokenizer's end-of-sequence id (tokenizer.eos_token_id)")
    num_pages = checks.integer("num_pages", num_pages, minimum=1,
                               fix="pass the size of the device pool in pages")
    max_seqs = checks.integer("max_seqs", max_seqs, minimum=1,
                              fix="pass how many sequences may be in flight")
    page_size = checks.integer("page_size", page_size, minimum=1,
                               fix="pass tokens per page, e.g. 16")
    max_seq_len = checks.integer("max_seq_len", max_seq_len, minimum=1,
                                 fix="pass the longest sequence (prompt plus answer) in tokens")
    token_budget = checks.integer("token_budget", token_budget, minimum=1,
                                  fix="pass the most tokens one step feeds, e.g. 128")
    if token_budget > max_seqs * max_seq_len:
      raise jp.JaxPagedError(
          f"token_budget must be at most max_seqs * max_seq_len = {max_seqs * max_seq_len} (no "
          f"step can feed more), got {token_budget}; e.g. 128.")
    if token_budget & (token_budget - 1) or token_budget < max_seqs:
      raise jp.JaxPagedError(
          f"token_budget must be a power of two >= max_seqs ({max_seqs}), got {token_budget}; "
          f"e.g. {max(next_pow2(token_budget), next_pow2(max_seqs))} (each step feeds every "
          "running sequence a token, then prompt chunks).")
    prefix_caching = checks.flag("prefix_caching", prefix_caching)
    host_bytes = checks.integer("host_bytes", host_bytes, minimum=0,
                                fix="pass the host RAM for swapped sequences in bytes (0: none)")
    self.params, self.config, self.eos_id = params, config, eos_id
    self.spec = dataclasses.replace(
        config.cache_spec(num_pages=num_pages, max_seqs=max_seqs, max_seq_len=max_seq_len,
                          page_size=page_size, dtype=cache_dtype),
        prefix_caching=prefix_caching)
    self.host_bytes = host_bytes
    # Step sizes: powers of two up to the budget, from max(16, max_seqs) (or the budget itself,
    # when it is smaller), so the list is never empty and its last entry is the budget.
    smallest = min(max(16, next_pow2(max_seqs)), token_budget)
    self.buckets = [b for b in (smallest << i for i in range(32)) if b <= token_budget]
    self.manager: jp.CacheManager | None = None

  def warmup(self, requests: Sequence[Request] = ()) -> None:
    """Compiles every step shape (all rows padding), then serves ``requests`` once on the step
    clock, which compiles the cache manager's small programs for their lengths too, so that the
    timed run that follows measures serving, not compiling."""
    manager = jp.CacheManager(self.spec, host_bytes=self.host_bytes)
    rows = self.spec.max_seqs
    for num_tokens, decode in [(rows, True)] + [(t, False) for t in self.buckets]:
      manager.reserve(np.full(rows, -1, np.int32), np.zeros(rows, np.int32),
                      num_slots=num_tokens)
      manager.cache, _, _ = _step(self.params, manager.cache, jnp.zeros(num_tokens, jnp.int32),
                                  jnp.full(rows, -1, jnp.int32), jnp.zeros(rows, jnp.int32),
                                  config=self.config, decode=decode)
    if requests:
      self.run(requests, realtime=False)

  def run(self, requests: Sequence[Request], *, realtime: bool = True,
          progress: Callable[[str], None] | None = None) -> Report:
    """Serves ``requests`` to completion on a fresh cache.

    Args:
      realtime: arrivals and reported times in wall-clock seconds. False: a step clock (every
        model step takes one unit, arrivals count steps), which makes the schedule, and so the
        batching, chunking, preemptions and prefix hits, reproducible.
      progress: called with a line of text every few steps.
    """
    self._validate(requests)
    realtime = checks.flag("realtime", realtime)
    if progress is not None and not callable(progress):
      raise jp.JaxPagedError(f"progress must be a callable taking a str, or None, got "
                             f"{type(progress).__name__}.")
    spec, ps = self.spec, self.spec.page_size
    self.manager = manager = jp.CacheManager(spec, host_bytes=self.host_bytes)
    start, steps = time.perf_counter(), 0
    now = (lambda: time.perf_counter() - start) if realtime else (lambda: float(steps))
    done: dict[int, Result] = {}
    pending = [(r.arrival, i) for i, r in enumerate(requests) if r.follows is None]
    waiting: list[_State] = []  # arrived, in arrival order (and preempted ones to recompute)
    swapped: list[_State] = []  # preempted to host RAM, resumed first, oldest first
    running: list[_State] = []  # in admission order: the last one is preempted first
    timeline, shapes = [], set()

    while len(done) < len(requests):
      t = now()
      for arrival, i in sorted(p for p in pending if p[0] <= t):
        pending.remove((arrival, i))
        waiting.append(self._arrive(requests, i, arrival, done))
      if not (running or waiting or swapped):
        wait = min(pending)[0] - t
        if realtime:
          time.sleep(max(wait, 0))
        else:
          steps = max(steps, int(np.ceil(min(pending)[0])))
        continue

      # Resume preempted requests first, then admit new ones, each only with room left for one
      # more page per running sequence (so that the next decode steps do not preempt it again).
      while swapped:
        state = swapped[0]
        room = -(-state.length // ps) + len(running)
        if manager.available_pages < room or not manager.swap_in([state.seq])[0]:
          break
        running.append(swapped.pop(0))
      while waiting and not swapped:
        state = waiting[0]
        admission = manager.admit(state.tokens, salt=requests[state.index].salt,
                                  max_new_tokens=0,
                                  room_tokens=len(state.tokens) + ps * len(running))
        if admission is None:
          break
        state.seq, state.length = admission.seq_id, admission.num_cached
        state.cached_tokens += admission.num_cached
        state.host_hit_tokens += admission.host_hit_tokens
        state.admissions += 1
        running.append(waiting.pop(0))

      rows = self._schedule(running)
      while sum(-(-(s.length + q) // ps) - -(-s.length // ps) for s, q in rows) > \
          manager.available_pages:
        victim = running.pop()
        rows = [(s, q) for s, q in rows if s is not victim]
        self._preempt(victim, waiting, swapped)
      if not rows:
        continue  # (every running request was preempted: resume at the next iteration)

      num_rows = spec.max_seqs
      seq_ids = np.full(num_rows, -1, np.int32)
      q_lens = np.zeros(num_rows, np.int32)
      chunk = []
      for row, (state, q) in enumerate(rows):
        seq_ids[row], q_lens[row] = state.seq, q
        chunk += state.tokens[state.length:state.length + q]
      decode = all(q == 1 for _, q in rows)
      decode_rows = sum(q == 1 and s.length >= s.prompt_len for s, q in rows)  # answer tokens
      num_tokens = num_rows if decode else next(b for b in self.buckets if b >= len(chunk))
      shapes.add((num_tokens, decode))
      fits, _ = manager.reserve(seq_ids, q_lens, num_slots=num_tokens)
      if not fits:
        raise RuntimeError(f"jaxpaged bug: step {steps} does not fit in the pool although the "
                           "scheduler preempted requests until it did; please report it.")
      tokens = np.zeros(num_tokens, np.int32)
      tokens[:len(chunk)] = chunk
      manager.cache, next_tokens, ok = _step(
          self.params, manager.cache, jnp.asarray(tokens), jnp.asarray(seq_ids),
          jnp.asarray(q_lens), config=self.config, decode=decode)
      next_tokens = np.asarray(next_tokens)
      if not bool(ok):
        raise RuntimeError(f"jaxpaged bug: the cache refused step {steps} although reserve made "
                           "room for it; please report it.")
      steps += 1
      t = now()
      for row, (state, q) in enumerate(rows):
        state.length += q
        if state.length < len(state.tokens):
          continue  # mid-prompt: this chunk's logits are not a prediction
        token = int(next_tokens[row])
        state.first_token = t if state.first_token is None else state.first_token
        if token != self.eos_id:
          state.tokens.append(token)
        if token == self.eos_id or len(state.output) >= requests[state.index].max_new_tokens:
          manager.release([state.seq])
          running.remove(state)
          done[state.index] = Result(state.tokens[:state.prompt_len], state.output,
                                     state.arrival, state.first_token, t, state.cached_tokens,
                                     state.host_hit_tokens, state.admissions, state.preemptions)
          pending += [(t + r.arrival, j) for j, r in enumerate(requests)
                      if r.follows == state.index]
      timeline.append(dict(time=t, used_pages=int(jp.num_used_pages(manager.cache)),
                           running=len(running), waiting=len(waiting), swapped=len(swapped),
                           decode_rows=decode_rows, prefill_tokens=len(chunk) - decode_rows))
      if progress and steps % 16 == 0:
        progress(f"step {steps}: {len(done)}/{len(requests)} done, {len(running)} running, "
                 f"{len(waiting)} waiting, {len(swapped)} swapped, "
                 f"{timeline[-1]['used_pages']}/{spec.num_pages} pages")

    return Report([done[i] for i in range(len(requests))], now(), timeline, manager.stats(),
                  spec.num_pages, "s" if realtime else "step", len(shapes))

  # --------------------------------------------------------------------------- helpers

  def _arrive(self, requests, index: int, arrival: float, done: dict) -> _State:
    request = requests[index]
    history = []
    if request.follows is not None:
      earlier = done[request.follows]
      history = earlier.prompt + earlier.output + [self.eos_id]
    tokens = history + [int(t) for t in request.prompt]
    return _State(index, tokens, len(tokens), arrival)

  def _schedule(self, running: list[_State]) -> list[tuple[_State, int]]:
    """This step's rows ``(request, tokens fed)``: every decoding request feeds its last token,
    then prefilling requests feed prompt chunks, in admission order, while the budget lasts."""
    budget = self.buckets[-1]
    rows = [(s, 1) for s in running if len(s.tokens) - s.length == 1]
    budget -= len(rows)
    for state in running:
      left = len(state.tokens) - state.length
      if left > 1 and budget > 0:
        rows.append((state, min(left, budget)))
        budget -= rows[-1][1]
    return rows

  def _preempt(self, state: _State, waiting: list, swapped: list) -> None:
    """Swaps ``state`` out to host RAM, or releases it to recompute if it has nothing computed
    yet or the host tier is full (its full blocks stay in the prefix cache either way)."""
    state.preemptions += 1
    if state.length > 0:
      try:
        self.manager.swap_out([state.seq])
        swapped.append(state)
        swapped.sort(key=lambda s: s.arrival)
        return
      except jp.TierError:
        pass
    self.manager.release([state.seq])
    state.seq, state.length = -1, 0
    waiting.insert(0, state)

  def _validate(self, requests: Sequence[Request]) -> None:
    """Checks every request (and the list) before anything runs."""
    spec = self.spec
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
      raise jp.JaxPagedError(f"requests must be a list of serving.Request, got "
                             f"{type(requests).__name__}.")
    if not requests:
      raise jp.JaxPagedError("requests is empty; pass at least one serving.Request.")
    lengths = []
    for i, r in enumerate(requests):
      where = f"request {i}"
      if not isinstance(r, Request):
        raise jp.JaxPagedError(f"{where} must be a serving.Request, got {type(r).__name__}.")
      if r.follows is not None:
        checks.integer(f"{where}: follows", r.follows, minimum=0,
                       fix="pass the index of an earlier request, or None")
        if r.follows >= i:
          earlier = f"an index in [0, {i})" if i else "request 0 has none"
          raise jp.JaxPagedError(f"{where}: follows={r.follows} must name an earlier request "
                                 f"({earlier}), or be None for a first turn.")
      prompt = llama.check_tokens("prompt", r.prompt, self.config.vocab_size,
                                  allow_empty=r.follows is not None, where=f"{where}: ")
      checks.integer(f"{where}: max_new_tokens", r.max_new_tokens, minimum=1,
                     fix="a request generates at least one token")
      _check_time(f"{where}: arrival", r.arrival)
      checks.integer(f"{where}: salt", r.salt, minimum=0, below=_SALTS,
                     fix="salts are 64-bit: use e.g. a tenant id, or hash it to 64 bits")
      history = 0 if r.follows is None else lengths[r.follows] + 1
      lengths.append(history + len(prompt) + r.max_new_tokens)
      if lengths[-1] > min(spec.max_seq_len, spec.num_pages * spec.page_size):
        raise jp.JaxPagedError(
            f"{where} may reach {lengths[-1]} tokens (prompt, earlier turns and max_new_tokens) "
            f"but one sequence holds at most {spec.max_seq_len} (max_seq_len) and the pool "
            f"{spec.num_pages * spec.page_size} tokens: raise them or shorten the request.")


# ----------------------------------------------------------------------------- built-in workload

SYSTEM_PROMPT = (
    "You are Juniper, the customer assistant of Crumbs & Co., a family bakery with three shops "
    "in Lyon. Our shops open from 7am to 7pm, Tuesday to Sunday, and are closed on Mondays. We "
    "bake sourdough, baguettes, rye and spelt loaves every morning, croissants and pains au "
    "chocolat until noon, and fruit tarts, eclairs and a chocolate layer cake every afternoon. "
    "Gluten-free bread is baked on Thursdays only; vegan pastries are marked with a green leaf. "
    "Orders for cakes need two days' notice and can be picked up at any shop. We deliver within "
    "the city for orders above 30 euros. Loyalty card holders get every tenth coffee free. "
    "Answer in two or three friendly sentences, do not invent prices, and suggest calling the "
    "shop at 04 72 00 00 00 for anything you cannot answer.")

QUESTIONS = (
    "Are you open on Monday?", "Do you have gluten-free bread today?",
    "Can I order a birthday cake for tomorrow?", "What pastries do you bake in the morning?",
    "Do you deliver to Villeurbanne?", "Is the chocolate cake vegan?",
    "How does the loyalty card work?", "What time do you close on Sunday?",
    "Which bread would you recommend for a cheese platter?", "Do you sell coffee?",
    "Can I pick up my order at a different shop?", "When are the croissants fresh?",
    "Do you have anything without eggs?", "How many shops do you have?",
    "I would like twenty eclairs for Saturday, is that possible?", "What is spelt bread?",
)
FOLLOW_UPS = ("Thank you! Could you say that in one sentence?", "And what about on weekends?",
              "Great, how do I place the order?", "Can you recommend something sweet too?")


def chat_workload(tokenizer, *, num_requests: int = 16, max_new_tokens: int = 32,
                  follow_up_every: int = 4, mean_gap: float = 0.5, seed: int = 0,
                  system: str = SYSTEM_PROMPT) -> list[Request]:
  """Chat requests sharing a long system prompt, arriving with exponential gaps of ``mean_gap``
  (seconds, or steps under the step clock); every ``follow_up_every``-th request gets a second
  turn (a follow-up question asked ``mean_gap`` after its answer), which extends the first turn's
  prompt and answer. Returns first turns then follow-ups (``follows`` points back)."""
  num_requests = checks.integer("num_requests", num_requests, minimum=1)
  max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, minimum=1)
  follow_up_every = checks.integer("follow_up_every", follow_up_every, minimum=1,
                                   fix="e.g. 4: every fourth request gets a second turn")
  mean_gap = _check_time("mean_gap", mean_gap)
  rng = np.random.default_rng(seed)
  arrivals = np.cumsum(rng.exponential(mean_gap, num_requests)) - mean_gap
  requests = [Request(tokenizer.encode(tokenizer.chat_prompt(QUESTIONS[i % len(QUESTIONS)],
                                                             system)),
                      max_new_tokens, float(max(arrivals[i], 0.0)))
              for i in range(num_requests)]
  # A follow-up turn's own tokens: what the chat template puts after the answer's end token.
  answer, eos = "ANSWER", tokenizer.tokenizer.id_to_token(tokenizer.eos_token_id)
  for n, i in enumerate(range(0, num_requests, follow_up_every)):
    text = tokenizer.render([{"role": "system", "content": system},
                             {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                             {"role": "assistant", "content": answer},
                             {"role": "user", "content": FOLLOW_UPS[n % len(FOLLOW_UPS)]}])
    turn = text.split(answer + eos, 1)[1]
    requests.append(Request(tokenizer.encode(turn), max_new_tokens, mean_gap, follows=i))
  return requests
