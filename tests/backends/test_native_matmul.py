"""The CPU backend's BLAS products (numpy's OpenBLAS and Intel MKL through XLA's FFI) against float64
NumPy, and the products its `dot_general` computes in a Llama block and the LM head against XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import kernels as kernels_lib
from pofx import logprobs
from pofx_backends import cpu
from pofx_backends.cpu import calibration, native

pytestmark = pytest.mark.skipif(not native.blas_available(), reason=f"{native.blas_unavailable_reason()}")

# Each library where this process can use it; the other is skipped with the reason.
LIBRARIES = [
  pytest.param(
    name,
    marks=pytest.mark.skipif(not native.blas_available(name), reason=f"{name}: {native.blas_unavailable_reason(name)}"),
  )
  for name in native.BLAS_LIBRARIES
]


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
    jnp.asarray(np.ascontiguousarray(a_in), jnp.float32), jnp.asarray(np.ascontiguousarray(b_in), jnp.float32)
  )
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


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_product_value_and_gradients_equal_the_xla_dot(transpose_a, transpose_b):
  # Every transpose form of the differentiable product; with all_products=False only the products
  # that contract their left operand's leading axis (x^T y) go to the BLAS.
  ka, kb, kg = jax.random.split(jax.random.key(2), 3)
  a = jax.random.normal(ka, (33, 20) if transpose_a else (20, 33))
  b = jax.random.normal(kb, (41, 33) if transpose_b else (33, 41))
  proj = jax.random.normal(kg, (20, 41))
  op = lambda x, t: x.T if t else x
  f = lambda mm: jax.value_and_grad(lambda a, b: jnp.sum(jnp.tanh(mm(a, b)) * proj), argnums=(0, 1))(a, b)
  want_value, want_grads = f(lambda a, b: op(a, transpose_a) @ op(b, transpose_b))
  for all_products in (False, True):
    mm = lambda a, b: native.product(
      a,
      b,
      transpose_a=transpose_a,
      transpose_b=transpose_b,  # noqa: B023
      all_products=all_products,
    )  # noqa: B023
    got_value, got_grads = jax.jit(lambda: f(mm))()  # noqa: B023
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for got, want in zip(got_grads, want_grads):
      np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("products", ["blas", "blas_all"])
def test_dot_general_forms_equal_lax_and_others_fall_back(products):
  dot = cpu.kernels(products=products, attention=False).dot_general
  assert isinstance(dot, cpu.BlasDotGeneral)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  h = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
  cases = [
    (x, w, (((2,), (0,)), ((), ()))),  # x [..., D] . w [D, F] (flattened inside)
    (g, w, (((1,), (1,)), ((), ()))),  # G W^T
    (h, g, (((0,), (0,)), ((), ()))),  # h^T G
    (x, x, (((2,), (2,)), ((0,), (0,)))),  # batch dimensions: jax.lax.dot_general
    (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (((2,), (0,)), ((), ()))),
  ]  # not float32
  for lhs, rhs, dims in cases:
    f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    want = np.einsum(_einsum(dims, lhs.ndim, rhs.ndim), f64(lhs), f64(rhs))
    got = jax.jit(lambda a, b: dot(a, b, dims))(lhs, rhs)  # noqa: B023
    assert got.dtype == jax.lax.dot_general(lhs, rhs, dims).dtype and got.shape == want.shape
    np.testing.assert_allclose(
      np.asarray(got, np.float64),
      want,
      rtol=2e-2 if lhs.dtype == jnp.bfloat16 else 1e-5,
      atol=5e-2 if lhs.dtype == jnp.bfloat16 else 1e-5,
    )
  text = jax.jit(lambda a, b: dot(a, b, (((2,), (2,)), ((0,), (0,))))).lower(x, x).as_text()
  assert "pofx_blas_matmul" not in text


def _einsum(dims, lhs_ndim, rhs_ndim):
  """The einsum subscripts of `dot_general` dimension numbers (batch, lhs free, rhs free)."""
  (lc, rc), (lb, rb) = dims
  letters = iter("abcdefghij")
  lhs, rhs = [None] * lhs_ndim, [None] * rhs_ndim
  for i, j in zip(lb, rb):
    lhs[i] = rhs[j] = next(letters)
  for i, j in zip(lc, rc):
    lhs[i] = rhs[j] = next(letters)
  batch = [lhs[i] for i in lb]
  for i in range(lhs_ndim):
    lhs[i] = lhs[i] or next(letters)
  for j in range(rhs_ndim):
    rhs[j] = rhs[j] or next(letters)
  out = (
    batch
    + [lhs[i] for i in range(lhs_ndim) if i not in lb and i not in lc]
    + [rhs[j] for j in range(rhs_ndim) if j not in rb and j not in rc]
  )
  return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("products", ["blas", "blas_all"])
def test_llama_block_loss_and_gradients_with_blas_products_equal_xla(products, library):
  # The calibration workload (one Llama block with rope, block-sparse attention by the XLA op here,
  # the LM head's chunked log-probs) through the CPU kernels' dot_general and through XLA's.
  shapes = calibration.Shapes(rows=2, length=128, segment=48, width=64, heads=4, kv_heads=2, mlp=96, vocab=300)
  params, x, targets, mask, rope = calibration._inputs(shapes)
  kernels = cpu.kernels(blas=library, products=products, attention=False)
  out = {}
  for name, k in (("xla", kernels_lib.XLA), (products, kernels)):
    step = jax.jit(jax.value_and_grad(lambda p: calibration._loss(k, shapes, p, x, targets, mask, rope)))  # noqa: B023
    out[name] = step(params)
    # "blas": the weight gradients of the 6 projections and of the head; "blas_all": each
    # projection's forward, input and weight gradient, and the head's forward, its recomputation
    # (checkpointed chunks), input and weight gradients.
    calls = step.lower(params).as_text().count("pofx_blas_matmul")
    assert calls == {"xla": 0, "blas": 6 + 1, "blas_all": 3 * 6 + 4}[name], calls
  np.testing.assert_allclose(out[products][0], out["xla"][0], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(out[products][1]), jax.tree.leaves(out["xla"][1])):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()) + 1e-9)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("save_probs", [False, True])
def test_head_products_by_blas_equal_xla(save_probs, library):
  kh, kw = jax.random.split(jax.random.key(1))
  h, w = jax.random.normal(kh, (45, 16)), 0.3 * jax.random.normal(kw, (16, 50))
  t = jnp.asarray(np.random.default_rng(0).integers(0, 50, 45))
  dots = {
    "xla": jax.lax.dot_general,
    **{p: cpu.kernels(blas=library, products=p, attention=False).dot_general for p in ("blas", "blas_all")},
  }
  out = {
    m: jax.value_and_grad(
      lambda h, w: jnp.sum(
        logprobs.token_logps(  # noqa: B023
          h, w, t, chunk_size=16, save_probs=save_probs, dot_general=dot
        ).logps
      ),
      argnums=(0, 1),
    )(h, w)  # noqa: B023
    for m, dot in dots.items()
  }
  for m in ("blas", "blas_all"):
    np.testing.assert_allclose(out[m][0], out["xla"][0], rtol=1e-5)
    for got, want in zip(out[m][1], out["xla"][1]):
      np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()))


def test_unknown_options_are_refused():
  with pytest.raises(ValueError, match=r"products='mkl' is not allowed; allowed: \('xla', 'blas', 'blas_all'\)"):
    cpu.kernels(products="mkl")
  with pytest.raises(ValueError, match=r"blas='atlas' is not allowed; allowed: \('auto', 'openblas', 'mkl'\)"):
    cpu.kernels(blas="atlas")
  with pytest.raises(ValueError, match=r"unknown BLAS library 'atlas'; allowed: \('auto', 'openblas', 'mkl'\)"):
    native.matmul(jnp.ones((2, 3)), jnp.ones((3, 2)), library="atlas")


def test_auto_is_mkl_where_it_is_installed():
  # "auto" is MKL exactly when this process can load it (the `mkl` package of the test extra).
  assert native.resolve_blas("auto") == ("mkl" if native.blas_available("mkl") else "openblas")
  assert native.resolve_blas("openblas") == "openblas"
