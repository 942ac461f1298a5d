"""Doctests see the public API, as a user would after `from jaxpaged import *`."""

import jax.numpy as jnp
import pytest

import jaxpaged


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace.update({name: getattr(jaxpaged, name) for name in jaxpaged.__all__})
  doctest_namespace["jnp"] = jnp
  doctest_namespace["jaxpaged"] = jaxpaged
