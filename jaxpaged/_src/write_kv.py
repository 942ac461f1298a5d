"""Scatter new K/V into pages: the Pallas GPU kernel, its builder, the public wrapper, the XLA path.

GPU backend: Pallas **Triton**, chosen knowingly although JAX deprecates it from 0.11. Triton
runs on every CUDA GPU from sm80 (A100) up, supports the per-token dynamic addressing that paged
kernels are made of, lowers without a GPU on both supported JAX versions (0.10 and 0.12) and runs
under ``interpret=True`` on CPU. Mosaic GPU targets Hopper and later, and on JAX 0.12 plain
``pl.pallas_call`` no longer lowers to it. Every kernel picks its backend through
`jaxpaged._src.gpu`, so a move to Mosaic GPU is one place to change.

The XLA path is a single scatter and is also the reference: there is no simpler statement of
"put token t's K/V at slot t".
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
from jaxpaged._src import prefix_state
from jaxpaged._src.cache import PagedKVCache, check_cache, check_layer
from jaxpaged._src.spec import CacheSpec, JaxPagedError

# Where the pools are in the kernel's operands, (slots, layer, k, v, k_pages, v_pages): each is
# aliased to the output it becomes, so the kernel writes the pools in place.
_K_PAGES_OPERAND, _V_PAGES_OPERAND = 4, 5


def _write_kv_kernel(
    slots_ref,  # [T] int32
    layer_ref,  # [1] int32
    k_ref,  # [T, num_kv_heads, head_dim]
    v_ref,  # [T, num_kv_heads, head_dim]
    k_pages_in_ref,  # aliased to k_pages_ref
    v_pages_in_ref,  # aliased to v_pages_ref
    k_pages_ref,  # [num_layers, num_kv_heads, num_pages, page_size, head_dim]
    v_pages_ref,  # [num_layers, num_kv_heads, num_pages, page_size, head_dim]
):
  """One program per token: copies its K and V rows (all heads) into its slot."""
  del k_pages_in_ref, v_pages_in_ref
  num_layers, num_kv_heads, num_pages, page_size, head_dim = k_pages_ref.shape
  t = pl.program_id(0)
  slot = slots_ref[t]
  layer = layer_ref[0]

  @pl.when((slot >= 0) & (slot < num_pages * page_size) & (layer >= 0) & (layer < num_layers))
  def _():
    page, offset = slot // page_size, slot % page_size
    for h in range(num_kv_heads):
      # Triton blocks must be powers of two: head_dim 80 is copied as 64 + 16.
      for start, size in gpu.pow2_chunks(head_dim):
        d = pl.ds(start, size)
        k_pages_ref[layer, h, page, offset, d] = k_ref[t, h, d]
        v_pages_ref[layer, h, page, offset, d] = v_ref[t, h, d]


def _write_kv_pallas(k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array, k: jax.Array,
                     v: jax.Array, slots: jax.Array, *,
                     interpret: bool) -> tuple[jax.Array, jax.Array]:
  num_tokens = k.shape[0]
  return pl.pallas_call(
      _write_kv_kernel,
      grid=(num_tokens,),
      out_shape=(jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),) * 2,
      input_output_aliases={_K_PAGES_OPERAND: 0, _V_PAGES_OPERAND: 1},
      # One warp: a program copies one token's few rows. One stage: no loop of loads to pipeline.
      compiler_params=gpu.compiler_params(num_warps=1, num_stages=1),
      interpret=interpret,
      name="jaxpaged_write_kv",
  )(slots, layer.reshape(1), k, v, k_pages, v_pages)


def _write_kv_xla(k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array, k: jax.Array,
                  v: jax.Array, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
  num_layers, _, num_pages, page_size, _ = k_pages.shape
  valid = (slots >= 0) & (slots < num_pages * page_size)
  page = jnp.where(valid, slots // page_size, num_pages)  # out of bounds: dropped
  layer = jnp.where((layer >= 0) & (layer < num_layers), layer, num_layers)
  # [layer, :, page, offset] puts the token axis first: the update is [T, heads, head_dim].
  return (k_pages.at[layer, :, page, slots % page_size].set(k, mode="drop"),
          v_pages.at[layer, :, page, slots % page_size].set(v, mode="drop"))


def write_kv(cache: sharding.AnyCache, layer: int | jax.Array, k: jax.Array, v: jax.Array,
             slots: ArrayLike, *, impl: str = "auto", interpret: bool = False) -> sharding.AnyCache:
  """Writes new keys and values into their cache slots (slots < 0 are skipped).

  Args:
    cache: the cache; it is not changed (a new one is returned). Called eagerly this copies the
      pools: jit your step and donate the cache there to write in place.
    layer: layer index, a Python int (checked now) or an int32 scalar (e.g. inside a
      `lax.scan` over layers; out of range there writes nothing).
    k, v: ``[T, num_kv_heads, head_dim]`` in the cache's dtype.
    slots: ``int32[T]`` from `extend`.
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
  """``k`` and ``v`` must be ``[T, num_kv_heads, head_dim]`` arrays of the cache's dtype."""
  expected = f"[T, num_kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim}]"
  for name, x in (("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 3 or x.shape[1:] != (spec.num_kv_heads, spec.head_dim):
      raise JaxPagedError(f"{name} must have shape {expected}, got "
                          f"{getattr(x, 'shape', type(x).__name__)}; reshape the projection "
                          "output to one row per new token.")
    if x.dtype != spec.dtype:
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
  if impl == "pallas":
    k_pages, v_pages = _write_kv_pallas(cache.k_pages, cache.v_pages, layer, k, v, slots,
                                        interpret=interpret)
  else:
    k_pages, v_pages = _write_kv_xla(cache.k_pages, cache.v_pages, layer, k, v, slots)
  prefix = cache.prefix
  if prefix is not None:  # a block is served only once every layer of it was written
    prefix = prefix_state.note_written(prefix, layer, slots, cache.spec.page_size)
  return dataclasses.replace(cache, k_pages=k_pages, v_pages=v_pages, prefix=prefix)
