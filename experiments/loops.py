r"""The loops of the training program: iterative and online preference optimisation, and the RLHF
baseline, on the controlled world (`config.loop.kind`, issue 19; docs/online.md, "Loops").

    python -m experiments.main --config=configs/iterative_dpo.py:tiny --workdir=/tmp/it

`experiments.main` runs the SFT and data stages as for offline training, then hands the run to
`run` here, which trains from the SFT base and ends with the program's evaluation (gold reward,
win rate and KL to the base, pair metrics; `summary.json`).

Pairwise loops ("iterative", "online"): `loop.rounds` rounds of `loop.steps_per_round` steps. A
round (r = 0, 1, ...):
  1. sample: `loop.samples_per_prompt` = K completions for each of `loop.prompts_per_round`
     training prompts (`World.prompts`, seed `seed * 1000 + 100 + r`) from the current policy
     (`pofx.world.sample_completions`, `loop.temperature`), the sampler reading the parameters
     where the train step keeps them (no host copy of the weights);
  2. label: `loop.labeller` scores the K candidates (`pofx.labellers`): "gold" (the world's
     reward), "implicit" (DICE: the policy's implicit reward against the SFT base with the length
     penalty alpha, `loop.length_alpha` or DICE's search `labellers.dice_length_alpha`),
     "self_play" (SPIN: the prompts are the first `prompts_per_round` SFT demonstrations, whose
     completion joins the candidates and is preferred to every sample), "reward_model";
  3. pairs: `loop.pairing` (`pofx.pair_construction`), pairs with margin <= `loop.min_margin`
     and pairs of identical completions dropped;
  4. train: each step's batch of `train.batch_size` pairs draws round(`loop.replay` x batch)
     pairs uniformly from the earlier rounds' pairs (DICE's experience replay) and the rest from
     this round's, with replacement, from a numpy generator seeded by (seed, round, step).
     The reference is the SFT base (`loop.reference="keep"`) or, "refresh", the policy at the
     end of the previous round (iterative DPO, IRPO, iLR-DPO, SPIN): `pofx.references.synced`
     with alpha 1 and tau = steps_per_round, so the copy is made inside the step.
  With `loop.offline_first`, round 0 trains on the stage-2 pairs instead (DICE starts from a DPO
  model). "online" is the same loop with fresh samples every `steps_per_round` steps (1 = every
  step): online DPO.

RLHF baseline ("rlhf"): every step samples K completions for each of `prompts_per_round` fresh
prompts, rewards them (gold or reward model) and takes a policy-gradient step on the KL-penalised
return `R = r - kl_coef * (log pi(y|x) - log pi_ref(y|x))` (sequence log-probs, the reference the
SFT base), with RLOO's leave-one-out baseline or REINFORCE's running-mean baseline (`rl_advantages`).

Resuming: a checkpoint (`experiments.checkpointing`) at the end of every round whose last step is
a multiple of `train.checkpoint_every` (and of the last round) holds the train state, the round
reached, the per-round progress, the counters and the SHA-256 of every round's pair buffer
(`<workdir>/loop_buffers/round_<r>.npz`, written before the round trains). All randomness is a
function of the seed, the round and the step (the train state's key is in the checkpoint), so a
run killed anywhere resumes from the last checkpoint and ends with the same parameters, buffers
and summary (wall-clock fields apart) as an uninterrupted run. A workdir's loop record
(`loop_provenance.json`) refuses a rerun under another config unless `--overwrite`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import checkpointing, plots, provenance
from experiments import metrics as metrics_lib
from experiments import reward_model as reward_model_stage
from pofx import (
  batching,
  fingerprints,
  labellers,
  losses,
  pair_construction,
  perturbations,
  policy,
  references,
  reward_models,
  sampling,
  train,
)
from pofx import world as world_lib

LOOP_RECORD = "loop_provenance.json"
BUFFERS = "loop_buffers"
# Config fields that change no result of a loop (logging, checkpoint cadence, the evaluation,
# which is redone when it changes).
# `loop.rounds` is one of them: every round depends on the rounds before it only, so raising it
# continues a finished run exactly (lowering it below the round a workdir reached is refused).
_NOT_RESULTS = (
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.steps",
  "loop.rounds",
  "eval",
  "sweep",
)
# Summary fields that are wall-clock measurements (left out when runs are compared).
WALL_CLOCK = ("pairs_per_second", "flops_per_second", "mfu", "seconds_total", "samples_per_second")


# ------------------------------------------------------------------------------------------------
# The RLHF baseline's estimator (pure)


def rl_advantages(returns, *, estimator: str, group_size: int, baseline=0.0):
  r"""Advantages of a policy-gradient step from returns `[N]` ordered prompt-major in groups of
  `group_size` = K samples of one prompt (Ahmadian et al. 2024, "Back to Basics: Revisiting
  REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv:2402.14740):

    "rloo"       A_i = R_i - 1/(K-1) sum_{j != i} R_j   (the leave-one-out baseline of the other
                 K - 1 samples of the same prompt: the RLOO estimator)
    "reinforce"  A_i = R_i - b   with b the given baseline (the program passes the mean return of
                 all earlier steps, the moving-average baseline of REINFORCE)
  """
  r = jnp.asarray(returns, jnp.float32)
  if estimator == "rloo":
    k = int(group_size)
    if k < 2 or r.shape[0] % k:
      raise ValueError(f"rl_advantages: rloo needs groups of K >= 2 samples; got K={group_size}, N={r.shape[0]}.")
    g = r.reshape(-1, k)
    return (g - (jnp.sum(g, axis=1, keepdims=True) - g) / (k - 1)).reshape(-1)
  if estimator == "reinforce":
    return r - baseline
  raise ValueError(f"rl_advantages: estimator={estimator!r}; allowed: ['rloo', 'reinforce'].")


def make_rl_step(model, optimizer, *, estimator: str, kl_coef: float, group_size: int):
  r"""The jitted RLHF step `(state, prompt_tokens, prompt_mask, tokens, mask, rewards, ref_logps) ->
  (state, metrics)` (donates `state`, a `pofx.train.TrainState` whose `loss_state` is the running
  (sum, count) of returns, REINFORCE's baseline). With the policy's sequence log-prob
  `l(y) = sum_t log pi(y_t | x, y_<t)` (teacher forcing, `pofx.sampling.score`),

      R = r - kl_coef * (l(y) - l_ref(y))          (detached; arXiv:2402.14740)
      loss = -mean_i A_i * l(y_i)                   (A from `rl_advantages`, detached)

  whose gradient is the REINFORCE / RLOO estimate of the gradient of the KL-penalised return."""

  def step(state, prompt_tokens, prompt_mask, tokens, mask, rewards, ref_logps):
    samples = sampling.Samples(prompt_tokens, prompt_mask, tokens, mask, None, None, None, None)
    total, count = state.loss_state
    baseline = jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)

    def objective(params):
      seq = jnp.sum(sampling.score(params, samples, model=model), axis=-1)
      kl = jax.lax.stop_gradient(seq) - ref_logps
      ret = rewards - kl_coef * kl
      adv = jax.lax.stop_gradient(rl_advantages(ret, estimator=estimator, group_size=group_size, baseline=baseline))
      return -jnp.mean(adv * seq), (ret, kl)

    (loss, (ret, kl)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    gnorm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = state.replace(
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      loss_state=(total + jnp.where(ok, jnp.sum(ret), 0.0), count + jnp.where(ok, ret.shape[0], 0.0)),
      step=state.step + 1,
    )
    metrics = {
      "loss": loss,
      "reward": jnp.mean(rewards),
      "kl": jnp.mean(kl),
      "return": jnp.mean(ret),
      "grad_norm": gnorm,
      "nonfinite": (~ok).astype(jnp.float32),
    }
    return new, metrics

  return jax.jit(step, donate_argnums=(0,))


# ------------------------------------------------------------------------------------------------
# Buffers: one file per round of pairs


def _pack(seqs) -> Dict[str, np.ndarray]:
  lens = np.asarray([len(s) for s in seqs], np.int64)
  flat = np.concatenate([np.asarray(s, np.int32) for s in seqs]) if seqs else np.zeros((0,), np.int32)
  return {"tokens": flat, "lengths": lens}


def _unpack(tokens, lengths) -> List[np.ndarray]:
  ends = np.cumsum(lengths)
  return [tokens[e - n : e].copy() for e, n in zip(ends, lengths)]


def save_buffer(path: str, pairs: pair_construction.Pairs) -> str:
  """Writes a round's pairs to `path` (an .npz, atomically) and returns its SHA-256."""
  arrays = {}
  for name in ("prompt", "chosen", "rejected"):
    packed = _pack(getattr(pairs, name))
    arrays[f"{name}_tokens"], arrays[f"{name}_lengths"] = packed["tokens"], packed["lengths"]
  arrays.update(
    chosen_score=pairs.chosen_score,
    rejected_score=pairs.rejected_score,
    prompt_id=pairs.prompt_id,
    num_identical=np.asarray(pairs.num_identical),
  )
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  data = buf.getvalue()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return hashlib.sha256(data).hexdigest()


def load_buffer(path: str, sha256: Optional[str] = None) -> pair_construction.Pairs:
  """A round's pairs from `path`; ValueError when its SHA-256 differs from `sha256`."""
  with open(path, "rb") as f:
    data = f.read()
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise ValueError(f"loop buffer {path} does not match the SHA-256 its checkpoint recorded; use --overwrite.")
  z = np.load(io.BytesIO(data))
  return pair_construction.Pairs(
    prompt=_unpack(z["prompt_tokens"], z["prompt_lengths"]),
    chosen=_unpack(z["chosen_tokens"], z["chosen_lengths"]),
    rejected=_unpack(z["rejected_tokens"], z["rejected_lengths"]),
    chosen_score=z["chosen_score"],
    rejected_score=z["rejected_score"],
    prompt_id=z["prompt_id"],
    num_identical=int(z["num_identical"]),
  )


def _concat(parts: List[pair_construction.Pairs]) -> pair_construction.Pairs:
  return pair_construction.Pairs(
    prompt=[p for x in parts for p in x.prompt],
    chosen=[p for x in parts for p in x.chosen],
    rejected=[p for x in parts for p in x.rejected],
    chosen_score=np.concatenate([x.chosen_score for x in parts]) if parts else np.zeros((0,), np.float32),
    rejected_score=np.concatenate([x.rejected_score for x in parts]) if parts else np.zeros((0,), np.float32),
    prompt_id=np.concatenate([x.prompt_id for x in parts]) if parts else np.zeros((0,), np.int32),
    num_identical=sum(x.num_identical for x in parts),
  )


# ------------------------------------------------------------------------------------------------
# The workdir's loop record


def loop_record(config) -> Dict[str, Any]:
  """The config fields a loop's results depend on (all but `_NOT_RESULTS`) and their fingerprint."""
  values = config.to_dict()
  for dotted in _NOT_RESULTS:
    node, *rest = dotted.split(".")
    if not rest:
      values.pop(node, None)
    else:
      values.get(node, {}).pop(rest[0], None)
  return {"fingerprint": fingerprints.of_values(values), "fields": values}


def _check_record(program, config, workdir: str, overwrite: bool) -> None:
  """Before any compute: a workdir whose loop ran under another config (its record differs), or
  reached more rounds than `config.loop.rounds`, is refused (`provenance.Refused`, one line naming
  why), or with `overwrite` loses its loop outputs; then this config's record is written."""
  path = os.path.join(workdir, LOOP_RECORD)
  record = loop_record(config)
  why = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("fingerprint") != record["fingerprint"]:
      diff = sorted(_diff(old.get("fields", {}), record["fields"]))
      why.append(f"it holds a loop run of another config (differs: {', '.join(diff[:6]) or 'its record'})")
    else:
      steps = provenance.checkpoint_steps(os.path.join(workdir, "checkpoints"))
      reached = max(steps) // config.loop.steps_per_round if steps else 0
      if reached > config.loop.rounds:
        why.append(f"its loop reached round {reached}, more than config.loop.rounds={config.loop.rounds}")
  if why:
    if not overwrite:
      raise provenance.Refused(f"workdir {workdir}: {'; '.join(why)}; use a new --workdir, or --overwrite.")
    for name in ("checkpoints", "checkpoints.damaged", BUFFERS, "final_params", "summary.json"):
      p = os.path.join(workdir, name)
      if os.path.islink(p) or os.path.isfile(p):
        os.unlink(p)
      elif os.path.isdir(p):
        shutil.rmtree(p)
    program._say("loop: --overwrite: removed the loop outputs: %s", "; ".join(why))
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)


