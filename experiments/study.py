"""Studies: phenomena of the preference-optimisation literature, reproduced on the controlled world.

    python -m experiments.study <name>[,<name>...] --workdir=/tmp/pofx_studies [--seeds=0,1,2] [--tiny]

`<name>` is one of `STUDIES` (or `all`). A study is a config family `configs/study_<name>.py`
(a sweep of trainings on one SFT base and dataset, run by `experiments.main.run_sweep`) run once
per seed in `<workdir>/<name>/seed<k>`, and an aggregation over the seeds that writes
`<workdir>/<name>/table.csv` (one row per method, setting and seed), `table.md` (mean and standard
deviation over the seeds per method and setting, and the study's findings) and the chart
`<workdir>/<name>/<name>.png`. `--tiny` runs every stage at the `:tiny` size (the tests).

| name | what it trains | what it reports |
|---|---|---|
| likelihood | DPO, DPOP, RPO | chosen / rejected log-ratios and margin over training and at the end (Pal et al. 2024, arXiv:2402.13228) |
| length | DPO, SimPO, LD-DPO, LN-DPO, SamPO on a length-biased labeller | mean length and gold reward |
| gpo_frontier | six GPO functions x seven betas | gold reward against KL, best beta per function against f''(0)/abs(f'(0)) (Tang et al. 2024, arXiv:2402.05749) |
| ranking | DPO at three betas | ranking accuracy, the idealized one, the share of rankings changed (Chen et al. 2024, arXiv:2405.19534) |
| overopt | one DPO run, evaluated along training; best-of-n from the base | gold reward gain against sqrt(KL) with Gao et al.'s fits (arXiv:2210.10760) |
| references | DPO, Pre-DPO, MRPO, TR-DPO, SAM, AWP | held-out gold reward and sharpness |

The stages of each seed are the training program's, with its provenance rules: a rerun reuses
what was computed under the same config. Studies run in one invocation (and, across invocations,
studies under the same `--workdir`) share the SFT base, the data and the kernel-backend record of
a seed whenever their records match (symlinks), so a seed's base is trained once. The program
points JAX's persistent compilation cache at `<workdir>/.jax_cache` (unless
`JAX_COMPILATION_CACHE_DIR` is set), so later seeds load the executables of the first.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import importlib
import json
import math
import os
import shutil
import sys
import time
from typing import Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging

import pofx_backends
from configs import study_overopt, study_references, validate
from experiments import main as main_lib
from experiments import metrics as metrics_lib
from experiments import provenance
from pofx import data as data_lib
from pofx import evaluation, fingerprints, losses, policy, sampling
from pofx import world as world_lib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STUDIES = ("likelihood", "length", "gpo_frontier", "ranking", "overopt", "references")

# --workdir (here the root of the studies' workdirs, <workdir>/<name>/seed<k>) and --progress are
# the training program's flags (experiments.main).
_WORKDIR, _PROGRESS = main_lib._WORKDIR, main_lib._PROGRESS
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (replicates).")
_TINY = flags.DEFINE_bool("tiny", False, "Run every stage at the :tiny size (seconds; for tests).")


def _say(msg, *args):
  print("[study] " + (msg % args if args else msg), file=sys.stderr, flush=True)


def study_config(name: str, seed: int, tiny: bool):
  """The config of study `name` (`configs/study_<name>.py`) for one seed."""
  c = importlib.import_module(f"configs.study_{name}").get_config("tiny" if tiny else None)
  c.seed = int(seed)
  return c


# ------------------------------------------------------------------------------------------------
# Sharing a seed's SFT base, data and kernel record between studies


def share_outputs(config, workdir: str, root: str) -> List[str]:
  """Links into `workdir` the SFT base and data of another study's workdir of the same seed under
  `root` whose records match what `config` needs (complete outputs only), and copies a kernel
  record; returns what was linked. Outputs already in `workdir` are left as they are."""
  os.makedirs(workdir, exist_ok=True)
  want = {"sft_params": provenance.sft_record(config).fingerprint, "data": provenance.data_record(config).fingerprint}
  done = []
  here = os.path.realpath(workdir)
  for other in sorted(glob.glob(os.path.join(root, "*", f"seed{config.seed}"))):
    if os.path.realpath(other) == here:
      continue
    for name, fp in want.items():
      src, dst = os.path.join(other, name), os.path.join(workdir, name)
      if os.path.lexists(dst) or not os.path.exists(src):
        continue
      rec = provenance.read(src)
      complete = name != "data" or os.path.exists(os.path.join(src, "pairs_meta.json"))
      if rec is not None and rec.get("fingerprint") == fp and complete:
        os.symlink(os.path.realpath(src), dst)
        done.append(name)
    src, dst = os.path.join(other, main_lib.KERNELS_RECORD), os.path.join(workdir, main_lib.KERNELS_RECORD)
    if os.path.exists(src) and not os.path.exists(dst):
      shutil.copy(src, dst)
  return done


# ------------------------------------------------------------------------------------------------
# Tables


def _stats(values):
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate(rows: Sequence[Dict], keys: Sequence[str], metrics: Sequence[str]) -> List[Dict]:
  """Rows grouped by `keys` (first-seen order): per metric its mean and standard deviation over
  the group's rows (seeds), and `n`, the number of rows."""
  groups: Dict[tuple, List[Dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  out = []
  for key, rs in groups.items():
    g = dict(zip(keys, key))
    g["n"] = len(rs)
    for m in metrics:
      g[m], g[m + "_sd"] = _stats([r.get(m) for r in rs])
    out.append(g)
  return out


def _fmt(x, digits=3):
  if isinstance(x, float):
    return "–" if not math.isfinite(x) else f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}"
  return str(x)


def markdown_table(groups: Sequence[Dict], keys: Sequence[str], metrics: Sequence[str]) -> str:
  """A markdown table: the keys, `n`, and `mean ± sd` of every metric."""
  head = list(keys) + ["n"] + list(metrics)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in groups:
    cells = [f"{g[k]:g}" if isinstance(g[k], float) else str(g[k]) for k in keys] + [str(g["n"])]
    cells += ["–" if not math.isfinite(g[m]) else f"{_fmt(g[m])} ± {_fmt(g[m + '_sd'])}" for m in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_tables(out_dir: str, rows: Sequence[Dict], keys, metrics, *, title: str, notes: Sequence[str] = ()):
  """`table.csv` (every row: keys, seed, metrics) and `table.md` (aggregated, with notes)."""
  os.makedirs(out_dir, exist_ok=True)
  cols = list(keys) + ["seed"] + list(metrics)
  with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k) for k in cols})
  seeds = sorted({r["seed"] for r in rows})
  text = [f"# {title}", "", f"seeds: {', '.join(map(str, seeds))} (mean ± standard deviation over seeds)", ""]
  text.append(markdown_table(aggregate(rows, keys, metrics), keys, metrics))
  if notes:
    text += [""] + [f"- {n}" for n in notes]
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write("\n".join(text) + "\n")


