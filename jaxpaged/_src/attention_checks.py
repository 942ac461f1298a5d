"""Argument checks of the attention entry points, each failure a `JaxPagedError` naming the fix.

Static checks (shapes, dtypes, static options) run at trace time; checks of concrete values
(lengths, page ids) run only on arrays that are not traced.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import checks
from jaxpaged._src import gpu
from jaxpaged._src.spec import QUANTIZED_DTYPES, JaxPagedError

# Bad rows (and their values) an error message lists, at most.
MAX_LISTED_ROWS = 8

_FIX = {
    "sm_scale": "pass a positive float, or None for head_dim ** -0.5",
    "soft_cap": "pass the cap scores are squashed to (Gemma 2: 50.0), or None for no cap",
    "sliding_window": "pass how many of the latest keys each query sees (e.g. 4096), or None "
                      "for full attention",
    "q_block": "pass query tokens per block (e.g. 16), or None for the default",
    "num_splits": "pass how many ranges to split each context into (e.g. 2), or None for the "
                  "default",
    "block_kv": "pass KV tokens per loop step (e.g. 512), or None for the default",
}
_FLOAT_OPTIONS = ("sm_scale", "soft_cap")  # every other numeric option is an int


def pool_array(name: str, x: Any, ndim: int) -> jax.Array:
  """A K/V pool argument, checked to be an array of ``ndim`` dimensions (not a list)."""
  if not isinstance(x, (jax.Array, np.ndarray)) or x.ndim != ndim:
    raise JaxPagedError(f"{name} must be a {ndim}-D float array [num_kv_heads, num_pages, "
                        f"page_size, head_dim], got {type(x).__name__}"
                        f"{list(getattr(x, 'shape', []))}; pass the cache's pages, e.g. "
                        f"cache.{name}[layer].")
  return x


def check_attention_args(q: Any, k_pages: jax.Array, v_pages: jax.Array, kind: str) -> None:
  """Static shape checks shared by every entry point (``kind``: "decode" or "ragged")."""
  if k_pages.dtype != v_pages.dtype:
    raise JaxPagedError(f"k_pages and v_pages must have one dtype, got {k_pages.dtype} and "
                        f"{v_pages.dtype}.")
  if k_pages.shape != v_pages.shape or k_pages.ndim != 5:
    raise JaxPagedError(f"k_pages and v_pages must both be [num_kv_heads, num_pages, page_size, "
                        f"head_dim], got {k_pages.shape[1:]} and {v_pages.shape[1:]}.")
  _, num_kv_heads, _, _, head_dim = k_pages.shape
  if getattr(q, "ndim", None) != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
    raise JaxPagedError(
        f"q must be [{'batch' if kind == 'decode' else 'tokens'}, num_q_heads, "
        f"head_dim={head_dim}] with num_q_heads a multiple of num_kv_heads={num_kv_heads}, got "
        f"{getattr(q, 'shape', type(q).__name__)}; for GQA/MQA give every query head (KV head i "
        "serves query heads i*group ... (i+1)*group-1).")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise JaxPagedError(f"q must be a float array, got {q.dtype}.")


def check_scales(k_pages: jax.Array, k_scales: Any, v_scales: Any):
  """``(k_scales, v_scales)`` for the pools: None for float pools; for 8-bit ones float32
  ``[L, num_kv_heads, num_pages, page_size]`` (per token) or ``[L]`` (static, one a layer)."""
  quantized = k_pages.dtype in QUANTIZED_DTYPES
  given = (k_scales is not None, v_scales is not None)
  if not quantized:
    if any(given):
      raise JaxPagedError(f"k_scales/v_scales are for 8-bit pools, but the pools are "
                          f"{k_pages.dtype}; pass None.")
    return None, None
  per_token, static = k_pages.shape[:4], k_pages.shape[:1]
  for name, x in (("k_scales", k_scales), ("v_scales", v_scales)):
    shape = tuple(getattr(x, "shape", ()))
    if (not isinstance(x, (jax.Array, np.ndarray)) or shape not in (per_token, static)
        or x.dtype != jnp.float32 or shape != tuple(getattr(k_scales, "shape", ()))):
      raise JaxPagedError(
          f"{name} must be float32 {list(per_token)} (a scale per token and head) or "
          f"{list(static)} (one per layer), the same for k and v, for {k_pages.dtype} pools; got "
          f"{getattr(x, 'dtype', type(x).__name__)}{list(shape)}; pass the cache's scales.")
  return k_scales, v_scales


def _static_positive(name: str, value: Any, integer: bool) -> int | float:
  """A positive finite Python int (or float) from a static option; JaxPagedError otherwise."""
  kind = "int" if integer else "finite float"
  if isinstance(value, jax.Array):  # traced, or on a device: either way not a compile-time value
    raise JaxPagedError(
        f"{name} must be a positive {kind} or None, got a JAX array ({value.dtype}"
        f"{list(value.shape)}); it is a static option (it shapes the compiled program), so it "
        f"cannot be traced or come from a device: {_FIX[name]}, as a Python number.")
  types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, types):
    raise JaxPagedError(f"{name} must be a positive {kind} or None, got {value!r} of type "
                        f"{type(value).__name__}; {_FIX[name]}.")
  value = int(value) if integer else float(value)
  if not (math.isfinite(value) and value > 0):
    raise JaxPagedError(f"{name} must be a positive {kind} or None, got {value!r}; "
                        f"{_FIX[name]}.")
  return value


def check_options(head_dim: int, *, impl: str = "auto", interpret: bool = False,
                  **options: Any) -> dict[str, Any]:
  """Static options as plain Python values (jit cache keys), sm_scale resolved; JaxPagedError
  naming the option otherwise."""
  if not isinstance(impl, str) or impl not in gpu.IMPLS:
    raise JaxPagedError(f"impl must be one of {gpu.IMPLS}, got {impl!r}; 'auto' runs the Pallas "
                        "kernel on GPU and the XLA path elsewhere.")
  if not isinstance(interpret, (bool, np.bool_)):
    raise JaxPagedError(f"interpret must be a bool, got {interpret!r}; pass True to run the "
                        "Pallas kernel in interpret mode (CPU tests), else False.")
  out = {name: None if value is None else _static_positive(
      name, value, integer=name not in _FLOAT_OPTIONS) for name, value in options.items()}
  if "sm_scale" in out and out["sm_scale"] is None:
    out["sm_scale"] = float(head_dim ** -0.5)
  return dict(out, impl=impl, interpret=bool(interpret))


def check_known(x: jax.Array, name: str, ok: Callable[[np.ndarray], np.ndarray],
                message: str) -> None:
  """Checks concrete values (traced ones cannot be): ``ok(values)`` for every row."""
  if checks.is_traced(x):
    return
  bad = np.flatnonzero(~ok(np.asarray(x)))
  if bad.size:
    raise JaxPagedError(f"{name} at rows {bad.tolist()[:MAX_LISTED_ROWS]}: {message}; got "
                        f"{np.asarray(x)[bad].tolist()[:MAX_LISTED_ROWS]}.")


def check_tables(page_table: Any, kv_lens: Any, num_rows: int | None,
                 pool_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Block tables and lengths as int32, exactly; known lengths within the table's capacity and
  the pages they use within the pool (-1 marks an unmapped page)."""
  _, _, num_pages, page_size, _ = pool_shape
  page_table = checks.index_table("block_tables", page_table, num_rows)
  kv_lens = checks.index_vector("lengths", kv_lens, page_table.shape[0],
                                per="block_tables row")
  capacity = page_table.shape[1] * page_size
  check_known(kv_lens, "lengths", lambda n: (n >= 0) & (n <= capacity),
              f"must be in [0, pages_per_seq * page_size = {capacity}]: a row cannot hold more "
              "tokens than its block table names")
  if not checks.is_traced(page_table) and not checks.is_traced(kv_lens):
    used = np.arange(page_table.shape[1]) < -(-np.asarray(kv_lens)[:, None] // page_size)
    pages = np.asarray(page_table)
    check_known(kv_lens, "block_tables", lambda _: ~np.any(
        used & ((pages < -1) | (pages >= num_pages)), axis=1),
                f"name pages outside [0, {num_pages}) (or -1, unmapped) within the row's length")
  return page_table, kv_lens
