"""Pre-DPO, both rounds: DPO -> guide; then DPO again from the SFT base with the guide as reference.

    python -m experiments.main --config=configs/predpo.py --workdir=/tmp/pofx_predpo

Round 1 (<workdir>/sweep/round1) trains DPO against the SFT reference with
`train.loss_hyper.beta`; round 2 (<workdir>/sweep/round2) resets the policy to the SFT base and
trains DPO against round 1's final policy as a frozen guiding reference (Pan et al. 2025,
arXiv:2504.15843) with its own beta, `predpo.round2_beta` (`--config.predpo.round2_beta=...`;
round 2's `train.loss_hyper.beta` is set from it). 0.1 is the default of the authors'
`scripts/train_predpo.sh` (code DtYXs/Pre-DPO); their Llama-3.2-3B-Instruct examples use 0.05 in
both rounds with a DPO guide, and 0.1 in round 2 after a SimPO round 1 (beta 2.5). Both rounds
share the SFT and data stages; the chart puts both rounds on the reward-vs-KL plane.
"""

import ml_collections

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  c.predpo = ml_collections.ConfigDict(dict(round2_beta=0.1))
  _shrink.apply(c, arg)
  if arg == "tiny":  # the rounds' reward-vs-KL chart only, no training-curve chart per round
    c.sweep_member_charts = False
  c.sweep = (
    {"label": "round1", "overrides": {"train.reference.kind": "cached"}},
    {
      "label": "round2",
      "overrides": {
        "train.reference.kind": "guiding",
        "train.reference.guide_checkpoint": "{workdir}/sweep/round1/final_params",
        "train.loss_hyper.beta": "{config.predpo.round2_beta}",
      },
    },
  )
  c.lock()
  return c
