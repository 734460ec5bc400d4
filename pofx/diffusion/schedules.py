r"""DDPM noise schedules and the forward (noising) process, as diffusers' `DDPMScheduler` defines them.

    schedule = schedules.linear()                       # T = 1000, betas 1e-4 .. 0.02, epsilon-prediction
    x_t = schedules.add_noise(schedule, x0, noise, t)   # sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    y = schedules.target(schedule, x0, noise, t)        # what the denoiser regresses: noise, or v

Notation (DDPM, Ho et al. 2020, arXiv:2006.11239, Sec. 2): `betas[t]` = beta_t for t = 0 .. T-1
(diffusers' 0-based indexing of the paper's t = 1 .. T), `alpha_t = 1 - beta_t`,
`alphas_cumprod[t]` = abar_t = prod_{s <= t} alpha_s. The forward process is (Eq. 4)

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

Beta schedules (the names are diffusers' `beta_schedule` values):
  `linear`             betas linearly spaced from beta_start to beta_end (Ho et al., Sec. 4:
                       1e-4 to 0.02 over T = 1000 steps; diffusers' defaults);
  `scaled_linear`      betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (latent diffusion);
  `squaredcos_cap_v2`  the cosine schedule (Nichol & Dhariwal 2021, arXiv:2102.09672, Eq. 17):
                       abar(t) = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), s = 0.008,
                       discretised as beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta)
                       with max_beta = 0.999 (their clipping, Sec. 3.2).

Prediction types (what the denoiser outputs, and so its regression target):
  `epsilon`        the noise eps (Ho et al., Eq. 14);
  `v_prediction`   v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022,
                   arXiv:2202.00512, Sec. 4 and App. D, with alpha_t = sqrt(abar_t),
                   sigma_t = sqrt(1 - abar_t)); diffusers' `get_velocity`.

From a prediction at x_t the clean image and the noise follow (Ho et al. Eq. 15 for epsilon;
Salimans & Ho App. D for v):

    epsilon: x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    v:       x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_hat,  eps_hat = sqrt(abar_t) v_hat + sqrt(1 - abar_t) x_t

The signal-to-noise ratio is SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021,
arXiv:2107.00630, Eq. 2 with alpha_t^2 = abar_t and sigma_t^2 = 1 - abar_t).

Timesteps `t` are integers in [0, T): a scalar (every image at the same step) or `[B]` (one per
image, broadcast over the image's other axes). Images are NHWC float32 in [-1, 1]; every
result is float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pofx import options

Array = jax.Array

PREDICTION_TYPES = options.DIFFUSION_PREDICTION_TYPES
BETA_SCHEDULES = options.DIFFUSION_SCHEDULES


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """A discrete DDPM noise schedule (a pytree; the prediction type and T are static).

  Attributes:
    betas: `[T]` float32, beta_t.
    alphas_cumprod: `[T]` float32, abar_t = prod_{s <= t} (1 - beta_s).
    prediction_type: "epsilon" or "v_prediction" (the denoiser's output).
    num_train_timesteps: T.
  """

  betas: Array
  alphas_cumprod: Array
  prediction_type: str = "epsilon"
  num_train_timesteps: int = 1000


jax.tree_util.register_dataclass(
  NoiseSchedule, data_fields=["betas", "alphas_cumprod"], meta_fields=["prediction_type", "num_train_timesteps"]
)


def _check_prediction_type(prediction_type):
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"schedules: unknown prediction_type={prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}.")


def _check_num_timesteps(num_train_timesteps):
  if (
    isinstance(num_train_timesteps, bool) or int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2
  ):
    raise ValueError(f"schedules: num_train_timesteps={num_train_timesteps!r}; allowed: an integer >= 2.")
  return int(num_train_timesteps)


def from_betas(betas, *, prediction_type: str = "epsilon") -> NoiseSchedule:
  """The schedule of given betas `[T]`, each in (0, 1); abar_t = prod_{s <= t} (1 - beta_s).

  The betas are rounded to float32 and the cumulative product is taken in float32, step by step,
  as diffusers' schedulers do: the noise levels are those a diffusers-trained checkpoint saw (up to
  float32 rounding), and the ratios abar_t / abar_{t-1} keep (1 - beta_t) to float32 precision,
  which the DDPM posterior's coefficients need near t = 0.
  """
  _check_prediction_type(prediction_type)
  b = np.asarray(betas, np.float64)
  if b.ndim != 1 or b.shape[0] < 2:
    raise ValueError(f"schedules.from_betas: betas must be a 1-D array of T >= 2 values, got shape {b.shape}.")
  if not np.all(np.isfinite(b)) or np.any(b <= 0) or np.any(b >= 1):
    raise ValueError("schedules.from_betas: every beta must lie in (0, 1).")
  b = b.astype(np.float32)
  return NoiseSchedule(
    betas=jnp.asarray(b),
    alphas_cumprod=jnp.asarray(np.cumprod(np.float32(1.0) - b, dtype=np.float32)),
    prediction_type=prediction_type,
    num_train_timesteps=int(b.shape[0]),
  )


def _check_beta_range(name, beta_start, beta_end):
  if not (0.0 < float(beta_start) <= float(beta_end) < 1.0):
    raise ValueError(
      f"schedules.{name}: beta_start={beta_start!r}, beta_end={beta_end!r}; allowed: 0 < beta_start <= beta_end < 1."
    )


def linear(
  num_train_timesteps: int = 1000,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  *,
  prediction_type: str = "epsilon",
) -> NoiseSchedule:
  """Linear betas from `beta_start` to `beta_end` (Ho et al. 2020, arXiv:2006.11239, Sec. 4;
  diffusers' `DDPMScheduler` defaults, `beta_schedule="linear"`)."""
  T = _check_num_timesteps(num_train_timesteps)
  _check_beta_range("linear", beta_start, beta_end)
  return from_betas(np.linspace(beta_start, beta_end, T), prediction_type=prediction_type)


def scaled_linear(
  num_train_timesteps: int = 1000,
  beta_start: float = 1e-4,
  beta_end: float = 0.02,
  *,
  prediction_type: str = "epsilon",
) -> NoiseSchedule:
  """betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (diffusers' `"scaled_linear"`, the
  latent-diffusion schedule; Stable Diffusion uses beta_start 0.00085, beta_end 0.012)."""
  T = _check_num_timesteps(num_train_timesteps)
  _check_beta_range("scaled_linear", beta_start, beta_end)
  return from_betas(np.linspace(beta_start**0.5, beta_end**0.5, T) ** 2, prediction_type=prediction_type)


def cosine(
  num_train_timesteps: int = 1000, *, max_beta: float = 0.999, s: float = 0.008, prediction_type: str = "epsilon"
) -> NoiseSchedule:
  """The cosine schedule (Nichol & Dhariwal 2021, arXiv:2102.09672, Eq. 17; diffusers'
  `"squaredcos_cap_v2"`): beta_i = min(1 - f((i + 1) / T) / f(i / T), max_beta) with
  f(u) = cos^2((u + s) / (1 + s) * pi / 2)."""
  T = _check_num_timesteps(num_train_timesteps)
  if not (0.0 < float(max_beta) < 1.0):
    raise ValueError(f"schedules.cosine: max_beta={max_beta!r}; allowed: 0 < max_beta < 1.")
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  betas = [min(1.0 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
  return from_betas(np.asarray(betas), prediction_type=prediction_type)


def make(beta_schedule: str, num_train_timesteps: int = 1000, *, prediction_type: str = "epsilon", **kw):
  """The schedule named by diffusers' `beta_schedule` value (`BETA_SCHEDULES`), e.g. from a config."""
  fns = {"linear": linear, "scaled_linear": scaled_linear, "squaredcos_cap_v2": cosine}
  if beta_schedule not in fns:
    raise ValueError(f"schedules.make: unknown beta_schedule={beta_schedule!r}; allowed: {', '.join(BETA_SCHEDULES)}.")
  return fns[beta_schedule](num_train_timesteps, prediction_type=prediction_type, **kw)


def _per_image(values: Array, t, ndim: int) -> Array:
  """`values[t]` (float32) shaped to broadcast against an array of rank `ndim` whose leading axes are t's."""
  t = jnp.asarray(t)
  v = jnp.asarray(values, jnp.float32)[t]
  return v.reshape(t.shape + (1,) * (ndim - t.ndim))


def alpha_cumprod(schedule: NoiseSchedule, t) -> Array:
  """abar_t, with abar = 1 for t < 0 (the clean image: diffusers' `final_alpha_cumprod` with
  `set_alpha_to_one=True`, and `DDPMScheduler`'s value past the last step)."""
  t = jnp.asarray(t)
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0).astype(jnp.float32)


def add_noise(schedule: NoiseSchedule, x0: Array, noise: Array, t) -> Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, Eq. 4; diffusers' `add_noise`)."""
  a = _per_image(schedule.alphas_cumprod, t, jnp.ndim(x0))
  return jnp.sqrt(a) * jnp.asarray(x0, jnp.float32) + jnp.sqrt(1.0 - a) * jnp.asarray(noise, jnp.float32)


def velocity(schedule: NoiseSchedule, x0: Array, noise: Array, t) -> Array:
  """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, arXiv:2202.00512, App. D;
  diffusers' `get_velocity`)."""
  a = _per_image(schedule.alphas_cumprod, t, jnp.ndim(x0))
  return jnp.sqrt(a) * jnp.asarray(noise, jnp.float32) - jnp.sqrt(1.0 - a) * jnp.asarray(x0, jnp.float32)


def target(schedule: NoiseSchedule, x0: Array, noise: Array, t) -> Array:
  """The denoiser's regression target at x_t: the noise (epsilon) or the velocity v (v_prediction)."""
  if schedule.prediction_type == "epsilon":
    return jnp.asarray(noise, jnp.float32)
  return velocity(schedule, x0, noise, t)


def x0_and_noise(prediction_type: str, x_t: Array, prediction: Array, abar: Array):
  """`(x0_hat, eps_hat)` from a prediction at a sample of noise level `abar` (broadcastable).

  epsilon: x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) (Ho et al., Eq. 15);
  v: x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v, eps_hat = sqrt(abar) v + sqrt(1 - abar) x_t
  (Salimans & Ho, App. D).
  """
  _check_prediction_type(prediction_type)
  x_t = jnp.asarray(x_t, jnp.float32)
  prediction = jnp.asarray(prediction, jnp.float32)
  abar = jnp.asarray(abar, jnp.float32)
  if prediction_type == "epsilon":
    return (x_t - jnp.sqrt(1.0 - abar) * prediction) / jnp.sqrt(abar), prediction
  return (
    jnp.sqrt(abar) * x_t - jnp.sqrt(1.0 - abar) * prediction,
    jnp.sqrt(abar) * prediction + jnp.sqrt(1.0 - abar) * x_t,
  )


def predicted_x0(schedule: NoiseSchedule, x_t: Array, prediction: Array, t) -> Array:
  """x0_hat from the denoiser's prediction at (x_t, t) (module docstring)."""
  a = _per_image(schedule.alphas_cumprod, t, jnp.ndim(x_t))
  return x0_and_noise(schedule.prediction_type, x_t, prediction, a)[0]


def predicted_noise(schedule: NoiseSchedule, x_t: Array, prediction: Array, t) -> Array:
  """eps_hat from the denoiser's prediction at (x_t, t) (module docstring)."""
  a = _per_image(schedule.alphas_cumprod, t, jnp.ndim(x_t))
  return x0_and_noise(schedule.prediction_type, x_t, prediction, a)[1]


def snr(schedule: NoiseSchedule, t) -> Array:
  """SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, arXiv:2107.00630, Eq. 2)."""
  a = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[jnp.asarray(t)]
  return a / (1.0 - a)
