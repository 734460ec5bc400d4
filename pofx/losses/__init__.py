"""The pofx loss catalogue: every loss is a pure `(policy, reference, *, hyper) -> [B]` function.

    import pofx
    per_pair = pofx.losses.get("dpo")(policy, reference, beta=0.1)        # [B]
    loss = pofx.losses.batch_loss("dpo", policy, reference, beta=0.1)    # scalar
    pofx.losses.names()                                                   # every registered name

`python -m pofx.losses` prints every registered loss on one fixed example.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax

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
from pofx.losses._gpo_family import dpo, exponential, gpo, ipo, ipo_sum, savage, slic, truncated_quadratic
from pofx.losses._registry import REQUIREMENTS, LossSpec

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
    "gpo", "dpo", "slic", "ipo", "ipo_sum", "exponential", "truncated_quadratic", "savage",
]
