"""A jitted decode loop on jaxpaged's paged KV cache, with a tiny random-weight attention model.

Ragged prompts are prefilled in one `extend` + `write_kv` call; decoding runs several steps per
jit call inside `lax.scan` (no host round trip, compiled once); one sequence is forked mid-way
and both branches continue (copy-on-write keeps them apart). The generated tokens are checked
against the same model recomputed without any cache.

  python examples/decode_loop.py [--steps 24] [--batch 4]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp

VOCAB, DIM, HEADS, HEAD_DIM = 256, 64, 2, 32


def init_model(key):
  keys = jax.random.split(key, 6)
  scale = DIM ** -0.5
  return {
      "embed": jax.random.normal(keys[0], (VOCAB, DIM)),
      "wq": jax.random.normal(keys[1], (DIM, HEADS, HEAD_DIM)) * scale,
      "wk": jax.random.normal(keys[2], (DIM, HEADS, HEAD_DIM)) * scale,
      "wv": jax.random.normal(keys[3], (DIM, HEADS, HEAD_DIM)) * scale,
      "wo": jax.random.normal(keys[4], (HEADS, HEAD_DIM, DIM)) * scale,
      "unembed": jax.random.normal(keys[5], (DIM, VOCAB)),
  }


def logits_from(params, attended):
  return jnp.einsum("hd,hdm->m", attended, params["wo"]) @ params["unembed"]


@functools.partial(jax.jit, static_argnames=("num_slots",), donate_argnames=("cache",))
def prefill(params, cache, seq_ids, tokens, lengths, *, num_slots):
  """Writes the K/V of prompt tokens (tokens: flat [num_slots], rows concatenated)."""
  cache, slots, ok = jp.extend(cache, seq_ids, lengths, num_slots=num_slots)
  x = params["embed"][tokens]
  k = jnp.einsum("tm,mhd->thd", x, params["wk"])
  v = jnp.einsum("tm,mhd->thd", x, params["wv"])
  return jp.write_kv(cache, 0, k, v, slots), ok


def decode_one(params, cache, seq_ids, tokens):
  """One step for every row: append the token's K/V, attend over the cache, pick the next."""
  cache, slots, ok = jp.extend(cache, seq_ids, jnp.where(seq_ids >= 0, 1, 0))
  x = params["embed"][tokens]
  q = jnp.einsum("bm,mhd->bhd", x, params["wq"])
  k = jnp.einsum("bm,mhd->bhd", x, params["wk"])
  v = jnp.einsum("bm,mhd->bhd", x, params["wv"])
  cache = jp.write_kv(cache, 0, k, v, slots)
  attended = jp.paged_attention(q, cache, 0, seq_ids)  # [B, HEADS, HEAD_DIM]
  logits = jax.vmap(logits_from, in_axes=(None, 0))(params, attended)
  return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32), ok


@functools.partial(jax.jit, static_argnames=("steps",), donate_argnames=("cache",))
def decode(params, cache, seq_ids, tokens, *, steps):
  """`steps` decode steps in one compiled call; returns the tokens fed at each step."""
  def body(carry, _):
    cache, tokens, all_ok = carry
    cache, next_tokens, ok = decode_one(params, cache, seq_ids, tokens)
    return (cache, next_tokens, all_ok & ok), tokens

  (cache, tokens, ok), fed = jax.lax.scan(body, (cache, tokens, True), None, length=steps)
  return cache, tokens, fed.T, ok


def no_cache_generate(params, prompt, steps):
  """The oracle: the same model in float64 NumPy with no cache, recomputing all K/V each step."""
  p = {name: np.asarray(w, np.float64) for name, w in params.items()}
  tokens = list(prompt)
  for _ in range(steps):
    x = p["embed"][tokens]
    k, v = np.einsum("tm,mhd->thd", x, p["wk"]), np.einsum("tm,mhd->thd", x, p["wv"])
    q = np.einsum("m,mhd->hd", x[-1], p["wq"])
    scores = np.einsum("hd,thd->ht", q, k) * HEAD_DIM ** -0.5
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    attended = np.einsum("ht,thd->hd", weights / weights.sum(-1, keepdims=True), v)
    tokens.append(int(np.argmax(np.einsum("hd,hdm->m", attended, p["wo"]) @ p["unembed"])))
  return tokens[len(prompt):]


