r"""Ra-DPO: risk-aware DPO, with the sequential risk term computed from full-vocabulary logits.

Two parts:
- `ra_dpo_sequence_risk(policy_logits, reference_logits, mask)` computes the per-sequence risk
  R from `[B, T, V]` logits (call it for the chosen and the rejected completions);
- `ra_dpo` / `ra_dpo2` take `chosen_risk`, `rejected_risk` `[B]` next to the usual `PairLogps`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from pofx import gpo as gpo_fns
from pofx._pair_logps import PairLogps
from pofx.losses import _common
from pofx.losses._registry import LossSpec

Array = jax.Array

_SOURCE = (
  "Zhang et al. 2025, Ra-DPO, arXiv:2505.20359; code zlj123-max/Ra-DPO "
  "Ra-DPO/train/trainers.py::Ra_DPOTrainer, config/loss/ra-dpo.yaml"
)


def _truncated_kl(d: Array, p_ref: Array, confidence_level) -> Array:
  """`sum_v p_ref(v) d_v 1[d_v > VaR]`, VaR the (1 - cl) quantile of d over the last axis (linear)."""
  var = jnp.quantile(d, 1.0 - confidence_level, axis=-1, keepdims=True, method="linear")
  return jnp.sum(jnp.where(d > var, p_ref * d, 0.0), axis=-1)


def ra_dpo_sequence_risk(
  policy_logits: Array,
  reference_logits: Array,
  mask: Array,
  *,
  confidence_level: float = 0.95,
  split_vocab: bool = True,
) -> Array:
  r"""Ra-DPO's sequential risk `R = sum_t mask_t R_t` of one completion, from full-vocabulary logits.

  Per position t, with `d_v = log pi_ref(v) - log pi_theta(v)` over the vocabulary,
  `R_t = sum_v pi_ref(v) d_v 1[d_v > VaR_t]`, where VaR_t is the `(1 - confidence_level)`
  quantile of d (linear interpolation, as `torch.quantile`): a truncated KL(pi_ref || pi_theta)
  that drops the lowest-d tail. With `split_vocab=True` (the code's default
  `is_split_risk_ratio`) the vocabulary axis is cut into halves `[0, V//2)` and `[V//2, V)`, each
  with its own quantile, and the two truncated sums are added, exactly as the authors' code does.

  `logits[b, t]` must be the next-token distribution that scores the completion token at `[b, t]`
  (already shifted, aligned with `mask`). The reference is detached; gradients reach the policy
  through `log pi_theta` (the indicator has none). Log-probs are `log_softmax` (the code takes
  `log(softmax)`, which is -inf where the softmax underflows); computed in float32.

  Args:
    policy_logits, reference_logits: `[B, T, V]` logits.
    mask: `[B, T]` 0/1 completion mask.
    confidence_level: in (0, 1) (0.95 in the yaml; released runs 0.97-0.99).
    split_vocab: the code's `is_split_risk_ratio` (True).

  Returns:
    `[B]` float32 sequence risks, to pass as `chosen_risk` / `rejected_risk`.

  References: Zhang et al. 2025, "Risk-aware Direct Preference Optimization under Nested Risk
  Measure", arXiv:2505.20359; code zlj123-max/Ra-DPO `train/trainers.py::Ra_DPOTrainer`
  (`get_batch_logps`, `calculate_cvar`).
  """
  name = "ra_dpo_sequence_risk"
  _common.check_range(name, "confidence_level", confidence_level, low=0.0, high=1.0, low_open=True, high_open=True)
  chex.assert_rank([policy_logits, reference_logits], 3)
  chex.assert_equal_shape([policy_logits, reference_logits])
  chex.assert_rank(mask, 2)
  chex.assert_equal_shape_prefix([policy_logits, mask], 2)
  logp = jax.nn.log_softmax(jnp.asarray(policy_logits, jnp.float32), axis=-1)
  ref_logp = jax.nn.log_softmax(jax.lax.stop_gradient(jnp.asarray(reference_logits, jnp.float32)), axis=-1)
  p_ref = jnp.exp(ref_logp)
  d = ref_logp - logp
  if split_vocab:
    mid = d.shape[-1] // 2
    r_t = _truncated_kl(d[..., :mid], p_ref[..., :mid], confidence_level) + _truncated_kl(
      d[..., mid:], p_ref[..., mid:], confidence_level
    )
  else:
    r_t = _truncated_kl(d, p_ref, confidence_level)
  return jnp.sum(jnp.where(jnp.asarray(mask) > 0, r_t, 0.0), axis=-1)


def _risk_inputs(name, policy, reference, beta, chosen_risk, rejected_risk):
  _common.check_inputs(name, policy, reference, need_reference=True)
  _common.check_beta(name, beta)
  chex.assert_equal_shape([policy.chosen, chosen_risk, rejected_risk])
  rho = jnp.asarray(_common.margins(policy, reference), jnp.float32)
  return rho, jnp.asarray(chosen_risk, jnp.float32), jnp.asarray(rejected_risk, jnp.float32)


def ra_dpo(
  policy: PairLogps, reference: PairLogps, *, beta: float = 0.1, chosen_risk: Array, rejected_risk: Array
) -> Array:
  r"""Ra-DPO1: `-log sigmoid(beta * (rho - (R_l - R_w)))`.

  `rho = (pi_w - ref_w) - (pi_l - ref_l)` on summed token log-ratios; `R_w`, `R_l` the sequence
  risks (`ra_dpo_sequence_risk`), differentiable (nothing detached). TDPO1's structure with the
  sequential KL replaced by the risk. Zero risks give DPO.

  Args:
    policy, reference: `PairLogps`.
    beta: inverse temperature (> 0; 0.1 in the yaml).
    chosen_risk, rejected_risk: `[B]` sequence risks of the chosen and rejected completions.

  Returns:
    `[B]` per-pair losses.

  References: Zhang et al. 2025, arXiv:2505.20359; code zlj123-max/Ra-DPO
  `train/trainers.py::Ra_DPOTrainer.loss` (if_ra_dpo2=False, the yaml default).
  """
  rho, r_w, r_l = _risk_inputs("ra_dpo", policy, reference, beta, chosen_risk, rejected_risk)
  return gpo_fns.logistic(beta * (rho - (r_l - r_w)))


def ra_dpo2(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.1,
  alpha: float = 0.5,
  chosen_risk: Array,
  rejected_risk: Array,
) -> Array:
  r"""Ra-DPO2: `-log sigmoid(beta * (rho - alpha * (R_l - sg(R_w))))`.

  As `ra_dpo` with the risk difference scaled by alpha and the chosen risk detached
  (`jax.lax.stop_gradient`), the TDPO2 form. alpha = 0 gives DPO; alpha = 1 with values equal
  to Ra-DPO1 (gradients differ through R_w).

  Args:
    policy, reference: `PairLogps`.
    beta: inverse temperature (> 0; 0.1).
    alpha: weight of the risk term (>= 0; 0.5 in the yaml).
    chosen_risk, rejected_risk: `[B]` sequence risks.

  Returns:
    `[B]` per-pair losses.

  References: Zhang et al. 2025, arXiv:2505.20359; code zlj123-max/Ra-DPO
  `train/trainers.py::Ra_DPOTrainer.loss` (if_ra_dpo2=True).
  """
  rho, r_w, r_l = _risk_inputs("ra_dpo2", policy, reference, beta, chosen_risk, rejected_risk)
  _common.check_range("ra_dpo2", "alpha", alpha, low=0.0)
  return gpo_fns.logistic(beta * (rho - alpha * (r_l - jax.lax.stop_gradient(r_w))))


SPECS = (
  LossSpec("ra_dpo", ra_dpo, "risk", _SOURCE + " (Ra-DPO1)", requires=frozenset({"risk"})),
  LossSpec("ra_dpo2", ra_dpo2, "risk", _SOURCE + " (Ra-DPO2)", requires=frozenset({"risk"})),
)
