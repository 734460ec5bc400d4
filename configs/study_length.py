"""Study 2, length exploitation: a labeller that favours longer answers, and the methods that curb it.

    python -m experiments.study length --workdir=/tmp/pofx_studies         (3 seeds: table, chart)
    python -m experiments.main --config=configs/study_length.py --workdir=/tmp/run   (one seed)

The world's labeller adds `length_bias` = 0.5 logits per token of length difference to the
Bradley-Terry preference (`pofx.world`), while the gold reward has no such term (its length window
is 4..8 content tokens, 5..9 tokens with EOS). From one SFT base and this biased dataset: DPO
(beta 0.1), SimPO (Meng et al. 2024, arXiv:2405.14734; beta 2, gamma/beta 0.25), LD-DPO (Liu et
al. 2024, arXiv:2409.06411; ld_alpha 0.5), LN-DPO (Ahrabian et al. 2024, arXiv:2407.15229; beta
1, about 0.1 times the mean completion length) and SamPO (Lu et al. 2024, arXiv:2406.10957), at the
shared learning rate 1e-3; then DPO and SimPO again at 3e-4, where both stay closer to the base (a
comparison at about the same KL). LD-DPO and SamPO need per-token reference log-probs: their
reference is the frozen SFT base. `:tiny` trains DPO and SimPO.
"""

from configs import _study, common


def get_config(arg=None):
  c = common.base_config()
  c.world.length_bias = 0.5
  c.train.loss, c.train.reference.kind = "dpo", "cached"
  _study.sized(c, arg, steps=200, tiny_steps=12)
  c.sweep = (
    _study.member("dpo", "dpo", {"beta": 0.1}),
    _study.member("simpo", "simpo", {"beta": 2.0, "gamma_beta_ratio": 0.25}, reference="none"),
    _study.member("ld_dpo", "ld_dpo", {"beta": 0.1, "ld_alpha": 0.5}, reference="frozen"),
    _study.member("ln_dpo", "ln_dpo", {"beta": 1.0}),
    _study.member("sampo", "sampo", {"beta": 0.1}, reference="frozen"),
    # DPO and SimPO at a smaller learning rate, closer to the base: a comparison at matched KL.
    _study.member("dpo_lr3e-4", "dpo", {"beta": 0.1}, **{"train.optimizer.learning_rate": 3e-4}),
    _study.member(
      "simpo_lr3e-4",
      "simpo",
      {"beta": 2.0, "gamma_beta_ratio": 0.25},
      reference="none",
      **{"train.optimizer.learning_rate": 3e-4},
    ),
  )
  if arg == "tiny":  # the direction the tests assert: DPO against SimPO
    c.sweep = c.sweep[:2]
  c.lock()
  return c
