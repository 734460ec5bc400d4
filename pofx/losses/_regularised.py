r"""Preference losses with an additive likelihood regulariser: RPO (Liu et al.), IRPO, ASFT.

Notation: `pi_w` summed chosen log-prob, `|y_w|` its completion token count (clamped at 1),
`a = pi / |y|` length-averaged log-probs. The DPO term is `pofx.losses.dpo` (summed log-probs,
reference required). All functions return unreduced per-pair losses `[B]`; NLL terms are
per-pair (per-sequence sums or token means), so `batch_loss`'s mean weights every pair equally
(TRL / OpenRLHF average the chosen cross-entropy over the batch's tokens instead).
"""

from __future__ import annotations

import jax.numpy as jnp

from pofx.losses import _common
from pofx.losses._gpo_family import dpo
from pofx.losses._reference_free import log1m_exp
from pofx.losses._registry import LossSpec


def _chosen_nll_mean(name, policy):
  """`-pi_w / |y_w|`: the chosen completion's per-sequence token-mean NLL, float32."""
  len_w, _ = _common.lengths(policy, name)
  return -jnp.asarray(policy.chosen, jnp.float32) / len_w


def rpo(policy, reference, *, eta: float = 0.005, beta: float = 0.1, sft_form: str = "sum"):
  r"""RPO (Liu et al. 2024): DPO plus an SFT loss on the chosen completion.

  - `sft_form="sum"` (the paper's main text, "cumulative SFT loss"):
    `L = -log sigmoid(beta rho) - eta * beta * pi_w`, summed chosen log-prob;
  - `sft_form="mean"` (Appendix F / their OpenRLHF code, "average SFT loss"):
    `L = -log sigmoid(beta rho) + eta * (-pi_w / |y_w|)` (per-sequence token mean here;
    OpenRLHF averages over the batch's tokens).
  `rho` on summed log-probs; nothing detached. `eta = 0` is DPO.

  Args:
    policy, reference: `PairLogps` (reference required; lengths for `sft_form="mean"`).
    eta: regulariser weight (>= 0). 0.005 is the alignment-handbook value for the sum form
      (used there with beta = 0.01 or 0.05); the OpenRLHF runs of the mean form use eta = 0.2
      with beta = 0.5. The authors' README recommends the mean form in general.
    beta: inverse temperature (> 0), 0.1 as DPO.
    sft_form: "sum" or "mean".

  References: Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is
  Implicitly an Adversarial Regularizer", arXiv:2405.16436; code
  YSLIU627/Regularized-Preference-Optimization (`alignment-handbook/scripts/rpo_trainer.py`
  for the sum form, its OpenRLHF `nll_loss_coef` for the mean form).
  """
  _common.check_choice("rpo", "sft_form", sft_form, ("sum", "mean"))
  _common.check_inputs("rpo", policy, reference, need_reference=True, need_lengths=(sft_form == "mean"))
  _common.check_range("rpo", "eta", eta, low=0.0, allowed_text="eta >= 0")
  base = dpo(policy, reference, beta=beta)
  if sft_form == "sum":
    return base - eta * beta * jnp.asarray(policy.chosen, jnp.float32)
  return base + eta * _chosen_nll_mean("rpo", policy)


