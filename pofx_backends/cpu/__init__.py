r"""The CPU backend: pofx's injection points computed by hand-written kernels on XLA:CPU.

`kernels(blas=, products=, attention=, conv=, group_norm=)` returns a `pofx.kernels.Kernels` (name "cpu") whose

- `dot_general` sends 2-D float32 products to a BLAS's sgemm through XLA's FFI
  (`pofx_backends.cpu.native.product`, differentiable): `products="blas"` the weight gradients
  only (the products that contract their left operand's leading, token, axis: `x^T g`, XLA:CPU's
  slowest form), `products="blas_all"` every product of the forward and the backward,
  `products="xla"` none. Operands `x [..., D]` contracted on their last axis with a `[D, F]`
  matrix are flattened to 2-D inside it. Every other form (batch dimensions, operands that are
  not both float32, a 3-D right operand, several contracting axes) is `jax.lax.dot_general`.
  `blas`: "auto" (Intel MKL where the `mkl` package is installed, else the OpenBLAS numpy's
  wheels bundle), "mkl" or "openblas".
- `group_norm` computes GroupNorm, and SiLU after it when the model asks, with the native AVX-512
  kernels (`pofx_backends.cpu.native.group_norm`: the statistics, the normalisation and the
  activation in three passes over each image, the backward in two) for float32 inputs whose
  channels are a multiple of 16, where this machine can build them; anything else is
  `pofx.group_norm.group_norm` (so `group_norm=True` never makes the backend unavailable).
  `group_norm=False` always uses the latter.
- `attention` computes block-sparse self-attention with the fused AVX-512 kernels
  (`pofx_backends.cpu.native.block_sparse_attention`) when the mask is a
  `pofx.kernels.SegmentMask` with `blocks` of 64-token blocks, the head dimension is 16, 32, 64
  or 128 and q, k, v are float32; anything else (dense masks, `CacheMask`, sliding windows,
  score soft-capping, other shapes or dtypes) goes to `pofx.kernels.xla_attention`. With
  `mask=None` (every query sees every key: a diffusion U-Net's attention) the full-attention
  kernels (`native.full_attention`: float32, head dimension 16, 32 or 64, at most 512 keys)
  compute it. `attention=False` always uses the latter.

- `conv_general_dilated` is XLA's (`conv="xla"`), or each 2-D convolution as one im2col matrix
  product through that `dot_general` (`conv="im2col"`), or the 3x3 convolutions padded by one
  pixel at stride 1 or 2 by the native kernels (direct sums, and Winograd's F(2x2, 3x3) at stride
  1) and the rest by XLA (`conv="native"`, `conv.DirectConv`), or
  by default (`conv="auto"`) whichever of these `conv_choice` measures fastest on this machine
  (`calibration.measure_conv`, in a child process, once per process, when the first convolution
  is traced: a program without convolutions never measures; "native" is a candidate where the
  native kernels can be built).

All give the XLA path's values up to float32 summation order. The kernels are compiled with the
system C++ compiler on first use (`pofx_backends.cpu.native`); `unavailable_reason()` says,
before any compilation, why this process cannot use them (JAX's platform must be the CPU, the CPU
x86-64 with AVX-512F, a C++ compiler on the path, a BLAS that can be loaded).

`split.split_batch(denoise, parts)` computes a model call as independent calls on slices of its
batch (work XLA:CPU's executor can run side by side); `LOW_MEMORY_COMPILER_OPTIONS` are compile
options with a lower compilation peak, `THREADED_CONV_COMPILER_OPTIONS` compile options under
which each convolution is split over all threads. A program applies any of them; the kernels
above do not.

`optimizers.adamw(...)` is optax's AdamW as a `pofx.optimizers.FusedOptimizer` whose step is one
native kernel over every parameter array, in place (`native.adamw_apply`); the train step applies
it by its `apply`.

`calibration.measure` times a forward and backward of a small Llama block with a given
`Kernels`: `pofx_backends.resolve("auto")` uses it to choose between "xla" and "cpu" on a CPU
machine by measurement (the faster of the two differs between CPUs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from pofx import group_norm as group_norm_lib
from pofx import kernels as kernels_lib
from pofx_backends.cpu import conv as conv_lib
from pofx_backends.cpu import native

BLAS_LIBRARIES = ("auto",) + native.BLAS_LIBRARIES
# Which products go to the BLAS: none, the weight gradients, every product.
PRODUCTS = ("xla", "blas", "blas_all")
# The convolution: XLA's own kernel, im2col products, the native kernels for 3x3 convolutions
# at stride 1 or 2 (`pofx_backends.cpu.conv`), or the fastest of them on this machine, measured when the
# first convolution is traced.
CONVS = ("auto",) + conv_lib.CHOICES
DEFAULT_OPTIONS = {"blas": "auto", "products": "blas_all", "attention": True, "conv": "auto", "group_norm": True}
# XLA:CPU compile options that lower the compilation's peak memory, for a program to pass as
# `jax.jit(f).lower(...).compile(compiler_options=LOW_MEMORY_COMPILER_OPTIONS)`: XLA's older LLVM
# emitters instead of its fusion emitters, and the generated module compiled as one piece instead
# of several pieces at once (about 20 MiB less at the compilation's peak for the bench U-Net). The
# compilation takes longer and, program by program, the compiled code may run slower: a program
# opts in where it measured the trade (the Diffusion-DPO benchmark does on the CPU:
# docs/benchmarks.md); the library never applies them.
LOW_MEMORY_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_cpu_parallel_codegen_split_count": 1}
# XLA:CPU compile options under which each convolution is XLA's own (Eigen's), split over all of the
# CPU client's threads, instead of a YNNPACK call that runs on one thread: XLA:CPU's default list of
# YNNPACK fusion types (jaxlib 0.10: individual convolutions, individual products, reductions) less
# the convolutions. One convolution then uses both cores of a 2-core machine where the executor has
# no second operation ready (a single `[16, 16, 16, 64]` 3x3 convolution on the 2-core AMD EPYC:
# 165 against 105 GFLOP/s, `python benchmarks/xla_cpu_kernels.py conv`);
# products and reductions stay with YNNPACK. A program passes them as `compiler_options` (merged
# with `LOW_MEMORY_COMPILER_OPTIONS` if it wants both); the library never applies them.
THREADED_CONV_COMPILER_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


def _blas_form(lhs, rhs, dimension_numbers, preferred_element_type):
  """`(transpose_a, transpose_b)` when the product is one `native.product` computes, else None."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if lhs_batch or rhs_batch or len(lhs_contract) != 1 or len(rhs_contract) != 1:
    return None
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or rhs.ndim != 2 or lhs.ndim < 2:
    return None
  if preferred_element_type is not None and jnp.dtype(preferred_element_type) != jnp.float32:
    return None
  lc, rc = lhs_contract[0] % lhs.ndim, rhs_contract[0] % rhs.ndim
  if lhs.ndim > 2 and lc != lhs.ndim - 1:
    return None
  return lc == 0 and lhs.ndim == 2, rc == 1


