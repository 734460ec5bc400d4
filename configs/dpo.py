"""DPO on the controlled preference world: the embedded default (README command 1).

    python -m experiments.main --config=configs/dpo.py --workdir=/tmp/pofx_dpo

SFT base policy -> preference pairs sampled from it and labelled by Bradley-Terry on the gold
reward -> DPO with a cached reference -> evaluation against the base (gold reward, win rate with a
95% interval, KL to the base, reward and ranking accuracy). `:tiny` shrinks every stage for tests.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.loss_hyper.beta = 0.1
  c.train.reference.kind = "cached"
  _shrink.apply(c, arg)
  c.lock()
  return c