# ------------------------------------------------------------------------------------------------
# Charts


def _save(fig, path):
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _curves(workdir_of_seed: Dict[int, str], label: str, key: str, scale: float):
  """Mean over seeds of metric `key` (times `scale`) in each member's metrics.jsonl, by step."""
  per_step: Dict[int, List[float]] = {}
  for wd in workdir_of_seed.values():
    path = os.path.join(wd, "sweep", label, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    for r in metrics_lib.read_jsonl(path):
      if r.get("stage") == "train" and key in r:
        per_step.setdefault(int(r["step"]), []).append(float(r[key]) * scale)
  steps = sorted(per_step)
  return steps, [float(np.mean(per_step[s])) for s in steps]


def _bars(ax, rows, methods, metric, title):
  means = [_stats([r[metric] for r in rows if r["method"] == m])[0] for m in methods]
  sds = [_stats([r[metric] for r in rows if r["method"] == m])[1] for m in methods]
  x = np.arange(len(methods))
  ax.bar(x, means, yerr=sds, color="#9ecae1", capsize=3)
  for i, m in enumerate(methods):
    ys = [r[metric] for r in rows if r["method"] == m]
    ax.plot([i] * len(ys), ys, "k.", ms=4)
  ax.set_xticks(x)
  ax.set_xticklabels(methods, rotation=20, fontsize=8)
  ax.set_title(title, fontsize=9)


# ------------------------------------------------------------------------------------------------
# The studies


@dataclasses.dataclass
class Result:
  rows: List[Dict]
  keys: Sequence[str]
  metrics: Sequence[str]
  notes: List[str]


def _sweep(config, workdir: str, progress: bool):
  summaries, _ = main_lib.run_sweep(config, workdir, progress=progress)
  return summaries


def _rows_over_seeds(runs, progress, fields: Dict[str, str], base: bool = False):
  """Every seed's sweep (run or reused), one row per member and seed (and the base's with `base`)."""
  return [row for seed, (c, wd) in runs.items() for row in _member_rows(_sweep(c, wd, progress), seed, fields, base)]


def _member_rows(summaries, seed, fields: Dict[str, str], base: bool = False):
  rows = []
  for label, s in summaries.items():
    rows.append({"method": label, "seed": seed, **{k: s.get(v) for k, v in fields.items()}})
  if base:
    s = next(iter(summaries.values()))
    rows.append(
      {"method": "sft base", "seed": seed, "mean_length": s["mean_length_base"], "gold_reward": s["gold_reward_base"]}
    )
  return rows


def run_likelihood(runs, progress, tiny) -> Result:
  fields = {
    "train_chosen_logratio": "train_chosen_logratio",
    "train_rejected_logratio": "train_rejected_logratio",
    "train_margin": "train_logratio_margin",
    "heldout_chosen_logratio": "chosen_logratio",
    "heldout_margin": "logratio_margin",
    "gold_reward": "gold_reward_policy",
    "kl": "kl_to_base",
  }
  rows = _rows_over_seeds(runs, progress, fields, base=True)
  notes = []
  for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "sft base"):
    mean, sd = _stats([r["train_chosen_logratio"] for r in rows if r["method"] == m])
    notes.append(
      f"{m}: chosen log-ratio on training pairs {mean:+.3f} ± {sd:.3f} "
      f"({'falls' if mean < 0 else 'does not fall'}); margin {_stats([r['train_margin'] for r in rows if r['method'] == m])[0]:+.3f}"
    )
  return Result(rows, ("method",), list(fields), notes)


