"""SPO on the image world: step-aware preferences between candidates sampled from one latent.

    python -m experiments.main --config=configs/diffusion_spo.py --workdir=/tmp/pofx_diffusion_spo

Liang et al. 2025, "Aesthetic Post-Training Diffusion Models from Generic Preferences with
Step-by-step Preference Optimization", arXiv:2406.04314. The pair stage (`data.record="spo_steps"`)
runs one chain per class prompt; at each step from `data.spo_start_step` on it samples
`data.spo_candidates` latents x_{t-1} from the shared x_t, scores each by the gold reward of the
clean image the base predicts at it (the image world's stand-in for SPO's step-aware preference
model), keeps the best and the worst when their softmax probabilities differ by more than
`data.spo_threshold`, and continues from a random candidate. The loss is D3PO's clipped-ratio
loss with beta 10 on those one-step chains (`pofx.losses` "d3po"; the authors' `train_spo.py`).
k = 2, threshold 0.3, eps 0.1 and beta 10 are the authors' defaults; their first 4 of 20 steps
are not branched, here the first 2 of 10.

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

import ml_collections

from configs import diffusion_d3po, diffusion_dpo


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.data.record = "spo_steps"
  c.data.spo_candidates, c.data.spo_threshold, c.data.spo_start_step = 2, 0.3, 2
  c.train.logps = "trajectory"
  c.train.loss = "d3po"
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=10.0, eps=0.1))
  return diffusion_dpo.finish(c, arg, tiny=diffusion_d3po.trajectory_tiny)
