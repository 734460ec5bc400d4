"""The train step on the tiny Flax Llama with real PairBatch layouts: every reference strategy and
every perturbation lowers the DPO loss and raises the margins on a small fixed preference set."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pofx import batching, models, perturbations, policy, references, train

CONFIG = models.preset("tiny")
MODEL = models.make(CONFIG)
LOGPS_FN = policy.make_logps_fn(MODEL.apply, MODEL.head, chunk_size=64)
_JIT_LOGPS = jax.jit(LOGPS_FN)  # one compiled program for the cached reference's log-probs


@functools.cache
def _initial(seed):
  return MODEL.init(jax.random.key(seed))


def _init(seed):
  """`MODEL.init(jax.random.key(seed))`, initialised once per seed for the module (each init
  traces the model again); a fresh copy each call, since a train step may donate its state."""
  return jax.tree.map(jnp.array, _initial(seed))


def _pairs(seed=0, n=8):
  """Chosen completions count upward from the last prompt token; rejected are random."""
  rng = np.random.default_rng(seed)
  prompts, chosen, rejected = [], [], []
  for _ in range(n):
    p = rng.integers(1, CONFIG.vocab_size, rng.integers(3, 7))
    c_len, r_len = rng.integers(3, 9, 2)
    prompts.append(p.astype(np.int32))
    chosen.append(((p[-1] + 1 + np.arange(c_len)) % CONFIG.vocab_size).astype(np.int32))
    rejected.append(rng.integers(1, CONFIG.vocab_size, r_len).astype(np.int32))
  return prompts, chosen, rejected


PROMPTS, CHOSEN, REJECTED = _pairs()
BATCH = {"pairs": batching.prompt_shared(PROMPTS, CHOSEN, REJECTED, seq_bucket=8, completion_bucket=8)}


def _reference(name, params):
  ref_params = jax.tree.map(jnp.array, params)
  if name == "frozen":
    return references.frozen(ref_params, LOGPS_FN), {}
  if name == "cached":
    out = _JIT_LOGPS(ref_params, BATCH)
    fp = references.fingerprint(ref_params, vocab=CONFIG.vocab_size, max_prompt_len=8, max_completion_len=8)
    return references.cached(fp, fp), {"ref_chosen_logps": out.chosen, "ref_rejected_logps": out.rejected}
  if name == "multi":
    other = _init(7)
    return references.multi([references.frozen(ref_params, LOGPS_FN), references.frozen(other, LOGPS_FN)]), {}
  if name == "guiding":
    return references.guiding(ref_params, LOGPS_FN), {}
  if name == "synced":
    return references.synced(0.5, 5, LOGPS_FN), {}
  if name == "ema":
    return references.ema(0.9, LOGPS_FN), {}
  raise ValueError(name)


def _train(reference_name, pert, steps=25):
  params = _init(0)
  ref, extra = _reference(reference_name, params)
  opt = optax.adam(3e-3)
  state = train.init_state(params, opt, ref, pert, loss="dpo")
  step = train.make_train_step(LOGPS_FN, opt, loss="dpo", loss_hyper={"beta": 0.5}, reference=ref, perturbation=pert)
  batch = {**BATCH, **extra}
  hist = []
  for i in range(steps):
    state, m = step(state, batch, jax.random.key(i))
    hist.append(jax.device_get(m))
  return hist


@pytest.mark.parametrize("reference_name", ["frozen", "cached", "multi", "guiding", "synced", "ema"])
def test_tiny_llama_learns_with_every_reference(reference_name):
  hist = _train(reference_name, perturbations.none())
  assert hist[-1]["loss"] < hist[0]["loss"] - 0.05, (hist[0]["loss"], hist[-1]["loss"])
  assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"] + 0.05
  assert hist[-1]["rewards/accuracy"] >= 0.75


@pytest.mark.parametrize(
  "pert",
  [
    perturbations.sam(0.05),
    perturbations.sam(0.5, adaptive=True),
    perturbations.awp(0.01),
    perturbations.rwp(0.01, c_min=1.0, steps=3),
  ],
  ids=["sam", "asam", "awp", "rwp"],
)
def test_tiny_llama_learns_with_every_perturbation(pert):
  hist = _train("cached", pert)
  assert hist[-1]["loss"] < hist[0]["loss"] - 0.05
  assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"] + 0.05


def test_padding_pairs_do_not_change_the_loss_or_gradient():
  params = _init(3)
  ref = references.frozen(_init(4), LOGPS_FN)
  opt = optax.sgd(0.1)
  outs = []
  for num_pairs in (None, 11):
    pairs = batching.prompt_shared(PROMPTS, CHOSEN, REJECTED, seq_bucket=8, completion_bucket=8, num_pairs=num_pairs)
    state = train.init_state(params, opt, ref, perturbations.none())
    step = train.make_train_step(LOGPS_FN, opt, loss="dpo", reference=ref, donate=False)
    outs.append(step(state, {"pairs": pairs}, jax.random.key(0)))
  (s0, m0), (s1, m1) = outs
  for k in ("loss", "rewards/margins", "rewards/accuracy", "logps/chosen"):
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s0.params)


# Dropout in the model (off by default) and multi-sample dropout in the step; input embeddings.
DROPOUT = 0.3
DROP_MODEL = models.make(CONFIG.replace(dropout=DROPOUT))
DROP_LOGPS_FN = policy.make_logps_fn(DROP_MODEL.apply, DROP_MODEL.head, chunk_size=64)
SMALL = {"pairs": batching.prompt_shared(PROMPTS[:3], CHOSEN[:3], REJECTED[:3], seq_bucket=8, completion_bucket=8)}


def test_dropout_acts_only_with_a_key_and_the_embedding_offset_is_causal():
  params = _init(0)
  pairs = SMALL["pairs"]
  rows, length = pairs.tokens.shape
  offset = np.zeros((rows, length, CONFIG.hidden_size), np.float32)
  offset[2, 3] = 0.5

  @jax.jit
  def hidden(params, offset):
    args = (params, pairs.tokens, pairs.positions, pairs.segment_ids, pairs.branch_ids)
    k1, k2 = jax.random.key(5), jax.random.key(6)
    return {
      "plain": MODEL.apply(*args),
      "no_key": DROP_MODEL.apply(*args),  # a rate without a key: no dropout
      "rate_0": MODEL.apply(*args, dropout_key=k1),  # a key with rate 0: no dropout
      "k1": DROP_MODEL.apply(*args, dropout_key=k1),
      "k1_again": DROP_MODEL.apply(*args, dropout_key=k1),
      "k2": DROP_MODEL.apply(*args, dropout_key=k2),
      "zero_offset": MODEL.apply(*args, embedding_offset=jnp.zeros_like(offset)),
      "offset": MODEL.apply(*args, embedding_offset=offset),
    }

  h = {k: np.asarray(v) for k, v in hidden(params, jnp.asarray(offset)).items()}
  plain = h["plain"]
  for name in ("no_key", "rate_0", "zero_offset"):
    np.testing.assert_array_equal(h[name], plain, err_msg=name)
  np.testing.assert_array_equal(h["k1"], h["k1_again"])
  assert not np.allclose(h["k1"], plain) and not np.allclose(h["k1"], h["k2"])
  with pytest.raises(ValueError, match="dropout"):
    CONFIG.replace(dropout=1.0)
  # an offset on one token's embedding changes that position and later ones of its row only
  moved = h["offset"]
  np.testing.assert_array_equal(np.delete(moved, 2, axis=0), np.delete(plain, 2, axis=0))
  np.testing.assert_array_equal(moved[2, :3], plain[2, :3])
  assert not np.allclose(moved[2, 3], plain[2, 3])


def test_multi_sample_dropout_averages_the_loss_over_the_masks():
  params = _init(0)
  ref = references.frozen(jax.tree.map(jnp.array, params), LOGPS_FN)
  opt, beta, m = optax.sgd(1.0), 0.5, 2
  rng = jax.random.key(11)
  state = train.init_state(params, opt, ref, perturbations.none())
  step = train.make_train_step(
    DROP_LOGPS_FN, opt, loss="dpo", loss_hyper={"beta": beta}, reference=ref, dropout_samples=m, donate=False
  )
  new, metrics = step(state, SMALL, rng)

  # By hand: M masks keyed by the step's key (its dropout stream), the reference without dropout,
  # the DPO loss written out; the step's loss is their mean and its SGD update the mean gradient.
  @jax.jit
  def by_hand(p):
    ref_logps = LOGPS_FN(p, SMALL)

    def loss_with(q, k):
      logps = DROP_LOGPS_FN(q, {**SMALL, "dropout_key": k})
      h = (logps.chosen - ref_logps.chosen) - (logps.rejected - ref_logps.rejected)
      return jnp.mean(-jax.nn.log_sigmoid(beta * h))

    keys = jax.random.split(jax.random.fold_in(rng, 0x64726F70), m)
    return jax.vmap(jax.value_and_grad(loss_with), in_axes=(None, 0))(p, keys)

  losses, grads = by_hand(params)
  assert abs(float(losses[0] - losses[1])) > 1e-6  # the masks differ
  np.testing.assert_allclose(float(metrics["loss"]), float(jnp.mean(losses)), rtol=1e-5)
  expected = jax.tree.map(lambda p, g: p - jnp.mean(g, axis=0), params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new.params, expected)
  with pytest.raises(ValueError, match="dropout_samples"):
    train.make_train_step(LOGPS_FN, opt, loss="dpo", reference=ref, dropout_samples=-1)


def test_adversarial_embeddings_in_the_step_compose_with_sam():
  params = _init(0)
  ref = references.frozen(jax.tree.map(jnp.array, params), LOGPS_FN)
  opt, radius, beta = optax.sgd(0.1), 0.5, 0.1
  ip, pert = perturbations.adversarial_embeddings(radius, CONFIG.hidden_size), perturbations.sam(0.05)
  state = train.init_state(params, opt, ref, pert)
  step = train.make_train_step(
    LOGPS_FN, opt, loss="dpo", reference=ref, perturbation=pert, input_perturbation=ip, donate=False
  )
  new, metrics = step(state, SMALL, jax.random.key(0))

  # By hand: the DPO loss as a function of the embedding offset, its gradient at zero, each real
  # token moved by radius along it; the step reports the loss there (at theta, SAM's convention).
  @jax.jit
  def by_hand(p):
    ref_logps = LOGPS_FN(p, SMALL)

    def loss_at(offset):
      logps = LOGPS_FN(p, {**SMALL, "embedding_offset": offset})
      h = (logps.chosen - ref_logps.chosen) - (logps.rejected - ref_logps.rejected)
      return jnp.mean(-jax.nn.log_sigmoid(beta * h))

    zero = jnp.zeros(SMALL["pairs"].tokens.shape + (CONFIG.hidden_size,))
    g = jax.grad(loss_at)(zero) * (SMALL["pairs"].segment_ids > 0)[..., None]
    norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
    return loss_at(zero), loss_at(radius * g / jnp.where(norm > 0, norm, 1.0))

  clean, adversarial = by_hand(params)
  np.testing.assert_allclose(float(metrics["loss"]), float(adversarial), rtol=1e-5)
  assert float(adversarial) > float(clean) + 1e-4  # the ascent direction raised the loss
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new.params))
