"""Iterative DPO on the controlled world: rounds of sample -> gold label -> best-vs-worst pairs ->
DPO, the reference refreshed to the previous round's policy (experiments/loops.py).

    python -m experiments.main --config=configs/iterative_dpo.py --workdir=/tmp/pofx_iterative

Args (comma-separated): `tiny`; `irpo` (IRPO's DPO + NLL loss, Pang et al. 2024,
arXiv:2404.19733, alpha 1); `ilr_dpo` (iLR-DPO's length margin, arXiv:2406.11817, with an
illustrative alpha of 0.01 per token: the paper's value could not be read); `keep` (the reference
stays the SFT base).
"""

from configs import _loops, common


def _irpo(c):
  c.train.loss = "irpo"
  c.train.loss_hyper.alpha = 1.0


def _ilr(c):
  c.train.loss = "ilr_dpo"
  c.train.loss_hyper.alpha = 0.01


def _keep(c):
  c.loop.reference = "keep"


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.loss_hyper.beta = "dpo", 0.1
  c.train.reference.kind = "frozen"
  c.loop.kind, c.loop.labeller, c.loop.pairing, c.loop.reference = "iterative", "gold", "best_worst", "refresh"
  c.loop.rounds, c.loop.steps_per_round, c.loop.prompts_per_round, c.loop.samples_per_prompt = 3, 100, 512, 4
  return _loops.finish(c, arg, {"irpo": _irpo, "ilr_dpo": _ilr, "keep": _keep})