def chart_likelihood(result: Result, runs, path: str):
  wds = {s: wd for s, (c, wd) in runs.items()}
  fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.6))
  beta = 0.1
  for label in dict.fromkeys(r["method"] for r in result.rows if r["method"] != "sft base"):
    for ax, key, name in zip(
      axes,
      ("rewards/chosen", "rewards/rejected", "rewards/margins"),
      ("chosen log-ratio", "rejected log-ratio", "margin"),
    ):
      steps, ys = _curves(wds, label, key, 1.0 / beta)
      ax.plot(steps, ys, marker=".", label=label)
      ax.set_title(f"{name} (training batches)", fontsize=9)
      ax.set_xlabel("step")
      ax.axhline(0.0, color="gray", lw=0.8, ls="--")
  axes[0].set_ylabel("log pi - log ref  [nats, mean over seeds]")
  axes[0].legend(fontsize=8)
  return _save(fig, path)


def _length_window(c):
  """The completion lengths (EOS included) without the gold reward's length penalty."""
  wc = world_lib.WorldConfig(seed=c.seed, **dict(c.world))
  return wc.min_good_len + 1, wc.max_good_len + 1


def run_length(runs, progress, tiny) -> Result:
  fields = {
    "mean_length": "mean_length_policy",
    "gold_reward": "gold_reward_policy",
    "kl": "kl_to_base",
    "win_rate": "win_rate_vs_base",
  }
  rows = _rows_over_seeds(runs, progress, fields, base=True)
  c = next(iter(runs.values()))[0]
  lo, hi = _length_window(c)
  notes = [
    f"length_bias = {c.world.length_bias}; the gold reward has no length penalty for {lo}..{hi} tokens "
    f"with EOS ({lo - 1}..{hi - 1} content tokens)."
  ]
  methods = {r["method"] for r in rows}
  for dpo, others in (("dpo", ("simpo", "ld_dpo", "ln_dpo", "sampo")), ("dpo_lr3e-4", ("simpo_lr3e-4",))):
    if dpo not in methods:
      continue
    dpo_len = _stats([r["mean_length"] for r in rows if r["method"] == dpo])[0]
    for m in (m for m in others if m in methods):
      ml = _stats([r["mean_length"] for r in rows if r["method"] == m])[0]
      notes.append(f"{m}: mean length {ml:.2f} vs {dpo} {dpo_len:.2f} ({'shorter' if ml < dpo_len else 'not shorter'})")
  return Result(rows, ("method",), list(fields), notes)


