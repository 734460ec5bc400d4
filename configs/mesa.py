"""DPO with MESA's trajectory loss against an EMA of the weights (Du et al. 2022, arXiv:2205.14083).

    python -m experiments.main --config=configs/mesa.py --workdir=/tmp/pofx_mesa

`pofx.perturbations.mesa`: lam T^2 KL(softmax(z_ema / T) || softmax(z / T)) on each pair's two
policy log-probs, z_ema those of the exponential moving average of the weights (one extra
forward per step). lam 0.8 and T 5 are the authors' MESA settings; their decay 0.9998 averages
over about 5000 steps, longer than this 300-step run, so the EMA here uses 0.99 (about 100 steps),
and the term is on from epoch 1 (the authors start after epoch 5 of 90). `:tiny` turns it on at
once (start_epoch -1).
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  p = c.train.perturbation
  p.kind, p.lam, p.temperature, p.decay, p.start_epoch = "mesa", 0.8, 5.0, 0.99, 0
  _shrink.apply(c, arg)
  if arg == "tiny":
    p.start_epoch = -1
  c.lock()
  return c
