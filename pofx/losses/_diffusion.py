r"""Preference losses for diffusion models, on the diffusion `PairLogps`.

The diffusion analogue of a completion log-prob (`pofx.diffusion.pairs.make_logps_fn`) is
`chosen = -0.5 * e_w`, `rejected = -0.5 * e_l`, with `e` the per-image mean over H, W, C of the
squared error of the denoiser's prediction at a timestep and noise shared by the pair (and by the
policy and the reference). So `lr_w = pi_w - ref_w = -0.5 (e_w - e_ref_w)` and
`rho = lr_w - lr_l = -0.5 [(e_w - e_ref_w) - (e_l - e_ref_l)]`, and Diffusion-DPO is the
registry's `dpo` with the authors' beta (5000): `-log sigmoid(beta * rho)` (Wallace et al. 2024,
arXiv:2311.12908, the Diffusion-DPO objective, with T * omega(lambda_t) and 1/(C H W) folded into beta as in their
code). The losses here are the descendants that need more than that:

- trajectory methods (D3PO, SPO, the dense-reward view) read per-step log-probs of a sampled
  reverse chain in the per-token slots of `PairLogps` (`PairLogps.from_tokens`: step axis `[B, S]`,
  mask 1 on the steps trained; index 0 is the first denoising step from noise);
- Diffusion-KTO reads a binary label per image, SmPO a reward per image, as per-pair scores;
- Reg-DPO and Diffusion-DRO need only the pair values.

Scores are data (no gradient). All functions return unreduced per-pair losses `[B]`, float32.
"""

from __future__ import annotations

import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from pofx import gpo as gpo_fns
from pofx._pair_logps import ListLogps
from pofx.losses import _common
from pofx.losses._registry import ANY_FINITE_SCORES, LossSpec, ScoreDomain, check_scores

Array = jax.Array


_f32, _logratios = _common.f32, _common.checked_logratios


def _step_logratios(name, policy, reference):
  """Per-step log-ratios `[B, S]` of the chosen and rejected chains and the 0/1 mask of the steps
  both chains have (the policy's masks)."""
  _common.check_inputs(name, policy, reference, need_reference=True, need_tokens=True)
  if jnp.shape(policy.chosen_token_logps) != jnp.shape(policy.rejected_token_logps):
    raise ValueError(
      f"{name}: the chosen and rejected chains must have the same number of steps; got per-step arrays "
      f"{jnp.shape(policy.chosen_token_logps)} and {jnp.shape(policy.rejected_token_logps)}."
    )
  mask = (_f32(policy.chosen_mask) > 0) & (_f32(policy.rejected_mask) > 0)
  lr_w = jnp.where(mask, _f32(policy.chosen_token_logps) - _f32(reference.chosen_token_logps), 0.0)
  lr_l = jnp.where(mask, _f32(policy.rejected_token_logps) - _f32(reference.rejected_token_logps), 0.0)
  return lr_w, lr_l, mask.astype(jnp.float32)


# -------------------------------------------------------------------------------------------------
# D3PO (and SPO): clipped per-step ratios
# -------------------------------------------------------------------------------------------------


def d3po(policy, reference, *, beta: float = 0.1, eps: float = 0.1) -> Array:
  r"""D3PO: DPO on every denoising step of two sampled chains, with clipped likelihood ratios.

  For step j of the chosen and rejected reverse chains, with per-step log-probs
  `l(x_{j+1} | x_j)` of the policy and the reference (`PairLogps.from_tokens` on `[B, S]`),

    `r_j = clip(exp(l_theta - l_ref), 1 - eps, 1 + eps)`,
    `L_j = -log sigmoid(beta * (log r^w_j - log r^l_j))`,

  and the per-pair loss is the mean of `L_j` over the steps both chains have (the authors
  accumulate one backward per step, averaged by gradient accumulation). `log clip(exp(x))` is
  computed as `clip(x, log(1 - eps), log(1 + eps))`: the same values and gradients (zero outside
  the clip range) without overflowing `exp`. The authors' per-step log-prob is the DDIM(eta)
  Gaussian log-density averaged (not summed) over latent dimensions
  (`pofx.diffusion.methods.gaussian_step_logps(..., reduce="mean")`); with sums the clip range
  is a different constraint.

  SPO (Liang et al. 2025, arXiv:2406.04314) uses this loss with beta = 10 on step-wise pairs:
  two candidates `x_{t-1}` sampled from one shared `x_t` and ranked by a step-aware preference
  model (`pofx.diffusion.methods.spo_select`): a chain of one step per pair
  (`train_spo.py`, `ratio_0`/`ratio_1` and the loss line).

  Args:
    policy, reference: `PairLogps` with per-step log-probs on the token slots (`[B, S]`, the
      same S for chosen and rejected; the mask marks the steps trained).
    beta: inverse temperature (> 0; D3PO's `config/base.py`: 0.1, SPO: 10).
    eps: ratio clip (in (0, 1); both codes: 0.1).

  Returns:
    `[B]` per-pair losses (0 for a pair with no step).

  References: Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any
  Reward Model" (D3PO), arXiv:2311.13231; code yk7333/d3po `scripts/train.py` (the
  loss after `ratio_0`, `ratio_1`) and `config/base.py`.
  """
  name = "d3po"
  _common.check_beta(name, beta)
  _common.check_range(name, "eps", eps, low=0.0, high=1.0, low_open=True, high_open=True)
  lr_w, lr_l, mask = _step_logratios(name, policy, reference)
  lo, hi = math.log(1.0 - eps), math.log(1.0 + eps)
  per_step = gpo_fns.logistic(beta * (jnp.clip(lr_w, lo, hi) - jnp.clip(lr_l, lo, hi)))
  steps = jnp.sum(mask, axis=-1)
  return jnp.sum(per_step * mask, axis=-1) / jnp.maximum(steps, 1.0)


