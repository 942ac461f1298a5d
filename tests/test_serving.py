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
from jaxpaged.models import generation, gguf, serving

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
  return serving.chat_workload(tokenizer, num_requests=6, max_new_tokens=12, follow_up_every=3,
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


def test_bad_requests_are_refused_before_anything_runs(model):
  config, params, tokenizer = model
  server = serving.Server(params, config, eos_id=tokenizer.eos_token_id, **SERVER)
  cases = [
      ([serving.Request([1, 2], 4, follows=0)], "must name an earlier request"),
      ([serving.Request([], 4)], "non-empty prompt"),
      ([serving.Request([1], 0)], "max_new_tokens >= 1"),
      ([serving.Request([1] * 400, 200)], "may reach 600 tokens"),
      ([serving.Request([1] * 200, 50), serving.Request([1] * 200, 50, follows=0)],
       "request 1 may reach 501 tokens"),
  ]
  for requests, message in cases:
    with pytest.raises(jp.JaxPagedError, match=message):
      server.run(requests)
  assert server.manager is None  # nothing started
  with pytest.raises(jp.JaxPagedError, match="power of two"):
    serving.Server(params, config, eos_id=0, num_pages=8, max_seqs=4, token_budget=48)


def test_serve_example_runs(capsys, monkeypatch, tmp_path, workload):
  monkeypatch.setattr(sys, "argv", [
      "serve.py", "--requests", "3", "--max-new-tokens", "4", "--step-clock", "--pages", "20",
      "--max-seqs", "4", "--token-budget", "64", "--plot", str(tmp_path / "serve.png")])
  module = runpy.run_path(str(ROOT / "examples" / "serve.py"), run_name="example")
  assert module["main"]() == 0
  out = capsys.readouterr().out
  assert "4 requests, " in out and "0 at the end" in out and "TTFT" in out
