"""The paged KV cache's state: an immutable pytree of arrays, its token layout and validation.

Layout (chosen by measurement, see README "Design"): K and V pages for all layers are two arrays
``[num_layers, num_kv_heads, num_pages, page_size, head_dim]``. Head-major pages keep each
(head, page) a contiguous ``[page_size, head_dim]`` tile, which is what both the Pallas GPU kernels
and XLA's CPU dot want; a token-major layout was 2-6x slower for decode attention on CPU.

The allocator (`jaxpaged._src.allocator`) is a stack of free page ids (``free_pages[:num_free]``)
plus a reference count per page; the public update functions are in `jaxpaged._src.paging`.

Internal API (for the other ``jaxpaged._src`` modules): `POOLS`, `HOST_FIELDS`, `pools`, `with_pools`,
`keep_unless_pools`, `pool_layouts`, `host_pools`, `check_host_pools`,
`check_cache`, `check_num_slots`,
`check_layer`, `check_index`, `duplicated`, `cdiv`, `token_rows`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged._src import sharding
from jaxpaged._src import checks
from jaxpaged._src.prefix_state import PrefixState, init_prefix_state
from jaxpaged._src.spec import SCALE_DTYPE, CacheSpec, JaxPagedError

# The page-indexed arrays of a cache, page axis 2 in each: what fork, swap, demotion and
# promotion move together. The scale pools are None (absent) unless K/V have per-token scales.
POOLS = ("k_pages", "v_pages", "k_scales", "v_scales")


# The fields of a host copy (`SwappedSequence`, `CachedBlock`) that hold each pool's pages.
HOST_FIELDS = dict(zip(POOLS, ("k", "v", "k_scales", "v_scales")))


def pool_layouts(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
  """Each pool this spec's caches hold: ``name -> (shape, dtype)``, in `POOLS` order."""
  layouts = {"k_pages": (spec.pages_shape, spec.dtype), "v_pages": (spec.pages_shape, spec.dtype)}
  if spec.token_scales:
    layouts.update(k_scales=(spec.scales_shape, SCALE_DTYPE),
                   v_scales=(spec.scales_shape, SCALE_DTYPE))
  return layouts


def host_pools(copy) -> dict:
  """The pools' pages a host copy holds (fields `HOST_FIELDS`), by pool name; absent ones
  (None) left out."""
  return {name: getattr(copy, field) for name, field in HOST_FIELDS.items()
          if getattr(copy, field, None) is not None}


def check_host_pools(spec: CacheSpec, copy, what: str, min_pages: int | None = None) -> dict:
  """`host_pools` of ``copy``, checked against ``spec``'s `pool_layouts`: the same pools and
  dtypes, shapes without the page axis (``min_pages`` None: one page, as a `CachedBlock`) or
  with the same count of ``min_pages`` to ``max_pages_per_seq`` pages in every pool, and the
  same static scales (``copy.static_scales``). Else a `JaxPagedError` naming ``what``'s field."""
  found, layouts = host_pools(copy), pool_layouts(spec)
  if set(found) != set(layouts):
    raise JaxPagedError(f"{what} holds {sorted(HOST_FIELDS[n] for n in found)} but this cache "
                        f"needs {sorted(HOST_FIELDS[n] for n in layouts)} ({spec.dtype} K/V); "
                        "bring it into a cache with the same spec.")
  counts = set()
  for name, (shape, dtype) in layouts.items():
    x, field = found[name], HOST_FIELDS[name]
    got = tuple(getattr(x, "shape", ()))
    if min_pages is None:
      want, ok = shape[:2] + shape[3:], got == shape[:2] + shape[3:]
    else:
      want = shape[:2] + (f"{min_pages}..{spec.max_pages_per_seq} pages",) + shape[3:]
      ok = len(got) == len(shape) and got[:2] + got[3:] == shape[:2] + shape[3:] and (
          min_pages <= got[2] <= spec.max_pages_per_seq)
      counts.add(got[2] if ok else None)
    if not ok or getattr(x, "dtype", None) != dtype:
      raise JaxPagedError(f"{what}.{field} is {getattr(x, 'dtype', None)}{list(got)} but this "
                          f"cache needs {jnp.dtype(dtype)}{list(want)}; bring back what came "
                          "from a cache with the same spec.")
  if len(counts) > 1:
    raise JaxPagedError(f"{what}'s fields hold different page counts "
                        f"{[found[n].shape[2] for n in layouts]}; pass them as they came.")
  theirs = getattr(copy, "static_scales", None)
  if not _same_static_scales(theirs, spec.static_scales):
    raise JaxPagedError(f"{what} was stored with static_scales {theirs!r} but this cache reads "
                        f"its values with {spec.static_scales!r}: they would read back scaled "
                        "wrongly; bring it into a cache with the same spec.")
  return found


