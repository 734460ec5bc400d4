"""`pofx_backends.gpu`: `jax.nn.dot_product_attention` behind the attention injection point.

On CPU the XLA implementation of `jax.nn.dot_product_attention` is checked equal, forward and
gradients, to `pofx.kernels.xla_attention` (the core's own dense masked attention) for the fused,
packed and prompt-shared masks, grouped-query heads, rotary tables and a key/value cache. The
cuDNN runs need a CUDA GPU and are skipped elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import kernels as kernels_lib
from pofx import models, sparse_attention
from pofx_backends import gpu

ON_GPU = jax.default_backend() == "gpu"
NEEDS_GPU = pytest.mark.skipif(not ON_GPU, reason=f"needs a CUDA GPU; the JAX backend is {jax.default_backend()!r}")

# Rows of 12 tokens. fused: one sequence then padding; packed: two sequences then padding;
# prompt-shared: prompt (branch 0), chosen (branch 1), rejected (branch 2), then a second such group.
FUSED = ([1] * 9 + [0] * 3, None)
PACKED = ([1] * 5 + [2] * 5 + [0] * 2, None)
SHARED = ([1] * 8 + [2] * 4, [0, 0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 2])


def _mask(rows, blocks=None):
  segment_ids = jnp.asarray([r[0] for r in rows], jnp.int32)
  if all(r[1] is None for r in rows):
    return kernels_lib.SegmentMask(segment_ids, blocks=blocks)
  branch_ids = jnp.asarray([r[1] if r[1] is not None else [0] * len(r[0]) for r in rows], jnp.int32)
  return kernels_lib.SegmentMask(segment_ids, branch_ids, blocks)


def _qkv(B, L, K, G, hd, dtype=jnp.float32, seed=0, S=None):
  rng = np.random.default_rng(seed)
  S = L if S is None else S
  return tuple(
    jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    for shape in ((B, L, K, G, hd), (B, S, K, hd), (B, S, K, hd))
  )


def _rope(B, L, hd):
  positions = jnp.arange(L, dtype=jnp.float32)[None, :, None] + jnp.arange(B, dtype=jnp.float32)[:, None, None]
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
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=atol, rtol=atol)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(ref_g, np.float32), atol=atol, rtol=atol, err_msg=f"d{name}"
    )


XLA_ATTENTION = gpu.kernels(implementation="xla").attention


@pytest.mark.parametrize("rows", [[FUSED, PACKED], [FUSED, SHARED]], ids=["fused+packed", "fused+shared"])
def test_xla_implementation_equals_core_attention(rows):
  q, k, v = _qkv(2, 12, 1, 2, 8)
  _assert_matches_xla(XLA_ATTENTION, q, k, v, _mask(rows))


def test_grouped_query_heads_and_rope():
  """K=2 key/value heads with G=3 query heads each, rotary tables applied inside."""
  q, k, v = _qkv(2, 12, 2, 3, 8, seed=1)
  _assert_matches_xla(XLA_ATTENTION, q, k, v, _mask([PACKED, SHARED]), rope=_rope(2, 12, 8))


def test_cache_mask():
  """Two queries at slots 3 and 4 of an 8-slot cache with a hole at slot 1 in the second row."""
  q, k, v = _qkv(2, 2, 2, 2, 8, seed=2, S=8)
  kv_valid = jnp.asarray([[True] * 5 + [False] * 3, [True, False, True, True, True, False, False, False]])
  _assert_matches_xla(XLA_ATTENTION, q, k, v, kernels_lib.CacheMask(kv_valid, jnp.int32(3)))


def test_blocks_are_ignored_with_the_same_result_on_real_tokens():
  """A block list only says which tiles to compute: the real queries' outputs equal the dense path's."""
  rows = [SHARED, PACKED]
  mask = _mask(rows)
  blocks = sparse_attention.attention_blocks(np.asarray(mask.segment_ids), np.asarray(mask.branch_ids), block_size=4)
  q, k, v = _qkv(2, 12, 1, 2, 8, seed=3)
  scale = kernels_lib.default_scale(8)
  out = jax.jit(XLA_ATTENTION, static_argnames="scale")(q, k, v, _mask(rows, blocks), scale=scale)
  ref = jax.jit(kernels_lib.xla_attention, static_argnames="scale")(q, k, v, mask, scale=scale)
  real = np.asarray(mask.segment_ids) > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5, rtol=2e-5)


def test_bfloat16_inputs():
  q, k, v = _qkv(2, 12, 1, 2, 8, jnp.bfloat16, seed=4)
  mask = _mask([SHARED, PACKED])
  scale = kernels_lib.default_scale(8)
  out = XLA_ATTENTION(q, k, v, mask, scale=scale)
  assert out.dtype == jnp.bfloat16
  ref = kernels_lib.xla_attention(
    q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, scale=scale
  )
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2, rtol=3e-2)


def test_kernels_record_and_choice_off_gpu():
  kernels = gpu.kernels()
  assert kernels.name == "gpu" and kernels.dot_general is jax.lax.dot_general
  assert kernels.conv_general_dilated is jax.lax.conv_general_dilated
  assert gpu.kernels() == kernels and hash(gpu.kernels()) == hash(kernels)  # a static argument compiles once
  with pytest.raises(ValueError, match="implementation"):
    gpu.kernels(implementation="flash")
  q, _, _ = _qkv(1, 12, 1, 1, 8, jnp.bfloat16)
  assert gpu.choose_implementation(q, kernels_lib.CacheMask(jnp.ones((1, 12), bool), jnp.int32(0))) == "xla"
  if not ON_GPU:
    assert gpu.unavailable_reason() is not None and "not a GPU" in gpu.unavailable_reason()
    assert gpu.choose_implementation(q, _mask([FUSED])) == "xla"


def test_tiny_model_logits_and_decoding_equal_xla_kernels():
  """The whole tiny Llama with the "gpu" kernels (XLA implementation) injected: the same logits on
  prompt-shared rows and the same decoding step (a CacheMask) as with `pofx.kernels.XLA`."""
  config = models.preset("tiny")
  gpu_model, xla_model = models.make(config, gpu.kernels(implementation="xla")), models.make(config)
  rng = np.random.default_rng(3)  # random weights of the model's shapes, without compiling its initialiser
  params = jax.tree_util.tree_map(
    lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape, np.float32), x.dtype),
    jax.eval_shape(xla_model.init, jax.random.PRNGKey(0)),
  )
  mask = _mask([SHARED, PACKED])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)), jnp.int32)
  positions = jnp.tile(jnp.arange(12, dtype=jnp.int32), (2, 1))
  logits = jax.jit(gpu_model.logits)(params, tokens, positions, mask.segment_ids, mask.branch_ids)
  ref = jax.jit(xla_model.logits)(params, tokens, positions, mask.segment_ids, mask.branch_ids)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5, rtol=1e-5)
  valid = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 1]], bool)
  step = [
    jax.jit(m.decode)(params, tokens[:, :4], positions[:, :4], valid, m.init_cache(2, 6))
    for m in (gpu_model, xla_model)
  ]
  np.testing.assert_allclose(np.asarray(step[0][0]), np.asarray(step[1][0]), atol=1e-5, rtol=1e-5)


def test_automatic_choice_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
  """Chosen automatically, a cuDNN call that its checks refuse while tracing (here: no cuDNN at all on
  CPU) is computed by XLA instead; asked for explicitly, it raises."""
  monkeypatch.setattr(gpu, "choose_implementation", lambda q, mask: "cudnn")
  q, k, v = _qkv(2, 12, 1, 2, 8, seed=5)
  mask = _mask([SHARED, PACKED])
  scale = kernels_lib.default_scale(8)
  if not ON_GPU:
    np.testing.assert_allclose(
      np.asarray(gpu.kernels().attention(q, k, v, mask, scale=scale)),
      np.asarray(kernels_lib.xla_attention(q, k, v, mask, scale=scale)),
      atol=2e-5,
      rtol=2e-5,
    )
  with pytest.raises((NotImplementedError, ValueError, RuntimeError)):
    gpu.kernels(implementation="cudnn").attention(q, k, v, mask, scale=scale)  # float32: never cuDNN's


def test_automatic_choice_uses_the_core_attention_where_cudnn_does_not_apply(monkeypatch):
  """float32 inputs never go to cuDNN: the automatic choice hands them, block list included, to the
  core's `xla_attention` (rotary tables applied once, before), not to jax.nn's XLA path."""
  q, k, v = _qkv(2, 12, 1, 2, 8, seed=6)
  mask = _mask([SHARED, PACKED])
  scale = kernels_lib.default_scale(8)
  calls = []
  core = kernels_lib.xla_attention

  def spy(q, k, v, mask, *, scale, rope=None):
    calls.append((mask, rope))
    return core(q, k, v, mask, scale=scale, rope=rope)

  monkeypatch.setattr(kernels_lib, "xla_attention", spy)
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: pytest.fail("jax.nn path taken"))
  out = gpu.kernels().attention(q, k, v, mask, scale=scale)
  assert len(calls) == 1 and calls[0] == (mask, None)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(core(q, k, v, mask, scale=scale)))


@NEEDS_GPU
@pytest.mark.parametrize("rows", [[FUSED, PACKED], [SHARED, SHARED]], ids=["fused+packed", "shared"])
def test_cudnn_on_gpu(rows):
  """cuDNN flash attention (bfloat16) against the core's XLA attention in float32; odd lengths padded."""
  assert gpu.unavailable_reason() is None
  rows = [(r[0][:11], None if r[1] is None else r[1][:11]) for r in rows]
  q, k, v = _qkv(2, 11, 2, 2, 64, jnp.bfloat16)
  mask = _mask(rows)
  assert gpu.choose_implementation(q, mask) == "cudnn"
  scale = kernels_lib.default_scale(64)
  cudnn = gpu.kernels(implementation="cudnn").attention
  out, grads = _value_and_grads(cudnn, q, k, v, mask, scale)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref_out, ref_grads = _value_and_grads(kernels_lib.xla_attention, *f32, mask, scale)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=5e-2, rtol=5e-2)
  for g, ref_g in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref_g), atol=1e-1, rtol=1e-1)
