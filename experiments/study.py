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
| online | offline, iterative and online DPO, DICE, SPIN, RLHF (RLOO); a reward model; online DPO on it | gold reward and win rate at matched KL; gold against reward-model reward; implicit vs reward-model accuracy on shifted prompts |

`online` is not one sweep: per seed it trains a reward model (`experiments.reward_model`) and one
run per method (`configs/study_online.py`: `method_config`, offline DPO or a loop of
`experiments.loops`) in `<workdir>/online/seed<k>/<method>`, each evaluated at several points
along training, and writes `matched.csv`, `generalisation.csv`, `overopt.csv` and
`online_generalisation.png` besides the table and chart.

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
from configs import study_online, study_overopt, study_references, validate
from experiments import loops, provenance
from experiments import main as main_lib
from experiments import metrics as metrics_lib
from experiments import reward_model as reward_model_stage
from pofx import data as data_lib
from pofx import evaluation, fingerprints, labellers, losses, policy, reward_models, sampling
from pofx import world as world_lib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STUDIES = ("likelihood", "length", "gpo_frontier", "ranking", "overopt", "references", "online")

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


def write_tables(
  out_dir: str, rows: Sequence[Dict], keys, metrics, *, title: str, notes: Sequence[str] = (), extra: str = ""
):
  """`table.csv` (every row: keys, seed, metrics) and `table.md` (aggregated, with notes and
  `extra`, more markdown)."""
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
  if extra:
    text += ["", extra]
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
  extra: str = ""  # markdown appended to table.md (further tables of a study)


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


# ------------------------------------------------------------------------------------------------
# Study 7: online and iterative preference optimisation (issue 19)

# The 3 matched KLs: these fractions of the largest KL every method reaches, rounded down to 2
# significant digits.
ONLINE_KL_FRACTIONS = (0.5, 0.75, 1.0)
# The over-optimisation curve averages the per-round labels of the online runs in windows of
# this many rounds (steps).
ONLINE_WINDOW = 10


def _link_seed(seed_wd: str, wd: str) -> None:
  """Links the seed's SFT base and data into a method's workdir and copies its kernel record."""
  os.makedirs(wd, exist_ok=True)
  for name in ("sft_params", "data"):
    src, dst = os.path.join(seed_wd, name), os.path.join(wd, name)
    if os.path.exists(src) and not os.path.lexists(dst):
      os.symlink(os.path.realpath(src), dst)
  src, dst = os.path.join(seed_wd, main_lib.KERNELS_RECORD), os.path.join(wd, main_lib.KERNELS_RECORD)
  if os.path.exists(src) and not os.path.exists(dst):
    shutil.copy(src, dst)


