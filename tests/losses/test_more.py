"""Numeric tests for MIPO, iLR-DPO, Flex-DPO (3D-properties) and MADPO (pofx/losses/_more.py).

Expected values: the worked example (pi_w=-10, pi_l=-12, ref_w=ref_l=-11, |y_w|=5, |y_l|=6) worked
out by hand in float64, the authors' formulas written again in float64 numpy (MIPO's
`mipo_loss`, MODPO's `modpo_loss` with the length penalty, MADPO's `MADPOLoss`), and identities
with other losses of the catalogue that follow from the formulas.
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx.losses import _more as mo
from tests.losses import worked

TOL = worked.TOL
_softplus = worked.softplus
_example_pair = worked.example
PAPERS = {"mipo": "2409.17545", "ilr_dpo": "2406.11817", "flex_dpo": "2406.07327", "madpo": "2510.05342"}


def _batch(seed=0, b=6):
  rng = np.random.default_rng(seed)
  pw, pl, rw, rl = (-rng.uniform(1.0, 40.0, b) for _ in range(4))
  lw, ll = (rng.integers(1, 30, b).astype(np.float64) for _ in range(2))
  vals = [np.asarray(v, np.float32).astype(np.float64) for v in (pw, pl, rw, rl, lw, ll)]
  f = lambda x: jnp.asarray(x, jnp.float32)
  pw, pl, rw, rl, lw, ll = vals
  return pofx.PairLogps(f(pw), f(pl), f(lw), f(ll)), pofx.PairLogps(f(rw), f(rl)), vals


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


# ---------------------------------------------------------------- MIPO


def test_mipo_worked_example():
  # a_w = -10/5 = -2 = a_l = -12/6; K = -11/5 + 11/6 = -11/30; q = log(1 + e^K);
  # L = -log sigmoid(20 * (0 - q)) = log(1 + e^{20 q}).
  k = -11.0 / 5.0 + 11.0 / 6.0
  q = math.log1p(math.exp(k))
  expected = math.log1p(math.exp(20.0 * q))
  np.testing.assert_allclose(mo.mipo(*_example_pair()), [expected], **TOL)
  k_out, q_out = mo.mipo_alignment(*_example_pair())
  np.testing.assert_allclose([k_out[0], q_out[0]], [k, q], **TOL)


def test_mipo_matches_the_authors_formula():
  # ncsoft/MIPO mipo_loss on average log-probs: K = ref_w - ref_l; -logsigmoid(beta (pi_w - pi_l - log(1 + e^K))).
  pol, ref, (pw, pl, rw, rl, lw, ll) = _batch(1)
  beta = 7.5
  k = rw / lw - rl / ll
  expected = -_log_sigmoid(beta * (pw / lw - pl / ll - np.log(1.0 + np.exp(k))))
  np.testing.assert_allclose(mo.mipo(pol, ref, beta=beta), expected, rtol=1e-5, atol=1e-5)


def test_mipo_with_a_badly_aligned_reference_is_the_reference_free_averaged_margin():
  # K << 0: q(K) ~ 0, so MIPO is SimPO with gamma = 0 (no reference intervention).
  pol, ref, _ = _batch(2)
  ref = ref.replace(chosen=ref.chosen - 1e3)
  np.testing.assert_allclose(
    mo.mipo(pol, ref, beta=3.0), pofx.losses.simpo(pol, beta=3.0, gamma_beta_ratio=0.0), rtol=1e-6, atol=1e-6
  )


def test_mipo_with_a_well_aligned_reference_targets_its_margin():
  # K >> 0: q(K) ~ K, so the loss is log 2 exactly where the policy's averaged margin equals K
  # (finite where the authors' log(1 + exp(K)) overflows float32).
  k = 120.0
  ref = pofx.PairLogps(worked.arr(0.0), worked.arr(-5.0 * k), worked.arr(5.0), worked.arr(5.0))
  pol = pofx.PairLogps(worked.arr(-1.0), worked.arr(-1.0 - 5.0 * k), worked.arr(5.0), worked.arr(5.0))
  np.testing.assert_allclose(mo.mipo(pol, ref), [math.log(2.0)], rtol=1e-5)


# ---------------------------------------------------------------- iLR-DPO


def test_ilr_dpo_worked_example():
  # beta rho = 0.2; alpha (|y_w| - |y_l|) = 0.01 * (5 - 6) = -0.01; L = log(1 + e^{-0.19}) = 0.602653.
  np.testing.assert_allclose(mo.ilr_dpo(*_example_pair(), alpha=0.01), [math.log1p(math.exp(-0.19))], **TOL)
  np.testing.assert_allclose(math.log1p(math.exp(-0.19)), 0.602653, atol=1e-6)


def test_ilr_dpo_matches_modpo_with_the_length_penalty():
  # MODPO: logits = (1/w0) [(beta lr_w - w1 m_w) - (beta lr_l - w1 m_l)], m(y) = -|y|, w = (1, alpha).
  pol, ref, (pw, pl, rw, rl, lw, ll) = _batch(3)
  beta, alpha = 0.2, 0.05
  m_w, m_l = -lw, -ll
  logits = (beta * (pw - rw) - alpha * m_w) - (beta * (pl - rl) - alpha * m_l)
  np.testing.assert_allclose(mo.ilr_dpo(pol, ref, alpha=alpha, beta=beta), _softplus(-logits), rtol=1e-5, atol=1e-5)


def test_ilr_dpo_alpha0_is_dpo_and_a_longer_chosen_lowers_the_loss():
  pol, ref, (_, _, _, _, lw, ll) = _batch(4)
  np.testing.assert_allclose(mo.ilr_dpo(pol, ref, alpha=0.0), pofx.losses.dpo(pol, ref), **TOL)
  more = np.asarray(mo.ilr_dpo(pol, ref, alpha=0.1)) - np.asarray(pofx.losses.dpo(pol, ref))
  differ = lw != ll
  assert differ.sum() >= 4
  assert np.all(np.sign(more[differ]) == -np.sign(lw - ll)[differ])


# ---------------------------------------------------------------- Flex-DPO (3D-properties)


def test_flex_dpo_worked_example():
  # 0.1 * lr_w - 0.08 * lr_l = 0.1 + 0.08 = 0.18; SFT term 0.5 * (10 / 5) = 1.0.
  np.testing.assert_allclose(mo.flex_dpo(*_example_pair()), [math.log1p(math.exp(-0.18))], **TOL)
  np.testing.assert_allclose(mo.flex_dpo(*_example_pair(), sft_weight=0.5), [math.log1p(math.exp(-0.18)) + 1.0], **TOL)


def test_flex_dpo_identities():
  pol, ref, _ = _batch(5)
  dpo = pofx.losses.dpo(pol, ref, beta=0.1)
  np.testing.assert_allclose(mo.flex_dpo(pol, ref, beta_rejected=0.1), dpo, **TOL)
  np.testing.assert_allclose(
    mo.flex_dpo(pol, ref, beta_chosen=0.2, beta_rejected=0.15),
    pofx.losses.dpo_shift(pol, ref, lam=0.75, beta=0.2),
    **TOL,
  )
  np.testing.assert_allclose(
    mo.flex_dpo(pol, ref, beta_rejected=0.1, sft_weight=0.3), pofx.losses.irpo(pol, ref, alpha=0.3), **TOL
  )


def test_flex_dpo_scales_the_rejected_gradient_by_the_beta_ratio():
  # d L / d pi_l = -(beta_rejected / beta_chosen) d L / d pi_w, for every pair (no SFT term).
  pol, ref, _ = _batch(6)
  g = jax.grad(lambda p: jnp.sum(mo.flex_dpo(p, ref, beta_chosen=0.1, beta_rejected=0.04)))(pol)
  np.testing.assert_allclose(g.rejected, -0.4 * g.chosen, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- MADPO


def _madpo_weights_numpy(h, c_max=2.0, c_min=0.5, lam=1.0, tau=math.log(999.0)):
  """The authors' MADPOLoss weight of the chosen response, in float64."""
  coef = c_min + (c_max - c_min) / (1.0 + (c_max - 1.0) / (1.0 - c_min) * np.exp(lam * (np.abs(h) - tau)))
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  return np.where(h > -tau, sig(coef * h) / sig(h), 1.0)


