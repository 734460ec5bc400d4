"""Adaptive-DPO on the image world: Diffusion-DPO with per-pair weights and margins from the
disagreement of the policy and two EMA copies of it.

    python -m experiments.main --config=configs/diffusion_adaptive_dpo.py --workdir=/tmp/pofx_diffusion_adaptive_dpo

Zhang et al. 2025, "When Preferences Diverge: Aligning Diffusion Models with Minority-Aware
Adaptive DPO", arXiv:2503.16921, read from the authors' code (fanfanffff1/Adaptive-DPO
`dpo_train_un.py` at a64ae01 and its README's recipe; the paper's equations could not be read):
each step scores the pair's errors under the policy, the reference and two EMAs of the policy
(decays 0.9999 and 0.5, diffusers' `EMAModel` schedule, in use from the third step:
`train.reference.companion_decays`, `companion_warmup`; `pofx.references.ema_companions` around
the frozen reference), measures each pair's uncertainty u from the three models' normalised
logits, and trains `pofx.losses.adaptive_dpo`: the weight 1 / (10 u + 1) and the margin u^2 / beta
on the batch-centred logit (the README's `--logits_rho=15 --use_logits_normalization
--use_margin --margin_type=quadratic`, weight type linear, k = 10, c = 1).

beta = 2500 (the code's default `--beta_dpo`; the README's SD1.5 run uses 1000): the loss's beta
multiplies the code's logit `l = 2 rho`, so 2500 is the logit scale of configs/diffusion_dpo.py's
Diffusion-DPO (beta 5000 on rho) and the two runs differ by the weights and margin alone. The
optimizer, steps and batch are Diffusion-DPO's.

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

from configs import diffusion_dpo


def adaptive_config():
  c = diffusion_dpo.image_config()
  c.train.loss = "adaptive_dpo"
  c.train.loss_hyper = dict(beta=2500.0, rho=15.0, k=10.0, c=1.0, weighting="linear", margin="quadratic")
  # Read only with a loss that requires "companions" (configs/validate.py refuses them otherwise).
  c.train.reference.companion_decays = (0.9999, 0.5)
  c.train.reference.companion_warmup = 2
  return c


def get_config(arg=None):
  return diffusion_dpo.finish(adaptive_config(), arg)
