"""A Llama-architecture model in plain JAX whose KV cache is jaxpaged's.

RMSNorm, rotary position embeddings (GGUF's interleaved pairs), grouped-query attention, SwiGLU
MLP, tied or separate output embeddings. One `forward` serves prefill chunks and decode steps
for a ragged batch: tokens come in `jaxpaged.extend`'s layout (row b owns ``q_lens[b]``
consecutive entries), layers run in a `lax.scan` over stacked weights (one compiled layer), and
each layer writes its K/V with `jaxpaged.write_kv` and attends with jaxpaged's paged attention.

`DenseKVCache` is the same model's cache as contiguous per-sequence buffers: the baseline the
paged cache is compared against (same tokens, token for token).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged._src import checks
from jaxpaged._src.cache import token_rows

# The weights: {"embed", "norm", optional "unembed", "layers": {...}}, shaped as `param_shapes`
# says (`jaxpaged.models.gguf.load` returns them; `random_params` makes random ones).
Params = dict[str, Any]
_RANDOM_STD = 0.5  # `random_params`: large enough that a tiny model's next tokens differ


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static model shape; hashable, so it can be a static argument of jitted functions.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2,
  ...                      ffn=64)
  >>> config.head_dim, config.cache_spec(num_pages=8, max_seqs=2, max_seq_len=20).max_seq_len
  (8, 32)
  """

  vocab_size: int
  hidden: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  ffn: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  max_position: int = 4096

  @property
  def head_dim(self) -> int:
    """Size of one attention head."""
    return self.hidden // self.num_heads

  def cache_spec(self, *, num_pages: int, max_seqs: int, max_seq_len: int, page_size: int = 16,
                 dtype: jax.typing.DTypeLike = jnp.float32) -> jp.CacheSpec:
    """A `jaxpaged.CacheSpec` for this model's K/V (``max_seq_len`` rounded up to pages)."""
    return jp.CacheSpec(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, page_size=page_size, num_pages=num_pages,
                        max_seqs=max_seqs, max_pages_per_seq=-(-max_seq_len // page_size),
                        dtype=dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm of ``x [..., hidden]`` (computed in float32), scaled by ``weight [hidden]``.

  >>> x = rms_norm(jnp.array([[3.0, 4.0]]), jnp.ones(2), 0.0)  # root mean square: sqrt(12.5)
  >>> bool(jnp.allclose(x, jnp.array([[3.0, 4.0]]) / 12.5 ** 0.5))
  True
  """
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
          * weight).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of ``x [T, heads, head_dim]`` at ``positions [T]``, rotating adjacent
  pairs (2i, 2i+1): the layout GGUF files store Q and K weights in.

  >>> x = jnp.ones((2, 1, 4))
  >>> bool(jnp.allclose(rope(x, jnp.array([0, 0]), 10000.0), x))  # position 0: no rotation
  True
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angle = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, D/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  even, odd = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
  return jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(
      x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------- argument checks

def check_config(config: Any) -> LlamaConfig:
  """``config``, if it is a `LlamaConfig` whose sizes go together.

  >>> check_config(LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=3,
  ...                          num_kv_heads=1, ffn=64))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: config.num_heads (3) must divide config.hidden (32) ...
  """
  if not isinstance(config, LlamaConfig):
    raise jp.JaxPagedError(f"config must be a jaxpaged.models.LlamaConfig (from "
                           f"jaxpaged.models.gguf.load), got {type(config).__name__}.")
  for name in ("vocab_size", "hidden", "num_layers", "num_heads", "num_kv_heads", "ffn"):
    checks.integer(f"config.{name}", getattr(config, name), minimum=1)
  if config.hidden % config.num_heads or config.head_dim % 2:
    raise jp.JaxPagedError(f"config.num_heads ({config.num_heads}) must divide config.hidden "
                           f"({config.hidden}) into heads of an even size (rotary embeddings "
                           "rotate pairs).")
  if config.num_heads % config.num_kv_heads:
    raise jp.JaxPagedError(f"config.num_kv_heads ({config.num_kv_heads}) must divide "
                           f"config.num_heads ({config.num_heads}).")
  return config


_FINGERPRINT_SAMPLES = 4096  # values sampled per weight array by `model_fingerprint`


def model_fingerprint(params: Params, config: LlamaConfig) -> str:
  """A short identity of a model for the disk tier (`jaxpaged.DiskLayout.model`): 16 hex digits
  of SHA-256 over the config and, for each weight array, its path, shape, dtype and 4,096
  values sampled evenly through it. Other weights (another checkpoint, a fine-tune, another
  dtype) give another identity, so their K/V are never served for this model's.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> a, b = random_params(config, seed=0), random_params(config, seed=1)
  >>> model_fingerprint(a, config) == model_fingerprint(a, config) != model_fingerprint(b, config)
  True
  """
  digest = hashlib.sha256(repr(check_config(config)).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat = jnp.ravel(leaf)
    sample = np.asarray(flat[::max(1, flat.size // _FINGERPRINT_SAMPLES)])
    digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
    digest.update(sample.tobytes())
  return digest.hexdigest()[:16]


def param_shapes(config: LlamaConfig) -> dict[str, Any]:
  """The shape of every weight `jaxpaged.models.llama.forward` takes for ``config``, as the
  params pytree (``unembed`` is optional: without it the embeddings are tied).

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2,
  ...                      ffn=48)
  >>> param_shapes(config)["layers"]["wk"]  # [layers, hidden, kv heads * head size]
  (2, 32, 16)
  """
  c = config
  layers, hidden, kv = c.num_layers, c.hidden, c.num_kv_heads * c.head_dim
  return {"embed": (c.vocab_size, hidden), "norm": (hidden,), "unembed": (hidden, c.vocab_size),
          "layers": {"attn_norm": (layers, hidden), "ffn_norm": (layers, hidden),
                     "wq": (layers, hidden, hidden), "wk": (layers, hidden, kv),
                     "wv": (layers, hidden, kv), "wo": (layers, hidden, hidden),
                     "w_gate": (layers, hidden, c.ffn), "w_up": (layers, hidden, c.ffn),
                     "w_down": (layers, c.ffn, hidden)}}


def random_params(config: LlamaConfig, seed: int = 0) -> Params:
  """Random float32 weights of ``config``'s shapes: norms of ones, every other weight normal with
  standard deviation `_RANDOM_STD`, tied embeddings. A model that needs no file, for examples
  and tests.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> params = random_params(config)
  >>> params["layers"]["wq"].shape, "unembed" in params
  ((1, 32, 32), False)
  """
  rng = np.random.default_rng(seed)
  make = lambda name, shape: (jnp.ones(shape, jnp.float32) if "norm" in name
                              else jnp.asarray(rng.normal(0, _RANDOM_STD, shape), jnp.float32))
  shapes = param_shapes(config)
  params = {name: make(name, shape) for name, shape in shapes.items()
            if name not in ("layers", "unembed")}
  params["layers"] = {name: make(name, shape) for name, shape in shapes["layers"].items()}
  return params


_FUSED = "wqkv"  # a key only `fuse_layers`' layout has


def fused_layer_shapes(config: LlamaConfig) -> dict[str, Any]:
  """``params["layers"]``'s shapes after `fuse_layers`: ``wqkv`` is wq, wk and wv side by side
  (``[layers, hidden, hidden + 2 * kv heads * head size]``), ``w_gate_up`` w_gate and w_up
  (``[layers, hidden, 2 * ffn]``).

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2,
  ...                      ffn=48)
  >>> shapes = fused_layer_shapes(config)
  >>> shapes["wqkv"], shapes["w_gate_up"]
  ((2, 32, 64), (2, 32, 96))
  """
  layers = dict(param_shapes(config)["layers"])
  num_layers, hidden = config.num_layers, config.hidden
  for name in ("wq", "wk", "wv", "w_gate", "w_up"):
    del layers[name]
  layers["wqkv"] = (num_layers, hidden, hidden + 2 * config.num_kv_heads * config.head_dim)
  layers["w_gate_up"] = (num_layers, hidden, 2 * config.ffn)
  return layers


@jax.jit
def _concatenate(*weights):
  return jnp.concatenate(weights, axis=-1)


def _fuse(layers):
  fused = {name: w for name, w in layers.items()
           if name not in ("wq", "wk", "wv", "w_gate", "w_up")}
  fused["wqkv"] = _concatenate(layers["wq"], layers["wk"], layers["wv"])
  fused["w_gate_up"] = _concatenate(layers["w_gate"], layers["w_up"])
  return fused


def fuse_layers(params: Params) -> Params:
  """``params`` with each layer's Q, K and V projections concatenated into one matrix
  (``wqkv``) and the MLP's gate and up projections into another (``w_gate_up``): `forward`
  then runs 4 matrix products a layer instead of 7, the same products column for column.
  Measured on XLA:CPU (2 cores, SmolLM2-135M's shapes, 30 layers): 0.6x the time of the
  separate products at batch 1 and 8, 0.78x at batch 32 (fewer, wider dots). A copy of
  those weights (about 2/3 of a layer's); `jaxpaged.models.generation.generate` makes it once
  per params and reuses it.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> params = random_params(config)
  >>> fused = fuse_layers(params)
  >>> sorted(fused["layers"]), fused["layers"]["wqkv"].shape
  (['attn_norm', 'ffn_norm', 'w_down', 'w_gate_up', 'wo', 'wqkv'], (1, 32, 64))
  >>> cache = init_cache(config.cache_spec(num_pages=4, max_seqs=1, max_seq_len=8, page_size=4))
  >>> a = forward(params, cache, jnp.array([1, 2]), jnp.array([0]), jnp.array([2]),
  ...             config=config, decode=False)[1]
  >>> b = forward(fused, cache, jnp.array([1, 2]), jnp.array([0]), jnp.array([2]),
  ...             config=config, decode=False)[1]
  >>> bool(jnp.allclose(a, b, rtol=1e-5, atol=1e-4))
  True
  """
  if _FUSED in params["layers"]:
    return params
  return {**params, "layers": _fuse(dict(params["layers"]))}


def check_params(params: Any, config: LlamaConfig) -> None:
  """Whether ``params`` has every weight, with the shapes ``config`` implies.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> check_params(random_params(config), config)  # fine: returns None
  >>> check_params({}, config)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxpaged._src.spec.JaxPagedError: params['embed'] is missing; ...
  """
  fix = "pass the params and config that belong together (jaxpaged.models.gguf.load returns both)"
  expected = param_shapes(config)
  if isinstance(params, collections.abc.Mapping) and isinstance(
      params.get("layers"), collections.abc.Mapping) and _FUSED in params["layers"]:
    expected["layers"] = fused_layer_shapes(config)  # `fuse_layers`' layout

  def walk(tree, expected, path):
    if not isinstance(tree, collections.abc.Mapping):
      raise jp.JaxPagedError(f"{path} must be a dict of weights, got {type(tree).__name__}; {fix}.")
    for key, shape in expected.items():
      where = f"{path}[{key!r}]"
      if key not in tree:
        if key == "unembed":
          continue
        raise jp.JaxPagedError(f"{where} is missing; {fix}.")
      if isinstance(shape, dict):
        walk(tree[key], shape, where)
      elif tuple(getattr(tree[key], "shape", ())) != shape:
        raise jp.JaxPagedError(
            f"{where} has shape {tuple(getattr(tree[key], 'shape', ()))} but config (vocab "
            f"{config.vocab_size}, hidden {config.hidden}, {config.num_layers} layers, "
            f"{config.num_heads}/{config.num_kv_heads} heads, ffn {config.ffn}) needs {shape}; "
            f"{fix}.")
  walk(params, expected, "params")


def check_tokens(name: str, tokens: Any, vocab_size: int, *, allow_empty: bool = False,
                 where: str = "") -> list[int]:
  """``tokens`` (a sequence of int token ids, NumPy ints and int arrays too) as a list of Python
  ints, if every id is in ``[0, vocab_size)``. Messages start with ``where`` (e.g. "request 3:
  ") and call the tokens ``name``.

  >>> check_tokens("prompt", np.array([1, 2, 3]), 64)  # (64 or more: refused)
  [1, 2, 3]
  """
  if isinstance(tokens, (str, bytes)):
    raise jp.JaxPagedError(f"{where}{name} must be a sequence of int token ids, got text "
                           f"({type(tokens).__name__}); encode it first (e.g. "
                           "tokenizer.encode(text) of `jaxpaged.models.gguf.load`).")
  try:
    ids = np.asarray(tokens)
  except (TypeError, ValueError) as e:
    raise jp.JaxPagedError(f"{where}{name} must be a sequence of int token ids, got "
                           f"{type(tokens).__name__} ({e}).") from e
  if ids.ndim != 1:
    raise jp.JaxPagedError(f"{where}{name} must be a flat sequence of int token ids, got "
                           f"{type(tokens).__name__} of shape {ids.shape}; pass one list of ids.")
  if ids.size == 0:
    if allow_empty:
      return []
    raise jp.JaxPagedError(f"{where}{name} is empty; a prompt needs at least one token.")
  not_an_id = (f" is not a token id of this model: ids must be in [0, {vocab_size}) "
               "(config.vocab_size); encode the prompt with this model's tokenizer.")
  if ids.dtype.kind not in "iu":
    column = next((i for i, t in enumerate(tokens) if not checks.is_int(t)), None)
    if column is None:  # ints too large for any NumPy int type
      column = next(i for i, t in enumerate(tokens) if not 0 <= t < vocab_size)
      raise jp.JaxPagedError(f"{where}{name}[{column}] = {tokens[column]}{not_an_id}")
    raise jp.JaxPagedError(f"{where}{name} must hold int token ids, but {name}[{column}] is "
                           f"{tokens[column]!r} ({type(tokens[column]).__name__}); pass token ids "
                           "(ints), e.g. from tokenizer.encode(text).")
  bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
  if bad.size:
    column = int(bad[0])
    raise jp.JaxPagedError(f"{where}{name}[{column}] = {int(ids[column])}{not_an_id}")
  return ids.tolist()


# ----------------------------------------------------------------------------- dense baseline

@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "seq_lens"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
  """Contiguous cache: ``k``, ``v`` ``[layers, max_seqs, max_seq_len, kv_heads, head_dim]``,
  ``seq_lens [max_seqs]``. The baseline `forward` runs on instead of a `jaxpaged.PagedKVCache`.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> cache = DenseKVCache.create(config, max_seqs=3, max_seq_len=10)
  >>> cache.k.shape, cache.seq_lens.tolist()
  ((2, 3, 10, 1, 16), [0, 0, 0])
  """

  k: jax.Array
  v: jax.Array
  seq_lens: jax.Array

  @classmethod
  def create(cls, config: LlamaConfig, max_seqs: int, max_seq_len: int,
             dtype: jax.typing.DTypeLike = jnp.float32) -> DenseKVCache:
    """An empty cache for ``max_seqs`` sequences of up to ``max_seq_len`` tokens."""
    shape = (config.num_layers, max_seqs, max_seq_len, config.num_kv_heads, config.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((max_seqs,), jnp.int32))


Cache = jp.PagedKVCache | DenseKVCache  # what `forward` runs on


def _dense_extend(cache: DenseKVCache, seq_ids, q_lens, num_tokens):
  live = seq_ids >= 0
  seq_lens = cache.seq_lens.at[jnp.where(live, seq_ids, cache.seq_lens.shape[0])].add(
      q_lens, mode="drop")
  ok = jnp.all(jnp.where(live, seq_lens[jnp.maximum(seq_ids, 0)] <= cache.k.shape[2], True))
  return dataclasses.replace(cache, seq_lens=seq_lens), ok


def _dense_write_and_attend(cache: DenseKVCache, layer, q, k, v, seq_ids, q_lens, positions):
  row, _, valid = token_rows(q_lens, q.shape[0])
  seq = jnp.where(valid & (seq_ids[row] >= 0), seq_ids[row], cache.k.shape[1])  # OOB: dropped
  cache = dataclasses.replace(cache, k=cache.k.at[layer, seq, positions].set(k, mode="drop"),
                              v=cache.v.at[layer, seq, positions].set(v, mode="drop"))
  keys = cache.k[layer][jnp.clip(seq, 0, cache.k.shape[1] - 1)]  # [T, S, Hkv, D]
  values = cache.v[layer][jnp.clip(seq, 0, cache.k.shape[1] - 1)]
  num_tokens, num_heads, head_dim = q.shape
  group = num_heads // keys.shape[2]
  q = q.reshape(num_tokens, keys.shape[2], group, head_dim).astype(jnp.float32)
  s = jnp.einsum("thgd,tshd->thgs", q, keys.astype(jnp.float32)) * head_dim ** -0.5
  visible = jnp.arange(keys.shape[1])[None, :] <= positions[:, None]
  p = jax.nn.softmax(jnp.where(visible[:, None, None], s, -jnp.inf), axis=-1)
  out = jnp.einsum("thgs,tshd->thgd", p, values.astype(jnp.float32))
  out = jnp.where((seq < cache.k.shape[1])[:, None, None, None], out, 0)
  return cache, out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


# ----------------------------------------------------------------------------- the model

def forward(params: Params, cache: Cache, tokens: jax.typing.ArrayLike,
            seq_ids: jax.typing.ArrayLike, q_lens: jax.typing.ArrayLike, *, config: LlamaConfig,
            decode: bool, impl: str = "auto",
            tp_axis: str | None = None) -> tuple[Cache, jax.Array, jax.Array]:
  """Runs the model over a ragged batch of new tokens and appends their K/V to ``cache``.

  Args:
    params: weights from `jaxpaged.models.gguf.load` (as jnp arrays).
    cache: a `jaxpaged.PagedKVCache` (or a `DenseKVCache`, the baseline).
    tokens: ``int32[T]``, row b's new tokens at entries ``[start_b, start_b + q_lens[b])``.
    seq_ids: ``int32[B]`` cache sequence of each row; -1 = padding.
    q_lens: ``int32[B]`` new tokens of each row (decode: all ones, ``T == B``).
    config: the model's shape (static).
    decode: static; one token per row (uses decode attention).
    impl: the attention implementation, as jaxpaged's attention functions take it ("auto",
      "xla" or "pallas"); every function of `jaxpaged.models` calls this choice ``impl``.
    tp_axis: None on one device. Inside `jax.shard_map`, the mesh axis the layer weights are
      split over, Megatron-style (`jaxpaged.models.parallel`): ``params["layers"]`` and
      ``cache`` are then this device's shards (q/k/v, gate and up split by output columns, o
      and down by input rows, embeddings and norms whole) and each layer adds one
      ``psum`` over ``tp_axis`` after the attention output projection and one after the MLP
      down projection. The weights' shapes are not checked then (the caller checked the whole
      ones before splitting them).

  Returns:
    ``(cache, logits, ok)``: ``logits [B, vocab]`` float32 at each row's last new token;
    ``ok`` False if the cache refused the tokens (then nothing was appended).

  Raises:
    JaxPagedError: a config or params that do not go together, tokens that are not a 1-D
      integer array, or (when their values are known) token ids outside the vocabulary.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> params = random_params(config)
  >>> cache = init_cache(config.cache_spec(num_pages=8, max_seqs=2, max_seq_len=16, page_size=4))
  >>> cache, logits, ok = forward(params, cache, jnp.array([5, 6, 7, 8, 9]), jnp.array([0, 1]),
  ...                             jnp.array([3, 2]), config=config, decode=False)
  >>> logits.shape, bool(ok), cache.seq_lens.tolist()
  ((2, 64), True, [3, 2])
  """
  tokens = _check_forward(params, cache, tokens, config, whole_weights=tp_axis is None)
  cache, slots, positions, ok = _append(cache, tokens, seq_ids, q_lens)
  layer = functools.partial(_layer, config=config, positions=positions, slots=slots,
                            seq_ids=seq_ids, q_lens=q_lens, decode=decode, impl=impl,
                            dtype=params["embed"].dtype, tp_axis=tp_axis)
  x = params["embed"][tokens]
  (x, cache, _), _ = jax.lax.scan(layer, (x, cache, jnp.int32(0)), params["layers"])
  return cache, _logits(params, x, q_lens, config), ok


def _check_forward(params, cache, tokens, config: LlamaConfig, *, whole_weights: bool = True
                   ) -> jax.Array:
  """`forward`'s checks (of ``params`` only when they are the ``whole_weights``, not one
  device's shards); returns ``tokens`` as an integer array."""
  config = check_config(config)
  if whole_weights:
    check_params(params, config)
  if not isinstance(cache, (jp.PagedKVCache, DenseKVCache)):
    raise jp.JaxPagedError(f"cache must be a jaxpaged.PagedKVCache or a DenseKVCache, got "
                           f"{type(cache).__name__}.")
  tokens = checks.token_ids("tokens", tokens, ndim=1)
  if not checks.is_traced(tokens):
    bad = np.flatnonzero((np.asarray(tokens) < 0) | (np.asarray(tokens) >= config.vocab_size))
    if bad.size:
      raise jp.JaxPagedError(f"tokens[{int(bad[0])}] = {int(tokens[bad[0]])} is not a token id "
                             f"of this model: ids must be in [0, {config.vocab_size}).")
  return tokens