def _same_static_scales(a, b) -> bool:
  """Whether two `CacheSpec.static_scales` read stored values alike (equal as float32)."""
  try:
    return (a is None) == (b is None) and (a is None or np.array_equal(
        np.asarray(a, np.float32), np.asarray(b, np.float32)))
  except (TypeError, ValueError):
    return False


def pools(cache) -> dict[str, jax.Array]:
  """The cache's present page-indexed arrays by name (`POOLS`), in that order."""
  return {name: getattr(cache, name) for name in POOLS if getattr(cache, name) is not None}


def with_pools(cache, new: dict):
  """``cache`` with the arrays of `pools` replaced by ``new``'s (same names)."""
  return dataclasses.replace(cache, **new)


def keep_unless_pools(keep, new, old):
  """``keep(new_leaf, old_leaf)`` over every leaf but the pools, which come out None (a select
  over the pools would copy them): the caller puts back the pools it chose."""
  no_pools = {name: None for name in POOLS}
  return jax.tree.map(keep, dataclasses.replace(new, **no_pools),
                      dataclasses.replace(old, **no_pools))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k_pages", "v_pages", "k_scales", "v_scales", "page_table", "seq_lens",
                 "num_evicted", "ref_counts", "free_pages", "num_free", "prefix"],
    meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """Paged KV cache state: arrays, plus its static `CacheSpec`. Create with `init_cache`,
  update with jaxpaged functions.

  Attributes:
    k_pages: ``[num_layers, num_kv_heads, num_pages, page_size, head_dim]`` keys.
    v_pages: same shape, values.
    k_scales: ``float32[num_layers, num_kv_heads, num_pages, page_size]``, the scale of every
      stored (token, head) row of K, for 8-bit K/V with per-token scales; else None.
    v_scales: the same for V.
    page_table: ``int32[max_seqs, max_pages_per_seq]``, physical page of each logical page,
      -1 where unmapped.
    seq_lens: ``int32[max_seqs]`` tokens held by each sequence (0 = empty slot).
    num_evicted: ``int32[max_seqs]`` tokens `compress` dropped from each sequence: its next
      token's position is ``seq_lens + num_evicted`` (`token_positions`).
    ref_counts: ``int32[num_pages]`` page-table entries referring to each page.
    free_pages: ``int32[num_pages]`` stack of free, never-cached page ids; entries
      ``[0, num_free)`` are valid.
    num_free: ``int32[]`` pages on that stack.
    prefix: the prefix cache's `PrefixState` (None unless ``spec.prefix_caching``).
    spec: the static `CacheSpec` (pytree metadata, not a leaf).

  >>> spec = CacheSpec(num_layers=2, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache = init_cache(spec)
  >>> cache.k_pages.shape, cache.page_table.shape, len(jax.tree.leaves(cache))
  ((2, 1, 8, 4, 8), (2, 4), 8)
  """

  k_pages: jax.Array
  v_pages: jax.Array
  k_scales: jax.Array | None
  v_scales: jax.Array | None
  page_table: jax.Array
  seq_lens: jax.Array
  num_evicted: jax.Array
  ref_counts: jax.Array
  free_pages: jax.Array
  num_free: jax.Array
  prefix: PrefixState | None
  spec: CacheSpec


