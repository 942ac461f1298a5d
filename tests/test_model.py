"""SmolLM2-135M-Instruct on the paged cache: parity with Hugging Face transformers (an independent
implementation loading the same GGUF file), with a dense-cache run of the same model, and the
CLI end to end."""

import dataclasses
import functools
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged.models import generation, gguf

ROOT = pathlib.Path(__file__).parent.parent
# Four chat prompts of different lengths whose answers run past 48 tokens.
QUESTIONS = [
    "Describe the water cycle.",
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works, step by step.",
    "I am planning a week-long trip to Japan in the spring with my family of four, including "
    "two children aged eight and twelve. Give me a day-by-day itinerary with activities "
    "suitable for everyone.",
]
NEW_TOKENS = 48
LOGITS_ATOL = 1e-3  # measured ~8e-5 (float32 both sides, relative ~3e-6 of the logit range)


@pytest.fixture(scope="module")
def model():
  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  prompts = [tokenizer.encode(tokenizer.chat_prompt(q)) for q in QUESTIONS]
  assert len({len(p) for p in prompts}) == len(prompts)
  return config, params, tokenizer, prompts


@pytest.fixture(scope="module")
def paged_run(model):
  config, params, tokenizer, prompts = model
  return generation.generate(params, config, prompts, max_new_tokens=NEW_TOKENS,
                             eos_id=tokenizer.eos_token_id, prefill_chunk=64)


@pytest.fixture(scope="module")
def hf_model():
  torch = pytest.importorskip(
      "torch", reason="Hugging Face parity needs torch (scripts/test.sh installs torch==2.13.0 "
                      "where it is available offline)")
  transformers = pytest.importorskip("transformers")
  path = gguf.smollm2_path()
  return torch, transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32), transformers


def test_tokenizer_and_chat_template_match_hugging_face(model, hf_model):
  _, _, tokenizer, prompts = model
  _, _, transformers = hf_model
  path = gguf.smollm2_path()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  for question, ids in zip(QUESTIONS + ["Digits 12345, emoji 🙂 and  spaces."], prompts + [None]):
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            tokenize=False, add_generation_prompt=True)
    assert tokenizer.chat_prompt(question) == text
    expected = hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.encode(text) == expected
    assert ids is None or ids == expected
    assert tokenizer.decode(expected) == hf_tokenizer.decode(expected, skip_special_tokens=True)


def test_greedy_generation_matches_hugging_face_transformers(model, paged_run, hf_model):
  """Batched paged generation equals transformers generating each prompt alone."""
  _, _, tokenizer, prompts = model
  torch, hf, _ = hf_model
  for row, prompt in enumerate(prompts):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      logits = hf(ids).logits[0, -1].numpy()
      expected = hf.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):].tolist()
    assert len(expected) == NEW_TOKENS and tokenizer.eos_token_id not in expected
    assert paged_run.tokens[row] == expected, f"prompt {row} diverged"
    np.testing.assert_allclose(paged_run.first_logits[row], logits, atol=LOGITS_ATOL, rtol=0)


def test_paged_cache_equals_dense_cache_token_for_token(model, paged_run):
  config, params, tokenizer, prompts = model
  dense = generation.generate(params, config, prompts, max_new_tokens=NEW_TOKENS,
                              eos_id=tokenizer.eos_token_id, prefill_chunk=64, dense_cache=True)
  assert dense.tokens == paged_run.tokens
  assert all(len(t) == NEW_TOKENS for t in dense.tokens)
  np.testing.assert_allclose(dense.first_logits, paged_run.first_logits, atol=1e-4)


def test_prefill_chunking_and_page_size_do_not_change_the_output(model, paged_run):
  config, params, tokenizer, prompts = model
  other = generation.generate(params, config, prompts, max_new_tokens=12,
                              eos_id=tokenizer.eos_token_id, prefill_chunk=16, page_size=32,
                              steps_per_call=5)
  assert other.tokens == [t[:12] for t in paged_run.tokens]
  assert other.peak_pages <= other.num_pages


def test_sampling_keeps_to_the_nucleus_and_is_seeded():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]]))
  draw = jax.jit(functools.partial(generation.sample, temperature=1.0, top_p=0.75))
  seen = np.stack([np.asarray(draw(logits, jax.random.key(i))) for i in range(200)])
  # Nucleus of 0.75: tokens {0, 1} in row 0 (0.5 + 0.3 reaches it), {3} in row 1.
  assert set(seen[:, 0]) == {0, 1} and set(seen[:, 1]) == {3}
  np.testing.assert_array_equal(draw(logits, jax.random.key(7)), draw(logits, jax.random.key(7)))
  greedy = generation.sample(logits, jax.random.key(0), temperature=0.0, top_p=1.0)
  assert greedy.tolist() == [0, 3]


def test_generate_cli_runs_end_to_end(capsys):
  module = runpy.run_path(str(ROOT / "examples" / "generate.py"), run_name="cli")
  assert module["main"](["--max-new-tokens", "6", "What is the capital of France?"]) == 0
  out = capsys.readouterr().out
  assert ">>> What is the capital of France?\nThe capital of France is" in out
  assert "stats: 1 sequences" in out and "tokens/s" in out and "pages used" in out


def test_loader_errors_say_how_to_fix_them(tmp_path):
  with pytest.raises(jp.JaxPagedError, match="no GGUF file at"):
    gguf.load(tmp_path / "missing.gguf")


def test_prefix_cached_prefill_gives_the_same_logits(model, paged_run):
  """Requests admitted after a first one reuse its cached blocks (the chat template's shared
  system prompt, and a whole repeated prompt) and still get the same first-token logits."""
  config, params, _, prompts = model
  spec = dataclasses.replace(config.cache_spec(num_pages=64, max_seqs=6, max_seq_len=160),
                             prefix_caching=True)
  cache = jp.init_cache(spec)
  cache, first, cached = generation.prefill(params, config, cache, [0], prompts[:1],
                                            prefill_chunk=64)
  assert cached.tolist() == [0]
  cache, logits, cached = generation.prefill(params, config, cache, [1, 2, 3, 4],
                                             [prompts[0]] + prompts[1:], prefill_chunk=64)
  block = spec.page_size
  assert cached[0] == (len(prompts[0]) - 1) // block * block  # all but the last partial block
  assert all(c >= block for c in cached[1:])  # the system prompt's first block at least
  np.testing.assert_allclose(logits, paged_run.first_logits, atol=1e-4)
  assert int(jp.prefix_stats(cache)["hit_tokens"]) == int(cached.sum())
