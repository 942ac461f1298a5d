"""Routing benchmark (scale-out issue): SmolLM2-135M-Instruct serving the built-in chat workload
(`examples/chat_workload.py`: a long shared system prompt, second turns that extend their first
turn's conversation, arrivals over time) on 2 data shards (`Server(data_shards=2)`: a cache
manager, a model replica and a step per device), under three routers side by side in one run:
prefix-aware (SGLang's cache-aware routing), round-robin, least-loaded.

Per router: the prefix block hit rate (device + host), the prompt tokens computed (looked up
minus hit), the throughput (median over ``repeats`` wall-clock runs, routers alternating), and
the load balance (requests per shard, prompt tokens each shard computed). Every run must give
the same tokens (greedy), which the table checks. The shards' devices are CPU host devices of a
child process (``--xla_force_host_platform_device_count``).

On this 2-core CPU the shards do not run in parallel (both "devices" share the two cores), so
throughput compares the routers' work, not a parallel speed-up.
"""

from __future__ import annotations

import statistics
import sys

from benchmarks import harness
from benchmarks.harness import Row

NOTE = ("note: on this 2-core CPU the 2 data shards are host devices sharing the same cores; "
        "they do not run in parallel, so throughput compares the routers' work, not a parallel "
        "speed-up.")
PAGES_PER_SHARD = 40  # 640 tokens per shard, as bench_serve's 1x pool


def _child(quick: bool) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  from examples.chat_workload import chat_workload  # pylint: disable=g-import-not-at-top
  from jaxpaged.models import gguf, serving  # pylint: disable=g-import-not-at-top

  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  num_requests, new_tokens, repeats = (8, 8, 1) if quick else (12, 12, 3)
  requests = chat_workload(tokenizer, num_requests=num_requests, max_new_tokens=new_tokens,
                           follow_up_every=2, mean_gap=0.25)

  class Counting(jp.Router):
    """The router, counting the requests it sends to each shard."""

    def __init__(self, inner):
      self.inner, self.counts = inner, [0, 0]

    def choose(self, request, shards):
      choice = self.inner.choose(request, shards)
      self.counts[choice] += 1
      return choice

  routers = {"prefix-aware": lambda: jp.PrefixAwareRouter(), "round-robin": jp.RoundRobinRouter,
             "least-loaded": jp.LeastLoadedRouter}
  servers = {name: serving.Server(params, config, eos_id=tokenizer.eos_token_id,
                                  num_pages=PAGES_PER_SHARD, max_seqs=8, token_budget=64,
                                  data_shards=2, router=Counting(make()))
             for name, make in routers.items()}
  for server in servers.values():
    server.warmup(requests)
  reports = {name: [] for name in servers}
  counts = {}
  for _ in range(repeats):
    for name, server in servers.items():
      server.router.counts = [0, 0]
      reports[name].append(server.run(requests))
      counts[name] = list(server.router.counts)  # (the last run's)
  return _rows(requests, reports, counts)


def _computed(stats: dict) -> int:
  return stats["prompt_tokens"] - stats["device_hit_tokens"] - stats["host_hit_tokens"]


def _rows(requests, reports, counts) -> list[dict]:
  rows, figures, outputs = [], {}, set()
  for name, runs in reports.items():
    # Wall-clock arrivals: the schedule (and so the hits) may differ between runs: medians.
    median = lambda f: statistics.median(f(r) for r in runs)
    stats = runs[-1].stats
    throughput = median(lambda r: r.throughput)
    per_shard = [_computed(s) for s in stats["shards"]]  # the last run's
    computed = median(lambda r: _computed(r.stats))
    figures[name] = (throughput, computed)
    outputs |= {tuple(tuple(res.output) for res in r.results) for r in runs}
    rows += [
        dict(name=f"{name}: throughput (median)", value=throughput, unit="tok/s"),
        dict(name=f"{name}: prefix block hit rate, device + host (median)",
             value=median(lambda r: r.stats["device_hit_rate"] + r.stats["host_hit_rate"]),
             unit="fraction"),
        dict(name=f"{name}: prompt tokens computed (median)", value=computed, unit="tokens"),
        dict(name=f"{name}: requests per shard ({counts[name][0]} / {counts[name][1]}), "
             "busiest / mean", value=max(counts[name]) / max(statistics.fmean(counts[name]), 1),
             unit="ratio"),
        dict(name=f"{name}: prompt tokens computed per shard ({per_shard[0]} / "
             f"{per_shard[1]}), busiest / mean",
             value=max(per_shard) / max(statistics.fmean(per_shard), 1), unit="ratio"),
    ]
  same = len(outputs) == 1
  prompt_tokens = reports["prefix-aware"][-1].stats["prompt_tokens"]
  (pa, pa_c), (rr, rr_c), (ll, ll_c) = figures["prefix-aware"], figures["round-robin"], figures[
      "least-loaded"]
  return rows + [
      dict(name=f"{len(requests)} requests, {prompt_tokens} prompt tokens, 2 shards: every "
           "run's outputs identical", value=float(same), unit="bool", target="== 1",
           passed=same),
      dict(name="throughput, prefix-aware / round-robin", value=pa / rr, unit="x"),
      dict(name="throughput, prefix-aware / least-loaded", value=pa / ll, unit="x"),
      dict(name="prompt tokens computed, round-robin / prefix-aware", value=rr_c / max(pa_c, 1),
           unit="x"),
      dict(name="prompt tokens computed, least-loaded / prefix-aware", value=ll_c / max(pa_c, 1),
           unit="x"),
  ]


def run(quick: bool = False) -> list[Row]:
  """Runs the benchmark in a child process with 2 CPU host devices; prints the CPU note."""
  rows = harness.on_host_devices("benchmarks.bench_routing", _child, "routing", quick, devices=2)
  print(NOTE, file=sys.stderr, flush=True)
  return rows


if __name__ == "__main__":
  harness.child_main(_child, run)
