"""Prints the code-structure figures the design is held to (README "Design").

Usage: ``python scripts/structure.py [REPO_ROOT]``. Counts, over ``jaxpaged/``:
largest source file and longest function (lines, docstring included), functions over 40
lines, cross-module private imports (``from m import _x`` or ``m._x`` on an imported jaxpaged
module), public names (``jaxpaged.__all__``, ``jaxpaged.ops``, ``jaxpaged.models``) whose
docstring has a runnable example (``>>>``), and public parameters with a type annotation
(``*args``/``**kwargs`` not counted).
"""
import ast
import importlib
import inspect
import pathlib
import sys


def main(root: pathlib.Path) -> None:
  sys.path.insert(0, str(root))
  sizes, functions, private = [], [], []
  for path in sorted((root / "jaxpaged").rglob("*.py")):
    tree = ast.parse(path.read_text())
    name = str(path.relative_to(root))
    sizes.append((len(path.read_text().splitlines()), name))
    modules = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxpaged"):
        for alias in node.names:
          if alias.name.startswith("_") and not alias.name.startswith("__"):
            private.append(f"{name}: from {node.module} import {alias.name}")
          modules[alias.asname or alias.name] = node.module
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.startswith("jaxpaged"):
            modules[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in modules and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        private.append(f"{name}: {node.value.id}.{node.attr}")
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
  public = []
  for module_name in ("jaxpaged", "jaxpaged.ops", "jaxpaged.models"):
    module = importlib.import_module(module_name)
    for attr in getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]:
      obj = getattr(module, attr)
      if inspect.ismodule(obj) or not (callable(obj) or inspect.isclass(obj)):
        continue
      public.append((f"{module_name}.{attr}", obj))
  with_example = [n for n, o in public if ">>>" in (inspect.getdoc(o) or "")]
  params = typed = 0
  for _, obj in public:
    targets = [obj.__init__] if inspect.isclass(obj) else [obj]
    if inspect.isclass(obj):
      targets += [m for k, m in vars(obj).items() if inspect.isfunction(m) and not k.startswith("_")]
    for fn in targets:
      try:
        signature = inspect.signature(fn)
      except (TypeError, ValueError):
        continue
      for p in signature.parameters.values():
        if p.name in ("self", "cls") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
          continue  # (*args/**kwargs of generated __init__s: exceptions, enums, NamedTuples)
        params += 1
        typed += p.annotation is not inspect.Parameter.empty
  sizes.sort()
  functions.sort()
  print(f"largest file: {sizes[-1][1]} ({sizes[-1][0]} lines); files over 400 lines: "
        f"{sum(n > 400 for n, _ in sizes)}")
  print(f"longest function: {functions[-1][1]} ({functions[-1][0]} lines); functions over 40 "
        f"lines: {sum(n > 40 for n, _ in functions)}")
  print(f"cross-module private imports: {len(private)}")
  for line in private:
    print("  ", line)
  print(f"public names with a runnable example: {len(with_example)} of {len(public)}")
  print("   without:", ", ".join(n for n, _ in public if n not in with_example))
  print(f"typed public parameters: {typed} of {params}")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
