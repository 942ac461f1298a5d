"""Batched text generation on the paged cache: chunked prefill, then a jitted decode loop.

Prefill (`jaxpaged.models.prefill`) feeds the prompts in chunks of a fixed token budget (one
compiled shape), rows concatenated as `jaxpaged.extend` lays them out, so a long prompt spans
several chunks and short ones share a chunk. Decode runs ``steps_per_call`` steps per jitted
call inside `lax.scan`; a row that produced its end-of-sequence token becomes padding (its cache
stops growing).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged._src import checks
from jaxpaged._src.disk import layout_of
from jaxpaged._src.spec import QUANTIZED_DTYPES, SUPPORTED_DTYPES
from jaxpaged.models import llama
from jaxpaged.models.llama import Cache, DenseKVCache, LlamaConfig, Params, forward
from jaxpaged.models.llama import param_shapes  # re-exported: `generation.param_shapes`
from jaxpaged.models.prefill import check_impl, check_progress, check_prompts, chunk_size
from jaxpaged.models.prefill import prefill  # re-exported: `generation.prefill`

_INT64 = 1 << 63  # seeds are 64-bit signed ints: [-2**63, 2**63)
_NO_EOS = -1  # eos_id=None: no produced token (all >= 0) equals it, so no row stops early
DEFAULT_DISK_BYTES = 16 << 30  # a disk cache opened from a directory: its capacity
_NO_TIME = 1e-9  # seconds: the speed of a decode that took no time has a finite value

# ----------------------------------------------------------------------------- argument checks
# Every check raises `jaxpaged.JaxPagedError` naming the argument, what was expected, what was
# given and the fix (those `generate` shares with `prefill` are in `jaxpaged.models.prefill`).


def _check_sampling(temperature, top_p) -> tuple[float, float]:
  temperature, top_p = checks.real("temperature", temperature), checks.real("top_p", top_p)
  if not (np.isfinite(temperature) and temperature >= 0):
    raise jp.JaxPagedError(f"temperature must be a finite number >= 0, got {temperature}; use 0 "
                           "for greedy decoding, or e.g. 0.7 to sample.")
  if not 0 < top_p <= 1:
    raise jp.JaxPagedError(f"top_p must be in (0, 1], got {top_p}; use 1 to sample from the whole "
                           "distribution, or e.g. 0.9 for nucleus sampling.")
  return temperature, top_p


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
@functools.partial(jax.jit, static_argnames=("config", "steps", "temperature", "top_p", "impl"),
                   donate_argnames=("cache",))
def _decode_steps(params, cache, seq_ids, tokens, done, budget, eos_id, key, *, config, steps,
                  temperature, top_p, impl):
  """Up to ``steps`` decode steps: it stops early once every row is done (a row is done once it
  produced ``eos_id`` or spent its ``budget`` of new tokens; done rows are padding), so no step
  runs on padding alone. Returns each step's new tokens (-1 for done rows and steps not run)."""
  def step(carry):
    i, cache, tokens, done, budget, key, new, ok = carry
    key, subkey = jax.random.split(key)
    cache, logits, step_ok = forward(params, cache, tokens, jnp.where(done, -1, seq_ids),
                                     jnp.ones_like(seq_ids), config=config, decode=True,
                                     impl=impl)
    sampled = jnp.where(done, -1, sample(logits, subkey, temperature=temperature, top_p=top_p))
    budget = budget - jnp.where(done, 0, 1)
    done = done | (sampled == eos_id) | (budget <= 0)
    return (i + 1, cache, jnp.where(sampled >= 0, sampled, tokens), done, budget, key,
            new.at[i].set(sampled), ok & step_ok)

  new = jnp.full((steps, seq_ids.shape[0]), -1, jnp.int32)
  _, cache, tokens, done, budget, key, new, ok = jax.lax.while_loop(
      lambda carry: (carry[0] < steps) & ~jnp.all(carry[3]), step,
      (jnp.int32(0), cache, tokens, done, budget, key, new, jnp.bool_(True)))
  return cache, tokens, done, budget, key, new, ok


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
  disk_prompt_tokens: int = 0  # of those, the ones read from the disk cache

  @property
  def decode_tokens_per_second(self) -> float:
    """Decode speed: ``decode_tokens`` over ``decode_seconds``."""
    return self.decode_tokens / max(self.decode_seconds, _NO_TIME)


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
             progress: Callable[[str], None] | None = None,
             mesh: jax.sharding.Mesh | None = None,
             disk_cache: str | os.PathLike | jp.DiskStore | None = None,
             disk_bytes: int = DEFAULT_DISK_BYTES) -> Generation:
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
    cache_dtype: K/V storage: float32, bfloat16, float16, or 8-bit (int8, float8_e4m3fn,
      float8_e5m2: quantized per (token, KV head) as `jaxpaged.write_kv` writes them, about
      3.8x the tokens of float32 in the same bytes; paged cache only).
    impl: the attention implementation (`jaxpaged.models.llama.forward`).
    dense_cache: run on `DenseKVCache` (contiguous per-sequence buffers) instead: the baseline.
    prefix_caching: rows whose prompts share full blocks compute them once (within one call the
      blocks of earlier rows are registered only as they are computed, so batch-mates share
      nothing; see `prefill` for admitting requests in waves). Paged cache only.
    mesh: None: one device. A ``(data, model)`` `jax.sharding.Mesh` (`jaxpaged.make_mesh`):
      run on it with `jaxpaged.models.parallel.generate` (prompts round-robin over the data
      shards, each layer split over the model axis; greedy output equals one device's). Not
      with ``dense_cache`` or ``prefix_caching``.
    disk_cache: a directory (or an open `jaxpaged.DiskStore`) of prefix blocks that outlives the
      process: the prompts' full blocks found there are read instead of computed (verified
      token by token), and those computed are written there after prefill, for the next run.
      Implies ``prefix_caching``; paged cache on one device only. ``disk_prompt_tokens`` in the
      result counts the tokens read from it.
    disk_bytes: the capacity of a ``disk_cache`` opened from a directory, in bytes (default
      16 GiB); least recently used blocks go first.

  Raises:
    JaxPagedError: for a bad argument, before anything runs.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> out = generate(llama.random_params(config), config, [[1, 2, 3], [4, 5]], max_new_tokens=5,
  ...                eos_id=None)  # no end-of-sequence token: every row gets 5 tokens
  >>> [len(row) for row in out.tokens], out.decode_tokens  # (the first come from prefill)
  ([5, 5], 8)
  """
  plan = check_generate(params, config, prompts, max_new_tokens, eos_id, temperature, top_p,
                        seed, page_size, prefill_chunk, steps_per_call, cache_dtype, impl,
                        dense_cache, prefix_caching, progress)
  if disk_cache is not None:
    if plan.dense_cache or mesh is not None:
      raise jp.JaxPagedError("disk_cache keeps prefix blocks of the paged cache on one device; "
                             "pass dense_cache=False and mesh=None with a disk_cache, or "
                             "disk_cache=None.")
    plan = plan._replace(prefix_caching=True)
  if mesh is not None:
    if plan.dense_cache or plan.prefix_caching:
      raise jp.JaxPagedError("mesh runs on a jaxpaged.ShardedCache without prefix caching; pass "
                             "dense_cache=False and prefix_caching=False with a mesh, or "
                             "mesh=None.")
    from jaxpaged.models import parallel  # pylint: disable=g-import-not-at-top (a cycle)
    return parallel.generate(params, config, plan.prompts, mesh=mesh,
                             max_new_tokens=plan.max_new_tokens, eos_id=eos_id,
                             temperature=plan.temperature, top_p=plan.top_p, seed=plan.seed,
                             page_size=plan.page_size, prefill_chunk=plan.prefill_chunk,
                             steps_per_call=plan.steps_per_call, cache_dtype=plan.cache_dtype,
                             impl=plan.impl, progress=progress)
  store, from_disk = None, [0]
  if disk_cache is not None:  # (checked before anything runs)
    store = open_disk_cache(disk_cache, disk_bytes, _cache_spec(config, plan), params, config)
  params = fused_params(params)
  cache, num_pages = _new_cache(config, plan)
  if store is not None:
    cache, from_disk = jp.load_prefixes(cache, store, plan.prompts)
  first = _prefill_and_sample(params, config, cache, plan)
  if store is not None:  # before decoding donates the cache
    jp.save_prefixes(first.cache, store, range(len(plan.prompts)))
  produced, peak_pages, decode_seconds = _decode(params, config, first, plan)
  rows = [p[:p.index(plan.eos_id)] if plan.eos_id in p else p for p in produced]
  return Generation(rows, first.logits, first.seconds, decode_seconds,
                    sum(max(len(p) - 1, 0) for p in produced),  # the first ones: from prefill
                    peak_pages, num_pages, len(plan.prompts), int(first.cached.sum()),
                    sum(from_disk))


_FUSED_MEMO: list = []  # [(weak references to the params' layer weights, their fused copy)]


def fused_params(params: Params) -> Params:
  """`jaxpaged.models.llama.fuse_layers` of ``params``, made once: the copy of the most recent
  params is kept (as long as they live) and returned again for the same weight arrays, so
  repeated `generate` calls on one model fuse its weights once.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> params = llama.random_params(config)
  >>> a, b = fused_params(params)["layers"], fused_params(params)["layers"]
  >>> a["wqkv"] is b["wqkv"], a["wo"] is params["layers"]["wo"]  # fused once; the rest shared
  (True, True)
  """
  layers = params["layers"]
  if "wqkv" in layers:
    return params
  leaves = [layers[name] for name in sorted(layers)]
  if _FUSED_MEMO:
    refs, fused_layers = _FUSED_MEMO[0]
    if len(refs) == len(leaves) and all(r() is a for r, a in zip(refs, leaves)):
      return {**params, "layers": fused_layers}
  fused = llama.fuse_layers(params)
  try:
    refs = [weakref.ref(a) for a in leaves]
  except TypeError:  # (NumPy arrays and the like: fuse each time)
    return fused
  _FUSED_MEMO[:] = [(refs, fused["layers"])]
  return fused


def open_disk_cache(disk_cache: Any, disk_bytes: Any, spec: jp.CacheSpec, params: Params,
                    config: LlamaConfig) -> jp.DiskStore:
  """``disk_cache`` as a `jaxpaged.DiskStore` of ``spec``'s layout for this model: opened from a
  directory (``disk_bytes`` of capacity; the model's identity is `llama.model_fingerprint`),
  or checked if it is one. `jaxpaged.models.serving.Server` opens its own with it too."""
  if isinstance(disk_cache, jp.DiskStore):
    if disk_cache.layout != layout_of(spec, disk_cache.layout.model):
      raise jp.JaxPagedError(f"disk_cache stores blocks of layout {disk_cache.layout}, not this "
                             "cache's; open it with this model's cache spec, or pass a "
                             "directory.")
    return disk_cache
  if not isinstance(disk_cache, (str, os.PathLike)):
    raise jp.JaxPagedError(f"disk_cache must be a directory path or a jaxpaged.DiskStore, got "
                           f"{disk_cache!r} ({type(disk_cache).__name__}).")
  return jp.DiskStore(disk_cache, disk_bytes, spec=spec,
                      model=llama.model_fingerprint(params, config))


def check_generate(params: Params, config: LlamaConfig, prompts: Any, max_new_tokens: Any,
                   eos_id: Any, temperature: Any, top_p: Any, seed: Any, page_size: Any,
                   prefill_chunk: Any, steps_per_call: Any, cache_dtype: Any, impl: Any,
                   dense_cache: Any, prefix_caching: Any, progress: Any) -> _Plan:
  """`generate`'s argument checks, in the order of its signature (model and prompts first);
  `jaxpaged.models.parallel.generate` checks its arguments with it too.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> plan = check_generate(llama.random_params(config), config, [[1, 2]], 4, None, 0.0, 1.0, 0,
  ...                       16, 256, 8, jnp.float32, "auto", False, False, None)
  >>> plan.prompts, plan.steps_per_call, plan.eos_id  # (no eos_id: -1, which no token equals)
  ([[1, 2]], 4, -1)
  """
  config = llama.check_config(config)
  llama.check_params(params, config)
  prompts = check_prompts(prompts, config.vocab_size)
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
  prefill_chunk = chunk_size(prefill_chunk, prompts)
  # Steps past the token budget would only run padding rows: no more than it (a static shape).
  steps_per_call = min(checks.integer("steps_per_call", steps_per_call, minimum=1,
                                      below=checks.INT32_MAX,
                                      fix="pass the decode steps per jitted call, e.g. 8"),
                       max(max_new_tokens, 1))
  dense_cache, prefix_caching = _check_cache_options(dense_cache, prefix_caching, cache_dtype)
  return _Plan(prompts, max_new_tokens, eos_id, temperature, top_p, seed, page_size,
               prefill_chunk, steps_per_call, cache_dtype, check_impl(impl), dense_cache,
               prefix_caching, check_progress(progress))


def _check_cache_options(dense_cache, prefix_caching, cache_dtype) -> tuple[bool, bool]:
  dense_cache = checks.flag("dense_cache", dense_cache)
  prefix_caching = checks.flag("prefix_caching", prefix_caching)
  if dense_cache and prefix_caching:
    raise jp.JaxPagedError("prefix_caching=True needs the paged cache; pass dense_cache=False "
                           "(the dense baseline caches no prefix).")
  check_cache_dtype(cache_dtype, dense_cache=dense_cache)
  return dense_cache, prefix_caching


def check_cache_dtype(cache_dtype: Any, *, dense_cache: bool = False) -> jnp.dtype:
  """``cache_dtype`` as a `jnp.dtype`, if the cache can store K/V in it: float32, bfloat16,
  float16, or 8-bit (int8, float8_e4m3fn, float8_e5m2) on the paged cache only (the dense
  baseline keeps no scales). `jaxpaged.models.serving.Server` checks its own with it too.

  >>> check_cache_dtype("int8").name
  'int8'
  """
  names = ", ".join(d.name for d in SUPPORTED_DTYPES)
  try:
    dtype = jnp.dtype(cache_dtype)
  except TypeError:
    dtype = None
  if dtype not in SUPPORTED_DTYPES:
    raise jp.JaxPagedError(f"cache_dtype must be one of {names}, got {cache_dtype!r}; e.g. "
                           "jnp.float32, or jnp.int8 for 8-bit K/V (with per-token scales).")
  if dense_cache and dtype in QUANTIZED_DTYPES:
    raise jp.JaxPagedError(f"cache_dtype={dtype.name} (8-bit K/V with scales) needs the paged "
                           "cache; pass dense_cache=False, or a float cache_dtype (float32, "
                           "bfloat16, float16) for the dense baseline.")
  return dtype


def _cache_spec(config: LlamaConfig, plan: _Plan) -> jp.CacheSpec:
  """The spec of a cache just large enough for every prompt and its new tokens."""
  lengths = [len(p) + plan.max_new_tokens for p in plan.prompts]
  return dataclasses.replace(
      config.cache_spec(num_pages=sum(-(-n // plan.page_size) for n in lengths),
                        max_seqs=len(plan.prompts), max_seq_len=max(lengths),
                        page_size=plan.page_size, dtype=plan.cache_dtype),
      prefix_caching=plan.prefix_caching)


def _new_cache(config: LlamaConfig, plan: _Plan) -> tuple[Cache, int]:
  """A cache of `_cache_spec`; returns it and its pages."""
  spec = _cache_spec(config, plan)
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
