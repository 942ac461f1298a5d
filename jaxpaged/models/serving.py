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

Data parallelism (``mesh=`` or ``data_shards=``): one `jaxpaged.CacheManager` per device of the
mesh's ``data`` axis, each with its own cache, prefix cache, host RAM tier, model replica and
step; a router (`jaxpaged.PrefixAwareRouter` by default) sends each arriving request to a shard,
and every iteration runs one step per shard (dispatched to every device before any result is
read, so that devices run concurrently where they can).

`Request`, `Result` and `Report` live in `jaxpaged.models.requests`; how a step's rows are
scheduled and packed, in `jaxpaged.models.batching`. This module decides who runs and who is
preempted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged._src import checks
from jaxpaged._src import multi_manager
from jaxpaged._src import routing
from jaxpaged._src.spec import next_pow2
from jaxpaged.models import batching, generation, llama
from jaxpaged.models.batching import InFlight, Step
from jaxpaged.models.llama import LlamaConfig, Params, forward
from jaxpaged.models.requests import Report, Request, Result, check_requests

_PROGRESS_EVERY = 16  # steps between progress lines: one line per step would flood the output


@functools.partial(jax.jit, static_argnames=("config", "decode"), donate_argnames=("cache",))
def _step(params, cache, tokens, seq_ids, q_lens, *, config, decode):
  """One model step: appends the rows' tokens, returns each row's greedy next token."""
  cache, logits, ok = forward(params, cache, tokens, seq_ids, q_lens, config=config,
                              decode=decode)
  return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32), ok


# ----------------------------------------------------------------------------- a run's state

@dataclasses.dataclass
class _Queues:
  """Where the requests of a run are: ``pending`` (arrival, index) still to arrive; ``waiting``
  arrived, in arrival order (preempted ones to recompute first); ``swapped`` preempted to host
  RAM, oldest arrival first (resumed before anything is admitted); ``running`` in admission
  order (the last one is preempted first); ``done`` by request index. With data shards, one
  per shard: ``pending`` and ``done`` are shared (the same objects), ``manager`` and ``params``
  are the shard's."""
  pending: list[tuple[float, int]]
  waiting: list[InFlight] = dataclasses.field(default_factory=list)
  swapped: list[InFlight] = dataclasses.field(default_factory=list)
  running: list[InFlight] = dataclasses.field(default_factory=list)
  done: dict[int, Result] = dataclasses.field(default_factory=dict)
  manager: jp.CacheManager | None = None
  params: Params | None = None

  @property
  def load(self) -> int:
    """Requests this shard holds and has not finished."""
    return len(self.waiting) + len(self.swapped) + len(self.running)


class _Clock:
  """A run's time: wall-clock seconds since its start or, on the step clock, model steps run."""

  def __init__(self, realtime: bool):
    self.realtime, self.start, self.steps = realtime, time.perf_counter(), 0

  def now(self) -> float:
    return time.perf_counter() - self.start if self.realtime else float(self.steps)

  def wait_until(self, when: float, now: float) -> None:
    """Idles from ``now`` until ``when`` (the step clock skips the steps in between)."""
    if self.realtime:
      time.sleep(max(when - now, 0))
    else:
      self.steps = max(self.steps, int(np.ceil(when)))


# ----------------------------------------------------------------------------- the server

