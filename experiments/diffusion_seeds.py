"""Runs an image-domain config for several seeds and tabulates them (docs/diffusion.md's table).

    python -m experiments.diffusion_seeds --config=configs/diffusion_dpo.py --workdir=/tmp/dpo_seeds --seeds=0,1,2,3,4

Each seed runs the whole pipeline (`experiments.diffusion.run`) in `<workdir>/seed_<s>`, one
after the other in this process (a seed's wall time includes the compilations it could not reuse
from an earlier one), with `--config.seed=<s>`; any other `--config.a.b=value` applies to all.
Writes `<workdir>/seeds.json` (each seed's summary metrics and wall time) and prints a Markdown
table: gold reward of the base and the policy, win rate against the base with its 95% Wilson
interval, class accuracy, diversity, Fréchet distance, seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from configs import validate as config_validation
from experiments import diffusion

_CONFIG = config_flags.DEFINE_config_file("config", None, "An image-domain config (configs/diffusion_*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the seeds' workdirs.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2,3,4", "Comma-separated seeds.")
_PROGRESS = flags.DEFINE_bool("progress", False, "Show progress bars.")

COLUMNS = (
  ("gold_reward_base", "gold base"),
  ("gold_reward_policy", "gold policy"),
  ("win_rate_vs_base", "win rate"),
  ("class_accuracy_base", "acc base"),
  ("class_accuracy_policy", "acc policy"),
  ("diversity_base", "div base"),
  ("diversity_policy", "div policy"),
  ("frechet_base", "FD base"),
  ("frechet_policy", "FD policy"),
)


def markdown(rows) -> str:
  """The seeds table: one row per seed, the win rate with its interval, the wall time."""
  head = ["seed"] + [name for _, name in COLUMNS] + ["95% interval", "seconds"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [str(r["seed"])] + [f"{r[k]:.3f}" for k, _ in COLUMNS]
    cells += [f"[{r['win_rate_ci95_low']:.3f}, {r['win_rate_ci95_high']:.3f}]", f"{r['seconds']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required.")
  seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
  rows = []
  for seed in seeds:
    c = config.copy_and_resolve_references()
    c.unlock()
    c.seed = seed
    try:
      config_validation.validate(c)
    except ValueError as e:
      print(f"experiments.diffusion_seeds: {e}", file=sys.stderr)
      sys.exit(2)
    start = time.perf_counter()
    summary = diffusion.run(c, os.path.join(_WORKDIR.value, f"seed_{seed}"), progress=_PROGRESS.value)
    row = {"seed": seed, "seconds": time.perf_counter() - start}
    row.update({k: summary[k] for k, _ in COLUMNS + (("win_rate_ci95_low", ""), ("win_rate_ci95_high", ""))})
    row.update({k: summary[k] for k in summary if k.endswith("_seconds")})
    rows.append(row)
    print(f"seed {seed}: win rate {row['win_rate_vs_base']:.3f} in {row['seconds']:.0f} s", flush=True)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "seeds.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(markdown(rows))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
