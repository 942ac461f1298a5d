"""Workloads shared by the tests and the benchmarks (`benchmarks/bench_tier.py` imports this
module; a test never imports from benchmarks/).

`toy_workload`: a decode workload on a small deterministic attention model, run through a
`jaxpaged.CacheManager` whose pool may be too small for it: any K/V lost or misplaced by a swap
changes the tokens it produces.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp

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
