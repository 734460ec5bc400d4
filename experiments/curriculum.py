"""The Curry-DPO curriculum stage of the program (`config.stage = "curriculum"`, `configs/curry_dpo.py`).

    python -m experiments.main --config=configs/curry_dpo.py --workdir=/tmp/pofx_curry

Curry-DPO (Pattnaik et al. 2024, arXiv:2403.07230; `pofx.selection`): K rated responses per
prompt give K - 1 pairs (the best-rated response against each other one), ordered easy to hard by
their rating gap, and training runs one stage per rank of the gap, each stage starting from the
previous stage's policy and using it as the reference.

On the controlled world: (1) the SFT base and (2) the preference data are made (or reused) as for
a policy run (the held-out pairs evaluate the result); (3) the K = `data.samples_per_prompt`
completions of every training prompt are sampled from the base with the data stage's key (the
same samples the data stage drew) and **rated by their gold reward** (the world's stand-in for
the paper's GPT-4 / human ratings); `pofx.selection.curry_pairs` makes the pairs and their stages,
merged to `curriculum.num_stages` (the hardest ranks join the last stage); (4) stage s trains
`curriculum.steps_per_stage` steps of the configured loss (DPO) on its pairs in
`<workdir>/curriculum/stage_<s>` (its own dataset, reference cache, checkpoints and
`final_params`), starting from stage s - 1's final policy (stage 0: the SFT base) with that
policy as the reference (`train.reference.kind`: "cached" or "frozen", on the stage's starting
policy); (5) the final policy is evaluated against the SFT base as a policy run is
(`summary.json`, with each stage's pairs and mean gap under `curriculum_stages`).

Every stage resumes like a policy run (a finished stage is reused; a killed one continues from
its checkpoints).
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Dict

import jax
import numpy as np

from experiments import provenance
from pofx import data as data_lib
from pofx import fingerprints, selection
from pofx import world as world_lib


def _stage_records(train_data, pairs: selection.CurryPairs, idx) -> list:
  out = []
  for n, i in enumerate(idx):
    m, a, b = int(pairs.prompt[i]), int(pairs.chosen[i]), int(pairs.rejected[i])
    out.append(
      {
        "prompt": np.asarray(train_data.list_prompt[m], np.int32),
        "chosen": np.asarray(train_data.list_completions[m][a], np.int32),
        "rejected": np.asarray(train_data.list_completions[m][b], np.int32),
        "score_chosen": float(train_data.list_scores[m, a]),
        "score_rejected": float(train_data.list_scores[m, b]),
        "example_id": n,
      }
    )
  return out


def run(config, workdir: str, *, lib=None, progress=True, startup=None, overwrite=False) -> Dict[str, Any]:
  """The curriculum (module docstring); returns the summary. `lib`: the program's module."""
  if lib is None:
    from experiments import main as lib  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  c = config
  lib.preflight(c, workdir, kernels=lib.planned_kernels(c, workdir), overwrite=overwrite, stages=("sft", "data"))
  top = lib.Run(c, workdir, progress=progress)
  base = lib.stage_sft(top)
  prepared, data_meta = lib.stage_data(top, base)
  # The data stage's own draw (same prompts, key and K), kept here with its K-way lists and gold ratings.
  train_data = world_lib.preference_data(
    top.world,
    base,
    top.world.prompts(c.data.num_prompts, seed=c.seed * 1000 + 3),
    top.key_for("data/train"),
    model=top.model,
    num_samples=c.data.samples_per_prompt,
  )
  pairs = selection.curry_pairs(train_data.list_scores)
  stages = selection.stage_indices(pairs.stage, num_stages=int(c.curriculum.num_stages))
  for s, idx in enumerate(stages):
    if len(idx) < c.train.batch_size:
      raise ValueError(
        f"curriculum: stage {s} has {len(idx)} pairs, fewer than train.batch_size={c.train.batch_size}; "
        "use more data.num_prompts or fewer curriculum.num_stages."
      )
  params, info_stages = base, []
  for s, idx in enumerate(stages):
    member = copy.deepcopy(c)
    with member.unlocked():
      member.stage = "policy"
      member.train.steps = int(c.curriculum.steps_per_stage)
    stage_dir = os.path.join(top.workdir, "curriculum", f"stage_{s}")
    lib.preflight(member, stage_dir, kernels=top.kernels_record["name"], overwrite=overwrite, stages=("train",))
    run_s = lib.Run(member, stage_dir, progress=progress, kernels_record=top.kernels_record)
    run_s.model, run_s.model_config, run_s.world = top.model, top.model_config, top.world
    recs = _stage_records(train_data, pairs, idx)
    fp = fingerprints.of_values({"data": prepared.fingerprint, "curriculum_stage": s, "num_stages": len(stages)})
    meta_path = os.path.join(stage_dir, "data", "stage_meta.json")
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
      prepared_s = data_lib.Prepared(meta["path"], data_lib.stats(meta["path"]), meta["fingerprint"])
    else:
      prepared_s = data_lib.prepare_generated(
        {"train": recs},
        data_dir=os.path.join(stage_dir, "data"),
        vocab_size=top.model_config.vocab_size,
        on_bad_record="skip",
        fingerprint=fp,
      )
      with open(meta_path, "w") as f:
        json.dump({"path": prepared_s.path, "fingerprint": prepared_s.fingerprint}, f)
    lib._say("curriculum: stage %d of %d: %d pairs, mean gap %.3f", s, len(stages), len(idx), pairs.gap[idx].mean())
    params, info = lib.stage_train(run_s, prepared_s, params)
    info_stages.append(
      {
        "stage": s,
        "pairs": int(len(idx)),
        "mean_gap": float(pairs.gap[idx].mean()),
        "steps": int(info.get("steps", 0)),
        "nonfinite_steps": int(info.get("nonfinite_steps", 0)),
      }
    )
  params = jax.device_get(params)
  results, _ = lib.stage_eval(top, prepared, base, params, data_meta)
  summary = {
    **results,
    "stage": "curriculum",
    "curriculum_stages": info_stages,
    "loss": c.train.loss,
    "loss_hyper": dict(c.train.loss_hyper),
    "reference": c.train.reference.kind,
    "seed": c.seed,
    "nonfinite_steps": sum(i["nonfinite_steps"] for i in info_stages),
    "kernels": top.kernels_record["name"],
    **({"startup": startup} if startup is not None else {}),
    "seconds_total": time.perf_counter() - t,
    "config": c.to_dict(),
    "config_fingerprint": fingerprints.of_values(c.to_dict()),
    "provenance": {r.stage: r.to_json() for r in (provenance.sft_record(c), provenance.data_record(c))},
  }
  with open(top.path("summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def table(summary: Dict[str, Any]) -> str:
  """The console table: the policy keys of a run, then one row per curriculum stage."""
  keys = ("gold_reward_base", "gold_reward_policy", "win_rate_vs_base", "kl_to_base", "reward_accuracy")
  rows = [(k, f"{summary[k]:.4f}") for k in keys if isinstance(summary.get(k), float)]
  rows += [
    (f"stage {s['stage']}", f"{s['pairs']} pairs, gap {s['mean_gap']:.3f}") for s in summary["curriculum_stages"]
  ]
  w = max(len(k) for k, _ in rows)
  line = "+" + "-" * (w + 2) + "+" + "-" * 26 + "+"
  return "\n".join([line] + [f"| {k.ljust(w)} | {v.rjust(24)} |" for k, v in rows] + [line])
