"""Static cache configuration (`CacheSpec`) and jaxpaged's error type."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_INT32_MAX = np.iinfo(np.int32).max
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class JaxPagedError(ValueError):
  """Bad input to a jaxpaged function: the message says what and how to fix it."""


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise JaxPagedError(
        f"CacheSpec.{name} must be a Python int, got {value!r} "
        f"({type(value).__name__}); pass an integer such as {name}=16.")
  if value <= 0:
    raise JaxPagedError(
        f"CacheSpec.{name} must be positive, got {value}; "
        f"every size in a CacheSpec is a count of at least 1.")


@jax.tree_util.register_static  # a pytree with no leaves: passes through jit/eval_shape as static
@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Static shape of a paged KV cache. Frozen and hashable: changing it recompiles.

  Attributes:
    num_layers: transformer layers; all share one page table.
    num_kv_heads: key/value heads per layer.
    head_dim: size of one head.
    page_size: tokens per page.
    num_pages: pages in the shared pool.
    max_seqs: sequence slots; a sequence id is an index in ``[0, max_seqs)``.
    max_pages_per_seq: page-table width, so a sequence holds at most
      ``max_pages_per_seq * page_size`` tokens.
    dtype: K/V element type: float32, bfloat16 or float16.

  >>> spec = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16,
  ...                  num_pages=64, max_seqs=4, max_pages_per_seq=8)
  >>> spec.max_seq_len
  128
  """

  num_layers: int
  num_kv_heads: int
  head_dim: int
  page_size: int
  num_pages: int
  max_seqs: int
  max_pages_per_seq: int
  dtype: Any = jnp.float32

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if field.name != "dtype":
        _check_positive_int(field.name, getattr(self, field.name))
        object.__setattr__(self, field.name, int(getattr(self, field.name)))
    try:
      dtype = jnp.dtype(self.dtype)
    except TypeError as e:
      raise JaxPagedError(
          f"CacheSpec.dtype must be a float dtype, got {self.dtype!r}; "
          "use jnp.float32, jnp.bfloat16 or jnp.float16.") from e
    if dtype not in SUPPORTED_DTYPES:
      raise JaxPagedError(
          f"CacheSpec.dtype must be one of float32, bfloat16, float16, got {dtype}; "
          "store K/V in one of those (cast the model's K/V before write_kv).")
    object.__setattr__(self, "dtype", dtype)
    if self.max_seq_len > _INT32_MAX:
      raise JaxPagedError(
          f"max_pages_per_seq * page_size = {self.max_seq_len} overflows int32 token "
          f"positions (max {_INT32_MAX}); lower max_pages_per_seq or page_size.")
    if self.num_pages * self.page_size > _INT32_MAX:
      raise JaxPagedError(
          f"num_pages * page_size = {self.num_pages * self.page_size} overflows int32 "
          f"slot ids (max {_INT32_MAX}); lower num_pages or page_size.")
    if self.max_seqs * self.max_pages_per_seq > _INT32_MAX:
      raise JaxPagedError(
          f"max_seqs * max_pages_per_seq = {self.max_seqs * self.max_pages_per_seq} "
          f"overflows int32 page-table indexing (max {_INT32_MAX}); lower either.")

  @property
  def max_seq_len(self) -> int:
    """Most tokens one sequence can hold."""
    return self.max_pages_per_seq * self.page_size

  @property
  def pages_shape(self) -> tuple[int, int, int, int, int]:
    """Shape of the K (and of the V) page pool: [layers, kv heads, pages, page_size, head_dim]."""
    return (self.num_layers, self.num_kv_heads, self.num_pages, self.page_size, self.head_dim)

  @property
  def page_bytes(self) -> int:
    """Bytes of K plus V that one page holds across all layers."""
    return 2 * self.num_layers * self.num_kv_heads * self.page_size * self.head_dim * self.dtype.itemsize