def test_madpo_worked_example():
  # h = 0.8 - 0.3 = 0.5; c = 0.5 + 1.5 / (1 + 2 e^{0.5 - log 999}); w = sigmoid(0.5 c) / sigmoid(0.5);
  # L = w * log(1 + e^{-0.2}) = 1.173688 * 0.598139 = 0.702029.
  c = 0.5 + 1.5 / (1.0 + 2.0 * math.exp(0.5) / 999.0)
  w = (1.0 + math.exp(-0.5)) / (1.0 + math.exp(-0.5 * c))
  got = mo.madpo(*_example_pair(), chosen_scores=worked.arr(0.8), rejected_scores=worked.arr(0.3))
  np.testing.assert_allclose(got, [w * math.log1p(math.exp(-0.2))], rtol=1e-6)
  np.testing.assert_allclose(w * math.log1p(math.exp(-0.2)), 0.702029, atol=1e-6)


def test_madpo_weights_match_the_authors_formula():
  h = np.array([-12.0, -6.9, -6.0, -1.0, -0.1, 0.0, 0.3, 1.0, 3.0, 6.0, 6.9, 8.0, 20.0])
  for kw in ({}, {"c_max": 3.0, "c_min": 0.25, "lam": 2.0, "tau": 2.0}):
    got = mo.madpo_weights(jnp.asarray(h, jnp.float32), jnp.zeros(len(h)), **kw)
    np.testing.assert_allclose(got, _madpo_weights_numpy(h, **kw), rtol=1e-5, atol=1e-6)


