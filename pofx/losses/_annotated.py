r"""Losses that read per-pair annotations beyond the log-probs: BMC, Sem-DPO, 2D-DPO, Full-Step-DPO.

Each takes, besides `policy` and `reference`, arrays that the data path supplies per pair (their
names are `pofx.losses.REQUIREMENTS`' kinds):

- `"diff_masks"` (BMC): 0/1 masks `[B, T]` of the completion tokens that differ between the chosen
  and the rejected completion (`bmc_modified_tokens` computes them from token ids);
- `"embeddings"` (Sem-DPO): embeddings `[B, D]` of the prompt and of the chosen completion, from
  any embedding function applied by the data path;
- `"segments"` (2D-DPO, Full-Step-DPO): per completion token the index of its segment `[B, T]` (-1
  outside the completion) and per segment a score for each aspect `[B, S, A]` (Full-Step-DPO's
  steps and step scores).

BMC, 2D-DPO and Sem-DPO are DPO with summed token log-ratios rebuilt from per-token arrays (BMC,
2D-DPO) or with a per-pair weight (Sem-DPO); Full-Step-DPO is DPO's gradient weight on step- and
token-weighted log-probs. The annotations are data, so no gradient flows through them.
"""

from __future__ import annotations

import difflib
from typing import Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pofx._pair_logps import PairLogps
from pofx.losses import _common
from pofx.losses._gpo_family import dpo
from pofx.losses._registry import LossSpec

Array = jax.Array


def _check_token_shaped(name: str, policy: PairLogps, chosen, rejected, what: str) -> None:
  want_c, want_r = jnp.shape(policy.chosen_token_logps), jnp.shape(policy.rejected_token_logps)
  if jnp.shape(chosen) != want_c or jnp.shape(rejected) != want_r:
    raise ValueError(
      f"{name}: chosen_{what}/rejected_{what} must have the shapes of the token log-probs {want_c} / {want_r}; "
      f"got {jnp.shape(chosen)} / {jnp.shape(rejected)}."
    )


def _masked_tokens(p: PairLogps, mask_from: PairLogps):
  """float32 per-token log-probs of `p`, zero outside `mask_from`'s masks."""
  c_mask = jnp.asarray(mask_from.chosen_mask) > 0
  r_mask = jnp.asarray(mask_from.rejected_mask) > 0
  return (
    jnp.where(c_mask, jnp.asarray(p.chosen_token_logps, jnp.float32), 0.0),
    jnp.where(r_mask, jnp.asarray(p.rejected_token_logps, jnp.float32), 0.0),
  )


# -------------------------------------------------------------------------------------------------
# BMC
# -------------------------------------------------------------------------------------------------


def bmc_modified_tokens(chosen: Sequence[int], rejected: Sequence[int], ignore: Sequence[int] = ()):
  """BMC's token correlation masks: the tokens of each completion that the other one does not share.

  Aligns the two token sequences with `difflib.SequenceMatcher` (a longest-matching-blocks diff);
  tokens in a "replace" or "delete" block of the rejected completion and in a "replace" or
  "insert" block of the chosen one are marked 1, except tokens listed in `ignore` (the authors
  leave out stop words). Host-side (numpy); returns `(chosen_mask, rejected_mask)` as int32
  arrays of the completions' lengths.

  Reference: Jiang et al. 2024, arXiv:2408.07471; code YJiangcm/BMC
  `scripts/dpo_bmc_trainer.py::find_modifications` (rejected = original, chosen = corrected).
  """
  chosen = [int(t) for t in np.asarray(chosen).reshape(-1)]
  rejected = [int(t) for t in np.asarray(rejected).reshape(-1)]
  skip = {int(t) for t in ignore}
  c_mask = np.zeros(len(chosen), np.int32)
  r_mask = np.zeros(len(rejected), np.int32)
  for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, rejected, chosen, autojunk=False).get_opcodes():
    if tag in ("replace", "delete"):
      r_mask[i1:i2] = [t not in skip for t in rejected[i1:i2]]
    if tag in ("replace", "insert"):
      c_mask[j1:j2] = [t not in skip for t in chosen[j1:j2]]
  return c_mask, r_mask


