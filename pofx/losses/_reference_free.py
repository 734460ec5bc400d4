r"""Reference-free preference losses: SimPO, CPO, ORPO, RePO.

None of these uses a reference model: `reference` is accepted (so every loss has the same call
signature) and ignored. Notation: `pi_w`, `pi_l` are summed completion log-probs, `|y|` the
completion token counts (clamped at 1), and `a_w = pi_w / |y_w|`, `a_l = pi_l / |y_l|` the
length-averaged log-probs. All functions return unreduced per-pair losses `[B]`.

NLL terms are per-pair: the chosen completion's per-sequence token mean `-a_w`. The batch mean
of these (what `batch_loss` computes) weights every pair equally; the authors' trainers instead
average the cross-entropy over all chosen tokens of the batch (long completions weigh more).
The two agree when all chosen completions have the same length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pofx import gpo as gpo_fns
from pofx.losses import _common
from pofx.losses._label_noise import smoothed_logistic
from pofx.losses._registry import LossSpec

# Log-probs are clamped at this value (just below 0) before log(1 - exp(a)), so the log-odds stay
# finite for a (theoretically impossible) average log-prob >= 0.
_MAX_AVG_LOGP = -1e-6


def _avg_logps(name, policy):
  """`(a_w, a_l)`: float32 length-averaged policy log-probs."""
  len_w, len_l = _common.lengths(policy, name)
  return (jnp.asarray(policy.chosen, jnp.float32) / len_w, jnp.asarray(policy.rejected, jnp.float32) / len_l)


def log1m_exp(a):
  r"""`log(1 - exp(a))` for `a < 0`, stable on the whole half-line (Maechler 2012).

  Uses `log(-expm1(a))` for `a > -log 2` and `log1p(-exp(a))` below; `a` is clamped at
  `-1e-6` so the result is finite (about -13.8) even for `a >= 0`.
  """
  a = jnp.minimum(a, _MAX_AVG_LOGP)
  near = jnp.log(-jnp.expm1(jnp.maximum(a, -jnp.log(2.0))))
  far = jnp.log1p(-jnp.exp(jnp.minimum(a, -jnp.log(2.0))))
  return jnp.where(a > -jnp.log(2.0), near, far)


def simpo(
  policy,
  reference=None,
  *,
  beta: float = 2.0,
  gamma_beta_ratio: float = 0.25,
  loss_type: str = "sigmoid",
  label_smoothing: float = 0.0,
  sft_weight: float = 0.0,
):
  r"""SimPO: reference-free logistic loss on length-averaged log-probs with a target margin.

  `L = -log sigmoid(beta * (a_w - a_l) - gamma)`, computed as the official code does:
  `logits = (a_w - a_l) - gamma_beta_ratio`, `L = -log sigmoid(beta * logits)` (so
  `gamma = beta * gamma_beta_ratio`). Options of the official trainer:
  - `loss_type="hinge"`: `max(0, 1 - beta * logits)`;
  - `label_smoothing=eps` (sigmoid only): `-(1-eps) log sigmoid(beta logits) - eps log sigmoid(-beta logits)`;
  - `sft_weight`: adds `sft_weight * (-a_w)`, the chosen completion's per-sequence token-mean
    NLL (the official code uses the batch token mean; see the module docstring).
  `reference` is ignored; nothing is detached. `gamma_beta_ratio = 0` gives the
  length-normalised reference-free logistic loss `gpo.logistic(beta (a_w - a_l))`.

  Args:
    policy: `PairLogps` with `chosen_len`, `rejected_len`.
    reference: ignored (reference-free).
    beta: reward scale (> 0); 2.0 is the official config default (2.0-2.5 recommended; the
      released Llama-3-Instruct-v0.2 and Gemma-2 runs use 10).
    gamma_beta_ratio: target margin divided by beta (>= 0); 0.25 is the config default.
    loss_type: "sigmoid" (paper) or "hinge".
    label_smoothing: in [0, 0.5]; 0 in the paper.
    sft_weight: >= 0; 0 in the paper.

  References: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
  Reference-Free Reward", arXiv:2405.14734, Eq. (6); code princeton-nlp/SimPO
  `scripts/simpo_trainer.py::simpo_loss`.
  """
  del reference
  _common.check_inputs("simpo", policy, None, need_lengths=True)
  _common.check_beta("simpo", beta)
  _common.check_range("simpo", "gamma_beta_ratio", gamma_beta_ratio, low=0.0, allowed_text="gamma_beta_ratio >= 0")
  _common.check_choice("simpo", "loss_type", loss_type, ("sigmoid", "hinge"))
  _common.check_range("simpo", "label_smoothing", label_smoothing, low=0.0, high=0.5)
  _common.check_range("simpo", "sft_weight", sft_weight, low=0.0, allowed_text="sft_weight >= 0")
  if loss_type == "hinge" and isinstance(label_smoothing, (int, float)) and label_smoothing != 0:
    raise ValueError(
      "simpo: invalid label_smoothing with loss_type='hinge'; allowed: 0 (the "
      "official code applies label smoothing to the sigmoid loss only)."
    )
  a_w, a_l = _avg_logps("simpo", policy)
  v = beta * ((a_w - a_l) - gamma_beta_ratio)
  if loss_type == "hinge":
    losses = gpo_fns.hinge(v)
  else:
    losses = smoothed_logistic(v, label_smoothing)
  return losses + sft_weight * (-a_w)


def cpo(policy, reference=None, *, beta: float = 0.1, cpo_alpha: float = 1.0, loss_type: str = "sigmoid"):
  r"""CPO: reference-free logistic loss on summed log-probs plus an NLL term on the chosen.

  `L = -log sigmoid(beta * (pi_w - pi_l)) + cpo_alpha * (-pi_w / |y_w|)`.
  The preference term uses **summed** log-probs (no reference); the NLL is the chosen
  completion's per-sequence token mean. TRL's `CPOTrainer` instead adds
  `cpo_alpha * CE`, with CE the token mean over all chosen tokens of the batch, so the batch
  losses differ unless every chosen completion has the same length. `loss_type="hinge"` is
  `max(0, 1 - beta (pi_w - pi_l))`, as TRL. `reference` is ignored; nothing is detached.
  `cpo_alpha = 0` gives the reference-free DPO (`gpo(f=logistic)` with reference=None).

  Args:
    policy: `PairLogps` with `chosen_len`, `rejected_len`.
    reference: ignored.
    beta: inverse temperature (> 0), 0.1 (paper / TRL default).
    cpo_alpha: NLL weight (>= 0), 1.0 (paper / TRL default).
    loss_type: "sigmoid" (paper) or "hinge".

  References: Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of
  LLM Performance in Machine Translation", arXiv:2401.08417 (L_prefer + L_NLL); TRL
  `trl/experimental/cpo/cpo_trainer.py` (`cpo_alpha`).
  """
  del reference
  _common.check_inputs("cpo", policy, None, need_lengths=True)
  _common.check_beta("cpo", beta)
  _common.check_range("cpo", "cpo_alpha", cpo_alpha, low=0.0, allowed_text="cpo_alpha >= 0")
  _common.check_choice("cpo", "loss_type", loss_type, ("sigmoid", "hinge"))
  len_w, _ = _common.lengths(policy, "cpo")
  pi_w = jnp.asarray(policy.chosen, jnp.float32)
  v = beta * (pi_w - jnp.asarray(policy.rejected, jnp.float32))
  pref = gpo_fns.hinge(v) if loss_type == "hinge" else gpo_fns.logistic(v)
  return pref + cpo_alpha * (-pi_w / len_w)


def orpo(policy, reference=None, *, lam: float = 0.1):
  r"""ORPO: NLL on the chosen plus lambda times an odds-ratio logistic loss.

  With `P(y) = exp(a)` the length-averaged ("geometric mean") sequence probability and
  `odds(y) = P / (1 - P)`:

    `log OR = (a_w - a_l) - (log(1 - exp(a_w)) - log(1 - exp(a_l)))`,
    `L = -a_w + lam * (-log sigmoid(log OR))`          (Eq. 6-7: L_SFT + lambda L_OR).

  `-a_w` is the chosen completion's per-sequence token-mean NLL (the authors' trainer uses the
  HF model loss, a token mean over the batch's chosen tokens; see the module docstring).
  `log(1 - exp(a))` is computed stably (`log1m_exp`); average log-probs are clamped at -1e-6.
  `reference` is ignored; nothing is detached. `lam = 0` is SFT on the chosen.

  Args:
    policy: `PairLogps` with `chosen_len`, `rejected_len`.
    reference: ignored.
    lam: weight of the odds-ratio term (>= 0). 0.1 is the value of the authors' released
      Mistral-ORPO run (`scripts/run_mistral_orpo_beta.sh`, `--alpha 0.1`) and TRL's
      `ORPOConfig.beta` default; the training script's argparse default is 1.0.

  References: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without
  Reference Model", arXiv:2403.07691, Eq. (6)-(7); code xfactlab/orpo
  `src/orpo_trainer.py::compute_loss`.
  """
  del reference
  _common.check_inputs("orpo", policy, None, need_lengths=True)
  _common.check_range("orpo", "lam", lam, low=0.0, allowed_text="lam >= 0")
  a_w, a_l = _avg_logps("orpo", policy)
  a_w_c = jnp.minimum(a_w, _MAX_AVG_LOGP)
  a_l_c = jnp.minimum(a_l, _MAX_AVG_LOGP)
  log_odds = (a_w_c - a_l_c) - (log1m_exp(a_w_c) - log1m_exp(a_l_c))
  return -a_w + lam * gpo_fns.logistic(log_odds)


def repo(policy, reference=None, *, gamma: float = 0.4):
  r"""RePO: ReLU max-margin loss on length-averaged log-probs (no reference, no beta).

  `L = max(0, gamma - (a_w - a_l)) = gamma * hinge((a_w - a_l) / gamma)`: zero once the
  averaged log-prob margin exceeds gamma, slope 1 below. The paper presents it as SimPO's
  beta -> infinity limit. `reference` is ignored; nothing is detached.

  Args:
    policy: `PairLogps` with `chosen_len`, `rejected_len`.
    reference: ignored.
    gamma: target margin (> 0). 0.4 is the released Mistral-7B-Instruct / Gemma-2-9B-it
      config (Llama-3-8B-Instruct uses 0.6); the code passes it as `gamma_beta_ratio`.

  References: Wu et al. 2025, "RePO: ReLU-based Preference Optimization", arXiv:2503.07426;
  code junkangwu/RePO `scripts/simpo_trainer.py::get_batch_loss_metrics` (loss_type="repo").
  """
  del reference
  _common.check_inputs("repo", policy, None, need_lengths=True)
  _common.check_range("repo", "gamma", gamma, low=0.0, low_open=True, allowed_text="gamma > 0")
  a_w, a_l = _avg_logps("repo", policy)
  return jax.nn.relu(gamma - (a_w - a_l))


SPECS = (
  LossSpec(
    "simpo",
    simpo,
    "reference-free",
    "Meng et al. 2024, arXiv:2405.14734, Eq. 6; princeton-nlp/SimPO simpo_trainer.py",
    reference="unused",
    requires=frozenset({"lengths"}),
  ),
  LossSpec(
    "cpo",
    cpo,
    "reference-free",
    "Xu et al. 2024, arXiv:2401.08417 (L_prefer + L_NLL); TRL CPOTrainer (per-sequence NLL mean)",
    reference="unused",
    requires=frozenset({"lengths"}),
  ),
  LossSpec(
    "orpo",
    orpo,
    "reference-free",
    "Hong et al. 2024, arXiv:2403.07691, Eq. 6-7; xfactlab/orpo orpo_trainer.py",
    reference="unused",
    requires=frozenset({"lengths"}),
  ),
  LossSpec(
    "repo",
    repo,
    "reference-free",
    "Wu et al. 2025, arXiv:2503.07426; junkangwu/RePO simpo_trainer.py (loss_type='repo')",
    reference="unused",
    requires=frozenset({"lengths"}),
  ),
)
