"""Study 1, likelihood displacement: DPO lowers the chosen log-probs; DPOP and RPO keep them up.

    python -m experiments.study likelihood --workdir=/tmp/pofx_studies     (3 seeds: table, chart)
    python -m experiments.main --config=configs/study_likelihood.py --workdir=/tmp/run   (one seed)

From one SFT base and dataset: DPO (beta 0.1), DPOP (Pal et al. 2024, arXiv:2402.13228, Eq. 3;
lambda 50, its value in the paper) and RPO (Liu et al. 2024, arXiv:2405.16436: DPO plus the
chosen completions' token-mean NLL, eta 0.2, the authors' OpenRLHF setting). The evaluation
reports the mean log-ratio log pi(y_w) - log ref(y_w) of the chosen completions, of the rejected
ones and their margin, on training and held-out pairs. `:tiny` trains DPO and DPOP.
"""

from configs import _study, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.reference.kind = "dpo", "cached"
  _study.sized(c, arg, steps=200, tiny_steps=12)
  c.sweep = (
    _study.member("dpo", "dpo", {"beta": 0.1}),
    _study.member("dpop", "dpop", {"beta": 0.1, "lam": 50.0}),
    _study.member("rpo", "rpo", {"beta": 0.1, "eta": 0.2, "sft_form": "mean"}),
  )
  if arg == "tiny":  # the direction the tests assert: DPO against DPOP
    c.sweep = c.sweep[:2]
  c.lock()
  return c
