"""The cache on a device mesh (scale-out issue), on 8 CPU host devices in a child process.

1. Bytes moved between devices per decode step, read from the compiled HLO (`jaxpaged.collectives`),
   against the K/V bytes the step's attention reads: a decode step over a `ShardedCache` (extend,
   then write_kv and paged_attention for each layer) on tensor-parallel meshes (1, m) and data-
   parallel meshes (d, 1). Per device, as the HLO states it.
2. Per-shard step cost as data shards are added (the same per-shard batch and context on each):
   flat is the target on real parallel hardware. This machine has 2 CPU cores for up to 8 host
   devices, so the shards' work is serialized onto 2 cores: the step time here grows with the
   shard count once it passes 2, and that growth is the cores, not communication (part 1 shows
   what is communicated).
"""

from __future__ import annotations

from benchmarks import harness
from benchmarks.harness import Row

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, PAGE = 4, 8, 32, 128, 64
PER_SHARD_BATCH, CONTEXT = 8, 1024


def _step_and_args(data: int, model: int, context: int, local: bool):
  """A decode step over a `ShardedCache` whose sequences have ``context - 1`` tokens: through
  the public ops with global ids (``local`` False: each shard sees the whole batch and the
  results are assembled with reductions over "data"), or written with `jaxpaged.map_shards`
  (each shard runs its own batch on its local cache)."""
  import jax
  import jax.numpy as jnp
  import jaxpaged as jp
  from jax.sharding import PartitionSpec as P
  spec = jp.CacheSpec(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                      page_size=PAGE, num_pages=PER_SHARD_BATCH * (context // PAGE + 1),
                      max_seqs=PER_SHARD_BATCH, max_pages_per_seq=context // PAGE + 1)
  cache = jp.init_sharded_cache(spec, jp.make_mesh(data, model))
  ids = jnp.arange(data * PER_SHARD_BATCH, dtype=jnp.int32)
  cache, _, _ = jp.extend(cache, ids, jnp.full(ids.shape, context - 1), num_slots=1)

  def layers(cache, q, k, v, ids):
    cache, slots, _ = jp.extend(cache, ids, jnp.ones_like(ids), num_slots=ids.shape[0])
    outs = []
    for layer in range(LAYERS):
      cache = jp.write_kv(cache, layer, k, v, slots)
      outs.append(jp.paged_attention(q, cache, layer, ids))
    return cache, jnp.stack(outs)

  if local:
    heads = P("data", None, "model", None)

    def step(cache, q, k, v):
      def shard(local_cache, q, k, v):
        new, out = layers(local_cache, q[0], k[0], v[0], ids[:PER_SHARD_BATCH])
        return new, out[None]
      return jp.map_shards(shard, cache, q, k, v, in_specs=(heads,) * 3,
                           out_specs=P("data", None, None, "model", None))
    shape = (data, PER_SHARD_BATCH)
  else:
    step = lambda cache, q, k, v: layers(cache, q, k, v, ids)  # noqa: E731
    shape = (data * PER_SHARD_BATCH,)
  args = (cache, jnp.ones(shape + (Q_HEADS, HEAD_DIM)), jnp.ones(shape + (KV_HEADS, HEAD_DIM)),
          jnp.ones(shape + (KV_HEADS, HEAD_DIM)))
  return jax.jit(step), args


def _child(quick: bool) -> list[dict]:
  import statistics
  import time
  import jax
  import jaxpaged as jp
  rows = []
  context = 256 if quick else CONTEXT
  kv_read = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4 * context  # per sequence, all heads
  for local in (False, True):
    how = "map_shards step" if local else "public-op step"
    for data, model in ((1, 2), (1, 8), (2, 1), (8, 1), (2, 4)):
      step, args = _step_and_args(data, model, context, local)
      found = jp.collectives(step.lower(*args).compile())
      moved = sum(c.bytes for c in found)
      kv = kv_read * PER_SHARD_BATCH // model  # per device: its shard's sequences, its heads
      pages = [c for c in found if any(len(s) >= 4 for _, s in c.shapes)]
      label = f"{how}, mesh data={data} model={model}"
      rows.append(dict(name=f"{label}: collective bytes / K/V bytes read, per device",
                       value=moved / kv, unit="ratio",
                       target="no K/V crosses devices: only ids, slots, ok, outputs"))
      rows.append(dict(name=f"{label}: collective bytes per device", value=moved, unit="B"))
      rows.append(dict(name=f"{label}: collectives with a K/V page operand", value=len(pages),
                       unit="count", target="0", passed=not pages))
  rows += _model_rows(context)
  base = None
  for data in (1, 2, 4, 8):
    step, args = _step_and_args(data, 1, context, local=True)
    cache, rest = args[0], args[1:]
    times = []
    for i in range(3 + (5 if quick else 15)):
      start = time.perf_counter()
      cache, out = step(cache, *rest)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
    median = statistics.median(times[3:]) * 1e3
    base = base or median
    rows.append(dict(name=f"{data} data shards x {PER_SHARD_BATCH} seqs x {context} tokens: "
                     "decode step", value=median, unit="ms"))
    rows.append(dict(name=f"{data} data shards: step time / 1 shard's", value=median / base,
                     unit="x", target="1 on parallel hardware (2 cores here)"))
    rows.append(dict(name=f"{data} data shards: step time per shard / 1 shard's",
                     value=median / data / base, unit="x",
                     target="<= 1: no per-shard overhead when serialized"))
  return rows


def _model_rows(context: int) -> list[dict]:
  """SmolLM2-135M's shape (random weights: the collectives depend on shapes only) under
  `jaxpaged.models.parallel` (Megatron tensor parallel on "model", batch on "data"): collective
  bytes per decode step from its compiled HLO. The layer loop's body holds the per-layer
  collectives; it is compiled with 2 layers and counted for the model's 30."""
  import dataclasses
  import functools
  import jax
  import jax.numpy as jnp
  import jaxpaged as jp
  from jaxpaged.models import llama, parallel
  smollm2 = llama.LlamaConfig(vocab_size=49152, hidden=576, num_layers=30, num_heads=9,
                              num_kv_heads=3, ffn=1536)
  config = dataclasses.replace(smollm2, num_layers=2)
  rows = []
  for data, model in ((1, 3), (2, 3)):
    mesh = jp.make_mesh(data, model)
    spec = config.cache_spec(num_pages=PER_SHARD_BATCH * (context // 16 + 1),
                             max_seqs=PER_SHARD_BATCH, max_seq_len=context + 16)
    params = parallel.shard_params(llama.random_params(config), config, mesh)
    cache = jp.init_sharded_cache(spec, mesh)
    ids = jnp.tile(jnp.arange(PER_SHARD_BATCH, dtype=jnp.int32), (data, 1))
    step = jax.jit(functools.partial(parallel.forward, config=config, decode=True))
    found = jp.collectives(step.lower(params, cache, jnp.zeros_like(ids), ids,
                                      jnp.ones_like(ids)).compile())
    per_step = sum(c.bytes * (smollm2.num_layers if c.in_loop else 1) for c in found)
    kv = (smollm2.num_layers * 2 * (smollm2.num_kv_heads // model) * smollm2.head_dim * 4
          * context * PER_SHARD_BATCH)
    label = (f"SmolLM2-135M TP decode step, mesh data={data} model={model}, "
             f"B={PER_SHARD_BATCH}/shard")
    rows.append(dict(name=f"{label}: collective bytes per device", value=per_step, unit="B",
                     target="the model's 2 all-reduces a layer, [B, 576] f32"))
    rows.append(dict(name=f"{label}: ... / K/V bytes read at {context} tokens", unit="ratio",
                     value=per_step / kv))
    rows.append(dict(name=f"{label}: collectives other than all-reduce, or on K/V",
                     value=sum(c.op != "all-reduce" or any(len(s) >= 4 for _, s in c.shapes)
                               for c in found), unit="count", target="0",
                     passed=all(c.op == "all-reduce" and all(len(s) < 4 for _, s in c.shapes)
                                for c in found)))
  return rows


def run(quick: bool = False) -> list[Row]:
  return harness.on_host_devices("benchmarks.bench_mesh", _child, "mesh", quick)


if __name__ == "__main__":
  harness.child_main(_child, run)
