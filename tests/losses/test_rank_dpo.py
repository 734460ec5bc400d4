"""RankDPO (`pofx.losses.rank_dpo`, arXiv:2410.18013, Algorithm 2) against hand computations in numpy.

The positions, pairs and weights of the examples are written out here (from the numbers, not from
the code); the loss is then `-sum Delta_ij log sigmoid(beta (lr_i - lr_j))` over those pairs.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx

BETA = 50.0  # small enough that the logits beta * (lr_i - lr_j) (|lr| ~ 0.03) stay unsaturated


def _lists(lr, scores):
  """Policy / reference ListLogps whose log-ratios are `lr` (the reference non-zero)."""
  lr = np.asarray(lr, np.float64)
  ref = -0.1 - 0.05 * np.arange(lr.size).reshape(lr.shape)
  return (
    pofx.ListLogps(jnp.asarray(ref + lr, jnp.float32)),
    pofx.ListLogps(jnp.asarray(ref, jnp.float32)),
    jnp.asarray(scores, jnp.float32),
  )


def _hand_loss(lr, phi, pos, pairs, inverse=True, beta=BETA):
  d = np.log1p(np.asarray(pos, np.float64))
  d = 1.0 / d if inverse else d
  total = 0.0
  for i, j in pairs:
    weight = abs(2.0 ** phi[i] - 2.0 ** phi[j]) * abs(d[i] - d[j])
    total -= weight * -np.logaddexp(0.0, -beta * (lr[i] - lr[j]))  # log sigmoid(x) = -log(1 + e^-x)
  return total


# Example A: four images, distinct labels.
LR_A = [0.02, -0.01, 0.03, 0.0]
PHI_A = [1 / 3, 1.0, 0.0, 2 / 3]
PAIRS_A = [(1, 3), (1, 0), (1, 2), (3, 0), (3, 2), (0, 2)]  # i above j: phi_i > phi_j
POS_PREDICTED_A = [2, 4, 1, 3]  # lr descending: item 2 (0.03), 0 (0.02), 3 (0.0), 1 (-0.01)
POS_LABELS_A = [3, 1, 4, 2]  # phi descending: item 1, 3, 0, 2


@pytest.mark.parametrize(
  "ranking, discount, pos",
  [
    ("predicted", "inverse", POS_PREDICTED_A),
    ("predicted", "difference", POS_PREDICTED_A),
    ("labels", "inverse", POS_LABELS_A),
    ("labels", "difference", POS_LABELS_A),
  ],
)
def test_hand_example_four_images(ranking, discount, pos):
  policy, reference, scores = _lists([LR_A], [PHI_A])
  got = pofx.losses.rank_dpo(policy, reference, beta=BETA, ranking=ranking, discount=discount, scores=scores)
  want = _hand_loss(LR_A, PHI_A, pos, PAIRS_A, inverse=discount == "inverse")
  np.testing.assert_allclose(np.asarray(got), [want], rtol=2e-5)
  # The gradient in the policy's log-probs: dL/dlr_k = -sum Delta_ij beta sigmoid(-beta (lr_i - lr_j)) (1[k=i] - 1[k=j]).
  d = np.log1p(np.asarray(pos, np.float64))
  d = 1.0 / d if discount == "inverse" else d
  want_grad = np.zeros(4)
  for i, j in PAIRS_A:
    g = abs(2.0 ** PHI_A[i] - 2.0 ** PHI_A[j]) * abs(d[i] - d[j]) * BETA / (1.0 + np.exp(BETA * (LR_A[i] - LR_A[j])))
    want_grad[i] -= g
    want_grad[j] += g
  grad = jax.grad(
    lambda x: pofx.losses.rank_dpo(
      pofx.ListLogps(x), reference, beta=BETA, ranking=ranking, discount=discount, scores=scores
    ).sum()
  )(policy.logps)
  np.testing.assert_allclose(np.asarray(grad)[0], want_grad, rtol=1e-4, atol=1e-6)


def test_ties_make_no_pair_and_share_their_position():
  # phi = (0.5, 1, 0.5, 0) and policy == reference (lr = 0): the predicted ranking falls back on the
  # labels; items 0 and 2 tie on both and share positions 2 and 3 (2.5 each); (0, 2) is no pair.
  phi = [0.5, 1.0, 0.5, 0.0]
  pairs = [(1, 0), (1, 2), (1, 3), (0, 3), (2, 3)]
  want = _hand_loss([0.0] * 4, phi, [2.5, 1, 2.5, 4], pairs)
  policy, reference, scores = _lists([[0.0] * 4], [phi])
  got = pofx.losses.rank_dpo(policy, reference, beta=BETA, scores=scores)
  np.testing.assert_allclose(np.asarray(got), [want], rtol=1e-5)
  assert want > 0
  # All labels equal: no pair, loss and gradient exactly 0.
  policy, reference, scores = _lists([LR_A], [[0.5] * 4])
  fn = lambda x: pofx.losses.rank_dpo(pofx.ListLogps(x), reference, beta=BETA, scores=scores).sum()
  value, grad = jax.value_and_grad(fn)(policy.logps)
  assert float(value) == 0.0 and not np.any(np.asarray(grad))


def test_inverse_weights_are_the_dcg_change_of_a_swap_and_the_caption_example():
  # LambdaRank's |delta DCG|: DCG(pos) = sum_i 2^phi_i / log(1 + pos_i), recomputed with i and j swapped.
  dcg = lambda pos: sum(2.0**p / math.log1p(q) for p, q in zip(PHI_A, pos))
  w = np.asarray(pofx.losses.rank_dpo_weights(jnp.asarray([LR_A]), jnp.asarray([PHI_A])))[0]
  for i, j in itertools.permutations(range(4), 2):
    swapped = list(POS_PREDICTED_A)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    want = abs(dcg(POS_PREDICTED_A) - dcg(swapped)) if (i, j) in PAIRS_A else 0.0
    np.testing.assert_allclose(w[i, j], want, rtol=1e-5, atol=1e-7)
  # Figure 2's caption: the predicted ranking the inverse of the labels' (4 images), the pair at ranks
  # (1, 4) gets a larger weight than the pair at (2, 3), under either discount form.
  phi, lr = jnp.asarray([[1.0, 2 / 3, 1 / 3, 0.0]]), jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
  for discount in ("inverse", "difference"):
    w = np.asarray(pofx.losses.rank_dpo_weights(lr, phi, discount=discount))[0]
    assert w[0, 3] > w[1, 2] > 0, (discount, w)


def test_two_images_are_weighted_diffusion_dpo():
  # K = 2 (two real items of a list padded to four, NaN scores), phi (1, 0): Delta = (2 - 1) |1/log 2 - 1/log 3|,
  # times DPO's -log sigmoid(beta (lr_w - lr_l)).
  for lr in ([0.01, -0.02], [-0.03, 0.01]):
    policy, reference, scores = _lists([lr + [0.0, 0.0]], [[1.0, 0.0, float("nan"), float("nan")]])
    got = pofx.losses.rank_dpo(policy, reference, beta=BETA, scores=scores)
    dpo = np.logaddexp(0.0, -BETA * (lr[0] - lr[1]))
    np.testing.assert_allclose(np.asarray(got), [(1 / math.log(2) - 1 / math.log(3)) * dpo], rtol=2e-5)


@pytest.mark.parametrize("ranking", ["predicted", "labels"])
@pytest.mark.parametrize("discount", ["inverse", "difference"])
def test_permuting_a_list_leaves_the_loss_unchanged(ranking, discount):
  rng = np.random.default_rng(3)
  lr = rng.normal(0.0, 0.02, (3, 4))
  lr[2] = 0.0  # policy == reference: every predicted position tied
  phi = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], (3, 4))  # with ties
  phi[0, :2], phi[2, :2] = 0.75, 0.25
  kw = dict(beta=BETA, ranking=ranking, discount=discount)
  for n in range(3):  # one list at a time: the examples' [1, 4] shapes
    policy, reference, scores = _lists(lr[n : n + 1], phi[n : n + 1])
    base = float(pofx.losses.rank_dpo(policy, reference, scores=scores, **kw)[0])
    assert base > 0
    for seed in range(3):
      perm = np.random.default_rng(seed).permutation(4)
      p, r, s = (pofx.ListLogps(policy.logps[:, perm]), pofx.ListLogps(reference.logps[:, perm]), scores[:, perm])
      np.testing.assert_allclose(float(pofx.losses.rank_dpo(p, r, scores=s, **kw)[0]), base, rtol=1e-6)


def test_padding_items_take_no_part():
  # A NaN score marks padding: the loss (and its gradient) is that of the list without the item,
  # even where the padding item's log-probs are NaN.
  policy, reference, scores = _lists([LR_A[:3] + [0.0]], [PHI_A[:3] + [float("nan")]])
  logps = policy.logps.at[0, 3].set(jnp.nan)
  fn = lambda x: pofx.losses.rank_dpo(pofx.ListLogps(x), reference, beta=BETA, scores=scores).sum()
  value, grad = jax.value_and_grad(fn)(logps)
  # Without item 3: phi (1/3, 1, 0), lr (0.02, -0.01, 0.03): predicted positions (2, 3, 1).
  want = _hand_loss(LR_A[:3], PHI_A[:3], [2, 3, 1], [(1, 0), (1, 2), (0, 2)])
  np.testing.assert_allclose(float(value), want, rtol=2e-5)
  assert np.all(np.isfinite(np.asarray(grad))) and float(grad[0, 3]) == 0.0


def test_bad_inputs_are_refused():
  policy, reference, scores = _lists([LR_A], [PHI_A])
  with pytest.raises(ValueError, match=r"invalid ranking='best'; allowed: \['labels', 'predicted'\]"):
    pofx.losses.rank_dpo(policy, reference, ranking="best", scores=scores)
  with pytest.raises(ValueError, match=r"invalid discount='log'; allowed: \['difference', 'inverse'\]"):
    pofx.losses.rank_dpo(policy, reference, discount="log", scores=scores)
  with pytest.raises(TypeError, match="`policy` must be a pofx.ListLogps, got PairLogps"):
    pofx.losses.rank_dpo(pofx.PairLogps(jnp.zeros(1), jnp.zeros(1)), reference, scores=scores)
  with pytest.raises(ValueError, match=r"scores must be \[B, K\] = \(1, 4\)"):
    pofx.losses.rank_dpo(policy, reference, scores=scores[:, :3])
  with pytest.raises(ValueError, match="a list needs K >= 2 items"):
    pofx.losses.rank_dpo(
      pofx.ListLogps(policy.logps[:, :1]), pofx.ListLogps(reference.logps[:, :1]), scores=scores[:, :1]
    )
  with pytest.raises(ValueError, match="beta"):
    pofx.losses.rank_dpo(policy, reference, beta=0.0, scores=scores)
