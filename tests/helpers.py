"""Shared test helpers: an independent NumPy model of cache writes and deviceless CUDA lowering."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


def numpy_write(k_pages, v_pages, layer, k, v, slots):
  """What write_kv must do, one token at a time in NumPy."""
  k_pages, v_pages = np.array(k_pages), np.array(v_pages)
  page_size = k_pages.shape[3]
  for t, slot in enumerate(np.asarray(slots)):
    if slot >= 0:
      k_pages[layer, :, slot // page_size, slot % page_size] = np.asarray(k[t])
      v_pages[layer, :, slot // page_size, slot % page_size] = np.asarray(v[t])
  return k_pages, v_pages


def _abstract_gpu():
  """JAX >= 0.11 needs to be told which GPU it lowers Triton kernels for when none is present."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def lower_for_cuda(fn, *args, **kwargs) -> str:
  """Lowers `fn` for CUDA on this CPU-only machine and returns the StableHLO text."""
  with _abstract_gpu():
    return jax.jit(fn, **kwargs).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


TRITON_CALL = "__gpu$xla.gpu.triton"


def random_cache(spec, lengths, seed=0, fill=None):
  """A cache holding sequences 0..len(lengths)-1 of those lengths, on randomly permuted pages,
  with random K/V (or `fill` everywhere)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  cache = jp.init_cache(spec)
  cache = dataclasses.replace(cache, free_pages=jnp.asarray(
      rng.permutation(spec.num_pages).astype(np.int32)))
  cache, _, ok = jp.extend(cache, jnp.arange(len(lengths)), jnp.asarray(lengths),
                           num_slots=max(sum(lengths), 1))
  assert bool(ok)

  def pool():
    values = rng.normal(size=spec.pages_shape) if fill is None else np.full(spec.pages_shape, fill)
    return jnp.asarray(values, spec.dtype)

  return dataclasses.replace(cache, k_pages=pool(), v_pages=pool())


def numpy_attention(cache, layer, seq, q, positions, *, sm_scale=None, soft_cap=None,
                    sliding_window=None):
  """float64 oracle on the sequence's contiguous K/V (from gather_kv): q [n, Hq, D] at
  `positions`, each attending causally to the sequence's tokens."""
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  k, v = (np.asarray(x, np.float64) for x in jp.gather_kv(cache, layer, seq))
  length = int(cache.seq_lens[seq])
  num_kv_heads, head_dim = k.shape[1:]
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  out = np.zeros(q.shape, np.float64)
  for i, position in enumerate(positions):
    keys = np.arange(length)
    visible = keys <= position
    if sliding_window:
      visible &= keys > position - sliding_window
    if position < 0 or not visible.any():
      continue
    qi = np.asarray(q[i], np.float64).reshape(num_kv_heads, -1, head_dim)
    s = np.einsum("hgd,shd->hgs", qi, k[keys[visible]]) * scale
    if soft_cap:
      s = soft_cap * np.tanh(s / soft_cap)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out[i] = np.einsum("hgs,shd->hgd", w, v[keys[visible]]).reshape(q.shape[1:])
  return out


# Tolerance per K/V dtype: outputs are averages of V rows, computed in float32 from inputs rounded
# to the cache dtype (q is rounded the same way by the kernels).
ATOL = {"float32": 2e-5, "bfloat16": 3e-2, "float16": 4e-3}


def key_values(tokens):
  """K/V a causal model would store: token t's value depends on all tokens up to t."""
  values, h = [], 0
  for t in tokens:
    h = (h * 31 + t + 1) % 65521
    values.append(float(h))
  return np.asarray(values, np.float32)


