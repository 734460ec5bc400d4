r"""GPU attention behind `pofx.kernels`' attention injection point: `jax.nn.dot_product_attention`.

The attention of the contract (`pofx.kernels`, module docstring),

    out = softmax(scale * rot(q) rot(k)^T + mask) v,    q [B, Lq, K, G, hd],  k, v [B, Lk, K, hd],

is computed by `jax.nn.dot_product_attention` in its `[B, T, N, H]` layout: the K x G query heads
become N = K * G heads in the order n = k * G + g, which is the grouped-query order of that
function (query head n reads key/value head n // G), so keys and values are never repeated. The
rotary tables are applied first (`pofx.kernels.apply_rope`).

Which implementation computes it:

- `"cudnn"` (cuDNN flash attention, Dao 2023, arXiv:2307.08691) for a `SegmentMask` when the
  inputs are bfloat16 or float16 on a CUDA GPU and the head dimension is a multiple of 8 and at
  most 128 (256 from compute capability 9.0 on). The mask is passed exactly as the boolean
  `[B, 1, L, L]` of `SegmentMask.dense()` (same segment, causal, compatible branch: fused,
  packed and prompt-shared layouts alike), together with `is_causal=True` so that cuDNN skips
  the tiles above the diagonal. cuDNN's training path takes such a mask only for even lengths,
  so an odd L is padded by one row (a padding segment of its own, invisible to the real queries
  by causality) and the result sliced back.
- otherwise (float32 inputs, CPU, ROCm, head dimensions cuDNN does not take, shapes cuDNN's own
  checks refuse while tracing, and every `CacheMask`: a decoding step, a few queries over the
  cache, bound by memory traffic, where cuDNN's bias path gains nothing and needs even lengths),
  the core's `pofx.kernels.xla_attention`, which also uses a `SegmentMask`'s block list. An
  explicit `"cudnn"` raises where cuDNN refuses; an explicit `"xla"` runs
  `jax.nn.dot_product_attention`'s XLA implementation on the same layout (the form the CPU tests
  compare with the core's attention).

The layouts are not told apart: segment and branch ids are traced values, so even the fused
layout (which `is_causal` plus per-row lengths could express) goes through the boolean mask.

On the `jax.nn` paths `SegmentMask.blocks` is ignored: the block list only says which tiles hold
allowed entries, and cuDNN already skips the causal upper triangle. Scores and the softmax are float32 in both
implementations; the result is in q's dtype.

    kernels = pofx_backends.gpu.kernels()                         # "cudnn" where it applies
    kernels = pofx_backends.gpu.kernels(implementation="xla")     # force XLA (runs on CPU)
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from pofx import kernels as kernels_lib

Array = jax.Array

IMPLEMENTATIONS = (None, "cudnn", "xla")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def unavailable_reason() -> Optional[str]:
  """None when JAX runs on a GPU here; otherwise one line saying why the "gpu" kernels cannot run."""
  backend = jax.default_backend()
  if backend != "gpu":
    return (
      f"the JAX backend is {backend!r}, not a GPU (install jax with CUDA support, e.g. "
      f"pip install 'jax[cuda12]', on a machine with an NVIDIA GPU)"
    )
  if not hasattr(jax.nn, "dot_product_attention"):
    return f"jax {jax.__version__} has no jax.nn.dot_product_attention (needs jax >= 0.4.31)"
  return None


def _is_cuda() -> bool:
  """Whether the default backend is a CUDA GPU (not ROCm)."""
  if jax.default_backend() != "gpu":
    return False
  version = getattr(getattr(jax.devices()[0], "client", None), "platform_version", "") or ""
  return "rocm" not in version.lower()


def _max_cudnn_head_dim() -> int:
  """256 from compute capability 9.0 (Hopper) on, 128 before."""
  capability = getattr(jax.devices()[0], "compute_capability", "0.0")
  try:
    major = int(str(capability).split(".")[0])
  except ValueError:
    major = 0
  return 256 if major >= 9 else 128


def choose_implementation(q: Array, mask) -> str:
  """The implementation, "cudnn" or "xla", for these queries and this mask here (see the module docstring)."""
  if not isinstance(mask, kernels_lib.SegmentMask):
    return "xla"
  if q.dtype not in _CUDNN_DTYPES or not _is_cuda():
    return "xla"
  hd = q.shape[-1]
  if hd % 8 or hd > _max_cudnn_head_dim():
    return "xla"
  return "cudnn"


def _pad_rows(x: Array, n: int, value=0) -> Array:
  """`x [B, L, ...]` with n more rows of `value` along axis 1."""
  if n == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, n)
  return jnp.pad(x, pad, constant_values=value)


def dot_product_attention(
  q: Array,
  k: Array,
  v: Array,
  mask,
  *,
  scale: float,
  rope: Optional[Tuple[Array, Array]] = None,
  implementation: Optional[str] = None,
  softcap: Optional[float] = None,
) -> Array:
  """The attention injection point through `jax.nn.dot_product_attention` (module docstring).

  Args:
    q: `[B, Lq, K, G, hd]`; k, v: `[B, Lk, K, hd]`.
    mask: a `pofx.kernels.SegmentMask` (Lq == Lk) or `pofx.kernels.CacheMask`.
    scale: the score scale (usually `1 / sqrt(hd)`).
    rope: optional `(cos, sin)`, each `[B, L, hd/2]`, applied to q and k first.
    implementation: None (choose, `choose_implementation`), "cudnn" or "xla".
    softcap: score soft-capping (Gemma 2), which `jax.nn.dot_product_attention` does not compute:
      with implementation None the call goes to `pofx.kernels.xla_attention`; an explicit
      implementation refuses it. A mask's sliding window is part of the dense mask either way.

  Returns:
    `[B, Lq, K, G, hd]` in q's dtype.
  """
  kernels_lib.check_attention_shapes(q, k, v)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"dot_product_attention: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if mask is None and implementation is None:  # every query sees every key: the core's XLA path
    kw = {} if softcap is None else {"softcap": softcap}
    return kernels_lib.xla_attention(q, k, v, None, scale=scale, rope=rope, **kw)
  q, k = kernels_lib.apply_rope(q, k, rope)
  B, Lq, K, G, hd = q.shape
  if isinstance(mask, kernels_lib.SegmentMask):
    if k.shape[1] != Lq or jnp.shape(mask.segment_ids) != (B, Lq):
      raise ValueError(
        f"dot_product_attention: a SegmentMask needs q, k and segment_ids of one length; got q "
        f"{q.shape}, k {k.shape}, segment_ids {jnp.shape(mask.segment_ids)}."
      )
    segment_ids, branch_ids = jnp.asarray(mask.segment_ids), mask.branch_ids
  elif isinstance(mask, kernels_lib.CacheMask):
    if jnp.shape(mask.kv_valid) != (B, k.shape[1]):
      raise ValueError(
        f"dot_product_attention: kv_valid must be [B, S] = {(B, k.shape[1])}, got {jnp.shape(mask.kv_valid)}."
      )
  elif mask is not None:
    raise TypeError(f"attention: mask must be a SegmentMask, a CacheMask or None, got {type(mask).__name__}.")
  if implementation is None:
    if softcap is None and choose_implementation(q, mask) == "cudnn":
      try:  # shapes cuDNN refuses while tracing (its checks raise) go to XLA; an explicit "cudnn" raises
        return dot_product_attention(q, k, v, mask, scale=scale, implementation="cudnn")
      except (NotImplementedError, ValueError, RuntimeError):
        pass
    # Where cuDNN does not apply, the core's own XLA attention: it honours a SegmentMask's block
    # list and was the faster XLA path on a GPU (docs/benchmarks.md).
    kw = {} if softcap is None else {"softcap": softcap}  # soft-capping: always this path
    return kernels_lib.xla_attention(q, k, v, mask, scale=scale, **kw)
  if softcap is not None:
    raise ValueError(
      f"dot_product_attention: implementation={implementation!r} cannot soft-cap the scores (softcap={softcap}); "
      "use implementation=None (XLA attention for those calls) or the 'xla' kernels."
    )

  if mask is None or isinstance(mask, kernels_lib.CacheMask):
    dense = None if mask is None else mask.dense(Lq)[:, None]
    out = jax.nn.dot_product_attention(
      q.reshape(B, Lq, K * G, hd), k, v, mask=dense, scale=scale, implementation=implementation
    )
    return out.reshape(B, Lq, K, G, hd).astype(q.dtype)

  # cuDNN's training path needs even lengths with a mask: one extra row of its own padding
  # segment (-1) sees only itself, and no real query sees it (it comes last).
  extra = Lq % 2 if implementation == "cudnn" else 0
  segment_ids = _pad_rows(segment_ids, extra, -1)
  if branch_ids is not None:
    branch_ids = _pad_rows(jnp.asarray(branch_ids), extra, 0)
  positions = None if mask.window is None else _pad_rows(jnp.asarray(mask.positions), extra, 0)
  dense = kernels_lib.attention_mask(segment_ids, branch_ids, positions, mask.window)[:, None]  # [B, 1, L, L]
  out = jax.nn.dot_product_attention(
    _pad_rows(q.reshape(B, Lq, K * G, hd), extra),
    _pad_rows(k, extra),
    _pad_rows(v, extra),
    mask=dense,
    scale=scale,
    is_causal=implementation == "cudnn",
    implementation=implementation,
  )
  return out[:, :Lq].reshape(B, Lq, K, G, hd).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class GpuAttention:
  """`dot_product_attention` with a fixed `implementation`, hashable by value (a `Kernels` field)."""

  implementation: Optional[str] = None

  def __call__(self, q, k, v, mask, *, scale, rope=None, softcap=None):
    return dot_product_attention(
      q, k, v, mask, scale=scale, rope=rope, implementation=self.implementation, softcap=softcap
    )


def kernels(implementation: Optional[str] = None) -> kernels_lib.Kernels:
  """The "gpu" kernels: this module's attention; XLA's dot_general and convolution.

  implementation: None (cuDNN where it applies, `pofx.kernels.xla_attention` elsewhere), "cudnn"
  (always; fails where cuDNN cannot take the inputs) or "xla" (`jax.nn.dot_product_attention`'s
  XLA implementation: runs anywhere, e.g. the CPU tests).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"gpu.kernels: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  return kernels_lib.Kernels(attention=GpuAttention(implementation), name="gpu")
