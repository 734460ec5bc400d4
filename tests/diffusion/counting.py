"""Kernels that record the operand dtypes of every convolution and product a model sends them."""

import jax

from pofx import kernels as kernels_lib


def counting_kernels():
  """`(kernels, calls)`: XLA's convolution and dot_general, each call's `(lhs.dtype, rhs.dtype)`
  appended to `calls["conv"]` / `calls["dot"]` (at trace time)."""
  calls = {"conv": [], "dot": []}

  def conv(lhs, rhs, *a, **k):
    calls["conv"].append((lhs.dtype, rhs.dtype))
    return jax.lax.conv_general_dilated(lhs, rhs, *a, **k)

  def dot(lhs, rhs, *a, **k):
    calls["dot"].append((lhs.dtype, rhs.dtype))
    return jax.lax.dot_general(lhs, rhs, *a, **k)

  return kernels_lib.Kernels(dot_general=dot, conv_general_dilated=conv, name="counting"), calls
