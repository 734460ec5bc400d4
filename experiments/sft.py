"""Stage 1 of the program: supervised fine-tuning of the world's base policy on demonstrations.

    model, base = sft_base(world, seed=0)                 # world.model_config(), SFT on 8192 demos
    params = sft(init, demos, model=model, steps=600)     # the loop alone, from given parameters

The loss is the world's (`pofx.world.sft_loss`: token-level NLL of the demonstrated completions,
mean over the completion tokens of the batch); the optimiser AdamW with linear warmup and cosine
decay to a tenth of the peak learning rate (optax).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
import optax

from pofx import models
from pofx import world as world_lib


def sft(
  params,
  demos: world_lib.Demonstrations,
  *,
  model,
  seed: int = 0,
  steps: int = 600,
  batch_size: int = 64,
  learning_rate: float = 3e-3,
  warmup_steps: int = 50,
  weight_decay: float = 0.0,
  return_losses: bool = False,
):
  """Supervised fine-tuning of `params` under `model` (its pure functions, `pofx.models.make(config)`)
  on `demos`: `steps` AdamW steps with linear warmup + cosine decay.

  Jitted step; batches are drawn by a numpy generator seeded with `seed` (one pass over a fresh
  permutation per epoch). Returns the SFT (base) parameters, or `(params, losses [steps])` with
  `return_losses`.
  """
  tokens, positions, seg, loss_mask = world_lib.sft_arrays(demos)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, max(1, min(warmup_steps, steps - 1)), max(steps, 2), end_value=0.1 * learning_rate
  )
  opt = optax.adamw(schedule, weight_decay=weight_decay)

  @jax.jit
  def step(p, o, tok, pos, sg, lm):
    loss, g = jax.value_and_grad(lambda p: world_lib.sft_loss(model, p, tok, pos, sg, lm))(p)
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss

  rng = np.random.default_rng(seed)
  n = tokens.shape[0]
  bs = min(batch_size, n)
  order, pos_in = rng.permutation(n), 0
  opt_state = opt.init(params)
  losses = []
  for _ in range(steps):
    if pos_in + bs > n:
      order, pos_in = rng.permutation(n), 0
    idx = order[pos_in : pos_in + bs]
    pos_in += bs
    params, opt_state, loss = step(params, opt_state, tokens[idx], positions[idx], seg[idx], loss_mask[idx])
    losses.append(loss)
  if return_losses:
    return params, np.asarray(jax.device_get(losses), np.float32)
  return params


def sft_base(
  world: world_lib.World,
  *,
  seed: int = 0,
  num_demos: int = 8192,
  steps: int = 600,
  batch_size: int = 64,
  learning_rate: float = 3e-3,
  model: Optional[models.LlamaModel] = None,
):
  """The default SFT base of a world: `(model, params)`.

  `model` (default `pofx.models.make(world.model_config())`) initialised from
  `jax.random.key(seed)`, trained by `sft` on `num_demos` train-split demonstrations
  (demonstration seed `seed`, batch order seed `seed + 1`).
  """
  model = model or models.make(world.model_config())
  params = model.init(jax.random.key(seed))
  demos = world.demonstrations(num_demos, seed=seed)
  params = sft(
    params, demos, model=model, seed=seed + 1, steps=steps, batch_size=batch_size, learning_rate=learning_rate
  )
  return model, params
