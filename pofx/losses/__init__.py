"""The pofx loss catalogue: every loss is a pure `(policy, reference, *, hyper) -> [B]` function.

    import pofx
    per_pair = pofx.losses.get("dpo")(policy, reference, beta=0.1)        # [B]
    loss = pofx.losses.batch_loss("dpo", policy, reference, beta=0.1)    # scalar
    pofx.losses.names()                                                   # every canonical name
    pofx.losses.trl.get("sigmoid")                                        # TRL 1.16's loss_type names

The registry holds one canonical name per formula, and `pofx.losses.<name>` is
`pofx.losses.get("<name>")` for every one of them. TRL 1.16's `DPOConfig.loss_type` names form a
compatibility namespace, `pofx.losses.trl`, with TRL's semantics (hyperparameter names, defaults,
and the modifiers `f_divergence_type`, `ld_alpha`, `use_weighting` on every loss type TRL allows
them); where a name is read as a string (`spec`, `get`, `batch_loss`, the training program's
`train.loss`), a TRL name is written `trl.<loss_type>`, e.g. `"trl.sigmoid"`.

| TRL loss_type  | canonical name | where the two differ                                              |
|----------------|----------------|-------------------------------------------------------------------|
| `sigmoid`      | `dpo`          | `dpo` takes `beta` only; TRL's modifiers on DPO are canonical     |
|                |                | losses of their own: `f_dpo` (`f_divergence_type`; its `alpha` is |
|                |                | the paper's, 1 - TRL's `f_alpha_divergence_coef`), `ld_dpo`       |
|                |                | (`ld_alpha`), `wpo` (`use_weighting`)                             |
| `hinge`        | `slic`         | `slic` takes `beta` only, and also runs reference-free            |
| `ipo`          | `ipo`          | the same length-averaged formula,                                 |
|                |                | `(lr_w/|y_w| - lr_l/|y_l| - 1/(2 beta))^2`; `ipo` takes `beta`    |
|                |                | only; the paper's summed form is `ipo_sum`                        |
| `nca_pair`     | `nca`          | `nca` takes `beta` only                                           |
| `robust`       | `robust_dpo`   | flip rate `eps`, default 0.1 (the paper's suggestion), vs TRL's   |
|                |                | `label_smoothing`, default 0.0 (= DPO); no modifiers              |
| `sigmoid_norm` | `ln_dpo`       | `ln_dpo` has no default `beta` (TRL: 0.1, small for a             |
|                |                | length-averaged margin); no modifiers                             |
| `exo_pair`, `bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`,     |
| `discopop`, `sft`: the same formula under the same name; the canonical function takes the |
| modifiers that apply to it, `trl.<name>` every DPOConfig loss field (unused ones ignored) |

Pairwise InfoNCA with hard labels is DPO (`dpo`); its K-way form is `infonca_kway`.
`python -m pofx.losses` prints every canonical loss on one fixed example.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax

from pofx.losses import (
  _adaptive,
  _annotated,
  _diffusion,
  _example,
  _gflownet,
  _gpo_family,
  _label_noise,
  _margins,
  _more,
  _pointwise,
  _reference_free,
  _registry,
  _regularised,
  _risk,
  _token_level,
  _trl,
  trl,
)
from pofx.losses._adaptive import (
  BetaDpoState,
  GammaPoState,
  beta_dpo,
  beta_dpo_batch_statistics,
  beta_dpo_init_state,
  gamma_dpo,
  gamma_po,
  gamma_po_init_state,
  gamma_po_margins,
  gamma_simpo,
)
from pofx.losses._annotated import (
  bmc,
  bmc_modified_tokens,
  bmc_token_weights,
  cosine_distance,
  full_step_dpo,
  full_step_dpo_token_steps,
  sem_dpo,
  two_d_dpo,
  two_d_dpo_segment_rewards,
)
from pofx.losses._common import check_beta, check_choice, check_range, logratios, margins
from pofx.losses._diffusion import (
  adaptive_dpo,
  adaptive_dpo_logits,
  adaptive_dpo_uncertainty,
  adaptive_dpo_weighting,
  adaptive_dpo_weights,
  d3po,
  dense_reward_dpo,
  dense_reward_step_weights,
  diffusion_dro,
  diffusion_kto,
  patch_dpo,
  rank_dpo,
  rank_dpo_weights,
  reg_dpo,
  smpo,
  smpo_preference,
)
from pofx.losses._gflownet import gdpo
from pofx.losses._gpo_family import dpo, exponential, gpo, ipo, ipo_sum, savage, slic, truncated_quadratic
from pofx.losses._label_noise import cdpo, focalpo, robust_dpo
from pofx.losses._margins import dpo_shift, dpo_shift_lambda, dpop, ln_dpo, mappo, odpo
from pofx.losses._more import flex_dpo, ilr_dpo, madpo, madpo_weights, mipo, mipo_alignment
from pofx.losses._pointwise import infonca_kway, kto, kto_reference_point, kto_unpaired, nca, nca_kway, una
from pofx.losses._reference_free import cpo, orpo, repo, simpo
from pofx.losses._registry import REQUIREMENTS, LossSpec, ScoreDomain
from pofx.losses._regularised import asft, irpo, rpo
from pofx.losses._risk import ra_dpo, ra_dpo2, ra_dpo_sequence_risk
from pofx.losses._token_level import (
  delta_l_weights,
  dmpo,
  dmpo_turn_weights,
  dpo_nll_delta_l,
  sampo,
  sampo_token_masks,
  sgdpo,
  sgdpo_pilot_masks,
)
from pofx.losses._trl import (
  F_DIVERGENCE_LOSS_TYPES,
  F_DIVERGENCES,
  TRL_LOSS_TYPES,
  aot,
  aot_unpaired,
  apo_down,
  apo_zero,
  bco_pair,
  discopop,
  exo_pair,
  f_divergence_link,
  f_dpo,
  ld_dpo,
  ld_weighted_sums,
  sft,
  sppo_hard,
  trl_dpo_loss,
  wpo,
  wpo_sequence_weights,
)

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
  _more.SPECS,
  _annotated.SPECS,
  _diffusion.SPECS,
  _gflownet.SPECS,
)
"""Read-only mapping: canonical name -> LossSpec."""

# Names that are not canonical but name a canonical formula (for the error message).
_SAME_FORMULA = {"infonca": "dpo"}


def names() -> list[str]:
  """Every canonical loss name, sorted (TRL's loss_type names: `pofx.losses.trl.names()`)."""
  return list(REGISTRY)


def _unknown(name) -> str:
  if name in trl.REGISTRY:
    canonical = trl.canonical(name)
    return (
      f"Unknown loss {name!r}: {name!r} is TRL's loss_type name; pofx's name of the formula is {canonical!r}, "
      f"and TRL 1.16's own semantics are {trl.PREFIX + name!r}."
    )
  if name in _SAME_FORMULA:
    return f"Unknown loss {name!r}: its formula is {_SAME_FORMULA[name]!r}."
  return (
    f"Unknown loss {name!r}; allowed: {names()}, or a TRL loss_type as 'trl.<loss_type>' "
    f"({[trl.PREFIX + t for t in trl.names()]})."
  )


def spec(name: str) -> LossSpec:
  """The `LossSpec` of a canonical name, or of a TRL loss_type written `"trl.<loss_type>"`.

  Raises:
    ValueError: an unknown name; the message lists the allowed ones (and, for a bare TRL
      loss_type, its canonical name and its `trl.` form).
  """
  if isinstance(name, str) and name.startswith(trl.PREFIX):
    return trl.spec(name)
  if name not in REGISTRY:
    raise ValueError(_unknown(name))
  return REGISTRY[name]


def get(name: str):
  """The per-pair loss function named `name` (canonical, or `"trl.<loss_type>"`)."""
  return spec(name).fn


def _as_spec(loss) -> LossSpec:
  return loss if isinstance(loss, LossSpec) else spec(loss)


def check_kwargs(loss, kwargs: Mapping[str, Any]) -> None:
  """ValueError naming the allowed hyperparameters of `loss` (a name or LossSpec) when `kwargs`
  holds an unknown one or lacks a required one."""
  _registry.check_kwargs(_as_spec(loss), kwargs)


def check_values(loss, kwargs: Mapping[str, Any]) -> None:
  """ValueError when `kwargs` (a name or LossSpec's hyperparameters) holds a value the loss refuses.

  Unknown or missing names fail as in `check_kwargs`. The values are then checked by the loss's
  own checks (ranges, choices): the loss is traced once with `jax.eval_shape` on the worked
  example's shapes (and its per-pair inputs: scores, key, state), so nothing is computed. A
  program calls this before any long compute.
  """
  spec = _as_spec(loss)
  inputs = {k: v for k, v in _example.example_kwargs(spec).items() if k not in spec.example_hyper}
  merged = {**inputs, **kwargs}
  _registry.check_kwargs(spec, merged)
  policy, reference = _example._inputs(spec, 0.0)
  jax.eval_shape(lambda p, r: spec.fn(p, r, **merged), policy, reference)


def reduce(loss, per_pair: jax.Array, policy, mask: Optional[jax.Array] = None) -> jax.Array:
  """The documented batch reduction of `loss` (a name or LossSpec) applied to its `[B]` per-pair values.

  "mean" over pairs for most losses, the sum for UNA, and the chosen-token mean (sum of per-pair
  values over the batch's chosen tokens, `policy.chosen_len`) for `sft`. `mask` `[B]` (0 = a
  padding pair) leaves pairs out.
  """
  return _registry.reduce(_as_spec(loss), per_pair, policy, mask)


def batch_loss(name: str, policy, reference=None, **kwargs: Any):
  """Applies loss `name` and its documented batch reduction (see `reduce`).

  Most losses take the mean over pairs; `sft` is a token mean over the batch's chosen tokens;
  UNA sums over pairs as its authors' code does. Stateful losses (`state=` in kwargs) return
  `(scalar, new_state)`.

  Raises:
    ValueError: unknown name, unknown or missing arguments, invalid hyperparameter values.
  """
  return _registry.batch_loss(spec(name), policy, reference, kwargs)


def check_scores(loss, chosen_scores, rejected_scores, **hyper: Any) -> None:
  """ValueError when per-pair scores lie outside the domain of `loss` (a name or LossSpec).

  For a loss that reads scores (`"scores" in spec.requires`): `spec.score_domain` says which
  scores the method is defined for (ODPO: chosen > rejected; MaPPO: 1 >= chosen >= rejected >= 0;
  UNA: each in [0, 1] or -1 for a dummy answer). `hyper` are the loss's hyperparameters that the
  domain depends on (ODPO's `ratio`). The message names how many pairs are outside and the first
  ones. A program calls this on its whole training split before training; the losses themselves
  raise on concrete scores and return NaN for such pairs under `jit`. No-op for other losses.
  """
  s = _as_spec(loss)
  if s.score_domain is None:
    return
  _registry.check_scores(s.name, s.score_domain, chosen_scores, rejected_scores, hyper)


__all__ = [
  "REGISTRY",
  "REQUIREMENTS",
  "LossSpec",
  "names",
  "spec",
  "get",
  "batch_loss",
  "reduce",
  "check_kwargs",
  "check_values",
  "check_scores",
  "ScoreDomain",
  "trl",
  # shared pieces
  "logratios",
  "margins",
  "check_beta",
  "check_choice",
  "check_range",
  # GPO family
  "gpo",
  "dpo",
  "slic",
  "ipo",
  "ipo_sum",
  "exponential",
  "truncated_quadratic",
  "savage",
  # formulas TRL has (its loss types, modifiers and their combination)
  "TRL_LOSS_TYPES",
  "F_DIVERGENCES",
  "F_DIVERGENCE_LOSS_TYPES",
  "trl_dpo_loss",
  "f_divergence_link",
  "wpo_sequence_weights",
  "ld_weighted_sums",
  "exo_pair",
  "bco_pair",
  "sppo_hard",
  "aot",
  "aot_unpaired",
  "apo_zero",
  "apo_down",
  "discopop",
  "sft",
  "ld_dpo",
  "wpo",
  "f_dpo",
  # literature
  "simpo",
  "cpo",
  "orpo",
  "repo",
  "dpop",
  "odpo",
  "dpo_shift",
  "dpo_shift_lambda",
  "ln_dpo",
  "mappo",
  "cdpo",
  "robust_dpo",
  "focalpo",
  "rpo",
  "irpo",
  "asft",
  "beta_dpo",
  "beta_dpo_init_state",
  "beta_dpo_batch_statistics",
  "BetaDpoState",
  "gamma_simpo",
  "gamma_dpo",
  "gamma_po",
  "gamma_po_init_state",
  "gamma_po_margins",
  "GammaPoState",
  "sampo",
  "sampo_token_masks",
  "sgdpo",
  "sgdpo_pilot_masks",
  "dmpo",
  "dmpo_turn_weights",
  "delta_l_weights",
  "dpo_nll_delta_l",
  "nca",
  "nca_kway",
  "infonca_kway",
  "una",
  "kto",
  "kto_reference_point",
  "kto_unpaired",
  "ra_dpo",
  "ra_dpo2",
  "ra_dpo_sequence_risk",
  "mipo",
  "mipo_alignment",
  "ilr_dpo",
  "flex_dpo",
  "madpo",
  "madpo_weights",
  "gdpo",
  "bmc",
  "bmc_modified_tokens",
  "bmc_token_weights",
  "sem_dpo",
  "cosine_distance",
  "two_d_dpo",
  "two_d_dpo_segment_rewards",
  "full_step_dpo",
  "full_step_dpo_token_steps",
  # diffusion
  "adaptive_dpo",
  "adaptive_dpo_logits",
  "adaptive_dpo_uncertainty",
  "adaptive_dpo_weighting",
  "adaptive_dpo_weights",
  "d3po",
  "dense_reward_dpo",
  "dense_reward_step_weights",
  "diffusion_kto",
  "smpo",
  "smpo_preference",
  "reg_dpo",
  "diffusion_dro",
  "patch_dpo",
  "rank_dpo",
  "rank_dpo_weights",
]