def decode_prompts(params, cache, prompts: list[list[int]], steps: int, steps_per_call: int):
  """Prefills the prompts into sequences 0..B-1 and decodes ``steps`` tokens for each, several
  steps per jitted call. Returns ``(cache, last tokens, generated)``: what each row produced."""
  batch = len(prompts)
  seq_ids = jnp.arange(batch, dtype=jnp.int32)
  # Prefill all but each prompt's last token: that one is the first decode input, and the
  # decode step writes its K/V.
  prefix = jnp.asarray(sum((p[:-1] for p in prompts), []), jnp.int32)
  cache, ok = prefill(params, cache, seq_ids, prefix,
                      jnp.asarray([len(p) - 1 for p in prompts], jnp.int32),
                      num_slots=len(prefix))
  assert bool(ok), "prefill refused"
  tokens = jnp.asarray([p[-1] for p in prompts], jnp.int32)
  generated = [[] for _ in range(batch)]
  for _ in range(steps // steps_per_call):
    cache, tokens, fed, ok = decode(params, cache, seq_ids, tokens, steps=steps_per_call)
    assert bool(ok), "decode refused: pool too small"
    for row, row_fed in enumerate(np.asarray(fed)):
      generated[row] += row_fed.tolist()
    print(f"  decoded {len(generated[0])} steps, {int(jp.num_used_pages(cache))} pages in use")
  # Drop the echo of each prompt's last token: generated[i] is what the model produced.
  generated = [g[1:] + [int(t)] for g, t in zip(generated, np.asarray(tokens))]
  return cache, tokens, generated


def fork_and_decode(params, cache, first_token, fork_id: int, steps: int):
  """Forks sequence 0 into slot ``fork_id``; the branches continue from different next tokens
  (as beam search would) while sharing the pages written so far. Returns ``(cache, fed)``: the
  tokens each branch was fed, ``[2, steps]``."""
  cache, ok = jp.fork(cache, jnp.array([0]), jnp.array([fork_id]))
  assert bool(ok)
  branch_ids = jnp.array([0, fork_id], jnp.int32)
  first = jnp.stack([first_token, (first_token + 1) % VOCAB])
  cache, _, fed, ok = decode(params, cache, branch_ids, first, steps=steps)
  assert bool(ok)
  return cache, fed


def check(params, prompts: list[list[int]], generated: list[list[int]], fed, steps: int) -> bool:
  """Whether every row and both branches of the fork match the no-cache model (printed)."""
  matches = True
  for row, prompt in enumerate(prompts):
    expected = no_cache_generate(params, prompt, steps)
    matches &= generated[row] == expected
    print(f"seq {row}: prompt {len(prompt):2d} tokens -> {generated[row][:12]}...")
  for branch, row_fed in enumerate(np.asarray(fed)):
    history = prompts[0] + generated[0][:-1] + [int(row_fed[0])]
    branch_ok = row_fed[1:].tolist() == no_cache_generate(params, history, steps)[:-1]
    print(f"fork of seq 0, branch {branch} (first token {int(row_fed[0])}): "
          f"{row_fed[1:9].tolist()}..., matches the no-cache model: {branch_ok}")
    matches &= branch_ok
  print(f"matches the no-cache model: {matches}")
  return matches


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4, help="sequences decoded together")
  parser.add_argument("--steps", type=int, default=24, help="decode steps per phase")
  parser.add_argument("--steps-per-call", type=int, default=8, help="decode steps per jit call")
  args = parser.parse_args(argv)
  if args.steps % args.steps_per_call:
    parser.error("--steps must be a multiple of --steps-per-call")

  batch, steps = args.batch, args.steps
  spec = jp.CacheSpec(num_layers=1, num_kv_heads=HEADS, head_dim=HEAD_DIM, page_size=8,
                      num_pages=batch * 16 + 32, max_seqs=batch + 1, max_pages_per_seq=16)
  params = init_model(jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, VOCAB, rng.integers(3, 40)).tolist() for _ in range(batch)]
  print(f"jaxpaged {jp.__version__} on jax {jax.__version__} ({jax.default_backend()}): "
        f"{batch} prompts of {[len(p) for p in prompts]} tokens, page_size {spec.page_size}, "
        f"{spec.num_pages} pages")

  start = time.perf_counter()
  cache, tokens, generated = decode_prompts(params, jp.init_cache(spec), prompts, steps,
                                            args.steps_per_call)
  cache, fed = fork_and_decode(params, cache, tokens[0], fork_id=batch, steps=steps)
  seconds = time.perf_counter() - start
  matches = check(params, prompts, generated, fed, steps)
  print(f"stats: {batch * steps + 2 * steps} tokens decoded in {seconds:.2f}s "
        f"({(batch * steps + 2 * steps) / seconds:.0f} tokens/s incl. compile), "
        f"{int(jp.num_used_pages(cache))}/{spec.num_pages} pages used, "
        f"peak {batch + 1} sequences")
  return 0 if matches else 1


if __name__ == "__main__":
  raise SystemExit(main())
