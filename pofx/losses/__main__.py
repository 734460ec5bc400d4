"""`python -m pofx.losses`: every canonical loss on the worked example, and TRL's names for them.

pi_w=-10 (5 tokens), pi_l=-12 (6 tokens), ref_w=ref_l=-11, so rho=2; each loss at its paper's
default hyperparameters. The gradient column is the derivative of the batch loss along the
margin (chosen log-probs up by t/2, rejected down by t/2, per token uniformly).
"""

import pofx
from pofx.losses import _example

if __name__ == "__main__":
  print(__doc__)
  print(_example.table(pofx.losses.REGISTRY))
  print(f"\n{len(pofx.losses.names())} registered losses; GPO functions: {', '.join(pofx.gpo.CONVEX_FUNCTIONS)}")
  trl_names = ", ".join(f"{t} -> {pofx.losses.trl.canonical(t)}" for t in pofx.losses.trl.names())
  print(f"TRL 1.16 loss_type names (pofx.losses.trl, 'trl.<loss_type>'; canonical name of the formula): {trl_names}")
