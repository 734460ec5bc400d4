"""`pofx_backends.cpu.split.split_batch`: a denoiser call as independent calls on batch slices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx.diffusion import pairs, schedules
from pofx_backends.cpu import split
from tests.diffusion import standin


def _inputs(batch=6):
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (batch, 4, 4, 1))
  t = jax.random.randint(k[1], (batch,), 0, 1000)
  cond = jax.random.randint(k[2], (batch,), 0, standin.NUM_CLASSES)
  return x, t, cond


@pytest.mark.parametrize("parts", [2, 3])
def test_values_equal_one_call_per_example_and_the_program_holds_parts_calls(parts):
  params = standin.init(jax.random.key(1))
  x, t, cond = _inputs()
  f = jax.jit(split.split_batch(standin.denoise, parts))
  got = np.asarray(f(params, x, t, cond))
  # Independent of the split: the stand-in applied to each example alone.
  want = np.concatenate(
    [np.asarray(standin.denoise(params, x[i : i + 1], t[i : i + 1], cond[i : i + 1])) for i in range(6)]
  )
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  hlo = f.lower(params, x, t, cond).as_text()
  assert hlo.count("convolution(") == parts  # one convolution per slice: the calls stay separate
  assert split.split_batch(standin.denoise, 1) is standin.denoise


def test_pair_errors_and_their_gradient_through_the_split_equal_one_call():
  params = standin.init(jax.random.key(2))
  rng = np.random.default_rng(0)
  batch = {
    "pairs": pairs.ImagePairs(
      chosen=rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32),
      rejected=rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32),
      class_labels=np.array([0, 1, 2], np.int32),
      noise_keys=rng.integers(0, 2**32, (3, 2), dtype=np.uint32),
      pair_mask=np.ones(3, np.float32),
    )
  }
  schedule = schedules.linear()

  def objective(denoise):
    fn = pairs.make_logps_fn(denoise, schedule)
    return jax.value_and_grad(lambda p: jnp.sum(fn(p, batch).chosen - 2.0 * fn(p, batch).rejected))(params)

  v1, g1 = objective(standin.denoise)
  v2, g2 = objective(split.split_batch(standin.denoise, 2))  # [chosen; rejected] as two calls
  np.testing.assert_allclose(v2, v1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_parts_are_refused():
  for parts in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="allowed: an integer >= 1"):
      split.split_batch(standin.denoise, parts)
  x, t, cond = _inputs(batch=5)
  with pytest.raises(ValueError, match="cannot be split into 2 equal parts"):
    split.split_batch(standin.denoise, 2)(standin.init(jax.random.key(0)), x, t, cond)
