"""Cache-core benchmarks (foundation issue).

(a) one decode step's extend + write_kv at 1x, 4x and 16x num_pages, same live tokens:
    the step must not cost more with a bigger pool (target: 16x / 1x <= 1.1);
(b) write_kv against a dense contiguous cache updated with dynamic_update_slice, same tokens;
(c) extend/release throughput in jit against a plain-Python host allocator doing the same
    bookkeeping (free list, page table, reference counts), same workload;
(d) what purity costs an eager caller: a decode step's extend + write_kv called eagerly (each
    call returns a new cache, so it copies the pools) against the same step jitted with the
    cache donated, on a SmolLM2-135M-sized pool.
(e) defragment and resize (issue 18) on a SmolLM2-135M-sized pool with every other sequence
    released: the donated defragment (only the pages above the line move) against a copy of the
    whole pool, and resize (grow, and shrink back) against the same copy.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from benchmarks.harness import Row, block, median_time, median_times_interleaved

PAGE_SIZE = 16


def _spec(num_pages, *, batch, max_len, layers=2, heads=4, head_dim=64, prefix_caching=False):
  return jp.CacheSpec(num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
                      page_size=PAGE_SIZE, num_pages=num_pages, max_seqs=batch,
                      max_pages_per_seq=max_len // PAGE_SIZE, prefix_caching=prefix_caching)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _decode_step(cache, seq_ids, k, v):
  # Token ids go along: with prefix caching, blocks that fill are hashed and registered.
  cache, slots, ok = jp.extend(cache, seq_ids, jnp.ones_like(seq_ids),
                               tokens=jnp.arange(seq_ids.shape[0], dtype=jnp.int32))
  for layer in range(cache.spec.num_layers):
    cache = jp.write_kv(cache, layer, k, v, slots)
  return cache, ok


def _prefilled(spec, batch, prompt_len):
  cache = jp.init_cache(spec)
  ids = jnp.arange(batch, dtype=jnp.int32)
  cache, _, ok = jp.extend(cache, ids, jnp.full((batch,), prompt_len, jnp.int32),
                           num_slots=batch * prompt_len)
  assert bool(ok)
  return cache, ids


def bench_pool_scaling(quick, prefix_caching=False):
  """(a): the step's cost at 1x/4x/16x pool size, live tokens fixed."""
  batch, prompt_len, steps = 16, 512, (40 if quick else 150)
  label = "pool-scaling" + (" (prefix caching)" if prefix_caching else "")
  live_pages = batch * (prompt_len + steps) // PAGE_SIZE + batch
  key = jax.random.key(0)
  k = jax.random.normal(key, (batch, 4, 64))
  states, fns = {}, {}
  for scale in (1, 4, 16):
    spec = _spec(live_pages * scale, batch=batch, max_len=prompt_len + 4 * steps + 64,
                 prefix_caching=prefix_caching)
    states[scale] = _prefilled(spec, batch, prompt_len)

    def step(scale=scale):
      cache, ids = states[scale]
      cache, ok = _decode_step(cache, ids, k, k)
      block(ok)
      states[scale] = (cache, ids)

    fns[scale] = step
  times = median_times_interleaved(fns, repeats=steps)
  rows = [Row(label, f"decode step, {s}x pool ({states[s][0].spec.num_pages} pages)",
              times[s] * 1e6, "us") for s in (1, 4, 16)]
  for scale in (4, 16):
    ratio = times[scale] / times[1]
    rows.append(Row(label, f"{scale}x / 1x pool step time", ratio, "x",
                    "<= 1.1" if scale == 16 else "", ratio <= 1.1 if scale == 16 else None))
  return rows


def bench_write_vs_dense(quick):
  """(b): write_kv into pages vs a dense [2, L, B, Hkv, S, D] cache with dynamic_update_slice,
  for a decode step (1 token a row) and a prefill chunk (512 tokens a row)."""
  rows = []
  for batch, new_tokens in ((16, 1), (4, 512)):
    rows += _write_vs_dense(batch, new_tokens, quick)
  return rows


