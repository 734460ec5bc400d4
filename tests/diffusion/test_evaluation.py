"""pofx.diffusion.evaluation against closed forms and hand-computed numbers: the Fréchet distance
of Gaussians (1-D, diagonal, and a general pair against scipy's matrix square root), diversity of
a hand-made set, the win rate with ties and its Wilson interval, and the sample grid's pixels."""

import math

import numpy as np
import pytest
import scipy.linalg

from pofx.diffusion import evaluation


def test_frechet_one_dimensional_closed_form():
  # d^2 = (m1 - m2)^2 + (s1 - s2)^2 for N(m1, s1^2), N(m2, s2^2).
  d = evaluation.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]])
  assert d == pytest.approx(9.0 + 1.0, abs=1e-12)


def test_frechet_diagonal_closed_form():
  a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  want = 1.0 + 0.0 + 4.0 + sum((math.sqrt(x) - math.sqrt(y)) ** 2 for x, y in zip(a, b))  # 5 + 4 + 1 + 0
  assert evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, abs=1e-10)
  assert evaluation.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_general_against_scipy_sqrtm():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
  s1, s2 = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T  # non-commuting covariances
  mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
  assert evaluation.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_feature_frechet_uses_sample_covariance():
  f1 = np.array([[0.0], [2.0]])  # mean 1, variance (1 + 1) / (2 - 1) = 2
  f2 = np.array([[1.0], [3.0], [5.0]])  # mean 3, variance (4 + 0 + 4) / 2 = 4
  assert evaluation.feature_frechet(f1, f2) == pytest.approx(4.0 + (math.sqrt(2) - 2.0) ** 2, abs=1e-12)


def test_diversity_hand_computed():
  # Class 0: a 3-4-5 triangle (mean distance 4); class 1: two points 2 apart; class 2 alone (skipped).
  pts = np.array([[0, 0], [3, 0], [0, 4], [1, 1], [1, 3], [7, 7]], np.float64).reshape(6, 1, 2, 1)
  labels = np.array([0, 0, 0, 1, 1, 2])
  assert evaluation.diversity(pts, labels) == pytest.approx((4.0 + 2.0) / 2)
  with pytest.raises(ValueError, match="no class has two samples"):
    evaluation.diversity(pts[:1], labels[:1])


class _LinearWorld:
  """A stand-in world with hand-checkable functions: reward = first pixel, class = 1 when the
  first pixel > 0, features = the first two pixels."""

  eval_images = np.stack([np.full((8, 8, 1), v, np.float32) for v in (-0.5, 0.0, 0.5)])

  def gold_reward(self, images, labels):
    return np.asarray(images)[:, 0, 0, 0]

  def class_log_prob(self, images, labels):
    return np.zeros(len(labels))

  def metric_scores(self, images, labels, names):
    assert tuple(names) == ("second_class_log_prob",)
    return -np.abs(np.asarray(images)[None, :, 0, 0, 0])

  def predicted_class(self, images):
    return (np.asarray(images)[:, 0, 0, 0] > 0).astype(np.int32)

  def features(self, images):
    return np.asarray(images).reshape(len(images), -1)[:, :2]


def test_evaluate_win_rate_ties_half_with_wilson():
  img = lambda v: np.full((8, 8, 1), v, np.float32)
  policy = np.stack([img(v) for v in (0.5, 0.2, 0.2, -0.1)])
  base = np.stack([img(v) for v in (0.1, 0.2, 0.3, -0.1)])
  labels = np.array([1, 1, 1, 1])
  out = evaluation.evaluate(_LinearWorld(), policy, base, labels)
  assert (out["wins"], out["ties"], out["losses"]) == (1, 2, 1)
  assert out["win_rate_vs_base"] == 0.5
  z, n, p = 1.959963984540054, 4, 0.5
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  assert out["win_rate_ci95_low"] == pytest.approx(0.5 - half, abs=1e-12)
  assert out["win_rate_ci95_high"] == pytest.approx(0.5 + half, abs=1e-12)
  assert out["gold_reward_policy"] == pytest.approx(0.2) and out["gold_reward_base"] == pytest.approx(0.125)
  assert out["class_accuracy_policy"] == 0.75 and out["class_accuracy_base"] == 0.75
  assert out["ink_policy"] == pytest.approx((1.5 + 1.2 + 1.2 + 0.9) / 8)
  assert out["second_class_log_prob_policy"] == pytest.approx(-(0.5 + 0.2 + 0.2 + 0.1) / 4)
  # Diversity: one class; distances between constant images = 8 * |v_i - v_j| (64 pixels).
  d = [8 * abs(a - b) for i, a in enumerate((0.5, 0.2, 0.2, -0.1)) for b in (0.5, 0.2, 0.2, -0.1)[i + 1 :]]
  assert out["diversity_policy"] == pytest.approx(np.mean(d))
  # Fréchet on the features (the first two pixels, equal): a rank-one Gaussian each.
  assert out["frechet_base"] >= 0.0


def test_sample_grid_pixels():
  imgs = np.array([[[-1.0], [1.0]], [[0.0], [2.0]]], np.float32)[None].repeat(3, axis=0)  # 3 images 2x2
  imgs[1] = -1.0
  grid = evaluation.sample_grid(imgs, columns=2)
  assert grid.shape == (2 * 3 + 1, 2 * 3 + 1) and grid.dtype == np.uint8
  # first image at rows 1-2, cols 1-2: -1 -> 0, 1 -> 255, 0 -> 128 (127.5 rounded half to even), 2 clipped -> 255
  np.testing.assert_array_equal(grid[1:3, 1:3], [[0, 255], [128, 255]])
  np.testing.assert_array_equal(grid[1:3, 4:6], [[0, 0], [0, 0]])
  np.testing.assert_array_equal(grid[4:6, 1:3], [[0, 255], [128, 255]])
  assert grid[0].sum() == 0 and grid[:, 3].sum() == 0  # padding
