"""The Llama model on a ``(data, model)`` device mesh, on JAX's own SPMD engine.

Megatron-style tensor parallelism on ``"model"``: every layer's q/k/v and MLP gate/up weights
are split by output columns (whole heads, whole MLP columns per device), the attention output
and MLP down weights by input rows, so each layer needs exactly two all-reduces (a
``jax.lax.psum`` over ``"model"`` after the output projection and one after the down
projection, of activations ``[tokens, hidden]``). Embeddings, norms and logits are replicated.
K/V heads live where their query heads are: each device holds its heads' pages of a
`jaxpaged.ShardedCache` and no K/V page ever crosses devices. When the model axis is larger
than the number of KV heads, the k/v weight columns of each head are repeated
(`jaxpaged.kv_replicas` times), matching how the cache stores replicated heads (vLLM's rule).

Data parallelism on ``"data"``: each data shard owns an independent cache and its own batch
(arrays with a leading ``[num_shards]`` axis, LOCAL sequence ids ``[0, spec.max_seqs)``).

The whole step is one `jax.shard_map` over the mesh with manual collectives, and inside it the
ordinary single-device `jaxpaged.models.llama.forward` runs with ``tp_axis="model"``: the model is
written once.

On a CPU-only machine, fake devices: start Python with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. On several processes or hosts, every
process runs the same program: `jax.distributed.initialize` first (on CPU, with
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` before it), then the same
mesh from ``jax.devices()`` (all processes' devices, process 0's first: with
``make_mesh(num_processes, devices_per_process)`` each process is a data shard and the
all-reduces stay inside it). `generate` gathers what it reads back from every process
(``multihost_utils.process_allgather``), so every process gets all the tokens;
tests/multiprocess_worker.py is a runnable example.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxpaged as jp
from jaxpaged._src import checks
from jaxpaged._src import sharding
from jaxpaged._src.spec import next_pow2
from jaxpaged.models import generation, llama
from jaxpaged.models.llama import LlamaConfig, Params

DATA, MODEL = sharding.DATA, sharding.MODEL

# How each weight is split over "model" (None: replicated). Stacked layer weights are
# [layers, in, out]: columns = axis 2, rows = axis 1.
_COLUMNS, _ROWS = P(None, None, MODEL), P(None, MODEL, None)
_LAYER_SPLIT = {"attn_norm": P(), "ffn_norm": P(), "wq": _COLUMNS, "wk": _COLUMNS,
                "wv": _COLUMNS, "wo": _ROWS, "w_gate": _COLUMNS, "w_up": _COLUMNS,
                "w_down": _ROWS}


# ----------------------------------------------------------------------------- argument checks

def check_mesh(config: LlamaConfig, mesh: Any) -> Mesh:
  """``mesh``, if it is a ``(data, model)`` mesh whose model axis splits ``config``'s heads: it
  must divide the query heads and the MLP width, and divide the KV heads or be a multiple of
  them (each KV head then stored on ``model // num_kv_heads`` devices).

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=4, num_kv_heads=2,
  ...                      ffn=64)
  >>> dict(check_mesh(config, jp.make_mesh(1, 1)).shape)
  {'data': 1, 'model': 1}
  """
  config = llama.check_config(config)
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != (DATA, MODEL):
    raise jp.JaxPagedError(f"mesh must be a jax.sharding.Mesh with axes ('data', 'model'), got "
                           f"{mesh!r}; build one with jaxpaged.make_mesh(data, model).")
  model = int(mesh.shape[MODEL])
  fits = sorted(d for d in range(1, config.num_heads + 1)
                if config.num_heads % d == 0 and config.ffn % d == 0
                and (config.num_kv_heads % d == 0 or d % config.num_kv_heads == 0))
  if (config.num_heads % model or config.ffn % model
      or (config.num_kv_heads % model and model % config.num_kv_heads)):
    raise jp.JaxPagedError(
        f"mesh has a model axis of {model} devices, which cannot split this model "
        f"({config.num_heads} query heads, {config.num_kv_heads} KV heads, MLP width "
        f"{config.ffn}): it must divide the query heads and the MLP width, and divide the KV "
        f"heads or be a multiple of them; use a model axis among {fits}.")
  return mesh


def stored_config(config: LlamaConfig, mesh: Mesh) -> LlamaConfig:
  """``config`` with its KV heads as the mesh stores them (each repeated `jaxpaged.kv_replicas`
  times): the same model, since each query head still meets copies of its own KV head.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=4, num_kv_heads=2,
  ...                      ffn=64)
  >>> stored_config(config, jp.make_mesh(1, 4)).num_kv_heads  # 2 heads, 4 devices: 2 copies
  4
  """
  mesh = check_mesh(config, mesh)
  replicas = jp.kv_replicas(config.num_kv_heads, int(mesh.shape[MODEL]))
  return dataclasses.replace(config, num_kv_heads=config.num_kv_heads * replicas)


def param_partition(params: Params) -> dict[str, Any]:
  """The `PartitionSpec` of every weight (a pytree shaped like ``params``): q/k/v, gate and up
  split by output columns over ``"model"``, o and down by input rows, the rest replicated.

  >>> split = param_partition({"embed": 0, "norm": 0, "layers": {"wq": 0, "wo": 0}})
  >>> split["layers"]["wq"] == P(None, None, "model"), split["embed"] == P()
  (True, True)
  """
  out = {name: P() for name in params if name != "layers"}
  out["layers"] = {name: _LAYER_SPLIT[name] for name in params["layers"]}
  return out


def shard_params(params: Params, config: LlamaConfig, mesh: Mesh) -> Params:
  """``params`` (the whole model's, as `jaxpaged.models.gguf.load` or `llama.random_params`
  give) placed on ``mesh`` for `forward`: each weight `jax.device_put` with the
  `NamedSharding` of `param_partition`, k/v columns first repeated per head when the model axis
  exceeds the KV heads. Replicated over ``"data"``.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=4, num_kv_heads=2,
  ...                      ffn=64)
  >>> sharded = shard_params(llama.random_params(config), config, jp.make_mesh(1, 1))
  >>> sharded["layers"]["wk"].shape  # [layers, hidden, stored KV heads * head size]
  (1, 32, 16)
  """
  mesh = check_mesh(config, mesh)
  llama.check_params(params, config)
  replicas = jp.kv_replicas(config.num_kv_heads, int(mesh.shape[MODEL]))

  def repeat_heads(w):  # [layers, hidden, kv * head_dim] -> [layers, hidden, kv * r * head_dim]
    layers, hidden, _ = w.shape
    w = jnp.asarray(w).reshape(layers, hidden, config.num_kv_heads, config.head_dim)
    return jnp.repeat(w, replicas, axis=2).reshape(layers, hidden, -1)

  layers = dict(params["layers"])
  if replicas > 1:
    layers["wk"], layers["wv"] = repeat_heads(layers["wk"]), repeat_heads(layers["wv"])
  whole = {**params, "layers": layers}
  return jax.tree.map(lambda w, p: jax.device_put(w, NamedSharding(mesh, p)), whole,
                      param_partition(whole))


def _check_step(params, cache, tokens, seq_ids, q_lens, config) -> tuple[Any, ...]:
  """`forward`'s checks. Returns ``(stored config, tokens, seq_ids, q_lens)``."""
  if not isinstance(cache, jp.ShardedCache):
    raise jp.JaxPagedError(f"cache must be a jaxpaged.ShardedCache (jaxpaged.init_sharded_cache("
                           f"config.cache_spec(...), mesh)), got {type(cache).__name__}.")
  stored = stored_config(config, cache.mesh)
  try:
    llama.check_params(params, stored)
  except jp.JaxPagedError as e:
    raise jp.JaxPagedError(f"{e} (on a mesh, pass shard_params(params, config, mesh): it "
                           "repeats the k/v columns of each head the mesh stores twice or "
                           "more)") from e
  spec = cache.spec
  if (spec.num_layers, spec.num_kv_heads, spec.head_dim) != (
      config.num_layers, config.num_kv_heads, config.head_dim):
    raise jp.JaxPagedError(
        f"cache holds (layers, KV heads, head size) "
        f"{(spec.num_layers, spec.num_kv_heads, spec.head_dim)} but the model has "
        f"{(config.num_layers, config.num_kv_heads, config.head_dim)}; make it with "
        "jaxpaged.init_sharded_cache(config.cache_spec(...), mesh) of this config.")
  n = cache.num_shards
  tokens = checks.token_ids("tokens", tokens, ndim=2)
  seq_ids, q_lens = checks.index_table("seq_ids", seq_ids), checks.index_table("q_lens", q_lens)
  for name, array in (("tokens", tokens), ("seq_ids", seq_ids), ("q_lens", q_lens)):
    if array.shape[0] != n:
      raise jp.JaxPagedError(f"{name} must have a leading axis of {n} (one batch per data shard "
                             f"of the mesh), got shape {tuple(array.shape)}; stack each "
                             "shard's batch, padding short ones (seq_ids -1, q_lens 0).")
  if q_lens.shape != seq_ids.shape:
    raise jp.JaxPagedError(f"q_lens must have the shape of seq_ids {tuple(seq_ids.shape)}, got "
                           f"{tuple(q_lens.shape)}; pass one count per row of each shard.")
  return stored, tokens, seq_ids, q_lens


