"""The train step on a toy bigram model: traces, accumulation, metrics, non-finite guard.

Learning with every reference strategy and perturbation on the tiny Llama: test_train_llama.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pofx import perturbations, references, train
from tests import toy


def _reference(name, params, logps_fn, batches):
  ref_params = jax.tree.map(jnp.array, params)
  if name == "none":
    return references.none()
  if name == "frozen":
    return references.frozen(ref_params, logps_fn)
  if name == "cached":
    fp = references.fingerprint(ref_params, vocab="toy", max_prompt_len=1, max_completion_len=5)
    return references.cached(fp, fp)
  if name == "multi":
    return references.multi([references.frozen(ref_params, logps_fn), references.frozen(toy.init(9), logps_fn)])
  if name == "guiding":
    return references.guiding(ref_params, logps_fn)
  if name == "synced":
    return references.synced(0.5, 4, logps_fn)
  if name == "ema":
    return references.ema(0.9, logps_fn)
  raise ValueError(name)


def _with_cache(batch, params):
  ref = toy.logps_fn(params, batch)
  return {**batch, "ref_chosen_logps": ref.chosen, "ref_rejected_logps": ref.rejected}


def _run(loss, reference_name, perturbation, steps=30, lr=0.5, loss_hyper=None):
  params = toy.init(0)
  batch = _with_cache(toy.batch(0), params)
  ref = _reference(reference_name, params, toy.logps_fn, [batch])
  opt = optax.adam(lr * 0.1)
  state = train.init_state(params, opt, ref, perturbation, loss=loss, loss_hyper=loss_hyper, rng=jax.random.key(1))
  step = train.make_train_step(
    toy.logps_fn, opt, loss=loss, loss_hyper=loss_hyper, reference=ref, perturbation=perturbation
  )
  history = []
  for i in range(steps):
    state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(2), i))
    history.append(jax.device_get(metrics))
  return state, history


def test_reference_free_loss_and_stateful_loss_run_in_the_step():
  _, hist = _run("simpo", "none", perturbations.none())
  assert hist[-1]["loss"] < hist[0]["loss"]
  _, hist = _run("dpo_shift", "frozen", perturbations.none())
  assert hist[-1]["loss"] < hist[0]["loss"]


def test_one_trace_per_shape():
  params = toy.init(0)
  opt = optax.sgd(0.1)
  ref = references.frozen(toy.init(1), toy.logps_fn)
  state = train.init_state(params, opt, ref, perturbations.none())
  raw = train.make_train_step(toy.logps_fn, opt, loss="dpo", reference=ref, jit=False)
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(raw, n=1), donate_argnums=(0,))
  for i in range(6):  # six steps, new data each time, same shapes: one trace
    state, metrics = step(state, toy.batch(i), jax.random.key(i))
  assert int(state.step) == 6
  with pytest.raises(AssertionError, match="traced > 1"):
    step(state, toy.batch(0, b=4), jax.random.key(0))  # a new shape is a new trace

  # The step as make_train_step jits it: trace-time calls of the forward do not grow with steps.
  calls = []

  def counting_logps_fn(p, b):
    calls.append(1)
    return toy.logps_fn(p, b)

  ref2 = references.frozen(toy.init(1), counting_logps_fn)
  step2 = train.make_train_step(counting_logps_fn, opt, loss="dpo", reference=ref2)
  state2 = train.init_state(toy.init(0), opt, ref2, perturbations.none())
  state2, _ = step2(state2, toy.batch(0), jax.random.key(0))
  per_trace = len(calls)
  for i in range(1, 5):
    state2, _ = step2(state2, toy.batch(i), jax.random.key(i))
  assert len(calls) == per_trace


def test_grad_accumulation_equals_full_batch():
  params = toy.init(0)
  batch = toy.batch(3, b=8)
  halves = [jax.tree.map(lambda x: x[:4], batch), jax.tree.map(lambda x: x[4:], batch)]
  quarters = [jax.tree.map(lambda x, i=i: x[2 * i : 2 * i + 2], batch) for i in range(4)]
  inputs = {1: batch, 2: train.stack_microbatches(halves), 4: train.stack_microbatches(quarters)}
  opt = optax.sgd(0.3)
  ref = references.frozen(toy.init(1), toy.logps_fn)
  out = []
  for n in (1, 2, 4):
    state = train.init_state(params, opt, ref, perturbations.none())
    step = train.make_train_step(toy.logps_fn, opt, loss="dpo", reference=ref, grad_accum_steps=n, donate=False)
    state, metrics = step(state, inputs[n], jax.random.key(0))
    out.append((state.params, metrics["loss"]))
  for p, l in out[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p, out[0][0])
    np.testing.assert_allclose(l, out[0][1], rtol=1e-5)


def test_metrics_match_hand_computation():
  params = toy.init(0)
  batch = toy.batch(4)
  ref_params = toy.init(1)
  ref = references.frozen(ref_params, toy.logps_fn)
  opt = optax.sgd(0.0)
  state = train.init_state(params, opt, ref, perturbations.none())
  step = train.make_train_step(
    toy.logps_fn, opt, loss="dpo", loss_hyper={"beta": 0.2}, reference=ref, learning_rate_fn=lambda s: 0.0, donate=False
  )
  _, m = step(state, batch, jax.random.key(0))
  pol, rf = toy.logps_fn(params, batch), toy.logps_fn(ref_params, batch)
  lr_w, lr_l = np.asarray(pol.chosen - rf.chosen), np.asarray(pol.rejected - rf.rejected)
  np.testing.assert_allclose(m["loss"], np.mean(np.log1p(np.exp(-0.2 * (lr_w - lr_l)))), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/chosen"], 0.2 * lr_w.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["rewards/accuracy"], np.mean(lr_w > lr_l))
  np.testing.assert_allclose(m["logps/chosen"], np.asarray(pol.chosen).mean(), rtol=1e-5)


def test_invalid_combinations_fail_before_compute():
  params = toy.init(0)
  with pytest.raises(ValueError, match="needs a reference"):
    train.make_train_step(toy.logps_fn, optax.sgd(0.1), loss="dpo", reference=references.none())
  with pytest.raises(ValueError, match="unknown argument"):
    train.make_train_step(
      toy.logps_fn,
      optax.sgd(0.1),
      loss="dpo",
      loss_hyper={"bta": 1.0},
      reference=references.frozen(params, toy.logps_fn),
    )
  with pytest.raises(ValueError, match="Unknown loss"):
    train.make_train_step(toy.logps_fn, optax.sgd(0.1), loss="dppo", reference=references.frozen(params, toy.logps_fn))


def test_nonfinite_step_leaves_state_unchanged():
  params = toy.init(0)
  opt = optax.adam(0.1)
  ref = references.frozen(toy.init(1), toy.logps_fn)

  def poisoned_logps_fn(p, b):
    out = toy.logps_fn(p, b)
    return out.replace(chosen=out.chosen + jnp.where(b["poison"], jnp.nan, 0.0))

  step = train.make_train_step(poisoned_logps_fn, opt, loss="dpo", reference=ref, donate=False)
  state = train.init_state(params, opt, ref, perturbations.none())
  good = {**toy.batch(0), "poison": jnp.zeros(8, bool)}
  bad = {**toy.batch(0), "poison": jnp.zeros(8, bool).at[3].set(True)}
  state1, m1 = step(state, good, jax.random.key(0))
  assert float(m1["nonfinite"]) == 0.0
  state2, m2 = step(state1, bad, jax.random.key(1))
  assert float(m2["nonfinite"]) == 1.0 and int(state2.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state2.params, state1.params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state2.opt_state, state1.opt_state)


def _grad_scaled(scale):
  """Identity whose cotangent is multiplied by `scale` (the value is unchanged)."""

  @jax.custom_vjp
  def f(x):
    return x

  f.defvjp(lambda x: (x, None), lambda _, g: (g * scale,))
  return f


@pytest.mark.parametrize("case", ["nan_gradient", "huge_finite_gradient"])
def test_nonfinite_guard_looks_at_the_gradients(case):
  # nan_gradient: the loss is finite but one gradient entry is NaN (0 * d sqrt(u)/du at u = 0):
  # the state must be kept. huge_finite_gradient: every entry is finite but about 1e25, so the
  # global norm's sum of squares overflows float32 to inf: the step must still be applied (by SGD
  # with a learning rate that brings the update back to a normal size; Adam's second moment would
  # overflow too).
  params = toy.init(0)
  opt = optax.adam(0.1) if case == "nan_gradient" else optax.sgd(1e-26)
  ref = references.frozen(toy.init(1), toy.logps_fn)

  def logps_fn(p, b):
    if case == "nan_gradient":
      p = {**p, "w": p["w"] + 0.0 * jnp.sqrt(0.0 * p["w"])}
    else:
      p = jax.tree.map(_grad_scaled(1e25), p)
    return toy.logps_fn(p, b)

  step = train.make_train_step(logps_fn, opt, loss="dpo", reference=ref, donate=False)
  state = train.init_state(params, opt, ref, perturbations.none())
  new, m = step(state, toy.batch(0), jax.random.key(0))
  assert np.isfinite(float(m["loss"])) and int(new.step) == 1
  if case == "nan_gradient":
    assert float(m["nonfinite"]) == 1.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
  else:
    assert float(m["grad_norm"]) == np.inf and float(m["nonfinite"]) == 0.0
    assert np.isfinite(np.asarray(new.params["w"])).all()
    assert not np.array_equal(np.asarray(new.params["w"]), np.asarray(state.params["w"]))


def test_caller_arrays_survive_donation():
  # The same arrays as the policy's start and as a frozen reference: the donating step must not
  # delete them (init_state copies).
  params = toy.init(0)
  opt = optax.adam(0.1)
  ref = references.frozen(params, toy.logps_fn)
  state = train.init_state(params, opt, ref, perturbations.none())
  step = train.make_train_step(toy.logps_fn, opt, loss="dpo", reference=ref)
  for i in range(2):
    state, _ = step(state, toy.batch(i), jax.random.key(i))
  assert np.isfinite(np.asarray(params["w"])).all()  # still alive


def test_a_trl_name_trains_as_its_canonical_formula():
  # "trl.sigmoid" (TRL 1.16's loss_type, as train.loss reads it) is DPO: the same step, bit for bit.
  params = toy.init(0)
  opt = optax.sgd(0.3)
  ref = references.frozen(toy.init(1), toy.logps_fn)
  out = {}
  for loss in ("dpo", "trl.sigmoid"):
    state = train.init_state(params, opt, ref, perturbations.none(), loss=loss)
    step = train.make_train_step(toy.logps_fn, opt, loss=loss, loss_hyper={"beta": 0.2}, reference=ref, donate=False)
    out[loss] = step(state, toy.batch(5), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, out["trl.sigmoid"][0].params, out["dpo"][0].params)
  np.testing.assert_array_equal(out["trl.sigmoid"][1]["loss"], out["dpo"][1]["loss"])
  with pytest.raises(ValueError, match="'dpo'.*'trl.sigmoid'"):  # a bare TRL name names both spellings
    train.make_train_step(toy.logps_fn, opt, loss="sigmoid", reference=ref)


def test_the_batch_reaches_the_model_unchanged_and_m_sharpness_splits_the_reference():
  # The policy's log-prob function sees exactly the caller's batch keys (nothing is smuggled in).
  seen = []

  def recording_logps_fn(p, b):
    seen.append(sorted(b))
    return toy.logps_fn(p, b)

  params, batch = toy.init(0), toy.batch(6)
  opt = optax.sgd(1.0)
  ref = references.frozen(toy.init(1), toy.logps_fn)
  state = train.init_state(params, opt, ref, perturbations.none())
  step = train.make_train_step(recording_logps_fn, opt, loss="dpo", reference=ref, donate=False)
  step(state, batch, jax.random.key(0))
  assert seen and all(keys == sorted(batch) for keys in seen)

  # SAM with m = 4 (examples per ascent) averages the SAM gradients of the two halves, each against its own reference
  # log-probs: with SGD at learning rate 1, the update is the mean of the two half-batch updates.
  def update(pert, b):
    state = train.init_state(params, opt, ref, pert)
    step = train.make_train_step(toy.logps_fn, opt, loss="dpo", reference=ref, perturbation=pert, donate=False)
    new, _ = step(state, b, jax.random.key(0))
    return jax.tree.map(jnp.subtract, new.params, params)

  full = update(perturbations.sam(0.05, m=4), batch)
  halves = [update(perturbations.sam(0.05), jax.tree.map(lambda x, i=i: x[4 * i : 4 * i + 4], batch)) for i in range(2)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *halves)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), full, expected)


def test_gradient_field_metrics_are_the_dpo_closed_form_and_leave_the_update_unchanged():
  # DPO: dl/d log pi_w = -beta sigmoid(-beta h) = -dl/d log pi_l; |dl/dpi_w| / |dl/dpi_l| = pi_l / pi_w.
  params, batch = toy.init(0), toy.batch(3)
  ref_params = toy.init(1)
  opt, beta = optax.sgd(0.5), 0.4
  ref = references.frozen(ref_params, toy.logps_fn)
  state = train.init_state(params, opt, ref, perturbations.none())
  kwargs = dict(loss="dpo", loss_hyper={"beta": beta}, reference=ref, donate=False)
  with_field = train.make_train_step(toy.logps_fn, opt, gradient_field=True, **kwargs)
  new, metrics = with_field(state, batch, jax.random.key(0))
  pol, rf = toy.logps_fn(params, batch), toy.logps_fn(ref_params, batch)
  pw, pl, rw, rl = (np.asarray(x, np.float64) for x in (pol.chosen, pol.rejected, rf.chosen, rf.rejected))
  d_w = -beta / (1 + np.exp(beta * ((pw - rw) - (pl - rl))))
  np.testing.assert_allclose(metrics["gradient_field/chosen"], d_w.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["gradient_field/rejected"], -d_w.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["gradient_field/ratio"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(metrics["gradient_field/log_prob_ratio"], (pl - pw).mean(), rtol=1e-5)
  plain, plain_metrics = train.make_train_step(toy.logps_fn, opt, **kwargs)(state, batch, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, new.params, plain.params)
  assert not any(k.startswith("gradient_field/") for k in plain_metrics)
