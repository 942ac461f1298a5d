"""Serve a stream of chat requests with continuous batching on jaxpaged's paged cache, offline.

  python examples/serve.py                         # the built-in workload, pool of 40 pages
  python examples/serve.py --requests 32 --pages 64 --max-new-tokens 48
  python examples/serve.py --no-prefix-caching     # every request computes the system prompt
  python examples/serve.py --step-clock            # reproducible schedule (times in steps)
  python examples/serve.py --kv-dtype int8 --pages 150  # 8-bit K/V: 3.76x the pages, same bytes

The workload (`chat_workload.py` beside this script): chat requests to SmolLM2-135M-Instruct
that share a long system prompt, arrive over time, and every fourth one asks a second question
that extends its first turn. The pool is too small for all of them at once: requests
wait, share the system prompt through the prefix cache, are swapped to host RAM when decode
outgrows the pool, and resume with the same output. The loop itself is
`jaxpaged.models.serving.Server`; this script prints what happened and plots the pages in use.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

import jaxpaged as jp
from jaxpaged.models import cli, gguf, serving

try:  # run as a script (python examples/serve.py): this directory is on sys.path
  from chat_workload import chat_workload
except ImportError:  # run from the repository root (runpy in the tests, python -m examples.serve)
  from examples.chat_workload import chat_workload

KV_DTYPES = ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn", "float8_e5m2")


def plot(report: serving.Report, path: pathlib.Path) -> bool:
  """Pages in use and requests running / waiting / swapped over time, as a PNG (matplotlib)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  times = [t["time"] for t in report.timeline]
  fig, (pages, requests) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
  pages.step(times, [t["used_pages"] for t in report.timeline], where="post", label="in use")
  pages.axhline(report.num_pages, color="black", lw=0.8, ls="--", label="pool")
  pages.set_ylabel("device pages")
  pages.legend(loc="lower right")
  for key in ("running", "waiting", "swapped"):
    requests.step(times, [t[key] for t in report.timeline], where="post", label=key)
  requests.set_ylabel("requests")
  requests.set_xlabel(f"time ({report.unit})")
  requests.legend(loc="upper right")
  stats = report.stats
  pages.set_title(f"{len(report.results)} requests, {report.throughput:.1f} tokens/{report.unit},"
                  f" mean TTFT {report.mean_ttft:.2f} {report.unit}, device hit rate "
                  f"{stats['device_hit_rate']:.0%}, host {stats['host_hit_rate']:.0%}, "
                  f"{stats['swap_outs']} swaps", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("--gguf", help="a Llama-family GGUF file (default: SmolLM2-135M-Instruct)")
  parser.add_argument("--requests", type=cli.integer(1), default=16,
                      help="first turns in the workload")
  parser.add_argument("--max-new-tokens", type=cli.integer(1), default=32)
  parser.add_argument("--mean-gap", type=cli.number(0), default=0.25,
                      help="mean time between arrivals (seconds, or steps with --step-clock)")
  parser.add_argument("--pages", type=cli.integer(1), default=40, help="device pool, in pages")
  parser.add_argument("--page-size", type=cli.integer(1), default=16)
  parser.add_argument("--max-seqs", type=cli.integer(1), default=16, help="sequences in flight")
  parser.add_argument("--token-budget", type=cli.power_of_two, default=128,
                      help="most tokens per step: a power of two >= --max-seqs")
  parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="float32",
                      help="K/V cache storage (8-bit ones keep a scale per token and head)")
  parser.add_argument("--no-prefix-caching", action="store_true")
  parser.add_argument("--disk-cache", metavar="DIR",
                      help="keep K/V blocks in DIR across runs (a restarted server reads what "
                      "it finds there instead of computing it)")
  parser.add_argument("--disk-bytes", type=cli.integer(1), default=16 << 30,
                      help="capacity of --disk-cache in bytes (default 16 GiB)")
  parser.add_argument("--step-clock", action="store_true",
                      help="count time in model steps: a reproducible schedule")
  parser.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("serve.png"),
                      help="where to write the PNG (needs matplotlib)")
  parser.add_argument("--show", type=cli.integer(0), default=4, help="answers to print")
  return parser


