"""The dense-reward view on the image world: Bradley-Terry on temporally discounted chain log-ratios.

    python -m experiments.main --config=configs/diffusion_dense_reward.py --workdir=/tmp/pofx_diffusion_dense_reward

Yang, Chen and Zhou 2024, "A Dense Reward View on Aligning Text-to-Image Diffusion with
Preference", arXiv:2402.08265 (`pofx.losses` "dense_reward_dpo": `-log sigmoid(z_w - z_l)`,
`z = beta sum_t w_t clip(d_t, -c, c)`, `w_t` proportional to `gamma^t` from the first denoising
step). The chains and labels are D3PO's (`data.record="chains"`, Bradley-Terry on the final
images); the reference is the frozen initial model. beta 12.5, gamma 0.9 and c 5e-4 are the
authors' multi-prompt values; 100 steps of 16 pairs as D3PO.

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

import ml_collections

from configs import diffusion_d3po, diffusion_dpo


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.data.record = "chains"
  c.train.logps = "trajectory"
  c.train.loss = "dense_reward_dpo"
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=12.5, gamma=0.9, log_ratio_clip=5e-4))
  c.train.steps, c.train.batch_size = 100, 16
  return diffusion_dpo.finish(c, arg, tiny=diffusion_d3po.trajectory_tiny)
