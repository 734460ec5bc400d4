r"""A controlled image world with a known gold reward: class-conditioned 8x8 digits, a fixed
classifier, and Bradley-Terry, binary and step-wise labels.

The images are the 1,797 handwritten digits (8x8, 16 grey levels, 10 classes) that scikit-learn
ships inside its wheel (`sklearn.datasets.load_digits`, the UCI "optical recognition of
handwritten digits" test set; nothing is downloaded), scaled to [-1, 1] and laid out NHWC
`[N, 8, 8, 1]` as every image in pofx. The prompt is the digit's class. They are small enough
for a 2-core CPU to pretrain a class-conditioned denoiser on in a minute, and real enough that
the samples of a weak denoiser are visibly bad.

    w = world.ImageWorld(world.ImageWorldConfig(seed=0))
    w.images, w.labels                       # [N, 8, 8, 1] float32 in [-1, 1], [N] int32 (train split)
    r = w.gold_reward(images, labels)        # [B] float32
    prefer_a = w.bradley_terry(key, r_a, r_b)

Fixed classifier. A small MLP (64 -> `classifier_hidden` -> `classifier_features` -> 10, ReLU)
trained at world creation on the train split by full-batch Adam for `classifier_steps` steps, its
initialisation and the Gaussian noise it is trained with (std `classifier_noise` on half of every
batch, so that it scores imperfect samples smoothly) drawn from the world's seed: the same seed
gives the same classifier. Its penultimate activations ([B, classifier_features]) are the
features of the Fréchet distance (`pofx.diffusion.evaluation`).

Gold reward of an image x for the prompt class c:

    r*(x, c) = log p_clf(c | x) + style_weight * ink(x),      ink(x) = mean over pixels of (x + 1) / 2

so r* prefers images the fixed classifier reads as the prompt's digit (at most 0) and, among
those, thicker / brighter strokes (ink in [0, 1]; the data's mean ink is about 0.3). Too much ink
turns a digit into a blob the classifier no longer recognises: over-optimising the style term is
reward hacking that the class accuracy and the Fréchet distance show.

Labels, all on the gold reward:
- Bradley-Terry (pairs): `P(a > b) = sigmoid(label_scale * (r*(a) - r*(b)))`, sampled with a key.
- binary feedback (KTO-style): `P(desirable) = sigmoid(label_scale * (r*(x) - threshold))`
  sampled, or deterministic `r*(x) > threshold` (`sample=False`); the threshold is by default the
  median of the rewards given, so that about half are desirable.
- step-wise (step-aware methods such as SPO, arXiv:2406.04314): the gold reward of the predicted
  clean image at each step of two trajectories, and a Bradley-Terry label per step
  (`stepwise_labels`).

Several metrics (`metric_scores`, names in `METRICS`), for methods that label by more than one
scorer (BalancedDPO's majority vote): the classifier's log-probability of the class, a second
classifier's (`second_classifier`: the same architecture and images, other draws), the ink and
the gold reward.

Prompts (for a cross-attention denoiser, `pofx.diffusion.unet.UNetConditionConfig`). The prompt of
class c is the two-token sequence `("bold", DIGIT_WORDS[c])`: the style request the gold reward's
ink term rewards, and the digit. `PromptEncoder(seed, dim)` is the world's fixed text encoder: a
table of `len(PROMPT_VOCAB)` rows of `dim` standard-normal entries drawn from the seed (a stream of
its own), not trained; a prompt's embedding sequence `[L=2, dim]` is its tokens' rows (no position
term: the two tokens are of different kinds). `encoder(labels)` maps class labels `[B]` to
`[B, 2, dim]`, so the program passes class labels everywhere and the denoiser cross-attends to
the prompt (Rombach et al. 2022, arXiv:2112.10752, section 3.3: a frozen encoder tau of the
prompt, attended to by the U-Net).

Train / held-out split: a permutation of the images drawn from the seed sends `eval_fraction` of
them to the held-out split (`eval_images`, `eval_labels`), which the classifier and the denoiser
never see; the Fréchet distance compares samples with it.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_VOCAB = ("bold",) + DIGIT_WORDS
# The per-image metrics of `ImageWorld.metric_scores` (BalancedDPO's voters).
METRICS = ("class_log_prob", "second_class_log_prob", "ink", "gold_reward")


def prompt_tokens(labels) -> np.ndarray:
  """The token ids `[B, 2]` (into `PROMPT_VOCAB`) of the prompts of classes `labels [B]`: ("bold", digit)."""
  y = np.asarray(labels)
  y = _check_labels(y, len(y) if y.ndim == 1 else 0)
  return np.stack([np.full_like(y, PROMPT_VOCAB.index("bold")), y + PROMPT_VOCAB.index("zero")], axis=1)


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
  """The world's fixed prompt encoder (module docstring): class labels `[B]` -> the embedding
  sequence `[B, 2, dim]` float32 of their prompts. Hashable; the table is drawn from `seed`."""

  seed: int
  dim: int

  def __post_init__(self):
    if not isinstance(self.dim, (int, np.integer)) or isinstance(self.dim, bool) or self.dim < 1:
      raise ValueError(f"PromptEncoder.dim must be a positive integer, got {self.dim!r}.")

  def table(self) -> np.ndarray:
    """`[len(PROMPT_VOCAB), dim]` standard-normal float32, from `seed` (its own stream)."""
    return np.random.default_rng([self.seed, 2112]).standard_normal((len(PROMPT_VOCAB), self.dim)).astype(np.float32)

  def class_embeddings(self) -> np.ndarray:
    """`[NUM_CLASSES, 2, dim]`: the embedding sequence of every class's prompt."""
    return self.table()[prompt_tokens(np.arange(NUM_CLASSES))]

  def __call__(self, labels):
    """`[B, 2, dim]` float32 (a JAX array: usable inside a jitted denoiser) of class labels `[B]` int."""
    return jax.numpy.take(jax.numpy.asarray(self.class_embeddings()), labels, axis=0)


