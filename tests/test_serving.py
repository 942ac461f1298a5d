"""Continuous batching (`jaxpaged.models.serving`) on SmolLM2-135M-Instruct: every request's
output equals generating it alone, whatever the batching, chunking, prefix hits, swaps and
recomputations; nothing leaks; the statistics add up; the step compiles for bucketed shapes only.

The schedules run on the step clock, so they are reproducible; each test first checks that its
schedule exercised what it is about (mixed steps, swaps, host hits, recomputation)."""

import pathlib
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from examples.chat_workload import chat_workload
from jaxpaged.models import generation, gguf, serving
from tests import helpers
from tests.test_model import tiny_model

ROOT = pathlib.Path(__file__).parent.parent
# A pool of 20 pages (320 tokens) for requests of ~230-290 tokens that share a ~200-token
# system prompt: a few run at once only by sharing it, and decoding outgrows the pool.
SERVER = dict(num_pages=20, max_seqs=4, token_budget=64)  # as the example test runs


@pytest.fixture(scope="module")
def model():
  config, params, tokenizer = gguf.load()
  yield config, jax.tree.map(jnp.asarray, params), tokenizer
  jax.clear_caches()  # the model's compiled programs are large: free them for the next modules


@pytest.fixture(scope="module")
def workload(model):
  _, _, tokenizer = model
  return chat_workload(tokenizer, num_requests=6, max_new_tokens=12, follow_up_every=3,
                       mean_gap=2.0)


@pytest.fixture(scope="module")
def alone(model):
  """The oracle: `generation.generate` on one prompt, nothing else in its cache (memoized)."""
  config, params, tokenizer = model
  outputs = {}

  def generate(prompt, max_new_tokens):
    key = (tuple(prompt), max_new_tokens)
    if key not in outputs:
      outputs[key] = generation.generate(params, config, [list(prompt)],
                                         max_new_tokens=max_new_tokens,
                                         eos_id=tokenizer.eos_token_id).tokens[0]
    return outputs[key]
  return generate


def _serve(model, workload, **options):
  config, params, tokenizer = model
  server = serving.Server(params, config, eos_id=tokenizer.eos_token_id, **SERVER, **options)
  return server, server.run(workload, realtime=False)


@pytest.fixture(scope="module")
def swapping(model, workload):
  return _serve(model, workload, host_bytes=1 << 28)


def _assert_outputs_equal_alone(report, workload, alone, tokenizer):
  for request, result in zip(workload, report.results):
    if request.follows is not None:  # its prompt: the earlier turn, its answer, then its own
      earlier = report.results[request.follows]
      assert result.prompt == (earlier.prompt + earlier.output + [tokenizer.eos_token_id]
                               + list(request.prompt))
    assert result.output == alone(result.prompt, request.max_new_tokens)


def _assert_idle_and_consistent(server, report):
  stats, spec = report.stats, server.spec
  assert stats["used_pages"] == 0 and stats["active_sequences"] == 0
  assert stats["swapped_sequences"] == 0
  assert stats["free_pages"] + stats["cached_free_pages"] == spec.num_pages  # no page leaked
  cache = server.manager.cache  # nothing held; every page free or holding a cached block
  assert (np.asarray(cache.page_table) == -1).all() and not np.asarray(cache.seq_lens).any()
  assert not np.asarray(cache.ref_counts).any()
  free = set(np.asarray(cache.free_pages)[:int(cache.num_free)].tolist())
  cached = (set(np.flatnonzero(np.asarray(cache.prefix.page_cached)).tolist())
            if cache.prefix is not None else set())
  assert free | cached == set(range(spec.num_pages)) and not free & cached
  assert stats["swap_outs"] == stats["swap_ins"]
  assert max(t["used_pages"] for t in report.timeline) <= spec.num_pages
  assert all(r.first_token <= r.finished and r.arrival <= r.first_token for r in report.results)


def test_every_output_equals_generating_it_alone_through_swaps(model, workload, swapping, alone):
  server, report = swapping
  stats = report.stats
  # The schedule mixed prefill chunks with decode tokens, chunked every prompt (budget 64),
  # swapped, and brought cached blocks back from host RAM.
  assert any(t["decode_rows"] and t["prefill_tokens"] for t in report.timeline)
  assert stats["swap_outs"] > 0 and stats["host_hit_tokens"] > 0
  assert sum(r.preemptions for r in report.results) == stats["swap_outs"]
  _assert_outputs_equal_alone(report, workload, alone, model[2])
  _assert_idle_and_consistent(server, report)


