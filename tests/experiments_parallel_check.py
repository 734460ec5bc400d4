"""Run by tests/test_experiments.py in a subprocess with 4 simulated CPU devices: the training
program's stages in parallel modes against the single-device run. Prints one JSON line.

    python tests/experiments_parallel_check.py ROOT SEED_DIR

Every run is the program's own stages (`experiments.main`: `Run`, `stage_sft`, `stage_data`,
`stage_train`, which writes `ROOT/<run>/final_params`), sharing the seed's SFT base and data
through symlinks, in one process (JAX and the data stack are imported once). The single-device
run (`ROOT/single`) computes the reference cache; the parallel runs share it (a symlink). The
evaluation stage, which does not depend on the parallel mode, is left out; the kernel backend is
XLA in every run (the CPU kernels run on one device only), and checkpoints are written once, at
the end. `ROOT/single/final_params` is also the single-process run that tests/test_experiments.py
compares the two-process run of the program with (the same config: `config()`).
"""

import json
import os
import sys

# Cheaper XLA compilation (the check compares runs compiled alike; the steps are tiny).
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from configs import dpo  # noqa: E402
from experiments import main as main_lib  # noqa: E402

SHARED_STAGES = ("sft_params", "data")


def final(work):
  return ocp.StandardCheckpointer().restore(os.path.join(work, "final_params"))


def config(mode="single", mesh="", accum=1, fast=False):
  """configs/dpo.py:tiny with SGD (a wrong gradient scale shows in SGD), XLA kernels and one
  checkpoint at the end; `fast`: block-sparse attention and compact scored tokens."""
  c = dpo.get_config("tiny")
  with c.unlocked():
    c.train.parallel.mode, c.train.parallel.mesh = mode, mesh
    c.train.grad_accum_steps = accum
    if fast:
      c.data.attention, c.data.attention_block_size, c.data.seq_bucket = "block_sparse", 16, 32
      c.data.scored = "compact"
    c.train.optimizer.name, c.train.optimizer.grad_clip = "sgd", 0.0
    c.train.optimizer.learning_rate = 0.5
    c.train.checkpoint_every = c.train.steps
    if "kernels" in c.model:
      c.model.kernels = "xla"
  return c


def train(c, work, seed_dir, shared_reference=None):
  os.makedirs(work, exist_ok=True)
  for stage in SHARED_STAGES:
    os.symlink(os.path.join(seed_dir, stage), os.path.join(work, stage))
  if shared_reference is not None:
    os.symlink(shared_reference, os.path.join(work, "reference_cache"))
  run = main_lib.Run(c, work, progress=False)
  base = main_lib.stage_sft(run)
  prepared, _ = main_lib.stage_data(run, base)
  main_lib.stage_train(run, prepared, base)
  return final(work)


def main(root, seed_dir):
  results = {}
  # (mode, mesh, accumulated micro-batches, fast: block-sparse attention + compact scored tokens).
  # The fast runs use rows of 2 blocks of 16 tokens (prompt <= 8, completions <= 12 tokens), so
  # their block lists hold cross-block pairs, and are compared with the dense "single" run. Each
  # parallel mode runs dense; the fast layout runs under jit (block lists rebuilt on the joined
  # global batch) and under shard_map (per-device block lists, stacked): pmap takes the same
  # stacked per-device batches as shard_map (`stage_train`) and runs the same per-device step
  # (`pofx.parallel.make_train_step`), so a fast pmap run would check nothing the others do not.
  # Accumulation (2 micro-batches) rides on one dense and one fast parallel run, so every run is
  # compared with the one dense single-device run.
  runs = {
    "single": ("single", "", 1, False),
    "jit_2x2_accum2": ("jit", "2x2", 2, False),
    "shard_map_4": ("shard_map", "4", 1, False),
    "pmap_4": ("pmap", "4", 1, False),
    "jit_2x2_fast": ("jit", "2x2", 1, True),
    "shard_map_4_fast_accum2": ("shard_map", "4", 2, True),
  }
  shared_reference = os.path.join(root, "single", "reference_cache")
  for name, (mode, mesh, accum, fast) in runs.items():
    c = config(mode, mesh, accum, fast)
    results[name] = train(c, os.path.join(root, name), seed_dir, None if name == "single" else shared_reference)
  base = results["single"]
  start = ocp.StandardCheckpointer().restore(os.path.join(seed_dir, "sft_params"))
  out = {}
  for name, params in results.items():
    diffs = jax.tree.leaves(
      jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), params, base)
    )
    moved = jax.tree.leaves(
      jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), params, start)
    )
    out[name] = {"max_abs_diff": max(diffs), "moved": max(moved)}
  print(json.dumps({"devices": jax.device_count(), "runs": out}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
