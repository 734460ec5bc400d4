r"""Pointwise (absolute-reward) losses: NCA (pairwise and K-way), K-way InfoNCA, UNA, KTO.

These are not functions of the margin `rho` alone: each completion's implicit reward
`r = beta * (log pi(y) - log ref(y))` (summed log-probs) enters on its own, against a target
(a label, a soft label from scores, a score, or KTO's reference point z0). Pairwise InfoNCA with
hard labels, `-log softmax(r_w, r_l)[w] = -log sigmoid(r_w - r_l)`, is DPO: it is `pofx.losses.dpo`
(the authors' pairwise trainer computes DPO for loss_type="InfoNCA").
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from pofx._pair_logps import ListLogps, PairLogps
from pofx.losses import _common
from pofx.losses._registry import LossSpec, ScoreDomain, check_scores
from pofx.losses._trl import trl_nca_pair

Array = jax.Array

_NCA_SOURCE = "Chen et al. 2024, Noise Contrastive Alignment, arXiv:2402.05369; code thu-ml/Noise-Contrastive-Alignment"


def _rewards(policy: PairLogps, reference: PairLogps, beta):
  lr_w, lr_l = _common.logratios(policy, reference)
  return beta * jnp.asarray(lr_w, jnp.float32), beta * jnp.asarray(lr_l, jnp.float32)


# -------------------------------------------------------------------------------------------------
# NCA / InfoNCA
# -------------------------------------------------------------------------------------------------


def nca(policy: PairLogps, reference: PairLogps, *, beta: float = 0.1) -> Array:
  r"""Pairwise NCA: `-log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l)`.

  `r = beta * (pi - ref)` on summed log-probs, per completion; nothing is detached. Unlike DPO
  it pins the absolute rewards (the chosen reward is pushed up, not only the margin). Equals
  TRL's `nca_pair`.

  Args:
    policy, reference: `PairLogps` (reference required).
    beta: inverse temperature (> 0; trainer default 0.1, released scripts 0.01).

  Returns:
    `[B]` per-pair losses.

  References: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
  Rewards", arXiv:2402.05369; code thu-ml/Noise-Contrastive-Alignment
  `preference_trainer.py::NCATrainer_pairwise.dpo_loss` (loss_type="NCA").
  """
  _common.check_inputs("nca", policy, reference, need_reference=True)
  return trl_nca_pair(policy, reference, beta=beta)  # one implementation of the formula


def _check_list(name, policy, reference, scores):
  for who, x in (("policy", policy), ("reference", reference)):
    if not isinstance(x, ListLogps):
      raise TypeError(f"{name}: `{who}` must be a pofx.ListLogps, got {type(x).__name__}.")
  chex.assert_rank(policy.logps, 2)
  chex.assert_equal_shape([policy.logps, reference.logps, scores])


def _list_rewards_and_labels(name, policy, reference, scores, beta, temperature_alpha):
  _check_list(name, policy, reference, scores)
  _common.check_beta(name, beta)
  _common.check_range(name, "temperature_alpha", temperature_alpha, low=0.0, low_open=True)
  r = beta * (jnp.asarray(policy.logps, jnp.float32) - jnp.asarray(reference.logps, jnp.float32))
  labels = jax.nn.softmax(jnp.asarray(scores, jnp.float32) / temperature_alpha, axis=-1)
  return r, labels


def infonca_kway(
  policy: ListLogps, reference: ListLogps, *, beta: float = 0.1, temperature_alpha: float = 1e-4, scores: Array
) -> Array:
  r"""K-way InfoNCA: `-sum_i p_i log softmax_i(r)`, soft labels `p = softmax(scores / temperature_alpha)`.

  `r_i = beta * (pi_i - ref_i)` per response (summed log-probs). `temperature_alpha` is the
  code's name; the code notes it equals 1/alpha of the paper. The labels are constants
  (scores are data). With K = 2 and a one-hot label this is DPO.

  (The authors' reward trainer adds 0.01 to the first response's score so that it wins ties;
  that is a data convention of their 4-response dataset and is not applied here.)

  Args:
    policy, reference: `ListLogps` with `logps [B, K]`.
    beta: inverse temperature (> 0; default 0.1).
    temperature_alpha: label temperature (> 0; NCAConfig default 1e-4).
    scores: `[B, K]` reward scores of the K responses.

  Returns:
    `[B]` per-prompt losses (the code's batch loss is their mean).

  References: Chen et al. 2024, arXiv:2402.05369; code thu-ml/Noise-Contrastive-Alignment
  `reward_trainer.py::nca_loss` (loss_type="InfoNCA"), `configs.py`.
  """
  r, p = _list_rewards_and_labels("infonca_kway", policy, reference, scores, beta, temperature_alpha)
  return -jnp.sum(p * jax.nn.log_softmax(r, axis=-1), axis=-1)


def nca_kway(
  policy: ListLogps, reference: ListLogps, *, beta: float = 0.1, temperature_alpha: float = 1e-4, scores: Array
) -> Array:
  r"""K-way NCA: `-sum_i p_i log sigmoid(r_i) - (1/K) sum_i log sigmoid(-r_i)`, `p = softmax(scores/temperature_alpha)`.

  `r_i = beta * (pi_i - ref_i)` (summed log-probs). The code writes the second term as a mean
  over batch and responses; per prompt that is the (1/K) sum here, and the batch mean of these
  per-prompt values equals the code's loss. With K = 2 and a one-hot label this is the pairwise
  `nca`.

  Args:
    policy, reference: `ListLogps` with `logps [B, K]`.
    beta: inverse temperature (> 0; default 0.1).
    temperature_alpha: label temperature (> 0; NCAConfig default 1e-4).
    scores: `[B, K]` reward scores.

  Returns:
    `[B]` per-prompt losses.

  References: Chen et al. 2024, arXiv:2402.05369; code thu-ml/Noise-Contrastive-Alignment
  `reward_trainer.py::nca_loss` (loss_type="NCA").
  """
  r, p = _list_rewards_and_labels("nca_kway", policy, reference, scores, beta, temperature_alpha)
  ls = jax.nn.log_sigmoid
  return -jnp.sum(p * ls(r), axis=-1) - jnp.mean(ls(-r), axis=-1)


# -------------------------------------------------------------------------------------------------
# UNA
# -------------------------------------------------------------------------------------------------

UNA_VARIANTS = ("score_mse", "binary_mse", "binary_bce")
UNA_DUMMY = -1.0  # the authors' rating of a dummy answer (UFT's unpaired data): its term is dropped


def _una_valid(s_w, s_l, **_):
  inside = lambda s: ((s >= 0) & (s <= 1)) | (s == UNA_DUMMY)
  return inside(s_w) & inside(s_l)


UNA_SCORES = ScoreDomain(
  "each score in [0, 1] (UNA's normalised rating, e.g. UltraFeedback (score - 1) / 9), or -1 for a "
  "dummy answer whose term is dropped",
  _una_valid,
)


def una(
  policy: PairLogps,
  reference: Optional[PairLogps],
  *,
  beta: float = 0.03,
  variant: str = "score_mse",
  chosen_scores: Optional[Array] = None,
  rejected_scores: Optional[Array] = None,
) -> Array:
  r"""UNA (offline): regress the squashed implicit reward `sigmoid(beta * (pi - ref))` to feedback.

  With `r_w = beta lr_w`, `r_l = beta lr_l` (summed log-probs; reference-free when reference is
  None, the code's `reference_free`):

  - "score_mse":  `(sigmoid(r_w) - s_w)^2 + (sigmoid(r_l) - s_l)^2`, scores in [0, 1]
    (UltraFeedback: (score - 1) / 9);
  - "binary_mse": `(sigmoid(r_w) - 1)^2 + sigmoid(r_l)^2`;
  - "binary_bce": `-log sigmoid(r_w) - log sigmoid(-r_l)` (= NCA's "biasedNCA", TRL `bco_pair`).

  Score domain (`UNA_SCORES`): each score is a normalised rating in [0, 1], or exactly -1, the
  authors' marker of a dummy answer (their unpaired UFT data), whose term is dropped in every
  variant (binary variants use the scores only for this; without scores all terms count). Any
  other value, e.g. an unnormalised reward, is outside the domain: concrete scores raise
  ValueError naming the pairs, and under `jit` those pairs' losses are NaN (never silently read as
  dummy answers). Nothing is detached.

  Batch reduction: the authors' MSE trainers return `torch.sum` over the per-device batch (per
  device batch size 1 in the released scripts), so the registry's reduction is "sum".

  Args:
    policy, reference: `PairLogps`; reference optional.
    beta: inverse temperature (> 0; 0.03 in the score-MSE scripts, 0.01 in the binary ones).
    variant: one of "score_mse", "binary_mse", "binary_bce".
    chosen_scores, rejected_scores: `[B]` scores (required for "score_mse").

  Returns:
    `[B]` per-pair losses.

  References: Wang et al. 2024, "UNA: Unifying Alignments of RLHF/PPO, DPO and KTO by a
  Generalized Implicit Reward Function", arXiv:2408.15339; code ZhichaoWang970201/UNA-UFT
  `*-offline/UNA_trainer_score_MSE_3e-5_0.03.py` (ratings `(score - 1) / 9`, dummy rating -1),
  `UNA_trainer_binary_MSE_0.01.py`, `UNA_trainer_binary_BCE_0.01.py` (`dpo_loss`).
  """
  name = "una"
  _common.check_inputs(name, policy, reference)
  _common.check_beta(name, beta)
  _common.check_choice(name, "variant", variant, UNA_VARIANTS)
  if (chosen_scores is None) != (rejected_scores is None):
    raise ValueError(f"{name}: give both chosen_scores and rejected_scores, or neither.")
  if variant == "score_mse" and chosen_scores is None:
    raise ValueError(f"{name}: variant='score_mse' needs chosen_scores and rejected_scores in [0, 1].")
  r_w, r_l = _rewards(policy, reference, beta)
  if chosen_scores is None:
    s_w = jnp.ones_like(r_w)
    s_l = jnp.zeros_like(r_l)
  else:
    chex.assert_equal_shape([r_w, chosen_scores, rejected_scores])
    check_scores(name, UNA_SCORES, chosen_scores, rejected_scores, {})
    s_w = jnp.asarray(chosen_scores, jnp.float32)
    s_l = jnp.asarray(rejected_scores, jnp.float32)
  if variant == "score_mse":
    t_w = jnp.square(jax.nn.sigmoid(r_w) - s_w)
    t_l = jnp.square(jax.nn.sigmoid(r_l) - s_l)
  elif variant == "binary_mse":
    t_w = jnp.square(jax.nn.sigmoid(r_w) - 1.0)
    t_l = jnp.square(jax.nn.sigmoid(r_l))
  else:
    t_w = -jax.nn.log_sigmoid(r_w)
    t_l = -jax.nn.log_sigmoid(-r_l)
  out = jnp.where(s_w == UNA_DUMMY, 0.0, t_w) + jnp.where(s_l == UNA_DUMMY, 0.0, t_l)
  return jnp.where(_una_valid(s_w, s_l), out, jnp.nan)


# -------------------------------------------------------------------------------------------------
# KTO
# -------------------------------------------------------------------------------------------------


def kto_reference_point(kl_logratios: Array, *, axis_name: Optional[str] = None) -> Array:
  r"""KTO's z0: `max(0, mean(kl_logratios))`, detached; a global mean when `axis_name` is given.

  `kl_logratios` are policy-minus-reference summed log-probs of mismatched pairs (x, y') (TRL
  builds y' by shifting the completions by one within the batch). TRL gathers the batch means
  across processes before clamping; `axis_name` does the same with `jax.lax.pmean`.
  """
  m = jnp.mean(jnp.asarray(kl_logratios, jnp.float32))
  if axis_name is not None:
    m = jax.lax.pmean(m, axis_name)
  return jax.lax.stop_gradient(jnp.maximum(m, 0.0))


def kto(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.1,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
  kl_logratios: Array,
  axis_name: Optional[str] = None,
) -> Array:
  r"""KTO on paired data: chosen as desirable, rejected as undesirable, with reference point z0.

  `z0 = sg(max(0, mean_B(kl_logratios)))` (`kto_reference_point`), and per pair

    `L_i = 1/2 [ lambda_D (1 - sigmoid(beta (lr_w - z0))) + lambda_U (1 - sigmoid(beta (z0 - lr_l))) ]`,

  i.e. KTO's `lambda_y - v(x, y)` (Eq. 8) for the two examples of the pair. The 1/2 makes the
  batch mean equal TRL's loss, the mean over the 2B examples (chosen and rejected
  concatenated). Summed log-probs; only z0 is detached.

  Args:
    policy, reference: `PairLogps` (reference required).
    beta: inverse temperature (> 0; TRL default 0.1).
    desirable_weight, undesirable_weight: lambda_D, lambda_U (>= 0; TRL defaults 1.0).
    kl_logratios: `[B']` policy-minus-reference log-probs of mismatched (x, y') pairs.
    axis_name: named batch axis for a global z0.

  Returns:
    `[B]` per-pair losses.

  References: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
  Optimization", arXiv:2402.01306, Eq. (8); TRL `trl/trainer/kto_trainer.py::_compute_loss`
  (loss_type="kto").
  """
  name = "kto"
  _common.check_inputs(name, policy, reference, need_reference=True)
  _common.check_beta(name, beta)
  _common.check_range(name, "desirable_weight", desirable_weight, low=0.0)
  _common.check_range(name, "undesirable_weight", undesirable_weight, low=0.0)
  chex.assert_rank(kl_logratios, 1)
  z0 = kto_reference_point(kl_logratios, axis_name=axis_name)
  lr_w, lr_l = _common.logratios(policy, reference)
  lr_w = jnp.asarray(lr_w, jnp.float32)
  lr_l = jnp.asarray(lr_l, jnp.float32)
  desirable = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (lr_w - z0)))
  undesirable = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - lr_l)))
  return 0.5 * (desirable + undesirable)


def _kto_unpaired_valid(s_w, s_l, **_):
  return (s_w >= 0) & (s_w <= 1) & (abs(s_l) < float("inf"))


KTO_UNPAIRED_SCORES = ScoreDomain(
  "score_chosen in [0, 1]: the example's label, desirable when >= 0.5 (TRL's label True / False as "
  "1 / 0); score_rejected any finite number (unused)",
  _kto_unpaired_valid,
)


def kto_unpaired(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.1,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
  chosen_scores: Array,
  rejected_scores: Optional[Array] = None,
  axis_name: Optional[str] = None,
) -> Array:
  r"""KTO on unpaired binary feedback (TRL's unpaired format: prompt, completion, label).

  Each row of the batch is one example `(x_i, y_i, label_i)`: its completion travels in the
  *chosen* slot, and the *rejected* slot holds a mismatched completion `y'_i` of another example
  for the same prompt `x_i` (KTO's KL estimate: TRL pairs each prompt with another example's
  completion). With `lr = log pi(y_i|x_i) - log pi_ref(y_i|x_i)` and the reference point
  `z0 = sg(max(0, mean_B(log pi(y'_i|x_i) - log pi_ref(y'_i|x_i))))` (`kto_reference_point`),

    `L_i = lambda_D (1 - sigmoid(beta (lr - z0)))`   if the example is desirable,
    `L_i = lambda_U (1 - sigmoid(beta (z0 - lr)))`   otherwise,

  KTO's `lambda_y - v(x, y)` (Eq. 8). The batch mean equals TRL's `KTOTrainer` loss (the mean of
  the weighted desirable and undesirable losses concatenated). Labels come as `chosen_scores`
  (desirable when >= 0.5); a score outside [0, 1] gives NaN (`KTO_UNPAIRED_SCORES`).

  Args:
    policy, reference: `PairLogps` (reference required): chosen = the examples, rejected = the
      mismatched completions of the reference point.
    beta: inverse temperature (> 0; TRL default 0.1).
    desirable_weight, undesirable_weight: lambda_D, lambda_U (>= 0; TRL defaults 1.0; TRL advises
      lambda_D n_D / (lambda_U n_U) in [1, 4/3]).
    chosen_scores: `[B]` labels in [0, 1]. rejected_scores: unused.
    axis_name: named batch axis for a global z0.

  Returns:
    `[B]` per-example losses.

  References: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
  arXiv:2402.01306, Eq. (8); TRL `trl/trainer/kto_trainer.py::_compute_loss` (loss_type="kto",
  unpaired data).
  """
  del rejected_scores
  name = "kto_unpaired"
  _common.check_inputs(name, policy, reference, need_reference=True)
  _common.check_beta(name, beta)
  _common.check_range(name, "desirable_weight", desirable_weight, low=0.0)
  _common.check_range(name, "undesirable_weight", undesirable_weight, low=0.0)
  lr, lr_kl = _common.logratios(policy, reference)
  z0 = kto_reference_point(lr_kl, axis_name=axis_name)
  lr = jnp.asarray(lr, jnp.float32)
  labels = jnp.asarray(chosen_scores, jnp.float32)
  chex.assert_equal_shape((labels, lr))
  desirable = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (lr - z0)))
  undesirable = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - lr)))
  out = jnp.where(labels >= 0.5, desirable, undesirable)
  return jnp.where((labels >= 0) & (labels <= 1), out, jnp.nan)


SPECS = (
  LossSpec("nca", nca, "pointwise", _NCA_SOURCE + " preference_trainer.py (NCA, pairwise)"),
  LossSpec(
    "nca_kway",
    nca_kway,
    "pointwise",
    _NCA_SOURCE + " reward_trainer.py::nca_loss (NCA, K-way)",
    requires=frozenset({"list"}),
  ),
  LossSpec(
    "infonca_kway",
    infonca_kway,
    "pointwise",
    _NCA_SOURCE + " reward_trainer.py::nca_loss (InfoNCA, K-way)",
    requires=frozenset({"list"}),
  ),
  LossSpec(
    "una",
    una,
    "pointwise",
    "Wang et al. 2024, UNA, arXiv:2408.15339; code ZhichaoWang970201/UNA-UFT *-offline/UNA_trainer_*.py",
    reference="optional",
    requires=frozenset({"scores"}),
    reduction="sum",
    score_domain=UNA_SCORES,
  ),
  LossSpec(
    "kto",
    kto,
    "pointwise",
    "Ethayarajh et al. 2024, KTO, arXiv:2402.01306, Eq. 8; TRL kto_trainer.py (paired form)",
    requires=frozenset({"kl"}),
  ),
  LossSpec(
    "kto_unpaired",
    kto_unpaired,
    "pointwise",
    "Ethayarajh et al. 2024, KTO, arXiv:2402.01306, Eq. 8; TRL kto_trainer.py (unpaired data)",
    requires=frozenset({"scores"}),
    detached_by_design="z0 is a detached mean over the mismatched completions (the rejected slot)",
    score_domain=KTO_UNPAIRED_SCORES,
  ),
)
