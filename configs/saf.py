"""DPO with SAF's trajectory loss (sharpness-aware training for free; Du et al. 2022, arXiv:2205.14083).

    python -m experiments.main --config=configs/saf.py --workdir=/tmp/pofx_saf

`pofx.perturbations.saf`: each pair's two policy log-probs are kept in a memory (in the train
state) for E~ + 1 epochs, and lam T^2 KL(softmax(z_past / T) || softmax(z / T)) against the
outputs of E~ epochs ago is added to the DPO loss from epoch start_epoch + 1 on. lam 0.3 and
T 5 are the authors' ImageNet settings; this run is about 4.7 epochs of the world's pairs, so E~
is 1 and the term starts at epoch 1 (the authors' 2-3 and 5 are for 90-epoch runs). `:tiny`
(a fraction of an epoch) starts the term at once (start_epoch -1: against never-written, uniform
memory slots), so the test exercises it.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  p = c.train.perturbation
  p.kind, p.lam, p.temperature, p.minus_epochs, p.start_epoch = "saf", 0.3, 5.0, 1, 0
  _shrink.apply(c, arg)
  if arg == "tiny":
    p.start_epoch = -1
  c.lock()
  return c
