"""Weight perturbations against closed forms on quadratics with known Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import batching, perturbations
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


def test_asam_leaves_biases_unscaled_as_the_authors_code():
  # SamsungLabs/ASAM asam.py: only parameters named '...weight' get T = |w| + eta; a bias's
  # gradient enters the norm and the perturbation unscaled (T = 1 there).
  h, b, theta, flat, _, _ = _quadratic()
  params = {"dense": {"kernel": theta["m"], "bias": theta["v"]}}
  hh, bb = jnp.asarray(h, jnp.float32), jnp.asarray(b, jnp.float32)

  def objective(p, batch):
    del batch
    x = jnp.concatenate([p["dense"]["kernel"].reshape(-1), p["dense"]["bias"]])
    return 0.5 * x @ hh @ x + bb @ x, {}

  rho, eta = 0.5, 0.01
  x = np.asarray(flat(theta), np.float64)
  g = h @ x + b
  t = np.concatenate([np.abs(x[:6]) + eta, np.ones(3)])
  v = rho * t * t * g / (np.linalg.norm(t * g) + 1e-16)
  _, grads, _ = perturbations.sam(rho, adaptive=True, eta=eta).value_and_grad(objective, params, (), RNG, None)
  got = np.concatenate([np.asarray(grads["dense"]["kernel"]).reshape(-1), np.asarray(grads["dense"]["bias"])])
  np.testing.assert_allclose(got, h @ (x + v) + b, rtol=1e-5, atol=1e-5)


def _sharpness_problem(n):
  # L(theta; batch) = mean_i 1/2 ||theta - x_i||^2: gradient theta - mean(x) on each subset.
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(n, 3)).astype(np.float32)
  theta = jnp.asarray(rng.normal(size=3), jnp.float32)

  def objective(t, batch):
    return 0.5 * jnp.mean(jnp.sum((t[None] - batch["x"]) ** 2, axis=1)), {}

  return xs, theta, objective


def _m_sharpness_expected(xs, theta, rho, m):
  expected = []
  for start in range(0, len(xs), m):
    subset = xs[start : start + m]
    g = np.asarray(theta, np.float64) - subset.mean(0)
    expected.append(np.asarray(theta) + rho * g / np.linalg.norm(g) - subset.mean(0))
  return np.mean(expected, axis=0)


@pytest.mark.parametrize("n, m", [(4, 2), (6, 2), (6, 3), (6, 6)])
def test_m_sharpness_m_is_examples_per_ascent(n, m):
  # Foret et al. Sec. 4.1: disjoint subsets of m examples, one ascent each, SAM gradients averaged.
  # (6, 2) is three subsets of two examples (not two subsets of three).
  xs, theta, objective = _sharpness_problem(n)
  rho = 0.3
  _, grads, _ = perturbations.sam(rho, m=m).value_and_grad(objective, theta, (), RNG, {"x": jnp.asarray(xs)})
  np.testing.assert_allclose(grads, _m_sharpness_expected(xs, theta, rho, m), rtol=1e-5, atol=1e-6)
  if m == n:  # one subset: the whole-batch SAM gradient
    _, whole, _ = perturbations.sam(rho).value_and_grad(objective, theta, (), RNG, {"x": jnp.asarray(xs)})
    np.testing.assert_allclose(grads, whole, rtol=1e-6, atol=1e-7)


def test_m_sharpness_refuses_an_indivisible_batch_and_a_pair_batch():
  xs, theta, objective = _sharpness_problem(6)
  with pytest.raises(ValueError, match="m=4 examples per ascent must divide"):
    perturbations.sam(0.1, m=4).value_and_grad(objective, theta, (), RNG, {"x": jnp.asarray(xs)})
  pairs = batching.prompt_shared([[1, 2]] * 2, [[3]] * 2, [[4]] * 2, seq_bucket=8, completion_bucket=4)
  with pytest.raises(ValueError, match="grad_accum_steps"):
    perturbations.sam(0.1, m=1).value_and_grad(lambda p, b: (jnp.sum(p), {}), theta, (), RNG, {"pairs": pairs})


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
  for m in (0, 1.5, True):
    with pytest.raises(ValueError, match="m="):
      perturbations.sam(0.1, m=m)
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


# SAF and MESA (arXiv:2205.14083, the authors' SAF_train.py / MESA_train.py). The objective's
# outputs are linear in theta, z_i = A_i theta ([2] per pair), and its preference loss is
# 1/2 ||theta||^2, so the gradient of lam T^2 KL(p_i || softmax(z_i / T)) is lam T A_i^T (q_i - p_i)
# with q_i = softmax(z_i / T): closed forms in numpy.
def _trajectory_problem():
  rng = np.random.default_rng(7)
  a = rng.normal(size=(3, 2, 4)) * 3.0  # pairs x (chosen, rejected) x params
  ids = np.array([0, 1, -1], np.int32)  # the third pair is padding
  mask = np.array([1.0, 1.0, 0.0], np.float32)
  batch = {"A": jnp.asarray(a, jnp.float32), "example_id": jnp.asarray(ids), "mask": jnp.asarray(mask)}

  def objective(theta, b):
    z = jnp.einsum("bkd,d->bk", b["A"], theta)
    aux = {"logps_chosen": z[:, 0], "logps_rejected": z[:, 1], "example_id": b["example_id"], "mask": b["mask"]}
    return 0.5 * jnp.sum(theta**2), aux

  return a, batch, objective


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _trajectory_grad(a, theta, past, lam, t):
  """theta + lam (1/2) sum over the two real pairs of T A_i^T (q_i - p_i)."""
  g = np.asarray(theta, np.float64).copy()
  for i in range(2):
    q, p = _softmax(a[i] @ theta / t), _softmax(past[i] / t)
    g += lam * 0.5 * t * a[i].T @ (q - p)
  return g


def test_saf_trajectory_loss_reads_outputs_of_minus_epochs_ago():
  a, batch, objective = _trajectory_problem()
  lam, t = 0.5, 2.0
  pert = perturbations.saf(2, lam=lam, temperature=t, minus_epochs=1, start_epoch=-1, end_epoch=2)
  pstate = pert.init(None)
  value_and_grad = jax.jit(pert.value_and_grad, static_argnums=0)  # one compilation for the three steps
  thetas = [np.array([0.3, -0.2, 0.5, 0.1]), np.array([0.1, 0.4, -0.3, 0.2]), np.array([-0.2, 0.1, 0.2, 0.3])]
  # epoch 0: the slot of "one epoch ago" was never written (zeros: a uniform past); epoch 1: the
  # outputs of epoch 0; epoch 2: the term is off (end_epoch 2), the plain gradient.
  pasts = [np.zeros((2, 2)), np.stack([a[i] @ thetas[0] for i in range(2)]), None]
  for epoch, (theta, past) in enumerate(zip(thetas, pasts)):
    (loss, _), grads, pstate = value_and_grad(objective, jnp.asarray(theta, jnp.float32), pstate, RNG, batch)
    expected = theta if past is None else _trajectory_grad(a, theta, past, lam, t)
    np.testing.assert_allclose(np.asarray(grads), expected, rtol=1e-5, atol=1e-6, err_msg=f"epoch {epoch}")
    np.testing.assert_allclose(float(loss), 0.5 * theta @ theta, rtol=1e-6)  # the preference loss is reported
    # this epoch's outputs of the two real pairs are in slot epoch mod 2; the padding pair wrote nothing
    stored = np.asarray(pstate["memory"])[:, epoch % 2]
    np.testing.assert_allclose(stored, np.stack([a[i] @ theta for i in range(2)]), rtol=1e-5, atol=1e-6)
    assert int(pstate["seen"]) == 2 * (epoch + 1)
  _, plain, _ = perturbations.none().value_and_grad(objective, jnp.asarray(thetas[1]), (), RNG, batch)
  _, off, _ = perturbations.saf(2, lam=0.0, minus_epochs=1, start_epoch=-1).value_and_grad(
    objective, jnp.asarray(thetas[1]), pert.init(None), RNG, batch
  )
  np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))


def test_mesa_trajectory_loss_against_the_ema_weights():
  a, batch, objective = _trajectory_problem()
  lam, t, decay = 0.8, 5.0, 0.9
  theta0, theta1 = np.array([0.3, -0.2, 0.5, 0.1]), np.array([0.1, 0.4, -0.3, 0.2])
  pert = perturbations.mesa(2, lam=lam, temperature=t, decay=decay, start_epoch=-1)
  pstate = pert.init(jnp.asarray(theta0, jnp.float32))
  # first step: the EMA is the initial weights, its outputs are the policy's: no trajectory gradient
  _, grads, pstate = pert.value_and_grad(objective, jnp.asarray(theta0, jnp.float32), pstate, RNG, batch)
  np.testing.assert_allclose(np.asarray(grads), theta0, rtol=1e-5, atol=1e-6)
  # second step: EMA = decay theta0 + (1 - decay) theta1 (moved before it is read, as timm's order)
  ema = decay * theta0 + (1 - decay) * theta1
  _, grads, pstate = pert.value_and_grad(objective, jnp.asarray(theta1, jnp.float32), pstate, RNG, batch)
  past = np.stack([a[i] @ ema for i in range(2)])
  np.testing.assert_allclose(np.asarray(grads), _trajectory_grad(a, theta1, past, lam, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(pstate["ema"]), ema, rtol=1e-6)
  assert int(pstate["seen"]) == 4


def test_trajectory_perturbations_refuse_bad_arguments_and_missing_ids():
  for kwargs, match in (({"lam": -1.0}, "lam"), ({"temperature": 0.0}, "temperature"), ({"minus_epochs": 0}, "minus")):
    with pytest.raises(ValueError, match=match):
      perturbations.saf(4, **kwargs)
  with pytest.raises(ValueError, match="decay"):
    perturbations.mesa(4, decay=1.5)
  with pytest.raises(ValueError, match="num_examples"):
    perturbations.saf(0)
  _, batch, objective = _trajectory_problem()
  no_ids = {k: v for k, v in batch.items() if k != "example_id"}

  def without_ids(theta, b):
    loss, aux = objective(theta, {**b, "example_id": jnp.zeros(3, jnp.int32)})
    return loss, {k: v for k, v in aux.items() if k != "example_id"}

  pert = perturbations.saf(2)
  with pytest.raises(ValueError, match="example_id"):
    pert.value_and_grad(without_ids, jnp.zeros(4), pert.init(None), RNG, no_ids)


# Adversarial token embeddings (Miyato et al. 2017's fast gradient method, per token). The
# objective is linear in the embedding offset: l = sum_t (c_t + theta) . offset_t + 1/2 ||theta||^2,
# so the offset's gradient at zero is c_t + theta on real tokens, delta_t = radius (c_t + theta) / ||.||.
def test_adversarial_embeddings_move_each_real_token_by_the_radius():
  pairs = batching.prompt_shared([[1, 2, 3], [4]], [[5, 6], [7]], [[8], [9, 10]], seq_bucket=8, completion_bucket=4)
  rows, length = pairs.tokens.shape
  d = 3
  c = np.random.default_rng(5).normal(size=(rows, length, d)).astype(np.float32)
  theta = jnp.asarray([0.2, -0.1, 0.3], jnp.float32)

  def objective(p, b):
    off = b.get("embedding_offset", jnp.zeros((rows, length, d)))
    return jnp.sum((jnp.asarray(c) + p) * off) + 0.5 * jnp.sum(p**2), {}

  radius = 0.7
  ip = perturbations.adversarial_embeddings(radius, d)
  batch = {"pairs": pairs}
  adv = ip.perturb(objective, theta, batch)
  g = c + np.asarray(theta)
  real = np.asarray(pairs.segment_ids) > 0
  expected = np.where(real[..., None], radius * g / np.linalg.norm(g, axis=-1, keepdims=True), 0.0)
  np.testing.assert_allclose(np.asarray(adv["embedding_offset"]), expected, rtol=1e-5, atol=1e-6)
  # the outer gradient treats delta as a constant: d/dtheta = sum_t delta_t + theta
  (loss, _), grads, _ = perturbations.none().value_and_grad(objective, theta, (), RNG, adv)
  np.testing.assert_allclose(float(loss), radius * np.linalg.norm(g, axis=-1)[real].sum() + 0.5 * 0.14, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grads), expected.sum((0, 1)) + np.asarray(theta), rtol=1e-5, atol=1e-5)
  zero = perturbations.adversarial_embeddings(0.0, d).perturb(objective, theta, batch)
  np.testing.assert_array_equal(np.asarray(zero["embedding_offset"]), 0.0)
  for kwargs in ({"radius": -1.0, "hidden_size": 3}, {"radius": 0.1, "hidden_size": 0}):
    with pytest.raises(ValueError):
      perturbations.adversarial_embeddings(**kwargs)


def test_adversarial_embeddings_are_recomputed_at_sams_ascent_point():
  # Composed as pofx.train composes them: SAM differentiates the loss on the embeddings perturbed
  # at the weights it evaluates. With the linear objective above, the gradient at theta' is
  # sum_t delta_t(theta') + theta', delta_t(theta') = radius (c_t + theta') / ||c_t + theta'||.
  pairs = batching.prompt_shared([[1, 2], [3]], [[4], [5, 6]], [[7, 8], [9]], seq_bucket=8, completion_bucket=4)
  rows, length = pairs.tokens.shape
  c = np.random.default_rng(6).normal(size=(rows, length, 2)).astype(np.float32)
  real = (np.asarray(pairs.segment_ids) > 0)[..., None]

  def objective(p, b):
    return jnp.sum((jnp.asarray(c) + p) * b.get("embedding_offset", 0.0)) + 0.5 * jnp.sum(p**2), {}

  radius, rho = 0.3, 0.2
  ip = perturbations.adversarial_embeddings(radius, 2)

  def composed(p, b):
    return objective(p, ip.perturb(objective, p, b))

  def grad_at(theta):
    g = c + theta
    return np.where(real, radius * g / np.linalg.norm(g, axis=-1, keepdims=True), 0.0).sum((0, 1)) + theta

  theta = np.array([0.4, -0.3])
  g0 = grad_at(theta)
  expected = grad_at(theta + rho * g0 / np.linalg.norm(g0))
  _, grads, _ = perturbations.sam(rho).value_and_grad(
    composed, jnp.asarray(theta, jnp.float32), (), RNG, {"pairs": pairs}
  )
  np.testing.assert_allclose(np.asarray(grads), expected, rtol=1e-5, atol=1e-5)
