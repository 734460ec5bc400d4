"""Numeric tests for RPO (Liu et al.), IRPO, ASFT (pofx/losses/_regularised.py).

Expected values: the worked example (pi_w=-10, pi_l=-12, ref_w=ref_l=-11, beta=0.1, |y_w|=5,
|y_l|=6), each value worked out by hand in float64 from the paper's formula, and the formulas in
float64 numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx.losses import _regularised as rg
from tests.losses import worked

TOL = worked.TOL
_softplus = worked.softplus
_a = worked.arr

_example = worked.example


def _batch(seed=0, b=6, lw=None):
  rng = np.random.default_rng(seed)
  vals = [-rng.uniform(1.0, 40.0, b) for _ in range(4)]
  vals += [
    rng.integers(1, 30, b).astype(np.float64) if lw is None else np.full(b, float(lw)),
    rng.integers(1, 30, b).astype(np.float64),
  ]
  vals = [np.asarray(v, np.float32).astype(np.float64) for v in vals]
  pw, pl, rw, rl, len_w, len_l = vals
  f = lambda x: jnp.asarray(x, jnp.float32)
  return pofx.PairLogps(f(pw), f(pl), f(len_w), f(len_l)), pofx.PairLogps(f(rw), f(rl)), vals


# ---------------------------------------------------------------- worked examples (by hand, float64)


def test_rpo_golden():
  # 0.598139 + 0.005 * 0.1 * 10 = 0.603139.
  np.testing.assert_allclose(rg.rpo(*_example()), [0.603139], **TOL)


def test_irpo_golden():
  # 0.598139 + 1 * 10 / 5 = 2.598139.
  np.testing.assert_allclose(rg.irpo(*_example()), [2.598139], **TOL)


# ---------------------------------------------------------------- formulas on random batches


@pytest.mark.parametrize("form", ["sum", "mean"])
def test_rpo_matches_numpy(form):
  pol, ref, (pw, pl, rw, rl, lw, _) = _batch(1)
  beta, eta = 0.05, 0.2
  dpo = _softplus(-beta * ((pw - rw) - (pl - rl)))
  reg = -eta * beta * pw if form == "sum" else eta * (-pw / lw)
  np.testing.assert_allclose(rg.rpo(pol, ref, eta=eta, beta=beta, sft_form=form), dpo + reg, rtol=1e-6, atol=1e-5)


def test_irpo_matches_numpy():
  pol, ref, (pw, pl, rw, rl, lw, _) = _batch(2)
  expected = _softplus(-0.1 * ((pw - rw) - (pl - rl))) + 0.5 * (-pw / lw)
  np.testing.assert_allclose(rg.irpo(pol, ref, alpha=0.5), expected, rtol=1e-6, atol=1e-5)


def test_irpo_equal_lengths_matches_trl_batch_token_mean():
  # With equal chosen lengths, mean over pairs of the per-sequence NLL mean == TRL's token mean.
  pol, ref, (pw, pl, rw, rl, lw, _) = _batch(3, lw=9)
  trl_style = np.mean(_softplus(-0.1 * ((pw - rw) - (pl - rl)))) + 1.0 * (-pw.sum() / lw.sum())
  np.testing.assert_allclose(pofx.losses.batch_loss("irpo", pol, ref), trl_style, rtol=1e-6)


def test_asft_matches_numpy():
  pol, _, (pw, pl, _, _, lw, ll) = _batch(4)
  aw, al = pw / lw, pl / ll
  # -a_w + lam * [-log sigmoid(log odds_w) - log sigmoid(-log odds_l)], odds = P / (1 - P), P = exp(a).
  odds_w = np.log(np.exp(aw) / (1 - np.exp(aw)))
  odds_l = np.log(np.exp(al) / (1 - np.exp(al)))
  expected = -aw + 0.3 * (_softplus(-odds_w) + _softplus(odds_l))
  np.testing.assert_allclose(rg.asft(pol, lam=0.3), expected, rtol=1e-5, atol=1e-6)


def test_asft_closed_form():
  # Gorbatovski et al. 2025, App. C: L = -(1 + lam) log P(y_w) - lam log(1 - P(y_l)).
  pol, _ = _example()
  a_w, a_l = -2.0, -2.0
  expected = -(1.1) * a_w - 0.1 * np.log1p(-np.exp(a_l))
  np.testing.assert_allclose(rg.asft(pol, lam=0.1), [expected], **TOL)


def test_asft_is_pointwise():
  # Changing the rejected log-prob leaves the chosen gradient unchanged (no pairwise margin).
  pol, _, _ = _batch(5)
  grad_w = lambda p: jax.grad(lambda c: jnp.sum(rg.asft(p.replace(chosen=c), lam=0.5)))(p.chosen)
  np.testing.assert_allclose(grad_w(pol), grad_w(pol.replace(rejected=pol.rejected - 5.0)), **TOL)


def test_asft_finite_for_nonnegative_average_logp():
  pol = pofx.PairLogps(_a(0.0, -3.0), _a(-2.0, 0.0), _a(2.0, 2.0), _a(2.0, 2.0))
  val, g = jax.value_and_grad(lambda r: jnp.sum(rg.asft(pol.replace(rejected=r), lam=1.0)))(pol.rejected)
  assert np.isfinite(float(val)) and np.all(np.isfinite(g))


# ---------------------------------------------------------------- reduces-to identities


def test_rpo_eta0_is_dpo():
  pol, ref, _ = _batch(6)
  for form in ("sum", "mean"):
    np.testing.assert_allclose(rg.rpo(pol, ref, eta=0.0, sft_form=form), pofx.losses.dpo(pol, ref), **TOL)


def test_irpo_alpha0_is_dpo():
  pol, ref, _ = _batch(7)
  np.testing.assert_allclose(rg.irpo(pol, ref, alpha=0.0), pofx.losses.dpo(pol, ref), **TOL)


def test_rpo_mean_form_equals_irpo():
  # Both add a per-sequence token-mean NLL on the chosen completion.
  pol, ref, _ = _batch(8)
  np.testing.assert_allclose(rg.rpo(pol, ref, eta=0.7, sft_form="mean"), rg.irpo(pol, ref, alpha=0.7), **TOL)


def test_asft_lam0_is_chosen_sft():
  pol, _, (pw, _, _, _, lw, _) = _batch(9)
  np.testing.assert_allclose(rg.asft(pol, lam=0.0), -pw / lw, **TOL)


def test_asft_reference_ignored():
  pol, ref, _ = _batch(10)
  np.testing.assert_array_equal(rg.asft(pol, ref, lam=0.2), rg.asft(pol, None, lam=0.2))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "call,field",
  [
    (lambda p, r: rg.rpo(p, r, eta=-0.1), "eta"),
    (lambda p, r: rg.rpo(p, r, sft_form="token"), "sft_form"),
    (lambda p, r: rg.rpo(p, r, beta=0.0), "beta"),
    (lambda p, r: rg.rpo(p, None), "reference"),
    (lambda p, r: rg.rpo(p.replace(chosen_len=None), r, sft_form="mean"), "length"),
    (lambda p, r: rg.irpo(p, r, alpha=-1.0), "alpha"),
    (lambda p, r: rg.irpo(p, None), "reference"),
    (lambda p, r: rg.irpo(p.replace(chosen_len=None), r), "length"),
    (lambda p, r: rg.asft(p, lam=-0.5), "lam"),
    (lambda p, r: rg.asft(p.replace(rejected_len=None), lam=0.5), "length"),
  ],
)
def test_bad_hyperparameters_raise(call, field):
  with pytest.raises(ValueError, match=field):
    call(*_example())


def test_rpo_sum_form_needs_no_lengths():
  pol, ref = _example()
  np.testing.assert_allclose(rg.rpo(pol.replace(chosen_len=None, rejected_len=None), ref), [0.603139], **TOL)


def test_asft_lam_is_required():
  with pytest.raises(ValueError, match=r"missing required argument\(s\) \['lam'\]"):
    pofx.losses.batch_loss("asft", *_example())
