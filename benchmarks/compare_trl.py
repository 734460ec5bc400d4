"""pofx against the TRL baseline, side by side: three ratios of pairs per second, per workload.

    python benchmarks/compare_trl.py [--workload {fixed,variable,both}] [--reps 3] [--steps 30]
        [--pofx_candidates "--kernels xla;--kernels cpu"]
        [--trl_candidates "retained GLIBC_TUNABLES=glibc.malloc.hugetlb=1"]
        [--only default,same_allocator,best] [--json PATH] [--markdown PATH]

Every run is a separate process of `trl_dpo_baseline.py` (TRL 1.16's DPOTrainer, unchanged) or
`dpo_step.py` (pofx) on the same model and data. Each repetition runs every setting once, the
order reversed on every other repetition so that both sides see the same machine conditions;
the figures are medians over the repetitions. The three comparisons:

1. **default vs default**: each side's documented command unchanged, nothing set in the
   environment (glibc's `MALLOC_*` variables and `GLIBC_TUNABLES` are removed from it): TRL's
   `trl_dpo_baseline.py --workload W --precompute`, pofx's `dpo_step.py --workload W` (which
   includes pofx's start-up hook, `pofx_backends.startup()`, and `--kernels auto`).
2. **same allocator setting**: both commands started through `retained_memory.py` (glibc keeps
   freed memory: one arena, no `mmap` for large blocks, no trimming); pofx's own hook then
   changes nothing.
3. **each side at its best**: the fastest median of every setting measured for that side: the
   two above and the candidates (`--pofx_candidates`, `--trl_candidates`: `;`-separated, each
   `[retained] [NAME=value ...] [options ...]`: started through `retained_memory.py` or not,
   environment variables, options added to the side's default command).

Also reported: pofx's default as a fraction of pofx's best (the project asks >= 0.9), each
side's median peak RSS, pofx's minor page faults and system CPU time per timed step (from
`dpo_step.py`), and both sides' per step over the whole process (`getrusage` of the child, start-up
and compilation included). Prints each run as it ends, then a markdown table for
`docs/benchmarks.md` (with the date, commit and CPU model) and writes it and the JSON on request.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRL = os.path.join(HERE, "trl_dpo_baseline.py")
POFX = os.path.join(HERE, "dpo_step.py")
RETAINED = os.path.join(HERE, "retained_memory.py")
# Environment variables that change glibc's allocator: removed, so "default" means default.
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES",)
ALLOCATOR_PREFIXES = ("MALLOC_",)


def clean_environment() -> dict:
  return {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES and not k.startswith(ALLOCATOR_PREFIXES)}


class Setting:
  """One side's command: `label`, started through `retained_memory.py` or not, extra environment."""

  def __init__(self, side: str, label: str, workload: str, steps: int, *, retained=False, env=None, options=()):
    self.side, self.label, self.retained = side, label, retained
    self.env = dict(env or {})
    script = TRL if side == "trl" else POFX
    base = ["--workload", workload, "--steps", str(steps)] + (["--precompute"] if side == "trl" else [])
    self.argv = [sys.executable] + ([RETAINED] if retained else []) + [script] + base + list(options)

  @classmethod
  def parse(cls, side, spec, workload, steps):
    """`[retained] [NAME=value ...] [options ...]` (see the module docstring)."""
    words = shlex.split(spec)
    retained = bool(words) and words[0] == "retained"
    words = words[1:] if retained else words
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
      name, value = words.pop(0).split("=", 1)
      env[name] = value
    return cls(side, spec.strip(), workload, steps, retained=retained, env=env, options=words)

  def command(self) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
    argv = [os.path.relpath(x, ROOT) if x.startswith(ROOT) else x for x in self.argv[1:]]
    return " ".join(([env] if env else []) + ["python"] + argv)


