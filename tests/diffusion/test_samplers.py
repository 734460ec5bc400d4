"""DDPM/DDIM steps against diffusers' schedulers, their log-probs against a numpy Gaussian density,
the jitted sampler against a diffusers DDIM loop, DDIM inversion, and exact recovery of x0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx.diffusion import samplers, schedules
from tests.diffusion import standin

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
norm = pytest.importorskip("scipy.stats").norm

SHAPE = (2, 4, 4, 2)  # B, H, W, C
nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))
nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)


def _inputs(seed):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)


def _z(seed):
  """diffusers' own draw (`randn_tensor` with a CPU generator), NCHW torch and NHWC numpy."""
  z = torch.randn((SHAPE[0], SHAPE[3], SHAPE[1], SHAPE[2]), generator=torch.Generator().manual_seed(seed))
  return z, nhwc(z)


@pytest.mark.parametrize(
  "prediction_type,clip,num_inference_steps",
  [("epsilon", False, None), ("v_prediction", True, None), ("epsilon", True, 10), ("v_prediction", False, 10)],
)
def test_ddpm_step_equals_diffusers(prediction_type, clip, num_inference_steps):
  ref = diffusers.DDPMScheduler(prediction_type=prediction_type, clip_sample=clip)
  s = schedules.linear(prediction_type=prediction_type)
  if num_inference_steps:
    ref.set_timesteps(num_inference_steps)
    ts, prev = samplers.timesteps(s, num_inference_steps)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    pick = [0, 4, 9]  # t = 900, 500, 0
  else:
    ts, prev = np.arange(1000)[::-1], np.arange(1000)[::-1] - 1
    pick = [0, 500, 998, 999]  # t = 999, 499, 1, 0
  for seed, i in enumerate(pick):
    x_t, pred = _inputs(seed)
    z_torch, z = _z(seed)
    want = ref.step(nchw(pred), int(ts[i]), nchw(x_t), generator=torch.Generator().manual_seed(seed)).prev_sample
    got, _ = samplers.ddpm_step(s, pred, x_t, ts[i], prev[i], z, clip_sample=1.0 if clip else None)
    np.testing.assert_allclose(np.asarray(got), nhwc(want), atol=1e-5, rtol=1e-5)
  # One timestep per image ([B]): image b against diffusers' step on it alone (its own noise draw).
  x_t, pred = _inputs(7)
  t_vec, p_vec = np.array([ts[pick[0]], ts[pick[-2]]]), np.array([prev[pick[0]], prev[pick[-2]]])
  gens = lambda b: torch.Generator().manual_seed(20 + b)
  z = np.concatenate([nhwc(torch.randn((1, SHAPE[3], SHAPE[1], SHAPE[2]), generator=gens(b))) for b in range(2)])
  got, _ = samplers.ddpm_step(s, pred, x_t, t_vec, p_vec, z, clip_sample=1.0 if clip else None)
  for b in range(2):
    want = ref.step(nchw(pred)[b : b + 1], int(t_vec[b]), nchw(x_t)[b : b + 1], generator=gens(b)).prev_sample
    np.testing.assert_allclose(np.asarray(got)[b : b + 1], nhwc(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "prediction_type,eta,clip",
  [("epsilon", 0.0, False), ("epsilon", 1.0, True), ("v_prediction", 0.5, False), ("v_prediction", 1.0, True)],
)
def test_ddim_step_equals_diffusers(prediction_type, eta, clip):
  ref = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=clip)
  ref.set_timesteps(10)
  s = schedules.cosine(prediction_type=prediction_type) if prediction_type == "v_prediction" else schedules.linear()
  if prediction_type == "v_prediction":
    ref = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=clip)
    ref.set_timesteps(10)
  ts, prev = samplers.timesteps(s, 10)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  for seed, i in enumerate([0, 3, 9]):  # t = 900, 600, 0 (the last to the clean image)
    x_t, pred = _inputs(seed)
    z_torch, z = _z(seed)
    want = ref.step(nchw(pred), int(ts[i]), nchw(x_t), eta=eta, variance_noise=z_torch).prev_sample
    got, _ = samplers.ddim_step(s, pred, x_t, ts[i], prev[i], z, eta=eta, clip_sample=1.0 if clip else None)
    np.testing.assert_allclose(np.asarray(got), nhwc(want), atol=1e-5, rtol=1e-5)


