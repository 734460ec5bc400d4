"""PNG plots of a run: training curves, and gold reward against KL to the base policy."""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(records: Sequence[Mapping], path: str, keys=("loss", "rewards/accuracy", "rewards/margins")):
  """One panel per metric over steps, one line per stage."""
  stages = sorted({r["stage"] for r in records})
  keys = [k for k in keys if any(k in r for r in records)]
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for stage in stages:
      pts = [(r["step"], r[key]) for r in records if r["stage"] == stage and key in r]
      if pts:
        ax.plot(*zip(*pts), label=stage)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def reward_vs_kl(points: Iterable[Mapping], path: str, *, base_reward: float, title: str = "gold reward vs KL"):
  """Scatter/lines of (kl_to_base, gold_reward) points, grouped by `label` (e.g. the GPO function).

  Each point: {"label": str, "kl": float, "gold_reward": float, "beta": float (annotated)}.
  """
  points = list(points)
  fig, ax = plt.subplots(figsize=(6.2, 4.4))
  for label in sorted({p["label"] for p in points}):
    pts = sorted((p for p in points if p["label"] == label), key=lambda p: p["kl"])
    ax.plot([p["kl"] for p in pts], [p["gold_reward"] for p in pts], marker="o", label=label)
    for p in pts:
      if "beta" in p:
        ax.annotate(f"{p['beta']:g}", (p["kl"], p["gold_reward"]), fontsize=6, alpha=0.7)
  ax.axhline(base_reward, color="gray", ls="--", lw=1, label="base policy")
  ax.set_xlabel("KL(policy || base)  [nats, Monte Carlo]")
  ax.set_ylabel("mean gold reward")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
