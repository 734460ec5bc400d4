"""A program for `experiments/launch_local.py` (used by tests/test_launch_local.py).

train   every process runs a few steps of the tiny Llama on one device (the whole batch) and
        then on the global mesh of all processes' devices, feeding only its own device blocks
        of the global batch (mode "jit" with FSDP on data x fsdp, and mode "shard_map" on
        data); prints one JSON line per process with the largest difference; exits 1 on a
        difference above 1e-5.
die     process 1 exits with status 3 right after initialisation; the others wait in a
        collective for it (the launcher must stop them).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import distributed  # noqa: E402  (imports jax: the launcher has set XLA_FLAGS)
from pofx import parallel  # noqa: E402

STEPS = 3
PAIRS_PER_BLOCK = 2


def _err(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) / (1 + np.abs(y))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def train_check():
  from pofx import batching, models, perturbations, policy, references, train

  assert jax.process_count() == int(os.environ["POFX_NUM_PROCESSES"]), jax.process_count()
  n_blocks = jax.device_count()
  model = models.make(models.preset("tiny", num_layers=1))  # one block: every sharding rule's leaves, less to compile
  logps_fn = policy.make_logps_fn(model.apply, model.head, chunk_size=64)
  params = model.init(jax.random.key(0))
  ref = references.frozen(model.init(jax.random.key(1)), logps_fn)
  opt = optax.sgd(1.0, momentum=0.9)
  # The global data, the same on every process (a real loader would read only its rows).
  rng = np.random.default_rng(0)
  V = model.config.vocab_size
  pairs = [
    (
      rng.integers(1, V, rng.integers(2, 6)),
      rng.integers(1, V, rng.integers(1, 6)),
      rng.integers(1, V, rng.integers(1, 6)),
    )
    for _ in range(n_blocks * PAIRS_PER_BLOCK)
  ]
  buckets = dict(seq_bucket=16, completion_bucket=8)

  def block(d):
    chunk = pairs[d * PAIRS_PER_BLOCK : (d + 1) * PAIRS_PER_BLOCK]
    return batching.fused([p for p, _, _ in chunk], [c for _, c, _ in chunk], [r for _, _, r in chunk], **buckets)

  def fresh_state():
    return train.init_state(jax.tree.map(jnp.array, params), opt, ref, perturbations.none(), rng=jax.random.key(3))

  # Single device (this process's first device), all pairs in one batch.
  whole = {
    "pairs": batching.fused([p for p, _, _ in pairs], [c for _, c, _ in pairs], [r for _, _, r in pairs], **buckets)
  }
  step = train.make_train_step(logps_fn, opt, reference=ref, donate=False)
  state = fresh_state()
  for i in range(STEPS):
    state, metrics = step(state, whole, jax.random.fold_in(jax.random.key(7), i))
  base = (parallel.to_host(state.params), parallel.to_host(metrics))

  report = {"process": jax.process_index(), "devices": jax.device_count(), "local": jax.local_device_count()}
  for mode, mesh in (("jit", parallel.make_mesh(data=-1, fsdp=2)), ("shard_map", parallel.make_mesh())):
    mine = parallel.process_rows(mesh, n_blocks)  # the device blocks this process feeds
    assert np.all(np.diff(mine) == 1), mine
    if mode == "jit":
      local = {"pairs": parallel.concat_pair_batches([block(d) for d in mine], start=int(mine[0]))}
    else:
      local = parallel.stack_per_device([{"pairs": block(d)} for d in mine])
    pstep = parallel.make_train_step(logps_fn, opt, mode=mode, mesh=mesh, min_fsdp_size=1, reference=ref)
    state = pstep.put_state(fresh_state())
    batch = parallel.put_process_batch(local, mesh)
    for i in range(STEPS):
      state, metrics = pstep(state, batch, jax.random.fold_in(jax.random.key(7), i))
    out = (parallel.to_host(state.params), parallel.to_host(metrics))
    report[mode] = _err(out, base)
    if mode == "jit":
      report["fsdp_sharded"] = int(sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params)))
  report["moved"] = max(
    float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(base[0]), jax.tree.leaves(parallel.to_host(params)))
  )
  print(json.dumps(report), flush=True)
  ok = report["jit"] <= 1e-5 and report["shard_map"] <= 1e-5 and report["moved"] > 1e-2
  return 0 if ok else 1


def die_check():
  if jax.process_index() == 1:
    print("process 1: exiting with status 3", flush=True)
    os._exit(3)
  mesh = parallel.make_mesh()
  x = parallel.put_process_batch({"x": np.ones((jax.local_device_count(),), np.float32)}, mesh)["x"]
  print("process 0: entering a collective", flush=True)
  total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(x)
  print("process 0: collective returned", float(total), flush=True)  # not expected
  return 0


if __name__ == "__main__":
  assert distributed.initialize() == "local"
  sys.exit({"train": train_check, "die": die_check}[sys.argv[1]]())
