r"""GDPO: preference alignment as a GFlowNet, trained by a detailed-balance residual per token.

A completion of n tokens visits the states `s_0 = x` (the prompt), `s_t = x + y_<t+1`, ...,
`s_n = x + y` (`pofx.PairLogps`: per-token arrays `[B, T]`, per-state arrays `[B, T+1]`). Every
state may terminate: the policy's probability of stopping at `s_t` is `pi(EOS | s_t)`, and the
flow through it is `F(s_t) = R(s_t) / pi(EOS | s_t)`. The detailed-balance condition between two
consecutive states, `F(s_t) pi(y_t | s_t) = F(s_{t+1})` (the backward policy of a sequence is
deterministic), is fitted in log space. Notation as in docs/methods.md: `ref` the reference,
`pi` the policy.
"""

from __future__ import annotations

import jax.numpy as jnp

from pofx._pair_logps import state_mask
from pofx.losses import _common
from pofx.losses._registry import LossSpec

# The log-scores the authors' code adds on a completion's last transition: 0 for the chosen
# ("1 if chosen") and -8 for the rejected ("small number otherwise"), each times alpha.
CHOSEN_LOG_SCORE = 0.0
REJECTED_LOG_SCORE = -8.0


def _check_states(name, who, p, fields):
  for field in fields:
    for side in ("chosen", "rejected"):
      if getattr(p, f"{side}_{field}") is None:
        raise ValueError(
          f"{name} needs the {who}'s per-state {side}_{field} [B, T+1]: build the log-prob function with "
          "pofx.policy.make_logps_fn(eos_id=..., eos_temperature=gamma) (or PairLogps.from_tokens(..., "
          f"{side}_{field}=...))."
        )


def _residuals_squared(pol_tok, mask, pol_eos, ref_tok, ref_eos_tempered, log_score):
  """`sum_{t<n} (log F(s_t) - log F(s_{t+1}) + log pi(y_t | s_t))^2` per sequence, `[B]`."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  mask = (f32(mask) > 0).astype(jnp.float32)
  n = jnp.sum(mask, axis=-1).astype(jnp.int32)
  states = state_mask(mask)
  T = mask.shape[-1]
  last = (jnp.arange(T + 1)[None, :] == (n - 1)[:, None]).astype(jnp.float32)  # state of the last transition
  ref_tok = jnp.where(mask > 0, f32(ref_tok), 0.0)
  log_reward = jnp.pad(ref_tok, ((0, 0), (0, 1))) + jnp.where(states > 0, f32(ref_eos_tempered), 0.0) + last * log_score
  log_flow = log_reward - jnp.where(states > 0, f32(pol_eos), 0.0)
  residual = log_flow[:, :-1] - log_flow[:, 1:] + jnp.where(mask > 0, f32(pol_tok), 0.0)
  return jnp.sum(jnp.where(mask > 0, residual, 0.0) ** 2, axis=-1)


def gdpo(policy, reference, *, alpha: float = 0.1, gamma: float = 0.1):
  r"""GDPO (GFlowNet-DPO): the squared detailed-balance residuals of both completions.

  For a completion with tokens `y_0..y_{n-1}` and states `s_0..s_n` (`s_t` predicts `y_t`;
  `s_n` is the prompt with the whole completion):

    `log R(s_t) = log ref(y_t | s_t) [t < n] + log softmax(z^ref(s_t) / gamma)_EOS
                  + alpha * score [t = n - 1]`,
    `log F(s_t) = log R(s_t) - log pi(EOS | s_t)`,
    `delta_t = log F(s_t) - log F(s_{t+1}) + log pi(y_t | s_t)`,   t = 0..n-1,
    `L = (sum_t delta_t^2 [chosen] + sum_t delta_t^2 [rejected]) / 2`,

  with `score = 0` for the chosen and `-8` for the rejected completion, `z^ref` the reference's
  logits and `log R` a function of the reference only (the train step passes it detached). The
  mean over pairs is the authors' mean over the 2B sequences.

  Which states. These are the n transitions of the completion, `s_0 -> s_1 -> ... -> s_n`. The
  authors' code (`compute_token_logps(slide_mask=True)`) also extends the mask one position to the
  left, which adds one residual at the prompt's second-to-last position whose "token" log-probs
  are those of vocabulary id 0 (the value masked labels are filled with before the mask is slid);
  and, since its residuals pair positions `j` and `j + 1` of the padded `[2B, L - 1]` arrays, the
  sequence that reaches the batch's padded length loses its last residual (the one carrying the
  score). pofx leaves out the former (a filler token, not a transition of the completion) and
  keeps the latter for every sequence (no dependence on the padding); with both adjusted the two
  agree (tests/losses/test_gflownet.py runs the authors' loss in torch on the same logits).

  Args:
    policy: `PairLogps` with per-token arrays and `chosen_eos_logps`, `rejected_eos_logps`
      (`log pi(EOS | s_t)`, `[B, T+1]`).
    reference: `PairLogps` (required) with per-token arrays and `chosen_tempered_eos_logps`,
      `rejected_tempered_eos_logps` at temperature `gamma`.
    alpha: weight of the chosen/rejected log-scores on the last transition (> 0); 0.1 in the
      authors' config.
    gamma: the temperature of the reference's EOS probability in the reward (> 0); 0.1 in the
      authors' config. The loss reads the tempered values it is given: the log-prob function
      must be built with `eos_temperature=gamma` (the training program does so).

  References: Kwon, Matsunaga & Kim 2024, "GDPO: Learning to Directly Align Language Models with
  Diversity Using GFlowNets", EMNLP 2024, arXiv:2410.15096; the loss as the authors' code computes
  it: ggoggam/gdpo `src/algo/offline/gdpo.py::GDPOTrainer.loss` (defaults `alpha = gamma = 0.1`
  from `src/config/__init__.py::GDPOConfig`).
  """
  name = "gdpo"
  _common.check_inputs(name, policy, reference, need_reference=True, need_tokens=True)
  _common.check_range(name, "alpha", alpha, low=0.0, low_open=True, allowed_text="alpha > 0")
  _common.check_range(name, "gamma", gamma, low=0.0, low_open=True, allowed_text="gamma > 0")
  _check_states(name, "policy", policy, ("eos_logps",))
  _check_states(name, "reference", reference, ("tempered_eos_logps",))
  total = 0.0
  for side, score in (("chosen", CHOSEN_LOG_SCORE), ("rejected", REJECTED_LOG_SCORE)):
    total = total + _residuals_squared(
      getattr(policy, f"{side}_token_logps"),
      getattr(policy, f"{side}_mask"),
      getattr(policy, f"{side}_eos_logps"),
      getattr(reference, f"{side}_token_logps"),
      getattr(reference, f"{side}_tempered_eos_logps"),
      alpha * score,
    )
  return 0.5 * total


SPECS = (
  LossSpec(
    "gdpo",
    gdpo,
    "gflownet",
    "Kwon, Matsunaga & Kim 2024, arXiv:2410.15096 (EMNLP 2024); ggoggam/gdpo src/algo/offline/gdpo.py::GDPOTrainer.loss "
    "(detailed balance per token, log F = log R - log pi(EOS))",
    requires=frozenset({"tokens", "eos_logps"}),
  ),
)
