"""KTO on unpaired binary feedback from the controlled world (TRL's unpaired format).

    python -m experiments.main --config=configs/kto_unpaired.py --workdir=/tmp/pofx_kto_unpaired

Every completion sampled from the SFT base for the training prompts is one example (prompt,
completion, label), labelled desirable when its gold reward is above `data.unpaired_threshold`
(None: the median gold reward of those completions, about half desirable); the pairs of the
training split carry each example with a mismatched completion for KTO's reference point
(`pofx.data.unpaired`). The loss is `kto_unpaired` (Ethayarajh et al. 2024, arXiv:2402.01306) with
a frozen reference (the SFT base); the held-out split stays Bradley-Terry pairs, so the
evaluation is the policy runs' (gold reward, win rate, KL, reward accuracy).

Files in TRL's unpaired format (`{"prompt", "completion", "label": bool}`) train the same loss
with `--config.data.source=files --config.data.format=unpaired --config.data.files=...`
(`--config.data.feedback=pairs`). `:tiny` shrinks every stage.
"""

from ml_collections import config_dict

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.data.feedback = "unpaired"
  c.data.unpaired_threshold = config_dict.placeholder(float)
  c.train.loss = "kto_unpaired"
  c.train.loss_hyper.beta = 0.1
  c.train.loss_hyper.desirable_weight = 1.0
  c.train.loss_hyper.undesirable_weight = 1.0
  c.train.reference.kind = "cached"
  _shrink.apply(c, arg)
  c.lock()
  return c
