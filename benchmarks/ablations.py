"""What each design choice contributes, and what each strategy costs, timed round-robin.

    python benchmarks/ablations.py --workload {fixed,variable} [--rounds 3] [--steps 10]
        [--only NAME,NAME] [--group_size K] [--kernels {xla,cpu}] [--no_startup] [--base_args "ARGS"]
        [--json PATH]

Builds several pofx step variants on the TRL baseline's model and data (`dpo_step.Bench`),
compiles them, runs one untimed step of each, then times them round-robin: each round runs
`--steps` steps of every variant in turn, so all variants see the same machine conditions. Reports per variant the median
sec/step over rounds and its ratio to the reference variant: pofx's best setting for the
workload (`dpo_step.py`'s defaults: cached reference, block-sparse attention, compact scored
tokens, chunked log-probs; prompt-shared rows for `fixed`, all pairs packed in one row of
bucketed length for `variable`), no perturbation, with `--kernels` (default `xla`):

  contributions (each variant undoes one choice): dense attention, every padded completion slot
  scored, the other row layouts (prompt-shared rows, packed rows of 1024, one packed row), the
  fused layout (no prompt sharing), naive [R, L, V] log-softmax, LM-head chunks of 1024 tokens
  instead of one chunk of up to 4096 (variable: the chunks' logits are recomputed in the backward);
  strategy costs: frozen reference (a reference forward per step), multi (K = 2, cached), SAM, AWP,
  RWP (10 proxy ascents: about 11 forward-backward passes);
  additions (each adds one choice of the CPU backend, `--kernels cpu`): its fused attention
  kernels ("native attention": `--products xla`), the weight gradients by numpy's OpenBLAS
  (`--products blas --blas openblas --cpu_attention off`), both, and with the native attention:
  every product by OpenBLAS, the weight gradients by Intel MKL, every product by MKL
  (`--products blas_all --blas mkl`; the variants naming MKL need the `mkl` package).

`--group_size K` runs the variants K at a time, each group in its own process beside its own
copy of the reference variant (ratios are taken inside each process); the reference row reports
the median over the groups. One process holding every compiled variable-workload variant (each
about ten shapes) runs out of memory in LLVM, so the variable workload defaults to groups of 4;
`--group_size 0` keeps everything in one process (the default for the fixed workload).

Every process first calls `pofx_backends.startup()` (freed memory stays in the process on the
CPU), as `dpo_step.py` does; `--no_startup` skips it. `--base_args` adds `dpo_step.py` options to
every variant (before the variant's own), e.g. `--base_args "--kernels cpu"` for the strategy
costs with the CPU backend.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dpo_step  # noqa: E402

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
  "multi K=2 (cached)": ["--reference", "multi"],
  "SAM": ["--perturbation", "sam"],
  "AWP": ["--perturbation", "awp"],
  "RWP (10 proxy steps)": ["--perturbation", "rwp"],
  "native attention": ["--kernels", "cpu", "--products", "xla"],
  "OpenBLAS weight gradients": [
    "--kernels",
    "cpu",
    "--products",
    "blas",
    "--blas",
    "openblas",
    "--cpu_attention",
    "off",
  ],
  "native attention + OpenBLAS weight gradients": ["--kernels", "cpu", "--products", "blas", "--blas", "openblas"],
  "native attention + OpenBLAS every product": ["--kernels", "cpu", "--products", "blas_all", "--blas", "openblas"],
  "native attention + MKL weight gradients": ["--kernels", "cpu", "--products", "blas", "--blas", "mkl"],
  "native attention + MKL every product": ["--kernels", "cpu", "--products", "blas_all", "--blas", "mkl"],
}
REFERENCE = "cached (baseline)"
assert not any("," in n for n in VARIANTS), "variant names travel comma-separated (--only)"
# Variants that are the baseline itself (or compute the same thing) on a workload.
SKIP = {"fixed": {"prompt-shared rows", "head chunks of 1024"}, "variable": {"packed one row"}}


def parser():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workload", choices=["fixed", "variable"], default="fixed")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
  ap.add_argument(
    "--group_size",
    type=int,
    default=None,
    help="variants per process (0: all in one process; default 0 for fixed, 4 for variable)",
  )
  ap.add_argument(
    "--kernels",
    choices=["xla", "cpu"],
    default="xla",
    help="the kernel backend of every variant that does not name its own",
  )
  ap.add_argument("--no_startup", action="store_true", help="as dpo_step.py --no_startup, for every process")
  ap.add_argument(
    "--base_args", default="", help="dpo_step.py options added to every variant (before the variant's own)"
  )
  ap.add_argument("--json", default=None)
  return ap


def run_group(a, names):
  """Builds `names` (the reference first) in this process and times them round-robin.
  Returns (rows, per_round): rows with ratios to this process's reference variant."""
  if not a.no_startup:
    dpo_step.pofx_backends.startup()
  total_steps = a.rounds * a.steps
  benches = {}
  for n in names:
    args = dpo_step.parse(
      ["--workload", a.workload, "--steps", str(total_steps), "--warmup", "0", "--kernels", a.kernels]
      + shlex.split(a.base_args)
      + VARIANTS[n]
    )
    benches[n] = dpo_step.Bench(args)
    kernels, _, _ = dpo_step.resolve_kernels(args)
    benches[n].precompute(kernels)
    benches[n].compile(kernels)
    print(f"built {n}: {len(benches[n].flops_by_shape)} shapes, compile {benches[n].t_compile:.1f}s", flush=True)
  for n in names:  # warm-up, untimed: a first execution pays one-off costs (allocations, page faults)
    benches[n].run(0, 1)
  per_round = {n: [] for n in names}
  for r in range(a.rounds):
    order = names if r % 2 == 0 else names[::-1]
    for n in order:
      durations, _ = benches[n].run(r * a.steps, a.steps)
      per_round[n].append(float(durations.sum() / len(durations)))
    print(f"round {r}: " + ", ".join(f"{n} {per_round[n][-1]:.3f}s" for n in names), flush=True)
  base = statistics.median(per_round[REFERENCE])
  rows = []
  for n in names:
    med = statistics.median(per_round[n])
    rows.append(
      {
        "variant": n,
        "median_sec_per_step": round(med, 4),
        "ratio_to_cached": round(med / base, 3),
        "pairs_per_s": round(benches[n].a.bs / med, 3),
        "step_gflops": round(sum(benches[n].flops_by_shape.values()) / len(benches[n].flops_by_shape) / 1e9, 2),
        "distinct_shapes": len(benches[n].flops_by_shape),
      }
    )
  return rows, per_round


