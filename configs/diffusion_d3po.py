"""D3PO on the image world: DPO on every denoising step of two recorded reverse chains.

    python -m experiments.main --config=configs/diffusion_d3po.py --workdir=/tmp/pofx_diffusion_d3po

Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model",
arXiv:2311.13231 (`pofx.losses` "d3po": per step j, `-log sigmoid(beta (clip(d^w_j) - clip(d^l_j)))`
with `d = l_theta - l_ref` of the step's DDIM(eta) log-density averaged over the pixels, clipped to
`[log(1 - eps), log(1 + eps)]`, averaged over the steps). The pair stage records both chains of a
pair from one shared x_T (`data.record="chains"`, the authors' sampling), DDIM with eta 1 as theirs;
the label is Bradley-Terry on the final images' gold rewards, as for Diffusion-DPO; the step
(`train.logps="trajectory"`) re-evaluates every random step of both chains under the policy and the
frozen initial model. beta 0.1 and eps 0.1 are the authors'. A step costs 2 x 9 denoiser passes per
pair (10 sampling steps; the last, to the clean image, is deterministic and not trained), so the
default trains 100 steps of 16 pairs: 28,800 denoiser passes, fewer than Diffusion-DPO's 300 steps
of 64 pairs (38,400).

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

import ml_collections

from configs import diffusion_dpo


def trajectory_tiny(c):
  """`:tiny` for a trajectory family: diffusion_dpo's (chains of 4 sampling steps, 3 of them
  random), SPO branching from step 1, 2 training steps of 4 pairs."""
  diffusion_dpo.tiny(c)
  c.data.spo_start_step = 1
  c.train.steps, c.train.batch_size = 2, 4


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.data.record = "chains"
  c.train.logps = "trajectory"
  c.train.loss = "d3po"
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=0.1, eps=0.1))
  c.train.steps, c.train.batch_size = 100, 16
  return diffusion_dpo.finish(c, arg, tiny=trajectory_tiny)
