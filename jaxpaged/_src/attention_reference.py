"""Ragged paged attention in plain ``jnp``, one query token at a time on contiguous K/V.

The statement of the math `jaxpaged.ops.ragged_paged_attention` implements, for tests and small
inputs: a dense softmax over the keys each query sees, in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpaged._src import attention_softmax as softmax
from jaxpaged._src.attention_checks import check_options
from jaxpaged._src.cache import token_rows
from jaxpaged._src.spec import QUANTIZED_DTYPES, JaxPagedError


def _token_attention(q_t: jax.Array, row: jax.Array, position: jax.Array, *, k_pages: jax.Array,
                     v_pages: jax.Array, page_table: jax.Array, kv_lens: jax.Array,
                     sm_scale: float, soft_cap: float | None,
                     sliding_window: int | None) -> jax.Array:
  """``[num_q_heads, head_dim]``: the attention of one query token ``q_t`` of ``row`` at
  ``position`` over that row's whole gathered K/V."""
  num_kv_heads, _, page_size, head_dim = k_pages.shape
  num_q_heads = q_t.shape[0]
  pages = jnp.clip(page_table[row], 0)
  k = k_pages[:, pages].reshape(num_kv_heads, -1, head_dim)  # [H, S, D]
  v = v_pages[:, pages].reshape(num_kv_heads, -1, head_dim).astype(jnp.float32)
  key_pos = jnp.arange(k.shape[1])
  visible = (key_pos <= position) & (key_pos < kv_lens[row])
  visible &= jnp.repeat(page_table[row] >= 0, page_size)
  if sliding_window:
    visible &= key_pos > position - sliding_window
  q_t = q_t.reshape(num_kv_heads, num_q_heads // num_kv_heads, head_dim).astype(jnp.float32)
  s = jnp.einsum("hgd,hsd->hgs", q_t, k.astype(jnp.float32)) * sm_scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  # IEEE softmax over the seen keys: NaN or +inf scores, or only -inf ones, give NaN.
  s = jnp.where(visible, s, softmax.MASKED)
  p = jnp.where(visible, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0)
  l = jnp.sum(p, -1)[..., None]
  count = lambda x: jnp.einsum("s,hsd->hd", visible.astype(jnp.float32), x)[:, None]
  finite_v, nonfinite = softmax.split_nonfinite(v, count)
  out = jnp.einsum("hgs,hsd->hgd", p, finite_v) / jnp.where(l == 0, 1, l) + nonfinite
  return out.reshape(num_q_heads, head_dim)


def ragged_paged_attention_reference(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
    kv_lens: jax.Array, q_lens: jax.Array, *, sm_scale: float | None = None,
    soft_cap: float | None = None, sliding_window: int | None = None) -> jax.Array:
  """Plain-``jnp`` ragged paged attention, one query token at a time on contiguous K/V.

  Shapes as `jaxpaged.ops.ragged_paged_attention`; float32 math, the same handling of non-finite
  values (a dense softmax over the keys each query sees). For tests and small inputs. Float
  pools only: 8-bit pools are refused (dequantize them first).

  >>> k_pages = jnp.ones((1, 2, 4, 8))  # [num_kv_heads, total_pages, page_size, head_dim]
  >>> v_pages = jnp.broadcast_to(jnp.arange(8.0).reshape(1, 2, 4, 1), (1, 2, 4, 8))
  >>> q = jnp.ones((2, 1, 8))  # the last 2 of a row's 6 tokens, at positions 4 and 5
  >>> out = ops.ragged_paged_attention_reference(q, k_pages, v_pages, jnp.array([[0, 1]]),
  ...                                            jnp.array([6]), jnp.array([2]))
  >>> out[:, 0, 0].tolist()  # equal scores: the mean of V over positions 0..4 and 0..5
  [2.0, 2.5]
  """
  for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
    if getattr(x, "dtype", None) in QUANTIZED_DTYPES:  # read as stored numbers: refused
      raise JaxPagedError(f"{name} is {x.dtype}: the reference reads float pools only; pass "
                          f"the real values, e.g. {name}.astype(jnp.float32) * scales[..., None].")
  num_tokens, _, head_dim = q.shape
  options = check_options(head_dim, sm_scale=sm_scale, soft_cap=soft_cap,
                          sliding_window=sliding_window)
  if 0 in (num_tokens, *page_table.shape):  # no query, or nothing to see (as the fast paths)
    return jnp.zeros_like(q)
  row, offset, valid = token_rows(q_lens, num_tokens)
  position = kv_lens[row] - q_lens[row] + offset
  one = functools.partial(_token_attention, k_pages=k_pages, v_pages=v_pages,
                          page_table=page_table, kv_lens=kv_lens, sm_scale=options["sm_scale"],
                          soft_cap=options["soft_cap"], sliding_window=options["sliding_window"])
  out = jax.vmap(one)(q, row, position)
  return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
