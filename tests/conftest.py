"""Hypothesis profiles: deterministic by default (CI must not flake); JAXPAGED_HYPOTHESIS=thorough
runs many more, freshly random examples; =noshrink reports a failure without minimising it (fast)."""

import os

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
