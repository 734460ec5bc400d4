"""`pofx_backends.tpu`: Pallas splash attention behind the attention injection point.

On CPU the splash kernels run in the Pallas interpreter (`kernels(interpret=True)`) and are checked
equal, forward and gradients, to `pofx.kernels.xla_attention` (the core's own dense masked
attention) for the fused, packed and prompt-shared masks with grouped-query heads. The interpreter
is slow, so the shapes are tiny (rows of 20 tokens, padded inside to one 128-token block). The
compiled kernels need a TPU and are skipped elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import kernels as kernels_lib
from pofx import models
from pofx_backends import tpu

ON_TPU = jax.default_backend() == "tpu"
NEEDS_TPU = pytest.mark.skipif(not ON_TPU, reason=f"needs a TPU; the JAX backend is {jax.default_backend()!r}")

# Rows of 20 tokens. fused: one sequence then padding; packed: two sequences then padding;
# prompt-shared: prompt (branch 0), chosen (1), rejected (2); then a second group with three branches.
FUSED = ([1] * 15 + [0] * 5, None)
PACKED = ([1] * 7 + [2] * 10 + [0] * 3, None)
SHARED = ([1] * 9 + [2] * 9 + [0] * 2, [0, 0, 0, 1, 1, 1, 2, 2, 2] + [0, 0, 1, 1, 2, 2, 3, 3, 3] + [0, 0])
SHARED_2 = ([1] * 12 + [0] * 8, [0] * 4 + [1] * 4 + [2] * 4 + [0] * 8)


def _mask(rows):
  segment_ids = jnp.asarray([r[0] for r in rows], jnp.int32)
  if all(r[1] is None for r in rows):
    return kernels_lib.SegmentMask(segment_ids)
  branch_ids = jnp.asarray([r[1] if r[1] is not None else [0] * len(r[0]) for r in rows], jnp.int32)
  return kernels_lib.SegmentMask(segment_ids, branch_ids)


def _qkv(B, L, K, G, hd, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(
    jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    for shape in ((B, L, K, G, hd), (B, L, K, hd), (B, L, K, hd))
  )


def _rope(B, L, hd):
  positions = jnp.arange(L, dtype=jnp.float32)[None, :, None] + jnp.zeros((B, 1, 1))
  angles = positions * (1e-2 ** (jnp.arange(hd // 2, dtype=jnp.float32) / (hd // 2)))[None, None]
  return jnp.cos(angles), jnp.sin(angles)


def _value_and_grads(attention, q, k, v, mask, scale, rope=None):
  """The output and the gradients of `sum(out * w)` (w a fixed random cotangent) in q, k, v (one jit)."""
  w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape, np.float32))

  @jax.jit
  def run(q, k, v, mask, rope):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, scale=scale, rope=rope), q, k, v)
    return out, vjp(w.astype(out.dtype))

  return run(q, k, v, mask, rope)


def _assert_matches_xla(attention, q, k, v, mask, *, rope=None, atol=2e-5):
  scale = kernels_lib.default_scale(q.shape[-1])
  out, grads = _value_and_grads(attention, q, k, v, mask, scale, rope)
  ref_out, ref_grads = _value_and_grads(kernels_lib.xla_attention, q, k, v, mask, scale, rope)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=atol, rtol=atol)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(ref_g, np.float32), atol=atol, rtol=atol, err_msg=f"d{name}"
    )


INTERPRETED = tpu.kernels(interpret=True).attention


def test_fused_and_packed_rows_segment_ids():
  """Splash's causal mask with SegmentIds; K=2 key/value heads with G=2 query heads each, rotary tables."""
  q, k, v = _qkv(2, 20, 2, 2, 8)
  _assert_matches_xla(INTERPRETED, q, k, v, _mask([FUSED, PACKED]), rope=_rope(2, 20, 8))