def _np_alphas(T=1000):
  return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))  # float64, Ho et al. Sec. 4


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.7), ("ddpm", 0.0)])
def test_step_log_prob_is_the_gaussian_density(sampler, eta):
  """The log-prob of the sampled x_prev equals sum over pixels of scipy's normal logpdf under the
  step's mean and standard deviation, both written here from the papers' formulas in float64."""
  ac = _np_alphas()
  s = schedules.linear()
  x_t, eps = _inputs(3)
  _, z = _z(3)
  for t, t_prev in [(900, 800), (500, 499), (100, 0)]:
    a, ap = ac[t], ac[t_prev]
    x0 = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)  # Ho et al. Eq. 15
    if sampler == "ddim":  # Song et al. Eqs. 12 and 16
      sigma = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
      mean = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps
      x_prev, lp = samplers.ddim_step(s, eps, x_t, t, t_prev, z, eta=eta)
    else:  # Ho et al. Eqs. 6-7 with beta_t = 1 - a / ap
      b = 1 - a / ap
      mean = np.sqrt(ap) * b / (1 - a) * x0 + np.sqrt(1 - b) * (1 - ap) / (1 - a) * x_t
      sigma = np.sqrt((1 - ap) / (1 - a) * b)
      x_prev, lp = samplers.ddpm_step(s, eps, x_t, t, t_prev, z)
    np.testing.assert_allclose(np.asarray(x_prev), mean + sigma * z, atol=2e-5)
    want = norm.logpdf(np.asarray(x_prev, np.float64), mean, sigma).sum(axis=(1, 2, 3))
    assert lp.dtype == jnp.float32 and lp.shape == (2,)
    np.testing.assert_allclose(np.asarray(lp), want, rtol=2e-4, atol=2e-3)
  # Deterministic steps (DDIM eta = 0; DDPM at t = 0) report 0.
  assert np.all(np.asarray(samplers.ddim_step(s, eps, x_t, 500, 400, None, eta=0.0)[1]) == 0)
  assert np.all(np.asarray(samplers.ddpm_step(s, eps, x_t, 0, -1, z)[1]) == 0)


def test_log_prob_of_step_under_the_model():
  """log p_theta(x_prev | x_t) with the stand-in's prediction, computed here by its torch twin."""
  params = standin.init(jax.random.key(0), channels=2)
  s = schedules.linear()
  ac = _np_alphas()
  x_t, x_prev = _inputs(5)
  labels = np.array([0, 2])
  t, t_prev, eta = 700, 600, 0.8
  # One jitted call: the log-prob and its gradient in the parameters (trajectory methods train through it).
  lp_sum = lambda p: samplers.log_prob_of_step(standin.denoise, p, s, x_t, x_prev, t, t_prev, labels, eta)
  lp, g = jax.jit(lambda p: (lp_sum(p), jax.grad(lambda q: lp_sum(q).sum())(p)))(params)
  eps = nhwc(standin.torch_denoise(params, nchw(x_t), torch.tensor([t, t]), torch.from_numpy(labels))).astype(
    np.float64
  )
  a, ap = ac[t], ac[t_prev]
  x0 = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
  sigma = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
  mean = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps
  np.testing.assert_allclose(np.asarray(lp), norm.logpdf(x_prev, mean, sigma).sum(axis=(1, 2, 3)), rtol=1e-4)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(g)) and float(jnp.abs(g["w"]).sum()) > 0
  with pytest.raises(ValueError, match="eta=0 is a deterministic step"):
    samplers.log_prob_of_step(standin.denoise, params, s, x_t, x_prev, t, t_prev, labels, 0.0)


