"""IPO on the controlled world; `:sum` uses the paper's summed log-ratios instead of TRL's averages.

    python -m experiments.main --config=configs/ipo.py[:sum] --workdir=/tmp/pofx_ipo

beta is IPO's tau (TRL's naming); GPO-squared with beta_gpo = 2 tau is the same loss up to a scale.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "ipo"
  c.train.loss_hyper.beta = 0.1
  c.train.reference.kind = "cached"
  parts = (arg or "").split(",")
  if "sum" in parts:
    c.train.loss = "ipo_sum"
    c.train.loss_hyper.beta = 1.0  # summed log-ratios are ~length x larger: a larger tau keeps 1/(2 tau) in range
  _shrink.apply(c, ",".join(p for p in parts if p != "sum"), allowed=("", "tiny", "sum", "sum,tiny"))
  c.lock()
  return c
