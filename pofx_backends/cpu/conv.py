r"""The CPU backend's convolutions: im2col matrix products, native direct kernels, the measured choice.

`DirectConv()` computes the 3x3 convolutions padded by one pixel at stride 1 or 2 whose channels
the native AVX-512 kernels take (`pofx_backends.cpu.native.conv3x3`: at stride 1 on even sizes by
Winograd's F(2x2, 3x3) unless `winograd=False`) and every other call with
`jax.lax.conv_general_dilated`. `MeasuredConv` is whichever of XLA's, `Im2colConv` or `DirectConv`
a measurement chose.

`Im2colConv(...)` is a replacement for the `conv_general_dilated` injection point of
`pofx.kernels.Kernels` (same signature, same values up to float32 summation order,
differentiable, jittable). For a 2-D convolution with a `kh x kw` kernel it gathers the
`kh * kw` shifted (and strided) windows of the zero-padded input side by side,

    patches[n, y, x, (i, j, c)] = x_pad[n, s_h * y + i, s_w * x + j, c]          [N, Ho, Wo, kh kw C]
    out[n, y, x, o] = sum_{i, j, c} patches[n, y, x, (i, j, c)] w[i, j, c, o]    one [M, K] x [K, O] product

(im2col; Chellapilla, Puri and Simard 2006, "High Performance Convolutional Neural Networks for
Document Processing"), with M = N Ho Wo, K = kh kw C. A 1x1 kernel at stride 1 without padding is
the product alone. The product goes through `dot_general` (XLA's dot by default, or a BLAS
product of the CPU backend), so the convolution runs at the rate of a matrix product instead of
XLA:CPU's convolution kernel.

Its derivative is written by hand (`jax.custom_vjp`), keeping only the input and the kernel for
the backward pass (not the `kh kw`-times larger patches, which it gathers again):

    d_w = patches^T d_out                                  [K, M] x [M, O]
    d_x = the transposed convolution of d_out              stride 1: an im2col product of d_out with the
                                                           kernel flipped in space, in and out swapped;
                                                           other strides: d_patches = d_out w^T scattered
                                                           back onto the input (the transpose of the gather)

(for stride 1 and padding (p_lo, p_hi) along an axis, `d_x` is the convolution of `d_out` padded by
(k - 1 - p_lo, k - 1 - p_hi + r), r = the rows of the padded input that no window reached).

What it computes (anything else goes to `jax.lax.conv_general_dilated` unchanged): two spatial
dimensions, any layout of `dimension_numbers` (the operands are transposed to NHWC / HWIO and the
result back), any window strides and explicit or named ("SAME", "VALID") padding, no input or
kernel dilation, `feature_group_count == batch_group_count == 1`, floating operands of the same
dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from pofx_backends.cpu import native

# The axis of (batch, feature, spatial 0, spatial 1) in an NHWC array.
_NHWC = (0, 3, 1, 2)


def _ones(x) -> bool:
  return x is None or all(int(v) == 1 for v in x)


def supports(
  lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, feature_group_count=1, batch_group_count=1
) -> bool:
  """Whether `Im2colConv` computes this call itself (else it is `jax.lax.conv_general_dilated`)."""
  return (
    lhs.ndim == 4
    and rhs.ndim == 4
    and len(window_strides) == 2
    and _ones(lhs_dilation)
    and _ones(rhs_dilation)
    and feature_group_count == 1
    and batch_group_count == 1
    and lhs.dtype == rhs.dtype
    and jnp.issubdtype(lhs.dtype, jnp.floating)
  )


def _gather(x, kh: int, kw: int, strides: Tuple[int, int], out_hw: Tuple[int, int]):
  """The `[N, Ho, Wo, kh kw C]` windows of an already padded NHWC `x`, ordered (i, j, c)."""
  n, _, _, c = x.shape
  ho, wo = out_hw
  sh, sw = strides
  if kh == kw == 1 and sh == sw == 1:
    return x[:, :ho, :wo]
  cols = [
    lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
    for i in range(kh)
    for j in range(kw)
  ]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _product(dot_general, a, b, precision, preferred):
  """`a [..., K] . b [K, O]` through `dot_general`."""
  return dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred)


def _pad(x, pads):
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)))


def _out_hw(x_hw, k_hw, strides, pads):
  return tuple((h + lo + hi - k) // s + 1 for h, k, s, (lo, hi) in zip(x_hw, k_hw, strides, pads))


def _forward(dot_general, precision, preferred, strides, pads, x, w):
  kh, kw, c, o = w.shape
  out_hw = _out_hw(x.shape[1:3], (kh, kw), strides, pads)
  patches = _gather(_pad(x, pads), kh, kw, strides, out_hw)
  return _product(dot_general, patches, w.reshape(kh * kw * c, o), precision, preferred)


@dataclasses.dataclass(frozen=True)
class _Conv:
  """The NHWC / HWIO convolution with its hand-written derivative (a hashable static argument)."""

  dot_general: Callable[..., Any]
  precision: Any
  preferred: Any
  strides: Tuple[int, int]
  pads: Tuple[Tuple[int, int], Tuple[int, int]]

  def __call__(self, x, w):
    return _conv(self, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_vjp(spec, x, w):
  return _forward(spec.dot_general, spec.precision, spec.preferred, spec.strides, spec.pads, x, w)


def _conv(spec, x, w):
  return _conv_vjp(spec, x, w)


def _conv_fwd(spec, x, w):
  return _conv_vjp(spec, x, w), (x, w)


def _conv_bwd(spec, res, g):
  x, w = res
  kh, kw, c, o = w.shape
  strides, pads = spec.strides, spec.pads
  out_hw = g.shape[1:3]
  g = g.astype(x.dtype)
  patches_of = lambda xx: _gather(_pad(xx, pads), kh, kw, strides, out_hw)
  patches = patches_of(x)
  k = kh * kw * c
  d_w = spec.dot_general(
    patches.reshape(-1, k), g.reshape(-1, o), (((0,), (0,)), ((), ())), precision=spec.precision
  ).reshape(w.shape)
  if strides == (1, 1):
    # The transposed convolution: d_out padded by (k - 1 - lo, k - 1 - hi + unreached rows), the
    # kernel flipped in space with its in and out features swapped.
    h, wd = x.shape[1:3]
    back = []
    for size, kk, (lo, hi), n_out in zip((h, wd), (kh, kw), pads, out_hw):
      unreached = size + lo + hi - (n_out - 1 + kk)
      back.append((kk - 1 - lo, kk - 1 - hi + unreached))
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    d_x = _forward(spec.dot_general, spec.precision, None, (1, 1), tuple(back), g, w_t).astype(x.dtype)
  else:
    d_patches = _product(spec.dot_general, g, w.reshape(k, o).T, spec.precision, None)
    _, transpose = jax.vjp(patches_of, x)
    (d_x,) = transpose(d_patches.astype(x.dtype))
  return d_x, d_w.astype(w.dtype)


_conv_vjp.defvjp(_conv_fwd, _conv_bwd)


def _explicit_pads(padding, x_hw, k_hw, strides) -> Tuple[Tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(tuple(int(v) for v in p) for p in lax.padtype_to_pads(x_hw, k_hw, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


@dataclasses.dataclass(frozen=True)
class Im2colConv:
  """`jax.lax.conv_general_dilated` as one matrix product per convolution (see the module
  docstring); its products through `dot_general`."""

  dot_general: Callable[..., Any] = lax.dot_general

  def __call__(
    self,
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
  ):
    if not supports(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count
    ):
      return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
      )
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    x = jnp.transpose(lhs, [dn.lhs_spec[i] for i in _NHWC_ORDER])
    w = jnp.transpose(rhs, [dn.rhs_spec[i] for i in _HWIO_ORDER])
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_pads(padding, x.shape[1:3], w.shape[:2], strides)
    out = _Conv(self.dot_general, precision, preferred_element_type, strides, pads)(x, w)
    # out is (batch, spatial 0, spatial 1, feature); place each at its position in out_spec.
    perm = [0] * 4
    for logical, axis in enumerate(dn.out_spec):
      perm[axis] = _NHWC[logical]
    return jnp.transpose(out, perm)


# The operand axes, in NHWC / HWIO order, as indices into lhs_spec (batch, feature, s0, s1) and
# rhs_spec (out, in, s0, s1).
_NHWC_ORDER = (0, 2, 3, 1)
_HWIO_ORDER = (2, 3, 1, 0)


def _native_stride(x, w, window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count):
  """The stride (1 or 2) of an NHWC / HWIO call that is a 3x3 convolution with one pixel of padding
  on every side at equal strides 1 or 2, else None."""
  strides = tuple(int(s) for s in window_strides)
  if (
    tuple(w.shape[:2]) != (3, 3)
    or strides not in ((1, 1), (2, 2))
    or not _ones(lhs_dilation)
    or not _ones(rhs_dilation)
    or feature_group_count != 1
    or batch_group_count != 1
    or _explicit_pads(padding, x.shape[1:3], (3, 3), strides) != ((1, 1), (1, 1))
  ):
    return None
  return strides[0]


@dataclasses.dataclass(frozen=True)
class DirectConv:
  """`jax.lax.conv_general_dilated` with its 3x3 float32 convolutions in NHWC / HWIO layout, one
  pixel of padding on every side, at stride 1 or 2, whose channels the native kernels take
  (`pofx_backends.cpu.native.conv3x3_supports`) computed by them; every other call (other layouts,
  strides, paddings, kernel sizes, dtypes, a `precision` or `preferred_element_type`) is XLA's.
  `winograd`: the stride-1 forward, input gradient and kernel gradient by Winograd's F(2x2, 3x3)
  where it applies (`pofx_backends.cpu.native.conv3x3`); False keeps the direct sums."""

  winograd: bool = True

  def __call__(
    self,
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
  ):
    if (
      lhs.ndim == 4
      and rhs.ndim == 4
      and precision is None
      and preferred_element_type is None
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    ):
      stride = _native_stride(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count, batch_group_count
      )
      if stride is not None and native.conv3x3_supports(lhs, rhs, stride):
        return native.conv3x3(lhs, rhs, stride=stride, winograd=self.winograd)
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )


# The convolutions `MeasuredConv` chooses between.
CHOICES = ("xla", "im2col", "native")


@dataclasses.dataclass(frozen=True)
class MeasuredConv:
  """XLA's convolution, `Im2colConv(dot_general)` or `DirectConv()`, whichever `choose()` names
  ("xla", "im2col" or "native"). The CPU backend's `conv="auto"` passes a `choose` that measures
  them on this machine the first time a convolution is traced (`pofx_backends.cpu.conv_choice`),
  so programs without convolutions never measure."""

  dot_general: Callable[..., Any]
  choose: Callable[[], str]

  def __call__(self, lhs, rhs, window_strides, padding, *args, **kwargs):
    choice = self.choose()
    if choice not in CHOICES:
      raise ValueError(f"MeasuredConv: choose() returned {choice!r}; allowed: {', '.join(map(repr, CHOICES))}.")
    conv = {"xla": lax.conv_general_dilated, "im2col": Im2colConv(self.dot_general), "native": DirectConv()}[choice]
    return conv(lhs, rhs, window_strides, padding, *args, **kwargs)
