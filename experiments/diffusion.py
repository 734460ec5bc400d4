"""The image program: Diffusion-DPO and its descendants on the image world, four resumable stages.

    python -m experiments.main --config=configs/diffusion_dpo.py[:tiny] --workdir=/tmp/run

`experiments.main` checks the config (`configs/validate.py`), claims the workdir and hands an
image-domain config (`config.domain == "image"`) to `run` here:

  1. pretrain  the class-conditioned base denoiser (`pofx.diffusion.unet`; for a cross-attention
               preset, "tiny_prompted", one conditioned on the world's prompts through its fixed
               prompt encoder: `denoiser`) on the world's training digits: epsilon (or v) regression at uniform timesteps, AdamW with warm-up and a
               cosine decay; the base is the EMA of the weights (`pretrain.ema_decay` > 0)
               -> <workdir>/base_params
  2. pairs     `data.num_pairs` class prompts (balanced), two samples each from the base
               (`pofx.diffusion.samplers.sample`), labelled by Bradley-Terry on the gold reward
               (`pofx.diffusion.world`) -> <workdir>/pairs/pairs.npz (with the gold rewards, the
               labeller's probabilities and the binary feedback of each sample); per
               `data.record` also the two reverse chains of each pair with the sampler's per-step
               log-probs and step-wise labels ("chains", `chain_pairs`) or SPO's step-wise pairs
               instead ("spo_steps", `spo_pairs`), or TailorPO's ("tailor_steps", `tailor_pairs`),
               or DenseDPO's structurally similar pairs with a label per band of rows
               ("segments", `segment_pairs`);
               with `data.patch_size` per-patch quality maps
               (`patch_quality`); "lists": `data.list_size` samples per prompt instead, each
               with its share of wins under pairwise Bradley-Terry labels (`ranked_lists`)
  3. train     `pofx.train.make_train_step` on the `logps_fn` of `train.logps` (`logps_fn_of`: the
               pair errors of `pofx.diffusion.pairs.make_logps_fn`, the chains' per-step log-probs
               of `pofx.diffusion.methods.make_trajectory_logps_fn`, PatchDPO's weighted errors,
               DenseDPO's band-signed errors, or the K-way lists' errors of `pofx.diffusion.pairs.make_list_logps_fn`):
               the loss from the registry, the reference strategy and the weight perturbation of
               the config; a fresh PRNG key per pair and step gives its timestep and noise
               -> <workdir>/final_params
  4. eval      `eval.num_samples` class prompts; the policy and the base sample each with the same
               initial and step noise; `pofx.diffusion.evaluation.evaluate` -> summary.json, and
               the PNG grids base_samples.png, policy_samples.png, data_samples.png

Each stage's output holds the record of the config fields and inputs it was computed from
(`experiments.provenance.Record`, `provenance.json` inside the folder): a rerun reuses an output
whose record matches, refuses (before any compute) one whose record differs, or with
`--overwrite` recomputes it and everything after it. The evaluation (seconds) runs on every
call; summary.json holds every stage's record. Metrics of the pretraining and the training go to <workdir>/metrics.jsonl and
TensorBoard (`experiments.metrics.MetricWriter`).

Kernel backend: `model.kernels` "auto" is "xla" for the image domain; a named backend is used as
given (`pofx_backends.kernels`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import pofx_backends
from experiments import metrics as metrics_lib
from experiments import optimizers, provenance
from pofx import fingerprints, losses, perturbations, references, train
from pofx.diffusion import evaluation, methods, samplers, schedules, unet
from pofx.diffusion import pairs as pairs_lib
from pofx.diffusion import world as world_lib
from pofx_backends.cpu import host_memory

STAGES = ("pretrain", "pairs", "train", "eval")
OUTPUTS = {"pretrain": "base_params", "pairs": "pairs", "train": "final_params"}


def _say(msg, *args):
  print("[pofx] " + (msg % args if args else msg), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# What each stage reads


def records(c) -> Dict[str, provenance.Record]:
  """The provenance record of every stage of config `c`, each including its predecessor's."""
  model = tuple(f"model.{k}" for k in c.model.keys() if k != "kernels")  # backends compute the same functions
  pre = provenance.Record("pretrain", fingerprints.fields(c, ("domain", "seed", "world") + model + ("pretrain",)), {})
  pairs = provenance.Record("pairs", fingerprints.fields(c, ("data",)), {"pretrain": pre.fingerprint})
  tr = provenance.Record(
    "train",
    fingerprints.fields(
      c,
      (
        "train.loss",
        "train.loss_hyper",
        "train.steps",
        "train.batch_size",
        "train.grad_accum_steps",
        "train.reference",
        "train.perturbation",
        "train.optimizer",
        "train.scores",
        "train.logps",
        "train.step_labels",
        "train.winner_preserving_mu",
        "train.curriculum",
      ),
    ),
    {"pairs": pairs.fingerprint},
  )
  ev = provenance.Record("eval", fingerprints.fields(c, ("eval", "data")), {"train": tr.fingerprint})
  return {"pretrain": pre, "pairs": pairs, "train": tr, "eval": ev}


def check_workdir(c, workdir: str, *, overwrite: bool = False) -> None:
  """Before any compute: every stage output in `workdir` matches its record, else (without
  `overwrite`) `provenance.Refused` naming the differences; with `overwrite` the first differing
  output and all later ones are removed."""
  recs = records(c)
  for i, stage in enumerate(STAGES[:3]):
    path = os.path.join(workdir, OUTPUTS[stage])
    if not os.path.exists(path):
      continue
    why = provenance.differences(provenance.read(path), recs[stage])
    if not why:
      continue
    if not overwrite:
      raise provenance.Refused(
        f"{workdir}: {OUTPUTS[stage]} was computed under another config ({'; '.join(why)}); "
        "use a new --workdir, or --overwrite."
      )
    for later in STAGES[i:3]:
      if provenance.remove(os.path.join(workdir, OUTPUTS[later])):
        _say("%s: removed (--overwrite: %s)", OUTPUTS[later], "; ".join(why))
    return


def _done(path: str, record: provenance.Record) -> bool:
  return os.path.exists(path) and not provenance.differences(provenance.read(path), record)


def _save_params(path, params, record):
  if os.path.exists(path):
    shutil.rmtree(path)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(path), params)
  ckpt.wait_until_finished()
  provenance.write(path, record)


def _load_params(path, like):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)


# ------------------------------------------------------------------------------------------------
# The pieces


def unet_config(c):
  """The denoiser of config `c`: the preset with the config's fields, sized for the world. A
  class-conditional `UNetConfig` (10 class embeddings), or for a cross-attention preset
  (`unet.UNetConditionConfig`, e.g. "tiny_prompted") one that attends to the world's prompts
  (`model.cross_attention_dim` wide; `model.attention_head_dim` is then the number of heads, as
  diffusers names it)."""
  m = c.model
  fields = dict(
    sample_size=world_lib.IMAGE_SHAPE[0],
    in_channels=world_lib.IMAGE_SHAPE[2],
    out_channels=world_lib.IMAGE_SHAPE[2],
    block_out_channels=tuple(m.block_out_channels),
    down_block_types=tuple(m.down_block_types),
    up_block_types=tuple(m.up_block_types),
    layers_per_block=int(m.layers_per_block),
    attention_head_dim=int(m.attention_head_dim),
    norm_num_groups=int(m.norm_num_groups),
  )
  if prompted(c):
    if m.get("cross_attention_dim") is not None:
      fields["cross_attention_dim"] = int(m.cross_attention_dim)
  else:
    fields["num_class_embeds"] = world_lib.NUM_CLASSES
  return unet.preset(m.preset, **fields)


def prompted(c) -> bool:
  """Whether `c`'s denoiser cross-attends to the world's prompts (a UNetConditionConfig preset)."""
  return isinstance(unet.PRESETS[c.model.preset], unet.UNetConditionConfig)


def denoiser(c, kernels=None):
  """The denoiser record of `c` (`init`, `denoise(params, x_t, t, class_labels)`): the U-Net, or
  for a prompted preset the U-Net behind the world's fixed prompt encoder (`world.PromptEncoder`,
  drawn from `c.seed`), so that every stage passes class labels as for the class-conditional one."""
  config = unet_config(c)
  model = unet.make(config, kernels=kernels if kernels is not None else kernels_of(c)[1])
  if isinstance(config, unet.UNetConditionConfig):
    return unet.Encoded(model, world_lib.PromptEncoder(seed=int(c.seed), dim=config.cross_attention_dim))
  return model


