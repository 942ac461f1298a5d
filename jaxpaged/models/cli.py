"""Argument types for the example command lines: a bad value is argparse's usage error (exit
status 2, a message saying what was expected), never a traceback."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def integer(minimum: int | None = None, below: int | None = None) -> Callable[[str], int]:
  """An argparse type: an int in ``[minimum, below)``.

  >>> integer(1)("3")
  3
  >>> integer(1)("0")
  Traceback (most recent call last):
  ...
  argparse.ArgumentTypeError: must be >= 1, got 0
  """
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if minimum is not None and value < minimum:
      raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    if below is not None and value >= below:
      raise argparse.ArgumentTypeError(f"must be < {below}, got {value}")
    return value
  return parse


def power_of_two(text: str) -> int:
  """An argparse type: a power of two (1, 2, 4, ...).

  >>> power_of_two("64")
  64
  """
  value = integer(1)(text)
  if value & (value - 1):
    raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
  return value


def number(minimum: float | None = None, maximum: float | None = None, *,
           above_minimum: bool = False, note: str = "") -> Callable[[str], float]:
  """An argparse type: a finite float in ``[minimum, maximum]`` (``(minimum, maximum]`` with
  ``above_minimum``); ``note`` is added to the message of a refused value.

  >>> number(0, 1, above_minimum=True)("0.9")
  0.9
  """
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    low_ok = minimum is None or (value > minimum if above_minimum else value >= minimum)
    if not (math.isfinite(value) and low_ok and (maximum is None or value <= maximum)):
      low = "" if minimum is None else f"{'>' if above_minimum else '>='} {minimum}"
      high = "" if maximum is None else f"<= {maximum}"
      bounds = " and ".join(b for b in (low, high) if b)
      raise argparse.ArgumentTypeError(f"must be a finite number{' ' + bounds if bounds else ''}"
                                       f"{note}, got {text!r}")
    return value
  return parse
