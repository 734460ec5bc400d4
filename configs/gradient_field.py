"""DPO with the gradient-field diagnostic logged every step (Feng et al. 2024, arXiv:2404.04626).

    python -m experiments.main --config=configs/gradient_field.py --workdir=/tmp/pofx_gradient_field

`train.gradient_field=True` (any config can set it): metrics.jsonl and TensorBoard get
`gradient_field/chosen`, `gradient_field/rejected` (mean dl/d log pi(y_w|x), dl/d log pi(y_l|x)),
`gradient_field/ratio` (their mean magnitudes' ratio) and `gradient_field/log_prob_ratio` (mean
log(|dl/dpi_w| / |dl/dpi_l|)): see `pofx.evaluation.gradient_field`. Training is unchanged.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  c.train.gradient_field = True
  _shrink.apply(c, arg)
  c.lock()
  return c
