r"""Preference pairs of images and their denoising errors: the diffusion analogue of `PairLogps`.

    logps_fn = pairs.make_logps_fn(unet_model.denoise, schedules.linear())
    step = pofx.train.make_train_step(logps_fn, optax.adamw(1e-5), loss="dpo", loss_hyper={"beta": 5000.0},
                                      reference=pairs.check_reference(pofx.references.frozen(params, logps_fn)))
    state, metrics = step(state, {"pairs": pairs.ImagePairs(chosen, rejected, labels, noise_keys, pair_mask)}, rng)

Diffusion-DPO (Wallace et al. 2024, arXiv:2311.12908, Eq. 14 and the authors' code) replaces a
completion's log-likelihood by minus its denoising error. For each pair, one timestep
t ~ U{0, ..., T-1} and one noise eps ~ N(0, I) are drawn and shared by the chosen and the rejected
image (and by the policy and the reference, which see the same batch); with
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps and the target y of the schedule's prediction type
(eps, or v: `schedules.target`), the per-image error is the mean over H, W and C

    e = mean_{h,w,c} (denoise(params, x_t, t, class) - y)^2,

and `logps_fn` returns `PairLogps(chosen = -e_w / 2, rejected = -e_l / 2)`. Then DPO's loss with
beta,

    -log sigmoid(beta * ((-e_w/2 + e_ref_w/2) - (-e_l/2 + e_ref_l/2)))
      = -log sigmoid(-beta/2 * ((e_w - e_ref_w) - (e_l - e_ref_l))),

is Diffusion-DPO exactly as diffusers' research example `train_diffusion_dpo.py` and the
authors' code compute it, with the timestep count T and the 1/(C H W) of the mean folded into
beta (the paper's beta_T; they train with beta = 5000). Any loss of `pofx.losses` that reads only
`chosen` and `rejected` applies unchanged.

Randomness lives in the batch: each pair carries its own PRNG key (`ImagePairs.noise_keys`),
split into (timestep key, noise key); the data pipeline draws fresh keys every step. The same
batch gives the same timesteps and noise to every forward of a step (the policy, SAM's perturbed
policy, the reference), as the method requires. For the same reason the reference's errors
cannot be computed once per dataset: `check_reference` refuses a `cached` reference.

K-way lists (RankDPO, `pofx.losses.rank_dpo`): `ImageLists` holds K images per prompt and one key
per list; `make_list_logps_fn` gives the K images the list's one timestep and noise and returns
`ListLogps(logps=-e/2)` `[B, K]`, which the train step hands to a listwise loss with the lists'
scores (`batch["scores"]`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from pofx._pair_logps import ListLogps, PairLogps
from pofx.diffusion import schedules as schedules_lib

Array = jax.Array


class ImagePairs(NamedTuple):
  """B preference pairs of images (NHWC float32 in [-1, 1]).

  Attributes:
    chosen: `[B, H, W, C]` the preferred images x_0^w.
    rejected: `[B, H, W, C]` the other images x_0^l.
    class_labels: `[B]` int32 class of each pair's prompt (or None for an unconditional denoiser).
    noise_keys: `[B, 2]` uint32, one raw PRNG key per pair (`jax.random.key_data` of a key):
      its timestep and noise, shared by chosen and rejected, by policy and reference.
    pair_mask: `[B]` float32, 1 for real pairs and 0 for padding (padding gets finite errors and
      is left out of the loss by the train step).
  """

  chosen: Array
  rejected: Array
  class_labels: Optional[Array]
  noise_keys: Array
  pair_mask: Array


def _timestep_range(schedule, timestep_range):
  T = schedule.num_train_timesteps
  if timestep_range is None:
    return 0, T
  lo, hi = (int(v) for v in timestep_range)
  if not (0 <= lo < hi <= T):
    raise ValueError(
      f"pairs: timestep_range={tuple(timestep_range)!r}; allowed: (lo, hi) with 0 <= lo < hi <= {T} (T)."
    )
  return lo, hi


def timesteps_and_noise(
  noise_keys: Array, image_shape: Sequence[int], schedule: schedules_lib.NoiseSchedule, timestep_range=None
):
  """The timesteps `[B]` int32 and noises `[B, H, W, C]` float32 of B pairs from their keys.

  For pair i: `k_t, k_eps = jax.random.split(noise_keys[i])`, `t = jax.random.randint(k_t, (),
  lo, hi)` (uniform on {lo, ..., hi - 1}; default lo = 0, hi = T) and
  `eps = jax.random.normal(k_eps, image_shape)`.
  """
  lo, hi = _timestep_range(schedule, timestep_range)
  shape = tuple(int(d) for d in image_shape)

  def one(key):
    k_t, k_eps = jax.random.split(key)
    return jax.random.randint(k_t, (), lo, hi, jnp.int32), jax.random.normal(k_eps, shape, jnp.float32)

  return jax.vmap(one)(jnp.asarray(noise_keys, jnp.uint32))


def _check_pairs(pairs):
  if not isinstance(pairs, ImagePairs):
    raise TypeError(f"pairs: batch['pairs'] must be a pofx.diffusion.pairs.ImagePairs, got {type(pairs).__name__}.")
  c, r = pairs.chosen, pairs.rejected
  if c.ndim != 4 or c.shape != r.shape:
    raise ValueError(
      f"pairs: chosen {tuple(c.shape)} and rejected {tuple(r.shape)} must both be [B, H, W, C] of the same shape."
    )
  _check_keys_and_labels(pairs, c.shape[0])


def _check_keys_and_labels(batch, B: int) -> None:
  """An `ImagePairs` / `ImageLists` of B pairs or lists: one raw key and (optionally) one label each."""
  if batch.noise_keys.shape != (B, 2):
    raise ValueError(f"pairs: noise_keys of shape {tuple(batch.noise_keys.shape)}; expected [B, 2] = ({B}, 2) uint32.")
  if batch.class_labels is not None and batch.class_labels.shape != (B,):
    raise ValueError(f"pairs: class_labels of shape {tuple(batch.class_labels.shape)}; expected [B] = ({B},).")


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _check_compute_dtype(compute_dtype) -> None:
  if compute_dtype is not None and not jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating):
    raise ValueError(f"pairs: compute_dtype={compute_dtype!r}; allowed: a floating dtype (float32, bfloat16, ...).")


def _errors(denoise, params, schedule, x0, eps, t, cond, compute_dtype) -> Array:
  """`[N]` per-image mean squared errors of the denoiser on `x0 [N, H, W, C]` noised with the
  per-image `eps` and `t` (float32; with `compute_dtype` the call runs in it, see `pair_errors`)."""
  x_t = schedules_lib.add_noise(schedule, x0, eps, t)
  y = schedules_lib.target(schedule, x0, eps, t)
  if compute_dtype is not None:
    params, x_t = _cast_floats(params, compute_dtype), x_t.astype(compute_dtype)
  pred = jnp.asarray(denoise(params, x_t, t, cond), jnp.float32)
  if pred.shape != x0.shape:
    raise ValueError(f"pairs: the denoiser returned shape {tuple(pred.shape)}; expected {tuple(x0.shape)}.")
  return jnp.mean((pred - y) ** 2, axis=(1, 2, 3))


def pair_errors(
  denoise: Callable,
  params,
  schedule: schedules_lib.NoiseSchedule,
  pairs: ImagePairs,
  *,
  timestep_range=None,
  compute_dtype=None,
):
  """`(e_w, e_l)` `[B]` float32 per-image mean squared errors of the chosen and rejected images.

  One denoiser call on the concatenated [chosen; rejected] batch (module docstring). With
  `compute_dtype` (e.g. jnp.bfloat16) the floating parameters and x_t are cast to it for the
  call, for a denoiser without a precision setting of its own (the U-Net has one,
  `unet.make(config, compute_dtype=...)`, which keeps its normalisation statistics in float32:
  prefer it there); the errors are computed in float32 from the prediction cast back to float32.
  """
  _check_pairs(pairs)
  B = pairs.chosen.shape[0]
  t, eps = timesteps_and_noise(pairs.noise_keys, pairs.chosen.shape[1:], schedule, timestep_range)
  x0 = jnp.concatenate([jnp.asarray(pairs.chosen, jnp.float32), jnp.asarray(pairs.rejected, jnp.float32)])
  twice = lambda a: jnp.concatenate([a, a])
  labels = None if pairs.class_labels is None else jnp.asarray(pairs.class_labels, jnp.int32)
  cond = None if labels is None else twice(labels)
  err = _errors(denoise, params, schedule, x0, twice(eps), twice(t), cond, compute_dtype)
  return err[:B], err[B:]


def make_logps_fn(
  denoise: Callable, schedule: schedules_lib.NoiseSchedule, *, timestep_range=None, compute_dtype=None
) -> Callable[[object, dict], PairLogps]:
  """`logps_fn(params, batch) -> PairLogps(chosen=-e_w/2, rejected=-e_l/2)` of `batch["pairs"]`.

  Args:
    denoise: the denoiser protocol `(params, x_t, timesteps, cond) -> prediction`.
    schedule: the noise schedule (its prediction type gives the regression target).
    timestep_range: `(lo, hi)`: draw t uniformly from {lo, ..., hi - 1} (default: all T steps).
    compute_dtype: dtype of the denoiser call (default: the parameters' own; see `pair_errors`).
  """
  _timestep_range(schedule, timestep_range)
  _check_compute_dtype(compute_dtype)

  def logps_fn(params, batch):
    e_w, e_l = pair_errors(
      denoise, params, schedule, batch["pairs"], timestep_range=timestep_range, compute_dtype=compute_dtype
    )
    return PairLogps(chosen=-0.5 * e_w, rejected=-0.5 * e_l)

  return logps_fn


class ImageLists(NamedTuple):
  """B ranked lists of K images each (NHWC float32 in [-1, 1]), for listwise losses (RankDPO).

  Attributes:
    images: `[B, K, H, W, C]` the K images of each list's prompt.
    class_labels: `[B]` int32 class of each list's prompt (or None for an unconditional denoiser).
    noise_keys: `[B, 2]` uint32, one raw PRNG key per list: its timestep and noise, shared by the
      K images, by policy and reference (as `ImagePairs`' per pair).
  """

  images: Array
  class_labels: Optional[Array]
  noise_keys: Array


def list_errors(
  denoise: Callable,
  params,
  schedule: schedules_lib.NoiseSchedule,
  lists: ImageLists,
  *,
  timestep_range=None,
  compute_dtype=None,
):
  """`e` `[B, K]` float32 per-image mean squared errors of B lists of K images.

  One timestep t and one noise eps per list (`timesteps_and_noise` of its key), shared by its K
  images: `x_t^k = sqrt(abar_t) x_0^k + sqrt(1 - abar_t) eps` (RankDPO, arXiv:2410.18013,
  Algorithm 2, as Diffusion-DPO shares them within a pair); one denoiser call on the B*K images.
  With K = 2 the two columns are `pair_errors`' chosen and rejected errors for the same key.
  `compute_dtype` as in `pair_errors`.
  """
  if not isinstance(lists, ImageLists):
    raise TypeError(f"pairs: batch['lists'] must be a pofx.diffusion.pairs.ImageLists, got {type(lists).__name__}.")
  x = lists.images
  if x.ndim != 5 or x.shape[1] < 2:
    raise ValueError(f"pairs: list images of shape {tuple(x.shape)}; expected [B, K, H, W, C] with K >= 2.")
  B, K = x.shape[:2]
  _check_keys_and_labels(lists, B)
  t, eps = timesteps_and_noise(lists.noise_keys, x.shape[2:], schedule, timestep_range)
  flat = lambda a: jnp.reshape(jnp.repeat(a, K, axis=0), (B * K,) + a.shape[1:])  # list-major, like x
  x0 = jnp.reshape(jnp.asarray(x, jnp.float32), (B * K,) + x.shape[2:])
  cond = None if lists.class_labels is None else flat(jnp.asarray(lists.class_labels, jnp.int32))
  return jnp.reshape(_errors(denoise, params, schedule, x0, flat(eps), flat(t), cond, compute_dtype), (B, K))


def make_list_logps_fn(
  denoise: Callable, schedule: schedules_lib.NoiseSchedule, *, timestep_range=None, compute_dtype=None
) -> Callable[[object, dict], ListLogps]:
  """`logps_fn(params, batch) -> ListLogps(logps=-e/2)` `[B, K]` of `batch["lists"]` (`list_errors`),
  for a listwise loss (`pofx.losses.rank_dpo`) in `pofx.train.make_train_step`; arguments as
  `make_logps_fn`. The reference strategies run the same function on the same batch, so they see
  the same timesteps and noise."""
  _timestep_range(schedule, timestep_range)
  _check_compute_dtype(compute_dtype)

  def logps_fn(params, batch):
    e = list_errors(
      denoise, params, schedule, batch["lists"], timestep_range=timestep_range, compute_dtype=compute_dtype
    )
    return ListLogps(logps=-0.5 * e)

  return logps_fn


def check_reference(reference):
  """Returns `reference` if it can serve a diffusion loss; a `cached` one is refused.

  The timestep and noise are drawn per pair and per step (from the batch's keys), so the
  reference's errors cannot be precomputed once per dataset: use `frozen`, `synced`, `ema` or
  another strategy that runs the reference's denoiser every step.
  """
  if getattr(reference, "cached", False):
    raise ValueError(
      f"pairs: reference {reference.name!r} reads precomputed log-probs, which a diffusion loss cannot use: "
      "each step draws new timesteps and noise. Allowed: a reference that runs its denoiser every step "
      "(frozen, guiding, synced, ema, adapters_off)."
    )
  return reference
