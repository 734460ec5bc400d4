"""Chunked, head-fused token log-probs: values against a float64 numpy log-softmax, gradients against
the naive `jax.nn.log_softmax` computation, entropy / log-sum-sq-probs against their formulas, and
a compiled-memory comparison."""

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
  lss = np.log((p ** 2).sum(-1))
  return tok, ent, lss


@pytest.mark.parametrize("chunk_size", [1, 7, 33, 10_000])   # 33 = B*T: one chunk; 7 leaves a remainder
def test_values_match_numpy_log_softmax(chunk_size):
  h, w, t = _data(scale=2.0)
  out = jax.jit(lambda h, w, t: logprobs.token_logps(
      h, w, t, chunk_size=chunk_size, with_entropy=True, with_log_sum_sq_probs=True))(h, w, t)
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
  # each); chunked keeps one [64, V] block at a time.
  B, T, D, V = 2, 256, 64, 8192
  spec = (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
          jax.ShapeDtypeStruct((B, T), jnp.int32))

  def naive(h, w, t):
    return jnp.sum(_naive(h, w, t)[0])

  def chunked(h, w, t):
    return jnp.sum(logprobs.token_logps(h, w, t, chunk_size=64).logps)

  def temp_bytes(f):
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*spec).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
      pytest.skip("memory_analysis() not available on this backend")
    return analysis.temp_size_in_bytes

  naive_bytes, chunked_bytes = temp_bytes(naive), temp_bytes(chunked)
  assert naive_bytes >= B * T * V * 4          # at least one full [B, T, V] float32 buffer
  assert chunked_bytes < B * T * V * 4 / 2     # never a full one
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
