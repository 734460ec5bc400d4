"""beta-DPO and gamma-PO: worked examples, numpy re-derivations of the authors' code, state, sampling."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx.losses import _adaptive

KEY = jax.random.key(0)


def softplus(x):
  return np.logaddexp(0.0, x)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def pairs(pi_w, pi_l, ref_w, ref_l, len_w=None, len_l=None):
  f = lambda x: jnp.asarray(np.asarray(x, np.float32))
  policy = pofx.PairLogps(
    chosen=f(pi_w),
    rejected=f(pi_l),
    chosen_len=None if len_w is None else f(len_w),
    rejected_len=None if len_l is None else f(len_l),
  )
  return policy, pofx.PairLogps(chosen=f(ref_w), rejected=f(ref_l))


def random_pairs(seed, b):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-30, -1, (4, b)).astype(np.float32).astype(np.float64)
  lens = rng.integers(1, 20, (2, b)).astype(np.float64)
  policy, reference = pairs(x[0], x[1], x[2], x[3], lens[0], lens[1])
  return policy, reference, x, lens


# -------------------------------------------------------------------------------------------------
# beta-DPO
# -------------------------------------------------------------------------------------------------


def example_batch(b=5):
  # The shared worked example repeated b times: rho = 2 for every pair.
  return pairs([-10.0] * b, [-12.0] * b, [-11.0] * b, [-11.0] * b)


def test_beta_dpo_worked_example_state_held():
  # By hand: M0 = 1, batch mean gap 2, a = 0.6 -> beta_used = 0.1 (1 + 0.6 (2 - 1)) = 0.16, loss 0.545893.
  # momentum = 1 keeps the state at M0 = 1 exactly.
  policy, reference = example_batch()
  state = _adaptive.BetaDpoState(gap_mean=jnp.float32(1.0), gap_std=jnp.float32(1.0))
  out, new_state = pofx.losses.get("beta_dpo")(policy, reference, a=0.6, momentum=1.0, state=state, key=KEY)
  out = np.asarray(out)
  # k = floor(0.8 * 5) = 4 kept pairs, each weighted 5/4 so that the batch mean is their mean.
  assert np.sum(out > 0) == 4
  np.testing.assert_allclose(out[out > 0], 0.545893 * 5 / 4, rtol=1e-6)
  np.testing.assert_allclose(out.mean(), 0.545893, rtol=1e-6)
  np.testing.assert_allclose(float(new_state.gap_mean), 1.0)


def test_beta_dpo_worked_example_through_ema():
  # State before the step chosen so that the EMA update (momentum 0.9) lands on M0 = 1.
  policy, reference = example_batch()
  state = _adaptive.BetaDpoState(gap_mean=jnp.float32(0.8 / 0.9), gap_std=jnp.float32(1.0))
  out, new_state = _adaptive.beta_dpo(policy, reference, a=0.6, state=state, key=KEY)
  np.testing.assert_allclose(float(new_state.gap_mean), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(new_state.gap_std), 0.9, rtol=1e-6)  # batch std 0
  np.testing.assert_allclose(
    float(pofx.losses.batch_loss("beta_dpo", policy, reference, a=0.6, state=state, key=KEY)[0]), 0.545893, rtol=2e-6
  )


def beta_dpo_numpy(x, state, keep, *, beta, a, momentum):
  """The authors' preference_loss + update_and_sync_tensor_mean, in float64, given the kept set."""
  rho = (x[0] - x[2]) - (x[1] - x[3])
  m0 = momentum * state[0] + (1 - momentum) * rho.mean()
  s0 = momentum * state[1] + (1 - momentum) * rho.std(ddof=1)
  beta_used = max(beta * (1 + a * (rho[keep].mean() - m0)), 1e-3)
  losses = softplus(-beta_used * rho)
  masked_mean = losses[keep].mean()
  return losses, masked_mean, (m0, s0)


