"""Reg-DPO on the image world: Diffusion-DPO plus the denoising loss of the winner.

    python -m experiments.main --config=configs/diffusion_reg_dpo.py --workdir=/tmp/pofx_diffusion_reg_dpo

Du et al. 2025, arXiv:2511.01450 (`pofx.losses` "reg_dpo": `-log sigmoid(beta * rho) + lam * e_w`).
Its GT-pairs: the chosen image is a training digit of the prompt's class, the rejected one a
sample of the base (`data.pairing="data_vs_sample"`). The weight lam is not published; 1.0 here.

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

import ml_collections

from configs import diffusion_dpo


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.train.loss = "reg_dpo"
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=5000.0, lam=1.0))
  c.data.pairing = "data_vs_sample"
  return diffusion_dpo.finish(c, arg)