def chart_length(result: Result, runs, path: str):
  c = next(iter(runs.values()))[0]
  lo, hi = _length_window(c)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  ax.axvspan(lo, hi, color="#e5f5e0", label="gold length window")
  for m in dict.fromkeys(r["method"] for r in result.rows):
    rs = [r for r in result.rows if r["method"] == m]
    xs, ys = [r["mean_length"] for r in rs], [r["gold_reward"] for r in rs]
    pts = ax.scatter(xs, ys, s=12, alpha=0.5)
    ax.errorbar(
      np.mean(xs),
      np.mean(ys),
      xerr=np.std(xs),
      yerr=np.std(ys),
      marker="o",
      ms=7,
      color=pts.get_facecolor()[0],
      label=m,
    )
  ax.set_xlabel("mean completion length (tokens, EOS included)")
  ax.set_ylabel("mean gold reward (held-out prompts)")
  ax.set_title(f"length exploitation: labeller length_bias = {c.world.length_bias}", fontsize=10)
  ax.legend(fontsize=7)
  return _save(fig, path)


# f''(0) / |f'(0)| (pofx.gpo docstrings; the test checks them with pofx.gpo.grad0 / curv0).
GPO_RATIO = {
  "logistic": 0.5,
  "savage": 0.5,
  "squared": 1.0,
  "exponential": 1.0,
  "truncated_quadratic": 1.0,
  "hinge": 0.0,
}


def run_gpo_frontier(runs, progress, tiny) -> Result:
  rows = []
  for seed, (c, wd) in runs.items():
    summaries = _sweep(c, wd, progress)
    for item in c.sweep:
      s = summaries[item["label"]]
      rows.append(
        {
          "method": item["group"],
          "beta": float(item["beta"]),
          "seed": seed,
          "gold_reward": s["gold_reward_policy"],
          "kl": s["kl_to_base"],
        }
      )
  notes = gpo_best_betas(rows)
  return Result(rows, ("method", "beta"), ("gold_reward", "kl"), notes)


def gpo_best_betas(rows) -> List[str]:
  """Per f: the beta of the highest mean gold reward, and its ratio to the mean best beta of the
  ratio-1 functions, against the prediction."""
  groups = aggregate(rows, ("method", "beta"), ("gold_reward",))
  best = {}
  for f in dict.fromkeys(g["method"] for g in groups):
    gs = [g for g in groups if g["method"] == f]
    best[f] = max(gs, key=lambda g: g["gold_reward"])["beta"]
  ones = [best[f] for f in best if GPO_RATIO.get(f) == 1.0]
  ref = float(np.exp(np.mean(np.log(ones)))) if ones else float("nan")
  notes = [f"reference: the geometric mean of the best betas of squared, exponential, truncated_quadratic = {ref:.3g}"]
  for f, b in best.items():
    r = GPO_RATIO.get(f)
    pred = "no prediction" if not r else f"predicted {1.0 / r:g}x"
    notes.append(f"{f}: best beta {b:g} (f''(0)/|f'(0)| = {r}), {b / ref:.2g}x the reference; {pred}")
  return notes


