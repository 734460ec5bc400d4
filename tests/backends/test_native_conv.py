"""The native 3x3 convolution kernels (`pofx_backends.cpu.native.conv3x3`) against float64 NumPy sums
over the kernel taps: values, input and kernel gradients; and `DirectConv`, the injection point
that sends them the convolutions they compute and XLA the others."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx_backends import cpu
from pofx_backends.cpu import conv as conv_lib
from pofx_backends.cpu import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")

NHWC = ("NHWC", "HWIO", "NHWC")


def padded(x):
  return np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))


def out_size(n, stride):
  """Output rows of a 3x3 window over n rows padded by one on each side: (n + 2 - 3) // stride + 1."""
  return (n - 1) // stride + 1


def window(xp, i, j, h, wd, stride):
  """x_pad[:, stride y + i, stride x + j] for the h x wd output pixels (y, x)."""
  return xp[:, i : i + stride * (h - 1) + 1 : stride, j : j + stride * (wd - 1) + 1 : stride]


def forward64(x, w, stride=1):
  """out[b, y, x, o] = sum_{i, j, c} x_pad[b, S y + i, S x + j, c] w[i, j, c, o], in float64."""
  xp, (_, h, wd, _) = padded(x), x.shape
  ho, wo = out_size(h, stride), out_size(wd, stride)
  return sum(window(xp, i, j, ho, wo, stride) @ w[i, j].astype(np.float64) for i in range(3) for j in range(3))


def kernel_grad64(x, g, stride=1):
  """d/dw of sum(out * g): d_w[i, j, c, o] = sum_{b, y, x} x_pad[b, S y + i, S x + j, c] g[b, y, x, o]."""
  xp, (_, ho, wo, _) = padded(x), g.shape
  g64 = g.astype(np.float64)
  return np.stack(
    [np.stack([np.einsum("byxc,byxo->co", window(xp, i, j, ho, wo, stride), g64) for j in range(3)]) for i in range(3)]
  )


def input_grad64(x_shape, w, g, stride=1):
  """d/dx of sum(out * g): each output pixel's g spread back over the 3x3 input pixels it read,
  d_x_pad[b, S y + i, S x + j, c] += g[b, y, x, o] w[i, j, c, o], then the padding cut off."""
  b, h, wd, _ = x_shape
  ho, wo = g.shape[1:3]
  d_pad = np.zeros((b, h + 2, wd + 2, w.shape[2]))
  for i in range(3):
    for j in range(3):
      d_pad[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride] += (
        g.astype(np.float64) @ w[i, j].astype(np.float64).T
      )
  return d_pad[:, 1:-1, 1:-1]


# (b, h, w, ci, co, stride): channel counts that use each register tile (16, 32 and 64 output
# channels per tile), widths that leave a partial tile, more input channels than one kernel-gradient
# tile holds; the narrow kernels (fewer than 16 output channels, and a first layer's input gradient
# with fewer than 16 input channels), and stride 2 on even and odd sizes.
SHAPES = [
  (2, 5, 7, 16, 64, 1),
  (3, 4, 13, 32, 32, 1),
  (1, 6, 6, 80, 16, 1),
  (2, 16, 16, 48, 96, 1),
  (1, 1, 1, 16, 16, 1),
  (2, 8, 8, 64, 64, 1),
  (2, 6, 9, 32, 1, 1),
  (2, 5, 6, 64, 3, 1),
  (2, 7, 5, 1, 32, 1),
  (1, 4, 6, 3, 16, 1),
  (2, 16, 16, 32, 32, 2),
  (2, 7, 9, 64, 64, 2),
  (1, 8, 6, 16, 48, 2),
  (2, 9, 8, 32, 1, 2),
]


