r"""DPO with a modulated reference, a length margin, asymmetric betas, or margin-adaptive weights.

MIPO (reference intervention modulated per pair), iLR-DPO (a length margin), Flex-DPO with the
3D-properties SFT term (different betas for the chosen and rejected log-ratios), and MADPO (a
per-pair weight from a reward model's margin). Each is the logistic loss of a modified DPO logit,
possibly weighted or plus an NLL term. Notation as in docs/methods.md: `pi_w` summed chosen
log-prob, `|y_w|` its completion token count (clamped at 1), `a_w = pi_w / |y_w|`,
`lr_w = pi_w - ref_w`, `rho = lr_w - lr_l`. The reference is required by all four. External
scores are data: wrapped in `jax.lax.stop_gradient`. All functions return unreduced per-pair
losses `[B]`, float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pofx import gpo as gpo_fns
from pofx.losses import _common
from pofx.losses._registry import ANY_FINITE_SCORES, LossSpec

# MADPO's exponent lam * (|h| - tau) is clamped here before exp (the weight is already at its
# floor c_min long before; this only keeps float32 finite).
_MADPO_MAX_EXPONENT = 80.0


_f32, _logratios = _common.f32, _common.checked_logratios


def mipo(policy, reference, *, beta: float = 20.0):
  r"""MIPO: SimPO-like averaged margin minus a reference term that grows with the reference's fit.

  With length-averaged log-probs `a = pi / |y|` (policy) and `a^ref = ref / |y|` (reference,
  same completions and lengths):

    `K = a^ref_w - a^ref_l`  (how well the reference already ranks the pair),
    `L = -log sigmoid(beta * (a_w - a_l - q(K)))`,  `q(K) = log(1 + e^K)` (softplus).

  A pair the reference already ranks well (large K) needs the policy's averaged margin to reach
  about K, i.e. the policy stays near the reference there; a pair it ranks badly (K << 0) has
  `q(K) ~ 0`, a reference-free averaged margin (SimPO with gamma = 0). `K` depends on the
  reference only (a constant for the policy); `q` is computed as a stable softplus (the authors'
  `log(1 + exp(K))` overflows for K > 88 in float32).

  Args:
    policy: `PairLogps` with `chosen_len`, `rejected_len` (the reference is averaged with them).
    reference: `PairLogps` (required).
    beta: inverse temperature on the averaged margin (> 0). 20 is the authors' released
      Llama-3-8B config; their README reports good results for 5-25.

  References: Jang 2024, "Modulated Intervention Preference Optimization (MIPO): Keep the Easy,
  Refine the Difficult", arXiv:2409.17545; code ncsoft/MIPO `src/trainers/mipo_trainer.py`
  (`mipo_loss`, average log-probs from `concatenated_forward`) and `configs/llama3/config.yaml`.
  """
  _common.check_inputs("mipo", policy, reference, need_reference=True, need_lengths=True)
  _common.check_beta("mipo", beta)
  len_w, len_l = _common.lengths(policy, "mipo")
  margin = (_f32(policy.chosen) / len_w) - (_f32(policy.rejected) / len_l)
  k = (_f32(reference.chosen) / len_w) - (_f32(reference.rejected) / len_l)
  return gpo_fns.logistic(beta * (margin - jax.nn.softplus(k)))


def mipo_alignment(policy, reference):
  r"""MIPO's per-pair `K = ref_w / |y_w| - ref_l / |y_l|` and modulator `q(K) = log(1 + e^K)`, float32 `[B]` each.

  Reference: Jang 2024, arXiv:2409.17545 (see `mipo`).
  """
  _common.check_inputs("mipo_alignment", policy, reference, need_reference=True, need_lengths=True)
  len_w, len_l = _common.lengths(policy, "mipo_alignment")
  k = (_f32(reference.chosen) / len_w) - (_f32(reference.rejected) / len_l)
  return k, jax.nn.softplus(k)


def ilr_dpo(policy, reference, *, alpha, beta: float = 0.1):
  r"""iLR-DPO's length-regularised DPO: a length margin inside the logistic loss.

  `L = -log sigmoid(beta rho + alpha (|y_w| - |y_l|))`, summed log-probs, token counts of the
  completions. This is DPO for the length-penalised reward `r(x, y) - alpha |y|`: the policy that
  maximises `E[r - alpha |y|] - beta KL` has implicit reward `beta lr(y) = r(y) - alpha |y| + Z(x)`,
  so the preference model on `r` gives the margin `beta rho + alpha (|y_w| - |y_l|)`. A longer
  chosen completion then explains part of the preference by its length, and the policy learns
  less of it: less verbosity. `alpha = 0` is DPO. Nothing is detached; the lengths are data.

  Provenance: summaries of iLR-DPO (Liu et al.) describe its loss as "a margin-based cross-entropy
  loss that incorporates both a standard preference margin and a length margin", the
  multi-objective DPO of MODPO (Zhou et al., the same group) with a length penalty. The formula here is MODPO's loss as
  the authors' code computes it with the length-penalty margin reward `m(y) = -|y|` and weights
  `w = (1, alpha)`: `(1/w_0) [beta rho - alpha (m(y_w) - m(y_l))]`. The iLR-DPO paper's own
  equation text and its value of alpha could not be read here, so `alpha` has no default.
  The "iterative" part of iLR-DPO (new online pairs each round, the previous round's policy as
  reference) is a data and reference schedule, not part of the loss.

  Args:
    policy: `PairLogps` with `chosen_len`, `rejected_len`; reference: `PairLogps` (required).
    alpha: length-penalty weight per token (>= 0), required.
    beta: inverse temperature (> 0), 0.1.

  References: Liu, Zhou et al. 2024, "Iterative Length-Regularized Direct Preference
  Optimization: A Case Study on Improving 7B Language Models to GPT-4 Level", arXiv:2406.11817;
  Zhou et al. 2023, "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference
  Optimization", arXiv:2310.03708; code ZHZisZZ/modpo `src/trainer/modpo_trainer.py::modpo_loss`
  and `scripts/modpo/summarize_w_length_penalty/modpo.py::LengthPenaltyWrapper`.
  """
  lr_w, lr_l = _logratios("ilr_dpo", policy, reference, need_lengths=True)
  _common.check_beta("ilr_dpo", beta)
  _common.check_range("ilr_dpo", "alpha", alpha, low=0.0, allowed_text="alpha >= 0")
  len_w, len_l = _common.lengths(policy, "ilr_dpo")
  return gpo_fns.logistic(beta * (lr_w - lr_l) + alpha * (len_w - len_l))


def flex_dpo(policy, reference, *, beta_chosen: float = 0.1, beta_rejected: float = 0.08, sft_weight: float = 0.0):
  r"""Flex-DPO with the SFT term: the 3D-properties regularisers of DPO.

  `L = -log sigmoid(beta_chosen * lr_w - beta_rejected * lr_l) + sft_weight * (-pi_w / |y_w|)`,
  summed log-probs in the log-ratios, nothing detached. Against the "3D-properties" of DPO (a
  drastic drop of the rejected likelihood, degradation into suppressing the rejected response,
  dispersion of probability to unseen responses), the paper regularises DPO two ways: a smaller
  beta on the rejected log-ratio than on the chosen one (the gradient on the rejected response is
  `beta_rejected / beta_chosen` times DPO's, relative to the chosen one), and an SFT loss on the
  chosen completion. `beta_rejected = beta_chosen = beta`, `sft_weight = 0` is DPO; with
  `sft_weight = 0` this is `dpo_shift` with `beta = beta_chosen`, `lam = beta_rejected / beta_chosen`.

  Provenance: the paper's sweep fixes `beta_chosen` and lowers `beta_rejected`, with the best
  value at 0.08 against 0.1 (its Fig. 4, as the ICLR 2025 reviews report it); the defaults are
  those. The SFT term's normalisation and weight could not be read in the paper: pofx uses the
  chosen completion's per-sequence token-mean NLL (as `irpo`) and `sft_weight = 0` by default.

  Args:
    policy: `PairLogps` (with `chosen_len` when `sft_weight > 0`); reference: `PairLogps` (required).
    beta_chosen: beta on the chosen log-ratio (> 0), 0.1.
    beta_rejected: beta on the rejected log-ratio (> 0), 0.08.
    sft_weight: weight of the chosen NLL term (>= 0), 0.

  References: Yan et al. 2024, "3D-Properties: Identifying Challenges in DPO and Charting a Path
  Forward", arXiv:2406.07327 (ICLR 2025), Sec. 3.3 (Flex-DPO) and 4.3.
  """
  lr_w, lr_l = _logratios("flex_dpo", policy, reference)
  _common.check_range("flex_dpo", "beta_chosen", beta_chosen, low=0.0, low_open=True, allowed_text="beta_chosen > 0")
  _common.check_range(
    "flex_dpo", "beta_rejected", beta_rejected, low=0.0, low_open=True, allowed_text="beta_rejected > 0"
  )
  _common.check_range("flex_dpo", "sft_weight", sft_weight, low=0.0, allowed_text="sft_weight >= 0")
  loss = gpo_fns.logistic(beta_chosen * lr_w - beta_rejected * lr_l)
  if _common._is_static(sft_weight) and float(sft_weight) == 0.0:
    return loss
  _common.check_inputs("flex_dpo", policy, reference, need_lengths=True)
  len_w, _ = _common.lengths(policy, "flex_dpo")
  return loss + sft_weight * (-_f32(policy.chosen) / len_w)


def _check_madpo(c_max, c_min, lam, tau):
  _common.check_range("madpo", "c_max", c_max, low=1.0, low_open=True, allowed_text="c_max > 1")
  _common.check_range("madpo", "c_min", c_min, low=0.0, high=1.0, low_open=True, high_open=True)
  _common.check_range("madpo", "lam", lam, low=0.0, low_open=True, allowed_text="lam > 0")
  _common.check_range("madpo", "tau", tau, low=0.0, low_open=True, allowed_text="tau > 0")


def madpo_weights(chosen_scores, rejected_scores, *, c_max=2.0, c_min=0.5, lam=1.0, tau=math.log(999.0)):
  r"""MADPO's per-pair weights from a reward model's margin `h = s_w - s_l` (detached), `[B]` float32.

    `c(|h|) = c_min + (c_max - c_min) / (1 + (c_max - 1) / (1 - c_min) * exp(lam (|h| - tau)))`,
    `w(h) = sigmoid(c(|h|) h) / sigmoid(h)` for `h > -tau`, and `w(h) = 1` for `h <= -tau`.

  `c` falls from about `c_max` (small margins) through 1 at `|h| = tau` to `c_min` (large
  margins), so a hard pair (`0 < h < tau`) is weighted above 1 and an easy one (`h > tau`) below
  1, and a pair the reward model ranks the other way (`-tau < h < 0`) is weighted below 1; the
  weight is capped at 1 for `h <= -tau` (the authors' guard against mislabelled pairs). The ratio
  is computed in log space.

  References: Rho 2025, arXiv:2510.05342; code sirano1004/Margin-Apative-Direct-Preference-Optimization
  `utils/loss_functions.py::MADPOLoss` (`coef`, `forward`).
  """
  _check_madpo(c_max, c_min, lam, tau)
  h = jax.lax.stop_gradient(_f32(chosen_scores) - _f32(rejected_scores))
  exponent = jnp.minimum(lam * (jnp.abs(h) - tau), _MADPO_MAX_EXPONENT)
  c = c_min + (c_max - c_min) / (1.0 + (c_max - 1.0) / (1.0 - c_min) * jnp.exp(exponent))
  ratio = jnp.exp(jax.nn.log_sigmoid(c * h) - jax.nn.log_sigmoid(h))
  return jnp.where(h > -tau, ratio, 1.0)


def madpo(
  policy,
  reference,
  *,
  chosen_scores=None,
  rejected_scores=None,
  beta: float = 0.1,
  c_max: float = 2.0,
  c_min: float = 0.5,
  lam: float = 1.0,
  tau: float = math.log(999.0),
):
  r"""MADPO: DPO weighted per pair by a function of the reward model's margin.

  `L = w(h) * (-log sigmoid(beta rho))`, summed log-probs, `h = s_w - s_l` the margin of the
  (separately trained, here: given) reward model's scores, `w = madpo_weights(h)` (detached):
  hard pairs (small positive margin) weigh more, easy ones (large margin) less, creating an
  effective target margin that is larger for hard pairs. `c_max = 1` would make every weight 1
  (DPO); pofx requires `c_max > 1`. A pair with `|h| = tau` has weight exactly 1.

  Args:
    policy, reference: `PairLogps` (reference required).
    chosen_scores, rejected_scores: `[B]` reward-model scores of the two completions.
    beta: inverse temperature (> 0), 0.1.
    c_max: the weight function's largest coefficient (> 1), 2.
    c_min: its smallest coefficient, in (0, 1), 0.5 (the authors' notebook sets `1 / c_max`).
    lam: steepness of the coefficient's fall in `|h|` (> 0), 1.
    tau: the margin where the coefficient is 1 (> 0), `log(0.999 / 0.001) = log 999` (the
      notebook of the reported runs; the loss class's own default is 2).

  References: Rho 2025, "Margin Adaptive DPO: Leveraging Reward Model for Granular Control in
  Preference Optimization", arXiv:2510.05342; code sirano1004/Margin-Apative-Direct-Preference-Optimization
  (`utils/loss_functions.py::MADPOLoss`, hyperparameters from `notebooks/MADPO.ipynb`).
  """
  lr_w, lr_l = _logratios("madpo", policy, reference)
  _common.check_beta("madpo", beta)
  if chosen_scores is None or rejected_scores is None:
    raise ValueError("madpo needs per-pair scores: pass chosen_scores= and rejected_scores= ([B]).")
  b = lr_w.shape[0]
  if jnp.shape(chosen_scores) != (b,) or jnp.shape(rejected_scores) != (b,):
    raise ValueError(
      f"madpo: chosen_scores and rejected_scores must have shape ({b},), got "
      f"{jnp.shape(chosen_scores)} and {jnp.shape(rejected_scores)}."
    )
  weights = madpo_weights(chosen_scores, rejected_scores, c_max=c_max, c_min=c_min, lam=lam, tau=tau)
  return weights * gpo_fns.logistic(beta * (lr_w - lr_l))


SPECS = (
  LossSpec(
    "mipo",
    mipo,
    "margin",
    "Jang 2024, arXiv:2409.17545; ncsoft/MIPO mipo_trainer.py::mipo_loss (averaged log-probs, q(K) = softplus(K))",
    requires=frozenset({"lengths"}),
  ),
  LossSpec(
    "ilr_dpo",
    ilr_dpo,
    "margin",
    "Liu et al. 2024, arXiv:2406.11817 (length margin); formula of MODPO, ZHZisZZ/modpo modpo_trainer.py::modpo_loss",
    requires=frozenset({"lengths"}),
    example_hyper={"alpha": 0.01},
  ),
  LossSpec(
    "flex_dpo",
    flex_dpo,
    "margin",
    "Yan et al. 2024, arXiv:2406.07327, Sec. 3.3 (Flex-DPO beta+/beta-; SFT term on the chosen)",
    requires=frozenset({"lengths"}),
  ),
  LossSpec(
    "madpo",
    madpo,
    "weighted",
    "Rho 2025, arXiv:2510.05342; sirano1004/Margin-Apative-Direct-Preference-Optimization MADPOLoss",
    requires=frozenset({"scores"}),
    score_domain=ANY_FINITE_SCORES,
  ),
)