def _diff(a, b, prefix=""):
  out = []
  for k in sorted(set(a) | set(b)):
    x, y = a.get(k), b.get(k)
    if isinstance(x, dict) and isinstance(y, dict):
      out += _diff(x, y, f"{prefix}{k}.")
    elif x != y:
      out.append(f"{prefix}{k}")
  return out


# ------------------------------------------------------------------------------------------------
# The program's entry point


def run(program, config, workdir: str, *, progress: bool = True, startup=None, overwrite: bool = False):
  """The SFT and data stages of `program` (the module `experiments.main`), the loop of
  `config.loop.kind`, then the program's evaluation; returns the summary (also `summary.json`)."""
  t_start = time.perf_counter()
  if jax.process_count() > 1:
    raise ValueError(f"config.loop.kind={config.loop.kind!r} runs in one process; got {jax.process_count()}.")
  workdir = os.path.abspath(workdir)
  program.preflight(
    config, workdir, kernels=program.planned_kernels(config, workdir), overwrite=overwrite, stages=("sft", "data")
  )
  _check_record(program, config, workdir, overwrite)
  run_ = program.Run(config, workdir, progress=progress)
  base = program.stage_sft(run_)
  prepared, data_meta = program.stage_data(run_, base)
  summary_path = run_.path("summary.json")
  if config.loop.kind == "rlhf":
    params, info = _rlhf(program, run_, base)
  else:
    params, info = _pairwise(program, run_, prepared, base)
  record = loop_record(config)
  if info.get("resumed_complete") and os.path.exists(summary_path):
    with open(summary_path) as f:
      old = json.load(f)
    if old.get("config_fingerprint") == fingerprints.of_values(config.to_dict()):
      program._say("eval: reusing %s (computed under this config)", summary_path)
      return old
  program._fault("eval")
  results, _ = program.stage_eval(run_, prepared, base, params, data_meta)
  lp = config.loop
  summary = {
    **results,
    "loop": lp.kind,
    "labeller": lp.labeller,
    "loop_rounds": info["rounds"],
    "loop_steps": info["steps"],
    **({"samples_per_second": info["samples_per_second"]} if lp.kind == "rlhf" else {}),
    **({"pairs_per_second": info["pairs_per_second"]} if lp.kind != "rlhf" else {}),
    "nonfinite_steps": info.get("nonfinite_steps", 0),
    "loss": config.train.loss if lp.kind != "rlhf" else f"rlhf.{lp.estimator}",
    "loss_hyper": dict(config.train.loss_hyper),
    "reference": lp.reference if lp.kind != "rlhf" else "keep",
    "seed": config.seed,
    "kernels": run_.kernels_record["name"],
    **({"startup": startup} if startup is not None else {}),
    "seconds_total": time.perf_counter() - t_start,
    "config": config.to_dict(),
    "config_fingerprint": fingerprints.of_values(config.to_dict()),
    "loop_fingerprint": record["fingerprint"],
  }
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  recs = metrics_lib.read_jsonl(run_.path("metrics.jsonl")) if os.path.exists(run_.path("metrics.jsonl")) else []
  recs = [r for r in recs if r.get("stage") == "loop"]
  if recs:
    plots.training_curves(recs, run_.path("training_curves.png"))
  plots.reward_vs_kl(
    [{"label": lp.kind, "kl": summary["kl_to_base"], "gold_reward": summary["gold_reward_policy"]}],
    run_.path("reward_vs_kl.png"),
    base_reward=summary["gold_reward_base"],
  )
  return summary


