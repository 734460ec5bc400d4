"""TR-DPO (reference synced to the policy) on the controlled world.

    python -m experiments.main --config=configs/trdpo.py[:hard] --workdir=/tmp/pofx_trdpo

Soft update ref <- 0.6 policy + 0.4 ref every 50 steps (TRL's alpha; tau scaled to this short
run), or `:hard` (alpha 1, copy every 100 steps). Gorbatovski et al. 2024, arXiv:2404.09656.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "synced"
  c.train.reference.alpha, c.train.reference.tau = 0.6, 50
  parts = (arg or "").split(",")
  if "hard" in parts:
    c.train.reference.alpha, c.train.reference.tau = 1.0, 100
  _shrink.apply(c, ",".join(p for p in parts if p != "hard"), allowed=("", "tiny", "hard", "hard,tiny"))
  c.lock()
  return c
