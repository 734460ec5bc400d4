"""Weight perturbations: how the gradient used by the optimizer is computed.

A `Perturbation` is a record of pure functions:

    init(params) -> pstate
    value_and_grad(objective, params, pstate, rng, batch) -> ((loss, aux), grads, pstate)

with `objective(params, batch) -> (loss, aux)`. The batch is passed through (not closed over)
so that m-sharpness can split it into shards. Reference log-probs are already in the batch:
they are computed once per step, outside the perturbation.

  none()                       plain `jax.value_and_grad`.
  sam(rho, adaptive, m)        SAM (Foret et al. 2021, arXiv:2010.01412, Eq. 2 with p = 2):
                               v = rho g / ||g||, gradient taken at theta + v, applied at theta.
                               adaptive=True is ASAM (Kwon et al. 2021, arXiv:2102.11600):
                               v = rho T^2 g / ||T g||, T = |theta| + eta. m > 1: m-sharpness, one
                               ascent per shard of the batch, sharded SAM gradients averaged.
  awp(gamma)                   AWP (Wu et al. 2020, arXiv:2004.05884, Eq. 8-9, authors' code): one
                               ascent step; per weight matrix v_l = gamma ||theta_l|| g_l / ||g_l||
                               (matrices only: ndim > 1; vectors unperturbed).

RWP (Yu et al. 2022) is not offered: its loss-stationary threshold c_min is defined for
per-example classification losses and has no established value for preference losses.
The loss and aux reported are those at the unperturbed parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Perturbation:
  name: str
  init: Callable[[Any], Any]
  value_and_grad: Callable[..., Any]


def none() -> Perturbation:
  """Plain gradient: `jax.value_and_grad(objective, has_aux=True)`."""

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
    return (loss, aux), grads, pstate

  return Perturbation("none", init=lambda p: (), value_and_grad=value_and_grad)


def _ascend_then_grad(objective, params, batch, direction):
  """Loss/aux and gradient at `params`, then the gradient at `params + direction(grads, params)`."""
  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
  perturbed = jax.tree.map(lambda p, d: p + d, params, direction(grads, params))
  return (loss, aux), jax.grad(lambda p: objective(p, batch)[0])(perturbed)


def _sam_direction(grads, params, rho, adaptive, eta):
  if adaptive:
    t = jax.tree.map(lambda p: jnp.abs(p) + eta, params)
    tg = jax.tree.map(lambda ti, g: ti * g, t, grads)
    norm = optax.global_norm(tg)
    return jax.tree.map(lambda ti, g: rho * ti * ti * g / (norm + 1e-12), t, grads)
  norm = optax.global_norm(grads)
  return jax.tree.map(lambda g: rho * g / (norm + 1e-12), grads)


def sam(rho: float = 0.05, *, adaptive: bool = False, eta: float = 0.01, m: int = 1) -> Perturbation:
  """Sharpness-aware minimisation; `sam(rho=0)` equals `none()` exactly.

  Args:
    rho: neighbourhood radius (SAM default 0.05; ASAM uses about 10x larger, e.g. 2.0).
    adaptive: ASAM's scale-invariant neighbourhood, T_theta = |theta| + eta.
    eta: ASAM's offset (0.01 in the ASAM paper).
    m: m-sharpness: split the batch into m shards along axis 0, one ascent per shard, average
      the shard SAM gradients (Foret et al. Sec. 4.1). m = 1: one ascent for the whole batch.
  """
  if float(rho) < 0:
    raise ValueError(f"perturbations.sam: invalid rho={rho!r}; allowed: rho >= 0.")
  if int(m) < 1:
    raise ValueError(f"perturbations.sam: invalid m={m!r}; allowed: integer >= 1.")

  def one(objective, params, batch):
    return _ascend_then_grad(objective, params, batch, lambda g, p: _sam_direction(g, p, rho, adaptive, eta))

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng
    if m == 1:
      out, grads = one(objective, params, batch)
      return out, grads, pstate
    # m-sharpness: shards of the batch; the reported loss/aux are those of the whole batch.
    leading = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(leading) != 1 or next(iter(leading)) % m:
      raise ValueError(f"perturbations.sam: m={m} must divide the batch size {sorted(leading)}.")
    shards = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)
    (_, _), shard_grads = jax.lax.map(lambda b: one(objective, params, b), shards)
    grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), shard_grads)
    loss, aux = objective(params, batch)
    return (loss, aux), grads, pstate

  return Perturbation("asam" if adaptive else "sam", init=lambda p: (), value_and_grad=value_and_grad)


def awp_direction(grads, params, gamma):
  """AWP's layer-wise perturbation: `gamma ||theta_l|| g_l / ||g_l||` for ndim > 1, else 0."""

  def leaf(p, g):
    if p.ndim <= 1:
      return jnp.zeros_like(p)
    return gamma * jnp.linalg.norm(p) * g / (jnp.linalg.norm(g) + 1e-20)

  return jax.tree.map(leaf, params, grads)


def awp(gamma: float = 0.01) -> Perturbation:
  """Adversarial weight perturbation; `awp(gamma=0)` equals `none()` exactly.

  One ascent step on the loss (the proxy SGD step of the authors' code, whose learning rate
  cancels after the per-layer normalisation), `v_l = gamma ||theta_l|| d_l / ||d_l||` with
  d_l the ascent direction of weight matrix l; the gradient is taken at theta + v and applied
  at theta. Default gamma 0.01 (authors' AT setting).
  """
  if float(gamma) < 0:
    raise ValueError(f"perturbations.awp: invalid gamma={gamma!r}; allowed: gamma >= 0.")

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng
    out, grads = _ascend_then_grad(objective, params, batch, lambda g, p: awp_direction(g, p, gamma))
    return out, grads, pstate

  return Perturbation("awp", init=lambda p: (), value_and_grad=value_and_grad)
