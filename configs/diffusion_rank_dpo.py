"""RankDPO on the image world: DCG-weighted Diffusion-DPO over every ordered pair of a ranked list.

    python -m experiments.main --config=configs/diffusion_rank_dpo.py --workdir=/tmp/pofx_diffusion_rank_dpo

Karthik et al. 2024, "Scalable Ranked Preference Optimization for Text-to-Image Generation",
arXiv:2410.18013, Algorithms 1-2 and Figure 2 (`pofx.losses` "rank_dpo"). Per class prompt the base
draws K = `data.list_size` = 4 images (`data.record="lists"`); every pair of a list gets one
Bradley-Terry label on the gold reward, and each image's label probability phi is the share of the
other K - 1 it beats (Algorithm 1 with the world's labeller as the one reward model). The train
step scores the K images of a list under one timestep and noise (`train.logps="lists"`), and the
loss weights each pair (i above j) by |2^phi_i - 2^phi_j| |1/log(1 + p_i) - 1/log(1 + p_j)| at the
model's predicted positions p (the defaults of `rank_dpo`; `loss_hyper.ranking="labels"` and
`loss_hyper.discount="difference"` are the other readings of the text, docs/methods.md). beta 5000
gives each pair Diffusion-DPO's logit. A batch holds 32 lists (128 images, as diffusion_dpo's 64
pairs).

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests: lists of 3).
"""

import ml_collections

from configs import diffusion_dpo


def tiny(c):
  diffusion_dpo.tiny(c)
  c.data.list_size = 3
  return c


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.data.record = "lists"
  c.data.list_size = 4
  c.train.logps = "lists"
  c.train.loss = "rank_dpo"
  c.train.batch_size = 32
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=5000.0, ranking="predicted", discount="inverse"))
  return diffusion_dpo.finish(c, arg, tiny=tiny)