def _check_token_budget(token_budget, max_seqs: int, max_seq_len: int) -> int:
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
  return token_budget


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
    cache_dtype: dtype of the cached K/V: float32, bfloat16, float16, or 8-bit (int8,
      float8_e4m3fn, float8_e5m2, with a float32 scale per token and KV head): an 8-bit pool of
      ``num_pages`` pages takes about a quarter of float32's bytes (`spec`'s ``page_bytes``), so
      for the same bytes pass about 3.8x the pages.
    mesh: data parallelism: a ``(data, model=1)`` mesh (`jaxpaged.make_mesh`); each device of
      its data axis holds one shard (a cache of ``num_pages`` pages, ``max_seqs`` rows, a
      model replica). Or
    data_shards: the first ``data_shards`` of ``jax.devices()`` (default: one shard, on the
      default device).
    router: which shard takes an arriving request (`jaxpaged.Router`; load: the requests a shard
      holds); default `jaxpaged.PrefixAwareRouter`.
    disk_cache: a directory of prefix blocks that outlives the process (`jaxpaged.DiskStore`,
      one per data shard on the same directory, model identity `llama.model_fingerprint`):
      each shard's `jaxpaged.CacheManager` reads prompts' blocks from it and writes the blocks of
      requests it finishes, so a restarted server computes only what it never computed before;
      ``stats["disk_hit_tokens"]`` counts what came from it. Needs ``prefix_caching``.
    disk_bytes: its capacity in bytes (default 16 GiB).

  Every count (``num_pages``, ``max_seqs``, ``page_size``, ``max_seq_len``, ``token_budget``)
  is an int >= 1; bad arguments raise `jaxpaged.JaxPagedError`. The server alone decides which
  request is preempted when a step does not fit; `manager` (a `jaxpaged.CacheManager`, made by
  each `run`) counts and moves the pages.

  Greedy decoding: each request's output is what generating it alone gives.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> params = llama.random_params(config)
  >>> server = Server(params, config, eos_id=0, num_pages=8, max_seqs=2, page_size=4,
  ...                 max_seq_len=16, token_budget=16)
  >>> requests = [Request([1, 2, 3, 4, 5], 6), Request([6, 7], 4, arrival=2)]
  >>> report = server.run(requests, realtime=False)  # the step clock: a reproducible schedule
  >>> from jaxpaged.models.generation import generate
  >>> alone = generate(params, config, [[1, 2, 3, 4, 5]], max_new_tokens=6, eos_id=0)
  >>> report.results[0].output == alone.tokens[0], report.stats["used_pages"]
  (True, 0)
  >>> two = Server(params, config, eos_id=0, num_pages=8, max_seqs=2, page_size=4,
  ...              max_seq_len=16, token_budget=16, mesh=jaxpaged.make_mesh(2, 1))
  >>> [r.output for r in two.run(requests, realtime=False).results] == [
  ...     r.output for r in report.results]
  True
  """

  def __init__(self, params: Params, config: LlamaConfig, *, eos_id: int, num_pages: int,
               max_seqs: int = 16, page_size: int = 16, max_seq_len: int = 1024,
               token_budget: int = 128, prefix_caching: bool = True, host_bytes: int = 1 << 30,
               cache_dtype: jax.typing.DTypeLike = jnp.float32,
               mesh: jax.sharding.Mesh | None = None, data_shards: int | None = None,
               router: routing.Router | None = None,
               disk_cache: str | os.PathLike | None = None,
               disk_bytes: int = generation.DEFAULT_DISK_BYTES):
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
    token_budget = _check_token_budget(token_budget, max_seqs, max_seq_len)
    prefix_caching = checks.flag("prefix_caching", prefix_caching)
    cache_dtype = generation.check_cache_dtype(cache_dtype)
    host_bytes = checks.integer("host_bytes", host_bytes, minimum=0,
                                fix="pass the host RAM for swapped sequences in bytes (0: none)")
    self.params, self.config, self.eos_id = params, config, eos_id
    self.spec = dataclasses.replace(
        config.cache_spec(num_pages=num_pages, max_seqs=max_seqs, max_seq_len=max_seq_len,
                          page_size=page_size, dtype=cache_dtype),
        prefix_caching=prefix_caching)
    self.host_bytes = host_bytes
    self.buckets = batching.step_sizes(max_seqs, token_budget)
    self.devices = _shard_devices(mesh, data_shards)
    self.router = routing.check_router(routing.PrefixAwareRouter() if router is None else router)
    self.replicas = ([params] if self.devices == [None]
                     else [jax.device_put(params, d) for d in self.devices])
    self.disks = [None] * len(self.devices)
    if disk_cache is not None:
      if not prefix_caching:
        raise jp.JaxPagedError("disk_cache keeps prefix blocks: pass prefix_caching=True (the "
                               "default) with a disk_cache, or disk_cache=None.")
      if isinstance(disk_cache, jp.DiskStore):
        raise jp.JaxPagedError("Server: disk_cache must be a directory path (each data shard "
                               "opens its own jaxpaged.DiskStore on it), got a DiskStore.")
      self.disks = [generation.open_disk_cache(disk_cache, disk_bytes, self.spec, params, config)
                    for _ in self.devices]
    self._use_disk = True  # (warmup serves without it, so that it leaves nothing there)
    self.manager: jp.CacheManager | None = None  # (shard 0's)
    self.managers: list[jp.CacheManager] = []
    self._index: routing.PrefixIndex | None = None  # (with data shards: `_route`)

  def warmup(self, requests: Sequence[Request] = ()) -> None:
    """Compiles every step shape (all rows padding: the model step, the manager's checks of its
    room) on every shard's device, then serves ``requests`` once on the step clock, which
    compiles the cache manager's small programs for their lengths too, so that the timed run
    that follows measures serving, not compiling."""
    for device, params in zip(self.devices, self.replicas):
      manager = jp.CacheManager(self.spec, host_bytes=self.host_bytes, device=device)
      rows = self.spec.max_seqs
      for num_tokens, decode in [(rows, True)] + [(t, False) for t in self.buckets]:
        padding = np.full(rows, -1, np.int32), np.zeros(rows, np.int32)
        manager.pages_needed(*batching.with_spare_row(*padding, num_tokens))
        manager.reserve(*padding, num_slots=num_tokens)
        manager.cache, _, _ = _step(params, manager.cache, jnp.zeros(num_tokens, jnp.int32),
                                    jnp.full(rows, -1, jnp.int32), jnp.zeros(rows, jnp.int32),
                                    config=self.config, decode=decode)
    if requests:
      self._use_disk = False
      try:
        self.run(requests, realtime=False)
      finally:
        self._use_disk = True

  def run(self, requests: Sequence[Request], *, realtime: bool = True,
          progress: Callable[[str], None] | None = None) -> Report:
    """Serves ``requests`` to completion on a fresh cache (`manager`; one per shard:
    `managers`).

    Every iteration takes the arrivals (routing each to a shard), then on every shard admits
    (`_admit`) and builds a step (`_build_step`), runs the steps (`_run_step`) and commits their
    outputs (`_commit`). The report's stats are the shards' summed (their own under
    ``stats["shards"]`` when there are several); its timeline has one entry per iteration.

    Args:
      requests: what to serve; all are checked before anything runs.
      realtime: arrivals and reported times in wall-clock seconds. False: a step clock (every
        model step takes one unit, arrivals count steps), which makes the schedule, and so the
        batching, chunking, preemptions and prefix hits, reproducible.
      progress: called with a line of text every 16 steps (`_PROGRESS_EVERY`).
    """
    self._validate(requests)
    realtime = self._check_options(realtime, progress)
    self.managers = [jp.CacheManager(self.spec, host_bytes=self.host_bytes, device=d,
                                     disk=disk if self._use_disk else None)
                     for d, disk in zip(self.devices, self.disks)]
    self.manager = self.managers[0]
    # Routing reads the shards' cached prefixes from their KV events.
    if self._index is not None:
      self._index.close()
    self._index = routing.PrefixIndex.follow(self.managers) if len(self.managers) > 1 else None
    clock = _Clock(realtime)
    pending = [(r.arrival, i) for i, r in enumerate(requests) if r.follows is None]
    done: dict[int, Result] = {}
    shards = [_Queues(pending, done=done, manager=m, params=p)
              for m, p in zip(self.managers, self.replicas)]
    timeline, shapes = [], set()
    while len(done) < len(requests):
      now = clock.now()
      self._take_arrivals(requests, shards, now)
      if not any(q.running or q.waiting or q.swapped for q in shards):
        clock.wait_until(min(pending)[0], now)
        continue
      steps = []
      for queues in shards:
        self._admit(requests, queues)
        step = self._build_step(queues)
        if step is not None:  # (None: every running request was preempted: resume next time)
          shapes.add((len(step.tokens), step.decode))
          steps.append((queues, step, self._run_step(queues, step, clock.steps)))
      if not steps:
        continue
      outputs = [_fetch(out, clock.steps) for _, _, out in steps]  # every device dispatched
      clock.steps += 1
      for (queues, step, _), next_tokens in zip(steps, outputs):
        self._commit(requests, queues, step, next_tokens, clock.now())
      timeline.append(self._timeline_entry(shards, [step for _, step, _ in steps], clock.now()))
      if progress and clock.steps % _PROGRESS_EVERY == 0:
        progress(self._progress_line(shards, len(requests), clock.steps, timeline[-1]))
    return Report([done[i] for i in range(len(requests))], clock.now(), timeline,
                  _merged_stats([m.stats() for m in self.managers]),
                  self.spec.num_pages * len(self.managers), "s" if realtime else "step",
                  len(shapes))

  # --------------------------------------------------------------------------- phases of a step

  def _take_arrivals(self, requests: Sequence[Request], shards: list[_Queues],
                     now: float) -> None:
    """Moves the requests that arrived by ``now`` from ``pending`` to the ``waiting`` queue of
    the shard the router chooses (`_route`). A follow-up turn's tokens are the earlier turn's
    prompt, answer and end-of-sequence token, then its own."""
    pending = shards[0].pending
    for arrival, i in sorted(p for p in pending if p[0] <= now):
      pending.remove((arrival, i))
      follows = requests[i].follows
      earlier = None if follows is None else shards[0].done[follows]
      history = [] if earlier is None else earlier.prompt + earlier.output + [self.eos_id]
      tokens = history + [int(t) for t in requests[i].prompt]
      shard = self._route(tokens, requests[i].salt, shards)
      shards[shard].waiting.append(InFlight(i, tokens, len(tokens), arrival))

  def _route(self, tokens: list[int], salt: int, shards: list[_Queues]) -> int:
    """The router's shard for a prompt, given each shard's load (requests held) and cached
    prefix (device, then host RAM or disk), from the `jaxpaged.PrefixIndex` fed by the shards' KV
    events (brought up to date first: the last model steps registered blocks)."""
    if len(shards) == 1:
      return 0
    self._index.refresh()
    loads = [routing.ShardLoad(q.load, c)
             for q, c in zip(shards, self._index.cached_tokens(tokens, salt=salt))]
    return routing.checked_choice(self.router, tokens, loads)

  def _admit(self, requests: Sequence[Request], queues: _Queues) -> None:
    """Resumes preempted requests first, then admits waiting ones, each only with room left for
    one more page per running sequence (so that the next decode steps do not preempt it again).
    """
    manager, ps, running = queues.manager, self.spec.page_size, queues.running
    while queues.swapped:
      state = queues.swapped[0]
      room = -(-state.length // ps) + len(running)  # its pages, plus the headroom
      if manager.available_pages < room or not manager.swap_in([state.seq])[0]:
        break
      running.append(queues.swapped.pop(0))
    while queues.waiting and not queues.swapped:
      state = queues.waiting[0]
      admission = manager.admit(state.tokens, salt=requests[state.index].salt,
                                max_prompt_tokens=0,
                                room_tokens=len(state.tokens) + ps * len(running))
      if admission is None:
        break
      state.seq, state.length = admission.seq_id, admission.num_cached
      state.cached_tokens += admission.num_cached
      state.host_hit_tokens += admission.host_hit_tokens
      state.admissions += 1
      running.append(queues.waiting.pop(0))

  def _build_step(self, queues: _Queues) -> Step | None:
    """Schedules the running requests' rows (`batching.schedule`) and packs them; while the
    pages the step takes (`_pages_needed`) exceed those the pool can give, preempts the latest
    admitted request and packs the rows that are left. None when every running request was
    preempted. The server alone decides whom to preempt; the manager only counts and moves."""
    rows = batching.schedule(queues.running, self.buckets[-1])
    while rows:
      step = batching.pack(rows, self.spec.max_seqs, self.buckets)
      if self._pages_needed(queues.manager, step) <= queues.manager.available_pages:
        return step
      victim = queues.running.pop()
      rows = [(s, q) for s, q in rows if s is not victim]
      self._preempt(victim, queues)
    return None

  def _pages_needed(self, manager: jp.CacheManager, step: Step) -> int:
    """Pages ``step`` takes now (new pages, copies of shared last pages), as
    `CacheManager.pages_needed` counts them, checked at the step's own size
    (`batching.with_spare_row`: compiled once per step shape, by `warmup`)."""
    return manager.pages_needed(*batching.with_spare_row(step.seq_ids, step.q_lens,
                                                         len(step.tokens)))

  def _preempt(self, state: InFlight, queues: _Queues) -> None:
    """Swaps ``state`` out to host RAM, or releases it to recompute if it has nothing computed
    yet or the host tier is full (its full blocks stay in the prefix cache either way)."""
    state.preemptions += 1
    if state.length > 0:
      try:
        queues.manager.swap_out([state.seq])
        queues.swapped.append(state)
        queues.swapped.sort(key=lambda s: s.arrival)
        return
      except jp.TierError:
        pass
    queues.manager.release([state.seq])
    state.seq, state.length = -1, 0
    queues.waiting.insert(0, state)

  def _run_step(self, queues: _Queues, step: Step, index: int) -> tuple[jax.Array, jax.Array]:
    """Makes room for the step (`CacheManager.reserve`: demotes cached blocks to host RAM if
    need be) and dispatches the model on it, on the shard's device. Returns ``(next_tokens,
    ok)`` as device arrays (`_fetch` reads them): each row's greedy next token,
    ``int32[max_seqs]``."""
    manager = queues.manager
    fits, _ = manager.reserve(step.seq_ids, step.q_lens, num_slots=len(step.tokens))
    if not fits:
      raise RuntimeError(f"jaxpaged bug: step {index} does not fit in the pool although the "
                         "scheduler preempted requests until it did; please report it.")
    manager.cache, next_tokens, ok = _step(
        queues.params, manager.cache, step.tokens, step.seq_ids, step.q_lens,
        config=self.config, decode=step.decode)
    return next_tokens, ok

  def _commit(self, requests: Sequence[Request], queues: _Queues, step: Step,
              next_tokens: np.ndarray, now: float) -> None:
    """Appends each row's new token once its prompt is in, and finishes the requests that
    produced their end-of-sequence token or their budget (`_finish`)."""
    for row, (state, q) in enumerate(step.rows):
      state.length += q
      if state.length < len(state.tokens):
        continue  # mid-prompt: this chunk's logits are not a prediction
      token = int(next_tokens[row])
      state.first_token = now if state.first_token is None else state.first_token
      if token != self.eos_id:
        state.tokens.append(token)
      if token == self.eos_id or len(state.output) >= requests[state.index].max_new_tokens:
        self._finish(requests, queues, state, now)

  def _timeline_entry(self, shards: list[_Queues], steps: list[Step], now: float) -> dict:
    """The iteration's `Report.timeline` entry: summed over the shards (``shard_used_pages``:
    each shard's own)."""
    used = [int(jp.num_used_pages(q.manager.cache)) for q in shards]
    return dict(time=now, used_pages=sum(used), running=sum(len(q.running) for q in shards),
                waiting=sum(len(q.waiting) for q in shards),
                swapped=sum(len(q.swapped) for q in shards),
                decode_rows=sum(s.decode_rows for s in steps),
                prefill_tokens=sum(s.prefill_tokens for s in steps), shard_used_pages=used)

  def _finish(self, requests: Sequence[Request], queues: _Queues, state: InFlight,
              now: float) -> None:
    """Releases a finished request's sequence (its full blocks stay cached), records its
    `Result` and schedules its follow-up turns, which arrive ``arrival`` after ``now``."""
    queues.manager.release([state.seq])
    queues.running.remove(state)
    queues.done[state.index] = state.result(now)
    queues.pending += [(now + r.arrival, j) for j, r in enumerate(requests)
                       if r.follows == state.index]

  def _progress_line(self, shards: list[_Queues], num_requests: int, steps: int,
                     last: dict) -> str:
    return (f"step {steps}: {len(shards[0].done)}/{num_requests} done, {last['running']} "
            f"running, {last['waiting']} waiting, {last['swapped']} swapped, "
            f"{last['used_pages']}/{self.spec.num_pages * len(shards)} pages")

  # --------------------------------------------------------------------------- argument checks

  def _check_options(self, realtime: bool, progress: Callable[[str], None] | None) -> bool:
    """`run`'s options, checked: returns ``realtime``."""
    realtime = checks.flag("realtime", realtime)
    if progress is not None and not callable(progress):
      raise jp.JaxPagedError(f"progress must be a callable taking a str, or None, got "
                             f"{type(progress).__name__}.")
    return realtime

  def _validate(self, requests: Sequence[Request]) -> None:
    """Checks every request (and the list) before anything runs."""
    check_requests(requests, self.config.vocab_size, self.spec)