def run_groups(a, variants, size):
  """Each group of `size` variants in a child process (this script with `--only`), beside its own
  reference variant; the reference row is the median over the groups."""
  rows, per_round, refs = [], {}, []
  groups = [variants[i : i + size] for i in range(0, len(variants), size)] or [[]]
  for g, group in enumerate(groups):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
      out = f.name
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--workload",
      a.workload,
      "--rounds",
      str(a.rounds),
      "--steps",
      str(a.steps),
      "--group_size",
      "0",
      "--kernels",
      a.kernels,
      "--base_args",
      a.base_args,
      "--json",
      out,
      "--only",
      ",".join([REFERENCE] + group),
    ] + (["--no_startup"] if a.no_startup else [])
    print(f"group {g + 1}/{len(groups)}: {', '.join(group) or REFERENCE}", flush=True)
    subprocess.run(cmd, check=True)
    with open(out) as f:
      res = json.load(f)
    os.unlink(out)
    for r in res["rows"]:
      r["group"] = g
      (refs if r["variant"] == REFERENCE else rows).append(r)
    per_round.update({f"{n} (group {g})" if n == REFERENCE else n: v for n, v in res["per_round"].items()})
  ref = {"variant": REFERENCE, "group": "median over groups", "ratio_to_cached": 1.0}
  for k in ("median_sec_per_step", "pairs_per_s", "step_gflops"):
    ref[k] = statistics.median(r[k] for r in refs)
  ref["distinct_shapes"] = max(r["distinct_shapes"] for r in refs)  # the same batches in every group
  return [ref] + rows, per_round


def main():
  a = parser().parse_args()
  if a.rounds < 1 or a.steps < 1 or (a.group_size is not None and a.group_size < 0):
    raise SystemExit(
      f"ablations: need --rounds >= 1, --steps >= 1, --group_size >= 0 (got {a.rounds}, {a.steps}, {a.group_size})."
    )
  unknown = [n for n in a.only.split(",") if n and n not in VARIANTS]
  if unknown:
    raise SystemExit(f"ablations: unknown variant(s) {unknown}; allowed: {list(VARIANTS)}.")
  names = [n for n in VARIANTS if (not a.only or n in a.only.split(",")) and n not in SKIP[a.workload]]
  others = [n for n in names if n != REFERENCE]
  size = a.group_size if a.group_size is not None else (4 if a.workload == "variable" else 0)
  if size == 0:
    rows, per_round = run_group(a, [REFERENCE] + others)
  else:
    rows, per_round = run_groups(a, others, size)
  print(
    f"\nworkload={a.workload}, {a.rounds} rounds x {a.steps} steps, medians over rounds"
    + (f", groups of {size} variants per process (ratios within each process)" if size else "")
  )
  print(f"{'variant':22s} {'sec/step':>9s} {'x cached':>9s} {'pairs/s':>8s} {'GFLOP/step':>11s} {'shapes':>6s}")
  for r in rows:
    print(
      f"{r['variant']:22s} {r['median_sec_per_step']:9.4f} {r['ratio_to_cached']:9.3f} {r['pairs_per_s']:8.2f} "
      f"{r['step_gflops']:11.2f} {r['distinct_shapes']:6d}"
    )
  if a.json:
    with open(a.json, "w") as f:
      json.dump(
        {
          "workload": a.workload,
          "rounds": a.rounds,
          "steps": a.steps,
          "group_size": size,
          "base_args": a.base_args,
          "rows": rows,
          "per_round": per_round,
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
