"""AdamW whose step is applied by one native kernel: `adamw(...)`, a `pofx.optimizers.FusedOptimizer`.

`optax.adamw` on XLA:CPU reads and writes every parameter array in several fusions per step (the
moments, the update, then `optax.apply_updates`); on one flat vector (`optax.flatten`) it also
concatenates the gradients and slices the update back into the leaves. `adamw(...).apply` runs the
whole step, an optional global-norm clip included, in one pass over each leaf
(`pofx_backends.cpu.native.adamw_apply`, `adamw.cc`): it reads the parameter, gradient and both
moments once and writes the parameter and the moments in place.

The formula and its order of operations are optax's (`optax.chain(optax.clip_by_global_norm(m),
optax.adamw(...))`; Loshchilov & Hutter 2019, arXiv:1711.05101, Algorithm 2), so the parameters
match optax's to float32 rounding (XLA may contract a multiply and an add into one fused
multiply-add, the kernel does not; `tests/backends/test_adamw.py`):

    g   <- g                        if ||g|| < max_grad_norm else (g / ||g||) max_grad_norm
    mu  <- (1 - b1) g + b1 mu,      nu <- (1 - b2) g^2 + b2 nu,        t <- t + 1
    p   <- p + (-lr(t - 1)) ((mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps) + weight_decay p)

`update` is the same step in XLA's operations (the optax protocol, for code that composes or
inspects updates), and `apply` falls back to it, followed by `optax.apply_updates`, where the native
kernels cannot be used (`native.unavailable_reason()`) or a leaf is not float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from pofx.optimizers import FusedOptimizer
from pofx_backends.cpu import native

Schedule = Callable[[jax.Array], jax.Array]


class AdamWState(NamedTuple):
  """`count`: int32 steps taken; `mu`, `nu`: the first and second moments, float32, like the params."""

  count: jax.Array
  mu: Any
  nu: Any


def _check(learning_rate, b1, b2, eps, weight_decay, max_grad_norm):
  if not callable(learning_rate) and not (isinstance(learning_rate, (int, float)) and learning_rate >= 0):
    raise ValueError(f"adamw: learning_rate={learning_rate!r}; a number >= 0 or a schedule count -> rate.")
  for name, b in (("b1", b1), ("b2", b2)):
    if not 0.0 <= b < 1.0:
      raise ValueError(f"adamw: {name}={b!r}; allowed: 0 <= {name} < 1.")
  if not eps >= 0:
    raise ValueError(f"adamw: eps={eps!r}; allowed: eps >= 0.")
  if not weight_decay >= 0:
    raise ValueError(f"adamw: weight_decay={weight_decay!r}; allowed: weight_decay >= 0.")
  if max_grad_norm is not None and not max_grad_norm > 0:
    raise ValueError(f"adamw: max_grad_norm={max_grad_norm!r}; allowed: None (no clipping) or a number > 0.")


def adamw(
  learning_rate: Union[float, Schedule],
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
  *,
  max_grad_norm: Optional[float] = None,
) -> FusedOptimizer:
  """AdamW with optax's defaults and formula, the step applied by one native kernel (module doc).

  Args:
    learning_rate: a rate, or a schedule of the step count (as optax's).
    b1, b2, eps, weight_decay: as `optax.adamw` (decoupled weight decay on every leaf).
    max_grad_norm: clip the gradients' global norm to it first (`optax.clip_by_global_norm`);
      None: no clipping.
  """
  _check(learning_rate, b1, b2, eps, weight_decay, max_grad_norm)
  schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
  max_norm = math.inf if max_grad_norm is None else float(max_grad_norm)

  def init(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    return AdamWState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def scalars(grads, state):
    count = optax.safe_increment(state.count)
    norm = optax.global_norm(grads) if max_grad_norm is not None else jnp.float32(0.0)
    return count, jnp.asarray(schedule(state.count), jnp.float32), norm, 1 - b1**count, 1 - b2**count

  def update(grads, state, params=None):
    if params is None and weight_decay:
      raise ValueError("adamw: update needs params for the weight decay.")
    count, lr, norm, bc1, bc2 = scalars(grads, state)
    if max_grad_norm is not None:
      grads = jax.tree.map(lambda g: jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), grads)
    mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, grads, state.mu)
    nu = jax.tree.map(lambda g, v: (1 - b2) * (g * g) + b2 * v, grads, state.nu)
    params = params if params is not None else jax.tree.map(jnp.zeros_like, grads)
    updates = jax.tree.map(
      lambda m, v, p: -lr * ((m / bc1) / (jnp.sqrt(v / bc2) + eps) + weight_decay * p), mu, nu, params
    )
    return updates, AdamWState(count, mu, nu)

  def apply(grads, state, params):
    leaves, treedef = jax.tree.flatten(params)
    if (
      jax.default_backend() != "cpu"
      or native.unavailable_reason() is not None
      or any(jnp.asarray(x).dtype != jnp.float32 for x in leaves)
    ):
      updates, state = update(grads, state, params)
      return optax.apply_updates(params, updates), state
    count, lr, norm, bc1, bc2 = scalars(grads, state)
    hyper = jnp.stack([lr, b1, 1 - b1, b2, 1 - b2, eps, weight_decay, bc1, bc2, norm, max_norm]).astype(jnp.float32)
    new, mu, nu = native.adamw_apply(
      hyper, leaves, treedef.flatten_up_to(grads), treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    )
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    return unflat(new), AdamWState(count, unflat(mu), unflat(nu))

  return FusedOptimizer(init, update, apply)