def _labeller(program, run_, base, params, c, hyper):
  """The round's labeller (`pofx.labellers`) for `config.loop.labeller`, reading `params` (the
  current policy) where it needs it."""
  lp, w = c.loop, run_.world
  if lp.labeller == "gold":
    return labellers.gold(w)
  if lp.labeller == "implicit":
    return labellers.implicit_reward(
      params,
      base,
      model=run_.model,
      beta=float(hyper.get("beta", 0.1)),
      length_alpha=0.0 if lp.length_alpha is None else float(lp.length_alpha),
      prompt_width=w.config.prompt_width,
      completion_width=w.config.max_completion_len,
    )
  if lp.labeller == "reward_model":  # trained by `config.stage="reward_model"` (experiments/reward_model.py)
    # Loaded and compiled once per run (an online loop labels every step).
    kept = run_.__dict__.setdefault("_reward_model_labellers", {})
    if lp.reward_model_checkpoint not in kept:
      rm_params = reward_model_stage.load(lp.reward_model_checkpoint, run_.model_config)
      kept[lp.reward_model_checkpoint] = labellers.reward_model(jax.jit(reward_models.score_fn(run_.model)), rm_params)
    return kept[lp.reward_model_checkpoint]
  raise ValueError(f"config.loop.labeller={lp.labeller!r} has no labeller here.")