def bmc_token_weights(token_logps: Array, diff_mask: Array, *, delta: float = 2.0) -> Array:
  r"""BMC's token weights `w_t = 1 + m_t min(1 / p_t, delta)`, detached.

  `p_t = exp(token_logps)` is the model's own probability of the token and `m_t` the 0/1
  correlation mask; computed as `exp(min(-log p_t, log delta))` so that very unlikely tokens
  (or -inf on padding) give `delta`, never inf.
  """
  lp = jnp.asarray(token_logps, jnp.float32)
  capped = jnp.exp(jnp.minimum(-lp, jnp.log(jnp.asarray(delta, jnp.float32))))
  return jax.lax.stop_gradient(1.0 + (jnp.asarray(diff_mask) > 0).astype(jnp.float32) * capped)


def bmc(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.1,
  delta: float = 2.0,
  chosen_diff_mask: Array,
  rejected_diff_mask: Array,
) -> Array:
  r"""BMC (DPO-BMC): DPO on token sums reweighted by the model's confidence on the differing tokens.

  With `m_t` the 0/1 mask of the tokens where the chosen and rejected completions differ
  (`bmc_modified_tokens`), each model weights its own token log-probs by
  `w_t = 1 + m_t min(1 / p_t, delta)` (`p_t` that model's probability of the token; weights
  detached), and the sequence score is `sum_t w_t log p_t`:

    `L = -log sigmoid(beta * [(sum_t w^pi_t log pi_w,t - sum_t w^ref_t log ref_w,t)
                               - (sum_t w^pi_t log pi_l,t - sum_t w^ref_t log ref_l,t)])`.

  The policy's weights come from the policy's probabilities and the reference's from the
  reference's, as in the authors' trainer, where the same weighted forward serves both models.
  Tokens the model is unsure of (small p) weigh up to `1 + delta`; masks of zeros give DPO.
  `delta` >= 1 (a weight below 2 for confident tokens needs `1/p <= delta`).

  Args:
    policy, reference: `PairLogps` with per-token log-probs (`PairLogps.from_tokens`).
    beta: inverse temperature (> 0; the trainer's default 0.1; the released recipes use 0.01-0.05).
    delta: cap of the confidence weight (>= 1; config default 2.0, recipes 1.5-3.0).
    chosen_diff_mask, rejected_diff_mask: `[B, T]` 0/1 masks aligned with the token log-probs.

  Returns:
    `[B]` per-pair losses.

  References: Jiang et al. 2024, "Bridging and Modeling Correlations in Pairwise Data for Direct
  Preference Optimization" (BMC), arXiv:2408.07471; code YJiangcm/BMC
  `scripts/dpo_bmc_trainer.py::concatenated_forward` (token weights, `dpo_bmc_delta`) and
  `dpo_loss` (loss_type="sigmoid").
  """
  name = "bmc"
  _common.check_inputs(name, policy, reference, need_reference=True, need_tokens=True)
  _common.check_beta(name, beta)
  _common.check_range(name, "delta", delta, low=1.0)
  _check_token_shaped(name, policy, chosen_diff_mask, rejected_diff_mask, "diff_mask")
  pc, pr = _masked_tokens(policy, policy)
  rc, rr = _masked_tokens(reference, policy)

  def weighted(c, r):
    w_c = bmc_token_weights(c, chosen_diff_mask, delta=delta)
    w_r = bmc_token_weights(r, rejected_diff_mask, delta=delta)
    return PairLogps(chosen=jnp.sum(w_c * c, axis=-1), rejected=jnp.sum(w_r * r, axis=-1))

  return dpo(weighted(pc, pr), weighted(rc, rr), beta=beta)


