"""Prefill on the paged cache (or the dense baseline): the prompts computed in chunks of a fixed
token budget (one compiled shape), rows concatenated as `jaxpaged.extend` lays them out, after
their cached prefixes are attached (`jaxpaged.match_prefix`).

The argument checks `prefill` shares with `jaxpaged.models.generation.generate` are here too.
Every check raises `jaxpaged.JaxPagedError` naming the argument, what was expected, what was
given and the fix.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxpaged as jp
from jaxpaged._src import checks
from jaxpaged._src.gpu import IMPLS
from jaxpaged._src.spec import next_pow2
from jaxpaged.models import llama
from jaxpaged.models.llama import Cache, DenseKVCache, LlamaConfig, Params, forward

# ----------------------------------------------------------------------------- argument checks

def check_prompts(prompts: Any, vocab_size: int) -> list[list[int]]:
  """``prompts`` as lists of Python ints, if it is a non-empty list of prompts whose token ids
  are all in ``[0, vocab_size)``.

  >>> check_prompts([[1, 2], np.array([3])], vocab_size=64)
  [[1, 2], [3]]
  """
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple, np.ndarray)):
    raise jp.JaxPagedError(f"prompts must be a list of prompts (each a list of int token ids), "
                           f"got {type(prompts).__name__}.")
  if len(prompts) == 0:
    raise jp.JaxPagedError("prompts is empty; pass at least one prompt (a list of token ids).")
  return [llama.check_tokens(f"prompts[{row}]", p, vocab_size) for row, p in enumerate(prompts)]


def check_cache(cache: Any, config: LlamaConfig) -> int:
  """``cache``'s number of sequence slots, if it is a cache for ``config``'s K/V.

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> check_cache(DenseKVCache.create(config, max_seqs=3, max_seq_len=8), config)
  3
  """
  if isinstance(cache, jp.PagedKVCache):
    spec = cache.spec
    shape, slots = (spec.num_layers, spec.num_kv_heads, spec.head_dim), spec.max_seqs
  elif isinstance(cache, DenseKVCache):
    layers, slots, _, kv_heads, head_dim = cache.k.shape
    shape = (layers, kv_heads, head_dim)
  else:
    raise jp.JaxPagedError(f"cache must be a jaxpaged.PagedKVCache (config.cache_spec, "
                           f"jaxpaged.init_cache) or a DenseKVCache, got {type(cache).__name__}.")
  want = (config.num_layers, config.num_kv_heads, config.head_dim)
  if shape != want:
    raise jp.JaxPagedError(f"cache holds (layers, KV heads, head size) {shape} but the model has "
                           f"{want}; make it with config.cache_spec(...) of this config.")
  return slots


def check_impl(impl: Any) -> str:
  """``impl``, if it names an attention implementation (`jaxpaged.models.llama.forward`).

  >>> check_impl("xla")
  'xla'
  """
  if impl not in IMPLS:
    raise jp.JaxPagedError(f"impl must be one of {IMPLS}, got {impl!r}.")
  return impl


def check_progress(progress: Any) -> Callable[[str], None]:
  """``progress``, if it is a callable taking a line of text, or one that does nothing for None.

  >>> check_progress(None)("prefill: 3/3 prompt tokens")  # says nothing
  """
  if progress is not None and not callable(progress):
    raise jp.JaxPagedError(f"progress must be a callable taking a str, or None, got "
                           f"{type(progress).__name__}.")
  return progress or (lambda message: None)


def chunk_size(prefill_chunk: Any, prompts: Sequence[Sequence[int]]) -> int:
  """The prefill chunk (a static shape): at most the prompts' tokens, rounded up to a power of
  two (so a huge chunk allocates nothing, and few shapes compile).

  >>> chunk_size(256, [[1, 2, 3], [4, 5]]), chunk_size(2, [[1, 2, 3], [4, 5]])
  (8, 2)
  """
  prefill_chunk = checks.integer("prefill_chunk", prefill_chunk, minimum=1,
                                 below=checks.INT32_MAX,
                                 fix="pass the prompt tokens computed per call, e.g. 256")
  return min(prefill_chunk, next_pow2(sum(map(len, prompts))))


# ----------------------------------------------------------------------------- prefill
# The prefill owns its cache: its steps donate it (updated in place, no pool copy).
_attach_prefixes = jax.jit(jp.match_prefix, static_argnames=("num_slots", "impl", "interpret"),
                           donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("config", "impl"), donate_argnames=("cache",))
def _prefill_step(params, cache, tokens, seq_ids, q_lens, *, config, impl):
  return forward(params, cache, tokens, seq_ids, q_lens, config=config, decode=False, impl=impl)


def prefill(params: Params, config: LlamaConfig, cache: Cache, seq_ids: Sequence[int],
            prompts: Sequence[Sequence[int]], *, prefill_chunk: int = 256, impl: str = "auto",
            progress: Callable[[str], None] | None = None
            ) -> tuple[Cache, np.ndarray, np.ndarray]:
  """Admits new sequences and computes their prompts in chunks of ``prefill_chunk`` tokens.

  On a `jaxpaged.PagedKVCache`, `jaxpaged.match_prefix` first attaches each prompt's cached
  prefix (with prefix caching enabled), so only the rest is computed.

  Args:
    seq_ids: a sequence slot of ``cache`` for each prompt (distinct ints): a free one on a
      `jaxpaged.PagedKVCache`; a `DenseKVCache` appends to what the slot holds.
    prompts: token ids, one non-empty sequence per row, each id in ``[0, config.vocab_size)``.
    impl: the attention implementation (`jaxpaged.models.llama.forward`).

  Returns:
    ``(cache, first_logits [B, vocab], cached_tokens [B])``: logits at each prompt's last token.

  Raises:
    JaxPagedError: for a bad argument, or prompts ``cache`` cannot hold (a slot in use, too few
      pages, a prompt longer than a sequence holds); checked before the cache is touched, so
      the cache passed in is still valid (it is donated only once the call goes ahead).

  >>> config = LlamaConfig(vocab_size=64, hidden=32, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                      ffn=64)
  >>> cache = init_cache(config.cache_spec(num_pages=8, max_seqs=2, max_seq_len=16, page_size=4))
  >>> cache, first_logits, cached = prefill(llama.random_params(config), config, cache, [0, 1],
  ...                                       [[1, 2, 3], [4, 5, 6, 7, 8]])
  >>> cache.seq_lens.tolist(), first_logits.shape, cached.tolist()
  ([3, 5], (2, 64), [0, 0])
  """
  seq_ids, prompts, prefill_chunk, say = _check_prefill(
      params, config, cache, seq_ids, prompts, prefill_chunk, impl, progress)
  capacity = _check_room(cache, seq_ids, prompts)
  # A chunk fills at most every row to its capacity (the cache refuses wider calls).
  prefill_chunk = min(prefill_chunk, len(prompts) * capacity)
  ids = jnp.asarray(seq_ids, jnp.int32)
  cache, fed = _attach_cached(cache, ids, prompts)
  cached = np.asarray(fed)
  cache, first_logits = _prefill_chunks(params, config, cache, ids, prompts, fed, prefill_chunk,
                                        impl, say)
  return cache, first_logits, cached


def _check_prefill(params, config, cache, seq_ids, prompts, prefill_chunk, impl, progress):
  """`prefill`'s argument checks. Returns ``(seq_ids, prompts, prefill_chunk, say)``."""
  config = llama.check_config(config)
  llama.check_params(params, config)
  prompts = check_prompts(prompts, config.vocab_size)
  slots = check_cache(cache, config)
  prefill_chunk = chunk_size(prefill_chunk, prompts)
  check_impl(impl)
  say = check_progress(progress)
  if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, (list, tuple, np.ndarray)):
    raise jp.JaxPagedError(f"seq_ids must be a list of ints (a sequence slot per prompt), got "
                           f"{type(seq_ids).__name__}.")
  seq_ids = [checks.integer(f"seq_ids[{row}]", s, minimum=0, below=slots,
                            fix="pass a sequence slot of the cache")
             for row, s in enumerate(seq_ids)]
  if len(seq_ids) != len(prompts):
    raise jp.JaxPagedError(f"seq_ids has {len(seq_ids)} entries for {len(prompts)} prompts; pass "
                           "one sequence slot per prompt.")
  if len(set(seq_ids)) != len(seq_ids):
    raise jp.JaxPagedError(f"seq_ids must be distinct (one sequence per prompt), got {seq_ids}.")
  return seq_ids, prompts, prefill_chunk, say