@dataclasses.dataclass(frozen=True)
class ImageWorldConfig:
  """The image world's settings.

  Attributes:
    seed: the train / held-out split, the classifier's initialisation and its training noise.
    style_weight: w, the weight of the ink term in the gold reward (0 = the classifier alone).
    label_scale: Bradley-Terry (and binary feedback) inverse temperature on reward differences.
    eval_fraction: share of the images held out (never seen by the classifier or the denoiser).
    classifier_hidden, classifier_features: widths of the classifier's two hidden layers (the
      second is the feature layer of the Fréchet distance).
    classifier_steps, classifier_lr: full-batch Adam steps and learning rate of the classifier.
    classifier_noise: std of the Gaussian noise added to half of the classifier's training images.
  """

  seed: int = 0
  style_weight: float = 4.0
  label_scale: float = 4.0
  eval_fraction: float = 0.2
  classifier_hidden: int = 64
  classifier_features: int = 32
  classifier_steps: int = 200
  classifier_lr: float = 1e-2
  classifier_noise: float = 0.3

  def __post_init__(self):
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"ImageWorldConfig.eval_fraction must be in (0, 1), got {self.eval_fraction!r}.")
    if self.label_scale < 0:
      raise ValueError(f"ImageWorldConfig.label_scale must be >= 0, got {self.label_scale!r}.")
    for name in ("classifier_hidden", "classifier_features", "classifier_steps"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"ImageWorldConfig.{name} must be an integer >= 1, got {v!r}.")
    if not self.classifier_lr > 0:
      raise ValueError(f"ImageWorldConfig.classifier_lr must be > 0, got {self.classifier_lr!r}.")
    if self.classifier_noise < 0:
      raise ValueError(f"ImageWorldConfig.classifier_noise must be >= 0, got {self.classifier_noise!r}.")

  def replace(self, **changes) -> ImageWorldConfig:
    return dataclasses.replace(self, **changes)


