"""Online DPO on the controlled world: fresh samples from the current policy every step, labelled by
the gold reward, best-vs-worst pairs, DPO against the SFT base (experiments/loops.py).

    python -m experiments.main --config=configs/online_dpo.py --workdir=/tmp/pofx_online

Each step samples `loop.samples_per_prompt` completions for `train.batch_size` prompts (one pair
per prompt); `--config.loop.steps_per_round=N` samples every N steps instead.
"""

from configs import _loops, common


def _tiny(c):
  c.loop.rounds, c.loop.steps_per_round, c.loop.prompts_per_round, c.loop.samples_per_prompt = 4, 1, 8, 2


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.loss_hyper.beta = "dpo", 0.1
  c.train.reference.kind = "frozen"
  c.loop.kind, c.loop.labeller, c.loop.pairing, c.loop.reference = "online", "gold", "best_worst", "keep"
  c.loop.rounds, c.loop.steps_per_round, c.loop.prompts_per_round, c.loop.samples_per_prompt = 300, 1, 64, 2
  c = _loops.finish(c, arg)
  if "tiny" in (arg or "").split(","):
    _tiny(c)
    c.train.steps = c.loop.rounds * c.loop.steps_per_round
  return c