def write_prefix_kv(manager, tokens, start, slots, count):
  """What a model's prefill stores in ``manager.cache`` for ``tokens[start:start+count]`` at
  ``slots``: prefix-dependent values (`key_values`; K plus the layer, V negated), for caches of
  one KV head and head_dim 2."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  values = np.zeros(slots.shape[0], np.float32)
  values[:count] = key_values(tokens)[start:start + count]
  kv = jnp.broadcast_to(jnp.asarray(values)[:, None, None], (slots.shape[0], 1, 2))
  for layer in range(manager.spec.num_layers):
    manager.cache = jp.write_kv(manager.cache, layer, kv + layer, -kv, slots)


def prefill_manager(manager, tokens, **kw):
  """``manager.admit(tokens, **kw)`` and the K/V of what it appended (`write_prefix_kv`)."""
  admission = manager.admit(tokens, **kw)
  if admission is None:
    raise AssertionError(f"the manager refused a prompt of {len(tokens)} tokens")
  write_prefix_kv(manager, tokens, admission.num_cached, admission.slots, admission.num_new)
  return admission


def assert_usage_error(capsys, script: str, argv, message: str):
  """Runs ``examples/<script>``'s ``main(argv)`` and checks that argparse refused it: exit status
  2, a usage line and ``error: <message>``, no traceback."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import runpy  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).parent.parent / "examples" / script
  module = runpy.run_path(str(path), run_name="usage-test")
  with pytest.raises(SystemExit) as exit_:
    module["main"](list(argv))
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("usage: ") and f"error: {message}\n" in err and "Traceback" not in err


def _cached_blocks(cache):
  """Each cached page's block, page ids left out: hash, salt, tokens, depth, priority, last use,
  written flags and, while the parent link holds (generations agree), the parent's block."""
  p = jax.tree.map(np.asarray, cache.prefix)

  def block(page):
    parent = int(p.page_parent[page])
    linked = parent >= 0 and p.page_parent_gen[page] == p.page_gen[parent]
    return (tuple(p.page_hash[page]), tuple(p.page_salt[page]), tuple(p.page_tokens[page]),
            int(p.page_depth[page]), int(p.page_last_use[page]), bool(p.page_written[page].all()),
            int(np.where(p.page_priority_gen[page] == p.page_gen[page], p.page_priority[page], 0)),
            block(parent) if linked else int(min(parent, 0)))

  return [block(page) for page in np.flatnonzero(p.page_cached)]


def check_defragmented(old, new, *, packed=True):
  """``new = jaxpaged.defragment(old)`` (or a `jaxpaged.resize` of it) against what that means:
  the live pages are exactly ``[0, num_live)`` and the free stack the rest (``packed``; else,
  a grown pool: no page moved and the free stack holds every other page), each page table
  entry was renamed by one bijection (so shared pages stay shared), reference counts and cached
  blocks followed their pages, and every sequence reads bit-identical K/V and attention."""
  import jaxpaged as jp
  num_live = old.spec.num_pages - int(old.num_free)
  assert new.spec.num_pages - int(new.num_free) == num_live
  free = np.asarray(new.free_pages)[:int(new.num_free)].tolist()
  if packed:
    assert sorted(free) == list(range(num_live, new.spec.num_pages))
  else:
    np.testing.assert_array_equal(np.asarray(old.page_table), np.asarray(new.page_table))
    old_free = np.asarray(old.free_pages)[:int(old.num_free)].tolist()
    assert sorted(free) == sorted(old_free + list(range(old.spec.num_pages,
                                                        new.spec.num_pages)))
  before, after = np.asarray(old.page_table), np.asarray(new.page_table)
  np.testing.assert_array_equal(before >= 0, after >= 0)
  pairs = set(zip(before[before >= 0].tolist(), after[after >= 0].tolist()))
  assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})  # a bijection
  assert all(b < num_live for _, b in pairs) or not packed
  old_refs, new_refs = np.asarray(old.ref_counts), np.asarray(new.ref_counts)
  for a, b in pairs:
    assert old_refs[a] == new_refs[b]
  if old.prefix is not None:
    # The same cached blocks, each with its whole record and its chain of linked parents.
    assert sorted(_cached_blocks(old)) == sorted(_cached_blocks(new))
    for a, b in pairs:
      assert bool(old.prefix.page_cached[a]) == bool(new.prefix.page_cached[b])
  lens = np.asarray(old.seq_lens)
  np.testing.assert_array_equal(lens, np.asarray(new.seq_lens))
  live = np.flatnonzero(lens > 0)
  for layer in range(old.spec.num_layers):
    for s in live:
      for x, y in zip(jp.gather_kv(old, layer, int(s)), jp.gather_kv(new, layer, int(s))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  if len(live):
    spec = old.spec
    q = jax.random.normal(jax.random.key(0), (len(live), spec.num_kv_heads, spec.head_dim))
    ids = jnp.asarray(live, jnp.int32)
    np.testing.assert_array_equal(np.asarray(jp.paged_attention(q, old, 0, ids)),
                                  np.asarray(jp.paged_attention(q, new, 0, ids)))