def digits_file() -> str:
  """The path of scikit-learn's copy of the digits (`sklearn/datasets/data/digits.csv.gz`, what
  `sklearn.datasets.load_digits` reads), found without importing scikit-learn (seconds)."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None or spec.origin is None:
    raise ImportError("pofx.diffusion.world needs scikit-learn (its wheel ships the digits): pip install scikit-learn")
  return os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")


def load_digits():
  """All 1,797 digits of scikit-learn's copy: images [N, 8, 8, 1] float32 in [-1, 1] (grey level
  g in 0..16 -> g / 8 - 1) and labels [N] int32. The file's rows are the 64 grey levels then the
  class, comma-separated."""
  with gzip.open(digits_file(), "rt") as f:
    data = np.loadtxt(f, delimiter=",", dtype=np.float32)
  images = (data[:, :-1].reshape(-1, 8, 8) / 8.0 - 1.0)[..., None]
  return images.astype(np.float32), data[:, -1].astype(np.int32)


def ink(images) -> np.ndarray:
  """The style term: the mean over pixels of (x + 1) / 2, per image ([B, H, W, C] -> [B])."""
  x = np.asarray(images, np.float32)
  return np.mean((x + 1.0) * 0.5, axis=tuple(range(1, x.ndim)))


# The fixed classifier (numpy: a few hundred full-batch steps of a small MLP take about a second
# and compile nothing) ----------------------------------------------------------------------------


def _init_classifier(rng, hidden: int, features: int):
  sizes = [int(np.prod(IMAGE_SHAPE)), hidden, features, NUM_CLASSES]
  return [
    {"w": (rng.standard_normal((m, n)) * np.sqrt(2.0 / m)).astype(np.float32), "b": np.zeros((n,), np.float32)}
    for m, n in zip(sizes[:-1], sizes[1:])
  ]


def _forward(params, images, xp=np):
  """Every layer's activations: [inputs, hidden, features, logits]; `xp` the array module (numpy, or
  jax.numpy for a traceable, differentiable forward)."""
  x = xp.asarray(images, xp.float32)
  acts = [x.reshape(x.shape[0], -1)]
  for i, layer in enumerate(params):
    z = acts[-1] @ layer["w"] + layer["b"]
    acts.append(xp.maximum(z, 0.0) if i < len(params) - 1 else z)
  return acts


def classifier_features(params, images) -> np.ndarray:
  """The classifier's penultimate activations [B, classifier_features] of images [B, 8, 8, 1]."""
  return _forward(params, images)[-2]


def classifier_logits(params, images) -> np.ndarray:
  """The classifier's logits [B, 10]."""
  return _forward(params, images)[-1]


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def train_classifier(images, labels, config: ImageWorldConfig, *, stream: int = 18):
  """The fixed classifier's parameters: full-batch Adam (beta1 0.9, beta2 0.999, eps 1e-8) on the
  mean softmax cross-entropy, with Gaussian noise of std `classifier_noise` added to the second
  half of the images at every step; every draw (initialisation, noise) from `config.seed` and
  `stream` (another stream: another classifier of the same data), so the same inputs give the
  same classifier. BLAS runs on one thread meanwhile (threadpoolctl; the
  previous limit is restored on return): these small products are slower threaded, far slower on
  a busy machine."""
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    return _train_classifier(images, labels, config, stream)


