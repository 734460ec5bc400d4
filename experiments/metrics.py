"""Metric sinks of a run: `metrics.jsonl`, TensorBoard event files, and a live progress bar.

Metrics arrive as device arrays; they are fetched (one host sync) only when logged. Besides the
step's own metrics, each record carries the throughput since the previous record:
`pairs_per_second`, and, when the loop reports each step's processed FLOPs (`add_flops`, counted
by `step_flops_fn` with `pofx.flops`: the policy forward and backward, the LM head, the reference
forward when it runs, a perturbation's extra passes), `flops_per_second` and, on a known
accelerator, `mfu` (model-FLOPs utilisation against its dense bf16 peak, `pofx.flops.mfu`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from pofx import flops as flops_lib


def step_flops_fn(
  model_config,
  *,
  reference: str,
  perturbation: str,
  rwp_steps: int = 10,
  dropout_samples: int = 1,
  input_passes: int = 0,
) -> Callable[[Any], float]:
  """`batch -> processed FLOPs` of one train step of the program on that batch (`pofx.flops`).

  reference: the config's reference kind (`pofx.options.REFERENCE_KINDS`; "multi" is two cached
  references here, no forward); perturbation: its kind (`pofx.options.PERTURBATION_KINDS`). A batch
  with KTO's mismatched pairs (`batch["kl"]`) adds their policy and reference forwards.
  """
  reference = "cached" if reference == "multi" else reference

  def step_flops(batch) -> float:
    work = flops_lib.work_of_batch(batch)
    total = flops_lib.dpo_step_flops(
      model_config,
      work,
      reference=reference,
      perturbation=perturbation,
      rwp_steps=rwp_steps,
      dropout_samples=dropout_samples,
      input_passes=input_passes,
    ).total
    if "kl" in batch:  # KTO's mismatched pairs: one policy and one reference forward
      total += 2 * flops_lib.forward_flops(model_config, flops_lib.work_of_batch(batch["kl"])).total
    return total

  return step_flops


def mfu(flops_per_second: float, num_devices: int = 1) -> Optional[float]:
  """Model-FLOPs utilisation of `num_devices` devices of this process's kind; None on unknown ones (CPUs)."""
  return flops_lib.mfu(flops_per_second, str(jax.devices()[0].device_kind), num_devices)


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, loaded without PyTorch. tensorboardX imports torch when it is
  installed, only to accept torch tensors; this program logs floats, and that import costs more CPU
  than the rest of a tiny run's start-up. Unless torch or tensorboardX is loaded already, `import
  torch` fails while tensorboardX loads (a None entry in `sys.modules`, which tensorboardX's
  optional import catches), and the entry is removed afterwards, so a later `import torch` works."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None
    try:
      import tensorboardX  # noqa: F401
    finally:
      if "torch" in sys.modules and sys.modules["torch"] is None:
        del sys.modules["torch"]
  from tensorboardX import SummaryWriter  # pure-Python TensorBoard event writer (no TensorFlow)

  return SummaryWriter


class MetricWriter:
  """Writes each logged step's metrics, with the pairs, FLOPs and MFU per second since the last record.

  num_devices: the devices the step runs on (the denominator of MFU).
  """

  def __init__(self, workdir: str, stage: str, total_steps: int, *, progress: bool = True, num_devices: int = 1):
    SummaryWriter = _summary_writer_class()
    self.stage = stage
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self.tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard", stage))
    self.bar = None
    if progress:
      from tqdm import tqdm

      self.bar = tqdm(total=total_steps, desc=stage, dynamic_ncols=True, leave=True)
    self._t = time.perf_counter()
    self._last_step = None
    self.num_devices = int(num_devices)
    self._flops = 0.0

  def add_flops(self, step_flops: float) -> None:
    """Counts one step's processed FLOPs (`step_flops_fn`) towards the next record's `flops_per_second`."""
    self._flops += float(step_flops)

  def write(self, step: int, metrics: Mapping[str, object], *, pairs: Optional[int] = None) -> dict:
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
    now = time.perf_counter()
    if self._last_step is not None:
      elapsed = max(now - self._t, 1e-9)
      if pairs is not None:
        host["pairs_per_second"] = pairs * (step - self._last_step) / elapsed
      if self._flops:
        host["flops_per_second"] = self._flops / elapsed
        utilisation = mfu(host["flops_per_second"], self.num_devices)
        if utilisation is not None:
          host["mfu"] = utilisation
    self._t, self._last_step, self._flops = now, step, 0.0
    rec = {"stage": self.stage, "step": int(step), **host}
    self.jsonl.write(json.dumps(rec) + "\n")
    self.jsonl.flush()
    for k, v in host.items():
      if np.isfinite(v):
        self.tb.add_scalar(f"{self.stage}/{k}", v, int(step))
    if self.bar is not None:
      self.bar.n = int(step)
      shown = {k: host[k] for k in ("loss", "rewards/accuracy", "pairs_per_second") if k in host}
      self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in shown.items()}, refresh=True)
    return rec

  def close(self):
    self.jsonl.close()
    self.tb.close()
    if self.bar is not None:
      self.bar.close()


def read_jsonl(path: str):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def drop_after(workdir: str, stage: str, step: int) -> int:
  """Removes the records of `stage` after `step` from `<workdir>/metrics.jsonl` (a resumed run
  redoes those steps and logs them again); returns how many were removed. The file is rewritten
  under a temporary name and renamed into place, so a kill leaves either version whole."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  keep = [line for line in lines if not (json.loads(line).get("stage") == stage and json.loads(line)["step"] > step)]
  if len(keep) < len(lines):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)
  return len(lines) - len(keep)


class NullWriter:
  """The writer of processes other than 0 in a multi-process run: writes nothing."""

  def add_flops(self, step_flops):
    del step_flops

  def write(self, step, metrics, *, pairs=None):
    del step, metrics, pairs
    return {}

  def close(self):
    pass