@dataclasses.dataclass(frozen=True)
class BlasDotGeneral:
  """`jax.lax.dot_general` with its 2-D float32 products by a BLAS (see the module docstring).

  all_products: every product (True) or the weight gradients only (False).
  library: the BLAS, resolved ("mkl" or "openblas").
  """

  all_products: bool
  library: str

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    form = _blas_form(lhs, rhs, dimension_numbers, preferred_element_type)
    if form is None:
      return jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
      )
    transpose_a, transpose_b = form
    lead = lhs.shape[:-1]
    a = lhs if lhs.ndim == 2 else lhs.reshape(-1, lhs.shape[-1])
    out = native.product(
      a, rhs, transpose_a=transpose_a, transpose_b=transpose_b, all_products=self.all_products, library=self.library
    )
    return out if lhs.ndim == 2 else out.reshape(*lead, out.shape[-1])


def native_attention_supports(q, k, v, mask, softcap=None) -> bool:
  """Whether the fused kernels compute this call (else `pofx.kernels.xla_attention` does): not for
  a sliding window (`mask.window`) or score soft-capping, which they do not compute. `mask=None`
  (every query sees every key): the full-attention kernels (`native.full_attention_supports`)."""
  if mask is None:
    return softcap is None and native.full_attention_supports(q, k, v)
  return (
    isinstance(mask, kernels_lib.SegmentMask)
    and mask.blocks is not None
    and mask.window is None
    and softcap is None
    and mask.blocks.block_size == native.BLOCK_SIZE
    and q.shape[-1] in native.HEAD_DIMS
    and q.shape[:2] == k.shape[:2]
    and all(x.dtype == jnp.float32 for x in (q, k, v))
  )


