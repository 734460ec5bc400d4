"""DPO with sharpness-aware minimisation (`:asam` for the adaptive variant).

    python -m experiments.main --config=configs/sam.py[:asam] --workdir=/tmp/pofx_sam

rho 0.05 (SAM; Foret et al. 2021, arXiv:2010.01412) or rho 0.5 with ASAM (Kwon et al. 2021; as
the authors' asam.py: biases unscaled, eta 0.01). `--config.train.perturbation.m=8` is
m-sharpness: one ascent per 8 pairs (Foret et al.'s m, examples per ascent), the SAM gradients
of the batch's subsets averaged.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  c.train.perturbation.kind = "sam"
  c.train.perturbation.rho = 0.05
  parts = (arg or "").split(",")
  if "asam" in parts:
    c.train.perturbation.adaptive, c.train.perturbation.rho = True, 0.5
  _shrink.apply(c, ",".join(p for p in parts if p != "asam"), allowed=("", "tiny", "asam", "asam,tiny"))
  c.lock()
  return c
