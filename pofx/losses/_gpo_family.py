r"""The GPO core `f(beta * rho)` and its six named specialisations (DPO, SLiC, IPO, ...).

All functions return unreduced per-pair losses `[B]`; `batch_loss` takes the mean.
Conventions: `rho = (pi_w - ref_w) - (pi_l - ref_l)` on **summed** completion log-probs
(except the length-averaged `ipo`); beta multiplies `rho` exactly once; nothing is detached.
With `reference=None` the log-ratios reduce to the policy's log-probs (reference-free).
"""

from __future__ import annotations

from typing import Optional, Union

import jax

from pofx import gpo as gpo_fns
from pofx._pair_logps import PairLogps
from pofx.losses import _common
from pofx.losses._registry import LossSpec

_GPO_SOURCE = "Tang et al. 2024, GPO, arXiv:2402.05749, Eq. 3 / Table 1"


def gpo(
  policy: PairLogps, reference: Optional[PairLogps], *, f: Union[str, gpo_fns.ConvexFn], beta: float = 0.1
) -> jax.Array:
  r"""Generalized preference optimization: `L = f(beta * rho)`, per pair.

  `rho = (pi_w - ref_w) - (pi_l - ref_l)` (summed log-probs; reference-free when reference is None).

  Args:
    policy: policy `PairLogps`.
    reference: reference `PairLogps`, or None for reference-free.
    f: a name from `pofx.gpo.CONVEX_FUNCTIONS` or any elementwise callable `f(v)`.
    beta: inverse temperature (> 0), applied once to rho.

  Returns:
    `[B]` per-pair losses.

  References: Tang et al. 2024, arXiv:2402.05749, Eq. (3).
  """
  fn = gpo_fns.get(f)
  _common.check_inputs("gpo", policy, reference)
  _common.check_beta("gpo", beta)
  return fn(beta * _common.margins(policy, reference))


def dpo(policy, reference, *, beta: float = 0.1):
  r"""DPO: `-log sigmoid(beta * rho)` = GPO with the logistic f.

  References: Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, Eq. (7).
  """
  _common.check_inputs("dpo", policy, reference, need_reference=True)
  return gpo(policy, reference, f=gpo_fns.logistic, beta=beta)


def slic(policy, reference, *, beta: float = 0.1):
  r"""SLiC (calibration form, GPO/TRL): `max(0, 1 - beta * rho)` = GPO with the hinge f.

  `max(0, 1 - beta rho) = beta * max(0, 1/beta - rho)`: beta is the reciprocal of the margin.
  The original SLiC-HF uses raw policy log-probs (no reference); pass `reference=None` for that.

  References: Zhao et al. 2023, "SLiC-HF", arXiv:2305.10425, Eq. (2); GPO Table 1.
  """
  return gpo(policy, reference, f=gpo_fns.hinge, beta=beta)


def _ipo(name, policy, reference, beta, length_normalized):
  _common.check_inputs(name, policy, reference, need_reference=True, need_lengths=length_normalized)
  _common.check_beta(name, beta)
  lr_w, lr_l = _common.logratios(policy, reference)
  if length_normalized:
    len_w, len_l = _common.lengths(policy, name)
    d = lr_w / len_w - lr_l / len_l
  else:
    d = lr_w - lr_l
  return (d - 1.0 / (2.0 * beta)) ** 2


def ipo(policy, reference, *, beta: float = 0.1):
  r"""IPO on length-averaged log-ratios: `(lr_w/|y_w| - lr_l/|y_l| - 1/(2 tau))^2`, tau = beta.

  `|y|` are the completion-token counts (clamped at 1). beta *is* IPO's tau (TRL's naming). This
  is the form TRL computes for loss_type="ipo", which TRL's comment reports the IPO authors
  confirmed is the form behind the paper's results; `ipo_sum` is Eq. 17 as written, on summed
  log-ratios.

  References: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
  Human Preferences", arXiv:2310.12036, Eq. (17); TRL 1.16 `DPOTrainer` loss_type="ipo".
  """
  return _ipo("ipo", policy, reference, beta, length_normalized=True)


def ipo_sum(policy, reference, *, beta: float = 0.1):
  r"""IPO on summed log-ratios, as the paper writes it: `(rho - 1/(2 tau))^2`, tau = beta.

  Mapping to GPO: `(rho - 1/(2 tau))^2 = (1/(2 tau))^2 * squared(2 tau * rho)`, i.e. GPO-squared
  with `beta_gpo = 2 tau`, scaled by `1/(4 tau^2)` (a learning-rate factor). See `ipo` for the
  length-averaged form.

  References: Azar et al. 2023, arXiv:2310.12036, Eq. (17).
  """
  return _ipo("ipo_sum", policy, reference, beta, length_normalized=False)


def exponential(policy, reference, *, beta: float = 0.1):
  r"""GPO with the exponential f: `exp(-beta * rho)` (linear tail beyond beta*rho < -50).

  References: Tang et al. 2024, arXiv:2402.05749, Table 1.
  """
  return gpo(policy, reference, f=gpo_fns.exponential, beta=beta)


def truncated_quadratic(policy, reference, *, beta: float = 0.1):
  r"""GPO with the truncated quadratic f: `max(0, 1 - beta * rho)^2`.

  References: Tang et al. 2024, arXiv:2402.05749, Table 1.
  """
  return gpo(policy, reference, f=gpo_fns.truncated_quadratic, beta=beta)


def savage(policy, reference, *, beta: float = 0.1):
  r"""GPO with the Savage f: `sigmoid(-beta * rho)^2` (bounded, not convex, calibrated).

  References: Tang et al. 2024, arXiv:2402.05749, Table 1; Masnadi-Shirazi & Vasconcelos 2008.
  """
  return gpo(policy, reference, f=gpo_fns.savage, beta=beta)


SPECS = (
  LossSpec("gpo", gpo, "gpo", _GPO_SOURCE + " (any f)", reference="optional", example_hyper={"f": "logistic"}),
  LossSpec("dpo", dpo, "gpo", "Rafailov et al. 2023, arXiv:2305.18290, Eq. 7 (GPO logistic)"),
  LossSpec("slic", slic, "gpo", "Zhao et al. 2023, arXiv:2305.10425, Eq. 2 (GPO hinge)", reference="optional"),
  LossSpec(
    "ipo",
    ipo,
    "gpo",
    "Azar et al. 2023, arXiv:2310.12036, Eq. 17 (length-averaged, as TRL loss_type='ipo')",
    requires=frozenset({"lengths"}),
  ),
  LossSpec(
    "ipo_sum", ipo_sum, "gpo", "Azar et al. 2023, arXiv:2310.12036, Eq. 17 (summed; GPO squared, beta_gpo=2tau)"
  ),
  LossSpec("exponential", exponential, "gpo", _GPO_SOURCE + " (exponential)", reference="optional"),
  LossSpec(
    "truncated_quadratic", truncated_quadratic, "gpo", _GPO_SOURCE + " (truncated quadratic)", reference="optional"
  ),
  LossSpec("savage", savage, "gpo", _GPO_SOURCE + " (savage)", reference="optional"),
)
