"""The native full-attention kernels (`pofx_backends.cpu.native.full_attention`: the attention
injection point's `mask=None`) against softmax attention and its gradient written out in float64
NumPy (tests/test_full_attention.py), and the CPU backend's routing of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import kernels as kernels_lib
from pofx_backends import cpu
from pofx_backends.cpu import native
from tests.test_full_attention import CASES, assert_matches_formula, qkv

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")


@pytest.mark.parametrize("shape", CASES + [(2, 40, 1, 1, 64, 512), (2, 3, 1, 1, 16, 1)])
def test_values_and_gradients_equal_the_formula(shape):
  q, k, v, d_out = qkv(*shape, seed=sum(shape))
  scale = kernels_lib.default_scale(shape[4])
  assert_matches_formula(lambda q, k, v: native.full_attention(q, k, v, scale=scale), q, k, v, d_out, scale=scale)


def test_the_backend_calls_the_kernels_where_they_apply_and_xla_elsewhere():
  attend = cpu.kernels(products="xla", conv="xla").attention
  lowered = lambda q, k, v, **kw: jax.jit(lambda q, k, v: attend(q, k, v, None, scale=0.25, **kw)).lower(q, k, v)
  q, k, v, _ = qkv(2, 8, 1, 2, 16, 8)
  assert "pofx_full_attention_fwd" in lowered(q, k, v).as_text()
  assert not native.full_attention_supports(q[..., :8], k[..., :8], v[..., :8])  # head dimension 8
  refused = [
    (q[..., :8], k[..., :8], v[..., :8], {}),  # head dimension 8
    (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), {}),
    (q, k, v, {"softcap": 5.0}),  # soft-capping: XLA's
  ]
  for q1, k1, v1, kw in refused:
    assert "pofx_full_attention" not in lowered(q1, k1, v1, **kw).as_text()
    got = attend(q1, k1, v1, None, scale=0.25, **kw)
    want = kernels_lib.xla_attention(q1, k1, v1, None, scale=0.25, **kw)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="head dimension|hd in"):
    native.full_attention(q[..., :8], k[..., :8], v[..., :8], scale=0.25)


def test_vmap_and_rope():
  q, k, v, d_out = qkv(2, 16, 1, 1, 32, 16, seed=9)
  batched = jax.vmap(lambda q, k, v: native.full_attention(q, k, v, scale=0.2))(q[:, None], k[:, None], v[:, None])
  np.testing.assert_allclose(
    np.asarray(batched[:, 0]), np.asarray(native.full_attention(q, k, v, scale=0.2)), rtol=1e-6, atol=1e-6
  )
  angles = jnp.arange(16, dtype=jnp.float32)[None, :, None] * jnp.linspace(0.1, 1.0, 16)[None, None]
  rope = (jnp.cos(angles).repeat(2, 0), jnp.sin(angles).repeat(2, 0))
  attend = cpu.kernels(products="xla", conv="xla").attention
  got = attend(q, k, v, None, scale=0.2, rope=rope)
  want = kernels_lib.xla_attention(q, k, v, None, scale=0.2, rope=rope)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-6)
