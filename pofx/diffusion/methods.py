r"""What the diffusion preference methods need beyond a loss: errors, safeguards, step log-probs, orderings.

Pure functions of arrays (jittable unless marked host-side), written against the contract of
`pofx.diffusion`: images and predictions NHWC float32, a denoiser's prediction compared with the
regression target of its schedule (`pofx.diffusion.schedules.target`), per-image errors the mean
over H, W, C. The losses themselves live in `pofx.losses` (Diffusion-DPO is `dpo` on the
diffusion `PairLogps`; the descendants are in `pofx/losses/_diffusion.py`).

- `denoising_errors`, `pair_logps`: the diffusion `PairLogps` (`chosen = -0.5 e_w`) from
  predictions and targets, optionally with Diffusion-SDPO's winner-preserving safeguard
  (`winner_preserving_scale`, `scale_gradient`), and `make_pair_logps_fn` that builds a
  `logps_fn` for `pofx.train.make_train_step` from any function returning predictions and targets
  (`make_pairs_predict`: those of an `ImagePairs` batch, drawn as `pofx.diffusion.pairs` draws them).
- `patch_weighted_errors`, `patch_pair_logps`, `make_patch_logps_fn`: PatchDPO's per-image errors
  weighted by patch quality maps (the loss is `pofx.losses.patch_dpo`).
- `segment_signed_errors`, `dense_pair_logps`, `make_dense_logps_fn`, `guided_start_index`:
  DenseDPO's segment-labelled errors of a structurally similar pair (one label per segment along
  axis 1, ties left out) and where its guided pair generation starts in a sampler run.
- `inversion_divergence`: Inversion-DPO's weighted divergence of the policy from the reference
  along a DDIM-inversion path.
- `gaussian_step_logps`: the per-step Gaussian log-density of a sampler transition, averaged or
  summed over latent dimensions (D3PO / SPO / the dense-reward view read it per step).
- `make_trajectory_logps_fn`: the per-step log-probs of two recorded chains as a `PairLogps` on the
  step axis, for `d3po` (SPO: chains of one step) and `dense_reward_dpo`.
- `spo_select`, `spo_step_batch`: SPO's choice of a winner and a loser among k candidates of one
  step, and the one-step chains they make for `make_trajectory_logps_fn`.
- `tailor_rank`, `reward_guidance`: TailorPO's ranking of two samples drawn from one `x_t` by
  their step-wise rewards (the pair trains DPO on the one-step chains), and TailorPO-G's reward
  gradient guidance of the preferred one.
- `inversion_noise`: the noise implied by a latent reached by inversion (SmPO, Inversion-DPO).
- `curriculum_thresholds`, `curriculum_stage`, `curriculum_mask`, `curriculum_pairs`: Curriculum
  DPO's ordering of pairs by reward gap (host-side data selection; the loss is unchanged).
- `majority_preferences`: BalancedDPO's consensus label of a pair from several metrics' votes
  (host-side labelling; the loss is Diffusion-DPO's, with a reference updated during training).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pofx._pair_logps import PairLogps
from pofx.diffusion import pairs as pairs_lib
from pofx.diffusion import samplers, schedules

Array = jax.Array


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# -------------------------------------------------------------------------------------------------
# Per-image errors and the diffusion PairLogps (with Diffusion-SDPO's safeguard)
# -------------------------------------------------------------------------------------------------


def denoising_errors(prediction: Array, target: Array) -> Array:
  """Per-image mean squared error `[B]` over every axis but the first (float32)."""
  d = _f32(prediction) - _f32(target)
  return jnp.mean(d * d, axis=tuple(range(1, d.ndim)))


def winner_preserving_scale(
  pred_w: Array,
  target_w: Array,
  pred_l: Array,
  target_l: Array,
  *,
  mu: float,
  eps: float = 1e-9,
  max_lambda: float = 1.0,
) -> Array:
  r"""Diffusion-SDPO's loser-gradient scale `lambda` (a detached scalar for the batch).

  With `A = mean((pred_w - target_w)^2)` and `B = mean((pred_l - target_l)^2)` over every
  element of the batch's winners (losers), and their output-space gradients
  `g_A = dA/d pred_w = 2 (pred_w - target_w) / N`, `g_B = 2 (pred_l - target_l) / N`, the
  winner-preserving condition `(-g_A + lambda g_B) . g_A <= -mu |g_A|^2` gives

    `lambda = clip((1 - mu) |g_A|^2 / (g_B . g_A + eps), 0, max_lambda)` when `g_B . g_A > 0`,
    `lambda = max_lambda` otherwise,

  so a step along the combined gradient does not increase the winner's error (in the output-space
  proxy). Computed exactly as the authors' `get_adaptive_lose_l_scale` (the same `eps`).

  Args:
    pred_w, target_w, pred_l, target_l: `[B, ...]` predictions and regression targets of the
      winners and the losers (the same shapes).
    mu: the safeguard strength (in [0, 1]; the authors' scripts: 0.9 for SD1.5, 0.6 for SDXL).
    eps, max_lambda: the authors' 1e-9 and 1.0.

  References: Fu et al. 2025, "Diffusion-SDPO: Safeguarded Direct Preference Optimization for
  Diffusion Models", arXiv:2511.03317; code AIDC-AI/Diffusion-SDPO `train.py::get_adaptive_lose_l_scale`.
  """
  if not isinstance(mu, jax.core.Tracer) and not 0.0 <= float(mu) <= 1.0:
    raise ValueError(f"winner_preserving_scale: invalid mu={mu!r}; allowed: [0, 1].")
  r_w = jax.lax.stop_gradient(_f32(pred_w) - _f32(target_w))
  r_l = jax.lax.stop_gradient(_f32(pred_l) - _f32(target_l))
  g_a = 2.0 * r_w / r_w.size
  g_b = 2.0 * r_l / r_l.size
  num = jnp.sum(g_a * g_a)
  den = jnp.sum(g_b * g_a)
  lam = jnp.where(den > 0, (1.0 - mu) * num / (den + eps), max_lambda)
  return jax.lax.stop_gradient(jnp.clip(lam, 0.0, max_lambda))


def scale_gradient(x: Array, scale: Array) -> Array:
  """`sg(x) + scale * (x - sg(x))`: the value of `x`, its gradient multiplied by `scale`."""
  return jax.lax.stop_gradient(x) + scale * (x - jax.lax.stop_gradient(x))


def pair_logps(
  pred_w: Array,
  pred_l: Array,
  target_w: Array,
  target_l: Array,
  *,
  winner_preserving_mu: Optional[float] = None,
) -> PairLogps:
  r"""The diffusion `PairLogps`: `chosen = -0.5 e_w`, `rejected = -0.5 e_l` (per-image mean squared errors).

  With `winner_preserving_mu` (Diffusion-SDPO), the loser's error keeps its value but its
  gradient is scaled by `winner_preserving_scale(...)`:
  `e_l -> sg(e_l) + lambda (e_l - sg(e_l))`. Any loss then sees the same values; with `dpo`
  this is the authors' safeguarded Diffusion-DPO. For a reference model the scale changes
  nothing (its log-probs carry no gradient).
  """
  e_w = denoising_errors(pred_w, target_w)
  e_l = denoising_errors(pred_l, target_l)
  if winner_preserving_mu is not None:
    lam = winner_preserving_scale(pred_w, target_w, pred_l, target_l, mu=winner_preserving_mu)
    e_l = scale_gradient(e_l, lam)
  return PairLogps(chosen=-0.5 * e_w, rejected=-0.5 * e_l)


def make_pair_logps_fn(predict: Callable, *, winner_preserving_mu: Optional[float] = None) -> Callable[..., PairLogps]:
  """A `logps_fn(params, batch) -> PairLogps` for `pofx.train.make_train_step` from
  `predict(params, batch) -> (pred_w, pred_l, target_w, target_l)` (the denoiser's predictions on
  the noised chosen and rejected images and their regression targets; the same timestep and
  noise for both images of a pair and for the policy and the reference), through `pair_logps`.
  """

  def logps_fn(params, batch):
    pred_w, pred_l, target_w, target_l = predict(params, batch)
    return pair_logps(pred_w, pred_l, target_w, target_l, winner_preserving_mu=winner_preserving_mu)

  return logps_fn


def make_pairs_predict(denoise: Callable, schedule, *, timestep_range=None) -> Callable:
  r"""`predict(params, batch) -> (pred_w, pred_l, target_w, target_l)` of `batch["pairs"]` (an `ImagePairs`).

  The same draw as `pofx.diffusion.pairs.make_logps_fn`: per pair, the timestep and the noise
  from its key (`pairs.timesteps_and_noise`), shared by the chosen and the rejected image;
  `x_t = add_noise(x0, eps, t)`, the target `schedules.target(x0, eps, t)` of the schedule's
  prediction type, one denoiser call on [chosen; rejected]. For `make_pair_logps_fn` (Diffusion-SDPO's
  safeguard) and `make_patch_logps_fn` (PatchDPO), which need the predictions, not only the errors.
  """

  def predict(params, batch):
    p = batch["pairs"]
    b = p.chosen.shape[0]
    t, eps = pairs_lib.timesteps_and_noise(p.noise_keys, p.chosen.shape[1:], schedule, timestep_range)
    x0 = jnp.concatenate([_f32(p.chosen), _f32(p.rejected)])
    eps2, t2 = jnp.concatenate([eps, eps]), jnp.concatenate([t, t])
    x_t = schedules.add_noise(schedule, x0, eps2, t2)
    target = schedules.target(schedule, x0, eps2, t2)
    cond = None if p.class_labels is None else jnp.concatenate([p.class_labels, p.class_labels])
    pred = _f32(denoise(params, x_t, t2, cond))
    return pred[:b], pred[b:], target[:b], target[b:]

  return predict


# -------------------------------------------------------------------------------------------------
# PatchDPO: patch-quality-weighted errors
# -------------------------------------------------------------------------------------------------


def patch_weighted_errors(prediction: Array, target: Array, patch_weights: Array) -> Array:
  r"""Per-image mean over H, W, C of `w * (prediction - target)^2`, `[B]` float32.

  `patch_weights` `[B, h, w]` (h divides H, w divides W) holds one weight per patch of
  `H/h x W/w` pixels, shared by the channels; with `h, w = H, W` a weight per pixel (the
  authors' maps are at the latent resolution). Weights are data: no gradient flows into them.
  """
  pred = _f32(prediction)
  b, hh, ww = pred.shape[0], pred.shape[1], pred.shape[2]
  wts = jax.lax.stop_gradient(_f32(patch_weights))
  if wts.ndim != 3 or wts.shape[0] != b or hh % wts.shape[1] or ww % wts.shape[2]:
    raise ValueError(
      f"patch_weighted_errors: patch_weights must be [B, h, w] with h dividing {hh} and w dividing {ww} "
      f"(B = {b}); got {tuple(wts.shape)}."
    )
  wts = jnp.repeat(jnp.repeat(wts, hh // wts.shape[1], axis=1), ww // wts.shape[2], axis=2)
  d = pred - _f32(target)
  return jnp.mean(wts[..., None] * d * d, axis=tuple(range(1, d.ndim)))


def patch_pair_logps(pred_w, pred_l, target_w, target_l, quality_w, quality_l) -> PairLogps:
  r"""PatchDPO's pair: `chosen = -0.5 E~_w`, `rejected = -0.5 E~_l` with patch-weighted errors.

  The chosen image is the reference (subject) image, the rejected one the model's generation;
  `quality_w` `[B, h, w]` is the estimated quality of the generation's patches matched onto the
  reference image and `quality_l` the quality of the generation's own patches (in [0, 1]). The
  reference image is weighted by `1 - quality_w` (learn the subject where the generation failed),
  the generation by `quality_l` (keep what it got right): the authors'
  `region_weight = cat([1 - target_rmap, contra_rmap])`.
  """
  e_w = patch_weighted_errors(pred_w, target_w, 1.0 - _f32(quality_w))
  e_l = patch_weighted_errors(pred_l, target_l, quality_l)
  return PairLogps(chosen=-0.5 * e_w, rejected=-0.5 * e_l)


def make_patch_logps_fn(predict: Callable) -> Callable[..., PairLogps]:
  """A `logps_fn(params, batch)` for PatchDPO: `predict(params, batch) -> (pred_w, pred_l,
  target_w, target_l)` as in `make_pair_logps_fn`, and the quality maps under
  `batch["chosen_patch_quality"]`, `batch["rejected_patch_quality"]` (`[B, h, w]`), through
  `patch_pair_logps`."""

  def logps_fn(params, batch):
    pred_w, pred_l, target_w, target_l = predict(params, batch)
    return patch_pair_logps(
      pred_w, pred_l, target_w, target_l, batch["chosen_patch_quality"], batch["rejected_patch_quality"]
    )

  return logps_fn


# -------------------------------------------------------------------------------------------------
# DenseDPO: segment-level preferences on structurally similar pairs
# -------------------------------------------------------------------------------------------------


def segment_signed_errors(prediction: Array, target: Array, segment_labels: Array) -> Array:
  r"""DenseDPO's per-sample error: the squared error signed by each segment's label, averaged over
  the elements of the segments that are not tied, `[B]` float32.

  Segments split axis 1 (the frames of a video `[B, T, H, W, C]`, the rows of an image
  `[B, H, W, C]`) into F equal runs; `segment_labels` `[B, F]` holds `l_f` in {-1, 0, +1}: +1 where
  the first sample of the pair is preferred on segment f, -1 where the second is, 0 a tie. With
  `d = prediction - target` and `n` the number of elements in non-tie segments,

    `E = sum_{f: l_f != 0} l_f sum_{elements of f} d^2 / n`   (0 for a pair of ties only).

  Labels are data: no gradient flows into them.
  """
  pred = _f32(prediction)
  lab = jax.lax.stop_gradient(_f32(segment_labels))
  b, axis_len = pred.shape[0], pred.shape[1]
  if lab.ndim != 2 or lab.shape[0] != b or lab.shape[1] < 1 or axis_len % lab.shape[1]:
    raise ValueError(
      f"segment_signed_errors: segment_labels must be [B, F] with F dividing {axis_len} (axis 1 of the "
      f"predictions; B = {b}); got {tuple(lab.shape)}."
    )
  f = lab.shape[1]
  d = pred - _f32(target)
  per_segment = jnp.sum((d * d).reshape((b, f, -1)), axis=2)  # [B, F]: sum over each segment's elements
  seg_size = d.size // (b * f)
  nontie = jnp.sum((lab != 0).astype(jnp.float32), axis=1) * seg_size
  return jnp.sum(lab * per_segment, axis=1) / jnp.maximum(nontie, 1.0)


def dense_pair_logps(pred_0, pred_1, target_0, target_1, segment_labels) -> PairLogps:
  r"""DenseDPO's pair: `chosen = -0.5 E_0`, `rejected = -0.5 E_1` (`segment_signed_errors`, both signed by
  the same labels, which are relative to sample 0).

  With `s = e_theta - e_ref` per element, `dpo` on this pair is

    `-log sigmoid(-beta/2 * sum_{f: l_f != 0} l_f (s_f(x0) - s_f(x1)) / n)`,

  Wu et al. 2025, "DenseDPO: Fine-Grained Temporal Preference Optimization for Video Diffusion
  Models", arXiv:2506.03517, eq. 7 (one sigmoid per pair, the segments' implicit rewards summed
  inside it, each signed by its label), with the loss "averaged over all non-tie tokens" of the
  pair (appendix A.3), and pofx's 1/2 and per-element mean of Diffusion-DPO (`beta` as in
  configs/diffusion_dpo.py). All labels +1 gives Diffusion-DPO (`pair_logps`) exactly.
  """
  e_0 = segment_signed_errors(pred_0, target_0, segment_labels)
  e_1 = segment_signed_errors(pred_1, target_1, segment_labels)
  return PairLogps(chosen=-0.5 * e_0, rejected=-0.5 * e_1)


def make_dense_logps_fn(predict: Callable) -> Callable[..., PairLogps]:
  """A `logps_fn(params, batch)` for DenseDPO: `predict(params, batch) -> (pred_0, pred_1, target_0,
  target_1)` as in `make_pair_logps_fn`, and the labels under `batch["segment_labels"]` (`[B, F]`),
  through `dense_pair_logps`."""

  def logps_fn(params, batch):
    pred_0, pred_1, target_0, target_1 = predict(params, batch)
    return dense_pair_logps(pred_0, pred_1, target_0, target_1, batch["segment_labels"])

  return logps_fn


def guided_start_index(schedule, timesteps, guidance) -> np.ndarray:
  r"""Where DenseDPO's guided pair generation starts in a sampler run (host-side), `[N]` int.

  The paper (arXiv:2506.03517, eq. 6 and Algorithm 2) noises a real video to rectified-flow time
  `eta`, `x_eta = (1 - eta) x + eta eps_i`, with two noises, and denoises both copies from there.
  Under a variance-preserving schedule the same point is `sqrt(abar) x + sqrt(1 - abar) eps` with
  equal signal-to-noise ratio, `abar / (1 - abar) = (1 - eta)^2 / eta^2` (the two differ by a
  scale only). Returns, per guidance level `eta` in (0, 1), the index into `timesteps` (a sampler
  run's, descending: `pofx.diffusion.samplers.timesteps`) whose `abar` is closest to
  `(1 - eta)^2 / ((1 - eta)^2 + eta^2)` in log signal-to-noise ratio.
  """
  eta = np.asarray(guidance, np.float64)
  if eta.ndim > 1 or not np.all((eta > 0) & (eta < 1)):
    raise ValueError(f"guided_start_index: guidance levels must be a scalar or [N] in (0, 1); got {guidance!r}.")
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(timesteps)]
  log_snr_run = np.log(abar) - np.log1p(-abar)  # [S]
  log_snr_eta = 2.0 * (np.log1p(-eta) - np.log(eta))
  return np.argmin(np.abs(log_snr_run[None, :] - np.atleast_1d(log_snr_eta)[:, None]), axis=1).reshape(eta.shape)


# -------------------------------------------------------------------------------------------------
# Inversion-DPO: divergence from the reference along a DDIM-inversion path
# -------------------------------------------------------------------------------------------------


def inversion_divergence(policy_preds: Array, reference_preds: Array, alpha_cumprod: Array) -> Array:
  r"""Inversion-DPO's `D = (1/N) sum_t w_t mean((eps_theta(x_t) - eps_ref(x_t))^2)`, `[B]`.

  `policy_preds`, `reference_preds` `[N, B, H, W, C]` are the two models' predictions at the N
  latents of a DDIM inversion of the image (run with the reference), `alpha_cumprod` `[N]` the
  schedule's `alphas_cumprod` at those timesteps, and `w_t = (1 - abar_t) / (2 (1 - abar_t) abar_t)
  = 1 / (2 abar_t)` (the authors' weight, written as in their code).

  References: Li et al. 2025, "Inversion-DPO: Precise and Efficient Post-Training for Diffusion
  Models", arXiv:2507.11554; code MIGHTYEZ/Inversion-DPO `train_ddim.py` (the loop over
  `num_inference_steps` after `ddim_inversion`).
  """
  a = _f32(alpha_cumprod)
  w = (1.0 - a) / (2.0 * (1.0 - a) * a)
  d = _f32(policy_preds) - _f32(reference_preds)
  per_step = jnp.mean(d * d, axis=tuple(range(2, d.ndim)))  # [N, B]
  return jnp.sum(w[:, None] * per_step, axis=0) / a.shape[0]


# -------------------------------------------------------------------------------------------------
# Per-step log-probs of a sampler transition (trajectory methods)
# -------------------------------------------------------------------------------------------------


def gaussian_step_logps(next_latent: Array, mean: Array, std: Array, *, reduce: str = "mean") -> Array:
  r"""Log-density of `next_latent` under `N(mean, std^2 I)`, per sample `[B]`, float32.

    `log p = -(x - m)^2 / (2 s^2) - log s - log sqrt(2 pi)` per element, then the mean (the
    D3PO, SPO and dense-reward codes, `ddim_step_with_logprob`) or the sum (the density itself)
    over the non-batch axes.

  `mean` is the sampler's transition mean (DDIM with eta, or DDPM) from the model's prediction,
  `std` its standard deviation (a scalar or broadcastable; > 0, i.e. eta > 0).
  """
  if reduce not in ("mean", "sum"):
    raise ValueError(f"gaussian_step_logps: invalid reduce={reduce!r}; allowed: ['mean', 'sum'].")
  x, m = _f32(next_latent), _f32(mean)
  s = jnp.broadcast_to(_f32(std), x.shape)
  lp = -((x - m) ** 2) / (2.0 * s * s) - jnp.log(s) - 0.5 * math.log(2.0 * math.pi)
  axes = tuple(range(1, lp.ndim))
  return jnp.mean(lp, axis=axes) if reduce == "mean" else jnp.sum(lp, axis=axes)


def make_trajectory_logps_fn(
  denoise: Callable,
  schedule,
  *,
  eta: float = 1.0,
  sampler: str = "ddim",
  reduce: str = "mean",
  clip_sample: Optional[float] = None,
) -> Callable[..., PairLogps]:
  r"""A `logps_fn(params, batch) -> PairLogps` of per-step log-probs of two recorded reverse chains.

  `batch` holds `chosen_latents`, `rejected_latents` `[S + 1, B, H, W, C]` (the chain, x_T first,
  as `pofx.diffusion.samplers.sample` records it), `timesteps`, `prev_timesteps` `[S]` (the
  steps' t and t_prev, shared by the pairs) or `[S, B]` (per pair: e.g. SPO's one-step chains
  taken at different steps of their chains), `class_labels` `[B]` (or absent) and optionally
  `step_mask` `[B, S]` (1 on the steps trained; default all). Every step must be random (std > 0):
  the deterministic last step of a run (to t_prev < 0, the clean image) has no density. For each step j and each chain the model's transition
  Gaussian `N(mean_theta(x_j, t_j), std^2)` (`samplers.transition`: DDIM with `eta`, or DDPM)
  gives `l_j = log p_theta(x_{j+1} | x_j)`, averaged over latent dimensions (`reduce="mean"`,
  as the D3PO, SPO and dense-reward codes do) or summed (`"sum"`, the density). The result is
  `PairLogps.from_tokens` on `[B, S]`, step 0 the first denoising step. A chain of one step per
  pair (a shared `x_t` and two candidates `x_{t-1}`) is SPO's step-wise pair.

  With `batch["step_preference"]` `[B, S]` (+1: the chosen chain's step wins, -1: the rejected
  chain's, 0: a tie), step-wise labels (e.g. a reward of each step's predicted clean image, as
  the image world's `stepwise_labels`) replace the one label of the pair: a -1 step swaps the two
  chains' log-probs at that step and a tie leaves the step out (mask 0). The policy and the
  reference read the same batch, so they swap alike.
  """
  if reduce not in ("mean", "sum"):
    raise ValueError(f"make_trajectory_logps_fn: invalid reduce={reduce!r}; allowed: ['mean', 'sum'].")
  if sampler == "ddim" and float(eta) <= 0.0:
    raise ValueError(f"make_trajectory_logps_fn: eta={eta!r}; a deterministic DDIM step has no density: use eta > 0.")

  def chain_logps(params, latents, ts, prev_ts, cond):
    def one(args):
      x_t, x_prev, t, t_prev = args
      tb = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x_t.shape[0],))
      pb = jnp.broadcast_to(jnp.asarray(t_prev, jnp.int32), (x_t.shape[0],))
      pred = denoise(params, x_t, tb, cond)
      mean, std, _ = samplers.transition(schedule, pred, x_t, tb, pb, sampler=sampler, eta=eta, clip_sample=clip_sample)
      return gaussian_step_logps(x_prev, mean, std, reduce=reduce)

    per_step = jax.lax.map(one, (latents[:-1], latents[1:], jnp.asarray(ts), jnp.asarray(prev_ts)))
    return per_step.T  # [B, S]

  def logps_fn(params, batch):
    # Both chains in one denoiser call per step: [S + 1, 2B, ...], the chosen first.
    cond = batch.get("class_labels")
    b = batch["chosen_latents"].shape[1]
    both = lambda x, axis: None if x is None else jnp.concatenate([x, x], axis=axis)
    ts, prev_ts = jnp.asarray(batch["timesteps"]), jnp.asarray(batch["prev_timesteps"])
    if ts.ndim == 2:  # per pair: [S, B] -> [S, 2B]
      ts, prev_ts = both(ts, 1), both(prev_ts, 1)
    latents = jnp.concatenate([_f32(batch["chosen_latents"]), _f32(batch["rejected_latents"])], axis=1)
    per_step = chain_logps(params, latents, ts, prev_ts, both(cond, 0))
    c, r = per_step[:b], per_step[b:]
    mask = _f32(batch.get("step_mask", jnp.ones(c.shape, jnp.float32)))
    if "step_preference" in batch:
      pref = _f32(batch["step_preference"])
      c, r = jnp.where(pref < 0, r, c), jnp.where(pref < 0, c, r)
      mask = mask * (pref != 0)
    return PairLogps.from_tokens(c, mask, r, mask)

  return logps_fn


# -------------------------------------------------------------------------------------------------
# SPO: step-wise winner and loser
# -------------------------------------------------------------------------------------------------


def spo_select(step_scores: Array, *, threshold: float = 0.3):
  r"""SPO's step-wise pair among k candidates `x_{t-1}` sampled from one `x_t`.

  `step_scores` `[B, k]` are the step-aware preference model's scores of the candidates. The
  best and the worst give `p = softmax(s_best, s_worst)`; the pair trains only when
  `p_best - p_worst > threshold`. Returns `(best [B] int32, worst [B] int32, valid [B] bool)`.
  (SPO then continues the chain from a uniformly random candidate.)

  References: Liang et al. 2025, "Aesthetic Post-Training Diffusion Models from Generic
  Preferences with Step-by-step Preference Optimization" (SPO), arXiv:2406.04314; code
  RockeyCoss/SPO `spo/preference_models/compare_funcs.py`, `configs/basic_config.py`
  (threshold 0.3).
  """
  s = _f32(step_scores)
  best = jnp.argmax(s, axis=-1).astype(jnp.int32)
  worst = jnp.argmin(s, axis=-1).astype(jnp.int32)
  p = jax.nn.softmax(jnp.stack([jnp.max(s, -1), jnp.min(s, -1)], -1), axis=-1)
  return best, worst, (p[:, 0] - p[:, 1]) > threshold


def spo_step_batch(x_t, candidates, step_scores, t, t_prev, class_labels=None, *, threshold: float = 0.3) -> dict:
  r"""The batch of SPO's step-wise pairs for `make_trajectory_logps_fn` (one-step chains).

  `x_t` `[B, H, W, C]` is the shared latent, `candidates` `[k, B, H, W, C]` the k samples of
  `x_{t_prev}` drawn from it, `step_scores` `[B, k]` their step-aware scores, `t`, `t_prev` the
  step's timesteps (scalars). The chosen chain is `(x_t, best)`, the rejected `(x_t, worst)`
  (`spo_select`); a pair whose best and worst are too close (`valid` False) gets `step_mask` 0.
  """
  best, worst, valid = spo_select(step_scores, threshold=threshold)
  cand = _f32(candidates)
  idx = jnp.arange(cand.shape[1])
  x_t = _f32(x_t)
  batch = {
    "chosen_latents": jnp.stack([x_t, cand[best, idx]]),
    "rejected_latents": jnp.stack([x_t, cand[worst, idx]]),
    "timesteps": jnp.asarray([t], jnp.int32),
    "prev_timesteps": jnp.asarray([t_prev], jnp.int32),
    "step_mask": valid.astype(jnp.float32)[:, None],
  }
  if class_labels is not None:
    batch["class_labels"] = jnp.asarray(class_labels, jnp.int32)
  return batch


# -------------------------------------------------------------------------------------------------
# TailorPO: intermediate-step ranking of two samples from one x_t, and reward guidance
# -------------------------------------------------------------------------------------------------


def tailor_rank(step_rewards: Array):
  r"""TailorPO's step-wise pair: of the two samples `x^0_{t-1}, x^1_{t-1}` drawn from one `x_t`,
  the one whose step-wise reward `r_t(c, x_{t-1}) ~ r(c, x0_hat(x_{t-1}))` is higher is preferred.

  `step_rewards` `[B, 2]`. Returns `(winner [B] int32, loser [B] int32, ranked [B] bool)`, `ranked`
  False where the two rewards are equal (no preference). No threshold: every ranked pair trains
  (unlike `spo_select`).

  Reference: Ren et al. 2025, "Refining Alignment Framework for Diffusion Models with
  Intermediate-Step Preference Ranking" (TailorPO), arXiv:2502.01667, section 3.3 (eq. 10 and
  12: the same `x_t` for both samples, ranked by the reward of the predicted clean image).
  """
  r = _f32(step_rewards)
  if r.ndim != 2 or r.shape[1] != 2:
    raise ValueError(f"tailor_rank: step_rewards must be [B, 2], got shape {r.shape}.")
  winner = jnp.argmax(r, axis=-1).astype(jnp.int32)
  return winner, (1 - winner).astype(jnp.int32), r[:, 0] != r[:, 1]


def reward_guidance(reward_fn: Callable, x: Array, *, eta: float, delta: float):
  r"""TailorPO-G's gradient guidance of a preferred noisy sample (arXiv:2502.01667, section 3.4,
  eq. 13-14, Algorithm 1 lines 6-8):

    x+ = x - eta grad_x (r_high - r(x))^2,   r_high = r(x) + delta (a target, held fixed)
       = x + 2 eta delta grad_x r(x),

  kept where it raised the reward, `r(x+) > r(x)`; elsewhere x is returned unchanged.
  `reward_fn(x) -> [B]` is the step-wise reward of each sample (independent per sample,
  differentiable). The paper uses eta in [0.1, 0.2] and delta 0.5. Returns `(x_new, accepted [B]
  bool)`.
  """
  x = _f32(x)
  r = reward_fn(x)
  target = jax.lax.stop_gradient(r) + delta
  grad = jax.grad(lambda v: jnp.sum(jnp.square(target - reward_fn(v))))(x)
  x_plus = x - eta * grad
  accepted = reward_fn(x_plus) > r
  keep = accepted.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x_plus, x), accepted


# -------------------------------------------------------------------------------------------------
# Inversion
# -------------------------------------------------------------------------------------------------


def inversion_noise(x0: Array, x_t: Array, alpha_cumprod_t: Array) -> Array:
  r"""The noise `eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)` that maps `x0` to a latent `x_t`.

  With `x_t` reached from `x0` by (ReNoise / DDIM) inversion instead of forward noising, this is
  the regression target the Diffusion-DPO errors are then computed against (SmPO's
  `noise = (noisy_latents - start_latents * sqrt(alpha_prod_t)) / sqrt(beta_prod_t)`).
  `alpha_cumprod_t` `[B]` (or a scalar) is the schedule's `alphas_cumprod` at each sample's t.
  """
  a = _f32(alpha_cumprod_t)
  a = jnp.reshape(a, a.shape + (1,) * (jnp.ndim(x0) - a.ndim)) if a.ndim else a
  return (_f32(x_t) - jnp.sqrt(a) * _f32(x0)) / jnp.sqrt(1.0 - a)


# -------------------------------------------------------------------------------------------------
# Curriculum DPO (host-side)
# -------------------------------------------------------------------------------------------------


def curriculum_pairs(scores, groups_of, *, keep_threshold: float = 0.1):
  r"""Every within-prompt pair of samples whose reward gap exceeds `keep_threshold` (host-side).

  `scores` `[N]` rewards of N samples, `groups_of` `[N]` their prompt (any hashable ids). Returns
  an int array `[P, 2]` of (winner, loser) indices (the higher score first) and the gaps `[P]`,
  in the authors' enumeration order (prompt by first appearance, then i < j).
  Thresholds of the authors' code: 0.02 (human score, LLaVA-BERTScore), 0.2 (aesthetic), 0.1 otherwise.
  """
  scores = np.asarray(scores, np.float64)
  groups: dict = {}
  for i, g in enumerate(np.asarray(groups_of).tolist()):
    groups.setdefault(g, []).append(i)
  pairs, gaps = [], []
  for members in groups.values():
    for a_pos, a in enumerate(members[:-1]):
      for b in members[a_pos + 1 :]:
        gap = abs(scores[a] - scores[b])
        if gap > keep_threshold:
          pairs.append((a, b) if scores[a] >= scores[b] else (b, a))
          gaps.append(gap)
  return np.asarray(pairs, np.int64).reshape(-1, 2), np.asarray(gaps, np.float64)


def curriculum_thresholds(gaps, groups: int = 5) -> np.ndarray:
  """The gap thresholds, easiest first: `linspace(min gap, max gap, groups)[::-1]` (host-side)."""
  if int(groups) < 2:
    raise ValueError(f"curriculum_thresholds: invalid groups={groups!r}; allowed: an integer >= 2.")
  gaps = np.asarray(gaps, np.float64)
  return np.linspace(gaps.min(), gaps.max(), int(groups))[::-1]


def curriculum_stage(step: int, *, update_every: int = 500, groups: int = 5) -> int:
  """The curriculum stage at a training step: one more every `update_every` steps, at most `groups - 2`."""
  if int(update_every) < 1:
    raise ValueError(f"curriculum_stage: invalid update_every={update_every!r}; allowed: an integer >= 1.")
  return min(int(step) // int(update_every), int(groups) - 2)


def curriculum_mask(gaps, stage: int, *, groups: int = 5) -> np.ndarray:
  r"""The pairs usable at `stage` (host-side, bool `[P]`): gap >= threshold[stage + 1].

  Stage 0 holds the easiest pairs (largest reward gaps); each stage adds the next band of
  harder ones, and the last stage (`groups - 2`) holds every pair (gap >= the minimum).

  References: Croitoru et al. 2025, "Curriculum Direct Preference Optimization for Diffusion and
  Consistency Models", arXiv:2405.13637; code CroitoruAlin/Curriculum-DPO
  `data/dataset_factory.py::PromptsDataset` (`thresholds_diff`, `get_usable_pairs`, `update_cl`).
  """
  thresholds = curriculum_thresholds(gaps, groups)
  stage = min(max(int(stage), 0), int(groups) - 2)
  return np.asarray(gaps, np.float64) >= thresholds[stage + 1]


# -------------------------------------------------------------------------------------------------
# BalancedDPO (host-side labels)
# -------------------------------------------------------------------------------------------------


def majority_preferences(scores_a, scores_b):
  r"""BalancedDPO's consensus label of each pair from several metrics (host-side).

  `scores_a`, `scores_b` `[M, N]`: M metrics' scores of the first and second image of N pairs
  (higher is better for every metric). Each metric votes for the image it scores higher, and a
  metric that scores both alike casts no vote; the pair's label is the majority of the votes:

      votes_a = #{m : a_m > b_m},   votes_b = #{m : b_m > a_m},
      prefer_a = votes_a > votes_b,  decided = votes_a != votes_b.

  Returns `prefer_a` and `decided` (bool `[N]`); an undecided pair has no label (drop it). Only
  the comparison within each metric enters, never the metrics' scales, which is the point of
  voting over mixing rewards whose scales differ.

  Reference: Tamboli et al. 2025, "BalancedDPO: Adaptive Multi-Metric Alignment",
  arXiv:2503.12575 (v2 abstract: a majority-vote consensus over several preference scorers,
  trained with Diffusion-DPO and a reference model updated during training). Read: the
  abstracts of v1 and v2; the full text and the authors' code were not available here.
  """
  a = np.asarray(scores_a, np.float64)
  b = np.asarray(scores_b, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(
      f"majority_preferences: scores_a and scores_b must both be [M, N] (M metrics, N pairs); got shapes "
      f"{a.shape} and {b.shape}."
    )
  if a.shape[0] < 1 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ValueError("majority_preferences: need at least one metric and finite scores.")
  votes_a = np.sum(a > b, axis=0)
  votes_b = np.sum(b > a, axis=0)
  return votes_a > votes_b, votes_a != votes_b
