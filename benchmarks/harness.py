"""Benchmark harness: timing by medians, one results table, JSON and a PNG plot.

A benchmark is a function ``bench(quick: bool) -> list[Row]``; `run.py` collects them. Every
figure a benchmark reports is measured in the same run as its baseline, so ratios are robust to
this machine's noise; absolute times are for orientation only.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from typing import Callable

import jax


@dataclasses.dataclass
class Row:
  """One figure: ``value`` in ``unit``; ``target`` says what the issue asks of it, if anything."""
  benchmark: str
  name: str
  value: float
  unit: str
  target: str = ""
  passed: bool | None = None  # None: reported only, no target

  @property
  def status(self) -> str:
    return "" if self.passed is None else ("ok" if self.passed else "MISSED")


def median_time(fn: Callable[[], object], *, repeats: int, warmup: int = 2) -> float:
  """Median wall seconds of ``fn()`` (which must block on its result) over ``repeats`` runs."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def median_times_interleaved(fns: dict[str, Callable[[], object]], *, repeats: int,
                             warmup: int = 2) -> dict[str, float]:
  """Like `median_time` for several contenders, run round-robin so that drifts in machine load
  hit all of them alike."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def on_host_devices(module: str, child: Callable[[bool], list[dict]], benchmark: str,
                    quick: bool, *, devices: int = 8, timeout: int = 3600) -> list[Row]:
  """Runs ``child(quick)`` (rows as dicts) in a fresh process with ``devices`` CPU host devices
  (XLA reads its flags once, when JAX starts), and returns its rows. ``module`` must end with
  ``child_main(child, run)``."""
  import json
  import os
  import re
  import subprocess
  import sys
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}")
  out = subprocess.run([sys.executable, "-m", module, "--child"] + (["--quick"] if quick else []),
                       env=env, capture_output=True, text=True, check=True, timeout=timeout)
  return [Row(benchmark, **row) for row in json.loads(out.stdout.strip().splitlines()[-1])]


def child_main(child: Callable[[bool], list[dict]], run: Callable[[bool], list[Row]]) -> None:
  """The ``__main__`` of a benchmark run by `on_host_devices`: ``--child`` prints the child's
  rows as JSON; otherwise the benchmark runs and prints its table."""
  import json
  import sys
  if "--child" in sys.argv:
    print(json.dumps(child("--quick" in sys.argv)))
  else:
    print_table(run("--quick" in sys.argv))


def block(x):
  return jax.block_until_ready(x)


def print_table(rows: list[Row]) -> None:
  widths = [max(len(r.benchmark) for r in rows), max(len(r.name) for r in rows)]
  header = f"{'benchmark':<{widths[0]}}  {'figure':<{widths[1]}}  {'value':>12}  unit       target"
  print(header)
  print("-" * len(header))
  for r in rows:
    target = f"{r.target} {r.status}".strip()
    print(f"{r.benchmark:<{widths[0]}}  {r.name:<{widths[1]}}  {r.value:>12.4g}  {r.unit:<9}  "
          f"{target}")


def environment() -> dict:
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "python": platform.python_version(), "machine": platform.machine(),
          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json(rows: list[Row], path) -> None:
  data = {"environment": environment(), "rows": [dataclasses.asdict(r) for r in rows]}
  path.write_text(json.dumps(data, indent=2))


def write_plot(rows: list[Row], path) -> bool:
  """One horizontal bar per ratio-like figure (unit 'x'), targets marked. Needs matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  ratios = [r for r in rows if r.unit == "x"]
  if not ratios:
    return False
  fig, ax = plt.subplots(figsize=(14, 0.4 * len(ratios) + 1.5))
  labels = [f"{r.benchmark}: {r.name}" for r in ratios]
  colors = ["tab:gray" if r.passed is None else ("tab:green" if r.passed else "tab:red")
            for r in ratios]
  ax.barh(labels, [r.value for r in ratios], color=colors)
  ax.tick_params(axis="y", labelsize=8)
  ax.axvline(1.0, color="black", lw=0.8)
  ax.set_xscale("log")
  ax.invert_yaxis()
  ax.set_xlabel("ratio (log scale): green meets its target, red misses it, gray is reported")
  ax.set_title(f"jaxpaged benchmarks (jax {jax.__version__}, {jax.default_backend()})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True
