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
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged._src import checks
from jaxpaged._src.gpu import IMPLS
from jaxpaged._src.spec import SUPPORTED_DTYPES, next_pow2
from jaxpaged.models import llama
from jaxpaged.models.llama import Cache, DenseKVCache, LlamaConfig, Params, forward
from jaxpaged.models.llama import param_shapes  # re-exported: `generation.param_shapes`

_INT64 = 1 << 63  # seeds are 64-bit signed ints: [-2**63, 2**63)
_NO_EOS = -1  # eos_id=None: no produced token (all >= 0) equals it, so no row stops early
_NO_TIME = 1e-9  # seconds: the speed of a decode that took no time has a finite value

# ----------------------------------------------------------------------------- argument checks
# Shared by `sample`, `prefill` and `generate`. Every check raises `jaxpaged.JaxPagedError` naming
# the argument, what was expected, what was given and the fix.


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


def _check_impl(impl: Any) -> str:
  if impl not in IMPLS:
    raise jp.JaxPagedError(f"impl must be one of {IMPLS}, got {impl!r}.")
  return impl


def _check_progress(progress: Any) -> Callable[[str], None]:
  """``progress``, or a callable that does nothing for None."""
  if progress is not None and not callable(progress):
    raise jp.JaxPagedError(f"progress must be a callable taking a str, or None, got "
                           f"{type(progress).__name__}.")
  return progress or (lambda message: None)


def _chunk(prefill_chunk, prompts) -> int:
  """The prefill chunk (a static shape): at most the prompts' tokens, rounded up to a power of
  two (so a huge chunk allocates nothing, and few shapes compile)."""
  prefill_chunk = checks.integer("prefill_chunk", prefill_chunk, minimum=1,
                                 below=checks.INT32_MAX,
                                 fix="pass the prompt tokens computed per call, e.g. 256")
  return min(prefill_chunk, next_pow2(sum(map(len, prompts))))


def sample(logits: jax.Array, key: jax.Array, *, temperature: float,
           top_p: float) -> jax.Array:
  """Next tokens ``int32[B]`` from ``logits [B, vocab]``: greedy when temperature is 0, else
  temperature and nucleus (top-p) sampling.

  >>> logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
  >>> sample(logits, jax.random.key(0), temperature=0.0, top_p=1.0).tolist()  # greedy
  [1, 0]
  >>> # top_p=0.5 keeps only each row's most likely token, whatever the temperature
  >>> sample(logits, jax.random.key(0), temperature=2.0, top_p=0.5).tolist()
  [1, 0]
  """
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
  return forward(params, cache, tokens, seq_ids, q_lens, config=config, decode=False, impl=impl)


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
                                jnp.ones_like(seq_ids), config=config, decode=True, impl=impl)
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
  ``max_new_tokens=0``) and figures.

  >>> result = Generation(tokens=[[5, 6, 7]], first_logits=np.zeros((1, 8)), prefill_seconds=0.1,
  ...                     decode_seconds=0.5, decode_tokens=2, peak_pages=1, num_pages=2,
  ...                     peak_sequences=1)
  >>> result.decode_tokens_per_second
  4.0
  """
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
    """Decode speed: ``decode_tokens`` over ``decode_seconds``."""
    return self.decode_tokens / max(self.decode_seconds, _NO_TIME)


# ----------------------------------------------------------------------------- prefill

def prefill(params: Params, config: LlamaConfig, cache: Cache, seq_ids: Sequence[int],
            prompts: Sequence[Sequence[int]], *, prefill_chunk: int = 256, impl: str = "auto",
            progress: Callable[[str], None] | None = None
            ) -> tuple[Cache, np.ndarray, np.ndarray]:
  """Admits new sequences and computes their prompts in chunks of ``prefill_chunk`` tokens.

  On a `jaxpaged.PagedKVCache`, `jaxpaged.match_prefix` first attaches each prompt's cached
  prefix (with prefix caching enabled), so only the rest is computed.

  Args:
    seq_ids: a sequence slot of ``cache`` for each prompt (distinct ints): a free one on a
      `jaxpaged.PagedKVCache`; a `DenseKVCache` appends to what the slot holds.
    prompts: token ids, one non-empty sequence per row, each id in ``[0, config.vocab_size)``.
    impl: the attention implementation (`jaxpaged.models.llama.forward`).

  Returns:
    ``(cache, first_logits [B, vocab], cached_tokens [B])``: logits at each prompt's last token.

  Raises:
    JaxPagedError: for a bad argument, or prompts ``cache`` cannot hold (a slot in use, too few
      pages, a prompt longer than a sequence holds); checked before the cache is touched, so
      the cache passed in is still valid (it is donated only once the call goes ahead).

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> cache = init_cache(config.cache_spec(num_pages=8, max_seqs=2, max_seq_len=16, page_size=4))
  >>> cache, first_logits, cached = prefill(llama.random_params(config), config, cache, [0, 1],
  ...                                       [[1, 2, 3], [4, 5, 6, 7, 8]])
  >>> cache.seq_lens.tolist(), first_logits.shape, cached.tolist()
  ([3, 5], (2, 64), [0, 0])
  """
  seq_ids, prompts, prefill_chunk, say = _check_prefill(
      params, config, cache, seq_ids, prompts, prefill_chunk, impl, progress)
  capacity = _check_room(cache, seq_ids, prompts)
  # A chunk fills at most every row to its capacity (the cache refuses wider calls).
  prefill_chunk = min(prefill_chunk, len(prompts) * capacity)
  ids = jnp.asarray(seq_ids, jnp.int32)
  cache, fed = _attach_cached(cache, ids, prompts)
  cached = np.asarray(fed)
  cache, first_logits = _prefill_chunks(params, config, cache, ids, prompts, fed, prefill_chunk,
                                        impl, say)
  return cache, first_logits, cached


def _check_prefill(params, config, cache, seq_ids, prompts, prefill_chunk, impl, progress):
  """`prefill`'s argument checks. Returns ``(seq_ids, prompts, prefill_chunk, say)``."""
  config = llama.check_config(config)
  llama.check_params(params, config)
  prompts = _check_prompts(prompts, config.vocab_size)
  slots = _check_cache(cache, config)
  prefill_chunk = _chunk(prefill_chunk, prompts)
  _check_impl(impl)
  say = _check_progress(progress)
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
  return seq_ids, prompts, prefill_chunk, say


