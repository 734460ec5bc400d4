"""pofx.gpo: the six GPO functions against closed forms written here in numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import gpo

V = np.linspace(-6.0, 6.0, 49)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# Closed forms (float64 numpy), and f(0), f'(0), f''(0) derived by hand (GPO Table 1).
CLOSED = {
  "logistic": (lambda v: np.log1p(np.exp(-v)), math.log(2.0), -0.5, 0.25),
  "hinge": (lambda v: np.maximum(0.0, 1.0 - v), 1.0, -1.0, 0.0),
  "squared": (lambda v: (v - 1.0) ** 2, 1.0, -2.0, 2.0),
  "exponential": (lambda v: np.exp(-v), 1.0, -1.0, 1.0),
  "truncated_quadratic": (lambda v: np.maximum(0.0, 1.0 - v) ** 2, 1.0, -2.0, 2.0),
  "savage": (lambda v: 1.0 / (1.0 + np.exp(v)) ** 2, 0.25, -0.25, 0.125),
}


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_values_and_derivatives_at_zero(name):
  f = gpo.get(name)
  closed, f0, d1, d2 = CLOSED[name]
  np.testing.assert_allclose(f(jnp.asarray(V, jnp.float32)), closed(V), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(f(jnp.float32(0.0))), f0, rtol=1e-6)
  np.testing.assert_allclose(float(gpo.grad0(name)), d1, rtol=1e-6)
  np.testing.assert_allclose(float(gpo.curv0(name)), d2, rtol=1e-6, atol=1e-7)
  assert d1 < 0  # classification-calibrated: f'(0) < 0


def test_worked_example_values():
  # By hand at v = beta * rho = 0.2: log(1 + e^-0.2), 1 - 0.2, 0.8^2, e^-0.2, 0.8^2, sigmoid(-0.2)^2.
  golden = {
    "logistic": 0.598139,
    "hinge": 0.8,
    "squared": 0.64,
    "exponential": 0.818731,
    "truncated_quadratic": 0.64,
    "savage": 0.202649,
  }
  for name, value in golden.items():
    np.testing.assert_allclose(float(gpo.get(name)(jnp.float32(0.2))), value, atol=1e-6)


def test_table_is_read_only_and_complete():
  assert set(gpo.CONVEX_FUNCTIONS) == set(CLOSED)
  assert set(gpo.METHOD_OF) == set(CLOSED)
  with pytest.raises(TypeError):
    gpo.CONVEX_FUNCTIONS["mine"] = abs


def test_unknown_name_lists_allowed():
  with pytest.raises(ValueError, match="allowed: .*'logistic'"):
    gpo.get("logstic")


def test_user_callable_passes_through():
  f = lambda v: jnp.log1p(jnp.exp(-2 * v))
  assert gpo.get(f) is f
  np.testing.assert_allclose(float(gpo.grad0(f)), -1.0, rtol=1e-6)


def test_savage_is_bounded_and_not_convex():
  v = jnp.linspace(-30.0, 30.0, 601)
  values = gpo.savage(v)
  assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
  second = jax.vmap(jax.grad(jax.grad(gpo.savage)))(v)
  assert float(second.min()) < 0.0  # concave somewhere: not convex


def test_exponential_linear_tail():
  # Exact for v >= -50; tangent continuation below, e^50 (1 - (v + 50)).
  np.testing.assert_allclose(float(gpo.exponential(jnp.float32(-49.0))), math.exp(49.0), rtol=1e-5)
  np.testing.assert_allclose(float(gpo.exponential(jnp.float32(-60.0))), math.exp(50.0) * 11.0, rtol=1e-5)
  np.testing.assert_allclose(float(jax.grad(gpo.exponential)(jnp.float32(-60.0))), -math.exp(50.0), rtol=1e-5)
  for dtype in (jnp.float32, jnp.bfloat16):
    for v in (-1e4, 1e4):
      x = jnp.asarray(v, dtype)
      for name in CLOSED:
        assert np.isfinite(float(gpo.get(name)(x))), (name, v, dtype)
        assert np.isfinite(float(jax.grad(lambda y: gpo.get(name)(y).astype(jnp.float32))(x))), (name, v, dtype)
