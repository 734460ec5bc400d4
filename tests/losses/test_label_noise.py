"""Numeric tests for cDPO, robust DPO, FocalPO (pofx/losses/_label_noise.py).

Expected values: the worked example (beta*rho = 0.2), each value worked out by hand in float64
from the paper's formula, and the formulas in float64 numpy below; plus the statistical
identities the papers state (cDPO is the DPO loss
averaged over flipped labels; the robust estimator is unbiased for the clean DPO loss).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx.losses import _label_noise as ln
from tests.losses import worked

TOL = worked.TOL
_softplus = worked.softplus
_a = worked.arr

_example = worked.example


def _batch(seed=0, b=6):
  rng = np.random.default_rng(seed)
  vals = [np.asarray(-rng.uniform(1.0, 40.0, b), np.float32) for _ in range(4)]
  f = lambda x: jnp.asarray(x, jnp.float32)
  pw, pl, rw, rl = vals
  rho = (pw.astype(np.float64) - rw) - (pl.astype(np.float64) - rl)
  return pofx.PairLogps(f(pw), f(pl)), pofx.PairLogps(f(rw), f(rl)), rho


def _swap(p):
  return p.replace(chosen=p.rejected, rejected=p.chosen)


# ---------------------------------------------------------------- worked examples (by hand, float64)


def test_cdpo_golden():
  np.testing.assert_allclose(ln.cdpo(*_example(), eps=0.1), [0.618139], **TOL)


def test_robust_golden():
  np.testing.assert_allclose(ln.robust_dpo(*_example(), eps=0.1), [0.573139], **TOL)
  np.testing.assert_allclose(ln.robust_dpo(*_example()), [0.573139], **TOL)  # default eps = 0.1


@pytest.mark.parametrize("gamma,expected", [(0.05, 0.580515), (0.5, 0.443525), (1.0, 0.328877), (2.0, 0.180828)])
@pytest.mark.parametrize("detach", [False, True])
def test_focalpo_golden(gamma, expected, detach):
  np.testing.assert_allclose(ln.focalpo(*_example(), gamma=gamma, detach_weight=detach), [expected], **TOL)


# ---------------------------------------------------------------- formulas on random batches


def test_cdpo_matches_numpy():
  pol, ref, rho = _batch(1)
  v = 0.2 * rho
  np.testing.assert_allclose(
    ln.cdpo(pol, ref, eps=0.25, beta=0.2), 0.75 * _softplus(-v) + 0.25 * _softplus(v), rtol=1e-6, atol=1e-5
  )


def test_robust_matches_numpy():
  pol, ref, rho = _batch(2)
  v = 0.1 * rho
  expected = (0.7 * _softplus(-v) - 0.3 * _softplus(v)) / 0.4
  np.testing.assert_allclose(ln.robust_dpo(pol, ref, eps=0.3), expected, rtol=1e-6, atol=1e-5)


def test_focalpo_matches_numpy():
  pol, ref, rho = _batch(3)
  v = 0.1 * rho
  p = 1.0 / (1.0 + np.exp(-v))
  np.testing.assert_allclose(ln.focalpo(pol, ref, gamma=1.5), -(p**1.5) * np.log(p), rtol=1e-6, atol=1e-5)


def test_focalpo_gradients_with_and_without_detach():
  # L = -p^g log p, p = sigmoid(v), v = beta*rho; dL/dpi_w = beta * dL/dv.
  #   through the factor: dL/dv = -p^g (1 - p) (g log p + 1)
  #   detached factor:    dL/dv = -p^g (1 - p)
  pol, ref, rho = _batch(4)
  beta, g = 0.1, 2.0
  v = beta * rho
  p = 1.0 / (1.0 + np.exp(-v))
  full = -beta * p**g * (1 - p) * (g * np.log(p) + 1.0)
  detached = -beta * p**g * (1 - p)

  def grad(detach):
    return jax.grad(lambda c: jnp.sum(ln.focalpo(pol.replace(chosen=c), ref, gamma=g, detach_weight=detach)))(
      pol.chosen
    )

  np.testing.assert_allclose(grad(False), full, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad(True), detached, rtol=1e-5, atol=1e-7)


def test_focalpo_downweights_misranked_pairs():
  # Relative to DPO, a correctly ranked pair keeps more of its loss than a misranked one.
  pol, ref = _example()
  good = ln.focalpo(pol, ref, gamma=1.0) / pofx.losses.dpo(pol, ref)
  bad = ln.focalpo(_swap(pol), _swap(ref), gamma=1.0) / pofx.losses.dpo(_swap(pol), _swap(ref))
  assert float(good[0]) > float(bad[0])


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize(
  "fn",
  [
    lambda p, r: ln.cdpo(p, r, eps=0.0),
    lambda p, r: ln.robust_dpo(p, r, eps=0.0),
    lambda p, r: ln.focalpo(p, r, gamma=0.0),
  ],
  ids=["cdpo", "robust", "focalpo"],
)
def test_zero_noise_is_dpo(fn):
  pol, ref, _ = _batch(5)
  np.testing.assert_allclose(fn(pol, ref), pofx.losses.dpo(pol, ref), **TOL)


def test_cdpo_is_dpo_averaged_over_flipped_labels():
  pol, ref, _ = _batch(6)
  eps = 0.2
  expected = (1 - eps) * pofx.losses.dpo(pol, ref) + eps * pofx.losses.dpo(_swap(pol), _swap(ref))
  np.testing.assert_allclose(ln.cdpo(pol, ref, eps=eps), expected, **TOL)


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.45])
def test_robust_is_unbiased_under_label_flips(eps):
  # E_flip[robust] = (1 - eps) robust(y_w > y_l) + eps robust(y_l > y_w) = clean DPO loss.
  pol, ref, _ = _batch(7)
  mixed = (1 - eps) * ln.robust_dpo(pol, ref, eps=eps) + eps * ln.robust_dpo(_swap(pol), _swap(ref), eps=eps)
  np.testing.assert_allclose(mixed, pofx.losses.dpo(pol, ref), rtol=1e-5, atol=1e-5)


def test_cdpo_minimised_at_finite_margin():
  # d/dv [(1-eps) sp(-v) + eps sp(v)] = 0 at v* = log((1 - eps) / eps).
  eps = 0.1
  v_star = np.log((1 - eps) / eps)
  g = jax.grad(lambda v: ln.smoothed_logistic(v, eps))(jnp.float32(v_star))
  np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_robust_finite_at_extreme_margins():
  for sign in (1.0, -1.0):
    pol = pofx.PairLogps(_a(-1.0 if sign > 0 else -1e4), _a(-1e4 if sign > 0 else -1.0))
    ref = pofx.PairLogps(_a(-1.0), _a(-1.0))
    val, g = jax.value_and_grad(lambda c: jnp.sum(ln.robust_dpo(pol.replace(chosen=c), ref)))(pol.chosen)
    assert np.isfinite(float(val)) and np.all(np.isfinite(g))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "call,field",
  [
    (lambda p, r: ln.cdpo(p, r, eps=0.6), "eps"),
    (lambda p, r: ln.cdpo(p, r, eps=-0.1), "eps"),
    (lambda p, r: ln.robust_dpo(p, r, eps=0.5), "eps"),
    (lambda p, r: ln.robust_dpo(p, r, beta=0.0), "beta"),
    (lambda p, r: ln.focalpo(p, r, gamma=-1.0), "gamma"),
    (lambda p, r: ln.focalpo(p, r, gamma=1.0, detach_weight="no"), "detach_weight"),
    (lambda p, r: ln.cdpo(p, None, eps=0.1), "reference"),
    (lambda p, r: ln.focalpo(p, None, gamma=1.0), "reference"),
  ],
)
def test_bad_hyperparameters_raise(call, field):
  with pytest.raises(ValueError, match=field):
    call(*_example())


@pytest.mark.parametrize("name,missing", [("cdpo", "eps"), ("focalpo", "gamma")])
def test_required_hyperparameters(name, missing):
  with pytest.raises(ValueError, match=rf"missing required argument\(s\) \['{missing}'\]"):
    pofx.losses.batch_loss(name, *_example())
