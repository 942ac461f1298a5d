"""Scatter new K/V into pages: the Pallas GPU kernel, its builder, the public wrapper, the XLA path.

GPU backend: Pallas **Triton**, chosen knowingly although JAX deprecates it from 0.11. Triton
runs on every CUDA GPU from sm80 (A100) up, supports the per-token dynamic addressing that paged
kernels are made of, lowers without a GPU on both supported JAX versions (0.10 and 0.12) and runs
under ``interpret=True`` on CPU. Mosaic GPU targets Hopper and later, and on JAX 0.12 plain
``pl.pallas_call`` no longer lowers to it. Every kernel picks its backend through
`jaxpaged._src.gpu`, so a move to Mosaic GPU is one place to change.

The XLA path is a single scatter and is also the reference: there is no simpler statement of
"put token t's K/V at slot t". An 8-bit cache quantizes the new rows first (`quant.quantize`,
shared by both paths); both then scatter values and, with per-token scales, the scales.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.typing import ArrayLike

from jaxpaged._src import sharding
from jaxpaged._src import checks
from jaxpaged._src import gpu
from jaxpaged._src import cache as cache_lib
from jaxpaged._src import prefix_state
from jaxpaged._src import quant
from jaxpaged._src.cache import PagedKVCache, check_cache, check_layer
from jaxpaged._src.spec import FLOAT_DTYPES, CacheSpec, JaxPagedError

def _write_kv_kernel(slots_ref, layer_ref, *refs):
  """One program per token: copies its rows (all heads) of every pool into its slot.

  ``refs``: for each of the n pools, the token's rows ``[T, num_kv_heads(, head_dim)]``; then the
  n pools as inputs (aliased to the outputs, unused); then the n pools as outputs, K/V
  ``[num_layers, num_kv_heads, num_pages, page_size, head_dim]``, scales without head_dim.
  """
  n = len(refs) // 3
  rows, pools = refs[:n], refs[2 * n:]
  num_layers, num_kv_heads, num_pages, page_size = pools[0].shape[:4]
  t = pl.program_id(0)
  slot = slots_ref[t]
  layer = layer_ref[0]

  @pl.when((slot >= 0) & (slot < num_pages * page_size) & (layer >= 0) & (layer < num_layers))
  def _():
    page, offset = slot // page_size, slot % page_size
    for row, pool in zip(rows, pools):
      for h in range(num_kv_heads):
        if len(pool.shape) == 4:  # a scale: one float per (token, head)
          pool[layer, h, page, offset] = row[t, h]
          continue
        # Triton blocks must be powers of two: head_dim 80 is copied as 64 + 16.
        for start, size in gpu.pow2_chunks(pool.shape[4]):
          d = pl.ds(start, size)
          pool[layer, h, page, offset, d] = row[t, h, d]


def _write_kv_pallas(pools: dict, layer: jax.Array, rows: dict, slots: jax.Array, *,
                     interpret: bool) -> dict:
  names = list(pools)
  n = len(names)
  out = pl.pallas_call(
      _write_kv_kernel,
      grid=(slots.shape[0],),
      out_shape=tuple(jax.ShapeDtypeStruct(pools[k].shape, pools[k].dtype) for k in names),
      # Operands (slots, layer, rows..., pools...): each pool is aliased to the output it
      # becomes, so the kernel writes the pools in place.
      input_output_aliases={2 + n + i: i for i in range(n)},
      # One warp: a program copies one token's few rows. One stage: no loop of loads to pipeline.
      compiler_params=gpu.compiler_params(num_warps=1, num_stages=1),
      interpret=interpret,
      name="jaxpaged_write_kv",
  )(slots, layer.reshape(1), *(rows[k] for k in names), *(pools[k] for k in names))
  return dict(zip(names, out))


def _write_kv_xla(pools: dict, layer: jax.Array, rows: dict, slots: jax.Array) -> dict:
  num_layers, _, num_pages, page_size = pools["k_pages"].shape[:4]
  valid = (slots >= 0) & (slots < num_pages * page_size)
  page = jnp.where(valid, slots // page_size, num_pages)  # out of bounds: dropped
  layer = jnp.where((layer >= 0) & (layer < num_layers), layer, num_layers)
  # [layer, :, page, offset] puts the token axis first: the update is [T, heads(, head_dim)].
  return {name: pool.at[layer, :, page, slots % page_size].set(rows[name], mode="drop")
          for name, pool in pools.items()}


def write_kv(cache: sharding.AnyCache, layer: int | jax.Array, k: jax.Array, v: jax.Array,
             slots: ArrayLike, *, impl: str = "auto", interpret: bool = False) -> sharding.AnyCache:
  """Writes new keys and values into their cache slots (slots < 0 are skipped).

  Args:
    cache: the cache; it is not changed (a new one is returned). Called eagerly this copies the
      pools: jit your step and donate the cache there to write in place.
    layer: layer index, a Python int (checked now) or an int32 scalar (e.g. inside a
      `lax.scan` over layers; out of range there writes nothing).
    k, v: ``[T, num_kv_heads, head_dim]`` in the cache's dtype; for an 8-bit cache any float
      dtype, quantized here (`jaxpaged._src.quant`: with per-token scales each (token, head)
      row gets its own scale).
    slots: ``int32[T]`` from `extend` (distinct: which of two rows given one slot lands there
      is unspecified, and in an 8-bit cache its values and its scale may come from different
      rows).
    impl: ``"auto"`` (Pallas on GPU, XLA elsewhere), ``"xla"`` or ``"pallas"``.
    interpret: run the Pallas kernel in interpret mode (on CPU, for tests).

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, page_size=4, num_pages=4,
  ...                  max_seqs=1, max_pages_per_seq=4)
  >>> cache, slots, ok = extend(init_cache(spec), jnp.array([0]), jnp.array([1]))
  >>> cache = write_kv(cache, 0, jnp.ones((1, 1, 2)), jnp.ones((1, 1, 2)), slots)
  >>> gather_kv(cache, 0, 0)[0][:2, 0].tolist()
  [[1.0, 1.0], [0.0, 0.0]]
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.write_kv(cache, layer, k, v, slots, impl=impl, interpret=interpret)
  spec = check_cache(cache)
  layer = check_layer(spec, layer)
  check_kv(spec, k, v)
  slots = check_slots(spec.num_pages * spec.page_size, slots, k.shape[0])
  if not isinstance(interpret, (bool, np.bool_)):
    raise JaxPagedError(f"interpret must be a bool, got {interpret!r}.")
  impl = gpu.resolve_impl(impl)
  if k.shape[0] == 0:
    return cache
  return _write_kv(cache, layer, k, v, slots, impl=impl, interpret=bool(interpret))


