"""Diffusion-KTO on the image world: binary feedback per image instead of pairs' preferences.

    python -m experiments.main --config=configs/diffusion_kto.py --workdir=/tmp/pofx_diffusion_kto

Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility", arXiv:2404.04465
(`pofx.losses` "diffusion_kto": the sigmoid utility of each image's implicit reward against the
batch's clamped mean). The pairs of configs/diffusion_dpo.py are reused as images; each image's
label is the world's binary feedback on its gold reward (`train.scores="binary"`: desirable with
probability sigmoid(label_scale * (r* - median r*))). beta is the authors' 1000.

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

import ml_collections

from configs import diffusion_dpo


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.train.loss = "diffusion_kto"
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=1000.0))
  c.train.scores = "binary"
  return diffusion_dpo.finish(c, arg)
