"""jaxpaged: paged KV caches for LLM inference in JAX, as pure functions on a pytree."""

from jaxpaged import ops
from jaxpaged._src.attention import paged_attention
from jaxpaged._src.attention import ragged_paged_attention
from jaxpaged._src.cache import PagedKVCache
from jaxpaged._src.compress import H2O
from jaxpaged._src.compress import KeyNorm
from jaxpaged._src.compress import StreamingLLM
from jaxpaged._src.compress import check_compress
from jaxpaged._src.compress import compress
from jaxpaged._src.defrag import defragment
from jaxpaged._src.defrag import resize
from jaxpaged._src.disk import DiskError
from jaxpaged._src.disk import DiskLayout
from jaxpaged._src.disk import DiskStore
from jaxpaged._src.disk import load_prefixes
from jaxpaged._src.disk import save_prefixes
from jaxpaged._src.paging import check_extend
from jaxpaged._src.paging import check_fork
from jaxpaged._src.paging import extend
from jaxpaged._src.paging import fork
from jaxpaged._src.paging import gather_kv
from jaxpaged._src.cache import init_cache
from jaxpaged._src.cache import num_cached_free_pages
from jaxpaged._src.cache import num_free_pages
from jaxpaged._src.cache import num_used_pages
from jaxpaged._src.paging import release
from jaxpaged._src.paging import token_positions
from jaxpaged._src.hashing import block_hashes_numpy as block_hashes
from jaxpaged._src.prefix import PrefixMatch
from jaxpaged._src.prefix import check_match_prefix
from jaxpaged._src.prefix import match_prefix
from jaxpaged._src.prefix import prefix_stats
from jaxpaged._src.prefix import reset_prefix_cache
from jaxpaged._src.manager import Admission
from jaxpaged._src.manager import CacheManager
from jaxpaged._src.manager import CompressionStats
from jaxpaged._src.multi_manager import MultiDeviceCacheManager
from jaxpaged._src.routing import LeastLoadedRouter
from jaxpaged._src.routing import PrefixAwareRouter
from jaxpaged._src.routing import RoundRobinRouter
from jaxpaged._src.routing import Router
from jaxpaged._src.routing import ShardLoad
from jaxpaged._src.routing import PrefixIndex
from jaxpaged._src.events import AllBlocksCleared
from jaxpaged._src.events import BlockRemoved
from jaxpaged._src.events import BlockStored
from jaxpaged._src.events import KVEventLog
from jaxpaged._src.events import replay_events
from jaxpaged._src.pressure import MemoryPressure
from jaxpaged._src.retention import PinnedPrefix
from jaxpaged._src.spec import CacheSpec
from jaxpaged._src.hlo import Collective
from jaxpaged._src.hlo import collectives
from jaxpaged._src.sharding import ShardedCache
from jaxpaged._src.sharding import init_sharded_cache
from jaxpaged._src.sharding import kv_replicas
from jaxpaged._src.sharding import make_mesh
from jaxpaged._src.sharding import map_shards
from jaxpaged._src.sharding import shard_view
from jaxpaged._src.blocks import CachedBlock
from jaxpaged._src.swap import SwappedSequence
from jaxpaged._src.blocks import block_key
from jaxpaged._src.blocks import demote_blocks
from jaxpaged._src.blocks import promote_blocks
from jaxpaged._src.swap import swap_in
from jaxpaged._src.swap import swap_out
from jaxpaged._src.spec import JaxPagedError
from jaxpaged._src.tier import AccessStats
from jaxpaged._src.tier import LFUPolicy
from jaxpaged._src.tier import LRUPolicy
from jaxpaged._src.tier import Tier
from jaxpaged._src.tier import TieredStore
from jaxpaged._src.tier import TierError
from jaxpaged._src.tier import TierPolicy
from jaxpaged._src.write_kv import write_kv

__version__ = "0.1.0"

__all__ = (
    "AccessStats",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "Admission",
    "CacheManager",
    "CacheSpec",
    "CachedBlock",
    "Collective",
    "CompressionStats",
    "DiskError",
    "DiskLayout",
    "DiskStore",
    "H2O",
    "JaxPagedError",
    "KeyNorm",
    "LFUPolicy",
    "LRUPolicy",
    "LeastLoadedRouter",
    "MemoryPressure",
    "MultiDeviceCacheManager",
    "PagedKVCache",
    "PinnedPrefix",
    "PrefixAwareRouter",
    "PrefixMatch",
    "RoundRobinRouter",
    "Router",
    "ShardLoad",
    "PrefixIndex",
    "KVEventLog",
    "ShardedCache",
    "StreamingLLM",
    "SwappedSequence",
    "Tier",
    "TierError",
    "TierPolicy",
    "TieredStore",
    "block_key",
    "check_compress",
    "check_extend",
    "check_fork",
    "check_match_prefix",
    "collectives",
    "compress",
    "defragment",
    "demote_blocks",
    "extend",
    "fork",
    "gather_kv",
    "init_cache",
    "init_sharded_cache",
    "kv_replicas",
    "load_prefixes",
    "make_mesh",
    "map_shards",
    "match_prefix",
    "num_cached_free_pages",
    "num_free_pages",
    "num_used_pages",
    "ops",
    "paged_attention",
    "prefix_stats",
    "promote_blocks",
    "ragged_paged_attention",
    "release",
    "resize",
    "shard_view",
    "reset_prefix_cache",
    "replay_events",
    "save_prefixes",
    "swap_in",
    "swap_out",
    "token_positions",
    "write_kv",
)
