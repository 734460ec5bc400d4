"""Kernels that record the operand dtypes of every convolution, product and attention a model sends them."""

import jax

from pofx import kernels as kernels_lib


def counting_kernels():
  """`(kernels, calls)`: XLA's convolution, dot_general and attention, each call's `(lhs.dtype,
  rhs.dtype)` appended to `calls["conv"]` / `calls["dot"]`, and `(q.dtype, k.dtype)` to
  `calls["attention"]` with the mask in `calls["attention_masks"]` (at trace time)."""
  calls = {"conv": [], "dot": [], "attention": [], "attention_masks": []}

  def conv(lhs, rhs, *a, **k):
    calls["conv"].append((lhs.dtype, rhs.dtype))
    return jax.lax.conv_general_dilated(lhs, rhs, *a, **k)

  def dot(lhs, rhs, *a, **k):
    calls["dot"].append((lhs.dtype, rhs.dtype))
    return jax.lax.dot_general(lhs, rhs, *a, **k)

  def attention(q, k, v, mask, **kw):
    calls["attention"].append((q.dtype, k.dtype))
    calls["attention_masks"].append(mask)
    return kernels_lib.xla_attention(q, k, v, mask, **kw)

  return kernels_lib.Kernels(dot_general=dot, attention=attention, conv_general_dilated=conv, name="counting"), calls
