r"""Injection points of the model and the log-prob code: a matmul, an attention function, a
convolution, a normalisation.

The core computes with XLA's own operations everywhere. A backend (the optional `pofx_backends`
package: CPU kernels, GPU cuDNN attention, TPU splash attention) replaces them by handing the
model and the log-prob code a different `Kernels` record; nothing else in the core changes, and
the core never imports a backend.

    kernels = pofx.kernels.XLA                                   # the default everywhere
    model = pofx.models.make(config, kernels=kernels)           # projections, attention
    logps_fn = pofx.policy.make_logps_fn(model.apply, model.head, kernels=kernels)   # the LM head

The four injection points, and the contract a backend's replacement keeps (same values up to
floating-point summation order, differentiable, jittable):

- `dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None)`:
  `jax.lax.dot_general`'s signature and meaning. The model calls it for every projection
  (`x [..., D] . w [D, F]`) and the LM head (`h [N, D] . w [D, V]`, and in the head's custom
  backward `G [N, V] . w^T` and `h^T . G`).
- `attention(q, k, v, mask, *, scale, rope=None[, softcap])`: masked softmax attention.
  `q [B, Lq, K, G, hd]` (K key/value heads, G query heads per key/value head), `k, v [B, Lk, K,
  hd]`; returns `[B, Lq, K, G, hd]` in q's dtype (scores and softmax in float32). The result is
  `softmax(cap(scale * rot(q) rot(k)^T) + mask) v`, with `rot` the rotary embedding of `rope =
  (cos, sin)` (each `[B, L, hd/2]`, self-attention only) or the identity when `rope` is None, and
  `cap(s) = softcap * tanh(s / softcap)` (Gemma 2's attention logit soft-capping) or the identity.
  The model passes `softcap=` only when its config sets one, so an attention function written for
  Llama-family models need not accept it. `mask` is one of the descriptions below (a pytree, so it
  travels through `jit`), or None: every query sees every key (bidirectional attention over short
  rows, e.g. a diffusion U-Net's self- and cross-attention; `full_attention`). A replacement must
  honour a mask's `window` (sliding-window attention) or hand the call to `xla_attention`.
- `conv_general_dilated(lhs, rhs, window_strides, padding, ...)`: `jax.lax.conv_general_dilated`'s
  signature and meaning (for convolutional models such as diffusion U-Nets).
- `group_norm(x, scale, bias, *, groups, eps, silu=False)`: GroupNorm of float32 channels-last
  `x [B, ..., C]` with float32 statistics (biased variance), followed by SiLU when `silu` (so that
  a backend may fuse the two), float32 result: `pofx.group_norm.group_norm`'s meaning (the
  diffusion U-Nets' normalisation).

Mask descriptions:

- `SegmentMask(segment_ids, branch_ids=None, blocks=None, positions=None, window=None)`:
  self-attention over the rows of a `pofx.batching` layout (fused, prompt-shared or packed).
  Query i sees key j iff

      segment_ids[i] == segment_ids[j]  and  j <= i  and  (branch_ids[j] == 0 or branch_ids[j] == branch_ids[i])
      [and  positions[i] - positions[j] < window]

  `segment_ids` 0 marks padding (padding only sees padding: finite outputs that callers mask
  out). `blocks` (optional, host-built by `pofx.sparse_attention.attention_blocks`) lists the
  (query block, key block) pairs that hold an allowed entry: an implementation may compute only
  those; every real query's output is the same. `window` (a static int, with the `[B, L]`
  `positions`) is sliding-window attention (Mistral, arXiv:2310.06825, section 2; Gemma 2's local
  layers): a query sees the `window` most recent positions, itself included. The distance is
  measured in positions, not columns, so that a prompt-shared or packed row gives every
  completion the same keys as its fused row (where columns and positions coincide, this is
  Hugging Face's `kv_idx > q_idx - sliding_window`).
- `CacheMask(kv_valid, start, window=None)`: decoding with a key/value cache of S slots. The Lq
  queries occupy slots `start ... start + Lq - 1`; query i sees the slots j <= start + i with
  `kv_valid[:, j]` (and `start + i - j < window` when a window is set: slots, which equal
  positions for left-padded rows whose real tokens fill consecutive slots, as
  `pofx.sampling` writes them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from pofx import group_norm as group_norm_lib
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
  positions: Any = None
  window: Optional[int] = None

  def __post_init__(self):
    _check_window(self.window)
    if self.window is not None and self.positions is None:
      raise ValueError("SegmentMask: a sliding window needs the [B, L] positions (positions=...).")

  def dense(self) -> Array:
    """The boolean `[B, L, L]` mask (query, key)."""
    return attention_mask(self.segment_ids, self.branch_ids, self.positions, self.window)


@dataclasses.dataclass(frozen=True)
class CacheMask:
  """Queries at cache slots `start + i` over S cached keys (see the module docstring).

  kv_valid: `[B, S]` bool, True where a slot holds a real token (written before or with this call).
  start: `[]` int32, the slot of the first query.
  """

  kv_valid: Any
  start: Any
  window: Optional[int] = None

  def __post_init__(self):
    _check_window(self.window)

  def dense(self, num_queries: int) -> Array:
    """The boolean `[B, Lq, S]` mask (query, slot)."""
    S = self.kv_valid.shape[1]
    slot = self.start + jnp.arange(num_queries)
    key = jnp.arange(S)[None, None, :]
    mask = self.kv_valid[:, None, :] & (key <= slot[None, :, None])
    if self.window is not None:
      mask &= key > slot[None, :, None] - self.window
    return mask


def _check_window(window) -> None:
  if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
    raise ValueError(f"attention mask: window must be None or an integer >= 1, got {window!r}.")


jax.tree_util.register_dataclass(
  SegmentMask, data_fields=["segment_ids", "branch_ids", "blocks", "positions"], meta_fields=["window"]
)
jax.tree_util.register_dataclass(CacheMask, data_fields=["kv_valid", "start"], meta_fields=["window"])


def attention_mask(segment_ids, branch_ids=None, positions=None, window: Optional[int] = None) -> Array:
  """Boolean `[B, L, L]` mask (query i, key j): same segment, causal, compatible branch, and with
  a `window`, `positions[i] - positions[j] < window`."""
  seg = jnp.asarray(segment_ids)
  L = seg.shape[-1]
  mask = seg[:, :, None] == seg[:, None, :]
  mask &= jnp.tril(jnp.ones((L, L), jnp.bool_))[None]
  if branch_ids is not None:
    br = jnp.asarray(branch_ids)
    mask &= (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
  if window is not None:
    pos = jnp.asarray(positions)
    mask &= (pos[:, :, None] - pos[:, None, :]) < window
  return mask


def softcap_scores(scores: Array, softcap: Optional[float]) -> Array:
  """`softcap * tanh(scores / softcap)` (logit soft-capping, Gemma 2, arXiv:2408.00118, section
  2), or `scores` when `softcap` is None."""
  if softcap is None:
    return scores
  return softcap * jnp.tanh(scores / softcap)


def apply_rope(q: Array, k: Array, rope: Optional[Tuple[Array, Array]]) -> Tuple[Array, Array]:
  """`q [B, L, K, G, hd]`, `k [B, L, K, hd]` rotated by `rope = (cos, sin)` (`[B, L, hd/2]`)."""
  if rope is None:
    return q, k
  cos, sin = rope
  k = sparse_attention.rotary(k, cos[:, :, None, :], sin[:, :, None, :])
  q = sparse_attention.rotary(q, cos[:, :, None, None, :], sin[:, :, None, None, :])
  return q, k


def masked_softmax_attention(
  q: Array, k: Array, v: Array, mask: Array, *, scale: float, softcap: Optional[float] = None
) -> Array:
  """Dense attention with a boolean `mask [B, Lq, Lk]`: `q [B, Lq, K, G, hd]`, `k, v [B, Lk, K, hd]`.

  Scores (soft-capped when `softcap` is given) and softmax in float32; masked scores are the
  float32 minimum (they contribute exactly 0 where a query sees at least one key)."""
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  scores = softcap_scores(scores, softcap)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).astype(q.dtype)


def cache_attention(
  q: Array, k: Array, v: Array, mask: Optional[Array], *, scale: float, softcap: Optional[float] = None
) -> Array:
  """`masked_softmax_attention` for decoding (a few queries over a key/value cache), written as
  two batched products over (batch, key/value head) with the slots contracted in place:
  `q [B, Lq, K, G, hd]`, `k, v [B, S, K, hd]`, `mask [B, Lq, S]` (None: every slot is seen).

  The products are `q [Lq G, hd] . k [hd, S]` and `p [Lq G, S] . v [S, hd]` per (row, head), so
  the keys enter as `[B, K, hd, S]` and the values as `[B, K, S, hd]`: a cache stored in those
  layouts (as `pofx.models.llama.KVCache` is) and handed over as `[B, S, K, hd]` transposes
  reaches the products without a copy (the two transposes cancel), and neither operand of either
  product is transposed (which XLA:CPU's small batched products are slow at)."""
  B, Lq, K, G, hd = q.shape
  kt = jnp.transpose(k, (0, 2, 3, 1))  # [B, K, hd, S]
  vh = jnp.swapaxes(v, 1, 2)  # [B, K, S, hd]
  qh = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(B, K, Lq * G, hd)  # rows (query, group)
  scores = jax.lax.dot_general(qh, kt, (((3,), (2,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)
  scores = softcap_scores(scores * scale, softcap).reshape(B, K, Lq, G, -1)
  if mask is not None:
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, K, Lq * G, -1)
  out = jax.lax.dot_general(probs, vh, (((3,), (2,)), ((0, 1), (0, 1))))  # [B, K, Lq G, hd]
  return jnp.transpose(out.reshape(B, K, Lq, G, hd), (0, 2, 1, 3, 4)).astype(q.dtype)


def full_attention(q: Array, k: Array, v: Array, *, scale: float, softcap: Optional[float] = None) -> Array:
  """`softmax(cap(scale q k^T)) v` with every query seeing every key (the attention injection
  point's `mask=None`): `q [B, Lq, K, G, hd]`, `k, v [B, Lk, K, hd]` -> `[B, Lq, K, G, hd]` in q's
  dtype, scores and softmax float32. One head (K = G = 1) is two batched products over the batch
  with no head axis to move; several heads are `cache_attention`'s products without a mask."""
  B, Lq, K, G, hd = q.shape
  if K != 1 or G != 1:
    return cache_attention(q, k, v, None, scale=scale, softcap=softcap)
  q1, k1, v1 = q.reshape(B, Lq, hd), k.reshape(B, -1, hd), v.reshape(B, -1, hd)
  scores = jax.lax.dot_general(q1, k1, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(softcap_scores(scores * scale, softcap), axis=-1).astype(v.dtype)  # [B, Lq, Lk]
  out = jax.lax.dot_general(probs, v1, (((2,), (1,)), ((0,), (0,))))  # [B, Lq, hd]
  return out.reshape(B, Lq, 1, 1, hd).astype(q.dtype)


def xla_attention(
  q: Array,
  k: Array,
  v: Array,
  mask,
  *,
  scale: float,
  rope: Optional[Tuple[Array, Array]] = None,
  softcap: Optional[float] = None,
  query_block: int = 128,
) -> Array:
  """The attention injection point computed with XLA operations (the default).

  `SegmentMask` with `blocks`: `pofx.sparse_attention.block_sparse_attention` (only the listed
  block pairs). `SegmentMask` without: dense masked attention; rows longer than `query_block`
  are attended in causal query blocks, each against the key prefix it can see (about half the
  scores of the full product, the same result; 0 disables it). `CacheMask`: dense over the slots.
  Every path honours the mask's sliding window and the score soft-capping `softcap`. `mask=None`:
  `full_attention` (rotary embeddings applied first).
  """
  if mask is None:
    q, k = apply_rope(q, k, rope)
    return full_attention(q, k, v, scale=scale, softcap=softcap)
  if isinstance(mask, SegmentMask) and mask.blocks is not None:
    return sparse_attention.block_sparse_attention(
      q,
      k,
      v,
      mask.segment_ids,
      mask.branch_ids,
      mask.blocks,
      rope=rope,
      q_scale=scale,
      positions=mask.positions,
      window=mask.window,
      softcap=softcap,
    )
  q, k = apply_rope(q, k, rope)
  if isinstance(mask, CacheMask):
    return cache_attention(q, k, v, mask.dense(q.shape[1]), scale=scale, softcap=softcap)
  if not isinstance(mask, SegmentMask):
    raise TypeError(f"attention: mask must be a SegmentMask, a CacheMask or None, got {type(mask).__name__}.")
  dense = mask.dense()
  L = q.shape[1]
  if not query_block or L <= query_block:
    return masked_softmax_attention(q, k, v, dense, scale=scale, softcap=softcap)
  # Causal blocks: queries [s, e) only see keys [0, e); masked scores contribute exactly 0 either way.
  outs = [
    masked_softmax_attention(q[:, s:e], k[:, :e], v[:, :e], dense[:, s:e, :e], scale=scale, softcap=softcap)
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
  group_norm: Callable[..., Array] = group_norm_lib.group_norm

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
