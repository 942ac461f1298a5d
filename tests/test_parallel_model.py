"""The model on a (data, model) mesh (`jaxpaged.models.parallel`): the oracle is the same model on
one device (greedy tokens equal, logits close), and the compiled decode step's collectives are
exactly the model's two all-reduces per layer, with no K/V page crossing devices.

Runs on the 8 CPU host devices tests/conftest.py asks XLA for.
"""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxpaged as jp
from jaxpaged.models import generation, gguf, llama, parallel

SMALL = llama.LlamaConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          ffn=64)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [3, 3, 3, 3, 3, 3, 3], [60, 61]]
NEW_TOKENS = 6
LOGITS_ATOL = 1e-4  # measured ~7e-6: the partial sums are added in another order

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (conftest.py)")


@pytest.fixture(scope="module")
def small():
  params = llama.random_params(SMALL, seed=1)
  one = generation.generate(params, SMALL, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=None,
                            page_size=4, prefill_chunk=8)
  return params, one


@pytest.mark.parametrize("data,model", [(1, 2), (2, 2), (1, 4), (2, 1)])
def test_small_model_on_a_mesh_equals_one_device(small, data, model):
  """(1, 4): more devices than KV heads, each head stored twice."""
  params, one = small
  out = generation.generate(params, SMALL, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=None,
                            page_size=4, prefill_chunk=8, mesh=jp.make_mesh(data, model))
  assert out.tokens == one.tokens
  np.testing.assert_allclose(out.first_logits, one.first_logits, atol=LOGITS_ATOL, rtol=0)
  assert out.decode_tokens == one.decode_tokens
  assert out.peak_pages <= out.num_pages


def test_sharded_forward_logits_equal_one_device_step_by_step():
  """`parallel.forward` on a (2, 2) mesh, prefill then two decode steps: each shard's logits
  are those of the same sequences on one device."""
  params = llama.random_params(SMALL, seed=2)
  mesh = jp.make_mesh(2, 2)
  sharded = parallel.shard_params(params, SMALL, mesh)
  spec = SMALL.cache_spec(num_pages=12, max_seqs=2, max_seq_len=16, page_size=4)
  cache = jp.init_sharded_cache(spec, mesh)
  single = jp.init_cache(dataclasses.replace(spec, max_seqs=4))
  # Shard 0: rows (local 0, local 1); shard 1: (local 0, padding). One device: ids 0, 1, 2.
  prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
  tokens = jnp.array([[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 0, 0]])
  seq_ids, q_lens = jnp.array([[0, 1], [0, -1]]), jnp.array([[3, 2], [4, 0]])
  cache, logits, ok = parallel.forward(sharded, cache, tokens, seq_ids, q_lens, config=SMALL,
                                       decode=False)
  single, expected, ok1 = llama.forward(params, single, jnp.array(sum(prompts, [])),
                                        jnp.array([0, 1, 2]), jnp.array([3, 2, 4]),
                                        config=SMALL, decode=False)
  assert ok.tolist() == [True, True] and bool(ok1)
  for _ in range(2):
    got = np.asarray(logits)[[0, 0, 1], [0, 1, 0]]
    np.testing.assert_allclose(got, expected, atol=LOGITS_ATOL, rtol=0)
    new = np.argmax(got, axis=-1)
    cache, logits, ok = parallel.forward(sharded, cache, jnp.array([[new[0], new[1]],
                                                                    [new[2], 0]]),
                                         seq_ids, jnp.ones((2, 2), jnp.int32), config=SMALL,
                                         decode=True)
    single, expected, _ = llama.forward(params, single, jnp.asarray(new), jnp.array([0, 1, 2]),
                                        jnp.ones(3, jnp.int32), config=SMALL, decode=True)
    assert ok.tolist() == [True, True]
  assert jp.shard_view(cache, 0).seq_lens.tolist() == [5, 4]
  assert jp.shard_view(cache, 1).seq_lens.tolist() == [6, 0]


def test_a_mesh_that_cannot_split_the_model_is_refused():
  params = llama.random_params(SMALL)
  with pytest.raises(jp.JaxPagedError, match=r"model axis of 3 devices.*4 query heads.*among"):
    parallel.generate(params, SMALL, PROMPTS, mesh=jp.make_mesh(1, 3), max_new_tokens=2)
  odd = dataclasses.replace(SMALL, num_heads=8, num_kv_heads=4, ffn=64)  # 8 devices: 4 KV heads
  parallel.check_mesh(odd, jp.make_mesh(1, 8))  # fine: each KV head on two devices
  three_kv = dataclasses.replace(SMALL, num_heads=6, hidden=48, num_kv_heads=3, ffn=48)
  with pytest.raises(jp.JaxPagedError, match=r"divide the KV heads or be a multiple"):
    parallel.check_mesh(three_kv, jp.make_mesh(1, 2))
  with pytest.raises(jp.JaxPagedError, match=r"mesh must be a jax.sharding.Mesh"):
    parallel.check_mesh(SMALL, "data=2,model=2")
  with pytest.raises(jp.JaxPagedError, match=r"prefix_caching=False with a mesh"):
    generation.generate(params, SMALL, PROMPTS, max_new_tokens=2, eos_id=None,
                        prefix_caching=True, mesh=jp.make_mesh(1, 2))


