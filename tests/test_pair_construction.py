"""Pair construction (`pofx.pair_construction`) on hand-made score tables: which candidates pair up,
their orientation and margins, the margin filter, K-way lists, and the token lists of `gather`."""

import numpy as np
import pytest

from pofx import pair_construction as pc


def _triples(index):
  return sorted(zip(index.prompt.tolist(), index.chosen.tolist(), index.rejected.tolist()))


def test_best_vs_worst_takes_first_best_and_last_worst_with_margins():
  scores = [[0.1, 0.9, 0.5], [2.0, 2.0, 1.0], [3.0, 3.0, 3.0]]
  idx = pc.best_vs_worst(scores)
  assert idx.prompt.tolist() == [0, 1, 2]
  assert idx.chosen.tolist() == [1, 0, 0]  # row 1: the first of the two 2.0s
  assert idx.rejected.tolist() == [0, 2, 2]  # row 2: all tied, the last column is the worst
  np.testing.assert_allclose(idx.margin, [0.8, 1.0, 0.0], rtol=0, atol=1e-6)


def test_all_pairs_are_oriented_by_score():
  idx = pc.all_pairs([[0.2, 0.9, 0.5]])
  # (0, 1): 1 wins by 0.7; (0, 2): 2 wins by 0.3; (1, 2): 1 wins by 0.4.
  assert _triples(idx) == [(0, 1, 0), (0, 1, 2), (0, 2, 0)]
  by_pair = {(c, r): m for c, r, m in zip(idx.chosen.tolist(), idx.rejected.tolist(), idx.margin.tolist())}
  assert by_pair == pytest.approx({(1, 0): 0.7, (2, 0): 0.3, (1, 2): 0.4})
  assert len(pc.all_pairs(np.zeros((3, 4)))) == 3 * 6


def test_random_pairs_are_reproducible_distinct_and_cover_all_pairs_at_most():
  s = np.array([[0.0, 1.0, 2.0, 3.0], [5.0, 1.0, 0.0, 2.0]])
  a, b = pc.random_pairs(s, seed=7, pairs_per_prompt=3), pc.random_pairs(s, seed=7, pairs_per_prompt=3)
  assert _triples(a) == _triples(b)
  for row in (0, 1):
    mine = [(c, r) for p, c, r in _triples(a) if p == row]
    assert len({frozenset(x) for x in mine}) == 3  # distinct unordered pairs
    assert all(s[row, c] > s[row, r] for c, r in mine)
  everything = pc.random_pairs(s, seed=1, pairs_per_prompt=6)
  assert _triples(everything) == _triples(pc.all_pairs(s))
  with pytest.raises(ValueError, match="pairs_per_prompt"):
    pc.random_pairs(s, seed=0, pairs_per_prompt=7)


def test_margin_filter_drops_ties_and_small_margins():
  idx = pc.all_pairs([[1.0, 1.0, 1.5, 3.0]])
  kept = pc.margin_filter(idx, 0.0)
  assert len(idx) == 6 and len(kept) == 5  # the (0, 1) tie is dropped
  kept = pc.margin_filter(idx, 0.5)  # strictly above 0.5: 2.0, 2.0, 1.5 (3.0 vs 1.0, 1.0, 1.5)
  assert sorted(kept.margin.tolist()) == [1.5, 2.0, 2.0]
  with pytest.raises(ValueError, match="min_margin"):
    pc.margin_filter(idx, -1.0)


def test_k_way_lists_order_by_decreasing_score_stably():
  lists = pc.k_way_lists([[0.1, 0.9, 0.5, 0.9], [1.0, 0.0, 2.0, -1.0]])
  assert lists.tolist() == [[1, 3, 2, 0], [2, 0, 1, 3]]
  assert pc.k_way_lists([[0.1, 0.9, 0.5]], k=2).tolist() == [[1, 2]]
  with pytest.raises(ValueError, match="k="):
    pc.k_way_lists([[0.1, 0.9, 0.5]], k=4)


def test_gather_builds_token_pairs_and_drops_identical_ones():
  prompts = [[1, 5, 2], [1, 6, 7, 2]]
  completions = [[[4, 3], [5, 5, 3], [4, 3]], [[8, 3], [9, 3], [10, 3]]]
  scores = np.array([[0.0, 1.0, 2.0], [3.0, 1.0, 2.0]], np.float32)
  pairs = pc.gather(prompts, completions, scores, pc.all_pairs(scores))
  # Row 0: (0, 2) are the same tokens [4, 3]: dropped; 5 of the 6 pairs remain.
  assert pairs.num_identical == 1 and len(pairs) == 5
  first = [(p.tolist(), c.tolist(), r.tolist()) for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected)]
  assert first[0] == ([1, 5, 2], [5, 5, 3], [4, 3])  # (0, 1): 1 wins
  assert first[1] == ([1, 5, 2], [4, 3], [5, 5, 3])  # (1, 2): 2 wins
  assert pairs.chosen_score.tolist() == [1.0, 2.0, 3.0, 3.0, 2.0]
  assert pairs.rejected_score.tolist() == [0.0, 1.0, 1.0, 2.0, 1.0]
  assert pairs.prompt_id.tolist() == [0, 0, 1, 1, 1]


def test_bad_scores_are_refused():
  with pytest.raises(ValueError, match="finite"):
    pc.best_vs_worst([[0.0, np.nan]])
  with pytest.raises(ValueError, match="K >= 2"):
    pc.best_vs_worst([[0.0], [1.0]])
  with pytest.raises(ValueError, match=r"\[N, K\]"):
    pc.all_pairs([0.0, 1.0])