def _train_classifier(images, labels, config: ImageWorldConfig, stream: int):
  rng = np.random.default_rng([config.seed, stream])
  params = _init_classifier(rng, config.classifier_hidden, config.classifier_features)
  x = np.asarray(images, np.float32).reshape(len(images), -1)
  y = np.asarray(labels)
  n, half = x.shape[0], x.shape[0] // 2
  onehot = np.eye(NUM_CLASSES, dtype=np.float32)[y]
  m = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in params]
  v = [{k: np.zeros_like(val) for k, val in layer.items()} for layer in params]
  b1, b2, eps, lr = 0.9, 0.999, 1e-8, config.classifier_lr
  for t in range(1, config.classifier_steps + 1):
    xb = x.copy()
    xb[half:] += config.classifier_noise * rng.standard_normal(xb[half:].shape).astype(np.float32)
    acts = _forward(params, xb)
    delta = (np.exp(_log_softmax(acts[-1])) - onehot) / n  # d loss / d logits
    for i in range(len(params) - 1, -1, -1):
      grad = {"w": acts[i].T @ delta, "b": delta.sum(axis=0)}
      if i:
        delta = (delta @ params[i]["w"].T) * (acts[i] > 0)
      for k in ("w", "b"):
        m[i][k] = b1 * m[i][k] + (1 - b1) * grad[k]
        v[i][k] = b2 * v[i][k] + (1 - b2) * grad[k] ** 2
        step = lr * (m[i][k] / (1 - b1**t)) / (np.sqrt(v[i][k] / (1 - b2**t)) + eps)
        params[i][k] = (params[i][k] - step).astype(np.float32)
  return params


# The world -------------------------------------------------------------------------------------