def _append(cache, tokens, seq_ids, q_lens):
  """Makes room for the rows' new tokens. Returns ``(cache, slots, positions, ok)``: each
  token's cache slot (None on a dense cache, which writes by position) and position."""
  num_tokens = tokens.shape[0]
  if isinstance(cache, jp.PagedKVCache):
    # Token ids go along, so a prefix-caching cache registers the blocks they fill.
    cache, slots, ok = jp.extend(cache, seq_ids, q_lens, num_slots=num_tokens, tokens=tokens)
    positions = jp.token_positions(cache, seq_ids, q_lens, num_slots=num_tokens)
  else:
    cache, ok = _dense_extend(cache, seq_ids, q_lens, num_tokens)
    row, offset, _ = token_rows(q_lens, num_tokens)
    positions = (cache.seq_lens[jnp.maximum(seq_ids, 0)] - q_lens)[row] + offset
    slots = None
  return cache, slots, jnp.maximum(positions, 0), ok


def _layer(carry, weights, *, config, positions, slots, seq_ids, q_lens, decode, impl, dtype,
           tp_axis=None):
  """One transformer layer (a `lax.scan` body over the stacked layers): attention, then MLP.
  Head counts come from the weights' widths, so the same code runs one device's share of the
  heads under `jax.shard_map` (``tp_axis``: the two partial sums are added over that axis)."""
  x, cache, index = carry
  num_tokens, head_dim = x.shape[0], config.head_dim
  reduce = (lambda y: y) if tp_axis is None else (lambda y: jax.lax.psum(y, tp_axis))
  h = rms_norm(x, weights["attn_norm"], config.norm_eps)
  q, k, v = (a.reshape(num_tokens, -1, head_dim) for a in _qkv(h, weights, config))
  q, k = rope(q, positions, config.rope_theta), rope(k, positions, config.rope_theta)
  if isinstance(cache, jp.PagedKVCache):
    store = k.dtype if cache.spec.quantized else cache.spec.dtype  # 8-bit: write_kv quantizes
    cache = jp.write_kv(cache, index, k.astype(store), v.astype(store), slots, impl=impl)
    if decode:
      attn = jp.paged_attention(q, cache, index, seq_ids, impl=impl)
    else:
      attn = jp.ragged_paged_attention(q, cache, index, seq_ids, q_lens, impl=impl)
  else:
    cache, attn = _dense_write_and_attend(cache, index, q, k, v, seq_ids, q_lens, positions)
  x = x + reduce(_output(attn.reshape(num_tokens, -1).astype(dtype), weights))
  h = rms_norm(x, weights["ffn_norm"], config.norm_eps)
  x = x + reduce(_mlp(h, weights, config))
  return (x, cache, index + 1), None


