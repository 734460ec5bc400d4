r"""Label-noise-aware DPO losses: cDPO (label smoothing), robust DPO, FocalPO.

All three act on the DPO logit `v = beta * rho`, `rho = (pi_w - ref_w) - (pi_l - ref_l)` on
**summed** completion log-probs, and return unreduced per-pair losses `[B]`.

`smoothed_logistic(v, eps)` (the conservative / label-smoothed logistic loss) is shared with
SimPO's `label_smoothing` option in `_reference_free.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pofx import gpo as gpo_fns
from pofx.losses import _common
from pofx.losses._registry import LossSpec
from pofx.losses._trl import trl_robust


def smoothed_logistic(v, eps):
  r"""Label-smoothed logistic loss `(1 - eps) * softplus(-v) + eps * softplus(v)`.

  Equals `-(1 - eps) log sigmoid(v) - eps log sigmoid(-v)`: the cross-entropy of sigmoid(v)
  against the soft label `1 - eps`. `eps = 0` is the logistic loss `gpo.logistic(v)`.
  """
  return (1.0 - eps) * gpo_fns.logistic(v) + eps * gpo_fns.logistic(-v)


def _dpo_logit(name, policy, reference, beta):
  _common.check_inputs(name, policy, reference, need_reference=True)
  _common.check_beta(name, beta)
  return beta * jnp.asarray(_common.margins(policy, reference), jnp.float32)


def cdpo(policy, reference, *, eps, beta: float = 0.1):
  r"""Conservative DPO (cDPO): DPO with label smoothing.

  `L = -(1 - eps) log sigmoid(beta rho) - eps log sigmoid(-beta rho)`,
  `rho = (pi_w - ref_w) - (pi_l - ref_l)` on summed log-probs; nothing is detached.

  The preference label is assumed flipped with probability eps; the loss is the expected
  DPO loss under that soft label. It is minimised at a finite margin
  `beta rho = log((1 - eps) / eps)`. `eps = 0` is DPO.

  Args:
    policy, reference: `PairLogps` (reference required).
    eps: label-flip probability in [0, 0.5]. No canonical default exists (old TRL's
      `label_smoothing` defaulted to 0 = DPO); it must be given.
    beta: inverse temperature (> 0).

  References: Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"
  (cDPO note); old TRL `DPOTrainer` loss_type="sigmoid" with `label_smoothing` (the form
  followed here); also the SimPO / ODPO / beta-DPO trainers.
  """
  _common.check_range("cdpo", "eps", eps, low=0.0, high=0.5)
  return smoothed_logistic(_dpo_logit("cdpo", policy, reference, beta), eps)


def robust_dpo(policy, reference, *, eps: float = 0.1, beta: float = 0.1):
  r"""Robust DPO (rDPO): the unbiased DPO loss under flip rate eps.

  `L = [(1 - eps) * (-log sigmoid(beta rho)) - eps * (-log sigmoid(-beta rho))] / (1 - 2 eps)`,
  summed log-probs, nothing detached. Its expectation under labels flipped with probability
  eps equals the clean DPO loss (unlike cDPO, whose minimiser is shifted). It can be
  negative, and is unbounded below as `beta rho -> +inf` for eps > 0 (the paper's
  estimator; it is not a smoothed loss). `eps = 0` is DPO.

  Args:
    policy, reference: `PairLogps` (reference required).
    eps: flip rate in [0, 0.5) (0.5 makes the estimator undefined). Default 0.1, the value
      TRL's documentation gives as the paper's recommendation.
    beta: inverse temperature (> 0).

  References: Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language
  Models with Noisy Feedback", arXiv:2403.00409 (the rDPO loss; the form here is the one
  implemented by TRL `DPOTrainer` loss_type="robust", equation number not checked).
  """
  _common.check_range("robust_dpo", "eps", eps, low=0.0, high=0.5, high_open=True, allowed_text="0 <= eps < 0.5")
  _dpo_logit("robust_dpo", policy, reference, beta)  # input and beta checks
  return trl_robust(policy, reference, beta=beta, label_smoothing=eps)  # one implementation of the formula


def focalpo(policy, reference, *, gamma, beta: float = 0.1, detach_weight: bool = False):
  r"""FocalPO: DPO scaled by the modulating factor `p^gamma`, `p = sigmoid(beta rho)`.

  `L = -p^gamma * log p = sigmoid(beta rho)^gamma * softplus(-beta rho)`, summed log-probs.
  The factor grows with p, so pairs the model already ranks correctly are weighted *up* and
  misranked pairs (p < 1/2) down, the reverse of vision focal loss. Computed as
  `exp(gamma * log sigmoid(v)) * softplus(-v)`, finite for any v. `gamma = 0` is DPO.

  Gradient convention (unverified, see below): with `detach_weight=False` (default) the loss
  is differentiated as written, through the factor; with `detach_weight=True` the factor is
  `jax.lax.stop_gradient(p)^gamma`, a per-pair weight on the DPO gradient (as oxRL
  implements it). The value is the same either way.

  Provenance: the form `-p^gamma log p` is the abstract's "modulating factor to dynamically
  scale DPO loss" and is stated identically by third-party implementations and notes
  (oxRL `oxrl/algs/focalpo.py`, which cites the paper's Eq. 4). The authors' repository
  (TongLiu-github/focalpo) holds no code, and whether the paper back-propagates through p^gamma
  could not be checked against the paper text. The paper fixes gamma across experiments but its
  value was not found, so `gamma` has no default.

  Args:
    policy, reference: `PairLogps` (reference required).
    gamma: focusing exponent >= 0 (required).
    beta: inverse temperature (> 0).
    detach_weight: stop the gradient through `p^gamma`.

  References: Liu, Yu, Zhou, Gu & Tresp 2025, "FocalPO: Enhancing Preference Optimizing by
  Focusing on Correct Preference Rankings", arXiv:2501.06645 (ACL 2025).
  """
  _common.check_range("focalpo", "gamma", gamma, low=0.0, allowed_text="gamma >= 0")
  if not isinstance(detach_weight, bool):
    raise ValueError(f"focalpo: invalid detach_weight={detach_weight!r}; allowed: True or False.")
  v = _dpo_logit("focalpo", policy, reference, beta)
  log_p = jax.nn.log_sigmoid(v)
  if detach_weight:
    log_p_weight = jax.lax.stop_gradient(log_p)
  else:
    log_p_weight = log_p
  return jnp.exp(gamma * log_p_weight) * gpo_fns.logistic(v)


SPECS = (
  LossSpec(
    "cdpo",
    cdpo,
    "label-noise",
    "Mitchell 2023 cDPO note; old TRL sigmoid + label_smoothing (conservative DPO)",
    example_hyper={"eps": 0.1},
  ),
  LossSpec(
    "robust_dpo", robust_dpo, "label-noise", "Chowdhury et al. 2024, arXiv:2403.00409 (rDPO), as TRL loss_type='robust'"
  ),
  LossSpec(
    "focalpo",
    focalpo,
    "label-noise",
    "Liu et al. 2025, arXiv:2501.06645 (FocalPO; -p^gamma log p, gradient detach unverified)",
    example_hyper={"gamma": 0.5},
  ),
)