class ImageWorld:
  """The digits, their split, the fixed classifier and the gold reward (module docstring)."""

  def __init__(self, config: ImageWorldConfig = ImageWorldConfig()):
    self.config = config
    images, labels = load_digits()
    perm = np.random.default_rng(config.seed).permutation(images.shape[0])
    n_eval = int(round(config.eval_fraction * images.shape[0]))
    ev, tr = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    self.images, self.labels = images[tr], labels[tr]
    self.eval_images, self.eval_labels = images[ev], labels[ev]
    self.classifier = train_classifier(self.images, self.labels, config)

  @property
  def image_shape(self):
    return IMAGE_SHAPE

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES

  def logits(self, images) -> np.ndarray:
    return classifier_logits(self.classifier, _check_images(images))

  def features(self, images) -> np.ndarray:
    """The classifier's features [B, classifier_features] (the Fréchet distance's space)."""
    return classifier_features(self.classifier, _check_images(images))

  def class_log_prob(self, images, labels) -> np.ndarray:
    """log p_clf(label | image), [B] float32."""
    return _class_log_prob(self.classifier, images, labels)

  @functools.cached_property
  def second_classifier(self):
    """Another classifier of the same architecture and training images, from other draws
    (initialisation and noise: `train_classifier(..., stream=19)`), trained on first use: a second
    scorer of the same concept (one of the several metrics of `metric_scores`)."""
    return train_classifier(self.images, self.labels, self.config, stream=19)

  def metric_scores(self, images, labels, names) -> np.ndarray:
    """Several metrics of the images, higher is better, `[len(names), B]` float32. Names
    (`METRICS`): "class_log_prob" (the fixed classifier's log p(c | x), the gold reward's first
    term), "second_class_log_prob" (`second_classifier`'s), "ink" (the style term), "gold_reward"."""
    x = _check_images(images)
    labels = _check_labels(labels, x.shape[0])
    rows = []
    for name in names:
      if name == "class_log_prob":
        rows.append(self.class_log_prob(x, labels))
      elif name == "second_class_log_prob":
        rows.append(_class_log_prob(self.second_classifier, x, labels))
      elif name == "ink":
        rows.append(ink(x))
      elif name == "gold_reward":
        rows.append(self.gold_reward(x, labels))
      else:
        raise ValueError(f"ImageWorld.metric_scores: unknown metric {name!r}; allowed: {list(METRICS)}.")
    return np.stack([np.asarray(r, np.float32) for r in rows]) if rows else np.zeros((0, x.shape[0]), np.float32)

  def gold_reward(self, images, labels) -> np.ndarray:
    """r*(x, c) = log p_clf(c | x) + style_weight * ink(x), [B] float32 (module docstring)."""
    return (self.class_log_prob(images, labels) + self.config.style_weight * ink(images)).astype(np.float32)

  def gold_reward_jax(self, images, labels) -> jax.Array:
    """`gold_reward` written with JAX operations on `jnp` arrays: jittable and differentiable in
    the images (TailorPO-G's reward guidance, `methods.reward_guidance`), [B] float32."""
    x = jnp.asarray(images, jnp.float32)
    logits = _forward(self.classifier, x, jnp)[-1]
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels, jnp.int32)[:, None], axis=1)[:, 0]
    return log_p + self.config.style_weight * jnp.mean((x + 1.0) * 0.5, axis=tuple(range(1, x.ndim)))

  def predicted_class(self, images) -> np.ndarray:
    return np.argmax(self.logits(images), axis=-1).astype(np.int32)

  # Labels ----------------------------------------------------------------------------------------

  def preference_prob(self, reward_a, reward_b) -> np.ndarray:
    """Bradley-Terry: P(a preferred to b) = sigmoid(label_scale * (r_a - r_b)), elementwise."""
    z = self.config.label_scale * (np.asarray(reward_a, np.float64) - np.asarray(reward_b, np.float64))
    return 1.0 / (1.0 + np.exp(-z))

  def bradley_terry(self, key, reward_a, reward_b) -> np.ndarray:
    """Sampled Bradley-Terry labels (a JAX PRNG key): True where a is preferred (any shape)."""
    p = self.preference_prob(reward_a, reward_b)
    return np.asarray(jax.random.uniform(key, p.shape)) < p

  def binary_feedback(self, key, rewards, threshold: Optional[float] = None, *, sample: bool = True) -> np.ndarray:
    """Binary (desirable / undesirable) feedback for KTO-style methods: True = desirable.

    `sample=True`: Bernoulli(sigmoid(label_scale * (r - threshold))) with a JAX PRNG key;
    `sample=False`: r > threshold (no key needed). threshold: None = the median of `rewards`."""
    r = np.asarray(rewards, np.float64)
    t = float(np.median(r)) if threshold is None else float(threshold)
    if not sample:
      return r > t
    return np.asarray(jax.random.uniform(key, r.shape)) < self.preference_prob(r, t)

  def stepwise_rewards(self, x0_predictions, labels) -> np.ndarray:
    """The gold reward of the predicted clean image (clipped to [-1, 1]) at every step:
    x0_predictions [S, B, H, W, C] (step-major, as a sampler's trajectory), labels [B] -> [S, B]."""
    x = np.asarray(x0_predictions, np.float32)
    if x.ndim != 5:
      raise ValueError(f"stepwise_rewards: x0_predictions must be [S, B, H, W, C], got shape {x.shape}.")
    s, b = x.shape[:2]
    labels = _check_labels(labels, b)
    r = self.gold_reward(np.clip(x.reshape((s * b,) + x.shape[2:]), -1.0, 1.0), np.tile(labels, s))
    return r.reshape(s, b)

  def stepwise_labels(self, key, x0_predictions_a, x0_predictions_b, labels) -> np.ndarray:
    """Step-wise Bradley-Terry labels of two trajectories of the same prompts: [S, B] bools, True
    where trajectory a's predicted clean image at that step is preferred."""
    return self.bradley_terry(
      key, self.stepwise_rewards(x0_predictions_a, labels), self.stepwise_rewards(x0_predictions_b, labels)
    )


def _class_log_prob(params, images, labels) -> np.ndarray:
  """A classifier's log p(label | image), [B]."""
  x = _check_images(images)
  logp = _log_softmax(classifier_logits(params, x))
  return logp[np.arange(x.shape[0]), _check_labels(labels, x.shape[0])]


def _check_images(images) -> np.ndarray:
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
    raise ValueError(f"images must be [B, 8, 8, 1] (NHWC, in [-1, 1]), got shape {tuple(x.shape)}.")
  return x


def _check_labels(labels, n: int) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() >= NUM_CLASSES)):
    raise ValueError(f"labels must be [{n}] integers in 0..9, got shape {tuple(y.shape)} dtype {y.dtype}.")
  return y.astype(np.int32)