def test_madpo_amplifies_hard_pairs_and_dampens_easy_ones():
  tau = math.log(999.0)
  w = np.asarray(mo.madpo_weights(jnp.array([0.5, 3.0, tau, 10.0, -0.5, -tau - 0.5]), jnp.zeros(6)))
  assert w[0] > 1.0 and w[1] > 1.0  # hard (small positive margin)
  np.testing.assert_allclose(w[2], 1.0, rtol=1e-5)  # c(tau) = 1
  assert w[3] < 1.0  # easy
  assert w[4] < 1.0  # the reward model disagrees mildly
  assert w[5] == 1.0  # capped beyond -tau


def test_madpo_is_weighted_dpo_with_detached_scores():
  pol, ref, (pw, pl, rw, rl, _, _) = _batch(7)
  rng = np.random.default_rng(8)
  s_w, s_l = rng.normal(1.0, 3.0, 6), rng.normal(0.0, 3.0, 6)
  expected = _madpo_weights_numpy(s_w - s_l) * _softplus(-0.1 * ((pw - rw) - (pl - rl)))
  sw, sl = jnp.asarray(s_w, jnp.float32), jnp.asarray(s_l, jnp.float32)
  np.testing.assert_allclose(mo.madpo(pol, ref, chosen_scores=sw, rejected_scores=sl), expected, rtol=1e-5)
  g = jax.grad(lambda s: jnp.sum(mo.madpo(pol, ref, chosen_scores=s, rejected_scores=sl)))(sw)
  np.testing.assert_array_equal(g, np.zeros(6))
  # A pair whose margin is exactly tau has weight 1: DPO.
  at_tau = jnp.full(6, math.log(999.0), jnp.float32)
  np.testing.assert_allclose(
    mo.madpo(pol, ref, chosen_scores=at_tau, rejected_scores=jnp.zeros(6)), pofx.losses.dpo(pol, ref), rtol=1e-5
  )


# ---------------------------------------------------------------- validation and the registry


@pytest.mark.parametrize(
  "call,message",
  [
    (lambda p, r: mo.mipo(p, r, beta=0.0), "beta > 0"),
    (lambda p, r: mo.mipo(p, None), "reference"),
    (lambda p, r: mo.mipo(p.replace(chosen_len=None), r), "length"),
    (lambda p, r: mo.ilr_dpo(p, r, alpha=-0.1), "alpha >= 0"),
    (lambda p, r: mo.ilr_dpo(p.replace(rejected_len=None), r, alpha=0.1), "length"),
    (lambda p, r: mo.flex_dpo(p, r, beta_rejected=0.0), "beta_rejected > 0"),
    (lambda p, r: mo.flex_dpo(p, r, sft_weight=-1.0), "sft_weight >= 0"),
    (lambda p, r: mo.flex_dpo(p.replace(chosen_len=None), r, sft_weight=0.1), "length"),
    (lambda p, r: mo.madpo(p, r), "needs per-pair scores"),
    (lambda p, r: mo.madpo(p, r, chosen_scores=jnp.zeros(2), rejected_scores=jnp.zeros(6)), r"shape \(6,\)"),
    (lambda p, r: mo.madpo(p, r, chosen_scores=jnp.zeros(6), rejected_scores=jnp.zeros(6), c_max=1.0), "c_max > 1"),
    (lambda p, r: mo.madpo(p, r, chosen_scores=jnp.zeros(6), rejected_scores=jnp.zeros(6), c_min=1.0), "c_min"),
    (lambda p, r: mo.madpo(p, r, chosen_scores=jnp.zeros(6), rejected_scores=jnp.zeros(6), tau=0.0), "tau > 0"),
  ],
)
def test_bad_arguments_name_the_field(call, message):
  pol, ref, _ = _batch(9)
  with pytest.raises(ValueError, match=message):
    call(pol, ref)


def test_ilr_dpo_has_no_default_alpha():
  pol, ref, _ = _batch(10)
  with pytest.raises(ValueError, match=r"missing required argument\(s\) \['alpha'\]"):
    pofx.losses.batch_loss("ilr_dpo", pol, ref)


def test_every_new_loss_is_registered_with_its_paper():
  # `python -m pofx.losses` prints each spec's source (tests/losses/test_table.py runs it).
  for name, arxiv in PAPERS.items():
    spec = pofx.losses.spec(name)
    assert f"arXiv:{arxiv}" in spec.source and f"arXiv:{arxiv}" in inspect.getdoc(spec.fn), name
    assert spec.reference == "required"
