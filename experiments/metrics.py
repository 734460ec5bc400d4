"""Metric sinks of a run: `metrics.jsonl`, TensorBoard event files, and a live progress bar.

Metrics arrive as device arrays; they are fetched (one host sync) only when logged.
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping, Optional

import jax
import numpy as np


class MetricWriter:
  def __init__(self, workdir: str, stage: str, total_steps: int, *, progress: bool = True):
    from tensorboardX import SummaryWriter  # pure-Python TensorBoard event writer (no TensorFlow)
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

  def write(self, step: int, metrics: Mapping[str, object], *, pairs: Optional[int] = None) -> dict:
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
    now = time.perf_counter()
    if pairs is not None and self._last_step is not None:
      host["pairs_per_second"] = pairs * (step - self._last_step) / max(now - self._t, 1e-9)
    self._t, self._last_step = now, step
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


class NullWriter:
  """The writer of processes other than 0 in a multi-process run: writes nothing."""

  def write(self, step, metrics, *, pairs=None):
    del step, metrics, pairs
    return {}

  def close(self):
    pass
