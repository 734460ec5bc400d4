"""MRPO (two references) on the controlled world.

    python -m experiments.main --config=configs/mrpo.py --workdir=/tmp/pofx_mrpo

The primary reference is the SFT base; the second is an independently trained SFT model (another
seed). Both are cached; they are combined per pair as in the authors' code (Le et al. 2024,
arXiv:2405.16388): adaptive weights per pair (`mrpo_alpha=None`) and the clipped trust region
eta = 0.1.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "multi"
  c.train.reference.eta = 0.1
  c.train.reference.mrpo_alpha = None  # adaptive per pair (MRPO's ARWC weights)
  _shrink.apply(c, arg)
  c.lock()
  return c