def check_kv(spec: CacheSpec, k: Any, v: Any) -> None:
  """``k`` and ``v`` must be ``[T, num_kv_heads, head_dim]`` arrays of the cache's dtype (any
  float dtype for an 8-bit cache, which quantizes them)."""
  expected = f"[T, num_kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim}]"
  for name, x in (("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 3 or x.shape[1:] != (spec.num_kv_heads, spec.head_dim):
      raise JaxPagedError(f"{name} must have shape {expected}, got "
                          f"{getattr(x, 'shape', type(x).__name__)}; reshape the projection "
                          "output to one row per new token.")
    if spec.quantized and x.dtype not in FLOAT_DTYPES:
      raise JaxPagedError(f"{name} has dtype {x.dtype} but this {spec.dtype} cache quantizes "
                          f"float K/V (float32, bfloat16 or float16); pass the model's K/V "
                          "before any rounding.")
    if not spec.quantized and x.dtype != spec.dtype:
      raise JaxPagedError(f"{name} has dtype {x.dtype} but the cache stores {spec.dtype}; "
                          f"cast with {name}.astype({spec.dtype.name!r}).")
  if k.shape != v.shape:
    raise JaxPagedError(f"k and v must have the same shape, got {k.shape} and {v.shape}.")


def check_slots(capacity: int, slots: ArrayLike, rows: int) -> jax.Array:
  """``slots`` as ``int32[rows]``; known values past the pool's ``capacity`` slots are refused
  (their K/V would be lost), negative ones skip their row."""
  slots = checks.index_vector("slots", slots, rows, per="row of k: the slots `extend` returned")
  if not checks.is_traced(slots) and (np.asarray(slots) >= capacity).any():
    past = np.asarray(slots)[np.asarray(slots) >= capacity]
    raise JaxPagedError(f"slots holds {past[:checks.SHOWN_VALUES]}, past the pool's {capacity} "
                        "slots (num_pages * page_size, times the data shards on a mesh): their K/V would be lost; pass the slots "
                        "`extend` returned (-1 skips a row).")
  return slots


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def _write_kv(cache: PagedKVCache, layer: jax.Array, k: jax.Array, v: jax.Array,
              slots: jax.Array, *, impl: str, interpret: bool) -> PagedKVCache:
  spec = cache.spec
  rows = {}
  rows["k_pages"], rows["k_scales"] = quant.quantize(k, spec, layer, 0)
  rows["v_pages"], rows["v_scales"] = quant.quantize(v, spec, layer, 1)
  pools = cache_lib.pools(cache)
  if impl == "pallas":
    pools = _write_kv_pallas(pools, layer, rows, slots, interpret=interpret)
  else:
    pools = _write_kv_xla(pools, layer, rows, slots)
  prefix = cache.prefix
  if prefix is not None:  # a block is served only once every layer of it was written
    prefix = prefix_state.note_written(prefix, layer, slots, spec.page_size)
  return dataclasses.replace(cache_lib.with_pools(cache, pools), prefix=prefix)