def _check_room(cache, seq_ids: list[int], prompts: list[list[int]]) -> int:
  """Everything the cache could refuse about each row, checked before the cache (donated from
  here on) is touched, so that a refused call raises with the caller's cache intact. Returns
  the tokens one sequence holds."""
  held = [int(n) for n in np.asarray(cache.seq_lens)[seq_ids]]
  if isinstance(cache, jp.PagedKVCache):
    capacity, what = cache.spec.max_seq_len, "max_pages_per_seq * page_size"
    for row, n in enumerate(held):
      if n:
        raise jp.JaxPagedError(
            f"seq_ids[{row}] = {seq_ids[row]} is a sequence that holds {n} tokens; prefill "
            "starts new sequences on a PagedKVCache: pass a free slot, or release it first.")
  else:
    capacity, what = cache.k.shape[2], "the DenseKVCache's max_seq_len"
  for row, (prompt, n) in enumerate(zip(prompts, held)):
    if n + len(prompt) > capacity:
      raise jp.JaxPagedError(
          f"prompts[{row}] has {len(prompt)} tokens but sequence {seq_ids[row]} of the cache can "
          f"take {capacity - n} more ({capacity}, {what}, minus {n} held); build the cache for "
          "longer sequences or shorten the prompt.")
  return capacity