# ----------------------------------------------------------------------------- the model step

def _step(params, cache, tokens, seq_ids, q_lens, *, config, decode, impl):
  """`forward` without its checks (traceable): one `jaxpaged.map_shards` over the whole mesh."""

  def body(local, params, tokens, seq_ids, q_lens):
    local, logits, ok = llama.forward(params, local, tokens[0], seq_ids[0], q_lens[0],
                                      config=config, decode=decode, impl=impl, tp_axis=MODEL)
    return local, (logits[None], ok[None])

  cache, (logits, ok) = jp.map_shards(
      body, cache, params, tokens, seq_ids, q_lens,
      in_specs=(param_partition(params), P(DATA), P(DATA), P(DATA)), out_specs=(P(DATA), P(DATA)))
  return cache, logits, ok


_jitted_step = jax.jit(_step, static_argnames=("config", "decode", "impl"))


def forward(params: Params, cache: jp.ShardedCache, tokens: jax.typing.ArrayLike,
            seq_ids: jax.typing.ArrayLike, q_lens: jax.typing.ArrayLike, *, config: LlamaConfig,
            decode: bool, impl: str = "auto") -> tuple[jp.ShardedCache, jax.Array, jax.Array]:
  """`jaxpaged.models.llama.forward` on a `jaxpaged.ShardedCache`: every data shard runs its
  own ragged batch, each layer split over the model axis. Jitted.

  Args:
    params: `shard_params` of the model's weights (on ``cache.mesh``).
    cache: the sharded cache (`jaxpaged.init_sharded_cache` of ``config.cache_spec(...)``).
    tokens: ``int32[num_shards, T]``: each data shard's new tokens, laid out as
      `jaxpaged.extend` does.
    seq_ids: ``int32[num_shards, B]``: each shard's rows, LOCAL sequence ids ``[0,
      cache.spec.max_seqs)`` of that shard (global id ``shard * max_seqs + local``); -1 pads.
    q_lens: ``int32[num_shards, B]``: new tokens of each row (decode: ones).
    config: the model's shape (static); decode, impl: as `jaxpaged.models.llama.forward`.

  Returns:
    ``(cache, logits [num_shards, B, vocab], ok [num_shards])``: ``ok`` False on a shard whose
    cache refused its tokens (that shard appended nothing).

  Raises:
    JaxPagedError: a cache, params or batch that do not go together.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> mesh = jp.make_mesh(1, 1)
  >>> params = shard_params(llama.random_params(config), config, mesh)
  >>> cache = jp.init_sharded_cache(config.cache_spec(num_pages=8, max_seqs=2, max_seq_len=16,
  ...                                                 page_size=4), mesh)
  >>> cache, logits, ok = forward(params, cache, jnp.array([[5, 6, 7, 8, 9]]),
  ...                             jnp.array([[0, 1]]), jnp.array([[3, 2]]), config=config,
  ...                             decode=False)
  >>> logits.shape, ok.tolist()
  ((1, 2, 64), [True])
  """
  stored, tokens, seq_ids, q_lens = _check_step(params, cache, tokens, seq_ids, q_lens, config)
  impl = generation.check_impl(impl)
  return _jitted_step(params, cache, tokens, seq_ids, q_lens, config=stored,
                      decode=checks.flag("decode", decode), impl=impl)


