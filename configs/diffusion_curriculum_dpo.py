"""Curriculum DPO on the image world: Diffusion-DPO on pairs ordered from easy to hard.

    python -m experiments.main --config=configs/diffusion_curriculum_dpo.py --workdir=/tmp/pofx_diffusion_curriculum_dpo

Croitoru et al. 2025, "Curriculum Direct Preference Optimization for Diffusion and Consistency
Models", arXiv:2405.13637; code CroitoruAlin/Curriculum-DPO. Per prompt, K samples of the base are
scored by a reward model (here the gold reward) and every pair whose score gap exceeds a keep
threshold becomes a training pair, the higher-scored image chosen (`data.record="curriculum"`,
`pofx.diffusion.methods.curriculum_pairs`). The gaps are split into `groups` bands by
`linspace(min gap, max gap, groups)`; training starts on the band of the largest gaps (the
easiest pairs) and adds the next harder band every `update_every` steps until every pair is used
(`curriculum_stage`, `curriculum_mask`). The loss is Diffusion-DPO's.

The authors' values: 5 groups, one stage every 500 steps, keep threshold 0.1 on their reward
models' scales (0.02 for the human score, 0.2 for the aesthetic one). Here: 5 groups, one stage
every 60 of the 300 steps (so the last stage, every pair, starts at step 180), K = 4 samples per
prompt, and a keep threshold of 0.01 on the gold reward (at seed 0, 11,515 of the 6 x 2048 =
12,288 pairs of a prompt's samples pass it, with a mean gap of 0.12: docs/diffusion.md).

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

from configs import diffusion_dpo


def tiny(c):
  diffusion_dpo.tiny(c)
  c.train.curriculum.update_every = 2  # stages 0, 1 in the 4 tiny steps
  return c


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.data.record = "curriculum"
  c.data.list_size = 4
  c.data.curriculum_keep_threshold = 0.01
  c.train.curriculum.groups = 5
  c.train.curriculum.update_every = 60
  return diffusion_dpo.finish(c, arg, tiny=tiny)
