"""The cache on a device mesh: `ShardedCache`, on JAX's own SPMD engine (`Mesh`, `NamedSharding`,
`shard_map`).

A mesh has two axes:

- ``"data"`` (data parallel): each data shard owns a whole, independent cache (its own pool, page
  tables, free stack and prefix table). Every leaf of a `PagedKVCache` gets a leading axis of
  size ``num_shards``, sharded over ``"data"``; each shard runs the ordinary single-device
  functions on its own slice under `jax.shard_map`, so allocator ops never talk across shards.
- ``"model"`` (tensor parallel): the K/V pools are sharded over KV heads, as vLLM, SGLang and
  jax-llm-examples do. When the axis is larger than the number of KV heads each head is stored
  ``replicas = model / num_kv_heads`` times, one copy per device (vLLM's rule); a size that
  divides neither way is refused.

Sequences have global ids: shard ``s`` owns ids ``[s * max_seqs, (s + 1) * max_seqs)`` (``max_seqs``
of the per-shard `CacheSpec`), so an id says where its sequence lives, and choosing the id of a
new sequence chooses its shard (`jaxpaged.routing` decides that). Slots are global too: slot
``s * num_pages * page_size + local_slot``.

The public functions of jaxpaged (`extend`, `write_kv`, `fork`, `release`, `match_prefix`, both
attentions, `token_positions`, `gather_kv`, swap and block moves, stats) take a `ShardedCache`
with global ids and return what the same sequences give on their shard's own single-device cache.
A refused call (``ok`` False on any shard) changes no shard. Their results are assembled from the
owning shards with small reductions over ``"data"`` (ids, slots, attention outputs); no K/V page
ever crosses devices. A jitted model step runs its layers inside one `shard_map` over both axes
and uses `local_cache` and `stacked_cache` directly (see `jaxpaged.models.parallel`).

Internal API: `dispatch` (how the public functions hand a `ShardedCache` over), `cache_partition`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import TYPE_CHECKING, Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpaged._src import checks
from jaxpaged._src import cache as cache_lib
from jaxpaged._src.spec import CacheSpec, JaxPagedError

if TYPE_CHECKING:
  from jaxpaged._src.cache import PagedKVCache

DATA, MODEL = "data", "model"


def make_mesh(data: int = 1, model: int = 1, *, devices: Any = None) -> Mesh:
  """A ``(data, model)`` mesh over the first ``data * model`` devices (or ``devices``).

  On a CPU-only machine, start Python with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` for 8 host devices.

  >>> mesh = make_mesh(1, 1)
  >>> dict(mesh.shape)
  {'data': 1, 'model': 1}
  """
  data = checks.count("data", data, minimum=1)
  model = checks.count("model", model, minimum=1)
  devices = list(jax.devices() if devices is None else devices)
  if data * model > len(devices):
    raise JaxPagedError(
        f"a mesh of data={data} x model={model} needs {data * model} devices, only "
        f"{len(devices)} are available; use fewer, or on CPU set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts.")
  return Mesh(np.asarray(devices[:data * model]).reshape(data, model), (DATA, MODEL))


def kv_replicas(num_kv_heads: int, model: int) -> int:
  """How many times each KV head is stored on a ``model``-way tensor-parallel axis: 1 when the
  heads divide evenly among the devices, ``model // num_kv_heads`` when each device holds one
  (replicated) head.

  >>> kv_replicas(8, 4), kv_replicas(2, 8)
  (1, 4)
  """
  if num_kv_heads % model == 0:
    return 1
  if model % num_kv_heads == 0:
    return model // num_kv_heads
  raise JaxPagedError(
      f"the mesh's model axis ({model}) must divide num_kv_heads ({num_kv_heads}) or be a "
      f"multiple of it (each head then stored model/num_kv_heads times); choose a model axis "
      f"among {[d for d in range(1, 65) if num_kv_heads % d == 0 or d % num_kv_heads == 0][:8]}.")


def _check_mesh(mesh: Any) -> Mesh:
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != (DATA, MODEL):
    raise JaxPagedError(f"mesh must be a jax.sharding.Mesh with axes ('data', 'model'), got "
                        f"{mesh!r}; build one with jaxpaged.make_mesh(data, model).")
  return mesh


@functools.partial(jax.tree_util.register_dataclass, data_fields=["shards"],
                   meta_fields=["spec", "mesh"])
@dataclasses.dataclass(frozen=True)
class ShardedCache:
  """A paged KV cache over a ``(data, model)`` mesh. Create with `init_sharded_cache`.

  Attributes:
    shards: a `PagedKVCache` whose every leaf has a leading ``[num_shards]`` axis (sharded over
      ``"data"``); its pools are ``[num_shards, num_layers, num_kv_heads * replicas, num_pages,
      page_size, head_dim]``, heads sharded over ``"model"``.
    spec: the `CacheSpec` of one shard, with the model's own ``num_kv_heads``.
    mesh: the mesh.

  >>> cache = init_sharded_cache(CacheSpec(num_layers=1, num_kv_heads=2, head_dim=8,
  ...     page_size=4, num_pages=8, max_seqs=2, max_pages_per_seq=4), make_mesh(1, 1))
  >>> cache.num_shards, cache.max_seqs, cache.shards.k_pages.shape
  (1, 2, (1, 1, 2, 8, 4, 8))
  """

  shards: PagedKVCache
  spec: CacheSpec
  mesh: Mesh

  @property
  def num_shards(self) -> int:
    """Data shards (independent caches)."""
    return int(self.mesh.shape[DATA])

  @property
  def replicas(self) -> int:
    """Copies of each KV head on the model axis."""
    return kv_replicas(self.spec.num_kv_heads, int(self.mesh.shape[MODEL]))

  @property
  def max_seqs(self) -> int:
    """Global sequence ids: ``[0, num_shards * spec.max_seqs)``."""
    return self.num_shards * self.spec.max_seqs

  @property
  def shard_slots(self) -> int:
    """Slots of one shard's pool (``num_pages * page_size``): global slot = shard * this +
    local slot."""
    return self.spec.num_pages * self.spec.page_size

  def shard_of(self, seq_id: int) -> int:
    """The data shard holding global sequence ``seq_id``."""
    return checks.integer("seq_id", seq_id, minimum=0, below=self.max_seqs) // self.spec.max_seqs


# What the public functions take: a single-device cache or a sharded one.
AnyCache = Union["PagedKVCache", ShardedCache]


def stored_spec(spec: CacheSpec, mesh: Mesh) -> CacheSpec:
  """The spec of one shard's stacked pools: KV heads times their replicas."""
  return dataclasses.replace(
      spec, num_kv_heads=spec.num_kv_heads * kv_replicas(spec.num_kv_heads,
                                                         int(mesh.shape[MODEL])))


def local_spec(spec: CacheSpec, mesh: Mesh) -> CacheSpec:
  """The spec one device sees inside `shard_map`: its share of the stored heads."""
  stored = stored_spec(spec, mesh)
  return dataclasses.replace(stored, num_kv_heads=stored.num_kv_heads // int(mesh.shape[MODEL]))


def cache_partition(shards: PagedKVCache) -> PagedKVCache:
  """The `PartitionSpec` of every leaf of a stacked cache (a `PagedKVCache`-shaped pytree)."""
  specs = jax.tree.map(lambda _: P(DATA), shards)
  return cache_lib.with_pools(specs, {name: P(DATA, None, MODEL)
                                      for name in cache_lib.pools(shards)})


def cache_shardings(cache: ShardedCache) -> ShardedCache:
  """`NamedSharding` of every leaf (for ``jax.jit(..., out_shardings=...)``)."""
  return dataclasses.replace(cache, shards=jax.tree.map(
      lambda p: NamedSharding(cache.mesh, p), cache_partition(cache.shards)))


def init_sharded_cache(spec: CacheSpec, mesh: Mesh) -> ShardedCache:
  """An empty cache on every data shard of ``mesh``, pools sharded over KV heads on
  ``"model"``. ``spec`` is one shard's (with the model's ``num_kv_heads``).

  >>> cache = init_sharded_cache(CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8,
  ...     page_size=4, num_pages=8, max_seqs=2, max_pages_per_seq=4), make_mesh(1, 1))
  >>> num_free_pages(cache).tolist()  # one count per data shard
  [8]
  """
  if not isinstance(spec, CacheSpec):
    raise JaxPagedError(f"init_sharded_cache expects a CacheSpec, got {type(spec).__name__}.")
  mesh = _check_mesh(mesh)
  stored = stored_spec(spec, mesh)
  shape = jax.eval_shape(lambda: cache_lib.init_cache(stored))
  like = ShardedCache(jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape, a.dtype),
                                   shape), spec, mesh)
  n = int(mesh.shape[DATA])
  make = jax.jit(lambda: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape),
                                      cache_lib.init_cache(stored)),
                 out_shardings=cache_shardings(like).shards)
  return ShardedCache(make(), spec, mesh)


def check_sharded(cache: Any, name: str = "cache") -> ShardedCache:
  """``cache``, after checking it is a live `ShardedCache`."""
  if not isinstance(cache, ShardedCache):
    raise JaxPagedError(f"{name} must be a jaxpaged.ShardedCache, got {type(cache).__name__}.")
  cache_lib.check_cache(cache.shards, name)
  return cache


# ----------------------------------------------------------------------------- in shard_map

def local_cache(block: PagedKVCache, spec: CacheSpec, mesh: Mesh) -> PagedKVCache:
  """Inside `shard_map`: this device's block of the stacked cache as an ordinary `PagedKVCache`
  (leading axis dropped, the spec of its share of heads)."""
  return dataclasses.replace(jax.tree.map(lambda a: a[0], block), spec=local_spec(spec, mesh))


def stacked_cache(cache: PagedKVCache, spec: CacheSpec, mesh: Mesh) -> PagedKVCache:
  """Inverse of `local_cache`: the block to return from `shard_map`."""
  return dataclasses.replace(jax.tree.map(lambda a: a[None], cache), spec=stored_spec(spec, mesh))


def expand_heads(x: jax.Array, replicas: int) -> jax.Array:
  """``[..., num_kv_heads, head_dim]`` K/V as stored: each head repeated ``replicas`` times."""
  return x if replicas == 1 else jnp.repeat(x, replicas, axis=-2)


def local_ids(ids: jax.Array, shard: jax.Array, max_seqs: int, num_shards: int) -> jax.Array:
  """Inside `shard_map`: global ids as this shard's local ids, -1 for rows of other shards.
  An id outside ``[-1, num_shards * max_seqs)`` becomes the out-of-range ``max_seqs`` on shard 0,
  so that shard refuses it (or ignores it) exactly as a single cache would."""
  bad = (ids < -1) | (ids >= num_shards * max_seqs)
  mine = (ids >= 0) & (ids // max_seqs == shard) & ~bad
  return jnp.where(mine, ids % max_seqs, jnp.where(bad & (shard == 0), max_seqs, -1))


def _all(ok: jax.Array) -> jax.Array:
  return jax.lax.pmin(ok.astype(jnp.int32), DATA) > 0


def _keep_if(ok: jax.Array, new: PagedKVCache, old: PagedKVCache) -> PagedKVCache:
  """``new`` where every shard accepted the call, else ``old``: atomic across shards."""
  return jax.lax.cond(ok, lambda: new, lambda: old)


def _global_slots(slots: jax.Array, shard: jax.Array, shard_slots: int) -> jax.Array:
  """Combines every shard's local slots (-1 where not its own) into global slots."""
  return jax.lax.pmax(jnp.where(slots >= 0, shard * shard_slots + slots, -1), DATA)


def map_shards(fn: Callable[..., Any], cache: ShardedCache, *args: Any,
               in_specs: tuple | None = None, out_specs: Any = P(DATA), updates: bool = True
               ) -> Any:
  """Runs ``fn(local_cache, *args)`` on every device of the cache's mesh (`jax.shard_map`): the
  way to write a step whose sequences stay on their shard, so no K/V crosses devices.

  ``local_cache`` is this device's ordinary `PagedKVCache`: its shard's pool, page tables and
  prefix table, with its share of the KV heads; use local ids ``[0, spec.max_seqs)`` and the
  usual jaxpaged functions on it. ``jax.lax.axis_index("data")`` is the shard; reduce over
  ``"model"`` (``jax.lax.psum``) where tensor parallelism needs it.

  Args:
    fn: ``fn(local_cache, *blocks) -> (local_cache, out)`` (``updates``) or ``-> out``.
    cache: the `ShardedCache`.
    args: arrays; each arrives as its block under ``in_specs``.
    in_specs: a `PartitionSpec` per argument (default ``P("data")``: a leading ``[num_shards]``
      axis, one entry per shard, which arrives with size 1).
    out_specs: how ``out`` is assembled (default ``P("data")``: stacked over shards).
    updates: whether ``fn`` returns a new local cache.

  Returns:
    ``(cache, out)``, or ``out`` when not ``updates``.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache = init_sharded_cache(spec, make_mesh(1, 1))
  >>> def step(local, counts):  # each shard extends its own sequence 0
  ...   local, slots, ok = extend(local, jnp.array([0]), counts[0], num_slots=3)
  ...   return local, slots[None]
  >>> cache, slots = map_shards(step, cache, jnp.array([[3]]))
  >>> slots.tolist(), num_free_pages(cache).tolist()
  ([[0, 1, 2]], [7])
  """
  spec, mesh = cache.spec, cache.mesh
  partition = cache_partition(cache.shards)
  in_specs = (P(DATA),) * len(args) if in_specs is None else tuple(in_specs)

  def run(block, *args):
    result = fn(local_cache(block, spec, mesh), *args)
    if not updates:
      return result
    new, out = result
    return stacked_cache(new, spec, mesh), out

  out = (partition, out_specs) if updates else out_specs
  mapped = jax.shard_map(run, mesh=mesh, in_specs=(partition,) + in_specs, out_specs=out,
                         check_vma=False)(cache.shards, *args)
  if not updates:
    return mapped
  return dataclasses.replace(cache, shards=mapped[0]), mapped[1]


def _on_shards(cache: ShardedCache, body: Callable, args: tuple, arg_specs: tuple,
               out_specs: Any, *, changes: bool = True):
  """`map_shards` of ``body(local_cache, shard_index, *args)``."""
  return map_shards(lambda local, *a: body(local, jax.lax.axis_index(DATA), *a), cache, *args,
                    in_specs=arg_specs, out_specs=out_specs, updates=changes)


# ----------------------------------------------------------------------------- the public ops

def _ids(cache: ShardedCache, name: str, ids: Any, length: int | None = None) -> jax.Array:
  ids = checks.index_vector(name, ids, length)
  if not checks.is_traced(ids):
    bad = np.flatnonzero((np.asarray(ids) < -1) | (np.asarray(ids) >= cache.max_seqs))
    if bad.size:
      raise JaxPagedError(
          f"{name} at rows {bad[:8].tolist()}: {np.asarray(ids)[bad[:8]].tolist()} is out of "
          f"range [-1, {cache.max_seqs}) (global ids of {cache.num_shards} shards x "
          f"{cache.spec.max_seqs} sequences; -1 for padding rows).")
  return ids


@functools.partial(jax.jit, static_argnames=("num_slots",))
def _extend(cache, seq_ids, counts, tokens, *, num_slots):
  from jaxpaged._src import paging
  n, m = cache.num_shards, cache.spec.max_seqs

  def body(local, shard, seq_ids, counts, tokens):
    new, slots, ok = paging.extend(local, local_ids(seq_ids, shard, m, n), counts,
                                   num_slots=num_slots, tokens=tokens)
    ok = _all(ok)
    slots = jnp.where(ok, _global_slots(slots, shard, cache.shard_slots), -1)
    return _keep_if(ok, new, local), (slots, ok)

  return _on_shards(cache, body, (seq_ids, counts, tokens), (P(), P(), P()), (P(), P()))


def extend(cache: ShardedCache, seq_ids, num_new_tokens, *, num_slots=None, tokens=None):
  """`jaxpaged.extend` on a `ShardedCache` (global ids; returns global slots)."""
  from jaxpaged._src import paging
  check_sharded(cache)
  seq_ids = _ids(cache, "seq_ids", seq_ids)
  num_new_tokens = checks.index_vector("num_new_tokens", num_new_tokens, seq_ids.shape[0])
  _, _, num_slots, tokens = paging.extend_args(_shape_only(cache), seq_ids, num_new_tokens,
                                               num_slots, tokens)
  (new, (slots, ok)) = _extend(cache, seq_ids, num_new_tokens, tokens, num_slots=num_slots)
  return new, slots, ok


def _shape_only(cache: ShardedCache) -> PagedKVCache:
  """A stand-in single-shard cache for argument checks that only read its spec."""
  return dataclasses.replace(cache.shards, spec=cache.spec)


@jax.jit
def _release(cache, seq_ids):
  from jaxpaged._src import paging
  n, m = cache.num_shards, cache.spec.max_seqs
  body = lambda local, shard, ids: (paging.release(local, local_ids(ids, shard, m, n)), ())
  return _on_shards(cache, body, (seq_ids,), (P(),), ())[0]


def release(cache: ShardedCache, seq_ids) -> ShardedCache:
  """`jaxpaged.release` on a `ShardedCache`."""
  check_sharded(cache)
  return _release(cache, checks.index_vector("seq_ids", seq_ids))


@jax.jit
def _fork(cache, src_ids, dst_ids):
  from jaxpaged._src import paging
  n, m = cache.num_shards, cache.spec.max_seqs

  def body(local, shard, src, dst):
    dst_local = local_ids(dst, shard, m, n)
    # The destination's shard forks its row; a source elsewhere (another shard, padding, out of
    # range) cannot be shared there, so it becomes an out-of-range id that shard refuses.
    here = (src >= 0) & (src < n * m) & (src // m == shard)
    src_local = jnp.where(dst_local >= 0, jnp.where(here, src % m, m), -1)
    new, ok = paging.fork(local, src_local, dst_local)
    ok = _all(ok)
    return _keep_if(ok, new, local), ok

  return _on_shards(cache, body, (src_ids, dst_ids), (P(), P()), P())


def _check_same_shard(cache: ShardedCache, src_ids: jax.Array, dst_ids: jax.Array) -> None:
  """Refuses (when the ids are known) a fork whose source and destination are on two shards."""
  if checks.is_traced(src_ids) or checks.is_traced(dst_ids):
    return
  s, d, m = np.asarray(src_ids), np.asarray(dst_ids), cache.spec.max_seqs
  split = np.flatnonzero((s >= 0) & (d >= 0) & (s // m != d // m))
  if split.size:
    raise JaxPagedError(
        f"fork rows {split[:8].tolist()}: source and destination are on different data shards "
        f"(shard = id // {m}); fork within a shard, or move the sequence to the destination's "
        "shard first.")


def check_fork(cache: ShardedCache, src_ids, dst_ids) -> None:
  """`jaxpaged.check_fork` on a `ShardedCache`."""
  from jaxpaged._src import paging
  check_sharded(cache)
  dst_ids = _ids(cache, "dst_ids", dst_ids)
  src_ids = _ids(cache, "src_ids", src_ids, dst_ids.shape[0])
  _check_same_shard(cache, src_ids, dst_ids)
  check_each(cache, paging.check_fork, {"dst_ids": dst_ids, "src_ids": src_ids})


def fork(cache: ShardedCache, src_ids, dst_ids):
  """`jaxpaged.fork` on a `ShardedCache`: each source and destination must be on one shard
  (move a sequence first, `CacheManager`'s ``move_sequence``, to fork it elsewhere)."""
  check_sharded(cache)
  dst_ids = _ids(cache, "dst_ids", dst_ids)
  src_ids = _ids(cache, "src_ids", src_ids, dst_ids.shape[0])
  _check_same_shard(cache, src_ids, dst_ids)
  return _fork(cache, src_ids, dst_ids)


@functools.partial(jax.jit, static_argnames=("policy",))
def _compress(cache, seq_ids, ratio, scores, *, policy):
  from jaxpaged._src import compress as comp
  n, m = cache.num_shards, cache.spec.max_seqs

  def body(local, shard, seq_ids, ratio, scores):
    ids = local_ids(seq_ids, shard, m, n)
    # Rows of other shards are padding here; their scores are not read.
    new, ok = comp.compress_core(local, ids, ratio, scores, policy=policy, axis=MODEL)
    ok = _all(ok)
    return _keep_if(ok, new, local), ok

  return _on_shards(cache, body, (seq_ids, ratio, scores), (P(), P(), P()), P())


def compress(cache: ShardedCache, seq_ids, ratio, scores, *, policy):
  """`jaxpaged.compress` on a `ShardedCache` (checked arguments, global ids): each sequence is
  compressed on its own shard; a refusal on any shard changes no shard. `KeyNorm` averages its
  key norms over every head of the model axis, so all devices of a shard keep the same tokens."""
  check_sharded(cache)
  seq_ids = _ids(cache, "seq_ids", seq_ids)
  return _compress(cache, seq_ids, ratio, scores, policy=policy)


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def _write_kv(cache, layer, k, v, slots, *, impl, interpret):
  from jaxpaged._src.write_kv import write_kv as write
  r = cache.replicas

  def body(local, shard, layer, k, v, slots):
    mine = (slots >= 0) & (slots // cache.shard_slots == shard)
    return write(local, layer, k, v, jnp.where(mine, slots % cache.shard_slots, -1),
                 impl=impl, interpret=interpret), ()

  heads = P(None, MODEL, None)
  return _on_shards(cache, body, (layer, expand_heads(k, r), expand_heads(v, r), slots),
                    (P(), heads, heads, P()), ())[0]


def write_kv(cache: ShardedCache, layer, k, v, slots, *, impl="auto", interpret=False):
  """`jaxpaged.write_kv` on a `ShardedCache` (global slots from `extend`)."""
  from jaxpaged._src import write_kv as wk
  check_sharded(cache)
  layer = cache_lib.check_layer(cache.spec, layer)
  wk.check_kv(cache.spec, k, v)
  slots = wk.check_slots(cache.num_shards * cache.shard_slots, slots, k.shape[0])
  if k.shape[0] == 0:
    return cache
  return _write_kv(cache, layer, k, v, slots, impl=impl, interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("ragged", "options"))
def _attention(q, cache, layer, seq_ids, q_lens, *, ragged, options):
  from jaxpaged._src import attention as single
  n, m = cache.num_shards, cache.spec.max_seqs

  def body(local, shard, q, layer, seq_ids, q_lens):
    ids = local_ids(seq_ids, shard, m, n)
    if ragged:
      out = single.ragged_paged_attention(q, local, layer, ids, q_lens, **dict(options))
    else:
      out = single.paged_attention(q, local, layer, ids, **dict(options))
    return jax.lax.psum(out, DATA)  # rows of other shards are zeros there

  heads = P(None, MODEL, None)
  return _on_shards(cache, body, (q, layer, seq_ids, q_lens), (heads, P(), P(), P()), heads,
                    changes=False)


def attention(q, cache: ShardedCache, layer, seq_ids, q_lens=None, **options) -> jax.Array:
  """`jaxpaged.paged_attention` (``q_lens`` None) or `jaxpaged.ragged_paged_attention` on a
  `ShardedCache`: query heads are sharded over ``"model"`` like the pools' heads."""
  check_sharded(cache)
  layer = cache_lib.check_layer(cache.spec, layer)
  seq_ids = _ids(cache, "seq_ids", seq_ids)
  model = int(cache.mesh.shape[MODEL])
  if (getattr(q, "ndim", 0) != 3 or q.shape[1] % model
      or q.shape[1] % cache.spec.num_kv_heads):
    raise JaxPagedError(
        f"q must be [tokens, num_q_heads, head_dim] with num_q_heads a multiple of the mesh's "
        f"model axis ({model}) and of num_kv_heads ({cache.spec.num_kv_heads}), got shape "
        f"{getattr(q, 'shape', None)}.")
  ragged = q_lens is not None
  q_lens = (checks.index_vector("q_lens", q_lens, seq_ids.shape[0]) if ragged
            else jnp.ones_like(seq_ids))
  return _attention(q, cache, layer, seq_ids, q_lens, ragged=ragged,
                    options=tuple(sorted(options.items())))


@functools.partial(jax.jit, static_argnames=("num_slots", "impl", "interpret", "has_max"))
def _match(cache, seq_ids, tokens, lengths, salts, max_prompt, *, num_slots, impl, interpret,
           has_max):
  from jaxpaged._src import prefix
  n, m = cache.num_shards, cache.spec.max_seqs

  def body(local, shard, seq_ids, tokens, lengths, salts, max_prompt):
    ids = local_ids(seq_ids, shard, m, n)
    new, found = prefix.match_prefix(local, ids, tokens, lengths, salts=salts,
                                     max_prompt_tokens=max_prompt if has_max else None,
                                     num_slots=num_slots, impl=impl, interpret=interpret)
    ok = _all(found.ok)
    mine = (ids >= 0) & (ids < m) & ok
    num_cached = jax.lax.psum(jnp.where(mine, found.num_cached, 0), DATA)
    num_new = jax.lax.psum(jnp.where(mine, found.num_new, 0), DATA)
    # Each shard's slots are laid out by its own rows only: re-lay them out by all rows.
    row, offset, valid = cache_lib.token_rows(num_new, num_slots)
    start = jnp.cumsum(found.num_new) - found.num_new
    at = jnp.clip(start[row] + offset, 0, num_slots - 1)
    slots = jnp.where(valid & mine[row], found.slots[at], -1)
    slots = _global_slots(slots, shard, cache.shard_slots)
    return _keep_if(ok, new, local), (num_cached, num_new, slots, ok)

  return _on_shards(cache, body, (seq_ids, tokens, lengths, salts, max_prompt),
                    (P(),) * 5, (P(),) * 4)


def match_prefix(cache: ShardedCache, seq_ids, tokens, lengths, *, salts=None,
                 max_prompt_tokens=None, num_slots=None, impl="auto", interpret=False):
  """`jaxpaged.match_prefix` on a `ShardedCache`: each row is matched against its own shard's
  prefix table (route a request to the shard holding its prefix: `jaxpaged.routing`)."""
  from jaxpaged._src import prefix
  check_sharded(cache)
  seq_ids = _ids(cache, "seq_ids", seq_ids)
  _, _, tokens, lengths, salts, max_prompt, num_slots = prefix.match_args(
      _shape_only(cache), jnp.where(seq_ids >= 0, seq_ids % cache.spec.max_seqs, -1), tokens,
      lengths, salts, max_prompt_tokens, num_slots)
  has_max = max_prompt is not None
  cache, found = _match(cache, seq_ids, tokens, lengths, salts,
                max_prompt if has_max else jnp.zeros((), jnp.int32), num_slots=num_slots,
                impl=impl, interpret=bool(interpret), has_max=has_max)
  return cache, prefix.PrefixMatch(*found)


@functools.partial(jax.jit, static_argnames=("num_slots",))
def _positions(cache, seq_ids, counts, *, num_slots):
  from jaxpaged._src import paging
  n, m = cache.num_shards, cache.spec.max_seqs

  def body(local, shard, seq_ids, counts):
    ids = local_ids(seq_ids, shard, m, n)
    return jax.lax.pmax(paging.token_positions(local, ids, counts, num_slots=num_slots), DATA)

  return _on_shards(cache, body, (seq_ids, counts), (P(), P()), P(), changes=False)


def token_positions(cache: ShardedCache, seq_ids, num_new_tokens, *, num_slots=None):
  """`jaxpaged.token_positions` on a `ShardedCache`."""
  check_sharded(cache)
  seq_ids = _ids(cache, "seq_ids", seq_ids)
  counts = checks.index_vector("num_new_tokens", num_new_tokens, seq_ids.shape[0])
  return _positions(cache, seq_ids, counts,
                    num_slots=cache_lib.check_num_slots(cache.spec, num_slots, seq_ids.shape[0]))


# ----------------------------------------------------------------------------- one shard at a time

@functools.partial(jax.jit, static_argnames=("shard",))
def shard_view(cache: ShardedCache, shard: int) -> PagedKVCache:
  """Data shard ``shard`` as an ordinary `PagedKVCache` with the model's own heads (replicas
  dropped): what the same sequences give on one device. For host operations and tests.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_sharded_cache(spec, make_mesh(1, 1)), jnp.array([1]),
  ...                      jnp.array([5]), num_slots=5)
  >>> shard_view(cache, 0).seq_lens.tolist()
  [0, 5]
  """
  one = jax.tree.map(lambda a: a[shard], cache.shards)
  r = cache.replicas
  return dataclasses.replace(cache_lib.with_pools(one, {
      name: pool[:, ::r] for name, pool in cache_lib.pools(one).items()}), spec=cache.spec)


@functools.partial(jax.jit, static_argnames=("shard",))
def _put(cache: ShardedCache, view: PagedKVCache, shard: int) -> ShardedCache:
  r = cache.replicas
  view = dataclasses.replace(cache_lib.with_pools(view, {
      name: jnp.repeat(pool, r, axis=1) for name, pool in cache_lib.pools(view).items()}),
                             spec=cache.shards.spec)
  shards = jax.tree.map(lambda a, b: a.at[shard].set(b), cache.shards, view)
  return dataclasses.replace(cache, shards=jax.lax.with_sharding_constraint(
      shards, cache_shardings(cache).shards))


def on_shard(cache: ShardedCache, shard: int, fn: Callable[..., tuple[PagedKVCache, Any]],
             *args, **kwargs) -> tuple[ShardedCache, Any]:
  """Runs ``fn(view, *args, **kwargs) -> (view, out)`` on data shard ``shard``'s cache and puts
  the result back (the other shards unchanged): how host operations (swap, demote, promote,
  moves between shards) reach one shard."""
  view, out = fn(shard_view(cache, shard), *args, **kwargs)
  return _put(cache, view, shard), out


def _local(cache: ShardedCache, seq_id: Any) -> tuple[int, int]:
  """(shard, local id) of a global sequence id."""
  shard = cache.shard_of(seq_id)
  return shard, int(seq_id) - shard * cache.spec.max_seqs


def _on_own_shard(cache: ShardedCache, seq_id: Any, fn: Callable, *args, **kwargs):
  """`on_shard` of ``fn(view, local_id, *args)`` on ``seq_id``'s shard; an error names the
  global id the caller gave, not the shard's local one."""
  shard, local = _local(cache, seq_id)
  try:
    return on_shard(cache, shard, fn, local, *args, **kwargs)
  except JaxPagedError as e:
    raise JaxPagedError(re.sub(rf"\bseq_id {local}\b", f"seq_id {int(seq_id)}", str(e))) from e


def swap_out(cache: ShardedCache, seq_ids):
  """`jaxpaged.swap_out` on a `ShardedCache`; the `SwappedSequence`s keep global ids."""
  from jaxpaged._src import swap
  check_sharded(cache)
  ids = checks.id_list("seq_ids", seq_ids, cache.max_seqs, distinct=True)
  lengths = np.asarray(cache.shards.seq_lens).reshape(-1)
  if (lengths[ids] == 0).any():
    raise JaxPagedError(f"seq_ids {[i for i in ids if lengths[i] == 0]} hold no tokens; swap out "
                        "only sequences in use.")
  out = {}
  for shard in sorted({cache.shard_of(i) for i in ids}):
    mine = [i for i in ids if cache.shard_of(i) == shard]
    cache, swapped = on_shard(cache, shard, swap.swap_out,
                              [i - shard * cache.spec.max_seqs for i in mine])
    out.update({i: dataclasses.replace(s, seq_id=i) for i, s in zip(mine, swapped)})
  return cache, [out[i] for i in ids]


def swap_in(cache: ShardedCache, swapped, *, seq_id=None):
  """`jaxpaged.swap_in` on a `ShardedCache`: into ``seq_id`` (a global id; default the one it
  left), on that id's shard."""
  from jaxpaged._src import swap
  check_sharded(cache)
  target = swapped.seq_id if seq_id is None else seq_id
  return _on_own_shard(cache, target,
                       lambda view, local: swap.swap_in(view, swapped, seq_id=local))


def demote_blocks(cache: ShardedCache, count: int, *, keep=(), shard: int | None = None):
  """`jaxpaged.demote_blocks` on a `ShardedCache`: up to ``count`` blocks from ``shard``, or
  from every shard (``count`` each) when None. ``keep`` holds global page ids (``shard *
  num_pages + page``). Blocks are shard-independent: any shard can promote them."""
  from jaxpaged._src import blocks
  check_sharded(cache)
  shards = range(cache.num_shards) if shard is None else [
      checks.integer("shard", shard, minimum=0, below=cache.num_shards)]
  pages = cache.num_shards * cache.spec.num_pages
  keep = [int(p) for p in checks.host_token_ids("keep", np.asarray(keep).reshape(-1))]
  bad = [p for p in keep if not 0 <= p < pages]
  if bad:
    raise JaxPagedError(f"keep holds pages {bad[:4]} outside [0, {pages}) (global page ids: "
                        f"shard * num_pages + page); pass page ids of this cache.")
  out = []
  for s in shards:
    local_keep = [p - s * cache.spec.num_pages for p in keep
                  if p // cache.spec.num_pages == s]
    cache, demoted = on_shard(cache, s, blocks.demote_blocks, count, keep=local_keep)
    out += demoted
  return cache, out


def promote_blocks(cache: ShardedCache, seq_id: int, host_blocks):
  """`jaxpaged.promote_blocks` on a `ShardedCache` (global ``seq_id``)."""
  from jaxpaged._src import blocks
  check_sharded(cache)
  return _on_own_shard(cache, seq_id, blocks.promote_blocks, host_blocks)


@jax.jit
def _gather(cache, layer, seq_id):
  from jaxpaged._src import paging
  n, m = cache.num_shards, cache.spec.max_seqs

  def body(local, shard, layer, seq_id):
    mine = (seq_id >= 0) & (seq_id < n * m) & (seq_id // m == shard)
    k, v = paging.gather_kv(local, layer, jnp.where(mine, seq_id % m, -1))  # -1: zeros
    return jax.lax.psum(k, DATA), jax.lax.psum(v, DATA)  # one sequence's K/V, from its shard

  heads = P(None, MODEL, None)
  k, v = _on_shards(cache, body, (layer, seq_id), (P(), P()), (heads, heads), changes=False)
  return k[:, ::cache.replicas], v[:, ::cache.replicas]


def gather_kv(cache: ShardedCache, layer, seq_id):
  """`jaxpaged.gather_kv` on a `ShardedCache` (global ``seq_id``; traceable)."""
  check_sharded(cache)
  layer = cache_lib.check_layer(cache.spec, layer)
  seq_id = cache_lib.check_index("seq_id", seq_id, cache.max_seqs, "num_shards * max_seqs")
  return _gather(cache, layer, seq_id)


def per_shard(cache: ShardedCache, fn: Callable[[PagedKVCache], Any]) -> Any:
  """``fn`` (a read of one cache, such as `num_free_pages` or `prefix_stats`) of every data
  shard, stacked: leaves ``[num_shards, ...]``."""
  check_sharded(cache)
  return jax.vmap(lambda one: fn(dataclasses.replace(one, spec=cache.shards.spec)))(
      cache.shards)


def check_each(cache: ShardedCache, check: Callable, ids: dict[str, Any], *args, **kwargs
               ) -> None:
  """Runs a single-cache ``check_*`` (`check_extend`, `check_fork`, `check_match_prefix`) on
  every shard, each with its own rows (``ids``: the id arguments by name, global)."""
  check_sharded(cache)
  ids = {name: np.asarray(_ids(cache, name, value)) for name, value in ids.items()}
  m = cache.spec.max_seqs
  lead = next(iter(ids.values()))
  for shard in range(cache.num_shards):
    mine = (lead >= 0) & (lead // m == shard)
    local = {name: jnp.asarray(np.where(mine, v % m, -1), jnp.int32) for name, v in ids.items()}
    check(shard_view(cache, shard), *args, **local, **kwargs)


@jax.jit
def _reset(cache):
  from jaxpaged._src import prefix

  def body(local, shard):
    new, ok = prefix.reset_prefix_cache(local)
    ok = _all(ok)
    return _keep_if(ok, new, local), ok

  return _on_shards(cache, body, (), (), P())


def reset_prefix_cache(cache: ShardedCache):
  """`jaxpaged.reset_prefix_cache` on every shard: ``(cache, ok)``, refused on all shards while
  any shard has a page in use."""
  check_sharded(cache)
  return _reset(cache)
