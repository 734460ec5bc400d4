"""The CPU backend's AdamW (`pofx_backends.cpu.optimizers.adamw`, one native kernel applying the
step to every leaf in place) against AdamW written out in float64 NumPy (Loshchilov & Hutter 2019,
arXiv:1711.05101, Algorithm 2, in optax's form) and against optax itself, alone and in the train
step (`pofx.optimizers.FusedOptimizer`)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pofx import optimizers, perturbations, references, train
from pofx_backends.cpu import native
from pofx_backends.cpu import optimizers as cpu_optimizers
from tests import toy

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")

SHAPES = {"kernel": (3, 3, 4, 16), "bias": (16,), "odd": (37,), "scalar": ()}
B1, B2, EPS, WD = 0.9, 0.999, 1e-8, 0.01


def tree(rng, scale=1.0):
  return {k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}


def adamw_float64(params, grads_seq, lrs, max_norm=None):
  """AdamW by hand in float64: the moments, their bias corrections, the decoupled weight decay
  and the step, after an optional clip of the global norm."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  nu = {k: np.zeros_like(v) for k, v in p.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    norm = np.sqrt(sum(np.sum(v * v) for v in g.values()))
    if max_norm is not None and norm >= max_norm:
      g = {k: v * max_norm / norm for k, v in g.items()}
    for k in p:
      mu[k] = B1 * mu[k] + (1 - B1) * g[k]
      nu[k] = B2 * nu[k] + (1 - B2) * g[k] ** 2
      m_hat, v_hat = mu[k] / (1 - B1**t), nu[k] / (1 - B2**t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + EPS) + WD * p[k])
  return p, mu, nu


def run(opt, params, grads_seq, use_apply=True):
  @jax.jit
  def step(p, s, g):
    if use_apply:
      return opt.apply(g, s, p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  for g in grads_seq:
    params, state = step(params, state, g)
  return params, state


@pytest.mark.parametrize("max_norm", [None, 1.0, 1e3])  # no clip; the clip acting; the clip inactive
def test_apply_equals_adamw_by_hand(max_norm):
  rng = np.random.default_rng(0)
  params = tree(rng)
  grads_seq = [tree(rng, scale=0.5) for _ in range(4)]
  schedule = lambda count: 1e-2 * (count + 1) / 4  # a warm-up: lr(t - 1) at step t
  opt = cpu_optimizers.adamw(schedule, B1, B2, EPS, WD, max_grad_norm=max_norm)
  got, state = run(opt, params, grads_seq)
  assert "pofx_adamw_apply" in jax.jit(opt.apply).lower(grads_seq[0], opt.init(params), params).as_text()
  want, mu, nu = adamw_float64(params, grads_seq, [1e-2 * t / 4 for t in range(1, 5)], max_norm)
  if max_norm == 1.0:  # the clip acts at every step
    assert all(np.sqrt(sum(np.sum(np.square(v)) for v in g.values())) > 1.0 for g in grads_seq)
  for k in SHAPES:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(state.mu[k], mu[k], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(state.nu[k], nu[k], rtol=2e-6, atol=1e-10)
  assert int(state.count) == 4


@pytest.mark.parametrize("max_norm", [None, 1.0])
@pytest.mark.parametrize("use_apply", [True, False])
def test_apply_and_update_match_optax_to_the_rounding(max_norm, use_apply):
  rng = np.random.default_rng(1)
  params = tree(rng)
  grads_seq = [tree(rng, scale=0.5) for _ in range(3)]
  clip = [optax.clip_by_global_norm(max_norm)] if max_norm else []
  reference = optax.chain(*clip, optax.adamw(3e-3, b1=B1, b2=B2, eps=EPS, weight_decay=WD))
  want, _ = run(reference, params, grads_seq, use_apply=False)
  got, _ = run(cpu_optimizers.adamw(3e-3, B1, B2, EPS, WD, max_grad_norm=max_norm), params, grads_seq, use_apply)
  for k in SHAPES:  # |p| < 4 and steps of about 3e-3: a few roundings of p (XLA may fuse multiply-adds)
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=5e-7)
    assert not np.allclose(got[k], params[k], rtol=0, atol=1e-3)


def test_non_float32_leaves_fall_back_to_xla():
  rng = np.random.default_rng(2)
  params = {k: v.astype(jnp.bfloat16) for k, v in tree(rng).items()}
  grads = {k: v.astype(jnp.bfloat16) for k, v in tree(rng).items()}
  opt = cpu_optimizers.adamw(1e-2, weight_decay=WD)
  assert "pofx_adamw_apply" not in jax.jit(opt.apply).lower(grads, opt.init(params), params).as_text()
  got, _ = opt.apply(grads, opt.init(params), params)
  want, _ = run(optax.adamw(1e-2, weight_decay=WD), params, [grads], use_apply=False)
  for k in SHAPES:
    assert got[k].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32), rtol=1e-2, atol=1e-2)