def test_stats_add_up(swapping):
  server, report = swapping
  stats, ps = report.stats, server.spec.page_size
  assert all(r.admissions == 1 for r in report.results)  # (no recomputation in this schedule)
  # Lookups: the full blocks before each prompt's last token, counted from the prompts.
  lookups = sum((len(r.prompt) - 1) // ps for r in report.results)
  hits = stats["device_hit_blocks"] + stats["host_hit_blocks"]
  assert stats["lookup_blocks"] == lookups and 0 < hits <= lookups
  assert stats["device_hit_rate"] + stats["host_hit_rate"] == pytest.approx(hits / lookups)
  assert sum(r.cached_tokens for r in report.results) == hits * ps
  assert sum(r.host_hit_tokens for r in report.results) == stats["host_hit_tokens"]
  assert stats["prompt_tokens"] == sum(len(r.prompt) for r in report.results)
  assert report.generated_tokens == sum(len(r.output) for r in report.results)
  assert stats["promoted_blocks"] == stats["host_hit_blocks"]


def test_preemption_without_host_room_recomputes_with_the_same_output(model, workload, alone):
  """A host tier too small for any sequence: preempted requests are released and recomputed
  (from their cached blocks), with the same output."""
  server, report = _serve(model, workload, host_bytes=1024)
  assert report.stats["swap_outs"] == 0
  assert any(r.admissions > 1 for r in report.results)
  _assert_outputs_equal_alone(report, workload, alone, model[2])
  _assert_idle_and_consistent(server, report)


def test_without_prefix_caching_the_outputs_are_the_same(model, workload, alone):
  server, report = _serve(model, workload, host_bytes=1 << 28, prefix_caching=False)
  assert report.stats["device_hit_tokens"] == report.stats["host_hit_tokens"] == 0
  assert all(r.cached_tokens == 0 for r in report.results)
  _assert_outputs_equal_alone(report, workload, alone, model[2])
  _assert_idle_and_consistent(server, report)


def test_steps_compile_for_the_bucketed_shapes_only(swapping, workload):
  server, report = swapping
  assert report.step_shapes <= len(server.buckets) + 1  # ragged buckets, plus decode
  before = serving._step._cache_size()
  server.run(workload, realtime=False)  # the same schedule again: nothing new to compile
  assert serving._step._cache_size() == before


@pytest.fixture(scope="module")
def tiny():
  """A tiny random model (no GGUF file): for what does not need the real one."""
  config, params = tiny_model()
  return config, jax.tree.map(jnp.asarray, params)


BAD_SERVERS = [  # (Server arguments, what the message must say)
    (dict(token_budget=48), r"token_budget must be a power of two >= max_seqs \(4\), got 48; "
                            r"e\.g\. 64"),
    (dict(max_seqs=8, token_budget=4), r"token_budget must be a power of two >= max_seqs \(8\), "
                                       r"got 4; e\.g\. 8"),
    (dict(token_budget=0), r"token_budget must be an int >= 1, got 0"),
    (dict(num_pages=0), r"num_pages must be an int >= 1, got 0"),
    (dict(num_pages=20.0), r"num_pages must be an int >= 1, got 20\.0 \(float\)"),
    (dict(max_seqs=0), r"max_seqs must be an int >= 1, got 0"),
    (dict(page_size=-16), r"page_size must be an int >= 1, got -16"),
    (dict(max_seq_len=0), r"max_seq_len must be an int >= 1, got 0"),
    (dict(host_bytes=-1), r"host_bytes must be an int >= 0, got -1"),
    (dict(host_bytes=1.5e9), r"host_bytes must be an int >= 0, got 1500000000\.0 \(float\)"),
    (dict(eos_id=32), r"eos_id must be an int in \[0, 32\), got 32"),
    (dict(prefix_caching=None), r"prefix_caching must be True or False, got None"),
    (dict(params={}), r"params\['embed'\] is missing"),
]


@pytest.mark.parametrize("arguments, message", BAD_SERVERS,
                         ids=[m[:40] for _, m in BAD_SERVERS])
def test_bad_server_arguments_are_refused(tiny, arguments, message):
  config, params = tiny
  arguments = dict(dict(params=params, eos_id=2, **SERVER), **arguments)
  with pytest.raises(jp.JaxPagedError, match=message):
    serving.Server(arguments.pop("params"), config, **arguments)


def test_bad_requests_are_refused_before_anything_runs(tiny):
  config, params = tiny
  server = serving.Server(params, config, eos_id=2, **SERVER)
  Request = serving.Request
  cases = [
      ([Request([1, 2], 4, follows=0)],
       r"request 0: follows=0 must name an earlier request \(request 0 has none\)"),
      ([Request([1], 4), Request([1, 2], 4, follows=1)],
       r"request 1: follows=1 must name an earlier request \(an index in \[0, 1\)\)"),
      ([Request([1], 4), Request([1], 4, follows=-1)],
       r"request 1: follows must be an int >= 0, got -1"),
      ([Request([1], 4), Request([1], 4, follows=0.0)],
       r"request 1: follows must be an int >= 0, got 0\.0 \(float\)"),
      ([Request([], 4)], r"request 0: prompt is empty"),
      ([Request("hello", 4)], r"request 0: prompt must be a sequence of int token ids, got text"),
      ([Request([1], 4), Request([5, 32], 4)],
       r"request 1: prompt\[1\] = 32 is not a token id of this model: ids must be in \[0, 32\)"),
      ([Request([1, -1], 4)], r"request 0: prompt\[1\] = -1 is not a token id"),
      ([Request([1, 2.5], 4)], r"request 0: prompt must hold int token ids, but prompt\[1\] is "
                               r"2\.5"),
      ([Request([1], 0)], r"request 0: max_new_tokens must be an int >= 1, got 0"),
      ([Request([1], 2.0)], r"request 0: max_new_tokens must be an int >= 1, got 2\.0 \(float\)"),
      ([Request([1], 4, arrival=-1.0)], r"request 0: arrival must be a finite number >= 0 .*"
                                        r"got -1\.0"),
      ([Request([1], 4, arrival=float("nan"))], r"request 0: arrival must be a finite number"),
      ([Request([1], 4, arrival="soon")], r"request 0: arrival must be a finite number"),
      ([Request([1], 4, salt=-1)], r"request 0: salt must be an int in \[0, 2\*\*64\), got -1; "
                                   r"salts are 64-bit"),
      ([Request([1], 4, salt=1 << 64)], r"request 0: salt must be an int in \[0, 2\*\*64\), got "
                                        r"18446744073709551616"),
      ([Request([1], 4, salt="tenant")], r"request 0: salt must be an int in \[0, 2\*\*64\), "
                                         r"got 'tenant' \(str\)"),
      ([Request([1] * 400, 200)], r"request 0 may reach 600 tokens"),
      ([Request([1] * 200, 50), Request([1] * 200, 50, follows=0)],
       r"request 1 may reach 501 tokens"),
      ([(1, 2)], r"request 0 must be a serving\.Request, got tuple"),
      (Request([1], 4), r"requests must be a list of serving\.Request, got Request"),
      ([], r"requests is empty"),
  ]
  for requests, message in cases:
    with pytest.raises(jp.JaxPagedError, match=message):
      server.run(requests)
  with pytest.raises(jp.JaxPagedError, match=r"realtime must be True or False, got 'no'"):
    server.run([Request([1], 4)], realtime="no")
  assert server.manager is None  # nothing started
  # The largest salt and an empty follow-up turn are fine.
  server._validate([Request([1], 4, salt=(1 << 64) - 1), Request([], 4, follows=0, arrival=2)])


def test_bad_workload_arguments_are_refused(model):
  tokenizer = model[2]
  cases = [(dict(num_requests=0), r"num_requests must be an int >= 1, got 0"),
           (dict(max_new_tokens=-3), r"max_new_tokens must be an int >= 1, got -3"),
           (dict(follow_up_every=0), r"follow_up_every must be an int >= 1, got 0"),
           (dict(mean_gap=-0.5), r"mean_gap must be a finite number >= 0 .*got -0\.5")]
  for arguments, message in cases:
    with pytest.raises(jp.JaxPagedError, match=message):
      chat_workload(tokenizer, **arguments)


@pytest.fixture(scope="module")
def small_budget(tiny):
  """A server whose token budget (4) is below the smallest default step size (16)."""
  config, params = tiny
  server = serving.Server(params, config, eos_id=2, num_pages=12, max_seqs=2, page_size=4,
                          max_seq_len=48, token_budget=4, host_bytes=1 << 20)
  requests = [serving.Request(list(range(3, 13)), 5),
              serving.Request([7, 8, 9], 6, arrival=1, salt=(1 << 64) - 1),  # 64-bit, kept whole
              serving.Request([4, 5], 3, follows=0)]
  server.warmup()  # compiles the step shapes (all rows padding)
  return server, requests, server.run(requests, realtime=False)


def test_a_token_budget_below_16_runs_with_the_same_outputs(tiny, small_budget):
  config, params = tiny
  server, requests, report = small_budget
  assert server.buckets == [4]
  assert report.step_shapes <= 2  # the one bucket, and decode
  for request, result in zip(requests, report.results):
    alone = generation.generate(params, config, [result.prompt],
                                max_new_tokens=request.max_new_tokens, eos_id=2).tokens[0]
    assert result.output == alone
  assert report.stats["used_pages"] == 0


def test_broken_invariants_raise_runtime_errors_not_asserts(small_budget, monkeypatch):
  """What `python -O` would skip: a step that does not fit after scheduling, a step the cache
  refuses after reserve, are reported as jaxpaged bugs."""
  server, requests, _ = small_budget
  monkeypatch.setattr(jp.CacheManager, "reserve", lambda self, *args, **kwargs: (False, []))
  with pytest.raises(RuntimeError, match=r"jaxpaged bug: step 0 does not fit in the pool"):
    server.run(requests[:1], realtime=False)
  monkeypatch.undo()
  step = serving._step

  def refused(*args, **kwargs):
    cache, tokens, _ = step(*args, **kwargs)
    return cache, tokens, jnp.bool_(False)
  monkeypatch.setattr(serving, "_step", refused)
  with pytest.raises(RuntimeError, match=r"jaxpaged bug: the cache refused step 0 although "
                                         r"reserve made room"):
    server.run(requests[:1], realtime=False)


BAD_SERVE_OPTIONS = [
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 1, got -1"),
    (["--requests", "0"], "argument --requests: must be >= 1, got 0"),
    (["--pages", "many"], "argument --pages: expected an integer, got 'many'"),
    (["--page-size", "0"], "argument --page-size: must be >= 1, got 0"),
    (["--max-seqs", "0"], "argument --max-seqs: must be >= 1, got 0"),
    (["--token-budget", "48"], "argument --token-budget: must be a power of two, got 48"),
    (["--max-seqs", "32", "--token-budget", "16"],
     "argument --token-budget: must be >= --max-seqs (32), got 16 (each step feeds every "
     "running sequence a token)"),
    (["--mean-gap", "-1"], "argument --mean-gap: must be a finite number >= 0, got '-1'"),
    (["--mean-gap", "inf"], "argument --mean-gap: must be a finite number >= 0, got 'inf'"),
    (["--show", "-2"], "argument --show: must be >= 0, got -2"),
]


@pytest.mark.parametrize("options, message", BAD_SERVE_OPTIONS,
                         ids=[" ".join(o) for o, _ in BAD_SERVE_OPTIONS])
def test_serve_example_refuses_bad_options_with_a_usage_error(capsys, options, message):
  helpers.assert_usage_error(capsys, "serve.py", options, message)


def test_serve_example_runs(capsys, monkeypatch, tmp_path, workload):
  monkeypatch.setattr(sys, "argv", [
      "serve.py", "--requests", "3", "--max-new-tokens", "4", "--step-clock", "--pages", "20",
      "--max-seqs", "4", "--token-budget", "64", "--plot", str(tmp_path / "serve.png")])
  module = runpy.run_path(str(ROOT / "examples" / "serve.py"), run_name="example")
  assert module["main"]() == 0
  out = capsys.readouterr().out
  assert "4 requests, " in out and "0 at the end" in out and "TTFT" in out