# The generation loop owns its cache: its steps donate it (updated in place, no pool copy).
_prefill_step = jax.jit(functools.partial(_step, decode=False),
                        static_argnames=("config", "impl"), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("config", "steps", "temperature", "top_p", "impl"),
                   donate_argnames=("cache",))
def _decode_steps(params, cache, seq_ids, tokens, done, budget, eos_id, key, *, config, steps,
                  temperature, top_p, impl):
  """``steps`` decode steps on every shard (arrays ``[num_shards, B]``); as
  `jaxpaged.models.generation`'s loop: done rows are padding; returns each step's new tokens."""
  def step(carry, _):
    cache, tokens, done, budget, key = carry
    key, subkey = jax.random.split(key)
    cache, logits, ok = _step(params, cache, tokens, jnp.where(done, -1, seq_ids),
                              jnp.ones_like(seq_ids), config=config, decode=True, impl=impl)
    new = generation.sample(logits.reshape(-1, logits.shape[-1]), subkey,
                            temperature=temperature, top_p=top_p).reshape(tokens.shape)
    new = jnp.where(done, -1, new)
    budget = budget - jnp.where(done, 0, 1)
    done = done | (new == eos_id) | (budget <= 0)
    return (cache, jnp.where(new >= 0, new, tokens), done, budget, key), (new, jnp.all(ok))

  (cache, tokens, done, budget, key), (new, oks) = jax.lax.scan(
      step, (cache, tokens, done, budget, key), None, length=steps)
  return cache, tokens, done, budget, key, new, jnp.all(oks)


