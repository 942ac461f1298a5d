"""write_kv: the XLA path and the Pallas kernel (interpret mode) against a NumPy model."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from tests.helpers import numpy_write


def _setup(dtype, head_dim=16, num_kv_heads=3, page_size=4, num_tokens=11, seed=0):
  spec = jp.CacheSpec(num_layers=3, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      page_size=page_size, num_pages=12, max_seqs=4, max_pages_per_seq=6,
                      dtype=dtype)
  rng = np.random.default_rng(seed)
  # A non-zero pool, so that a write to the wrong place shows.
  cache = dataclasses.replace(jp.init_cache(spec),
                              k_pages=jnp.asarray(rng.normal(size=spec.pages_shape), dtype),
                              v_pages=jnp.asarray(rng.normal(size=spec.pages_shape), dtype))
  slots = rng.permutation(spec.num_pages * page_size)[:num_tokens].astype(np.int32)
  slots[[2, 7]] = [-1, -5]  # skipped
  k = jnp.asarray(rng.normal(size=(num_tokens, num_kv_heads, head_dim)), dtype)
  v = jnp.asarray(rng.normal(size=(num_tokens, num_kv_heads, head_dim)), dtype)
  return cache, k, v, jnp.asarray(slots)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("head_dim", [16, 80])
def test_write_kv_equals_numpy_model_exactly(dtype, impl, head_dim):
  cache, k, v, slots = _setup(dtype, head_dim=head_dim)
  expected = numpy_write(cache.k_pages, cache.v_pages, 2, k, v, slots)
  out = jp.write_kv(jax.tree.map(jnp.copy, cache), 2, k, v, slots, impl=impl,
                    interpret=True)
  np.testing.assert_array_equal(np.asarray(out.k_pages), expected[0])
  np.testing.assert_array_equal(np.asarray(out.v_pages), expected[1])
  chex.assert_trees_all_equal(out.page_table, cache.page_table)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_write_kv_with_traced_layer_in_scan_over_layers(impl):
  cache, k, v, slots = _setup(jnp.float32)
  expected_k, expected_v = cache.k_pages, cache.v_pages
  for layer in range(3):
    expected_k, expected_v = numpy_write(expected_k, expected_v, layer, k * layer, v - layer,
                                         slots)

  @jax.jit
  def all_layers(cache):
    def body(cache, layer):
      scale = layer.astype(k.dtype)
      return jp.write_kv(cache, layer, k * scale, v - scale, slots, impl=impl,
                         interpret=True), None
    return jax.lax.scan(body, cache, jnp.arange(3))[0]

  out = all_layers(cache)
  np.testing.assert_array_equal(np.asarray(out.k_pages), expected_k)
  np.testing.assert_array_equal(np.asarray(out.v_pages), expected_v)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_out_of_range_traced_layer_or_slot_writes_nothing(impl):
  cache, k, v, _ = _setup(jnp.float32)
  bad_slots = jnp.full((k.shape[0],), 12 * 4, jnp.int32)  # one past the last slot
  write = jax.jit(functools.partial(jp.write_kv, impl=impl, interpret=True))
  for layer, slots in ((jnp.int32(3), jnp.zeros_like(bad_slots)), (jnp.int32(-1), bad_slots * 0),
                       (jnp.int32(0), bad_slots)):
    out = write(jax.tree.map(jnp.copy, cache), layer, k, v, slots)
    chex.assert_trees_all_equal(out, cache)


def test_write_kv_rejects_bad_input_with_a_fix():
  cache, k, v, slots = _setup(jnp.float32)
  cases = [
      (dict(layer=3), "layer must be in \\[0, 3\\), got 3"),
      (dict(layer=-1), "layer must be in \\[0, 3\\), got -1"),
      (dict(layer=jnp.zeros(2, jnp.int32)), "layer must be an int \\(or an int32 scalar inside jit\\)"),
      (dict(k=k[:, :2]), "k must have shape \\[T, num_kv_heads=3, head_dim=16\\], got"),
      (dict(v=v[..., :8]), "v must have shape"),
      (dict(k=k[None]), "k must have shape"),
      (dict(k=k.astype(jnp.bfloat16)), "k has dtype bfloat16 but the cache stores float32; cast"),
      (dict(v=v[:5], k=k[:5]), "slots must have 5 entries \\(one per row of k"),
      (dict(slots=slots.astype(jnp.float32)), "slots must have an integer dtype, got float32"),
      (dict(impl="cuda"), "impl must be one of"),
  ]
  for change, message in cases:
    args = dict(layer=0, k=k, v=v, slots=slots) | change
    impl = args.pop("impl", "auto")
    with pytest.raises(jp.JaxPagedError, match=message):
      jp.write_kv(cache, args["layer"], args["k"], args["v"], args["slots"], impl=impl)
