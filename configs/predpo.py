"""Pre-DPO, both rounds: DPO -> guide; then DPO again from the SFT base with the guide as reference.

    python -m experiments.main --config=configs/predpo.py --workdir=/tmp/pofx_predpo

Round 1 (<workdir>/sweep/round1) trains DPO against the SFT reference; round 2
(<workdir>/sweep/round2) resets the policy to the SFT base and trains DPO against round 1's final
policy as a frozen guiding reference (Pan et al. 2025, arXiv:2504.15843). Both share the SFT and
data stages; the chart puts both rounds on the reward-vs-KL plane.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  _shrink.apply(c, arg)
  c.sweep = (
    {"label": "round1", "overrides": {"train.reference.kind": "cached"}},
    {
      "label": "round2",
      "overrides": {
        "train.reference.kind": "guiding",
        "train.reference.guide_checkpoint": "{workdir}/sweep/round1/final_params",
      },
    },
  )
  c.lock()
  return c
