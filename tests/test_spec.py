"""CacheSpec validation and init_cache."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp

GOOD = dict(num_layers=2, num_kv_heads=4, head_dim=64, page_size=16, num_pages=32, max_seqs=4,
            max_pages_per_seq=8)


def test_spec_is_frozen_hashable_and_canonicalises_dtype():
  a = jp.CacheSpec(**GOOD, dtype="bfloat16")
  b = jp.CacheSpec(**GOOD, dtype=jnp.bfloat16)
  assert a == b and hash(a) == hash(b) and a.dtype == jnp.dtype(jnp.bfloat16)
  with pytest.raises(Exception):
    a.page_size = 8  # frozen


@pytest.mark.parametrize("field,value,needle", [
    ("page_size", 0, "page_size must be positive, got 0"),
    ("num_pages", -3, "num_pages must be positive, got -3"),
    ("head_dim", 64.0, "head_dim must be a Python int"),
    ("max_seqs", True, "max_seqs must be a Python int"),
    ("dtype", jnp.int16, "dtype must be one of float32, bfloat16, float16, int8"),
    ("dtype", "not-a-dtype", "dtype must be one of float32"),
    ("static_scales", (0.1, 0.2), "static_scales applies to 8-bit K/V only"),
])
def test_spec_rejects_bad_fields_with_a_fix(field, value, needle):
  with pytest.raises(jp.JaxPagedError, match=needle):
    jp.CacheSpec(**{**GOOD, field: value})


def test_spec_rejects_capacities_that_overflow_int32():
  with pytest.raises(jp.JaxPagedError, match="overflows int32 token positions"):
    jp.CacheSpec(**{**GOOD, "page_size": 2**16, "max_pages_per_seq": 2**16})
  with pytest.raises(jp.JaxPagedError, match="overflows int32 slot ids"):
    jp.CacheSpec(**{**GOOD, "page_size": 2**16, "num_pages": 2**16})
  assert issubclass(jp.JaxPagedError, ValueError)


def test_init_cache_is_an_empty_pytree_of_arrays_and_works_under_eval_shape():
  spec = jp.CacheSpec(**GOOD)
  shapes = jax.eval_shape(jp.init_cache, spec)
  assert shapes.k_pages.shape == (2, 4, 32, 16, 64) == spec.pages_shape
  assert shapes.page_table.shape == (4, 8) and shapes.page_table.dtype == jnp.int32
  cache = jp.init_cache(spec)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(cache))
  assert len(jax.tree.leaves(cache)) == 8  # no scale pools: float K/V
  assert cache.spec == spec
  np.testing.assert_array_equal(cache.page_table, -1)
  np.testing.assert_array_equal(cache.seq_lens, 0)
  assert int(jp.num_free_pages(cache)) == 32 and int(jp.num_used_pages(cache)) == 0
  chex.assert_trees_all_equal_shapes(jax.tree.map(jnp.zeros_like, cache), cache)


def test_init_cache_rejects_non_spec():
  with pytest.raises(jp.JaxPagedError, match="expects a CacheSpec"):
    jp.init_cache(GOOD)
