"""DenseDPO on the image world: Diffusion-DPO on structurally similar pairs labelled band by band.

    python -m experiments.main --config=configs/diffusion_dense_dpo.py --workdir=/tmp/pofx_diffusion_dense_dpo

Wu et al. 2025, "DenseDPO: Fine-Grained Temporal Preference Optimization for Video Diffusion
Models", arXiv:2506.03517 (v2): section 3.2 (eq. 6, Algorithm 2: pairs denoised from two noised
copies of one real video), section 3.3 (eq. 7: one label per temporal segment inside one
sigmoid) and appendix A.3 (the loss averaged over the non-tie tokens; clips with fewer than 20%
non-tie segments not sampled). The paper's segments are 1 s runs of frames; an 8x8 digit has one
frame, so a segment here is a band of `data.segment_rows` = 2 rows (4 bands). The pair stage
(`data.record="segments"`, `experiments.diffusion.segment_pairs`) noises a training digit of the
prompt's class twice to the sampler step of the signal-to-noise ratio of rectified-flow time eta
~ U[0.65, 0.8] (the paper's range) and denoises both copies from there. The world's gold reward
does not decompose over rows, so a band's label is a Bradley-Terry draw on its swap advantage
(the gold reward gained by taking that band from one sample into the other, averaged over the
two directions), a tie below `data.segment_tie` = 0.05 (about 64% of the bands of the seed-0
base's pairs: docs/diffusion.md). The loss is `dpo` on the band-signed errors
(`train.logps="segments"`, `pofx.diffusion.methods.dense_pair_logps`) with Diffusion-DPO's beta of
configs/diffusion_dpo.py (the paper's 500 is for its video latents and flow loss).
`--config.data.segment_rows=8` gives one label per pair (StructuralDPO with ties).

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

from configs import diffusion_dpo


def dense_config():
  c = diffusion_dpo.image_config()
  c.data.record = "segments"
  c.train.logps = "segments"
  return c


def get_config(arg=None):
  return diffusion_dpo.finish(dense_config(), arg)
