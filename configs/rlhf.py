"""The RLHF baseline on the controlled world: RLOO (Ahmadian et al. 2024, arXiv:2402.14740) on the
gold reward with a KL penalty to the SFT base (experiments/loops.py).

    python -m experiments.main --config=configs/rlhf.py --workdir=/tmp/pofx_rlhf

Args: `tiny`; `reinforce` (REINFORCE with the running-mean baseline instead of RLOO).
"""

from configs import _loops, common


def _reinforce(c):
  c.loop.estimator = "reinforce"


def get_config(arg=None):
  c = common.base_config()
  c.loop.kind, c.loop.labeller, c.loop.estimator, c.loop.kl_coef = "rlhf", "gold", "rloo", 0.05
  c.loop.rounds, c.loop.steps_per_round, c.loop.prompts_per_round, c.loop.samples_per_prompt = 3, 100, 32, 4
  return _loops.finish(c, arg, {"reinforce": _reinforce})
