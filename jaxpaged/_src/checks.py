"""Argument checks shared by every entry point: what each kind of argument must be, said once.

Integers are used exactly or refused, never truncated. Python ints and NumPy arrays are checked
on the host; JAX int32 arrays are used as they are, narrower ones widened. A JAX uint32 or 64-bit
(only with ``jax_enable_x64``) array is checked when its values are known; traced, a uint32 array
is bitcast (token ids: they stay distinct) or clamped to INT32_MAX (ids and counts: every check
then refuses them), and a 64-bit one is refused, since its values could not be checked. Salts
are 64-bit (`salt_lanes`).

Internal API of ``jaxpaged._src`` (the public functions call these before anything is traced):
`index_vector`, `index_table`, `token_ids`, `host_token_ids`, `salt_lanes`, `salt`,
`split_salt`, `salt_int`, `count`, `integer`, `is_int`, `real`, `flag`, `raise_first`,
`is_traced`.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxpaged._src.hashing import LANE_BITS
from jaxpaged._src.spec import INT32_MAX, INT32_MIN, JaxPagedError

SALT_LIMIT = 1 << 64  # salts are unsigned 64-bit
# A salt is two uint32 lanes on device (JAX runs without 64-bit integers by default).
LANE_MASK = (1 << LANE_BITS) - 1
SHOWN_VALUES = 4  # bad values an error message quotes: enough to see what is wrong


def is_traced(x: Any) -> bool:
  """Whether ``x`` is a tracer (its values are unknown until the program runs)."""
  return isinstance(x, jax.core.Tracer)


def _host_integers(name: str, value: Any) -> np.ndarray:
  """``value`` as a NumPy integer array with its exact values (Python ints of any size kept)."""
  array = np.asarray(value)
  if array.dtype.kind == "f" and not hasattr(value, "dtype") and array.size:
    # NumPy turns a list mixing ints below and at/above 2**63 into float64: keep them exact.
    exact = np.asarray(value, dtype=object)
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
           for x in exact.reshape(-1).tolist()):
      array = exact
  if array.dtype == object:  # Python ints beyond 64 bits, or mixed types
    flat = array.reshape(-1).tolist()
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in flat):
      raise JaxPagedError(f"{name} must hold integers, got {value!r}.")
    return array
  if array.size == 0 and array.dtype.kind == "f":  # [] and np.array([]) are float64
    return array.astype(np.int64)
  if array.dtype.kind not in "iu":
    raise JaxPagedError(f"{name} must have an integer dtype, got {array.dtype}; pass integers "
                        f"(e.g. np.asarray({name}, np.int32)).")
  return array


def _fits_int32(name: str, array: np.ndarray, what: str) -> None:
  if array.size and (int(array.min()) < INT32_MIN or int(array.max()) > INT32_MAX):
    bad = [int(x) for x in array.reshape(-1).tolist() if not INT32_MIN <= int(x) <= INT32_MAX]
    raise JaxPagedError(f"{name} holds {bad[:SHOWN_VALUES]}, outside int32 [{INT32_MIN}, "
                        f"{INT32_MAX}]: {what} are int32 and are never truncated; pass values "
                        "in range.")


def _device_int32(name: str, value: jax.Array, *, bitcast_uint32: bool) -> jax.Array:
  """An integer JAX array as int32, exactly (see the module docstring)."""
  dtype = value.dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise JaxPagedError(f"{name} must have an integer dtype, got {dtype}; cast with "
                        f"{name}.astype(jnp.int32).")
  if dtype == jnp.int32:
    return value
  if dtype.itemsize < 4:
    return value.astype(jnp.int32)
  if not is_traced(value):
    array = np.asarray(value)
    _fits_int32(name, array, "ids, counts and token ids")
    return jnp.asarray(array.astype(np.int32))
  if dtype == jnp.uint32:
    # Token ids only need to stay distinct (bitcast is one-to-one); ids and counts past int32
    # become INT32_MAX, which every check refuses (out of range, too long).
    if bitcast_uint32:
      return jax.lax.bitcast_convert_type(value, jnp.int32)
    return jnp.minimum(value, jnp.uint32(INT32_MAX)).astype(jnp.int32)
  raise JaxPagedError(f"{name} is a traced {dtype} array: its values cannot be checked against "
                      f"int32 inside jit; pass int32 (or uint32) {name}.")


def _as_array(name: str, value: Any, *, bitcast_uint32: bool = False) -> jax.Array:
  if isinstance(value, jax.Array):
    return _device_int32(name, value, bitcast_uint32=bitcast_uint32)
  array = _host_integers(name, value)
  _fits_int32(name, array, "ids, counts and token ids")
  return jnp.asarray(array.astype(np.int32))


def index_vector(name: str, value: ArrayLike, length: int | None = None, *,
                 per: str = "row of seq_ids") -> jax.Array:
  """A 1-D vector of ids or counts (one per batch row) as ``int32[length]``, exactly."""
  if isinstance(value, (bool, np.bool_)) or _ndim(name, value) != 1:
    raise JaxPagedError(f"{name} must be a 1-D integer array (one entry per batch row), got "
                        f"{_describe(value)}; e.g. jnp.array([0, 1], jnp.int32).")
  vector = _as_array(name, value)
  if length is not None and vector.shape[0] != length:
    raise JaxPagedError(f"{name} must have {length} entries (one per {per}), got "
                        f"{vector.shape[0]}; pass arrays of equal length.")
  return vector


def index_table(name: str, value: ArrayLike, rows: int | None = None) -> jax.Array:
  """A 2-D table of ids (a page table) as ``int32[rows, n]``, exactly."""
  if isinstance(value, (bool, np.bool_)) or _ndim(name, value) != 2:
    raise JaxPagedError(f"{name} must be a 2-D integer array, got {_describe(value)}.")
  table = _as_array(name, value)
  if rows is not None and table.shape[0] != rows:
    raise JaxPagedError(f"{name} has {table.shape[0]} rows but {rows} are needed (one per "
                        "sequence of the batch); give one row per sequence.")
  return table


def _ndim(name: str, value: Any) -> int:
  try:
    return np.ndim(value)
  except ValueError as e:  # ragged nested lists
    raise JaxPagedError(f"{name} must be a rectangular integer array, got ragged rows "
                        f"({e}); pad the rows to one length.") from None


def token_ids(name: str, value: ArrayLike, shape: tuple[int, ...] | None = None,
              ndim: int | None = None) -> jax.Array:
  """Token ids as int32, exactly (a traced uint32 array is bitcast: ids stay distinct)."""
  if _ndim(name, value) != (len(shape) if shape is not None else ndim):
    expected = f"int32{list(shape)}" if shape is not None else f"a {ndim}-D integer array"
    raise JaxPagedError(f"{name} must be {expected} of token ids, got {_describe(value)}.")
  tokens = _as_array(name, value, bitcast_uint32=True)
  if shape is not None and tuple(tokens.shape) != tuple(shape):
    raise JaxPagedError(f"{name} must be int32{list(shape)}, got {_describe(value)}.")
  return tokens


def salt_lanes(name: str, value: ArrayLike | Sequence[int] | None, rows: int) -> jax.Array:
  """Per-row 64-bit salts as ``uint32[rows, 2]`` (low, high 32 bits).

  Accepts None (salt 0), a Python int or NumPy integer (every row), a sequence or NumPy array of
  ``rows`` integers in ``[0, 2**64)``, a JAX integer array of ``rows`` salts (traced 32-bit
  values are taken as their unsigned bit pattern), or ``uint32[rows, 2]`` lanes.
  """
  if value is None:
    return jnp.zeros((rows, 2), jnp.uint32)
  if isinstance(value, jax.Array):
    if value.ndim == 2 and value.shape == (rows, 2) and value.dtype == jnp.uint32:
      return value
    if value.ndim != 1 or value.shape[0] != rows or not jnp.issubdtype(value.dtype, jnp.integer):
      raise JaxPagedError(f"{name} must be {rows} integer salts (or uint32[{rows}, 2] lanes), "
                          f"got {_describe(value)}.")
    if is_traced(value):
      if value.dtype.itemsize == 8:  # only with jax_enable_x64: split exactly
        bits = jax.lax.bitcast_convert_type(value, jnp.uint64)
        return jnp.stack([bits.astype(jnp.uint32), (bits >> LANE_BITS).astype(jnp.uint32)],
                         axis=-1)
      low = value if value.dtype == jnp.uint32 else jax.lax.bitcast_convert_type(
          value.astype(jnp.int32), jnp.uint32)
      return jnp.stack([low, jnp.zeros_like(low)], axis=-1)
    value = np.asarray(value)
  if np.ndim(value) == 0:
    value = [value] * rows
  array = _host_integers(name, value)
  if array.ndim != 1 or array.shape[0] != rows:
    raise JaxPagedError(f"{name} must be {rows} integer salts (one per row), got "
                        f"{_describe(value)}.")
  salts = [_salt(name, x) for x in array.tolist()]
  return jnp.asarray(np.array([split_salt(s) for s in salts], np.uint32).reshape(rows, 2))


def split_salt(value: int) -> tuple[int, int]:
  """A salt in ``[0, 2**64)`` as its (low, high) 32-bit lanes; `salt_int` joins them."""
  return value & LANE_MASK, value >> LANE_BITS


def salt(name: str, value: Any) -> int:
  """One salt (a Python or NumPy int in ``[0, 2**64)``) as a Python int."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise JaxPagedError(f"{name} must be an int in [0, 2**64), got {_describe(value)}.")
  return _salt(name, int(value))


