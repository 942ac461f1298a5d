"""compress benchmark (KV compression issue, token eviction): quality and cost on SmolLM2-135M.

Text: the Python reference manual's "Special method names" section, as the interpreter ships
it (``pydoc_data.topics.topics["specialnames"]``: offline, natural English with some code; it
differs slightly between Python versions).

- Perplexity: in each window (2 quick, 4 full, at token offsets 0, 2000, ...), prefill
  ``context`` tokens, `compress` the sequence at ratio 1, 0.5 and 0.25 with each policy
  (`StreamingLLM`, `KeyNorm`), then teacher-force the next ``continuation`` tokens one decode
  step at a time; report exp(mean NLL of each next token, all windows). "uncompressed" is the
  baseline (ratio 1 must equal it: compress then only moves the K/V).
- Passkey: a 5-digit number hidden at a depth (fraction of the context) in repeated filler
  sentences; after prefill and compression, the question is appended and 8 tokens are decoded
  greedily: retrieved (1) if the number appears in them.
- Cost: one `compress` of the perplexity context (a jitted step donating the cache, as the
  manager runs it), median time; device memory its eviction gives back (pages * page bytes).

`H2O` is not measured here: it needs accumulated attention scores, which this model does not
export.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Row

RATIOS = (1.0, 0.5, 0.25)
WINDOWS = (0, 2000, 4000, 6000)  # token offsets of the perplexity windows (quick: the first 2)
PASSKEY = "68213"
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")


def _policies():
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  return {"StreamingLLM": jp.StreamingLLM(sinks=4), "KeyNorm": jp.KeyNorm(sinks=4, recent=32)}


def run(quick: bool = False) -> list[Row]:
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  from jaxpaged.models import gguf, llama  # pylint: disable=g-import-not-at-top

  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  context, continuation = (512, 64) if quick else (1536, 256)
  depths = (0.1, 0.5, 0.9) if quick else (0.1, 0.25, 0.5, 0.75, 0.9)
  ps = 16
  spec = config.cache_spec(num_pages=(context + continuation) // ps + 8, max_seqs=1,
                           max_seq_len=context + continuation + 64, page_size=ps)
  prefill = jax.jit(functools.partial(llama.forward, config=config, decode=False))
  compress = jax.jit(jp.compress, static_argnames=("policy",))
  ids = jnp.array([0])

  @jax.jit
  def teacher_force(params, cache, inputs, targets):
    def step(cache, xy):
      x, y = xy
      cache, logits, _ = llama.forward(params, cache, x[None], ids, jnp.array([1]),
                                       config=config, decode=True)
      return cache, jax.nn.log_softmax(logits[0])[y]
    return jax.lax.scan(step, cache, (inputs, targets))[1]

  @jax.jit
  def greedy(params, cache, logits):
    def step(carry, _):
      cache, logits = carry
      token = jnp.argmax(logits, -1).astype(jnp.int32)
      cache, logits, _ = llama.forward(params, cache, token, ids, jnp.array([1]), config=config,
                                       decode=True)
      return (cache, logits), token[0]
    return jax.lax.scan(step, (cache, logits), None, length=8)[1]

  def fresh(tokens):
    return prefill(params, jp.init_cache(spec), jnp.asarray(tokens, jnp.int32), ids,
                   jnp.array([len(tokens)]))

  def variants(cache):
    """(policy name, ratio) -> the compressed cache (uncompressed: "none")."""
    out = {("none", 1.0): cache}
    for name, policy in _policies().items():
      for ratio in RATIOS:
        new, ok = compress(cache, ids, jnp.float32(ratio), policy=policy)
        if not bool(ok):
          raise RuntimeError(f"compress {name} {ratio} was refused")
        out[(name, ratio)] = new
    return out

  rows = []
  # ----- perplexity, over windows of the text
  text = tokenizer.encode(pydoc_data.topics.topics["specialnames"])
  used = lambda c: int(jp.num_used_pages(c))
  nlls, saved = {}, {}
  for offset in WINDOWS[:2 if quick else 4]:
    tokens = text[offset:offset + context + continuation + 1]
    cache, _, _ = fresh(tokens[:context])
    inputs = jnp.asarray(tokens[context:context + continuation], jnp.int32)
    targets = jnp.asarray(tokens[context + 1:context + continuation + 1], jnp.int32)
    for key, c in variants(cache).items():
      saved[key] = used(cache) - used(c)
      nlls.setdefault(key, []).append(-np.asarray(teacher_force(params, c, inputs, targets)))
  windows = len(next(iter(nlls.values())))
  for (name, ratio), nll in nlls.items():
    label = "uncompressed" if name == "none" else f"{name} ratio {ratio:g}"
    rows.append(Row("compress", f"perplexity {label} ({windows} x {context}+{continuation} "
                    "tokens)", float(np.exp(np.concatenate(nll).mean())), "ppl"))
    if name != "none":
      rows.append(Row("compress", f"memory saved {label} ({context} tokens)",
                      saved[(name, ratio)] * spec.page_bytes / 2**20, "MiB"))

  # ----- compression time (donating step, as the manager runs it)
  step = jax.jit(jp.compress, static_argnames=("policy",), donate_argnames=("cache",))
  for name, policy in _policies().items():
    times = []
    for i in range(2 + (3 if quick else 7)):
      c = jax.tree.map(jnp.copy, cache)
      jax.block_until_ready(c)
      start = time.perf_counter()
      jax.block_until_ready(step(c, ids, jnp.float32(0.5), policy=policy))
      if i >= 2:
        times.append(time.perf_counter() - start)
    rows.append(Row("compress", f"compress time {name} ratio 0.5 ({context} tokens, "
                    f"{config.num_layers} layers)", statistics.median(times) * 1e3, "ms"))

  # ----- passkey retrieval
  filler = tokenizer.encode(FILLER)
  needle = tokenizer.encode(f" The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass "
                            "key. ")
  question = tokenizer.encode(" What is the pass key? The pass key is")
  body = (filler * (context // len(filler) + 1))[:context - len(needle)]
  for depth in depths:
    at = int(depth * len(body)) // len(filler) * len(filler)  # between filler sentences
    prompt = body[:at] + needle + body[at:]
    cache, _, _ = fresh(prompt)
    for (name, ratio), c in variants(cache).items():
      c, logits, _ = prefill(params, c, jnp.asarray(question, jnp.int32), ids,
                             jnp.array([len(question)]))
      answer = tokenizer.decode(np.asarray(greedy(params, c, logits)).tolist())
      label = "uncompressed" if name == "none" else f"{name} ratio {ratio:g}"
      rows.append(Row("compress", f"passkey depth {depth:g} {label}",
                      float(PASSKEY in answer), "retrieved"))
  return rows
