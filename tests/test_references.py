"""Reference strategies: update rules, caching fingerprints, MRPO's combination, Pre-DPO's guiding policy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pofx
from pofx import references, train
from tests import toy


def test_none_is_reference_free():
  ref = references.none()
  assert ref.logps(ref.init(toy.init()), toy.batch()) is None


def test_frozen_gives_its_params_logps_and_no_gradient():
  params, ref_params, batch = toy.init(0), toy.init(1), toy.batch()
  ref = references.frozen(ref_params, toy.logps_fn)
  out = ref.logps(ref.init(params), batch)
  np.testing.assert_allclose(out.chosen, toy.logps_fn(ref_params, batch).chosen, rtol=1e-6)
  grad = jax.grad(lambda rp: jnp.sum(references.frozen(rp, toy.logps_fn).logps(rp, batch).chosen))(ref_params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad))


@pytest.mark.parametrize("alpha,tau", [(0.6, 3), (1.0, 2), (0.25, 1)])
def test_synced_mixes_every_tau_steps(alpha, tau):
  p0, p1 = toy.init(0), toy.init(1)
  ref = references.synced(alpha, tau, toy.logps_fn)
  state = ref.init(p0)
  for step in range(1, 7):
    new = ref.update(state, p1, step)
    if step % tau == 0:
      expected = jax.tree.map(lambda r, p: alpha * np.asarray(p) + (1 - alpha) * np.asarray(r), state, p1)
    else:
      expected = state
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new, expected)
    state = new


def test_ema_update():
  p0, p1 = toy.init(0), toy.init(1)
  ref = references.ema(0.9, toy.logps_fn)
  new = ref.update(ref.init(p0), p1, 1)
  jax.tree.map(
    lambda n, a, b: np.testing.assert_allclose(n, 0.9 * np.asarray(a) + 0.1 * np.asarray(b), rtol=1e-6), new, p0, p1
  )


def test_updating_strategies_cannot_be_cached_and_bad_values_raise():
  with pytest.raises(ValueError, match="cannot"):
    references.synced(0.6, 512)
  with pytest.raises(ValueError, match="cannot"):
    references.ema(0.99)
  with pytest.raises(ValueError, match="alpha"):
    references.synced(1.5, 4, toy.logps_fn)
  with pytest.raises(ValueError, match="tau"):
    references.synced(0.5, 0, toy.logps_fn)
  with pytest.raises(ValueError, match="decay"):
    references.ema(1.0, toy.logps_fn)


def test_cache_round_trip_and_fingerprint_mismatch():
  params, batch = toy.init(3), toy.batch()
  fp = references.fingerprint(params, vocab=toy.V, max_prompt_len=1, max_completion_len=5)
  cache = references.precompute(toy.logps_fn, params, [batch], fingerprint=fp)
  ref = references.cached(fp, cache["fingerprint"])
  out = ref.logps(
    ref.init(params),
    {**batch, "ref_chosen_logps": cache["ref_chosen_logps"], "ref_rejected_logps": cache["ref_rejected_logps"]},
  )
  frozen = toy.logps_fn(params, batch)
  np.testing.assert_allclose(out.chosen, frozen.chosen, rtol=1e-6)
  np.testing.assert_allclose(out.rejected, frozen.rejected, rtol=1e-6)
  # Any change of weights, vocabulary or limits changes the fingerprint, and a mismatch is an error.
  other = [
    references.fingerprint(toy.init(4), vocab=toy.V, max_prompt_len=1, max_completion_len=5),
    references.fingerprint(params, vocab=toy.V + 1, max_prompt_len=1, max_completion_len=5),
    references.fingerprint(params, vocab=toy.V, max_prompt_len=1, max_completion_len=6),
  ]
  assert len({fp, *other}) == 4
  with pytest.raises(ValueError, match="different reference"):
    references.cached(other[0], cache["fingerprint"])
  with pytest.raises(ValueError, match="lacks"):
    ref.logps((), batch)


def _mrpo_numpy(p1w, p1l, p2w, p2l, eta=0.1, alpha=None):
  """MRPO K=2 for one pair, written from the authors' code (thaihungle/MRPO; arXiv:2405.16388) with Python math."""
  a1, a2 = abs(p1w - p1l), abs(p2w - p2l)
  if alpha is None:  # adaptive per pair
    alpha = a1 / (a1 + a2 + 1e-6)
  bw, bl = (p2w + p1w) / 2, (p2l + p1l) / 2
  scale = abs(bw) / (abs(bw) + abs(bl))
  ew, el = eta * scale, eta * (1 - scale)
  cw = min(max(p1w, (1 + ew) * p2w), (1 - ew) * p2w)
  cl = min(max(p1l, (1 + el) * p2l), (1 - el) * p2l)
  comb = lambda p1, p2: p1 + p2 - math.log(alpha * math.exp(p1) + (1 - alpha) * math.exp(p2))
  return comb(cw, p2w), comb(cl, p2l)


