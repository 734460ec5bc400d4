"""The training optimizer of a config's `train.optimizer` block, shared by every training stage.

`from_config(c)` returns `(optimizer, schedule)`: optax's `name` (pofx.options.OPTIMIZERS) on a
learning rate warmed up linearly over `warmup_steps` and then constant, after clipping the global
gradient norm at `grad_clip` (none when 0).
"""

import optax


def from_config(c):
  o = c.train.optimizer
  schedule = optax.join_schedules(
    [optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)), optax.constant_schedule(o.learning_rate)],
    [max(o.warmup_steps, 1)],
  )
  inner = {
    "adamw": lambda: optax.adamw(schedule, weight_decay=o.weight_decay),
    "adam": lambda: optax.adam(schedule),
    "sgd": lambda: optax.sgd(schedule),
  }[o.name]()
  parts = ([optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip and o.grad_clip > 0 else []) + [inner]
  return optax.chain(*parts), schedule
