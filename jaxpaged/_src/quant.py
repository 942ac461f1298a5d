"""8-bit K/V: the one statement of how a value is stored (`quantize`) and read (`dequantize`).

A stored value times its scale is the real value. With per-token scales (the default for 8-bit
caches) every (token, KV head) row gets ``scale = max|row| * float32(1 / qmax)`` when it is written
(`write_kv`), so a page is never re-quantized when a later token lands in it, and a row's
largest entry is stored exactly at ``qmax`` (int8: 127; float8_e4m3fn: 448; float8_e5m2:
57344). int8 rounds to nearest; fp8 casts (round to nearest even). A row that is all zeros
gets scale 1. A non-finite entry makes the row's scale non-finite, so the whole row reads back
as NaN: never a silently finite value.

With static scales (``CacheSpec.static_scales``, one pair per layer, vLLM's fp8 style) the
stored value is ``x / scale`` clipped to ``[-qmax, qmax]``: values past ``scale * qmax``
saturate, and int8 cannot hold NaN or inf (they are written as 0 and +-127).

Both attentions call `dequantize` on each chunk of pages they read (the XLA loop's chunk, the
Pallas kernel's page): no dequantized copy of the pool or of a sequence is ever made.

Internal API: `quantize`, `dequantize`, `static_scales`, `attention_scales`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged._src.spec import QUANTIZED_DTYPES, SCALE_DTYPE, CacheSpec


def static_scales(spec: CacheSpec, which: int) -> jax.Array:
  """``float32[num_layers]``: the static scales of K (``which`` 0) or V (1)."""
  return jnp.asarray([pair[which] for pair in spec.static_scales], SCALE_DTYPE)


def quantize(x: jax.Array, spec: CacheSpec, layer, which: int
             ) -> tuple[jax.Array, jax.Array | None]:
  """``x [..., head_dim]`` (any float dtype) as stored in ``spec.dtype``.

  Returns ``(values, scales)``: ``scales`` is float32 ``x.shape[:-1]`` with per-token scales,
  None with static scales (of K for ``which`` 0, V for 1, at ``layer``) or a float cache (whose
  values are ``x`` cast to its dtype).
  """
  if not spec.quantized:
    return x.astype(spec.dtype), None
  qmax = QUANTIZED_DTYPES[spec.dtype]
  x = x.astype(jnp.float32)
  if spec.token_scales:
    # Times the float32 reciprocal (what XLA makes of a division by a constant anyway, so the
    # result is the same everywhere). NaN or inf stay so: the row reads back NaN.
    scale = jnp.max(jnp.abs(x), axis=-1) * jnp.float32(1 / qmax)
    scale = jnp.where(scale == 0, 1.0, scale).astype(SCALE_DTYPE)
    y = x / scale[..., None]
  else:
    scale = None
    y = jnp.clip(x / static_scales(spec, which)[layer], -qmax, qmax)
  if spec.dtype == jnp.int8:
    y = jnp.clip(jnp.round(y), -qmax, qmax)
  return y.astype(spec.dtype), scale


def dequantize(values: jax.Array, scale: jax.Array) -> jax.Array:
  """float32 real values of stored 8-bit ``values [..., head_dim]``: times ``scale``, per token
  (``[...]``, one fewer axis) or one scalar (static)."""
  scale = jnp.asarray(scale)
  return values.astype(jnp.float32) * (scale[..., None] if scale.ndim else scale)


def attention_scales(cache) -> tuple[jax.Array | None, jax.Array | None]:
  """The ``(k_scales, v_scales)`` attention reads with a cache's pools: the per-token pools
  ``[L, H, P, ps]``, the static scales as ``float32[L]``, or ``(None, None)`` (float K/V)."""
  spec = cache.spec
  if spec.token_scales:
    return cache.k_scales, cache.v_scales
  if spec.quantized:
    return static_scales(spec, 0), static_scales(spec, 1)
  return None, None