# ----------------------------------------------------------------------------- helpers

def _fetch(out: tuple[jax.Array, jax.Array], index: int) -> np.ndarray:
  """A dispatched step's next tokens on host, after checking the cache took it."""
  next_tokens, ok = out
  next_tokens = np.asarray(next_tokens)
  if not bool(ok):
    raise RuntimeError(f"jaxpaged bug: the cache refused step {index} although reserve made "
                       "room for it; please report it.")
  return next_tokens


def _shard_devices(mesh, data_shards) -> list:
  """The devices of the data shards (``[None]``: one shard on the default device)."""
  if data_shards is not None:
    data_shards = checks.integer("data_shards", data_shards, minimum=1,
                                 fix="pass how many devices hold a shard each, e.g. 2")
    if mesh is None:
      if data_shards > len(jax.devices()):
        raise jp.JaxPagedError(
            f"data_shards must be at most the {len(jax.devices())} devices JAX has, got "
            f"{data_shards}; use fewer, or on CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts.")
      return jax.devices()[:data_shards] if data_shards > 1 else [None]
  if mesh is None:
    return [None]
  devices = multi_manager.data_devices(mesh=mesh)
  if data_shards is not None and data_shards != len(devices):
    raise jp.JaxPagedError(f"data_shards must equal the mesh's data axis ({len(devices)}) when "
                           f"both are given, got {data_shards}; pass one of them.")
  return devices


def _merged_stats(stats: list[dict]) -> dict:
  """The shards' `CacheManager.stats` summed (hit rates over all lookups, the highest pressure,
  every host tier), with ``shards``: each shard's own. One shard: its stats as they are."""
  if len(stats) == 1:
    return stats[0]
  merged = {k: sum(s[k] for s in stats) for k, v in stats[0].items()
            if isinstance(v, int) and not isinstance(v, bool)}
  lookups = max(merged["lookup_blocks"], 1)
  merged.update(device_hit_rate=merged["device_hit_blocks"] / lookups,
                host_hit_rate=merged["host_hit_blocks"] / lookups,
                host_tiers=[t for s in stats for t in s["host_tiers"]],
                pressure=max((jp.MemoryPressure[s["pressure"]] for s in stats)).name,
                shards=stats)
  return merged
