"""8-bit K/V benchmark (KV compression issue): being written."""

from __future__ import annotations


def run(quick: bool = False) -> list:
  raise NotImplementedError("bench_quant is being written")