def chart_gpo_frontier(result: Result, runs, path: str):
  groups = aggregate(result.rows, ("method", "beta"), ("gold_reward", "kl"))
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
  for f in dict.fromkeys(g["method"] for g in groups):
    gs = sorted((g for g in groups if g["method"] == f), key=lambda g: g["beta"])
    ls = "--" if GPO_RATIO.get(f) == 0.5 else ("-" if GPO_RATIO.get(f) == 1.0 else ":")
    a1.plot([g["kl"] for g in gs], [g["gold_reward"] for g in gs], marker="o", ls=ls, label=f)
    a2.errorbar(
      [g["beta"] for g in gs],
      [g["gold_reward"] for g in gs],
      yerr=[g["gold_reward_sd"] for g in gs],
      marker="o",
      ls=ls,
      capsize=2,
      label=f,
    )
  a1.set_xlabel("KL(policy || base)  [nats]")
  a1.set_ylabel("mean gold reward")
  a1.set_title("frontier (each point one beta, mean over seeds)", fontsize=9)
  a2.set_xscale("log")
  a2.set_xlabel("beta")
  a2.set_title("gold reward against beta (dashed: ratio 0.5, solid: ratio 1, dotted: hinge)", fontsize=9)
  a1.legend(fontsize=7)
  return _save(fig, path)


def run_ranking(runs, progress, tiny) -> Result:
  fields = {
    "ranking_accuracy": "ranking_accuracy",
    "idealized_ranking_accuracy": "idealized_ranking_accuracy",
    "ref_ranking_accuracy": "ref_ranking_accuracy",
    "ranking_changed": "ranking_changed",
    "reward_accuracy": "reward_accuracy",
    "train_ranking_accuracy": "train_ranking_accuracy",
    "train_ranking_changed": "train_ranking_changed",
  }
  rows = _rows_over_seeds(runs, progress, fields)
  notes = []
  for m in dict.fromkeys(r["method"] for r in rows):
    rs = [r for r in rows if r["method"] == m]
    ra, ira, ch = (
      _stats([r[k] for r in rs])[0] for k in ("ranking_accuracy", "idealized_ranking_accuracy", "ranking_changed")
    )
    notes.append(f"{m}: ranking accuracy {ra:.3f}, idealized {ira:.3f} (gap {ira - ra:.3f}); rankings changed {ch:.3f}")
  return Result(rows, ("method",), list(fields), notes)


def chart_ranking(result: Result, runs, path: str):
  methods = list(dict.fromkeys(r["method"] for r in result.rows))
  metrics = ("ref_ranking_accuracy", "ranking_accuracy", "idealized_ranking_accuracy", "ranking_changed")
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  w = 0.2
  for j, m in enumerate(metrics):
    st = [_stats([r[m] for r in result.rows if r["method"] == k]) for k in methods]
    ax.bar(np.arange(len(methods)) + (j - 1.5) * w, [s[0] for s in st], w, yerr=[s[1] for s in st], capsize=2, label=m)
  ax.set_xticks(np.arange(len(methods)))
  ax.set_xticklabels(methods)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("fraction of held-out pairs")
  ax.set_title("ranking accuracy vs the idealized ranking accuracy", fontsize=10)
  ax.legend(fontsize=7)
  return _save(fig, path)


