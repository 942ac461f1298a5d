"""SmolLM2-135M-Instruct on the paged cache: parity with Hugging Face transformers (an independent
implementation loading the same GGUF file), with a dense-cache run of the same model, and the
CLI end to end."""

import collections
import dataclasses
import functools
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpaged as jp
from jaxpaged.models import DenseKVCache, LlamaConfig, generation, gguf
from jaxpaged.models import prefill as prefill_module
from tests import helpers

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


# ----------------------------------------------------------------------------- bad input
# Every refusal is a JaxPagedError whose message names the argument (or the GGUF field or tensor)
# and says what was expected; the checks run before anything is computed.

# A tiny model (no GGUF file, no tokenizer) for what does not need the real one.
TINY = LlamaConfig(vocab_size=32, hidden=16, num_layers=2, num_heads=4, num_kv_heads=2, ffn=24)


def tiny_model(seed: int = 0, config: LlamaConfig = TINY):
  """``(config, params)``: random weights (NumPy float32) of the shapes ``config`` implies."""
  rng = np.random.default_rng(seed)
  shapes = generation.param_shapes(config)
  make = lambda name, shape: (np.ones(shape, np.float32) if "norm" in name
                              else rng.normal(0, 0.5, shape).astype(np.float32))
  params = {name: make(name, shape) for name, shape in shapes.items()
            if name not in ("layers", "unembed")}
  params["layers"] = {name: make(name, shape) for name, shape in shapes["layers"].items()}
  return config, params


# Its vocabulary: 3 special tokens, the letters, and what the merges make of them.
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    chr(c) for c in range(ord("a"), ord("z") + 1)] + ["ab", "cd", "abcd"]
TINY_MERGES = ["a b", "c d", "ab cd"]


def write_gguf(path, config=TINY, params=None, *, arch="llama", fields=None, tensors=None):
  """Writes a small Llama GGUF file (F32 tensors) of ``config`` and ``params`` (default: random).

  ``fields`` overrides metadata: name -> ``(gguf writer kind, value)``, or None to leave it out;
  ``tensors`` overrides tensors: name -> a NumPy array (GGUF shape = reversed array shape), or
  None to leave it out.
  """
  gguf_package = pytest.importorskip("gguf")
  params = tiny_model(config=config)[1] if params is None else params
  c = config
  meta = {
      "llama.block_count": ("uint32", c.num_layers), "llama.context_length": ("uint32", 256),
      "llama.embedding_length": ("uint32", c.hidden),
      "llama.feed_forward_length": ("uint32", c.ffn),
      "llama.attention.head_count": ("uint32", c.num_heads),
      "llama.attention.head_count_kv": ("uint32", c.num_kv_heads),
      "llama.rope.freq_base": ("float32", c.rope_theta),
      "llama.attention.layer_norm_rms_epsilon": ("float32", c.norm_eps),
      "tokenizer.ggml.model": ("string", "gpt2"), "tokenizer.ggml.pre": ("string", "smollm"),
      "tokenizer.ggml.tokens": ("array", TINY_TOKENS),
      "tokenizer.ggml.merges": ("array", TINY_MERGES),
      "tokenizer.ggml.token_type": ("array", [3, 3, 3] + [1] * (len(TINY_TOKENS) - 3)),
      "tokenizer.ggml.bos_token_id": ("uint32", 1), "tokenizer.ggml.eos_token_id": ("uint32", 2),
  }
  meta.update(fields or {})
  weights = {"token_embd.weight": params["embed"], "output_norm.weight": params["norm"]}
  names = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "wq": "attn_q", "wk": "attn_k",
           "wv": "attn_v", "wo": "attn_output", "w_gate": "ffn_gate", "w_up": "ffn_up",
           "w_down": "ffn_down"}
  for i in range(config.num_layers):
    for key, name in names.items():
      w = np.asarray(params["layers"][key][i])
      weights[f"blk.{i}.{name}.weight"] = w if w.ndim == 1 else w.T  # GGUF: [out, in] rows
  weights.update(tensors or {})
  writer = gguf_package.GGUFWriter(str(path), arch)
  for name, value in meta.items():
    if value is not None:
      getattr(writer, f"add_{value[0]}")(name, value[1])
  for name, w in weights.items():
    if w is not None:
      writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_loader_reads_a_small_llama_gguf_file(tmp_path):
  config, params = tiny_model()
  loaded_config, loaded, tokenizer = gguf.load(write_gguf(tmp_path / "tiny.gguf", config, params))
  assert loaded_config == dataclasses.replace(config, max_position=256,
                                              norm_eps=float(np.float32(config.norm_eps)))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)  # tied: no "unembed"
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)
  assert tokenizer.encode("abcd") == [TINY_TOKENS.index("abcd")]
  assert tokenizer.encode("<|im_end|>z") == [2, TINY_TOKENS.index("z")]  # special: matched whole
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
  untied = dict(params, unembed=np.ones((16, 32), np.float32))
  _, loaded, _ = gguf.load(write_gguf(tmp_path / "untied.gguf", config, untied,
                                      tensors={"output.weight": untied["unembed"].T}))
  np.testing.assert_array_equal(loaded["unembed"], untied["unembed"])


