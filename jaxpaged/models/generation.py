"""Batched text generation on the paged cache: chunked prefill, then a jitted decode loop.

Prefill feeds the prompts in chunks of a fixed token budget (one compiled shape), rows
concatenated as `jaxpaged.extend` lays them out, so a long prompt spans several chunks and short
ones share a chunk. Decode runs ``steps_per_call`` steps per jitted call inside `lax.scan`;
a row that produced its end-of-sequence token becomes padding (its cache stops growing).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged.models.llama import DenseKVCache, LlamaConfig, forward


def sample(logits, key, *, temperature: float, top_p: float):
  """Next tokens from ``logits [B, vocab]``: greedy when temperature is 0, else temperature and
  nucleus (top-p) sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The smallest set whose probability reaches top_p (always at least the top token).
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "impl"), donate_argnames=("cache",))
def _prefill_step(params, cache, tokens, seq_ids, q_lens, *, config, impl):
  return forward(params, cache, tokens, seq_ids, q_lens, config=config, decode=False,
                 attention_impl=impl)


@functools.partial(jax.jit, static_argnames=("config", "steps", "temperature", "top_p", "impl"),
                   donate_argnames=("cache",))
def _decode_steps(params, cache, seq_ids, tokens, done, budget, eos_id, key, *, config, steps,
                  temperature, top_p, impl):
  """``steps`` decode steps. A row is done once it produced ``eos_id`` or spent its ``budget``
  of new tokens; done rows are padding. Returns each step's new tokens (-1 for done rows)."""
  def step(carry, _):
    cache, tokens, done, budget, key = carry
    key, subkey = jax.random.split(key)
    cache, logits, ok = forward(params, cache, tokens, jnp.where(done, -1, seq_ids),
                                jnp.ones_like(seq_ids), config=config, decode=True,
                                attention_impl=impl)
    new = jnp.where(done, -1, sample(logits, subkey, temperature=temperature, top_p=top_p))
    budget = budget - jnp.where(done, 0, 1)
    done = done | (new == eos_id) | (budget <= 0)
    return (cache, jnp.where(new >= 0, new, tokens), done, budget, key), (new, ok)

  (cache, tokens, done, budget, key), (new, oks) = jax.lax.scan(
      step, (cache, tokens, done, budget, key), None, length=steps)
  return cache, tokens, done, budget, key, new, jnp.all(oks)


@dataclasses.dataclass
class Generation:
  """What `generate` returns: each row's new tokens (end-of-sequence excluded) and figures."""
  tokens: list[list[int]]
  first_logits: np.ndarray  # [B, vocab] at each prompt's last token
  prefill_seconds: float
  decode_seconds: float
  decode_tokens: int
  peak_pages: int
  num_pages: int
  peak_sequences: int
  cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache

  @property
  def decode_tokens_per_second(self) -> float:
    return self.decode_tokens / max(self.decode_seconds, 1e-9)


def prefill(params, config: LlamaConfig, cache, seq_ids: list[int], prompts: list[list[int]], *,
            prefill_chunk: int = 256, impl: str = "auto", progress=None):
  """Admits new sequences and computes their prompts in chunks of ``prefill_chunk`` tokens.

  On a `jaxpaged.PagedKVCache`, `jaxpaged.match_prefix` first attaches each prompt's cached
  prefix (with prefix caching enabled), so only the rest is computed.

  Returns:
    ``(cache, first_logits [B, vocab], cached_tokens [B])``: logits at each prompt's last token.
  """
  batch = len(prompts)
  ids = jnp.asarray(seq_ids, jnp.int32)
  fed = [0] * batch
  if isinstance(cache, jp.PagedKVCache):
    width = max(map(len, prompts))
    padded = np.zeros((batch, width), np.int32)
    for row, prompt in enumerate(prompts):
      padded[row, :len(prompt)] = prompt
    cache, match = jp.match_prefix(cache, ids, jnp.asarray(padded),
                                   jnp.asarray([len(p) for p in prompts], jnp.int32),
                                   max_new_tokens=jnp.zeros(batch, jnp.int32), num_slots=batch)
    if not bool(match.ok):
      raise RuntimeError("the cache refused to admit the prompts (slots in use?)")
    fed = [int(n) for n in match.num_cached]
  cached = list(fed)
  first_logits = np.zeros((batch, config.vocab_size), np.float32)
  say = progress or (lambda message: None)
  while any(f < len(p) for f, p in zip(fed, prompts)):
    budget, chunk, q_lens = prefill_chunk, [], []
    for row, prompt in enumerate(prompts):  # fill the chunk with the next tokens, row by row
      take = min(len(prompt) - fed[row], budget)
      chunk += prompt[fed[row]:fed[row] + take]
      q_lens.append(take)
      budget -= take
    tokens = np.zeros(prefill_chunk, np.int32)
    tokens[:len(chunk)] = chunk
    cache, logits, ok = _prefill_step(params, cache, jnp.asarray(tokens), ids,
                                      jnp.asarray(q_lens, jnp.int32), config=config, impl=impl)
    if not bool(ok):
      raise RuntimeError("the cache refused a prefill chunk: it is too small for the prompts")
    logits = np.asarray(logits)
    for row, take in enumerate(q_lens):
      fed[row] += take
      if take and fed[row] == len(prompts[row]):
        first_logits[row] = logits[row]
    say(f"prefill: {sum(fed)}/{sum(map(len, prompts))} prompt tokens "
        f"({sum(cached)} from the prefix cache)")
  return cache, first_logits, np.asarray(cached)


