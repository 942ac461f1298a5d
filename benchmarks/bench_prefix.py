"""Prefix-caching benchmarks (prefix-caching issue).

(a) Batched lookup of 64k block hashes on device against a Python dict keyed by SHA-256 digests
    of the same blocks (vLLM's default scheme: sha256 of the pickled (parent digest, tokens)),
    same run. Both the whole path (hash the token blocks, then look up) and the lookup alone.
(b) A shared system prompt on SmolLM2-135M: requests with a common prefix plus unique tokens
    each, the first admitted alone and the rest after it; prompt tokens computed and prefill
    wall time with and without prefix caching, same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from benchmarks.harness import Row, block, median_times_interleaved
from jaxpaged._src import hashing, table

PAGE = 16


def _sha256_chain(tokens):
  """vLLM's default: each block's digest covers its parent's digest and its token ids."""
  digests, parent = [], None
  for start in range(0, len(tokens), PAGE):
    parent = hashlib.sha256(pickle.dumps((parent, tuple(tokens[start:start + PAGE])))).digest()
    digests.append(parent)
  return digests


def bench_lookup(quick: bool) -> list[Row]:
  sequences, blocks_per_seq = (256, 64) if quick else (1024, 64)
  count = sequences * blocks_per_seq
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50_000, (sequences, blocks_per_seq * PAGE)).astype(np.int32)
  capacity = 1 << (2 * count - 1).bit_length()
  state = (jnp.zeros(capacity, jnp.int32), jnp.zeros(capacity, jnp.int32),
           jnp.full(capacity, table.EMPTY, jnp.int32))
  hash_all = jax.jit(lambda t: hashing.chain_block_hashes(
      jnp, t, jnp.zeros((t.shape[0], 2), jnp.uint32), PAGE))
  hashes = hash_all(jnp.asarray(tokens)).reshape(-1, 2)
  *state, inserted = jax.jit(table.insert)(*state, hashes, jnp.arange(count, dtype=jnp.int32),
                                           jnp.ones(count, bool))
  assert bool(jnp.all(inserted))
  device_tokens = jnp.asarray(tokens)

  @jax.jit
  def device_path(t):  # tokens -> hashes -> pages
    return table.lookup(*state, hash_all(t), impl="xla")

  lookup_only = jax.jit(lambda h: table.lookup(*state, h, impl="xla"))
  found = device_path(device_tokens).reshape(-1)
  np.testing.assert_array_equal(found, np.arange(count))

  digest_table = {}
  for seq in range(sequences):
    for i, digest in enumerate(_sha256_chain(tokens[seq].tolist())):
      digest_table[digest] = seq * blocks_per_seq + i
  lists = tokens.tolist()
  digests = [d for row in lists for d in _sha256_chain(row)]

  def python_path():
    return [digest_table.get(d) for row in lists for d in _sha256_chain(row)]

  assert python_path()[:5] == [0, 1, 2, 3, 4]
  times = median_times_interleaved({
      "device": lambda: block(device_path(device_tokens)),
      "device lookup": lambda: block(lookup_only(hashes)),
      "python": python_path,
      "python lookup": lambda: [digest_table.get(d) for d in digests],
  }, repeats=3 if quick else 5, warmup=1)
  return [
      Row("prefix-lookup", f"{count} blocks: device hash + lookup", times["device"] * 1e3, "ms"),
      Row("prefix-lookup", "Python sha256 + dict, same blocks", times["python"] * 1e3, "ms"),
      Row("prefix-lookup", "device / Python speed (hash + lookup)",
          times["python"] / times["device"], "x", ">= 10", times["python"] / times["device"] >= 10),
      Row("prefix-lookup", "device / Python speed (lookup of ready hashes alone)",
          times["python lookup"] / times["device lookup"], "x"),
  ]


def bench_shared_prompt(quick: bool) -> list[Row]:
  from jaxpaged.models import generation, gguf  # pylint: disable=g-import-not-at-top
  config, params, _ = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  requests, common, unique = (8, 256, 32) if quick else (32, 1024, 64)
  rng = np.random.default_rng(1)
  system = rng.integers(100, 40_000, common).tolist()
  prompts = [system + rng.integers(100, 40_000, unique).tolist() for _ in range(requests)]
  spec = config.cache_spec(num_pages=requests * -(-(common + unique) // PAGE) + 8,
                           max_seqs=requests, max_seq_len=common + unique)

  def run(prefix_caching):
    cache = jp.init_cache(dataclasses.replace(spec, prefix_caching=prefix_caching))
    start = time.perf_counter()
    cache, _, cached_first = generation.prefill(params, config, cache, [0], prompts[:1])
    cache, logits, cached_rest = generation.prefill(params, config, cache,
                                                    list(range(1, requests)), prompts[1:])
    block(logits)
    cached = int(cached_first.sum() + cached_rest.sum())
    return time.perf_counter() - start, sum(map(len, prompts)) - cached

  results = {}
  for caching in (False, True, False, True):  # the first of each compiles
    results[caching] = run(caching)
  (t_off, computed_off), (t_on, computed_on) = results[False], results[True]
  what = f"{requests} requests, {common}-token shared prefix + {unique} each"
  return [
      Row("shared-prompt", f"{what}: prompt tokens computed, no prefix cache", computed_off,
          "tokens"),
      Row("shared-prompt", "prompt tokens computed, prefix cache", computed_on, "tokens"),
      Row("shared-prompt", "prefill wall time, no prefix cache", t_off, "s"),
      Row("shared-prompt", "prefill wall time, prefix cache", t_on, "s"),
      Row("shared-prompt", "prefill speedup from the prefix cache", t_off / t_on, "x"),
  ]


def run(quick: bool = False) -> list[Row]:
  return bench_lookup(quick) + bench_shared_prompt(quick)