def _salt(name: str, value: int) -> int:
  if not 0 <= value < SALT_LIMIT:
    raise JaxPagedError(f"{name} is {value}: salts are unsigned 64-bit integers in [0, 2**64) "
                        "and are never truncated; map other values into that range (e.g. "
                        "salt % 2**64).")
  return value


def host_token_ids(name: str, value: ArrayLike | Sequence[int]) -> np.ndarray:
  """A 1-D sequence of token ids as an ``int32`` NumPy array, exactly (host-side callers)."""
  if isinstance(value, jax.Array) and is_traced(value):
    raise JaxPagedError(f"{name} must be concrete token ids here, got a traced array.")
  if _ndim(name, value) != 1:
    raise JaxPagedError(f"{name} must be a 1-D sequence of token ids, got {_describe(value)}.")
  array = _host_integers(name, np.asarray(value))
  _fits_int32(name, array, "token ids")
  return array.astype(np.int32)


def salt_int(lanes: ArrayLike) -> int:
  """The Python int of one salt's ``uint32[2]`` lanes (the inverse of `split_salt`)."""
  low, high = (int(x) for x in np.asarray(lanes, np.uint32).reshape(2))
  return low | high << LANE_BITS


def count(name: str, value: Any, *, minimum: int = 0, maximum: int | None = None,
          why: str = "") -> int:
  """A static count (a Python or NumPy int in ``[minimum, maximum]``) as a Python int."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise JaxPagedError(f"{name} must be a Python int >= {minimum}, got {_describe(value)}; it "
                        "is static (part of the compiled shape).")
  if value < minimum:
    raise JaxPagedError(f"{name} must be >= {minimum}, got {value}.")
  if maximum is not None and value > maximum:
    raise JaxPagedError(f"{name} must be at most {maximum}{why}, got {value}.")
  return int(value)


def raise_first(reasons: dict[str, tuple[str, str]], problems: dict[str, ArrayLike],
                **fmt: Any) -> None:
  """Raises the first reason whose mask is set: ``reasons`` maps a name to (argument, message);
  ``problems`` maps it to a boolean mask over rows (or a scalar)."""
  for name, mask in problems.items():
    mask = np.asarray(mask)
    if mask.any():
      argument, message = reasons[name]
      where = f" at rows {np.flatnonzero(mask).tolist()}" if mask.ndim else ""
      raise JaxPagedError(f"{argument}{where}: {message.format(**fmt)}.")


def _describe(value: Any) -> str:
  shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
  if shape is not None and dtype is not None:
    return f"{dtype}{list(shape)}"
  return f"{value!r} ({type(value).__name__})"


def is_int(value: Any) -> bool:
  """Whether ``value`` is an int (NumPy ints too, bools not)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _show_bound(n: int) -> str:
  """A bound as an error message writes it: ``2**64`` rather than 18446744073709551616 (powers of
  two from 2**32 up, where the digits stop being readable)."""
  if abs(n) >= 1 << 32 and abs(n) & (abs(n) - 1) == 0:
    return f"{'-' if n < 0 else ''}2**{abs(n).bit_length() - 1}"
  return str(n)


