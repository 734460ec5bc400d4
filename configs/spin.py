"""SPIN on the controlled world (Chen et al. 2024, arXiv:2401.01335): each round the policy samples a
completion for the SFT prompts, each demonstration is preferred to the sample, and DPO's logistic
loss trains against the previous round's policy as reference (experiments/loops.py).

    python -m experiments.main --config=configs/spin.py --workdir=/tmp/pofx_spin
"""

from configs import _loops, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.loss_hyper.beta = "dpo", 0.1
  c.train.reference.kind = "frozen"
  c.loop.kind, c.loop.labeller, c.loop.pairing, c.loop.reference = "iterative", "self_play", "best_worst", "refresh"
  c.loop.rounds, c.loop.steps_per_round, c.loop.prompts_per_round, c.loop.samples_per_prompt = 3, 100, 1024, 1
  c = _loops.finish(c, arg)
  # One sample against each demonstration (SPIN), also at :tiny (16 prompts: 16 sampled rows).
  c.loop.samples_per_prompt = 1
  if "tiny" in (arg or "").split(","):
    c.loop.prompts_per_round = 16
  return c
