r"""Losses that reweight or resample per-token log-probs: SamPO, SGDPO, DMPO, and Delta-L aggregation.

SamPO and DMPO need per-token log-probs on policy **and** reference (`PairLogps.from_tokens`);
they rebuild sequence log-probs from the tokens (a resampled or weighted sum) and apply DPO to
them, so the DPO formula is written once (`pofx.losses.dpo`). The Delta-L weights are a
per-sequence aggregation block; `dpo_nll_delta_l` uses them for a chosen-NLL regulariser.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pofx._pair_logps import PairLogps
from pofx.losses import _common
from pofx.losses._gpo_family import dpo
from pofx.losses._registry import LossSpec

Array = jax.Array


def _token_logratios(policy: PairLogps, reference: PairLogps):
  """Per-token policy and reference log-probs (float32, zero outside the policy's masks)."""
  c_mask = jnp.asarray(policy.chosen_mask) > 0
  r_mask = jnp.asarray(policy.rejected_mask) > 0
  f32 = lambda x, m: jnp.where(m, jnp.asarray(x, jnp.float32), 0.0)
  return (
    f32(policy.chosen_token_logps, c_mask),
    f32(policy.rejected_token_logps, r_mask),
    f32(reference.chosen_token_logps, c_mask),
    f32(reference.rejected_token_logps, r_mask),
    c_mask.astype(jnp.float32),
    r_mask.astype(jnp.float32),
  )


# -------------------------------------------------------------------------------------------------
# SamPO
# -------------------------------------------------------------------------------------------------


def _uniform_subset(key, mask: Array, size: Array) -> Array:
  """Per row, a 0/1 mask of `size[b]` positions drawn uniformly without replacement from `mask`.

  Ranks i.i.d. Gumbel noise over the masked positions (a uniformly random order) and keeps the
  first `size` of them. Rows whose mask count is <= size keep all their positions.
  """
  noise = jax.random.gumbel(key, mask.shape, jnp.float32)
  scores = jnp.where(mask > 0, noise, -jnp.inf)
  order = jnp.argsort(-scores, axis=-1)
  ranks = jnp.argsort(order, axis=-1)
  return mask * (ranks < size[:, None]).astype(jnp.float32)


def sampo_token_masks(key: Array, chosen_mask: Array, rejected_mask: Array):
  r"""SamPO's down-sampling masks: all tokens of the shorter completion, a uniform subset of the longer.

  For each pair, `T = min(|y_w|, |y_l|)`; the longer completion keeps T of its tokens drawn
  uniformly without replacement (`torch.multinomial(loss_mask, T, replacement=False)` in the
  authors' code). Returns `(chosen_keep, rejected_keep)`, `[B, T_w]` and `[B, T_l]` 0/1 float32.
  """
  c_mask = (jnp.asarray(chosen_mask) > 0).astype(jnp.float32)
  r_mask = (jnp.asarray(rejected_mask) > 0).astype(jnp.float32)
  t = jnp.minimum(jnp.sum(c_mask, axis=-1), jnp.sum(r_mask, axis=-1))
  k_c, k_r = jax.random.split(key)
  return _uniform_subset(k_c, c_mask, t), _uniform_subset(k_r, r_mask, t)


def sampo(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, key: Array) -> Array:
  r"""SamPO: DPO on down-sampled token log-ratios (equal token counts for chosen and rejected).

  `T = min(|y_w|, |y_l|)`; the shorter completion keeps all its tokens, the longer one a uniform
  random subset S of T tokens (drawn with `key`); then
  `L = -log sigmoid(beta * (sum_{t in S_w} (log pi - log ref)_t - sum_{t in S_l} (log pi - log ref)_t))`.
  Token log-probs are **summed** over the kept tokens; nothing is detached.

  One index set per completion is shared by policy and reference. (The authors' code calls its
  sampler separately in the policy and the reference forward pass, so the two may use different
  subsets; sharing them is what the down-sampled KL of the paper describes.) Equal lengths give
  DPO exactly.

  Args:
    policy, reference: `PairLogps` built with per-token log-probs (`PairLogps.from_tokens`); the
      policy's masks are used for both.
    beta: inverse temperature (> 0).
    key: PRNG key for the token subset.

  Returns:
    `[B]` per-pair losses.

  References: Lu et al. 2024, "Eliminating Biased Length Reliance of Direct Preference
  Optimization via Down-Sampled KL Divergence" (SamPO), arXiv:2406.10957; code LuJunru/SamPO
  `dpo_trainer.py::get_batch_logps(len_norm=True)`.
  """
  name = "sampo"
  _common.check_inputs(name, policy, reference, need_reference=True, need_tokens=True)
  _common.check_beta(name, beta)
  pc, pr, rc, rr, c_mask, r_mask = _token_logratios(policy, reference)
  keep_c, keep_r = sampo_token_masks(key, c_mask, r_mask)
  sub = lambda c, r: PairLogps(chosen=jnp.sum(c * keep_c, axis=-1), rejected=jnp.sum(r * keep_r, axis=-1))
  return dpo(sub(pc, pr), sub(rc, rr), beta=beta)


# -------------------------------------------------------------------------------------------------
# SGDPO
# -------------------------------------------------------------------------------------------------


def sgdpo_pilot_masks(key: Array, chosen_mask: Array, rejected_mask: Array, *, r1: float = 0.6, r2: float = 0.9):
  r"""SGDPO's pilot token sets: uniform random subsets of each completion's tokens.

  With `m = min(|y_w|, |y_l|)`, the chosen completion keeps `max(floor(r1 m), 1)` of its tokens
  and the rejected one `max(floor(r2 m), 1)` of its own, each drawn uniformly without replacement
  (`torch.randperm(len)[:k]` in the authors' code). Returns `(chosen_pilot, rejected_pilot)`,
  `[B, T_w]` and `[B, T_l]` 0/1 float32; an empty completion keeps nothing.
  """
  c_mask = (jnp.asarray(chosen_mask) > 0).astype(jnp.float32)
  r_mask = (jnp.asarray(rejected_mask) > 0).astype(jnp.float32)
  m = jnp.minimum(jnp.sum(c_mask, axis=-1), jnp.sum(r_mask, axis=-1))
  size = lambda r: jnp.maximum(jnp.floor(m * jnp.float32(r)), 1.0)
  k_r, k_c = jax.random.split(key)
  return _uniform_subset(k_c, c_mask, size(r1)), _uniform_subset(k_r, r_mask, size(r2))


def sgdpo(
  policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, r1: float = 0.6, r2: float = 0.9, key: Array
) -> Array:
  r"""SGDPO (Self-Guided DPO): DPO against "pilot" sums over random subsets of the other completion.

  With `S_w`, `S_l` the pilot token sets (`sgdpo_pilot_masks`: `max(floor(r1 m), 1)` chosen and
  `max(floor(r2 m), 1)` rejected tokens drawn uniformly, `m = min(|y_w|, |y_l|)`, one set per
  completion shared by policy and reference), `P_w = sum_{t in S_w} log pi(y_w,t)` and
  `P_l = sum_{t in S_l} log pi(y_l,t)` (and `P^ref` the same sums of the reference):

    `u_1 = (log pi(y_w|x) - P_l) - (log ref(y_w|x) - P^ref_l)`
    `u_2 = (P_w - log pi(y_l|x)) - (P^ref_w - log ref(y_l|x))`
    `L = (1/2) [-log sigmoid(beta u_1)] + (1/2) [-log sigmoid(beta u_2)]`.

  The pilot sums `P_w`, `P_l` are detached, as in the authors' trainer (it rebuilds them as new
  tensors from the per-pair sums): the chosen log-prob is pushed up by the first term only, with
  weight `(beta / 2) sigmoid(-beta u_1)`, the rejected one down by the second only, with weight
  `(beta / 2) sigmoid(-beta u_2)`: each side's update is steered by a pilot of the other.

  Args:
    policy, reference: `PairLogps` with per-token log-probs (`PairLogps.from_tokens`); the policy's
      masks are used for both; the whole-completion terms are the sequence sums `chosen`,
      `rejected`.
    beta: inverse temperature (> 0; the authors' 0.1).
    r1, r2: the pilot fractions of `m` for the chosen and rejected completions, in (0, 1] (the
      authors' config defaults 0.6 and 0.9).
    key: PRNG key for the pilot token sets.

  Returns:
    `[B]` per-pair losses.

  References: Zhu et al. 2025, "SGDPO: Self-Guided Direct Preference Optimization for Language
  Model Alignment", arXiv:2505.12435 (ACL Findings 2025); the formula follows the authors' code,
  WNQzhu/SGDPO `code/scripts/pdpo_trainer_v4.py::PDPOTrainer.pdpo_loss` and `get_pilot_logps`
  (loss_type "sigmoid", no label smoothing), defaults from `code/scripts/pdpo_config.py`.
  """
  name = "sgdpo"
  _common.check_inputs(name, policy, reference, need_reference=True, need_tokens=True)
  _common.check_beta(name, beta)
  for what, r in (("r1", r1), ("r2", r2)):
    if isinstance(r, (int, float)) and not 0.0 < float(r) <= 1.0:
      raise ValueError(f"{name}: invalid {what}={r!r}; allowed: 0 < {what} <= 1.")
  pc, pr, rc, rr, c_mask, r_mask = _token_logratios(policy, reference)
  pilot_c, pilot_r = sgdpo_pilot_masks(key, c_mask, r_mask, r1=r1, r2=r2)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pol_w, pol_l, ref_w, ref_l = f32(policy.chosen), f32(policy.rejected), f32(reference.chosen), f32(reference.rejected)
  pilot_w = jax.lax.stop_gradient(jnp.sum(pc * pilot_c, axis=-1))
  pilot_l = jax.lax.stop_gradient(jnp.sum(pr * pilot_r, axis=-1))
  ref_pilot_w, ref_pilot_l = jnp.sum(rc * pilot_c, axis=-1), jnp.sum(rr * pilot_r, axis=-1)
  u_1 = (pol_w - pilot_l) - (ref_w - ref_pilot_l)
  u_2 = (pilot_w - pol_l) - (ref_pilot_w - ref_l)
  b = jnp.float32(beta)
  return 0.5 * jax.nn.softplus(-b * u_1) + 0.5 * jax.nn.softplus(-b * u_2)


# -------------------------------------------------------------------------------------------------
# DMPO
# -------------------------------------------------------------------------------------------------


def dmpo_turn_weights(turn_ids: Array, *, gamma: float = 0.7) -> Array:
  r"""DMPO's per-token weights `phi(j, T)` from per-token turn indices `[B, L]` (-1 outside turns).

  For a trajectory with T turns (T = 1 + the row's largest turn id) a token of turn j (0-based)
  gets `phi(j, T) = gamma^j (1 - gamma^(T - j)) / (1 - gamma^T)` for gamma < 1, and
  `(T - j) / T` for gamma = 1 (the limit). Tokens with a negative turn id get weight 1, as the
  authors' coefficient tensor (ones outside the turn spans); padding is masked by the caller.
  Each completion counts its own T.
  """
  ids = jnp.asarray(turn_ids, jnp.int32)
  t = jnp.maximum(jnp.max(ids, axis=-1, keepdims=True) + 1, 1).astype(jnp.float32)
  j = jnp.maximum(ids, 0).astype(jnp.float32)
  gamma = jnp.asarray(gamma, jnp.float32)
  below = gamma < 1.0
  g_safe = jnp.where(below, gamma, 0.5)
  log_g = jnp.log(g_safe)
  # 1 - g^n = -expm1(n log g): no cancellation for g close to 1.
  discounted = jnp.exp(j * log_g) * jnp.expm1((t - j) * log_g) / jnp.expm1(t * log_g)
  linear = (t - j) / t
  phi = jnp.where(below, discounted, linear)
  return jnp.where(ids >= 0, phi, 1.0)


def dmpo(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.1,
  gamma: float = 0.7,
  chosen_turn_ids: Array,
  rejected_turn_ids: Array,
) -> Array:
  r"""DMPO: DPO on turn-discounted token sums for multi-turn trajectories.

  Every completion token of turn j of a T-turn trajectory is weighted by
  `phi(j, T) = gamma^j (1 - gamma^(T-j)) / (1 - gamma^T)` (`dmpo_turn_weights`); the sequence
  "log-prob" is `sum_t phi_t log pi(y_t)` (a weighted **sum**, policy and reference alike), and
  the loss is DPO on those sums: `-log sigmoid(beta * (lr~_w - lr~_l))`. The weights are
  constants (functions of the turn structure); nothing is detached.

  A single-turn trajectory has phi = 1 everywhere: DMPO reduces to DPO.

  Args:
    policy, reference: `PairLogps` with per-token log-probs (`PairLogps.from_tokens`).
    beta: inverse temperature (> 0).
    gamma: discount in (0, 1] (0.7 in the code).
    chosen_turn_ids, rejected_turn_ids: `[B, T]` int turn index of each token (0-based, -1 on
      padding), aligned with the token log-probs.

  Returns:
    `[B]` per-pair losses.

  References: Shi et al. 2024, "Direct Multi-Turn Preference Optimization for Language Agents",
  arXiv:2406.14868; code swt-user/DMPO `fastchat/train/dmpo_trainer_efficient.py`
  (`get_batch_loss_metrics` coefficients, `get_batch_logps`, `dpo_loss` sigmoid).
  """
  name = "dmpo"
  _common.check_inputs(name, policy, reference, need_reference=True, need_tokens=True)
  _common.check_beta(name, beta)
  _common.check_range(name, "gamma", gamma, low=0.0, high=1.0, low_open=True)
  if jnp.shape(chosen_turn_ids) != jnp.shape(policy.chosen_token_logps) or jnp.shape(rejected_turn_ids) != jnp.shape(
    policy.rejected_token_logps
  ):
    raise ValueError(
      f"{name}: chosen_turn_ids/rejected_turn_ids must have the shapes of the token log-probs "
      f"{jnp.shape(policy.chosen_token_logps)} / {jnp.shape(policy.rejected_token_logps)}."
    )
  pc, pr, rc, rr, _, _ = _token_logratios(policy, reference)
  w_c = dmpo_turn_weights(chosen_turn_ids, gamma=gamma)
  w_r = dmpo_turn_weights(rejected_turn_ids, gamma=gamma)
  weighted = lambda c, r: PairLogps(chosen=jnp.sum(w_c * c, axis=-1), rejected=jnp.sum(w_r * r, axis=-1))
  return dpo(weighted(pc, pr), weighted(rc, rr), beta=beta)


# -------------------------------------------------------------------------------------------------
# Delta-L normalisation
# -------------------------------------------------------------------------------------------------


def delta_l_weights(lengths: Array, alpha: float = 1.0, *, axis_name: Optional[str] = None) -> Array:
  r"""Delta-L per-sequence weights `w_i = (L_i/L̄)^(-alpha) / mean_j (L_j/L̄)^(-alpha)`, mean 1.

  `L̄` is the batch mean length. Equivalently `w_i ∝ L_i^(-alpha)`, normalised to mean 1 over the
  batch. alpha = 0 gives uniform weights; alpha = 1 is the paper's minimum-variance unbiased
  choice (and the recipes' default). Lengths are clamped at 1; the weights are detached.

  Args:
    lengths: `[B]` sequence lengths (token counts).
    alpha: exponent (>= 0).
    axis_name: inside `shard_map`/`pmap`/`vmap` over a named batch axis, the axis to average
      over (`jax.lax.pmean`), so the weights are normalised over the global batch as in the
      authors' code (computed on the whole batch).

  Returns:
    `[B]` float32 weights.

  References: He et al. 2025, "Delta L Normalization: Rethink Loss Aggregation in RLVR",
  arXiv:2509.07558; code zerolllin/Delta-L-Normalization `verl/trainer/ppo/core_algos.py`
  (`use_grpopp`, `grpopp_config["alpha"]`).
  """
  _common.check_range("delta_l_weights", "alpha", alpha, low=0.0)
  lens = jnp.maximum(jnp.asarray(lengths, jnp.float32), 1.0)
  mean = (lambda x: jnp.mean(x)) if axis_name is None else (lambda x: jax.lax.pmean(jnp.mean(x), axis_name))
  rel = (lens / mean(lens)) ** (-alpha)
  return jax.lax.stop_gradient(rel / mean(rel))


def dpo_nll_delta_l(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.1,
  alpha: float = 1.0,
  nll_weight: float = 1.0,
  axis_name: Optional[str] = None,
) -> Array:
  r"""DPO plus a chosen-NLL regulariser aggregated with Delta-L weights.

  `L_i = -log sigmoid(beta rho_i) + nll_weight * w_i * (-pi_w,i) / mean_j |y_w,j|`, with
  `w = delta_l_weights(|y_w|, alpha)` (detached, mean 1) and `pi_w` the **summed** chosen log-prob.

  The batch mean of the second term is `sum_i w_i NLL_i / sum_j |y_w,j|`: alpha = 0 gives the
  batch token-mean NLL (TRL's `sft` term / CPO's NLL); alpha = 1 weights each sequence's summed
  NLL by `1/|y_w,i|` (per-sequence-mean NLL, up to a batch-level factor: harmonic over
  arithmetic mean length). Delta-L's claim (unbiased, minimum variance for alpha = 1) is made
  for policy-gradient token losses (RLVR); using its weights on a DPO + NLL objective is a pofx
  composition, not a method from the paper. The mean length is a batch constant, as Delta-L's
  fixed divisor; under data parallelism pass `axis_name`.

  Args:
    policy, reference: `PairLogps` (policy lengths needed).
    beta: DPO inverse temperature (> 0).
    alpha: Delta-L exponent (>= 0).
    nll_weight: weight of the NLL term (>= 0).
    axis_name: named batch axis for global weights and mean length.

  Returns:
    `[B]` per-pair losses.

  References: He et al. 2025, arXiv:2509.07558 (Delta-L weights); Rafailov et al. 2023,
  arXiv:2305.18290 (DPO).
  """
  name = "dpo_nll_delta_l"
  _common.check_inputs(name, policy, reference, need_reference=True, need_lengths=True)
  _common.check_range(name, "nll_weight", nll_weight, low=0.0)
  _common.check_range(name, "alpha", alpha, low=0.0)
  len_w, _ = _common.lengths(policy, name)
  w = delta_l_weights(len_w, alpha, axis_name=axis_name)
  mean_len = jnp.mean(len_w) if axis_name is None else jax.lax.pmean(jnp.mean(len_w), axis_name)
  nll = -jnp.asarray(policy.chosen, jnp.float32)
  return dpo(policy, reference, beta=beta) + nll_weight * w * nll / mean_len


SPECS = (
  LossSpec(
    "sgdpo",
    sgdpo,
    "token-level",
    "Zhu et al. 2025, SGDPO, arXiv:2505.12435; code WNQzhu/SGDPO code/scripts/pdpo_trainer_v4.py::PDPOTrainer.pdpo_loss",
    requires=frozenset({"tokens", "key"}),
    detached_by_design="the pilot sums over random token subsets are detached, as in the authors' trainer",
  ),
  LossSpec(
    "sampo",
    sampo,
    "token-level",
    "Lu et al. 2024, SamPO, arXiv:2406.10957; code LuJunru/SamPO dpo_trainer.py::get_batch_logps(len_norm)",
    requires=frozenset({"tokens", "key"}),
  ),
  LossSpec(
    "dmpo",
    dmpo,
    "token-level",
    "Shi et al. 2024, DMPO, arXiv:2406.14868; code swt-user/DMPO fastchat/train/dmpo_trainer_efficient.py",
    requires=frozenset({"tokens", "turn_ids"}),
  ),
  LossSpec(
    "dpo_nll_delta_l",
    dpo_nll_delta_l,
    "token-level",
    "He et al. 2025, Delta-L Normalization, arXiv:2509.07558 (weights; code zerolllin/Delta-L-Normalization "
    "core_algos.py use_grpopp) on a DPO + chosen-NLL objective (pofx composition)",
    requires=frozenset({"lengths"}),
  ),
)
