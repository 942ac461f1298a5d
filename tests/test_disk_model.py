"""The disk tier under the model: `generate(disk_cache=)`, `Server(disk_cache=)` and the
``--disk-cache`` command line, across separate processes (the issue's restart test)."""

import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged.models import LlamaConfig, generation, llama, serving

ROOT = pathlib.Path(__file__).parent.parent
TINY = LlamaConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn=48)


@pytest.fixture(scope="module")
def tiny():
  return TINY, llama.random_params(TINY, seed=0)


def _prompts():
  rng = np.random.default_rng(0)
  shared = rng.integers(1, 64, 21).tolist()
  return [shared + rng.integers(1, 64, 14).tolist(), shared + rng.integers(1, 64, 9).tolist(),
          rng.integers(1, 64, 5).tolist()]


def _full_blocks(prompt, page_size):
  """Prompt tokens in full blocks before its last token: what a prefix hit can cover."""
  return (len(prompt) - 1) // page_size * page_size


def test_a_second_generate_reads_every_full_prompt_block_from_disk(tiny, tmp_path):
  config, params = tiny
  prompts = _prompts()
  run = lambda: generation.generate(params, config, prompts, max_new_tokens=6, eos_id=None,
                                    page_size=4, disk_cache=tmp_path)
  cold = run()
  assert cold.disk_prompt_tokens == 0
  warm = run()
  # Every full block before each prompt's last token came back (from disk, or from the device
  # once an earlier row had loaded the shared one): the second run computes < 1 block a row.
  assert warm.cached_prompt_tokens == sum(_full_blocks(p, 4) for p in prompts)
  assert warm.disk_prompt_tokens >= warm.cached_prompt_tokens - _full_blocks(prompts[0][:21], 4)
  assert warm.tokens == cold.tokens  # greedy: the same text
  np.testing.assert_allclose(warm.first_logits, cold.first_logits, atol=1e-5)
  uncached = generation.generate(params, config, prompts, max_new_tokens=6, eos_id=None,
                                 page_size=4)
  np.testing.assert_allclose(warm.first_logits, uncached.first_logits, atol=1e-5)


def test_another_model_or_dtype_never_reads_the_blocks(tiny, tmp_path):
  config, params = tiny
  prompts = _prompts()
  generation.generate(params, config, prompts, max_new_tokens=1, eos_id=None, page_size=4,
                      disk_cache=tmp_path)
  other = llama.random_params(config, seed=1)  # another checkpoint of the same architecture
  assert llama.model_fingerprint(other, config) != llama.model_fingerprint(params, config)
  out = generation.generate(other, config, prompts, max_new_tokens=1, eos_id=None, page_size=4,
                            disk_cache=tmp_path)
  assert out.disk_prompt_tokens == 0
  out = generation.generate(params, config, prompts, max_new_tokens=1, eos_id=None, page_size=4,
                            disk_cache=tmp_path, cache_dtype=jnp.bfloat16)
  assert out.disk_prompt_tokens == 0
  out = generation.generate(params, config, prompts, max_new_tokens=1, eos_id=None, page_size=8,
                            disk_cache=tmp_path)
  assert out.disk_prompt_tokens == 0


@pytest.mark.parametrize("arguments, message", [
    (dict(disk_cache=3), r"disk_cache must be a directory path or a jaxpaged\.DiskStore, got 3"),
    (dict(disk_cache="DIR", disk_bytes=10), r"capacity=10 bytes is below one block file"),
    (dict(disk_cache="DIR", dense_cache=True), r"disk_cache keeps prefix blocks of the paged"),
    (dict(disk_cache="DIR", disk_bytes=-1), r"capacity must be a byte count"),
])
def test_generate_refuses_bad_disk_arguments_before_running(tiny, tmp_path, monkeypatch,
                                                            arguments, message):
  config, params = tiny
  monkeypatch.setattr(jp, "init_cache", lambda *a, **k: pytest.fail("ran"))
  if arguments.get("disk_cache") == "DIR":
    arguments["disk_cache"] = tmp_path / "store"
  with pytest.raises(jp.JaxPagedError, match=message):
    generation.generate(params, config, [[1, 2, 3]], max_new_tokens=1, eos_id=None, **arguments)


def test_a_restarted_server_reads_what_the_first_one_computed(tiny, tmp_path):
  config, params = tiny
  requests = [serving.Request(p, 4, arrival=i) for i, p in enumerate(_prompts())]
  make = lambda: serving.Server(params, config, eos_id=0, num_pages=32, max_seqs=4, page_size=4,
                                max_seq_len=64, token_budget=32, disk_cache=tmp_path)
  cold = make().run(requests, realtime=False)
  assert cold.stats["disk_hit_tokens"] == 0 and cold.stats["disk_saved_blocks"] > 0
  warm = make().run(requests, realtime=False)
  assert [r.output for r in warm.results] == [r.output for r in cold.results]
  assert warm.stats["disk_hit_tokens"] > 0
  computed = lambda s: (s["prompt_tokens"] - s["device_hit_tokens"] - s["host_hit_tokens"])
  assert computed(warm.stats) <= sum(len(p) - _full_blocks(p, 4) for p in _prompts())
  assert computed(warm.stats) < computed(cold.stats)


def _generate_cli(store: pathlib.Path, questions: list[str]) -> str:
  done = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "generate.py"), "--max-new-tokens", "4",
       "--disk-cache", str(store), *questions], capture_output=True, text=True, timeout=600,
      cwd=ROOT, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  return done.stdout


def test_generate_cli_in_a_second_process_computes_at_most_one_block_per_prompt(tmp_path):
  """SmolLM2 in two separate processes on one --disk-cache directory: the second reads every
  full block of every prompt before its last token from disk (the first wrote them), so it
  computes fewer than one block (16 tokens) per prompt, and answers the same."""
  questions = ["Why is the sky blue?", "Name three prime numbers."]
  first = _generate_cli(tmp_path, questions)
  second = _generate_cli(tmp_path, questions)
  line = re.compile(r"disk cache .*: (\d+) of (\d+) prompt tokens read from disk, (\d+) served "
                    r"by the prefix cache in all")
  (read1, total1, cached1), = line.findall(first)
  (read2, total2, cached2), = line.findall(second)
  assert int(read1) == int(cached1) == 0 and total1 == total2
  computed = int(total2) - int(cached2)
  assert computed <= 16 * len(questions)  # at most one block (page_size 16) per prompt
  assert int(read2) > 0
  answers = lambda out: out.split("\n>>> ", 1)[1].split("\nstats:")[0]
  assert answers(second) == answers(first)
