r"""DPO with modified margins: DPOP, ODPO, DPO-Shift, LN-DPO, MaPPO.

Each is the logistic loss `-log sigmoid(z)` of a modified DPO logit z (GPO's logistic f plus a
margin / asymmetry / normalisation modifier). Log-ratios `lr_w = pi_w - ref_w`,
`lr_l = pi_l - ref_l` use **summed** completion log-probs unless stated; the reference is
required. External scores (`chosen_scores`, `rejected_scores`) are data: they are wrapped in
`jax.lax.stop_gradient`. All functions return unreduced per-pair losses `[B]`.

Scores outside a method's domain (`SPECS[...].score_domain`: ODPO's `s_w > s_l`, MaPPO's
`1 >= s_w >= s_l >= 0`) are never clamped or remapped here: with concrete scores the loss raises
ValueError naming the pairs, and under `jit` (where values cannot be inspected) those pairs' losses
are NaN, so the train step's non-finite guard reports them instead of training a different method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pofx import gpo as gpo_fns
from pofx.losses import _common
from pofx.losses._registry import LossSpec, ScoreDomain, check_scores
from pofx.losses._trl import trl_sigmoid_norm


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _logratios(name, policy, reference, beta, **need):
  _common.check_inputs(name, policy, reference, need_reference=True, **need)
  _common.check_beta(name, beta)
  lr_w, lr_l = _common.logratios(policy, reference)
  return _f32(lr_w), _f32(lr_l)


def _scores(name, chosen_scores, rejected_scores, batch_size, domain: ScoreDomain, hyper):
  """The detached float32 scores `(s_w, s_l)` and the `[B]` mask of pairs inside `domain`;
  ValueError for concrete scores outside it."""
  if chosen_scores is None or rejected_scores is None:
    raise ValueError(f"{name} needs per-pair scores: pass chosen_scores= and rejected_scores= ([B]).")
  s_w = jax.lax.stop_gradient(_f32(chosen_scores))
  s_l = jax.lax.stop_gradient(_f32(rejected_scores))
  if s_w.shape != (batch_size,) or s_l.shape != (batch_size,):
    raise ValueError(
      f"{name}: chosen_scores and rejected_scores must have shape ({batch_size},), got {s_w.shape} and {s_l.shape}."
    )
  check_scores(name, domain, chosen_scores, rejected_scores, hyper)
  return s_w, s_l, domain.valid(s_w, s_l, **hyper)


def _odpo_valid(s_w, s_l, ratio=False, **_):
  # NaN compares False, so a missing score is outside the domain too.
  return (s_w >= s_l) & (s_l > 0) if ratio else s_w > s_l


ODPO_SCORES = ScoreDomain(
  "score_chosen > score_rejected (ODPO's offset alpha * log(s_w - s_l)); with ratio=True, "
  "score_chosen >= score_rejected > 0 (alpha * log(s_w / s_l))",
  _odpo_valid,
)


def _mappo_valid(s_w, s_l, **_):
  return (s_l >= 0) & (s_w >= s_l) & (s_w <= 1)


MAPPO_SCORES = ScoreDomain(
  "1 >= score_chosen >= score_rejected >= 0 (MaPPO's prior rewards in [0, 1], reward gap s_w - s_l in [0, 1])",
  _mappo_valid,
)


def dpop(policy, reference, *, lam: float = 50.0, beta: float = 0.1):
  r"""DPO-Positive (DPOP, Smaug): DPO with a hinge penalty on the chosen log-ratio, inside the sigmoid.

  `L = -log sigmoid(beta * [rho - lam * max(0, ref_w - pi_w)])`, summed log-probs.
  The penalty is active only when the policy's chosen log-prob falls below the reference's,
  is scaled by beta (it sits inside the sigmoid) and is not detached. This is the corrected
  form of the paper (v3, bracketing fixed, confirmed by the authors in abacusai/smaug issue
  #2); the variant with the penalty outside the sigmoid is not DPOP. `lam = 0` is DPO.

  Args:
    policy, reference: `PairLogps` (reference required).
    lam: penalty weight (>= 0); 50 in the paper (results "largely insensitive" in [5, 500]).
    beta: inverse temperature (> 0); 0.1 as DPO (the Smaug runs reportedly used 0.3).

  References: Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
  DPO-Positive", arXiv:2402.13228 (v3); SamPO `dpo_trainer.py` loss_type="dpop".
  """
  lr_w, lr_l = _logratios("dpop", policy, reference, beta)
  _common.check_range("dpop", "lam", lam, low=0.0, allowed_text="lam >= 0")
  penalty = jax.nn.relu(-lr_w)  # max(0, ref_w - pi_w)
  return gpo_fns.logistic(beta * ((lr_w - lr_l) - lam * penalty))


def odpo(
  policy,
  reference,
  *,
  chosen_scores=None,
  rejected_scores=None,
  alpha: float = 1.0,
  beta: float = 0.1,
  ratio: bool = False,
):
  r"""ODPO: DPO with a per-pair offset from the scores' gap.

  `L = -log sigmoid(beta * rho - Delta)`, summed log-probs, with
  `Delta = alpha * log(s_w - s_l)` (default) or `alpha * log(s_w / s_l)` (`ratio=True`). The
  offset is **not** multiplied by beta, and the scores are detached. Offset 0 (`alpha = 0`, or
  `s_w - s_l = 1`, or `s_w = s_l` with `ratio=True`) is DPO.

  Score domain (`ODPO_SCORES`): `s_w > s_l` (the log of the gap is defined), and with `ratio=True`
  `s_w >= s_l > 0`. The authors build every pair with the higher-scored completion as chosen and
  drop ties (`preference_datasets.py`), so their offset always exists. Scores are not clamped or
  remapped: concrete scores outside the domain raise ValueError naming the pairs; under `jit`
  those pairs' losses are NaN (the train step reports them as non-finite). Pairs labelled by a
  noisy judge (e.g. Bradley-Terry) can have `s_w < s_l`; ODPO is not defined on them.

  Args:
    policy, reference: `PairLogps` (reference required).
    chosen_scores, rejected_scores: `[B]` reward / annotator scores of the two completions.
    alpha: offset scale (>= 0), 1.0 (`config/loss/odpo.yaml`).
    beta: inverse temperature (> 0).
    ratio: use the log score ratio instead of the log score gap.

  References: Amini, Vieira & Cotterell 2024, "Direct Preference Optimization with an Offset",
  arXiv:2402.10571; code rycolab/odpo `trainers.py::preference_loss`.
  """
  lr_w, lr_l = _logratios("odpo", policy, reference, beta)
  _common.check_range("odpo", "alpha", alpha, low=0.0, allowed_text="alpha >= 0")
  if not isinstance(ratio, bool):
    raise ValueError(f"odpo: invalid ratio={ratio!r}; allowed: True or False.")
  s_w, s_l, ok = _scores("odpo", chosen_scores, rejected_scores, lr_w.shape[0], ODPO_SCORES, {"ratio": ratio})
  # Inside the domain the logarithm's argument is positive; outside, a placeholder 1 keeps the
  # gradient finite and the value is replaced by NaN below.
  arg = jnp.where(ok, s_w / s_l if ratio else s_w - s_l, 1.0)
  offset = alpha * jnp.log(arg)
  return jnp.where(ok, gpo_fns.logistic(beta * (lr_w - lr_l) - offset), jnp.nan)


_SHIFT_KINDS = ("fixed", "increase_linear", "decrease_linear")


def dpo_shift_lambda(step, max_steps, kind: str = "fixed", lambda_min: float = 0.5, lambda_max: float = 1.0):
  r"""The DPO-Shift schedule of lambda at `step` (pure; `step` may be a traced array).

  - `"fixed"`: `lambda_max` (the fixed value; the code's default `dpo_lambda = 1.0` is DPO);
  - `"increase_linear"`: `lambda_min + (lambda_max - lambda_min) * t`;
  - `"decrease_linear"`: `lambda_max - (lambda_max - lambda_min) * t`;
  with `t = clip(step / max_steps, 0, 1)`. Returns a float32 scalar to pass as `dpo_shift(lam=...)`.

  References: Yang et al. 2025, arXiv:2502.07599; code Meaquadddd/DPO-Shift
  `scripts/dposhift_trainer.py` (`lambda_schedule`).
  """
  _common.check_choice("dpo_shift_lambda", "kind", kind, _SHIFT_KINDS)
  _common.check_range("dpo_shift_lambda", "max_steps", max_steps, low=0.0, low_open=True, allowed_text="max_steps > 0")
  _common.check_range("dpo_shift_lambda", "lambda_min", lambda_min, low=0.0, high=1.0)
  _common.check_range("dpo_shift_lambda", "lambda_max", lambda_max, low=0.0, high=1.0)
  if _common._is_static(lambda_min) and _common._is_static(lambda_max) and lambda_min > lambda_max:
    raise ValueError(
      f"dpo_shift_lambda: invalid lambda_min={lambda_min!r} > lambda_max={lambda_max!r}; "
      "allowed: lambda_min <= lambda_max."
    )
  lo, hi = _f32(lambda_min), _f32(lambda_max)
  if kind == "fixed":
    return hi
  t = jnp.clip(_f32(step) / _f32(max_steps), 0.0, 1.0)
  if kind == "increase_linear":
    return lo + (hi - lo) * t
  return hi - (hi - lo) * t


def dpo_shift(policy, reference, *, lam: float = 0.95, beta: float = 0.1):
  r"""DPO-Shift: DPO with the rejected log-ratio scaled by lambda <= 1.

  `L = -log sigmoid(beta * [(pi_w - lam pi_l) - (ref_w - lam ref_l)]) = -log sigmoid(beta (lr_w - lam lr_l))`,
  summed log-probs, nothing detached. lambda < 1 shifts the chosen log-prob up at the cost of
  the margin. `lam = 1` is DPO. For a schedule, compute `lam = dpo_shift_lambda(step, ...)`.

  Args:
    policy, reference: `PairLogps` (reference required).
    lam: in [0, 1]; 0.95 is the fixed value of the released models (the code default 1.0 is
      plain DPO; sweeps span 0.55-0.99). A traced value (schedule) is accepted.
    beta: inverse temperature (> 0).

  References: Yang et al. 2025, "DPO-Shift: Shifting the Distribution of Direct Preference
  Optimization", arXiv:2502.07599; code Meaquadddd/DPO-Shift `scripts/dposhift_trainer.py::dpo_loss`.
  """
  lr_w, lr_l = _logratios("dpo_shift", policy, reference, beta)
  _common.check_range("dpo_shift", "lam", lam, low=0.0, high=1.0)
  return gpo_fns.logistic(beta * (lr_w - lam * lr_l))


def ln_dpo(policy, reference, *, beta):
  r"""LN-DPO: DPO on length-normalised log-ratios.

  `L = -log sigmoid(beta * (lr_w / |y_w| - lr_l / |y_l|))`, with `|y|` the completion token
  counts (clamped at 1) and nothing detached. Same per-pair value as TRL's
  loss_type="sigmoid_norm". The averaged ratios are about |y| times smaller than DPO's, so
  beta must be correspondingly larger; the paper's value was not found, so `beta` is required.

  Provenance: the paper's abstract only names "an embarrassingly simple extension ... LN-DPO";
  the formula is the one given for LN-DPO (citing this paper) by RainbowPO (Zhao et al. 2024,
  arXiv:2410.04203, as summarised in public notes) and by TRL's `sigmoid_norm`; the paper's own
  equation text could not be read here.

  Args:
    policy: `PairLogps` with `chosen_len`, `rejected_len`.
    reference: `PairLogps` (required).
    beta: inverse temperature (> 0), required.

  References: Ahrabian et al. 2024, "The Hitchhiker's Guide to Human Alignment with *PO",
  arXiv:2407.15229; TRL `DPOTrainer` loss_type="sigmoid_norm".
  """
  _logratios("ln_dpo", policy, reference, beta, need_lengths=True)  # input and beta checks
  return trl_sigmoid_norm(policy, reference, beta=beta)  # one implementation of the formula


def mappo(policy, reference, *, chosen_scores=None, rejected_scores=None, beta: float = 0.1):
  r"""MaPPO: DPO with the rejected log-ratio scaled by the prior reward gap.

  `L = -log sigmoid(beta * lr_w - Delta_r * beta * lr_l)`, `Delta_r = s_w - s_l` (Eq. 8),
  summed log-probs; the scores are detached. `Delta_r = 1` (s_w = 1, s_l = 0) is DPO (Eq. 9).
  MaPPO adds no hyperparameter.

  Score domain (`MAPPO_SCORES`): the paper's prior rewards lie in [0, 1] and the chosen one is at
  least the rejected one, so `Delta_r` in [0, 1] scales the rejected term down, never flips it:
  `1 >= s_w >= s_l >= 0`. Scores are not rescaled or clipped here (a rescaling would change the
  method's weights): concrete scores outside the domain raise ValueError naming the pairs; under
  `jit` those pairs' losses are NaN (the train step reports them as non-finite).

  Args:
    policy, reference: `PairLogps` (reference required).
    chosen_scores, rejected_scores: `[B]` prior rewards in [0, 1], chosen >= rejected.
    beta: inverse temperature (> 0), as DPO.

  References: Lan et al. 2025, "MaPPO: Maximum a Posteriori Preference Optimization with
  Prior Knowledge", arXiv:2507.21183 (v5), Eq. (8).
  """
  lr_w, lr_l = _logratios("mappo", policy, reference, beta)
  s_w, s_l, ok = _scores("mappo", chosen_scores, rejected_scores, lr_w.shape[0], MAPPO_SCORES, {})
  return jnp.where(ok, gpo_fns.logistic(beta * lr_w - (s_w - s_l) * beta * lr_l), jnp.nan)


SPECS = (
  LossSpec("dpop", dpop, "margin", "Pal et al. 2024, arXiv:2402.13228 v3 (penalty inside the sigmoid); SamPO dpop"),
  LossSpec(
    "odpo",
    odpo,
    "margin",
    "Amini et al. 2024, arXiv:2402.10571; rycolab/odpo trainers.py::preference_loss",
    requires=frozenset({"scores"}),
    score_domain=ODPO_SCORES,
  ),
  LossSpec(
    "dpo_shift",
    dpo_shift,
    "margin",
    "Yang et al. 2025, arXiv:2502.07599; Meaquadddd/DPO-Shift dposhift_trainer.py::dpo_loss",
  ),
  LossSpec(
    "ln_dpo",
    ln_dpo,
    "margin",
    "Ahrabian et al. 2024, arXiv:2407.15229 (LN-DPO; formula as RainbowPO / TRL sigmoid_norm)",
    requires=frozenset({"lengths"}),
    example_hyper={"beta": 0.1},
  ),
  LossSpec(
    "mappo",
    mappo,
    "margin",
    "Lan et al. 2025, arXiv:2507.21183 v5, Eq. 8",
    requires=frozenset({"scores"}),
    score_domain=MAPPO_SCORES,
  ),
)
