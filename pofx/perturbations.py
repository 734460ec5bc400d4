"""Weight perturbations: how the gradient used by the optimizer is computed.

A `Perturbation` is a record of pure functions:

    init(params) -> pstate
    value_and_grad(objective, params, pstate, rng, batch) -> ((loss, aux), grads, pstate)

with `objective(params, batch) -> (loss, aux)`. The batch is passed through (not closed over)
so that m-sharpness can split it into shards (every leaf along axis 0). The train step passes
`(batch, reference_logps)` as the batch: the reference log-probs are computed once per step,
outside the perturbation, and split with the pairs.

  none()                       plain `jax.value_and_grad`.
  sam(rho, adaptive, m)        SAM (Foret et al. 2021, arXiv:2010.01412, Eq. 2 with p = 2):
                               v = rho g / ||g||, gradient taken at theta + v, applied at theta.
                               adaptive=True is ASAM (Kwon et al. 2021, arXiv:2102.11600):
                               v = rho T^2 g / ||T g||, T = |theta| + eta. m > 1: m-sharpness, one
                               ascent per shard of the batch, sharded SAM gradients averaged.
  awp(gamma)                   AWP (Wu et al. 2020, arXiv:2004.05884, Eq. 8-9, authors' code): one
                               ascent step; per weight matrix v_l = gamma ||theta_l|| g_l / ||g_l||
                               (matrices only: ndim > 1; vectors unperturbed).

  rwp(gamma, c_min, steps)     RWP (Yu et al. 2022, "Robust Weight Perturbation for Adversarial
                               Training", IJCAI, arXiv:2205.14826; as the authors' code
                               `utils_rwp.py` computes it): `steps` proxy ascent steps on the examples that
                               satisfy the loss-stationary condition l_i < c_min, accumulated and
                               scaled to one global radius gamma ||theta||. The objective's aux
                               must carry the per-pair losses (`aux["per_pair"]`, as
                               `pofx.train`'s does); c_min has no default (see `rwp`).
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


def _matrices(tree):
  """`tree` with every leaf of ndim <= 1 replaced by zeros (RWP/AWP perturb weight matrices only)."""
  return jax.tree.map(lambda x: x if x.ndim > 1 else jnp.zeros_like(x), tree)


def rwp(gamma: float = 0.01, *, c_min: float, steps: int = 10, proxy_lr: float = 0.01) -> Perturbation:
  """Robust weight perturbation with the loss-stationary condition; `rwp(gamma=0)` equals `none()`.

  Yu et al. 2022 (arXiv:2205.14826), as their code computes it (`RobustWeightPerturb.calc_awp`).
  With W the weight matrices (ndim > 1; vectors are never perturbed), D = 0 and v = 0, repeat
  `steps` times:

      m_i  = 1[l_i(theta + gamma v) < c_min]                 (loss-stationary condition, LSC)
      D   += proxy_lr * grad_W mean_i(m_i l_i)(theta + gamma v)   (one SGD ascent step of a proxy)
      v    = (||theta_W|| / (||D|| + 1e-20)) D              (one norm over all matrices together)

  then the gradient of the objective is taken at theta + gamma v and applied at theta. The mean
  runs over every real pair (masked ones count as zero), as the code's `loss.mul(Indicator).mean()`;
  pairs with `aux["mask"] == 0` (padding) are left out. Only pairs whose loss is still below
  c_min drive the perturbation, so already-violated pairs do not push the weights further.
  `proxy_lr` cancels in the normalisation (it only scales D against the 1e-20). Cost: `steps`
  forward-backward passes plus the main one.

  Args:
    gamma: relative radius (the authors' `--awp-gamma`, default 0.01).
    c_min: the LSC threshold on the per-pair loss. Required: the paper's 1.7 is for per-example
      cross-entropy on CIFAR. For the logistic (DPO) loss, log 2 ~ 0.693 is the loss at zero
      margin (a value for preference losses has not been established; tune it).
    steps: proxy ascent steps (10, hard-coded in the authors' code).
    proxy_lr: the proxy SGD learning rate (0.01 in the code).
  """
  if float(gamma) < 0:
    raise ValueError(f"perturbations.rwp: invalid gamma={gamma!r}; allowed: gamma >= 0.")
  if int(steps) < 1 or int(steps) != steps:
    raise ValueError(f"perturbations.rwp: invalid steps={steps!r}; allowed: integer >= 1.")
  if not float(proxy_lr) > 0:
    raise ValueError(f"perturbations.rwp: invalid proxy_lr={proxy_lr!r}; allowed: proxy_lr > 0.")
  c_min, steps = float(c_min), int(steps)

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng

    def lsc_loss(p):
      loss, aux = objective(p, batch)
      if not isinstance(aux, dict) or "per_pair" not in aux:
        raise ValueError(
          "perturbations.rwp needs the per-pair losses: the objective's aux must be a dict with "
          "'per_pair' [B] (pofx.train's objective provides it)."
        )
      per_pair = aux["per_pair"]
      real = jnp.asarray(aux.get("mask", jnp.ones_like(per_pair)), per_pair.dtype)
      lsc = jax.lax.stop_gradient((per_pair < c_min).astype(per_pair.dtype))
      return jnp.sum(real * lsc * per_pair) / jnp.maximum(jnp.sum(real), 1.0), (loss, aux)

    theta_norm = optax.global_norm(_matrices(params))

    def scaled(d):
      return jax.tree.map(lambda x: x * (theta_norm / (optax.global_norm(d) + 1e-20)), d)

    ascent = jax.grad(lsc_loss, has_aux=True)
    g, (loss, aux) = ascent(params)  # the first proxy sits at theta: the reported loss and aux
    diff = jax.tree.map(lambda x: proxy_lr * x, _matrices(g))

    def body(_, diff):
      g, _ = ascent(jax.tree.map(lambda p, v: p + gamma * v, params, scaled(diff)))
      return jax.tree.map(lambda d, x: d + proxy_lr * x, diff, _matrices(g))

    diff = jax.lax.fori_loop(1, steps, body, diff)
    perturbed = jax.tree.map(lambda p, v: p + gamma * v, params, scaled(diff))
    grads = jax.grad(lambda p: objective(p, batch)[0])(perturbed)
    return (loss, aux), grads, pstate

  return Perturbation("rwp", init=lambda p: (), value_and_grad=value_and_grad)