def _demonstrations(run_):
  """SPIN's prompts and demonstrations: the first `loop.prompts_per_round` SFT demonstrations
  (the SFT stage's seed)."""
  c = run_.config
  return run_.world.demonstrations(c.loop.prompts_per_round, seed=c.seed * 1000 + 1)


def _offline_pairs(prepared) -> pair_construction.Pairs:
  src = prepared.source("train")
  rows = [src[i] for i in range(len(src))]
  return pair_construction.Pairs(
    prompt=[np.asarray(r["prompt"], np.int32) for r in rows],
    chosen=[np.asarray(r["chosen"], np.int32) for r in rows],
    rejected=[np.asarray(r["rejected"], np.int32) for r in rows],
    chosen_score=np.asarray([float(r["score_chosen"]) for r in rows], np.float32),
    rejected_score=np.asarray([float(r["score_rejected"]) for r in rows], np.float32),
    prompt_id=np.arange(len(rows), dtype=np.int32),
    num_identical=0,
  )


def _sample_round(run_, params, prompts, key, k):
  """K samples per prompt from `params` (prompt-major): `(Samples, completions grouped [N][K])`."""
  lp = run_.config.loop
  rep = [p for p in prompts for _ in range(k)]
  s = world_lib.sample_completions(
    run_.world, params, rep, key, model=run_.model, temperature=float(lp.temperature), batch_size=min(512, len(rep))
  )
  comps = sampling.completions(s)
  return s, [comps[i * k : (i + 1) * k] for i in range(len(prompts))]