# -------------------------------------------------------------------------------------------------
# The dense-reward view: temporally discounted chain log-ratios
# -------------------------------------------------------------------------------------------------


def dense_reward_step_weights(mask: Array, *, gamma: float) -> Array:
  r"""The dense-reward view's step weights `w_t = gamma^t m_t / (sum_s gamma^s m_s + 1e-8)`, `[B, S]`.

  `t` is the reverse-chain index (0 = the first denoising step from noise), `m` the 0/1 step
  mask; the 1e-8 is the authors' (`policy_loss_weights / (sum + 1e-8)`).
  """
  mask = _f32(mask)
  powers = jnp.asarray(gamma, jnp.float32) ** jnp.arange(mask.shape[-1], dtype=jnp.float32)
  w = powers * mask
  return w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-8)


def dense_reward_dpo(
  policy, reference, *, beta: float = 12.5, gamma: float = 0.9, log_ratio_clip: float = 5e-4
) -> Array:
  r"""The dense-reward view of Yang, Chen and Zhou: Bradley-Terry on temporally discounted chain log-ratios.

  With per-step log-ratios `d_t = l_theta(x_{t+1} | x_t) - l_init(x_{t+1} | x_t)` of each chain
  (reference = the initial model) and the discount weights `w_t` (`dense_reward_step_weights`),

    `z = beta * sum_t w_t clip(d_t, -c, c)`,   `L = -log sigmoid(z_w - z_l)`,

  the two-trajectory case of their Plackett-Luce (ListMLE) loss. The authors estimate
  `sum_t w_t clip(d_t)` by drawing M steps from `Categorical(w)` (M = 1 to 3); this loss is that
  estimator's expectation, computed exactly over the masked steps. Early steps weigh most:
  gamma < 1 discounts the later (less noisy) steps.

  Args:
    policy, reference: `PairLogps` with per-step log-probs on the token slots (`[B, S]`, the
      same S for chosen and rejected, step 0 first from noise).
    beta: the logit temperature (> 0; `pl_loss_temp`, 12.5 multi-prompt, 10 single-prompt).
    gamma: discount (in (0, 1]; `pl_gamma` 0.9).
    log_ratio_clip: `c` (> 0; `log_ratio_clip`, 5e-4 multi-prompt, 1e-4 single-prompt).

  References: Yang, Chen and Zhou 2024, "A Dense Reward View on Aligning Text-to-Image Diffusion
  with Preference", arXiv:2402.08265; code Shentao-YANG/Dense_Reward_T2I
  `preference_based_policy_learner.py::get_pl_loss_logit`, `train_t2i.py` (gamma weights),
  `reward_loss.py::listMLELoss`.
  """
  name = "dense_reward_dpo"
  _common.check_beta(name, beta)
  _common.check_range(name, "gamma", gamma, low=0.0, high=1.0, low_open=True)
  _common.check_range(name, "log_ratio_clip", log_ratio_clip, low=0.0, low_open=True)
  lr_w, lr_l, mask = _step_logratios(name, policy, reference)
  w = dense_reward_step_weights(mask, gamma=gamma)
  z_w = beta * jnp.sum(w * jnp.clip(lr_w, -log_ratio_clip, log_ratio_clip), axis=-1)
  z_l = beta * jnp.sum(w * jnp.clip(lr_l, -log_ratio_clip, log_ratio_clip), axis=-1)
  return gpo_fns.logistic(z_w - z_l)


# -------------------------------------------------------------------------------------------------
# Diffusion-KTO: binary feedback per image
# -------------------------------------------------------------------------------------------------


def _binary(s_w, s_l, **_):
  return ((s_w == 0) | (s_w == 1)) & ((s_l == 0) | (s_l == 1))


BINARY_LABELS = ScoreDomain("binary labels: each score 0 (undesirable) or 1 (desirable)", _binary)


