"""Optimizers that apply their own update: the train step's optimizer injection point.

The train step receives an optax `GradientTransformation` and, by default, applies it as optax
does:

    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

A `FusedOptimizer` is such a transformation (its `init` and `update` follow optax's protocol, so
optax's combinators and any code that calls `update` keep working) that also carries
`apply(grads, opt_state, params) -> (params, opt_state)`: the same step computed and applied to
the parameters in one operation, which a backend can do in place (no `updates` tree written and
read back). `apply_update` uses `apply` where the optimizer has it. The result must equal
`update` followed by `optax.apply_updates` up to float32 rounding; a backend that provides one
(`pofx_backends.cpu.optimizers.adamw`) tests it against optax.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import optax

Apply = Callable[[Any, Any, Any], Tuple[Any, Any]]


class FusedOptimizer(optax.GradientTransformation):
  """An optax `GradientTransformation` (`init`, `update`) with `apply`, its update applied in one
  operation: `apply(grads, opt_state, params) -> (new_params, new_opt_state)`.

  It is a `GradientTransformation` (a named pair), so optax's combinators accept it; a combinator's
  result is a plain transformation again (applied by `update` and `optax.apply_updates`).
  """

  def __new__(cls, init, update, apply: Apply):
    self = super().__new__(cls, init, update)
    self.__dict__["apply"] = apply
    return self

  def __getnewargs__(self):  # copy and pickle rebuild it with its apply
    return (self.init, self.update, self.apply)

  def _replace(self, **fields):
    return FusedOptimizer(fields.pop("init", self.init), fields.pop("update", self.update), self.apply, **fields)


def apply_update(optimizer: optax.GradientTransformation, grads, opt_state, params):
  """`(new_params, new_opt_state)`: `optimizer.apply` for a `FusedOptimizer`, else optax's
  `update` followed by `optax.apply_updates`."""
  if isinstance(optimizer, FusedOptimizer):
    return optimizer.apply(grads, opt_state, params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
