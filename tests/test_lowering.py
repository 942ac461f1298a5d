"""Every Pallas kernel lowers for CUDA on this CPU-only machine (block shapes and ops are checked
by the Triton lowering without a GPU)."""

import functools

import jax
import jax.numpy as jnp
import pytest

import jaxpaged as jp
from tests.helpers import TRITON_CALL, lower_for_cuda

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_write_kv_kernel_lowers_for_cuda(dtype, head_dim):
  spec = jp.CacheSpec(num_layers=2, num_kv_heads=3, head_dim=head_dim, page_size=16,
                      num_pages=64, max_seqs=4, max_pages_per_seq=16, dtype=dtype)
  cache = jax.eval_shape(jp.init_cache, spec)
  kv = jax.ShapeDtypeStruct((8, 3, head_dim), dtype)
  slots = jax.ShapeDtypeStruct((8,), jnp.int32)
  write = functools.partial(jp.write_kv, impl="pallas")
  hlo = lower_for_cuda(write, cache, 1, kv, kv, slots, donate_argnums=0)
  assert TRITON_CALL in hlo


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("ragged", [False, True])
def test_attention_kernel_lowers_for_cuda(dtype, head_dim, ragged):
  spec = jp.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=head_dim, page_size=16,
                      num_pages=128, max_seqs=4, max_pages_per_seq=64, dtype=dtype)
  cache = jax.eval_shape(jp.init_cache, spec)
  ids = jax.ShapeDtypeStruct((4,), jnp.int32)
  if ragged:
    q = jax.ShapeDtypeStruct((64, 8, head_dim), dtype)
    attend = functools.partial(jp.ragged_paged_attention, impl="pallas", sliding_window=128,
                               soft_cap=30.0)
    hlo = lower_for_cuda(attend, q, cache, 1, ids, ids)
  else:
    q = jax.ShapeDtypeStruct((4, 8, head_dim), dtype)
    hlo = lower_for_cuda(functools.partial(jp.paged_attention, impl="pallas"), q, cache, 1, ids)
  assert TRITON_CALL in hlo


@pytest.mark.parametrize("dtype,static_scales", [
    (jnp.int8, None), (jnp.float8_e4m3fn, None), (jnp.float8_e5m2, (0.05, 0.02))])
def test_8bit_kernels_lower_for_cuda(dtype, static_scales):
  """The write kernel quantizes into 8-bit pages and scale pools; attention reads both."""
  spec = jp.CacheSpec(num_layers=2, num_kv_heads=3, head_dim=80, page_size=16, num_pages=64,
                      max_seqs=4, max_pages_per_seq=16, dtype=dtype, static_scales=static_scales)
  cache = jax.eval_shape(jp.init_cache, spec)
  kv = jax.ShapeDtypeStruct((8, 3, 80), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((4,), jnp.int32)
  write = functools.partial(jp.write_kv, impl="pallas")
  assert TRITON_CALL in lower_for_cuda(write, cache, 1, kv, kv, jax.ShapeDtypeStruct(
      (8,), jnp.int32), donate_argnums=0)
  q = jax.ShapeDtypeStruct((4, 6, 80), jnp.bfloat16)
  attend = functools.partial(jp.paged_attention, impl="pallas")
  assert TRITON_CALL in lower_for_cuda(attend, q, cache, 1, ids)


@pytest.mark.parametrize("queries", [1, 300])
def test_prefix_lookup_kernel_lowers_for_cuda(queries):
  from jaxpaged._src import table  # pylint: disable=g-import-not-at-top
  lanes = jax.ShapeDtypeStruct((1024,), jnp.int32)
  hashes = jax.ShapeDtypeStruct((queries, 2), jnp.uint32)
  lookup = functools.partial(table.lookup, impl="pallas")
  hlo = lower_for_cuda(lookup, lanes, lanes, lanes, hashes)
  assert TRITON_CALL in hlo