def _make_pairs(program, run_, base, params, r, hyper):
  """One round's sample -> label -> pairs; returns (Pairs, progress entry)."""
  c, lp, w = run_.config, run_.config.loop, run_.world
  k = lp.samples_per_prompt
  t = time.perf_counter()
  if lp.labeller == "self_play":
    demos = _demonstrations(run_)
    prompts = demos.prompt
  else:
    prompts = w.prompts(lp.prompts_per_round, seed=c.seed * 1000 + 100 + r)
  samples, groups = _sample_round(run_, params, prompts, run_.key_for(f"loop/sample/{r}"), k)
  sampled_gold = w.gold_reward([p for p in prompts for _ in range(k)], [y for g in groups for y in g])
  candidates = groups
  if lp.labeller == "self_play":
    candidates = [[d] + g for d, g in zip(demos.completion, groups)]
  if lp.labeller == "self_play":
    labeller = labellers.self_play(list(zip(demos.prompt, demos.completion)))
  else:
    labeller = _labeller(program, run_, base, params, c, hyper)
  scores = labeller(prompts, candidates)
  entry = {"round": r, "prompts": len(prompts), "samples": len(prompts) * k, "labels": int(scores.size)}
  if lp.labeller == "implicit" and lp.length_alpha is None:
    lengths = np.asarray([[len(y) for y in g] for g in candidates], np.float32)
    alpha = labellers.dice_length_alpha(scores, lengths)
    scores = (scores - np.float32(alpha) * lengths).astype(np.float32)
    entry["length_alpha"] = alpha
  if lp.pairing == "best_worst":
    index = pair_construction.best_vs_worst(scores)
  elif lp.pairing == "all":
    index = pair_construction.all_pairs(scores)
  else:
    index = pair_construction.random_pairs(scores, seed=[c.seed, r], pairs_per_prompt=1)
  n_all = len(index)
  index = pair_construction.margin_filter(index, float(lp.min_margin))
  pairs = pair_construction.gather(prompts, candidates, scores, index)
  gold_w = w.gold_reward(pairs.prompt, pairs.chosen) if len(pairs) else np.zeros((0,), np.float32)
  gold_l = w.gold_reward(pairs.prompt, pairs.rejected) if len(pairs) else np.zeros((0,), np.float32)
  entry.update(
    pairs=len(pairs),
    dropped_margin=n_all - len(index),
    dropped_identical=pairs.num_identical,
    label_mean=float(np.mean(scores)),
    sampled_gold_reward=float(np.mean(sampled_gold)),
    sampled_length=float(np.mean(samples.lengths)),
    pair_gold_accuracy=float(np.mean(gold_w > gold_l)) if len(pairs) else 0.0,
    seconds_labelled=time.perf_counter() - t,
  )
  return pairs, entry


