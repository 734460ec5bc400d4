"""DPO on adversarially perturbed token embeddings (TARS-style input perturbation).

    python -m experiments.main --config=configs/adv_embeddings.py --workdir=/tmp/pofx_adv_embeddings

`pofx.perturbations.adversarial_embeddings`: each step takes one ascent step on the DPO loss with
respect to the token embeddings and moves every real token's embedding by `radius` (L2) along
its gradient (the fast gradient method of Miyato et al. 2017, arXiv:1605.07725, per token), then
trains on the loss there: the min-max form of TARS (Zhang et al. 2025, arXiv:2507.21584), which
pofx applies to every token. One more forward-backward pass per step. The radius 0.05 is a
choice (the world model's embeddings are initialised with standard deviation 0.02 per entry),
not a published value. Composes with any `train.perturbation`.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  c.train.input_perturbation.kind, c.train.input_perturbation.radius = "embeddings", 0.05
  _shrink.apply(c, arg)
  c.lock()
  return c