def serve(args: argparse.Namespace):
  """Loads the model, builds the workload and the server, compiles, serves. Returns
  ``(tokenizer, requests, report)``."""
  start = time.perf_counter()
  config, params, tokenizer = gguf.load(args.gguf)
  params = jax.tree.map(jnp.asarray, params)
  requests = chat_workload(tokenizer, num_requests=args.requests,
                           max_new_tokens=args.max_new_tokens, mean_gap=args.mean_gap)
  server = serving.Server(params, config, eos_id=tokenizer.eos_token_id, num_pages=args.pages,
                          max_seqs=args.max_seqs, page_size=args.page_size,
                          token_budget=args.token_budget,
                          prefix_caching=not args.no_prefix_caching,
                          cache_dtype=jnp.dtype(args.kv_dtype), disk_cache=args.disk_cache,
                          disk_bytes=args.disk_bytes)
  spec = server.spec
  print(f"model loaded in {time.perf_counter() - start:.1f}s; jax {jax.__version__} on "
        f"{jax.default_backend()}; K/V cache: {spec.dtype.name}, {spec.token_bytes} bytes per "
        f"token, pool {spec.num_pages} pages = {spec.num_pages * spec.page_bytes / 2**20:.1f} MiB;"
        f" compiling (a first pass over the workload) ...", flush=True)
  start = time.perf_counter()
  server.warmup(requests)
  print(f"compiled in {time.perf_counter() - start:.1f}s; serving ...", flush=True)
  report = server.run(requests, realtime=not args.step_clock,
                      progress=lambda line: print(f"  {line}", flush=True))
  return tokenizer, requests, report


def print_report(args: argparse.Namespace, tokenizer, requests: list[serving.Request],
                 report: serving.Report) -> None:
  """One line per request, the first answers, the summary; the plot."""
  print(f"\n{'req':>4} {'turn':>4} {'prompt':>6} {'cached':>6} {'host':>5} {'preempt':>7} "
        f"{'arrival':>8} {'TTFT':>7} {'latency':>8} {'tokens':>6}")
  for i, (request, result) in enumerate(zip(requests, report.results)):
    turn = 1 if request.follows is None else 2
    print(f"{i:>4} {turn:>4} {len(result.prompt):>6} {result.cached_tokens:>6} "
          f"{result.host_hit_tokens:>5} {result.preemptions:>7} {result.arrival:>8.2f} "
          f"{result.ttft:>7.2f} {result.latency:>8.2f} {len(result.output):>6}")
  for i, (request, result) in enumerate(zip(requests, report.results)):
    if i < args.show or (request.follows is not None and request.follows < args.show):
      question = tokenizer.decode(result.prompt).split("user\n")[-1].split("\n")[0]
      print(f"\n>>> [{i}] {question.strip()}\n{tokenizer.decode(result.output).strip()}")
  print(f"\nsummary (times in {report.unit}):")
  print(report.summary())
  if args.disk_cache:
    stats = report.stats
    print(f"disk cache {args.disk_cache}: {stats['disk_hit_tokens']} of {stats['prompt_tokens']} "
          f"prompt tokens read from disk, {stats['disk_saved_blocks']} blocks written")
  if plot(report, args.plot):
    print(f"wrote {args.plot}")
  else:
    print("no plot: pip install matplotlib")


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)  # bad values: a usage message and exit status 2
  if args.token_budget < args.max_seqs:
    parser.error(f"argument --token-budget: must be >= --max-seqs ({args.max_seqs}), got "
                 f"{args.token_budget} (each step feeds every running sequence a token)")
  try:
    tokenizer, requests, report = serve(args)
  except jp.JaxPagedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print_report(args, tokenizer, requests, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