def diffusion_kto(
  policy,
  reference,
  *,
  beta: float = 1000.0,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
  chosen_scores: Array,
  rejected_scores: Array,
  axis_name: Optional[str] = None,
) -> Array:
  r"""Diffusion-KTO: a utility of each image's implicit reward, from one binary label per image.

  Each of the 2B images of the batch (the two slots of a pair are just two images; a pair can
  hold two desirable ones) has a label `y` in {0, 1} (`chosen_scores`, `rejected_scores`) and
  the implicit reward `g = e_ref - e_theta = 2 (pi - ref)` (the authors' `policy_KL_logps -
  reference_KL_logps` with their per-image mean squared errors; pofx's log-probs are `-e/2`).
  The reference point is the batch mean, clamped at zero and detached,
  `z0 = sg(max(0, mean over the 2B images of g))`, and

    `loss(image) = lambda_y (1 - sigmoid(s_y beta (g - z0)))`,  `s_y = 2y - 1`,

  the sigmoid value function (`--halo sigmoid`). The per-pair value is the mean of its two
  images, so the batch mean equals the authors' mean over images.

  Args:
    policy, reference: diffusion `PairLogps` (reference required).
    beta: the authors' `--beta_dpo` (> 0; default 1000).
    desirable_weight, undesirable_weight: `lambda_D`, `lambda_U` (>= 0; defaults 1).
    chosen_scores, rejected_scores: `[B]` labels, 0 or 1, of the two images of each pair.
    axis_name: named batch axis for a global `z0` (the authors reduce it across processes).

  References: Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility"
  (Diffusion-KTO), arXiv:2404.04465; code jacklishufan/diffusion-kto
  `train_kto_sd_v1.5.py` (the loss block after `g_term`; defaults of `--beta_dpo`,
  `--lambda_d_kto`, `--lambda_u_kto`, `--halo`, `--bce_offset none`).
  """
  name = "diffusion_kto"
  _common.check_beta(name, beta)
  _common.check_range(name, "desirable_weight", desirable_weight, low=0.0)
  _common.check_range(name, "undesirable_weight", undesirable_weight, low=0.0)
  lr_w, lr_l = _logratios(name, policy, reference)
  check_scores(name, BINARY_LABELS, chosen_scores, rejected_scores, {})
  y = jax.lax.stop_gradient(jnp.stack([_f32(chosen_scores), _f32(rejected_scores)], -1))
  y = jnp.where(_binary(y, y), y, jnp.nan)
  g = 2.0 * jnp.stack([lr_w, lr_l], -1)  # [B, 2]
  z0 = jnp.mean(g)
  if axis_name is not None:
    z0 = jax.lax.pmean(z0, axis_name)
  z0 = jax.lax.stop_gradient(jnp.maximum(z0, 0.0))
  sign = 2.0 * y - 1.0
  weight = jnp.where(y > 0.5, desirable_weight, undesirable_weight)
  per_image = weight * (1.0 - jax.nn.sigmoid(sign * beta * (g - z0)))
  return jnp.mean(per_image, axis=-1)


# -------------------------------------------------------------------------------------------------
# SmPO: smoothed preferences from a reward model
# -------------------------------------------------------------------------------------------------


def smpo_preference(chosen_scores: Array, rejected_scores: Array, *, score_range: float) -> Array:
  r"""SmPO's smoothed preference `p = softmax(n_w, n_l)_w = sigmoid((s_w - s_l) / score_range)`, detached.

  `n = (s - min) / (max - min)` are the reward model's scores min-max normalised over the data
  set (`score_range = max - min`; the offset cancels in the softmax).
  """
  d = (_f32(chosen_scores) - _f32(rejected_scores)) / score_range
  return jax.lax.stop_gradient(jax.nn.sigmoid(d))


def smpo(
  policy,
  reference,
  *,
  beta: float = 5000.0,
  gamma: float = 10.0,
  score_range: float = 0.1665804460644722,
  chosen_scores: Array,
  rejected_scores: Array,
) -> Array:
  r"""SmPO-Diffusion: Diffusion-DPO with a smoothed, reward-model-derived preference strength.

  Replacing the winner's and loser's densities by the smoothed ones
  `p~(x_w) ~ p(x_w)^alpha p(x_l)^(gamma - alpha)` (and symmetrically) turns the DPO logit
  `beta * rho` into `(2 alpha - gamma) beta rho`. The authors' code sets `alpha = gamma p` with
  `p = sigmoid((s_w - s_l) / score_range)` (`smpo_preference`, PickScore min-max normalised)
  and gamma = 10:

    `L = -log sigmoid(beta * gamma * (2p - 1) * rho)`,
    `rho = -1/2 [(e_w - e_ref_w) - (e_l - e_ref_l)]` (pofx's diffusion log-ratios).

  Near-equal scores (p -> 1/2) give a logit near 0: loss log 2 with vanishing gradient; a pair
  whose scores disagree with its label (p < 1/2) pushes the other way. The authors estimate the
  errors on latents from ReNoise inversion instead of forward noising
  (`pofx.diffusion.methods.inversion_noise`); the loss is the same.

  Args:
    policy, reference: diffusion `PairLogps` (reference required).
    beta: Diffusion-DPO's beta (> 0; `--beta_dpo` 5000).
    gamma: the sensitivity factor (> 0; 10 in the code's `scale_term`).
    score_range: `max - min` of the reward over the data set (> 0; the code's PickScore
      constants 0.28201571 - 0.11543527).
    chosen_scores, rejected_scores: `[B]` reward-model scores of the two images.

  References: Lu et al. 2025, "Smoothed Preference Optimization via ReNoise Inversion for
  Aligning Diffusion Models with Varied Human Preferences", arXiv:2506.02698, Eq. (8)-(9); code
  JaydenLyh/SmPO `train.py` (`examples['probs']`, `scale_term`).
  """
  name = "smpo"
  _common.check_beta(name, beta)
  _common.check_range(name, "gamma", gamma, low=0.0, low_open=True)
  _common.check_range(name, "score_range", score_range, low=0.0, low_open=True)
  lr_w, lr_l = _logratios(name, policy, reference)
  p = smpo_preference(chosen_scores, rejected_scores, score_range=score_range)
  return gpo_fns.logistic(beta * gamma * (2.0 * p - 1.0) * (lr_w - lr_l))


# -------------------------------------------------------------------------------------------------
# Reg-DPO and Diffusion-DRO
# -------------------------------------------------------------------------------------------------


