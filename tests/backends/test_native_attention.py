"""The CPU backend's attention: the fused kernels of block-sparse attention against the XLA op and
dense softmax attention, on the layouts the benchmark uses (64-token blocks), for every head
dimension the kernels are compiled for (16, 32, 64, 128); the fallback to the XLA op elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import batching, sparse_attention
from pofx import kernels as kernels_lib
from pofx_backends import cpu

pytestmark = pytest.mark.skipif(
  cpu.unavailable_reason(products="xla") is not None, reason=f"{cpu.unavailable_reason(products='xla')}"
)
ATTENTION = {"xla": kernels_lib.xla_attention, "native": cpu.NativeAttention()}


def _attend(kernel, q, k, v, seg, br, blocks, rope=None, scale=1.0):
  """The injection point's call: `[R, L, K, G, hd]` queries over a SegmentMask with block lists."""
  mask = kernels_lib.SegmentMask(jnp.asarray(seg), jnp.asarray(br), blocks)
  return ATTENTION[kernel](q, k, v, mask, scale=scale, rope=rope)


def _pairs(seed, n, max_p, max_c, vocab=97):
  rng = np.random.default_rng(seed)
  ids = lambda k: rng.integers(1, vocab, k).tolist()
  lens = [(int(rng.integers(1, max_p)), int(rng.integers(1, max_c)), int(rng.integers(1, max_c))) for _ in range(n)]
  return [ids(p) for p, _, _ in lens], [ids(c) for _, c, _ in lens], [ids(r) for _, _, r in lens]


def _layout(name, seed):
  p, c, r = _pairs(seed, 6, 90, 110)
  if name == "prompt_shared":
    return batching.prompt_shared(p, c, r, seq_bucket=64, completion_bucket=8)
  if name == "packed_one_row":
    return batching.packed(p, c, r, length_bucket=64, completion_bucket=8)
  return batching.packed(p, c, r, row_length=512, completion_bucket=8)


def _qkv(shape, seed, head_dim=32):
  R, L = shape
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (R, L, 4, 2, head_dim)) / np.sqrt(head_dim)
  k = jax.random.normal(ks[1], (R, L, 4, head_dim))
  v = jax.random.normal(ks[2], (R, L, 4, head_dim))
  return q, k, v, jax.random.normal(ks[3], q.shape)