@pytest.mark.parametrize("winograd", [True, False], ids=["winograd", "direct"])
@pytest.mark.parametrize("b,h,wd,ci,co,stride", SHAPES)
def test_values_and_gradients_equal_float64_sums(b, h, wd, ci, co, stride, winograd):
  rng = np.random.default_rng(b * 1000 + h * 100 + wd + ci + co + stride)
  x = rng.uniform(-1, 1, (b, h, wd, ci)).astype(np.float32)
  w = (rng.normal(size=(3, 3, ci, co)) / np.sqrt(9 * ci)).astype(np.float32)
  g = rng.normal(size=(b, out_size(h, stride), out_size(wd, stride), co)).astype(np.float32)
  conv = lambda x, w: native.conv3x3(x, w, stride=stride, winograd=winograd)
  out, vjp = jax.vjp(conv, jnp.asarray(x), jnp.asarray(w))
  d_x, d_w = vjp(jnp.asarray(g))
  scale = np.sqrt(9 * ci)
  np.testing.assert_allclose(np.asarray(out), forward64(x, w, stride), atol=2e-6 * scale)
  np.testing.assert_allclose(np.asarray(d_x), input_grad64(x.shape, w, g, stride), atol=2e-6 * np.sqrt(9 * co))
  np.testing.assert_allclose(np.asarray(d_w), kernel_grad64(x, g, stride), atol=2e-6 * np.sqrt(b * h * wd) * 3)


def test_winograd_is_another_summation_of_the_same_values():
  """Winograd's F(2x2, 3x3) (even sizes, stride 1) rounds differently from the direct sums, so the
  two forwards and kernel gradients differ in their last bits, and both lie within float32
  rounding of the float64 sums."""
  rng = np.random.default_rng(7)
  x = rng.uniform(-1, 1, (4, 8, 8, 64)).astype(np.float32)
  w = (rng.normal(size=(3, 3, 64, 64)) / 24).astype(np.float32)
  g = rng.normal(size=(4, 8, 8, 64)).astype(np.float32)
  expected = forward64(x, w), kernel_grad64(x, g)
  results = {}
  for winograd in (False, True):
    out, vjp = jax.vjp(lambda w: native.conv3x3(jnp.asarray(x), w, winograd=winograd), jnp.asarray(w))
    results[winograd] = np.asarray(out), np.asarray(vjp(jnp.asarray(g))[0])
  for i, tolerance in enumerate((2e-6 * 24, 2e-6 * 16 * 3 * 2)):
    assert np.any(results[False][i] != results[True][i])
    for winograd in (False, True):
      np.testing.assert_allclose(results[winograd][i], expected[i], rtol=0, atol=tolerance)
  # Odd sizes and fewer than 16 input channels take the direct sums whatever the flag, and so does
  # the kernel gradient below Ci Co = 3072 (64 -> 32 here).
  for xi, wi in ((x[:, :7, :7], w), (x[..., :3], w[:, :, :3])):
    xi, wi = jnp.asarray(xi), jnp.asarray(wi)
    np.testing.assert_array_equal(native.conv3x3(xi, wi), native.conv3x3(xi, wi, winograd=False))
  small_grad = [
    jax.grad(lambda w, wg=wg: jnp.sum(native.conv3x3(jnp.asarray(x), w, winograd=wg) * g[..., :32]))(
      jnp.asarray(w[..., :32])
    )
    for wg in (True, False)
  ]
  np.testing.assert_array_equal(*small_grad)


def _native_calls(f, *args):
  """The native convolution calls in f's lowered program, by target (forward, input and kernel gradient)."""
  text = jax.jit(f).lower(*args).as_text()
  return tuple(text.count(f"pofx_conv3x3_{kind}") for kind in ("fwd", "input_grad", "kernel_grad"))


def test_input_gradient_is_native_at_stride_1_and_xla_at_stride_2():
  x = jnp.zeros((2, 8, 8, 32), jnp.float32)
  w = jnp.zeros((3, 3, 32, 32), jnp.float32)
  for stride, expected in ((1, (1, 1, 1)), (2, (1, 0, 1))):
    loss = lambda x, w, s=stride: jnp.sum(native.conv3x3(x, w, stride=s) ** 2)
    assert _native_calls(jax.grad(loss, argnums=(0, 1)), x, w) == expected