def init_cache(spec: CacheSpec) -> PagedKVCache:
  """An empty cache: every page free, every sequence slot empty. Works under `jax.eval_shape`.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> int(num_free_pages(init_cache(spec)))
  8
  """
  if not isinstance(spec, CacheSpec):
    raise JaxPagedError(f"init_cache expects a CacheSpec, got {type(spec).__name__}; "
                        "build one with jaxpaged.CacheSpec(...).")
  empty = {name: jnp.zeros(shape, dtype) for name, (shape, dtype) in pool_layouts(spec).items()}
  return PagedKVCache(
      **{name: empty.get(name) for name in POOLS},
      page_table=jnp.full((spec.max_seqs, spec.max_pages_per_seq), -1, jnp.int32),
      seq_lens=jnp.zeros((spec.max_seqs,), jnp.int32),
      num_evicted=jnp.zeros((spec.max_seqs,), jnp.int32),
      ref_counts=jnp.zeros((spec.num_pages,), jnp.int32),
      # Popped from the top, so page 0 is handed out first.
      free_pages=jnp.arange(spec.num_pages - 1, -1, -1, dtype=jnp.int32),
      num_free=jnp.asarray(spec.num_pages, jnp.int32),
      prefix=init_prefix_state(spec) if spec.prefix_caching else None,
      spec=spec,
  )


def num_free_pages(cache: sharding.AnyCache) -> jax.Array:
  """``int32[]`` pages holding nothing (cached blocks that could be evicted not included).

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([5]), num_slots=5)
  >>> int(num_free_pages(cache)), int(num_used_pages(cache))
  (6, 2)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.per_shard(cache, num_free_pages)
  check_cache(cache)
  return cache.num_free


def num_cached_free_pages(cache: sharding.AnyCache) -> jax.Array:
  """``int32[]`` unreferenced pages that keep a cached block until evicted (0 without prefix
  caching).

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4, prefix_caching=True)
  >>> cache, _, _ = extend(init_cache(spec), jnp.array([0]), jnp.array([5]), num_slots=5,
  ...                      tokens=jnp.arange(5))
  >>> k = jnp.ones((5, 1, 8))
  >>> cache = release(write_kv(cache, 0, k, k, jnp.arange(5)), jnp.array([0]))
  >>> int(num_cached_free_pages(cache)), int(num_free_pages(cache))  # the full block stays
  (1, 7)
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.per_shard(cache, num_cached_free_pages)
  check_cache(cache)
  return cache.prefix.num_evictable if cache.prefix is not None else jnp.int32(0)


def num_used_pages(cache: sharding.AnyCache) -> jax.Array:
  """``int32[]`` pages referred to by at least one sequence.

  >>> spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, num_pages=8,
  ...                  max_seqs=2, max_pages_per_seq=4)
  >>> int(num_used_pages(extend(init_cache(spec), jnp.array([0]), jnp.array([9]),
  ...                           num_slots=9)[0]))
  3
  """
  if isinstance(cache, sharding.ShardedCache):
    return sharding.per_shard(cache, num_used_pages)
  check_cache(cache)
  return cache.spec.num_pages - cache.num_free - num_cached_free_pages(cache)


# ----------------------------------------------------------------------------- validation

def check_cache(cache, name: str = "cache") -> CacheSpec:
  """The cache's spec, after checking it is a live `PagedKVCache` (not one whose arrays a
  donating call deleted) holding its spec's pools (`pool_layouts`: no scale pool missing, none
  extra, each of its dtype)."""
  if not isinstance(cache, PagedKVCache):
    raise JaxPagedError(f"{name} must be a jaxpaged.PagedKVCache, got {type(cache).__name__}; "
                        "create one with jaxpaged.init_cache(spec).")
  held = {pool: getattr(x, "dtype", None) for pool, x in pools(cache).items()}
  needed = {pool: dtype for pool, (_, dtype) in pool_layouts(cache.spec).items()}
  if held.keys() != needed.keys() or any(held[p] not in (None, d) for p, d in needed.items()):
    show = lambda pools: ", ".join(f"{p} {d}" for p, d in pools.items())
    raise JaxPagedError(f"{name} holds pools {show(held)} but its spec ({cache.spec.dtype} K/V) "
                        f"needs {show(needed)}: 8-bit K/V are read with their scales; keep the "
                        "pools init_cache and jaxpaged's functions return.")
  for leaf in jax.tree.leaves(cache):
    if isinstance(leaf, jax.Array) and not checks.is_traced(leaf) and leaf.is_deleted():
      raise JaxPagedError(
          f"{name} was donated: its arrays were deleted by a jitted call that donated it "
          "(donate_argnames='cache'). Use the cache that call returned; to keep this one, do "
          "not donate it (jaxpaged's own functions never donate their input).")
  return cache.spec


