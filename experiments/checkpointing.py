"""Orbax checkpoints of a run: the TrainState plus JSON metadata (data position, stage, counters),
each sealed with a SHA-256 record of its files and verified before it is restored.

A checkpoint is written only from a state the train step produced, and the step never lets a
non-finite loss or gradient into the state (`pofx.train`, `guard_nonfinite`), so checkpoints never
hold NaNs; `save` also refuses a state with non-finite parameters, as a second line of defence.
Typed PRNG keys are stored as their raw key data.

Integrity: orbax checks the structure and metadata of a checkpoint but restores array bytes as it
finds them, so a flipped byte inside array data would be restored silently. `save` therefore
writes `pofx_integrity.json` into the step directory once orbax has finished: the SHA-256 digest
and size of every file. `restore` checks the newest checkpoint against its record; a damaged one
(a digest or size differs, a file is missing, or the record itself is missing because the run was
killed while saving) is moved aside to `<directory>.damaged/` and the next older checkpoint is
tried, with one line saying which checkpoint was damaged and which step the run falls back to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable, Dict, List, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

INTEGRITY = "pofx_integrity.json"  # in each step directory: {relative path: {"sha256", "bytes"}}


def _digests(step_dir: str) -> Dict[str, Dict[str, object]]:
  """SHA-256 and size of every file under `step_dir` (the integrity record itself excluded)."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel.startswith(INTEGRITY):  # the record and its temporary name
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      out[rel] = {"sha256": h.hexdigest(), "bytes": os.path.getsize(path)}
  return out


def damage(step_dir: str) -> Optional[str]:
  """Why the checkpoint in `step_dir` cannot be trusted (a short phrase), or None when every file
  matches the integrity record written when it was saved."""
  record_path = os.path.join(step_dir, INTEGRITY)
  try:
    with open(record_path) as f:
      record = json.load(f)
  except FileNotFoundError:
    return f"it has no {INTEGRITY} (never sealed: its run stopped while saving it, or an older pofx wrote it)"
  except (OSError, ValueError) as e:
    return f"its {INTEGRITY} is unreadable ({type(e).__name__})"
  for rel, want in sorted(record.items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      return f"{rel} is missing"
    size = os.path.getsize(path)
    if size != want["bytes"]:
      return f"{rel} has {size} bytes, {want['bytes']} were written (truncated or overwritten)"
  now = _digests(step_dir)
  for rel, want in sorted(record.items()):
    if now[rel]["sha256"] != want["sha256"]:
      return f"{rel} does not match its SHA-256 digest (its bytes changed after it was written)"
  return None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpoints:
  """Keeps the last `keep` checkpoints of one stage under `directory`.

  say: where the one-line notes about damaged checkpoints go (the program's stderr).
  on_written: called with the step after orbax has written a checkpoint and before its integrity
    record is sealed (the program's fault injection, to test a kill during a save).
  """

  def __init__(
    self,
    directory: str,
    keep: int = 2,
    *,
    say: Callable[[str], None] = print,
    on_written: Optional[Callable[[int], None]] = None,
  ):
    if int(keep) < 1:
      raise ValueError(f"checkpoints: keep={keep!r}; allowed: integer >= 1.")
    self.directory = os.path.abspath(directory)
    self.say, self.on_written = say, on_written
    self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=int(keep)))

  @staticmethod
  def _to_disk(state):
    if hasattr(state, "rng") and jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key):
      state = state.replace(rng=jax.random.key_data(state.rng))
    if jax.tree.leaves(getattr(state, "frozen", ())):  # LoRA: the frozen base is not checkpointed
      state = state.replace(frozen=())
    return state

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

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
    if self.on_written is not None:
      self.on_written(int(step))
    _sync(f"pofx:checkpoint_written:{step}")  # every process's shards are on disk
    if jax.process_index() == 0:  # seal: written to a temporary name, then renamed into place
      record = _digests(self.step_dir(step))
      tmp = os.path.join(self.step_dir(step), INTEGRITY + ".tmp")
      with open(tmp, "w") as f:
        json.dump(record, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, os.path.join(self.step_dir(step), INTEGRITY))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> List[int]:
    return sorted(int(s) for s in self.manager.all_steps())

  def _set_aside(self, step: int) -> str:
    """Moves a damaged checkpoint out of the manager's directory (kept for inspection)."""
    root = self.directory + ".damaged"
    dest, n = os.path.join(root, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(root, f"{step}.{n}"), n + 1
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      shutil.move(self.step_dir(step), dest)
    return dest

  def restore(self, like):
    """Returns (state, meta) of the newest intact checkpoint, restored into the structure of `like`
    (typed keys restored), or None when there is none. Damaged newer checkpoints are set aside, each
    with one line naming it, why it is damaged and the step the run falls back to."""
    steps = self.all_steps()
    if not steps:
      return None
    reasons = {s: damage(self.step_dir(s)) for s in steps}
    intact = [s for s in steps if reasons[s] is None]
    fallback = max(intact) if intact else None
    damaged = [s for s in steps if reasons[s] is not None and (fallback is None or s > fallback)]
    _sync("pofx:checkpoints_verified")
    for s in sorted(damaged, reverse=True):
      dest = self._set_aside(s)
      to = f"falling back to step {fallback}" if fallback is not None else "no intact checkpoint: starting at step 0"
      self.say(f"checkpoint {self.step_dir(s)} is damaged: {reasons[s]}; {to} (moved to {dest})")
    if damaged:
      _sync("pofx:checkpoints_set_aside")
      self.manager.reload()
    if fallback is None:
      return None
    disk_like = self._to_disk(like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, disk_like)
    try:
      out = self.manager.restore(
        fallback, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
      )
    except Exception as e:  # intact files that do not fit this run's state: another model/config
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(
        f"cannot restore the checkpoint {self.step_dir(fallback)} into this run's state (it was written "
        f"by a run with another model, optimizer or loss config): {first[:300]}"
      ) from None
    state = out.state
    if hasattr(like, "rng") and jax.dtypes.issubdtype(like.rng.dtype, jax.dtypes.prng_key):
      state = state.replace(rng=jax.random.wrap_key_data(state.rng))
    if jax.tree.leaves(getattr(like, "frozen", ())):
      state = state.replace(frozen=like.frozen)
    return state, dict(out.meta)

  def close(self):
    self.manager.close()