def test_prompt_shared_rows_branch_mask():
  """Branch masks (a prompt key seen by every branch, branches hidden from each other) through splash's
  dense per-row mask; one row with two groups and up to three branches, one with one group."""
  q, k, v = _qkv(2, 20, 1, 2, 8, seed=1)
  _assert_matches_xla(INTERPRETED, q, k, v, _mask([SHARED, SHARED_2]))


def test_tiny_model_logits_equal_xla_kernels():
  """The whole tiny Llama (2 layers) with the interpreted "tpu" kernels injected: the same logits on
  prompt-shared rows as with `pofx.kernels.XLA`."""
  config = models.preset("tiny")
  tpu_model, xla_model = models.make(config, tpu.kernels(interpret=True)), models.make(config)
  rng = np.random.default_rng(3)  # random weights of the model's shapes, without compiling its initialiser
  params = jax.tree_util.tree_map(
    lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape, np.float32), x.dtype),
    jax.eval_shape(xla_model.init, jax.random.PRNGKey(0)),
  )
  mask = _mask([SHARED, SHARED_2])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 20)), jnp.int32)
  positions = jnp.tile(jnp.arange(20, dtype=jnp.int32), (2, 1))
  logits = jax.jit(tpu_model.logits)(params, tokens, positions, mask.segment_ids, mask.branch_ids)
  ref = jax.jit(xla_model.logits)(params, tokens, positions, mask.segment_ids, mask.branch_ids)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_cache_mask_goes_to_xla():
  q, k, v = _qkv(1, 2, 1, 2, 8, seed=2)
  k, v = jnp.concatenate([k] * 3, 1), jnp.concatenate([v] * 3, 1)
  mask = kernels_lib.CacheMask(jnp.asarray([[True, True, True, False, True, False]]), jnp.int32(3))
  scale = kernels_lib.default_scale(8)
  np.testing.assert_array_equal(
    np.asarray(INTERPRETED(q, k, v, mask, scale=scale)),
    np.asarray(kernels_lib.xla_attention(q, k, v, mask, scale=scale)),
  )


def test_cached_causal_kernel_is_reusable_across_traces():
  """The causal kernel is cached by length: one first built inside a jit trace works in the next trace."""
  first = jax.jit(lambda: tpu._causal_kernel(384, 128, True).fwd_mask_info.block_mask.astype(jnp.int32))()
  again = jax.jit(lambda x: x + tpu._causal_kernel(384, 128, True).fwd_mask_info.block_mask)(jnp.int32(0))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert np.asarray(first).max() == 2  # some tiles full (below the diagonal)


def test_block_sizes_and_kernels_record():
  assert tpu.block_size_for(20) == (128, 128)
  assert tpu.block_size_for(640) == (640, 128)
  assert tpu.block_size_for(1000) == (1024, 512)
  assert tpu.block_size_for(1000, 384) == (1024, 256)
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu.kernels(block_size=100)
  kernels = tpu.kernels()
  assert kernels.name == "tpu" and kernels.dot_general is jax.lax.dot_general
  assert tpu.kernels() == kernels and tpu.kernels(interpret=True) != kernels
  if not ON_TPU:
    assert tpu.unavailable_reason() is not None and "not a TPU" in tpu.unavailable_reason()


@NEEDS_TPU
@pytest.mark.parametrize("rows", [[FUSED, PACKED], [SHARED, SHARED_2]], ids=["fused+packed", "shared"])
def test_splash_on_tpu(rows):
  """The compiled kernels (bfloat16, head dimension 128) against the core's XLA attention in float32."""
  assert tpu.unavailable_reason() is None
  q, k, v = _qkv(2, 20, 2, 2, 128, jnp.bfloat16)
  mask = _mask(rows)
  scale = kernels_lib.default_scale(128)
  out, grads = _value_and_grads(tpu.kernels().attention, q, k, v, mask, scale)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref_out, ref_grads = _value_and_grads(kernels_lib.xla_attention, *f32, mask, scale)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=5e-2, rtol=5e-2)
  for g, ref_g in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref_g), atol=1e-1, rtol=1e-1)
