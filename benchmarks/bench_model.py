"""Real-model benchmarks (model issue): SmolLM2-135M-Instruct decode throughput.

Decode tokens/s at batch 1, 8 and 32: jaxpaged's paged model against Hugging Face transformers
``generate`` on the same GGUF weights and prompts (float32, greedy, fixed length), and against
the same JAX model on a dense contiguous cache. Decode time excludes prefill on both sides
(transformers: a 1-token generate is subtracted), and jitted programs are compiled before
timing. Contenders alternate within each repetition; medians are reported.

Then the paged decode step's breakdown (`step_breakdown`): the compiled step with one part
swapped for a near-free stand-in of the same shapes, side by side with the whole step; a part's
share is the time its removal saves ("host": generate's decode loop per step beyond the
compiled step: dispatch and host round trips). Shares need not add up to 100%: the rest is
norms, rotary embeddings, `extend`, sampling and the loops themselves, and removing one part
can change how XLA schedules the others.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.harness import Row
import jaxpaged as jp
from jaxpaged.models import generation, gguf, llama

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


# ----------------------------------------------------------------------------- step breakdown
# Each part of the compiled decode step is swapped for a stand-in of the same shapes that costs
# next to nothing; its share is the time it saves, measured side by side with the full step.
_STEP_PARTS = {
    "attention": {(jp, "paged_attention"): lambda q, *a, **k: q},
    "cache writes": {(jp, "write_kv"): lambda cache, *a, **k: cache},
    "QKV + o projections": {
        (llama, "_qkv"): lambda h, w, c: (h, h[:, :c.num_kv_heads * c.head_dim],
                                          h[:, :c.num_kv_heads * c.head_dim]),
        (llama, "_output"): lambda attn, w: attn},
    "MLP": {(llama, "_mlp"): lambda h, w, c: h},
    "lm_head": {(llama, "_logits"): lambda p, x, q, c: jnp.zeros((x.shape[0], c.vocab_size))},
}
_STEPS = 8  # decode steps per compiled call (generate's default)


@contextlib.contextmanager
def _swapped(parts):
  saved = {where: getattr(*where) for where in parts}
  try:
    for (module, name), stand_in in parts.items():
      setattr(module, name, stand_in)
    yield
  finally:
    for (module, name), original in saved.items():
      setattr(module, name, original)


def step_breakdown(params, config, prompts, repeats: int) -> dict[str, float]:
  """Seconds of one paged decode step (greedy, the compiled `generation._decode_steps`; fastest
  of ``repeats``), whole (``"step"``) and saved by swapping each part of `_STEP_PARTS` out; ``"host"``: generate's
  decode seconds per step minus the compiled step (dispatch, host round trips)."""
  params = generation.fused_params(params)
  steps_fn = generation._decode_steps.__wrapped__  # pylint: disable=protected-access
  batch = len(prompts)
  new_tokens = _STEPS * (repeats + 2)
  plan = generation.check_generate(params, config, prompts, new_tokens, None, 0.0, 1.0, 0, 16,
                                   256, _STEPS, jnp.float32, "auto", False, False, None)
  static = dict(config=config, steps=_STEPS, temperature=0.0, top_p=1.0, impl="auto")

  def contender(parts):
    first = generation._prefill_and_sample(  # pylint: disable=protected-access
        params, config, generation._new_cache(config, plan)[0], plan)  # pylint: disable=protected-access
    state = [first.cache, first.tokens, jnp.zeros(batch, bool),
             jnp.full((batch,), new_tokens, jnp.int32), first.key]
    seq_ids, no_eos = jnp.arange(batch, dtype=jnp.int32), jnp.int32(-1)
    # A new function for each contender: jit would reuse the trace of the same one.
    fresh = functools.wraps(steps_fn)(lambda *args, **kwargs: steps_fn(*args, **kwargs))
    with _swapped(parts):
      compiled = jax.jit(fresh, static_argnames=tuple(static), donate_argnames=("cache",)
                         ).lower(params, state[0], seq_ids, *state[1:4], no_eos, state[4],
                                 **static).compile()

    def call():  # seconds a step; the contexts grow by _STEPS tokens a call, as in generate
      start = time.perf_counter()
      out = compiled(params, state[0], seq_ids, *state[1:4], no_eos, state[4])
      state[:] = out[:5]
      out[5].block_until_ready()
      return (time.perf_counter() - start) / _STEPS
    return call

  def generate():  # seconds a step of generate's decode loop (2 calls of _STEPS steps)
    return generation.generate(params, config, prompts, max_new_tokens=2 * _STEPS + 1,
                               eos_id=None).decode_seconds / (2 * _STEPS)

  calls = {"step": contender({}), **{name: contender(parts) for name, parts in _STEP_PARTS.items()},
           "generate": generate}
  times = {name: [] for name in calls}
  for name, call in calls.items():
    call()
  for _ in range(repeats):
    for name, call in calls.items():
      times[name].append(call())
  # The fastest of the repetitions: the least disturbed by other load on a shared machine.
  step = min(times["step"])
  shares = {"step": step, **{name: step - min(times[name]) for name in _STEP_PARTS}}
  shares["host"] = min(times["generate"]) - step
  return shares


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
      target = 2.0
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
    shares = step_breakdown(params, config, prompts, repeats=repeats)
    rows.append(Row("model-step", f"batch {batch}: compiled decode step", shares["step"] * 1e3,
                    "ms"))
    rows += [Row("model-step", f"batch {batch}: step share: {part}",
                 100 * shares[part] / shares["step"], "%") for part in (*_STEP_PARTS, "host")]
  return rows