# ----------------------------------------------------------------------------- generate

@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where each prompt runs: prompt ``i`` on data shard ``i % n`` as local sequence ``i // n``
  (round robin); ``rows[s]`` lists shard ``s``'s prompts in local-id order."""
  num_shards: int
  rows: list[list[int]]

  @property
  def max_seqs(self) -> int:
    return max(map(len, self.rows))

  def table(self, values: Sequence[Any], fill: Any, dtype: Any) -> np.ndarray:
    """``[num_shards, max_seqs]``: each prompt's value at its shard and local id."""
    out = np.full((self.num_shards, self.max_seqs), fill, dtype)
    for s, rows in enumerate(self.rows):
      out[s, :len(rows)] = [values[i] for i in rows]
    return out


def generate(params: Params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
             mesh: Mesh, max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, page_size: int = 16,
             prefill_chunk: int = 256, steps_per_call: int = 8,
             cache_dtype: jax.typing.DTypeLike = jnp.float32, impl: str = "auto",
             progress: Callable[[str], None] | None = None) -> generation.Generation:
  """`jaxpaged.models.generation.generate` on a device mesh: prompts assigned round-robin to
  the data shards (prompt ``i`` on shard ``i % data``), each layer split over the model axis.

  Greedy output (``temperature=0``) is the single-device output, token for token (up to
  float rounding of the partial sums, which can only matter at exact ties). Sampled output
  draws from the same distributions with other random numbers (the batch is laid out per
  shard), so it differs from a single-device run with the same seed.

  Args:
    params: the whole model's weights, as for one device (`jaxpaged.models.gguf.load`,
      `llama.random_params`); generate places them with `shard_params`.
    mesh: a ``(data, model)`` mesh (`jaxpaged.make_mesh`) whose model axis fits the model
      (`check_mesh`).
    The rest: as `jaxpaged.models.generation.generate` (no dense or prefix-caching cache here).

  Raises:
    JaxPagedError: for a bad argument, before anything runs.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> params = llama.random_params(config)
  >>> out = generate(params, config, [[1, 2, 3], [4, 5]], mesh=jp.make_mesh(1, 1),
  ...                max_new_tokens=4)
  >>> out.tokens == generation.generate(params, config, [[1, 2, 3], [4, 5]], max_new_tokens=4,
  ...                                   eos_id=None).tokens
  True
  """
  plan = generation.check_generate(params, config, prompts, max_new_tokens, eos_id, temperature,
                                   top_p, seed, page_size, prefill_chunk, steps_per_call,
                                   cache_dtype, impl, False, False, progress)
  mesh = check_mesh(config, mesh)
  n = int(mesh.shape[DATA])
  layout = _Layout(n, [list(range(s, len(plan.prompts), n)) for s in range(n)])
  params = shard_params(params, config, mesh)
  stored = stored_config(config, mesh)
  lengths = [len(p) + plan.max_new_tokens for p in plan.prompts]
  pages = max(sum(-(-lengths[i] // plan.page_size) for i in rows) for rows in layout.rows)
  spec = config.cache_spec(num_pages=max(pages, 1), max_seqs=layout.max_seqs,
                           max_seq_len=max(lengths), page_size=plan.page_size,
                           dtype=plan.cache_dtype)
  cache = jp.init_sharded_cache(spec, mesh)
  start = time.perf_counter()
  cache, first_logits = _prefill(params, stored, cache, layout, plan)
  prefill_seconds = time.perf_counter() - start
  produced, peak_pages, decode_seconds = _decode(params, stored, cache, layout, first_logits,
                                                 plan)
  rows = [p[:p.index(plan.eos_id)] if plan.eos_id in p else p for p in produced]
  return generation.Generation(rows, first_logits, prefill_seconds, decode_seconds,
                               sum(max(len(p) - 1, 0) for p in produced), peak_pages,
                               n * spec.num_pages, len(plan.prompts))


def _fetch(x: jax.Array) -> np.ndarray:
  """``x`` on the host, whole. On a mesh over several processes each process holds only its
  devices' shards: every process then calls this at the same point (an all-gather)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _local_ids(layout: _Layout) -> jax.Array:
  """``int32[num_shards, max_seqs]``: each shard's local sequence ids, -1 for padding rows."""
  present = layout.table([True] * sum(map(len, layout.rows)), False, bool)
  return jnp.where(present, jnp.arange(layout.max_seqs, dtype=jnp.int32)[None], -1)


def _prefill(params, config, cache, layout: _Layout, plan) -> tuple[jp.ShardedCache, np.ndarray]:
  """Every shard's prompts, in chunks of a fixed token budget per shard (one compiled shape).
  Returns ``(cache, first_logits [B, vocab])`` in the prompts' order."""
  prompts = plan.prompts
  most = max(sum(len(prompts[i]) for i in rows) for rows in layout.rows)
  chunk = min(plan.prefill_chunk, next_pow2(most), layout.max_seqs * cache.spec.max_seq_len)
  ids = _local_ids(layout)
  fed = [0] * len(prompts)
  first_logits = np.zeros((len(prompts), config.vocab_size), np.float32)
  while any(f < len(p) for f, p in zip(fed, prompts)):
    tokens = np.zeros((layout.num_shards, chunk), np.int32)
    takes = [0] * len(prompts)
    for s, rows in enumerate(layout.rows):
      budget, at = chunk, 0
      for i in rows:
        takes[i] = min(len(prompts[i]) - fed[i], budget)
        tokens[s, at:at + takes[i]] = prompts[i][fed[i]:fed[i] + takes[i]]
        at, budget = at + takes[i], budget - takes[i]
    cache, logits, ok = _prefill_step(params, cache, jnp.asarray(tokens), ids,
                                      jnp.asarray(layout.table(takes, 0, np.int32)),
                                      config=config, impl=plan.impl)
    if not _fetch(ok).all():
      raise RuntimeError("jaxpaged bug: the sharded cache refused a prefill chunk that generate "
                         "sized for it; please report it.")
    logits = _fetch(logits)
    for s, rows in enumerate(layout.rows):
      for local, i in enumerate(rows):
        fed[i] += takes[i]
        if takes[i] and fed[i] == len(prompts[i]):
          first_logits[i] = logits[s, local]
    plan.say(f"prefill: {sum(fed)}/{sum(map(len, prompts))} prompt tokens")
  return cache, first_logits


def _decode(params, config, cache, layout: _Layout, first_logits: np.ndarray, plan):
  """Samples each row's first token from ``first_logits``, then decodes on every shard until
  every row is done. Returns ``(produced, peak_pages, seconds)`` in the prompts' order."""
  start = time.perf_counter()
  batch = len(plan.prompts)
  used = lambda cache: int(np.sum(_fetch(jp.num_used_pages(cache))))
  peak_pages = used(cache)
  if not plan.max_new_tokens:
    return [[] for _ in range(batch)], peak_pages, time.perf_counter() - start
  key = jax.random.key(plan.seed)
  key, subkey = jax.random.split(key)
  first = np.asarray(generation.sample(jnp.asarray(first_logits), subkey,
                                       temperature=plan.temperature, top_p=plan.top_p))
  produced = [[int(t)] for t in first]
  present = layout.table([True] * batch, False, bool)
  seq_ids = _local_ids(layout)
  tokens = jnp.asarray(layout.table(first, 0, np.int32))
  budget = jnp.full(present.shape, plan.max_new_tokens - 1, jnp.int32)
  done = jnp.asarray(~present) | (tokens == plan.eos_id) | (budget <= 0)
  while not _fetch(done).all():
    cache, tokens, done, budget, key, new, ok = _decode_steps(
        params, cache, seq_ids, tokens, done, budget, jnp.int32(plan.eos_id), key,
        config=config, steps=plan.steps_per_call, temperature=plan.temperature,
        top_p=plan.top_p, impl=plan.impl)
    if not _fetch(ok):
      raise RuntimeError("jaxpaged bug: the sharded cache refused a decode step (generate sized "
                         "it too small); please report it.")
    new = _fetch(new)  # [steps, num_shards, max_seqs]
    for s, rows in enumerate(layout.rows):
      for local, i in enumerate(rows):
        produced[i] += [int(t) for t in new[:, s, local] if t >= 0]
    peak_pages = max(peak_pages, used(cache))
    plan.say(f"decode: {sum(map(len, produced))} tokens generated")
  return produced, peak_pages, time.perf_counter() - start
