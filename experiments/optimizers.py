"""The training optimizer of a config's `train.optimizer` block, shared by every training stage.

`from_config(c, kernels=)` returns `(optimizer, schedule)`: optax's `name` (pofx.options.OPTIMIZERS)
on a learning rate warmed up linearly over `warmup_steps` and then constant, after clipping the
global gradient norm at `grad_clip` (none when 0). With the CPU kernels (`kernels`, the run's
resolved `model.kernels`, is "cpu") AdamW is the CPU backend's (`pofx_backends.cpu.optimizers.adamw`,
a `pofx.optimizers.FusedOptimizer`: the same clip and step, applied by one native kernel that
updates every parameter array in place); it falls back to XLA's operations where the native
kernels cannot be built. Its optimizer state is not optax's chain state, so a workdir resumes with
the kernels it started with (they are recorded in it and kept on resume).

`flat=True` (the image program's choice) runs the optax chain on one flat vector of all the
parameters (`optax.flatten`): the same elementwise clip and step (the global norm summed in another
order, so equal to float32 rounding), as a handful of operations instead of a dozen per parameter
array: a third less XLA compile time for a `:tiny` U-Net train step. The language program keeps
the per-array chain, whose state is what its checkpoints hold, and which needs no flat copy of the
gradients of a large model.
"""

import optax


def from_config(c, kernels: str = "xla", *, flat: bool = False):
  o = c.train.optimizer
  schedule = optax.join_schedules(
    [optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)), optax.constant_schedule(o.learning_rate)],
    [max(o.warmup_steps, 1)],
  )
  clip = o.grad_clip if o.grad_clip and o.grad_clip > 0 else None
  if o.name == "adamw" and kernels == "cpu":
    from pofx_backends.cpu import optimizers as cpu_optimizers

    return cpu_optimizers.adamw(schedule, weight_decay=o.weight_decay, max_grad_norm=clip), schedule
  inner = {
    "adamw": lambda: optax.adamw(schedule, weight_decay=o.weight_decay),
    "adam": lambda: optax.adam(schedule),
    "sgd": lambda: optax.sgd(schedule),
  }[o.name]()
  parts = ([optax.clip_by_global_norm(clip)] if clip else []) + [inner]
  chain = optax.chain(*parts)
  return (optax.flatten(chain) if flat else chain), schedule
