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
