"""The newer DPO variants, each trained once on the controlled world, on one reward-vs-KL chart.

    python -m experiments.main --config=configs/new_methods.py --workdir=/tmp/pofx_new_methods

One shared SFT base and preference dataset (`<workdir>/sft_params`, `<workdir>/data`); then one
training run and its evaluation per method in `<workdir>/sweep/<label>`, and
`<workdir>/reward_vs_kl.png` with every method on it. The members (`MEMBERS`, one entry per
method: its label, loss, hyperparameters and reference kind):

- `mipo`: MIPO (Jang 2024, arXiv:2409.17545), beta 20 (the authors' Llama-3 config);
- `ilr_dpo`: iLR-DPO's length-margin DPO (Liu et al. 2024, arXiv:2406.11817), alpha 0.01 per
  token (pofx's choice: the paper's value was not found), beta 0.1;
- `flex_dpo`: Flex-DPO with the SFT term (Yan et al. 2024, arXiv:2406.07327), beta 0.1 on the
  chosen and 0.08 on the rejected log-ratio, SFT weight 0.1 (pofx's choice);
- `madpo`: MADPO (Rho 2025, arXiv:2510.05342) with the world's gold rewards as the reward model's
  scores, the authors' notebook values (beta 0.1, c_max 2, c_min 0.5, lam 1, tau log 999).

All against the cached SFT reference. `:tiny` shrinks every stage (a few training steps per
method). A method is added with one entry in `MEMBERS`.
"""

import math

from configs import _shrink, common

# One entry per method: (label, loss, loss_hyper, reference kind).
MEMBERS = (
  ("mipo", "mipo", {"beta": 20.0}, "cached"),
  ("ilr_dpo", "ilr_dpo", {"alpha": 0.01, "beta": 0.1}, "cached"),
  ("flex_dpo", "flex_dpo", {"beta_chosen": 0.1, "beta_rejected": 0.08, "sft_weight": 0.1}, "cached"),
  (
    "madpo",
    "madpo",
    {"beta": 0.1, "c_max": 2.0, "c_min": 0.5, "lam": 1.0, "tau": math.log(999.0)},
    "cached",
  ),
)


def member(label, loss, hyper, reference="cached"):
  """A sweep entry training `loss` with `hyper` against a `reference` of that kind."""
  return {
    "label": label,
    "group": label,
    "overrides": {"train.loss": loss, "train.loss_hyper": dict(hyper), "train.reference.kind": reference},
  }


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.loss_hyper = {"beta": 0.1}
  c.train.reference.kind = "cached"
  c.train.steps = 200
  _shrink.apply(c, arg)
  c.sweep = tuple(member(*m) for m in MEMBERS)
  c.lock()
  return c