def reg_dpo(policy, reference, *, beta: float = 5000.0, lam: float) -> Array:
  r"""Reg-DPO: Diffusion-DPO plus the denoising (SFT) loss of the winner as a regulariser.

    `L = -log sigmoid(beta * rho) + lam * e_w`,   `e_w = -2 * pi_w`,

  with `e_w` the policy's per-image mean squared error on the chosen image (the standard
  diffusion training loss; with GT-Pairs the chosen image is a real one and the rejected the
  model's own sample). The regularisation weight is not given in the paper's abstract and no
  code is public, so `lam` has no default.

  Args:
    policy, reference: diffusion `PairLogps` (reference required).
    beta: Diffusion-DPO's beta (> 0; default 5000 as Diffusion-DPO).
    lam: weight of the SFT term (>= 0; 0 is Diffusion-DPO).

  References: Du et al. 2025, "Reg-DPO: SFT-Regularized Direct Preference Optimization with
  GT-Pair for Improving Video Generation", arXiv:2511.01450 (abstract: DPO + SFT regulariser).
  """
  name = "reg_dpo"
  _common.check_beta(name, beta)
  _common.check_range(name, "lam", lam, low=0.0)
  lr_w, lr_l = _logratios(name, policy, reference)
  return gpo_fns.logistic(beta * (lr_w - lr_l)) + lam * (-2.0 * _f32(policy.chosen))


def diffusion_dro(policy, reference, *, margin: float = 0.001) -> Array:
  r"""Diffusion-DRO: a hinge ranking loss between an expert image and the model's own sample.

  The chosen image is the expert (offline) one, the rejected one a sample of the current model
  (the authors' replay buffer); with `Delta = e_theta - e_ref` of each,

    `L = max(0, Delta_expert - Delta_policy + m) = max(0, m - 2 rho)`,

  no sigmoid and no beta: the policy's error must fall on the expert image by at least `m`
  more than on its own sample, relative to the reference.

  Args:
    policy, reference: diffusion `PairLogps` (chosen = expert, rejected = the model's sample).
    margin: `m` (>= 0; `--margin` 0.001).

  References: "Ranking-based Preference Optimization for Diffusion Models from Implicit User
  Feedback" (Diffusion-DRO, NeurIPS 2025), arXiv:2510.18353; code basiclab/DiffusionDRO
  `train.py` (the loss after `loss_policy_diff`).
  """
  name = "diffusion_dro"
  _common.check_range(name, "margin", margin, low=0.0)
  lr_w, lr_l = _logratios(name, policy, reference)
  return jnp.maximum(margin - 2.0 * (lr_w - lr_l), 0.0)


def patch_dpo(policy, reference=None) -> Array:
  r"""PatchDPO: the denoising loss of both images, each weighted patch by patch by estimated quality.

  With the PatchDPO pair (`pofx.diffusion.methods.patch_pair_logps` / `make_patch_logps_fn`):
  `chosen = -0.5 E~_w` on the reference (subject) image weighted by `1 - q` where the generation
  failed, `rejected = -0.5 E~_l` on the generation weighted by its patch quality `q`,

    `L = (E~_w + E~_l) / 2 = -(chosen + rejected)`,

  the authors' `weighted_mse_loss` (a mean over the 2B images). High-quality patches of the
  generation are reinforced; where they are poor the model learns the reference image's patch
  instead. No reference model (the preference is carried by the quality maps).

  Args:
    policy: the PatchDPO `PairLogps` (patch-weighted errors; with unweighted errors this is the
      plain denoising loss of both images).
    reference: unused.

  References: Huang et al. 2025, "PatchDPO: Patch-level DPO for Finetuning-free Personalized Image
  Generation", arXiv:2412.03177; code hqhQAQ/PatchDPO `train_patchdpo.py` (`weighted_mse_loss`,
  `region_weight`).
  """
  _common.check_inputs("patch_dpo", policy)
  return -(_f32(policy.chosen) + _f32(policy.rejected))


# -------------------------------------------------------------------------------------------------
# RankDPO: DCG-weighted pairwise losses over a ranked list
# -------------------------------------------------------------------------------------------------

# Which ranking gives the DCG discounts' positions, and how the discounts enter the weights (the
# text is ambiguous on both; see `rank_dpo`).
RANK_DPO_RANKINGS = ("predicted", "labels")
RANK_DPO_DISCOUNTS = ("inverse", "difference")


def _check_list(name, policy, reference, scores):
  for who, x in (("policy", policy), ("reference", reference)):
    if not isinstance(x, ListLogps):
      raise TypeError(f"{name}: `{who}` must be a pofx.ListLogps, got {type(x).__name__}.")
  if jnp.ndim(policy.logps) != 2 or jnp.shape(policy.logps) != jnp.shape(reference.logps):
    raise ValueError(
      f"{name}: policy and reference logps must both be [B, K]; got {jnp.shape(policy.logps)} and "
      f"{jnp.shape(reference.logps)}."
    )
  if jnp.shape(scores) != jnp.shape(policy.logps):
    raise ValueError(f"{name}: scores must be [B, K] = {jnp.shape(policy.logps)}; got {jnp.shape(scores)}.")
  if jnp.shape(policy.logps)[1] < 2:
    raise ValueError(f"{name}: a list needs K >= 2 items; got K = {jnp.shape(policy.logps)[1]}.")