def test_forward_refuses_weights_and_batches_that_do_not_fit_the_mesh():
  params = llama.random_params(SMALL)
  mesh = jp.make_mesh(2, 4)  # 4 devices, 2 KV heads: k/v columns must be repeated
  cache = jp.init_sharded_cache(SMALL.cache_spec(num_pages=4, max_seqs=1, max_seq_len=8,
                                                 page_size=4), mesh)
  ones = jnp.ones((2, 1), jnp.int32)
  with pytest.raises(jp.JaxPagedError, match=r"pass shard_params\(params, config, mesh\)"):
    parallel.forward(params, cache, ones, ones, ones, config=SMALL, decode=True)
  sharded = parallel.shard_params(params, SMALL, mesh)
  with pytest.raises(jp.JaxPagedError, match=r"tokens must have a leading axis of 2"):
    parallel.forward(sharded, cache, jnp.ones((1, 1), jnp.int32), ones, ones, config=SMALL,
                     decode=True)
  with pytest.raises(jp.JaxPagedError, match=r"cache must be a jaxpaged.ShardedCache"):
    parallel.forward(sharded, jp.init_cache(cache.spec), ones, ones, ones, config=SMALL,
                     decode=True)


def test_weights_are_split_megatron_style():
  mesh = jp.make_mesh(2, 4)
  sharded = parallel.shard_params(llama.random_params(SMALL), SMALL, mesh)
  layers = sharded["layers"]
  # 2 KV heads of 8 on 4 devices: each device's k columns are one (repeated) head.
  assert layers["wk"].shape == (2, 32, 32)
  assert {s.data.shape for s in layers["wk"].addressable_shards} == {(2, 32, 8)}
  assert {s.data.shape for s in layers["wo"].addressable_shards} == {(2, 8, 32)}
  assert {s.data.shape for s in layers["w_down"].addressable_shards} == {(2, 16, 32)}
  assert sharded["embed"].sharding.is_fully_replicated


# ----------------------------------------------------------------------------- SmolLM2-135M

QUESTIONS = ["What is the capital of France?", "Name a color.", "Count to three."]