def _batch(c, program, pairs: pair_construction.Pairs, idx) -> Dict[str, Any]:
  pb = batching.build(
    c.data.layout,
    [pairs.prompt[i] for i in idx],
    [pairs.chosen[i] for i in idx],
    [pairs.rejected[i] for i in idx],
    num_pairs=c.train.batch_size,
    **program._layout_kwargs(c, fixed=True),
  )
  return {"pairs": pb}


def _ckpt_due(c, round_end_step: int, last: bool) -> bool:
  return last or round_end_step % c.train.checkpoint_every == 0


def _check_rounds(run_, reached: int) -> None:
  if reached > run_.config.loop.rounds:
    raise provenance.Refused(
      f"workdir {run_.workdir} reached round {reached} of its loop; config.loop.rounds="
      f"{run_.config.loop.rounds} is lower: use a new --workdir, or --overwrite."
    )


def _pairwise(program, run_, prepared, base):
  """The iterative / online loop (module docstring); returns (params, info)."""
  c, lp = run_.config, run_.config.loop
  spec = losses.spec(c.train.loss)
  hyper = dict(c.train.loss_hyper)
  model = run_.model
  logps_fn = policy.make_logps_fn(model.apply, model.head, kernels=run_.kernels, logit_softcap=model.logit_softcap)
  if lp.reference == "keep":
    reference = references.frozen(base, logps_fn)
  else:  # the previous round's policy: a hard copy at every round's end, inside the step
    reference = references.synced(1.0, lp.steps_per_round, logps_fn)
  optimizer, schedule = program._optimizer(c, kernels=run_.kernels_record["name"])
  step_fn = train.make_train_step(
    logps_fn, optimizer, loss=spec, loss_hyper=hyper, reference=reference, learning_rate_fn=schedule
  )
  state = train.init_state(
    base, optimizer, reference, perturbations.none(), loss=spec, loss_hyper=hyper, rng=run_.key_for("train")
  )
  state = jax.device_put(state, jax.local_devices()[0])
  ckpts = checkpointing.Checkpoints(
    run_.path("checkpoints"),
    keep=c.train.keep_checkpoints,
    say=program._say,
    on_written=lambda s: program._fault(f"save:{s}"),
  )
  start_round, progress, digests, counters = 0, [], {}, {"steps": 0, "seconds": 0.0, "samples": 0, "nonfinite": 0}
  restored = ckpts.restore(state)
  if restored is not None:
    state, meta = restored
    start_round, progress, digests = int(meta["round"]), list(meta["progress"]), dict(meta["buffers"])
    counters = dict(meta["counters"])
    _check_rounds(run_, start_round)
    program._say("loop: resumed at round %d (step %d)", start_round, int(meta["step"]))
  pool = []  # the pairs of the rounds before the current one
  for r in range(start_round):
    pool.append(load_buffer(run_.path(BUFFERS, f"round_{r:04d}.npz"), digests[str(r)]))
  S, B, R = lp.steps_per_round, c.train.batch_size, lp.rounds
  metrics_lib.drop_after(run_.workdir, "loop", start_round * S)
  metrics_lib.drop_after(run_.workdir, "loop_round", start_round)
  writer = metrics_lib.MetricWriter(run_.workdir, "loop", R * S, progress=run_.progress)
  rounds_writer = metrics_lib.MetricWriter(run_.workdir, "loop_round", R, progress=False)
  compiled = False
  for r in range(start_round, R):
    t_round = time.perf_counter()
    if r == 0 and lp.offline_first:
      pairs = _offline_pairs(prepared)
      entry = {"round": 0, "prompts": 0, "samples": 0, "labels": 0, "pairs": len(pairs), "offline": True}
    else:
      pairs, entry = _make_pairs(program, run_, base, state.params, r, hyper)
      counters["samples"] += entry["samples"]
    digests[str(r)] = save_buffer(run_.path(BUFFERS, f"round_{r:04d}.npz"), pairs)
    past = _concat(pool)
    n_replay = int(round(lp.replay * B)) if len(past) else 0
    if len(pairs) == 0 and (n_replay == 0 or len(past) == 0):
      raise ValueError(
        f"loop round {r}: no pairs to train on (every prompt's candidates tied or under loop.min_margin="
        f"{lp.min_margin}, and no earlier round to replay); lower loop.min_margin or raise loop.samples_per_prompt."
      )
    if len(pairs) == 0:
      n_replay = B
    losses_seen = []
    t_train = time.perf_counter()
    mixed = _concat([pairs, past]) if n_replay else pairs
    for s in range(S):
      g = r * S + s
      rng = np.random.default_rng([c.seed, r, s])
      cur = rng.integers(0, len(pairs), B - n_replay) if B > n_replay else np.zeros((0,), np.int64)
      old = rng.integers(0, len(past), n_replay) if n_replay else np.zeros((0,), np.int64)
      idx = np.concatenate([cur, old + len(pairs)]) if n_replay else cur
      batch = _batch(c, program, mixed, idx)
      state, m = step_fn(state, batch, jax.random.fold_in(run_.key_for("loop/steps"), g))
      if not compiled:
        jax.block_until_ready(m["loss"])
        compiled, t_train = True, time.perf_counter()
      else:
        counters["steps"] += 1
      losses_seen.append(m["loss"])
      counters["nonfinite"] += int(np.asarray(m["nonfinite"]))
      if (g + 1) % c.train.log_every == 0 or s == S - 1:
        writer.write(g + 1, dict(m), pairs=B)
      program._fault(f"step:{g + 1}")
    jax.block_until_ready(state.params)
    counters["seconds"] += time.perf_counter() - t_train if compiled else 0.0
    entry.update(train_steps=S, replay_per_batch=n_replay, loss=float(np.mean([float(x) for x in losses_seen])))
    entry.pop("seconds_labelled", None)
    progress.append(entry)
    rounds_writer.write(r + 1, {k: float(v) for k, v in entry.items() if isinstance(v, (int, float))})
    program._say(
      "loop: round %d/%d: %d samples, %d labels, %d pairs (%d under the margin, %d identical), %d train steps "
      "(%d replayed pairs per batch), loss %.4f, %.1fs",
      r + 1,
      R,
      entry["samples"],
      entry["labels"],
      entry["pairs"],
      entry.get("dropped_margin", 0),
      entry.get("dropped_identical", 0),
      S,
      n_replay,
      entry["loss"],
      time.perf_counter() - t_round,
    )
    pool.append(pairs)
    end = (r + 1) * S
    if _ckpt_due(c, end, r == R - 1):
      meta = {"round": r + 1, "step": end, "progress": progress, "buffers": digests, "counters": counters}
      ckpts.save(end, state, meta)
  writer.close()
  rounds_writer.close()
  ckpts.close()
  program._save_params(run_.path("final_params"), state.params)
  info = _info(counters, B, progress, R * S, start_round >= R)
  return state.params, info


