"""DPO with adversarial weight perturbation (gamma 0.01; Wu et al. 2020, arXiv:2004.05884).

python -m experiments.main --config=configs/awp.py --workdir=/tmp/pofx_awp
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  c.train.perturbation.kind = "awp"
  c.train.perturbation.gamma = 0.01
  _shrink.apply(c, arg)
  c.lock()
  return c
