"""The image world (pofx.diffusion.world): its data, split, classifier, gold reward and labels,
against values derived here with numpy (the raw digits, the reward's formula, Bradley-Terry
frequencies)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx.diffusion import world as world_lib


@pytest.fixture(scope="module")
def world():
  return world_lib.ImageWorld(world_lib.ImageWorldConfig(seed=0))


def _np_logits(params, images):
  h = np.asarray(images, np.float64).reshape(len(images), -1)
  for layer in params[:-1]:
    h = np.maximum(h @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64), 0.0)
  return h @ np.asarray(params[-1]["w"], np.float64) + np.asarray(params[-1]["b"], np.float64)


def test_digits_scaled_to_minus_one_one():
  images, labels = world_lib.load_digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
  assert labels.shape == (1797,) and sorted(set(labels.tolist())) == list(range(10))
  # The first digit of the UCI set (a zero), first row in grey levels 0..16: 0 0 5 13 9 1 0 0.
  np.testing.assert_allclose(images[0, 0, :, 0], np.array([0, 0, 5, 13, 9, 1, 0, 0]) / 8.0 - 1.0)
  assert labels[0] == 0 and images.min() == -1.0 and images.max() == 1.0
  # The same digits as scikit-learn's own loader gives.
  from sklearn.datasets import load_digits

  d = load_digits()
  np.testing.assert_array_equal(images[..., 0], d.images / 8.0 - 1.0)
  np.testing.assert_array_equal(labels, d.target)


def test_split_partitions_the_digits(world):
  n_eval, n_train = len(world.eval_labels), len(world.labels)
  assert n_eval + n_train == 1797 and n_eval == round(0.2 * 1797)
  # Train and held-out images together are the whole set (as a multiset of image+label rows).
  all_images, all_labels = world_lib.load_digits()
  rows = lambda x, y: np.concatenate([x.reshape(len(y), -1), y[:, None]], axis=1)
  joined = np.concatenate([rows(world.images, world.labels), rows(world.eval_images, world.eval_labels)])
  order = lambda a: a[np.lexsort(a.T[::-1])]
  np.testing.assert_array_equal(order(joined), order(rows(all_images, all_labels)))
  assert len(set(world.eval_labels.tolist())) == 10


def test_classifier_reads_held_out_digits(world):
  acc = np.mean(np.asarray(world.predicted_class(world.eval_images)) == world.eval_labels)
  assert acc >= 0.9


def test_classifier_is_deterministic_per_seed():
  images, labels = world_lib.load_digits()
  cfg = world_lib.ImageWorldConfig(seed=3, classifier_steps=5, classifier_hidden=8, classifier_features=4)
  a = world_lib.train_classifier(images[:64], labels[:64], cfg)
  b = world_lib.train_classifier(images[:64], labels[:64], cfg)
  c = world_lib.train_classifier(images[:64], labels[:64], cfg.replace(seed=4))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a[0]["w"]), np.asarray(c[0]["w"]))


def want_at(world, x, y):
  """The gold reward in float64 NumPy: log-softmax of the classifier's logits at y, plus 4 * ink."""
  z = _np_logits(world.classifier, x).astype(np.float64)
  logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
  return logp[np.arange(len(y)), y] + 4.0 * ((x.reshape(len(x), -1).astype(np.float64) + 1) / 2).mean(1)


def test_gold_reward_is_log_prob_plus_weighted_ink(world):
  x, y = world.eval_images[:16], world.eval_labels[:16]
  x = np.concatenate([x, np.clip(x + 0.5, -1, 1)])  # also brighter images
  y = np.concatenate([y, (y + 1) % 10])  # and wrong prompts
  want = want_at(world, x, y)
  np.testing.assert_allclose(np.asarray(world.gold_reward(x, y)), want, rtol=1e-4, atol=1e-4)
  # The JAX version (TailorPO-G's reward guidance): the same values, jitted, and its gradient in the
  # image against central differences of the float64 formula along a random direction.
  gold = jax.jit(world.gold_reward_jax)
  np.testing.assert_allclose(np.asarray(gold(x, y)), want, rtol=1e-4, atol=1e-4)
  v = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
  h = 1e-3
  numeric = (want_at(world, x + h * v, y) - want_at(world, x - h * v, y)) / (2 * h)
  grad = jax.grad(lambda im: jnp.sum(world.gold_reward_jax(im, y)))(jnp.asarray(x))
  np.testing.assert_allclose(np.sum(np.asarray(grad) * v, axis=(1, 2, 3)), numeric, rtol=2e-2, atol=2e-3)
  # A fully dark image has no ink: its reward is the log-prob alone.
  dark = -np.ones((1, 8, 8, 1), np.float32)
  np.testing.assert_allclose(
    np.asarray(world.gold_reward(dark, np.array([3]))), np.asarray(world.class_log_prob(dark, np.array([3]))), atol=1e-6
  )


def test_bradley_terry_frequencies(world):
  r_a = np.repeat(np.array([0.0, 0.1, -0.3, 1.0], np.float32), 20000)
  r_b = np.zeros_like(r_a)
  prefer = np.asarray(world.bradley_terry(jax.random.PRNGKey(0), r_a, r_b)).reshape(4, -1).mean(1)
  want = 1.0 / (1.0 + np.exp(-4.0 * np.array([0.0, 0.1, -0.3, 1.0])))  # label_scale 4
  np.testing.assert_allclose(prefer, want, atol=0.01)