def _bounds(minimum: int | None, below: int | None) -> str:
  """``[minimum, below)`` as an error message writes it, after "must be an int"."""
  if minimum is None and below is None:
    return ""
  if below is None:
    return f" >= {_show_bound(minimum)}"
  if minimum is None:
    return f" < {_show_bound(below)}"
  return f" in [{_show_bound(minimum)}, {_show_bound(below)})"


def integer(name: str, value: Any, *, minimum: int | None = None, below: int | None = None,
            fix: str = "") -> int:
  """``value`` as a Python int, if it is an int (NumPy ints too, bools not) in
  ``[minimum, below)``."""
  fix = f"; {fix}" if fix else ""
  bounds = _bounds(minimum, below)
  if not is_int(value):
    raise JaxPagedError(f"{name} must be an int{bounds}, got {value!r} "
                        f"({type(value).__name__}){fix}.")
  if minimum is not None and value < minimum or below is not None and value >= below:
    raise JaxPagedError(f"{name} must be an int{bounds}, got {value}{fix}.")
  return int(value)


def real(name: str, value: Any) -> float:
  """``value`` as a float, if it is an int or float (bools not)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                   np.floating)):
    raise JaxPagedError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
  return float(value)


def flag(name: str, value: Any) -> bool:
  """``value`` as a bool, if it is one (NumPy bools too)."""
  if not isinstance(value, (bool, np.bool_)):
    raise JaxPagedError(f"{name} must be True or False, got {value!r} "
                        f"({type(value).__name__}).")
  return bool(value)


UNSET = object()  # `renamed`: the old keyword was not passed


def renamed(new_name: str, new_value: Any, old_name: str, old_value: Any) -> Any:
  """The value of a keyword argument renamed from ``old_name`` to ``new_name``: the old name
  still works for now, with a `DeprecationWarning`; passing both is an error."""
  if old_value is UNSET:
    return new_value
  if new_value is not None:
    raise JaxPagedError(f"pass {new_name} only ({old_name} is its old name), got both.")
  warnings.warn(f"{old_name} is renamed {new_name}; the old name will be removed.",
                DeprecationWarning, stacklevel=3)
  return old_value


def id_list(name: str, value: Any, size: int, *, distinct: bool = False) -> list[int]:
  """Host sequence ids (an int or a 1-D sequence of ints) as a list, each in ``[0, size)``;
  with ``distinct``, each at most once."""
  array = np.atleast_1d(np.asarray(value))
  if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
    raise JaxPagedError(f"{name} must be sequence ids (ints), got {value!r}.")
  ids = [int(s) for s in array.tolist()]
  bad = [s for s in ids if not 0 <= s < size]
  if bad:
    raise JaxPagedError(f"{name} {bad} are out of range [0, {size}); pass the ids of "
                        "sequences in the cache.")
  if distinct and len(set(ids)) != len(ids):
    raise JaxPagedError(f"{name} {ids} repeat an id; name each sequence once.")
  return ids
