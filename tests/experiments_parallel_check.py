"""Run by tests/test_experiments.py in a subprocess with 4 simulated CPU devices: the training
program's stages in parallel modes against the single-device run. Prints one JSON line."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from configs import dpo  # noqa: E402
from experiments import main as main_lib  # noqa: E402


def final(work):
  return ocp.StandardCheckpointer().restore(os.path.join(work, "final_params"))


def main(root, seed_dir):
  results = {}
  # (mode, mesh, accumulated micro-batches, fast: block-sparse attention + compact scored tokens).
  # The fast runs use rows of 2 blocks of 16 tokens (prompt <= 8, completions <= 12 tokens), so
  # their block lists hold cross-block pairs, and are compared with the dense "single" run.
  runs = {"single": ("single", "", 1, False), "jit_2x2": ("jit", "2x2", 1, False),
          "shard_map_4": ("shard_map", "4", 1, False), "pmap_4": ("pmap", "4", 1, False),
          "single_accum2": ("single", "", 2, False), "single_fast": ("single", "", 1, True),
          "jit_2x2_fast": ("jit", "2x2", 1, True), "shard_map_4_fast": ("shard_map", "4", 1, True),
          "pmap_4_fast": ("pmap", "4", 1, True), "single_accum2_fast": ("single", "", 2, True)}
  for name, (mode, mesh, accum, fast) in runs.items():
    c = dpo.get_config("tiny")
    with c.unlocked():
      c.train.parallel.mode, c.train.parallel.mesh = mode, mesh
      c.train.grad_accum_steps = accum
      if fast:
        c.data.attention, c.data.attention_block_size, c.data.seq_bucket = "block_sparse", 16, 32
        c.data.scored = "compact"
      c.train.optimizer.name, c.train.optimizer.grad_clip = "sgd", 0.0  # a wrong gradient scale shows in SGD
      c.train.optimizer.learning_rate = 0.5
      c.model.kernels = "xla"  # one kernel backend for every mode (the CPU kernels run on one device)
    work = os.path.join(root, name)
    os.makedirs(work, exist_ok=True)
    for stage in ("sft_params", "data"):
      os.symlink(os.path.join(seed_dir, stage), os.path.join(work, stage))
    main_lib.run_one(c, work, progress=False)
    results[name] = final(work)
  base = results["single"]
  out = {}
  for name, params in results.items():
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), params, base))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), params,
                                         ocp.StandardCheckpointer().restore(os.path.join(seed_dir, "sft_params"))))
    out[name] = {"max_abs_diff": max(diffs), "moved": max(moved)}
  print(json.dumps({"devices": jax.device_count(), "runs": out}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
