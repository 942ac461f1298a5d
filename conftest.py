"""Doctests see the public API, as a user would after `from jaxpaged import *`; every test
process has 8 CPU host devices."""

import os

# Eight CPU host devices for the mesh tests (tests/test_sharding.py and the models' mesh tests):
# XLA reads this when JAX's backend starts, so it must be set before anything touches a device.
# Single-device code keeps running on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax.numpy as jnp
import pytest

import jaxpaged


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace.update({name: getattr(jaxpaged, name) for name in jaxpaged.__all__})
  doctest_namespace["jnp"] = jnp
  doctest_namespace["jaxpaged"] = jaxpaged