def test_smollm2_on_data_2_model_3_equals_one_device():
  config, params, tokenizer = gguf.load()
  params = jax.tree.map(jnp.asarray, params)
  prompts = [tokenizer.encode(tokenizer.chat_prompt(q)) for q in QUESTIONS]
  run = functools.partial(generation.generate, params, config, prompts, max_new_tokens=8,
                          eos_id=tokenizer.eos_token_id, prefill_chunk=64)
  one = run()
  mesh = run(mesh=jp.make_mesh(2, 3))
  assert mesh.tokens == one.tokens
  assert all(len(t) >= 1 for t in one.tokens)
  np.testing.assert_allclose(mesh.first_logits, one.first_logits, atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- the HLO

def kv_leaks(found: list[jp.Collective], spec: jp.CacheSpec) -> list[jp.Collective]:
  """The collectives other than all-reduce, and any collective that moves K/V: an array whose
  trailing dimensions are a page ``[page_size, head_dim]`` (a pool, a page, a gathered page)."""
  page = (spec.page_size, spec.head_dim)
  return [c for c in found if c.op != "all-reduce"
          or any(len(dims) >= 2 and dims[-2:] == page for _, dims in c.shapes)]


def _compiled_decode_step(config, mesh, batch, spec):
  params = parallel.shard_params(llama.random_params(config), config, mesh)
  cache = jp.init_sharded_cache(spec, mesh)
  n = int(mesh.shape["data"])
  step = functools.partial(parallel.forward, config=config, decode=True)
  ids = jnp.tile(jnp.arange(batch, dtype=jnp.int32), (n, 1))
  return jax.jit(step).lower(params, cache, jnp.zeros((n, batch), jnp.int32), ids,
                             jnp.ones((n, batch), jnp.int32)).compile()


HLO_CONFIG = dataclasses.replace(SMALL, num_layers=3)  # 3 layers: a loop XLA keeps as a loop


@pytest.mark.parametrize("data,model", [(2, 2), (2, 4)])
def test_decode_step_only_all_reduces_activations_twice_per_layer(data, model):
  """The compiled decode step: no collective moves K/V, and the all-reduces are the model's
  (two per layer in the layer loop's body, over ``[tokens, hidden]`` activations)."""
  batch = 3
  spec = HLO_CONFIG.cache_spec(num_pages=16, max_seqs=batch, max_seq_len=24, page_size=4)
  found = jp.collectives(_compiled_decode_step(HLO_CONFIG, jp.make_mesh(data, model), batch,
                                               spec))
  for c in found:
    print(f"{c.op} in {c.computation}: {c.shapes[0]} = {c.bytes} bytes")
  assert not kv_leaks(found, spec)
  assert collections.Counter(c.op for c in found) == {"all-reduce": 2}
  assert all(c.in_loop for c in found)  # the layer loop's body: per layer
  assert all(dims == (batch, HLO_CONFIG.hidden) for c in found for _, dims in c.shapes)
  per_step = HLO_CONFIG.num_layers * sum(c.bytes for c in found)
  print(f"collective bytes per decode step (per device): {per_step}")


def test_the_hlo_check_sees_k_v_gathered_across_devices():
  """The oracle of the test above: the same decode step written naively (the single-device
  forward jitted over data shard 0's cache, whose heads are sharded over "model", returning the
  cache without its sharding) makes XLA gather the K/V pool across devices, and the check says
  so. (Left to itself, XLA partitions that attention by heads too: only the returned cache's
  placement forces the gather.)"""
  mesh = jp.make_mesh(1, 4)
  spec = SMALL.cache_spec(num_pages=16, max_seqs=3, max_seq_len=24, page_size=4)
  cache = jp.init_sharded_cache(spec, mesh)
  params = parallel.shard_params(llama.random_params(SMALL), SMALL, mesh)

  def naive(shards, tokens):
    one = dataclasses.replace(jax.tree.map(lambda a: a[0], shards),
                              spec=dataclasses.replace(spec, num_kv_heads=4))
    return llama.forward(params, one, tokens, jnp.arange(3), jnp.ones(3, jnp.int32),
                         config=parallel.stored_config(SMALL, mesh), decode=True)

  compiled = jax.jit(naive, out_shardings=NamedSharding(mesh, P())).lower(
      cache.shards, jnp.zeros(3, jnp.int32)).compile()
  leaks = kv_leaks(jp.collectives(compiled), spec)
  assert leaks and all(c.op != "all-reduce" for c in leaks)
  assert any(dims[-2:] == (spec.page_size, spec.head_dim) for c in leaks for _, dims in c.shapes)


def test_generate_example_asks_for_its_own_host_devices_before_jax_starts():
  """``examples/generate.py --mesh data=2,model=3`` on a machine without accelerators: the
  script sets XLA_FLAGS itself, so JAX starts with the 6 CPU devices the mesh needs."""
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).parent.parent
  code = ("import runpy, sys; sys.argv = ['generate.py', '--mesh', 'data=2,model=3']; "
          "module = runpy.run_path('examples/generate.py', run_name='example'); "
          "import jax; print(len(jax.devices('cpu')), module['mesh_shape']('data=2,model=3'))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120, check=True).stdout
  assert out.split() == ["6", "(2,", "3)"]


# ----------------------------------------------------------------------------- several processes

def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_with_four_devices_each_equal_one_device(small, tmp_path):
  """tests/multiprocess_worker.py twice (gloo collectives, `jax.distributed.initialize` on
  127.0.0.1), one global (2, 4) mesh: every process gets one device's greedy tokens, with the
  processes as data shards and with the model axis spanning both processes."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests import multiprocess_worker as worker  # pylint: disable=g-import-not-at-top
  script = pathlib.Path(worker.__file__)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(script), "--process-id", str(i), "--num-processes", "2",
       "--coordinator", f"127.0.0.1:{port}", "--out", str(tmp_path / f"out{i}.json"),
       "--timeout", "60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  # The oracle: the workers' model, seed and prompts are the `small` fixture's, whose one-device
  # run (compiled once for the module) is theirs too.
  assert (llama.LlamaConfig(**worker.SMALL), worker.SEED, worker.PROMPTS, worker.NEW_TOKENS) == (
      SMALL, 1, PROMPTS, NEW_TOKENS)
  _, one = small
  for i in range(2):
    result = json.loads((tmp_path / f"out{i}.json").read_text())
    assert result["num_devices"] == 8 and result["process_count"] == 2
    for name, processes in (("hosts_as_data", 1), ("model_across_hosts", 2)):
      assert result[name + "_processes_per_model_group"] == processes
      assert result[name] == one.tokens, (i, name)
      np.testing.assert_allclose(result[name + "_first_logits"], one.first_logits,
                                 atol=LOGITS_ATOL, rtol=0)
