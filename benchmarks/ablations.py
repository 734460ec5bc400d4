"""What each design choice contributes, and what each strategy costs, in one process.

    python benchmarks/ablations.py --workload {fixed,variable} [--rounds 3] [--steps 10]
        [--only NAME,NAME] [--host_memory {default,retain}] [--json PATH]

Builds several pofx step variants on the TRL baseline's model and data (`dpo_step.Bench`),
compiles them all, then times them round-robin: each round runs `--steps` steps of every variant
in turn, so all variants see the same machine conditions. Reports per variant the median
sec/step over rounds and its ratio to the reference variant: pofx's best setting for the
workload (`BASE`: cached reference, block-sparse attention, compact scored tokens, chunked
log-probs; prompt-shared rows for `fixed`, all pairs packed in one row of bucketed length for
`variable`), no perturbation:

  contributions (each variant undoes one choice): dense attention, every padded completion slot
  scored, the other row layouts (prompt-shared rows, packed rows of 1024, one packed row), the
  fused layout (no prompt sharing), naive [R, L, V] log-softmax, LM-head chunks of 1024 tokens
  instead of one chunk of up to 4096 (variable: the chunks' logits are recomputed in the backward);
  strategy costs: frozen reference (a reference forward per step), multi (K = 2, cached), SAM, AWP.

`--host_memory retain` applies `pofx.host_memory.retain_freed_memory()` to the whole process;
freed memory then stays in the process, so with many variants of the variable workload (each
compiling about ten shapes) the process can run out of memory: use it for a few variants.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dpo_step  # noqa: E402

BASE = {
    "fixed": [],
    "variable": ["--layout", "packed", "--row_length", "0", "--completion_bucket", "256", "--per_doubling", "4"],
}
VARIANTS = {
    "cached (baseline)": [],
    "dense attention": ["--attention", "dense"],
    "all completion slots": ["--scored", "slots"],
    "prompt-shared rows": ["--layout", "prompt_shared", "--completion_bucket", "64"],
    "packed rows of 1024": ["--layout", "packed", "--row_length", "1024"],
    "packed one row": ["--layout", "packed", "--row_length", "0"],
    "fused layout": ["--layout", "fused", "--completion_bucket", "64"],
    "naive log-softmax": ["--logprobs", "naive"],
    "head chunks of 1024": ["--chunk_size", "1024"],
    "frozen reference": ["--reference", "frozen"],
    "multi (K=2, cached)": ["--reference", "multi"],
    "SAM": ["--perturbation", "sam"],
    "AWP": ["--perturbation", "awp"],
}
# Variants that are the baseline itself (or compute the same thing) on a workload.
SKIP = {"fixed": {"prompt-shared rows", "head chunks of 1024"}, "variable": {"packed one row"}}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workload", choices=["fixed", "variable"], default="fixed")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
  ap.add_argument("--host_memory", choices=["default", "retain"], default="default",
                  help="as dpo_step.py --host_memory, for every variant")
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  if a.host_memory == "retain":
    dpo_step.host_memory.retain_freed_memory()
  names = [n for n in VARIANTS if (not a.only or n in a.only.split(",")) and n not in SKIP[a.workload]]
  if "cached (baseline)" not in names:
    names.insert(0, "cached (baseline)")
  total_steps = a.rounds * a.steps
  benches = {}
  for n in names:
    args = dpo_step.parser().parse_args(["--workload", a.workload, "--steps", str(total_steps)] + BASE[a.workload]
                                        + VARIANTS[n])
    benches[n] = dpo_step.Bench(args)
    print(f"built {n}: {len(benches[n].flops_by_shape)} shapes, compile {benches[n].t_compile:.1f}s", flush=True)
  per_round = {n: [] for n in names}
  for r in range(a.rounds):
    order = names if r % 2 == 0 else names[::-1]
    for n in order:
      durations, _ = benches[n].run(r * a.steps, a.steps)
      per_round[n].append(float(durations.sum() / len(durations)))
    print(f"round {r}: " + ", ".join(f"{n} {per_round[n][-1]:.3f}s" for n in names), flush=True)
  base = statistics.median(per_round["cached (baseline)"])
  rows = []
  for n in names:
    med = statistics.median(per_round[n])
    rows.append({"variant": n, "median_sec_per_step": round(med, 4), "ratio_to_cached": round(med / base, 3),
                 "pairs_per_s": round(benches[n].a.bs / med, 3),
                 "step_gflops": round(sum(benches[n].flops_by_shape.values()) / len(benches[n].flops_by_shape) / 1e9, 2),
                 "distinct_shapes": len(benches[n].flops_by_shape)})
  print(f"\nworkload={a.workload}, {a.rounds} rounds x {a.steps} steps, medians over rounds")
  print(f"{'variant':22s} {'sec/step':>9s} {'x cached':>9s} {'pairs/s':>8s} {'GFLOP/step':>11s} {'shapes':>6s}")
  for r in rows:
    print(f"{r['variant']:22s} {r['median_sec_per_step']:9.4f} {r['ratio_to_cached']:9.3f} {r['pairs_per_s']:8.2f} "
          f"{r['step_gflops']:11.2f} {r['distinct_shapes']:6d}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"workload": a.workload, "rounds": a.rounds, "steps": a.steps, "rows": rows,
                 "per_round": per_round}, f, indent=1)


if __name__ == "__main__":
  main()
