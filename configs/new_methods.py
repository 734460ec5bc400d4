"""The newer methods, each trained once on the controlled world, on one reward-vs-KL chart.

    python -m experiments.main --config=configs/new_methods.py --workdir=/tmp/pofx_new_methods

One shared SFT base and preference dataset (`<workdir>/sft_params`, `<workdir>/data`); then one
training run and its evaluation per method in `<workdir>/sweep/<label>`, and
`<workdir>/reward_vs_kl.png` with every method on it. Against the cached SFT reference unless
an entry says otherwise.

Losses (`MEMBERS`, one entry per method: its label, loss, hyperparameters and reference kind):

- `mipo`: MIPO (Jang 2024, arXiv:2409.17545), beta 20 (the authors' Llama-3 config);
- `ilr_dpo`: iLR-DPO's length-margin DPO (Liu et al. 2024, arXiv:2406.11817), alpha 0.01 per
  token (pofx's choice: the paper's value was not found), beta 0.1;
- `flex_dpo`: Flex-DPO with the SFT term (Yan et al. 2024, arXiv:2406.07327), beta 0.1 on the
  chosen and 0.08 on the rejected log-ratio, SFT weight 0.1 (pofx's choice);
- `madpo`: MADPO (Rho 2025, arXiv:2510.05342) with the world's gold rewards as the reward model's
  scores, the authors' notebook values (beta 0.1, c_max 2, c_min 0.5, lam 1, tau log 999).
- `kto`: KTO on pairs (Ethayarajh et al. 2024, arXiv:2402.01306), its reference point from the
  mismatched pairs the program builds in each batch (TRL's shift), TRL's defaults;
- `bmc`: BMC (Jiang et al. 2024, arXiv:2408.07471), token weights from the diff of chosen and
  rejected, the authors' default delta 2;
- `sem_dpo`: Sem-DPO (Mohamed et al. 2025, arXiv:2507.20133) on the world's embeddings, alpha 1
  (pofx's choice: the paper's value could not be read);
- `two_d_dpo`: 2D-DPO (Li et al. 2025, arXiv:2410.19720) on the world's segments x aspects,
  uniform aspect weights;
- `gdpo`: GDPO (Kwon, Matsunaga & Kim 2024, arXiv:2410.15096), the detailed-balance residuals
  with the per-state EOS log-probs, the authors' alpha 0.1 and gamma 0.1;
- `sgdpo`: SGDPO (Zhu et al. 2025, arXiv:2505.12435), pilot sums over random token subsets, the
  authors' code defaults (beta 0.1, r1 0.6, r2 0.9);
- `full_step_dpo`: Full-Step-DPO (Xu et al. 2025, arXiv:2502.14356) with the world's segments as
  steps and the mean of their two aspect scores as step scores (pofx's choice), the authors'
  config (beta 0.05, token_rate 1, reward_temp 0.5).
The last seven use a frozen reference (per-token and per-state reference log-probs; KTO's
mismatched pairs).

Perturbations and regularisers of DPO (`_perturbation_members`, with the settings of their own
config files): SAM with m-sharpness (`sam.py`, m = 8 pairs per ascent), SAF (`saf.py`), MESA
(`mesa.py`), multi-sample dropout (`msd.py`), adversarial token embeddings
(`adv_embeddings.py`); the SAF member also logs the gradient-field diagnostic
(`gradient_field.py`).

`:tiny` shrinks every stage (a few training steps per method; the trajectory terms switched on at
once, 2 dropout masks; one checkpoint per member, at its last step; no per-member training-curve
chart, `sweep_member_charts`: the members' metrics and the sweep's chart are written). The
members with a cached reference share one cache (`<workdir>/reference_caches`). A method is added
with one entry.
"""

import math

from configs import _shrink, common

# The members with a cached reference read one cache: the SFT base's log-probs of the shared data,
# computed by the first of them (the entries are keyed by their fingerprint).
SHARED_CACHE = "{workdir}/reference_caches"

