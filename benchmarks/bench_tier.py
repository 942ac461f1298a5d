"""Host RAM tier benchmarks (host-tier issue).

(a) Swap-out and swap-in GB/s of K/V bytes against a plain NumPy copy of the same bytes, same run.
(b) A decode workload whose sequences need 3x the device pool completes through swapping
    (`CacheManager`), with every output token identical to a run whose pool holds everything.
    The model is a small deterministic attention model (`toy_workload`): any K/V lost or
    misplaced by a swap changes its tokens.
"""

from __future__ import annotations

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from benchmarks.harness import Row, block

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

VOCAB, LAYERS, HEADS, DIM, PAGE = 64, 2, 2, 16, 4


@functools.lru_cache(maxsize=None)
def _toy_params():
  rng = np.random.default_rng(42)  # NumPy constants: safe to create while tracing
  return (rng.normal(size=(VOCAB, LAYERS, 3, HEADS, DIM)).astype(np.float32),
          rng.normal(size=(HEADS * DIM, VOCAB)).astype(np.float32))


@functools.partial(jax.jit, donate_argnames=("cache",))
def _toy_step(cache, seq_ids, tokens, slots):
  """One decode step of every row: write the token's K/V, attend over the sequence, pick the
  next token greedily. ``[B]`` everything; rows with seq_id -1 are padding."""
  embed, unembed = (jnp.asarray(p) for p in _toy_params())
  x = embed[tokens]  # [B, LAYERS, 3, HEADS, DIM]
  total = jnp.zeros((tokens.shape[0], HEADS, DIM), jnp.float32)
  for layer in range(LAYERS):
    cache = jp.write_kv(cache, layer, x[:, layer, 1], x[:, layer, 2], slots)
    total += jp.paged_attention(x[:, layer, 0], cache, layer, seq_ids)
  return cache, jnp.argmax(total.reshape(tokens.shape[0], -1) @ unembed, axis=-1)


def toy_workload(num_pages: int, prompts, new_tokens: int, *, host_bytes: int = 1 << 30):
  """Runs every prompt to ``new_tokens`` generated tokens, as many at once as the device pool
  allows, first come first served; a running sequence that cannot grow preempts the latest
  admitted one, which is swapped out to host RAM and swapped back in when room returns.

  Returns ``(outputs: list of token lists, manager)``.
  """
  rows = len(prompts)
  max_len = max(len(p) for p in prompts) + new_tokens
  spec = jp.CacheSpec(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, page_size=PAGE,
                      num_pages=num_pages, max_seqs=rows, max_pages_per_seq=-(-max_len // PAGE))
  manager = jp.CacheManager(spec, host_bytes=host_bytes)
  seq_of, length, outputs = {}, [0] * rows, [[] for _ in prompts]
  queue, running = collections.deque(range(rows)), []
  fits = lambda pages: pages + len(running) <= manager.stats()["free_pages"]  # +1 page headroom

  while queue or running:
    admitted = {}
    while queue:
      r = queue[0]
      if r in seq_of and seq_of[r] in manager.swapped:
        if not fits(-(-length[r] // PAGE) + 1) or not manager.swap_in([seq_of[r]])[0]:
          break
      else:
        if not fits(1) or (admission := manager.admit(prompts[r][:1])) is None:
          break
        seq_of[r] = admission.seq_id
        admitted[r] = int(admission.slots[0])
      running.append(queue.popleft())
    # Growing rows that start a page need one each; preempt the latest admitted until they fit.
    while sum(length[r] % PAGE == 0 for r in running if r not in admitted) > \
        manager.stats()["free_pages"]:
      victim = running.pop()
      manager.swap_out([seq_of[victim]])
      admitted.pop(victim, None)
      queue.appendleft(victim)
    ids = [seq_of[r] if r in running and r not in admitted else -1 for r in range(rows)]
    slots, ok, _ = manager.extend(ids, [1] * rows)
    assert bool(ok)
    slots = np.asarray(slots).copy()
    for r, slot in admitted.items():
      slots[r] = slot
    live = [seq_of[r] if r in running else -1 for r in range(rows)]
    inputs = [(prompts[r][length[r]] if length[r] < len(prompts[r]) else outputs[r][-1])
              if r in running else 0 for r in range(rows)]
    manager.cache, next_tokens = _toy_step(manager.cache, jnp.asarray(live, jnp.int32),
                                           jnp.asarray(inputs, jnp.int32), jnp.asarray(slots))
    next_tokens = np.asarray(next_tokens)
    for r in list(running):
      length[r] += 1
      if length[r] >= len(prompts[r]):
        outputs[r].append(int(next_tokens[r]))
      if len(outputs[r]) == new_tokens:
        manager.release([seq_of[r]])
        running.remove(r)
  return outputs, manager


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
