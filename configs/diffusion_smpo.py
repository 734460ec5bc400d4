"""SmPO-Diffusion on the image world: Diffusion-DPO with a smoothed preference strength from the scores.

    python -m experiments.main --config=configs/diffusion_smpo.py --workdir=/tmp/pofx_diffusion_smpo

Lu et al. 2025, arXiv:2506.02698, Eq. 9 (`pofx.losses` "smpo": `-log sigmoid(beta * gamma *
(2p - 1) * rho)` with `p = sigmoid((s_w - s_l) / score_range)`). The scores are the images' gold
rewards (`train.scores="reward"`); score_range = 1 / world.label_scale = 0.25 makes p the world
labeller's own Bradley-Terry probability. beta 5000 and gamma 10 are the authors'.

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

import ml_collections

from configs import diffusion_dpo


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.train.loss = "smpo"
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=5000.0, gamma=10.0, score_range=0.25))
  c.train.scores = "reward"
  return diffusion_dpo.finish(c, arg)