BROKEN_GGUF = {  # what is wrong -> (write_gguf options, what the message must say)
    "wrong tensor shape": (dict(tensors={"blk.1.attn_k.weight": np.zeros((16, 16))}),
                           ["blk.1.attn_k.weight", "[16, 16]", "[16, 8]", "head_count_kv"]),
    "wrong output shape": (dict(tensors={"output.weight": np.zeros((31, 16))}),
                           ["output.weight", "[16, 31]", "[16, 32]"]),
    "wrong norm shape": (dict(tensors={"output_norm.weight": np.zeros((2, 8))}),
                         ["output_norm.weight", "[8, 2]", "[16]"]),
    "missing tensor": (dict(tensors={"blk.0.ffn_down.weight": None}),
                       ["blk.0.ffn_down.weight", "missing"]),
    "more layers than tensors": (dict(fields={"llama.block_count": ("uint32", 3)}),
                                 ["blk.2.attn_norm.weight", "missing", "llama.block_count"]),
    "absurd block count": (dict(fields={"llama.block_count": ("uint32", (1 << 32) - 1)}),
                           ["blk.2.attn_norm.weight", "missing", "4294967295 layers"]),
    "head count not dividing": (dict(fields={"llama.attention.head_count": ("uint32", 3)}),
                                ["llama.attention.head_count (3)", "must divide",
                                 "llama.embedding_length (16)"]),
    "kv head count not dividing": (
        dict(fields={"llama.attention.head_count_kv": ("uint32", 3)}),
        ["llama.attention.head_count_kv (3)", "must divide", "llama.attention.head_count (4)"]),
    "zero heads": (dict(fields={"llama.attention.head_count": ("uint32", 0)}),
                   ["llama.attention.head_count", ">= 1", "got 0"]),
    "non-llama architecture": (dict(arch="gpt2"), ["'gpt2' model", "general.architecture",
                                                   "only the 'llama' architecture"]),
    "missing field": (dict(fields={"llama.feed_forward_length": None}),
                      ["llama.feed_forward_length", "missing"]),
    "field of the wrong type": (dict(fields={"llama.embedding_length": ("string", "16")}),
                                ["llama.embedding_length", "must be an integer", "string"]),
    "rms eps of zero": (dict(fields={"llama.attention.layer_norm_rms_epsilon": ("float32", 0.0)}),
                        ["llama.attention.layer_norm_rms_epsilon", "> 0", "got 0.0"]),
    "eos outside the vocabulary": (dict(fields={"tokenizer.ggml.eos_token_id": ("uint32", 32)}),
                                   ["tokenizer.ggml.eos_token_id", "[0, 32)", "got 32"]),
    "no tokens": (dict(fields={"tokenizer.ggml.tokens": None}),
                  ["tokenizer.ggml.tokens", "missing"]),
    "bad merge": (dict(fields={"tokenizer.ggml.merges": ("array", ["a b", "cd"])}),
                  ["tokenizer.ggml.merges[1]", "'cd'", "separated by a space"]),
    "token types not one per token": (dict(fields={"tokenizer.ggml.token_type": ("array", [1])}),
                                      ["tokenizer.ggml.token_type", "1 entries", "32"]),
    "unsupported tokenizer": (dict(fields={"tokenizer.ggml.model": ("string", "llama")}),
                              ["tokenizer.ggml.model", "'llama'", "gpt2"]),
    "rope over part of a head": (dict(fields={"llama.rope.dimension_count": ("uint32", 2)}),
                                 ["llama.rope.dimension_count is 2", "head size", "4"]),
}


@pytest.mark.parametrize("case", BROKEN_GGUF)
def test_loader_names_what_is_wrong_in_a_broken_gguf_file(tmp_path, case):
  options, words = BROKEN_GGUF[case]
  path = write_gguf(tmp_path / "broken.gguf", **options)
  with pytest.raises(jp.JaxPagedError) as error:
    gguf.load(path)
  message = str(error.value)
  assert "broken.gguf" in message
  for word in words:
    assert word in message, (word, message)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.1, 0.002])
