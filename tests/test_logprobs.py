"""Chunked, head-fused token log-probs: values against a float64 numpy log-softmax, gradients against
the naive `jax.nn.log_softmax` computation, entropy / log-sum-sq-probs against their formulas, and
a compiled-memory comparison. The opt-in `save_probs=True` path (custom VJP from stored
probabilities) is checked against the naive `jax.nn.log_softmax` computation: values, gradients
(several chunkings, clipped targets, bfloat16 hidden, jit and eager), `check_grads`, the number of
head matmuls and its stored `[N, V]` probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx import logprobs


def _data(seed=0, B=3, T=11, D=8, V=50, scale=1.0):
  rng = np.random.default_rng(seed)
  h = (scale * rng.normal(size=(B, T, D))).astype(np.float32)
  w = rng.normal(size=(D, V)).astype(np.float32)
  t = rng.integers(0, V, (B, T)).astype(np.int32)
  return h, w, t


def _numpy_reference(h, w, t):
  """float64 numpy: log-probs of targets, entropy, log sum p^2."""
  z = h.astype(np.float64) @ w.astype(np.float64)
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  logp = z - lse[..., None]
  p = np.exp(logp)
  tok = np.take_along_axis(logp, t[..., None], -1)[..., 0]
  ent = -(p * logp).sum(-1)
  lss = np.log((p**2).sum(-1))
  return tok, ent, lss


@pytest.mark.parametrize("chunk_size", [1, 7, 33, 10_000])  # 33 = B*T: one chunk; 7 leaves a remainder
def test_values_match_numpy_log_softmax(chunk_size):
  h, w, t = _data(scale=2.0)
  out = jax.jit(
    lambda h, w, t: logprobs.token_logps(h, w, t, chunk_size=chunk_size, with_entropy=True, with_log_sum_sq_probs=True)
  )(h, w, t)
  tok, ent, lss = _numpy_reference(h, w, t)
  assert out.logps.shape == t.shape and out.logps.dtype == jnp.float32
  np.testing.assert_allclose(out.logps, tok, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out.entropy, ent, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out.log_sum_sq_probs, lss, atol=1e-5, rtol=1e-5)


def test_optional_outputs_absent_by_default():
  h, w, t = _data()
  out = logprobs.token_logps(h, w, t, chunk_size=5)
  assert out.entropy is None and out.log_sum_sq_probs is None


def test_identities_uniform_and_peaked():
  # Zero hidden states -> uniform distribution: log p = -log V, entropy = log V, log sum p^2 = -log V.
  V = 40
  h = np.zeros((2, 3, 4), np.float32)
  w = np.random.default_rng(0).normal(size=(4, V)).astype(np.float32)
  t = np.zeros((2, 3), np.int32)
  out = logprobs.token_logps(h, w, t, chunk_size=4, with_entropy=True, with_log_sum_sq_probs=True)
  np.testing.assert_allclose(out.logps, -np.log(V), rtol=1e-6)
  np.testing.assert_allclose(out.entropy, np.log(V), rtol=1e-6)
  np.testing.assert_allclose(out.log_sum_sq_probs, -np.log(V), rtol=1e-6)
  # Huge logits (one-hot-like): finite, entropy ~ 0, log sum p^2 ~ 0.
  w2 = np.zeros((4, V), np.float32)
  w2[0, 3] = 1e4
  h2 = np.ones((1, 2, 4), np.float32)
  out2 = logprobs.token_logps(h2, w2, np.array([[3, 5]]), with_entropy=True, with_log_sum_sq_probs=True)
  np.testing.assert_allclose(out2.logps[0, 0], 0.0, atol=1e-6)
  np.testing.assert_allclose(out2.logps[0, 1], -1e4, rtol=1e-6)
  np.testing.assert_allclose(out2.entropy, 0.0, atol=1e-6)
  np.testing.assert_allclose(out2.log_sum_sq_probs, 0.0, atol=1e-6)


def _naive(h, w, t):
  z = jnp.einsum("btd,dv->btv", h, w)
  lp = jax.nn.log_softmax(z, -1)
  p = jnp.exp(lp)
  tok = jnp.take_along_axis(lp, t[..., None], -1)[..., 0]
  return tok, -jnp.sum(p * lp, -1), jnp.log(jnp.sum(p * p, -1))


def test_gradients_match_naive():
  h, w, t = _data(seed=1, scale=1.5)
  c = np.random.default_rng(2).normal(size=(3, t.shape[0], t.shape[1])).astype(np.float32)

  def scalar_chunked(h, w):
    o = logprobs.token_logps(h, w, t, chunk_size=7, with_entropy=True, with_log_sum_sq_probs=True)
    return jnp.sum(c[0] * o.logps + c[1] * o.entropy + c[2] * o.log_sum_sq_probs)

  def scalar_naive(h, w):
    tok, ent, lss = _naive(h, w, t)
    return jnp.sum(c[0] * tok + c[1] * ent + c[2] * lss)

  v1, g1 = jax.jit(jax.value_and_grad(scalar_chunked, argnums=(0, 1)))(h, w)
  v0, g0 = jax.jit(jax.value_and_grad(scalar_naive, argnums=(0, 1)))(h, w)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, b in zip(g1, g0):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_operands_are_close_and_outputs_f32():
  h, w, t = _data(seed=3)
  out = logprobs.token_logps(jnp.asarray(h, jnp.bfloat16), w, t, chunk_size=8)
  assert out.logps.dtype == jnp.float32
  tok, _, _ = _numpy_reference(h, w, t)
  np.testing.assert_allclose(out.logps, tok, atol=0.1, rtol=0.02)


def test_next_token_shift():
  h, w, t = _data(seed=4)
  out = logprobs.next_token_logps(h, w, t, chunk_size=4)
  tok, _, _ = _numpy_reference(h[:, :-1], w, t[:, 1:])
  assert out.logps.shape == (3, 10)
  np.testing.assert_allclose(out.logps, tok, atol=1e-5)
  # Entry 0 is log p(tokens[1]) from position 0, by hand.
  z = h[0, 0].astype(np.float64) @ w
  np.testing.assert_allclose(out.logps[0, 0], z[t[0, 1]] - np.log(np.exp(z).sum()), atol=1e-5)


def test_bad_arguments_raise():
  h, w, t = _data()
  with pytest.raises(ValueError, match="chunk_size"):
    logprobs.token_logps(h, w, t, chunk_size=0)
  with pytest.raises(ValueError, match="targets"):
    logprobs.token_logps(h, w, t[:, :-1])
  with pytest.raises(ValueError, match="width"):
    logprobs.token_logps(h, w[:-1], t)


def test_chunked_compiled_memory_is_smaller():
  # Vocab-heavy: naive value+grad keeps [B, T, V] float32 logits/log-softmax (2*256*8192*4 = 16 MiB
  # each); the checkpointed chunked path (save_probs=False) keeps one [64, V] block at a time.
  B, T, D, V = 2, 256, 64, 8192
  spec = (
    jax.ShapeDtypeStruct((B, T, D), jnp.float32),
    jax.ShapeDtypeStruct((D, V), jnp.float32),
    jax.ShapeDtypeStruct((B, T), jnp.int32),
  )

  def naive(h, w, t):
    return jnp.sum(_naive(h, w, t)[0])

  def chunked(h, w, t):
    return jnp.sum(logprobs.token_logps(h, w, t, chunk_size=64, save_probs=False).logps)

  def temp_bytes(f):
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*spec).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
      pytest.skip("memory_analysis() not available on this backend")
    return analysis.temp_size_in_bytes

  naive_bytes, chunked_bytes = temp_bytes(naive), temp_bytes(chunked)
  assert naive_bytes >= B * T * V * 4  # at least one full [B, T, V] float32 buffer
  assert chunked_bytes < B * T * V * 4 / 2  # never a full one
  assert chunked_bytes * 4 < naive_bytes


def test_pair_logps_from_fused_splits_halves():
  rng = np.random.default_rng(5)
  lp = rng.normal(size=(4, 3)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], np.float32)
  lss = rng.normal(size=(4, 3)).astype(np.float32)
  pair = logprobs.pair_logps_from_fused(lp, mask, log_sum_sq_probs_2b=lss)
  assert isinstance(pair, pofx.PairLogps)
  np.testing.assert_allclose(pair.chosen, [lp[0, 0] + lp[0, 1], lp[1, 0]], rtol=1e-6)
  np.testing.assert_allclose(pair.rejected, [lp[2].sum(), lp[3, 0] + lp[3, 1]], rtol=1e-6)
  np.testing.assert_array_equal(pair.chosen_len, [2, 1])
  np.testing.assert_array_equal(pair.rejected_log_sum_sq_probs[1], [lss[3, 0], lss[3, 1], 0.0])
  with pytest.raises(ValueError, match="2B"):
    logprobs.pair_logps_from_fused(lp[:3], mask[:3])


# ------------------------------------------------------------------------------------------------
# save_probs=True: custom VJP from the stored probabilities (no logits recomputation).


def _naive_logps(h, w, t):
  """Independent reference: `jax.nn.log_softmax(h @ W)` at the (clipped) targets, float32."""
  lp = jax.nn.log_softmax(
    jnp.einsum("...d,dv->...v", h.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST), -1
  )
  t = jnp.clip(t, 0, w.shape[1] - 1)
  return jnp.take_along_axis(lp, t[..., None], -1)[..., 0]


def _value_and_grads(fn, h, w, g, jit=True):
  f = jax.value_and_grad(lambda h, w: jnp.sum(g * fn(h, w)), argnums=(0, 1))
  return (jax.jit(f) if jit else f)(h, w)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 33, 10_000])  # N = 33: 7 and 16 leave remainders
@pytest.mark.parametrize("jit", [True, False])
def test_saved_probs_values_and_grads_match_naive(chunk_size, jit):
  h, w, t = _data(seed=6, scale=1.5)
  g = np.random.default_rng(7).normal(size=t.shape).astype(np.float32)
  fn = lambda h, w: logprobs.token_logps(h, w, t, chunk_size=chunk_size, save_probs=True).logps
  out = (jax.jit(fn) if jit else fn)(h, w)
  assert out.shape == t.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _naive_logps(h, w, t), atol=1e-5, rtol=1e-5)
  v1, (dh1, dw1) = _value_and_grads(fn, h, w, g, jit)
  v0, (dh0, dw0) = _value_and_grads(lambda h, w: _naive_logps(h, w, t), h, w, g)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  assert dh1.dtype == jnp.float32 and dw1.dtype == jnp.float32
  np.testing.assert_allclose(dh1, dh0, rtol=1e-5, atol=1e-5 * np.abs(dh0).max())
  np.testing.assert_allclose(dw1, dw0, rtol=1e-5, atol=1e-5 * np.abs(dw0).max())


def test_saved_probs_clipped_targets_and_flat_shape():
  # Ids outside [0, V) (padding -1, overflow) are clipped as on the checkpointed path; [N, D] input.
  h, w, t = _data(seed=8, B=1, T=20)
  h, t = h[0], t[0].copy()
  t[[0, 5, 19]] = [-1, 50, 1000]
  g = np.random.default_rng(9).normal(size=t.shape).astype(np.float32)
  fn = lambda h, w: logprobs.token_logps(h, w, t, chunk_size=6, save_probs=True).logps
  np.testing.assert_allclose(fn(h, w), _naive_logps(h, w, t), atol=1e-5, rtol=1e-5)
  _, (dh1, dw1) = _value_and_grads(fn, h, w, g)
  _, (dh0, dw0) = _value_and_grads(lambda h, w: _naive_logps(h, w, t), h, w, g)
  np.testing.assert_allclose(dh1, dh0, rtol=1e-5, atol=1e-5 * np.abs(dh0).max())
  np.testing.assert_allclose(dw1, dw0, rtol=1e-5, atol=1e-5 * np.abs(dw0).max())


@pytest.mark.parametrize("save_probs", [True, False])
def test_bf16_hidden_grads(save_probs):
  # bfloat16 hidden -> bfloat16 matmul operands, float32 accumulation and outputs. Reference: the
  # naive float32 computation on the bfloat16-rounded operands (products of bfloat16 are exact in
  # float32); the backward rounds the [c, V] logits cotangent to bfloat16, hence the looser
  # gradient tolerance.
  h, w, t = _data(seed=10, scale=1.5)
  g = np.random.default_rng(11).normal(size=t.shape).astype(np.float32)
  hb = jnp.asarray(h, jnp.bfloat16)
  wb = jnp.asarray(w, jnp.bfloat16).astype(jnp.float32)
  fn = lambda h, w: logprobs.token_logps(h, w, t, chunk_size=7, save_probs=save_probs).logps
  out = jax.jit(fn)(hb, wb)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _naive_logps(hb, wb, t), atol=1e-5, rtol=1e-5)
  _, (dh1, dw1) = _value_and_grads(fn, hb, wb, g)
  _, (dh0, dw0) = _value_and_grads(lambda h, w: _naive_logps(h, w, t), hb.astype(jnp.float32), wb, g)
  assert dh1.dtype == jnp.bfloat16 and dw1.dtype == jnp.float32
  for a, b in ((dh1, dh0), (dw1, dw0)):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2, atol=1e-2 * np.abs(b).max())


def test_saved_probs_check_grads():
  h, w, t = _data(seed=12, B=2, T=3, D=4, V=7)
  g = np.random.default_rng(13).normal(size=t.shape).astype(np.float32)
  f = lambda h, w: jnp.sum(g * logprobs.token_logps(h, w, t, chunk_size=4, save_probs=True).logps)
  jax.test_util.check_grads(f, (h, w), order=1, modes=["rev"], eps=1e-2)


def _count_dot_generals(jaxpr):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "dot_general"
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          n += _count_dot_generals(sub)
  return n


def test_saved_probs_head_matmuls_and_memory():
  # value_and_grad: 3 head matmuls with stored probabilities (z = hW; G W^T; h^T G), 4 with the
  # checkpointed scan (z recomputed). The stored probabilities are [N, V] float32 in all.
  B, T, D, V = 2, 256, 64, 8192
  spec = (
    jax.ShapeDtypeStruct((B, T, D), jnp.float32),
    jax.ShapeDtypeStruct((D, V), jnp.float32),
    jax.ShapeDtypeStruct((B, T), jnp.int32),
  )

  def vg(save_probs):
    return jax.value_and_grad(
      lambda h, w, t: jnp.sum(logprobs.token_logps(h, w, t, chunk_size=64, save_probs=save_probs).logps), argnums=(0, 1)
    )

  assert _count_dot_generals(jax.make_jaxpr(vg(True))(*spec).jaxpr) == 3
  assert _count_dot_generals(jax.make_jaxpr(vg(False))(*spec).jaxpr) == 4
  analysis = jax.jit(vg(True)).lower(*spec).compile().memory_analysis()
  if analysis is None:
    pytest.skip("memory_analysis() not available on this backend")
  assert B * T * V * 4 <= analysis.temp_size_in_bytes < 2 * B * T * V * 4