def test_sample_equals_a_diffusers_ddim_loop():
  """`sample` (jitted scan, DDIM eta = 1, 5 steps) against diffusers' `DDIMScheduler` stepping the
  stand-in's torch twin with the same x_T and noises (drawn as `sample` draws them from its key),
  and its log-probs against scipy's density under diffusers' step means."""
  params = standin.init(jax.random.key(1), channels=2)
  s = schedules.linear()
  labels = np.array([1, 2], np.int32)
  key = jax.random.key(3)
  traj = samplers.sample(standin.denoise, params, s, key, labels, shape=SHAPE, num_steps=5, eta=1.0)
  assert traj.latents.shape == (6,) + SHAPE and traj.log_probs.shape == (5, 2)
  k_init, k_steps = jax.random.split(key)
  x = nchw(jax.random.normal(k_init, SHAPE))
  noises = [nchw(jax.random.normal(k, SHAPE)) for k in jax.random.split(k_steps, 5)]
  ref = diffusers.DDIMScheduler(clip_sample=False)
  ref.set_timesteps(5)
  np.testing.assert_array_equal(np.asarray(traj.timesteps), ref.timesteps.numpy())
  for i, t in enumerate(ref.timesteps):
    eps = standin.torch_denoise(params, x, t.repeat(2), torch.from_numpy(labels))
    out = ref.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x))
    mean = out.prev_sample
    np.testing.assert_allclose(np.asarray(traj.x0_predictions[i]), nhwc(out.pred_original_sample), atol=1e-4)
    x = ref.step(eps, t, x, eta=1.0, variance_noise=noises[i]).prev_sample
    np.testing.assert_allclose(np.asarray(traj.latents[i + 1]), nhwc(x), atol=1e-4)
    std = ((x - mean) / noises[i]).mean().item()  # the step's sigma
    if std > 0:
      want = norm.logpdf(nhwc(x).astype(np.float64), nhwc(mean), std).sum(axis=(1, 2, 3))
      np.testing.assert_allclose(np.asarray(traj.log_probs[i]), want, rtol=1e-3)
    else:
      assert np.all(np.asarray(traj.log_probs[i]) == 0)
  # log_prob_of_step re-scores the transitions the sampler took (all steps in one batch).
  flat = lambda v: v.reshape((-1,) + v.shape[2:])
  lp = jax.jit(samplers.log_prob_of_step, static_argnums=0)(
    standin.denoise,
    params,
    s,
    flat(traj.latents[:-1]),
    flat(traj.latents[1:]),
    jnp.repeat(traj.timesteps, 2),
    jnp.repeat(traj.prev_timesteps, 2),
    np.tile(labels, 5),
  )
  np.testing.assert_allclose(np.asarray(lp), np.asarray(traj.log_probs).reshape(-1), rtol=1e-4)


@pytest.mark.parametrize("prediction_type,sampler,eta", [("epsilon", "ddpm", 0.0), ("v_prediction", "ddim", 0.0)])
def test_the_exact_noise_denoiser_recovers_x0(prediction_type, sampler, eta):
  """A denoiser that returns the exact noise (or v) of a known x0 at every x_t: every step's
  x0_hat is x0, and the last step (to abar = 1, without noise) lands on it."""
  s = schedules.linear(prediction_type=prediction_type)
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, SHAPE), jnp.float32)

  def oracle(params, x_t, t, cond):
    a = s.alphas_cumprod[t][:, None, None, None]
    eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return eps if prediction_type == "epsilon" else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

  traj = samplers.sample(oracle, {}, s, jax.random.key(0), None, shape=SHAPE, num_steps=10, sampler=sampler, eta=eta)
  np.testing.assert_allclose(np.asarray(traj.latents[-1]), np.asarray(x0), atol=1e-4)