def test_mrpo_matches_hand_formula():
  primary = pofx.PairLogps(chosen=jnp.array([-10.0, -3.0]), rejected=jnp.array([-12.0, -4.0]))
  external = pofx.PairLogps(chosen=jnp.array([-10.5, -2.0]), rejected=jnp.array([-11.0, -4.1]))
  out = references.mrpo_combine(primary, [external], eta=0.1)
  for i in range(2):
    ew, el = _mrpo_numpy(
      float(external.chosen[i]), float(external.rejected[i]), float(primary.chosen[i]), float(primary.rejected[i])
    )
    np.testing.assert_allclose([out.chosen[i], out.rejected[i]], [ew, el], rtol=1e-5)


def test_mrpo_fixed_alpha_matches_hand_formula_and_out_of_range_is_refused():
  primary = pofx.PairLogps(chosen=jnp.array([-10.0, -3.0]), rejected=jnp.array([-12.0, -4.0]))
  external = pofx.PairLogps(chosen=jnp.array([-10.5, -2.0]), rejected=jnp.array([-11.0, -4.1]))
  out = references.mrpo_combine(primary, [external], eta=0.1, alpha=0.3)
  for i in range(2):
    ew, el = _mrpo_numpy(
      float(external.chosen[i]),
      float(external.rejected[i]),
      float(primary.chosen[i]),
      float(primary.rejected[i]),
      alpha=0.3,
    )
    np.testing.assert_allclose([out.chosen[i], out.rejected[i]], [ew, el], rtol=1e-5)
  with pytest.raises(ValueError, match="alpha=-1.0"):
    references.mrpo_combine(primary, [external], alpha=-1.0)


@pytest.mark.parametrize("k", [2, 3])
def test_mrpo_with_identical_references_is_dpo(k):
  params, batch = toy.init(0), toy.batch()
  ref_params = toy.init(5)
  multi = references.multi([references.frozen(ref_params, toy.logps_fn) for _ in range(k)])
  combined = multi.logps(multi.init(params), batch)
  single = toy.logps_fn(ref_params, batch)
  np.testing.assert_allclose(combined.chosen, single.chosen, rtol=1e-5)
  policy = toy.logps_fn(params, batch)
  np.testing.assert_allclose(pofx.losses.dpo(policy, combined), pofx.losses.dpo(policy, single), rtol=1e-5)


_PRIMARY = pofx.PairLogps(chosen=jnp.array([-10.0, -3.0, -7.0]), rejected=jnp.array([-12.0, -4.0, -6.5]))
_EXT_A = pofx.PairLogps(chosen=jnp.array([-10.5, -2.0, -7.2]), rejected=jnp.array([-11.0, -4.1, -6.0]))
_EXT_B = pofx.PairLogps(chosen=jnp.array([-9.0, -3.3, -8.0]), rejected=jnp.array([-12.5, -3.9, -6.4]))