def rank_dpo_weights(
  implicit_rewards: Array, scores: Array, *, ranking: str = "predicted", discount: str = "inverse"
) -> Array:
  r"""RankDPO's pairwise DCG weights `Delta [B, K, K]` (detached): `Delta[b, i, j]` for i above j.

    `G_ij = 2^phi_i - 2^phi_j`,   `D(p) = log(1 + p)`,
    `Delta_ij = |G_ij| * |1 / D(p_i) - 1 / D(p_j)|`   (discount "inverse", LambdaRank's |delta DCG|)
    `Delta_ij = |G_ij| * |D(p_i) - D(p_j)|`           (discount "difference", Algorithm 2 as printed)

  for every pair with `phi_i > phi_j` (the labels put i above j), 0 for the others: a tie
  (`phi_i = phi_j`, so `G_ij = 0`) makes no pair, and an item whose score is not finite (NaN:
  padding) takes part in no pair and holds no position. `p_i` (1 = first) is the item's position
  in the model's predicted ranking, by `implicit_rewards` descending ("predicted"; equal rewards
  are ordered by the labels), or in the labels' ranking, by `scores` descending ("labels"); items
  equal on both keys share their mean position, so the weights do not depend on the order of the
  list. Positions are piecewise constant in the rewards: the weights carry no gradient.

  Args:
    implicit_rewards: `[B, K]` the model's scores of the items, higher is better (RankDPO's
      `-s_i`, up to a positive factor).
    scores: `[B, K]` the label probabilities `phi` (any finite numbers; NaN marks padding).
    ranking, discount: see above (`RANK_DPO_RANKINGS`, `RANK_DPO_DISCOUNTS`).

  References: Karthik et al., "Scalable Ranked Preference Optimization for Text-to-Image
  Generation", arXiv:2410.18013, Algorithm 2 and Figure 2 (Eq. 6); Burges et al. 2006 (LambdaRank)
  for the |delta DCG| form.
  """
  _common.check_choice("rank_dpo", "ranking", ranking, RANK_DPO_RANKINGS)
  _common.check_choice("rank_dpo", "discount", discount, RANK_DPO_DISCOUNTS)
  phi = jax.lax.stop_gradient(_f32(scores))
  present = jnp.isfinite(phi)
  phi = jnp.where(present, phi, 0.0)
  key = phi if ranking == "labels" else jnp.where(present, jax.lax.stop_gradient(_f32(implicit_rewards)), 0.0)
  # [b, i, j]: item j before item i (on the key, then the labels), or tied with it on both.
  k_i, k_j = key[:, :, None], key[:, None, :]
  p_i, p_j = phi[:, :, None], phi[:, None, :]
  other = present[:, None, :] & ~jnp.eye(key.shape[1], dtype=bool)[None]
  before = other & ((k_j > k_i) | ((k_j == k_i) & (p_j > p_i)))
  tied = other & (k_j == k_i) & (p_j == p_i)
  position = 1.0 + jnp.sum(before, axis=-1) + 0.5 * jnp.sum(tied, axis=-1)
  d = jnp.log1p(position)
  d = 1.0 / d if discount == "inverse" else d
  gain = jnp.exp2(phi)
  above = present[:, :, None] & present[:, None, :] & (p_i > p_j)
  weights = jnp.abs(gain[:, :, None] - gain[:, None, :]) * jnp.abs(d[:, :, None] - d[:, None, :])
  return jnp.where(above, weights, 0.0)


def rank_dpo(
  policy,
  reference,
  *,
  beta: float = 5000.0,
  ranking: str = "predicted",
  discount: str = "inverse",
  scores: Array,
) -> Array:
  r"""RankDPO: Diffusion-DPO's pairwise loss over every ordered pair of a ranked list, DCG-weighted.

  Per list of K items (a prompt's K images) with label probabilities `phi_i = scores[:, i]` and
  log-ratios `lr_i = policy.logps_i - reference.logps_i`,

    `L = - sum_{i, j: phi_i > phi_j} Delta_ij * log sigmoid(beta * (lr_i - lr_j))`,

  with the DCG weights `Delta_ij` of `rank_dpo_weights` (detached). With the diffusion list
  (`pofx.diffusion.pairs.make_list_logps_fn`, `logps = -e / 2`, one timestep and noise per list)
  `lr_i = -(e_i - e_ref_i) / 2 = -s_i / 2` for the paper's score `s_i = ||eps - eps_theta||^2 -
  ||eps - eps_ref||^2` (as a mean over pixels), so `beta (lr_i - lr_j) = -(beta / 2) (s_i - s_j)`:
  each pair's logit is Diffusion-DPO's (`dpo` on the diffusion `PairLogps`) at the same beta, and
  Algorithm 2's `beta` (which multiplies `s` directly, summed over pixels) is this beta over 2,
  up to the pixel count folded in as for Diffusion-DPO.

  What the text says and what it leaves open (arXiv:2410.18013 could be read only in part: the
  abstract, Figure 2's caption and an OCR of Algorithms 1-3; Eq. 5-7 were not readable):
  Algorithm 2 computes the gains `G_ij = 2^phi(x_i) - 2^phi(x_j)`, the discounts
  `D(pi(i)) = log(1 + pi(i))` and `Delta_ij = |G_ij| . D(pi(i)) - D(pi(j))` (as OCR'd), sums
  `Delta_ij log sigmoid(-beta (s_i - s_j))` over the pairs i above j and negates. Two readings stay open:

  - `ranking`: the algorithm sorts by `phi` to get `pi`; Figure 2's caption says the *predicted*
    ranking of the current model (from the scores `s_i`, Eq. 5) enters the DCG weights (Eq. 6),
    as in LambdaRank / LambdaLoss, where the pairs are oriented by the labels and the discounts
    taken at the model's ranks. Default "predicted" (the caption, which describes the mechanism);
    "labels" is the algorithm's sort.
  - `discount`: the OCR'd `|G_ij| . D(pi(i)) - D(pi(j))` lost its bars and may have lost a
    fraction; "DCG weights" are LambdaRank's |delta DCG| of swapping i and j,
    `|G_ij| |1/D(pi(i)) - 1/D(pi(j))|` (default "inverse"); "difference" is the printed
    `|D(pi(i)) - D(pi(j))|`. Both satisfy the caption's example (a fully inverted ranking of 4
    penalises the pair at ranks (1, 4) more than the one at (2, 3)).

  The loss is a sum over pairs per list (Algorithm 2); the batch reduction is the mean over lists.

  Args:
    policy, reference: `pofx.ListLogps` with `logps [B, K]` (reference required).
    beta: > 0 (default 5000, Diffusion-DPO's: the paper's value was not readable).
    ranking: "predicted" or "labels" (above).
    discount: "inverse" or "difference" (above).
    scores: `[B, K]` the labels' probabilities `phi` (Algorithm 1: the share of the other items and
      reward models an item beats); NaN marks a padding item. Data: no gradient.

  Returns:
    `[B]` per-list losses, float32.

  References: Karthik, Coskun, Akata, Tulyakov, Ren, Kag 2024, "Scalable Ranked Preference
  Optimization for Text-to-Image Generation", arXiv:2410.18013 (ICCV 2025), Algorithms 1-2 and
  Figure 2; Diffusion-DPO (Wallace et al. 2024, arXiv:2311.12908) for the per-image score.
  """
  name = "rank_dpo"
  _common.check_beta(name, beta)
  _check_list(name, policy, reference, scores)
  lr = _f32(policy.logps) - _f32(reference.logps)
  weights = rank_dpo_weights(lr, scores, ranking=ranking, discount=discount)
  lr = jnp.where(jnp.isfinite(_f32(scores)), lr, 0.0)  # padding items: no NaN into the masked terms
  terms = jax.nn.log_sigmoid(beta * (lr[:, :, None] - lr[:, None, :]))
  return -jnp.sum(jnp.where(weights > 0, weights * terms, 0.0), axis=(1, 2))


