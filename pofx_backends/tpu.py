r"""TPU attention behind `pofx.kernels`' attention injection point: Pallas splash attention.

The attention of the contract (`pofx.kernels`, module docstring),

    out = softmax(scale * rot(q) rot(k)^T + mask) v,    q [B, L, K, G, hd],  k, v [B, L, K, hd],

is computed by JAX's Pallas splash attention kernel (`jax.experimental.pallas.ops.tpu.
splash_attention`: block-sparse flash attention, Dao et al. 2022, arXiv:2205.14135, that skips
the tiles its mask leaves empty, with its own forward and backward kernels). One kernel call
handles one row of the batch (`[heads, L, hd]`), so the rows are mapped with `jax.vmap`. The
rotary tables are applied first (`pofx.kernels.apply_rope`) and the scale is folded into the
queries (splash has no scale argument). The K x G query heads are splash's heads in the order
h = k * G + g, which is splash's grouped-query order (query head h reads key/value head h // G).

The mask of `pofx.kernels.SegmentMask`,

    query i sees key j  iff  seg[i] == seg[j]  and  j <= i  and  (br[j] == 0 or br[j] == br[i]),

is given to splash exactly:

- without branch ids (fused and packed layouts): splash's static causal mask and its
  `SegmentIds(q=seg, kv=seg)` (the same segment): exactly the first two conditions.
- with branch ids (prompt-shared layouts): the branch condition is not an equality of per-token
  ids (a prompt key must match every branch), so it is not expressible with `SegmentIds`.
  Splash also takes a dense boolean mask as a traced array (its "dynamic" mask): each row's full
  `[L, L]` mask (`pofx.kernels.attention_mask`) is passed so, per row inside the vmap. Splash
  still skips the tiles that mask leaves empty (the chosen-rejected tiles, the upper triangle),
  and its backward is its own; the cost is the mask held in memory, about 3 L^2 bytes per row
  (the forward's, dq's and dkv's tilings of it).

Splash needs lengths that are multiples of its block size (a multiple of 128): the rows are
padded inside, the padding a segment of its own (-1) that comes after every real token, so no
real query sees it, and the result sliced back. `SegmentMask.blocks` is ignored (splash finds the
empty tiles itself). A `CacheMask` (decoding: a few queries over the cache) is computed by
`pofx.kernels.xla_attention`: padding one query to a 128-row splash block would only add work.
So are a sliding-window mask (`SegmentMask.window`) and score soft-capping (`softcap`, Gemma 2),
which this module does not give to splash.

Inputs keep their dtype (bfloat16 on TPU as a rule); splash accumulates scores and the softmax
in float32. `interpret=True` runs the same kernels in the Pallas interpreter, which works on CPU
(the tests) but is slow.

    kernels = pofx_backends.tpu.kernels()                  # on a TPU
    kernels = pofx_backends.tpu.kernels(interpret=True)    # the same kernels, interpreted (CPU)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from pofx import kernels as kernels_lib

try:  # an optional part of jax: absent builds make the backend unavailable, not the import fail
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  _SPLASH_IMPORT_ERROR = None
except ImportError as error:  # pragma: no cover - depends on the jax build
  splash = None
  _SPLASH_IMPORT_ERROR = f"{type(error).__name__}: {error}"

Array = jax.Array

LANES = 128  # splash's key blocks are multiples of the TPU's 128 lanes
DEFAULT_BLOCK_SIZE = 512
_PAD_SEGMENT = -1


def unavailable_reason() -> Optional[str]:
  """None when JAX runs on a TPU and splash attention imports; otherwise one line saying why not."""
  if splash is None:
    return f"jax {jax.__version__} cannot import Pallas splash attention ({_SPLASH_IMPORT_ERROR})"
  backend = jax.default_backend()
  if backend != "tpu":
    return f"the JAX backend is {backend!r}, not a TPU (run on a Cloud TPU VM with pip install 'jax[tpu]')"
  return None


def block_size_for(length: int, block_size: int = DEFAULT_BLOCK_SIZE) -> Tuple[int, int]:
  """`(padded_length, block)`: the length rounded up to a multiple of 128, and the largest multiple of
  128 up to `block_size` that divides it."""
  if block_size < LANES or block_size % LANES:
    raise ValueError(f"splash attention: block_size must be a positive multiple of {LANES}, got {block_size}.")
  padded = -(-length // LANES) * LANES
  block = min(block_size, padded)
  while padded % block:
    block -= LANES
  return padded, block


def _block_sizes(block: int) -> splash.BlockSizes:
  return splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )


@functools.lru_cache(maxsize=16)
def _causal_kernel(length: int, block: int, interpret: bool):
  """Splash's kernel for causal attention over `length` tokens (one head of mask, shared by all heads).

  Built with concrete arrays even when first asked for inside a `jit` trace (it is cached and
  reused by later traces, which must not see the first one's tracers)."""
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))])
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(
      mask, block_sizes=_block_sizes(block), head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _dynamic_kernel(kernel):
  """`kernel` with its mask infos' `is_dynamic_mask` flag a Python True again.

  `make_splash_mha` passes every field of its mask infos through `jnp.array`, so a kernel built
  under `jit` (a traced mask) carries the flag as a traced array, and calling the kernel branches
  on it in Python (a `TracerBoolConversionError`). The flag is a constant: True for a traced mask.
  """
  flag = lambda info: None if info is None else info._replace(is_dynamic_mask=True)
  return type(kernel)(
    flag(kernel.fwd_mask_info), flag(kernel.dq_mask_info), flag(kernel.dkv_mask_info), **kernel.kwargs
  )


def _pad_rows(x: Array, n: int, value=0) -> Array:
  """`x [B, L, ...]` with n more rows of `value` along axis 1."""
  if n == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, n)
  return jnp.pad(x, pad, constant_values=value)


