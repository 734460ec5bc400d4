"""pofx vs the TRL baseline, side by side: alternate the two, repeat, report medians and the ratio.

    python benchmarks/compare_trl.py --workload {fixed,variable} [--reps 3] [--steps 30]
        [--pofx_args "--reference cached --layout prompt_shared"] [--host_memory {default,retain}]
        [--huge_pages] [--json PATH]

Each repetition runs `trl_dpo_baseline.py --precompute` (TRL at its best CPU setting: reference
log-probs precomputed, no gradient checkpointing, float32) and `dpo_step.py` (pofx, cached
reference by default) as separate processes, alternating which goes first, so both see the same
machine conditions. Prints each run, then the median pairs/s of each side, the ratio
pofx / TRL, and the median peak RSS of each side.

`--host_memory retain` starts both sides through `retained_memory.py` (glibc keeps freed memory
for reuse instead of page-faulting every step's temporaries again): the same allocator setting
on both sides, so the ratio compares the frameworks, not the allocators. `--huge_pages` also
starts both with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35 asks the kernel for
transparent huge pages for its heap with `madvise`; the kernel's THP mode must be `madvise` or
`always`): fewer TLB misses in the large products, again the same setting on both sides.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def run(cmd, env=None):
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  flag = "--out" if any("trl_dpo_baseline" in c for c in cmd) else "--json"
  subprocess.run(cmd + [flag, out], check=True, env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  with open(out) as f:
    return json.load(f)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workload", choices=["fixed", "variable"], default="fixed")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--pofx_args", default="--reference cached --layout prompt_shared")
  ap.add_argument("--host_memory", choices=["default", "retain"], default="default")
  ap.add_argument("--huge_pages", action="store_true",
                  help=f"start both sides with GLIBC_TUNABLES={HUGE_PAGES_TUNABLE} (transparent huge pages for the heap)")
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  start = [sys.executable] + ([os.path.join(HERE, "retained_memory.py")] if a.host_memory == "retain" else [])
  trl_cmd = start + [os.path.join(HERE, "trl_dpo_baseline.py"), "--workload", a.workload, "--precompute",
                     "--steps", str(a.steps)]
  pofx_cmd = start + [os.path.join(HERE, "dpo_step.py"), "--workload", a.workload, "--steps", str(a.steps)]
  pofx_cmd += shlex.split(a.pofx_args)
  env = dict(os.environ)
  if a.huge_pages:
    env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), HUGE_PAGES_TUNABLE) if x)
  rows = {"trl": [], "pofx": []}
  for rep in range(a.reps):
    order = [("trl", trl_cmd), ("pofx", pofx_cmd)] if rep % 2 == 0 else [("pofx", pofx_cmd), ("trl", trl_cmd)]
    for side, cmd in order:
      r = run(cmd, env)
      rows[side].append(r)
      print(f"rep {rep} {side:4s} pairs/s {r['pairs_per_s']:8.3f}  real tokens/s {r['real_tokens_per_s']:9.1f}  "
            f"sec/step {r['steady_sec_per_step_mean']:.4f}  maxrss {r['maxrss_MiB']:.0f} MiB", flush=True)
  med = {s: statistics.median(x["pairs_per_s"] for x in rows[s]) for s in rows}
  rss = {s: statistics.median(x["maxrss_MiB"] for x in rows[s]) for s in rows}
  summary = {"workload": a.workload, "reps": a.reps, "steps": a.steps, "pofx_args": a.pofx_args,
             "host_memory": a.host_memory, "huge_pages": a.huge_pages,
             "median_pairs_per_s": med, "ratio_pofx_over_trl": round(med["pofx"] / med["trl"], 3),
             "median_maxrss_MiB": rss, "runs": rows}
  print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
