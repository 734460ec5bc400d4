"""The read-only loss registry: names -> `LossSpec`, and `batch_loss`.

Each module of the catalogue exposes a tuple `SPECS` of `LossSpec`s; this module gathers them
into one read-only mapping at import (no decorators, no mutation afterwards). A loss joins the
registry only through a `SPECS` tuple, and the contract test (`tests/losses/test_registry_contract.py`)
walks every entry: jittable, `[B]` output, finite gradients, deterministic given its key.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

# What a loss may need beyond `policy`, `reference` and scalar hyperparameters. The contract
# test knows how to build an example of each; a new kind must be added there too.
REQUIREMENTS = types.MappingProxyType(
  {
    "lengths": "policy.chosen_len / rejected_len (completion token counts)",
    "tokens": "per-token arrays on policy (and reference when given): PairLogps.from_tokens",
    "log_sum_sq_probs": "policy.chosen_log_sum_sq_probs / rejected_log_sum_sq_probs (WPO weights)",
    "key": "`key=`: a jax.random key",
    "state": "`state=`: a state pytree (from spec.init_state) passed in; returns (losses, new_state)",
    "scores": "`chosen_scores=`, `rejected_scores=`: per-pair scores [B] (reward model / annotators)",
    "turn_ids": "`chosen_turn_ids=`, `rejected_turn_ids=`: per-token turn index [B, T] (int, -1 on padding)",
    "risk": "`chosen_risk=`, `rejected_risk=`: per-sequence risk terms [B] (Ra-DPO, see ra_dpo_sequence_risk)",
    "list": "`policy`/`reference` are ListLogps [B, K] and `scores=` is [B, K]",
    "kl": "`kl_logratios=`: [B'] policy-minus-reference log-probs of mismatched (x, y') pairs (KTO's z0)",
    "diff_masks": "`chosen_diff_mask=`, `rejected_diff_mask=`: [B, T] 0/1 tokens where chosen and rejected differ (BMC)",
    "embeddings": "`prompt_embeddings=`, `chosen_embeddings=`: [B, D] embeddings of the prompt and the chosen completion",
    "segments": "`chosen_segment_ids=`, `rejected_segment_ids=` [B, T] (int, -1 on padding) and "
    "`chosen_segment_scores=`, `rejected_segment_scores=` [B, S, A] (segment x aspect scores)",
    "companions": "on the reference: companion_chosen / companion_rejected / companion_mask [B, M], the "
    "log-probs of M companion models beside it (pofx.references.ema_companions; Adaptive-DPO)",
    "eos_logps": "per-state EOS log-probs [B, T+1]: policy.chosen/rejected_eos_logps and the reference's "
    "chosen/rejected_tempered_eos_logps (pofx.policy.make_logps_fn(eos_id=, eos_temperature=))",
  }
)

REFERENCE_USE = ("required", "optional", "unused")
REDUCTIONS = ("mean", "chosen_token_mean", "sum")


@dataclasses.dataclass(frozen=True)
class ScoreDomain:
  """The per-pair scores a loss is defined for (losses that require "scores").

  Attributes:
    text: the domain in words, e.g. "score_chosen > score_rejected".
    valid: `valid(s_w, s_l, **hyper) -> [B] bool`, numpy or jax arrays: the pairs inside the
      domain (NaN scores are outside). The loss computes NaN for the others under `jit`; with
      concrete scores it raises (`check_scores`).
    any_real: the domain is every pair of finite scores, in either order (a reward model's raw
      rewards fit it, e.g. the controlled world's gold rewards under Bradley-Terry labels).
  """

  text: str
  valid: Callable[..., Any]
  any_real: bool = False


def _finite(s_w, s_l, **_):
  return (abs(s_w) < float("inf")) & (abs(s_l) < float("inf"))


# Losses that take a reward model's raw rewards: any finite pair, the chosen's possibly the lower.
ANY_FINITE_SCORES = ScoreDomain("any finite scores (either may be the higher)", _finite, any_real=True)


def check_scores(name: str, domain: ScoreDomain, chosen_scores, rejected_scores, hyper: Mapping[str, Any]) -> None:
  """ValueError when concrete (not traced) scores have a pair outside `domain`: how many, and the first ones."""
  if isinstance(chosen_scores, jax.core.Tracer) or isinstance(rejected_scores, jax.core.Tracer):
    return
  s_w = np.asarray(chosen_scores, np.float64).reshape(-1)
  s_l = np.asarray(rejected_scores, np.float64).reshape(-1)
  ok = np.asarray(domain.valid(s_w, s_l, **hyper), bool).reshape(-1)
  if ok.all():
    return
  bad = np.flatnonzero(~ok)
  shown = ", ".join(f"pair {i}: ({s_w[i]:.6g}, {s_l[i]:.6g})" for i in bad[:3])
  raise ValueError(
    f"{name}: {bad.size} of {ok.size} pairs have scores outside its domain ({shown}"
    f"{', ...' if bad.size > 3 else ''}); allowed: {domain.text}."
  )


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """One registered loss.

  Attributes:
    name: the canonical name, or `trl.<loss_type>` in the TRL namespace (`pofx.losses.spec(name)` is this spec).
    fn: the pure per-pair loss `(policy, reference, *, ...) -> [B]` (or `([B], state)` when stateful).
    family: short family label for tables (e.g. "gpo", "trl", "reference-free").
    source: citation: authors, year, arXiv id and equation (or the code it follows).
    reference: "required", "optional" or "unused".
    requires: subset of REQUIREMENTS.
    reduction: batch reduction of `batch_loss`: "mean" over pairs, "chosen_token_mean" (sum of
      per-pair values over the number of chosen tokens in the batch), or "sum".
    example_hyper: hyperparameters that have no default and values used for the table.
    init_state: for stateful losses, `init_state(**hyper) -> state`.
    detached_by_design: why finite differences of the loss disagree with its gradient, when a
      method detaches a function of its own inputs (WPO's weights, beta-DPO's batch beta); empty
      otherwise. The contract test then takes finite differences where that quantity is constant.
    score_domain: for losses that require "scores", the scores the method is defined for
      (`ScoreDomain`); a program checks its data against it before training
      (`pofx.losses.check_scores`).
  """

  name: str
  fn: Callable[..., Any]
  family: str
  source: str
  reference: str = "required"
  requires: frozenset = frozenset()
  reduction: str = "mean"
  example_hyper: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  init_state: Optional[Callable[..., Any]] = None
  detached_by_design: str = ""
  score_domain: Optional[ScoreDomain] = None

  def __post_init__(self):
    unknown = set(self.requires) - set(REQUIREMENTS)
    if unknown:
      raise ValueError(
        f"LossSpec {self.name!r}: unknown requirements {sorted(unknown)}; allowed: {sorted(REQUIREMENTS)}."
      )
    if self.reference not in REFERENCE_USE:
      raise ValueError(f"LossSpec {self.name!r}: reference={self.reference!r}; allowed: {REFERENCE_USE}.")
    if self.reduction not in REDUCTIONS:
      raise ValueError(f"LossSpec {self.name!r}: reduction={self.reduction!r}; allowed: {REDUCTIONS}.")
    if ("state" in self.requires) != (self.init_state is not None):
      raise ValueError(f"LossSpec {self.name!r}: a stateful loss needs init_state, and only it.")
    if ("scores" in self.requires) != (self.score_domain is not None):
      raise ValueError(f"LossSpec {self.name!r}: a loss that reads per-pair scores needs score_domain, and only it.")

  @property
  def hyperparameters(self) -> dict:
    """Keyword-only parameters of `fn` with their defaults (inspect.Parameter.empty if none)."""
    sig = inspect.signature(self.fn)
    return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_registry(*spec_groups) -> Mapping[str, LossSpec]:
  """A read-only, sorted `name -> LossSpec` mapping; ValueError when a name is given twice."""
  table = {}
  for group in spec_groups:
    for spec in group:
      if spec.name in table:
        raise ValueError(f"Loss name {spec.name!r} registered twice.")
      table[spec.name] = spec
  return types.MappingProxyType(dict(sorted(table.items())))


def reduce(spec: LossSpec, per_pair: jax.Array, policy, mask: Optional[jax.Array] = None) -> jax.Array:
  """Applies the spec's documented batch reduction; `mask` `[B]` (0 = padding pair) excludes pairs."""
  if mask is not None:
    mask = jnp.asarray(mask, per_pair.dtype)
    per_pair = jnp.where(mask > 0, per_pair, 0.0)
  if spec.reduction == "mean":
    return jnp.mean(per_pair) if mask is None else jnp.sum(per_pair) / jnp.maximum(jnp.sum(mask), 1.0)
  if spec.reduction == "sum":
    return jnp.sum(per_pair)
  lens = jnp.asarray(policy.chosen_len, jnp.float32)
  total = jnp.maximum(jnp.sum(lens if mask is None else lens * mask), 1.0)
  return jnp.sum(per_pair) / total


def check_kwargs(spec: LossSpec, kwargs: Mapping[str, Any]) -> None:
  """ValueError naming the allowed hyperparameters when `kwargs` holds an unknown one or lacks a required one."""
  allowed = spec.hyperparameters
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"Loss {spec.name!r}: unknown argument(s) {unknown}; allowed: {sorted(allowed)}.")
  missing = sorted(k for k, d in allowed.items() if d is inspect.Parameter.empty and k not in kwargs)
  if missing:
    raise ValueError(f"Loss {spec.name!r}: missing required argument(s) {missing}.")


def batch_loss(spec: LossSpec, policy, reference, kwargs: Mapping[str, Any]):
  """Checks `kwargs`, applies the loss and its batch reduction: a scalar (`(scalar, new_state)` when stateful)."""
  check_kwargs(spec, kwargs)
  out = spec.fn(policy, reference, **kwargs)
  if "state" in spec.requires:
    per_pair, new_state = out
    return reduce(spec, per_pair, policy), new_state
  return reduce(spec, out, policy)
