"""What a compiled program moves between devices: its collectives, read from the compiled HLO.

The scale-out claim "a decode step moves no K/V between devices" is checked (tests) and measured
(benchmarks) with `collectives`: every all-reduce, all-gather, all-to-all, reduce-scatter and
collective-permute of the optimized module, with its result shapes and bytes, and whether it sits
in a loop body (a `lax.scan` over layers runs it once per layer).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

OPS = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<result>.+?)\s+(?P<op>" + "|".join(OPS)
    + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8\w*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")  # not indented
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: its op, result shapes (``(dtype, shape)`` pairs), result bytes
  and the computation it is in (``in_loop``: a while body, run once per trip).

  >>> Collective("all-reduce", (("f32", (8, 576)),), 18432, "main", False).bytes
  18432
  """
  op: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]
  bytes: int
  computation: str
  in_loop: bool


def collectives(compiled: Any) -> list[Collective]:
  """The collectives of a compiled program (``jax.jit(f).lower(...).compile()``, or its
  ``as_text()``).

  >>> import jax, jax.numpy as jnp
  >>> compiled = jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
  >>> collectives(compiled)  # one device: nothing crosses devices
  []
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  bodies = set(re.findall(r"\bbody=%?([\w.\-]+)", text))
  found, computation = [], ""
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group("name")
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    shapes = tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                   for dtype, dims in _SHAPE.findall(match.group("result")))
    size = sum(_BYTES.get(dtype, 1) * math.prod(shape) for dtype, shape in shapes)
    found.append(Collective(match.group("op"), shapes, int(size), computation,
                            computation in bodies))
  return found