def check_num_slots(spec: CacheSpec, num_slots, rows: int, default: int | None = None) -> int:
  """The static length of a call's token layout (default ``rows``, one token a row): at most
  ``rows`` sequences' worth of tokens, since no row can hold more."""
  limit = max(rows, 1) * spec.max_seq_len
  return checks.count("num_slots", (rows if default is None else default) if num_slots is None
                      else num_slots, maximum=limit,
                      why=f" ({max(rows, 1)} rows x max_seq_len {spec.max_seq_len}: more slots "
                      "than any call can fill)")


def duplicated(ids: jax.Array, live: jax.Array) -> jax.Array:
  """``bool[B]``: live rows whose id already appears in an earlier live row."""
  same = (ids[:, None] == ids[None, :]) & live[:, None] & live[None, :]
  earlier = jnp.tril(jnp.ones_like(same), k=-1)
  return jnp.any(same & earlier, axis=1)


def cdiv(a, b):
  """Ceiling division (pages that ``a`` tokens take at ``b`` tokens a page)."""
  return (a + b - 1) // b


def token_rows(counts, num_tokens: int):
  """The token layout shared by `extend`, `write_kv` and `ragged_paged_attention`: row b owns
  entries ``[start_b, start_b + counts[b])``, ``start`` the running sum of ``counts``.

  Returns ``(row, offset, valid)``, each ``[num_tokens]``: the row owning each entry, the entry's
  index within that row, and whether the entry is before the end of the last row.
  """
  t = jnp.arange(num_tokens)
  if counts.shape[0] == 0:  # no rows: no entry is valid
    return jnp.zeros_like(t), t, jnp.zeros(t.shape, bool)
  ends = jnp.cumsum(counts)
  row = jnp.minimum(jnp.searchsorted(ends, t, side="right"), counts.shape[0] - 1)
  return row, t - (ends[row] - counts[row]), t < ends[-1]



def check_layer(spec: CacheSpec, layer):
  """Validates a layer index: a known value is range-checked now; a traced int32 scalar is
  accepted (inside `lax.scan` over layers) and an out-of-range value there touches nothing."""
  return check_index("layer", layer, spec.num_layers, "num_layers")


def check_index(name: str, value, size: int, size_name: str) -> jax.Array:
  """A scalar index in ``[0, size)`` as an int32 scalar: checked now when its value is known
  (Python, NumPy or concrete JAX integer); a traced one is taken as it is."""
  integer = isinstance(value, (int, np.integer)) or (
      isinstance(value, (jax.Array, np.ndarray)) and jnp.issubdtype(value.dtype, jnp.integer))
  if isinstance(value, (bool, np.bool_)) or not integer or np.ndim(value) != 0:
    raise JaxPagedError(f"{name} must be an int (or an int32 scalar inside jit), got "
                        f"{getattr(value, 'dtype', type(value).__name__)}"
                        f"{list(np.shape(value))}; pass the index as a scalar.")
  if isinstance(value, jax.Array) and checks.is_traced(value):
    if value.dtype.itemsize > 4 or value.dtype == jnp.uint32:  # out of int32: out of range
      low = 0 if jnp.issubdtype(value.dtype, jnp.unsignedinteger) else checks.INT32_MIN
      value = jnp.clip(value, jnp.asarray(low, value.dtype),
                       jnp.asarray(checks.INT32_MAX, value.dtype))
    return value.astype(jnp.int32)
  if not 0 <= int(value) < size:
    raise JaxPagedError(f"{name} must be in [0, {size}), got {int(value)}; the cache was built "
                        f"with {size_name}={size}.")
  return jnp.asarray(int(value), jnp.int32)
