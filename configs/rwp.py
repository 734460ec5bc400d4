"""DPO with robust weight perturbation (gamma 0.01, c_min 1.0, 10 proxy steps; Yu et al. 2022,
arXiv:2205.14826).

    python -m experiments.main --config=configs/rwp.py --workdir=/tmp/pofx_rwp

c_min is the loss-stationary threshold on the per-pair DPO loss: pairs whose loss is below it
drive the weight perturbation. The paper's 1.7 is for cross-entropy on CIFAR; 1.0 here is a
choice, not a published value: the DPO loss is log 2 = 0.693 at zero margin, so a pair stops
driving the perturbation once its implicit reward margin falls below about -0.54. The step costs
about 11 forward-backward passes (10 proxy ascents and the main gradient); `:tiny` uses 2 steps.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  c.train.perturbation.kind = "rwp"
  c.train.perturbation.gamma = 0.01
  c.train.perturbation.c_min = 1.0
  c.train.perturbation.steps = 10
  _shrink.apply(c, arg)
  if arg == "tiny":
    c.train.perturbation.steps = 2
  c.lock()
  return c
