r"""GroupNorm with float32 statistics and a written-out derivative: the XLA default of the
`group_norm` injection point (`pofx.kernels.Kernels.group_norm`).

For `x [B, ..., C]` (channels last) and G groups of C / G contiguous channels, per image b and
group g over its n = (elements per image) / G values (Wu and He 2018, arXiv:1803.08494, eq. 1-2,
with the biased variance):

    mean = sum x / n,   var = sum (x - mean)^2 / n,   rstd = 1 / sqrt(var + eps)
    y = (x - mean) rstd scale_c + bias_c            (optionally followed by SiLU: y sigmoid(y))

computed as one per-(image, channel) affine map `x a + d`. The statistics are per-channel sums over
the contiguous rows of `[B, N, C]`, grouped afterwards, in two passes (the mean, then the squared
deviations from it: no `E[x^2] - E[x]^2` cancellation). The derivative is written out: with `xhat =
(x - mean) rstd` and the per-(image, channel) sums `S1 = sum g`, `S2 = sum g x` of the output
gradient g (one pass over g and x),

    d_bias_c = sum_b S1,   d_scale_c = sum_b rstd (S2 - mean S1)
    d_x = rstd (scale g - mean_group(scale g) - xhat mean_group(scale g xhat))     (one affine map)

instead of JAX's derivative of reductions over a reshaped array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _group_stats(rows: Array, groups: int):
  """Per-(image, group) mean and biased variance `[B, G]` of float32 `rows [B, N, C]`."""
  B, N, C = rows.shape
  n = N * (C // groups)
  mean = rows.sum(axis=1).reshape(B, groups, C // groups).sum(axis=-1) / n
  dev = rows - _per_channel(mean, C)[:, None, :]
  var = jnp.square(dev).sum(axis=1).reshape(B, groups, C // groups).sum(axis=-1) / n
  return mean, var


def _per_channel(v: Array, channels: int) -> Array:
  """`[B, G]` per-group values repeated to `[B, C]` (each group's channels are contiguous)."""
  return jnp.repeat(v, channels // v.shape[1], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm_rows(rows: Array, scale: Array, bias: Array, groups: int, eps: float) -> Array:
  return _group_norm_fwd(rows, scale, bias, groups, eps)[0]


def _group_norm_fwd(rows, scale, bias, groups, eps):
  C = rows.shape[-1]
  mean, var = _group_stats(rows, groups)
  rstd = jax.lax.rsqrt(var + eps)
  # y = (x - mean) rstd scale + bias = x a + d, with a and d per (image, channel).
  a = _per_channel(rstd, C) * scale
  d = bias - _per_channel(mean, C) * a
  return rows * a[:, None, :] + d[:, None, :], (rows, scale, mean, rstd)


def _group_norm_bwd(groups, eps, res, g):
  rows, scale, mean, rstd = res
  B, N, C = rows.shape
  n = N * (C // groups)
  g = g.astype(jnp.float32)
  s1 = g.sum(axis=1)
  s2 = (g * rows).sum(axis=1)
  mean_c, rstd_c = _per_channel(mean, C), _per_channel(rstd, C)
  g_xhat = rstd_c * (s2 - mean_c * s1)  # [B, C]: sum over the image of g xhat
  d_scale, d_bias = g_xhat.sum(axis=0), s1.sum(axis=0)
  m1 = _per_channel((scale * s1).reshape(B, groups, -1).sum(axis=-1) / n, C)  # mean_group(scale g)
  m2 = _per_channel((scale * g_xhat).reshape(B, groups, -1).sum(axis=-1) / n, C)  # mean_group(scale g xhat)
  # d_x = g a + x b + c per (image, channel).
  a = rstd_c * scale
  b = -rstd_c * rstd_c * m2
  c = rstd_c * (rstd_c * m2 * mean_c - m1)
  return g * a[:, None, :] + rows * b[:, None, :] + c[:, None, :], d_scale, d_bias


_group_norm_rows.defvjp(_group_norm_fwd, _group_norm_bwd)


def check_group_norm_args(x: Array, scale: Array, bias: Array, groups: int) -> None:
  """ValueError unless `x [B, ..., C]`, `scale [C]`, `bias [C]` and C divisible by `groups`."""
  C = x.shape[-1] if x.ndim else 0
  if x.ndim < 2 or scale.shape != (C,) or bias.shape != (C,) or groups < 1 or C % groups:
    raise ValueError(
      f"group_norm: x must be [B, ..., C] with C divisible by groups and scale, bias [C]; got x {x.shape}, "
      f"scale {scale.shape}, bias {bias.shape}, groups {groups}."
    )


def group_norm(x: Array, scale: Array, bias: Array, *, groups: int, eps: float, silu: bool = False) -> Array:
  """GroupNorm of float32 `x [B, ..., C]` with `scale, bias [C]` (see the module docstring), followed
  by SiLU when `silu`; float32 result of x's shape."""
  check_group_norm_args(x, scale, bias, groups)
  rows = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
  y = _group_norm_rows(rows, scale.astype(jnp.float32), bias.astype(jnp.float32), int(groups), float(eps))
  y = y.reshape(x.shape)
  return jax.nn.silu(y) if silu else y
