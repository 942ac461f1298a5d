"""Where every kernel picks its GPU backend and implementation (one place to change them).

Backend: Pallas Triton (see `jaxpaged._src.write_kv` for why). JAX 0.11+ warns that it is
deprecated; that warning is expected and silenced here. The filter is process-wide and matches
that one message, so it also silences the warning for Triton kernels outside jaxpaged.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax

from jaxpaged._src.spec import JaxPagedError

IMPLS = ("auto", "xla", "pallas")

# JAX >= 0.11 warns on every Triton lowering; the choice is deliberate and documented.
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


def resolve_impl(impl: str) -> str:
  """``"auto"`` means the Pallas kernel on GPU and the XLA path everywhere else."""
  if impl not in IMPLS:
    raise JaxPagedError(f"impl must be one of {IMPLS}, got {impl!r}.")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


def compiler_params(*, num_warps: int, num_stages: int) -> Any:
  """Triton compiler parameters for `pl.pallas_call`: warps per program, and pipeline stages of
  the kernel's loops of loads."""
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
  """A Triton dot (float32 result) without TF32 rounding of float32 inputs."""
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.dot(a, b, trans_b=trans_b, allow_tf32=False)


def pow2_chunks(n: int) -> list[tuple[int, int]]:
  """Splits ``range(n)`` into power-of-two (start, size) pieces, largest first: 80 -> 64 + 16."""
  chunks, start = [], 0
  for bit in reversed(range(n.bit_length())):
    if n >> bit & 1:
      chunks.append((start, 1 << bit))
      start += 1 << bit
  return chunks