def _info(counters, batch_size, progress, steps, complete):
  sec = counters["seconds"]
  return {
    "rounds": progress,
    "steps": steps,
    "pairs_per_second": batch_size * counters["steps"] / sec if sec > 0 else 0.0,
    "nonfinite_steps": int(counters["nonfinite"]),
    "resumed_complete": complete,
  }


def _rlhf(program, run_, base):
  """The REINFORCE / RLOO baseline with a KL penalty to the SFT base (module docstring)."""
  c, lp, w = run_.config, run_.config.loop, run_.world
  k, P = lp.samples_per_prompt, lp.prompts_per_round
  optimizer, _ = program._optimizer(c, kernels=run_.kernels_record["name"])
  params = jax.tree.map(jnp.copy, base)
  state = train.TrainState(
    params=params,
    opt_state=optimizer.init(params),
    ref_state=(),
    perturbation_state=(),
    loss_state=(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
    step=jnp.zeros((), jnp.int32),
    rng=run_.key_for("train"),
  )
  state = jax.device_put(state, jax.local_devices()[0])
  step_fn = make_rl_step(run_.model, optimizer, estimator=lp.estimator, kl_coef=float(lp.kl_coef), group_size=k)
  labeller = _labeller(program, run_, base, None, c, dict(c.train.loss_hyper))
  ckpts = checkpointing.Checkpoints(
    run_.path("checkpoints"),
    keep=c.train.keep_checkpoints,
    say=program._say,
    on_written=lambda s: program._fault(f"save:{s}"),
  )
  start_round, progress, counters = 0, [], {"steps": 0, "seconds": 0.0, "samples": 0, "nonfinite": 0}
  restored = ckpts.restore(state)
  if restored is not None:
    state, meta = restored
    start_round, progress, counters = int(meta["round"]), list(meta["progress"]), dict(meta["counters"])
    _check_rounds(run_, start_round)
    program._say("loop: resumed at round %d (step %d)", start_round, int(meta["step"]))
  S, R = lp.steps_per_round, lp.rounds
  metrics_lib.drop_after(run_.workdir, "loop", start_round * S)
  metrics_lib.drop_after(run_.workdir, "loop_round", start_round)
  writer = metrics_lib.MetricWriter(run_.workdir, "loop", R * S, progress=run_.progress)
  rounds_writer = metrics_lib.MetricWriter(run_.workdir, "loop_round", R, progress=False)
  compiled = False
  for r in range(start_round, R):
    t_round = time.perf_counter()
    seen = {"reward": [], "kl": [], "loss": []}
    for s in range(S):
      g = r * S + s
      prompts = w.prompts(P, seed=c.seed * 1000 + 100 + g)
      samples, groups = _sample_round(run_, state.params, prompts, run_.key_for(f"loop/sample/{g}"), k)
      rewards = labeller(prompts, groups).reshape(-1)
      ref = np.asarray(sampling.score(base, samples, model=run_.model)).sum(-1).astype(np.float32)
      t = time.perf_counter()
      state, m = step_fn(
        state, samples.prompt_tokens, samples.prompt_mask, samples.tokens, samples.mask, jnp.asarray(rewards), ref
      )
      if not compiled:
        jax.block_until_ready(m["loss"])
        compiled = True
      else:
        jax.block_until_ready(m["loss"])
        counters["steps"] += 1
        counters["seconds"] += time.perf_counter() - t
      counters["samples"] += P * k
      counters["nonfinite"] += int(np.asarray(m["nonfinite"]))
      for key in seen:
        seen[key].append(float(m[key]))
      if (g + 1) % c.train.log_every == 0 or s == S - 1:
        writer.write(g + 1, dict(m))
      program._fault(f"step:{g + 1}")
    entry = {
      "round": r,
      "prompts": P * S,
      "samples": P * k * S,
      "labels": P * k * S,
      "train_steps": S,
      "reward": float(np.mean(seen["reward"])),
      "kl": float(np.mean(seen["kl"])),
      "loss": float(np.mean(seen["loss"])),
    }
    progress.append(entry)
    rounds_writer.write(r + 1, {kk: float(v) for kk, v in entry.items()})
    program._say(
      "loop: round %d/%d: %d samples, %d labels, %d train steps, reward %.4f, KL %.4f, %.1fs",
      r + 1,
      R,
      entry["samples"],
      entry["labels"],
      S,
      entry["reward"],
      entry["kl"],
      time.perf_counter() - t_round,
    )
    end = (r + 1) * S
    if _ckpt_due(c, end, r == R - 1):
      ckpts.save(end, state, {"round": r + 1, "step": end, "progress": progress, "counters": counters})
  writer.close()
  rounds_writer.close()
  ckpts.close()
  program._save_params(run_.path("final_params"), state.params)
  info = _info(counters, P * k, progress, R * S, start_round >= R)
  info["samples_per_second"] = info.pop("pairs_per_second")
  return state.params, info
