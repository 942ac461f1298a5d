"""Hypothesis profiles: deterministic by default (CI must not flake); JAXPAGED_HYPOTHESIS=thorough
runs many more, freshly random examples; =noshrink reports a failure without minimising it (fast)."""

import gc
import os

import jax
import pytest
from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "default", derandomize=True, database=None, deadline=None, max_examples=60,
    stateful_step_count=50, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", deadline=None, max_examples=1000, stateful_step_count=60,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "noshrink", parent=settings.get_profile("default"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("JAXPAGED_HYPOTHESIS", "default"))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Every module compiles its own programs; dropping them afterwards keeps one process's
  XLA:CPU compiler memory bounded over the whole suite (a long run once aborted in a compile)."""
  yield
  jax.clear_caches()
  gc.collect()
