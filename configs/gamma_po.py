"""gamma-PO (gamma-SimPO: SimPO with dynamic per-pair target margins) on the controlled world.

    python -m experiments.main --config=configs/gamma_po.py --workdir=/tmp/pofx_gamma_po

The values of the authors' published Llama-3-8B-Instruct run (Sun et al. 2025, arXiv:2506.03690;
code sunjie279/gammaPO, `training_configs/llama-3-8b-it-gmsimpo-beta10-gm0.4-tau10-lr1e-6.yaml`,
the run their README trains): beta 10, gamma/beta 0.4 and the margin regulariser tau 10, where
the code's `SimPOConfig` defaults (`pofx.losses.gamma_simpo`'s) are beta 2.0, gamma/beta 0.25 and
tau 1.0. The other released runs use tau 10 (Mistral-7B-Instruct, beta 2.5, gamma/beta 0.15),
20 (Gemma-2-9B-it) and 3 (Qwen-2.5-7B-Instruct). Reference-free; the gap pool and the optimiser of
the margins live in the train state and are checkpointed with it.
"""

from configs import _shrink, common


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "gamma_simpo"
  c.train.loss_hyper = {"beta": 10.0, "gamma_beta_ratio": 0.4, "tau": 10.0}
  c.train.reference.kind = "none"
  _shrink.apply(c, arg)
  c.lock()
  return c