@pytest.mark.parametrize("alpha", [None, 0.3])
@pytest.mark.parametrize("copies", [2, 3])
def test_mrpo_with_duplicated_external_references_is_the_two_reference_computation(alpha, copies):
  # K = 1 + copies references, every external one the same model: exactly MRPO with K = 2 (the
  # authors' code), for the adaptive weights (ARWC) and a fixed weight.
  two = references.mrpo_combine(_PRIMARY, [_EXT_A], eta=0.1, alpha=alpha)
  many = references.mrpo_combine(_PRIMARY, [_EXT_A] * copies, eta=0.1, alpha=alpha)
  np.testing.assert_allclose(many.chosen, two.chosen, rtol=1e-6)
  np.testing.assert_allclose(many.rejected, two.rejected, rtol=1e-6)
  for i in range(3):  # and K = 2 is the authors' code
    ew, el = _mrpo_numpy(
      float(_EXT_A.chosen[i]),
      float(_EXT_A.rejected[i]),
      float(_PRIMARY.chosen[i]),
      float(_PRIMARY.rejected[i]),
      alpha=alpha,
    )
    np.testing.assert_allclose([many.chosen[i], many.rejected[i]], [ew, el], rtol=1e-5)


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_mrpo_three_references_is_the_harmonic_mean_of_the_pairwise_combinations(alpha):
  # The K >= 3 convention: each external reference combined with the primary as in the K = 2 code
  # (its own clip and weight), then 1/ref = mean_k 1/ref_k. Computed from the K = 2 hand formula.
  out = references.mrpo_combine(_PRIMARY, [_EXT_A, _EXT_B], eta=0.1, alpha=alpha)
  for i in range(3):
    pairs = [
      _mrpo_numpy(
        float(e.chosen[i]), float(e.rejected[i]), float(_PRIMARY.chosen[i]), float(_PRIMARY.rejected[i]), alpha=alpha
      )
      for e in (_EXT_A, _EXT_B)
    ]
    expected = [-math.log(sum(math.exp(-p[j]) for p in pairs) / 2) for j in (0, 1)]
    np.testing.assert_allclose([out.chosen[i], out.rejected[i]], expected, rtol=1e-5)


def test_multi_refuses_bad_members():
  with pytest.raises(ValueError, match="K >= 2"):
    references.multi([references.frozen(toy.init(), toy.logps_fn)])
  with pytest.raises(ValueError, match="static"):
    references.multi([references.frozen(toy.init(), toy.logps_fn), references.ema(0.9, toy.logps_fn)])


def test_guiding_takes_the_restored_parameters_of_a_checkpoint(tmp_path):
  """The program restores the guiding policy (experiments/main.py, orbax); the library takes arrays."""
  import orbax.checkpoint as ocp

  from experiments import main as main_lib

  guide = toy.init(7)
  path = tmp_path / "guide"
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path, guide)
  ckpt.wait_until_finished()
  ref = references.guiding(main_lib._load_params(str(path), toy.init(0)), toy.logps_fn)
  assert ref.name == "guiding" and not ref.updates and not ref.cached
  state = ref.init(toy.init(0))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state, guide)
  # Its log-probs are those of the guiding policy, whatever the policy's parameters.
  want = toy.logps_fn(guide, toy.batch())
  got = ref.logps(state, toy.batch())
  np.testing.assert_array_equal(got.chosen, want.chosen)
  np.testing.assert_array_equal(got.rejected, want.rejected)
  with pytest.raises(TypeError, match="not a path"):
    references.guiding(str(path), toy.logps_fn)
  with pytest.raises(TypeError, match="not a path"):
    references.guiding(path, toy.logps_fn)


def test_step_refuses_reference_free_with_a_loss_that_needs_one():
  with pytest.raises(ValueError, match="needs a reference"):
    train.make_train_step(toy.logps_fn, optax.sgd(0.1), loss="dpo", reference=references.none())


# ----------------------------------------------------------------------------------------------
# EMA companions (Adaptive-DPO)


def test_diffusers_ema_decay_schedule():
  # diffusers' EMAModel.get_decay without warm-up: 0 at its first update, then (1 + s) / (10 + s) with
  # s = count - 1, capped at the decay: 0, 2/11, 3/12, ..., 8/17, then 0.5 for decay 0.5.
  for n, want in [(1, 0.0), (2, 2 / 11), (3, 3 / 12), (8, 8 / 17), (9, 0.5), (12, 0.5)]:
    np.testing.assert_allclose(float(references.diffusers_ema_decay(0.5, n)), want, rtol=1e-6)
  for n, want in [(1, 0.0), (2, 2 / 11), (300, 300 / 309), (89990, 89990 / 89999), (10**6, 0.9999)]:
    np.testing.assert_allclose(float(references.diffusers_ema_decay(0.9999, n)), want, rtol=1e-6)


