"""Runs every jaxpaged benchmark: prints one table, writes results JSON and a PNG plot.

  python -m benchmarks.run            # all benchmarks
  python -m benchmarks.run --quick    # fewer repetitions and smaller sizes (a smoke run)
  python -m benchmarks.run --only cache
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from benchmarks import bench_admission
from benchmarks import bench_attention
from benchmarks import bench_cache
from benchmarks import bench_compress
from benchmarks import bench_disk
from benchmarks import bench_mesh
from benchmarks import bench_model
from benchmarks import bench_prefix
from benchmarks import bench_quant
from benchmarks import bench_routing
from benchmarks import bench_serve
from benchmarks import bench_tier
from benchmarks import bench_waste
from benchmarks import harness

BENCHMARKS = {
    "cache": bench_cache.run,
    "attention": bench_attention.run,
    "model": bench_model.run,
    "prefix": bench_prefix.run,
    "tier": bench_tier.run,
    "serve": bench_serve.run,
    "admission": bench_admission.run,
    "mesh": bench_mesh.run,
    "routing": bench_routing.run,
    "quant": bench_quant.run,
    "compress": bench_compress.run,
    "disk": bench_disk.run,
    "waste": bench_waste.run,
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller sizes")
  parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run just these")
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).parent / "results")
  args = parser.parse_args(argv)
  rows = []
  for name in args.only or BENCHMARKS:
    print(f"running {name} ...", file=sys.stderr, flush=True)
    rows += BENCHMARKS[name](quick=args.quick)
  print()
  harness.print_table(rows)
  args.out.mkdir(parents=True, exist_ok=True)
  harness.write_json(rows, args.out / "results.json")
  plotted = harness.write_plot(rows, args.out / "results.png")
  print(f"\nwrote {args.out / 'results.json'}" + (f" and {args.out / 'results.png'}" if plotted
                                                   else " (no plot: pip install matplotlib)"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
