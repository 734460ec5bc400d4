r"""The collectives of the data-parallel train step under `shard_map` / `pmap` (a leaf module: jax only).

  grad_pmean(params, axis_name)        identity forward; backward: the cotangent's `pmean` over the axis.
  all_gather_batch(tree, axis_name)    every array leaf all-gathered on its leading (pair) axis, tiled.

`pofx.train.make_train_step(..., axis_name=...)` uses both: each device evaluates the loss of the
*global* batch (its log-probs and per-pair inputs all-gathered), and the parameters enter that
objective through `grad_pmean`. Why the gradient is then the single-device one: with N devices
and the same global loss L on each, the all-gather's transpose is a reduce-scatter, so device i
receives N dL/d(its log-probs) and its local backward gives N c_i, where sum_i c_i = dL/dtheta;
the `pmean` of the N c_i is sum_i c_i. (A per-device mean loss followed by `pmean` under
`shard_map(check_vma=True)` is N times too large: replicated parameters' gradients come back
already summed over the axis.) `pofx.parallel` builds the modes on top of this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grad_pmean(params, axis_name):
  """Identity on the forward pass; the backward pass averages the cotangent over `axis_name`.

  Put it where replicated parameters enter a per-device objective (`pofx.train.make_train_step`
  does, with `axis_name`): every gradient taken through it, SAM's inner one included, is the
  data-parallel mean. Use under `shard_map(check_vma=False)` or `pmap`.
  """

  @jax.custom_vjp
  def ident(p):
    return p

  def fwd(p):
    return p, None

  def bwd(_, ct):
    return (jax.tree.map(lambda c: jax.lax.pmean(c, axis_name), ct),)

  ident.defvjp(fwd, bwd)
  return ident(params)


def all_gather_batch(tree, axis_name):
  """All-gathers every array leaf of `tree` along its leading (pair) axis over `axis_name`
  (tiled: device-major order, the order of the global batch). Scalars and None pass through."""

  def one(x):
    if x is None or jnp.ndim(x) == 0:
      return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)

  return jax.tree.map(one, tree)
