"""TailorPO on the image world: DPO on two samples drawn from one x_t, ranked at that step.

    python -m experiments.main --config=configs/diffusion_tailor_po.py --workdir=/tmp/pofx_diffusion_tailor_po

Ren et al. 2025, "Refining Alignment Framework for Diffusion Models with Intermediate-Step
Preference Ranking" (TailorPO), arXiv:2502.01667, section 3.3 and Algorithm 1. The pair stage
(`data.record="tailor_steps"`, `experiments.diffusion.tailor_pairs`) runs one DDIM (eta 1) chain
per class prompt; at every random step it draws two samples x_{t-1} from the shared x_t, ranks
them by the step-wise reward r(c, x0_hat(x_{t-1})) (the gold reward of the clean image the base
predicts; eq. 12) and continues from the preferred one; the pairs of steps 0, 2, 4, 6, 8 of the 10
train (the paper fine-tunes at 5 of its 20 steps, t = 20, 16, 12, 8, 4). The loss is DPO's on the
one-step chains (eq. 10: `-log sigmoid(beta (log pi/pi_ref (x^w_{t-1} | x_t) - log pi/pi_ref
(x^l_{t-1} | x_t)))`, `train.logps="trajectory"`), each step's Gaussian log-density averaged over
the pixels as in the D3PO code the paper follows; beta 0.1 is D3PO's (the paper uses D3PO's
hyper-parameters and does not print its beta). The learning rate is 1e-5, a tenth of the other
image families': nothing bounds this objective's step (D3PO's and SPO's loss clips the ratios), and
at 1e-4 the policy collapsed (seed 0: class accuracy 13%, docs/diffusion.md). The paper fine-tunes
LoRA weights and does not print its rate. `configs/diffusion_tailor_po_g.py` adds the gradient
guidance (TailorPO-G).

Every other field is configs/diffusion_dpo.py's (`:tiny` for tests).
"""

import ml_collections

from configs import diffusion_d3po, diffusion_dpo


def tailor_config():
  c = diffusion_dpo.image_config()
  c.data.record = "tailor_steps"
  c.data.spo_start_step, c.data.tailor_every = 0, 2
  c.train.logps = "trajectory"
  c.train.loss = "dpo"
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=0.1))
  c.train.optimizer.learning_rate = 1e-5
  return c


def get_config(arg=None):
  return diffusion_dpo.finish(tailor_config(), arg, tiny=diffusion_d3po.trajectory_tiny)
