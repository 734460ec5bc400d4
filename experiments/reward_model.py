"""The reward-model stage of the program: a Bradley-Terry reward model trained on the preference
pairs (`config.stage = "reward_model"`, `configs/reward_model.py`).

    python -m experiments.main --config=configs/reward_model.py --workdir=/tmp/pofx_rm

Stages: (1) the SFT base and (2) the preference data, exactly as a policy run makes them (shared
or reused from the workdir, with their provenance checks), then (3) the reward model
(`pofx.reward_models`): its backbone starts from the SFT base (`reward_model.init="sft"`, as
InstructGPT's reward models start from the SFT model) or from a random init, with a fresh head,
and is trained with AdamW on the training split's pairs, minimising the mean Bradley-Terry loss
`-log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2` with `m = reward_model.margin_scale *
(score_chosen - score_rejected)` (0 by default) and `c = reward_model.center_coefficient`.
Batches are a seeded permutation of the pairs per epoch (`seed`, epoch).

Outputs: `<workdir>/reward_model` (orbax parameters `{"backbone", "head"}`, with its provenance
record: the config fields above and the SFT and data fingerprints); `summary.json` with the
reward accuracy on the held-out pairs (against their labels: `reward_accuracy`) and on the
training pairs, the accuracy against the gold ordering of each held-out pair
(`gold_accuracy`, world data), the mean margin, and the last training loss; metrics in
`metrics.jsonl` (stage "reward_model"). A rerun under the same config reuses the saved reward
model; under another it is refused (or, with `--overwrite`, retrained).

`load(path, model_config)` restores a saved reward model for labelling (`pofx.reward_models.score_fn`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments import metrics as metrics_lib
from experiments import provenance
from pofx import fingerprints, reward_models

OUTPUT = "reward_model"
FIELDS = ("seed", "model.preset", "model.dtype", "model.remat", "reward_model")


def record(c, sft_fp: str, data_fp: str) -> provenance.Record:
  """What the reward model is computed from: its config fields, the SFT base and the data."""
  return provenance.Record("reward_model", fingerprints.fields(c, FIELDS), {"sft": sft_fp, "data": data_fp})


def load(path: str, model_config) -> Dict[str, Any]:
  """The reward model saved at `path` (`<workdir>/reward_model`) for a backbone of `model_config`."""
  like = jax.eval_shape(lambda: reward_models.init(model_config, jax.random.key(0)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)


def _examples(source):
  return [source[i] for i in range(len(source))]


def _rows(examples, width):
  """`(chosen rows, rejected rows, margin inputs)`: right-padded rows of prompt + completion."""
  prompts = [e["prompt"] for e in examples]
  ch = reward_models.pack(prompts, [e["chosen"] for e in examples], width=width)
  rj = reward_models.pack(prompts, [e["rejected"] for e in examples], width=width)
  gap = np.asarray([float(e["score_chosen"]) - float(e["score_rejected"]) for e in examples], np.float32)
  return ch, rj, np.nan_to_num(gap)


def _width(examples) -> int:
  return max(len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) for e in examples)


def _scores(score, params, rows, batch: int) -> np.ndarray:
  """Rewards of many rows in fixed-size batches (the last one padded with copies of row 0)."""
  n = rows[0].shape[0]
  out = []
  for s in range(0, n, batch):
    part = [r[s : s + batch] for r in rows]
    real = part[0].shape[0]
    if real < batch:
      part = [np.concatenate([p, np.repeat(p[:1], batch - real, 0)]) for p in part]
    out.append(np.asarray(score(params, *part))[:real])
  return np.concatenate(out)


def train(run, base_params, prepared, *, say) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Trains and evaluates the reward model of `run` (an `experiments.main.Run`); returns its
  parameters and the summary's results."""
  c = run.config
  rc = c.reward_model
  model = run.model
  score = reward_models.score_fn(model)
  key = run.key_for("reward_model")
  if rc.init == "sft":
    params = reward_models.from_backbone(base_params, key, run.model_config)
  else:
    params = reward_models.init(run.model_config, key)
  train_ex = _examples(prepared.source("train"))
  eval_ex = _examples(prepared.source("eval")) if "eval" in prepared.stats else []
  width = _width(train_ex + eval_ex)
  ch, rj, gap = _rows(train_ex, width)
  n, b = len(train_ex), int(rc.batch_size)
  if n < b:
    raise ValueError(f"reward_model: the training split has {n} pairs, fewer than reward_model.batch_size={b}.")
  opt = optax.chain(
    optax.clip_by_global_norm(float(rc.grad_clip)) if rc.grad_clip else optax.identity(),
    optax.adamw(float(rc.learning_rate), weight_decay=float(rc.weight_decay)),
  )
  opt_state = opt.init(params)
  margin_scale, center = float(rc.margin_scale), float(rc.center_coefficient)

  def objective(p, c_rows, r_rows, g):
    r = score(p, *[jnp.concatenate([x, y]) for x, y in zip(c_rows, r_rows)])
    r_w, r_l = r[: g.shape[0]], r[g.shape[0] :]
    m = margin_scale * g if margin_scale else None
    loss = jnp.mean(reward_models.pair_loss(r_w, r_l, margin=m, center_coefficient=center))
    return loss, {"loss": loss, "accuracy": reward_models.accuracy(r_w, r_l), "margin": jnp.mean(r_w - r_l)}

  @jax.jit
  def step(p, s, c_rows, r_rows, g):
    (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(p, c_rows, r_rows, g)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, aux

  writer = metrics_lib.MetricWriter(run.workdir, OUTPUT, int(rc.steps), progress=run.progress)
  per_epoch = n // b
  t0, aux = time.perf_counter(), None
  for i in range(int(rc.steps)):
    epoch, j = divmod(i, per_epoch)
    perm = np.random.default_rng([int(c.seed), 0x52, epoch]).permutation(n)
    idx = perm[j * b : (j + 1) * b]
    params, opt_state, aux = step(params, opt_state, [x[idx] for x in ch], [x[idx] for x in rj], gap[idx])
    if (i + 1) % int(rc.log_every) == 0 or i + 1 == int(rc.steps):
      writer.write(i + 1, aux, pairs=b)
  writer.close()
  seconds = time.perf_counter() - t0
  out = {
    "steps": int(rc.steps),
    "train_pairs": n,
    "final_loss": float(aux["loss"]) if aux is not None else float("nan"),
    "train_seconds": seconds,
  }
  jscore = jax.jit(score)
  k = min(b, n)
  r_w, r_l = _scores(jscore, params, ch, k), _scores(jscore, params, rj, k)
  out["reward_accuracy_train"] = float(reward_models.accuracy(r_w, r_l))
  if eval_ex:
    e_ch, e_rj, e_gap = _rows(eval_ex, width)
    e_w, e_l = _scores(jscore, params, e_ch, k), _scores(jscore, params, e_rj, k)
    out["reward_accuracy"] = float(reward_models.accuracy(e_w, e_l))
    out["eval_pairs"] = len(eval_ex)
    out["reward_margin"] = float(np.mean(e_w - e_l))
    known = np.isfinite([float(e["score_chosen"]) - float(e["score_rejected"]) for e in eval_ex])
    if known.any():  # against the gold ordering (world data): the label may disagree with it
      gold_sign = np.sign(e_gap[known])
      agree = np.sign(e_w - e_l)[known] == gold_sign
      out["gold_accuracy"] = float(np.mean(agree[gold_sign != 0])) if (gold_sign != 0).any() else None
  say("reward model: %d steps in %.1fs; held-out accuracy %s", int(rc.steps), seconds, out.get("reward_accuracy"))
  return params, out


def run(config, workdir: str, *, lib=None, progress=True, startup=None, overwrite=False):
  """The program's reward-model stage (stages 1-2 shared with policy runs, then the reward
  model); returns the summary. `lib`: the program's module (`experiments.main`, which may run as
  `__main__`); default: imported."""
  if lib is None:
    from experiments import main as lib  # pylint: disable=g-import-not-at-top
  main_lib = lib

  t = time.perf_counter()
  main_lib.preflight(
    config, workdir, kernels=main_lib.planned_kernels(config, workdir), overwrite=overwrite, stages=("sft", "data")
  )
  run_ = main_lib.Run(config, workdir, progress=progress)
  base = main_lib.stage_sft(run_)
  prepared, _ = main_lib.stage_data(run_, base)
  sft_fp = (
    provenance.sft_record(config).fingerprint
    if config.data.source == "world"
    else provenance.base_record(config).fingerprint
  )
  rec = record(config, sft_fp, prepared.fingerprint)
  path, summary_path = run_.path(OUTPUT), run_.path("summary.json")
  if os.path.exists(path):
    why = provenance.differences(provenance.read(path), rec)
    if why and not overwrite:
      raise provenance.Refused(provenance.refusal(run_.workdir, [provenance.Finding("reward_model", OUTPUT, why)]))
    if not why and os.path.exists(summary_path):
      main_lib._say("reward model: reusing %s (computed under this config)", path)
      with open(summary_path) as f:
        return json.load(f)
    main_lib._say("reward model: recomputing %s: %s", path, "; ".join(why) or "no summary")
    provenance.remove(path)
  params, results = train(run_, base, prepared, say=main_lib._say)
  main_lib._save_params(path, params)
  provenance.write(path, rec)
  summary: Dict[str, Optional[Any]] = {
    "stage": "reward_model",
    **results,
    "reward_model_path": path,
    "seed": config.seed,
    "kernels": run_.kernels_record["name"],
    **({"startup": startup} if startup is not None else {}),
    "seconds_total": time.perf_counter() - t,
    "config": config.to_dict(),
    "config_fingerprint": fingerprints.of_values(config.to_dict()),
    "provenance": {"reward_model": rec.to_json()},
  }
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def table(summary: Dict[str, Any]) -> str:
  """The console table of a reward-model summary."""
  keys = ("reward_accuracy", "gold_accuracy", "reward_accuracy_train", "reward_margin", "final_loss", "eval_pairs")
  rows = [(k, f"{summary[k]:.4f}" if isinstance(summary[k], float) else str(summary[k])) for k in keys if k in summary]
  w = max(len(k) for k, _ in rows)
  line = "+" + "-" * (w + 2) + "+" + "-" * 12 + "+"
  return "\n".join([line] + [f"| {k.ljust(w)} | {v.rjust(10)} |" for k, v in rows] + [line])