def _summary_at_step(c, wd: str, step: int, progress: bool) -> Dict:
  """The evaluation of the run in `wd` at `step` (`c.train.steps == step`): training continues from
  the workdir's last step (raising train.steps resumes a run exactly) and each evaluation is kept
  as `summary_step<step>.json`, reused when it was made under this config (a rerun of the study
  cannot lower train.steps below the step the workdir reached)."""
  path = os.path.join(wd, f"summary_step{step}.json")
  if os.path.exists(path):
    with open(path) as f:
      kept = json.load(f)
    if kept.get("config_fingerprint") == fingerprints.of_values(c.to_dict()):
      _say("overopt: reusing %s", path)
      return kept
  summary, _ = main_lib.run_one(c, wd, progress=progress)
  with open(path, "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def run_overopt(runs, progress, tiny) -> Result:
  rows = []
  for seed, (c, wd) in runs.items():
    steps = study_overopt.TINY_EVAL_STEPS if tiny else study_overopt.EVAL_STEPS
    base_gold = None
    for s in steps:
      with c.unlocked():
        c.train.steps, c.train.checkpoint_every = s, s
      summary = _summary_at_step(c, wd, s, progress)
      base_gold = summary["gold_reward_base"]
      kl = max(float(summary["kl_to_base"]), 0.0)
      rows.append(
        {
          "method": "dpo",
          "x": s,
          "seed": seed,
          "kl": summary["kl_to_base"],
          "sqrt_kl": math.sqrt(kl),
          "gold_reward": summary["gold_reward_policy"],
          "gold_gain": summary["gold_reward_policy"] - base_gold,
        }
      )
    # Best-of-n from the SFT base on the evaluation's held-out prompts, selected by the gold reward.
    run = main_lib.Run(c, wd, progress=False)
    base = main_lib.stage_sft(run)
    prompts = run.world.prompts(c.eval.num_prompts, seed=c.seed * 1000 + 5, split="eval")
    best_of = study_overopt.TINY_BEST_OF_N if tiny else study_overopt.BEST_OF_N
    n_max = max(best_of)
    rep = [p for p in prompts for _ in range(n_max)]
    samples = world_lib.sample_completions(
      run.world, base, rep, run.key_for("best_of_n"), model=run.model, batch_size=min(512, len(prompts))
    )  # batches of the evaluation's shape: its compiled sampler serves
    gold = run.world.gold_reward(rep, sampling.completions(samples)).reshape(len(prompts), n_max)
    for n in best_of:
      best = gold.reshape(len(prompts), n_max // n, n).max(-1).mean()  # n_max / n disjoint groups per prompt
      kl = float(evaluation.best_of_n_kl(n))
      rows.append(
        {
          "method": "best_of_n",
          "x": n,
          "seed": seed,
          "kl": kl,
          "sqrt_kl": math.sqrt(kl),
          "gold_reward": float(best),
          "gold_gain": float(best - gold.mean()),
        }
      )
  notes = []
  for method, form in (("dpo", "rl"), ("best_of_n", "bon")):
    rs = [r for r in rows if r["method"] == method]
    try:
      a, b = evaluation.gao_fit([r["sqrt_kl"] for r in rs], [r["gold_gain"] for r in rs], form=form)
    except ValueError as e:
      notes.append(f"{method}: no fit ({e})")
      continue
    peak = (
      f"peak at sqrt(KL) = {math.exp(a / b - 1):.3g}"
      if form == "rl" and b > 0
      else (
        f"peak at sqrt(KL) = {a / (2 * b):.3g}" if b > 0 else "no peak (beta <= 0: no over-optimisation in the fit)"
      )
    )
    fit = "d (alpha - beta log d)" if form == "rl" else "d (alpha - beta d)"
    notes.append(f"{method}: gold gain = {fit}, alpha = {a:.3g}, beta = {b:.3g}; {peak}")
  return Result(rows, ("method", "x"), ("kl", "sqrt_kl", "gold_reward", "gold_gain"), notes)


def chart_overopt(result: Result, runs, path: str):
  fig, ax = plt.subplots(figsize=(6.6, 4.4))
  for method, form, color in (("dpo", "rl", "C0"), ("best_of_n", "bon", "C1")):
    rs = [r for r in result.rows if r["method"] == method]
    ax.scatter([r["sqrt_kl"] for r in rs], [r["gold_gain"] for r in rs], s=14, color=color, alpha=0.6, label=method)
    try:
      a, b = evaluation.gao_fit([r["sqrt_kl"] for r in rs], [r["gold_gain"] for r in rs], form=form)
    except ValueError:
      continue
    d = np.linspace(0, max(r["sqrt_kl"] for r in rs) * 1.1, 100)
    ax.plot(d, evaluation.gao_curve(d, a, b, form=form), color=color, lw=1.2, label=f"{method} fit ({form} form)")
  ax.axhline(0, color="gray", lw=0.8, ls="--")
  ax.set_xlabel("sqrt(KL(policy || base))  [sqrt nats]")
  ax.set_ylabel("gold reward gain over the base")
  ax.set_title("over-optimisation: DPO along training, best-of-n (gold selection)", fontsize=9)
  ax.legend(fontsize=7)
  return _save(fig, path)


def heldout_dpo_loss(run, prepared, base_params, *, beta: float):
  """`params -> mean DPO loss at beta` over every held-out pair (one batch), against the SFT base's
  log-probs (computed once)."""
  c = run.config
  src = prepared.source("eval")
  loader = data_lib.PreferenceLoader(
    src,
    batch_size=len(src),
    layout=c.data.layout,
    layout_kwargs=main_lib._layout_kwargs(c),
    shuffle=False,
    num_epochs=1,
    drop_remainder=False,
    process_index=0,
    process_count=1,
  )
  batch = next(iter(loader.iterator()))
  real = jnp.asarray(np.asarray(batch["example_id"]) >= 0, jnp.float32)
  batch = {k: v for k, v in batch.items() if k != "example_id"}
  logps_fn = policy.make_logps_fn(run.model.apply, run.model.head, kernels=run.kernels)
  ref = jax.jit(logps_fn)(base_params, batch)
  dpo = losses.get("dpo")

  def objective(p):
    per_pair = dpo(logps_fn(p, batch), ref, beta=beta)
    return jnp.sum(per_pair * real) / jnp.sum(real)

  return objective


def run_references(runs, progress, tiny) -> Result:
  rows = []
  for seed, (c, wd) in runs.items():
    summaries = _sweep(c, wd, progress)
    run = main_lib.Run(c, wd, progress=False)
    base = main_lib.stage_sft(run)
    prepared, _ = main_lib.stage_data(run, base)
    objective = heldout_dpo_loss(run, prepared, base, beta=0.1)
    for label, s in summaries.items():
      params = main_lib._load_params(os.path.join(wd, "sweep", label, "final_params"), base)
      sh = evaluation.sharpness(
        objective, params, rho=study_references.SHARPNESS_RHO, steps=study_references.SHARPNESS_STEPS
      )
      rows.append(
        {
          "method": label,
          "seed": seed,
          "gold_reward": s["gold_reward_policy"],
          "kl": s["kl_to_base"],
          "win_rate": s["win_rate_vs_base"],
          "heldout_loss": sh["loss"],
          "sharpness": sh["sharpness"],
        }
      )
  notes = [
    f"sharpness: the largest increase of the held-out DPO loss (beta 0.1, SFT reference) within an L2 ball of "
    f"radius {study_references.SHARPNESS_RHO} found by {study_references.SHARPNESS_STEPS} projected ascent steps."
  ]
  dpo = [r for r in rows if r["method"] == "dpo"]
  for m in dict.fromkeys(r["method"] for r in rows):
    if m == "dpo":
      continue
    rs = {r["seed"]: r for r in rows if r["method"] == m}
    dg = [rs[r["seed"]]["gold_reward"] - r["gold_reward"] for r in dpo if r["seed"] in rs]
    ds = [rs[r["seed"]]["sharpness"] - r["sharpness"] for r in dpo if r["seed"] in rs]
    (g, gs), (sh, shs) = _stats(dg), _stats(ds)
    notes.append(f"{m} - dpo (paired by seed): gold reward {g:+.3f} ± {gs:.3f}, sharpness {sh:+.4f} ± {shs:.4f}")
  return Result(rows, ("method",), ("gold_reward", "kl", "win_rate", "heldout_loss", "sharpness"), notes)


def chart_references(result: Result, runs, path: str):
  methods = list(dict.fromkeys(r["method"] for r in result.rows))
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  _bars(axes[0], result.rows, methods, "gold_reward", "held-out gold reward")
  _bars(axes[1], result.rows, methods, "kl", "KL(policy || base)")
  _bars(axes[2], result.rows, methods, "sharpness", "sharpness (held-out DPO loss increase)")
  return _save(fig, path)


@dataclasses.dataclass(frozen=True)
class Study:
  title: str
  run: Callable
  chart: Callable


REGISTRY = {
  "likelihood": Study("Likelihood displacement: DPO, DPOP, RPO", run_likelihood, chart_likelihood),
  "length": Study("Length exploitation under a length-biased labeller", run_length, chart_length),
  "gpo_frontier": Study("GPO functions: gold reward against KL over beta", run_gpo_frontier, chart_gpo_frontier),
  "ranking": Study("Ranking accuracy against the idealized ranking accuracy", run_ranking, chart_ranking),
  "overopt": Study("Reward over-optimisation: DPO along training and best-of-n", run_overopt, chart_overopt),
  "references": Study("Reference strategies and weight perturbations", run_references, chart_references),
}
assert tuple(REGISTRY) == STUDIES


def run_study(name: str, root: str, seeds: Sequence[int], *, tiny: bool = False, progress: bool = False) -> Dict:
  """Runs study `name` for `seeds` under `root`; writes its table and chart; returns their paths."""
  study = REGISTRY[name]
  out_dir = os.path.join(os.path.abspath(root), name)
  runs = {}
  for seed in seeds:
    c = study_config(name, seed, tiny)
    validate.validate(c)
    wd = os.path.join(out_dir, f"seed{seed}")
    linked = share_outputs(c, wd, os.path.abspath(root))
    if linked:
      _say("%s seed %d: sharing %s of another study", name, seed, ", ".join(linked))
    runs[seed] = (c, wd)
  t = time.perf_counter()
  result = study.run(runs, progress, tiny)
  write_tables(out_dir, result.rows, result.keys, result.metrics, title=study.title, notes=result.notes)
  chart = study.chart(result, runs, os.path.join(out_dir, f"{name}.png"))
  with open(os.path.join(out_dir, "rows.json"), "w") as f:
    json.dump({"rows": result.rows, "notes": result.notes, "seconds": time.perf_counter() - t}, f, indent=1)
  _say("%s: %d rows in %.0fs -> %s", name, len(result.rows), time.perf_counter() - t, out_dir)
  return {
    "table_md": os.path.join(out_dir, "table.md"),
    "table_csv": os.path.join(out_dir, "table.csv"),
    "chart": chart,
  }


def parse_names(text: str) -> List[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  if names == ["all"]:
    return list(STUDIES)
  bad = [n for n in names if n not in STUDIES]
  if not names or bad:
    raise ValueError(f"unknown study {', '.join(bad) or repr(text)}; allowed: {', '.join(STUDIES)}, or all.")
  return names


def parse_seeds(text: str) -> List[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    seeds = []
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={text!r}: allowed: distinct non-negative integers separated by commas, e.g. 0,1,2.")
  return seeds


def main(argv):
  if len(argv) != 2:
    print(f"usage: python -m experiments.study <{'|'.join(STUDIES)}|all>[,...] --workdir=DIR", file=sys.stderr)
    sys.exit(2)
  try:
    names, seeds = parse_names(argv[1]), parse_seeds(_SEEDS.value)
  except ValueError as e:
    print(f"experiments.study: {e}", file=sys.stderr)
    sys.exit(2)
  if _WORKDIR.value is None:
    print("experiments.study: --workdir is required.", file=sys.stderr)
    sys.exit(2)
  pofx_backends.startup()

  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(_WORKDIR.value), ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  for name in names:
    out = run_study(name, _WORKDIR.value, seeds, tiny=_TINY.value, progress=_PROGRESS.value)
    print(f"{name}: {out['table_md']}  {out['chart']}")


if __name__ == "__main__":
  app.run(main)
