"""RPO (DPO plus the cumulative SFT loss on the chosen completion) on the controlled world.

    python -m experiments.main --config=configs/rpo.py --workdir=/tmp/pofx_rpo

The paper's main form (Liu et al. 2024, arXiv:2405.16436: `L = -log sigmoid(beta rho) - eta beta
pi_w`, summed chosen log-prob) with the values of the authors' published zephyr-7b-beta run (code
YSLIU627/Regularized-Preference-Optimization, `alignment-handbook/recipes/zephyr-7b-beta/rpo/
config_full.yaml`): eta 0.005 and beta 0.01, where `pofx.losses.rpo`'s default beta is DPO's 0.1.
Their zephyr-7b-gemma run uses eta 0.005 with beta 0.05; their OpenRLHF runs of the averaged form
(`sft_form="mean"`) use eta 0.2 with beta 0.5.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "rpo"
  c.train.loss_hyper = {"eta": 0.005, "beta": 0.01, "sft_form": "sum"}
  c.train.reference.kind = "cached"
  _shrink.apply(c, arg)
  c.lock()
  return c
