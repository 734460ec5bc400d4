"""TRL 1.16's `loss_type` names: a compatibility namespace whose semantics are TRL's.

    from pofx.losses import trl
    per_pair = trl.get("sigmoid")(policy, reference, beta=0.1)     # TRL's loss_type="sigmoid", [B]
    loss = trl.batch_loss("sft", policy)                             # TRL's chosen-token mean
    loss = trl.trl_dpo_loss(policy, reference, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    trl.names()                                                      # the fifteen loss types

Every name is a `DPOConfig.loss_type` of TRL 1.16, with TRL's hyperparameter names, defaults and
modifiers (`f_divergence_type`, `ld_alpha`, `use_weighting`, `label_smoothing`, `discopop_tau`), as
`DPOTrainer._compute_loss` computes it. As TRL's `DPOConfig` does, every name takes every DPOConfig
loss field (`DPO_CONFIG_LOSS_FIELDS`: `beta` included, e.g. `batch_loss("sft", policy, beta=0.1)`):
the fields a loss type does not use are ignored, and the combinations TRL refuses raise ValueError
(a non-default `f_divergence_type` outside `F_DIVERGENCE_LOSS_TYPES`, `use_weighting` with aot,
aot_unpaired or sft, `label_smoothing=0` with exo_pair). With `ld_alpha`, a reference given as sums
only is taken as already LD-weighted, as TRL takes its precomputed reference.
`CANONICAL_NAME[loss_type]` is the canonical pofx name of the same formula; the table in the `pofx.losses` docstring says where the two differ. Where a loss
is named by a string that may be either kind (the training program's `train.loss`,
`pofx.losses.spec`), a TRL name is written `trl.<loss_type>`, e.g. `"trl.sigmoid"`.
`trl.<loss_type>` (the attribute) is always `trl.get("<loss_type>")`.
"""

from __future__ import annotations

import types
from typing import Any, Mapping

from pofx.losses import _common, _registry
from pofx.losses._registry import LossSpec
from pofx.losses._trl import (
  CANONICAL_NAME,
  DPO_CONFIG_LOSS_FIELDS,
  F_DIVERGENCE_LOSS_TYPES,
  F_DIVERGENCES,
  TRL_LOSS_TYPES,
  TRL_PREFIX,
  TRL_SPECS,
  check_trl_combination,
  trl_dpo_loss,
)

PREFIX = TRL_PREFIX
"""How a TRL name is written where canonical names are read too: `"trl.sigmoid"`."""

REGISTRY: Mapping[str, LossSpec] = types.MappingProxyType(dict(sorted(TRL_SPECS.items())))
"""Read-only mapping: TRL loss_type -> LossSpec (whose `name` is `trl.<loss_type>`)."""

sigmoid = REGISTRY["sigmoid"].fn
hinge = REGISTRY["hinge"].fn
ipo = REGISTRY["ipo"].fn
exo_pair = REGISTRY["exo_pair"].fn
nca_pair = REGISTRY["nca_pair"].fn
robust = REGISTRY["robust"].fn
bco_pair = REGISTRY["bco_pair"].fn
sppo_hard = REGISTRY["sppo_hard"].fn
aot = REGISTRY["aot"].fn
aot_unpaired = REGISTRY["aot_unpaired"].fn
apo_zero = REGISTRY["apo_zero"].fn
apo_down = REGISTRY["apo_down"].fn
discopop = REGISTRY["discopop"].fn
sft = REGISTRY["sft"].fn
sigmoid_norm = REGISTRY["sigmoid_norm"].fn


def names() -> list[str]:
  """Every TRL 1.16 loss_type, sorted."""
  return list(REGISTRY)


def spec(loss_type: str) -> LossSpec:
  """The `LossSpec` of a TRL loss_type (bare, `"sigmoid"`, or qualified, `"trl.sigmoid"`)."""
  bare = loss_type[len(PREFIX) :] if isinstance(loss_type, str) and loss_type.startswith(PREFIX) else loss_type
  _common.check_choice("pofx.losses.trl", "loss_type", bare, TRL_LOSS_TYPES)
  return REGISTRY[bare]


def get(loss_type: str):
  """The per-pair loss function of a TRL loss_type, `(policy, reference, **TRL hyperparameters) -> [B]`."""
  return spec(loss_type).fn


def canonical(loss_type: str) -> str:
  """The canonical pofx name of the formula TRL calls `loss_type` (e.g. "sigmoid" -> "dpo")."""
  return CANONICAL_NAME[spec(loss_type).name[len(PREFIX) :]]


def check_fields(loss_type: str, **fields: Any) -> None:
  """ValueError for DPOConfig loss fields that TRL refuses with `loss_type`, without computing a loss.

  The combinations `trl.<loss_type>` itself refuses (a non-default `f_divergence_type` outside
  `F_DIVERGENCE_LOSS_TYPES`, `use_weighting` with aot, aot_unpaired or sft, `label_smoothing=0` with
  exo_pair) and unknown field names; a program calls it when it validates its config.
  """
  s = spec(loss_type)
  _registry.check_kwargs(s, fields)
  values = {**s.hyperparameters, **fields}
  check_trl_combination(
    s.name, [s.name[len(PREFIX) :]], values["f_divergence_type"], values["use_weighting"], values["label_smoothing"]
  )


def batch_loss(loss_type: str, policy, reference=None, **kwargs: Any):
  """TRL's batch value of one loss_type: the mean over pairs, TRL's chosen-token mean for "sft".

  Raises:
    ValueError: unknown loss type, unknown or missing arguments, invalid hyperparameter values.
  """
  return _registry.batch_loss(spec(loss_type), policy, reference, kwargs)


__all__ = [
  "PREFIX",
  "REGISTRY",
  "CANONICAL_NAME",
  "DPO_CONFIG_LOSS_FIELDS",
  "TRL_LOSS_TYPES",
  "F_DIVERGENCES",
  "F_DIVERGENCE_LOSS_TYPES",
  "names",
  "spec",
  "get",
  "canonical",
  "check_fields",
  "batch_loss",
  "trl_dpo_loss",
  "sigmoid",
  "hinge",
  "ipo",
  "exo_pair",
  "nca_pair",
  "robust",
  "bco_pair",
  "sppo_hard",
  "aot",
  "aot_unpaired",
  "apo_zero",
  "apo_down",
  "discopop",
  "sft",
  "sigmoid_norm",
]
