"""BalancedDPO on the image world: Diffusion-DPO on pairs labelled by a majority vote of several
metrics, with a reference model that is updated during training.

    python -m experiments.main --config=configs/diffusion_balanced_dpo.py --workdir=/tmp/pofx_diffusion_balanced_dpo

Tamboli et al. 2025, "BalancedDPO: Adaptive Multi-Metric Alignment", arXiv:2503.12575: instead of
one reward, or a weighted sum of rewards on different scales, each metric votes for the image of
a pair it scores higher and the majority labels the pair (`pofx.diffusion.methods.
majority_preferences`); the loss is Diffusion-DPO's. Here the voters are the world's three
metrics (`data.metrics`): the fixed classifier's log-probability of the prompt's class, a second
classifier's (the same concept scored by another model, as the paper's several preference models
score the same prompt), and the ink term (the style metric). Pairs without a majority (possible
only when metrics tie) are dropped.

The paper's "dynamic reference model updates" are a synced reference (`train.reference.kind`
"synced", `pofx.references.synced`): a hard copy of the policy (alpha 1) every tau = 100 of the
300 steps. Only the abstracts were available here; the schedule of the authors' updates and
their exact voting rule are not, so both are settings to vary (docs/methods.md).

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

from configs import diffusion_dpo


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.data.labeller = "majority"
  c.data.metrics = ("class_log_prob", "second_class_log_prob", "ink")
  c.train.reference.kind = "synced"
  c.train.reference.alpha = 1.0
  c.train.reference.tau = 100
  return diffusion_dpo.finish(c, arg)