def test_in_the_train_step_it_matches_optax_and_keeps_the_guard():
  params, batch = toy.init(0), toy.batch(0)
  ref = references.frozen(params, toy.logps_fn)

  def one_step(opt):
    step = train.make_train_step(lambda p, b: toy.logps_fn(p, b), opt, loss="dpo", reference=ref)
    state = train.init_state(params, opt, ref, perturbations.none(), loss="dpo", rng=jax.random.key(0))
    lowered = step.lower(state, batch, jax.random.key(1)).as_text()
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(1))
    return state, metrics, lowered

  fused = cpu_optimizers.adamw(1e-2, weight_decay=WD, max_grad_norm=1.0)
  state, _, lowered = one_step(fused)
  assert "pofx_adamw_apply" in lowered
  want, _, _ = one_step(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=WD)))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-7)
  assert not np.allclose(state.params["w"], params["w"])
  # A non-finite gradient leaves the parameters and the moments as they were.
  state = state.replace(params=dict(state.params, w=state.params["w"].at[0, 0].set(jnp.nan)))
  step = train.make_train_step(toy.logps_fn, fused, loss="dpo", reference=ref)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  after, metrics = step(state, batch, jax.random.key(2))
  assert bool(metrics["nonfinite"])
  for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_a_fused_optimizer_is_an_optax_transformation():
  fused = cpu_optimizers.adamw(1e-2)
  assert isinstance(fused, optax.GradientTransformation)
  for copied in (copy.deepcopy(fused), fused._replace(init=fused.init)):  # copies keep their apply
    assert isinstance(copied, optimizers.FusedOptimizer) and copied.apply is fused.apply
  chained = optax.chain(optax.scale(1.0), fused)  # a combinator's result is applied by update
  assert not isinstance(chained, optimizers.FusedOptimizer)
  params = toy.init(0)
  grads = jax.tree.map(jnp.ones_like, params)
  got, _ = optimizers.apply_update(chained, grads, chained.init(params), params)
  want, _ = optimizers.apply_update(fused, grads, fused.init(params), params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-7)


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="b1=1.0; allowed: 0 <= b1 < 1"):
    cpu_optimizers.adamw(1e-3, b1=1.0)
  with pytest.raises(ValueError, match="max_grad_norm=0"):
    cpu_optimizers.adamw(1e-3, max_grad_norm=0)
  with pytest.raises(ValueError, match="learning_rate=-1"):
    cpu_optimizers.adamw(-1)
  x = jnp.zeros((3,), jnp.float32)
  with pytest.raises(ValueError, match=r"grads\[0\] is float32\[4\]"):
    native.adamw_apply(jnp.zeros(11), [x], [jnp.zeros((4,), jnp.float32)], [x], [x])
  with pytest.raises(ValueError, match=r"hyper has shape \(8,\)"):
    native.adamw_apply(jnp.zeros(8), [x], [x], [x], [x])