# -------------------------------------------------------------------------------------------------
# Sem-DPO
# -------------------------------------------------------------------------------------------------


def cosine_distance(a: Array, b: Array, *, eps: float = 1e-8) -> Array:
  """`1 - <a, b> / (|a| |b|)` over the last axis, float32; a zero vector has distance 1."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return 1.0 - jnp.sum(a * b, axis=-1) / jnp.maximum(norms, eps)


def sem_dpo(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.1,
  alpha: float,
  prompt_embeddings: Array,
  chosen_embeddings: Array,
) -> Array:
  r"""Sem-DPO: the DPO loss of each pair scaled by a semantic-consistency weight.

    `L = W * (-log sigmoid(beta * rho))`,  `W = exp(-alpha * d_cos(e(x), e(y_w)))`,

  with `d_cos = 1 - cos` the cosine distance between the embeddings of the prompt and of the
  winning completion (`cosine_distance`). Pairs whose winner drifts from the prompt's meaning are
  down-weighted; `alpha = 0` is DPO. The embeddings are data (any frozen embedding function,
  applied by the data path), so W carries no gradient.

  Args:
    policy, reference: `PairLogps` (reference required).
    beta: DPO inverse temperature (> 0).
    alpha: strength of the weight (>= 0). No default: the paper's value could not be checked.
    prompt_embeddings, chosen_embeddings: `[B, D]` embeddings of the prompt and the chosen completion.

  Returns:
    `[B]` per-pair losses.

  References: Mohamed et al. 2025, "Sem-DPO: Mitigating Semantic Inconsistency in Preference
  Optimization for Prompt Engineering", arXiv:2507.20133 (abstract: the DPO loss scaled by an
  exponential weight of the cosine distance between the original prompt and the winning
  candidate in embedding space).
  """
  name = "sem_dpo"
  _common.check_inputs(name, policy, reference, need_reference=True)
  _common.check_range(name, "alpha", alpha, low=0.0)
  chex.assert_rank([prompt_embeddings, chosen_embeddings], 2)
  chex.assert_equal_shape([prompt_embeddings, chosen_embeddings])
  chex.assert_equal_shape_prefix([prompt_embeddings, policy.chosen], 1)
  weight = jnp.exp(-alpha * cosine_distance(prompt_embeddings, chosen_embeddings))
  return jax.lax.stop_gradient(weight) * dpo(policy, reference, beta=beta)


# -------------------------------------------------------------------------------------------------
# 2D-DPO
# -------------------------------------------------------------------------------------------------


def _segment_sums(token_values: Array, segment_ids: Array, num_segments: int) -> Array:
  """`[B, T]` values summed per segment -> `[B, S]` (tokens with id < 0 or >= S are left out)."""
  ids = jnp.asarray(segment_ids, jnp.int32)
  onehot = (ids[..., None] == jnp.arange(num_segments, dtype=jnp.int32)).astype(jnp.float32)
  return jnp.einsum("bt,bts->bs", token_values, onehot)


def two_d_dpo_segment_rewards(segment_scores: Array, aspect_weights: Optional[Sequence[float]] = None) -> Array:
  """`r_k = sum_j W_j s_{k, j}`: `[B, S, A]` aspect scores -> `[B, S]` segment rewards.

  `aspect_weights` W (A non-negative numbers, normalised here to sum to 1); None = uniform.
  """
  s = jnp.asarray(segment_scores, jnp.float32)
  a = s.shape[-1]
  if aspect_weights is None:
    w = jnp.full((a,), 1.0 / a, jnp.float32)
  else:
    w = np.asarray(aspect_weights, np.float64).reshape(-1)
    if w.shape != (a,) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
      raise ValueError(
        f"two_d_dpo: invalid aspect_weights={tuple(aspect_weights)!r}; allowed: {a} non-negative numbers "
        "with a positive sum (one per aspect), or None (uniform)."
      )
    w = jnp.asarray(w / w.sum(), jnp.float32)
  return jnp.einsum("bsa,a->bs", s, w)


def two_d_dpo(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.1,
  aspect_weights: Optional[Sequence[float]] = None,
  chosen_segment_ids: Array,
  rejected_segment_ids: Array,
  chosen_segment_scores: Array,
  rejected_segment_scores: Array,
) -> Array:
  r"""2D-DPO (group loss): segment-level DPO terms weighted by aspect-combined segment scores.

  Each completion is cut into segments (`*_segment_ids`, per token) and each segment k has a
  score per aspect, combined as `r_k = sum_j W_j s_{k,j}` (`two_d_dpo_segment_rewards`, W sums
  to 1). With `lr_k = sum_{t in segment k} (log pi_t - log ref_t)` and `N = min(S_w, S_l)` (the
  two completions' segment counts), the chosen segments are sorted by reward descending and the
  rejected ones ascending, and the k-th of each form a Bradley-Terry pair:

    `L = -sum_{k < N} log sigmoid(beta * (r_w,(k) lr_w,(k) - r_l,(k) lr_l,(k)))`.

  The scores are data (constant). Ties in the sort keep segment order. With one segment per
  completion and unit scores this is DPO.

  Args:
    policy, reference: `PairLogps` with per-token log-probs (`PairLogps.from_tokens`).
    beta: inverse temperature (> 0).
    aspect_weights: W, one non-negative weight per aspect (normalised to sum 1); None = uniform.
    chosen_segment_ids, rejected_segment_ids: `[B, T]` int segment index of each completion
      token (0-based, consecutive; -1 on padding), aligned with the token log-probs.
    chosen_segment_scores, rejected_segment_scores: `[B, S, A]` scores of segment k on aspect j;
      entries of segments a completion does not have are ignored.

  Returns:
    `[B]` per-pair losses (a sum over the N segment pairs).

  References: Li et al. 2025, "2D-DPO: Scaling Direct Preference Optimization with 2-Dimensional
  Supervision", arXiv:2410.19720, Eq. (6) (the group loss); code of the robustness follow-up
  (Shashidhar et al. 2025, arXiv:2505.01706) nachiketapatil/Robust-2D-DPO `2ddpo_tp.py::preference_loss`
  (top-N chosen / bottom-N rejected segments, one aspect).
  """
  name = "two_d_dpo"
  _common.check_inputs(name, policy, reference, need_reference=True, need_tokens=True)
  _common.check_beta(name, beta)
  _check_token_shaped(name, policy, chosen_segment_ids, rejected_segment_ids, "segment_ids")
  chex.assert_rank([chosen_segment_scores, rejected_segment_scores], 3)
  chex.assert_equal_shape([chosen_segment_scores, rejected_segment_scores])
  num_segments = chosen_segment_scores.shape[1]
  pc, pr = _masked_tokens(policy, policy)
  rc, rr = _masked_tokens(reference, policy)
  lr_w = _segment_sums(pc - rc, chosen_segment_ids, num_segments)  # [B, S]
  lr_l = _segment_sums(pr - rr, rejected_segment_ids, num_segments)
  r_w = two_d_dpo_segment_rewards(chosen_segment_scores, aspect_weights)
  r_l = two_d_dpo_segment_rewards(rejected_segment_scores, aspect_weights)
  count = lambda ids: jnp.max(jnp.asarray(ids, jnp.int32), axis=-1) + 1  # segments per completion
  s_w, s_l = count(chosen_segment_ids), count(rejected_segment_ids)
  k = jnp.arange(num_segments)
  valid_w, valid_l = k[None, :] < s_w[:, None], k[None, :] < s_l[:, None]
  order_w = jnp.argsort(jnp.where(valid_w, -r_w, jnp.inf), axis=-1, stable=True)  # best chosen first
  order_l = jnp.argsort(jnp.where(valid_l, r_l, jnp.inf), axis=-1, stable=True)  # worst rejected first
  take = lambda x, order: jnp.take_along_axis(x, order, axis=-1)
  logits = beta * (take(r_w * lr_w, order_w) - take(r_l * lr_l, order_l))
  paired = k[None, :] < jnp.minimum(s_w, s_l)[:, None]
  return -jnp.sum(jnp.where(paired, jax.nn.log_sigmoid(logits), 0.0), axis=-1)


# -------------------------------------------------------------------------------------------------
# Full-Step-DPO
# -------------------------------------------------------------------------------------------------


def full_step_dpo_token_steps(segment_ids: Array, segment_scores: Array, mask: Array):
  """Per-token step scores `[B, T]` (each token gets its step's score, the mean over the score's
  aspects; one aspect is the step score itself) and the 0/1 float32 mask of tokens in a step."""
  ids = jnp.asarray(segment_ids, jnp.int32)
  valid = (ids >= 0) & (jnp.asarray(mask) > 0)
  per_step = jnp.mean(jnp.asarray(segment_scores, jnp.float32), axis=-1)  # [B, S]
  scores = jnp.take_along_axis(per_step, jnp.clip(ids, 0, per_step.shape[1] - 1), axis=-1)
  return jnp.where(valid, scores, 0.0), valid.astype(jnp.float32)


def full_step_dpo(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.05,
  token_rate: float = 1.0,
  reward_temp: float = 0.5,
  chosen_segment_ids: Array,
  rejected_segment_ids: Array,
  chosen_segment_scores: Array,
  rejected_segment_scores: Array,
) -> Array:
  r"""Full-Step-DPO: DPO's gradient weight on step- and token-reweighted completion log-probs.

  Each completion token t carries its step's score `s_t` (the completion's steps are its segments,
  `chosen_segment_ids` and `[B, S, A]` `chosen_segment_scores`; the step score is the mean over
  the A aspects, one aspect being the process reward model's step score itself). With
  `g_t = log pi_t - log ref_t` (detached) and the softmax over a completion's step tokens,

    `pos = sum_t softmax_t(tau s_t) sigmoid(-k g_t) log pi(y_w,t)`         (chosen)
    `neg = sum_t softmax_t(-tau s_t) sigmoid(k g_t) log pi(y_l,t)`         (rejected)
    `L = -sg[sigmoid(-beta ((log pi_w - log ref_w) - (log pi_l - log ref_l)))] (pos - neg)`,

  `sg` a stop-gradient, `tau` = `reward_temp`, `k` = `token_rate`. The gradient is DPO's weight
  times a reweighted push: up on the chosen tokens of well-scored steps the policy has not yet
  raised, down on the rejected tokens of badly scored steps. The value itself is a surrogate (only
  its gradient is the method). The detached factors make finite differences disagree with the
  gradient unless `token_rate` is 0 and the sequence sums are held fixed.

  In the authors' trainer every pair of a prompt's sampled responses with different outcome
  rewards is one term (the better as chosen); with pairs, each pair is one term. The trainer marks
  the step tokens by a nonzero step score; here they are the tokens with a segment id >= 0.

  Args:
    policy, reference: `PairLogps` with per-token log-probs (`PairLogps.from_tokens`).
    beta: inverse temperature (> 0; the authors' config 0.05).
    token_rate: `k` >= 0, the token weights' rate (the authors' 1).
    reward_temp: `tau` >= 0, the step scores' temperature (the authors' 0.5).
    chosen_segment_ids, rejected_segment_ids: `[B, T]` step index per token (-1 outside steps).
    chosen_segment_scores, rejected_segment_scores: `[B, S, A]` step scores.

  Returns:
    `[B]` per-pair losses.

  References: Xu et al. 2025, "Full-Step-DPO: Self-Supervised Preference Optimization with
  Step-wise Rewards for Mathematical Reasoning", arXiv:2502.14356 (ACL Findings 2025); the formula
  follows the authors' code, Anna7355/Full-Step-DPO `StepRunners.py::AlignRunner.__call__`
  (loss_type "fullstepdpo"), `collators.py::Align_Collator` (step scores per token) and
  `configs/qwen_align_config.yaml` (defaults).
  """
  name = "full_step_dpo"
  _common.check_inputs(name, policy, reference, need_reference=True, need_tokens=True)
  _common.check_beta(name, beta)
  _common.check_range(name, "token_rate", token_rate, low=0.0)
  _common.check_range(name, "reward_temp", reward_temp, low=0.0)
  _check_token_shaped(name, policy, chosen_segment_ids, rejected_segment_ids, "segment_ids")
  chex.assert_rank([chosen_segment_scores, rejected_segment_scores], 3)
  pc, pr = _masked_tokens(policy, policy)
  rc, rr = _masked_tokens(reference, policy)
  s_w, in_w = full_step_dpo_token_steps(chosen_segment_ids, chosen_segment_scores, policy.chosen_mask)
  s_l, in_l = full_step_dpo_token_steps(rejected_segment_ids, rejected_segment_scores, policy.rejected_mask)

  def step_softmax(x, valid):
    x = jnp.where(valid > 0, x, -jnp.inf)
    top = jnp.max(jnp.where(valid > 0, x, 0.0), axis=-1, keepdims=True)
    e = jnp.where(valid > 0, jnp.exp(x - top), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)

  k, tau = jnp.float32(token_rate), jnp.float32(reward_temp)
  w_pos = jax.lax.stop_gradient(step_softmax(tau * s_w, in_w) * jax.nn.sigmoid(-k * (pc - rc)))
  w_neg = jax.lax.stop_gradient(step_softmax(-tau * s_l, in_l) * jax.nn.sigmoid(k * (pr - rr)))
  pos, neg = jnp.sum(w_pos * pc, axis=-1), jnp.sum(w_neg * pr, axis=-1)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  margin = (f32(policy.chosen) - f32(reference.chosen)) - (f32(policy.rejected) - f32(reference.rejected))
  g = jax.lax.stop_gradient(jax.nn.sigmoid(-jnp.float32(beta) * margin))
  return -g * (pos - neg)


SPECS = (
  LossSpec(
    "bmc",
    bmc,
    "token-level",
    "Jiang et al. 2024, BMC, arXiv:2408.07471; code YJiangcm/BMC scripts/dpo_bmc_trainer.py::concatenated_forward",
    requires=frozenset({"tokens", "diff_masks"}),
    detached_by_design="the token weights min(1/p_t, delta) are detached functions of the token log-probs",
  ),
  LossSpec(
    "sem_dpo",
    sem_dpo,
    "weighted",
    "Mohamed et al. 2025, Sem-DPO, arXiv:2507.20133 (abstract's weight exp(-alpha d_cos(e(x), e(y_w))))",
    requires=frozenset({"embeddings"}),
    example_hyper={"alpha": 1.0},
  ),
  LossSpec(
    "two_d_dpo",
    two_d_dpo,
    "token-level",
    "Li et al. 2025, 2D-DPO, arXiv:2410.19720, Eq. 6; code nachiketapatil/Robust-2D-DPO 2ddpo_tp.py::preference_loss",
    requires=frozenset({"tokens", "segments"}),
  ),
  LossSpec(
    "full_step_dpo",
    full_step_dpo,
    "token-level",
    "Xu et al. 2025, Full-Step-DPO, arXiv:2502.14356; code Anna7355/Full-Step-DPO StepRunners.py::AlignRunner",
    requires=frozenset({"tokens", "segments"}),
    detached_by_design="DPO's gradient weight and the token weights sigmoid(-k g_t) are detached, as in the authors' code",
  ),
)