def _qkv(h, weights, config: LlamaConfig):
  """A layer's Q, K and V projections of ``h [T, hidden]`` (``[T, width]`` each)."""
  if _FUSED in weights:  # `fuse_layers`: one product for Q, K and V
    qkv = h @ weights["wqkv"]
    kv_width = (qkv.shape[1] - config.hidden) // 2
    return (qkv[:, :config.hidden], qkv[:, config.hidden:config.hidden + kv_width],
            qkv[:, config.hidden + kv_width:])
  return h @ weights["wq"], h @ weights["wk"], h @ weights["wv"]


def _output(attn, weights):
  """A layer's attention output projection of ``attn [T, heads * head size]``."""
  return attn @ weights["wo"]


def _mlp(h, weights, config: LlamaConfig):
  """A layer's SwiGLU MLP of ``h [T, hidden]`` (one device's partial sum under tensor
  parallelism)."""
  if _FUSED in weights:  # one product for gate and up
    gate_up = h @ weights["w_gate_up"]
    gate, up = gate_up[:, :config.ffn], gate_up[:, config.ffn:]
  else:
    gate, up = h @ weights["w_gate"], h @ weights["w_up"]
  return (jax.nn.silu(gate) * up) @ weights["w_down"]


def _logits(params, x, q_lens, config: LlamaConfig) -> jax.Array:
  """float32 logits ``[B, vocab]`` at each row's last new token."""
  last = jnp.maximum(jnp.cumsum(q_lens) - 1, 0)  # each row's last entry
  x = rms_norm(x[last], params["norm"], config.norm_eps)
  unembed = params["unembed"] if "unembed" in params else params["embed"].T
  return (x @ unembed).astype(jnp.float32)