# -------------------------------------------------------------------------------------------------
# Adaptive-DPO: per-pair weights and margins from the disagreement of the policy and its EMAs
# -------------------------------------------------------------------------------------------------

ADAPTIVE_DPO_WEIGHTINGS = ("linear", "quadratic", "sqrt", "sigmoid")
ADAPTIVE_DPO_MARGINS = ("quadratic", "linear", "none")


def adaptive_dpo_logits(policy, reference) -> tuple:
  r"""The authors' logits `l = ref_diff - model_diff` of the policy (`[B]`) and of the reference's
  companions (`[B, M]`, detached), in pofx's diffusion log-probs (`chosen = -e_w / 2`):

    `l = (e_ref_w - e_ref_l) - (e_w - e_l) = 2 (lr_w - lr_l) = 2 rho`,

  and for companion m the same with its errors in place of the policy's
  (`2 ((c_w^m - ref_w) - (c_l^m - ref_l))`, the code's `logits1`, `logits2`). Returns
  `(l0 [B], l_companions [B, M], in_use [B])`, `in_use` where every companion's mask is 1.
  """
  name = "adaptive_dpo"
  lr_w, lr_l = _logratios(name, policy, reference)
  if not reference.has_companions:
    raise ValueError(
      f"{name}: the reference PairLogps has no companions (companion_chosen, companion_rejected, companion_mask); "
      "use pofx.references.ema_companions(base, logps_fn) as the reference strategy."
    )
  cc, cr, cm = _f32(reference.companion_chosen), _f32(reference.companion_rejected), _f32(reference.companion_mask)
  chex.assert_rank([cc, cr, cm], 2)
  chex.assert_equal_shape([cc, cr, cm])
  chex.assert_equal_shape_prefix([cc, lr_w], 1)
  ref_w, ref_l = _f32(reference.chosen)[:, None], _f32(reference.rejected)[:, None]
  l_comp = jax.lax.stop_gradient(2.0 * ((cc - ref_w) - (cr - ref_l)))
  return 2.0 * (lr_w - lr_l), l_comp, jnp.all(cm > 0, axis=1)


def adaptive_dpo_uncertainty(logits: Array, *, rho: float = 15.0, normalize: bool = True) -> Array:
  r"""Adaptive-DPO's per-pair uncertainty `u [B]` from the logits `L [N, B]` of N >= 2 models (detached).

    `L^_m = rho L_m / ||L_m||_2` (the norm over the batch, per model; `normalize=False`: `rho L_m`),
    `u = |1 - mean_m sigmoid(L^_m)| * min(std_m(L^_m), 1)`,

  the std over the N models with Bessel's correction (torch's `std(dim=0)`): the authors'
  `cal_un_wy_wstd` with label 1 (`dpo_train_un.py` lines 623-628, 848-852). The first factor is
  low when the models agree that the winner wins, the second when they agree with each other. A
  model whose logits are all 0 (norm 0, e.g. the policy at its first step) gets `L^ = 0` here
  instead of the code's division by zero.
  """
  L = jax.lax.stop_gradient(_f32(logits))
  if L.ndim != 2 or L.shape[0] < 2:
    raise ValueError(f"adaptive_dpo_uncertainty: logits must be [N, B] with N >= 2 models; got {L.shape}.")
  if normalize:
    norm = jnp.sqrt(jnp.sum(L * L, axis=1, keepdims=True))
    L = jnp.where(norm > 0, L / jnp.where(norm > 0, norm, 1.0), 0.0)
  L = rho * L
  confidence = jnp.abs(1.0 - jnp.mean(jax.nn.sigmoid(L), axis=0))
  return confidence * jnp.minimum(jnp.std(L, axis=0, ddof=1), 1.0)


