"""Diffusion-DRO on the image world: a hinge ranking of an expert image over the model's own sample.

    python -m experiments.main --config=configs/diffusion_dro.py --workdir=/tmp/pofx_diffusion_dro

"Ranking-based Preference Optimization for Diffusion Models from Implicit User Feedback",
arXiv:2510.18353 (`pofx.losses` "diffusion_dro": `max(0, m - 2 rho)`, margin 0.001 as the
authors' code). The chosen (expert) image is a training digit of the prompt's class, the
rejected one a sample of the base (`data.pairing="data_vs_sample"`; the authors sample the
current model into a replay buffer, here the base's samples are drawn once).

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

import ml_collections

from configs import diffusion_dpo


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.train.loss = "diffusion_dro"
  c.train.loss_hyper = ml_collections.ConfigDict(dict(margin=0.001))
  c.data.pairing = "data_vs_sample"
  return diffusion_dpo.finish(c, arg)