def test_under_jit_and_vmap():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-1, 1, (3, 2, 4, 4, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 32)) / 12, jnp.float32)
  out = jax.jit(jax.vmap(native.conv3x3, in_axes=(0, None)))(x, w)
  expected = np.stack([forward64(np.asarray(xi), np.asarray(w)) for xi in x])
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_refuses_what_it_does_not_compute():
  x = jnp.zeros((1, 4, 4, 16), jnp.float32)
  with pytest.raises(
    ValueError, match=r"Co < 16 and Ci a multiple of 16; got x \(1, 4, 4, 8\) float32, w \(3, 3, 8, 8\)"
  ):
    native.conv3x3(x[..., :8], jnp.zeros((3, 3, 8, 8), jnp.float32))
  with pytest.raises(ValueError, match="stride 3"):
    native.conv3x3(x, jnp.zeros((3, 3, 16, 16), jnp.float32), stride=3)
  assert not native.conv3x3_supports(x.astype(jnp.bfloat16), jnp.zeros((3, 3, 16, 16), jnp.bfloat16))
  assert not native.conv3x3_supports(jnp.zeros((1, 4, 4, 3), jnp.float32), jnp.zeros((3, 3, 3, 24), jnp.float32))
  assert native.conv3x3_supports(jnp.zeros((1, 4, 4, 3), jnp.float32), jnp.zeros((3, 3, 3, 16), jnp.float32))
  assert native.conv3x3_supports(x, jnp.zeros((3, 3, 16, 1), jnp.float32), 2)


def _custom_calls(f, *args):
  return _native_calls(f, *args)[0]


def test_direct_conv_routes_only_what_the_kernels_compute():
  rng = np.random.default_rng(2)
  conv = conv_lib.DirectConv()
  x = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 32)) / 12, jnp.float32)
  native_calls = [((1, 1), "SAME", 1), ((1, 1), ((1, 1), (1, 1)), 1), ((2, 2), ((1, 1), (1, 1)), 2)]
  for strides, padding, stride in native_calls:
    f = lambda x, w, s=strides, p=padding: conv(x, w, s, p, dimension_numbers=NHWC)
    assert _custom_calls(f, x, w) == 1
    np.testing.assert_allclose(np.asarray(f(x, w)), forward64(np.asarray(x), np.asarray(w), stride), atol=1e-5)
  # Everything else is XLA's convolution, value for value.
  others = [
    (x, w, (2, 2), "SAME", {}),  # stride 2 padded (0, 1): not one pixel on each side
    (x, w, (2, 1), ((1, 1), (1, 1)), {}),  # unequal strides
    (x, w, (3, 3), ((1, 1), (1, 1)), {}),  # stride 3
    (x, w, (1, 1), "VALID", {}),  # no padding
    (x, jnp.asarray(rng.normal(size=(1, 1, 16, 32)), jnp.float32), (1, 1), "SAME", {}),  # 1x1
    (x[..., :3], w[:, :, :3, :8], (1, 1), "SAME", {}),  # 3 input and 8 output channels
    (x, w[..., :24], (1, 1), "SAME", {}),  # 24 output channels
    (x, w, (1, 1), "SAME", {"rhs_dilation": (2, 2)}),
    (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), "SAME", {}),
  ]
  for xi, wi, strides, padding, kw in others:
    f = lambda x, w, s=strides, p=padding, kw=kw: conv(x, w, s, p, dimension_numbers=NHWC, **kw)
    g = lambda x, w, s=strides, p=padding, kw=kw: jax.lax.conv_general_dilated(x, w, s, p, dimension_numbers=NHWC, **kw)
    assert _custom_calls(f, xi, wi) == 0
    np.testing.assert_array_equal(np.asarray(f(xi, wi)), np.asarray(g(xi, wi)))
  # Another layout is XLA's too.
  nchw = jnp.transpose(x, (0, 3, 1, 2))
  f = lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW"))
  assert _custom_calls(f, nchw, w) == 0


def test_cpu_backend_native_conv_option(monkeypatch):
  kernels = cpu.kernels(products="xla", attention=False, conv="native")
  assert isinstance(kernels.conv_general_dilated, conv_lib.DirectConv)
  # conv="auto" measures the native kernels beside XLA's and im2col (the timing itself stubbed:
  # each candidate's seconds are its position in the order measured).
  from pofx_backends.cpu import calibration

  measured = []
  monkeypatch.setattr(calibration, "measure_conv", lambda conv: measured.append(conv) or len(measured))
  seconds = cpu.measure_convs(products="xla")
  assert seconds == {"xla": 1, "im2col": 2, "native": 3}
  assert measured[0] is jax.lax.conv_general_dilated and isinstance(measured[2], conv_lib.DirectConv)