def test_ddim_inversion_then_sampling_returns_to_the_image():
  """Invert images with the deterministic DDIM (20 steps) and sample back with eta = 0 from the
  inverted x_T. Inversion evaluates the denoiser at the lower-noise latent of each step, so it is
  exact when the prediction does not depend on x_t: with the stand-in's convolution set to zero
  every latent of the way back equals the inversion's within 1e-5. With a smooth stand-in
  (convolution weights ~1e-3) the round trip ends within 2e-2 of the images (max abs, images in
  [-1, 1])."""
  params = standin.init(jax.random.key(2), channels=2)
  s = schedules.linear()
  x0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, SHAPE), jnp.float32)
  labels = np.array([0, 1], np.int32)
  for scale, tol in [(0.0, 1e-5), (0.01, 2e-2)]:
    p = dict(params, w=params["w"] * scale)
    inv = samplers.ddim_invert(standin.denoise, p, s, x0, labels, num_steps=20)
    assert inv.latents.shape == (21,) + SHAPE
    back = samplers.sample(
      standin.denoise,
      p,
      s,
      jax.random.key(9),
      labels,
      shape=SHAPE,
      num_steps=20,
      eta=0.0,
      initial_latents=inv.latents[-1],
    )
    np.testing.assert_allclose(np.asarray(back.latents), np.asarray(inv.latents[::-1]), atol=tol)
    np.testing.assert_allclose(np.asarray(back.latents[-1]), np.asarray(x0), atol=tol)


def test_ddim_invert_equals_diffusers_inverse_scheduler():
  """`ddim_invert` (v-prediction, cosine schedule, 5 steps) against diffusers' `DDIMInverseScheduler`
  driving the stand-in's torch twin from the same images."""
  params = standin.init(jax.random.key(6), channels=2)
  s = schedules.cosine(prediction_type="v_prediction")
  x0, _ = _inputs(11)
  labels = np.array([2, 0], np.int32)
  inv = samplers.ddim_invert(standin.denoise, params, s, x0, labels, num_steps=5)
  ref = diffusers.DDIMInverseScheduler(
    beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False
  )
  ref.set_timesteps(5)
  x = nchw(x0)
  for i, t in enumerate(ref.timesteps):
    pred = standin.torch_denoise(params, x, t.repeat(2), torch.from_numpy(labels))
    x = ref.step(pred, t, x).prev_sample
    np.testing.assert_allclose(np.asarray(inv.latents[i + 1]), nhwc(x), atol=1e-5, rtol=1e-5)


def test_classifier_free_guidance():
  """guided = u + w (c - u) with c, u the stand-in's predictions with the labels and the null class;
  sampling with w = 1 equals sampling without guidance."""
  params = standin.init(jax.random.key(4), channels=2)
  x_t, _ = _inputs(0)
  t = np.array([10, 900])
  labels = np.array([0, 2])
  g = jax.jit(samplers.guided(standin.denoise, 3.0, standin.NULL_CLASS))(params, x_t, t, labels)
  c = nhwc(standin.torch_denoise(params, nchw(x_t), torch.from_numpy(t), torch.from_numpy(labels)))
  u = nhwc(standin.torch_denoise(params, nchw(x_t), torch.from_numpy(t), torch.full((2,), standin.NULL_CLASS)))
  np.testing.assert_allclose(np.asarray(g), u + 3.0 * (c - u), atol=1e-5)
  with pytest.raises(ValueError, match="null class"):
    samplers.guided(standin.denoise, 3.0, None)


def test_bad_arguments_are_refused():
  s = schedules.linear()
  x, e = _inputs(0)
  with pytest.raises(ValueError, match="sampler='euler'.*allowed: ddim, ddpm"):
    samplers.transition(s, e, x, 10, 9, sampler="euler")
  with pytest.raises(ValueError, match="eta=1.5.*0 <= eta <= 1"):
    samplers.ddim_step(s, e, x, 10, 9, None, eta=1.5)
  with pytest.raises(ValueError, match=r"num_steps=0.*\[1, 1000\]"):
    samplers.timesteps(s, 0)
  with pytest.raises(ValueError, match="shape"):
    samplers.sample(standin.denoise, {}, s, jax.random.key(0), shape=(4, 4, 2), num_steps=2)
