r"""Evaluation of a diffusion policy on the image world (`pofx.diffusion.world`).

Everything is computed from samples and the world's known functions; nothing here samples or
trains (the program draws the policy's and the base's samples with the same class prompts and
the same initial noise and hands them over).

- gold reward: the mean of `world.gold_reward` over the policy's and the base's samples;
- win rate against the base: sample i of the policy against sample i of the base (same class
  prompt), a win when its gold reward is higher, ties counting half, with the Wilson score
  interval at 95% (`pofx.evaluation.win_rate`):

      (p + z^2/(2n) -+ z sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n),   z = 1.95996...

- the gold reward's two terms apart (the classifier's log-probability of the class, the ink) and
  the second classifier's log-probability of the class (`world.second_classifier`, the third of
  the world's metrics), each averaged over the samples;
- class accuracy: the share of samples the fixed classifier reads as their prompt's class;
- diversity: the mean Euclidean distance between two different samples of one class (over all
  pairs i < j within the class), averaged over the classes with at least two samples;
- Fréchet distance between the samples and held-out data in the classifier's feature space
  (Heusel et al. 2017, arXiv:1706.08500, eq. 6; the FID with the world's classifier in place of
  Inception):

      d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}),

  with tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i), lambda_i the eigenvalues of the symmetric
  positive semi-definite S_1^{1/2} S_2 S_1^{1/2} (the same eigenvalues as S_1 S_2), in float64;
- sample grids: images laid out as one uint8 greyscale array (a row per class), for a PNG
  (the program writes the file).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from pofx import evaluation as lm_evaluation
from pofx.diffusion import world as world_lib


def gaussian_stats(features):
  """(mean [D], covariance [D, D]) of features [N, D] in float64 (covariance with N - 1)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"gaussian_stats: need features [N >= 2, D], got shape {f.shape}.")
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s):
  vals, vecs = np.linalg.eigh((s + s.T) / 2)
  return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """The Fréchet distance d^2 between N(mu1, sigma1) and N(mu2, sigma2) (module docstring)."""
  mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(
      f"frechet_distance: need means [D] and covariances [D, D] of one D, got {mu1.shape}, {s1.shape}, "
      f"{mu2.shape}, {s2.shape}."
    )
  r1 = _psd_sqrt(s1)
  cross = np.linalg.eigvalsh(r1 @ ((s2 + s2.T) / 2) @ r1)
  tr_sqrt = float(np.sum(np.sqrt(np.clip(cross, 0.0, None))))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def feature_frechet(features_a, features_b) -> float:
  """The Fréchet distance between the Gaussians fitted to two feature sets [N, D], [M, D]."""
  return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def diversity(images, labels) -> float:
  """Mean pairwise Euclidean distance between distinct samples of one class, averaged over the
  classes that have at least two samples (images [B, ...], labels [B])."""
  x = np.asarray(images, np.float64).reshape(len(labels), -1)
  y = np.asarray(labels).reshape(-1)
  means = []
  for c in np.unique(y):
    xc = x[y == c]
    if xc.shape[0] < 2:
      continue
    sq = np.sum(xc**2, axis=1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * xc @ xc.T, 0.0, None)
    iu = np.triu_indices(xc.shape[0], k=1)
    means.append(float(np.mean(np.sqrt(d2[iu]))))
  if not means:
    raise ValueError("diversity: no class has two samples.")
  return float(np.mean(means))


def class_accuracy(world: world_lib.ImageWorld, images, labels) -> float:
  """Share of the images the fixed classifier assigns to their prompt's class."""
  return float(np.mean(np.asarray(world.predicted_class(images)) == np.asarray(labels)))


def evaluate(
  world: world_lib.ImageWorld,
  policy_images,
  base_images,
  labels,
  *,
  data_images=None,
  confidence: float = 0.95,
) -> Dict[str, float]:
  """Every metric of the module docstring for the policy's and the base's samples of the same
  class prompts `labels` [B] (sample i of each drawn for labels[i]); the Fréchet distance is to
  `data_images` (default: the world's held-out images). Returns a flat dict of floats."""
  labels = np.asarray(labels)
  data = world.eval_images if data_images is None else data_images
  data_features = np.asarray(world.features(data))
  r_pol = np.asarray(world.gold_reward(policy_images, labels), np.float64)
  r_base = np.asarray(world.gold_reward(base_images, labels), np.float64)
  wr = lm_evaluation.win_rate(r_pol, r_base, confidence=confidence)
  out = {"num_samples": int(labels.shape[0])}
  for name, images, r in (("policy", policy_images, r_pol), ("base", base_images, r_base)):
    out[f"gold_reward_{name}"] = float(np.mean(r))
    out[f"class_log_prob_{name}"] = float(np.mean(np.asarray(world.class_log_prob(images, labels))))
    out[f"ink_{name}"] = float(np.mean(np.asarray(world_lib.ink(images))))
    out[f"second_class_log_prob_{name}"] = float(
      np.mean(world.metric_scores(images, labels, ("second_class_log_prob",))[0])
    )
    out[f"class_accuracy_{name}"] = class_accuracy(world, images, labels)
    out[f"diversity_{name}"] = diversity(images, labels)
    out[f"frechet_{name}"] = feature_frechet(np.asarray(world.features(images)), data_features)
  out.update(
    win_rate_vs_base=wr.rate,
    win_rate_ci95_low=wr.low,
    win_rate_ci95_high=wr.high,
    wins=wr.wins,
    ties=wr.ties,
    losses=wr.losses,
  )
  return out


def sample_grid(images, *, columns: Optional[int] = None, pad: int = 1) -> np.ndarray:
  """Images [B, H, W, 1] in [-1, 1] as one uint8 greyscale array (0 = -1, 255 = +1): rows of
  `columns` images (default: ceil(sqrt(B))) with `pad` black pixels between and around them;
  values outside [-1, 1] are clipped. For a grid by class, order the images class-major."""
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or x.shape[-1] != 1 or x.shape[0] == 0:
    raise ValueError(f"sample_grid: need images [B > 0, H, W, 1], got shape {x.shape}.")
  b, h, w, _ = x.shape
  cols = columns or int(np.ceil(np.sqrt(b)))
  rows = -(-b // cols)
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), np.uint8)
  pix = np.round((np.clip(x[..., 0], -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  for i in range(b):
    r, c = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    grid[top : top + h, left : left + w] = pix[i]
  return grid
