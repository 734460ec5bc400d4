"""Study 4, ranking accuracy: trained policies against the idealized ranking accuracy (Chen et al. 2024).

    python -m experiments.study ranking --workdir=/tmp/pofx_studies        (3 seeds: table, chart)
    python -m experiments.main --config=configs/study_ranking.py --workdir=/tmp/run   (one seed)

From one SFT base and dataset: DPO at beta 0.03, 0.1 and 0.3. On held-out pairs
the evaluation reports the policy's ranking accuracy, the reference's, the idealized ranking
accuracy of the exact DPO optimum at the run's beta (arXiv:2405.19534, Sec. 3, with the world's
true preference probabilities), and the fraction of pairs whose ranking differs from the
reference's. `:tiny` trains DPO at beta 0.1.
"""

from configs import _study, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.reference.kind = "dpo", "cached"
  _study.sized(c, arg, steps=200)
  c.sweep = (
    _study.member("dpo_b0.03", "dpo", {"beta": 0.03}),
    _study.member("dpo_b0.1", "dpo", {"beta": 0.1}),
    _study.member("dpo_b0.3", "dpo", {"beta": 0.3}),
  )
  if arg == "tiny":
    c.sweep = c.sweep[1:2]
  c.lock()
  return c
