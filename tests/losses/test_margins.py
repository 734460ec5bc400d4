"""Numeric tests for DPOP, ODPO, DPO-Shift (+ schedule), LN-DPO, MaPPO (pofx/losses/_margins.py).

Expected values: the worked example (pi_w=-10, pi_l=-12, ref_w=ref_l=-11, beta=0.1, |y_w|=5,
|y_l|=6), each value worked out by hand in float64 from the paper's formula, and the formulas
written out in float64 numpy below.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx.losses import _margins as mg
from tests.losses import worked

TOL = worked.TOL
_softplus = worked.softplus
_a = worked.arr

_example = worked.example


def _batch(seed=0, b=6):
  rng = np.random.default_rng(seed)
  vals = [-rng.uniform(1.0, 40.0, b) for _ in range(4)] + [rng.integers(1, 30, b).astype(np.float64) for _ in range(2)]
  vals = [np.asarray(v, np.float32).astype(np.float64) for v in vals]
  pw, pl, rw, rl, lw, ll = vals
  f = lambda x: jnp.asarray(x, jnp.float32)
  return pofx.PairLogps(f(pw), f(pl), f(lw), f(ll)), pofx.PairLogps(f(rw), f(rl), f(lw), f(ll)), vals


def _scores(seed=0, b=6):
  rng = np.random.default_rng(seed + 50)
  s_w = np.asarray(rng.uniform(0.55, 1.0, b), np.float32)
  s_l = np.asarray(rng.uniform(0.05, 0.45, b), np.float32)
  return jnp.asarray(s_w), jnp.asarray(s_l), s_w.astype(np.float64), s_l.astype(np.float64)


# ---------------------------------------------------------------- worked examples (by hand, float64)


def test_dpop_golden_penalty_inactive_is_dpo():
  np.testing.assert_allclose(mg.dpop(*_example()), [0.598139], **TOL)


def test_dpop_golden_alternative_point():
  # pi_w = -11.5: rho = 0.5, penalty 0.5 -> DPO 0.668460, DPOP(lam=50) 2.532772.
  pol, ref = _example(-11.5)
  np.testing.assert_allclose(pofx.losses.dpo(pol, ref), [0.668460], **TOL)
  np.testing.assert_allclose(mg.dpop(pol, ref, lam=50.0), [2.532772], **TOL)


def test_odpo_golden():
  np.testing.assert_allclose(mg.odpo(*_example(), chosen_scores=_a(3.0), rejected_scores=_a(1.0)), [0.969817], **TOL)


def test_dpo_shift_golden():
  np.testing.assert_allclose(mg.dpo_shift(*_example(), lam=0.95), [0.600393], **TOL)


def test_ln_dpo_golden():
  np.testing.assert_allclose(mg.ln_dpo(*_example(), beta=0.1), [0.674982], **TOL)


def test_mappo_golden():
  np.testing.assert_allclose(mg.mappo(*_example(), chosen_scores=_a(0.8), rejected_scores=_a(0.3)), [0.620957], **TOL)


# ---------------------------------------------------------------- formulas on random batches


def test_dpop_matches_numpy():
  pol, ref, (pw, pl, rw, rl, _, _) = _batch(1)
  z = 0.3 * ((pw - rw) - (pl - rl) - 7.0 * np.maximum(0.0, rw - pw))
  np.testing.assert_allclose(mg.dpop(pol, ref, lam=7.0, beta=0.3), _softplus(-z), rtol=1e-6, atol=1e-5)


def test_dpop_gradient_includes_penalty():
  # Penalty active (pi_w < ref_w): dL/dpi_w = -beta (1 + lam) sigmoid(-z).
  pol, ref = _example(-11.5)
  z = 0.1 * (0.5 - 50.0 * 0.5)
  g = jax.grad(lambda c: jnp.sum(mg.dpop(pol.replace(chosen=c), ref)))(pol.chosen)
  np.testing.assert_allclose(g, [-0.1 * 51.0 / (1.0 + np.exp(z))], **TOL)


@pytest.mark.parametrize("ratio", [False, True])
def test_odpo_matches_numpy(ratio):
  pol, ref, (pw, pl, rw, rl, _, _) = _batch(2)
  sw_j, sl_j, sw, sl = _scores(2)
  offset = 0.5 * (np.log(sw / sl) if ratio else np.log(sw - sl))
  z = 0.2 * ((pw - rw) - (pl - rl)) - offset
  got = mg.odpo(pol, ref, chosen_scores=sw_j, rejected_scores=sl_j, alpha=0.5, beta=0.2, ratio=ratio)
  np.testing.assert_allclose(got, _softplus(-z), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
  "name,hyper,s_w,s_l",
  [
    ("odpo", {}, [0.9, 0.2, 0.5], [0.1, 0.9, 0.5]),  # a flipped pair (BT label against the scores), a tie
    ("odpo", {"ratio": True}, [0.9, -0.2, 0.5], [0.1, -0.9, 0.7]),  # negative scores, s_w < s_l
    ("mappo", {}, [0.9, -1.3, 0.4], [0.1, -2.0, 0.8]),  # raw rewards outside [0, 1], a negative gap
  ],
)
def test_scores_outside_the_domain_are_refused_not_clamped(name, hyper, s_w, s_l):
  # Pair 0 is inside the domain; pairs 1 and 2 are not. Before the fix ODPO clamped the gap (the
  # pair's loss ~0: silently dropped) and MaPPO flipped the sign of its rejected term.
  pol, ref, _ = _batch(12, b=3)
  fn = getattr(mg, name)
  sw, sl = jnp.asarray(s_w, jnp.float32), jnp.asarray(s_l, jnp.float32)
  with pytest.raises(ValueError, match=rf"{name}: 2 of 3 pairs have scores outside its domain \(pair 1: .*allowed: "):
    fn(pol, ref, chosen_scores=sw, rejected_scores=sl, **hyper)
  with pytest.raises(ValueError, match="allowed: "):
    pofx.losses.check_scores(name, np.asarray(s_w), np.asarray(s_l), **hyper)
  pofx.losses.check_scores(name, np.asarray(s_w[:1]), np.asarray(s_l[:1]), **hyper)  # pair 0 is fine
  # Under jit the values cannot be inspected: the pairs outside are NaN, the pair inside is the formula.
  out = jax.jit(lambda a, b: fn(pol, ref, chosen_scores=a, rejected_scores=b, **hyper))(sw, sl)
  assert np.isnan(out[1]) and np.isnan(out[2])
  first = jax.tree.map(lambda x: x[:1], (pol, ref))
  np.testing.assert_allclose(out[0], fn(*first, chosen_scores=sw[:1], rejected_scores=sl[:1], **hyper)[0], rtol=1e-6)


def test_dpo_shift_matches_numpy():
  pol, ref, (pw, pl, rw, rl, _, _) = _batch(3)
  z = 0.1 * ((pw - 0.7 * pl) - (rw - 0.7 * rl))
  np.testing.assert_allclose(mg.dpo_shift(pol, ref, lam=0.7), _softplus(-z), rtol=1e-6, atol=1e-5)


def test_ln_dpo_matches_numpy():
  pol, ref, (pw, pl, rw, rl, lw, ll) = _batch(4)
  z = 2.0 * ((pw - rw) / lw - (pl - rl) / ll)
  np.testing.assert_allclose(mg.ln_dpo(pol, ref, beta=2.0), _softplus(-z), rtol=1e-6, atol=1e-5)


def test_mappo_matches_numpy():
  pol, ref, (pw, pl, rw, rl, _, _) = _batch(5)
  sw_j, sl_j, sw, sl = _scores(5)
  z = 0.1 * (pw - rw) - (sw - sl) * 0.1 * (pl - rl)
  np.testing.assert_allclose(
    mg.mappo(pol, ref, chosen_scores=sw_j, rejected_scores=sl_j), _softplus(-z), rtol=1e-6, atol=1e-5
  )


@pytest.mark.parametrize("name", ["odpo", "mappo"])
def test_scores_are_detached(name):
  pol, ref, _ = _batch(6)
  sw, sl, _, _ = _scores(6)
  g = jax.grad(lambda a, b: jnp.sum(getattr(mg, name)(pol, ref, chosen_scores=a, rejected_scores=b)), argnums=(0, 1))(
    sw, sl
  )
  np.testing.assert_array_equal(g[0], 0.0)
  np.testing.assert_array_equal(g[1], 0.0)


# ---------------------------------------------------------------- reduces-to identities (all == DPO)


def _dpo(pol, ref, beta=0.1):
  return pofx.losses.dpo(pol, ref, beta=beta)


def test_dpop_lam0_is_dpo():
  pol, ref, _ = _batch(7)
  np.testing.assert_allclose(mg.dpop(pol, ref, lam=0.0), _dpo(pol, ref), **TOL)


def test_odpo_zero_offset_is_dpo():
  pol, ref, _ = _batch(8)
  sw, sl, _, _ = _scores(8)
  np.testing.assert_allclose(mg.odpo(pol, ref, chosen_scores=sw, rejected_scores=sl, alpha=0.0), _dpo(pol, ref), **TOL)
  # Unit gap: log(1) = 0; equal scores in the ratio form: log(1) = 0.
  np.testing.assert_allclose(mg.odpo(pol, ref, chosen_scores=sl + 1.0, rejected_scores=sl), _dpo(pol, ref), **TOL)
  np.testing.assert_allclose(mg.odpo(pol, ref, chosen_scores=sw, rejected_scores=sw, ratio=True), _dpo(pol, ref), **TOL)


def test_dpo_shift_lam1_is_dpo():
  pol, ref, _ = _batch(9)
  np.testing.assert_allclose(mg.dpo_shift(pol, ref, lam=1.0), _dpo(pol, ref), **TOL)


def test_mappo_unit_gap_is_dpo():
  pol, ref, _ = _batch(10)
  ones, zeros = jnp.ones(6, jnp.float32), jnp.zeros(6, jnp.float32)
  np.testing.assert_allclose(mg.mappo(pol, ref, chosen_scores=ones, rejected_scores=zeros), _dpo(pol, ref), **TOL)


def test_mappo_constant_gap_is_dpo_shift():
  pol, ref, _ = _batch(11)
  sw, sl = jnp.full(6, 0.9, jnp.float32), jnp.full(6, 0.4, jnp.float32)
  np.testing.assert_allclose(
    mg.mappo(pol, ref, chosen_scores=sw, rejected_scores=sl), mg.dpo_shift(pol, ref, lam=0.5), **TOL
  )


def test_ln_dpo_equal_lengths_is_dpo_with_scaled_beta():
  pol, ref, _ = _batch(12)
  n = jnp.full(6, 8.0, jnp.float32)
  pol = pol.replace(chosen_len=n, rejected_len=n)
  np.testing.assert_allclose(mg.ln_dpo(pol, ref, beta=0.8), _dpo(pol, ref, beta=0.1), **TOL)


# ---------------------------------------------------------------- DPO-Shift schedule


@pytest.mark.parametrize(
  "kind,expected",
  [
    ("fixed", [0.9, 0.9, 0.9, 0.9]),
    ("increase_linear", [0.5, 0.6, 0.9, 0.9]),
    ("decrease_linear", [0.9, 0.8, 0.5, 0.5]),
  ],
)
def test_dpo_shift_schedule(kind, expected):
  steps = [0, 25, 100, 150]  # clipped beyond max_steps
  got = [mg.dpo_shift_lambda(s, 100, kind, lambda_min=0.5, lambda_max=0.9) for s in steps]
  np.testing.assert_allclose(got, expected, **TOL)


def test_dpo_shift_schedule_traced_step_and_use():
  pol, ref = _example()

  @jax.jit
  def loss_at(step):
    lam = mg.dpo_shift_lambda(step, 100, "decrease_linear", lambda_min=0.95, lambda_max=1.0)
    return mg.dpo_shift(pol, ref, lam=lam)

  np.testing.assert_allclose(loss_at(jnp.int32(100)), [0.600393], **TOL)  # lam = 0.95 at the end
  np.testing.assert_allclose(loss_at(jnp.int32(0)), [0.598139], **TOL)  # lam = 1 (DPO) at the start


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "call,field",
  [
    (lambda p, r: mg.dpop(p, r, lam=-1.0), "lam"),
    (lambda p, r: mg.dpop(p, r, beta=0.0), "beta"),
    (lambda p, r: mg.odpo(p, r, chosen_scores=_a(1.0), rejected_scores=_a(0.0), alpha=-1.0), "alpha"),
    (lambda p, r: mg.odpo(p, r, chosen_scores=_a(1.0), rejected_scores=_a(0.0), ratio="yes"), "ratio"),
    (lambda p, r: mg.odpo(p, r), "scores"),
    (lambda p, r: mg.odpo(p, r, chosen_scores=_a(1.0, 2.0), rejected_scores=_a(0.0, 1.0)), "shape"),
    (lambda p, r: mg.mappo(p, r, chosen_scores=_a(1.0)), "scores"),
    (lambda p, r: mg.dpo_shift(p, r, lam=1.5), "lam"),
    (lambda p, r: mg.dpo_shift(p, r, lam=-0.1), "lam"),
    (lambda p, r: mg.ln_dpo(p, r, beta=-2.0), "beta"),
    (lambda p, r: mg.ln_dpo(p.replace(chosen_len=None), r, beta=1.0), "length"),
    (lambda p, r: mg.dpop(p, None), "reference"),
    (lambda p, r: mg.mappo(p, None, chosen_scores=_a(1.0), rejected_scores=_a(0.0)), "reference"),
    (lambda p, r: mg.dpo_shift_lambda(0, 100, "cosine"), "kind"),
    (lambda p, r: mg.dpo_shift_lambda(0, 0, "fixed"), "max_steps"),
    (lambda p, r: mg.dpo_shift_lambda(0, 10, "fixed", lambda_min=0.9, lambda_max=0.5), "lambda_min"),
    (lambda p, r: mg.dpo_shift_lambda(0, 10, "fixed", lambda_max=1.2), "lambda_max"),
  ],
)
def test_bad_hyperparameters_raise(call, field):
  with pytest.raises(ValueError, match=field):
    call(*_example())


def test_ln_dpo_beta_is_required_through_batch_loss():
  pol, ref = _example()
  with pytest.raises(ValueError, match="missing required argument"):
    pofx.losses.batch_loss("ln_dpo", pol, ref)


def test_registered_requirements():
  assert pofx.losses.spec("odpo").requires == {"scores"}
  assert pofx.losses.spec("mappo").requires == {"scores"}
  assert pofx.losses.spec("ln_dpo").requires == {"lengths"}
