"""DPO with multi-sample dropout (Inoue 2019, arXiv:1905.09788).

    python -m experiments.main --config=configs/msd.py --workdir=/tmp/pofx_msd

The policy trains with residual dropout (`pofx.models.LlamaConfig.dropout`, rate 0.1) and the
DPO loss is averaged over 4 dropout masks per step (`pofx.train.make_train_step(dropout_samples=4)`):
4 policy forward-backward passes per step. The reference log-probs, the SFT stage and the
evaluation use no dropout. Rate and sample count are choices for this small model, not the
paper's image-classifier settings. `:tiny` uses 2 masks.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  c.train.dropout.rate, c.train.dropout.samples = 0.1, 4
  _shrink.apply(c, arg)
  if arg == "tiny":
    c.train.dropout.samples = 2
  c.lock()
  return c
