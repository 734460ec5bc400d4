r"""TRL's DPO loss types and modifiers (TRL 1.16), and LD-DPO, WPO and f-DPO built on them.

Every loss here follows `trl/trainer/dpo_trainer.py::DPOTrainer._compute_loss` of TRL 1.16.0, with
TRL's hyperparameter names and defaults. The fifteen loss types form the compatibility namespace
`pofx.losses.trl` (`trl.<loss_type>` where a loss name is read, e.g. the training program's
`train.loss`); `CANONICAL_NAME` maps each to the canonical pofx name of the same formula, and the
loss types whose formula no other pofx loss has (`exo_pair`, `bco_pair`, ...) join the canonical
registry under TRL's name. `tests/losses/test_trl_parity.py` runs TRL's own `_compute_loss` on the
same inputs and checks agreement to 1e-5.

Pipeline of `_compute_loss`, reproduced step by step:

1. Sequence log-probs: summed completion-token log-probs (`PairLogps.chosen`/`rejected`). With
   `ld_alpha` (LD-DPO), per pair `l_p = min(|y_w|, |y_l|)` and every sequence, policy **and**
   reference, becomes `sum_{t <= l_p} log p_t + ld_alpha * sum_{t > l_p} log p_t` (t counts
   completion tokens; needs per-token arrays on the policy). A reference given as sums only is
   taken as already LD-weighted, as TRL takes its precomputed reference (`precompute_ref_log_probs`
   stores `compute_ref_log_probs`'s LD-weighted sums; `ld_weighted_sums` computes them).
2. Log-ratios `lr_w = pi_w - ref_w`, `lr_l = pi_l - ref_l`.
3. Scores `s = g(lr)` from `f_divergence_type` (f-DPO link `g(lr) = f'(e^lr)` up to a constant):
   reverse_kl `lr`; forward_kl `1 - e^{-lr}`; js_divergence `log 2 + log sigmoid(lr)`;
   alpha_divergence `(e^{(a-1) lr} - 1)/(a - 1)` with `a = f_alpha_divergence_coef` (reverse_kl
   when |a - 1| < 1e-6). `delta = s_w - s_l`. Only the loss types TRL allows take it.
4. The per-pair loss of the loss type (see each function).
5. With `use_weighting` (WPO), the per-pair loss is multiplied by `sg(w_w * w_l)`,
   `w = exp(mean_t[log p_t - log sum_v p_v^2])` over the policy's completion tokens (raw token
   log-probs, not LD-weighted). Not with aot/aot_unpaired (TRL refuses) nor sft (TRL 1.16 fails).
6. `batch = sum_k weight_k * mean_B(loss_k)` over `loss_type` lists, the mean being TRL's
   chosen-token mean for "sft" (`trl_dpo_loss`).

Numerical guards (active only where TRL's own value overflows): exponents in the forward_kl and
alpha_divergence links are clamped at 80 (TRL clamps alpha_divergence the same way in float32;
its forward_kl overflows instead); DiscoPOP's `e^{-z} sigmoid(z/tau)` is evaluated as
`exp(-z + log sigmoid(z/tau))`, continued linearly beyond an exponent of 50; the WPO exponent is
capped at 50 (for genuine distributions it is at most log |V|).

All computations are float32; inputs of any float dtype are cast first.
"""

from __future__ import annotations

import inspect
import math
import types
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from pofx import gpo as gpo_fns
from pofx._pair_logps import PairLogps
from pofx.losses import _common, _gpo_family, _registry
from pofx.losses._registry import LossSpec

