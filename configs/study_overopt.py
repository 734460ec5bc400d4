"""Study 5, reward over-optimisation: gold reward against sqrt(KL) over DPO training, with best-of-n.

    python -m experiments.study overopt --workdir=/tmp/pofx_studies        (3 seeds: table, chart)
    python -m experiments.main --config=configs/study_overopt.py --workdir=/tmp/run   (one seed)

One DPO run (beta 0.03, learning rate 3e-3: a long way from the base) evaluated at the steps of
`EVAL_STEPS` (each evaluation continues the same run: raising `train.steps` resumes it exactly),
and best-of-n sampling from the SFT base (selection by the gold reward, n = 1..64) on the same
held-out prompts. Gao et al. 2022 (arXiv:2210.10760, Eq. 1 and 2) fit R(d) = d (alpha - beta log d)
to RL and R(d) = d (alpha - beta d) to best-of-n, d = sqrt(KL); the study fits both forms.
"""

from configs import _study, common

EVAL_STEPS = (25, 50, 100, 200, 400)
TINY_EVAL_STEPS = (2, 4)
BEST_OF_N = (1, 2, 4, 8, 16, 32, 64)
TINY_BEST_OF_N = (1, 2, 4)


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.reference.kind = "dpo", "cached"
  c.train.loss_hyper.beta = 0.03
  c.train.optimizer.learning_rate = 3e-3
  _study.sized(c, arg, steps=EVAL_STEPS[-1])
  c.lock()
  return c
