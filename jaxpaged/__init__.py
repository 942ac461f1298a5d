"""jaxpaged: paged KV caches for LLM inference in JAX, as pure functions on a pytree."""

from jaxpaged import ops
from jaxpaged._src.attention import paged_attention
from jaxpaged._src.attention import ragged_paged_attention
from jaxpaged._src.cache import PagedKVCache
from jaxpaged._src.cache import check_extend
from jaxpaged._src.cache import check_fork
from jaxpaged._src.cache import extend
from jaxpaged._src.cache import fork
from jaxpaged._src.cache import gather_kv
from jaxpaged._src.cache import init_cache
from jaxpaged._src.cache import num_cached_free_pages
from jaxpaged._src.cache import num_free_pages
from jaxpaged._src.cache import num_used_pages
from jaxpaged._src.cache import release
from jaxpaged._src.cache import token_positions
from jaxpaged._src.hashing import block_hashes_numpy as block_hashes
from jaxpaged._src.prefix import PrefixMatch
from jaxpaged._src.prefix import check_match_prefix
from jaxpaged._src.prefix import match_prefix
from jaxpaged._src.prefix import prefix_stats
from jaxpaged._src.prefix import reset_prefix_cache
from jaxpaged._src.spec import CacheSpec
from jaxpaged._src.spec import JaxPagedError
from jaxpaged._src.write_kv import write_kv

__version__ = "0.1.0"

__all__ = (
    "CacheSpec",
    "JaxPagedError",
    "PagedKVCache",
    "PrefixMatch",
    "block_hashes",
    "check_match_prefix",
    "check_extend",
    "check_fork",
    "extend",
    "fork",
    "gather_kv",
    "init_cache",
    "match_prefix",
    "num_cached_free_pages",
    "num_free_pages",
    "num_used_pages",
    "ops",
    "paged_attention",
    "prefix_stats",
    "ragged_paged_attention",
    "release",
    "reset_prefix_cache",
    "token_positions",
    "write_kv",
)