@pytest.mark.parametrize("a,filter_ratio", [(0.6, 0.2), (2.0, 0.5), (0.0, 0.25)])
def test_beta_dpo_against_numpy(a, filter_ratio):
  b = 12
  policy, reference, x, _ = random_pairs(1, b)
  state = (0.3, 2.0)
  st = _adaptive.BetaDpoState(jnp.float32(state[0]), jnp.float32(state[1]))
  out, new_state = _adaptive.beta_dpo(
    policy, reference, beta=0.1, a=a, filter_ratio=filter_ratio, state=st, key=jax.random.key(3)
  )
  out = np.asarray(out)
  keep = out > 0
  k = int(b * (1 - filter_ratio))
  assert keep.sum() == k
  losses, masked_mean, (m0, s0) = beta_dpo_numpy(x, state, keep, beta=0.1, a=a, momentum=0.9)
  np.testing.assert_allclose(out[keep], losses[keep] * b / k, rtol=2e-6)
  np.testing.assert_allclose(out.mean(), masked_mean, rtol=2e-6)
  np.testing.assert_allclose([float(new_state.gap_mean), float(new_state.gap_std)], [m0, s0], rtol=2e-6)


def test_beta_dpo_reduces_to_dpo():
  policy, reference, _, _ = random_pairs(2, 9)
  state = _adaptive.beta_dpo_init_state()
  out, _ = _adaptive.beta_dpo(policy, reference, beta=0.2, a=0.0, filter_ratio=0.0, state=state, key=KEY)
  np.testing.assert_allclose(out, pofx.losses.dpo(policy, reference, beta=0.2), rtol=1e-6)


def test_beta_dpo_beta_is_detached_and_clamped():
  b = 6
  policy, reference, x, _ = random_pairs(4, b)
  st = _adaptive.BetaDpoState(jnp.float32(0.0), jnp.float32(1.0))
  kw = dict(beta=0.1, a=5.0, filter_ratio=0.0, momentum=1.0, state=st, key=KEY)
  rho = (x[0] - x[2]) - (x[1] - x[3])
  beta_used = max(0.1 * (1 + 5.0 * rho.mean()), 1e-3)
  grad = jax.grad(lambda c: jnp.sum(_adaptive.beta_dpo(policy.replace(chosen=c), reference, **kw)[0]))(policy.chosen)
  # d/dpi_w softplus(-beta_used rho) with beta_used held constant.
  np.testing.assert_allclose(grad, -beta_used * sigmoid(-beta_used * rho), rtol=1e-5, atol=1e-7)
  # A very negative gap mean drives beta below the 1e-3 floor.
  out, _ = _adaptive.beta_dpo(
    policy,
    reference,
    beta=0.1,
    a=100.0,
    filter_ratio=0.0,
    momentum=1.0,
    state=_adaptive.BetaDpoState(jnp.float32(1e3), jnp.float32(1.0)),
    key=KEY,
  )
  np.testing.assert_allclose(out, softplus(-1e-3 * rho), rtol=1e-6)


def test_beta_dpo_filter_samples_proportionally_to_gaussian_weights():
  # Three pairs, keep one (filter_ratio 2/3): the kept index must follow p_i ∝ exp(-z_i^2 / 2).
  policy, reference = pairs([-10.0, -10.0, -10.0], [-10.5, -11.0, -12.5], [-10.0] * 3, [-10.0] * 3)
  gaps = np.array([0.5, 1.0, 2.5])
  st = _adaptive.BetaDpoState(jnp.float32(1.0), jnp.float32(0.8))
  fn = lambda k: _adaptive.beta_dpo(policy, reference, filter_ratio=2 / 3, momentum=1.0, state=st, key=k)[0]
  outs = np.asarray(jax.jit(jax.vmap(fn))(jax.random.split(jax.random.key(11), 20000)))
  freq = (outs > 0).mean(axis=0)
  w = np.exp(-0.5 * ((gaps - 1.0) / 0.8) ** 2)
  np.testing.assert_allclose(freq, w / w.sum(), atol=0.015)


def test_beta_dpo_deterministic_given_key():
  policy, reference, _, _ = random_pairs(5, 16)
  st = _adaptive.BetaDpoState(jnp.float32(0.0), jnp.float32(5.0))
  run = lambda k: np.asarray(_adaptive.beta_dpo(policy, reference, state=st, key=k)[0])
  np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  masks = {tuple(run(jax.random.key(s)) > 0) for s in range(8)}
  assert len(masks) > 1


def test_beta_dpo_global_statistics_with_axis_name():
  # Two "devices" of 4 pairs (jax.vmap with a named axis) must give the single-device result on 8.
  policy, reference, _, _ = random_pairs(6, 8)
  st = _adaptive.BetaDpoState(jnp.float32(0.5), jnp.float32(3.0))
  full, full_state = _adaptive.beta_dpo(policy, reference, a=0.6, state=st, key=KEY)
  split = lambda p: jax.tree.map(lambda v: v.reshape(2, 4), p)
  sharded = jax.vmap(lambda p, r: _adaptive.beta_dpo(p, r, a=0.6, state=st, key=KEY, axis_name="d"), axis_name="d")(
    split(policy), split(reference)
  )
  np.testing.assert_allclose(np.asarray(sharded[0]).reshape(8), full, rtol=1e-6)
  np.testing.assert_allclose(sharded[1].gap_mean, [full_state.gap_mean] * 2, rtol=1e-6)


