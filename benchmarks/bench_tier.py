"""Host RAM tier benchmarks (host-tier issue).

(a) Swap-out and swap-in GB/s of K/V bytes against a plain NumPy copy of the same bytes, same run.
(b) A decode workload whose sequences need 3x the device pool completes through swapping
    (`CacheManager`), with every output token identical to a run whose pool holds everything.
    The model is a small deterministic attention model (`tests.workloads.toy_workload`, which
    the tests run too): any K/V lost or misplaced by a swap changes its tokens.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from benchmarks.harness import Row, block
from tests.workloads import PAGE, VOCAB, toy_workload

# ----------------------------------------------------------------------------- (a) swap GB/s


def bench_swap(quick: bool) -> list[Row]:
  tokens = 1024 if quick else 4096
  spec = jp.CacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, page_size=16,
                      num_pages=2 * tokens // 16, max_seqs=2, max_pages_per_seq=tokens // 16)
  cache = jp.init_cache(spec)
  cache, _, ok = jp.extend(cache, jnp.array([0]), jnp.array([tokens]), num_slots=tokens)
  assert bool(ok)
  nbytes = tokens * spec.page_bytes // spec.page_size
  source = np.random.default_rng(0).normal(size=nbytes // 4).astype(np.float32)
  state = {"cache": cache, "swapped": None}

  def swap_out():
    state["cache"], (state["swapped"],) = jp.swap_out(state["cache"], [0])
    block((state["swapped"].k, state["swapped"].v))

  def swap_in():
    state["cache"], ok = jp.swap_in(state["cache"], state["swapped"])
    assert bool(ok)
    block(state["cache"].k_pages)

  # Round robin (swap_out and swap_in must alternate anyway): load drifts hit all three alike.
  times = {"numpy copy": [], "swap_out": [], "swap_in": []}
  for i in range(2 + (3 if quick else 7)):
    for name, fn in (("numpy copy", source.copy), ("swap_out", swap_out), ("swap_in", swap_in)):
      start = time.perf_counter()
      fn()
      if i >= 2:  # warm-up rounds compile
        times[name].append(time.perf_counter() - start)
  gbs = {name: nbytes / float(np.median(ts)) / 1e9 for name, ts in times.items()}
  host = state["swapped"].k
  where = getattr(getattr(host, "sharding", None), "memory_kind", "numpy")
  where = "kept in RAM: CPU device memory" if where == "device" else where
  label = f"{tokens} tokens, {nbytes / 2**20:.0f} MiB"
  return [
      Row("swap", f"{label}: NumPy copy of the same bytes", gbs["numpy copy"], "GB/s"),
      Row("swap", f"{label}: swap_out ({where})", gbs["swap_out"], "GB/s"),
      Row("swap", f"{label}: swap_in", gbs["swap_in"], "GB/s"),
      Row("swap", "swap_out / NumPy copy", gbs["swap_out"] / gbs["numpy copy"], "x"),
      Row("swap", "swap_in / NumPy copy", gbs["swap_in"] / gbs["numpy copy"], "x"),
  ]


# ----------------------------------------------------------------------------- (b) workload

def bench_workload(quick: bool) -> list[Row]:
  rows, new_tokens = (8, 24) if quick else (16, 56)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, VOCAB, rng.integers(4, 9)).tolist() for _ in range(rows)]
  pages_all = sum(-(-(len(p) + new_tokens) // PAGE) for p in prompts)
  small = -(-pages_all // 3)
  toy_workload(pages_all, prompts[:2], 2)  # compile outside the timings
  start = time.perf_counter()
  reference, _ = toy_workload(pages_all, prompts, new_tokens)
  big_time = time.perf_counter() - start
  start = time.perf_counter()
  outputs, manager = toy_workload(small, prompts, new_tokens)
  small_time = time.perf_counter() - start
  stats = manager.stats()
  same = outputs == reference
  return [
      Row("swap-workload", f"{rows} sequences need {pages_all} pages; pool of {small}: "
          "outputs identical to the pool of all", float(same), "bool", "== 1", same),
      Row("swap-workload", "sequences swapped out", stats["swap_outs"], "count"),
      Row("swap-workload", "sequences swapped in", stats["swap_ins"], "count"),
      Row("swap-workload", "time, pool 1/3 vs pool of all", small_time / big_time, "x"),
      Row("swap-workload", "pages in use at the end (no leak)", stats["used_pages"], "pages",
          "== 0", stats["used_pages"] == 0),
  ]


def run(quick: bool = False) -> list[Row]:
  return bench_swap(quick) + bench_workload(quick)
