"""GPO's controlled experiment: the six GPO functions across a beta sweep, on one reward-vs-KL chart.

    python -m experiments.main --config=configs/gpo.py --workdir=/tmp/pofx_gpo

One shared SFT base and preference dataset; then, for each f in (logistic, hinge, squared,
exponential, truncated_quadratic, savage) and each beta in `betas`, a `gpo` training run and its
evaluation in <workdir>/sweep/<f>_b<beta>. `<workdir>/reward_vs_kl.png` is the chart (Tang et al.
2024, arXiv:2402.05749, Fig. 2 style: gold reward against KL(policy || base), one line per f).
18 trainings: about 5 minutes on 2 CPU cores. `:tiny` runs one beta of every f for a few steps
(and draws the sweep's chart only, `sweep_member_charts=False`).
"""

from configs import _shrink, common

FUNCTIONS = ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "gpo"
  c.train.loss_hyper = {"f": "logistic", "beta": 0.1}
  c.train.reference.kind = "cached"
  c.train.steps = 200
  betas = (0.03, 0.1, 0.3)
  if arg == "tiny":
    betas = (0.3,)
  _shrink.apply(c, arg)
  if arg == "tiny":  # the sweep's reward-vs-KL chart only, no training-curve chart per member
    c.sweep_member_charts = False
  c.sweep = tuple(
    {"label": f"{f}_b{b:g}", "group": f, "beta": b, "overrides": {"train.loss_hyper.f": f, "train.loss_hyper.beta": b}}
    for f in FUNCTIONS
    for b in betas
  )
  c.lock()
  return c