def test_beta_dpo_jit_and_state_threading():
  policy, reference, _, _ = random_pairs(7, 8)
  step = jax.jit(lambda s, k: _adaptive.beta_dpo(policy, reference, state=s, key=k))
  state = _adaptive.beta_dpo_init_state()
  rho = np.asarray(pofx.losses.margins(policy, reference), np.float64)
  m = s = 0.0
  for i in range(3):
    _, state = step(state, jax.random.key(i))
    m, s = 0.9 * m + 0.1 * rho.mean(), 0.9 * s + 0.1 * rho.std(ddof=1)
  np.testing.assert_allclose([float(state.gap_mean), float(state.gap_std)], [m, s], rtol=1e-5)


@pytest.mark.parametrize(
  "bad", [dict(beta=0.0), dict(filter_ratio=1.0), dict(filter_ratio=-0.1), dict(momentum=1.5), dict(a=float("nan"))]
)
def test_beta_dpo_invalid_hyperparameters(bad):
  policy, reference = example_batch()
  with pytest.raises(ValueError, match=list(bad)[0]):
    _adaptive.beta_dpo(policy, reference, state=_adaptive.beta_dpo_init_state(), key=KEY, **bad)


def test_beta_dpo_needs_reference():
  policy, _ = example_batch()
  with pytest.raises(ValueError, match="reference"):
    _adaptive.beta_dpo(policy, None, state=_adaptive.beta_dpo_init_state(), key=KEY)


# -------------------------------------------------------------------------------------------------
# gamma-PO
# -------------------------------------------------------------------------------------------------


def gamma_dq_numpy(gaps, *, gamma0, tau, steps=20, eps=1e-10):
  """A transcription of sunjie279/gammaPO get_gamma_dq's optimisation loop, in float64."""
  gaps = np.asarray(gaps, np.float64)
  n = gaps.size
  lr = min(0.5 / tau, 1)
  p = np.full(n, 1.0 / n)
  for _ in range(steps):
    gamma = gamma0 * n * p
    p_grad = tau * (1 + np.log(n * (p + eps))) + gamma0 * n / (1 + np.exp(gaps - gamma)) / n
    e = np.exp(-lr * p_grad)
    p = p * e / np.sum(p * e)
  return gamma


@pytest.mark.parametrize("gamma0,tau", [(1.0, 1.0), (4.0, 10.0), (0.375, 3.0), (2.0, 0.2)])
def test_gamma_margins_against_code_loop(gamma0, tau):
  rng = np.random.default_rng(0)
  gaps = rng.normal(0.5, 2.0, 40).astype(np.float32)
  got = _adaptive.gamma_po_margins(jnp.asarray(gaps), jnp.ones(40), gamma0=gamma0, tau=tau)
  np.testing.assert_allclose(got, gamma_dq_numpy(gaps, gamma0=gamma0, tau=tau), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.mean(got), gamma0, rtol=1e-5)
  # Larger gaps (more confident pairs) get larger margins.
  order = np.argsort(gaps)
  assert np.all(np.diff(np.asarray(got)[order]) >= -1e-6)


def test_gamma_margins_ignore_inactive_entries():
  rng = np.random.default_rng(1)
  gaps = rng.normal(0, 1, 12).astype(np.float32)
  active = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], np.float32)
  got = np.asarray(_adaptive.gamma_po_margins(jnp.asarray(gaps), jnp.asarray(active), gamma0=1.5, tau=2.0))
  np.testing.assert_allclose(got[active > 0], gamma_dq_numpy(gaps[active > 0], gamma0=1.5, tau=2.0), rtol=2e-5)
  np.testing.assert_array_equal(got[active == 0], 0.0)


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_gamma_margins_few_steps(steps):
  # Far from convergence, the exact iteration count of the code's loop matters.
  gaps = np.array([-1.0, 0.0, 0.5, 3.0], np.float32)
  got = _adaptive.gamma_po_margins(jnp.asarray(gaps), jnp.ones(4), gamma0=2.0, tau=0.3, num_steps=steps)
  np.testing.assert_allclose(got, gamma_dq_numpy(gaps, gamma0=2.0, tau=0.3, steps=steps), rtol=2e-5)


