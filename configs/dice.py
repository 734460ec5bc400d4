"""DICE on the controlled world (Chen et al. 2024, arXiv:2406.09760): DPO on the stage-2 pairs
(round 0), then rounds that label the policy's own samples with its DPO implicit reward against
the SFT base, length-regularised (alpha by DICE's search), best-vs-worst pairs, half of each batch
replayed from earlier rounds (experiments/loops.py).

    python -m experiments.main --config=configs/dice.py --workdir=/tmp/pofx_dice
"""

from configs import _loops, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.loss_hyper.beta = "dpo", 0.1
  c.train.reference.kind = "frozen"
  c.loop.kind, c.loop.labeller, c.loop.pairing, c.loop.reference = "iterative", "implicit", "best_worst", "keep"
  c.loop.offline_first, c.loop.replay = True, 0.5
  c.loop.rounds, c.loop.steps_per_round, c.loop.prompts_per_round, c.loop.samples_per_prompt = 3, 100, 512, 8
  return _loops.finish(c, arg)
