"""Shared test helpers: an independent NumPy model of cache writes and deviceless CUDA lowering."""

import contextlib

import jax
import numpy as np


def numpy_write(k_pages, v_pages, layer, k, v, slots):
  """What write_kv must do, one token at a time in NumPy."""
  k_pages, v_pages = np.array(k_pages), np.array(v_pages)
  page_size = k_pages.shape[3]
  for t, slot in enumerate(np.asarray(slots)):
    if slot >= 0:
      k_pages[layer, :, slot // page_size, slot % page_size] = np.asarray(k[t])
      v_pages[layer, :, slot // page_size, slot % page_size] = np.asarray(v[t])
  return k_pages, v_pages


def _abstract_gpu():
  """JAX >= 0.11 needs to be told which GPU it lowers Triton kernels for when none is present."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def lower_for_cuda(fn, *args, **kwargs) -> str:
  """Lowers `fn` for CUDA on this CPU-only machine and returns the StableHLO text."""
  with _abstract_gpu():
    return jax.jit(fn, **kwargs).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


TRITON_CALL = "__gpu$xla.gpu.triton"
