r"""Data selection and curricula for preference training: pure functions over arrays of scores,
margins and log-probs that return indices, masks or stage assignments (numpy, host-side).

Curry-DPO (Pattnaik et al. 2024, "Curry-DPO: Enhancing Alignment using Curriculum Learning &
Ranked Preferences", arXiv:2403.07230, Sec. 3 and Fig. 1). From K rated responses of a prompt,
the best-rated one is the chosen response of every pair and each other response a rejected one:
K - 1 pairs per prompt, (R1, R_K), ..., (R1, R2). A pair's difficulty is its rating gap
`s(R1) - s(R_j)`: a large gap is easy. The iterative variant trains one stage per rank of the
gap, easy to hard (stage 0: best vs worst of every prompt; stage K - 2: best vs second best),
each stage starting from the previous stage's policy **and using it as the reference**; the
non-iterative variant trains once on all pairs ordered easy to hard. `curry_pairs` builds the
pairs and their stages, `curriculum_order` the single ordering, `stage_indices` the stages.
Ties with the best response form no pair (no preference).

Margin-based selection, "Less is More" (Deng et al. 2025, "Less is More: Improving LLM
Alignment via Preference Data Selection", arXiv:2502.14560): keep the pairs of largest margin
(margin maximisation: the paper keeps about 10% of UltraFeedback), where the margin is an
external reward model's `r(y_w) - r(y_l)` or DPO's implicit reward margin
`beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]`
(`implicit_reward_margin`). Several margins are fused into one preference probability by
`bayes_fusion`: each margin m_k (scaled by s_k) is read as an independent Bradley-Terry
probability `p_k = sigmoid(m_k / s_k)` and combined with a flat prior,
`P = prod p_k / (prod p_k + prod (1 - p_k))` (= sigmoid(sum_k m_k / s_k)). The paper names its
rule "Bayesian Aggregation"; its exact normalisation of the margins is not reproduced here (the
scales s_k are the caller's), see docs/methods.md.

Reference-guided selection, "Clear Preferences Leave Traces" (Diwan et al. 2025, arXiv:2501.15109):
the reference model's own log-probs flag pairs with a clear preference. `reference_margin` gives
the reference's margin `log pi_ref(y_w) - log pi_ref(y_l)` (summed, or per token with lengths)
and `select_top` keeps a fraction of the largest (the paper keeps 30-50% of the data). The
paper's exact statistic is not established here (docs/methods.md); the statistic and the
fraction are the caller's.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import numpy as np


class CurryPairs(NamedTuple):
  """Curry-DPO pairs from `[M, K]` ratings: `prompt`, `chosen`, `rejected` (indices into the
  prompts and into each prompt's K responses), `gap` (`s(chosen) - s(rejected)` > 0) and `stage`
  (0 = the largest gap of its prompt), all `[P]`, prompt by prompt, easy to hard within one."""

  prompt: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray
  gap: np.ndarray
  stage: np.ndarray


def _scores_2d(name, scores) -> np.ndarray:
  s = np.asarray(scores, np.float64)
  if s.ndim != 2 or s.shape[1] < 2:
    raise ValueError(f"{name}: scores must be [M, K] with K >= 2 responses per prompt, got shape {s.shape}.")
  if not np.isfinite(s).all():
    raise ValueError(f"{name}: scores must be finite.")
  return s


def curry_pairs(scores) -> CurryPairs:
  """Curry-DPO's pairs and stages from ratings `[M, K]` (module docstring): per prompt, the best
  response (the first of equal best) against every response rated strictly lower, ordered by
  decreasing gap; `stage` is the rank of the gap within the prompt (equal gaps keep the response
  order). A prompt whose responses all tie gives no pair."""
  s = _scores_2d("curry_pairs", scores)
  out = {k: [] for k in CurryPairs._fields}
  for i, row in enumerate(s):
    best = int(np.argmax(row))
    gaps = row[best] - row
    others = [j for j in np.argsort(-gaps, kind="stable") if gaps[j] > 0]
    for rank, j in enumerate(others):
      out["prompt"].append(i)
      out["chosen"].append(best)
      out["rejected"].append(int(j))
      out["gap"].append(gaps[j])
      out["stage"].append(rank)
  return CurryPairs(
    prompt=np.asarray(out["prompt"], np.int64),
    chosen=np.asarray(out["chosen"], np.int64),
    rejected=np.asarray(out["rejected"], np.int64),
    gap=np.asarray(out["gap"], np.float64),
    stage=np.asarray(out["stage"], np.int64),
  )


def stage_indices(stage, num_stages: Optional[int] = None) -> List[np.ndarray]:
  """The pair indices of each stage, `[indices of stage 0, stage 1, ...]` (ascending within a
  stage). `num_stages`: merge stages >= num_stages - 1 into the last one (None: one per value)."""
  st = np.asarray(stage, np.int64).reshape(-1)
  if st.size and st.min() < 0:
    raise ValueError("stage_indices: stages must be >= 0.")
  top = int(st.max()) + 1 if st.size else 0
  if num_stages is not None:
    if not isinstance(num_stages, (int, np.integer)) or num_stages < 1:
      raise ValueError(f"stage_indices: num_stages must be an integer >= 1, got {num_stages!r}.")
    st = np.minimum(st, num_stages - 1)
    top = int(num_stages)
  return [np.flatnonzero(st == k) for k in range(top)]


def curriculum_order(gap, stage=None) -> np.ndarray:
  """Curry-DPO's non-iterative order: pair indices sorted easy to hard, by `stage` (when given)
  then by decreasing `gap`; ties keep their index order."""
  g = np.asarray(gap, np.float64).reshape(-1)
  if stage is None:
    return np.argsort(-g, kind="stable")
  st = np.asarray(stage, np.int64).reshape(-1)
  if st.shape != g.shape:
    raise ValueError(f"curriculum_order: gap {g.shape} and stage {st.shape} differ in shape.")
  return np.lexsort((-g, st))


def implicit_reward_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float) -> np.ndarray:
  """DPO's implicit reward margin `beta [(pi_w - ref_w) - (pi_l - ref_l)]` of summed log-probs."""
  if not beta > 0:
    raise ValueError(f"implicit_reward_margin: beta must be > 0, got {beta!r}.")
  pw, pl, rw, rl = (np.asarray(x, np.float64) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
  return beta * ((pw - rw) - (pl - rl))


def reference_margin(ref_chosen, ref_rejected, chosen_len=None, rejected_len=None) -> np.ndarray:
  """The reference model's margin `log pi_ref(y_w) - log pi_ref(y_l)`: of summed log-probs, or of
  per-token means when both lengths (token counts > 0) are given."""
  rw, rl = np.asarray(ref_chosen, np.float64), np.asarray(ref_rejected, np.float64)
  if (chosen_len is None) != (rejected_len is None):
    raise ValueError("reference_margin: give both chosen_len and rejected_len, or neither.")
  if chosen_len is None:
    return rw - rl
  lw, ll = np.asarray(chosen_len, np.float64), np.asarray(rejected_len, np.float64)
  if (lw <= 0).any() or (ll <= 0).any():
    raise ValueError("reference_margin: lengths must be > 0 token counts.")
  return rw / lw - rl / ll


def bayes_fusion(margins: Sequence, scales: Optional[Sequence[float]] = None) -> np.ndarray:
  """One preference probability per pair from several margins (module docstring):
  `p_k = sigmoid(m_k / s_k)`, `P = prod_k p_k / (prod_k p_k + prod_k (1 - p_k))`, computed in
  log space. `margins`: a list of `[N]` arrays; `scales`: one positive number per margin
  (default 1)."""
  ms = [np.asarray(m, np.float64).reshape(-1) for m in margins]
  if not ms:
    raise ValueError("bayes_fusion: give at least one margin array.")
  if len({m.shape for m in ms}) != 1:
    raise ValueError(f"bayes_fusion: margins of different shapes {[m.shape for m in ms]}.")
  sc = [1.0] * len(ms) if scales is None else [float(s) for s in scales]
  if len(sc) != len(ms) or any(not s > 0 for s in sc):
    raise ValueError(f"bayes_fusion: scales must be {len(ms)} positive numbers, got {scales!r}.")
  log_sig = lambda z: -np.logaddexp(0.0, -z)  # log sigmoid(z)
  log_yes = sum(log_sig(m / s) for m, s in zip(ms, sc))
  log_no = sum(log_sig(-m / s) for m, s in zip(ms, sc))
  return np.exp(log_yes - np.logaddexp(log_yes, log_no))


def select_top(values, fraction: float) -> np.ndarray:
  """Indices of the `ceil(fraction * N)` largest `values` (at least one), in ascending index
  order; equal values keep the lower index first. `fraction` in (0, 1]."""
  v = np.asarray(values, np.float64).reshape(-1)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"select_top: fraction must be in (0, 1], got {fraction!r}.")
  if v.size == 0:
    raise ValueError("select_top: no values given.")
  if np.isnan(v).any():
    raise ValueError("select_top: values contain NaN.")
  k = max(1, math.ceil(fraction * v.size - 1e-9))
  return np.sort(np.argsort(-v, kind="stable")[:k])


def select_by_margin(chosen_scores, rejected_scores, fraction: float) -> np.ndarray:
  """Less-is-More's margin maximisation on an external reward: the `fraction` of pairs with the
  largest `r(y_w) - r(y_l)` (`select_top`)."""
  return select_top(np.asarray(chosen_scores, np.float64) - np.asarray(rejected_scores, np.float64), fraction)
