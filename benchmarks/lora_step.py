"""LoRA DPO against full fine-tuning DPO on the same model: step time and memory.

    python benchmarks/lora_step.py [--repeats 3] [--steps 20] [--warmup 5] [--bs 8] [--rank 8]
        [--targets q_proj,k_proj,v_proj,o_proj] [--kinds full,lora] [--lora-dropout 0.1] [--json PATH]

Model: the `bench` preset (hidden 256, 4 layers, 8 heads, 4 KV heads, MLP 688, vocab 4096,
untied; 5.0 M parameters), float32 compute, AdamW lr 1e-6, DPO beta 0.1, 8 pairs per step of
random tokens with the `fixed` lengths of `dpo_step.py` (prompt 64, chosen 64, rejected 64),
prompt-shared rows.

- full: every parameter trained, the reference a frozen second copy of the model
  (`references.frozen`), AdamW moments for every parameter.
- lora: rank `--rank` adapters (alpha = 2 rank) on `--targets`, the base frozen in the state
  (`TrainState.frozen`), the reference `adapters_off` (the same base, no second copy), AdamW
  moments for the adapters only.
- lora_dropout (with `--kinds ...,lora_dropout`): lora with PEFT's `lora_dropout` at
  `--lora-dropout` (the branch form `x W0 + dropout(x) a (alpha/r) b`, one mask per step).

Each setting runs in its own child process (so its peak RSS is its own), the two alternating,
`--repeats` times, the order reversed on every other repetition. Per run: the median step time
over the timed steps (after `--warmup` steps; compile excluded), the process's peak RSS, and the
bytes of the train state (parameters, optimizer state, reference state, frozen base), which do
not depend on the machine's load. Reported: medians over the repetitions and the lora / full
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child(kind: str, args) -> dict:
  import jax
  import numpy as np
  import optax

  from pofx import batching, lora, models, perturbations, policy, references, train

  config = models.preset("bench")
  model = models.make(config)
  logps_fn = policy.make_logps_fn(model.apply, model.head)
  base = model.init(jax.random.key(0))
  opt = optax.adamw(1e-6)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(4):
    p = [rng.integers(1, config.vocab_size, 64).astype(np.int32) for _ in range(args.bs)]
    c = [rng.integers(1, config.vocab_size, 64).astype(np.int32) for _ in range(args.bs)]
    r = [rng.integers(1, config.vocab_size, 64).astype(np.int32) for _ in range(args.bs)]
    batches.append({"pairs": batching.prompt_shared(p, c, r, seq_bucket=64, completion_bucket=64)})
  kw = dict(loss="dpo", loss_hyper={"beta": 0.1})
  if kind == "full":
    ref = references.frozen(jax.tree.map(lambda x: x.copy(), base), logps_fn)
    state = train.init_state(base, opt, ref, perturbations.none())
    step = train.make_train_step(logps_fn, opt, reference=ref, **kw)
  else:
    rate = args.lora_dropout if kind == "lora_dropout" else 0.0
    spec = lora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank, targets=tuple(args.targets.split(",")), dropout=rate)
    ref = references.adapters_off(logps_fn)
    state = train.init_state(lora.init(base, spec, jax.random.key(1)), opt, ref, perturbations.none(), frozen=base)
    step = train.make_train_step(
      logps_fn,
      opt,
      reference=ref,
      combine=lambda f, a: lora.apply(f, a, spec),
      dropout_samples=1 if rate > 0 else 0,
      **kw,
    )
  del base  # the state holds its own copy
  state_bytes = int(sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")))
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, m = step(state, batches[i % len(batches)], jax.random.key(i))
    jax.block_until_ready(m["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  return {
    "kind": kind,
    "step_s": statistics.median(times),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    "state_mb": state_bytes / 2**20,
    "loss": float(m["loss"]),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--bs", type=int, default=8)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
  ap.add_argument("--kinds", default="full,lora", help="comma-separated from full, lora, lora_dropout")
  ap.add_argument("--lora-dropout", type=float, default=0.1)
  ap.add_argument("--json", default="")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(_child(args.child, args)))
    return
  kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
  if len(kinds) != 2 or not set(kinds) <= {"full", "lora", "lora_dropout"}:
    raise SystemExit(f"--kinds={args.kinds!r}; allowed: two of full, lora, lora_dropout (the second over the first).")
  runs = {k: [] for k in kinds}
  for rep in range(args.repeats):
    order = kinds if rep % 2 == 0 else kinds[::-1]
    for kind in order:
      cmd = [sys.executable, os.path.abspath(__file__), "--child", kind] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("steps", "warmup", "bs", "rank", "targets", "lora_dropout")
      ]
      out = subprocess.run(cmd, capture_output=True, text=True, check=True)
      runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(json.dumps(runs[kind][-1]), flush=True)
  med = {
    k: {f: statistics.median(r[f] for r in v) for f in ("step_s", "peak_rss_mb", "state_mb")} for k, v in runs.items()
  }
  first, second = kinds
  ratio_name = f"ratio_{second}_over_{first}"
  result = {
    "median": med,
    ratio_name: {f: med[second][f] / med[first][f] for f in ("step_s", "peak_rss_mb", "state_mb")},
    "runs": runs,
    "args": vars(args),
  }
  print(json.dumps({k: result[k] for k in ("median", ratio_name)}, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
