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
from jaxpaged._src import checks
from jaxpaged._src.gpu import IMPLS
from jaxpaged._src.spec import SUPPORTED_DTYPES, next_pow2
from jaxpaged.models import llama
from jaxpaged.models.llama import DenseKVCache, LlamaConfig, forward, param_shapes

_INT64 = 1 << 63
_NO_EOS = -1  # eos_id=None: no produced token (all >= 0) equals it, so no row stops early

# ----------------------------------------------------------------------------- argument checks
# Shared with `jaxpaged.models.serving`. Every check raises `jaxpaged.JaxPagedError` naming the
# argument, what was expected, what was given and the fix.


def _check_sampling(temperature, top_p) -> tuple[float, float]:
  temperature, top_p = checks.real("temperature", temperature), checks.real("top_p", top_p)
  if not (np.isfinite(temperature) and temperature >= 0):
    raise jp.JaxPagedError(f"temperature must be a finite number >= 0, got {temperature}; use 0 "
                           "for greedy decoding, or e.g. 0.7 to sample.")
  if not 0 < top_p <= 1:
    raise jp.JaxPagedError(f"top_p must be in (0, 1], got {top_p}; use 1 to sample from the whole "
                           "distribution, or e.g. 0.9 for nucleus sampling.")
  return temperature, top_p


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple, np.ndarray)):
    raise jp.JaxPagedError(f"prompts must be a list of prompts (each a list of int token ids), "
                           f"got {type(prompts).__name__}.")
  if len(prompts) == 0:
    raise jp.JaxPagedError("prompts is empty; pass at least one prompt (a list of token ids).")
  return [llama.check_tokens(f"prompts[{row}]", p, vocab_size) for row, p in enumerate(prompts)]


def _check_cache(cache, config: LlamaConfig) -> int:
  """``cache``'s number of sequence slots, if it is a cache for ``config``'s K/V."""
  if isinstance(cache, jp.PagedKVCache):
    spec = cache.spec
    shape, slots = (spec.num_layers, spec.num_kv_heads, spec.head_dim), spec.max_seqs
  elif isinstance(cache, DenseKVCache):
    layers, slots, _, kv_heads, head_dim = cache.k.shape
    shape = (layers, kv_heads, head_dim)
  else:
    raise jp.JaxPagedError(f"cache must be a jaxpaged.PagedKVCache (config.cache_spec, "
                           f"jaxpaged.init_cache) or a DenseKVCache, got {type(cache).__name__}.")
  want = (config.num_layers, config.num_kv_heads, config.head_dim)
  if shape != want:
    raise jp.JaxPagedError(f"cache holds (layers, KV heads, head size) {shape} but the model has "
                           f"{want}; make it with config.cache_spec(...) of this config.")
  return slots


def _chunk(prefill_chunk, prompts) -> int:
  """The prefill chunk (a static shape): at most the prompts' tokens, rounded up to a power of
  two (so a huge chunk allocates nothing, and few shapes compile)."""
  prefill_chunk = checks.integer("prefill_chunk", prefill_chunk, minimum=1,
                                 below=checks.INT32_MAX,
                                 fix="pass the prompt tokens computed per call, e.g. 256")
  return min(prefill_chunk, next_pow2(sum(map(len, prompts))))


def sample(logits, key, *, temperature: float, top_p: float):
  """Next tokens from ``logits [B, vocab]``: greedy when temperature is 0, else temperature and
  nucleus (top-p) sampling."""
  temperature, top_p = _check_sampling(temperature, top_p)
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