def run(setting: Setting) -> dict:
  """Runs one setting; its JSON result, plus the child's whole-process page faults and system time."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  flag = "--out" if setting.side == "trl" else "--json"
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  proc = subprocess.run(
    setting.argv + [flag, out],
    env={**clean_environment(), **setting.env},
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    check=False,
  )
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    return {"error": proc.stderr[-2000:]}
  with open(out) as f:
    result = json.load(f)
  os.unlink(out)
  steps = result.get("steps") or 1
  result["process_minor_page_faults_per_step"] = round((after.ru_minflt - before.ru_minflt) / steps)
  result["process_system_cpu_s_per_step"] = round((after.ru_stime - before.ru_stime) / steps, 4)
  return result


def settings_of(a, workload):
  trl = [Setting("trl", "default", workload, a.steps), Setting("trl", "retained", workload, a.steps, retained=True)]
  pofx = [Setting("pofx", "default", workload, a.steps), Setting("pofx", "retained", workload, a.steps, retained=True)]
  if "best" in a.only:
    trl += [Setting.parse("trl", s, workload, a.steps) for s in a.trl_candidates.split(";") if s.strip()]
    pofx += [Setting.parse("pofx", s, workload, a.steps) for s in a.pofx_candidates.split(";") if s.strip()]
  if "same_allocator" not in a.only and "best" not in a.only:
    trl, pofx = trl[:1], pofx[:1]
  return trl + pofx


def median_of(runs, key):
  values = [r[key] for r in runs if "error" not in r and r.get(key) is not None]
  return statistics.median(values) if values else None


def summarize(workload, settings, runs, only):
  """The comparisons `only` of one workload from `runs[(side, label)]` (default vs default always)."""
  med = {k: median_of(v, "pairs_per_s") for k, v in runs.items()}

  def entry(side, label):
    rs = [r for r in runs[(side, label)] if "error" not in r]
    return {
      "label": label,
      "command": next(s.command() for s in settings if (s.side, s.label) == (side, label)),
      "median_pairs_per_s": med[(side, label)],
      "runs_pairs_per_s": [r["pairs_per_s"] for r in rs],
      "median_maxrss_MiB": median_of(rs, "maxrss_MiB"),
      "runs_maxrss_MiB": [r["maxrss_MiB"] for r in rs],
      "minor_page_faults_per_step": median_of(rs, "minor_page_faults_per_step"),
      "system_cpu_s_per_step": median_of(rs, "system_cpu_s_per_step"),
      "process_minor_page_faults_per_step": median_of(rs, "process_minor_page_faults_per_step"),
      "process_system_cpu_s_per_step": median_of(rs, "process_system_cpu_s_per_step"),
      "kernels": sorted({r.get("kernels") for r in rs if r.get("kernels")}),
      "fraction_of_matmul_peak": median_of(rs, "fraction_of_matmul_peak"),
      "errors": [r["error"][-300:] for r in runs[(side, label)] if "error" in r],
    }

  def best(side):
    measured = [(m, label) for (s, label), m in med.items() if s == side and m is not None]
    return max(measured)[1] if measured else None

  comparisons = {}
  for name, (trl_label, pofx_label) in {
    "default": ("default", "default"),
    "same_allocator": ("retained", "retained"),
    "best": (best("trl"), best("pofx")),
  }.items():
    if ("trl", trl_label) not in runs or ("pofx", pofx_label) not in runs or (name != "default" and name not in only):
      continue
    t, p = entry("trl", trl_label), entry("pofx", pofx_label)
    ratio = (
      p["median_pairs_per_s"] / t["median_pairs_per_s"] if t["median_pairs_per_s"] and p["median_pairs_per_s"] else None
    )
    comparisons[name] = {"trl": t, "pofx": p, "ratio_pofx_over_trl": None if ratio is None else round(ratio, 3)}
  out = {"workload": workload, "comparisons": comparisons}
  pofx_best = best("pofx")
  if "best" in only and pofx_best and med.get(("pofx", "default")):
    out["pofx_default_over_best"] = round(med[("pofx", "default")] / med[("pofx", pofx_best)], 3)
  return out


COMPARISONS = ("default", "same_allocator", "best")


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass

  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      return ""

  dirty = git("status", "--porcelain", "--untracked-files=no", "--", "pofx", "pofx_backends", "benchmarks")
  return {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    "commit": git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else ""),
    "cpu": cpu,
    "cores": os.cpu_count(),
  }


def fmt(x, digits=2):
  return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(summary) -> str:
  m = summary["machine"]
  lines = [
    f"Measured {m['date']} at commit {m['commit']} on {m['cpu']} ({m['cores']} cores): "
    f"{summary['reps']} repetition{'s' if summary['reps'] != 1 else ''} of {summary['steps']} steps per setting "
    "(the first 5 excluded), "
    "medians (runs in brackets).",
    "",
    "| workload | comparison | TRL (setting) | TRL pairs/s | pofx (setting) | pofx pairs/s | pofx / TRL | "
    "TRL peak RSS MiB | pofx peak RSS MiB |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  names = {"default": "1. default vs default", "same_allocator": "2. same allocator", "best": "3. each at its best"}
  for w in summary["workloads"]:
    for name, c in w["comparisons"].items():
      t, p = c["trl"], c["pofx"]
      runs = lambda e: ", ".join(f"{x:.2f}" for x in e["runs_pairs_per_s"])
      lines.append(
        f"| {w['workload']} | {names[name]} | {t['label']} | {fmt(t['median_pairs_per_s'])} ({runs(t)}) | "
        f"{p['label']}{' (' + ', '.join(p['kernels']) + ')' if p['kernels'] else ''} | "
        f"{fmt(p['median_pairs_per_s'])} ({runs(p)}) | **{fmt(c['ratio_pofx_over_trl'])}** | "
        f"{fmt(t['median_maxrss_MiB'], 0)} | {fmt(p['median_maxrss_MiB'], 0)} |"
      )
  lines += [
    "",
    "| workload | pofx default / pofx best | pofx setting | pofx faults / timed step | "
    "pofx system s / timed step | fraction of matmul peak | TRL faults / step (whole process) | "
    "TRL system s / step (whole process) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for w in summary["workloads"]:
    c = w["comparisons"]
    for name in ("default", "same_allocator"):
      if name not in c:
        continue
      p, t = c[name]["pofx"], c[name]["trl"]
      lines.append(
        f"| {w['workload']} | {fmt(w.get('pofx_default_over_best'), 3) if name == 'default' else ''} | "
        f"{p['label']} | {fmt(p['minor_page_faults_per_step'], 0)} | {fmt(p['system_cpu_s_per_step'], 3)} | "
        f"{fmt(p['fraction_of_matmul_peak'], 3)} | {fmt(t['process_minor_page_faults_per_step'], 0)} | "
        f"{fmt(t['process_system_cpu_s_per_step'], 3)} |"
      )
  lines += ["", "Commands (from the repository root; each side's default is its documented command):", ""]
  seen = set()
  for w in summary["workloads"]:
    for c in w["comparisons"].values():
      for side in ("trl", "pofx"):
        cmd = c[side]["command"]
        if cmd not in seen:
          seen.add(cmd)
          lines.append(f"    {cmd}")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workload", choices=["fixed", "variable", "both"], default="both")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument(
    "--pofx_candidates",
    default="--kernels xla;--kernels cpu",
    help="';'-separated pofx settings for the best-setting comparison: [retained] [NAME=value ...] "
    "[dpo_step.py options]",
  )
  ap.add_argument(
    "--trl_candidates",
    default="retained GLIBC_TUNABLES=glibc.malloc.hugetlb=1",
    help="';'-separated TRL settings for the best-setting comparison (same form)",
  )
  ap.add_argument(
    "--only",
    default="default,same_allocator,best",
    help="comma-separated comparisons to run: default, same_allocator, best",
  )
  ap.add_argument("--json", default=None)
  ap.add_argument("--markdown", default=None)
  a = ap.parse_args(argv)
  a.only = [x.strip() for x in a.only.split(",") if x.strip()]
  unknown = set(a.only) - set(COMPARISONS)
  if unknown:
    ap.error(f"--only: unknown comparisons {sorted(unknown)}; allowed: {list(COMPARISONS)}.")
  workloads = ["fixed", "variable"] if a.workload == "both" else [a.workload]
  summary = {"machine": machine(), "reps": a.reps, "steps": a.steps, "workloads": []}
  for workload in workloads:
    settings = settings_of(a, workload)
    runs = {(s.side, s.label): [] for s in settings}
    for rep in range(a.reps):
      for s in settings if rep % 2 == 0 else settings[::-1]:
        r = run(s)
        runs[(s.side, s.label)].append(r)
        if "error" in r:
          print(f"{workload} rep {rep} {s.side:4s} {s.label}: FAILED\n{r['error'][-1000:]}", flush=True)
          continue
        extra = f"  kernels {r['kernels']}" if s.side == "pofx" else ""
        print(
          f"{workload} rep {rep} {s.side:4s} {s.label:45s} pairs/s {r['pairs_per_s']:8.3f}  "
          f"maxrss {r['maxrss_MiB']:.0f} MiB{extra}",
          flush=True,
        )
    w = summarize(workload, settings, runs, a.only)
    w["runs"] = {f"{side}/{label}": rs for (side, label), rs in runs.items()}
    summary["workloads"].append(w)
    print(json.dumps({k: v for k, v in w.items() if k != "runs"}, indent=1), flush=True)
  table = markdown(summary)
  print(table)
  for w in summary["workloads"]:
    c = w["comparisons"].get("default")
    if c and c["ratio_pofx_over_trl"] is not None:
      print(
        f"{w['workload']}: default vs default {c['ratio_pofx_over_trl']:.2f}x "
        f"({'meets' if c['ratio_pofx_over_trl'] >= 2.0 else 'BELOW'} the 2.0x target); pofx default / best "
        f"{fmt(w.get('pofx_default_over_best'), 3)} "
        f"({'meets' if (w.get('pofx_default_over_best') or 0) >= 0.9 else 'BELOW'} the 0.9 target)"
      )
  if a.json:
    with open(a.json, "w") as f:
      json.dump(summary, f, indent=1)
  if a.markdown:
    with open(a.markdown, "w") as f:
      f.write(table)
  return summary


if __name__ == "__main__":
  main()
