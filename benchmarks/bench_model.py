"""Real-model benchmarks (model issue): SmolLM2-135M-Instruct decode throughput.

Decode tokens/s at batch 1, 8 and 32: jaxpaged's paged model against Hugging Face transformers
``generate`` on the same GGUF weights and prompts (float32, greedy, fixed length), and against
the same JAX model on a dense contiguous cache. Decode time excludes prefill on both sides
(transformers: a 1-token generate is subtracted), and jitted programs are compiled before
timing. Contenders alternate within each repetition; medians are reported.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.harness import Row
from jaxpaged.models import generation, gguf

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning a new language.",
    "Explain in two sentences why the sky is blue.",
    "Describe the water cycle.",
    "Write a short story about a robot who learns to paint.",
)


def _hf_decode_seconds(torch, hf, prompts, new_tokens, pad_id):
  """transformers: time(generate new_tokens) - time(generate 1), left-padded batch."""
  width = max(map(len, prompts))
  ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

  def run(n):
    start = time.perf_counter()
    with torch.no_grad():
      hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                  do_sample=False, pad_token_id=pad_id)
    return time.perf_counter() - start

  return run(new_tokens) - run(1)


def run(quick: bool = False) -> list[Row]:
  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    path = gguf.smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32)
  except ImportError:
    hf = None
  new_tokens, repeats = (16, 2) if quick else (32, 3)
  rows = []
  for batch in (1, 8, 32):
    prompts = [tokenizer.encode(tokenizer.chat_prompt(PROMPTS[i % len(PROMPTS)]))
               for i in range(batch)]

    def ours(dense, prompts=prompts):
      result = generation.generate(params, config, prompts, max_new_tokens=new_tokens,
                                   eos_id=None, dense_cache=dense)  # fixed length
      assert result.decode_tokens == tokens
      return result.decode_seconds

    tokens = batch * (new_tokens - 1)  # the first new token comes from prefill, on both sides
    ours(False), ours(True)  # compile
    times = {"paged": [], "dense": [], "hf": []}
    for _ in range(repeats):
      for name in ("paged", "dense"):
        times[name].append(ours(name == "dense"))
      if hf is not None:
        times["hf"].append(_hf_decode_seconds(torch, hf, prompts, new_tokens,
                                              tokenizer.eos_token_id))
    rate = {name: tokens / statistics.median(t) for name, t in times.items() if t}
    rows.append(Row("model-decode", f"batch {batch}: jaxpaged paged tokens/s", rate["paged"],
                    "tok/s"))
    if "hf" in rate:
      target = 3.0 if batch == 32 else 1.0
      rows += [Row("model-decode", f"batch {batch}: transformers generate tokens/s", rate["hf"],
                   "tok/s"),
               Row("model-decode", f"batch {batch}: paged / transformers tokens/s",
                   rate["paged"] / rate["hf"], "x", f">= {target:g}",
                   rate["paged"] / rate["hf"] >= target)]
    else:
      rows.append(Row("model-decode", f"batch {batch}: transformers (not installed: skipped)",
                      0.0, "-"))
    rows.append(Row("model-decode", f"batch {batch}: paged / dense-cache JAX tokens/s",
                    rate["paged"] / rate["dense"], "x", ">= 0.95",
                    rate["paged"] / rate["dense"] >= 0.95))
  return rows