def splash_attention(
  q: Array,
  k: Array,
  v: Array,
  mask,
  *,
  scale: float,
  rope: Optional[Tuple[Array, Array]] = None,
  softcap: Optional[float] = None,
  interpret: bool = False,
  block_size: int = DEFAULT_BLOCK_SIZE,
) -> Array:
  """The attention injection point through splash attention (module docstring).

  Args:
    q: `[B, L, K, G, hd]`; k, v: `[B, L, K, hd]`.
    mask: a `pofx.kernels.SegmentMask` (a `CacheMask`, a sliding window or a `softcap` go to
      `pofx.kernels.xla_attention`).
    scale: the score scale (usually `1 / sqrt(hd)`), folded into q.
    rope: optional `(cos, sin)`, each `[B, L, hd/2]`, applied to q and k first.
    interpret: run the Pallas kernels in the interpreter (CPU).
    block_size: splash's tile (query and key block), a multiple of 128; smaller for short rows.

  Returns:
    `[B, L, K, G, hd]` in q's dtype.
  """
  kernels_lib.check_attention_shapes(q, k, v)
  if (
    mask is None
    or isinstance(mask, kernels_lib.CacheMask)
    or softcap is not None
    or getattr(mask, "window", None) is not None
  ):
    return kernels_lib.xla_attention(q, k, v, mask, scale=scale, rope=rope, softcap=softcap)
  if not isinstance(mask, kernels_lib.SegmentMask):
    raise TypeError(f"attention: mask must be a SegmentMask, a CacheMask or None, got {type(mask).__name__}.")
  if splash is None:
    raise RuntimeError(unavailable_reason())
  B, L, K, G, hd = q.shape
  if k.shape[1] != L or jnp.shape(mask.segment_ids) != (B, L):
    raise ValueError(
      f"splash_attention: q, k and segment_ids must be of one length; got q {q.shape}, k {k.shape}, "
      f"segment_ids {jnp.shape(mask.segment_ids)}."
    )
  q, k = kernels_lib.apply_rope(q, k, rope)
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)

  padded, block = block_size_for(L, block_size)
  extra = padded - L
  heads_q = _pad_rows(q, extra).reshape(B, padded, K * G, hd).transpose(0, 2, 1, 3)  # [B, K*G, Lp, hd]
  heads_k = _pad_rows(k, extra).transpose(0, 2, 1, 3)  # [B, K, Lp, hd]
  heads_v = _pad_rows(v, extra).transpose(0, 2, 1, 3)
  segment_ids = _pad_rows(jnp.asarray(mask.segment_ids, jnp.int32), extra, _PAD_SEGMENT)

  if mask.branch_ids is None:
    kernel = _causal_kernel(padded, block, bool(interpret))

    def row(q1, k1, v1, seg1):
      return kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=seg1, kv=seg1))

    out = jax.vmap(row)(heads_q, heads_k, heads_v, segment_ids)
  else:
    branch_ids = _pad_rows(jnp.asarray(mask.branch_ids, jnp.int32), extra, 0)
    dense = kernels_lib.attention_mask(segment_ids, branch_ids)  # [B, Lp, Lp]

    def row(q1, k1, v1, mask1):
      kernel = _dynamic_kernel(
        splash.make_splash_mha(
          mask1[None], block_sizes=_block_sizes(block), head_shards=1, q_seq_shards=1, interpret=bool(interpret)
        )
      )
      return kernel(q1, k1, v1)

    out = jax.vmap(row)(heads_q, heads_k, heads_v, dense)
  out = out.transpose(0, 2, 1, 3)[:, :L]  # [B, L, K*G, hd]
  return out.reshape(B, L, K, G, hd).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class SplashAttention:
  """`splash_attention` with fixed options, hashable by value (a `Kernels` field)."""

  interpret: bool = False
  block_size: int = DEFAULT_BLOCK_SIZE

  def __call__(self, q, k, v, mask, *, scale, rope=None, softcap=None):
    return splash_attention(
      q, k, v, mask, scale=scale, rope=rope, softcap=softcap, interpret=self.interpret, block_size=self.block_size
    )


def kernels(interpret: bool = False, block_size: int = DEFAULT_BLOCK_SIZE) -> kernels_lib.Kernels:
  """The "tpu" kernels: splash attention; XLA's dot_general and convolution.

  interpret: run splash in the Pallas interpreter (works on CPU; for tests).
  block_size: splash's tile, a multiple of 128 (rows shorter than it use a smaller one).
  """
  block_size_for(LANES, block_size)  # validates block_size
  return kernels_lib.Kernels(attention=SplashAttention(bool(interpret), int(block_size)), name="tpu")