def _dense(q, k, v, seg, br):
  """Softmax attention over the full [L, L] mask (pofx.models.llama.attention_mask's rule)."""
  R, L = seg.shape
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & np.tril(np.ones((L, L), bool))[None]
  mask &= (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
  s = jnp.einsum("rqkgd,rskd->rkgqs", q, k) + jnp.where(mask, 0.0, -1e30)[:, None, None]
  return jnp.einsum("rkgqs,rskd->rqkgd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize(
  "layout,head_dim",
  [
    ("prompt_shared", 32),
    ("packed", 32),
    ("packed_one_row", 32),
    ("prompt_shared", 16),
    ("packed", 64),
    ("packed_one_row", 128),
  ],
)
def test_native_equals_xla_op_and_dense_softmax(layout, head_dim):
  b = _layout(layout, seed={"prompt_shared": 0, "packed": 1, "packed_one_row": 2}[layout])
  seg, br = np.asarray(b.segment_ids), np.asarray(b.branch_ids)
  assert seg.shape[1] >= 128  # several blocks per row
  q, k, v, proj = _qkv(seg.shape, seed=3, head_dim=head_dim)
  real = (seg > 0)[:, :, None, None, None]
  proj = proj * real  # padding outputs are never used
  outs, grads = {}, {}
  blocks = sparse_attention.attention_blocks(seg, br, block_size=64, bucket=8)
  for kernel in ("xla", "native"):
    fn = lambda q, k, v: _attend(kernel, q, k, v, seg, br, blocks)  # noqa: B023
    outs[kernel] = np.asarray(jax.jit(fn)(q, k, v))
    grads[kernel] = _grads(fn, q, k, v, proj)
  dense_fn = lambda q, k, v: _dense(q, k, v, seg, br)
  dense = np.asarray(jax.jit(dense_fn)(q, k, v))
  dense_grads = _grads(dense_fn, q, k, v, proj)
  m = np.broadcast_to(real, outs["native"].shape)
  np.testing.assert_allclose(outs["native"][m], dense[m], atol=2e-6)
  np.testing.assert_allclose(outs["native"][m], outs["xla"][m], atol=2e-6)
  for g_native, g_xla, g_dense in zip(grads["native"], grads["xla"], dense_grads):
    scale = float(np.abs(g_dense).max())
    np.testing.assert_allclose(g_native, g_dense, atol=2e-6 * scale)
    np.testing.assert_allclose(g_native, g_xla, atol=2e-6 * scale)


def _grads(fn, q, k, v, proj):
  """d sum(fn(q, k, v) * proj) / d(q, k, v), compiled. `proj` is an argument, not a constant of
  the program: XLA would otherwise fold the backward pass's gathers of it at compile time."""
  return jax.jit(jax.grad(lambda q, k, v, proj: jnp.sum(fn(q, k, v) * proj), argnums=(0, 1, 2)))(q, k, v, proj)


def _rotated(x, cos, sin):
  """The half-split rotary embedding written out here (test's own): [x1 c - x2 s, x2 c + x1 s]."""
  h = x.shape[-1] // 2
  x1, x2 = x[..., :h], x[..., h:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize(
  "layout,head_dim", [("prompt_shared", 16), ("prompt_shared", 32), ("packed", 64), ("packed_one_row", 128)]
)
def test_rope_and_query_scale_inside_the_kernel_equal_rotating_first(layout, head_dim):
  # rope=(cos, sin): the native kernels rotate q and k (and scale q) as they load them; the
  # result and the gradients with respect to the unrotated q, k, v must equal dense softmax
  # attention on q and k rotated beforehand by the formula above (and the XLA op's rope path).
  b = _layout(layout, seed=4)
  seg, br = np.asarray(b.segment_ids), np.asarray(b.branch_ids)
  q, k, v, proj = _qkv(seg.shape, seed=6, head_dim=head_dim)
  real = (seg > 0)[:, :, None, None, None]
  proj = proj * real
  inv_freq = 10000.0 ** (-np.arange(head_dim // 2) / (head_dim // 2))
  angles = np.asarray(b.positions, np.float64)[..., None] * inv_freq  # [R, L, hd/2]
  cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
  scale = 1.0 / np.sqrt(head_dim)

  def expected(q, k, v):
    qr = _rotated(q, cos[:, :, None, None, :], sin[:, :, None, None, :]) * scale
    kr = _rotated(k, cos[:, :, None, :], sin[:, :, None, :])
    return _dense(qr, kr, v, seg, br)

  want = np.asarray(jax.jit(expected)(q, k, v))
  want_grads = _grads(expected, q, k, v, proj)
  m = np.broadcast_to(real, want.shape)
  blocks = sparse_attention.attention_blocks(seg, br, block_size=64, bucket=8)
  for kernel in ("native", "xla"):
    fn = lambda q, k, v: _attend(kernel, q, k, v, seg, br, blocks, rope=(cos, sin), scale=scale)  # noqa: B023
    got = np.asarray(jax.jit(fn)(q, k, v))
    np.testing.assert_allclose(got[m], want[m], atol=3e-6, err_msg=kernel)
    grads = _grads(fn, q, k, v, proj)
    for name, g, e in zip("qkv", grads, want_grads):
      np.testing.assert_allclose(g, e, atol=3e-6 * float(np.abs(e).max()), err_msg=f"{kernel} d{name}")
  with pytest.raises(ValueError, match=r"rope tables must be \[B, L, hd/2\]"):
    _attend("native", q, k, v, seg, br, blocks, rope=(cos[..., :2], sin[..., :2]))


def test_native_calls_only_where_supported_and_equal_the_xla_op_elsewhere():
  # The fused kernels run for float32 with 64-token block lists and a supported head dimension;
  # other calls (head dimension 48, 32-token blocks, no block list, bfloat16, a cache mask) go to
  # pofx.kernels.xla_attention and give its values.
  b = _layout("prompt_shared", seed=0)
  seg, br = np.asarray(b.segment_ids), np.asarray(b.branch_ids)
  R, L = seg.shape
  attend = cpu.NativeAttention()
  calls = lambda fn, *args: jax.jit(fn).lower(*args).as_text().count("pofx_block_sparse_attention_fwd")
  q, k, v, _ = _qkv(seg.shape, seed=1, head_dim=48)
  cases = [
    (q, k, v, kernels_lib.SegmentMask(seg, br, sparse_attention.attention_blocks(seg, br, block_size=64))),
    (
      q[..., :32],
      k[..., :32],
      v[..., :32],
      kernels_lib.SegmentMask(seg, br, sparse_attention.attention_blocks(seg, br, block_size=32)),
    ),
    (q[..., :32], k[..., :32], v[..., :32], kernels_lib.SegmentMask(seg, br)),
    (
      q[..., :32].astype(jnp.bfloat16),
      k[..., :32].astype(jnp.bfloat16),
      v[..., :32].astype(jnp.bfloat16),
      kernels_lib.SegmentMask(seg, br, sparse_attention.attention_blocks(seg, br, block_size=64)),
    ),
    (
      q[:, :8, ..., :32],
      k[..., :32],
      v[..., :32],
      kernels_lib.CacheMask(jnp.asarray(seg > 0), jnp.asarray(L - 8, jnp.int32)),
    ),
  ]
  for q_, k_, v_, mask in cases:
    fn = lambda q, k, v: attend(q, k, v, mask, scale=0.5)  # noqa: B023
    got = jax.jit(fn)(q_, k_, v_)
    want = jax.jit(lambda q, k, v: kernels_lib.xla_attention(q, k, v, mask, scale=0.5))(q_, k_, v_)  # noqa: B023
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert calls(fn, q_, k_, v_) == 0
  blocks = sparse_attention.attention_blocks(seg, br, block_size=64)
  mask = kernels_lib.SegmentMask(seg, br, blocks)
  assert calls(lambda q, k, v: attend(q, k, v, mask, scale=0.5), q[..., :32], k[..., :32], v[..., :32]) == 1
