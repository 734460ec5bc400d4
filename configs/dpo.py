"""DPO on the controlled preference world: the embedded default (README command 1).

    python -m experiments.main --config=configs/dpo.py --workdir=/tmp/pofx_dpo

SFT base policy -> preference pairs sampled from it and labelled by Bradley-Terry on the gold
reward -> DPO with a cached reference -> evaluation against the base (gold reward, win rate with a
95% interval, KL to the base, reward and ranking accuracy). `:tiny` shrinks every stage for tests.

Pod-sized variants (plan them first: `python -m experiments.plan --config=configs/dpo.py:llama3_8b`):
`:llama3_1b`, `:llama3_8b`, `:llama3_70b` set the Llama 3 preset (bf16 compute, remat), a global
batch of pairs per step, prompt-shared rows of `data.seq_bucket` tokens (prompt + chosen +
rejected; completions up to `data.completion_bucket`), mode "jit" and a default mesh
"<data>x<fsdp>[x<tensor>]" (`train.parallel.mesh`). The learning rates are the small ones usual
for DPO on pretrained models (Tulu 3 used 5e-7 for 8B and 2e-7 for 70B).
"""

from configs import _shrink, common

# arg: (preset, pairs per step, row length, completion length, mesh, learning rate)
POD = {
  "llama3_1b": ("llama3_1b", 64, 2048, 512, "2x4", 1e-6),
  "llama3_8b": ("llama3_8b", 128, 4096, 1024, "16x4", 5e-7),
  "llama3_70b": ("llama3_70b", 128, 4096, 1024, "4x32", 2e-7),
}


def _pod(c, arg):
  preset, pairs, row, completion, mesh, lr = POD[arg]
  c.model.preset, c.model.dtype, c.model.remat = preset, "bfloat16", True
  c.data.layout, c.data.seq_bucket, c.data.completion_bucket = "prompt_shared", row, completion
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = pairs, 500, 10, 100
  c.train.optimizer.learning_rate, c.train.optimizer.warmup_steps = lr, 50
  c.train.parallel.mode, c.train.parallel.mesh = "jit", mesh
  return c


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.loss_hyper.beta = 0.1
  c.train.reference.kind = "cached"
  if arg in POD:
    _pod(c, arg)
  else:
    _shrink.apply(c, arg, allowed=("", "tiny") + tuple(POD))
  c.lock()
  return c
