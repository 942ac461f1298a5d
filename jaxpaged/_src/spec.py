"""Static cache configuration (`CacheSpec`), the int32 limits every module shares, and jaxpaged's
error type."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxpaged._src.hashing import HASH_FUNCTIONS

# Every id, count, slot and token position is int32 on device (JAX's default integer width).
INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)
# The largest power of two an int32 holds: the hash table's code uses ``capacity`` itself, an
# int32, as "no slot" (`jaxpaged._src.table.probe`). At 12 bytes a slot that is 12 GiB of table.
_MAX_TABLE = 1 << 30
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# 8-bit storage and the largest magnitude each stores: a value is divided by its scale, then
# rounded (int8, symmetric: -127..127) or cast (fp8, saturating at the finite maximum).
QUANTIZED_DTYPES = {jnp.dtype(jnp.int8): 127.0,
                    jnp.dtype(jnp.float8_e4m3fn): float(jnp.finfo(jnp.float8_e4m3fn).max),
                    jnp.dtype(jnp.float8_e5m2): float(jnp.finfo(jnp.float8_e5m2).max)}
SUPPORTED_DTYPES = FLOAT_DTYPES + tuple(QUANTIZED_DTYPES)
# Per-token scales are stored as float32: 4 bytes per (token, KV head), for K and for V.
SCALE_DTYPE = jnp.dtype(jnp.float32)


def next_pow2(n: int) -> int:
  """The smallest power of two >= ``n`` (1 for n <= 1): the bucket sizes that keep the number of
  compiled shapes small."""
  return 1 << max(0, int(n) - 1).bit_length()


class JaxPagedError(ValueError):
  """Bad input to a jaxpaged function: the message says what and how to fix it.

  >>> try:
  ...   CacheSpec(num_layers=0, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...             max_seqs=1, max_pages_per_seq=2)
  ... except JaxPagedError as e:
  ...   print(isinstance(e, ValueError), str(e).split(";")[0])
  True CacheSpec.num_layers must be positive, got 0
  """


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise JaxPagedError(
        f"CacheSpec.{name} must be a Python int, got {value!r} "
        f"({type(value).__name__}); pass an integer such as {name}=16.")
  if value <= 0:
    raise JaxPagedError(
        f"CacheSpec.{name} must be positive, got {value}; "
        f"every size in a CacheSpec is a count of at least 1.")


def _check_min_prefix_tokens(value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise JaxPagedError(f"CacheSpec.min_prefix_tokens must be an int >= 0, got {value!r}.")


def _canonical_dtype(dtype: Any) -> jnp.dtype:
  """``dtype`` as a `jnp.dtype`, if it is one of `SUPPORTED_DTYPES`."""
  names = ", ".join(d.name for d in SUPPORTED_DTYPES)
  try:
    canonical = jnp.dtype(dtype)
  except TypeError as e:
    raise JaxPagedError(f"CacheSpec.dtype must be one of {names}, got {dtype!r}; e.g. "
                        "dtype=jnp.bfloat16, or jnp.int8 for 8-bit K/V with scales.") from e
  if canonical not in SUPPORTED_DTYPES:
    raise JaxPagedError(
        f"CacheSpec.dtype must be one of {names}, got {canonical}; store K/V in one of those "
        "(the 8-bit ones quantize in write_kv).")
  return canonical


def _check_static_scales(value: Any, dtype: jnp.dtype, num_layers: int):
  """``static_scales`` as a tuple of ``num_layers`` ``(k_scale, v_scale)`` float pairs, or None."""
  if value is None:
    return None
  if dtype not in QUANTIZED_DTYPES:
    raise JaxPagedError(f"CacheSpec.static_scales applies to 8-bit K/V only, but dtype is "
                        f"{dtype}; leave it None, or set dtype to int8 or a float8 type.")
  # Numbers only (no bools or strings), and each scale a normal float32 whose largest stored
  # value (scale * qmax) is finite: scales are float32 on device, where 1e-300 is 0 (every value
  # would read 0) and 1e300 is inf (every value would read NaN).
  try:
    items = np.asarray(value, dtype=object)
    numbers = all(np.asarray(x).dtype.kind in "iuf" and np.ndim(x) == 0 for x in items.flat)
    pairs = items.astype(np.float64) if numbers else np.asarray(np.nan)
  except (TypeError, ValueError):
    pairs = np.asarray(np.nan)
  if pairs.shape == (2,):
    pairs = np.broadcast_to(pairs, (num_layers, 2))
  qmax, tiny = np.float32(QUANTIZED_DTYPES[dtype]), np.finfo(np.float32).tiny
  with np.errstate(over="ignore", invalid="ignore"):
    scales = pairs.astype(np.float32)
    usable = np.all((scales >= tiny) & np.isfinite(scales * qmax))
  if pairs.shape != (num_layers, 2) or not usable:
    raise JaxPagedError(f"CacheSpec.static_scales must be one (k_scale, v_scale) pair of "
                        f"positive finite floats (normal in float32, with scale * {qmax:g} "
                        f"finite there), or one pair per layer ({num_layers}), got {value!r}; e.g. "
                        "static_scales=(0.05, 0.02) (a stored value times its scale is the real "
                        "value).")
  return tuple((float(k), float(v)) for k, v in pairs)


_SIZES = ("num_layers", "num_kv_heads", "head_dim", "page_size", "num_pages", "max_seqs",
          "max_pages_per_seq")


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
    dtype: K/V storage type: float32, bfloat16 or float16, or 8-bit (int8, float8_e4m3fn,
      float8_e5m2), which `write_kv` quantizes into and attention dequantizes per chunk.
    static_scales: 8-bit only. None (default): one float32 scale per (token, KV head), taken
      from that row's largest magnitude when it is written, kept in ``k_scales``/``v_scales``.
      Else ``(k_scale, v_scale)`` for every layer, or a tuple of such pairs one per layer
      (vLLM's fp8 style, from calibration): no scale pools, and values past ``scale * max``
      saturate. See `token_bytes`.
    prefix_caching: keep full blocks cached after their sequences end, for `match_prefix`.
    table_capacity: prefix hash-table slots, a power of two, at most 2**30 (default: the
      smallest power of two >= 2 * num_pages, capped there).
    max_cached_blocks: at most this many pages hold registered blocks (default: num_pages).
    min_prefix_tokens: `match_prefix` takes a hit only if it covers at least this many tokens.
    block_hash: ``"mix64"``; ``"constant"`` (every block collides) and ``"unchained"`` (equal
      blocks after different prefixes collide) exist to test that collisions are harmless.

  >>> spec = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16,
  ...                  num_pages=64, max_seqs=4, max_pages_per_seq=8)
  >>> spec.max_seq_len, spec.page_bytes  # 8 pages of 16 tokens; float32 K and V of 2 layers
  (128, 32768)
  """

  num_layers: int
  num_kv_heads: int
  head_dim: int
  page_size: int
  num_pages: int
  max_seqs: int
  max_pages_per_seq: int
  dtype: DTypeLike = jnp.float32
  prefix_caching: bool = False
  table_capacity: int | None = None
  max_cached_blocks: int | None = None
  min_prefix_tokens: int = 0
  block_hash: str = "mix64"
  static_scales: Any = None

  def __post_init__(self) -> None:
    # In this order: a spec with several bad fields reports the first of them.
    self._canonicalise_sizes()
    if not isinstance(self.prefix_caching, bool):
      raise JaxPagedError(f"CacheSpec.prefix_caching must be True or False, got "
                          f"{self.prefix_caching!r}.")
    self._check_table_capacity()
    self._check_max_cached_blocks()
    _check_min_prefix_tokens(self.min_prefix_tokens)
    if self.block_hash not in HASH_FUNCTIONS:
      raise JaxPagedError(f"CacheSpec.block_hash must be 'mix64' (or 'constant' / 'unchained', "
                          f"for testing), got {self.block_hash!r}.")
    object.__setattr__(self, "dtype", _canonical_dtype(self.dtype))
    object.__setattr__(self, "static_scales",
                       _check_static_scales(self.static_scales, self.dtype, self.num_layers))
    self._check_int32_products()
    if self.min_prefix_tokens > self.max_seq_len:
      raise JaxPagedError(f"CacheSpec.min_prefix_tokens must be at most max_seq_len = "
                          f"{self.max_seq_len} (a longer minimum would never hit), got "
                          f"{self.min_prefix_tokens}.")
    object.__setattr__(self, "min_prefix_tokens", int(self.min_prefix_tokens))

  def _canonicalise_sizes(self) -> None:
    """Every size field as a positive Python int."""
    for name in _SIZES:
      _check_positive_int(name, getattr(self, name))
      object.__setattr__(self, name, int(getattr(self, name)))

  def _check_table_capacity(self) -> None:
    """Fills in the default table capacity; checks a given one."""
    if self.table_capacity is None:
      object.__setattr__(self, "table_capacity", min(next_pow2(2 * self.num_pages), _MAX_TABLE))
    _check_positive_int("table_capacity", self.table_capacity)
    if self.table_capacity & (self.table_capacity - 1):
      raise JaxPagedError(f"CacheSpec.table_capacity must be a power of two, got "
                          f"{self.table_capacity}; e.g. {1 << self.table_capacity.bit_length()}.")
    if self.table_capacity > _MAX_TABLE:
      raise JaxPagedError(f"CacheSpec.table_capacity must be at most {_MAX_TABLE} (slots are "
                          f"int32 and each takes 12 bytes), got {self.table_capacity}; the "
                          "default (2 * num_pages, rounded up to a power of two) suffices.")

  def _check_max_cached_blocks(self) -> None:
    """Fills in the default (every page may hold a cached block); checks a given value."""
    if self.max_cached_blocks is None:
      object.__setattr__(self, "max_cached_blocks", self.num_pages)
    _check_positive_int("max_cached_blocks", self.max_cached_blocks)
    if self.max_cached_blocks > self.num_pages:
      raise JaxPagedError(f"CacheSpec.max_cached_blocks must be at most num_pages = "
                          f"{self.num_pages} (a cached block is a page), got "
                          f"{self.max_cached_blocks}; leave it None for num_pages.")

  def _check_int32_products(self) -> None:
    """The products of sizes that index device arrays must fit int32."""
    products = (
        (self.max_seq_len, "max_pages_per_seq * page_size", "token positions",
         "lower max_pages_per_seq or page_size"),
        (self.num_pages * self.page_size, "num_pages * page_size", "slot ids",
         "lower num_pages or page_size"),
        (self.max_seqs * self.max_pages_per_seq, "max_seqs * max_pages_per_seq",
         "page-table indexing", "lower either"))
    for value, formula, what, fix in products:
      if value > INT32_MAX:
        raise JaxPagedError(f"{formula} = {value} overflows int32 {what} (max {INT32_MAX}); "
                            f"{fix}.")

  @property
  def max_seq_len(self) -> int:
    """Most tokens one sequence can hold."""
    return self.max_pages_per_seq * self.page_size

  @property
  def pages_shape(self) -> tuple[int, int, int, int, int]:
    """Shape of the K (and of the V) page pool: [layers, kv heads, pages, page_size, head_dim]."""
    return (self.num_layers, self.num_kv_heads, self.num_pages, self.page_size, self.head_dim)

  @property
  def quantized(self) -> bool:
    """Whether K/V are stored in 8 bits (with scales)."""
    return self.dtype in QUANTIZED_DTYPES

  @property
  def token_scales(self) -> bool:
    """Whether the cache keeps a scale per (token, KV head): 8-bit without static scales."""
    return self.quantized and self.static_scales is None

  @property
  def scales_shape(self) -> tuple[int, int, int, int]:
    """Shape of the K (and V) scale pools: [layers, kv heads, pages, page_size]."""
    return self.pages_shape[:4]

  @property
  def token_bytes(self) -> int:
    """Bytes one token takes across all layers, K and V, scales included: ``2 * layers *
    kv_heads * (head_dim * itemsize + 4 with per-token scales)``.

    >>> sizes = dict(num_layers=1, num_kv_heads=1, head_dim=64, page_size=16, num_pages=8,
    ...              max_seqs=1, max_pages_per_seq=4)
    >>> [CacheSpec(**sizes, dtype=d).token_bytes for d in (jnp.float32, jnp.bfloat16, jnp.int8)]
    [512, 256, 136]
    >>> CacheSpec(**sizes, dtype=jnp.float8_e4m3fn, static_scales=(0.1, 0.1)).token_bytes
    128
    """
    row = self.head_dim * self.dtype.itemsize + (SCALE_DTYPE.itemsize if self.token_scales else 0)
    return 2 * self.num_layers * self.num_kv_heads * row

  @property
  def page_bytes(self) -> int:
    """Bytes of K plus V (and their scales) that one page holds across all layers."""
    return self.page_size * self.token_bytes
