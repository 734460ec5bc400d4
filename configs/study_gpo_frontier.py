"""Study 3, the GPO frontier: six GPO functions over seven betas (Tang et al. 2024, arXiv:2402.05749).

    python -m experiments.study gpo_frontier --workdir=/tmp/pofx_studies   (3 seeds: table, chart)
    python -m experiments.main --config=configs/study_gpo_frontier.py --workdir=/tmp/run   (one seed)

From one SFT base and dataset, a `gpo` training for every f in `configs.gpo.FUNCTIONS` and every
beta in `BETAS`. GPO (Sec. 4) predicts that the best beta of f scales as |f'(0)| / f''(0): logistic
and Savage (f''(0)/|f'(0)| = 0.5) at about twice the best beta of squared, exponential and truncated
quadratic (ratio 1); hinge has f''(0) = 0 and no prediction. `:tiny` trains logistic at one beta.
"""

from configs import _study, common
from configs.gpo import FUNCTIONS

BETAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
TINY_FUNCTIONS = ("logistic",)  # every f runs in tests/test_gpo.py


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.reference.kind = "gpo", "cached"
  c.train.loss_hyper = {"f": "logistic", "beta": 0.1}
  _study.sized(c, arg, steps=100)
  if arg != "tiny":  # 42 trainings per seed: a smaller evaluation
    c.eval.num_prompts = 256
  functions, betas = (TINY_FUNCTIONS, (0.3,)) if arg == "tiny" else (FUNCTIONS, BETAS)
  c.sweep = tuple(
    {"label": f"{f}_b{b:g}", "group": f, "beta": b, "overrides": {"train.loss_hyper": {"f": f, "beta": b}}}
    for f in functions
    for b in betas
  )
  c.lock()
  return c
