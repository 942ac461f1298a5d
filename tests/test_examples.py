"""The README's usage snippets and the example scripts run, and check themselves."""

import pathlib
import re
import runpy
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_readme_usage_snippets_run():
  readme = (ROOT / "README.md").read_text()
  usage = readme.split("## Usage\n")[1].split("\n## ")[0]
  snippets = re.findall(r"```python\n(.*?)```", usage, re.S)
  assert len(snippets) == 2  # the cache core, then the CacheManager
  namespace = {}
  for snippet in snippets:  # one session: the second uses the first's imports
    exec(compile(snippet, "README.md", "exec"), namespace)  # the snippets assert their results


def test_decode_loop_example_matches_its_no_cache_oracle(capsys, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["decode_loop.py", "--batch", "3", "--steps", "8"])
  module = runpy.run_path(str(ROOT / "examples" / "decode_loop.py"), run_name="example")
  assert module["main"]() == 0
  out = capsys.readouterr().out
  assert "matches the no-cache model: True" in out and "stats:" in out
