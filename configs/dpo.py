"""DPO on the controlled preference world: the embedded default (README command 1).

    python -m experiments.main --config=configs/dpo.py --workdir=/tmp/pofx_dpo

SFT base policy -> preference pairs sampled from it and labelled by Bradley-Terry on the gold
reward -> DPO with a cached reference -> evaluation against the base (gold reward, win rate with a
95% interval, KL to the base, reward and ranking accuracy). `:tiny` shrinks every stage for tests.
"""

from configs import common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.loss_hyper.beta = 0.1
  c.train.reference.kind = "cached"
  if arg == "tiny":
    c.sft.num_demos, c.sft.steps = 256, 20
    c.data.num_prompts, c.data.num_eval_pairs = 64, 32
    c.train.steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 4, 8, 2, 2
    c.eval.num_prompts = 16
  elif arg not in (None, ""):
    raise ValueError(f"configs/dpo.py: unknown arg {arg!r}; allowed: '', 'tiny'.")
  c.lock()
  return c