def noise_schedule(c) -> schedules.NoiseSchedule:
  return schedules.make(
    c.model.schedule, int(c.model.num_train_timesteps), prediction_type=str(c.model.prediction_type)
  )


def kernels_of(c):
  name = "xla" if c.model.kernels == "auto" else c.model.kernels
  return name, pofx_backends.kernels(name)


def pretrain(c, world, model, schedule, key, *, workdir: str, progress: bool = True):
  """The base denoiser (module docstring, stage 1): its parameters (the EMA when enabled)."""
  p = c.pretrain
  k_init, k_steps = jax.random.split(key)
  params = model.init(k_init)
  lr = optax.warmup_cosine_decay_schedule(
    0.0, p.learning_rate, max(1, p.warmup_steps), max(p.steps, p.warmup_steps + 1)
  )
  # On one flat vector of all the parameters, as the training stage's XLA optimizer
  # (experiments/optimizers.py).
  opt = optax.flatten(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0)))
  images, labels = jnp.asarray(world.images), jnp.asarray(world.labels)
  batch, decay = int(p.batch_size), float(p.ema_decay)

  @jax.jit
  def step(params, ema, opt_state, key, images, labels):
    k_idx, k_t, k_n = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (batch,), 0, images.shape[0])
    x0, y = images[idx], labels[idx]
    t = jax.random.randint(k_t, (batch,), 0, schedule.num_train_timesteps)
    eps = jax.random.normal(k_n, x0.shape, jnp.float32)
    x_t, target = schedules.add_noise(schedule, x0, eps, t), schedules.target(schedule, x0, eps, t)
    loss, grads = jax.value_and_grad(lambda q: jnp.mean((model.denoise(q, x_t, t, y) - target) ** 2))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, q: decay * e + (1.0 - decay) * q, ema, params)
    return params, ema, opt_state, {"loss": loss}

  writer = metrics_lib.MetricWriter(workdir, "pretrain", p.steps, progress=progress)
  ema, opt_state = params, opt.init(params)
  log_every = max(1, p.steps // 20)
  for s in range(p.steps):
    params, ema, opt_state, m = step(params, ema, opt_state, jax.random.fold_in(k_steps, s), images, labels)
    if (s + 1) % log_every == 0 or s + 1 == p.steps:
      writer.write(s + 1, m, pairs=batch)
  writer.close()
  return ema if decay > 0 else params


def draw(c, model, params, schedule, key, labels) -> np.ndarray:
  """Samples [N, 8, 8, 1] in [-1, 1] for class labels [N], `data.sample_batch` per sampler call
  (the last call padded, so every call has one shape and one compilation); chunk i uses
  `fold_in(key, i)`, so equal keys and labels give equal initial and step noise."""
  d, n, size = c.data, len(labels), int(c.data.sample_batch)
  out = []
  for i in range(-(-n // size)):
    chunk = np.asarray(labels[i * size : (i + 1) * size], np.int32)
    real = len(chunk)
    chunk = np.concatenate([chunk, np.zeros(size - real, np.int32)])
    traj = samplers.sample(
      model.denoise,
      params,
      schedule,
      jax.random.fold_in(key, i),
      jnp.asarray(chunk),
      shape=(size,) + world_lib.IMAGE_SHAPE,
      num_steps=int(d.num_steps),
      sampler=str(d.sampler),
      eta=float(d.eta),
      clip_sample=float(d.clip_sample) if d.clip_sample else None,
    )
    out.append(np.asarray(traj.latents[-1][:real]))
  return np.clip(np.concatenate(out), -1.0, 1.0).astype(np.float32)


def balanced_labels(n: int) -> np.ndarray:
  return (np.arange(n) % world_lib.NUM_CLASSES).astype(np.int32)


def _sample_kwargs(c):
  d = c.data
  return dict(
    num_steps=int(d.num_steps),
    sampler=str(d.sampler),
    eta=float(d.eta),
    clip_sample=float(d.clip_sample) if d.clip_sample else None,
  )


def sample_chains(c, model, params, schedule, key, labels, initial) -> Dict[str, np.ndarray]:
  """The reverse chains of `samplers.sample` for class labels [N] from the initial latents
  `initial` [N, 8, 8, 1], `data.sample_batch` per call (the last padded) with `fold_in(key, i)`
  for chunk i: `latents` [N, S + 1, 8, 8, 1] (x_T first), the sampler's own `log_probs` [N, S]
  (summed over the pixels; 0 on a deterministic step) and `x0` [N, S, 8, 8, 1], the clean image
  each step's prediction implies."""
  n, size = len(labels), int(c.data.sample_batch)
  out: Dict[str, List[np.ndarray]] = {"latents": [], "log_probs": [], "x0": []}
  for i in range(-(-n // size)):
    chunk = np.asarray(labels[i * size : (i + 1) * size], np.int32)
    real = len(chunk)
    x_T = np.zeros((size,) + world_lib.IMAGE_SHAPE, np.float32)
    x_T[:real] = initial[i * size : i * size + real]
    traj = samplers.sample(
      model.denoise,
      params,
      schedule,
      jax.random.fold_in(key, i),
      jnp.asarray(np.concatenate([chunk, np.zeros(size - real, np.int32)])),
      shape=(size,) + world_lib.IMAGE_SHAPE,
      initial_latents=jnp.asarray(x_T),
      **_sample_kwargs(c),
    )
    out["latents"].append(np.swapaxes(np.asarray(traj.latents), 0, 1)[:real])
    out["log_probs"].append(np.asarray(traj.log_probs).T[:real])
    out["x0"].append(np.swapaxes(np.asarray(traj.x0_predictions), 0, 1)[:real])
  return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def _labelled(world, a, b, labels, prefer_a, k_binary) -> Dict[str, np.ndarray]:
  """The pair arrays every record holds: images a and b ordered by `prefer_a`, their gold rewards,
  the labeller's probability and each image's binary feedback."""
  r_a, r_b = world.gold_reward(a, labels), world.gold_reward(b, labels)
  pick = lambda x, y: np.where(prefer_a.reshape(-1, 1, 1, 1), x, y)
  desirable = world.binary_feedback(k_binary, np.concatenate([r_a, r_b]))
  n = len(labels)
  return {
    "chosen": pick(a, b),
    "rejected": pick(b, a),
    "class_labels": np.asarray(labels, np.int32),
    "chosen_reward": np.where(prefer_a, r_a, r_b).astype(np.float32),
    "rejected_reward": np.where(prefer_a, r_b, r_a).astype(np.float32),
    "label_prob": world.preference_prob(np.where(prefer_a, r_a, r_b), np.where(prefer_a, r_b, r_a)).astype(np.float32),
    "chosen_desirable": np.where(prefer_a, desirable[:n], desirable[n:]),
    "rejected_desirable": np.where(prefer_a, desirable[n:], desirable[:n]),
  }


def majority_labelled(world, a, b, labels, metrics):
  """BalancedDPO's labels (`data.labeller` "majority"): each of the world's `metrics` votes for
  the sample it scores higher, the majority orders the pair (`methods.majority_preferences`), and
  pairs without a majority are dropped. Returns a, b, labels and prefer_a of the kept pairs."""
  prefer_a, decided = methods.majority_preferences(
    world.metric_scores(a, labels, metrics), world.metric_scores(b, labels, metrics)
  )
  return a[decided], b[decided], np.asarray(labels)[decided], prefer_a[decided]


def flipped_labels(c, n: int):
  """`data.label_flip`'s synthetic label noise: a bool [n] marking round(label_flip n) pairs drawn
  uniformly without replacement (their own stream of the config's seed), whose labels the pair stage
  reverses; None when label_flip is 0."""
  share = float(c.data.get("label_flip", 0.0))
  if share == 0.0:
    return None
  rng = np.random.default_rng([int(c.seed), 18, 5])
  flipped = np.zeros(n, bool)
  flipped[rng.choice(n, size=int(round(share * n)), replace=False)] = True
  return flipped


def make_pairs(c, world, model, params, schedule, key) -> Dict[str, np.ndarray]:
  """Stage 2: per balanced class prompt, two samples ordered by a Bradley-Terry label on the gold
  reward or by the majority of several metrics (pairing "samples", `data.labeller`; a share
  `data.label_flip` of those labels then reversed: `flipped_labels`), or a
  training digit of the class (chosen) and one sample (pairing "data_vs_sample"); with
  `data.record` "chains", the two samples' reverse chains from one shared x_T and their
  step-wise labels (`chain_pairs`); "spo_steps", SPO's step-wise pairs (`spo_pairs`), or
  "tailor_steps", TailorPO's (`tailor_pairs`), or "segments", DenseDPO's (`segment_pairs`), or "lists",
  K-way ranked lists (`ranked_lists`), or "curriculum", Curriculum DPO's pairs with their reward
  gaps (`curriculum_data`), instead.
  With `data.patch_size`, the per-patch quality maps of each pair (`patch_quality`)."""
  if c.data.record == "spo_steps":
    return spo_pairs(c, world, model, params, schedule, key)
  if c.data.record == "tailor_steps":
    return tailor_pairs(c, world, model, params, schedule, key)
  if c.data.record == "lists":
    return ranked_lists(c, world, model, params, schedule, key)
  if c.data.record == "segments":
    return segment_pairs(c, world, model, params, schedule, key)
  if c.data.record == "chains":
    data = chain_pairs(c, world, model, params, schedule, key)
  elif c.data.record == "curriculum":
    data = curriculum_data(c, world, model, params, schedule, key)
  else:
    k_draw, k_label, k_binary = jax.random.split(key, 3)
    labels = balanced_labels(int(c.data.num_pairs))
    if c.data.pairing == "data_vs_sample":
      b = draw(c, model, params, schedule, k_draw, labels)
      rng = np.random.default_rng([int(c.seed), 18, 4])
      a = np.stack([world.images[rng.choice(np.flatnonzero(world.labels == k))] for k in labels])
      prefer_a = np.ones(len(labels), bool)
    else:
      both = draw(c, model, params, schedule, k_draw, np.concatenate([labels, labels]))
      a, b = both[: len(labels)], both[len(labels) :]
      if c.data.labeller == "majority":
        a, b, labels, prefer_a = majority_labelled(world, a, b, labels, tuple(c.data.metrics))
      else:
        prefer_a = world.bradley_terry(k_label, world.gold_reward(a, labels), world.gold_reward(b, labels))
    flipped = flipped_labels(c, len(labels)) if c.data.pairing == "samples" else None
    if flipped is not None:
      prefer_a = np.where(flipped, ~np.asarray(prefer_a, bool), np.asarray(prefer_a, bool))
    data = _labelled(world, a, b, labels, prefer_a, k_binary)
    if flipped is not None:
      data["label_flipped"] = flipped
  if c.data.patch_size:
    q = patch_quality(world, data["chosen"], data["rejected"], data["class_labels"], int(c.data.patch_size))
    data["chosen_patch_quality"], data["rejected_patch_quality"] = q, q
  return data


def list_scores(wins: np.ndarray) -> np.ndarray:
  """RankDPO's label probabilities from a list's pairwise outcomes: `wins` [N, K, K] bool, `wins[n, i,
  j]` where item i beat item j (exactly one of (i, j) and (j, i) for i != j); `phi_i` = the share of
  the other K - 1 items that i beats (arXiv:2410.18013, Algorithm 1 with one labeller), [N, K]
  float32."""
  k = wins.shape[-1]
  return (np.sum(wins, axis=-1) / (k - 1)).astype(np.float32)


def ranked_lists(c, world, model, params, schedule, key) -> Dict[str, np.ndarray]:
  """K-way ranked lists (`data.record="lists"`; RankDPO, arXiv:2410.18013, Algorithm 1).

  Per balanced class prompt, K = `data.list_size` samples of the base (`draw`: the N prompts' first
  samples, then their second ones, ...); every unordered pair (i, j) of a list gets one
  Bradley-Terry label on the gold reward, as the pair families' pairs (the world's noisy
  labeller standing in for the paper's reward models), and `list_scores` turns the outcomes into
  each image's share of wins `phi`. Arrays: `list_images` [N, K, 8, 8, 1], `list_rewards` (gold)
  and `list_scores` (phi) [N, K], `class_labels` [N]."""
  k_draw, k_label = jax.random.split(key)
  labels, k = balanced_labels(int(c.data.num_pairs)), int(c.data.list_size)
  n = len(labels)
  images = draw(c, model, params, schedule, k_draw, np.tile(labels, k)).reshape((k, n) + world_lib.IMAGE_SHAPE)
  images = np.swapaxes(images, 0, 1)  # [N, K, ...]
  rewards = world.gold_reward(images.reshape((n * k,) + world_lib.IMAGE_SHAPE), np.repeat(labels, k)).reshape(n, k)
  i, j = np.triu_indices(k, 1)
  a_wins = world.bradley_terry(k_label, rewards[:, i], rewards[:, j])  # [N, K (K - 1) / 2]
  wins = np.zeros((n, k, k), bool)
  wins[:, i, j], wins[:, j, i] = a_wins, ~a_wins
  return {
    "list_images": images.astype(np.float32),
    "list_rewards": rewards.astype(np.float32),
    "list_scores": list_scores(wins),
    "class_labels": labels,
  }


def curriculum_data(c, world, model, params, schedule, key) -> Dict[str, np.ndarray]:
  """Curriculum DPO's pairs (`data.record="curriculum"`; Croitoru et al. 2025, arXiv:2405.13637).

  Per balanced class prompt, K = `data.list_size` samples of the base (`draw`, as the lists), scored
  by the gold reward (the paper's reward model); every pair of a prompt's samples whose reward gap
  exceeds `data.curriculum_keep_threshold` is kept, the higher-scored image chosen
  (`methods.curriculum_pairs`, the authors' enumeration). Beside `_labelled`'s arrays, the pairs'
  `reward_gap` [P], which the training's curriculum reads (`curriculum_pool`)."""
  k_draw, k_binary = jax.random.split(key)
  labels, k = balanced_labels(int(c.data.num_pairs)), int(c.data.list_size)
  n = len(labels)
  images = draw(c, model, params, schedule, k_draw, np.tile(labels, k)).reshape((k, n) + world_lib.IMAGE_SHAPE)
  flat = np.swapaxes(images, 0, 1).reshape((n * k,) + world_lib.IMAGE_SHAPE)  # prompt-major
  flat_labels = np.repeat(labels, k)
  rewards = world.gold_reward(flat, flat_labels)
  threshold = float(c.data.curriculum_keep_threshold)
  pairs, gaps = methods.curriculum_pairs(rewards, np.repeat(np.arange(n), k), keep_threshold=threshold)
  if len(pairs) == 0:
    raise ValueError(
      f"config.data.curriculum_keep_threshold={threshold!r}: no pair of the base's samples has a larger gold-reward "
      f"gap (the largest is {float(np.max(np.ptp(rewards.reshape(n, k), axis=1))):.4g}); lower the threshold."
    )
  w, lo = pairs[:, 0], pairs[:, 1]
  data = _labelled(world, flat[w], flat[lo], flat_labels[w], np.ones(len(pairs), bool), k_binary)
  data["reward_gap"] = gaps.astype(np.float32)
  return data


def curriculum_pool(c, data, step: int) -> np.ndarray:
  """The indices of the pairs the training draws from at `step`: every pair, or with Curriculum
  DPO's record the pairs of the current stage (`methods.curriculum_stage`, `curriculum_mask` on
  the pairs' `reward_gap`: the easiest band first, one harder band more every
  `train.curriculum.update_every` steps, every pair from the last stage on)."""
  n = len(data["class_labels"])
  if c.data.record != "curriculum":
    return np.arange(n)
  cur = c.train.curriculum
  stage = methods.curriculum_stage(step, update_every=int(cur.update_every), groups=int(cur.groups))
  return np.flatnonzero(methods.curriculum_mask(data["reward_gap"], stage, groups=int(cur.groups)))


def chain_pairs(c, world, model, params, schedule, key) -> Dict[str, np.ndarray]:
  """Pairs with their reverse chains (`data.record="chains"`; D3PO, the dense-reward view).

  Per balanced class prompt, two chains of `data.sampler` (DDIM with eta > 0, or DDPM) from one
  shared x_T (D3PO's sampling: the second chain starts from the first one's initial latent), with
  independent step noise; the final images are labelled by Bradley-Terry on the gold reward as
  the plain pairs. Beside `_labelled`'s arrays: `chosen_latents`, `rejected_latents` [N, S + 1,
  8, 8, 1] (every latent, x_T first, float32 as sampled: the trainer re-evaluates these exact
  transitions), the sampler's `chosen_log_probs`, `rejected_log_probs` [N, S] (summed over
  pixels), `timesteps`, `prev_timesteps` [S], and the step-wise labels: `chosen_step_rewards`,
  `rejected_step_rewards` [N, S], the gold reward of the clean image predicted at the latent each
  step reaches (the next step's x0_hat, clipped to [-1, 1]; the last step reaches the final image),
  and `step_preference` [N, S] (+1 / -1: a Bradley-Terry draw on those rewards, +1 where the
  chosen chain's step wins)."""
  k_init, k_a, k_b, k_label, k_binary, k_step = jax.random.split(key, 6)
  labels = balanced_labels(int(c.data.num_pairs))
  x_T = np.asarray(jax.random.normal(k_init, (len(labels),) + world_lib.IMAGE_SHAPE, jnp.float32))
  ch_a = sample_chains(c, model, params, schedule, k_a, labels, x_T)
  ch_b = sample_chains(c, model, params, schedule, k_b, labels, x_T)
  a, b = (np.clip(ch["latents"][:, -1], -1.0, 1.0) for ch in (ch_a, ch_b))
  prefer_a = world.bradley_terry(k_label, world.gold_reward(a, labels), world.gold_reward(b, labels))
  data = _labelled(world, a, b, labels, prefer_a, k_binary)
  pick = lambda x, y: np.where(prefer_a.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
  # The clean image of the latent each step reaches: step j's x0_hat at latents[j + 1], the final image last.
  reached = [np.concatenate([ch["x0"][:, 1:], img[:, None]], axis=1) for ch, img in ((ch_a, a), (ch_b, b))]
  reached_w, reached_l = pick(reached[0], reached[1]), pick(reached[1], reached[0])
  steps_major = lambda x: np.swapaxes(x, 0, 1)
  ts, prev = samplers.timesteps(schedule, int(c.data.num_steps))
  data.update(
    chosen_latents=pick(ch_a["latents"], ch_b["latents"]),
    rejected_latents=pick(ch_b["latents"], ch_a["latents"]),
    chosen_log_probs=pick(ch_a["log_probs"], ch_b["log_probs"]),
    rejected_log_probs=pick(ch_b["log_probs"], ch_a["log_probs"]),
    chosen_step_rewards=world.stepwise_rewards(steps_major(reached_w), labels).T.astype(np.float32),
    rejected_step_rewards=world.stepwise_rewards(steps_major(reached_l), labels).T.astype(np.float32),
    step_preference=np.where(
      world.stepwise_labels(k_step, steps_major(reached_w), steps_major(reached_l), labels).T, 1.0, -1.0
    ).astype(np.float32),
    timesteps=ts,
    prev_timesteps=prev,
  )
  return data


def _predicted_x0(model, schedule, params, x, t, cond):
  """The clean image the denoiser predicts at latents x `[B, ...]` of timestep t, clipped to [-1, 1]."""
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  a = schedules.alpha_cumprod(schedule, tb).reshape(-1, 1, 1, 1)
  x0, _ = schedules.x0_and_noise(schedule.prediction_type, x, model.denoise(params, x, tb, cond), a)
  return jnp.clip(x0, -1.0, 1.0)


def _candidate_proposer(c, model, schedule, k: int):
  """A jitted `propose(params, x, t, t_prev, cond, key) -> (candidates, x0)`: k samples of
  x_{t_prev} from each of the `data.sample_batch` latents x_t by the pair stage's sampler,
  `[k, size, 8, 8, 1]`, and the clean image the denoiser predicts at each (`_predicted_x0`):
  SPO's and TailorPO's step-wise candidates."""
  size, kw = int(c.data.sample_batch), _sample_kwargs(c)
  shape = (size,) + world_lib.IMAGE_SHAPE

  @jax.jit
  def propose(params, x, t, t_prev, cond, key):
    tb, pb = jnp.full((size,), t, jnp.int32), jnp.full((size,), t_prev, jnp.int32)
    pred = model.denoise(params, x, tb, cond)
    mean, std, _ = samplers.transition(
      schedule, pred, x, tb, pb, sampler=kw["sampler"], eta=kw["eta"], clip_sample=kw["clip_sample"]
    )
    cands = mean[None] + std[None] * jax.random.normal(key, (k,) + shape, jnp.float32)
    x0 = _predicted_x0(model, schedule, params, cands.reshape((k * size,) + shape[1:]), t_prev, jnp.tile(cond, k))
    return cands, x0.reshape((k,) + shape)

  return propose


def _step_pair_data(world, got, chosen, rejected, k_binary) -> Dict[str, np.ndarray]:
  """The pair arrays of step-wise pairs (SPO's, TailorPO's) from their collected rows `got`:
  `_labelled`'s on the two samples' predicted clean images, the one-step chains (x_t, chosen) and
  (x_t, rejected) `[P, 2, 8, 8, 1]`, their timesteps `[P, 1]` and the step index."""
  data = _labelled(world, got["x0_w"], got["x0_l"], got["y"], np.ones(len(got["y"]), bool), k_binary)
  data.update(
    chosen_latents=np.stack([got["x_t"], got[chosen]], axis=1).astype(np.float32),
    rejected_latents=np.stack([got["x_t"], got[rejected]], axis=1).astype(np.float32),
    timesteps=got["t"][:, None],
    prev_timesteps=got["tp"][:, None],
    step_index=got["i"],
  )
  return data


def spo_pairs(c, world, model, params, schedule, key) -> Dict[str, np.ndarray]:
  """SPO's step-wise pairs (`data.record="spo_steps"`; Liang et al. 2025, arXiv:2406.04314, Sec. 4,
  and the authors' `multi_sample_pipeline.py`).

  Per balanced class prompt, one chain of `data.sampler`: at each step i >= `data.spo_start_step`
  whose transition is random, k = `data.spo_candidates` samples of x_{t_prev} are drawn from the
  shared x_t; each candidate is scored by the step-aware stand-in of the image world, the gold
  reward of the clean image the denoiser predicts at the candidate (at t_prev, clipped to
  [-1, 1]) times `world.label_scale`, so that `softmax` of two scores is the world's Bradley-Terry
  probability; the best and the worst make a pair kept when `methods.spo_select` finds them apart
  by more than `data.spo_threshold`; the chain continues from a uniformly drawn candidate. Rows
  (P kept pairs): `chosen_latents`, `rejected_latents` [P, 2, 8, 8, 1] (x_t and the best / worst
  candidate), `timesteps`, `prev_timesteps` [P, 1], `class_labels`, `step_index` [P], and
  `_labelled`'s arrays on the candidates' predicted clean images (`chosen`, `rejected`, their
  rewards). `spo_steps_seen` is the number of (prompt, step) candidate sets scored."""
  d = c.data
  k, size, n = int(d.spo_candidates), int(d.sample_batch), int(d.num_pairs)
  labels = balanced_labels(n)
  ts, prev = samplers.timesteps(schedule, int(d.num_steps))
  shape = (size,) + world_lib.IMAGE_SHAPE
  propose = _candidate_proposer(c, model, schedule, k)

  k_init, k_steps, k_pick, k_binary = jax.random.split(key, 4)
  rows: Dict[str, List[np.ndarray]] = {n_: [] for n_ in ("x_t", "best", "worst", "x0_w", "x0_l", "t", "tp", "y", "i")}
  seen = 0
  for ci in range(-(-n // size)):
    chunk = labels[ci * size : (ci + 1) * size]
    real = len(chunk)
    cond = jnp.asarray(np.concatenate([chunk, np.zeros(size - real, np.int32)]))
    y = np.asarray(cond)
    x = jax.random.normal(jax.random.fold_in(k_init, ci), shape, jnp.float32)
    for i, (t, tp) in enumerate(zip(ts.tolist(), prev.tolist())):
      cands, x0 = propose(params, x, t, tp, cond, jax.random.fold_in(jax.random.fold_in(k_steps, ci), i))
      if i >= int(d.spo_start_step) and tp >= 0:
        x0_np = np.asarray(x0)
        r = world.gold_reward(x0_np.reshape((k * size,) + shape[1:]), np.tile(y, k)).reshape(k, size)
        best, worst, valid = (
          np.asarray(v) for v in methods.spo_select(world.config.label_scale * r.T, threshold=float(d.spo_threshold))
        )
        keep = np.flatnonzero(valid[:real])
        seen += real
        cands_np, x_np, ar = np.asarray(cands), np.asarray(x), np.arange(size)
        for name, v in (
          ("x_t", x_np),
          ("best", cands_np[best, ar]),
          ("worst", cands_np[worst, ar]),
          ("x0_w", x0_np[best, ar]),
          ("x0_l", x0_np[worst, ar]),
        ):
          rows[name].append(v[keep])
        rows["t"].append(np.full(len(keep), t, np.int32))
        rows["tp"].append(np.full(len(keep), tp, np.int32))
        rows["y"].append(y[keep])
        rows["i"].append(np.full(len(keep), i, np.int32))
        choice = jax.random.randint(jax.random.fold_in(jax.random.fold_in(k_pick, ci), i), (size,), 0, k)
        x = cands[choice, jnp.arange(size)]
      else:
        x = cands[0]
  got = {name: np.concatenate(v) for name, v in rows.items()}
  if not len(got["y"]):
    raise ValueError(
      f"pairs: no SPO step-wise pair among {seen} candidate sets passed data.spo_threshold={d.spo_threshold}; "
      "lower it (allowed: [0, 1))."
    )
  data = _step_pair_data(world, got, "best", "worst", k_binary)
  data["spo_steps_seen"] = np.asarray(seen)
  return data


def tailor_pairs(c, world, model, params, schedule, key) -> Dict[str, np.ndarray]:
  """TailorPO's step-wise pairs (`data.record="tailor_steps"`; Ren et al. 2025, arXiv:2502.01667,
  section 3.3 and Algorithm 1).

  Per balanced class prompt, one chain of `data.sampler`: at every random step two samples of
  x_{t_prev} are drawn from the shared x_t and ranked by their step-wise rewards, the gold reward
  of the clean image the base predicts at each (at t_prev, clipped to [-1, 1]; eq. 12)
  (`methods.tailor_rank`). With `data.tailor_eta` > 0 (TailorPO-G) the preferred sample is moved
  along the gradient of its step-wise reward (`methods.reward_guidance` with `data.tailor_delta`;
  kept where the reward rose). The chain continues from the preferred sample. The steps
  `data.spo_start_step`, `+ data.tailor_every`, ... record their pair (the paper fine-tunes at 5 of
  its 20 steps). Rows as `spo_pairs`'s (`chosen_latents`, `rejected_latents` [P, 2, 8, 8, 1]: x_t
  and the preferred / other sample), plus `guided` [P] (whether guidance moved the preferred
  sample); `tailor_steps_seen` counts the (prompt, step) pairs ranked at recorded steps."""
  d = c.data
  size, n = int(d.sample_batch), int(d.num_pairs)
  every, start, eta, delta = int(d.tailor_every), int(d.spo_start_step), float(d.tailor_eta), float(d.tailor_delta)
  labels = balanced_labels(n)
  ts, prev = samplers.timesteps(schedule, int(d.num_steps))
  shape = (size,) + world_lib.IMAGE_SHAPE
  propose = _candidate_proposer(c, model, schedule, 2)

  @jax.jit
  def guide(params, x, t_prev, cond):
    x0_hat = lambda v: _predicted_x0(model, schedule, params, v, t_prev, cond)
    x_new, accepted = methods.reward_guidance(lambda v: world.gold_reward_jax(x0_hat(v), cond), x, eta=eta, delta=delta)
    return x_new, accepted, x0_hat(x_new)

  k_init, k_steps, k_binary = jax.random.split(key, 3)
  names = ("x_t", "w", "l", "x0_w", "x0_l", "t", "tp", "y", "i", "guided")
  rows: Dict[str, List[np.ndarray]] = {name: [] for name in names}
  seen = 0
  for ci in range(-(-n // size)):
    chunk = labels[ci * size : (ci + 1) * size]
    real = len(chunk)
    cond = jnp.asarray(np.concatenate([chunk, np.zeros(size - real, np.int32)]))
    y, ar = np.asarray(cond), np.arange(size)
    x = jax.random.normal(jax.random.fold_in(k_init, ci), shape, jnp.float32)
    for i, (t, tp) in enumerate(zip(ts.tolist(), prev.tolist())):
      cands, x0 = propose(params, x, t, tp, cond, jax.random.fold_in(jax.random.fold_in(k_steps, ci), i))
      if tp < 0:  # the last step, to the clean image: deterministic, nothing to rank
        x = cands[0]
        continue
      x0_np, cands_np = np.asarray(x0), np.asarray(cands)
      r = world.gold_reward(x0_np.reshape((2 * size,) + shape[1:]), np.tile(y, 2)).reshape(2, size)
      w, l, ranked = (np.asarray(v) for v in methods.tailor_rank(r.T))
      x_w, x0_w, guided = cands_np[w, ar], x0_np[w, ar], np.zeros(size, bool)
      if eta > 0:
        x_w, guided, x0_w = (np.asarray(v) for v in guide(params, jnp.asarray(x_w), tp, cond))
      if i >= start and (i - start) % every == 0:
        keep = np.flatnonzero(ranked[:real])
        seen += real
        for name, v in (
          ("x_t", np.asarray(x)),
          ("w", x_w),
          ("l", cands_np[l, ar]),
          ("x0_w", x0_w),
          ("x0_l", x0_np[l, ar]),
        ):
          rows[name].append(v[keep])
        for name, v in (("t", t), ("tp", tp), ("i", i)):
          rows[name].append(np.full(len(keep), v, np.int32))
        rows["y"].append(y[keep])
        rows["guided"].append(guided[keep])
      x = jnp.asarray(x_w)
  got = {name: np.concatenate(v) for name, v in rows.items()}
  if not len(got["y"]):
    raise ValueError(f"pairs: no TailorPO pair was ranked among {seen} (prompt, step) pairs.")
  data = _step_pair_data(world, got, "w", "l", k_binary)
  data.update(guided=got["guided"], tailor_steps_seen=np.asarray(seen))
  return data


def _band_swapped(x, y, rows: int) -> np.ndarray:
  """`[N, F, 8, 8, 1]`: x with its band f (rows f*rows ... (f+1)*rows - 1) replaced by y's, for every f."""
  f = world_lib.IMAGE_SHAPE[0] // rows
  out = np.repeat(np.asarray(x, np.float32)[:, None], f, axis=1)
  for i in range(f):
    out[:, i, i * rows : (i + 1) * rows] = y[:, i * rows : (i + 1) * rows]
  return out


def band_advantages(world, a, b, labels, rows: int) -> np.ndarray:
  """`[N, F]`: how much better a's band f is than b's under the gold reward, by swapping it.

  The gold reward does not decompose over bands of rows (its classifier reads the whole image), so
  the advantage of band f is the mean of the two swap tests:
  `d_f = ((r*(a) - r*(a with b's band f)) + (r*(b with a's band f) - r*(b))) / 2`: positive where
  a's band raises the reward, the same for (a, b) and -(b, a)."""
  n, f = len(labels), world_lib.IMAGE_SHAPE[0] // rows
  flat = lambda v: v.reshape((-1,) + world_lib.IMAGE_SHAPE)
  y = np.repeat(np.asarray(labels, np.int32), f)
  r_a, r_b = world.gold_reward(a, labels), world.gold_reward(b, labels)
  r_a_sw = world.gold_reward(flat(_band_swapped(a, b, rows)), y).reshape(n, f)
  r_b_sw = world.gold_reward(flat(_band_swapped(b, a, rows)), y).reshape(n, f)
  return (0.5 * ((r_a[:, None] - r_a_sw) + (r_b_sw - r_b[:, None]))).astype(np.float32)


def segment_labels(world, key, advantages, tie: float) -> np.ndarray:
  """DenseDPO's band labels `[N, F]` in {-1, 0, +1} from `band_advantages`: 0 (a tie) where
  `|d_f| < tie`, otherwise a Bradley-Terry draw on the band, +1 with probability
  `sigmoid(label_scale * d_f)` (the world's labeller, one draw per band)."""
  d = np.asarray(advantages, np.float64)
  prefer_a = np.asarray(jax.random.uniform(key, d.shape)) < world.preference_prob(d, 0.0)
  return np.where(np.abs(d) < tie, 0, np.where(prefer_a, 1, -1)).astype(np.int8)


def segment_pairs(c, world, model, params, schedule, key) -> Dict[str, np.ndarray]:
  """DenseDPO's structurally similar pairs with band labels (`data.record="segments"`; Wu et al.
  2025, arXiv:2506.03517, section 3.2 eq. 6 and Algorithm 2, section 3.3, appendix A.3).

  Per balanced class prompt, a training digit x of the class and a guidance level eta drawn
  uniformly from [`data.guidance_min`, `data.guidance_max`] (the paper's [0.65, 0.8]); two copies of
  x are noised with two noises to the sampler step of the same signal-to-noise ratio as
  rectified-flow time eta (`methods.guided_start_index`) and both are denoised from there by the
  pair stage's sampler (`_candidate_proposer`, one candidate per step). Each band of
  `data.segment_rows` rows gets a label (`band_advantages`, `segment_labels` with
  `data.segment_tie`); pairs whose share of non-tie bands is below `data.min_nontie_fraction` are
  dropped (A.3: 20%). The sample whose bands win more often (the higher gold reward on a draw) is
  "chosen" and the labels are stored relative to it (`segment_labels` [P, F] int8), with
  `band_advantages` [P, F], `guidance` [P] and `start_index` [P] (the first sampler step run)."""
  d = c.data
  n, size, rows = int(d.num_pairs), int(d.sample_batch), int(d.segment_rows)
  labels = balanced_labels(n)
  rng = np.random.default_rng([int(c.seed), 18, 7])
  real = np.stack([world.images[rng.choice(np.flatnonzero(world.labels == k))] for k in labels])
  guidance = rng.uniform(float(d.guidance_min), float(d.guidance_max), n)
  ts, prev = samplers.timesteps(schedule, int(d.num_steps))
  start = methods.guided_start_index(schedule, ts, guidance)
  shape = (size,) + world_lib.IMAGE_SHAPE
  propose = _candidate_proposer(c, model, schedule, 1)
  k_noise, k_steps, k_label, k_binary = jax.random.split(key, 4)
  out = ([], [])
  for ci in range(-(-n // size)):
    chunk = labels[ci * size : (ci + 1) * size]
    m = len(chunk)
    pad = lambda v, fill=0: np.concatenate([v, np.full((size - m,) + v.shape[1:], fill, v.dtype)])
    cond = jnp.asarray(pad(chunk))
    x_real, first = jnp.asarray(pad(real[ci * size : ci * size + m])), pad(start[ci * size : ci * size + m], len(ts))
    for member in (0, 1):
      k_member = jax.random.fold_in(jax.random.fold_in(k_noise, ci), member)
      eps = jax.random.normal(k_member, shape, jnp.float32)
      x = np.zeros(shape, np.float32)
      for i, (t, tp) in enumerate(zip(ts.tolist(), prev.tolist())):
        now = (first == i).reshape(-1, 1, 1, 1)
        x = np.where(now, np.asarray(schedules.add_noise(schedule, x_real, eps, jnp.full((size,), t, jnp.int32))), x)
        running = (first <= i).reshape(-1, 1, 1, 1)
        if not running.any():
          continue
        key_i = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k_steps, ci), member), i)
        cands, _ = propose(params, jnp.asarray(x), t, tp, cond, key_i)
        x = np.where(running, np.asarray(cands[0]), x)
      out[member].append(np.clip(x[:m], -1.0, 1.0))
  a, b = (np.concatenate(v).astype(np.float32) for v in out)
  adv = band_advantages(world, a, b, labels, rows)
  lab = segment_labels(world, k_label, adv, float(d.segment_tie))
  keep = np.mean(lab != 0, axis=1) >= float(d.min_nontie_fraction)
  if not keep.any():
    raise ValueError(
      f"pairs: no DenseDPO pair has data.min_nontie_fraction={d.min_nontie_fraction} of its bands labelled "
      f"(data.segment_tie={d.segment_tie}; |band advantage| median {np.median(np.abs(adv)):.3g})."
    )
  a, b, labels, adv, lab, guidance, start = (v[keep] for v in (a, b, labels, adv, lab, guidance, start))
  wins = np.sum(lab, axis=1)
  prefer_a = (wins > 0) | ((wins == 0) & (world.gold_reward(a, labels) >= world.gold_reward(b, labels)))
  sign = np.where(prefer_a, 1, -1)[:, None]
  data = _labelled(world, a, b, labels, prefer_a, k_binary)
  data.update(
    segment_labels=(sign * lab).astype(np.int8),
    band_advantages=(sign * adv).astype(np.float32),
    guidance=guidance.astype(np.float32),
    start_index=start.astype(np.int32),
  )
  return data


def patch_quality(world, chosen, rejected, labels, patch_size: int) -> np.ndarray:
  """PatchDPO's per-patch quality of the generation (`rejected`) against the reference image
  (`chosen`), [N, 8 / p, 8 / p] float32 in (0, 1), p = `patch_size`.

  The gold reward does not decompose over patches (its classifier term reads the whole image; only
  the ink term does), so the quality of patch (i, j) is an occlusion test on the gold reward: the
  labeller's Bradley-Terry probability that the generation is preferred to the generation with
  that patch replaced by the reference image's patch,
  `q = sigmoid(label_scale * (r*(x_gen) - r*(x_gen with patch (i, j) of x_ref)))`: near 1 where the
  generation's patch is better than the reference's, near 0 where the reference's would raise the
  reward, 1/2 where the swap changes nothing. The images are aligned (the same 8x8 frame), so a
  generated patch is matched to the reference's patch at the same place and the reference image's
  map is the same `q` (PatchDPO weighs it by `1 - q`)."""
  x_gen, x_ref = np.asarray(rejected, np.float32), np.asarray(chosen, np.float32)
  n, side = len(labels), world_lib.IMAGE_SHAPE[0]
  h = side // int(patch_size)
  swapped = np.repeat(x_gen[:, None], h * h, axis=1)
  for p in range(h * h):
    i, j = divmod(p, h)
    rows, cols = slice(i * patch_size, (i + 1) * patch_size), slice(j * patch_size, (j + 1) * patch_size)
    swapped[:, p, rows, cols] = x_ref[:, rows, cols]
  r_swapped = world.gold_reward(swapped.reshape((-1,) + world_lib.IMAGE_SHAPE), np.repeat(labels, h * h))
  r = world.gold_reward(x_gen, labels)
  return world.preference_prob(r[:, None], r_swapped.reshape(n, h * h)).reshape(n, h, h).astype(np.float32)


def _reference(c, base_params, logps_fn):
  r, kind = c.train.reference, c.train.reference.kind
  if kind == "none":
    return references.none()
  if kind == "frozen":
    return references.frozen(base_params, logps_fn)
  if kind == "synced":
    return references.synced(r.alpha, r.tau, logps_fn)
  if kind == "ema":
    return references.ema(r.decay, logps_fn)
  raise ValueError(f"config.train.reference.kind={kind!r} is not allowed for images.")


def reference_of(c, spec, base_params, logps_fn):
  """The train step's reference strategy: `train.reference.kind`'s (`_reference`), inside
  `references.ema_companions` (EMA copies of the policy scored beside it, with
  `train.reference.companion_decays` and `companion_warmup`) when the loss requires "companions"
  (Adaptive-DPO); a cached one refused (`pairs.check_reference`)."""
  reference = _reference(c, base_params, logps_fn)
  if "companions" in spec.requires:
    r = c.train.reference
    reference = references.ema_companions(
      reference, logps_fn, decays=tuple(r.companion_decays), warmup=int(r.companion_warmup)
    )
  return pairs_lib.check_reference(reference)


def _perturbation(c):
  p = c.train.perturbation
  if p.kind == "sam":
    return perturbations.sam(p.rho, adaptive=p.adaptive)
  if p.kind == "awp":
    return perturbations.awp(p.gamma)
  if p.kind == "rwp":
    return perturbations.rwp(p.gamma, c_min=p.c_min, steps=p.steps)
  return perturbations.none()


def logps_fn_of(c, model, schedule):
  """The train step's `logps_fn` for `train.logps`: the pair's denoising errors
  (`pairs.make_logps_fn`), the recorded chains' per-step DDIM(eta) / DDPM log-probs averaged over
  the pixels (`methods.make_trajectory_logps_fn`, the sampler and eta of the pair stage), the
  patch-weighted errors (`methods.make_patch_logps_fn`), DenseDPO's errors signed by the band
  labels (`methods.make_dense_logps_fn`), or the errors of a list's K images under one timestep
  and noise per list (`pairs.make_list_logps_fn`). With `train.winner_preserving_mu`,
  the pair errors carry Diffusion-SDPO's safeguard (`methods.make_pair_logps_fn`)."""
  if c.train.logps == "trajectory":
    kw = _sample_kwargs(c)
    return methods.make_trajectory_logps_fn(
      model.denoise, schedule, eta=kw["eta"], sampler=kw["sampler"], reduce="mean", clip_sample=kw["clip_sample"]
    )
  if c.train.logps == "patch":
    return methods.make_patch_logps_fn(methods.make_pairs_predict(model.denoise, schedule))
  if c.train.logps == "lists":
    return pairs_lib.make_list_logps_fn(model.denoise, schedule)
  if c.train.logps == "segments":
    return methods.make_dense_logps_fn(methods.make_pairs_predict(model.denoise, schedule))
  if c.train.winner_preserving_mu is not None:  # Diffusion-SDPO: the loser's gradient scaled
    return methods.make_pair_logps_fn(
      methods.make_pairs_predict(model.denoise, schedule), winner_preserving_mu=float(c.train.winner_preserving_mu)
    )
  return pairs_lib.make_logps_fn(model.denoise, schedule)


def random_steps(data) -> int:
  """The number of random (std > 0) steps of the recorded chains, which come first: a step to
  t_prev < 0 (the clean image) is deterministic and has no density."""
  prev = np.asarray(data["prev_timesteps"])
  return int(np.sum(prev >= 0)) if prev.ndim == 1 else prev.shape[1]


def make_batch(c, spec, data, idx, noise_keys) -> Dict[str, Any]:
  """One (micro-)batch of the pairs (or lists) `idx` for `logps_fn_of(c, ...)`; `noise_keys`
  [len(idx), 2] (each pair's or list's timestep and noise, read by the error-based log-probs)."""
  b: Dict[str, Any]
  if c.train.logps == "trajectory":
    s = random_steps(data)
    ts, prev = np.asarray(data["timesteps"]), np.asarray(data["prev_timesteps"])
    ts, prev = (ts[:s], prev[:s]) if ts.ndim == 1 else (ts[idx].T, prev[idx].T)
    b = {
      "chosen_latents": jnp.asarray(np.swapaxes(data["chosen_latents"][idx, : s + 1], 0, 1)),
      "rejected_latents": jnp.asarray(np.swapaxes(data["rejected_latents"][idx, : s + 1], 0, 1)),
      "timesteps": jnp.asarray(ts, jnp.int32),
      "prev_timesteps": jnp.asarray(prev, jnp.int32),
      "class_labels": jnp.asarray(data["class_labels"][idx]),
      "pair_mask": jnp.ones((len(idx),), jnp.float32),
    }
    if c.train.step_labels:
      b["step_preference"] = jnp.asarray(data["step_preference"][idx, :s], jnp.float32)
  elif c.train.logps == "lists":
    b = {
      "lists": pairs_lib.ImageLists(
        images=jnp.asarray(data["list_images"][idx]),
        class_labels=jnp.asarray(data["class_labels"][idx]),
        noise_keys=noise_keys,
      ),
      "scores": jnp.asarray(data["list_scores"][idx], jnp.float32),
      "pair_mask": jnp.ones((len(idx),), jnp.float32),
    }
  else:
    b = {
      "pairs": pairs_lib.ImagePairs(
        chosen=jnp.asarray(data["chosen"][idx]),
        rejected=jnp.asarray(data["rejected"][idx]),
        class_labels=jnp.asarray(data["class_labels"][idx]),
        noise_keys=noise_keys,
        pair_mask=jnp.ones((len(idx),), jnp.float32),
      )
    }
    if c.train.logps == "patch":
      b["chosen_patch_quality"] = jnp.asarray(data["chosen_patch_quality"][idx])
      b["rejected_patch_quality"] = jnp.asarray(data["rejected_patch_quality"][idx])
    if c.train.logps == "segments":
      b["segment_labels"] = jnp.asarray(data["segment_labels"][idx], jnp.float32)
  if "scores" in spec.requires:
    kind = "reward" if c.train.scores == "reward" else "desirable"
    b["chosen_scores"] = jnp.asarray(data[f"chosen_{kind}"][idx], jnp.float32)
    b["rejected_scores"] = jnp.asarray(data[f"rejected_{kind}"][idx], jnp.float32)
  return b


def train_policy(c, model, base_params, schedule, data, key, *, workdir: str, progress: bool = True):
  """Stage 3: preference training through `pofx.train` (`logps_fn_of`). Returns (params, info)."""
  spec, hyper = losses.spec(c.train.loss), dict(c.train.loss_hyper)
  logps_fn = logps_fn_of(c, model, schedule)
  reference = reference_of(c, spec, base_params, logps_fn)
  optimizer, lr = optimizers.from_config(c, kernels=kernels_of(c)[0], flat=True)
  perturbation = _perturbation(c)
  p = c.train.perturbation
  n_acc = c.train.batch_size // p.m if p.kind == "sam" and p.m is not None else c.train.grad_accum_steps
  step_fn = train.make_train_step(
    logps_fn,
    optimizer,
    loss=spec,
    loss_hyper=hyper,
    reference=reference,
    perturbation=perturbation,
    grad_accum_steps=n_acc,
    learning_rate_fn=lr,
  )
  k_state, k_noise, k_step = jax.random.split(key, 3)
  state = train.init_state(
    jax.tree.map(jnp.copy, base_params), optimizer, reference, perturbation, loss=spec, loss_hyper=hyper, rng=k_state
  )
  # Every leaf on the one device, committed: parameters restored from a checkpoint are, the fresh
  # counters and keys are not, and the step's outputs are; a first state mixing both would be
  # lowered with other argument shardings than the next ones, and the step compiled twice.
  state = jax.device_put(state, jax.local_devices()[0])
  n, batch = len(data["class_labels"]), int(c.train.batch_size)
  micro = batch // n_acc
  order_rng = np.random.default_rng([int(c.seed), 18, 3])
  order: List[int] = []
  pool = np.arange(n)
  writer = metrics_lib.MetricWriter(workdir, "train", c.train.steps, progress=progress)
  nonfinite, start = 0, time.perf_counter()
  for s in range(c.train.steps):
    now = curriculum_pool(c, data, s)  # every pair, or the curriculum's current stage
    if not np.array_equal(now, pool):
      pool, order = now, []
    while len(order) < batch:
      order += pool[order_rng.permutation(len(pool))].tolist()
    idx, order = np.asarray(order[:batch]), order[batch:]
    keys = jax.random.split(jax.random.fold_in(k_noise, s), batch)
    if n_acc == 1:
      b = make_batch(c, spec, data, idx, keys)
    else:  # grad accumulation (and SAM's m-sharpness): micro-batches stacked on a leading axis
      b = train.stack_microbatches(
        [make_batch(c, spec, data, idx[i : i + micro], keys[i : i + micro]) for i in range(0, batch, micro)]
      )
    state, m = step_fn(state, b, jax.random.fold_in(k_step, s))
    if s == 0:
      # With freed memory retained (pofx_backends.startup), the first step's freed temporaries
      # cannot serve the next step's aligned request: hand their pages back once, here.
      jax.block_until_ready((state, m))
      host_memory.release_after_first_step()
    if (s + 1) % c.train.log_every == 0 or s + 1 == c.train.steps:
      rec = writer.write(s + 1, m, pairs=batch)
      nonfinite += int(rec.get("nonfinite", 0) > 0)
  jax.block_until_ready(state.params)
  seconds = time.perf_counter() - start
  writer.close()
  info = {"train_seconds": seconds, "pairs_per_second": c.train.steps * batch / max(seconds, 1e-9)}
  if "companions" in spec.requires:
    info.update(
      companion_diagnostics(c, hyper, logps_fn, reference, state, data, jax.random.fold_in(k_noise, c.train.steps))
    )
  return state.params, info


def companion_diagnostics(c, hyper, logps_fn, reference, state, data, key) -> Dict[str, float]:
  """Adaptive-DPO's per-pair uncertainty u and weight w (`losses.adaptive_dpo_weighting` with the
  loss's own hyper-parameters) under the trained policy and its EMA companions as training left them,
  over the pairs in consecutive batches of `train.batch_size` (the loss normalises each model's
  logits over its batch; the last, partial batch is left out), one timestep and noise per pair
  from `key`: `adaptive_u_mean`, `adaptive_weight_mean`, and with `data.label_flip` the same over
  the flipped pairs and over the others (`adaptive_u_flipped`, `adaptive_u_unflipped`, ...)."""
  weighting = {name: v for name, v in hyper.items() if name not in ("beta", "margin")}

  @jax.jit
  def u_and_w(params, ref_state, b):
    _, u, w = losses.adaptive_dpo_weighting(logps_fn(params, b), reference.logps(ref_state, b), **weighting)
    return u, w

  spec, batch = losses.spec(c.train.loss), int(c.train.batch_size)
  n = len(data["class_labels"]) // batch * batch
  keys = jax.random.split(key, n)
  us, ws = [], []
  for i in range(0, n, batch):
    idx = np.arange(i, i + batch)
    u, w = u_and_w(state.params, state.ref_state, make_batch(c, spec, data, idx, keys[i : i + batch]))
    us.append(np.asarray(u))
    ws.append(np.asarray(w))
  u, w = np.concatenate(us), np.concatenate(ws)
  out = {"adaptive_u_mean": float(u.mean()), "adaptive_weight_mean": float(w.mean())}
  if "label_flipped" in data:
    flipped = np.asarray(data["label_flipped"][:n], bool)
    for name, sel in (("flipped", flipped), ("unflipped", ~flipped)):
      out[f"adaptive_u_{name}"] = float(u[sel].mean())
      out[f"adaptive_weight_{name}"] = float(w[sel].mean())
  return out


def label_summary(data) -> Dict[str, float]:
  """How the labels agree with the gold reward: over the pairs, `pairs_label_agreement` (the share
  whose chosen image has the higher gold reward) and `pairs_reward_gap` (the mean chosen-minus-
  rejected reward); for K-way lists, the same over every ordered pair (i, j) of a list with
  phi_i > phi_j, and `list_size`; with `data.label_flip`, `pairs_flipped_share`; for DenseDPO's
  band labels also `segment_tie_share` and
  `segment_label_agreement` (the share of non-tie bands labelled as their swap advantage's sign)."""
  if "list_scores" not in data:
    out = {
      "pairs_label_agreement": float(np.mean(data["chosen_reward"] > data["rejected_reward"])),
      "pairs_reward_gap": float(np.mean(data["chosen_reward"] - data["rejected_reward"])),
    }
    if "label_flipped" in data:
      out["pairs_flipped_share"] = float(np.mean(data["label_flipped"]))
    if "segment_labels" in data:
      lab, adv = np.asarray(data["segment_labels"]), np.asarray(data["band_advantages"])
      out["segment_tie_share"] = float(np.mean(lab == 0))
      out["segment_label_agreement"] = float(np.mean(np.sign(adv[lab != 0]) == lab[lab != 0]))
    return out
  phi, r = data["list_scores"], data["list_rewards"].astype(np.float64)
  above = phi[:, :, None] > phi[:, None, :]
  gap = (r[:, :, None] - r[:, None, :])[above]
  return {
    "pairs_label_agreement": float(np.mean(gap > 0)),
    "pairs_reward_gap": float(np.mean(gap)),
    "list_size": int(phi.shape[1]),
  }


def _grid(images, labels, per_class: int) -> np.ndarray:
  """Class-major grid: a row per class with its first `per_class` images (missing ones dark)."""
  rows = []
  for k in range(world_lib.NUM_CLASSES):
    x = images[labels == k][:per_class]
    pad = -np.ones((per_class - len(x),) + world_lib.IMAGE_SHAPE, np.float32)
    rows.append(np.concatenate([x, pad]))
  return evaluation.sample_grid(np.concatenate(rows), columns=per_class)


def save_png(path: str, grid: np.ndarray, scale: int = 4) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  plt.imsave(path, np.kron(grid, np.ones((scale, scale), np.uint8)), cmap="gray", vmin=0, vmax=255)


# ------------------------------------------------------------------------------------------------
# The run


def world_config(c) -> world_lib.ImageWorldConfig:
  """The image world of config `c`: its `world` fields and its seed."""
  return world_lib.ImageWorldConfig(seed=int(c.seed), **dict(c.world))


def run(config, workdir: str, *, progress: bool = True, overwrite: bool = False, world=None) -> Dict[str, Any]:
  """The four stages (module docstring) in `workdir`; returns the summary (also summary.json).

  `world`: an `ImageWorld` already built for this config's world (`world_config`), so that runs of
  several configs in one process (a sweep of methods on one base) build its classifiers once; by
  default it is built here. One built for another world is refused before any compute."""
  c = config
  if world is not None and world.config != world_config(c):
    raise ValueError(
      f"run: the given world was built for {world.config}, but the config's world is {world_config(c)}; "
      "pass world=None to build it, or a world built from experiments.diffusion.world_config(config)."
    )
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  check_workdir(c, workdir, overwrite=overwrite)
  recs = records(c)
  times: Dict[str, float] = {}
  kernel_name, kernels = kernels_of(c)
  key = jax.random.PRNGKey(int(c.seed))
  key_for = lambda name: jax.random.fold_in(key, sum(map(ord, name)))

  t0 = time.perf_counter()
  world = world if world is not None else world_lib.ImageWorld(world_config(c))
  times["world_seconds"] = time.perf_counter() - t0
  model = denoiser(c, kernels)
  schedule = noise_schedule(c)

  base_path = os.path.join(workdir, OUTPUTS["pretrain"])
  t0 = time.perf_counter()
  if _done(base_path, recs["pretrain"]):
    _say("pretrain: reusing %s", base_path)
    base = _load_params(base_path, jax.eval_shape(model.init, key))
  else:
    _say("pretrain: %d steps of %d images", c.pretrain.steps, c.pretrain.batch_size)
    base = pretrain(c, world, model, schedule, key_for("pretrain"), workdir=workdir, progress=progress)
    _save_params(base_path, base, recs["pretrain"])
  # Committed to the device like a restored base and the trained policy (`train_policy`), so the
  # sampler is compiled once for both.
  base = jax.device_put(base, jax.local_devices()[0])
  times["pretrain_seconds"] = time.perf_counter() - t0

  pairs_dir = os.path.join(workdir, OUTPUTS["pairs"])
  t0 = time.perf_counter()
  if _done(pairs_dir, recs["pairs"]):
    _say("pairs: reusing %s", pairs_dir)
    with np.load(os.path.join(pairs_dir, "pairs.npz")) as f:
      data = dict(f)
  else:
    _say(
      "pairs: %d prompts, %d %s steps, recording %s", c.data.num_pairs, c.data.num_steps, c.data.sampler, c.data.record
    )
    data = make_pairs(c, world, model, base, schedule, key_for("pairs"))
    os.makedirs(pairs_dir, exist_ok=True)
    np.savez(os.path.join(pairs_dir, "pairs.npz"), **data)
    provenance.write(pairs_dir, recs["pairs"])
  times["pairs_seconds"] = time.perf_counter() - t0

  final_path = os.path.join(workdir, OUTPUTS["train"])
  t0, info = time.perf_counter(), {}
  if _done(final_path, recs["train"]):
    _say("train: reusing %s", final_path)
    params = _load_params(final_path, base)
    info = provenance.read(final_path).get("info", {})
  else:
    unit = "lists" if c.train.logps == "lists" else "pairs"
    _say("train: %s, %d steps of %d %s", c.train.loss, c.train.steps, c.train.batch_size, unit)
    params, info = train_policy(c, model, base, schedule, data, key_for("train"), workdir=workdir, progress=progress)
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)):
      raise FloatingPointError("train: the trained parameters are not finite; nothing saved.")
    _save_params(final_path, params, recs["train"])
    provenance.write(final_path, recs["train"], info=info)
  times["train_seconds"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  _say("eval: %d samples each from the policy and the base", c.eval.num_samples)
  labels = balanced_labels(int(c.eval.num_samples))
  k_eval = key_for("eval")
  base_images = draw(c, model, base, schedule, k_eval, labels)
  policy_images = draw(c, model, params, schedule, k_eval, labels)
  metrics = evaluation.evaluate(world, policy_images, base_images, labels)
  g = int(c.eval.grid_per_class)
  grids = {
    "base_samples.png": _grid(base_images, labels, g),
    "policy_samples.png": _grid(policy_images, labels, g),
    "data_samples.png": _grid(world.eval_images, world.eval_labels, g),
  }
  for name, grid in grids.items():
    save_png(os.path.join(workdir, name), grid)
  times["eval_seconds"] = time.perf_counter() - t0

  summary = {
    **metrics,
    **label_summary(data),
    "pairs_count": int(len(data["class_labels"])),
    **info,
    **times,
    "kernels": kernel_name,
    "param_count": int(sum(x.size for x in jax.tree.leaves(base))),
    "images": sorted(grids),
    "config": c.to_dict(),
    "config_fingerprint": fingerprints.of_values(c.to_dict()),
    "provenance": {k: r.to_json() for k, r in recs.items()},
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))
  return summary


SUMMARY_KEYS = (
  "gold_reward_base",
  "gold_reward_policy",
  "win_rate_vs_base",
  "win_rate_ci95_low",
  "win_rate_ci95_high",
  "class_accuracy_base",
  "class_accuracy_policy",
  "diversity_base",
  "diversity_policy",
  "frechet_base",
  "frechet_policy",
  "pairs_per_second",
)


def table(summary: Dict[str, Any]) -> str:
  return "\n".join(f"{k:24s} {summary[k]:.4f}" for k in SUMMARY_KEYS if k in summary)


def main(config, workdir: str, *, progress: bool = True, overwrite: bool = False) -> Optional[Dict[str, Any]]:
  """The command line's image run: the stages, then the table."""
  summary = run(config, workdir, progress=progress, overwrite=overwrite)
  print(table(summary))
  print(f"summary: {os.path.join(os.path.abspath(workdir), 'summary.json')}")
  return summary