# One entry per loss: (label, loss, loss_hyper, reference kind).
MEMBERS = (
  ("mipo", "mipo", {"beta": 20.0}, "cached"),
  ("ilr_dpo", "ilr_dpo", {"alpha": 0.01, "beta": 0.1}, "cached"),
  ("flex_dpo", "flex_dpo", {"beta_chosen": 0.1, "beta_rejected": 0.08, "sft_weight": 0.1}, "cached"),
  (
    "madpo",
    "madpo",
    {"beta": 0.1, "c_max": 2.0, "c_min": 0.5, "lam": 1.0, "tau": math.log(999.0)},
    "cached",
  ),
  # Losses that read more than a pair's log-probs; the program builds their inputs per batch. A
  # frozen reference: BMC, 2D-DPO, SGDPO and Full-Step-DPO read per-token reference log-probs, GDPO
  # per-state EOS ones, and KTO scores its mismatched pairs with the reference, which a cache
  # cannot do.
  ("kto", "kto", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}, "frozen"),
  ("bmc", "bmc", {"beta": 0.1, "delta": 2.0}, "frozen"),
  ("sem_dpo", "sem_dpo", {"beta": 0.1, "alpha": 1.0}, "frozen"),
  ("two_d_dpo", "two_d_dpo", {"beta": 0.1}, "frozen"),
  ("gdpo", "gdpo", {"alpha": 0.1, "gamma": 0.1}, "frozen"),
  ("sgdpo", "sgdpo", {"beta": 0.1, "r1": 0.6, "r2": 0.9}, "frozen"),
  ("full_step_dpo", "full_step_dpo", {"beta": 0.05, "token_rate": 1.0, "reward_temp": 0.5}, "frozen"),
)


def member(label, loss, hyper, reference="cached"):
  """A sweep entry training `loss` with `hyper` against a `reference` of that kind (a cached one
  from the sweep's shared cache folder)."""
  overrides = {"train.loss": loss, "train.loss_hyper": dict(hyper), "train.reference.kind": reference}
  if reference == "cached":
    overrides["train.reference.cache_dir"] = SHARED_CACHE
  return {"label": label, "group": label, "overrides": overrides}


def _perturbation_members(tiny):
  """DPO (beta 0.1) with each new perturbation or regulariser."""
  start = -1 if tiny else 0
  overrides = {
    "sam_m": {
      "train.perturbation.kind": "sam",
      "train.perturbation.rho": 0.05,
      "train.perturbation.m": 4 if tiny else 8,
    },
    "saf": {
      "train.perturbation.kind": "saf",
      "train.perturbation.lam": 0.3,
      "train.perturbation.minus_epochs": 1,
      "train.perturbation.start_epoch": start,
      "train.gradient_field": True,  # the diagnostic rides along (it changes no result)
    },
    "mesa": {
      "train.perturbation.kind": "mesa",
      "train.perturbation.lam": 0.8,
      "train.perturbation.decay": 0.99,
      "train.perturbation.start_epoch": start,
    },
    "msd": {"train.dropout.rate": 0.1, "train.dropout.samples": 2 if tiny else 4},
    "adv_embeddings": {"train.input_perturbation.kind": "embeddings", "train.input_perturbation.radius": 0.05},
  }
  dpo = {"train.loss": "dpo", "train.loss_hyper": {"beta": 0.1}, "train.reference.cache_dir": SHARED_CACHE}
  return tuple({"label": k, "group": k, "overrides": {**dpo, **v}} for k, v in overrides.items())


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.loss_hyper = {"beta": 0.1}
  c.train.reference.kind = "cached"
  c.train.steps = 200
  _shrink.apply(c, arg)
  if arg == "tiny":  # a few steps per member: one checkpoint, at the last step; no per-member chart
    c.train.checkpoint_every = c.train.steps
    c.sweep_member_charts = False
  c.sweep = tuple(member(*m) for m in MEMBERS) + _perturbation_members(arg == "tiny")
  c.lock()
  return c
