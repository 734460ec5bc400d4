"""The native GroupNorm (+ SiLU) kernels (`pofx_backends.cpu.native.group_norm`) against the
formula in float64 NumPy and its central differences; the CPU backend's `group_norm` injection
point; and a U-Net computed with the CPU backend's kernels against the same U-Net with XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import group_norm as group_norm_lib
from pofx.diffusion import unet
from pofx_backends import cpu
from pofx_backends.cpu import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")


def group_norm64(x, scale, bias, groups, eps, silu):
  """Wu & He 2018 (arXiv:1803.08494), eq. 1-2, per image and group of contiguous channels, float64."""
  B, C = x.shape[0], x.shape[-1]
  g = x.reshape(B, -1, groups, C // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias
  return y / (1 + np.exp(-y)) if silu else y


# (shape, groups): one channel per group, several, one group; an odd number of pixels.
CASES = [((2, 4, 4, 32), 32), ((3, 5, 3, 48), 4), ((1, 6, 6, 16), 1), ((2, 7, 64), 8)]


@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("silu", [False, True])
def test_values_and_gradients_equal_the_formula(shape, groups, silu):
  rng = np.random.default_rng(len(shape) * 100 + shape[-1] + groups + silu)
  C, eps = shape[-1], 1e-5
  x = rng.normal(size=shape) * 2 + 0.5
  scale, bias = rng.normal(size=C), rng.normal(size=C)
  w = rng.normal(size=shape)  # the loss sum(y * w)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, vjp = jax.vjp(
    lambda x, s, b: native.group_norm(x, s, b, groups=groups, eps=eps, silu=silu), f32(x), f32(scale), f32(bias)
  )
  np.testing.assert_allclose(np.asarray(y), group_norm64(x, scale, bias, groups, eps, silu), atol=3e-6)
  grads = [np.asarray(g, np.float64) for g in vjp(f32(w))]
  loss = lambda x, s, b: float((group_norm64(x, s, b, groups, eps, silu) * w).sum())
  h = 1e-5
  for i, arg in enumerate((x, scale, bias)):
    direction = rng.normal(size=arg.shape)
    args_plus, args_minus = [x, scale, bias], [x, scale, bias]
    args_plus[i], args_minus[i] = arg + h * direction, arg - h * direction
    expected = (loss(*args_plus) - loss(*args_minus)) / (2 * h)
    got = float((grads[i] * direction).sum())
    assert abs(got - expected) <= 2e-5 * (1 + abs(expected)) * np.sqrt(arg.size), (i, got, expected)


def test_the_injection_point_falls_back_where_the_kernels_do_not_apply():
  norm = cpu.NativeGroupNorm()
  rng = np.random.default_rng(3)
  for shape, groups, dtype in [((2, 3, 3, 8), 2, jnp.float32), ((2, 3, 3, 32), 4, jnp.bfloat16)]:
    x = jnp.asarray(rng.normal(size=shape), dtype)
    s, b = jnp.ones(shape[-1], dtype), jnp.zeros(shape[-1], dtype)
    assert not native.group_norm_supports(x, s, b, groups)
    got = jax.jit(lambda x, s, b: norm(x, s, b, groups=groups, eps=1e-6, silu=True))(x, s, b)
    expected = jax.jit(lambda x, s, b: group_norm_lib.group_norm(x, s, b, groups=groups, eps=1e-6, silu=True))(x, s, b)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  with pytest.raises(ValueError, match=r"C a multiple of 16 and of groups.*got x \(2, 4, 8\)"):
    native.group_norm(jnp.zeros((2, 4, 8)), jnp.ones(8), jnp.zeros(8), groups=2, eps=1e-5)
  with pytest.raises(ValueError, match="group_norm must be True or False, got 'yes'"):
    cpu.unavailable_reason(group_norm="yes")


def test_a_unet_with_the_cpu_kernels_equals_it_with_xla():
  # Channels that the native convolution and GroupNorm compute (16 and 32), attention heads of
  # width 16 (the native full attention), SiLU fused into the norms; the stride-2 downsampling and
  # the 1-channel convolutions stay XLA's.
  config = unet.preset("tiny", block_out_channels=(16, 32), norm_num_groups=4, attention_head_dim=16)
  kernels = cpu.kernels(products="xla", conv="native")
  assert isinstance(kernels.group_norm, cpu.NativeGroupNorm)
  xla_model, cpu_model = unet.make(config), unet.make(config, kernels=kernels)
  params = xla_model.init(jax.random.key(0))
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32)
  t, labels = jnp.asarray([3, 500, 999]), jnp.asarray([1, 4, 9])

  def output_and_grads(model):
    # One program per model: the output, and the gradient of its sum of squares.
    out = lambda p: model.denoise(p, x, t, labels)
    return jax.jit(lambda p: (out(p), jax.grad(lambda q: jnp.sum(out(q) ** 2))(p)))(params)

  # The CPU model's program calls the native kernels (in the forward and in the backward).
  hlo = (
    jax.jit(lambda p: jax.grad(lambda q: jnp.sum(cpu_model.denoise(q, x, t, labels) ** 2))(p)).lower(params).as_text()
  )
  targets = ("group_norm_fwd", "group_norm_bwd", "conv3x3_fwd", "conv3x3_kernel_grad", "full_attention_fwd")
  for target in (f"pofx_{name}" for name in targets + ("full_attention_bwd",)):
    assert target in hlo, target
  expected, got = output_and_grads(xla_model), output_and_grads(cpu_model)
  for e_tree, g_tree in zip(expected, got):
    # Leaves whose exact value is 0 (the bias of a convolution followed by a norm that removes it)
    # hold float32 rounding: the tolerance is scaled by the largest value of the whole tree.
    scale = max(float(jnp.abs(e).max()) for e in jax.tree.leaves(e_tree))
    for e, g in zip(jax.tree.leaves(e_tree), jax.tree.leaves(g_tree)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-4, atol=2e-6 * scale)