def _write_vs_dense(batch, new_tokens, quick):
  max_len, layers, heads, head_dim, start = 2048, 2, 4, 64, 1000
  spec = _spec(batch * max_len // PAGE_SIZE, batch=batch, max_len=max_len, layers=layers)
  cache, ids = _prefilled(spec, batch, start)
  cache, slots, _ = jp.extend(cache, ids, jnp.full_like(ids, new_tokens),
                              num_slots=batch * new_tokens)
  k = jax.random.normal(jax.random.key(1), (batch, new_tokens, heads, head_dim))
  dense = jnp.zeros((2, layers, batch, heads, max_len, head_dim))  # K and V

  @functools.partial(jax.jit, donate_argnames=("cache",))
  def paged_write(cache, k, slots):
    k = k.reshape(-1, heads, head_dim)
    for layer in range(layers):
      cache = jp.write_kv(cache, layer, k, k, slots)
    return cache

  @functools.partial(jax.jit, donate_argnames=("dense",))
  def dense_write(dense, k, position):
    # The dense cache at its best: every row writes at the same position (left-padded batch),
    # so each layer's K and V are one in-place dynamic_update_slice.
    update = jnp.broadcast_to(jnp.swapaxes(k, 1, 2)[None, None],
                              (2, 1, batch, heads, new_tokens, head_dim))
    for layer in range(layers):
      dense = jax.lax.dynamic_update_slice(dense, update, (0, layer, 0, 0, position, 0))
    return dense

  state = {"paged": cache, "dense": dense}

  def run_paged():
    state["paged"] = block(paged_write(state["paged"], k, slots))

  def run_dense():
    state["dense"] = block(dense_write(state["dense"], k, jnp.int32(start)))

  repeats = 30 if quick else 200
  times = median_times_interleaved({"paged": run_paged, "dense": run_dense}, repeats=repeats)
  what = f"{batch}x{new_tokens} tokens x {layers} layers"
  return [
      Row("write-vs-dense", f"paged write_kv, {what}", times["paged"] * 1e6, "us"),
      Row("write-vs-dense", f"dense dynamic_update_slice, {what}", times["dense"] * 1e6, "us"),
      Row("write-vs-dense", f"paged / dense write time, {what}",
          times["paged"] / times["dense"], "x"),
  ]


class HostAllocator:
  """The baseline: the same bookkeeping as jaxpaged's allocator, in plain Python on the host."""

  def __init__(self, num_pages, max_seqs, max_pages_per_seq, page_size):
    self.page_size = page_size
    self.max_pages = max_pages_per_seq
    self.free = list(range(num_pages - 1, -1, -1))
    self.ref_counts = [0] * num_pages
    self.page_table = [[] for _ in range(max_seqs)]
    self.seq_lens = [0] * max_seqs

  def extend(self, seq_ids, counts):
    """Atomic like jaxpaged.extend: returns the slots, or None (and changes nothing)."""
    ps = self.page_size
    need = sum(-(-(self.seq_lens[s] + n) // ps) - -(-self.seq_lens[s] // ps)
               for s, n in zip(seq_ids, counts))
    if need > len(self.free):
      return None
    slots = []
    for s, n in zip(seq_ids, counts):
      table, length = self.page_table[s], self.seq_lens[s]
      if -(-(length + n) // ps) > self.max_pages:
        return None
      for pos in range(length, length + n):
        if pos % ps == 0:
          page = self.free.pop()
          self.ref_counts[page] += 1
          table.append(page)
        slots.append(table[pos // ps] * ps + pos % ps)
      self.seq_lens[s] = length + n
    return slots

  def release(self, seq_ids):
    for s in seq_ids:
      for page in self.page_table[s]:
        self.ref_counts[page] -= 1
        if self.ref_counts[page] == 0:
          self.free.append(page)
      self.page_table[s], self.seq_lens[s] = [], 0


def bench_allocator_throughput(quick):
  """(c): a serving-like cycle (prefill a batch, decode it, release it) in jit vs in Python."""
  batch, prompt, decode_steps = 64, 100, (64 if quick else 256)
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=PAGE_SIZE,
                      num_pages=batch * (prompt + decode_steps) // PAGE_SIZE + 2 * batch,
                      max_seqs=batch, max_pages_per_seq=(prompt + decode_steps) // PAGE_SIZE + 2)
  ids = jnp.arange(batch, dtype=jnp.int32)
  prompt_lens = jnp.asarray(np.random.default_rng(0).integers(1, prompt + 1, batch), jnp.int32)

  @functools.partial(jax.jit, donate_argnames=("cache",))
  def jit_cycle(cache):
    cache, _, ok = jp.extend(cache, ids, prompt_lens, num_slots=batch * prompt)

    def decode(cache, _):
      cache, slots, ok = jp.extend(cache, ids, jnp.ones_like(ids))
      return cache, ok

    cache, oks = jax.lax.scan(decode, cache, None, length=decode_steps)
    return jp.release(cache, ids), ok & jnp.all(oks)

  state = {"cache": jp.init_cache(spec)}

  def run_jit():
    state["cache"], ok = jit_cycle(state["cache"])
    assert bool(ok)

  host_ids, host_prompts = list(range(batch)), np.asarray(prompt_lens).tolist()

  def run_host():
    alloc = HostAllocator(spec.num_pages, batch, spec.max_pages_per_seq, PAGE_SIZE)
    assert alloc.extend(host_ids, host_prompts) is not None
    for _ in range(decode_steps):
      assert alloc.extend(host_ids, [1] * batch) is not None
    alloc.release(host_ids)

  repeats = 5 if quick else 15
  times = median_times_interleaved({"jit": run_jit, "host": run_host}, repeats=repeats)
  calls = decode_steps + 2  # extends and the release
  return [
      Row("allocator", f"jit: {calls} extend/release calls of {batch} rows (in a scan)",
          calls / times["jit"], "calls/s"),
      Row("allocator", "plain-Python host allocator, same calls", calls / times["host"], "calls/s"),
      Row("allocator", "jit / host throughput", times["host"] / times["jit"], "x"),
  ]


def bench_eager_cost(quick):
  """(d): eager pure calls copy the pools; a jitted step that donates the cache does not."""
  batch, layers = 8, 30
  spec = jp.CacheSpec(num_layers=layers, num_kv_heads=3, head_dim=64, page_size=PAGE_SIZE,
                      num_pages=160, max_seqs=batch, max_pages_per_seq=16)
  cache, ids = _prefilled(spec, batch, 100)
  k = jax.random.normal(jax.random.key(2), (batch, 3, 64))
  ones = jnp.ones_like(ids)

  def eager(cache):
    cache, slots, _ = jp.extend(cache, ids, ones)
    for layer in range(layers):
      cache = jp.write_kv(cache, layer, k, k, slots)
    return cache

  jitted = jax.jit(eager, donate_argnames=("cache",))
  state = {"eager": cache, "jitted": jax.tree.map(jnp.copy, cache)}

  def run(name, fn):  # at most 52 steps: 152 tokens of the 256 a sequence holds
    def step():
      state[name] = block(fn(state[name]))
    return step

  times = median_times_interleaved({"eager": run("eager", eager), "jitted": run("jitted", jitted)},
                                   repeats=10 if quick else 40)
  pool_mb = 2 * np.prod(spec.pages_shape) * 4 / 2**20
  what = f"extend + {layers} write_kv, {batch} rows, pool {pool_mb:.0f} MiB"
  return [
      Row("eager-cost", f"eager calls (each copies the pools): {what}", times["eager"] * 1e3, "ms"),
      Row("eager-cost", f"one jitted step, cache donated: {what}", times["jitted"] * 1e3, "ms"),
      Row("eager-cost", "eager / jitted-donated step time", times["eager"] / times["jitted"], "x"),
  ]


def bench_defragment(quick):
  """(e): defragment (donated: pages move in place) and resize, against a whole-pool copy."""
  layers, batch, tokens = 30, 24, 320
  num_pages = batch * tokens // PAGE_SIZE + 32
  spec = jp.CacheSpec(num_layers=layers, num_kv_heads=3, head_dim=64, page_size=PAGE_SIZE,
                      num_pages=num_pages, max_seqs=batch, max_pages_per_seq=tokens // PAGE_SIZE)
  full, _ = _prefilled(spec, batch, tokens)
  fragmented = block(jp.release(full, jnp.arange(0, batch, 2, dtype=jnp.int32)))
  from jaxpaged._src import defrag  # pylint: disable=g-import-not-at-top
  moves = int(defrag.moves(fragmented)[2])
  donated = jax.jit(lambda c: jp.defragment(c), donate_argnums=0)
  copy_pools = jax.jit(lambda c: (c.k_pages + 0, c.v_pages + 0))
  repeats = 5 if quick else 15
  times = {"defragment (donated)": [], "copy of the whole pool": [], "resize: grow 1.5x": [],
           "resize: shrink to the live pages": []}
  live = num_pages - int(fragmented.num_free)
  packed = block(jp.defragment(fragmented))
  fns = {"defragment (donated)": lambda c: donated(c),
         "copy of the whole pool": lambda c: copy_pools(c),
         "resize: grow 1.5x": lambda c: jp.resize(c, num_pages * 3 // 2),
         "resize: shrink to the live pages": lambda c: jp.resize(c, live)}
  inputs = {"defragment (donated)": lambda: jax.tree.map(jnp.copy, fragmented),
            "copy of the whole pool": lambda: fragmented, "resize: grow 1.5x": lambda: packed,
            "resize: shrink to the live pages": lambda: packed}
  for _ in range(2):  # compile
    for name, fn in fns.items():
      block(fn(block(inputs[name]())))
  for _ in range(repeats):  # interleaved; a fresh fragmented copy per donated defragment
    for name, fn in fns.items():
      arg = block(inputs[name]())
      start = time.perf_counter()
      block(fn(arg))
      times[name].append(time.perf_counter() - start)
  ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
  pool_mb = 2 * np.prod(spec.pages_shape) * 4 / 2**20
  page_mb = pool_mb / num_pages
  what = f"pool {pool_mb:.0f} MiB, {num_pages} pages, {live} live, {moves} moved"
  base = ms["copy of the whole pool"]
  rows = [Row("defragment", f"{name}: {what}", t, "ms") for name, t in ms.items()]
  return rows + [
      Row("defragment", "defragment / whole-pool copy", ms["defragment (donated)"] / base, "x"),
      Row("defragment", "defragment: GB/s of pages moved (read + write)",
          2 * moves * page_mb / 1024 / (ms["defragment (donated)"] / 1e3), "GB/s"),
      Row("defragment", "resize grow / whole-pool copy", ms["resize: grow 1.5x"] / base, "x"),
      Row("defragment", "resize shrink / whole-pool copy",
          ms["resize: shrink to the live pages"] / base, "x"),
  ]


def run(quick: bool = False) -> list[Row]:
  return (bench_pool_scaling(quick) + bench_pool_scaling(quick, prefix_caching=True)
          + bench_write_vs_dense(quick) + bench_allocator_throughput(quick)
          + bench_eager_cost(quick) + bench_defragment(quick))