def adaptive_dpo_weights(u: Array, *, k: float = 10.0, c: float = 1.0, weighting: str = "linear") -> Array:
  """Adaptive-DPO's per-pair weights from the uncertainties `u` (detached): `1 / (k u + c)`
  ("linear"), `1 / (k u^2 + c)` ("quadratic"), `1 / (exp(k sqrt(u)) + c)` ("sqrt") or
  `1 / (exp(k u) + c)` ("sigmoid"), the code's `--weight_type` (`dpo_train_un.py` lines 888-907)."""
  u = jax.lax.stop_gradient(_f32(u))
  if weighting == "linear":
    w = 1.0 / (k * u + c)
  elif weighting == "quadratic":
    w = 1.0 / (k * u * u + c)
  elif weighting == "sqrt":
    w = 1.0 / (jnp.exp(k * jnp.sqrt(u)) + c)
  elif weighting == "sigmoid":
    w = 1.0 / (jnp.exp(k * u) + c)
  else:
    raise ValueError(
      f"adaptive_dpo_weights: invalid weighting={weighting!r}; allowed: {list(ADAPTIVE_DPO_WEIGHTINGS)}."
    )
  return jax.lax.stop_gradient(w)


def adaptive_dpo_weighting(
  policy, reference, *, rho: float = 15.0, normalize: bool = True, k: float = 10.0, c: float = 1.0, weighting="linear"
) -> tuple:
  """`(l0, u, w)` `[B]` each: the policy's logit (`adaptive_dpo_logits`), the pair's uncertainty over
  the policy and the reference's companions (`adaptive_dpo_uncertainty`; 0 where a companion is
  not in use yet) and its weight (`adaptive_dpo_weights`), u and w detached: what `adaptive_dpo`
  weighs its pairs by."""
  l0, l_comp, in_use = adaptive_dpo_logits(policy, reference)
  models = jnp.concatenate([jax.lax.stop_gradient(l0)[None], l_comp.T], axis=0)
  u = jnp.where(in_use, adaptive_dpo_uncertainty(models, rho=rho, normalize=normalize), 0.0)
  return l0, u, adaptive_dpo_weights(u, k=k, c=c, weighting=weighting)


def adaptive_dpo(
  policy,
  reference,
  *,
  beta: float = 1000.0,
  rho: float = 15.0,
  k: float = 10.0,
  c: float = 1.0,
  weighting: str = "linear",
  margin: str = "quadratic",
  normalize: bool = True,
) -> Array:
  r"""Adaptive-DPO: Diffusion-DPO with per-pair weights and margins from the policy's and its EMAs' disagreement.

  With the authors' logit `l = ref_diff - model_diff = 2 rho` (`adaptive_dpo_logits`; `rho =
  lr_w - lr_l` in pofx's diffusion log-probs `-e/2`, so `l` is Diffusion-DPO's logit without its
  1/2) of the policy (`l_0`) and of the M companions on the reference (`l_1..l_M`: the
  `pofx.references.ema_companions` strategy, the code's EMAs with decays 0.9999 and 0.5), all on
  the same timesteps and noise,

    `u   = adaptive_dpo_uncertainty([l_0, l_1, ..., l_M]; rho, normalize)`   (detached; 0 before
           the companions' warm-up: `companion_mask` 0)
    `w   = 1 / (k u + c)`                 weighting "linear" (the code's default)
           `1 / (k u^2 + c)`              "quadratic"
           `1 / (exp(k sqrt(u)) + c)`     "sqrt"
           `1 / (exp(k u) + c)`           "sigmoid" (the code's name)       (detached)
    `L_i = -w_i log sigmoid(beta l_i + g(u_i) - mean_batch(sg(l)))`,  `g(u) = u^2 / beta`
           (margin "quadratic"), `u / beta` ("linear"); margin "none": `-w_i log sigmoid(beta l_i)`,

  the code's loss with `--use_margin` (line 922, `- (-weight*weight/args.beta_dpo +
  logits.detach().mean())`; line 920 linear; line 928 without a margin). The centring uses the
  batch mean of the unscaled `l`, not of `beta l`; the margin *raises* the logit of a pair with a
  large `u`, and its weight is smaller: both weaken the push on pairs the models disagree about
  (the paper's minority samples). Batch statistics (the norms, the mean) are over the batch the
  loss sees (micro-batch statistics under gradient accumulation, as beta-DPO's).

  Conventions: `beta` is the code's `--beta_dpo` (README recipe 1000, argparse default 2500); it
  multiplies `l = 2 rho`, so the logit is `2 beta rho` and beta = 2500 has Diffusion-DPO's scale at
  pofx's beta = 5000 (`dpo` on the diffusion `PairLogps`). With u = 0 for every pair, `c = 1` and
  margin "none" this is `dpo` at twice this beta.

  Args:
    policy: the policy's diffusion `PairLogps`.
    reference: the reference's, with `companion_chosen`, `companion_rejected`, `companion_mask`
      `[B, M]` (M >= 1; `pofx.references.ema_companions`).
    beta: > 0 (default 1000, the README's `--beta_dpo`).
    rho: the logits' scale before the sigmoid and std (> 0; `--logits_rho` 15).
    k: the weight's slope (>= 0; `--rewight_temparature` 10).
    c: the weight's intercept (> 0 for "linear"/"quadratic", >= 0 otherwise; `--rewight_intercept` 1).
    weighting: `ADAPTIVE_DPO_WEIGHTINGS` (`--weight_type`, default "linear").
    margin: `ADAPTIVE_DPO_MARGINS` (`--margin_type` quadratic; "none" is `--use_margin` off).
    normalize: divide each model's logits by their L2 norm over the batch (`--use_logits_normalization`).

  Returns:
    `[B]` per-pair losses (the batch reduction is their mean, as the code's `.mean()`).

  References: Zhang et al. 2025, "When Preferences Diverge: Aligning Diffusion Models with
  Minority-Aware Adaptive DPO", arXiv:2503.16921 (abstract: a metric of intra-annotator confidence
  and inter-annotator stability, an adaptive weighting and margin); the method read from the
  code fanfanffff1/Adaptive-DPO `dpo_train_un.py` at a64ae01 (lines 808, 623-628, 818-871,
  888-907, 916-928) and its README's recipe; the paper's Eqs. 11-15 could not be read.
  """
  name = "adaptive_dpo"
  _common.check_beta(name, beta)
  _common.check_range(name, "rho", rho, low=0.0, low_open=True)
  _common.check_range(name, "k", k, low=0.0)
  _common.check_choice(name, "weighting", weighting, ADAPTIVE_DPO_WEIGHTINGS)
  _common.check_choice(name, "margin", margin, ADAPTIVE_DPO_MARGINS)
  if weighting in ("linear", "quadratic"):
    _common.check_range(name, "c", c, low=0.0, low_open=True, allowed_text="c > 0 (the weight is 1 / (k u + c))")
  else:
    _common.check_range(name, "c", c, low=0.0)
  if not isinstance(normalize, bool):
    raise ValueError(f"{name}: invalid normalize={normalize!r}; allowed: True or False.")
  l0, u, w = adaptive_dpo_weighting(policy, reference, rho=rho, normalize=normalize, k=k, c=c, weighting=weighting)
  if margin == "none":
    z = beta * l0
  else:
    g = u * u / beta if margin == "quadratic" else u / beta
    z = beta * l0 + jax.lax.stop_gradient(g - jnp.mean(l0))
  return w * gpo_fns.logistic(z)