def test_ema_companions_update_by_hand():
  # One scalar parameter; the policy after steps 1..4 is 2, 4, 8, 0 and the reference stays at 1.
  # Update 1 (decay 0): both EMAs = 2. Update 2 (2/11 < 0.5): 2/11 * 2 + 9/11 * 4 = 40/11.
  # Update 3 (1/4): 1/4 * 40/11 + 3/4 * 8 = 76/11. Update 4 (4/13): 4/13 * 76/11 + 0 = 304/143.
  ref = references.ema_companions(
    references.frozen({"a": jnp.float32(1.0)}, lambda p, b: None), lambda p, b: None, decays=(0.9999, 0.5), warmup=2
  )
  state = ref.init({"a": jnp.float32(1.0)})
  for n, (p, want) in enumerate([(2.0, 2.0), (4.0, 40 / 11), (8.0, 76 / 11), (0.0, 304 / 143)], start=1):
    state = ref.update(state, {"a": jnp.float32(p)}, n)
    for ema in state["emas"]:
      np.testing.assert_allclose(float(ema["a"]), want, rtol=1e-6)
    assert int(state["count"]) == n and float(state["base"]["a"]) == 1.0
  # From update 10 on, the 0.5 EMA is capped (decay 0.5) while the 0.9999 one runs at n / (n + 9).
  e1, e2 = 304 / 143, 304 / 143
  for n in range(5, 13):
    state = ref.update(state, {"a": jnp.float32(n)}, n)  # a policy that keeps moving: 5, 6, ..., 12
    d1, d2 = n / (n + 9), min(0.5, n / (n + 9))
    e1, e2 = d1 * e1 + (1 - d1) * n, d2 * e2 + (1 - d2) * n
  np.testing.assert_allclose([float(e["a"]) for e in state["emas"]], [e1, e2], rtol=1e-5)
  assert e2 - e1 > 0.2  # the 0.5 EMA follows the policy more closely


def test_ema_companions_logps_and_warmup():
  p0, p1, batch = toy.init(0), toy.init(1), toy.batch()
  ref = references.ema_companions(references.frozen(p0, toy.logps_fn), toy.logps_fn, decays=(0.9, 0.5), warmup=2)
  state = ref.init(p0)
  for n in range(1, 4):
    out = ref.logps(state, batch)
    base = toy.logps_fn(p0, batch)
    np.testing.assert_allclose(out.chosen, base.chosen, rtol=1e-6)
    for m, ema in enumerate(state["emas"]):
      np.testing.assert_allclose(out.companion_chosen[:, m], toy.logps_fn(ema, batch).chosen, rtol=1e-6)
      np.testing.assert_allclose(out.companion_rejected[:, m], toy.logps_fn(ema, batch).rejected, rtol=1e-6)
    np.testing.assert_array_equal(out.companion_mask, np.full((8, 2), float(n - 1 >= 2), np.float32))
    state = ref.update(state, p1, n)


def test_ema_companions_refusals():
  with pytest.raises(ValueError, match="base='none' is not allowed"):
    references.ema_companions(references.none(), toy.logps_fn)
  with pytest.raises(ValueError, match="base='cached' is not allowed"):
    references.ema_companions(references.cached("a", "a"), toy.logps_fn)
  with pytest.raises(ValueError, match=r"invalid decays=\(0.9, 1.0\); allowed: a non-empty sequence"):
    references.ema_companions(references.frozen(toy.init(), toy.logps_fn), toy.logps_fn, decays=(0.9, 1.0))
  with pytest.raises(ValueError, match=r"invalid warmup=-1; allowed: an integer >= 0"):
    references.ema_companions(references.frozen(toy.init(), toy.logps_fn), toy.logps_fn, warmup=-1)
