"""The design's promises about the code itself: every public name shows a runnable example (run
as a doctest by this suite), and modules meet only through names they document (no module
reaches into another's ``_private`` names)."""

import ast
import inspect
import pathlib

import pytest

import jaxpaged
import jaxpaged.models
from jaxpaged import ops

ROOT = pathlib.Path(jaxpaged.__file__).parent


def _public():
  for module in (jaxpaged, ops, jaxpaged.models):
    for name in getattr(module, "__all__", None) or [n for n in dir(module)
                                                     if not n.startswith("_")]:
      obj = getattr(module, name)
      if not inspect.ismodule(obj) and (callable(obj) or inspect.isclass(obj)):
        yield f"{module.__name__}.{name}", obj


@pytest.mark.parametrize("name,obj", list(_public()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_public_name_has_a_runnable_example(name, obj):
  assert ">>>" in (inspect.getdoc(obj) or ""), f"{name} has no example in its docstring"


def _private_reaches(path: pathlib.Path):
  tree = ast.parse(path.read_text())
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxpaged"):
      for alias in node.names:
        if alias.name.startswith("_") and not alias.name.startswith("__"):
          yield f"from {node.module} import {alias.name}"
        modules.add(alias.asname or alias.name)
    elif isinstance(node, ast.Import):
      modules.update(a.asname or a.name for a in node.names if a.name.startswith("jaxpaged"))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in modules and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      yield f"{node.value.id}.{node.attr}"


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: p.name)
def test_no_module_reaches_into_another_modules_private_names(path):
  assert not list(_private_reaches(path))


def test_the_checker_sees_a_private_reach(tmp_path):  # the oracle of the test above
  source = tmp_path / "m.py"
  source.write_text("from jaxpaged._src import cache\nfrom jaxpaged._src.cache import _x\n"
                    "cache._y\n")
  assert list(_private_reaches(source)) == ["from jaxpaged._src.cache import _x", "cache._y"]
