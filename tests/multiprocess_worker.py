"""One process of a two-process run of `jaxpaged.models.parallel.generate` (launched by
tests/test_parallel_model.py; on several hosts, run it once per host with that host's rank):

  python tests/multiprocess_worker.py --process-id I --num-processes 2 \\
      --coordinator HOST0:PORT --out result-I.json

Each process gets 4 CPU devices (XLA_FLAGS, set here before JAX starts) and uses gloo for the
CPU collectives between processes; `jax.distributed.initialize` joins them, and every process
builds the same global (2, 4) mesh from ``jax.devices()`` (all processes' devices). The small
random-weight model is generated twice: with the processes as the data shards (the model axis
inside each process), then with every model group spanning both processes (all-reduces cross
processes). The tokens go to ``--out`` as JSON.
"""

import argparse
import json
import os
import sys

SMALL = dict(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn=64)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [3, 3, 3, 3, 3, 3, 3], [60, 61]]
NEW_TOKENS = 6
SEED = 1
DEVICES_PER_PROCESS = 4


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--coordinator", required=True, help="HOST:PORT of process 0")
  parser.add_argument("--out", required=True, help="where to write the tokens (JSON)")
  parser.add_argument("--timeout", type=int, default=60, help="seconds to wait for the others")
  return parser


def main(argv: list[str] | None = None) -> int:
  """Joins the other processes, generates on both meshes, writes the tokens."""
  args = _parser().parse_args(argv)
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top (after XLA_FLAGS)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=args.timeout,
                             shutdown_timeout_seconds=args.timeout)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jaxpaged as jp  # pylint: disable=g-import-not-at-top
  from jaxpaged.models import llama, parallel  # pylint: disable=g-import-not-at-top

  config = llama.LlamaConfig(**SMALL)
  params = llama.random_params(config, seed=SEED)
  devices = np.asarray(jax.devices())  # process 0's devices first
  data = args.num_processes
  model = len(devices) // data
  interleaved = devices.reshape(data, model).T.reshape(-1)  # every row: all processes
  result = {"num_devices": len(devices), "process_count": jax.process_count()}
  for name, order in (("hosts_as_data", devices), ("model_across_hosts", interleaved)):
    mesh = jp.make_mesh(data, model, devices=list(order))
    out = parallel.generate(params, config, PROMPTS, mesh=mesh, max_new_tokens=NEW_TOKENS,
                            page_size=4, prefill_chunk=8)
    result[name] = out.tokens
    result[name + "_processes_per_model_group"] = len({d.process_index
                                                       for d in mesh.devices[0]})
    result[name + "_first_logits"] = out.first_logits.tolist()
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f)
  return 0


if __name__ == "__main__":
  sys.exit(main())
