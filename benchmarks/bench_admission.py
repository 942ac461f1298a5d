"""Admission cost (architecture issue): `CacheManager.admit` of a 64-token prompt, four cases —
a cold prompt, a prompt whose blocks are cached on device, one whose blocks are on host RAM
(promoted back), and one that must first demote cached blocks to make room. Per case: the
median host wall time of an admission (then released, so every repeat admits the same way),
and the number of programs it runs, counted as XLA compilations after clearing JAX's caches.
Runs on any jaxpaged build with `CacheManager` (for before/after figures).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

import jaxpaged as jp
from benchmarks.harness import Row

_COMPILE = "/jax/core/compile/backend_compile_duration"
PAGE, PROMPT = 16, 64


def _spec(num_pages: int):
  return jp.CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, page_size=PAGE,
                      num_pages=num_pages, max_seqs=8, max_pages_per_seq=8, prefix_caching=True)


def _fill(manager, tokens):
  """Admits, writes every layer's K/V, releases: the full blocks stay cached."""
  admission = manager.admit(tokens)
  n = admission.num_new
  kv = jnp.ones((n, 2, 64), jnp.float32)
  for layer in range(4):
    manager.cache = jp.write_kv(manager.cache, layer, kv, kv, admission.slots[:n])
  manager.release([admission.seq_id])


def _case(name: str):
  """``(manager, prompt)`` set up so that admitting ``prompt`` is the case ``name``."""
  prompt = list(range(1, PROMPT + 1))
  if name == "demotes first":
    manager = jp.CacheManager(_spec(num_pages=5), host_bytes=1 << 28)
    _fill(manager, [t + 1000 for t in prompt])  # 4 cached pages of another prompt
    return manager, prompt
  manager = jp.CacheManager(_spec(num_pages=64), host_bytes=1 << 28)
  if name != "cold":
    _fill(manager, prompt)
  if name == "host hits":
    manager.gc()
  return manager, prompt


def _programs(name: str) -> int:
  manager, prompt = _case(name)
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    count[0] += event == _COMPILE

  jax.clear_caches()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    manager.admit(prompt)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return count[0]


def _seconds(name: str, repeats: int) -> float:
  times = []
  for _ in range(repeats + 2):
    manager, prompt = _case(name)
    manager.admit(prompt)  # compiled once per process; the case repeats exactly
    manager, prompt = _case(name)
    start = time.perf_counter()
    admission = manager.admit(prompt)
    jax.block_until_ready(admission.slots)
    times.append(time.perf_counter() - start)
  return statistics.median(times[2:])


def run(quick: bool = False) -> list[Row]:
  rows = []
  for name in ("cold", "device hits", "host hits", "demotes first"):
    rows.append(Row("admission", f"{name}: programs per admission", _programs(name), "programs"))
    rows.append(Row("admission", f"{name}: admit", _seconds(name, 3 if quick else 9) * 1e3,
                    "ms"))
  return rows