def test_gamma_simpo_single_pair_is_simpo():
  # By hand: one pair, empty pool -> gamma = gamma0 -> SimPO(beta=2, gamma/beta=0.25) = -log sigmoid(-0.5) = 0.974077.
  policy, _ = pairs([-10.0], [-12.0], [-11.0], [-11.0], [5.0], [6.0])
  state = _adaptive.gamma_po_init_state(num_init=0)
  out, new_state = pofx.losses.get("gamma_simpo")(policy, None, beta=2.0, gamma_beta_ratio=0.25, state=state, key=KEY)
  np.testing.assert_allclose(out, [0.974077], rtol=1e-6)
  assert int(new_state.count) == 1 and float(new_state.pool[0]) == 0.0


@pytest.mark.parametrize("base", ["simpo", "dpo"])
def test_gamma_po_against_numpy_whole_pool(base):
  # With count <= opt_size - B every pooled gap is drawn: the result does not depend on the key.
  b = 6
  policy, reference, x, lens = random_pairs(3, b)
  beta, ratio, tau = (2.5, 0.4, 10.0) if base == "simpo" else (0.1, 0.25, 1.0)
  state = _adaptive.gamma_po_init_state(pool_size=64, num_init=8, seed=5)
  pooled = np.asarray(state.pool[:8], np.float64)
  out, new_state = _adaptive.gamma_po(
    policy, reference, base=base, beta=beta, gamma_beta_ratio=ratio, tau=tau, state=state, key=KEY
  )
  if base == "simpo":
    g = beta * (x[0] / lens[0] - x[1] / lens[1])
  else:
    g = beta * ((x[0] - x[2]) - (x[1] - x[3]))
  g32 = g.astype(np.float32).astype(np.float64)
  gamma0 = ratio * beta
  gamma = gamma_dq_numpy(np.concatenate([pooled, g32]), gamma0=gamma0, tau=tau)[-b:]
  offset = gamma if base == "simpo" else gamma - gamma0
  np.testing.assert_allclose(out, softplus(-(g - offset)), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.pool[8 : 8 + b], g32, rtol=1e-6)
  assert int(new_state.count) == 8 + b and int(new_state.next) == 8 + b
  # Another key gives the same values (the whole pool was used).
  again, _ = _adaptive.gamma_po(
    policy, reference, base=base, beta=beta, gamma_beta_ratio=ratio, tau=tau, state=state, key=jax.random.key(9)
  )
  np.testing.assert_allclose(again, out, rtol=1e-6)


def test_gamma_dpo_single_pair_is_dpo():
  policy, reference = pairs([-10.0], [-12.0], [-11.0], [-11.0])
  out, _ = _adaptive.gamma_dpo(policy, reference, state=_adaptive.gamma_po_init_state(num_init=0), key=KEY)
  np.testing.assert_allclose(out, [0.598139], rtol=1e-6)  # the shared example's DPO value


def test_gamma_po_pool_is_a_fifo_ring_buffer():
  rng = np.random.default_rng(2)
  state = _adaptive.gamma_po_init_state(pool_size=7, num_init=3, seed=1)
  ref = collections.deque(np.asarray(state.pool[:3]).tolist(), maxlen=7)
  step = jax.jit(lambda s, p, k: _adaptive.gamma_simpo(p, None, state=s, key=k))
  for i in range(5):
    x = rng.uniform(-20, -1, (2, 3))
    policy, _ = pairs(x[0], x[1], x[0], x[1], [4.0, 5.0, 6.0], [3.0, 7.0, 2.0])
    state = step(state, policy, jax.random.key(i))[1]
    ref.extend(
      (2.0 * (x[0].astype(np.float32) / np.array([4, 5, 6]) - x[1].astype(np.float32) / np.array([3, 7, 2]))).tolist()
    )
    count, nxt = int(state.count), int(state.next)
    assert count == len(ref)
    # Contents as a FIFO: the ring read from `next` (oldest) around equals the deque.
    ring = np.roll(np.asarray(state.pool), -nxt)[-count:] if count == 7 else np.asarray(state.pool)[:count]
    np.testing.assert_allclose(ring, list(ref), rtol=1e-5)