Array = jax.Array

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Loss types built on delta = s_w - s_l, the only ones TRL 1.16 lets take a non-default divergence.
F_DIVERGENCE_LOSS_TYPES = frozenset(
  {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
_EXP_CLAMP = 80.0  # TRL's float32/bfloat16 clamp in the alpha-divergence link.
_EXP_LINEAR_FROM = 50.0
_TRL = "TRL 1.16 trl/trainer/dpo_trainer.py::DPOTrainer._compute_loss"


def _f32(x) -> Array:
  return jnp.asarray(x, jnp.float32)


def _exp_linear_tail(e: Array) -> Array:
  """`exp(e)`, continued along its tangent beyond e = 50 (finite for any e, exact below 50)."""
  c = _EXP_LINEAR_FROM
  return jnp.exp(jnp.minimum(e, c)) * (1.0 + jnp.maximum(e - c, 0.0))


# --------------------------------------------------------------------------------------------
# Steps 1-3 and 5 of the pipeline: shared by every loss type.
# --------------------------------------------------------------------------------------------


def _ld_sum(token_logps, mask, shared_len, ld_alpha) -> Array:
  """`sum_{pos <= l_p} logp + ld_alpha * sum_{pos > l_p} logp`, pos = 1-based completion index."""
  m = jnp.asarray(mask) > 0
  pos = jnp.cumsum(m.astype(jnp.float32), axis=-1)
  tok = jnp.where(m, _f32(token_logps), 0.0)
  shared = jnp.sum(jnp.where(pos <= shared_len[:, None], tok, 0.0), axis=-1)
  tail = jnp.sum(jnp.where(pos > shared_len[:, None], tok, 0.0), axis=-1)
  return shared + ld_alpha * tail


def _mask_len(mask) -> Array:
  return jnp.sum((jnp.asarray(mask) > 0).astype(jnp.float32), axis=-1)


def ld_weighted_sums(logps: PairLogps, ld_alpha) -> PairLogps:
  r"""LD-DPO's sequence log-probs of one model: `sum_{t <= l_p} log p_t + ld_alpha * sum_{t > l_p} log p_t`.

  `l_p = min(|y_w|, |y_l|)` per pair, from the completion masks of `logps` (per-token arrays
  needed). Returns a sums-only `PairLogps` (lengths kept, per-token arrays dropped): what TRL's
  `precompute_ref_log_probs` stores for the reference (`DPOTrainer.compute_ref_log_probs` applies
  `ld_alpha`), and what the losses here take as an already LD-weighted reference.

  References: Liu et al. 2024, arXiv:2409.06411; TRL 1.16 `DPOTrainer.compute_ref_log_probs`.
  """
  _common.check_range("ld_weighted_sums", "ld_alpha", ld_alpha, low=0.0, high=1.0)
  _common.check_inputs("ld_weighted_sums", logps, None, need_tokens=True)
  shared = jnp.minimum(_mask_len(logps.chosen_mask), _mask_len(logps.rejected_mask))
  return PairLogps(
    chosen=_ld_sum(logps.chosen_token_logps, logps.chosen_mask, shared, ld_alpha),
    rejected=_ld_sum(logps.rejected_token_logps, logps.rejected_mask, shared, ld_alpha),
    chosen_len=logps.chosen_len,
    rejected_len=logps.rejected_len,
  )


def _sequence_logps(name: str, policy: PairLogps, reference: PairLogps, ld_alpha):
  """`(pi_w, pi_l, ref_w, ref_l)` in float32, LD-weighted (policy and reference) when ld_alpha is set.

  The shared length `l_p = min(|y_w|, |y_l|)` comes from the policy's masks, as TRL takes it from
  the one completion mask that policy and reference share. A reference with per-token arrays is
  LD-weighted here; a reference given as sums only is taken as already LD-weighted, as TRL takes
  its precomputed reference (`precompute_ref_log_probs`, whose stored sums `compute_ref_log_probs`
  LD-weights with the same `ld_alpha`; `ld_weighted_sums` computes them).
  """
  if ld_alpha is None:
    return _f32(policy.chosen), _f32(policy.rejected), _f32(reference.chosen), _f32(reference.rejected)
  _common.check_range(name, "ld_alpha", ld_alpha, low=0.0, high=1.0, allowed_text="None or a value in [0, 1]")
  _common.check_inputs(name, policy, None, need_tokens=True)
  shared = jnp.minimum(_mask_len(policy.chosen_mask), _mask_len(policy.rejected_mask))
  ld = lambda p, side: _ld_sum(getattr(p, f"{side}_token_logps"), getattr(p, f"{side}_mask"), shared, ld_alpha)
  if reference.has_tokens:
    ref_w, ref_l = ld(reference, "chosen"), ld(reference, "rejected")
  else:
    ref_w, ref_l = _f32(reference.chosen), _f32(reference.rejected)
  return ld(policy, "chosen"), ld(policy, "rejected"), ref_w, ref_l


def _logratios(name, policy, reference, ld_alpha):
  pi_w, pi_l, ref_w, ref_l = _sequence_logps(name, policy, reference, ld_alpha)
  return pi_w - ref_w, pi_l - ref_l


def f_divergence_link(logratio, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef=0.5):
  r"""TRL's f-DPO score `g(lr)` of a sequence log-ratio `lr = log pi/ref` (elementwise).

  | f_divergence_type | g(lr)                                  |
  |-------------------|----------------------------------------|
  | reverse_kl        | `lr` (DPO)                             |
  | forward_kl        | `1 - e^{-lr}`                          |
  | js_divergence     | `log 2 + log sigmoid(lr)`              |
  | alpha_divergence  | `(e^{(a-1) lr} - 1) / (a - 1)`, a = f_alpha_divergence_coef; `lr` at a = 1 |

  `g(lr) = f'(u)` at `u = e^{lr}` (up to an additive constant that cancels in `s_w - s_l`).
  TRL's `a` is `1 - alpha` of the paper's alpha-divergence `f'(u) = (1 - u^{-alpha})/alpha`
  (they agree at the default 0.5; a = 0 is forward KL, a -> 1 reverse KL). Exponents are clamped
  at 80 (TRL does so for alpha_divergence in float32; its forward_kl has no clamp and overflows).

  References: Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240, Table 1; TRL 1.16
  `DPOTrainer._compute_loss`.
  """
  _common.check_choice("f_divergence_type", "f_divergence_type", f_divergence_type, F_DIVERGENCES)
  lr = _f32(logratio)
  if f_divergence_type == "reverse_kl":
    return lr
  if f_divergence_type == "forward_kl":
    return -jnp.expm1(jnp.minimum(-lr, _EXP_CLAMP))
  if f_divergence_type == "js_divergence":
    return math.log(2.0) + jax.nn.log_sigmoid(lr)
  _common.check_range(
    "alpha_divergence", "f_alpha_divergence_coef", f_alpha_divergence_coef, allowed_text="a finite real number"
  )
  am1 = jnp.asarray(f_alpha_divergence_coef, jnp.float32) - 1.0
  is_kl = jnp.abs(am1) < 1e-6
  safe = jnp.where(is_kl, 1.0, am1)
  alpha_score = jnp.expm1(jnp.minimum(safe * lr, _EXP_CLAMP)) / safe
  return jnp.where(is_kl, lr, alpha_score)


def _scores(
  name,
  policy,
  reference,
  *,
  beta,
  ld_alpha,
  f_divergence_type="reverse_kl",
  f_alpha_divergence_coef=0.5,
  need_lengths=False,
):
  """Checks inputs, then returns `(s_w, s_l)` (steps 1-3 of the pipeline)."""
  _common.check_inputs(name, policy, reference, need_reference=True, need_lengths=need_lengths)
  _common.check_beta(name, beta)
  _common.check_choice(name, "f_divergence_type", f_divergence_type, F_DIVERGENCES)
  lr_w, lr_l = _logratios(name, policy, reference, ld_alpha)
  link = lambda lr: f_divergence_link(lr, f_divergence_type, f_alpha_divergence_coef)
  return link(lr_w), link(lr_l)


def _plain_logratios(name, policy, reference, *, beta, ld_alpha):
  """`(lr_w, lr_l)` for the loss types that take no f-divergence."""
  return _scores(name, policy, reference, beta=beta, ld_alpha=ld_alpha)


def wpo_sequence_weights(policy: PairLogps):
  r"""WPO per-sequence weights `(w_w, w_l)`, detached: `w = exp(mean_t[log p_t - log sum_v p_v^2])`.

  The mean runs over the policy's completion tokens (count clamped at 1, as TRL does); `log p_t`
  are the raw token log-probs, `log sum_v p_v^2` comes from `PairLogps.*_log_sum_sq_probs`. The
  exponent is capped at 50 (for genuine distributions it is at most log |V|).

  References: Zhou et al. 2024, "WPO", arXiv:2406.11827, Eq. 2 (sampled weight alignment);
  TRL 1.16 `DPOTrainer._compute_loss` (`use_weighting`).
  """
  if not policy.has_tokens or policy.chosen_log_sum_sq_probs is None or policy.rejected_log_sum_sq_probs is None:
    raise ValueError(
      "use_weighting (WPO) needs per-token log-probs and log_sum_sq_probs on the policy: build it "
      "with PairLogps.from_tokens(..., chosen_log_sum_sq_probs=..., rejected_log_sum_sq_probs=...)."
    )

  def one(tok, lssp, mask):
    m = jnp.asarray(mask) > 0
    n = jnp.maximum(jnp.sum(m.astype(jnp.float32), axis=-1), 1.0)
    mean = jnp.sum(jnp.where(m, _f32(tok) - _f32(lssp), 0.0), axis=-1) / n
    return jax.lax.stop_gradient(jnp.exp(jnp.minimum(mean, _EXP_LINEAR_FROM)))

  return (
    one(policy.chosen_token_logps, policy.chosen_log_sum_sq_probs, policy.chosen_mask),
    one(policy.rejected_token_logps, policy.rejected_log_sum_sq_probs, policy.rejected_mask),
  )


def _weighted(losses, policy, use_weighting):
  if not use_weighting:
    return losses
  w_w, w_l = wpo_sequence_weights(policy)
  return losses * (w_w * w_l)


def _length_averaged(s_w, s_l, policy, name):
  """`s_w/|y_w| - s_l/|y_l|` (completion-token counts clamped at 1, as TRL does)."""
  len_w, len_l = _common.lengths(policy, name)
  return s_w / len_w - s_l / len_l


def _label_mixture(z, w_clean, w_flip):
  """`w_clean * (-log sigmoid(z)) + w_flip * (-log sigmoid(-z))` (cDPO / robust / AOT)."""
  return w_clean * gpo_fns.logistic(z) + w_flip * gpo_fns.logistic(-z)


# --------------------------------------------------------------------------------------------
# The fifteen loss types of TRL 1.16.
# --------------------------------------------------------------------------------------------


def trl_sigmoid(
  policy,
  reference,
  *,
  beta: float = 0.1,
  f_divergence_type: str = "reverse_kl",
  f_alpha_divergence_coef: float = 0.5,
  ld_alpha: Optional[float] = None,
  use_weighting: bool = False,
):
  r"""TRL `loss_type="sigmoid"`: `-log sigmoid(beta * (s_w - s_l))` (DPO; f-DPO with a divergence).

  With the defaults this is DPO on summed log-probs (`pofx.losses.dpo`). TRL 1.16's sigmoid has no
  label smoothing (older TRL applied cDPO smoothing here). Modifiers: see the module docstring
  (`f_divergence_type`, `ld_alpha`, `use_weighting`).

  References: Rafailov et al. 2023, arXiv:2305.18290, Eq. 7; TRL 1.16 `DPOTrainer._compute_loss`.
  """
  s_w, s_l = _scores(
    "sigmoid",
    policy,
    reference,
    beta=beta,
    ld_alpha=ld_alpha,
    f_divergence_type=f_divergence_type,
    f_alpha_divergence_coef=f_alpha_divergence_coef,
  )
  return _weighted(gpo_fns.logistic(beta * (s_w - s_l)), policy, use_weighting)


def trl_hinge(
  policy,
  reference,
  *,
  beta: float = 0.1,
  f_divergence_type: str = "reverse_kl",
  f_alpha_divergence_coef: float = 0.5,
  ld_alpha: Optional[float] = None,
  use_weighting: bool = False,
):
  r"""TRL `loss_type="hinge"`: `max(0, 1 - beta * (s_w - s_l))` (SLiC calibration loss).

  beta is the reciprocal of the margin. Equals `pofx.losses.slic` with the defaults.

  References: Zhao et al. 2023, "SLiC-HF", arXiv:2305.10425, Eq. 2; TRL 1.16 `DPOTrainer._compute_loss`.
  """
  s_w, s_l = _scores(
    "hinge",
    policy,
    reference,
    beta=beta,
    ld_alpha=ld_alpha,
    f_divergence_type=f_divergence_type,
    f_alpha_divergence_coef=f_alpha_divergence_coef,
  )
  return _weighted(gpo_fns.hinge(beta * (s_w - s_l)), policy, use_weighting)


def trl_ipo(
  policy,
  reference,
  *,
  beta: float = 0.1,
  f_divergence_type: str = "reverse_kl",
  f_alpha_divergence_coef: float = 0.5,
  ld_alpha: Optional[float] = None,
  use_weighting: bool = False,
):
  r"""TRL `loss_type="ipo"`: `(s_w/|y_w| - s_l/|y_l| - 1/(2 beta))^2`, length-averaged IPO.

  beta is IPO's tau. The scores are divided by the completion-token counts (clamped at 1), also
  under `ld_alpha` (TRL divides the LD-weighted sums by the full length). With the defaults this
  is `pofx.losses.ipo`, which computes it here on the scores. See `pofx.losses.ipo_sum` for the
  paper's summed form.

  References: Azar et al. 2023, arXiv:2310.12036, Eq. 17; TRL 1.16 `DPOTrainer._compute_loss`
  (length normalisation confirmed with the IPO authors, per TRL's comment).
  """
  s_w, s_l = _scores(
    "ipo",
    policy,
    reference,
    beta=beta,
    ld_alpha=ld_alpha,
    f_divergence_type=f_divergence_type,
    f_alpha_divergence_coef=f_alpha_divergence_coef,
    need_lengths=True,
  )
  scores = PairLogps(chosen=s_w, rejected=s_l, chosen_len=policy.chosen_len, rejected_len=policy.rejected_len)
  zero = PairLogps(chosen=jnp.zeros_like(s_w), rejected=jnp.zeros_like(s_l))
  return _weighted(_gpo_family.ipo(scores, zero, beta=beta), policy, use_weighting)


def trl_exo_pair(
  policy,
  reference,
  *,
  beta: float = 0.1,
  label_smoothing: float = 1e-3,
  f_divergence_type: str = "reverse_kl",
  f_alpha_divergence_coef: float = 0.5,
  ld_alpha: Optional[float] = None,
  use_weighting: bool = False,
):
  r"""TRL `loss_type="exo_pair"`: EXO-pref, `KL(q || p)` over {chosen, rejected}.

  `q = (sigmoid(z), sigmoid(-z))` with `z = beta * (s_w - s_l)`, `p = (1 - eps, eps)`,
  `eps = label_smoothing` in (0, 1):
  `L = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)`.
  Default eps = 1e-3, the EXO paper's recommendation (TRL's default 0.0 is rejected by TRL for
  exo_pair).

  References: Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
  arXiv:2402.00856, Eq. 16; TRL 1.16 `DPOTrainer._compute_loss`.
  """
  _common.check_range("exo_pair", "label_smoothing", label_smoothing, low=0.0, high=1.0, low_open=True, high_open=True)
  s_w, s_l = _scores(
    "exo_pair",
    policy,
    reference,
    beta=beta,
    ld_alpha=ld_alpha,
    f_divergence_type=f_divergence_type,
    f_alpha_divergence_coef=f_alpha_divergence_coef,
  )
  z = beta * (s_w - s_l)
  eps = jnp.asarray(label_smoothing, jnp.float32)
  losses = jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
    jax.nn.log_sigmoid(-z) - jnp.log(eps)
  )
  return _weighted(losses, policy, use_weighting)


def trl_nca_pair(
  policy, reference, *, beta: float = 0.1, ld_alpha: Optional[float] = None, use_weighting: bool = False
):
  r"""TRL `loss_type="nca_pair"`: `-log sigmoid(r_w) - 0.5 log sigmoid(-r_w) - 0.5 log sigmoid(-r_l)`.

  `r = beta * lr` (implicit rewards, not a function of the margin alone). No f-divergence (TRL
  rejects one for this loss type).

  References: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
  Rewards", arXiv:2402.05369; TRL 1.16 `DPOTrainer._compute_loss`.
  """
  lr_w, lr_l = _plain_logratios("nca_pair", policy, reference, beta=beta, ld_alpha=ld_alpha)
  r_w, r_l = beta * lr_w, beta * lr_l
  losses = gpo_fns.logistic(r_w) + 0.5 * gpo_fns.logistic(-r_w) + 0.5 * gpo_fns.logistic(-r_l)
  return _weighted(losses, policy, use_weighting)


def trl_robust(
  policy,
  reference,
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  f_divergence_type: str = "reverse_kl",
  f_alpha_divergence_coef: float = 0.5,
  ld_alpha: Optional[float] = None,
  use_weighting: bool = False,
):
  r"""TRL `loss_type="robust"`: `[(1-eps)(-log sigmoid(z)) - eps(-log sigmoid(-z))] / (1 - 2 eps)`.

  `z = beta * (s_w - s_l)`, `eps = label_smoothing` in [0, 0.5): the flip rate of the preference
  labels (the unbiased estimate of the clean loss). eps = 0 gives `sigmoid`. TRL's default is 0.0;
  the Robust DPO paper suggests 0.1. (TRL only warns outside [0, 0.5); pofx raises ValueError.)

  References: Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409; TRL 1.16
  `DPOTrainer._compute_loss`.
  """
  _common.check_range("robust", "label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
  s_w, s_l = _scores(
    "robust",
    policy,
    reference,
    beta=beta,
    ld_alpha=ld_alpha,
    f_divergence_type=f_divergence_type,
    f_alpha_divergence_coef=f_alpha_divergence_coef,
  )
  eps = jnp.asarray(label_smoothing, jnp.float32)
  losses = _label_mixture(beta * (s_w - s_l), (1.0 - eps) / (1.0 - 2.0 * eps), -eps / (1.0 - 2.0 * eps))
  return _weighted(losses, policy, use_weighting)


def trl_bco_pair(
  policy, reference, *, beta: float = 0.1, ld_alpha: Optional[float] = None, use_weighting: bool = False
):
  r"""TRL `loss_type="bco_pair"`: `-log sigmoid(r_w) - log sigmoid(-r_l)`, `r = beta * lr`.

  TRL 1.16 drops the running-mean reward shift of older TRL / the BCO paper (delta = 0); this is
  then also NCA's "biased" variant and UNA's binary BCE.

  References: Jung et al. 2024, "Binary Classifier Optimization", arXiv:2404.04656; TRL 1.16
  `DPOTrainer._compute_loss`.
  """
  lr_w, lr_l = _plain_logratios("bco_pair", policy, reference, beta=beta, ld_alpha=ld_alpha)
  return _weighted(gpo_fns.logistic(beta * lr_w) + gpo_fns.logistic(-beta * lr_l), policy, use_weighting)


def trl_sppo_hard(
  policy, reference, *, beta: float = 0.1, ld_alpha: Optional[float] = None, use_weighting: bool = False
):
  r"""TRL `loss_type="sppo_hard"`: `(lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2`.

  SPPO with hard win probabilities (1 for the chosen, 0 for the rejected) in Eq. 4.7 of the paper.

  References: Wu et al. 2024, "Self-Play Preference Optimization", arXiv:2405.00675, Eq. 4.7;
  TRL 1.16 `DPOTrainer._compute_loss`.
  """
  lr_w, lr_l = _plain_logratios("sppo_hard", policy, reference, beta=beta, ld_alpha=ld_alpha)
  half = 0.5 / beta
  return _weighted(jnp.square(lr_w - half) + jnp.square(lr_l + half), policy, use_weighting)


def trl_aot(policy, reference, *, beta: float = 0.1, label_smoothing: float = 0.0, ld_alpha: Optional[float] = None):
  r"""TRL `loss_type="aot"`: cDPO loss on **batch-sorted** paired log-ratio differences.

  `d = sort_B(pi_w - pi_l) - sort_B(ref_w - ref_l)` (each sorted ascending over the batch),
  `L = (1-eps)(-log sigmoid(beta d)) + eps(-log sigmoid(-beta d))`, eps = label_smoothing in
  [0, 0.5]. The returned `[B]` values are in sorted order, not the input pairs' order, so the
  loss couples the batch (per-pair weighting is therefore not offered: TRL rejects
  use_weighting with aot). For B = 1 it is DPO.

  References: Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
  Transport", arXiv:2406.05882; TRL 1.16 `DPOTrainer._compute_loss`.
  """
  _common.check_inputs("aot", policy, reference, need_reference=True)
  _common.check_beta("aot", beta)
  _common.check_range("aot", "label_smoothing", label_smoothing, low=0.0, high=0.5)
  pi_w, pi_l, ref_w, ref_l = _sequence_logps("aot", policy, reference, ld_alpha)
  d = jnp.sort(pi_w - pi_l) - jnp.sort(ref_w - ref_l)
  eps = jnp.asarray(label_smoothing, jnp.float32)
  return _label_mixture(beta * d, 1.0 - eps, eps)


def trl_aot_unpaired(
  policy, reference, *, beta: float = 0.1, label_smoothing: float = 0.0, ld_alpha: Optional[float] = None
):
  r"""TRL `loss_type="aot_unpaired"`: cDPO loss on `sort_B(lr_w) - sort_B(lr_l)`.

  Chosen and rejected log-ratios are sorted separately over the batch (unpaired distributional
  alignment); the `[B]` values are in sorted order. eps = label_smoothing in [0, 0.5].

  References: Melnyk et al. 2024, arXiv:2406.05882; TRL 1.16 `DPOTrainer._compute_loss`.
  """
  _common.check_range("aot_unpaired", "label_smoothing", label_smoothing, low=0.0, high=0.5)
  lr_w, lr_l = _plain_logratios("aot_unpaired", policy, reference, beta=beta, ld_alpha=ld_alpha)
  eps = jnp.asarray(label_smoothing, jnp.float32)
  return _label_mixture(beta * (jnp.sort(lr_w) - jnp.sort(lr_l)), 1.0 - eps, eps)


def trl_apo_zero(
  policy, reference, *, beta: float = 0.1, ld_alpha: Optional[float] = None, use_weighting: bool = False
):
  r"""TRL `loss_type="apo_zero"`: `(1 - sigmoid(beta lr_w)) + sigmoid(beta lr_l)`.

  Raises the chosen and lowers the rejected likelihood (for chosen outputs better than the model's).

  References: D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv:2408.06266,
  Eq. 7; TRL 1.16 `DPOTrainer._compute_loss`.
  """
  lr_w, lr_l = _plain_logratios("apo_zero", policy, reference, beta=beta, ld_alpha=ld_alpha)
  return _weighted(jax.nn.sigmoid(-beta * lr_w) + jax.nn.sigmoid(beta * lr_l), policy, use_weighting)


def trl_apo_down(
  policy, reference, *, beta: float = 0.1, ld_alpha: Optional[float] = None, use_weighting: bool = False
):
  r"""TRL `loss_type="apo_down"`: `sigmoid(beta lr_w) + (1 - sigmoid(beta (lr_w - lr_l)))`.

  Lowers both likelihoods, the rejected more (for chosen outputs worse than the model's).

  References: D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8; TRL 1.16 `DPOTrainer._compute_loss`.
  """
  lr_w, lr_l = _plain_logratios("apo_down", policy, reference, beta=beta, ld_alpha=ld_alpha)
  return _weighted(jax.nn.sigmoid(beta * lr_w) + jax.nn.sigmoid(-beta * (lr_w - lr_l)), policy, use_weighting)


def trl_discopop(
  policy,
  reference,
  *,
  beta: float = 0.1,
  discopop_tau: float = 0.05,
  f_divergence_type: str = "reverse_kl",
  f_alpha_divergence_coef: float = 0.5,
  ld_alpha: Optional[float] = None,
  use_weighting: bool = False,
):
  r"""TRL `loss_type="discopop"`: log-ratio modulated blend of the logistic and exponential losses.

  `z = beta * (s_w - s_l)`, `m = sigmoid(z / tau)`:
  `L = (1 - m) * (-log sigmoid(z)) + m * e^{-z}`, tau = discopop_tau > 0 (paper default 0.05).
  `m e^{-z}` is evaluated as `exp(-z + log sigmoid(z/tau))` (continued linearly beyond an exponent
  of 50), so it stays finite for very negative z where TRL's product overflows.

  References: Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for
  Large Language Models", arXiv:2406.08414, Eq. 5; TRL 1.16 `DPOTrainer._compute_loss`.
  """
  _common.check_range("discopop", "discopop_tau", discopop_tau, low=0.0, low_open=True)
  s_w, s_l = _scores(
    "discopop",
    policy,
    reference,
    beta=beta,
    ld_alpha=ld_alpha,
    f_divergence_type=f_divergence_type,
    f_alpha_divergence_coef=f_alpha_divergence_coef,
  )
  z = beta * (s_w - s_l)
  logistic_part = gpo_fns.logistic(z) * jax.nn.sigmoid(-z / discopop_tau)
  exp_part = _exp_linear_tail(-z + jax.nn.log_sigmoid(z / discopop_tau))
  return _weighted(logistic_part + exp_part, policy, use_weighting)


def trl_sft(policy, reference=None):
  r"""TRL `loss_type="sft"`: per pair, the summed chosen NLL `-sum_t log pi(y_w,t)`.

  TRL's "sft" is a batch-level token mean, `-sum_{i,t} log pi(y_w,i,t) / sum_i |y_w,i|`; it is
  registered with `reduction="chosen_token_mean"`, so `batch_loss("sft", ...)` divides the sum of
  these per-pair values by the batch's chosen-token count and gives TRL's value. It uses the raw
  token log-probs (no `ld_alpha`) and no reference; an f-divergence does not change it.

  No `use_weighting`: in TRL 1.16 "sft" with `use_weighting=True` raises a RuntimeError (the
  weights are multiplied in place into the scalar broadcast over the batch), so there is no TRL
  value to match; `trl_dpo_loss` refuses the combination with a ValueError. (The evident intent,
  token-mean NLL times `mean_B(w_w w_l)`, is not a per-pair weighting in any case.)

  References: TRL 1.16 `DPOTrainer._compute_loss` (loss_type="sft"; with loss_weights, e.g.
  ["sigmoid", "sft"], the successor of rpo_alpha); Pang et al. 2024, "Iterative Reasoning
  Preference Optimization", arXiv:2404.19733 (DPO + NLL).
  """
  del reference  # unused: the NLL involves the policy only
  _common.check_inputs("sft", policy, None, need_lengths=True)
  return _common.chosen_token_nll_sum(policy).astype(jnp.float32)


def trl_sigmoid_norm(
  policy,
  reference,
  *,
  beta: float = 0.1,
  f_divergence_type: str = "reverse_kl",
  f_alpha_divergence_coef: float = 0.5,
  ld_alpha: Optional[float] = None,
  use_weighting: bool = False,
):
  r"""TRL `loss_type="sigmoid_norm"`: `-log sigmoid(beta * (s_w/|y_w| - s_l/|y_l|))`.

  DPO on length-averaged scores (completion-token counts clamped at 1), the LN-DPO idea; being ~|y|
  times smaller, the averaged margin needs a much larger beta than DPO's.

  References: TRL 1.16 `DPOTrainer._compute_loss` (SimPO-style length normalisation, Meng et al.
  2024, arXiv:2405.14734); LN-DPO in Saeidi et al. 2024, arXiv:2409.02908 (that LN-DPO is exactly
  this form is not verified).
  """
  s_w, s_l = _scores(
    "sigmoid_norm",
    policy,
    reference,
    beta=beta,
    ld_alpha=ld_alpha,
    f_divergence_type=f_divergence_type,
    f_alpha_divergence_coef=f_alpha_divergence_coef,
    need_lengths=True,
  )
  return _weighted(gpo_fns.logistic(beta * _length_averaged(s_w, s_l, policy, "sigmoid_norm")), policy, use_weighting)


# --------------------------------------------------------------------------------------------
# Literature methods whose exact formula comes from TRL.
# --------------------------------------------------------------------------------------------


def ld_dpo(policy, reference, *, ld_alpha: float, beta: float = 0.1):
  r"""LD-DPO: DPO on length-desensitised sequence log-probs (policy and reference).

  Per pair `l_p = min(|y_w|, |y_l|)` (the "public length"); each sequence log-prob becomes
  `sum_{t <= l_p} log pi(y_t) + ld_alpha * sum_{t > l_p} log pi(y_t)`, for the policy and the
  reference alike, then `-log sigmoid(beta * rho)`. ld_alpha in [0, 1]: 1 is DPO, 0 truncates both
  completions to the shared length. Needs per-token arrays on the policy; a reference with them is
  LD-weighted here, a reference given as sums only is taken as already LD-weighted (TRL's
  precomputed reference; `ld_weighted_sums` computes such sums). No default:
  the paper's per-model values were not available (TRL: "between 0.0 and 1.0").

  References: Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
  arXiv:2409.06411 (the paper's equation text was not available to us; the formula is TRL 1.16's
  `ld_alpha`, `DPOTrainer._compute_loss`).
  """
  if ld_alpha is None:
    raise ValueError("ld_dpo: invalid ld_alpha=None; allowed: a value in [0, 1].")
  return trl_sigmoid(policy, reference, beta=beta, ld_alpha=ld_alpha)


def wpo(policy, reference, *, beta: float = 0.1):
  r"""WPO (DPO form): `sg(w_w * w_l) * (-log sigmoid(beta * rho))`.

  `w = exp(mean_t[log pi(y_t) - log sum_v pi(v)^2])` per sequence under the current policy, over
  completion tokens, detached (`jax.lax.stop_gradient`); see `wpo_sequence_weights`. The
  `sum_v pi(v)^2` term is the paper's "sampled" weight alignment, so the policy's own samples get
  weight ~1. Weights are not clamped (TRL 1.16; older TRL clamped at 1). beta = 0.1 is TRL's
  default. Other base losses: `trl_<loss_type>(..., use_weighting=True)`.

  References: Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
  arXiv:2406.11827, Eq. 2; TRL 1.16 `DPOTrainer._compute_loss` (`use_weighting`).
  """
  return trl_sigmoid(policy, reference, beta=beta, use_weighting=True)


def f_dpo(policy, reference, *, f_divergence_type: str, alpha: float = 0.5, beta: float = 0.1):
  r"""f-DPO: `-log sigmoid(beta * (f'(u_w) - f'(u_l)))`, `u = pi/ref` per sequence.

  `f'` by divergence (up to constants that cancel): reverse_kl `log u` (DPO), forward_kl `-1/u`,
  js_divergence `log(2u/(1+u))`, alpha_divergence `(1 - u^{-alpha})/alpha`.
  `alpha` is the **paper's** alpha in [0, 1] (alpha = 0 is the reverse-KL limit, alpha = 1 forward
  KL; used only by alpha_divergence); it maps to TRL's `f_alpha_divergence_coef = 1 - alpha`
  (equal at the shared default 0.5).
  No default divergence: the paper compares them.

  References: Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization
  with Diverse Divergence Constraints", arXiv:2309.16240, Table 1 / Eq. for the f-DPO loss;
  computed as TRL 1.16's `f_divergence_type` (`DPOTrainer._compute_loss`).
  """
  _common.check_range("f_dpo", "alpha", alpha, low=0.0, high=1.0)
  return trl_sigmoid(
    policy, reference, beta=beta, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=1.0 - alpha
  )


# --------------------------------------------------------------------------------------------
# Registry, and TRL's loss combination.
# --------------------------------------------------------------------------------------------

TRL_LOSS_FUNCTIONS = {
  "sigmoid": trl_sigmoid,
  "hinge": trl_hinge,
  "ipo": trl_ipo,
  "exo_pair": trl_exo_pair,
  "nca_pair": trl_nca_pair,
  "robust": trl_robust,
  "bco_pair": trl_bco_pair,
  "sppo_hard": trl_sppo_hard,
  "aot": trl_aot,
  "aot_unpaired": trl_aot_unpaired,
  "apo_zero": trl_apo_zero,
  "apo_down": trl_apo_down,
  "discopop": trl_discopop,
  "sft": trl_sft,
  "sigmoid_norm": trl_sigmoid_norm,
}
TRL_LOSS_TYPES = tuple(TRL_LOSS_FUNCTIONS)
TRL_PREFIX = "trl."

# TRL loss_type -> the canonical pofx name of the same formula (at TRL's default modifiers).
CANONICAL_NAME = {
  "sigmoid": "dpo",
  "hinge": "slic",
  "ipo": "ipo",
  "exo_pair": "exo_pair",
  "nca_pair": "nca",
  "robust": "robust_dpo",
  "bco_pair": "bco_pair",
  "sppo_hard": "sppo_hard",
  "aot": "aot",
  "aot_unpaired": "aot_unpaired",
  "apo_zero": "apo_zero",
  "apo_down": "apo_down",
  "discopop": "discopop",
  "sft": "sft",
  "sigmoid_norm": "ln_dpo",
}
# Loss types whose formula no other pofx loss has: the canonical name is TRL's, the function the same.
_ONLY_IN_TRL = tuple(t for t, c in CANONICAL_NAME.items() if t == c and t != "ipo")

_SOURCES = {
  "sigmoid": "Rafailov et al. 2023, arXiv:2305.18290, Eq. 7",
  "hinge": "Zhao et al. 2023, SLiC-HF, arXiv:2305.10425, Eq. 2",
  "ipo": "Azar et al. 2023, arXiv:2310.12036, Eq. 17 (length-averaged)",
  "exo_pair": "Ji et al. 2024, EXO, arXiv:2402.00856, Eq. 16",
  "nca_pair": "Chen et al. 2024, NCA, arXiv:2402.05369",
  "robust": "Chowdhury et al. 2024, Robust DPO, arXiv:2403.00409",
  "bco_pair": "Jung et al. 2024, BCO, arXiv:2404.04656 (no reward shift)",
  "sppo_hard": "Wu et al. 2024, SPPO, arXiv:2405.00675, Eq. 4.7 (hard labels)",
  "aot": "Melnyk et al. 2024, AOT, arXiv:2406.05882 (paired)",
  "aot_unpaired": "Melnyk et al. 2024, AOT, arXiv:2406.05882 (unpaired)",
  "apo_zero": "D'Oosterlinck et al. 2024, APO, arXiv:2408.06266, Eq. 7",
  "apo_down": "D'Oosterlinck et al. 2024, APO, arXiv:2408.06266, Eq. 8",
  "discopop": "Lu et al. 2024, DiscoPOP, arXiv:2406.08414, Eq. 5",
  "sft": "chosen-token-mean NLL (TRL; IRPO Pang et al. 2024, arXiv:2404.19733)",
  "sigmoid_norm": "length-averaged DPO (TRL; SimPO-style normalisation, arXiv:2405.14734)",
}
_REQUIRES = {"ipo": frozenset({"lengths"}), "sigmoid_norm": frozenset({"lengths"}), "sft": frozenset({"lengths"})}


def _accepted(fn) -> set:
  return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


# DPOConfig's loss fields in TRL 1.16 and their defaults. TRL's DPOConfig carries every one of them
# whatever the loss_type, and each loss type uses those TRL applies to it (e.g. `beta` is accepted
# and unused by "sft", `discopop_tau` by everything but "discopop").
DPO_CONFIG_LOSS_FIELDS = types.MappingProxyType(
  {
    "beta": 0.1,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "ld_alpha": None,
    "label_smoothing": 0.0,
    "use_weighting": False,
    "discopop_tau": 0.05,
  }
)


def check_trl_combination(who: str, loss_types, f_divergence_type, use_weighting, label_smoothing) -> None:
  """The combinations TRL 1.16's `DPOTrainer.__init__` / `_compute_loss` refuse or cannot compute."""
  _common.check_choice(who, "f_divergence_type", f_divergence_type, F_DIVERGENCES)
  if f_divergence_type != "reverse_kl" and not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
    raise ValueError(
      f"{who}: invalid f_divergence_type={f_divergence_type!r} for loss_type={loss_types}; "
      f"allowed: 'reverse_kl', or only loss types in {sorted(F_DIVERGENCE_LOSS_TYPES)}."
    )
  if use_weighting and {"aot", "aot_unpaired"} & set(loss_types):
    raise ValueError(
      f"{who}: invalid use_weighting=True with loss_type={loss_types}; allowed: use_weighting=False "
      "with 'aot'/'aot_unpaired' (they sort the batch, which would misalign per-pair weights)."
    )
  if use_weighting and "sft" in loss_types:
    raise ValueError(
      f"{who}: invalid use_weighting=True with loss_type={loss_types}; allowed: use_weighting=False "
      "with 'sft' (TRL 1.16 fails on this combination: it multiplies the weights in place into the "
      "broadcast scalar SFT loss)."
    )
  if "exo_pair" in loss_types and _common._is_static(label_smoothing) and float(label_smoothing) == 0.0:
    raise ValueError(
      f"{who}: invalid label_smoothing=0.0 for 'exo_pair'; allowed: a value in (0, 1) (the EXO paper recommends 1e-3)."
    )


def _trl_entry(loss_type: str):
  """`trl.<loss_type>`: the loss type's function taking every DPOConfig loss field, as TRL does.

  Fields the loss type does not use are accepted and ignored (TRL's semantics); combinations TRL
  refuses raise ValueError (`check_trl_combination`); values are checked by the loss function.
  """
  fn = TRL_LOSS_FUNCTIONS[loss_type]
  own = _accepted(fn)
  defaults = dict(DPO_CONFIG_LOSS_FIELDS)
  for name, p in inspect.signature(fn).parameters.items():
    if name in defaults and p.default is not inspect.Parameter.empty:
      defaults[name] = p.default  # pofx's per-type default where it has one (exo_pair's 1e-3)
  who = TRL_PREFIX + loss_type

  def entry(policy, reference=None, **kwargs):
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
      raise ValueError(f"{who}: unknown argument(s) {unknown}; allowed: DPOConfig's loss fields {sorted(defaults)}.")
    values = {**defaults, **kwargs}
    check_trl_combination(
      who, [loss_type], values["f_divergence_type"], values["use_weighting"], values["label_smoothing"]
    )
    return fn(policy, reference, **{k: v for k, v in values.items() if k in own})

  kw = inspect.Parameter.KEYWORD_ONLY
  pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
  entry.__signature__ = inspect.Signature(
    [inspect.Parameter("policy", pos), inspect.Parameter("reference", pos, default=None)]
    + [inspect.Parameter(k, kw, default=v) for k, v in defaults.items()]
  )
  entry.__name__ = entry.__qualname__ = f"trl_{loss_type}_entry"
  entry.__wrapped__ = fn
  used = sorted(own) or ["none"]
  entry.__doc__ = (
    f"TRL 1.16 `loss_type={loss_type!r}`, taking every DPOConfig loss field ({', '.join(defaults)}), as\n"
    f"TRL does; this loss type uses {', '.join(used)} and ignores the others. The formula:\n\n" + (fn.__doc__ or "")
  )
  return entry


def _trl_spec(loss_type: str, name: str, fn=None) -> LossSpec:
  source = f"{_SOURCES[loss_type]}; {_TRL} (loss_type={loss_type!r})"
  return LossSpec(
    name,
    TRL_LOSS_FUNCTIONS[loss_type] if fn is None else fn,
    "trl",
    source,
    reference="unused" if loss_type == "sft" else "required",
    requires=_REQUIRES.get(loss_type, frozenset()),
    reduction="chosen_token_mean" if loss_type == "sft" else "mean",
  )


# The compatibility namespace: every TRL loss_type, named `trl.<loss_type>`, with TRL 1.16's semantics
# (every DPOConfig loss field accepted, `_trl_entry`).
TRL_SPECS = {t: _trl_spec(t, TRL_PREFIX + t, _trl_entry(t)) for t in TRL_LOSS_TYPES}

# The canonical registry's entries from this module: the loss types only TRL has, and the methods
# built on TRL's modifiers.
SPECS = tuple(_trl_spec(t, t) for t in _ONLY_IN_TRL) + (
  LossSpec(
    "ld_dpo",
    ld_dpo,
    "trl",
    "Liu et al. 2024, LD-DPO, arXiv:2409.06411; formula of " + _TRL + " (ld_alpha)",
    requires=frozenset({"tokens", "lengths"}),
    example_hyper={"ld_alpha": 0.5},
  ),
  LossSpec(
    "wpo",
    wpo,
    "trl",
    "Zhou et al. 2024, WPO, arXiv:2406.11827, Eq. 2; " + _TRL + " (use_weighting)",
    requires=frozenset({"tokens", "log_sum_sq_probs"}),
    detached_by_design="the WPO weights are a stop-gradient function of the per-token log-probs",
  ),
  LossSpec(
    "f_dpo",
    f_dpo,
    "trl",
    "Wang et al. 2023, f-DPO, arXiv:2309.16240; " + _TRL + " (f_divergence_type)",
    example_hyper={"f_divergence_type": "js_divergence"},
  ),
)

# Canonical names of the formulas only TRL has (the same functions as `trl.<loss_type>`).
exo_pair = trl_exo_pair
bco_pair = trl_bco_pair
sppo_hard = trl_sppo_hard
aot = trl_aot
aot_unpaired = trl_aot_unpaired
apo_zero = trl_apo_zero
apo_down = trl_apo_down
discopop = trl_discopop
sft = trl_sft


def trl_dpo_loss(
  policy: PairLogps,
  reference: Optional[PairLogps],
  *,
  loss_type: Union[str, Sequence[str]] = "sigmoid",
  loss_weights: Optional[Sequence[float]] = None,
  beta: float = 0.1,
  f_divergence_type: str = "reverse_kl",
  f_alpha_divergence_coef: float = 0.5,
  ld_alpha: Optional[float] = None,
  label_smoothing: float = 0.0,
  use_weighting: bool = False,
  discopop_tau: float = 0.05,
) -> Array:
  r"""TRL's batch DPO loss: `sum_k loss_weights[k] * reduce_B(loss_type[k])`, a scalar.

  Mirrors `DPOTrainer._compute_loss` of TRL 1.16 with `DPOConfig`'s names and defaults:
  `loss_type` is a name or a list of names from `TRL_LOSS_TYPES`; `loss_weights` defaults to 1.0
  each (same length as `loss_type`); `reduce_B` is the mean over pairs, except "sft", which is
  TRL's token mean over the batch's chosen tokens. The modifiers are shared by all listed losses
  and each loss type takes the ones TRL applies to it (e.g. `label_smoothing` only affects
  robust, exo_pair, aot and aot_unpaired; `discopop_tau` only discopop). Example (MPO):
  `loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]`.

  Raises:
    ValueError: unknown loss type; `loss_weights` of another length; a non-default
      `f_divergence_type` with a loss type outside `F_DIVERGENCE_LOSS_TYPES`; `use_weighting` with
      aot/aot_unpaired (TRL raises NotImplementedError there) or with sft (TRL 1.16 raises a
      RuntimeError there); `label_smoothing=0` with exo_pair (as TRL); any hyperparameter outside
      its range.

  References: TRL 1.16 `trl/trainer/dpo_trainer.py::DPOTrainer._compute_loss` and `DPOConfig`.
  """
  types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
  if not types:
    raise ValueError("trl_dpo_loss: invalid loss_type=[]; allowed: one or more of " + str(sorted(TRL_LOSS_TYPES)) + ".")
  for t in types:
    _common.check_choice("trl_dpo_loss", "loss_type", t, TRL_LOSS_TYPES)
  weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
  if len(weights) != len(types):
    raise ValueError(
      f"trl_dpo_loss: invalid loss_weights={loss_weights!r}; allowed: one weight per loss_type ({len(types)})."
    )
  check_trl_combination("trl_dpo_loss", types, f_divergence_type, use_weighting, label_smoothing)
  available = dict(
    beta=beta,
    f_divergence_type=f_divergence_type,
    f_alpha_divergence_coef=f_alpha_divergence_coef,
    ld_alpha=ld_alpha,
    label_smoothing=label_smoothing,
    use_weighting=use_weighting,
    discopop_tau=discopop_tau,
  )
  total = jnp.float32(0.0)
  for t, w in zip(types, weights):
    fn = TRL_LOSS_FUNCTIONS[t]
    kwargs = {k: v for k, v in available.items() if k in _accepted(fn)}
    per_pair = fn(policy, reference, **kwargs)
    total = total + w * _registry.reduce(TRL_SPECS[t], per_pair, policy)
  return total


__all__ = [
  "F_DIVERGENCES",
  "F_DIVERGENCE_LOSS_TYPES",
  "TRL_LOSS_TYPES",
  "TRL_LOSS_FUNCTIONS",
  "TRL_PREFIX",
  "TRL_SPECS",
  "CANONICAL_NAME",
  "exo_pair",
  "bco_pair",
  "sppo_hard",
  "aot",
  "aot_unpaired",
  "apo_zero",
  "apo_down",
  "discopop",
  "sft",
  "f_divergence_link",
  "wpo_sequence_weights",
  "ld_weighted_sums",
  "DPO_CONFIG_LOSS_FIELDS",
  "trl_dpo_loss",
  "check_trl_combination",
  "ld_dpo",
  "wpo",
  "f_dpo",
  "trl_sigmoid",
  "trl_hinge",
  "trl_ipo",
  "trl_exo_pair",
  "trl_nca_pair",
  "trl_robust",
  "trl_bco_pair",
  "trl_sppo_hard",
  "trl_aot",
  "trl_aot_unpaired",
  "trl_apo_zero",
  "trl_apo_down",
  "trl_discopop",
  "trl_sft",
  "trl_sigmoid_norm",
]
