r"""Injection points of the model and the log-prob code: a matmul, an attention function, a convolution.

The core computes with XLA's own operations everywhere. A backend (the optional `pofx_backends`
package: CPU kernels, GPU cuDNN attention, TPU splash attention) replaces them by handing the
model and the log-prob code a different `Kernels` record; nothing else in the core changes, and
the core never imports a backend.

    kernels = pofx.kernels.XLA                                   # the default everywhere
    model = pofx.models.make(config, kernels=kernels)           # projections, attention
    logps_fn = pofx.policy.make_logps_fn(model.apply, model.head, kernels=kernels)   # the LM head

The three injection points, and the contract a backend's replacement keeps (same values up to
floating-point summation order, differentiable, jittable):

- `dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None)`:
  `jax.lax.dot_general`'s signature and meaning. The model calls it for every projection
  (`x [..., D] . w [D, F]`) and the LM head (`h [N, D] . w [D, V]`, and in the head's custom
  backward `G [N, V] . w^T` and `h^T . G`).
- `attention(q, k, v, mask, *, scale, rope=None)`: masked softmax attention.
  `q [B, Lq, K, G, hd]` (K key/value heads, G query heads per key/value head), `k, v [B, Lk, K,
  hd]`; returns `[B, Lq, K, G, hd]` in q's dtype (scores and softmax in float32). The result is
  `softmax(scale * rot(q) rot(k)^T + mask) v`, with `rot` the rotary embedding of `rope = (cos,
  sin)` (each `[B, L, hd/2]`, self-attention only) or the identity when `rope` is None. `mask`
  is one of the descriptions below (a pytree, so it travels through `jit`).
- `conv_general_dilated(lhs, rhs, window_strides, padding, ...)`: `jax.lax.conv_general_dilated`'s
  signature and meaning (for convolutional models such as diffusion U-Nets).

Mask descriptions:

- `SegmentMask(segment_ids, branch_ids=None, blocks=None)`: self-attention over the rows of a
  `pofx.batching` layout (fused, prompt-shared or packed). Query i sees key j iff

      segment_ids[i] == segment_ids[j]  and  j <= i  and  (branch_ids[j] == 0 or branch_ids[j] == branch_ids[i])

  `segment_ids` 0 marks padding (padding only sees padding: finite outputs that callers mask
  out). `blocks` (optional, host-built by `pofx.sparse_attention.attention_blocks`) lists the
  (query block, key block) pairs that hold an allowed entry: an implementation may compute only
  those; every real query's output is the same.
- `CacheMask(kv_valid, start)`: decoding with a key/value cache of S slots. The Lq queries occupy
  slots `start ... start + Lq - 1`; query i sees the slots j <= start + i with `kv_valid[:, j]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from pofx import sparse_attention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SegmentMask:
  """Causal self-attention within segments and compatible branches (see the module docstring).

  segment_ids: `[B, L]` int, 0 = padding.
  branch_ids: optional `[B, L]` int (prompt-shared layouts: 0 = prompt, visible to every branch).
  blocks: optional `pofx.sparse_attention.AttentionBlocks` of this batch (compute only those).
  """

  segment_ids: Any
  branch_ids: Any = None
  blocks: Optional[sparse_attention.AttentionBlocks] = None

  def dense(self) -> Array:
    """The boolean `[B, L, L]` mask (query, key)."""
    return attention_mask(self.segment_ids, self.branch_ids)


@dataclasses.dataclass(frozen=True)
class CacheMask:
  """Queries at cache slots `start + i` over S cached keys (see the module docstring).

  kv_valid: `[B, S]` bool, True where a slot holds a real token (written before or with this call).
  start: `[]` int32, the slot of the first query.
  """

  kv_valid: Any
  start: Any

  def dense(self, num_queries: int) -> Array:
    """The boolean `[B, Lq, S]` mask (query, slot)."""
    S = self.kv_valid.shape[1]
    slot = self.start + jnp.arange(num_queries)
    return self.kv_valid[:, None, :] & (jnp.arange(S)[None, None, :] <= slot[None, :, None])


jax.tree_util.register_dataclass(SegmentMask, data_fields=["segment_ids", "branch_ids", "blocks"], meta_fields=[])
jax.tree_util.register_dataclass(CacheMask, data_fields=["kv_valid", "start"], meta_fields=[])


def attention_mask(segment_ids, branch_ids=None) -> Array:
  """Boolean `[B, L, L]` mask (query i, key j): same segment, causal, compatible branch."""
  seg = jnp.asarray(segment_ids)
  L = seg.shape[-1]
  mask = seg[:, :, None] == seg[:, None, :]
  mask &= jnp.tril(jnp.ones((L, L), jnp.bool_))[None]
  if branch_ids is not None:
    br = jnp.asarray(branch_ids)
    mask &= (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
  return mask


def apply_rope(q: Array, k: Array, rope: Optional[Tuple[Array, Array]]) -> Tuple[Array, Array]:
  """`q [B, L, K, G, hd]`, `k [B, L, K, hd]` rotated by `rope = (cos, sin)` (`[B, L, hd/2]`)."""
  if rope is None:
    return q, k
  cos, sin = rope
  k = sparse_attention.rotary(k, cos[:, :, None, :], sin[:, :, None, :])
  q = sparse_attention.rotary(q, cos[:, :, None, None, :], sin[:, :, None, None, :])
  return q, k


def masked_softmax_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float) -> Array:
  """Dense attention with a boolean `mask [B, Lq, Lk]`: `q [B, Lq, K, G, hd]`, `k, v [B, Lk, K, hd]`.

  Scores and softmax in float32; masked scores are the float32 minimum (they contribute exactly 0
  where a query sees at least one key)."""
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).astype(q.dtype)


def xla_attention(
  q: Array,
  k: Array,
  v: Array,
  mask,
  *,
  scale: float,
  rope: Optional[Tuple[Array, Array]] = None,
  query_block: int = 128,
) -> Array:
  """The attention injection point computed with XLA operations (the default).

  `SegmentMask` with `blocks`: `pofx.sparse_attention.block_sparse_attention` (only the listed
  block pairs). `SegmentMask` without: dense masked attention; rows longer than `query_block`
  are attended in causal query blocks, each against the key prefix it can see (about half the
  scores of the full product, the same result; 0 disables it). `CacheMask`: dense over the slots.
  """
  if isinstance(mask, SegmentMask) and mask.blocks is not None:
    return sparse_attention.block_sparse_attention(
      q, k, v, mask.segment_ids, mask.branch_ids, mask.blocks, rope=rope, q_scale=scale
    )
  q, k = apply_rope(q, k, rope)
  if isinstance(mask, CacheMask):
    return masked_softmax_attention(q, k, v, mask.dense(q.shape[1]), scale=scale)
  if not isinstance(mask, SegmentMask):
    raise TypeError(f"attention: mask must be a SegmentMask or CacheMask, got {type(mask).__name__}.")
  dense = mask.dense()
  L = q.shape[1]
  if not query_block or L <= query_block:
    return masked_softmax_attention(q, k, v, dense, scale=scale)
  # Causal blocks: queries [s, e) only see keys [0, e); masked scores contribute exactly 0 either way.
  outs = [
    masked_softmax_attention(q[:, s:e], k[:, :e], v[:, :e], dense[:, s:e, :e], scale=scale)
    for s, e in ((s, min(s + query_block, L)) for s in range(0, L, query_block))
  ]
  return jnp.concatenate(outs, axis=1)


class Kernels(NamedTuple):
  """The injection points (see the module docstring); hashable, so it can be a static argument.

  name: what these kernels are, for logs and summaries ("xla", "cpu", "gpu", "tpu", ...).
  """

  dot_general: Callable[..., Array] = jax.lax.dot_general
  attention: Callable[..., Array] = xla_attention
  conv_general_dilated: Callable[..., Array] = jax.lax.conv_general_dilated
  name: str = "xla"

  def dense(self, x: Array, w: Array, dtype=None) -> Array:
    """`x [..., D] . w [D, F]` through `dot_general`, both operands in `dtype` (default x's)."""
    dtype = dtype or x.dtype
    return self.dot_general(x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))


XLA = Kernels()


def check_attention_shapes(q, k, v) -> None:
  """ValueError unless `q [B, Lq, K, G, hd]`, `k, v [B, Lk, K, hd]` agree."""
  if (
    q.ndim != 5
    or k.ndim != 4
    or v.shape != k.shape
    or q.shape[0] != k.shape[0]
    or q.shape[2] != k.shape[2]
    or q.shape[4] != k.shape[3]
  ):
    raise ValueError(
      f"attention: q must be [B, Lq, K, G, hd] and k, v [B, Lk, K, hd]; got {q.shape}, {k.shape}, {v.shape}."
    )


def default_scale(head_dim: int) -> float:
  """`1 / sqrt(head_dim)`, the usual query scale."""
  return 1.0 / math.sqrt(head_dim)