def test_loader_refuses_a_truncated_gguf_file(tmp_path, keep):
  data = write_gguf(tmp_path / "whole.gguf").read_bytes()
  path = tmp_path / "cut.gguf"
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(jp.JaxPagedError, match=r"cut\.gguf.*(truncated|corrupt)"):
    gguf.load(path)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip file", b"GGU"])
def test_loader_refuses_a_file_that_is_not_gguf(tmp_path, content):
  path = tmp_path / "model.gguf"
  path.write_bytes(content)
  with pytest.raises(jp.JaxPagedError, match=r"model\.gguf is not a GGUF file.*b'GGUF'"):
    gguf.load(path)


def test_loader_refuses_bad_arguments(tmp_path):
  with pytest.raises(jp.JaxPagedError, match=r"path must be a str or os\.PathLike.*int"):
    gguf.load(3)
  with pytest.raises(jp.JaxPagedError, match=r"dtype must be a float dtype.*int32"):
    gguf.load(write_gguf(tmp_path / "tiny.gguf"), dtype=np.int32)
  with pytest.raises(jp.JaxPagedError, match="no GGUF file at"):
    gguf.load(tmp_path)  # a directory


@pytest.fixture(scope="module")
def tiny():
  config, params = tiny_model()
  return config, jax.tree.map(jnp.asarray, params)