_DIFFUSION = "diffusion"

SPECS = (
  LossSpec(
    "d3po",
    d3po,
    _DIFFUSION,
    "Yang et al. 2024, arXiv:2311.13231; yk7333/d3po scripts/train.py (clipped per-step ratios); "
    "SPO (arXiv:2406.04314) with beta=10 on step-wise pairs",
    requires=frozenset({"tokens"}),
  ),
  LossSpec(
    "dense_reward_dpo",
    dense_reward_dpo,
    _DIFFUSION,
    "Yang, Chen, Zhou 2024, arXiv:2402.08265; Shentao-YANG/Dense_Reward_T2I get_pl_loss_logit (expectation over steps)",
    requires=frozenset({"tokens"}),
  ),
  LossSpec(
    "diffusion_kto",
    diffusion_kto,
    _DIFFUSION,
    "Li et al. 2024, arXiv:2404.04465; jacklishufan/diffusion-kto train_kto_sd_v1.5.py (halo sigmoid)",
    requires=frozenset({"scores"}),
    score_domain=BINARY_LABELS,
  ),
  LossSpec(
    "smpo",
    smpo,
    _DIFFUSION,
    "Lu et al. 2025, arXiv:2506.02698, Eq. 9; JaydenLyh/SmPO train.py (probs, scale_term)",
    requires=frozenset({"scores"}),
    score_domain=ANY_FINITE_SCORES,
  ),
  LossSpec(
    "reg_dpo",
    reg_dpo,
    _DIFFUSION,
    "Du et al. 2025, arXiv:2511.01450 (DPO + lam * SFT on the winner; lam not published)",
    example_hyper={"lam": 1.0},
  ),
  LossSpec(
    "rank_dpo",
    rank_dpo,
    _DIFFUSION,
    "Karthik et al. 2024, arXiv:2410.18013, Algorithm 2 and Figure 2 (DCG-weighted pairs of a ranked list)",
    requires=frozenset({"list"}),
  ),
  LossSpec(
    "diffusion_dro",
    diffusion_dro,
    _DIFFUSION,
    "arXiv:2510.18353 (Diffusion-DRO); basiclab/DiffusionDRO train.py (hinge, margin 0.001)",
  ),
  LossSpec(
    "adaptive_dpo",
    adaptive_dpo,
    _DIFFUSION,
    "Zhang et al. 2025, arXiv:2503.16921; fanfanffff1/Adaptive-DPO dpo_train_un.py@a64ae01 lines 808-928 "
    "(EMA companions' uncertainty, weight 1/(k u + c), margin u^2/beta)",
    requires=frozenset({"companions"}),
    detached_by_design="the weight 1/(k u + c), the margin and the batch mean of l are detached",
  ),
  LossSpec(
    "patch_dpo",
    patch_dpo,
    _DIFFUSION,
    "Huang et al. 2025, arXiv:2412.03177; hqhQAQ/PatchDPO train_patchdpo.py (weighted_mse_loss, patch weights)",
    reference="unused",
  ),
)
