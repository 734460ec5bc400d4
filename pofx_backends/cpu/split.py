r"""A model call split into independent calls on slices of its batch, for XLA:CPU's executor.

    logps_fn = pairs.make_logps_fn(split.split_batch(model.denoise, parts=2), schedule)

XLA:CPU runs a compiled program as a graph of operations and starts every operation whose inputs
are ready on one of its threads; one convolution or fusion of a small model, split across threads
inside the operation, gains little. A U-Net forward and backward is mostly a chain: at a given
moment few operations are ready, and on two cores one of them often waits. `split_batch(f, n)`
computes `f` on n equal slices of the batch as n separate calls whose results are concatenated:
the same function (each image's output depends only on that image: no batch statistics), and n
independent chains of operations in the forward and in the backward, which the executor runs side
by side. The price is a program with n copies of the model's operations: a longer compilation
and more compiled code in memory.

This is a CPU-backend choice, not the core's: a program applies it when it runs on XLA:CPU (on an
accelerator one batched call is the efficient form). The Diffusion-DPO benchmark
(`benchmarks/diffusion_step.py --denoiser_calls`) measures it.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp


def split_batch(denoise: Callable, parts: int = 2) -> Callable:
  """`denoise(params, x, timesteps, cond)` computed as `parts` calls on equal slices of the batch.

  `x` `[B, ...]`, `timesteps` `[B]` and `cond` (`[B, ...]` or None) are split along their first
  axis into `parts` consecutive slices; the outputs are concatenated in order. `parts = 1` returns
  `denoise` itself. The result equals `denoise(params, x, timesteps, cond)` for a denoiser whose
  outputs are per-example (up to the order of floating-point sums inside the model).

  Raises:
    ValueError: `parts` not an integer >= 1 (at once), or B not divisible by `parts` (at the call).
  """
  if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
    raise ValueError(f"split_batch: parts={parts!r}; allowed: an integer >= 1.")
  if parts == 1:
    return denoise

  def split_call(params, x, timesteps, cond=None):
    batch = x.shape[0]
    if batch % parts:
      raise ValueError(f"split_batch: a batch of {batch} cannot be split into {parts} equal parts.")
    xs, ts = jnp.split(x, parts), jnp.split(timesteps, parts)
    conds = [None] * parts if cond is None else jnp.split(cond, parts)
    return jnp.concatenate([denoise(params, xi, ti, ci) for xi, ti, ci in zip(xs, ts, conds)])

  return split_call