def test_binary_feedback(world):
  r = np.array([0.3, -1.0, 2.0, 0.5, 0.0], np.float32)  # median 0.3
  np.testing.assert_array_equal(
    np.asarray(world.binary_feedback(None, r, sample=False)), [False, False, True, True, False]
  )
  many = np.repeat(np.array([0.8, 0.0], np.float32), 20000)
  freq = np.asarray(world.binary_feedback(jax.random.PRNGKey(1), many, threshold=0.5)).reshape(2, -1).mean(1)
  np.testing.assert_allclose(freq, 1.0 / (1.0 + np.exp(-4.0 * np.array([0.3, -0.5]))), atol=0.01)


def test_stepwise_rewards_and_labels(world):
  x = world.eval_images[:6]
  y = world.eval_labels[:6]
  traj = np.stack([np.clip(x + 2.0 * s, -1, 1) for s in (-0.5, 0.0, 0.1)])  # [S=3, B=6, 8, 8, 1]
  r = np.asarray(world.stepwise_rewards(traj, y))
  assert r.shape == (3, 6)
  for s in range(3):
    np.testing.assert_allclose(r[s], np.asarray(world.gold_reward(traj[s], y)), atol=1e-5)
  # Trajectory a: the data at every step; b: fully dark images (no ink, an unsure classifier).
  # Every reward gap is then >= 4 * ink(data) ~ 1.2, so P(a preferred) >= sigmoid(4 * 1.2) ~ 0.99.
  dark = -np.ones_like(traj)
  gaps = world.stepwise_rewards(np.stack([x] * 3), y) - world.stepwise_rewards(dark, y)
  assert gaps.min() > 0.8
  labels = world.stepwise_labels(jax.random.PRNGKey(0), np.stack([x] * 3), dark, y)
  assert labels.shape == (3, 6) and labels.dtype == bool and labels.mean() > 0.8


def test_bad_inputs_named(world):
  with pytest.raises(ValueError, match=r"\[B, 8, 8, 1\]"):
    world.gold_reward(np.zeros((2, 8, 8), np.float32), np.array([0, 1]))
  with pytest.raises(ValueError, match="labels must be"):
    world.gold_reward(np.zeros((2, 8, 8, 1), np.float32), np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="eval_fraction"):
    world_lib.ImageWorldConfig(eval_fraction=1.0)


def test_prompt_encoder_embeds_bold_and_the_digit():
  """The prompt of class c is ("bold", DIGIT_WORDS[c]); its embedding rows are the documented draw:
  standard normal `[11, dim]` from numpy's generator seeded [seed, 2112], row 0 "bold", row 1 + c the digit."""
  assert world_lib.PROMPT_VOCAB[0] == "bold" and world_lib.PROMPT_VOCAB[1 + 3] == "three"
  np.testing.assert_array_equal(world_lib.prompt_tokens(np.array([3, 0, 9])), [[0, 4], [0, 1], [0, 10]])
  encoder = world_lib.PromptEncoder(seed=5, dim=4)
  rows = np.random.default_rng([5, 2112]).standard_normal((11, 4)).astype(np.float32)
  labels = np.array([7, 2, 7], np.int32)
  got = np.asarray(jax.jit(encoder)(labels))
  assert got.shape == (3, 2, 4) and got.dtype == np.float32
  np.testing.assert_array_equal(got[:, 0], np.stack([rows[0]] * 3))
  np.testing.assert_array_equal(got[:, 1], rows[[8, 3, 8]])
  assert not np.allclose(np.asarray(world_lib.PromptEncoder(seed=6, dim=4)(labels)), got)
  assert hash(encoder) == hash(world_lib.PromptEncoder(seed=5, dim=4))  # usable in a static jit argument
  with pytest.raises(ValueError, match="labels must be"):
    world_lib.prompt_tokens(np.array([10]))
  with pytest.raises(ValueError, match="dim must be a positive integer"):
    world_lib.PromptEncoder(seed=0, dim=0)


def test_metric_scores_and_the_second_classifier(world):
  x, y = world.eval_images[:32], world.eval_labels[:32]
  scores = world.metric_scores(x, y, ("class_log_prob", "second_class_log_prob", "ink", "gold_reward"))
  assert scores.shape == (4, 32) and scores.dtype == np.float32
  # The second classifier's log-probability, recomputed here from its parameters.
  z = _np_logits(world.second_classifier, x)
  logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
  np.testing.assert_allclose(scores[1], logp[np.arange(32), y], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(scores[2], ((x.reshape(32, -1) + 1) / 2).mean(1), rtol=1e-6)
  np.testing.assert_allclose(scores[3], scores[0] + 4.0 * scores[2], rtol=1e-4, atol=1e-4)
  # Another model of the same concept: other weights, as accurate on the held-out digits.
  assert not np.array_equal(np.asarray(world.second_classifier[0]["w"]), np.asarray(world.classifier[0]["w"]))
  z2 = _np_logits(world.second_classifier, world.eval_images)
  assert np.mean(np.argmax(z2, 1) == world.eval_labels) >= 0.9
  with pytest.raises(ValueError, match="unknown metric 'clip'"):
    world.metric_scores(x, y, ("clip",))
