"""A program for tests/test_distributed.py: joins the run through `experiments.distributed.initialize()`
(the test sets a cluster's variables, e.g. SLURM's) and sums one value per device over all devices
of all processes with `psum` under `shard_map`. Prints one JSON line per process.

Device d of the global mesh holds 10**d, so the sum tells which devices took part (1111 for 4).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from experiments import distributed  # noqa: E402


def main():
  how = distributed.initialize()
  mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("d"))
  # This process's devices' positions on the mesh, and their values 10**position.
  mine = sorted(i for i, dev in enumerate(mesh.devices.flat) if dev.process_index == jax.process_index())
  local = np.asarray([10.0**i for i in mine], np.float32)
  x = jax.make_array_from_process_local_data(sharding, local, (jax.device_count(),))
  total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P()))(x)
  print(
    json.dumps(
      {
        "how": how,
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local": jax.local_device_count(),
        "mine": mine,
        "sum": float(np.asarray(total.addressable_data(0))[0]),
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()
