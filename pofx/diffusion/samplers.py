r"""DDPM and DDIM sampling with the per-step Gaussian log-probs that trajectory methods need.

    traj = samplers.sample(denoise, params, schedule, key, labels, shape=(8, 8, 8, 1), num_steps=20, eta=1.0)
    traj.latents[-1]                  # [B, H, W, C] the generated images (traj.latents[0] is x_T)
    traj.log_probs                    # [num_steps, B] log p_theta(x_{t_prev} | x_t) of each step taken
    traj.x0_predictions               # [num_steps, B, H, W, C] the clean image each step's prediction implies
    samplers.log_prob_of_step(denoise, params, schedule, x_t, x_prev, t, t_prev, labels, eta=1.0)
    inv = samplers.ddim_invert(denoise, params, schedule, x0, labels, num_steps=20)   # x0 -> x_T

The denoiser is used only through the protocol `denoise(params, x_t, timesteps, cond) ->
prediction` (`pofx.diffusion.unet.make(config).denoise`), with `x_t [B, H, W, C]`, `timesteps
[B]` int32, `cond [B]` int32 class labels or None, and the prediction of the schedule's
`prediction_type` (`pofx.diffusion.schedules`).

One step goes from timestep t to t_prev < t (t_prev < 0: to the clean image, abar = 1). With
abar = `schedule.alphas_cumprod`, a = abar_t, a' = abar_{t_prev} and (x0_hat, eps_hat) the clean
image and noise implied by the prediction (`schedules.x0_and_noise`), optionally with x0_hat
clipped to [-c, c] (diffusers' `clip_sample`; eps_hat is not recomputed, as diffusers' default
`use_clipped_model_output=False`):

DDPM (Ho et al. 2020, arXiv:2006.11239, Eqs. 6-7: the posterior q(x_{t_prev} | x_t, x0_hat);
diffusers' `DDPMScheduler.step` with `variance_type="fixed_small"`), with b = 1 - a / a':

    mean = sqrt(a') b / (1 - a) * x0_hat + sqrt(a / a') (1 - a') / (1 - a) * x_t
    var  = max((1 - a') / (1 - a) * b, 1e-20)      (beta tilde; no noise at t = 0)

DDIM (Song et al. 2021, arXiv:2010.02502, Eq. 12, with sigma from Eq. 16; diffusers'
`DDIMScheduler.step`):

    sigma = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a')
    mean  = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat

and x_{t_prev} = mean + std * z with the given standard normal noise z. With eta = 1 and no
clipping the two are the same Gaussian (DDIM, Sec. 4.1); eta = 0 is the deterministic DDIM.

The log-prob of a transition is the Gaussian density of x_{t_prev} under N(mean, std^2 I), summed
over the image's H, W, C in float32 (the policy's per-step likelihood of the denoising MDP of DDPO,
Black et al. 2023, arXiv:2305.13301, Sec. 4, and of D3PO, Yang et al. 2023, arXiv:2311.13231):

    log p = sum_pixels [ -(x_{t_prev} - mean)^2 / (2 std^2) - log std - log sqrt(2 pi) ]

(both authors' code, `ddim_step_with_logprob`, takes the mean over pixels instead, which is this
divided by H * W * C). A deterministic transition (std = 0: DDIM with eta = 0, the DDPM step at
t = 0, the DDIM step to the clean image) has no density; its log-prob is reported as 0.

Timesteps of a `num_steps`-step run are diffusers' default `"leading"` spacing with
`steps_offset=0`: t_i = (num_steps - 1 - i) * (T // num_steps), and t_prev = t - T // num_steps.

DDIM inversion (Song et al. 2021, Sec. 4.3: the deterministic DDIM as an ODE, integrated from
x_0 towards x_T; diffusers' `DDIMInverseScheduler`, used by Inversion-DPO to find the noisy
latents of a given image): for each sampling step (t, t_prev) taken backwards, from x at level
abar_{t_prev} (1 for the clean image) with the prediction of the denoiser at (x, t),

    x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat,

with (x0_hat, eps_hat) read at x's own level abar_{t_prev}. It inverts the deterministic sampler
up to the change of x between neighbouring steps.

Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598, Eq. 6, (1 + w') c - w' u, written
as diffusers' pipelines do with `guidance_scale` w = 1 + w'): with the denoiser's null class (a
class label trained as "no condition"), the prediction is u + w (c - u), c and u the predictions
with the labels and with the null class (one denoiser call on the doubled batch); w = 1 is the
conditional prediction.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pofx import options
from pofx.diffusion import schedules as schedules_lib

Array = jax.Array
Denoise = Callable[[object, Array, Array, Optional[Array]], Array]

SAMPLERS = options.DIFFUSION_SAMPLERS
_LOG_SQRT_2PI = 0.5 * float(np.log(2.0 * np.pi))


class Trajectory(NamedTuple):
  """A sampled (or inverted) chain, time-major.

  Attributes:
    latents: `[num_steps + 1, B, H, W, C]` float32; for `sample`, x_T first and the generated
      images last; for `ddim_invert`, the given images first and x_T last.
    timesteps: `[num_steps]` int32, the timestep t of each step (the denoiser's input).
    prev_timesteps: `[num_steps]` int32, the step's other end t_prev (-1: the clean image).
    log_probs: `[num_steps, B]` float32 log-probs of the transitions taken (zeros for inversion).
    x0_predictions: `[num_steps, B, H, W, C]` float32, for `sample`: the clean image x0_hat that
      step i's prediction implies at `latents[i]` (clipped as the step clips it); None for
      `ddim_invert`. Step-aware labels score these (the gold reward of each step's x0_hat).
  """

  latents: Array
  timesteps: Array
  prev_timesteps: Array
  log_probs: Array
  x0_predictions: Optional[Array] = None


def timesteps(schedule: schedules_lib.NoiseSchedule, num_steps: int):
  """`(t, t_prev)` int32 numpy arrays `[num_steps]` of a run (module docstring: "leading" spacing)."""
  T = schedule.num_train_timesteps
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= num_steps <= T:
    raise ValueError(f"samplers: num_steps={num_steps!r}; allowed: an integer in [1, {T}] (the schedule's T).")
  ratio = T // int(num_steps)
  t = (np.arange(num_steps)[::-1] * ratio).astype(np.int32)
  return t, (t - ratio).astype(np.int32)


def _check_sampler(sampler, eta):
  if sampler not in SAMPLERS:
    raise ValueError(f"samplers: unknown sampler={sampler!r}; allowed: {', '.join(SAMPLERS)}.")
  if sampler == "ddim" and not (0.0 <= float(eta) <= 1.0):
    raise ValueError(f"samplers: eta={eta!r}; allowed: 0 <= eta <= 1 (0: deterministic DDIM, 1: DDPM's variance).")


def _broadcast(v: Array, ndim: int) -> Array:
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def transition(
  schedule: schedules_lib.NoiseSchedule,
  prediction: Array,
  x_t: Array,
  t,
  t_prev,
  *,
  sampler: str = "ddim",
  eta: float = 0.0,
  clip_sample: Optional[float] = None,
):
  """`(mean, std, x0_hat)` of the step's Gaussian p(x_{t_prev} | x_t) (module docstring).

  `t`, `t_prev`: scalars or `[B]`; `std` is shaped to broadcast against `x_t` (zero where the step
  is deterministic).
  """
  _check_sampler(sampler, eta)
  x_t = jnp.asarray(x_t, jnp.float32)
  nd = x_t.ndim
  t = jnp.asarray(t, jnp.int32)
  a = _broadcast(schedules_lib.alpha_cumprod(schedule, t), nd)
  a_prev = _broadcast(schedules_lib.alpha_cumprod(schedule, t_prev), nd)
  x0, eps = schedules_lib.x0_and_noise(schedule.prediction_type, x_t, prediction, a)
  if clip_sample is not None:
    x0 = jnp.clip(x0, -float(clip_sample), float(clip_sample))
  if sampler == "ddpm":
    b = 1.0 - a / a_prev
    mean = jnp.sqrt(a_prev) * b / (1.0 - a) * x0 + jnp.sqrt(a / a_prev) * (1.0 - a_prev) / (1.0 - a) * x_t
    var = jnp.maximum((1.0 - a_prev) / (1.0 - a) * b, 1e-20)
    std = jnp.where(_broadcast(t, nd) > 0, jnp.sqrt(var), 0.0)
  else:
    var = (1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev)
    std = float(eta) * jnp.sqrt(jnp.maximum(var, 0.0))
    mean = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
  return mean, std, x0


def gaussian_log_prob(x: Array, mean: Array, std: Array) -> Array:
  """`[B]` float32 sum over every axis but the first of log N(x; mean, std^2); 0 where std = 0."""
  x = jnp.asarray(x, jnp.float32)
  std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), x.shape)
  random = std > 0
  safe = jnp.where(random, std, 1.0)
  lp = -((x - mean) ** 2) / (2.0 * safe**2) - jnp.log(safe) - _LOG_SQRT_2PI
  return jnp.sum(jnp.where(random, lp, 0.0), axis=tuple(range(1, x.ndim)))


def _step(schedule, prediction, x_t, t, t_prev, noise, sampler, eta, clip_sample, *, with_x0=False):
  mean, std, x0 = transition(schedule, prediction, x_t, t, t_prev, sampler=sampler, eta=eta, clip_sample=clip_sample)
  x_prev = mean if noise is None else mean + std * jnp.asarray(noise, jnp.float32)
  out = (x_prev, gaussian_log_prob(x_prev, mean, std))
  return out + (x0,) if with_x0 else out


@functools.partial(jax.jit, static_argnames=("clip_sample",))
def ddpm_step(schedule, prediction, x_t, t, t_prev, noise, *, clip_sample: Optional[float] = None):
  """One DDPM step: `(x_{t_prev}, log_prob [B])`, x_{t_prev} = mean + std * noise (module docstring).

  `noise`: the standard normal z `[B, H, W, C]` (diffusers' `variance_noise`), or None for the
  mean. Equal to diffusers' `DDPMScheduler.step` (fixed_small variance) given the same z. Jitted
  (`clip_sample` static).
  """
  return _step(schedule, prediction, x_t, t, t_prev, noise, "ddpm", 0.0, clip_sample)


@functools.partial(jax.jit, static_argnames=("eta", "clip_sample"))
def ddim_step(schedule, prediction, x_t, t, t_prev, noise, *, eta: float = 0.0, clip_sample: Optional[float] = None):
  """One DDIM step (Song et al. 2021, Eqs. 12 and 16): `(x_{t_prev}, log_prob [B])`.

  `noise`: the standard normal z (unused where sigma = 0; None is allowed then). Equal to
  diffusers' `DDIMScheduler.step(..., eta=eta, variance_noise=z)`. Jitted (`eta`, `clip_sample`
  static).
  """
  return _step(schedule, prediction, x_t, t, t_prev, noise, "ddim", eta, clip_sample)


def guided(denoise: Denoise, guidance_scale=None, null_class=None) -> Denoise:
  """The denoiser with classifier-free guidance (module docstring); `denoise` itself when
  `guidance_scale` is None."""
  if guidance_scale is None:
    return denoise
  if null_class is None:
    raise ValueError(
      "samplers: classifier-free guidance needs the denoiser's null class (null_class=, a class label "
      "trained as 'no condition'); pass guidance_scale=None to sample without guidance."
    )

  def run(params, x_t, t, cond):
    if cond is None:
      raise ValueError("samplers: classifier-free guidance needs class labels (cond), got None.")
    cond = jnp.asarray(cond, jnp.int32)
    both = denoise(
      params,
      jnp.concatenate([x_t, x_t]),
      jnp.concatenate([t, t]),
      jnp.concatenate([cond, jnp.full_like(cond, int(null_class))]),
    )
    c, u = jnp.split(jnp.asarray(both, jnp.float32), 2)
    return u + guidance_scale * (c - u)

  return run


def _predict(denoise, params, x, t, cond):
  t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), x.shape[:1])
  return jnp.asarray(denoise(params, x, t, cond), jnp.float32)


def log_prob_of_step(
  denoise: Denoise,
  params,
  schedule: schedules_lib.NoiseSchedule,
  x_t: Array,
  x_prev: Array,
  t,
  t_prev,
  cond=None,
  eta: float = 1.0,
  *,
  sampler: str = "ddim",
  clip_sample: Optional[float] = None,
  guidance_scale: Optional[float] = None,
  null_class: Optional[int] = None,
) -> Array:
  """`[B]` float32 log p_theta(x_prev | x_t) of a given transition under the model at `params`.

  The Gaussian of `sampler`'s step (DDIM with `eta`, or DDPM), differentiable in `params` (the per-step
  likelihood that DDPO, arXiv:2305.13301, and D3PO, arXiv:2311.13231, train on). With eta = 1 (no clipping) the DDIM
  and DDPM transitions are the same Gaussian. A deterministic transition has no density: eta = 0
  is refused.
  """
  _check_sampler(sampler, eta)
  if sampler == "ddim" and float(eta) == 0.0:
    raise ValueError("samplers.log_prob_of_step: eta=0 is a deterministic step without a density; use eta > 0.")
  pred = _predict(guided(denoise, guidance_scale, null_class), params, jnp.asarray(x_t, jnp.float32), t, cond)
  mean, std, _ = transition(schedule, pred, x_t, t, t_prev, sampler=sampler, eta=eta, clip_sample=clip_sample)
  return gaussian_log_prob(x_prev, mean, std)


@functools.partial(
  jax.jit,
  static_argnames=("denoise", "shape", "num_steps", "sampler", "eta", "clip_sample", "guidance_scale", "null_class"),
)
def sample(
  denoise: Denoise,
  params,
  schedule: schedules_lib.NoiseSchedule,
  key,
  cond=None,
  *,
  shape,
  num_steps: int,
  sampler: str = "ddim",
  eta: float = 1.0,
  clip_sample: Optional[float] = None,
  guidance_scale: Optional[float] = None,
  null_class: Optional[int] = None,
  initial_latents: Optional[Array] = None,
) -> Trajectory:
  """Samples `shape = (B, H, W, C)` images in `num_steps` steps of `sampler` (jitted, `lax.scan`).

  x_T ~ N(0, I) from `key` (or `initial_latents` `[B, H, W, C]` when given, e.g. the end of
  `ddim_invert`), then one step per timestep (module docstring) with fresh standard normal noise;
  `cond` `[B]` int32 class labels or None. Returns the `Trajectory` with every latent and the
  log-prob of each transition taken and the clean image each step's prediction implies.
  """
  _check_sampler(sampler, eta)
  shape = tuple(int(d) for d in shape)
  if len(shape) != 4:
    raise ValueError(f"samplers.sample: shape={shape!r}; allowed: (B, H, W, C).")
  ts, prev = timesteps(schedule, num_steps)
  fn = guided(denoise, guidance_scale, null_class)
  k_init, k_steps = jax.random.split(key)
  x_T = jax.random.normal(k_init, shape, jnp.float32)
  if initial_latents is not None:
    if tuple(initial_latents.shape) != shape:
      raise ValueError(f"samplers.sample: initial_latents of shape {initial_latents.shape}; expected shape={shape}.")
    x_T = jnp.asarray(initial_latents, jnp.float32)

  def body(x, inputs):
    t, t_prev, k = inputs
    pred = _predict(fn, params, x, t, cond)
    noise = jax.random.normal(k, shape, jnp.float32)
    x_prev, lp, x0 = _step(schedule, pred, x, t, t_prev, noise, sampler, eta, clip_sample, with_x0=True)
    return x_prev, (x_prev, lp, x0)

  xs = (jnp.asarray(ts), jnp.asarray(prev), jax.random.split(k_steps, num_steps))
  _, (latents, log_probs, x0s) = jax.lax.scan(body, x_T, xs)
  return Trajectory(
    latents=jnp.concatenate([x_T[None], latents]),
    timesteps=jnp.asarray(ts),
    prev_timesteps=jnp.asarray(prev),
    log_probs=log_probs,
    x0_predictions=x0s,
  )


@functools.partial(jax.jit, static_argnames=("denoise", "num_steps", "guidance_scale", "null_class"))
def ddim_invert(
  denoise: Denoise,
  params,
  schedule: schedules_lib.NoiseSchedule,
  x0: Array,
  cond=None,
  *,
  num_steps: int,
  guidance_scale: Optional[float] = None,
  null_class: Optional[int] = None,
) -> Trajectory:
  """Deterministic DDIM inversion of images `x0 [B, H, W, C]` (module docstring; jitted).

  Returns the `Trajectory` from x0 (`latents[0]`) to x_T (`latents[-1]`): `latents[k]` lies at
  the level of `timesteps[num_steps - k]` (k >= 1), so running `sample`'s deterministic DDIM
  (eta = 0) from `latents[-1]` walks the same timesteps back. `timesteps` and `prev_timesteps`
  are those of the sampling run, in sampling order; `log_probs` are zeros.
  """
  ts, prev = timesteps(schedule, num_steps)
  fn = guided(denoise, guidance_scale, null_class)
  x0 = jnp.asarray(x0, jnp.float32)
  nd = x0.ndim

  def body(x, inputs):
    t, t_prev = inputs
    pred = _predict(fn, params, x, t, cond)
    a_cur = _broadcast(schedules_lib.alpha_cumprod(schedule, t_prev), nd)
    a_next = _broadcast(schedules_lib.alpha_cumprod(schedule, t), nd)
    x0_hat, eps = schedules_lib.x0_and_noise(schedule.prediction_type, x, pred, a_cur)
    x_next = jnp.sqrt(a_next) * x0_hat + jnp.sqrt(1.0 - a_next) * eps
    return x_next, x_next

  _, latents = jax.lax.scan(body, x0, (jnp.asarray(ts[::-1].copy()), jnp.asarray(prev[::-1].copy())))
  return Trajectory(
    latents=jnp.concatenate([x0[None], latents]),
    timesteps=jnp.asarray(ts),
    prev_timesteps=jnp.asarray(prev),
    log_probs=jnp.zeros((num_steps, x0.shape[0]), jnp.float32),
  )
