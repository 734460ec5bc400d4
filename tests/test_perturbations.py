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


# RWP (arXiv:2205.14826, the authors' utils_rwp.py). Per-pair losses built so that the proxy
# ascent directions are known in closed form: l_i = c_i ||W1||^2 / 2 + e_i ||W2||^2 / 2 + d_i sum(b),
# so grad_W1 mean_i(m_i l_i) = mean_i(m_i c_i) W1 (likewise W2), and b (a vector) is never perturbed.
def _rwp_problem(c, e, d, real=None):
  rng = np.random.default_rng(3)
  params = {
    "W1": jnp.asarray(rng.normal(size=(2, 3)) * 0.6, jnp.float32),
    "W2": jnp.asarray(rng.normal(size=(3, 2)) * 0.6, jnp.float32),
    "b": jnp.asarray(rng.normal(size=2), jnp.float32),
  }
  c, e, d = (jnp.asarray(x, jnp.float32) for x in (c, e, d))
  real = jnp.ones_like(c) if real is None else jnp.asarray(real, jnp.float32)

  def objective(p, batch):
    del batch
    per_pair = 0.5 * c * jnp.sum(p["W1"] ** 2) + 0.5 * e * jnp.sum(p["W2"] ** 2) + d * jnp.sum(p["b"])
    return jnp.sum(real * per_pair) / jnp.sum(real), {"per_pair": per_pair, "mask": real}

  return params, objective


def _rwp_expected(params, kappa1, kappa2, mean_c, mean_e, mean_d, gamma, steps, lr=0.01):
  """The authors' loop on the scalars a_l of D = (a1 W1, a2 W2), then the gradient at theta + gamma v."""
  n1, n2 = (float(np.linalg.norm(np.asarray(params[k], np.float64))) for k in ("W1", "W2"))
  total = np.hypot(n1, n2)
  a1 = a2 = 0.0
  s1 = s2 = 0.0  # v = (s1 W1, s2 W2)
  for _ in range(steps):
    # the proxy at theta + gamma v has W_l (1 + gamma s_l): its ascent gradient is kappa_l (1 + gamma s_l) W_l
    a1, a2 = a1 + lr * kappa1 * (1 + gamma * s1), a2 + lr * kappa2 * (1 + gamma * s2)
    scale = total / (np.hypot(a1 * n1, a2 * n2) + 1e-20)
    s1, s2 = scale * a1, scale * a2
  w1, w2 = (np.asarray(params[k], np.float64) for k in ("W1", "W2"))
  return {"W1": mean_c * (1 + gamma * s1) * w1, "W2": mean_e * (1 + gamma * s2) * w2, "b": np.full(2, mean_d)}


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_rwp_gradient_is_closed_form_with_one_global_radius(steps):
  # Every pair satisfies the LSC (c_min far above every loss). kappa_1 = mean(c) = 1 and
  # kappa_2 = mean(e) = 5 differ, so the single norm over both matrices (not AWP's per-layer one)
  # gives the two matrices different relative radii.
  c, e, d = [0.5, 1.5], [4.0, 6.0], [1.0, -3.0]
  params, objective = _rwp_problem(c, e, d)
  (loss, aux), grads, _ = perturbations.rwp(0.1, c_min=1e6, steps=steps).value_and_grad(
    objective, params, (), RNG, None
  )
  expected = _rwp_expected(params, 1.0, 5.0, 1.0, 5.0, -1.0, 0.1, steps)
  for k in expected:
    np.testing.assert_allclose(np.asarray(grads[k]), expected[k], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), float(objective(params, None)[0]), rtol=1e-6)  # at theta


def test_rwp_loss_stationary_condition_and_padding_choose_the_pairs():
  # Pair 0 moves W1 only and its loss is below c_min; pair 1 moves W2 only and is above c_min
  # (no ascent from it); pair 2 moves W2 and is below c_min but is padding (mask 0). So only W1
  # is perturbed, with all of the global radius: W1 (1 + gamma ||theta_W|| / ||W1||).
  c, e, d = [1.0, 0.0, 0.0], [0.0, 10.0, 1.0], [0.0, 0.0, 0.0]
  params, objective = _rwp_problem(c, e, d, real=[1.0, 1.0, 0.0])
  per_pair = np.asarray(objective(params, None)[1]["per_pair"])
  c_min = 8.0
  assert per_pair[0] < c_min / 1.5 and per_pair[2] < c_min / 1.5 and per_pair[1] > 1.5 * c_min, per_pair
  gamma = 0.01
  _, grads, _ = perturbations.rwp(gamma, c_min=c_min, steps=4).value_and_grad(objective, params, (), RNG, None)
  w1, w2 = (np.asarray(params[k], np.float64) for k in ("W1", "W2"))
  n1, n2 = np.linalg.norm(w1), np.linalg.norm(w2)
  # the loss is the mean over the two real pairs: dL/dW1 = c_0 / 2 W1', dL/dW2 = e_1 / 2 W2
  np.testing.assert_allclose(np.asarray(grads["W1"]), 0.5 * (1 + gamma * np.hypot(n1, n2) / n1) * w1, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(grads["W2"]), 5.0 * w2, rtol=2e-5)


def test_rwp_without_stationary_pairs_or_radius_is_the_plain_gradient():
  c, e, d = [0.5, 1.5], [4.0, 6.0], [1.0, -3.0]
  params, objective = _rwp_problem(c, e, d)
  _, plain, _ = perturbations.none().value_and_grad(objective, params, (), RNG, None)
  for pert in (perturbations.rwp(0.0, c_min=1e6), perturbations.rwp(0.05, c_min=0.0)):  # losses are >= 0
    _, grads, _ = pert.value_and_grad(objective, params, (), RNG, None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), grads, plain)


def test_rwp_refuses_bad_arguments_and_an_objective_without_per_pair_losses():
  with pytest.raises(TypeError):
    perturbations.rwp(0.01)  # c_min has no default
  for kwargs, match in (({"gamma": -1.0}, "gamma"), ({"steps": 0}, "steps"), ({"proxy_lr": 0.0}, "proxy_lr")):
    with pytest.raises(ValueError, match=match):
      perturbations.rwp(**{"gamma": 0.01, "c_min": 0.7, **kwargs})
  with pytest.raises(ValueError, match="per_pair"):
    perturbations.rwp(0.01, c_min=0.7).value_and_grad(
      lambda p, b: (jnp.sum(p["w"] ** 2), {}), {"w": jnp.ones((2, 2))}, (), RNG, None
    )
