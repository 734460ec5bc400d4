"""pofx.native's BLAS products (numpy's OpenBLAS and Intel MKL through XLA's FFI) against float64
NumPy, and the products they compute in the Llama model and the LM head against XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import batching, logprobs, native, policy
from pofx.models import llama

pytestmark = pytest.mark.skipif(not native.blas_available(), reason=f"{native.blas_unavailable_reason()}")

# Each library where this process can use it; the other is skipped with the reason.
LIBRARIES = [pytest.param(name, marks=pytest.mark.skipif(not native.blas_available(name),
                                                         reason=f"{name}: {native.blas_unavailable_reason(name)}"))
             for name in native.BLAS_LIBRARIES]


@pytest.mark.parametrize("m,k,n", [(5, 37, 77), (300, 1536, 40), (40, 129, 300), (1, 1, 1)])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("library", LIBRARIES)
def test_matmul_equals_float64_product(m, k, n, transpose_a, transpose_b, library):
  # (300, 1536, 40) and (40, 129, 300) are cut into parts along C's rows and its columns.
  rng = np.random.default_rng(m + k + n)
  a, b = rng.normal(size=(m, k)), rng.normal(size=(k, n))
  a_in, b_in = (a.T if transpose_a else a), (b.T if transpose_b else b)
  out = jax.jit(lambda x, y: native.matmul(x, y, transpose_a=transpose_a, transpose_b=transpose_b, library=library))(
      jnp.asarray(np.ascontiguousarray(a_in), jnp.float32), jnp.asarray(np.ascontiguousarray(b_in), jnp.float32))
  expected = a @ b
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6 * np.sqrt(k) * np.abs(expected).max())


def test_matmul_of_empty_contraction_is_zero_and_bad_shapes_are_refused():
  out = native.matmul(jnp.ones((0, 3)), jnp.ones((0, 4)), transpose_a=True)
  np.testing.assert_array_equal(np.asarray(out), np.zeros((3, 4)))
  with pytest.raises(ValueError, match="contracting sizes differ"):
    native.matmul(jnp.ones((3, 4)), jnp.ones((5, 2)))
  with pytest.raises(ValueError, match="2-D operands"):
    native.matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 2)))
  with pytest.raises(ValueError, match="do not multiply"):
    native.dense(jnp.ones((2, 3)), jnp.ones((4, 2)))


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("all_products", [False, True])
def test_dense_value_and_gradients_equal_the_xla_dot(all_products, library):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, (3, 70, 33)), jax.random.normal(kw, (33, 50))
  proj = jax.random.normal(kg, (3, 70, 50))
  f = lambda dot: jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(dot(x, w)) * proj), argnums=(0, 1))(x, w)
  dense = lambda x, w: native.dense(x, w, all_products=all_products, library=library)
  (got_value, got_grads), (want_value, want_grads) = jax.jit(lambda: f(dense))(), f(lambda x, w: x @ w)
  np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()))
  # Which products went to the BLAS: the weight gradient only, or all three.
  text = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(dense(x, w)), argnums=(0, 1))).lower(x, w).as_text()
  assert text.count("pofx_blas_matmul") == (3 if all_products else 1)
  assert f"library = {native.BLAS_LIBRARIES.index(library)} : i64" in text


def _pairs(seed):
  rng = np.random.default_rng(seed)
  ids = lambda k: rng.integers(1, 97, k).tolist()
  lens = [(int(rng.integers(1, 60)), int(rng.integers(1, 70)), int(rng.integers(1, 70))) for _ in range(4)]
  return [ids(p) for p, _, _ in lens], [ids(c) for _, c, _ in lens], [ids(r) for _, _, r in lens]


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("attention", ["dense", "block_sparse"])
def test_llama_dpo_gradients_with_blas_products_equal_xla(attention, library):
  # Both model paths (the Flax modules for dense attention, the block-sparse functions), the LM
  # head's chunked log-probs included.
  b = batching.packed(*_pairs(3), length_bucket=64, completion_bucket=8)
  batch = {"pairs": b}
  if attention == "block_sparse":
    batch["attention_blocks"] = batching.attention_blocks(b, block_size=64, bucket=8)
  out = {}
  for matmul in ("xla", "blas", "blas_all"):
    config = llama.preset("tiny", matmul=matmul, blas=library)
    model = llama.make(config)
    params = llama.init_params(config, jax.random.key(0))
    fn = policy.make_logps_fn(model.apply, model.head, matmul=matmul, blas=library)

    def loss(params, batch):
      lp = fn(params, batch)  # noqa: B023
      return -jnp.sum(jax.nn.log_sigmoid(0.5 * (lp.chosen - lp.rejected)))

    step = jax.jit(jax.value_and_grad(loss))
    out[matmul] = step(params, batch)
    # "blas": the BLAS computes the weight gradients of each of the 2 layers' projections (7 Dense
    # layers; 6 products in the block-sparse path, where gate and up are one) and of the head.
    # "blas_all": each projection's forward, input gradient and weight gradient, and the head's
    # forward, the backward's recomputation of it (checkpointed chunks), input and weight gradients.
    calls = step.lower(params, batch).as_text().count("pofx_blas_matmul")
    per_layer = 7 if attention == "dense" else 6
    assert calls == {"xla": 0, "blas": 2 * per_layer + 1, "blas_all": 3 * 2 * per_layer + 4}[matmul], calls
  for matmul in ("blas", "blas_all"):
    np.testing.assert_allclose(out[matmul][0], out["xla"][0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(out[matmul][1]), jax.tree.leaves(out["xla"][1])):
      np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()) + 1e-9)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("save_probs", [False, True])
def test_head_products_by_blas_equal_xla(save_probs, library):
  kh, kw = jax.random.split(jax.random.key(1))
  h, w = jax.random.normal(kh, (45, 16)), 0.3 * jax.random.normal(kw, (16, 50))
  t = jnp.asarray(np.random.default_rng(0).integers(0, 50, 45))
  out = {m: jax.value_and_grad(lambda h, w: jnp.sum(logprobs.token_logps(  # noqa: B023
      h, w, t, chunk_size=16, save_probs=save_probs, matmul=m, blas=library).logps), argnums=(0, 1))(h, w)
      for m in ("xla", "blas", "blas_all")}
  for m in ("blas", "blas_all"):
    np.testing.assert_allclose(out[m][0], out["xla"][0], rtol=1e-5)
    for got, want in zip(out[m][1], out["xla"][1]):
      np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()))


def test_unknown_matmul_and_blas_names_are_refused():
  with pytest.raises(ValueError, match=r"LlamaConfig.matmul must be one of \('xla', 'blas', 'blas_all'\), got 'mkl'"):
    llama.preset("tiny", matmul="mkl")
  with pytest.raises(ValueError, match=r"matmul='mkl' is not allowed; allowed: \('xla', 'blas', 'blas_all'\)"):
    logprobs.token_logps(jnp.ones((2, 4)), jnp.ones((4, 8)), jnp.zeros((2,), jnp.int32), matmul="mkl")
  with pytest.raises(ValueError, match=r"LlamaConfig.blas must be one of \('auto', 'openblas', 'mkl'\), got 'atlas'"):
    llama.preset("tiny", matmul="blas", blas="atlas")
  with pytest.raises(ValueError, match=r"blas='atlas' is not allowed; allowed: \('auto', 'openblas', 'mkl'\)"):
    logprobs.token_logps(jnp.ones((2, 4)), jnp.ones((4, 8)), jnp.zeros((2,), jnp.int32), matmul="blas", blas="atlas")
  with pytest.raises(ValueError, match=r"unknown BLAS library 'atlas'; allowed: \('auto', 'openblas', 'mkl'\)"):
    native.matmul(jnp.ones((2, 3)), jnp.ones((3, 2)), library="atlas")


def test_auto_is_mkl_where_it_is_installed():
  # "auto" is MKL exactly when this process can load it (the `mkl` package of the test extra).
  assert native.resolve_blas("auto") == ("mkl" if native.blas_available("mkl") else "openblas")
  assert native.resolve_blas("openblas") == "openblas"