@dataclasses.dataclass(frozen=True)
class NativeAttention:
  """The attention injection point by the fused AVX-512 kernels where they apply (see the module
  docstring), else `pofx.kernels.xla_attention`."""

  def __call__(self, q, k, v, mask, *, scale: float, rope=None, softcap=None):
    if not native_attention_supports(q, k, v, mask, softcap):
      return kernels_lib.xla_attention(q, k, v, mask, scale=scale, rope=rope, softcap=softcap)
    kernels_lib.check_attention_shapes(q, k, v)
    if mask is None:
      q, k = kernels_lib.apply_rope(q, k, rope)
      return native.full_attention(q, k, v, scale=scale)
    if rope is not None and (rope[0].shape != q.shape[:2] + (q.shape[-1] // 2,) or rope[1].shape != rope[0].shape):
      raise ValueError(
        f"attention: rope tables must be [B, L, hd/2] = {q.shape[:2] + (q.shape[-1] // 2,)}, got "
        f"{rope[0].shape} and {rope[1].shape}."
      )
    return native.block_sparse_attention(
      q, k, v, mask.segment_ids, mask.branch_ids, mask.blocks, rope=rope, q_scale=scale
    )


@dataclasses.dataclass(frozen=True)
class NativeGroupNorm:
  """The `group_norm` injection point by the native AVX-512 kernels where they apply (this machine
  can build them: `native.available()`; float32, channels a multiple of 16:
  `native.group_norm_supports`), else `pofx.group_norm.group_norm`. The kernels are built when the
  first call they compute is traced."""

  def __call__(self, x, scale, bias, *, groups: int, eps: float, silu: bool = False):
    if native.group_norm_supports(x, scale, bias, groups) and native.available():
      return native.group_norm(x, scale, bias, groups=groups, eps=eps, silu=silu)
    return group_norm_lib.group_norm(x, scale, bias, groups=groups, eps=eps, silu=silu)


def _check_options(blas: str, products: str, attention, conv: str = "auto", group_norm=True) -> None:
  if conv not in CONVS:
    raise ValueError(f"CPU kernels: conv={conv!r} is not allowed; allowed: {CONVS}.")
  if blas not in BLAS_LIBRARIES:
    raise ValueError(f"CPU kernels: blas={blas!r} is not allowed; allowed: {BLAS_LIBRARIES}.")
  if products not in PRODUCTS:
    raise ValueError(f"CPU kernels: products={products!r} is not allowed; allowed: {PRODUCTS}.")
  if not isinstance(attention, bool):
    raise ValueError(f"CPU kernels: attention must be True or False, got {attention!r}.")
  if not isinstance(group_norm, bool):
    raise ValueError(f"CPU kernels: group_norm must be True or False, got {group_norm!r}.")


def unavailable_reason(
  *, blas: str = "auto", products: str = "blas_all", attention: bool = True, conv: str = "auto", group_norm: bool = True
) -> Optional[str]:
  """None when `kernels(...)` can run in this process, else why not.

  Checks JAX's backend (`jax.default_backend()`: the CPU kernels are XLA:CPU custom calls), then
  the machine (x86-64 with AVX-512F and a C++ compiler for the attention kernels; the BLAS for
  the products). Compiles nothing."""
  _check_options(blas, products, attention, conv, group_norm)
  platform = jax.default_backend()
  if platform != "cpu":
    return (
      f"the CPU kernels run on JAX's CPU platform and this process's JAX backend is {platform!r} "
      "(JAX_PLATFORMS=cpu runs on the CPU)"
    )
  if attention or conv == "native":
    reason = native.unavailable_reason()
    if reason:
      return reason
  if products != "xla":
    reason = native.blas_unavailable_reason(blas)
    if reason:
      return reason
  return None


def kernels(
  *, blas: str = "auto", products: str = "blas_all", attention: bool = True, conv: str = "auto", group_norm: bool = True
) -> kernels_lib.Kernels:
  """The CPU backend's `Kernels` (name "cpu"); builds the kernels it uses now (once per process).

  Args:
    blas: "auto" | "mkl" | "openblas": the BLAS of the products.
    products: "blas_all" (every product of `dot_general`'s 2-D float32 forms), "blas" (their
      weight gradients only) or "xla" (none: `jax.lax.dot_general`).
    attention: the fused block-sparse attention kernels where they apply (True) or
      `pofx.kernels.xla_attention` always (False).
    conv: "xla" (`jax.lax.conv_general_dilated`), "im2col" (`pofx_backends.cpu.conv.Im2colConv`:
      each convolution one matrix product, through this backend's `dot_general`), "native"
      (`pofx_backends.cpu.conv.DirectConv`: the native kernels for 3x3 convolutions) or
      "auto" (the fastest by `conv_choice`, measured when the first convolution is traced).
    group_norm: the native GroupNorm (+ SiLU) kernels where they apply (True) or
      `pofx.group_norm.group_norm` always (False).

  Raises:
    ValueError: an unknown option, or the reason this process cannot use them.
  """
  reason = unavailable_reason(blas=blas, products=products, attention=attention, conv=conv, group_norm=group_norm)
  if reason:
    raise ValueError(
      f"the CPU kernels (blas={blas!r}, products={products!r}, attention={attention}, conv={conv!r}, "
      f"group_norm={group_norm}) cannot run here: {reason}."
    )
  dot_general = jax.lax.dot_general
  if products != "xla":
    library = native.resolve_blas(blas)
    native.load_blas(library=library)
    dot_general = BlasDotGeneral(products == "blas_all", library)
  attend = kernels_lib.xla_attention
  if attention:
    native.load()
    attend = NativeAttention()
  if conv == "auto":
    convolution = conv_lib.MeasuredConv(dot_general, functools.partial(_conv_choice_name, blas, products))
  elif conv == "native":
    native.load()
    convolution = conv_lib.DirectConv()
  else:
    convolution = conv_lib.Im2colConv(dot_general) if conv == "im2col" else jax.lax.conv_general_dilated
  normalise = NativeGroupNorm() if group_norm else group_norm_lib.group_norm
  return kernels_lib.Kernels(
    dot_general=dot_general, attention=attend, conv_general_dilated=convolution, group_norm=normalise, name="cpu"
  )


def measure_convs(blas: str = "auto", products: str = "blas_all") -> Dict[str, float]:
  """Seconds of `calibration.measure_conv` with XLA's convolution ("xla"), with im2col products
  through this backend's `dot_general` for `blas` and `products` ("im2col") and, where the native
  kernels can be built, with them ("native"), in this process."""
  from pofx_backends.cpu import calibration

  dot_general = kernels(blas=blas, products=products, attention=False, conv="xla").dot_general
  seconds = {
    "xla": calibration.measure_conv(jax.lax.conv_general_dilated),
    "im2col": calibration.measure_conv(conv_lib.Im2colConv(dot_general)),
  }
  if native.available():
    native.load()
    seconds["native"] = calibration.measure_conv(conv_lib.DirectConv())
  return seconds


@functools.cache
def _conv_seconds(blas: str, products: str) -> Dict[str, float]:
  """`measure_convs` in a child process, once per process (the caller then holds neither
  candidate's compiled program)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
  code = f"import json\nfrom pofx_backends import cpu\nprint(json.dumps(cpu.measure_convs({blas!r}, {products!r})))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
  if out.returncode != 0:
    raise RuntimeError(
      f"pofx_backends.cpu: the convolution calibration failed in its child process:\n{out.stderr[-2000:]}"
    )
  return json.loads(out.stdout.strip().splitlines()[-1])


def conv_choice(blas: str = "auto", products: str = "blas_all") -> Tuple[str, Dict[str, float]]:
  """`(choice, seconds)`: "xla", "im2col" or "native", whichever `measure_convs` found fastest on
  this machine (measured in a child process once per process, then reused), and the timings."""
  seconds = dict(_conv_seconds(blas, products))
  return min(seconds, key=seconds.get), seconds


def _conv_choice_name(blas: str, products: str) -> str:
  return conv_choice(blas, products)[0]