def irpo(policy, reference, *, alpha: float = 1.0, beta: float = 0.1):
  r"""Iterative Reasoning PO (IRPO) loss: DPO plus a length-normalised NLL on the chosen.

  `L = -log sigmoid(beta rho) - alpha * log pi(y_w | x) / |y_w|` (Eq. 1, DPO+NLL), summed
  log-probs in rho; the NLL is normalised by the chosen completion's total length (CoT +
  answer: the whole completion). Nothing is detached. In the paper the reference is the
  previous iteration's model. `alpha = 0` is DPO.

  TRL's `rpo_alpha` (<= 0.27) adds `alpha` times the token mean over all chosen tokens of the
  batch instead; the batch losses coincide when all chosen completions have equal length.

  Args:
    policy: `PairLogps` with `chosen_len`; reference: `PairLogps` (required).
    alpha: NLL weight (>= 0), 1.0 (tuned over {0.25, 0.5, 1, 2}).
    beta: inverse temperature (> 0), 0.1 (GSM8K; tuned over {0.05, 0.1, 0.5, 1.0}).

  References: Pang et al. 2024, "Iterative Reasoning Preference Optimization",
  arXiv:2404.19733 (v3), Eq. (1) and Sec. 3.1.
  """
  _common.check_inputs("irpo", policy, reference, need_reference=True, need_lengths=True)
  _common.check_range("irpo", "alpha", alpha, low=0.0, allowed_text="alpha >= 0")
  return dpo(policy, reference, beta=beta) + alpha * _chosen_nll_mean("irpo", policy)


def asft(policy, reference=None, *, lam):
  r"""ASFT: SFT plus pointwise log-likelihood terms on absolute (length-normalised) probabilities.

  With `P(y) = exp(a)` the length-averaged sequence probability and
  `odds(y) = P / (1 - P)`:

    `L = -a_w + lam * [-log sigmoid(log odds(y_w)) - log sigmoid(-log odds(y_l))]`
      `= -a_w + lam * [-a_w - log(1 - exp(a_l))]`,

  i.e. SFT plus a binary cross-entropy pushing `P(y_w)` up and `P(y_l)` down independently
  (pointwise: no pairwise margin). No reference model (`reference` is ignored); nothing is
  detached. `log(1 - exp(a))` is computed stably, average log-probs clamped at -1e-6.
  `lam = 0` is SFT on the chosen.

  Provenance: the abstract only says ASFT optimises "absolute likelihood for each response"
  without a reference model. The formula, and that ASFT length-normalises its probabilities,
  is taken from Gorbatovski et al. 2025, "The Differences Between Direct Alignment Algorithms
  are a Blur", arXiv:2502.01237 (Sec. 2.4, App. A.1 Table 4, App. C), which restates the
  original objective; the ASFT paper's own equations could not be read here. The value of
  lambda was not found, so `lam` has no default.

  Args:
    policy: `PairLogps` with `chosen_len`, `rejected_len`.
    reference: ignored.
    lam: weight of the alignment term (>= 0), required.

  References: Wang, Sun, Hua & Fang 2024, "ASFT: Aligned Supervised Fine-Tuning through
  Absolute Likelihood", arXiv:2409.10571.
  """
  del reference
  _common.check_inputs("asft", policy, None, need_lengths=True)
  _common.check_range("asft", "lam", lam, low=0.0, allowed_text="lam >= 0")
  len_w, len_l = _common.lengths(policy, "asft")
  a_w = jnp.asarray(policy.chosen, jnp.float32) / len_w
  a_l = jnp.asarray(policy.rejected, jnp.float32) / len_l
  # -log sigmoid(log odds(y_w)) = -log P(y_w) = -a_w ; -log sigmoid(-log odds(y_l)) = -log(1 - P(y_l)).
  align = -a_w - log1m_exp(a_l)
  return -a_w + lam * align


SPECS = (
  LossSpec(
    "rpo",
    rpo,
    "regularised",
    "Liu et al. 2024, arXiv:2405.16436 (DPO - eta*beta*pi_w; sft_form='mean' as App. F / OpenRLHF)",
    requires=frozenset({"lengths"}),
  ),
  LossSpec(
    "irpo",
    irpo,
    "regularised",
    "Pang et al. 2024, arXiv:2404.19733 v3, Eq. 1 (DPO + alpha * NLL / |y_w|)",
    requires=frozenset({"lengths"}),
  ),
  LossSpec(
    "asft",
    asft,
    "regularised",
    "Wang et al. 2024, arXiv:2409.10571 (formula as restated by Gorbatovski et al. 2025, arXiv:2502.01237)",
    reference="unused",
    requires=frozenset({"lengths"}),
    example_hyper={"lam": 0.1},
  ),
)
