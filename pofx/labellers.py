r"""Labellers: scores for the completions a loop sampled, from which pairs are built.

    labeller = labellers.gold(world)                         # the world's gold reward r*(x, y)
    scores = labeller(prompts, completions)                  # [N, K] float32

The protocol (`Labeller`): a callable `(prompts, completions) -> scores` with `prompts` a list of
N token-id sequences, `completions` a list of N lists of K token-id sequences (the K candidates
of prompt i) and `scores` a float32 numpy array `[N, K]`, higher = better. Pairs are then built
from the scores (`pofx.pair_construction`). Every labeller here checks its inputs and its output
(`check_scores`): a ragged list, an empty completion, a score array of another shape or a
non-finite score raise ValueError naming the labeller.

Labellers:
  gold(world)                 the controlled world's gold reward (`pofx.world.World.gold_reward`).
  reward_model(score, params) a reward model's score function, `score(params, tokens, positions,
                              segment_ids, mask) -> [M]` on right-padded rows `[prompt | completion]`
                              (`pofx.reward_models.score_fn(model)` has this signature; any callable
                              with it works, e.g. a rule-based or LLM judge put behind it).
  implicit_reward(...)        the DPO implicit reward `beta (log pi(y|x) - log pi_ref(y|x))` minus
                              DICE's length penalty `alpha |y|` (Chen et al. 2024, arXiv:2406.09760,
                              "length-regularized reward shaping"); `dice_length_alpha` chooses alpha
                              as DICE does.
  self_play(demonstrations)   SPIN's self-play (Chen et al. 2024, arXiv:2401.01335): the
                              demonstration of a prompt scores 1 and any other completion 0, so that
                              with the demonstration among the candidates the best-vs-worst pair is
                              (demonstration, the policy's sample).
  from_callable(fn)           any user function with the protocol, its output checked.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Tuple

import numpy as np

from pofx import evaluation

Labeller = Callable[[Sequence[Sequence[int]], Sequence[Sequence[Sequence[int]]]], np.ndarray]


def check_inputs(name: str, prompts, completions) -> Tuple[list, list, int]:
  """`(prompts, completions, K)` as int32 numpy arrays; ValueError when the lists do not match
  (one list of K completions per prompt, the same K for all, no empty prompt or completion)."""
  if len(prompts) != len(completions):
    raise ValueError(f"labeller {name}: {len(prompts)} prompts but {len(completions)} lists of completions.")
  if not len(prompts):
    raise ValueError(f"labeller {name}: no prompts given.")
  ks = {len(c) for c in completions}
  if len(ks) != 1 or 0 in ks:
    raise ValueError(
      f"labeller {name}: every prompt needs the same number K >= 1 of completions; got {sorted(ks)} per prompt."
    )
  ps = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  cs = [[np.asarray(y, np.int32).reshape(-1) for y in row] for row in completions]
  for i, p in enumerate(ps):
    if p.size == 0:
      raise ValueError(f"labeller {name}: prompt {i} is empty.")
  for i, row in enumerate(cs):
    for j, y in enumerate(row):
      if y.size == 0:
        raise ValueError(f"labeller {name}: completion {j} of prompt {i} is empty.")
  return ps, cs, ks.pop()


def check_scores(name: str, scores, n: int, k: int) -> np.ndarray:
  """`scores` as float32 `[n, k]`; ValueError naming the labeller when the shape differs or a score
  is not finite."""
  s = np.asarray(scores, np.float32)
  if s.shape != (n, k):
    raise ValueError(
      f"labeller {name}: returned scores of shape {s.shape}; expected ({n}, {k}) (prompts x completions)."
    )
  bad = np.argwhere(~np.isfinite(s))
  if bad.size:
    i, j = (int(v) for v in bad[0])
    raise ValueError(
      f"labeller {name}: {len(bad)} scores are not finite (first: completion {j} of prompt {i}: {s[i, j]}); "
      "allowed: finite numbers."
    )
  return s


def from_callable(fn: Callable, name: Optional[str] = None) -> Labeller:
  """A user's labeller `fn(prompts, completions) -> [N, K]` (a rule-based or LLM judge), with its
  inputs and output checked (`check_inputs`, `check_scores`)."""
  if not callable(fn):
    raise TypeError(f"labellers.from_callable: {fn!r} is not callable.")
  label = name or getattr(fn, "__name__", "user")

  def labeller(prompts, completions):
    ps, cs, k = check_inputs(label, prompts, completions)
    return check_scores(label, fn(ps, cs), len(ps), k)

  return labeller


def gold(world) -> Labeller:
  """The world's gold reward `r*(x, y)` of every candidate (`pofx.world.World.gold_reward`)."""

  def labeller(prompts, completions):
    ps, cs, k = check_inputs("gold", prompts, completions)
    flat_p = [p for p in ps for _ in range(k)]
    flat_y = [y for row in cs for y in row]
    return check_scores("gold", world.gold_reward(flat_p, flat_y).reshape(len(ps), k), len(ps), k)

  return labeller


