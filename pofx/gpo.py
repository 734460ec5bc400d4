r"""The convex functions of Generalized Preference Optimization (GPO).

GPO (Tang et al. 2024, "Generalized Preference Optimization: A Unified Approach to Offline
Alignment", arXiv:2402.05749, Eq. (3) and Table 1) writes an offline preference loss as

    L(theta) = E_{(x, y_w, y_l)} [ f(beta * rho_theta) ],
    rho_theta = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)),

with `f` a (classification-calibrated) margin loss: convex with f'(0) < 0. Each function here
is elementwise, takes `v = beta * rho` and returns the loss; beta is applied by the caller,
once. Any user callable `f(v) -> loss` works wherever these do.

Expanding around 0, `E[f(beta rho)] ~ f(0) + f'(0) beta E[rho] + f''(0)/2 beta^2 E[rho^2]`: the
ratio f''(0)/|f'(0)| sets the strength of GPO's "offline regularisation" relative to the
preference term (GPO Sec. 4), so equal regularisation across `f` needs
`beta_f * f''(0)/|f'(0)|` to match (e.g. beta_logistic = 2 beta_squared). `grad0(f)` and
`curv0(f)` compute f'(0) and f''(0) for any f by automatic differentiation.
"""

from __future__ import annotations

import types
from typing import Callable, Union

import jax
import jax.numpy as jnp

ConvexFn = Callable[[jax.Array], jax.Array]

# Beyond |v| = _EXP_LINEAR_FROM, exponentials continue linearly (value and slope matched), so
# losses stay finite in float32 and bfloat16 for margins as wrong as -1e4 (e^{1e3} overflows).
_EXP_LINEAR_FROM = 50.0


def logistic(v):
  r"""Logistic loss `f(v) = log(1 + e^{-v})` (DPO; Rafailov et al. 2023, arXiv:2305.18290 Eq. 7).

  f(0) = log 2, f'(0) = -1/2, f''(0) = 1/4. Computed as softplus(-v): finite for any v.
  """
  return jax.nn.softplus(-v)


def hinge(v):
  r"""Hinge loss `f(v) = max(0, 1 - v)` (SLiC; Zhao et al. 2023, arXiv:2305.10425).

  f(0) = 1, f'(0) = -1, f''(0) = 0 (piecewise linear; exactly zero for v >= 1).
  """
  return jax.nn.relu(1.0 - v)


def squared(v):
  r"""Squared loss `f(v) = (v - 1)^2` (IPO up to a constant; Azar et al. 2023, arXiv:2310.12036 Eq. 17).

  f(0) = 1, f'(0) = -2, f''(0) = 2. Minimised at v = 1: it penalises overshoot, unlike the
  others. IPO's `(rho - 1/(2 tau))^2 = (1/(2 tau))^2 * squared(2 tau * rho)`, i.e. GPO-squared
  with beta = 2 tau, times the constant 1/(4 tau^2).
  """
  return jnp.square(v - 1.0)


def exponential(v):
  r"""Exponential loss `f(v) = e^{-v}` (GPO Table 1; AdaBoost's loss).

  f(0) = 1, f'(0) = -1, f''(0) = 1. For v < -50 (a pair ranked so wrongly that e^{-v} > 5e21)
  the function continues along its tangent at -50, `e^{50} (1 - (v + 50))`, so value and
  gradient stay finite in float32/bfloat16; it is exact for v >= -50 and stays convex.
  """
  c = _EXP_LINEAR_FROM
  v_safe = jnp.maximum(v, -c)
  return jnp.exp(-v_safe) * (1.0 + (v_safe - v))


def truncated_quadratic(v):
  r"""Truncated quadratic loss `f(v) = max(0, 1 - v)^2` (GPO Table 1).

  f(0) = 1, f'(0) = -2, f''(0) = 2; exactly zero for v >= 1 (no push beyond the margin).
  """
  return jnp.square(jax.nn.relu(1.0 - v))


def savage(v):
  r"""Savage loss `f(v) = 1 / (1 + e^{v})^2 = sigmoid(-v)^2` (GPO Table 1; Masnadi-Shirazi & Vasconcelos 2008).

  f(0) = 1/4, f'(0) = -1/4, f''(0) = 1/8. **Not convex**: it is bounded in [0, 1] (tends to 1
  as v -> -inf), and a convex function bounded above on R is constant. It is nonetheless
  classification-calibrated (f'(0) < 0 and minimisers agree in sign with the Bayes rule),
  which is what GPO's analysis needs; its bounded value makes it robust to mislabelled pairs.
  Computed as exp(2 log sigmoid(-v)): finite for any v.
  """
  return jnp.exp(2.0 * jax.nn.log_sigmoid(-v))


CONVEX_FUNCTIONS = types.MappingProxyType(
  {
    "logistic": logistic,
    "hinge": hinge,
    "squared": squared,
    "exponential": exponential,
    "truncated_quadratic": truncated_quadratic,
    "savage": savage,
  }
)
"""Read-only table: name -> elementwise function."""

# The method each f corresponds to (GPO Table 1).
METHOD_OF = types.MappingProxyType(
  {
    "logistic": "DPO",
    "hinge": "SLiC",
    "squared": "IPO",
    "exponential": "GPO (exponential)",
    "truncated_quadratic": "GPO (truncated quadratic)",
    "savage": "GPO (savage)",
  }
)


def get(f: Union[str, ConvexFn]) -> ConvexFn:
  """Returns the function named `f`, or `f` itself when it is already callable."""
  if callable(f):
    return f
  if isinstance(f, str) and f in CONVEX_FUNCTIONS:
    return CONVEX_FUNCTIONS[f]
  raise ValueError(f"Unknown GPO function {f!r}; allowed: {sorted(CONVEX_FUNCTIONS)} or any callable f(v).")


def grad0(f: Union[str, ConvexFn]) -> jax.Array:
  """f'(0), by automatic differentiation."""
  return jax.grad(lambda v: get(f)(v))(jnp.float32(0.0))


def curv0(f: Union[str, ConvexFn]) -> jax.Array:
  """f''(0), by automatic differentiation."""
  return jax.grad(jax.grad(lambda v: get(f)(v)))(jnp.float32(0.0))


__all__ = [
  "ConvexFn",
  "CONVEX_FUNCTIONS",
  "METHOD_OF",
  "logistic",
  "hinge",
  "squared",
  "exponential",
  "truncated_quadratic",
  "savage",
  "get",
  "grad0",
  "curv0",
]
