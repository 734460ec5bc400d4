"""TailorPO-G on the image world: TailorPO with the preferred sample moved up its reward gradient.

    python -m experiments.main --config=configs/diffusion_tailor_po_g.py --workdir=/tmp/pofx_diffusion_tailor_po_g

Ren et al. 2025, arXiv:2502.01667, section 3.4 (eq. 13-14) and Algorithm 1: before the pair
trains and the chain continues, the preferred sample becomes x+ = x - eta grad_x (r_high -
r_t(x))^2 with r_high = r_t(x) + delta held fixed, kept where its step-wise reward rose
(`pofx.diffusion.methods.reward_guidance`). The step-wise reward is differentiable here: the
world's gold reward in JAX (`ImageWorld.gold_reward_jax`) of the base's predicted clean image.
eta 0.2 and delta 0.5 are the values of the paper's check (Table 1); its training schedules eta
between 0.1 and 0.2 over the steps. Everything else is configs/diffusion_tailor_po.py's.
"""

from configs import diffusion_d3po, diffusion_dpo, diffusion_tailor_po


def get_config(arg=None):
  c = diffusion_tailor_po.tailor_config()
  c.data.tailor_eta, c.data.tailor_delta = 0.2, 0.5
  return diffusion_dpo.finish(c, arg, tiny=diffusion_d3po.trajectory_tiny)