BAD_GENERATE = [  # (generate arguments, what the message must say)
    (dict(max_new_tokens=-1), r"max_new_tokens must be an int >= 0, got -1"),
    (dict(max_new_tokens=2.0), r"max_new_tokens must be an int >= 0, got 2\.0 \(float\)"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an int >= 0, got True \(bool\)"),
    (dict(steps_per_call=0), r"steps_per_call must be an int in \[1, 2147483647\), got 0"),
    (dict(prefill_chunk=0), r"prefill_chunk must be an int in \[1, 2147483647\), got 0"),
    (dict(page_size=-16), r"page_size must be an int >= 1, got -16"),
    (dict(temperature=-0.5), r"temperature must be a finite number >= 0, got -0\.5"),
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0, got nan"),
    (dict(temperature="0.7"), r"temperature must be a number, got '0\.7' \(str\)"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1\.5"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(eos_id=32), r"eos_id must be an int in \[0, 32\), got 32"),
    (dict(eos_id=-1), r"eos_id must be an int in \[0, 32\), got -1"),
    (dict(seed=1 << 64), r"seed must be an int in \[-2\*\*63, 2\*\*63\)"),
    (dict(impl="cuda"), r"impl must be one of \('auto', 'xla', 'pallas'\), got 'cuda'"),
    (dict(cache_dtype=jnp.int16), r"cache_dtype must be one of float32, bfloat16, float16, int8"),
    (dict(cache_dtype=jnp.int8, dense_cache=True), r"cache_dtype=int8 \(8-bit K/V with scales\) "
     r"needs the paged cache"),
    (dict(dense_cache=True, prefix_caching=True), r"prefix_caching=True needs the paged cache"),
    (dict(prefix_caching="yes"), r"prefix_caching must be True or False, got 'yes'"),
    (dict(progress=print, prompts=[[1, 2], [3, 32]]),
     r"prompts\[1\]\[1\] = 32 is not a token id of this model: ids must be in \[0, 32\)"),
    (dict(prompts=[[1, -5]]), r"prompts\[0\]\[1\] = -5 is not a token id"),
    (dict(prompts=[[1], [2, 1 << 70]]), r"prompts\[1\]\[1\] = 1180591620717411303424 is not a"),
    (dict(prompts=[[1, 2.0]]), r"prompts\[0\] must hold int token ids, but prompts\[0\]\[1\] is "
                               r"2\.0 \(float\)"),
    (dict(prompts=[[True, False]]), r"prompts\[0\] must hold int token ids"),
    (dict(prompts=["hello"]), r"prompts\[0\] must be a sequence of int token ids, got text"),
    (dict(prompts=[[1], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[[[1, 2]]]), r"prompts\[0\] must be a flat sequence of int token ids"),
    (dict(prompts=[]), r"prompts is empty"),
    (dict(prompts="hello"), r"prompts must be a list of prompts"),
    (dict(progress="print"), r"progress must be a callable"),
    (dict(config=dataclasses.replace(TINY, num_kv_heads=4)),
     r"params\['layers'\]\['wk'\] has shape \(2, 16, 8\) but config .* needs \(2, 16, 16\)"),
    (dict(config=dataclasses.replace(TINY, vocab_size=40)),
     r"params\['embed'\] has shape \(32, 16\) but config .* needs \(40, 16\)"),
    (dict(config=dataclasses.replace(TINY, num_kv_heads=3)),
     r"config\.num_kv_heads \(3\) must divide config\.num_heads \(4\)"),
    (dict(config={"vocab_size": 32}), r"config must be a jaxpaged\.models\.LlamaConfig"),
    (dict(params={"embed": None}), r"params\['embed'\] has shape \(\) but config"),
    (dict(params=[]), r"params must be a dict of weights, got list"),
]


@pytest.mark.parametrize("arguments, message", BAD_GENERATE,
                         ids=[m[:40] for _, m in BAD_GENERATE])
def test_generate_refuses_bad_arguments_before_running(tiny, monkeypatch, arguments, message):
  config, params = tiny
  ran = lambda *args, **kwargs: pytest.fail("a bad argument reached the model")
  monkeypatch.setattr(prefill_module, "_prefill_step", ran)  # prefill's model step
  monkeypatch.setattr(jp, "init_cache", ran)
  arguments = dict(dict(config=config, params=params, prompts=[[1, 2, 3]], max_new_tokens=4,
                        eos_id=2), **arguments)
  with pytest.raises(jp.JaxPagedError, match=message):
    generation.generate(arguments.pop("params"), arguments.pop("config"),
                        arguments.pop("prompts"), **arguments)


def test_sample_refuses_bad_sampling_parameters():
  logits = jnp.zeros((1, 4))
  with pytest.raises(jp.JaxPagedError, match=r"temperature must be a finite number >= 0"):
    generation.sample(logits, jax.random.key(0), temperature=-1.0, top_p=1.0)
  with pytest.raises(jp.JaxPagedError, match=r"top_p must be in \(0, 1\], got 0\.0"):
    generation.sample(logits, jax.random.key(0), temperature=1.0, top_p=0.0)


def test_generate_with_zero_new_tokens_only_prefills(tiny):
  """max_new_tokens=0: no token for any row, but the prompts are prefilled and first_logits
  computed (the same as with one new token, which is sampled from them)."""
  config, params = tiny
  prompts = [[1, 2, 3], np.array([4, 5, 6, 7, 8], np.int64), (np.int32(9),)]  # NumPy ints fine
  none = generation.generate(params, config, prompts, max_new_tokens=0, eos_id=2)
  one = generation.generate(params, config, prompts, max_new_tokens=1, eos_id=2)
  assert none.tokens == [[], [], []] and none.decode_tokens == 0
  assert [len(t) for t in one.tokens] == [int(t != 2) for t in one.first_logits.argmax(-1)]
  assert one.decode_tokens == 0  # the one token per row comes from prefill's logits
  assert np.abs(none.first_logits).sum() > 0
  np.testing.assert_allclose(none.first_logits, one.first_logits, rtol=1e-6)
  assert none.peak_pages == sum(-(-len(p) // 16) for p in prompts)  # the prompts are cached


def test_generate_without_eos_runs_every_row_to_its_budget(tiny):
  """eos_id=None: every row gets exactly max_new_tokens; with an eos_id, each row is the same
  run cut before that token's first occurrence (greedy, so both runs produce the same tokens)."""
  config, params = tiny
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
  free = generation.generate(params, config, prompts, max_new_tokens=12, eos_id=None)
  assert [len(t) for t in free.tokens] == [12, 12, 12]
  assert free.decode_tokens == 3 * 11
  eos = collections.Counter(t for row in free.tokens for t in row).most_common(1)[0][0]
  stopped = generation.generate(params, config, prompts, max_new_tokens=12, eos_id=eos)
  assert stopped.tokens == [row[:row.index(eos)] if eos in row else row for row in free.tokens]


def test_prefill_refuses_bad_arguments(tiny):
  config, params = tiny
  spec = config.cache_spec(num_pages=4, max_seqs=2, max_seq_len=32, page_size=8)
  cases = [
      (dict(seq_ids=[2]), r"seq_ids\[0\] must be an int in \[0, 2\), got 2"),
      (dict(seq_ids=[0, 0], prompts=[[1], [2]]), r"seq_ids must be distinct"),
      (dict(seq_ids=[0, 1]), r"seq_ids has 2 entries for 1 prompts"),
      (dict(seq_ids=0), r"seq_ids must be a list of ints"),
      (dict(prompts=[[1, 99]]), r"prompts\[0\]\[1\] = 99 is not a token id"),
      (dict(prompts=[[1] * 33]), r"prompts\[0\] has 33 tokens but sequence 0 of the cache can "
                                 r"take 32 more"),
      (dict(prefill_chunk=-1), r"prefill_chunk must be an int in \[1, 2147483647\), got -1"),
      (dict(cache=jp.init_cache(dataclasses.replace(spec, num_layers=3))),
       r"cache holds \(layers, KV heads, head size\) \(3, 2, 4\) but the model has \(2, 2, 4\)"),
      (dict(cache="cache"), r"cache must be a jaxpaged\.PagedKVCache"),
  ]
  for arguments, message in cases:
    arguments = dict(dict(cache=jp.init_cache(spec), seq_ids=[0], prompts=[[1, 2, 3]]),
                     **arguments)
    with pytest.raises(jp.JaxPagedError, match=message):
      generation.prefill(params, config, arguments.pop("cache"), arguments.pop("seq_ids"),
                         arguments.pop("prompts"), **arguments)


def test_prefill_refuses_prompts_the_cache_cannot_hold_and_keeps_the_cache(tiny):
  """Refused before the cache is donated: the caller's cache is still there, unchanged."""
  config, params = tiny
  spec = config.cache_spec(num_pages=4, max_seqs=2, max_seq_len=32, page_size=8)
  cache, _, _ = generation.prefill(params, config, jp.init_cache(spec), [0], [[1] * 20],
                                   prefill_chunk=16)
  with pytest.raises(jp.JaxPagedError, match=r"seq_ids\[0\] = 0 is a sequence that holds 20 "
                                             r"tokens; prefill starts new sequences"):
    generation.prefill(params, config, cache, [0], [[1, 2]], prefill_chunk=16)
  # Sequence 0 holds 3 of the 4 pages: 9 more tokens need 2.
  with pytest.raises(jp.JaxPagedError, match=r"cannot hold the prompts \(9 tokens; 1 pages of 8 "
                                             r"tokens free or reclaimable\).*too few free pages"):
    generation.prefill(params, config, cache, [1], [[1] * 9], prefill_chunk=16)
  assert np.asarray(cache.seq_lens).tolist() == [20, 0]  # still usable, unchanged
  cache, logits, _ = generation.prefill(params, config, cache, [1], [[1] * 8], prefill_chunk=16)
  assert np.asarray(cache.seq_lens).tolist() == [20, 8] and np.isfinite(logits).all()
  dense = DenseKVCache.create(config, 2, 8)
  with pytest.raises(jp.JaxPagedError, match=r"prompts\[0\] has 9 tokens but sequence 1 of the "
                                             r"cache can take 8 more"):
    generation.prefill(params, config, dense, [1], [[1] * 9], prefill_chunk=16)


BAD_GENERATE_OPTIONS = [
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 1, got -1"),
    (["--max-new-tokens", "lots"], "argument --max-new-tokens: expected an integer, got 'lots'"),
    (["--steps-per-call", "0"], "argument --steps-per-call: must be >= 1, got 0"),
    (["--page-size", "0"], "argument --page-size: must be >= 1, got 0"),
    (["--temperature", "-1"],
     "argument --temperature: must be a finite number >= 0 (0 = greedy), got '-1'"),
    (["--temperature", "nan"],
     "argument --temperature: must be a finite number >= 0 (0 = greedy), got 'nan'"),
    (["--top-p", "0"], "argument --top-p: must be a finite number > 0 and <= 1, got '0'"),
    (["--top-p", "1.1"], "argument --top-p: must be a finite number > 0 and <= 1, got '1.1'"),
    (["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
]


@pytest.mark.parametrize("options, message", BAD_GENERATE_OPTIONS,
                         ids=[" ".join(o) for o, _ in BAD_GENERATE_OPTIONS])
def test_generate_cli_refuses_bad_options_with_a_usage_error(capsys, options, message):
  helpers.assert_usage_error(capsys, "generate.py", options + ["Hello"], message)


def test_generate_cli_reports_a_bad_model_file(capsys, tmp_path):
  module = runpy.run_path(str(ROOT / "examples" / "generate.py"), run_name="cli")
  (tmp_path / "model.gguf").write_text("not a model")
  assert module["main"](["--gguf", str(tmp_path / "model.gguf"), "Hello"]) == 2
  assert "error: " in capsys.readouterr().err