def _check_room(cache, seq_ids: list[int], prompts: list[list[int]]) -> int:
  """Everything the cache could refuse about each row, checked before the cache (donated from
  here on) is touched, so that a refused call raises with the caller's cache intact. Returns
  the tokens one sequence holds."""
  held = [int(n) for n in np.asarray(cache.seq_lens)[seq_ids]]
  if isinstance(cache, jp.PagedKVCache):
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
  return capacity


def _attach_cached(cache, ids: jax.Array, prompts: list[list[int]]) -> tuple[Cache, list[int]]:
  """On a paged cache, attaches each prompt's cached prefix (after checking that the pool can
  hold the prompts). Returns ``(cache, fed)``: the prompt tokens each row already holds."""
  if not isinstance(cache, jp.PagedKVCache):
    return cache, [0] * len(prompts)
  batch, ps = len(prompts), cache.spec.page_size
  padded = np.zeros((batch, max(map(len, prompts))), np.int32)
  for row, prompt in enumerate(prompts):
    padded[row, :len(prompt)] = prompt
  padded, lengths = jnp.asarray(padded), jnp.asarray([len(p) for p in prompts], jnp.int32)
  room = int(jp.num_free_pages(cache)) + int(jp.num_cached_free_pages(cache))
  if sum(-(-len(p) // ps) for p in prompts) > room:  # prefix hits may still make it fit
    try:  # (eager, no donation) the whole prompts, as the chunks will append them
      jp.check_match_prefix(cache, ids, padded, lengths)
    except jp.JaxPagedError as e:
      raise jp.JaxPagedError(
          f"the cache cannot hold the prompts ({sum(map(len, prompts))} tokens; {room} pages "
          f"of {ps} tokens free or reclaimable): {e}") from e
  cache, match = _attach_prefixes(cache, ids, padded, lengths,
                                  max_prompt_tokens=jnp.zeros(batch, jnp.int32), num_slots=batch)
  if not bool(match.ok):
    raise RuntimeError("jaxpaged bug: match_prefix refused prompts that prefill checked; "
                       "please report it.")
  return cache, [int(n) for n in match.num_cached]


def _prefill_chunks(params, config, cache, ids, prompts, fed: list[int], prefill_chunk: int,
                    impl: str, say: Callable[[str], None]) -> tuple[Cache, np.ndarray]:
  """Computes the prompts from ``fed`` on, a chunk at a time. Returns ``(cache, first_logits)``.
  """
  cached = sum(fed)
  first_logits = np.zeros((len(prompts), config.vocab_size), np.float32)
  while any(f < len(p) for f, p in zip(fed, prompts)):
    cache = _prefill_chunk(params, config, cache, ids, prompts, fed, first_logits, prefill_chunk,
                           impl)
    say(f"prefill: {sum(fed)}/{sum(map(len, prompts))} prompt tokens "
        f"({cached} from the prefix cache)")
  return cache, first_logits


def _prefill_chunk(params, config, cache, ids, prompts, fed: list[int], first_logits: np.ndarray,
                   prefill_chunk: int, impl: str) -> Cache:
  """Computes the next ``prefill_chunk`` prompt tokens, filled row by row; advances ``fed`` and
  records ``first_logits`` of the rows whose prompt is now complete."""
  budget, chunk, q_lens = prefill_chunk, [], []
  for row, prompt in enumerate(prompts):
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
  return cache


# ----------------------------------------------------------------------------- generate

class _Plan(NamedTuple):
  """`generate`'s arguments, checked."""
  prompts: list[list[int]]
  max_new_tokens: int
  eos_id: int  # `_NO_EOS` for None
  temperature: float
  top_p: float
  seed: int
  page_size: int
  prefill_chunk: int
  steps_per_call: int
  cache_dtype: Any
  impl: str
  dense_cache: bool
  prefix_caching: bool
  say: Callable[[str], None]


def generate(params: Params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, eos_id: int | None, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, page_size: int = 16, prefill_chunk: int = 256,
             steps_per_call: int = 8, cache_dtype: jax.typing.DTypeLike = jnp.float32,
             impl: str = "auto", dense_cache: bool = False, prefix_caching: bool = False,
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
    impl: the attention implementation (`jaxpaged.models.llama.forward`).
    dense_cache: run on `DenseKVCache` (contiguous per-sequence buffers) instead: the baseline.
    prefix_caching: rows whose prompts share full blocks compute them once (within one call the
      blocks of earlier rows are registered only as they are computed, so batch-mates share
      nothing; see `prefill` for admitting requests in waves). Paged cache only.

  Raises:
    JaxPagedError: for a bad argument, before anything runs.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> out = generate(llama.random_params(config), config, [[1, 2, 3], [4, 5]], max_new_tokens=5,
  ...                eos_id=None)  # no end-of-sequence token: every row gets 5 tokens
  >>> [len(row) for row in out.tokens], out.decode_tokens  # (the first come from prefill)
  ([5, 5], 8)
  """
  plan = _check_generate(params, config, prompts, max_new_tokens, eos_id, temperature, top_p,
                         seed, page_size, prefill_chunk, steps_per_call, cache_dtype, impl,
                         dense_cache, prefix_caching, progress)
  cache, num_pages = _new_cache(config, plan)
  first = _prefill_and_sample(params, config, cache, plan)
  produced, peak_pages, decode_seconds = _decode(params, config, first, plan)
  rows = [p[:p.index(plan.eos_id)] if plan.eos_id in p else p for p in produced]
  return Generation(rows, first.logits, first.seconds, decode_seconds,
                    sum(max(len(p) - 1, 0) for p in produced),  # the first ones: from prefill
                    peak_pages, num_pages, len(plan.prompts), int(first.cached.sum()))


def _check_generate(params, config, prompts, max_new_tokens, eos_id, temperature, top_p, seed,
                    page_size, prefill_chunk, steps_per_call, cache_dtype, impl, dense_cache,
                    prefix_caching, progress) -> _Plan:
  """`generate`'s argument checks, in the order of its signature (model and prompts first)."""
  config = llama.check_config(config)
  llama.check_params(params, config)
  prompts = _check_prompts(prompts, config.vocab_size)
  max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, minimum=0,
                                  fix="pass how many tokens to generate per prompt (0: prefill "
                                  "only)")
  eos_id = _NO_EOS if eos_id is None else checks.integer(
      "eos_id", eos_id, minimum=0, below=config.vocab_size,
      fix="pass the tokenizer's end-of-sequence id (tokenizer.eos_token_id), or None to never "
      "stop early")
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
  dense_cache, prefix_caching = _check_cache_options(dense_cache, prefix_caching, cache_dtype)
  return _Plan(prompts, max_new_tokens, eos_id, temperature, top_p, seed, page_size,
               prefill_chunk, steps_per_call, cache_dtype, _check_impl(impl), dense_cache,
               prefix_caching, _check_progress(progress))


def _check_cache_options(dense_cache, prefix_caching, cache_dtype) -> tuple[bool, bool]:
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
  return dense_cache, prefix_caching


def _new_cache(config: LlamaConfig, plan: _Plan) -> tuple[Cache, int]:
  """A cache just large enough for every prompt and its new tokens; returns it and its pages."""
  lengths = [len(p) + plan.max_new_tokens for p in plan.prompts]
  spec = dataclasses.replace(
      config.cache_spec(num_pages=sum(-(-n // plan.page_size) for n in lengths),
                        max_seqs=len(plan.prompts), max_seq_len=max(lengths),
                        page_size=plan.page_size, dtype=plan.cache_dtype),
      prefix_caching=plan.prefix_caching)
  if plan.dense_cache:
    cache = DenseKVCache.create(config, len(plan.prompts), spec.max_seq_len, plan.cache_dtype)
  else:
    cache = jp.init_cache(spec)
  return cache, spec.num_pages


class _Prefilled(NamedTuple):
  """The prompts, prefilled, and each row's first new token (sampled from ``logits``)."""
  cache: Cache
  logits: np.ndarray  # [B, vocab] at each prompt's last token
  cached: np.ndarray  # [B] prompt tokens served by the prefix cache
  tokens: jax.Array | None  # int32[B] first new tokens (None with max_new_tokens=0)
  produced: list[list[int]]  # the same, as lists (empty with max_new_tokens=0)
  key: jax.Array  # the sampling key for the decode steps
  seconds: float


def _prefill_and_sample(params, config, cache, plan: _Plan) -> _Prefilled:
  """Prefills every prompt and samples each row's first new token (none with
  ``max_new_tokens=0``)."""
  start = time.perf_counter()
  try:
    cache, first_logits, cached = prefill(params, config, cache, list(range(len(plan.prompts))),
                                          plan.prompts, prefill_chunk=plan.prefill_chunk,
                                          impl=plan.impl, progress=plan.say)
  except jp.JaxPagedError as e:  # the arguments were checked: the cache was sized wrong
    raise RuntimeError(f"jaxpaged bug: generate sized its cache too small ({e}); please report "
                       "it.") from e
  produced = [[] for _ in plan.prompts]  # each row's new tokens, end-of-sequence included
  key, tokens = jax.random.key(plan.seed), None
  if plan.max_new_tokens:
    key, subkey = jax.random.split(key)
    tokens = sample(jnp.asarray(first_logits), subkey, temperature=plan.temperature,
                    top_p=plan.top_p)
    produced = [[int(t)] for t in np.asarray(tokens)]
  return _Prefilled(cache, first_logits, cached, tokens, produced, key,
                    time.perf_counter() - start)


def _decode(params, config, first: _Prefilled, plan: _Plan):
  """Decodes from each row's first token (already chosen) until every row is done. Returns
  ``(produced, peak_pages, seconds)``: each row's new tokens, end-of-sequence included."""
  start = time.perf_counter()
  used_pages = (lambda cache: 0) if plan.dense_cache else (
      lambda cache: int(jp.num_used_pages(cache)))
  cache, tokens, key, produced = first.cache, first.tokens, first.key, first.produced
  peak_pages, batch = used_pages(cache), len(plan.prompts)
  if not plan.max_new_tokens:
    return produced, peak_pages, time.perf_counter() - start
  seq_ids = jnp.arange(batch, dtype=jnp.int32)
  budget = jnp.full((batch,), plan.max_new_tokens - 1, jnp.int32)
  done = (tokens == plan.eos_id) | (budget <= 0)
  while not bool(jnp.all(done)):
    cache, tokens, done, budget, key, new, ok = _decode_steps(
        params, cache, seq_ids, tokens, done, budget, jnp.int32(plan.eos_id), key, config=config,
        steps=plan.steps_per_call, temperature=plan.temperature, top_p=plan.top_p,
        impl=plan.impl)
    if not bool(ok):
      raise RuntimeError("jaxpaged bug: the cache refused a decode step (generate sized it too "
                         "small); please report it.")
    for row, column in enumerate(np.asarray(new).T):
      produced[row] += [int(t) for t in column if t >= 0]
    peak_pages = max(peak_pages, used_pages(cache))
    plan.say(f"decode: {sum(map(len, produced))} tokens generated")
  return produced, peak_pages, time.perf_counter() - start
