r"""Pairs (and K-way lists) from K scored completions per prompt: pure numpy functions.

    scores = labeller(prompts, completions)                      # [N, K] (pofx.labellers)
    index = pair_construction.best_vs_worst(scores)              # which candidates pair up
    index = pair_construction.margin_filter(index, min_margin=0.0)
    pairs = pair_construction.gather(prompts, completions, scores, index)
    pairs.prompt, pairs.chosen, pairs.rejected                   # lists of int32 arrays (pofx.batching)

A `PairIndex` names each pair by its prompt row and the columns of its chosen and rejected
candidates, always oriented so that the chosen one has the higher score, with the margin
`score[chosen] - score[rejected] >= 0` (0 for a tie). Constructions:

  best_vs_worst  one pair per prompt: the highest against the lowest score (the first of equal
                 scores in column order for the best, the last for the worst), the pairing of
                 iterative DPO, DICE (arXiv:2406.09760) and SPIN's (demonstration, sample).
  all_pairs      every unordered pair of the K candidates: K (K - 1) / 2 per prompt.
  random_pairs   `pairs_per_prompt` distinct unordered pairs per prompt drawn uniformly (a numpy
                 generator from `seed`).
  margin_filter  keeps the pairs whose margin is strictly above `min_margin` (0 drops ties).
  k_way_lists    each prompt's candidates ordered by decreasing score (stable): the K-way lists of
                 listwise losses (`pofx.ListLogps`, RankDPO / LiPO-style training from K samples).

`gather` turns an index into token lists and drops pairs whose two completions are identical
(counted in `num_identical`).
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

import numpy as np


class PairIndex(NamedTuple):
  """Pairs by position: `prompt`, `chosen`, `rejected` `[P]` int64 (row, column, column) and
  `margin` `[P]` float32 (the chosen minus the rejected score, >= 0)."""

  prompt: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray
  margin: np.ndarray

  def __len__(self):
    return int(self.prompt.shape[0])


class Pairs(NamedTuple):
  """Preference pairs as token lists (the inputs of `pofx.batching.build`) with their scores.

  prompt, chosen, rejected: lists of 1-D int32 arrays; chosen_score, rejected_score: `[P]`
  float32; prompt_id: `[P]` int32 row of the prompt; num_identical: pairs dropped because both
  completions were the same tokens."""

  prompt: List[np.ndarray]
  chosen: List[np.ndarray]
  rejected: List[np.ndarray]
  chosen_score: np.ndarray
  rejected_score: np.ndarray
  prompt_id: np.ndarray
  num_identical: int

  def __len__(self):
    return len(self.chosen)


def _scores(name: str, scores) -> np.ndarray:
  s = np.asarray(scores, np.float64)
  if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
    raise ValueError(f"{name}: scores must be [N, K] with N, K >= 1; got shape {s.shape}.")
  if not np.all(np.isfinite(s)):
    raise ValueError(f"{name}: scores must be finite.")
  return s


def _index(s, rows, a, b) -> PairIndex:
  rows, a, b = (np.asarray(x, np.int64).reshape(-1) for x in (rows, a, b))
  swap = s[rows, b] > s[rows, a]
  chosen, rejected = np.where(swap, b, a), np.where(swap, a, b)
  margin = (s[rows, chosen] - s[rows, rejected]).astype(np.float32)
  return PairIndex(rows, chosen, rejected, margin)


def best_vs_worst(scores) -> PairIndex:
  """One pair per prompt: the best candidate (the first of the highest scores) against the worst
  (the last of the lowest scores); the margin is 0 when all K scores are equal."""
  s = _scores("best_vs_worst", scores)
  if s.shape[1] < 2:
    raise ValueError(f"best_vs_worst: needs K >= 2 candidates per prompt; got K={s.shape[1]}.")
  best = np.argmax(s, axis=1)
  worst = s.shape[1] - 1 - np.argmin(s[:, ::-1], axis=1)
  rows = np.arange(s.shape[0])
  return PairIndex(
    rows.astype(np.int64),
    best.astype(np.int64),
    worst.astype(np.int64),
    (s[rows, best] - s[rows, worst]).astype(np.float32),
  )


def all_pairs(scores) -> PairIndex:
  """Every unordered pair (a < b) of each prompt's K candidates, prompt-major, then a, then b;
  oriented so the chosen has the higher score (a on ties)."""
  s = _scores("all_pairs", scores)
  n, k = s.shape
  if k < 2:
    raise ValueError(f"all_pairs: needs K >= 2 candidates per prompt; got K={k}.")
  a, b = np.triu_indices(k, 1)
  rows = np.repeat(np.arange(n), a.size)
  return _index(s, rows, np.tile(a, n), np.tile(b, n))


def random_pairs(scores, *, seed, pairs_per_prompt: int = 1) -> PairIndex:
  """`pairs_per_prompt` distinct unordered pairs per prompt, drawn uniformly without replacement
  from the K (K - 1) / 2 (a numpy generator seeded with `seed`, so the draw is reproducible)."""
  s = _scores("random_pairs", scores)
  n, k = s.shape
  total = k * (k - 1) // 2
  m = int(pairs_per_prompt)
  if k < 2 or not 1 <= m <= total:
    raise ValueError(f"random_pairs: pairs_per_prompt={pairs_per_prompt!r}; allowed: 1..{total} for K={k} (K >= 2).")
  a, b = np.triu_indices(k, 1)
  rng = np.random.default_rng(seed)
  pick = np.stack([rng.choice(total, size=m, replace=False) for _ in range(n)])  # [n, m]
  rows = np.repeat(np.arange(n), m)
  return _index(s, rows, a[pick.reshape(-1)], b[pick.reshape(-1)])


def margin_filter(index: PairIndex, min_margin: float = 0.0) -> PairIndex:
  """The pairs whose margin is strictly greater than `min_margin` (>= 0); 0 drops ties."""
  if not (isinstance(min_margin, (int, float)) and np.isfinite(min_margin) and min_margin >= 0):
    raise ValueError(f"margin_filter: min_margin={min_margin!r}; allowed: a number >= 0.")
  keep = np.asarray(index.margin, np.float64) > float(min_margin)
  return PairIndex(*(np.asarray(x)[keep] for x in index))


def k_way_lists(scores, k: int | None = None) -> np.ndarray:
  """`[N, k]` int64: each prompt's candidate columns by decreasing score (ties keep column order);
  `k` (default K) keeps the top k."""
  s = _scores("k_way_lists", scores)
  k = s.shape[1] if k is None else int(k)
  if not 2 <= k <= s.shape[1]:
    raise ValueError(f"k_way_lists: k={k!r}; allowed: 2..{s.shape[1]} (the candidates per prompt).")
  return np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64)


def gather(
  prompts: Sequence, completions: Sequence[Sequence], scores, index: PairIndex, *, drop_identical: bool = True
) -> Pairs:
  """The pairs of `index` as token lists with their scores; pairs of two identical completions are
  dropped when `drop_identical` (a pair that teaches nothing; counted in `num_identical`)."""
  s = np.asarray(scores, np.float32)
  out = {k: [] for k in ("prompt", "chosen", "rejected", "cs", "rs", "pid")}
  same = 0
  for i, a, b in zip(index.prompt, index.chosen, index.rejected):
    i, a, b = int(i), int(a), int(b)
    ya = np.asarray(completions[i][a], np.int32).reshape(-1)
    yb = np.asarray(completions[i][b], np.int32).reshape(-1)
    if drop_identical and ya.size == yb.size and np.array_equal(ya, yb):
      same += 1
      continue
    out["prompt"].append(np.asarray(prompts[i], np.int32).reshape(-1))
    out["chosen"].append(ya)
    out["rejected"].append(yb)
    out["cs"].append(s[i, a])
    out["rs"].append(s[i, b])
    out["pid"].append(i)
  return Pairs(
    prompt=out["prompt"],
    chosen=out["chosen"],
    rejected=out["rejected"],
    chosen_score=np.asarray(out["cs"], np.float32),
    rejected_score=np.asarray(out["rs"], np.float32),
    prompt_id=np.asarray(out["pid"], np.int32),
    num_identical=same,
  )
