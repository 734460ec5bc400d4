"""Curry-DPO on the controlled world: DPO in curriculum stages, easy to hard (Pattnaik et al. 2024,
arXiv:2403.07230; `config.stage = "curriculum"`, `experiments/curriculum.py`).

    python -m experiments.main --config=configs/curry_dpo.py --workdir=/tmp/pofx_curry

The K = data.samples_per_prompt completions the data stage samples per training prompt are rated
by their gold reward; each prompt's best completion is paired with every lower-rated one, and the
pairs are trained in `curriculum.num_stages` stages by the rank of their rating gap (stage 0: best
vs worst), `curriculum.steps_per_stage` DPO steps each, every stage starting from the previous
stage's policy and using it as the (cached) reference. With K = 4 there are 3 ranks, the paper's
three iterations. Each stage starts a fresh optimizer (and its warm-up). `:tiny` shrinks every
stage (2 curriculum stages of 2 steps, 1 warm-up step).
"""

import ml_collections

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.stage = "curriculum"
  c.train.loss = "dpo"
  c.train.loss_hyper.beta = 0.1
  c.train.reference.kind = "cached"
  c.curriculum = ml_collections.ConfigDict(dict(num_stages=3, steps_per_stage=100))
  _shrink.apply(c, arg)
  if arg == "tiny":  # 2 stages (ranks 1 and 2 merged); each stage warms up anew: 1 step, so both steps train
    c.curriculum.num_stages, c.curriculum.steps_per_stage, c.train.optimizer.warmup_steps = 2, 2, 1
  c.lock()
  return c