def _attach_cached(cache, ids: jax.Array, prompts: list[list[int]]) -> tuple[Cache, list[int]]:
  """On a paged cache, attaches each prompt's cached prefix (after checking that the pool can
  hold the prompts). Returns ``(cache, fed)``: the prompt tokens each row already holds."""
  if not isinstance(cache, jp.PagedKVCache):
    return cache, [0] * len(prompts)
  batch, ps = len(prompts), cache.spec.page_size
  padded = np.zeros((batch, max(map(len, prompts))), np.int32)
  for row, prompt in enumerate(prompts):
    padded[row, :len(prompt)] = prompt
  padded, lengths = jnp.asarray(padded), jnp.asarray([len(p) for p in prompts], jnp.int32)
  room = int(jp.num_free_pages(cache)) + int(jp.num_cached_free_pages(cache))
  if sum(-(-len(p) // ps) for p in prompts) > room:  # prefix hits may still make it fit
    try:  # (eager, no donation) the whole prompts, as the chunks will append them
      jp.check_match_prefix(cache, ids, padded, lengths)
    except jp.JaxPagedError as e:
      raise jp.JaxPagedError(
          f"the cache cannot hold the prompts ({sum(map(len, prompts))} tokens; {room} pages "
          f"of {ps} tokens free or reclaimable): {e}") from e
  cache, match = _attach_prefixes(cache, ids, padded, lengths,
                                  max_prompt_tokens=jnp.zeros(batch, jnp.int32), num_slots=batch)
  if not bool(match.ok):
    raise RuntimeError("jaxpaged bug: match_prefix refused prompts that prefill checked; "
                       "please report it.")
  return cache, [int(n) for n in match.num_cached]


def _prefill_chunks(params, config, cache, ids, prompts, fed: list[int], prefill_chunk: int,
                    impl: str, say: Callable[[str], None]) -> tuple[Cache, np.ndarray]:
  """Computes the prompts from ``fed`` on, a chunk at a time. Returns ``(cache, first_logits)``.
  """
  cached = sum(fed)
  first_logits = np.zeros((len(prompts), config.vocab_size), np.float32)
  while any(f < len(p) for f, p in zip(fed, prompts)):
    cache = _prefill_chunk(params, config, cache, ids, prompts, fed, first_logits, prefill_chunk,
                           impl)
    say(f"prefill: {sum(fed)}/{sum(map(len, prompts))} prompt tokens "
        f"({cached} from the prefix cache)")
  return cache, first_logits


def _prefill_chunk(params, config, cache, ids, prompts, fed: list[int], first_logits: np.ndarray,
                   prefill_chunk: int, impl: str) -> Cache:
  """Computes the next ``prefill_chunk`` prompt tokens, filled row by row; advances ``fed`` and
  records ``first_logits`` of the rows whose prompt is now complete."""
  budget, chunk, q_lens = prefill_chunk, [], []
  for row, prompt in enumerate(prompts):
    take = min(len(prompt) - fed[row], budget)
    chunk += prompt[fed[row]:fed[row] + take]
    q_lens.append(take)
    budget -= take
  tokens = np.zeros(prefill_chunk, np.int32)
  tokens[:len(chunk)] = chunk
  cache, logits, ok = _prefill_step(params, cache, jnp.asarray(tokens), ids,
                                    jnp.asarray(q_lens, jnp.int32), config=config, impl=impl)
  if not bool(ok):
    raise RuntimeError("jaxpaged bug: the cache refused a prefill chunk that prefill checked "
                       "would fit; please report it.")
  logits = np.asarray(logits)
  for row, take in enumerate(q_lens):
    fed[row] += take
    if take and fed[row] == len(prompts[row]):
      first_logits[row] = logits[row]
  return cache


