"""Weight perturbations against closed forms on quadratics with known Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import perturbations
from tests import toy

RNG = jax.random.key(0)


def _quadratic():
  """L(theta) = 1/2 theta^T H theta + b^T theta, with theta = {"m": [2, 3] matrix, "v": [3] vector}."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(9, 9))
  h = a @ a.T / 9 + np.eye(9)
  b = rng.normal(size=9)
  theta = {"m": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32), "v": jnp.asarray(rng.normal(size=3), jnp.float32)}

  def flat(t):
    return jnp.concatenate([t["m"].reshape(-1), t["v"]])

  def unflat(x):
    return {"m": x[:6].reshape(2, 3), "v": x[6:]}

  def objective(t, batch):
    del batch
    x = flat(t)
    return 0.5 * x @ jnp.asarray(h, jnp.float32) @ x + jnp.asarray(b, jnp.float32) @ x, {}

  return h, b, theta, flat, unflat, objective


def test_sam_rho0_and_awp_gamma0_equal_plain_gradient_exactly():
  params, batch = toy.init(), toy.batch()

  def objective(p, b):
    out = toy.logps_fn(p, b)
    return -jnp.mean(out.chosen - out.rejected), {}

  _, plain, _ = perturbations.none().value_and_grad(objective, params, (), RNG, batch)
  for pert in (perturbations.sam(rho=0.0), perturbations.sam(rho=0.0, adaptive=True), perturbations.awp(gamma=0.0)):
    _, grads, _ = pert.value_and_grad(objective, params, (), RNG, batch)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), grads, plain)


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_sam_gradient_on_quadratic_is_closed_form(rho):
  h, b, theta, flat, unflat, objective = _quadratic()
  x = np.asarray(flat(theta), np.float64)
  g = h @ x + b
  v = rho * g / np.linalg.norm(g)
  expected = h @ (x + v) + b  # gradient at theta + v
  (loss, _), grads, _ = perturbations.sam(rho).value_and_grad(objective, theta, (), RNG, None)
  np.testing.assert_allclose(flat(grads), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss), 0.5 * x @ h @ x + b @ x, rtol=1e-5)  # loss at theta, not theta + v


def test_asam_gradient_on_quadratic_is_closed_form():
  h, b, theta, flat, unflat, objective = _quadratic()
  rho, eta = 0.5, 0.01
  x = np.asarray(flat(theta), np.float64)
  g = h @ x + b
  t = np.abs(x) + eta
  v = rho * t * t * g / np.linalg.norm(t * g)
  _, grads, _ = perturbations.sam(rho, adaptive=True, eta=eta).value_and_grad(objective, theta, (), RNG, None)
  np.testing.assert_allclose(flat(grads), h @ (x + v) + b, rtol=1e-5, atol=1e-5)


def test_m_sharpness_averages_shard_sam_gradients():
  # L(theta; batch) = mean_i 1/2 ||theta - x_i||^2: gradient theta - mean(x) on each shard.
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(4, 3)).astype(np.float32)
  theta = jnp.asarray(rng.normal(size=3), jnp.float32)
  rho = 0.3

  def objective(t, batch):
    return 0.5 * jnp.mean(jnp.sum((t[None] - batch["x"]) ** 2, axis=1)), {}

  expected = []
  for shard in (xs[:2], xs[2:]):
    g = np.asarray(theta) - shard.mean(0)
    v = rho * g / np.linalg.norm(g)
    expected.append(np.asarray(theta) + v - shard.mean(0))
  _, grads, _ = perturbations.sam(rho, m=2).value_and_grad(objective, theta, (), RNG, {"x": jnp.asarray(xs)})
  np.testing.assert_allclose(grads, np.mean(expected, axis=0), rtol=1e-5, atol=1e-6)


def test_awp_layerwise_radius_and_gradient():
  h, b, theta, flat, unflat, objective = _quadratic()
  gamma = 0.02
  x = np.asarray(flat(theta), np.float64)
  g = unflat(h @ x + b)
  v = perturbations.awp_direction(g, theta, gamma)
  np.testing.assert_allclose(np.linalg.norm(v["m"]), gamma * np.linalg.norm(theta["m"]), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(v["v"]), 0.0)  # vectors (biases, norms) are not perturbed
  gm = np.asarray(g["m"], np.float64)
  v_m = gamma * np.linalg.norm(np.asarray(theta["m"])) * gm / np.linalg.norm(gm)
  x_pert = x + np.concatenate([v_m.reshape(-1), np.zeros(3)])
  _, grads, _ = perturbations.awp(gamma).value_and_grad(objective, theta, (), RNG, None)
  np.testing.assert_allclose(flat(grads), h @ x_pert + b, rtol=1e-5, atol=1e-5)


def test_bad_values_raise():
  with pytest.raises(ValueError, match="rho"):
    perturbations.sam(-0.1)
  with pytest.raises(ValueError, match="m="):
    perturbations.sam(0.1, m=0)
  with pytest.raises(ValueError, match="gamma"):
    perturbations.awp(-1.0)
