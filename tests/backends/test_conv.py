"""The CPU backend's im2col convolution (`pofx_backends.cpu.conv`) against a float64 NumPy sum over
the kernel taps and against `jax.lax.conv_general_dilated`: values, input and kernel gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx_backends import cpu
from pofx_backends.cpu import conv as conv_lib


def numpy_conv(x, w, strides, pads):
  """NHWC x HWIO in float64: out[n, y, x, o] = sum_{i, j, c} x_pad[n, s y + i, s x + j, c] w[i, j, c, o]."""
  kh, kw, _, o = w.shape
  xp = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - kh) // strides[0] + 1
  wo = (xp.shape[2] - kw) // strides[1] + 1
  out = np.zeros((x.shape[0], ho, wo, o))
  for i in range(kh):
    for j in range(kw):
      window = xp[:, i : i + (ho - 1) * strides[0] + 1 : strides[0], j : j + (wo - 1) * strides[1] + 1 : strides[1]]
      out += window @ w[i, j].astype(np.float64)
  return out


def test_values_and_gradients_equal_a_float64_sum_over_taps():
  # The kernel gradient of sum(out * g) is sum over windows of x_pad * g; the input gradient is
  # checked by central differences of the float64 sum along a random direction.
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(2, 7, 6, 3)), rng.normal(size=(3, 3, 3, 4))
  strides, pads = (2, 1), ((1, 1), (0, 2))
  g = rng.normal(size=numpy_conv(x, w, strides, pads).shape)
  conv = conv_lib.Im2colConv()
  f = lambda x, w: conv(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  out, dx, dw = jax.jit(lambda x, w, g: (lambda o, vjp: (o, *vjp(g)))(*jax.vjp(f, x, w)))(
    jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32)
  )
  np.testing.assert_allclose(np.asarray(out), numpy_conv(x, w, strides, pads), atol=1e-5)
  xp = np.pad(x, ((0, 0), *pads, (0, 0)))
  expected_dw = np.zeros_like(w)
  ho, wo = g.shape[1:3]
  for i in range(3):
    for j in range(3):
      window = xp[:, i : i + (ho - 1) * strides[0] + 1 : strides[0], j : j + (wo - 1) * strides[1] + 1 : strides[1]]
      expected_dw[i, j] = np.einsum("nyxc,nyxo->co", window, g)
  np.testing.assert_allclose(np.asarray(dw), expected_dw, atol=1e-4)
  direction = rng.normal(size=x.shape)
  eps = 1e-3
  loss = lambda xx: np.sum(numpy_conv(xx, w, strides, pads) * g)
  numeric = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(np.sum(np.asarray(dx) * direction), numeric, rtol=1e-5)


CASES = [
  # (input NHWC shape, kernel (kh, kw, C_out), strides, padding, dimension numbers)
  ((2, 6, 5, 3), (3, 3, 4), (1, 1), "SAME", ("NHWC", "HWIO", "NHWC")),
  ((2, 8, 8, 2), (3, 3, 3), (2, 2), "VALID", ("NCHW", "OIHW", "NCHW")),
  ((1, 5, 6, 4), (1, 1, 3), (1, 1), "VALID", ("NHWC", "HWIO", "NHWC")),
  ((2, 6, 6, 2), (3, 2, 3), (1, 1), ((2, 0), (0, 3)), ("NHWC", "OIHW", "NCHW")),
  ((1, 4, 4, 2), (5, 5, 2), (1, 1), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),  # a window wider than its padding
]


def _operands(shape, kernel, dn, rng):
  n, h, w, c = shape
  kh, kw, o = kernel
  x = rng.normal(size=shape).astype(np.float32)
  k = rng.normal(size=(kh, kw, c, o)).astype(np.float32)
  if dn[0] == "NCHW":
    x = x.transpose(0, 3, 1, 2)
  if dn[1] == "OIHW":
    k = k.transpose(3, 2, 0, 1)
  return jnp.asarray(x), jnp.asarray(k)


def _value_and_vjp(conv, strides, padding, dn):
  """jitted `(x, k, g) -> (conv(x, k), d x, d k)` for the output gradient g."""

  def f(x, k, g):
    out, vjp = jax.vjp(lambda x, k: conv(x, k, strides, padding, dimension_numbers=dn), x, k)
    return (out, *vjp(g))

  return jax.jit(f)


@pytest.mark.parametrize("shape,kernel,strides,padding,dn", CASES)
def test_equals_xla_convolution_values_and_gradients(shape, kernel, strides, padding, dn):
  rng = np.random.default_rng(sum(shape) + sum(kernel))
  x, k = _operands(shape, kernel, dn, rng)
  out_shape = jax.eval_shape(
    lambda x, k: jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn), x, k
  ).shape
  g = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  ours = _value_and_vjp(conv_lib.Im2colConv(), strides, padding, dn)(x, k, g)
  expected = _value_and_vjp(jax.lax.conv_general_dilated, strides, padding, dn)(x, k, g)
  for name, a, b in zip(("value", "input gradient", "kernel gradient"), ours, expected):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), atol=2e-5 * max(1.0, float(jnp.abs(b).max())), err_msg=name
    )


def test_unsupported_forms_are_xla_convolutions():
  # Grouped and dilated convolutions, and mixed dtypes, go to jax.lax.conv_general_dilated unchanged.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  conv = conv_lib.Im2colConv()
  assert not conv_lib.supports(x, k, (1, 1), "SAME", feature_group_count=2)
  grouped = conv(x, k, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
  np.testing.assert_array_equal(
    grouped, jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
  )
  k4 = jnp.asarray(rng.normal(size=(3, 3, 4, 2)), jnp.float32)
  assert not conv_lib.supports(x, k4, (1, 1), "SAME", rhs_dilation=(2, 2))
  dilated = conv(x, k4, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn)
  np.testing.assert_array_equal(
    dilated, jax.lax.conv_general_dilated(x, k4, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn)
  )


def test_measured_conv_computes_the_chosen_convolution():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.float32)
  args = ((1, 1), "SAME")
  kw = {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}
  expected = {
    "xla": jax.lax.conv_general_dilated(x, k, *args, **kw),
    "im2col": conv_lib.Im2colConv()(x, k, *args, **kw),
  }
  for choice, value in expected.items():
    out = conv_lib.MeasuredConv(jax.lax.dot_general, lambda c=choice: c)(x, k, *args, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(value))
  with pytest.raises(ValueError, match="choose\\(\\) returned 'fast'; allowed: 'xla', 'im2col', 'native'"):
    conv_lib.MeasuredConv(jax.lax.dot_general, lambda: "fast")(x, k, *args, **kw)


def test_cpu_backend_conv_option():
  with pytest.raises(
    ValueError, match=r"conv='winograd' is not allowed; allowed: \('auto', 'xla', 'im2col', 'native'\)"
  ):
    cpu.unavailable_reason(conv="winograd")
  reason = cpu.unavailable_reason(products="xla", attention=False, conv="im2col")
  if reason:
    pytest.skip(reason)
  kernels = cpu.kernels(products="xla", attention=False, conv="im2col")
  assert isinstance(kernels.conv_general_dilated, conv_lib.Im2colConv)
  assert cpu.kernels(products="xla", attention=False, conv="xla").conv_general_dilated is jax.lax.conv_general_dilated
  assert isinstance(cpu.kernels(products="xla", attention=False).conv_general_dilated, conv_lib.MeasuredConv)