def generate(params, config: LlamaConfig, prompts: list[list[int]], *, max_new_tokens: int,
             eos_id: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             page_size: int = 16, prefill_chunk: int = 256, steps_per_call: int = 8,
             cache_dtype=jnp.float32, impl: str = "auto", dense_cache: bool = False,
             prefix_caching: bool = False,
             progress: Callable[[str], None] | None = None) -> Generation:
  """Generates up to ``max_new_tokens`` tokens for every prompt, batched on one paged cache.

  Args:
    params: model weights (jnp arrays). prompts: token ids, one list per row (non-empty).
    eos_id: a row stops when it produces this token.
    temperature, top_p, seed: sampling (temperature 0 = greedy).
    page_size, prefill_chunk, steps_per_call: cache page size, prefill tokens per call (static
      shape) and decode steps per jitted call.
    dense_cache: run on `DenseKVCache` (contiguous per-sequence buffers) instead: the baseline.
    prefix_caching: rows whose prompts share full blocks compute them once (within one call the
      blocks of earlier rows are registered only as they are computed, so batch-mates share
      nothing; see `prefill` for admitting requests in waves).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise jp.JaxPagedError("every prompt needs at least one token.")
  batch = len(prompts)
  lengths = [len(p) + max_new_tokens for p in prompts]
  spec = dataclasses.replace(
      config.cache_spec(num_pages=sum(-(-n // page_size) for n in lengths), max_seqs=batch,
                        max_seq_len=max(lengths), page_size=page_size, dtype=cache_dtype),
      prefix_caching=prefix_caching)
  if dense_cache:
    cache = DenseKVCache.create(config, batch, spec.max_seq_len, cache_dtype)
    used_pages = lambda cache: 0
  else:
    cache = jp.init_cache(spec)
    used_pages = lambda cache: int(jp.num_used_pages(cache))
  seq_ids = jnp.arange(batch, dtype=jnp.int32)
  say = progress or (lambda message: None)

  start = time.perf_counter()
  cache, first_logits, cached = prefill(params, config, cache, list(range(batch)), prompts,
                                        prefill_chunk=prefill_chunk, impl=impl, progress=say)
  key = jax.random.key(seed)
  key, subkey = jax.random.split(key)
  tokens = sample(jnp.asarray(first_logits), subkey, temperature=temperature, top_p=top_p)
  prefill_seconds = time.perf_counter() - start

  # Decode: the first token is already chosen; each step feeds the last one.
  start = time.perf_counter()
  produced = [[int(t)] for t in np.asarray(tokens)]
  budget = jnp.full((batch,), max_new_tokens - 1, jnp.int32)
  done = (tokens == eos_id) | (budget <= 0)
  peak_pages = used_pages(cache)
  while not bool(jnp.all(done)):
    cache, tokens, done, budget, key, new, ok = _decode_steps(
        params, cache, seq_ids, tokens, done, budget, jnp.int32(eos_id), key, config=config,
        steps=steps_per_call, temperature=temperature, top_p=top_p, impl=impl)
    if not bool(ok):
      raise RuntimeError("the cache refused a decode step: jaxpaged sized it too small.")
    for row, column in enumerate(np.asarray(new).T):
      produced[row] += [int(t) for t in column if t >= 0]
    peak_pages = max(peak_pages, used_pages(cache))
    say(f"decode: {sum(map(len, produced))} tokens generated")
  decode_seconds = time.perf_counter() - start
  rows = [p[:p.index(eos_id)] if eos_id in p else p for p in produced]
  return Generation(rows, first_logits, prefill_seconds, decode_seconds,
                    sum(len(p) for p in produced) - batch, peak_pages, spec.num_pages, batch,
                    int(cached.sum()))
