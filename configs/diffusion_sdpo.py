"""Diffusion-SDPO on the image world: Diffusion-DPO with the winner-preserving safeguard.

    python -m experiments.main --config=configs/diffusion_sdpo.py --workdir=/tmp/pofx_diffusion_sdpo

Fu et al. 2025, "Diffusion-SDPO: Safeguarded Direct Preference Optimization for Diffusion
Models", arXiv:2511.03317; code AIDC-AI/Diffusion-SDPO. The loss is Diffusion-DPO's; the
gradient of the loser's error is scaled by `lambda = clip((1 - mu) |g_w|^2 / (g_l . g_w + 1e-9),
0, 1)` (1 when `g_l . g_w <= 0`), computed on the batch, so that a step does not increase the
winner's error (`pofx.diffusion.methods.winner_preserving_scale`, through
`make_pair_logps_fn(..., winner_preserving_mu=mu)`). mu = 0.9, the authors' value for SD1.5.

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

from configs import diffusion_dpo


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.train.winner_preserving_mu = 0.9
  return diffusion_dpo.finish(c, arg)
