"""Orbax checkpoints of a run: the TrainState plus JSON metadata (data position, stage, config).

A checkpoint is written only from a state the train step produced, and the step never lets a
non-finite loss or gradient into the state (`pofx.train`, `guard_nonfinite`), so checkpoints never
hold NaNs; `save` also refuses a state with non-finite parameters, as a second line of defence.
Typed PRNG keys are stored as their raw key data.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
  """Keeps the last `keep` checkpoints of one stage under `directory`."""

  def __init__(self, directory: str, keep: int = 2):
    if int(keep) < 1:
      raise ValueError(f"checkpoints: keep={keep!r}; allowed: integer >= 1.")
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=int(keep)))

  @staticmethod
  def _to_disk(state):
    if hasattr(state, "rng") and jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key):
      state = state.replace(rng=jax.random.key_data(state.rng))
    return state

  def save(self, step: int, state, meta: dict) -> None:
    params = getattr(state, "params", state)
    local = [sh.data for x in jax.tree.leaves(params) for sh in x.addressable_shards]  # this process's shards
    if not all(bool(np.all(np.isfinite(np.asarray(x)))) for x in local):
      raise FloatingPointError(f"refusing to checkpoint step {step}: the parameters are not finite.")
    self.manager.save(
      int(step),
      args=ocp.args.Composite(state=ocp.args.StandardSave(self._to_disk(state)), meta=ocp.args.JsonSave(meta)),
    )
    self.manager.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore(self, like, step: Optional[int] = None):
    """Returns (state, meta) restored into the structure of `like` (typed keys restored)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    disk_like = self._to_disk(like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, disk_like)
    try:
      out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
      )
    except Exception as e:  # a checkpoint of another model/config, or a damaged one
      raise ValueError(
        f"cannot restore the checkpoint at {self.directory} step {step} into this run's state "
        f"(different model, optimizer or loss config, or a damaged checkpoint): {e}"
      ) from e
    state = out.state
    if hasattr(like, "rng") and jax.dtypes.issubdtype(like.rng.dtype, jax.dtypes.prng_key):
      state = state.replace(rng=jax.random.wrap_key_data(state.rng))
    return state, dict(out.meta)

  def close(self):
    self.manager.close()
