"""Diffusion-DPO on the image world with a prompt-conditioned denoiser: a cross-attention U-Net
(`pofx.diffusion.unet.UNetConditionConfig`, diffusers' `UNet2DConditionModel` layout) attending to
the world's prompts ("bold", <digit>) embedded by its fixed prompt encoder
(`pofx.diffusion.world.PromptEncoder`, not trained), instead of a class-embedding table.

    python -m experiments.main --config=configs/diffusion_dpo_prompted.py --workdir=/tmp/pofx_diffusion_prompted

The pipeline, the loss (Diffusion-DPO, Wallace et al. 2023, arXiv:2311.12908, Eq. 14) and the
evaluation are configs/diffusion_dpo.py's; only the denoiser differs (the cross-attention
conditioning of Rombach et al. 2022, arXiv:2112.10752, section 3.3). `model.attention_head_dim`
is here the number of heads of each transformer (diffusers' naming for this model).
"""

from configs import diffusion_dpo


def _model(c):
  m = c.model
  m.preset = "tiny_prompted"
  m.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  m.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  m.attention_head_dim = 2  # heads (of 16 channels each at the 32-channel resolution)
  m.cross_attention_dim = 16  # the width of the prompt encoder's embeddings


def tiny(c):
  """configs/diffusion_dpo.py's tiny stages; the model keeps one transformer, in the mid block."""
  diffusion_dpo.tiny(c)
  m = c.model
  m.attention_head_dim, m.cross_attention_dim = 2, 8
  return c


def get_config(arg=None):
  c = diffusion_dpo.image_config()
  _model(c)
  return diffusion_dpo.finish(c, arg, tiny=tiny)
