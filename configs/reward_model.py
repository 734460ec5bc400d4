"""A Bradley-Terry reward model on the controlled world's preference pairs (`config.stage =
"reward_model"`; `experiments/reward_model.py`).

    python -m experiments.main --config=configs/reward_model.py --workdir=/tmp/pofx_rm

The SFT base and the preference data are made as for a policy run (the same seed, world, SFT and
data settings share them); the reward model's backbone starts from the SFT base with a fresh
scalar head and is trained on the training pairs; `summary.json` reports its accuracy on the
held-out pairs (`reward_accuracy`, and `gold_accuracy` against the gold ordering) and the saved
model is `<workdir>/reward_model` (`experiments.reward_model.load`). `:tiny` shrinks every stage.

reward_model fields: init ("sft" | "random": pofx.options.REWARD_MODEL_INITS), steps, batch_size
(pairs per step), learning_rate, weight_decay, grad_clip (0: none), margin_scale (the margin
m = margin_scale * (score_chosen - score_rejected), Llama 2's margin from the rating gap; 0: none),
center_coefficient (reward centering, Eisenstein et al. 2023; 0: none), log_every.
"""

import ml_collections

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.stage = "reward_model"
  c.reward_model = ml_collections.ConfigDict(
    dict(
      init="sft",
      steps=400,
      batch_size=64,
      learning_rate=1e-3,
      weight_decay=0.0,
      grad_clip=1.0,
      margin_scale=0.0,
      center_coefficient=0.0,
      log_every=25,
    )
  )
  _shrink.apply(c, arg)
  if arg == "tiny":
    c.reward_model.steps, c.reward_model.batch_size, c.reward_model.log_every = 6, 8, 3
  c.lock()
  return c
