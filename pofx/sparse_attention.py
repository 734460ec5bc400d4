r"""Block-sparse attention over the blocks a batch's mask actually uses, with a hand-written VJP.

The rows of a preference batch are mostly masked: in a prompt-shared row `[prompt | chosen |
rejected | padding]` the chosen and rejected tokens never see each other, nothing sees the
padding, and the mask is causal; in a packed row several such pairs sit side by side. Dense
attention still computes every `L x L` score. Here the row is cut into blocks of `block_size`
tokens and only the (query block, key block) pairs holding at least one allowed (query, key)
entry are computed:

    mask[i, j] = segment_ids[i] == segment_ids[j] > 0  and  j <= i  and
                 (branch_ids[j] == 0  or  branch_ids[j] == branch_ids[i])

(`pofx.models.llama.attention_mask`, restricted to real query tokens). The list of block pairs
is data-dependent, so it is computed host-side with numpy when the batch is built
(`attention_blocks`), padded to a multiple of `bucket` entries so a run compiles few shapes, and
passed to the model with the batch.

Forward, for the T listed pairs t = (query block q_t, key block k_t) (all heads at once):

    s_t = Q_{q_t} K_{k_t}^T + bias_t                 (bias 0 where allowed, -1e30 elsewhere)
    M_q = max over the pairs t with q_t = q of rowmax(s_t)      (segment max)
    l_q = sum_t rowsum(exp(s_t - M_q)),  O_q = sum_t exp(s_t - M_q) V_{k_t} / l_q

which is the softmax over all allowed keys of each query (entries outside the listed pairs are
masked anyway). Backward (the FlashAttention identities, Dao et al. 2022, arXiv:2205.14135,
Appendix B.2), with P_t = exp(s_t - M_q) / l_q recomputed from the stored row maxima M and
normalisers 1 / l (no `[T, b, b]` probabilities are kept between the passes) and D = rowsum(dO * O):

    dS_t = P_t * (dO_{q_t} V_{k_t}^T - D_{q_t})
    dQ_q = sum_{t: q_t = q} dS_t K_{k_t},  dK_k = sum_{t: k_t = k} dS_t^T Q_{q_t},
    dV_k = sum_{t: k_t = k} P_t^T dO_{q_t}

The result equals dense masked attention for every query token that can see at least one key
(every real token sees itself); queries of pure-padding blocks get output 0 and padding
queries inside a listed block finite values (padding outputs are never used).

This module computes it with XLA operations (gathers, batched tile dots and segment
reductions); it is what `pofx.kernels.xla_attention` runs for a `SegmentMask` with `blocks`. A
backend's attention (`pofx.kernels.Kernels.attention`) may compute the same blocks its own way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
  """The (query block, key block) pairs of a batch to compute, host-built (`attention_blocks`).

  query_block, key_block: `[T]` int32 flat block indices `row * (L // block_size) + block`,
    sorted by query block; padding entries (to a multiple of the bucket) hold `R * (L //
    block_size)`, one past the last block, and contribute nothing.
  block_size: tokens per block (static).
  """

  query_block: np.ndarray
  key_block: np.ndarray
  block_size: int = 64

  @property
  def num_pairs(self) -> int:
    return int(np.shape(self.query_block)[-1])


jax.tree_util.register_dataclass(AttentionBlocks, data_fields=["query_block", "key_block"], meta_fields=["block_size"])


def _used_block_pairs(seg: np.ndarray, br: np.ndarray, b: int) -> np.ndarray:
  """Boolean `[R, nb, nb]`: (query block i, key block j) holds an allowed entry for a real query.

  Without building the `[R, L, L]` mask: for j < i every key precedes every query, so the pair
  is used iff some real query of block i and some key of block j share a segment with a
  compatible branch (key branch 0 or the query's): a boolean product of per-block presence
  tables over (segment, branch). Diagonal blocks (j == i) check the causal order exactly on
  their `[b, b]` sub-masks.
  """
  R, L = seg.shape
  nb = L // b
  _, seg_ix = np.unique(seg, return_inverse=True)
  branches, br_ix = np.unique(np.concatenate([[0], br.ravel()]), return_inverse=True)
  br_ix = br_ix[1:].reshape(R, L)
  seg_ix = seg_ix.reshape(R, L)
  S, NB = int(seg_ix.max()) + 1, len(branches)
  block = np.broadcast_to(np.arange(L) // b, (R, L))
  rows = np.broadcast_to(np.arange(R)[:, None], (R, L))
  keys = np.zeros((R, nb, S, NB), bool)
  keys[rows, block, seg_ix, br_ix] = True
  real = seg > 0
  queries = np.zeros((R, nb, S, NB), bool)
  queries[rows[real], block[real], seg_ix[real], br_ix[real]] = True
  zero = int(np.searchsorted(branches, 0))
  visible = keys | keys[..., zero : zero + 1]  # a query of branch k sees key branches k and 0
  used = np.einsum("risk,rjsk->rij", queries.astype(np.int32), visible.astype(np.int32)) > 0
  used &= np.tril(np.ones((nb, nb), bool), k=-1)[None]
  sb, bb = seg.reshape(R, nb, b), br.reshape(R, nb, b)  # diagonal blocks: the exact causal check
  diag = (
    (sb[..., :, None] == sb[..., None, :])
    & (sb[..., :, None] > 0)
    & np.tril(np.ones((b, b), bool))
    & ((bb[..., None, :] == 0) | (bb[..., None, :] == bb[..., :, None]))
  ).any(axis=(2, 3))
  used[:, np.arange(nb), np.arange(nb)] = diag
  return used


def attention_blocks(
  segment_ids,
  branch_ids=None,
  *,
  block_size: int = 64,
  bucket: Union[int, Callable[[int], int]] = 8,
  size: Optional[int] = None,
) -> AttentionBlocks:
  """The block pairs holding at least one allowed entry for a real (segment > 0) query token.

  Args:
    segment_ids: `[R, L]` int (numpy), 0 = padding; L must be a multiple of `block_size`.
    branch_ids: optional `[R, L]` int (the prompt-shared layouts' branches).
    block_size: tokens per block.
    bucket: the pair count is padded up to a multiple of this (fewer compiled shapes), or a
      function from the count to the padded count (e.g. `pofx.batching.bucket_length`).
    size: pad to exactly this many pairs instead (ValueError if the batch needs more).
  """
  seg = np.asarray(segment_ids)
  if seg.ndim != 2:
    raise ValueError(f"attention_blocks: segment_ids must be [R, L], got shape {seg.shape}.")
  if block_size < 1 or (not callable(bucket) and bucket < 1):
    raise ValueError(f"attention_blocks: block_size and bucket must be >= 1, got {block_size}, {bucket}.")
  R, L = seg.shape
  if L % block_size:
    raise ValueError(
      f"attention_blocks: the row length {L} must be a multiple of block_size {block_size} "
      f"(bucket the rows with seq_bucket / row_length a multiple of it)."
    )
  nb = L // block_size
  br = np.zeros_like(seg) if branch_ids is None else np.asarray(branch_ids)
  rows, qb, kb = np.nonzero(_used_block_pairs(seg, br, block_size))  # sorted by (row, query block, key block)
  n = len(rows)
  padded = int(bucket(max(n, 1))) if callable(bucket) else -(-max(n, 1) // bucket) * bucket
  if size is not None:
    if size < n:
      raise ValueError(f"attention_blocks: the batch needs {n} block pairs; size={size}.")
    padded = int(size)
  query = np.full(padded, R * nb, np.int32)
  key = np.full(padded, R * nb, np.int32)
  query[:n] = rows * nb + qb
  key[:n] = rows * nb + kb
  return AttentionBlocks(query, key, int(block_size))


def _to_blocks(x, nb, b):
  """`[R, L, ...]` -> `[R * nb + 1, b, ...]`: the blocks plus one zero block (padding entries)."""
  xb = x.reshape((x.shape[0] * nb, b) + x.shape[2:])
  return jnp.concatenate([xb, jnp.zeros((1,) + xb.shape[1:], xb.dtype)], axis=0)


def _bias(segment_ids, branch_ids, query, key, nb, b, positions=None, window=None):
  """`[T, b, b]` float32 additive mask of each listed block pair (0 allowed, -1e30 masked); with a
  `window`, also `positions[i] - positions[j] < window` (sliding-window attention)."""
  seg = _to_blocks(segment_ids, nb, b)
  sq, sk = seg[query], seg[key]
  col_q = (query % nb)[:, None] * b + jnp.arange(b)[None]
  col_k = (key % nb)[:, None] * b + jnp.arange(b)[None]
  allowed = (sq[:, :, None] == sk[:, None, :]) & (col_q[:, :, None] >= col_k[:, None, :])
  if branch_ids is not None:
    br = _to_blocks(branch_ids, nb, b)
    bq, bk = br[query], br[key]
    allowed &= (bk[:, None, :] == 0) | (bk[:, None, :] == bq[:, :, None])
  if window is not None:
    pos = _to_blocks(positions, nb, b)
    allowed &= (pos[query][:, :, None] - pos[key][:, None, :]) < window
  return jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)


def _head_blocks(q, k, v, nb, b):
  """q `[R, L, K, G, hd]` -> `[nQ+1, K, G, b, hd]`; k, v `[R, L, K, hd]` -> `[nQ+1, K, b, hd]`."""
  qb = _to_blocks(q, nb, b).transpose(0, 2, 3, 1, 4)
  kb = _to_blocks(k, nb, b).transpose(0, 2, 1, 3)
  vb = _to_blocks(v, nb, b).transpose(0, 2, 1, 3)
  return qb, kb, vb


def _segment_sum(x, ids, n, sorted_ids=False):
  return jax.ops.segment_sum(x, ids, num_segments=n, indices_are_sorted=sorted_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, bias, query, key, block_size, softcap=None):
  return _attention_fwd(q, k, v, bias, query, key, block_size, softcap)[0]


def _gathered_scores(q, k, v, bias, query, key, b, softcap=None):
  """The listed blocks `(qt [T, K, G, b, hd], kt, vt [T, K, b, hd])` and their masked scores
  `s_t = cap(Q K^T) + bias` (float32 `[T, K, G, b, b]`, `cap(x) = softcap * tanh(x / softcap)` or
  the identity); also `tanh(Q K^T / softcap)` (None without soft-capping) and the number of
  blocks + 1 (`n`)."""
  R, L = q.shape[:2]
  nb = L // b
  qb, kb, vb = _head_blocks(q, k, v, nb, b)
  qt, kt, vt = qb[query], kb[key], vb[key]
  s = jnp.einsum("tkgqd,tksd->tkgqs", qt, kt, preferred_element_type=jnp.float32)
  tanh = None
  if softcap is not None:
    tanh = jnp.tanh(s / softcap)
    s = softcap * tanh
  return qt, kt, vt, s + bias[:, None, None], tanh, R * nb + 1


def _attention_fwd(q, k, v, bias, query, key, block_size, softcap=None):
  R, L, K, G, hd = q.shape
  qt, kt, vt, s, _, n = _gathered_scores(q, k, v, bias, query, key, block_size, softcap)
  m = jax.ops.segment_max(jnp.max(s, axis=-1), query, num_segments=n, indices_are_sorted=True)
  e = jnp.exp(s - m[query][..., None])
  denom = _segment_sum(jnp.sum(e, axis=-1), query, n, True)
  inv = 1.0 / jnp.maximum(denom, 1e-30)
  p = e * inv[query][..., None]
  ob = _segment_sum(
    jnp.einsum("tkgqs,tksd->tkgqd", p.astype(v.dtype), vt, preferred_element_type=jnp.float32), query, n, True
  )
  out = ob[: n - 1].transpose(0, 3, 1, 2, 4).reshape(R, L, K, G, hd).astype(q.dtype)
  return out, (q, k, v, bias, m, inv, ob, query, key)


def _attention_bwd(block_size, softcap, res, d_out):
  q, k, v, bias, m, inv, ob, query, key = res
  R, L, K, G, hd = q.shape
  b = block_size
  nb = L // b
  # P recomputed from the stored row maxima and normalisers (FlashAttention's backward).
  qt, kt, vt, s, tanh, n = _gathered_scores(q, k, v, bias, query, key, b, softcap)
  p = jnp.exp(s - m[query][..., None]) * inv[query][..., None]
  dob = _to_blocks(d_out.astype(jnp.float32), nb, b).transpose(0, 2, 3, 1, 4)  # [n, K, G, b, hd]
  rowdot = jnp.sum(dob * ob, axis=-1)  # D = rowsum(dO * O)
  dot_ = dob[query]
  dp = jnp.einsum("tkgqd,tksd->tkgqs", dot_, vt.astype(jnp.float32))
  ds = p * (dp - rowdot[query][..., None])
  if tanh is not None:  # d cap(x) / dx = 1 - tanh(x / softcap)^2
    ds = ds * (1.0 - jnp.square(tanh))
  dq = _segment_sum(jnp.einsum("tkgqs,tksd->tkgqd", ds, kt.astype(jnp.float32)), query, n, True)
  # dK^T and dV^T ([.., hd, b]): contracting the query axes of both operands in place avoids
  # materialising transposed [b, G*b] copies of P and dS.
  dk = _segment_sum(jnp.einsum("tkgqd,tkgqs->tkds", qt.astype(jnp.float32), ds), key, n).swapaxes(-1, -2)
  dv = _segment_sum(jnp.einsum("tkgqd,tkgqs->tkds", dot_, p), key, n).swapaxes(-1, -2)
  dq = dq[: n - 1].transpose(0, 3, 1, 2, 4).reshape(R, L, K, G, hd).astype(q.dtype)
  dk = dk[: n - 1].transpose(0, 2, 1, 3).reshape(R, L, K, hd).astype(k.dtype)
  dv = dv[: n - 1].transpose(0, 2, 1, 3).reshape(R, L, K, hd).astype(v.dtype)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def rotary(x: Array, cos: Array, sin: Array) -> Array:
  """The rotary position embedding of `x [..., hd]` in the half-split layout of Llama:
  `[x1 cos - x2 sin, x2 cos + x1 sin]` with `x1, x2` the halves of the last axis and `cos, sin`
  broadcastable to `x[..., :hd/2]` (Su et al. 2021, arXiv:2104.09864, the efficient form of the
  rotary matrix product); computed in float32, returned in x's dtype."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def block_sparse_attention(
  q: Array,
  k: Array,
  v: Array,
  segment_ids: Array,
  branch_ids: Optional[Array],
  blocks: AttentionBlocks,
  *,
  rope: Optional[Tuple[Array, Array]] = None,
  q_scale: float = 1.0,
  positions: Optional[Array] = None,
  window: Optional[int] = None,
  softcap: Optional[float] = None,
) -> Array:
  """Masked softmax attention computed only on `blocks` (see the module docstring).

  Args:
    q: `[R, L, K, G, hd]` queries (K key/value heads, G query heads per key/value head).
    k, v: `[R, L, K, hd]` keys and values.
    segment_ids, branch_ids: `[R, L]` as for `pofx.models.llama.attention_mask` (branch_ids may
      be None).
    blocks: from `attention_blocks(segment_ids, branch_ids, ...)` on the same batch.
    rope: None (q and k are used as given), or `(cos, sin)`, each `[R, L, hd/2]`: the attention
      is that of `q_scale * rotary(q)` and `rotary(k)` (rotated here first; a backend's kernel
      may apply both as it loads q and k).
    q_scale: factor on the queries (usually `1/sqrt(hd)`).
    positions, window: sliding-window attention (`pofx.kernels.SegmentMask`): with `window`, a
      query also needs `positions[i] - positions[j] < window` (`positions` `[R, L]` int). The
      block list stays the one of `attention_blocks` (a superset: masked entries contribute 0).
    softcap: scores `s = softcap * tanh(q_scale q . k / softcap)` before the mask (Gemma 2
      soft-capping; the backward multiplies by `1 - tanh^2`), or None.

  Returns:
    `[R, L, K, G, hd]` in q's dtype (scores, softmax and accumulation in float32).
  """
  if rope is not None and (rope[0].shape != q.shape[:2] + (q.shape[-1] // 2,) or rope[1].shape != rope[0].shape):
    raise ValueError(
      f"block_sparse_attention: rope tables must be [R, L, hd/2] = {q.shape[:2] + (q.shape[-1] // 2,)}, "
      f"got {rope[0].shape} and {rope[1].shape}."
    )
  if rope is not None:
    cos, sin = rope
    k = rotary(k, cos[:, :, None, :], sin[:, :, None, :])
    q = rotary(q, cos[:, :, None, None, :], sin[:, :, None, None, :])
  if rope is not None or q_scale != 1.0:
    q = (q * q_scale).astype(q.dtype)
  R, L = segment_ids.shape
  b = blocks.block_size
  if L % b:
    raise ValueError(f"block_sparse_attention: row length {L} is not a multiple of block_size {b}.")
  if q.shape[:2] != (R, L) or k.shape[:2] != (R, L) or v.shape != k.shape:
    raise ValueError(
      f"block_sparse_attention: q {q.shape}, k {k.shape}, v {v.shape} do not match segment_ids {segment_ids.shape}."
    )
  query = jnp.asarray(blocks.query_block, jnp.int32)
  key = jnp.asarray(blocks.key_block, jnp.int32)
  if window is not None and positions is None:
    raise ValueError("block_sparse_attention: a sliding window needs the [R, L] positions.")
  bias = _bias(
    jnp.asarray(segment_ids),
    None if branch_ids is None else jnp.asarray(branch_ids),
    query,
    key,
    L // b,
    b,
    None if positions is None else jnp.asarray(positions),
    window,
  )
  return _attention(q, k, v, bias, query, key, b, None if softcap is None else float(softcap))
