"""Study 6, reference strategies and weight perturbations against plain DPO.

    python -m experiments.study references --workdir=/tmp/pofx_studies     (3 seeds: table, chart)
    python -m experiments.main --config=configs/study_references.py --workdir=/tmp/run   (one seed)

From one SFT base and dataset, DPO (beta 0.1, cached SFT reference) and, changing one thing each:
Pre-DPO (Pan et al. 2025, arXiv:2504.15843: the finished DPO policy as the reference of a second
DPO run from the SFT base), MRPO (Le et al. 2024, arXiv:2405.16388: a second, independently
trained SFT model as a second reference, adaptive weights), TR-DPO (Gorbatovski et al. 2024,
arXiv:2404.09656: soft update alpha 0.6 every 50 steps), SAM (Foret et al. 2021,
arXiv:2010.01412: rho 0.05) and AWP (Wu et al. 2020, arXiv:2004.05884: gamma 0.01). The study
reports the held-out gold reward and the sharpness of each final policy: the largest increase of
the held-out DPO loss (against the SFT reference) within an L2 ball of radius `SHARPNESS_RHO`
around its parameters, found by 10 steps of projected gradient ascent
(`pofx.evaluation.sharpness`). `:tiny` trains DPO.
"""

from configs import _study, common

SHARPNESS_RHO = 0.5
SHARPNESS_STEPS = 10


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.reference.kind = "dpo", "cached"
  _study.sized(c, arg, steps=200)
  dpo = {"beta": 0.1}
  c.sweep = (
    _study.member("dpo", "dpo", dpo),
    _study.member(
      "pre_dpo",
      "dpo",
      dpo,
      reference="guiding",
      **{"train.reference.guide_checkpoint": "{workdir}/sweep/dpo/final_params"},
    ),
    _study.member("mrpo", "dpo", dpo, reference="multi"),
    _study.member(
      "tr_dpo", "dpo", dpo, reference="synced", **{"train.reference.alpha": 0.6, "train.reference.tau": 50}
    ),
    _study.member("sam", "dpo", dpo, **{"train.perturbation.kind": "sam", "train.perturbation.rho": 0.05}),
    _study.member("awp", "dpo", dpo, **{"train.perturbation.kind": "awp", "train.perturbation.gamma": 0.01}),
  )
  if (
    arg == "tiny"
  ):  # the table and sharpness mechanics (every strategy and perturbation runs in tests/test_experiments.py)
    c.sweep = c.sweep[:1]
  c.lock()
  return c