def rows(prompts, completions, *, pad_id: int = 0, bucket: int = 8):
  """Right-padded rows `[prompt | completion | padding]` of every (prompt, candidate), prompt-major:
  `(tokens, positions, segment_ids, mask)`, each `[N * K, W]` (W = the longest row rounded up to a
  multiple of `bucket`); positions count from 0, segment ids and mask are 1 on real tokens, 0 on
  padding. The layout a reward model's score function reads (its head at the last real token)."""
  seqs = [np.concatenate([p, y]) for p, row in zip(prompts, completions) for y in row]
  width = max(s.size for s in seqs)
  width = -(-width // max(int(bucket), 1)) * max(int(bucket), 1)
  tokens = np.full((len(seqs), width), pad_id, np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, : s.size], mask[i, : s.size] = s, 1
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy()
  return tokens, positions, mask.copy(), mask


def reward_model(score: Callable, params, *, pad_id: int = 0, name: str = "reward_model") -> Labeller:
  """A reward model as a labeller: `score(params, tokens, positions, segment_ids, mask) -> [N * K]`
  (e.g. `pofx.reward_models.score_fn(model)`) on the rows of `rows`, reshaped to `[N, K]`."""
  if not callable(score):
    raise TypeError(f"labellers.reward_model: score must be callable, got {score!r}.")

  def labeller(prompts, completions):
    ps, cs, k = check_inputs(name, prompts, completions)
    out = np.asarray(score(params, *rows(ps, cs, pad_id=pad_id)), np.float32).reshape(-1)
    if out.size != len(ps) * k:
      raise ValueError(f"labeller {name}: the score function returned {out.size} values for {len(ps) * k} rows.")
    return check_scores(name, out.reshape(len(ps), k), len(ps), k)

  return labeller


def implicit_reward(
  policy_params,
  reference_params,
  *,
  model,
  beta: float = 1.0,
  length_alpha: float = 0.0,
  prompt_width: Optional[int] = None,
  completion_width: Optional[int] = None,
  batch_size: int = 512,
) -> Labeller:
  r"""The DPO implicit reward with DICE's length penalty (Chen et al. 2024, arXiv:2406.09760):

      r~(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)) - alpha * |y|

  with summed log-probs of the completion (teacher forcing, `pofx.evaluation.score_completions`)
  under the policy `policy_params` and the reference `reference_params` (both of `model`), and |y|
  the completion's token count (DICE counts characters; a token is the unit here). alpha = 0 is
  the plain implicit reward of DPO (Rafailov et al. 2023, arXiv:2305.18290, Sec. 5)."""
  if not (isinstance(beta, (int, float)) and beta > 0):
    raise ValueError(f"labellers.implicit_reward: beta={beta!r}; allowed: a number > 0.")
  if not (isinstance(length_alpha, (int, float)) and np.isfinite(length_alpha) and length_alpha >= 0):
    raise ValueError(f"labellers.implicit_reward: length_alpha={length_alpha!r}; allowed: a number >= 0.")

  def labeller(prompts, completions):
    ps, cs, k = check_inputs("implicit_reward", prompts, completions)
    flat_p = [p for p in ps for _ in range(k)]
    flat_y = [y for row in cs for y in row]
    kw = dict(model=model, prompt_width=prompt_width, completion_width=completion_width, batch_size=batch_size)
    lp_pi, m = evaluation.score_completions(policy_params, flat_p, flat_y, **kw)
    lp_ref, _ = evaluation.score_completions(reference_params, flat_p, flat_y, **kw)
    ratio = (lp_pi.astype(np.float64) * m).sum(-1) - (lp_ref.astype(np.float64) * m).sum(-1)
    lengths = np.asarray([y.size for y in flat_y], np.float64)
    r = float(beta) * ratio - float(length_alpha) * lengths
    return check_scores("implicit_reward", r.reshape(len(ps), k), len(ps), k)

  return labeller


def dice_length_alpha(scores, lengths, *, grid=None) -> float:
  r"""DICE's choice of the length penalty alpha (arXiv:2406.09760; code sail-sg/dice,
  `generate_lc_paired_set.py`): over a grid of alphas (default 0, 0.001, ..., 0.999), the first
  alpha whose best-vs-worst pairs under `scores - alpha * lengths` have the mean length difference
  (chosen minus rejected) closest to 0.

  Args:
    scores: `[N, K]` rewards without the penalty (e.g. `implicit_reward(..., length_alpha=0)`).
    lengths: `[N, K]` completion lengths (tokens).
    grid: the alphas to try, increasing; None = `np.arange(1000) / 1000`.
  """
  s = np.asarray(scores, np.float64)
  n = np.asarray(lengths, np.float64)
  if s.ndim != 2 or s.shape != n.shape:
    raise ValueError(f"dice_length_alpha: scores {s.shape} and lengths {n.shape} must both be [N, K].")
  alphas = np.arange(1000) / 1000.0 if grid is None else np.asarray(grid, np.float64).reshape(-1)
  if alphas.size == 0 or np.any(alphas < 0):
    raise ValueError("dice_length_alpha: grid must hold alphas >= 0.")
  rows_ = np.arange(s.shape[0])
  best, best_gap = float(alphas[0]), np.inf
  for a in alphas:
    shaped = s - a * n
    gap = abs(float(np.mean(n[rows_, np.argmax(shaped, 1)] - n[rows_, np.argmin(shaped, 1)])))
    if gap < best_gap:
      best, best_gap = float(a), gap
  return best


def self_play(
  demonstrations: Mapping[Tuple[int, ...], Sequence[int]] | Sequence, *, name: str = "self_play"
) -> Labeller:
  r"""SPIN's self-play labeller (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language
  Models to Strong Language Models", arXiv:2401.01335; its objective with the logistic loss):
  the human (demonstrated) response y of a prompt is preferred to the policy's own sample
  y' ~ pi_t(. | x). A candidate
  scores 1.0 when it equals the prompt's demonstration and 0.0 otherwise; a loop puts the
  demonstration among a prompt's candidates, and the best-vs-worst pair is then (demonstration,
  sample), with a sample equal to the demonstration tied (dropped by a margin filter).

  `demonstrations`: a mapping from a prompt (a tuple of token ids) to its demonstration, or a
  sequence of (prompt, completion) pairs (`pofx.world.Demonstrations` zipped). A prompt without a
  demonstration is an error."""
  if isinstance(demonstrations, Mapping):
    table = {tuple(int(t) for t in k): np.asarray(v, np.int32).reshape(-1) for k, v in demonstrations.items()}
  else:
    table = {}
    for p, y in demonstrations:
      table[tuple(int(t) for t in np.asarray(p).reshape(-1))] = np.asarray(y, np.int32).reshape(-1)

  def labeller(prompts, completions):
    ps, cs, k = check_inputs(name, prompts, completions)
    out = np.zeros((len(ps), k), np.float32)
    for i, (p, row) in enumerate(zip(ps, cs)):
      demo = table.get(tuple(int(t) for t in p))
      if demo is None:
        raise ValueError(f"labeller {name}: prompt {i} ({p.tolist()}) has no demonstration.")
      for j, y in enumerate(row):
        out[i, j] = float(y.size == demo.size and np.array_equal(y, demo))
    return check_scores(name, out, len(ps), k)

  return labeller
