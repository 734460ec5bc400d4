"""beta-DPO (batch-adaptive beta with the Gaussian data filter) on the controlled world.

    python -m experiments.main --config=configs/beta_dpo.py --workdir=/tmp/pofx_beta_dpo

beta0 0.1, a 0.6 (the README example of Wu et al. 2024, arXiv:2407.08639); the running margin
statistics live in the train state and are checkpointed with it.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "beta_dpo"
  c.train.loss_hyper = {"beta": 0.1, "a": 0.6}
  c.train.reference.kind = "cached"
  _shrink.apply(c, arg)
  c.lock()
  return c