def test_gamma_po_samples_only_valid_pool_entries():
  # A pool whose unused slots hold a huge sentinel: a draw from them would swing the margins.
  state = _adaptive.gamma_po_init_state(pool_size=64, num_init=0)
  state = state._replace(
    pool=state.pool.at[5:].set(1e6).at[:5].set(jnp.arange(5.0)), count=jnp.int32(5), next=jnp.int32(5)
  )
  policy, _ = pairs([-10.0, -9.0], [-12.0, -12.0], [0, 0], [0, 0], [5.0, 5.0], [6.0, 6.0])
  out, _ = _adaptive.gamma_simpo(policy, None, state=state, key=KEY)
  g = 2.0 * (np.array([-10.0, -9.0]) / 5 - np.array([-12.0]) / 6)
  gamma = gamma_dq_numpy(np.concatenate([np.arange(5.0), g]), gamma0=0.5, tau=1.0)[-2:]
  np.testing.assert_allclose(out, softplus(-(g - gamma)), rtol=2e-5)


def test_gamma_po_draws_opt_size_minus_batch():
  # count > opt_size - B: N = opt_size. With all pooled gaps equal, which ones are drawn does not
  # matter, so the result matches the code's loop on opt_size - B copies plus the batch.
  state = _adaptive.gamma_po_init_state(pool_size=32, num_init=0)
  state = state._replace(pool=jnp.full((32,), 0.7), count=jnp.int32(20), next=jnp.int32(20))
  policy, _ = pairs([-10.0, -9.0, -14.0], [-12.0, -12.0, -11.0], [0] * 3, [0] * 3, [5.0] * 3, [6.0] * 3)
  out, _ = _adaptive.gamma_simpo(policy, None, opt_size=8, state=state, key=KEY)
  g = 2.0 * (np.array([-10.0, -9.0, -14.0]) / 5 - np.array([-12.0, -12.0, -11.0]) / 6)
  gamma = gamma_dq_numpy(np.concatenate([np.full(5, 0.7), g]), gamma0=0.5, tau=1.0)[-3:]
  np.testing.assert_allclose(out, softplus(-(g - gamma)), rtol=2e-5)


def test_gamma_po_margin_is_detached():
  policy, _ = pairs([-10.0, -9.0], [-12.0, -12.0], [0, 0], [0, 0], [5.0, 5.0], [6.0, 6.0])
  state = _adaptive.gamma_po_init_state(num_init=0)
  out = _adaptive.gamma_simpo(policy, None, state=state, key=KEY)[0]
  grad = jax.grad(lambda c: jnp.sum(_adaptive.gamma_simpo(policy.replace(chosen=c), None, state=state, key=KEY)[0]))(
    policy.chosen
  )
  # d/dpi_w softplus(-(g - gamma)) = -sigmoid(-(g - gamma)) * beta / |y_w| with gamma constant.
  z = -np.log(np.expm1(np.asarray(out, np.float64)))  # g - gamma recovered from the loss value
  np.testing.assert_allclose(grad, -sigmoid(-z) * 2.0 / 5.0, rtol=1e-5)


def test_gamma_po_deterministic_given_key():
  state = _adaptive.gamma_po_init_state(pool_size=64, num_init=0)
  state = state._replace(pool=jax.random.normal(jax.random.key(3), (64,)), count=jnp.int32(64))
  policy, _, _, _ = random_pairs(8, 4)
  run = lambda k: np.asarray(_adaptive.gamma_simpo(policy, None, opt_size=12, state=state, key=k)[0])
  np.testing.assert_array_equal(run(jax.random.key(2)), run(jax.random.key(2)))
  assert not np.allclose(run(jax.random.key(2)), run(jax.random.key(3)))


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(base="ipo"), "base"),
    (dict(tau=0.0), "tau"),
    (dict(beta=-1.0), "beta"),
    (dict(opt_size=2), "opt_size"),
    (dict(num_steps=0), "num_steps"),
  ],
)
def test_gamma_po_invalid_hyperparameters(bad, match):
  policy, reference, _, _ = random_pairs(9, 4)
  with pytest.raises(ValueError, match=match):
    _adaptive.gamma_po(policy, reference, state=_adaptive.gamma_po_init_state(), key=KEY, **bad)


def test_gamma_po_init_state_validation():
  with pytest.raises(ValueError, match="pool_size"):
    _adaptive.gamma_po_init_state(pool_size=4, num_init=8)
  state = _adaptive.gamma_po_init_state()
  assert state.pool.shape == (2048,) and int(state.count) == 8
  assert math.isclose(float(jnp.sum(state.pool[8:])), 0.0)
