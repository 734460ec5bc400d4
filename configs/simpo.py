"""SimPO (reference-free, length-normalised, target margin) on the controlled world.

    python -m experiments.main --config=configs/simpo.py --workdir=/tmp/pofx_simpo

beta 2.0 and gamma/beta 0.25 (the official config's defaults; Meng et al. 2024, arXiv:2405.14734).
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "simpo"
  c.train.loss_hyper = {"beta": 2.0, "gamma_beta_ratio": 0.25}
  c.train.reference.kind = "none"
  _shrink.apply(c, arg)
  c.lock()
  return c
