"""What a compiled program moves between devices: its collectives, read from the compiled HLO.

The scale-out claim "a decode step moves no K/V between devices" is checked (tests) and measured
(benchmarks) with `collectives`: every all-reduce, all-gather, all-to-all, reduce-scatter,
collective-permute and collective-broadcast of the optimized module, with the shapes it takes
and gives, its result bytes, and whether it sits in a loop body (a `lax.scan` over layers runs it
once per layer).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

OPS = ("all-reduce", "all-gather", "all-to-all", "ragged-all-to-all", "reduce-scatter",
       "collective-permute", "collective-broadcast")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s+([a-z][a-z0-9-]*)\((.*?)\)(.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s+\((.*)\)\s*->")  # computations are not indented
_PARAMETER = re.compile(r"(\S+):\s*([^,()]+\[[\d,]*\])")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: its op (``"-start"`` dropped), the ``(dtype, shape)`` of its
  result and operands (result first), its result bytes per device, the computation it is in,
  and ``in_loop``: whether that is a while body (run once per trip, e.g. per layer).

  >>> Collective("all-reduce", (("f32", (8, 576)),), 18432, "main", False).bytes
  18432
  """
  op: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]
  bytes: int
  computation: str
  in_loop: bool


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _SHAPE.findall(text)]


def collectives(compiled: Any) -> list[Collective]:
  """The collectives of a compiled program (``jax.jit(f).lower(...).compile()``, or its
  ``as_text()``), in program order.

  >>> import jax, jax.numpy as jnp
  >>> compiled = jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
  >>> collectives(compiled)  # one device: nothing crosses devices
  []
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  types, found, bodies, computation = {}, [], set(), ""
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      computation = header.group(1)
      types.update(_PARAMETER.findall(header.group(2)))
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, result, opcode, operands, rest = match.groups()
    types[name] = result
    bodies.update(re.findall(r"body=%([\w.\-]+)", rest))
    op = opcode.removesuffix("-start")
    if op in OPS:
      operand_types = [types.get(o, "") for o in re.findall(r"%([\w.\-]+)", operands)]
      size = sum(_BYTES.get(dtype, 1) * math.prod(shape) for dtype, shape in _shapes(result))
      found.append((op, tuple(_shapes(" ".join([result] + operand_types))), size, computation))
  return [Collective(op, shapes, size, where, where in bodies)
          for op, shapes, size, where in found]
