"""The pofx loss catalogue: every loss is a pure `(policy, reference, *, hyper) -> [B]` function.

    import pofx
    per_pair = pofx.losses.get("dpo")(policy, reference, beta=0.1)        # [B]
    loss = pofx.losses.batch_loss("dpo", policy, reference, beta=0.1)    # scalar
    pofx.losses.names()                                                   # every registered name

`python -m pofx.losses` prints every registered loss on one fixed example.
"""

from __future__ import annotations

from typing import Any, Mapping


from pofx.losses import _adaptive
from pofx.losses import _gpo_family
from pofx.losses import _label_noise
from pofx.losses import _margins
from pofx.losses import _pointwise
from pofx.losses import _reference_free
from pofx.losses import _registry
from pofx.losses import _regularised
from pofx.losses import _risk
from pofx.losses import _token_level
from pofx.losses import _trl
from pofx.losses._adaptive import (BetaDpoState, GammaPoState, beta_dpo, beta_dpo_batch_statistics, beta_dpo_init_state,
                                   gamma_dpo, gamma_po, gamma_po_init_state, gamma_po_margins, gamma_simpo)
from pofx.losses._gpo_family import dpo, exponential, gpo, ipo, ipo_sum, savage, slic, truncated_quadratic
from pofx.losses._label_noise import cdpo, focalpo, robust_dpo
from pofx.losses._margins import dpo_shift, dpo_shift_lambda, dpop, ln_dpo, mappo, odpo
from pofx.losses._pointwise import infonca, infonca_kway, kto, kto_reference_point, nca, nca_kway, una
from pofx.losses._reference_free import cpo, orpo, repo, simpo
from pofx.losses._registry import REQUIREMENTS, LossSpec
from pofx.losses._regularised import asft, irpo, rpo
from pofx.losses._risk import ra_dpo, ra_dpo2, ra_dpo_sequence_risk
from pofx.losses._token_level import delta_l_weights, dmpo, dmpo_turn_weights, dpo_nll_delta_l, sampo, sampo_token_masks
from pofx.losses._trl import (F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, TRL_LOSS_TYPES, f_divergence_link, f_dpo, ld_dpo,
                              trl_aot, trl_aot_unpaired, trl_apo_down, trl_apo_zero, trl_bco_pair, trl_discopop,
                              trl_dpo_loss, trl_exo_pair, trl_hinge, trl_ipo, trl_nca_pair, trl_robust, trl_sft,
                              trl_sigmoid, trl_sigmoid_norm, trl_sppo_hard, wpo, wpo_sequence_weights)

REGISTRY: Mapping[str, LossSpec] = _registry.build_registry(
    _gpo_family.SPECS,
    _trl.SPECS,
    _reference_free.SPECS,
    _margins.SPECS,
    _label_noise.SPECS,
    _regularised.SPECS,
    _adaptive.SPECS,
    _token_level.SPECS,
    _pointwise.SPECS,
    _risk.SPECS,
)
"""Read-only mapping: registered name -> LossSpec."""


def names() -> list[str]:
  """Every registered loss name, sorted."""
  return list(REGISTRY)


def spec(name: str) -> LossSpec:
  """The `LossSpec` registered under `name` (ValueError listing the names if unknown)."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown loss {name!r}; allowed: {names()}.")
  return REGISTRY[name]


def get(name: str):
  """The per-pair loss function registered under `name`."""
  return spec(name).fn


def batch_loss(name: str, policy, reference=None, **kwargs: Any):
  """Applies loss `name` and its documented batch reduction.

  Most losses take the mean over pairs; TRL's `sft` is a token mean over the batch's chosen
  tokens; UNA sums over pairs as its authors' code does. Stateful losses (`state=` in kwargs)
  return `(scalar, new_state)`.

  Raises:
    ValueError: unknown name, unknown or missing arguments, invalid hyperparameter values.
  """
  s = spec(name)
  _registry.check_kwargs(s, kwargs)
  out = s.fn(policy, reference, **kwargs)
  if "state" in s.requires:
    per_pair, new_state = out
    return _registry.reduce(s, per_pair, policy), new_state
  return _registry.reduce(s, out, policy)


__all__ = [
    "REGISTRY", "REQUIREMENTS", "LossSpec", "names", "spec", "get", "batch_loss",
    # GPO family
    "gpo", "dpo", "slic", "ipo", "ipo_sum", "exponential", "truncated_quadratic", "savage",
    # TRL loss types, modifiers and their combination
    "TRL_LOSS_TYPES", "F_DIVERGENCES", "F_DIVERGENCE_LOSS_TYPES", "trl_dpo_loss", "f_divergence_link",
    "wpo_sequence_weights", "trl_sigmoid", "trl_hinge", "trl_ipo", "trl_exo_pair", "trl_nca_pair", "trl_robust",
    "trl_bco_pair", "trl_sppo_hard", "trl_aot", "trl_aot_unpaired", "trl_apo_zero", "trl_apo_down", "trl_discopop",
    "trl_sft", "trl_sigmoid_norm", "ld_dpo", "wpo", "f_dpo",
    # literature
    "simpo", "cpo", "orpo", "repo", "dpop", "odpo", "dpo_shift", "dpo_shift_lambda", "ln_dpo", "mappo", "cdpo",
    "robust_dpo", "focalpo", "rpo", "irpo", "asft", "beta_dpo", "beta_dpo_init_state", "beta_dpo_batch_statistics",
    "BetaDpoState", "gamma_simpo", "gamma_dpo", "gamma_po", "gamma_po_init_state", "gamma_po_margins", "GammaPoState",
    "sampo", "sampo_token_masks", "dmpo", "dmpo_turn_weights", "delta_l_weights", "dpo_nll_delta_l", "nca", "infonca",
    "nca_kway", "infonca_kway", "una", "kto", "kto_reference_point", "ra_dpo", "ra_dpo2", "ra_dpo_sequence_risk",
]
