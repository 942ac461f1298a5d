"""The README's usage snippet and the example scripts run, and check themselves."""

import pathlib
import re
import runpy
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_readme_usage_snippet_runs():
  readme = (ROOT / "README.md").read_text()
  snippet = re.search(r"## Usage\n.*?```python\n(.*?)```", readme, re.S).group(1)
  exec(compile(snippet, "README.md", "exec"), {})  # the snippet asserts its own results


def test_decode_loop_example_matches_its_no_cache_oracle(capsys, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["decode_loop.py", "--batch", "3", "--steps", "8"])
  module = runpy.run_path(str(ROOT / "examples" / "decode_loop.py"), run_name="example")
  assert module["main"]() == 0
  out = capsys.readouterr().out
  assert "matches the no-cache model: True" in out and "stats:" in out