# The generation loop owns its cache: its steps donate it (updated in place, no pool copy).
_attach_prefixes = jax.jit(jp.match_prefix, static_argnames=("num_slots", "impl", "interpret"),
                           donate_argnames=("cache",))


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
  """What `generate` returns: each row's new tokens (end-of-sequence excluded; none with
  ``max_new_tokens=0``) and figures."""
  tokens: list[list[int]]
  first_logits: np.ndarray  # [B, vocab] at each prompt's last token
  prefill_seconds: float
  decode_seconds: float
  decode_tokens: int  # tokens sampled by decode steps (each row's first comes from prefill)
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

  Args:
    seq_ids: a sequence slot of ``cache`` for each prompt (distinct ints): a free one on a
      `jaxpaged.PagedKVCache`; a `DenseKVCache` appends to what the slot holds.
    prompts: token ids, one non-empty sequence per row, each id in ``[0, config.vocab_size)``.

  Returns:
    ``(cache, first_logits [B, vocab], cached_tokens [B])``: logits at each prompt's last token.

  Raises:
    JaxPagedError: for a bad argument, or prompts ``cache`` cannot hold (a slot in use, too few
      pages, a prompt longer than a sequence holds); checked before the cache is touched, so
      the cache passed in is still valid (it is donated only once the call goes ahead).
  """
  config = llama.check_config(config)
  llama.check_params(params, config)
  prompts = _check_prompts(prompts, config.vocab_size)
  slots = _check_cache(cache, config)
  prefill_chunk = _chunk(prefill_chunk, prompts)
  if impl not in IMPLS:
    raise jp.JaxPagedError(f"impl must be one of {IMPLS}, got {impl!r}.")
  if progress is not None and not callable(progress):
    raise jp.JaxPagedError(f"progress must be a callable taking a str, or None, got "
                           f"{type(progress).__name__}.")
  if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, (list, tuple, np.ndarray)):
    raise jp.JaxPagedError(f"seq_ids must be a list of ints (a sequence slot per prompt), got "
                           f"{type(seq_ids).__name__}.")
  seq_ids = [checks.integer(f"seq_ids[{row}]", s, minimum=0, below=slots,
                            fix="pass a sequence slot of the cache")
             for row, s in enumerate(seq_ids)]
  if len(seq_ids) != len(prompts):
    raise jp.JaxPagedError(f"seq_ids has {len(seq_ids)} entries for {len(prompts)} prompts; pass "
                           "one sequence slot per prompt.")
  if len(set(seq_ids)) != len(seq_ids):
    raise jp.JaxPagedError(f"seq_ids must be distinct (one sequence per prompt), got {seq_ids}.")
  # Everything the cache could refuse is checked here, before the cache (donated from here on)
  # is touched: a refused call raises with the caller's cache intact.
  paged = isinstance(cache, jp.PagedKVCache)
  held = [int(n) for n in np.asarray(cache.seq_lens)[seq_ids]]
  if paged:
    capacity, what = cache.spec.max_seq_len, "max_pages_per_seq * page_size"
    for row, n in enumerate(held):
      if n:
        raise jp.JaxPagedError(
            f"seq_ids[{row}] = {seq_ids[row]} is a sequence that holds {n} tokens; prefill "
            "starts new sequences on a PagedKVCache: pass a free slot, or release it first.")
  else:
    capacity, what = cache.k.shape[2], "the DenseKVCache's max_seq_len"
  for row, (prompt, n) in enumerate(zip(prompts, held)):
    if n + len(prompt) > capacity:
      raise jp.JaxPagedError(
          f"prompts[{row}] has {len(prompt)} tokens but sequence {seq_ids[row]} of the cache can "
          f"take {capacity - n} more ({capacity}, {what}, minus {n} held); build the cache for "
          "longer sequences or shorten the prompt.")
  batch = len(prompts)
  # A chunk fills at most every row to its capacity (the cache refuses wider calls).
  prefill_chunk = min(prefill_chunk, batch * capacity)
  ids = jnp.asarray(seq_ids, jnp.int32)
  fed = [0] * batch
  if paged:
    width = max(map(len, prompts))
    padded = np.zeros((batch, width), np.int32)
    for row, prompt in enumerate(prompts):
      padded[row, :len(prompt)] = prompt
    padded, lengths = jnp.asarray(padded), jnp.asarray([len(p) for p in prompts], jnp.int32)
    ps = cache.spec.page_size
    room = int(jp.num_free_pages(cache)) + int(jp.num_cached_free_pages(cache))
    if sum(-(-len(p) // ps) for p in prompts) > room:  # prefix hits may still make it fit
      try:  # (eager, no donation) the whole prompts, as the chunks will append them
        jp.check_match_prefix(cache, ids, padded, lengths)
      except jp.JaxPagedError as e:
        raise jp.JaxPagedError(
            f"the cache cannot hold the prompts ({sum(map(len, prompts))} tokens; {room} pages "
            f"of {ps} tokens free or reclaimable): {e}") from e
    cache, match = _attach_prefixes(cache, ids, padded, lengths,
                                    max_new_tokens=jnp.zeros(batch, jnp.int32), num_slots=batch)
    if not bool(match.ok):
      raise RuntimeError("jaxpaged bug: match_prefix refused prompts that prefill checked; "
                         "please report it.")
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
      raise RuntimeError("jaxpaged bug: the cache refused a prefill chunk that prefill checked "
                         "would fit; please report it.")
    logits = np.asarray(logits)
    for row, take in enumerate(q_lens):
      fed[row] += take
      if take and fed[row] == len(prompts[row]):
        first_logits[row] = logits[row]
    say(f"prefill: {sum(fed)}/{sum(map(len, prompts))} prompt tokens "
        f"({sum(cached)} from the prefix cache)")
  return cache, first_logits, np.asarray(cached)


def generate(params, config: LlamaConfig, prompts: list[list[int]], *, max_new_tokens: int,
             eos_id: int | None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             page_size: int = 16, prefill_chunk: int = 256, steps_per_call: int = 8,
             cache_dtype=jnp.float32, impl: str = "auto", dense_cache: bool = False,
             prefix_caching: bool = False,
             progress: Callable[[str], None] | None = None) -> Generation:
  """Generates up to ``max_new_tokens`` tokens for every prompt, batched on one paged cache.

  Args:
    params: model weights (jnp arrays), shaped as ``config`` implies.
    prompts: token ids, one non-empty sequence of ints per row (NumPy ints and int arrays too),
      each id in ``[0, config.vocab_size)``.
    max_new_tokens: an int >= 0; 0 only prefills: every row gets no new token, and
      ``first_logits`` (the logits at each prompt's last token) are still computed.
    eos_id: a row stops when it produces this token (an id in the vocabulary); None: rows never
      stop early, every row gets exactly ``max_new_tokens`` (fixed-length runs, benchmarks).
    temperature, top_p, seed: sampling: temperature >= 0 (0 = greedy), top_p in (0, 1], seed an
      int.
    page_size, prefill_chunk, steps_per_call: cache page size, prefill tokens per call (static
      shape) and decode steps per jitted call; each an int >= 1.
    dense_cache: run on `DenseKVCache` (contiguous per-sequence buffers) instead: the baseline.
    prefix_caching: rows whose prompts share full blocks compute them once (within one call the
      blocks of earlier rows are registered only as they are computed, so batch-mates share
      nothing; see `prefill` for admitting requests in waves). Paged cache only.

  Raises:
    JaxPagedError: for a bad argument, before anything runs.
  """
  config = llama.check_config(config)
  llama.check_params(params, config)
  prompts = _check_prompts(prompts, config.vocab_size)
  max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, minimum=0,
                                  fix="pass how many tokens to generate per prompt (0: prefill "
                                  "only)")
  if eos_id is None:
    eos_id = _NO_EOS
  else:
    eos_id = checks.integer("eos_id", eos_id, minimum=0, below=config.vocab_size,
                            fix="pass the tokenizer's end-of-sequence id (tokenizer.eos_token_id), "
                            "or None to never stop early")
  temperature, top_p = _check_sampling(temperature, top_p)
  seed = checks.integer("seed", seed, minimum=-_INT64, below=_INT64)
  page_size = checks.integer("page_size", page_size, minimum=1,
                             fix="pass the tokens per cache page, e.g. 16")
  prefill_chunk = _chunk(prefill_chunk, prompts)
  # Steps past the token budget would only run padding rows: no more than it (a static shape).
  steps_per_call = min(checks.integer("steps_per_call", steps_per_call, minimum=1,
                                      below=checks.INT32_MAX,
                                      fix="pass the decode steps per jitted call, e.g. 8"),
                       max(max_new_tokens, 1))
  dense_cache = checks.flag("dense_cache", dense_cache)
  prefix_caching = checks.flag("prefix_caching", prefix_caching)
  if dense_cache and prefix_caching:
    raise jp.JaxPagedError("prefix_caching=True needs the paged cache; pass dense_cache=False "
                           "(the dense baseline caches no prefix).")
  try:
    dtype_ok = jnp.dtype(cache_dtype) in SUPPORTED_DTYPES
  except TypeError:
    dtype_ok = False
  if not dtype_ok:
    raise jp.JaxPagedError(f"cache_dtype must be one of float32, bfloat16, float16, got "
                           f"{cache_dtype!r}; e.g. jnp.float32.")
  if impl not in IMPLS:
    raise jp.JaxPagedError(f"impl must be one of {IMPLS}, got {impl!r}.")
  if progress is not None and not callable(progress):
    raise jp.JaxPagedError(f"progress must be a callable taking a str, or None, got "
                           f"{type(progress).__name__}.")
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
  try:
    cache, first_logits, cached = prefill(params, config, cache, list(range(batch)), prompts,
                                          prefill_chunk=prefill_chunk, impl=impl, progress=say)
  except jp.JaxPagedError as e:  # the arguments were checked: the cache was sized wrong
    raise RuntimeError(f"jaxpaged bug: generate sized its cache too small ({e}); please report "
                       "it.") from e
  produced = [[] for _ in prompts]  # each row's new tokens, end-of-sequence included
  key = jax.random.key(seed)
  if max_new_tokens:
    key, subkey = jax.random.split(key)
    tokens = sample(jnp.asarray(first_logits), subkey, temperature=temperature, top_p=top_p)
    produced = [[int(t)] for t in np.asarray(tokens)]
  prefill_seconds = time.perf_counter() - start

  # Decode: the first token is already chosen; each step feeds the last one.
  start = time.perf_counter()
  peak_pages = used_pages(cache)
  if max_new_tokens:
    budget = jnp.full((batch,), max_new_tokens - 1, jnp.int32)
    done = (tokens == eos_id) | (budget <= 0)
    while not bool(jnp.all(done)):
      cache, tokens, done, budget, key, new, ok = _decode_steps(
          params, cache, seq_ids, tokens, done, budget, jnp.int32(eos_id), key, config=config,
          steps=steps_per_call, temperature=temperature, top_p=top_p, impl=impl)
      if not bool(ok):
        raise RuntimeError("jaxpaged bug: the cache refused a decode step (generate sized it too "
                           "small); please report it.")
      for row, column in enumerate(np.asarray(new).T):
        produced[row] += [int(t) for t in column if t >= 0]
      peak_pages = max(peak_pages, used_pages(cache))
      say(f"decode: {sum(map(len, produced))} tokens generated")
  decode_seconds = time.perf_counter() - start
  rows = [p[:p.index(eos_id)] if eos_id in p else p for p in produced]
  # (the first token of each row comes from prefill's logits, not from a decode step)
  return Generation(rows, first_logits, prefill_seconds, decode_seconds,
                    sum(max(len(p) - 1, 0) for p in produced), peak_pages, spec.num_pages, batch,
                    int(cached.sum()))
