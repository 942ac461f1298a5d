"""Continuous-batching benchmark (serving issue): SmolLM2-135M-Instruct serving the chat
workload of the examples (`examples/chat_workload.py`: a long shared system prompt, some second
turns, requests arriving over time) with prefix caching on and off, in a pool of 1x and 4x the
base size. The 1x pool cannot hold the workload at once without prefix sharing.

Every configuration is compiled and run once untimed on the step clock (`Server.warmup`: the
jitted step and the cache manager's small programs), then run ``repeats`` times in wall-clock
time, configurations alternating; medians are reported. All runs must produce the same tokens
(greedy), which the table checks.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from benchmarks.harness import Row
from examples.chat_workload import chat_workload
from jaxpaged.models import gguf, serving

BASE_PAGES = 40  # 640 tokens: two requests without prefix sharing, about eight with it


def run(quick: bool = False) -> list[Row]:
  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  num_requests, new_tokens, repeats = (8, 16, 1) if quick else (16, 32, 3)
  requests = chat_workload(tokenizer, num_requests=num_requests, max_new_tokens=new_tokens,
                           mean_gap=0.25)
  configs = {f"prefix {'on' if prefix else 'off'}, pool {scale}x ({BASE_PAGES * scale} pages)":
             serving.Server(params, config, eos_id=tokenizer.eos_token_id,
                            num_pages=BASE_PAGES * scale, max_seqs=16, token_budget=128,
                            prefix_caching=prefix)
             for scale in (1, 4) for prefix in (True, False)}
  for server in configs.values():
    server.warmup(requests)
  reports = {name: [] for name in configs}
  for _ in range(repeats):
    for name, server in configs.items():
      reports[name].append(server.run(requests))
  return _rows(requests, reports)


def _rows(requests: list[serving.Request], reports: dict[str, list[serving.Report]]) -> list[Row]:
  """Each configuration's figures (medians over its runs), then the comparisons."""
  rows, outputs = [], set()
  figures = {}
  for name, runs in reports.items():
    median = lambda f: statistics.median(f(r) for r in runs)
    stats = runs[-1].stats
    figures[name] = (median(lambda r: r.throughput), median(lambda r: r.mean_ttft))
    outputs |= {tuple(tuple(res.output) for res in r.results) for r in runs}
    rows += [
        Row("serve", f"{name}: throughput", figures[name][0], "tok/s"),
        Row("serve", f"{name}: mean TTFT", figures[name][1], "s"),
        Row("serve", f"{name}: prefix block hit rate, device + host",
            stats["device_hit_rate"] + stats["host_hit_rate"], "fraction"),
        Row("serve", f"{name}: swap-outs, recomputations", stats["swap_outs"] +
            sum(res.admissions - 1 for res in runs[-1].results), "count"),
        Row("serve", f"{name}: peak pages in use",
            max(t["used_pages"] for t in runs[-1].timeline), "pages"),
    ]
  on1, off1, on4, off4 = figures.values()
  same = len(outputs) == 1
  prompt_tokens = sum(len(r.prompt) for r in reports[next(iter(reports))][0].results)
  return rows + [
      Row("serve", f"{len(requests)} requests, {prompt_tokens} prompt tokens: every run's "
          "outputs identical", float(same), "bool", "== 1", same),
      Row("serve", "throughput, prefix on / off, pool 1x", on1[0] / off1[0], "x"),
      Row("serve", "throughput, prefix on / off, pool 4x", on4[0] / off4[0], "x"),
      Row("serve", "mean TTFT, prefix off / on, pool 1x", off1[1] / on1[1], "x"),
      Row("serve", "throughput, pool 4x / 1x, prefix on", on4[0] / on1[0], "x"),
      Row("serve", "throughput, pool 4x / 1x, prefix off", off4[0] / off1[0], "x"),
  ]
