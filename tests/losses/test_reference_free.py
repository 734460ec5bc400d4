"""Numeric tests for SimPO, CPO, ORPO, RePO (pofx/losses/_reference_free.py).

Expected values come from (a) the worked example (pi_w=-10, pi_l=-12, |y_w|=5, |y_l|=6), each
value worked out by hand in float64 from the paper's formula, and (b) the papers' formulas written out in float64
numpy below, never from pofx.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx.losses import _reference_free as rf

TOL = dict(rtol=1e-6, atol=1e-6)


def _softplus(x):
  return np.logaddexp(0.0, x)


def _example():
  a = lambda *x: jnp.array(x, jnp.float32)
  return pofx.PairLogps(a(-10.0), a(-12.0), a(5.0), a(6.0))


def _batch(seed=0, b=6):
  rng = np.random.default_rng(seed)
  pi_w = -rng.uniform(1.0, 40.0, b)
  pi_l = -rng.uniform(1.0, 40.0, b)
  len_w = rng.integers(1, 30, b).astype(np.float64)
  len_l = rng.integers(1, 30, b).astype(np.float64)
  pol = pofx.PairLogps(*(jnp.asarray(x, jnp.float32) for x in (pi_w, pi_l, len_w, len_l)))
  # Expected values use the float32-rounded inputs, in float64.
  return pol, [np.asarray(x, np.float32).astype(np.float64) for x in (pi_w, pi_l, len_w, len_l)]


# ---------------------------------------------------------------- worked examples (by hand, float64)


def test_simpo_golden_defaults():
  # a_w = a_l = -2, beta=2, gamma/beta=0.25 -> -log sigmoid(-0.5) = 0.974077.
  np.testing.assert_allclose(rf.simpo(_example()), [0.974077], **TOL)


def test_simpo_golden_llama3_instruct_setting():
  np.testing.assert_allclose(rf.simpo(_example(), beta=2.5, gamma_beta_ratio=0.55), [1.600413], **TOL)


def test_repo_golden():
  np.testing.assert_allclose(rf.repo(_example(), gamma=0.4), [0.4], **TOL)
  np.testing.assert_allclose(rf.repo(_example()), [0.4], **TOL)  # default gamma = 0.4


def test_cpo_golden():
  # softplus(-0.1 * 2) + 10/5 = 2.598139.
  np.testing.assert_allclose(rf.cpo(_example()), [2.598139], **TOL)


def test_orpo_equal_average_logps_has_zero_log_odds():
  # a_w = a_l = -2 -> log OR = 0 -> L = 2 + lam * log 2.
  np.testing.assert_allclose(rf.orpo(_example(), lam=0.1), [2.0 + 0.1 * np.log(2.0)], **TOL)


# ---------------------------------------------------------------- formulas on random batches


@pytest.mark.parametrize("beta,ratio,eps,sft", [(2.0, 0.25, 0.0, 0.0), (10.0, 0.3, 0.1, 0.5), (0.7, 0.0, 0.3, 1.0)])
def test_simpo_matches_numpy(beta, ratio, eps, sft):
  pol, (pw, pl, lw, ll) = _batch(1)
  z = beta * ((pw / lw - pl / ll) - ratio)
  expected = (1 - eps) * _softplus(-z) + eps * _softplus(z) + sft * (-pw / lw)
  got = rf.simpo(pol, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps, sft_weight=sft)
  np.testing.assert_allclose(got, expected, **TOL)


def test_simpo_hinge_matches_numpy():
  pol, (pw, pl, lw, ll) = _batch(2)
  z = 2.0 * ((pw / lw - pl / ll) - 0.5)
  np.testing.assert_allclose(
    rf.simpo(pol, beta=2.0, gamma_beta_ratio=0.5, loss_type="hinge"), np.maximum(0.0, 1.0 - z), **TOL
  )


def test_simpo_gradient_is_length_normalised():
  # dL/dpi_w = -(beta / |y_w|) sigmoid(-z), dL/dpi_l = +(beta / |y_l|) sigmoid(-z).
  pol, (pw, pl, lw, ll) = _batch(3)
  beta, ratio = 2.0, 0.25
  z = beta * ((pw / lw - pl / ll) - ratio)
  sig_neg = 1.0 / (1.0 + np.exp(z))
  g = jax.grad(lambda c, r: jnp.sum(rf.simpo(pol.replace(chosen=c, rejected=r))), argnums=(0, 1))(
    pol.chosen, pol.rejected
  )
  np.testing.assert_allclose(g[0], -beta / lw * sig_neg, **TOL)
  np.testing.assert_allclose(g[1], beta / ll * sig_neg, **TOL)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_cpo_matches_numpy(loss_type):
  pol, (pw, pl, lw, ll) = _batch(4)
  z = 0.1 * (pw - pl)
  pref = _softplus(-z) if loss_type == "sigmoid" else np.maximum(0.0, 1.0 - z)
  np.testing.assert_allclose(rf.cpo(pol, cpo_alpha=0.7, loss_type=loss_type), pref + 0.7 * (-pw / lw), **TOL)


def test_orpo_matches_numpy():
  pol, (pw, pl, lw, ll) = _batch(5)
  aw, al = pw / lw, pl / ll
  log_odds = (aw - al) - (np.log1p(-np.exp(aw)) - np.log1p(-np.exp(al)))
  expected = -aw + 0.25 * _softplus(-log_odds)
  np.testing.assert_allclose(rf.orpo(pol, lam=0.25), expected, rtol=1e-5, atol=1e-6)


def test_orpo_close_to_zero_average_logp():
  # a = -1e-3: log(1 - e^a) ~ log(1e-3), where float32 log1p(-exp(a)) loses digits; a = -30 is
  # where log(-expm1(a)) would. The float64 reference log1p(-exp(a)) is accurate at all three.
  a = jnp.array([-1e-3, -0.5, -30.0], jnp.float32)
  expected = np.log1p(-np.exp(np.asarray(a, np.float64)))
  np.testing.assert_allclose(rf.log1m_exp(a), expected, rtol=1e-6)


def test_orpo_finite_for_nonnegative_average_logp():
  # Log-probs >= 0 are impossible but must not produce NaN (clamped at -1e-6).
  a = lambda *x: jnp.array(x, jnp.float32)
  pol = pofx.PairLogps(a(0.0, 1e-3), a(-5.0, 0.0), a(3.0, 3.0), a(2.0, 2.0))
  val, grads = jax.value_and_grad(lambda c, r: jnp.sum(rf.orpo(pol.replace(chosen=c, rejected=r))), argnums=(0, 1))(
    pol.chosen, pol.rejected
  )
  assert np.isfinite(float(val)) and np.all(np.isfinite(grads[0])) and np.all(np.isfinite(grads[1]))


def test_repo_matches_numpy():
  pol, (pw, pl, lw, ll) = _batch(6)
  np.testing.assert_allclose(rf.repo(pol, gamma=0.6), np.maximum(0.0, 0.6 - (pw / lw - pl / ll)), **TOL)


# ---------------------------------------------------------------- reduces-to identities


def _length_normalised(pol):
  return pol.replace(chosen=pol.chosen / pol.chosen_len, rejected=pol.rejected / pol.rejected_len)


def test_simpo_gamma0_is_length_normalised_reference_free_logistic():
  pol, _ = _batch(7)
  np.testing.assert_allclose(
    rf.simpo(pol, beta=2.0, gamma_beta_ratio=0.0),
    pofx.losses.gpo(_length_normalised(pol), None, f="logistic", beta=2.0),
    **TOL,
  )


def test_simpo_hinge_is_gpo_hinge_on_shifted_margin():
  pol, _ = _batch(8)
  shifted = _length_normalised(pol)
  shifted = shifted.replace(chosen=shifted.chosen - 0.3)
  np.testing.assert_allclose(
    rf.simpo(pol, beta=3.0, gamma_beta_ratio=0.3, loss_type="hinge"),
    pofx.losses.gpo(shifted, None, f="hinge", beta=3.0),
    **TOL,
  )


def test_cpo_alpha0_is_reference_free_dpo():
  pol, _ = _batch(9)
  np.testing.assert_allclose(rf.cpo(pol, cpo_alpha=0.0), pofx.losses.gpo(pol, None, f="logistic", beta=0.1), **TOL)


def test_orpo_lam0_is_chosen_sft():
  pol, (pw, _, lw, _) = _batch(10)
  np.testing.assert_allclose(rf.orpo(pol, lam=0.0), -pw / lw, **TOL)


def test_repo_is_scaled_hinge():
  # max(0, gamma - m) = gamma * hinge(m / gamma).
  pol, _ = _batch(11)
  np.testing.assert_allclose(
    rf.repo(pol, gamma=0.5), 0.5 * pofx.losses.gpo(_length_normalised(pol), None, f="hinge", beta=2.0), **TOL
  )


def test_simpo_large_beta_approaches_repo():
  # SimPO / beta -> max(0, gamma/beta - m) as beta -> inf (RePO's derivation).
  pol, _ = _batch(12)
  beta = 2000.0
  np.testing.assert_allclose(rf.simpo(pol, beta=beta, gamma_beta_ratio=0.4) / beta, rf.repo(pol, gamma=0.4), atol=1e-3)


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo", "repo"])
def test_reference_is_ignored(name):
  pol, _ = _batch(13)
  ref, _ = _batch(14)
  fn = getattr(rf, name)
  np.testing.assert_array_equal(fn(pol, ref), fn(pol, None))
  assert pofx.losses.spec(name).reference == "unused"


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "call,field",
  [
    (lambda p: rf.simpo(p, beta=0.0), "beta"),
    (lambda p: rf.simpo(p, gamma_beta_ratio=-0.1), "gamma_beta_ratio"),
    (lambda p: rf.simpo(p, loss_type="ipo"), "loss_type"),
    (lambda p: rf.simpo(p, label_smoothing=0.6), "label_smoothing"),
    (lambda p: rf.simpo(p, sft_weight=-1.0), "sft_weight"),
    (lambda p: rf.simpo(p, loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    (lambda p: rf.cpo(p, beta=-1.0), "beta"),
    (lambda p: rf.cpo(p, cpo_alpha=-0.5), "cpo_alpha"),
    (lambda p: rf.cpo(p, loss_type="simpo"), "loss_type"),
    (lambda p: rf.orpo(p, lam=-0.1), "lam"),
    (lambda p: rf.repo(p, gamma=0.0), "gamma"),
  ],
)
def test_bad_hyperparameters_raise(call, field):
  with pytest.raises(ValueError, match=field):
    call(_example())


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo", "repo"])
def test_missing_lengths_raise(name):
  pol = _example().replace(chosen_len=None, rejected_len=None)
  with pytest.raises(ValueError, match="length"):
    getattr(rf, name)(pol)


def test_registered_with_lengths_requirement():
  for name in ("simpo", "cpo", "orpo", "repo"):
    assert "lengths" in pofx.losses.spec(name).requires
