"""The attention injection point's `mask=None` (every query sees every key): `pofx.kernels.full_attention`
and `xla_attention(..., None)` against softmax attention and its gradient written out in float64
NumPy (the backward of Dao et al. 2022, arXiv:2205.14135, Algorithm 4, untiled), and the GPU and TPU
backends' routing of it (their XLA paths, which run on the CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import kernels as kernels_lib


def attention64(q, k, v, scale, d_out, softcap=None):
  """Output and (dq, dk, dv) of `sum(out * d_out)` for q [B, Lq, K, G, D], k, v [B, Lk, K, D], float64."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  raw = np.einsum("bqkgd,bskd->bkgqs", q, k) * scale
  s = raw if softcap is None else softcap * np.tanh(raw / softcap)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bkgqs,bskd->bqkgd", p, v)
  dp = np.einsum("bqkgd,bskd->bkgqs", d_out, v)
  ds = p * (dp - np.einsum("bqkgd,bqkgd->bkgq", d_out, out)[..., None])
  if softcap is not None:
    ds = ds * (1 - np.tanh(raw / softcap) ** 2)
  dq = np.einsum("bkgqs,bskd->bqkgd", ds, k) * scale
  dk = np.einsum("bkgqs,bqkgd->bskd", ds, q) * scale
  dv = np.einsum("bkgqs,bqkgd->bskd", p, d_out)
  return out, (dq, dk, dv)


def qkv(B, Lq, K, G, D, Lk, seed=0):
  rng = np.random.default_rng(seed)
  shapes = ((B, Lq, K, G, D), (B, Lk, K, D), (B, Lk, K, D), (B, Lq, K, G, D))
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


# (B, Lq, K, G, D, Lk): one head (a U-Net head), several key/value heads with grouped queries,
# cross-attention (Lq != Lk), key counts that are not multiples of 16.
CASES = [(3, 64, 1, 1, 32, 64), (2, 17, 2, 3, 16, 33), (2, 16, 4, 1, 64, 5), (1, 9, 1, 2, 32, 100)]


def assert_matches_formula(attention, q, k, v, d_out, *, scale, softcap=None, atol=1e-5):
  out, vjp = jax.vjp(jax.jit(lambda q, k, v: attention(q, k, v)), q, k, v)
  want_out, want_grads = attention64(q, k, v, scale, d_out, softcap)
  np.testing.assert_allclose(np.asarray(out), want_out, atol=atol, rtol=atol)
  for name, g, want in zip("qkv", vjp(d_out), want_grads):
    np.testing.assert_allclose(np.asarray(g), want, atol=atol, rtol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize("shape", CASES)
def test_full_attention_and_xla_attention_without_a_mask_equal_the_formula(shape):
  q, k, v, d_out = qkv(*shape)
  scale = kernels_lib.default_scale(shape[4])
  assert_matches_formula(lambda q, k, v: kernels_lib.full_attention(q, k, v, scale=scale), q, k, v, d_out, scale=scale)
  assert_matches_formula(
    lambda q, k, v: kernels_lib.xla_attention(q, k, v, None, scale=scale), q, k, v, d_out, scale=scale
  )


def test_softcap_without_a_mask():
  q, k, v, d_out = qkv(2, 8, 1, 2, 16, 8, seed=3)
  q = q * 4.0  # scores beyond the cap's linear range
  attend = lambda q, k, v: kernels_lib.xla_attention(q, k, v, None, scale=0.25, softcap=5.0)
  assert_matches_formula(attend, q, k, v, d_out, scale=0.25, softcap=5.0)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_gpu_and_tpu_backends_route_no_mask_to_xla(backend):
  import importlib

  kernels = importlib.import_module(f"pofx_backends.{backend}").kernels()
  q, k, v, d_out = qkv(2, 12, 2, 2, 16, 7, seed=4)
  attend = lambda q, k, v: kernels.attention(q, k, v, None, scale=0.3)
  assert_matches_formula(attend, q, k, v, d_out, scale=0.3)


def test_gpu_xla_implementation_without_a_mask():
  from pofx_backends import gpu

  q, k, v, d_out = qkv(2, 12, 2, 2, 16, 7, seed=5)
  attend = lambda q, k, v: gpu.kernels(implementation="xla").attention(q, k, v, None, scale=0.3)
  assert_matches_formula(attend, q, k, v, d_out, scale=0.3)
