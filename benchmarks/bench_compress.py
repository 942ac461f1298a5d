"""compress_cache benchmark (KV compression issue): being written."""

from __future__ import annotations


def run(quick: bool = False) -> list:
  raise NotImplementedError("bench_compress is being written")
