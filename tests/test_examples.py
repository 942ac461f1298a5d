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


def test_generate_example_stores_kv_in_int8(capsys):
  """``--kv-dtype int8``: the paged cache stores 8-bit K/V (a float32 scale per token and KV
  head), the script says so with the bytes a token takes, and greedy text stays on topic."""
  module = runpy.run_path(str(ROOT / "examples" / "generate.py"), run_name="example")
  assert module["main"](["--kv-dtype", "int8", "--max-new-tokens", "6",
                         "What is the capital of France?"]) == 0
  out = capsys.readouterr().out
  # SmolLM2-135M: 2 (K, V) x 30 layers x 3 KV heads x (64 bytes + a 4-byte scale).
  assert "K/V cache: int8, 12240 bytes per token" in out and "scales included" in out
  assert ">>> What is the capital of France?\nThe capital of France is" in out
  assert "stats: 1 sequences" in out


def test_generate_example_refuses_an_unknown_kv_dtype(capsys):
  import pytest  # pylint: disable=g-import-not-at-top
  module = runpy.run_path(str(ROOT / "examples" / "generate.py"), run_name="usage-test")
  with pytest.raises(SystemExit) as exit_:
    module["main"](["--kv-dtype", "int4", "Hello"])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.startswith("usage: ") and "Traceback" not in err
  # (how the choices are quoted differs between Python versions)
  assert "error: argument --kv-dtype: invalid choice: " in err and "int4" in err
  assert "float8_e4m3fn" in err


def test_serve_example_serves_with_fp8_kv(capsys, monkeypatch, tmp_path):
  monkeypatch.setattr(sys, "argv", [
      "serve.py", "--requests", "2", "--max-new-tokens", "3", "--step-clock", "--pages", "40",
      "--max-seqs", "4", "--token-budget", "64", "--kv-dtype", "float8_e4m3fn", "--show", "0",
      "--plot", str(tmp_path / "serve.png")])
  module = runpy.run_path(str(ROOT / "examples" / "serve.py"), run_name="example")
  assert module["main"]() == 0
  out = capsys.readouterr().out
  assert "K/V cache: float8_e4m3fn, 12240 bytes per token, pool 40 pages" in out
  assert "TTFT" in out and "summary" in out