def _summary_at_point(name: str, c, wd: str, point: int, progress: bool) -> Dict:
  """The evaluation of method `name`'s run in `wd` after `point` (offline: `train.steps`; a loop:
  `loop.rounds`). Training continues from the workdir's last checkpoint (raising either resumes
  the run exactly); each evaluation is kept as `summary_point<point>.json`, reused when made under
  the same config."""
  with c.unlocked():
    if c.loop.kind == "offline":
      c.train.steps = c.train.checkpoint_every = point
    else:
      c.loop.rounds, c.train.steps = point, point * c.loop.steps_per_round
  path = os.path.join(wd, f"summary_point{point}.json")
  if os.path.exists(path):
    with open(path) as f:
      kept = json.load(f)
    if kept.get("config_fingerprint") == fingerprints.of_values(c.to_dict()):
      return kept
  validate.validate(c)
  t = time.perf_counter()
  if c.loop.kind == "offline":
    summary, _ = main_lib.run_one(c, wd, progress=progress)
  else:
    summary = loops.run(main_lib, c, wd, progress=progress)
  _say(
    "online: %s seed %d at %d steps: KL %.3f, gold %.3f (%.0fs)",
    name,
    c.seed,
    c.train.steps,
    summary["kl_to_base"],
    summary["gold_reward_policy"],
    time.perf_counter() - t,
  )
  with open(path, "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _floor2(x: float) -> float:
  """`x > 0` rounded down to 2 significant digits."""
  e = math.floor(math.log10(x)) - 1
  return math.floor(x / 10.0**e + 1e-9) * 10.0**e


def matched_kl_targets(curves: Dict, fractions=ONLINE_KL_FRACTIONS):
  """The KLs at which every curve is read: `curves` maps (method, seed) to its evaluated KLs in
  training order. Every curve starts at the base (KL 0), so every one reaches each KL up to
  `hi`, the smallest largest KL; the targets are `fractions` of `hi`, rounded down to 2
  significant digits. Returns (targets, lo, hi), `lo` the largest first evaluated KL (below it some
  curve is read between the base and its first evaluation); no targets when `hi <= 0`."""
  lo = max(float(ks[0]) for ks in curves.values())
  hi = min(float(max(ks)) for ks in curves.values())
  if hi <= 0:
    return [], lo, hi
  return [float(f"{_floor2(f * hi):.6g}") for f in fractions], lo, hi


def _pairs_of(examples):
  return (
    [e["prompt"] for e in examples],
    [e["chosen"] for e in examples],
    [e["rejected"] for e in examples],
    np.asarray([float(e["score_chosen"]) - float(e["score_rejected"]) for e in examples], np.float64),
  )


def _generalisation_rows(c, seed_wd: str, rm_path: str, seed: int, tiny: bool) -> List[Dict]:
  """Accuracy of the DPO implicit reward `beta (log pi/pi_sft (y_w) - log pi/pi_sft (y_l))` of the
  finished runs of `study_online.IMPLICIT` and of the reward model, against the gold ordering and
  against the labels, on the held-out pairs (held-out prompts of the training distribution) and
  on pairs of shifted prompts (`World.prompts(shift=study_online.SHIFT)`, completions from the
  SFT base, labelled as the data stage labels)."""
  run = main_lib.Run(c, seed_wd, progress=False)
  base = main_lib.stage_sft(run)
  prepared, _ = main_lib.stage_data(run, base)
  src = prepared.source("eval")
  sets = {"in-distribution": _pairs_of([src[i] for i in range(len(src))])}
  k = c.data.samples_per_prompt
  n_prompts = max(1, -(-c.data.num_eval_pairs // (k // 2)))
  shifted = world_lib.preference_data(
    run.world,
    base,
    run.world.prompts(n_prompts, seed=c.seed * 1000 + 6, split="eval", shift=study_online.SHIFT),
    run.key_for("study/shifted_pairs"),
    model=run.model,
    num_samples=k,
  )
  sets["shifted"] = (
    shifted.prompt,
    shifted.chosen,
    shifted.rejected,
    np.asarray(shifted.chosen_score, np.float64) - np.asarray(shifted.rejected_score, np.float64),
  )
  rm = labellers.reward_model(
    jax.jit(reward_models.score_fn(run.model)), reward_model_stage.load(rm_path, run.model_config)
  )
  policies = {m: main_lib._load_params(os.path.join(seed_wd, m, "final_params"), base) for m in study_online.IMPLICIT}
  rows = []
  for split, (ps, ch, rj, gold) in sets.items():
    ref = evaluation.pair_logps(base, ps, ch, rj, model=run.model)
    margins = {}
    for m, params in policies.items():
      pol = evaluation.pair_logps(params, ps, ch, rj, model=run.model)
      margins[f"{m} implicit"] = np.asarray(
        study_online.BETA * ((pol.chosen - ref.chosen) - (pol.rejected - ref.rejected)), np.float64
      )
    scores = rm(ps, [[a, b] for a, b in zip(ch, rj)])
    margins["reward model"] = scores[:, 0].astype(np.float64) - scores[:, 1]
    for scorer, margin in margins.items():
      rows.append(
        {
          "scorer": scorer,
          "pairs": split,
          "seed": seed,
          "gold_accuracy": evaluation.pair_accuracy(margin, gold),
          "label_accuracy": evaluation.pair_accuracy(margin, np.ones_like(margin)),
          "num_pairs": len(ps),
        }
      )
  return rows


def _round_curve(summary: Dict, seed: int, method: str) -> List[Dict]:
  """Per round of an online run: the mean label (the reward model's, or the gold) and the mean
  gold reward of the policy's own samples of that round."""
  return [
    {
      "method": method,
      "seed": seed,
      "step": int(e["round"]),
      "label": float(e["label_mean"]),
      "gold": float(e["sampled_gold_reward"]),
    }
    for e in summary.get("loop_rounds", [])
    if "label_mean" in e
  ]


def _windowed(curve: List[Dict], window: int) -> List[Dict]:
  """Means of `label` and `gold` over consecutive windows of `window` rounds, with the gains over
  the first window (the policy near the SFT base)."""
  out = []
  for start in range(0, len(curve) - window + 1, window):
    part = curve[start : start + window]
    out.append(
      {
        "step": part[-1]["step"] + 1,
        "label": np.mean([e["label"] for e in part]),
        "gold": np.mean([e["gold"] for e in part]),
      }
    )
  for e in out:
    e["label_gain"], e["gold_gain"] = e["label"] - out[0]["label"], e["gold"] - out[0]["gold"]
  return out


def run_online(runs, progress, tiny) -> Result:
  arg = "tiny" if tiny else None
  rows, gen_rows, curves_raw = [], [], []
  names = study_online.METHODS + (study_online.RM_METHOD,)
  for seed, (c, wd) in runs.items():
    # The seed's SFT base and data (made here, or linked from another study), shared by every run.
    run = main_lib.Run(c, wd, progress=progress)
    base = main_lib.stage_sft(run)
    main_lib.stage_data(run, base)
    rc = study_online.reward_model_config(arg, seed=seed)
    rm_wd = os.path.join(wd, "reward_model")
    _link_seed(wd, rm_wd)
    validate.validate(rc)
    rm_summary = reward_model_stage.run(rc, rm_wd, lib=main_lib, progress=progress)
    rm_path = os.path.join(rm_wd, reward_model_stage.OUTPUT)
    rows.append(
      {
        "method": "reward model",
        "step": int(rc.reward_model.steps),
        "seed": seed,
        "rm_accuracy": rm_summary.get("reward_accuracy"),
        "rm_gold_accuracy": rm_summary.get("gold_accuracy"),
      }
    )
    for name in names:
      mc, points = study_online.method_config(name, arg, seed=seed, reward_model_checkpoint=rm_path)
      mwd = os.path.join(wd, name)
      _link_seed(wd, mwd)
      summary = None
      for point in points:
        summary = _summary_at_point(name, mc, mwd, point, progress)
        row = {
          "method": name,
          "step": int(mc.train.steps),
          "seed": seed,
          "kl": summary["kl_to_base"],
          "gold_reward": summary["gold_reward_policy"],
          "win_rate": summary["win_rate_vs_base"],
          "mean_length": summary["mean_length_policy"],
        }
        if name in ("online_dpo", study_online.RM_METHOD):
          last = _round_curve(summary, seed, name)[-ONLINE_WINDOW:]
          row["sampled_label"] = float(np.mean([e["label"] for e in last])) if last else None
          row["sampled_gold"] = float(np.mean([e["gold"] for e in last])) if last else None
        rows.append(row)
      if name in ("online_dpo", study_online.RM_METHOD):
        curves_raw += _round_curve(summary, seed, name)
      if name == "dpo":
        base_gold = summary["gold_reward_base"]
        base_len = summary["mean_length_base"]
    rows.append(
      {
        "method": "sft base",
        "step": 0,
        "seed": seed,
        "kl": 0.0,
        "gold_reward": base_gold,
        "win_rate": 0.5,
        "mean_length": base_len,
      }
    )
    gen_rows += _generalisation_rows(c, wd, rm_path, seed, tiny)
  result = online_analysis(rows, gen_rows, curves_raw)
  out_dir = os.path.dirname(next(iter(runs.values()))[1])
  tables = (
    ("matched.csv", result.matched, ("method", "kl_target", "seed", "gold_reward", "win_rate")),
    ("generalisation.csv", gen_rows, ("scorer", "pairs", "seed", "gold_accuracy", "label_accuracy", "num_pairs")),
    ("overopt.csv", curves_raw, ("method", "seed", "step", "label", "gold")),
  )
  for fname, table, cols in tables:  # written also when empty (a tiny run may reach no common KL)
    with open(os.path.join(out_dir, fname), "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(cols))
      w.writeheader()
      w.writerows(table)
  return result


@dataclasses.dataclass
class OnlineResult(Result):
  matched: List[Dict] = dataclasses.field(default_factory=list)
  generalisation: List[Dict] = dataclasses.field(default_factory=list)
  overopt: List[Dict] = dataclasses.field(default_factory=list)
  targets: List[float] = dataclasses.field(default_factory=list)


def online_analysis(rows: List[Dict], gen_rows: List[Dict], curves_raw: List[Dict]) -> OnlineResult:
  """The online study's tables from its rows: gold reward and win rate at the matched KLs (each
  method's curve from the base through its evaluations, per seed, `evaluation.value_at_kl`), the
  accuracies of the implicit rewards and the reward model, and the over-optimisation curve."""
  bases = {r["seed"]: r for r in rows if r["method"] == "sft base"}
  methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("sft base", "reward model")]
  curves = {}
  for m in methods:
    for seed in bases:
      pts = sorted((r for r in rows if r["method"] == m and r["seed"] == seed), key=lambda r: r["step"])
      if pts:
        curves[(m, seed)] = pts
  targets, lo, hi = matched_kl_targets({k: [p["kl"] for p in v] for k, v in curves.items()})
  matched = []
  for (m, seed), pts in curves.items():
    b = bases[seed]
    kl = [0.0] + [p["kl"] for p in pts]
    for metric in ("gold_reward", "win_rate"):
      vals = evaluation.value_at_kl(kl, [b[metric]] + [p[metric] for p in pts], targets)
      for t, v in zip(targets, vals):
        row = next((x for x in matched if x["method"] == m and x["seed"] == seed and x["kl_target"] == t), None)
        if row is None:
          row = {"method": m, "kl_target": t, "seed": seed}
          matched.append(row)
        row[metric] = float(v)
  notes = [
    f"matched KLs {', '.join(f'{t:g}' for t in targets)}: {', '.join(f'{f:g}' for f in ONLINE_KL_FRACTIONS)} of "
    f"{hi:.3g}, the largest KL every method reaches in every seed, each curve running from the base (KL 0) "
    f"through its evaluations"
    if targets
    else f"no matched KLs: a method's largest KL is {hi:.3g} (it never left the base)"
  ]
  for m in methods:
    seeds = [sd for sd in bases if (m, sd) in curves]
    reach = [max(p["kl"] for p in curves[(m, sd)]) for sd in seeds]
    first = [curves[(m, sd)][0]["kl"] for sd in seeds]
    missing = sum(1 for r in matched if r["method"] == m and not math.isfinite(r["gold_reward"]))
    early = sum(1 for f in first for t in targets if t < f)
    notes.append(
      f"{m}: first evaluation at KL {min(first):.3g}-{max(first):.3g}, largest KL {min(reach):.3g}-{max(reach):.3g} "
      "over seeds; "
      + ("reaches every matched KL in every seed" if not missing else f"{missing} matched values not reached")
      + (
        f"; {early} of its {len(first) * len(targets)} matched values lie between the base and its first evaluation"
        if early
        else ""
      )
    )
  got = {(r["method"], r["kl_target"], r["seed"]): r["gold_reward"] for r in matched}
  for m in methods:
    if m == "dpo" or not targets:
      continue
    parts = []
    for t in targets:
      d = [got[(m, t, sd)] - got[("dpo", t, sd)] for sd in bases if (m, t, sd) in got and ("dpo", t, sd) in got]
      mean, sd_ = _stats(d)
      parts.append(f"{mean:+.3f} ± {sd_:.3f} at KL {t:g}")
    notes.append(f"{m} - dpo, gold reward at matched KL (paired by seed): {'; '.join(parts)}")
  rm_rows = [r for r in rows if r["method"] == "reward model"]
  if rm_rows:
    a, sd = _stats([r["rm_accuracy"] for r in rm_rows])
    g, gsd = _stats([r["rm_gold_accuracy"] for r in rm_rows])
    notes.append(
      f"reward model: held-out accuracy {a:.3f} ± {sd:.3f} against the labels, {g:.3f} ± {gsd:.3f} against the gold ordering"
    )
  acc = {(g["scorer"], g["pairs"], g["seed"]): g["gold_accuracy"] for g in gen_rows}
  gen_seeds = sorted({g["seed"] for g in gen_rows})
  for scorer in dict.fromkeys(g["scorer"] for g in gen_rows):
    d = [acc[(scorer, "shifted", sd)] - acc[(scorer, "in-distribution", sd)] for sd in gen_seeds]
    mean, sd_ = _stats(d)
    notes.append(
      f"{scorer}: gold accuracy on shifted minus in-distribution pairs (paired by seed) {mean:+.3f} ± {sd_:.3f} "
      f"({', '.join(f'{x:+.3f}' for x in d)})"
    )
  extra = ["## Gold reward and win rate at matched KL", ""]
  extra.append(
    markdown_table(
      aggregate(matched, ("method", "kl_target"), ("gold_reward", "win_rate")),
      ("method", "kl_target"),
      ("gold_reward", "win_rate"),
    )
  )
  extra += ["", "## Accuracy of the DPO implicit reward and the reward model", ""]
  extra.append(
    markdown_table(
      aggregate(gen_rows, ("scorer", "pairs"), ("gold_accuracy", "label_accuracy")),
      ("scorer", "pairs"),
      ("gold_accuracy", "label_accuracy"),
    )
  )
  overopt = []
  for m in dict.fromkeys(e["method"] for e in curves_raw):
    for seed in dict.fromkeys(e["seed"] for e in curves_raw):
      cur = sorted((e for e in curves_raw if e["method"] == m and e["seed"] == seed), key=lambda e: e["step"])
      for e in _windowed(cur, min(ONLINE_WINDOW, max(1, len(cur) // 2))):
        overopt.append({"method": m, "seed": seed, **{k: float(v) for k, v in e.items()}})
  if overopt:
    extra += ["", f"## Over-optimisation: the policy's own samples, per window of {ONLINE_WINDOW} steps", ""]
    extra.append(
      markdown_table(
        aggregate(overopt, ("method", "step"), ("label", "gold", "label_gain", "gold_gain")),
        ("method", "step"),
        ("label", "gold", "label_gain", "gold_gain"),
      )
    )
  metrics = (
    "kl",
    "gold_reward",
    "win_rate",
    "mean_length",
    "sampled_label",
    "sampled_gold",
    "rm_accuracy",
    "rm_gold_accuracy",
  )
  return OnlineResult(rows, ("method", "step"), metrics, notes, "\n".join(extra), matched, gen_rows, overopt, targets)


def chart_online(result: OnlineResult, runs, path: str):
  groups = aggregate(result.rows, ("method", "step"), ("kl", "gold_reward", "win_rate"))
  base = [g for g in groups if g["method"] == "sft base"]
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.6))
  (a1, a2), (a3, a4) = axes
  for m in dict.fromkeys(g["method"] for g in groups if g["method"] not in ("sft base", "reward model")):
    gs = base + sorted((g for g in groups if g["method"] == m), key=lambda g: g["step"])
    a1.plot([g["kl"] for g in gs], [g["gold_reward"] for g in gs], marker="o", ms=4, label=m)
    a2.plot([g["kl"] for g in gs], [g["win_rate"] for g in gs], marker="o", ms=4, label=m)
  # Runs that diverge (KL of tens of nats) would squash the matched range: the axis ends at 3.5
  # times the largest matched KL, and says so.
  cut = 3.5 * max(result.targets) if result.targets else None
  beyond = cut is not None and any(g["kl"] > cut for g in groups if g["method"] != "reward model")
  for ax in (a1, a2):
    for t in result.targets:
      ax.axvline(t, color="gray", lw=0.7, ls=":")
    ax.set_xlabel("KL(policy || SFT base)  [nats]" + (f", axis cut at {cut:.3g}" if beyond else ""))
    if beyond:
      ax.set_xlim(-0.3, cut)
  a1.set_ylabel("gold reward (held-out prompts)")
  a2.set_ylabel("win rate against the base")
  a1.set_title("gold reward along training (mean over seeds; dotted: matched KLs)", fontsize=9)
  a2.set_title("win rate along training", fontsize=9)
  a1.legend(fontsize=7)
  for m, color in (("online_dpo", "C2"), (study_online.RM_METHOD, "C6")):
    ws = aggregate([e for e in result.overopt if e["method"] == m], ("step",), ("label_gain", "gold_gain"))
    if not ws:
      continue
    if m == study_online.RM_METHOD:
      a3.plot([w["label_gain"] for w in ws], [w["gold_gain"] for w in ws], marker="o", ms=4, color=color)
      for w in ws[:: max(1, len(ws) // 5)]:
        a3.annotate(str(int(w["step"])), (w["label_gain"], w["gold_gain"]), fontsize=6)
    a4.plot([w["step"] for w in ws], [w["gold_gain"] for w in ws], marker=".", color=color, label=f"{m}: gold gain")
    if m == study_online.RM_METHOD:
      a4.plot(
        [w["step"] for w in ws], [w["label_gain"] for w in ws], ls="--", color=color, label=f"{m}: RM reward gain"
      )
  a3.axhline(0, color="gray", lw=0.8, ls="--")
  a3.set_xlabel("reward-model reward gain of the policy's samples")
  a3.set_ylabel("gold reward gain of the same samples")
  a3.set_title("over-optimisation: online DPO labelled by the reward model (labels: step)", fontsize=9)
  a4.set_xlabel("step")
  a4.set_title("gains over the first window, online DPO: gold vs RM labeller", fontsize=9)
  a4.legend(fontsize=7)
  _save(fig, path)
  # The accuracies: a second chart, <name>_generalisation.png.
  gens = aggregate(result.generalisation, ("scorer", "pairs"), ("gold_accuracy",))
  scorers = list(dict.fromkeys(g["scorer"] for g in gens))
  fig2, ax = plt.subplots(figsize=(6.4, 3.8))
  w = 0.38
  for j, split in enumerate(("in-distribution", "shifted")):
    gs = [next((g for g in gens if g["scorer"] == s and g["pairs"] == split), None) for s in scorers]
    ax.bar(
      np.arange(len(scorers)) + (j - 0.5) * w,
      [g["gold_accuracy"] if g else np.nan for g in gs],
      w,
      yerr=[g["gold_accuracy_sd"] if g else 0 for g in gs],
      capsize=2,
      label=f"{split} pairs",
    )
  ax.set_xticks(np.arange(len(scorers)))
  ax.set_xticklabels(scorers, fontsize=8)
  ax.set_ylim(0.4, 1.0)
  ax.set_ylabel("accuracy against the gold ordering")
  ax.set_title(f"implicit reward vs reward model; shifted prompts: shift {study_online.SHIFT:g}", fontsize=9)
  ax.legend(fontsize=7)
  _save(fig2, path.replace(".png", "_generalisation.png"))
  return path


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
  "online": Study("Online and iterative preference optimisation at matched KL", run_online, chart_online),
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
  write_tables(
    out_dir, result.rows, result.keys, result.metrics, title=study.title, notes=result.notes, extra=result.extra
  )
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
