"""The train step on the tiny Flax Llama with real PairBatch layouts: every reference strategy and
every perturbation lowers the DPO loss and raises the margins on a small fixed preference set."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pofx import batching, models, perturbations, policy, references, train

CONFIG = models.preset("tiny")
MODEL = models.make(CONFIG)
LOGPS_FN = policy.make_logps_fn(MODEL.apply, MODEL.head, chunk_size=64)


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
    out = LOGPS_FN(ref_params, BATCH)
    fp = references.fingerprint(ref_params, vocab=CONFIG.vocab_size, max_prompt_len=8, max_completion_len=8)
    return references.cached(fp, fp), {"ref_chosen_logps": out.chosen, "ref_rejected_logps": out.rejected}
  if name == "multi":
    other = MODEL.init(jax.random.key(7))
    return references.multi([references.frozen(ref_params, LOGPS_FN), references.frozen(other, LOGPS_FN)]), {}
  if name == "guiding":
    return references.guiding(ref_params, LOGPS_FN), {}
  if name == "synced":
    return references.synced(0.5, 5, LOGPS_FN), {}
  if name == "ema":
    return references.ema(0.9, LOGPS_FN), {}
  raise ValueError(name)


def _train(reference_name, pert, steps=25):
  params = MODEL.init(jax.random.key(0))
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
  params = MODEL.init(jax.random.key(3))
  ref = references.frozen(MODEL.init(jax.random.key(4)), LOGPS_FN)
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
