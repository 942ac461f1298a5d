"""The softmax math the XLA path and the Pallas kernel share: masks, the online-softmax step,
the merge of split states, and non-finite values.

Both implementations mask values read from outside a sequence (pages that are not its own are
never trusted: their scores are -inf and their V rows zero, so even NaN there cannot reach the
output). Softmax and accumulation run in float32 whatever the K/V dtype.

Non-finite values propagate as in a dense softmax over the keys each query sees (its own
sequence, causally, within the sliding window) and reach no other query: NaN in a query, a NaN
or +inf score, or only -inf scores make that query's output NaN; a NaN or +-inf V entry of a
seen key makes that output element NaN or +-inf as ``p @ v`` would with positive weights (NaN
when NaN, or both infinities, are among them). Loops accumulate with plain ``p @ v``, exact when
every V value loaded is finite; when the result is not finite (it may hold 0 * NaN from a key
that some query of the block does not see), the work is done again (``lax.cond``) with V's
non-finite entries taken apart (`split_nonfinite`). Finite inputs pay one sum over the result.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxpaged._src.attention_blocks import QueryBlocks

# The score of a key a query does not see, and the running max before it has seen any key:
# exp(MASKED - m) is exactly 0 and max ignores it.
MASKED = -jnp.inf
# The least weight a split's state gets when merged: an inf in acc comes from V (see
# `nonfinite_output`), and a weight that underflows to 0 would make it NaN. The smallest normal
# float32 instead changes no finite result visibly.
MIN_SPLIT_WEIGHT = jnp.finfo(jnp.float32).tiny


def oldest_key(first: jax.Array, sliding_window: int | None) -> jax.Array | int:
  """The oldest key position a query at position ``first`` sees (0 without a window)."""
  return jnp.maximum(first - sliding_window + 1, 0) if sliding_window else 0


def visible_keys(key_ok: jax.Array, key_pos: jax.Array, position: jax.Array,
                 sliding_window: int | None) -> jax.Array:
  """Whether a query at ``position`` sees a valid key at ``key_pos`` (arguments broadcast)."""
  visible = key_ok & (key_pos <= position)
  if sliding_window:
    visible &= key_pos > position - sliding_window
  return visible


def cap_scores(s: jax.Array, soft_cap: float | None) -> jax.Array:
  """Scores squashed to ``soft_cap * tanh(s / soft_cap)`` (Gemma 2); unchanged without a cap."""
  return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)


def online_softmax_step(m: jax.Array, l: jax.Array,
                        s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Takes scores ``s [..., keys]`` into the running max ``m`` and denominator ``l [...]``.

  Returns ``(m_new, l_new, p, correction)``: ``p = exp(s - m_new)``, the weights of these keys,
  and ``correction = exp(m - m_new)``, the factor the accumulator so far is rescaled by.
  """
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  m_safe = jnp.where(m_new == MASKED, 0.0, m_new)  # rows that have seen nothing yet
  p = jnp.exp(s - m_safe[..., None])
  correction = jnp.exp(m - m_safe)
  return m_new, l * correction + jnp.sum(p, axis=-1), p, correction


def sees_a_key(page_table: jax.Array, blocks: QueryBlocks, page_size: int,
               sliding_window: int | None) -> jax.Array:
  """[NB, qb] bool: whether each query sees a key.

  Its keys ``(p - window, p]`` are all within its sequence's length, so it sees one exactly when
  one of their pages is mapped. A query that sees keys but scores every one -inf ends with
  l == 0 like one that sees none, yet a dense softmax gives NaN there, not zeros; counting pages
  here keeps that test out of the loops.
  """
  mapped = jnp.cumsum(page_table[blocks.row] >= 0, axis=1)
  mapped = jnp.pad(mapped, ((0, 0), (1, 0)))  # [NB, 1 + pages]: mapped pages before each page
  before = lambda page: jnp.take_along_axis(mapped, jnp.clip(page, 0, mapped.shape[1] - 1), 1)
  position = blocks.position
  first = (jnp.maximum(position - sliding_window + 1, 0) if sliding_window
           else jnp.zeros_like(position))
  return (position >= 0) & (before(position // page_size + 1) > before(first // page_size))


def all_finite(*xs: jax.Array) -> jax.Array:
  """A scalar bool: whether the sum of every element is finite.

  It is unless an element is not (or, harmlessly, the sum overflows). A plain sum is one fused
  pass on XLA:CPU and lowers on Triton, one axis at a time (a multi-axis reduction fails there
  under JAX 0.12's abstract mesh).
  """
  total = 0.0
  for x in xs:
    while x.ndim:
      x = jnp.sum(x, axis=-1)
    total += x
  return jnp.isfinite(total)


def finite_part(v: jax.Array) -> jax.Array:
  """``v`` with its non-finite entries replaced by zeros."""
  return jnp.where(jnp.isfinite(v), v, jnp.zeros_like(v))


def nonfinite_indicators(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """0/1 of the V entries that drive an output element to +inf and to -inf (NaN: to both)."""
  bad = ~jnp.isfinite(v)
  return (bad & ~(v < 0)).astype(v.dtype), (bad & ~(v > 0)).astype(v.dtype)


def nonfinite_output(up: jax.Array, down: jax.Array) -> jax.Array:
  """What seen non-finite V entries add to each output element: 0, +inf, -inf or NaN.

  From counts of seen keys with +inf (or NaN) and with -inf (or NaN) entries, as ``p @ v`` does
  with positive weights (NaN for inf - inf).
  """
  return jnp.where(up > 0, jnp.inf, 0.0) + jnp.where(down > 0, -jnp.inf, 0.0)


def split_nonfinite(v: jax.Array,
                    count: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(finite_part(v), what V's non-finite entries add to the output)``; ``count`` maps 0/1
  indicators over V's entries to how many keys each output element sees with one."""
  return finite_part(v), nonfinite_output(*map(count, nonfinite_indicators(v)))


def normalise(acc: jax.Array, l: jax.Array, seen: jax.Array) -> jax.Array:
  """Output rows from merged softmax states: acc / l; where l == 0, NaN for a query that sees
  keys (all scoring -inf) and zeros for one that sees none."""
  out = acc / jnp.where(l == 0, 1.0, l)[..., None]
  return jnp.where((l == 0)[..., None], jnp.where(seen, jnp.nan, 0.0)[..., None], out)


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array, axis: int,
                 seen: jax.Array) -> jax.Array:
  """Normalised output of partial softmax states over disjoint key ranges (flash-decoding),
  stacked along ``axis``; ``seen`` as `sees_a_key`, broadcast to the merged l."""
  m_max = jnp.max(m, axis=axis, keepdims=True)
  weight = jnp.exp(m - jnp.where(m_max == MASKED, 0.0, m_max))  # MASKED: nothing seen anywhere
  weight = jnp.maximum(weight, MIN_SPLIT_WEIGHT)
  l = jnp.sum(l * weight, axis=axis)
  acc = jnp.sum(acc * jnp.expand_dims(weight, -1), axis=axis)
  return normalise(acc, l, seen)
