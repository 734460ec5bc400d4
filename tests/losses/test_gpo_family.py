"""GPO loss family: values from numpy closed forms, the worked example, and reduces-to identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx import losses

# The worked example of the loss tests: rho = (-10 + 11) - (-12 + 11) = 2, beta * rho = 0.2.
PI_W, PI_L, REF_W, REF_L, BETA, LEN_W, LEN_L = -10.0, -12.0, -11.0, -11.0, 0.1, 5.0, 6.0


def example():
  policy = pofx.PairLogps(
    chosen=jnp.array([PI_W]), rejected=jnp.array([PI_L]), chosen_len=jnp.array([LEN_W]), rejected_len=jnp.array([LEN_L])
  )
  reference = pofx.PairLogps(chosen=jnp.array([REF_W]), rejected=jnp.array([REF_L]))
  return policy, reference


def random_batch(seed=0, b=16):
  rng = np.random.default_rng(seed)
  # Inputs rounded to float32 first, so numpy (float64) sees exactly what pofx sees.
  pol = rng.uniform(-40, -1, (2, b)).astype(np.float32).astype(np.float64)
  ref = rng.uniform(-40, -1, (2, b)).astype(np.float32).astype(np.float64)
  lens = rng.integers(1, 30, (2, b)).astype(np.float64)
  policy = pofx.PairLogps(
    chosen=jnp.asarray(pol[0], jnp.float32),
    rejected=jnp.asarray(pol[1], jnp.float32),
    chosen_len=jnp.asarray(lens[0], jnp.float32),
    rejected_len=jnp.asarray(lens[1], jnp.float32),
  )
  reference = pofx.PairLogps(chosen=jnp.asarray(ref[0], jnp.float32), rejected=jnp.asarray(ref[1], jnp.float32))
  return policy, reference, pol, ref, lens


def test_worked_example_golden_values():
  # By hand at beta * rho = 0.2 (float64): log(1 + e^-0.2), 1 - 0.2, e^-0.2, 0.8^2, sigmoid(-0.2)^2, (2 - 5)^2.
  policy, reference = example()
  golden = {
    "dpo": 0.598139,
    "slic": 0.8,
    "exponential": 0.818731,
    "truncated_quadratic": 0.64,
    "savage": 0.202649,
    "ipo_sum": 9.0,
  }
  for name, value in golden.items():
    np.testing.assert_allclose(float(losses.get(name)(policy, reference)[0]), value, rtol=1e-6, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(float(losses.gpo(policy, reference, f="squared", beta=BETA)[0]), 0.64, atol=1e-6)
  # TRL's length-averaged IPO: d = 1/5 + 1/6, (d - 5)^2.
  np.testing.assert_allclose(float(losses.ipo(policy, reference)[0]), 21.467778, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0, 3.0])
def test_random_batch_against_numpy(beta):
  policy, reference, pol, ref, lens = random_batch()
  rho = (pol[0] - ref[0]) - (pol[1] - ref[1])
  v = beta * rho
  expected = {
    "dpo": np.log1p(np.exp(-v)),
    "slic": np.maximum(0, 1 - v),
    # exp(-v), continued along its tangent below v = -50 (documented overflow guard).
    "exponential": np.where(v >= -50, np.exp(-np.maximum(v, -50)), np.exp(50.0) * (1 - (v + 50))),
    "truncated_quadratic": np.maximum(0, 1 - v) ** 2,
    "savage": 1 / (1 + np.exp(v)) ** 2,
    "ipo_sum": (rho - 1 / (2 * beta)) ** 2,
  }
  for name, value in expected.items():
    # float32 rho carries ~1e-6 relative rounding, which beta * rho = O(10) amplifies in exp.
    np.testing.assert_allclose(
      losses.get(name)(policy, reference, beta=beta), value, rtol=1e-5, atol=1e-6, err_msg=name
    )
  d = (pol[0] - ref[0]) / lens[0] - (pol[1] - ref[1]) / lens[1]
  np.testing.assert_allclose(losses.ipo(policy, reference, beta=beta), (d - 1 / (2 * beta)) ** 2, rtol=2e-6, atol=1e-6)


def test_gpo_logistic_is_dpo_and_user_callable():
  policy, reference, *_ = random_batch(1)
  np.testing.assert_array_equal(
    losses.gpo(policy, reference, f=pofx.gpo.logistic, beta=0.3), losses.dpo(policy, reference, beta=0.3)
  )
  mine = lambda v: jnp.log1p(jnp.exp(-v))
  np.testing.assert_allclose(
    losses.gpo(policy, reference, f=mine, beta=0.3), losses.dpo(policy, reference, beta=0.3), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
def test_ipo_is_gpo_squared_with_beta_two_tau(tau):
  policy, reference, *_ = random_batch(2)
  gpo_squared = losses.gpo(policy, reference, f="squared", beta=2 * tau)
  np.testing.assert_allclose(losses.ipo_sum(policy, reference, beta=tau), gpo_squared / (4 * tau**2), rtol=1e-5)


def test_reference_free_reduces_to_policy_logps():
  policy, _, pol, _, _ = random_batch(3)
  np.testing.assert_allclose(losses.slic(policy, None, beta=0.5), np.maximum(0, 1 - 0.5 * (pol[0] - pol[1])), rtol=1e-6)


def test_bad_inputs_raise():
  policy, reference = example()
  with pytest.raises(ValueError, match="beta"):
    losses.dpo(policy, reference, beta=0.0)
  with pytest.raises(ValueError, match="beta"):
    losses.batch_loss("ipo_sum", policy, reference, beta=-1.0)
  with pytest.raises(ValueError, match="needs a reference"):
    losses.dpo(policy, None)
  with pytest.raises(ValueError, match="allowed"):
    losses.gpo(policy, reference, f="cubic")
  with pytest.raises(ValueError, match="completion length"):
    losses.ipo(pofx.PairLogps(chosen=jnp.zeros(1), rejected=jnp.zeros(1)), reference)


def test_jit_equals_eager():
  policy, reference, *_ = random_batch(4)
  for name in ("dpo", "slic", "ipo_sum", "exponential", "truncated_quadratic", "savage"):
    fn = losses.get(name)
    np.testing.assert_allclose(jax.jit(fn)(policy, reference), fn(policy, reference), rtol=1e-6, err_msg=name)


def test_from_tokens_sums_in_float32_and_ignores_padding():
  c = np.array([[-1.0, -2.0, np.nan], [-0.5, -0.5, -0.5]], np.float32)
  r = np.array([[-3.0, -np.inf, 0.0], [-1.0, -1.0, -1.0]], np.float32)
  cm = np.array([[1, 1, 0], [1, 1, 1]])
  rm = np.array([[1, 0, 0], [1, 1, 0]])
  p = pofx.PairLogps.from_tokens(jnp.asarray(c, jnp.bfloat16), cm, r, rm)
  assert p.chosen.dtype == jnp.float32
  np.testing.assert_allclose(p.chosen, [-3.0, -1.5])
  np.testing.assert_allclose(p.rejected, [-3.0, -2.0])
  np.testing.assert_allclose(p.chosen_len, [2, 3])
  np.testing.assert_allclose(p.rejected_len, [1, 2])
  assert np.all(np.isfinite(p.rejected_token_logps))
