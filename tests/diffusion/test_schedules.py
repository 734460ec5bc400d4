"""Noise schedules and the forward process against diffusers' `DDPMScheduler` on the same inputs."""

import numpy as np
import pytest

from pofx.diffusion import schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

_DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def _ddpm(beta_schedule="linear", prediction_type="epsilon", T=1000):
  return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction_type)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_betas_and_alphas_cumprod_equal_diffusers(name):
  ours = getattr(schedules, name)()
  ref = _ddpm(_DIFFUSERS_NAME[name])
  assert ours.num_train_timesteps == 1000 and ours.betas.dtype == np.float32
  np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
  # make() by diffusers' name is the same schedule.
  np.testing.assert_array_equal(
    np.asarray(schedules.make(_DIFFUSERS_NAME[name]).alphas_cumprod), np.asarray(ours.alphas_cumprod)
  )


def test_linear_endpoints_are_ho_et_al():
  """Ho et al. 2020, Sec. 4: beta_1 = 1e-4, beta_T = 0.02, abar_0 = 1 - 1e-4."""
  s = schedules.linear()
  assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
  assert float(s.alphas_cumprod[0]) == pytest.approx(1 - 1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_target_and_predicted_x0_equal_diffusers(prediction_type):
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (5, 4, 4, 3)).astype(np.float32)  # NHWC
  noise = rng.standard_normal((5, 4, 4, 3)).astype(np.float32)
  pred = rng.standard_normal((5, 4, 4, 3)).astype(np.float32)
  t = np.array([0, 1, 499, 998, 999])
  s = schedules.cosine(prediction_type=prediction_type)
  ref = _ddpm("squaredcos_cap_v2", prediction_type)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)
  tt = torch.from_numpy(t)

  x_t = np.asarray(schedules.add_noise(s, x0, noise, t))
  np.testing.assert_allclose(x_t, nhwc(ref.add_noise(nchw(x0), nchw(noise), tt)), rtol=1e-5, atol=1e-6)
  v = np.asarray(schedules.velocity(s, x0, noise, t))
  np.testing.assert_allclose(v, nhwc(ref.get_velocity(nchw(x0), nchw(noise), tt)), rtol=1e-5, atol=1e-6)
  expected_target = noise if prediction_type == "epsilon" else v
  np.testing.assert_array_equal(np.asarray(schedules.target(s, x0, noise, t)), expected_target)

  # x0_hat of the prediction: diffusers' step reports it as pred_original_sample (no clipping).
  ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=False)
  for i in range(len(t)):
    out = ref.step(nchw(pred[i : i + 1]), int(t[i]), nchw(x_t[i : i + 1]), generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(
      np.asarray(schedules.predicted_x0(s, x_t[i : i + 1], pred[i : i + 1], t[i])),
      nhwc(out.pred_original_sample),
      rtol=1e-5,
      atol=1e-4 if t[i] == 999 else 1e-5,  # abar_999 ~ 4e-9 for the cosine schedule: 1/sqrt(abar) ~ 1.6e4
    )
  # The exact target recovers x0 and the noise (at moderate t, where float32 keeps them).
  mid = np.array([1, 200, 500, 800, 900])
  x_mid = schedules.add_noise(s, x0, noise, mid)
  y = schedules.target(s, x0, noise, mid)
  np.testing.assert_allclose(np.asarray(schedules.predicted_x0(s, x_mid, y, mid)), x0, atol=2e-4)
  np.testing.assert_allclose(np.asarray(schedules.predicted_noise(s, x_mid, y, mid)), noise, atol=2e-4)


def test_snr_is_abar_over_one_minus_abar():
  ac = _ddpm().alphas_cumprod.numpy().astype(np.float64)
  t = np.array([0, 10, 500, 999])
  np.testing.assert_allclose(np.asarray(schedules.snr(schedules.linear(), t)), ac[t] / (1 - ac[t]), rtol=1e-4)
  np.testing.assert_array_equal(
    np.asarray(schedules.alpha_cumprod(schedules.linear(), np.array([-1, 0]))), [1.0, ac[0]]
  )


def test_bad_arguments_are_refused_with_the_allowed_values():
  with pytest.raises(ValueError, match="prediction_type='sample'.*allowed: epsilon, v_prediction"):
    schedules.linear(prediction_type="sample")
  with pytest.raises(ValueError, match="beta_schedule='sigmoid'.*allowed: linear, scaled_linear, squaredcos_cap_v2"):
    schedules.make("sigmoid")
  with pytest.raises(ValueError, match="num_train_timesteps=1"):
    schedules.linear(1)
  with pytest.raises(ValueError, match="0 < beta_start <= beta_end < 1"):
    schedules.linear(beta_start=0.5, beta_end=0.1)
