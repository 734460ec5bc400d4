"""PatchDPO on the image world: the denoising loss of both images weighted patch by patch by quality.

    python -m experiments.main --config=configs/diffusion_patch_dpo.py --workdir=/tmp/pofx_diffusion_patch_dpo

Huang et al. 2025, "PatchDPO: Patch-level DPO for Finetuning-free Personalized Image Generation",
arXiv:2412.03177 (`pofx.losses` "patch_dpo": `(E~_w + E~_l) / 2`, the reference image's error
weighted by `1 - q` and the generation's by its patch quality `q`; no reference model). The
reference image is a training digit of the prompt's class, the generation a sample of the base
(`data.pairing="data_vs_sample"`). The world's gold reward does not decompose over patches, so
the quality of each 2x2 patch (`data.patch_size`) is an occlusion proxy on it: the Bradley-Terry
probability that the generation beats itself with that patch taken from the reference image
(`experiments.diffusion.patch_quality`; docs/diffusion.md).

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

import ml_collections

from configs import diffusion_dpo


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  c.data.pairing = "data_vs_sample"
  c.data.patch_size = 2
  c.train.logps = "patch"
  c.train.loss = "patch_dpo"
  c.train.loss_hyper = ml_collections.ConfigDict()
  c.train.reference.kind = "none"
  return diffusion_dpo.finish(c, arg)
