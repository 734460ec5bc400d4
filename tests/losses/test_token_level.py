"""SamPO, SGDPO, DMPO and Delta-L: worked examples, numpy re-derivations, sampling properties, identities."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx.losses import _token_level

KEY = jax.random.key(0)


def softplus(x):
  return np.logaddexp(0.0, x)


def mask(lens, t):
  return (np.arange(t)[None, :] < np.asarray(lens)[:, None]).astype(np.float32)


def token_pairs(seed, c_lens, r_lens, t=9):
  rng = np.random.default_rng(seed)
  b = len(c_lens)
  toks = [-rng.uniform(0.05, 3.0, (b, t)).astype(np.float32) for _ in range(4)]
  cm, rm = mask(c_lens, t), mask(r_lens, t)
  policy = pofx.PairLogps.from_tokens(toks[0], cm, toks[1], rm)
  reference = pofx.PairLogps.from_tokens(toks[2], cm, toks[3], rm)
  return policy, reference, [x.astype(np.float64) for x in toks], cm, rm


# -------------------------------------------------------------------------------------------------
# SamPO
# -------------------------------------------------------------------------------------------------


def uniform_example():
  # The worked example: chosen 5 tokens summing to -10 (policy) / -11 (reference), rejected 6 tokens of
  # -2 (policy) and -11/6 (reference).
  cm, rm = mask([5], 6), mask([6], 6)
  policy = pofx.PairLogps.from_tokens(np.full((1, 6), -2.0, np.float32), cm, np.full((1, 6), -2.0, np.float32), rm)
  reference = pofx.PairLogps.from_tokens(
    np.full((1, 6), -2.2, np.float32), cm, np.full((1, 6), -11.0 / 6.0, np.float32), rm
  )
  return policy, reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampo_uniform_token_example(seed):
  policy, reference = uniform_example()
  out = pofx.losses.get("sampo")(policy, reference, key=jax.random.key(seed))
  np.testing.assert_allclose(out, [0.605676], rtol=1e-6)


def test_sampo_masks_properties():
  c_lens, r_lens = [7, 2, 5, 4], [3, 9, 5, 1]
  cm, rm = mask(c_lens, 9), mask(r_lens, 9)
  for s in range(5):
    kc, kr = _token_level.sampo_token_masks(jax.random.key(s), cm, rm)
    kc, kr = np.asarray(kc), np.asarray(kr)
    t = np.minimum(c_lens, r_lens)
    np.testing.assert_array_equal(kc.sum(-1), t)
    np.testing.assert_array_equal(kr.sum(-1), t)
    assert np.all(kc <= cm) and np.all(kr <= rm)
    # The shorter completion keeps every token.
    short_c = np.array(c_lens) <= np.array(r_lens)
    np.testing.assert_array_equal(kc[short_c], cm[short_c])
    np.testing.assert_array_equal(kr[~short_c], rm[~short_c])


def test_sampo_subset_is_uniform():
  # 3 of 8 rejected positions kept: each position's inclusion frequency is 3/8.
  cm, rm = mask([3], 8), mask([8], 8)
  fn = jax.jit(jax.vmap(lambda k: _token_level.sampo_token_masks(k, cm, rm)[1]))
  freq = np.asarray(fn(jax.random.split(jax.random.key(5), 20000))).mean(axis=0)[0]
  np.testing.assert_allclose(freq, 3 / 8, atol=0.015)


def test_sampo_shares_indices_between_policy_and_reference():
  # reference = policy - 1 per chosen token, policy - 2 per rejected token: with one shared subset,
  # every kept token's log-ratio is 1 (resp. 2), so rho_hat = T - 2T = -T whatever the subset.
  c_lens, r_lens = [7, 2, 5], [3, 9, 8]
  policy, _, toks, cm, rm = token_pairs(3, c_lens, r_lens)
  reference = pofx.PairLogps.from_tokens(toks[0] - 1.0, cm, toks[1] - 2.0, rm)
  t = np.minimum(c_lens, r_lens)
  for s in range(4):
    out = _token_level.sampo(policy, reference, beta=0.5, key=jax.random.key(s))
    np.testing.assert_allclose(out, softplus(0.5 * t), rtol=1e-5)


def test_sampo_against_numpy_given_masks():
  c_lens, r_lens = [7, 2, 5, 6], [3, 9, 8, 6]
  policy, reference, toks, cm, rm = token_pairs(4, c_lens, r_lens)
  key = jax.random.key(7)
  kc, kr = (np.asarray(m, np.float64) for m in _token_level.sampo_token_masks(key, cm, rm))
  rho = ((toks[0] - toks[2]) * kc).sum(-1) - ((toks[1] - toks[3]) * kr).sum(-1)
  np.testing.assert_allclose(_token_level.sampo(policy, reference, beta=0.1, key=key), softplus(-0.1 * rho), rtol=1e-5)


def test_sampo_equal_lengths_is_dpo():
  policy, reference, toks, cm, rm = token_pairs(5, [4, 6, 9], [4, 6, 9])
  out = _token_level.sampo(policy, reference, beta=0.3, key=KEY)
  rho = ((toks[0] - toks[2]) * cm).sum(-1) - ((toks[1] - toks[3]) * rm).sum(-1)
  np.testing.assert_allclose(out, softplus(-0.3 * rho), rtol=1e-5)


def test_sampo_deterministic_given_key_and_random_otherwise():
  policy, reference, _, _, _ = token_pairs(6, [9, 9, 8], [2, 3, 1])
  run = lambda s: np.asarray(_token_level.sampo(policy, reference, key=jax.random.key(s)))
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))


def test_sampo_needs_tokens_and_valid_beta():
  policy = pofx.PairLogps(chosen=jnp.array([-1.0]), rejected=jnp.array([-2.0]))
  with pytest.raises(ValueError, match="per-token"):
    _token_level.sampo(policy, policy, key=KEY)
  p, r = uniform_example()
  with pytest.raises(ValueError, match="beta"):
    _token_level.sampo(p, r, beta=0.0, key=KEY)


# -------------------------------------------------------------------------------------------------
# SGDPO
# -------------------------------------------------------------------------------------------------


def _sgdpo_candidates(toks, cm, rm, b, beta, r1, r2):
  """Every value SGDPO's pair b can take (numpy, float64): one per choice of pilot sets, with
  |S_w| = max(floor(r1 m), 1), |S_l| = max(floor(r2 m), 1), m = min(|y_w|, |y_l|); with u_1, u_2."""
  pw, pl, rw, rl = (t[b] for t in toks)
  n_w, n_l = int(cm[b].sum()), int(rm[b].sum())
  m = min(n_w, n_l)
  k_w, k_l = max(int(np.floor(r1 * m)), 1), max(int(np.floor(r2 * m)), 1)
  out = []
  for s_w in itertools.combinations(range(n_w), min(k_w, n_w)):
    for s_l in itertools.combinations(range(n_l), min(k_l, n_l)):
      s_w, s_l = list(s_w), list(s_l)
      u1 = (pw[:n_w].sum() - pl[s_l].sum()) - (rw[:n_w].sum() - rl[s_l].sum())
      u2 = (pw[s_w].sum() - pl[:n_l].sum()) - (rw[s_w].sum() - rl[:n_l].sum())
      out.append((0.5 * softplus(-beta * u1) + 0.5 * softplus(-beta * u2), u1, u2))
  return out


@pytest.mark.parametrize("seed", [0, 1])
def test_sgdpo_is_one_of_its_pilot_set_values_with_the_detached_gradient(seed):
  beta, r1, r2 = 0.5, 0.6, 0.9
  c_lens, r_lens = [5, 3, 6], [4, 6, 2]
  policy, reference, toks, cm, rm = token_pairs(seed, c_lens, r_lens, t=6)
  key = jax.random.key(seed)
  fn = lambda p: pofx.losses.get("sgdpo")(p, reference, beta=beta, r1=r1, r2=r2, key=key)
  out = np.asarray(fn(policy), np.float64)
  grads = jax.grad(lambda p: jnp.sum(fn(p)))(policy)
  for b in range(len(c_lens)):
    cands = _sgdpo_candidates(toks, cm, rm, b, beta, r1, r2)
    hit = [c for c in cands if abs(c[0] - out[b]) < 1e-5]
    assert hit, (b, out[b], sorted(c[0] for c in cands)[:5])
    _, u1, u2 = hit[0]
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    # only the whole-completion sums carry gradient: the pilot sums are detached
    np.testing.assert_allclose(grads.chosen[b], -0.5 * beta * sig(-beta * u1), rtol=1e-4)
    np.testing.assert_allclose(grads.rejected[b], 0.5 * beta * sig(-beta * u2), rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(grads.chosen_token_logps), 0.0)
  np.testing.assert_array_equal(np.asarray(grads.rejected_token_logps), 0.0)


def test_sgdpo_pilot_sets_have_the_authors_sizes_and_vary_with_the_key():
  c_lens, r_lens = [7, 2, 5, 4, 0], [3, 9, 5, 1, 4]
  cm, rm = mask(c_lens, 9), mask(r_lens, 9)
  m = np.minimum(c_lens, r_lens)
  seen = set()
  for s in range(6):
    pc, pr = (np.asarray(x) for x in _token_level.sgdpo_pilot_masks(jax.random.key(s), cm, rm, r1=0.6, r2=0.9))
    assert np.all(pc <= cm) and np.all(pr <= rm)  # inside each completion
    np.testing.assert_array_equal(pc.sum(-1), np.minimum(np.maximum(np.floor(0.6 * m), 1), c_lens))
    np.testing.assert_array_equal(pr.sum(-1), np.minimum(np.maximum(np.floor(0.9 * m), 1), r_lens))
    seen.add(pr[1].tobytes())
  assert len(seen) > 1  # a new draw per key


def test_sgdpo_refuses_a_pilot_fraction_outside_0_1():
  policy, reference, *_ = token_pairs(0, [3], [3], t=4)
  with pytest.raises(ValueError, match=r"sgdpo: invalid r1=1.5; allowed: 0 < r1 <= 1"):
    pofx.losses.get("sgdpo")(policy, reference, r1=1.5, key=KEY)


# -------------------------------------------------------------------------------------------------
# DMPO
# -------------------------------------------------------------------------------------------------


def phi_numpy(j, t, g):
  return (t - j) / t if g == 1 else g**j * (1 - g ** (t - j)) / (1 - g**t)


def test_dmpo_weights_worked_example():
  # By hand: T = 3, gamma = 0.7 -> phi(j) = gamma^j (1 - gamma^(T-j)) / (1 - gamma^T) = [1.0, 0.543379, 0.223744].
  w = _token_level.dmpo_turn_weights(jnp.array([[0, 1, 2, -1]]), gamma=0.7)
  np.testing.assert_allclose(w, [[1.0, 0.543379, 0.223744, 1.0]], atol=1e-6)


@pytest.mark.parametrize("g", [0.3, 0.7, 0.99, 1.0])
def test_dmpo_weights_against_formula(g):
  ids = np.array([[0, 0, 1, 1, 1, 2, 3, 3, -1], [0, 1, 1, 2, -1, -1, -1, -1, -1]])
  w = np.asarray(_token_level.dmpo_turn_weights(jnp.asarray(ids), gamma=g))
  t = ids.max(-1, keepdims=True) + 1
  expected = np.where(ids >= 0, phi_numpy(np.maximum(ids, 0), t, g), 1.0)
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  # phi(0, T) = 1: the first turn is never discounted.
  np.testing.assert_allclose(w[:, 0], 1.0, rtol=1e-6)


def test_dmpo_against_numpy():
  c_lens, r_lens = [8, 3, 6], [5, 9, 2]
  policy, reference, toks, cm, rm = token_pairs(7, c_lens, r_lens)
  rng = np.random.default_rng(0)

  # Non-decreasing turn ids per row, -1 on padding.
  def ids(lens):
    out = np.cumsum(rng.integers(0, 2, (3, 9)), axis=-1)
    return np.where(mask(lens, 9) > 0, out, -1).astype(np.int32)

  c_ids, r_ids = ids(c_lens), ids(r_lens)
  out = pofx.losses.get("dmpo")(
    policy, reference, beta=0.2, gamma=0.6, chosen_turn_ids=jnp.asarray(c_ids), rejected_turn_ids=jnp.asarray(r_ids)
  )

  def wsum(tok, ids_, m):
    t = ids_.max(-1, keepdims=True) + 1
    return (np.where(ids_ >= 0, phi_numpy(np.maximum(ids_, 0), t, 0.6), 1.0) * tok * m).sum(-1)

  rho = (wsum(toks[0], c_ids, cm) - wsum(toks[2], c_ids, cm)) - (wsum(toks[1], r_ids, rm) - wsum(toks[3], r_ids, rm))
  np.testing.assert_allclose(out, softplus(-0.2 * rho), rtol=1e-5)


def test_dmpo_single_turn_is_dpo():
  policy, reference, toks, cm, rm = token_pairs(8, [5, 9], [7, 2])
  zeros = lambda m: jnp.asarray(np.where(m > 0, 0, -1).astype(np.int32))
  out = _token_level.dmpo(policy, reference, chosen_turn_ids=zeros(cm), rejected_turn_ids=zeros(rm))
  np.testing.assert_allclose(out, pofx.losses.dpo(policy, reference), rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(gamma=0.0), dict(gamma=1.5), dict(beta=-0.1)])
def test_dmpo_invalid_hyperparameters(bad):
  policy, reference, _, cm, rm = token_pairs(9, [3], [4])
  ids = jnp.zeros(cm.shape, jnp.int32)
  with pytest.raises(ValueError, match=list(bad)[0]):
    _token_level.dmpo(policy, reference, chosen_turn_ids=ids, rejected_turn_ids=ids, **bad)


def test_dmpo_turn_id_shape_checked():
  policy, reference, _, _, _ = token_pairs(9, [3], [4])
  with pytest.raises(ValueError, match="turn_ids"):
    _token_level.dmpo(
      policy, reference, chosen_turn_ids=jnp.zeros((1, 3), jnp.int32), rejected_turn_ids=jnp.zeros((1, 9), jnp.int32)
    )


# -------------------------------------------------------------------------------------------------
# Delta-L
# -------------------------------------------------------------------------------------------------


def test_delta_l_weights_worked_example():
  # By hand: lengths 5 and 6, alpha = 1 -> w_i = L^-1 / mean(L^-1): (1/5, 1/6) / (11/60) = [12/11, 10/11].
  np.testing.assert_allclose(_token_level.delta_l_weights(jnp.array([5.0, 6.0]), 1.0), [1.090909, 0.909091], atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.75, 1.0, 2.0])
def test_delta_l_weights_against_code_formula(alpha):
  lens = np.array([3.0, 17.0, 120.0, 64.0, 1.0, 999.0])
  mean_len = lens.mean()
  recip = [1 / ((l / mean_len) ** alpha) for l in lens]  # core_algos.py use_grpopp, written out
  expected = np.array(recip) / np.mean(recip)
  w = _token_level.delta_l_weights(jnp.asarray(lens), alpha)
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  np.testing.assert_allclose(np.mean(w), 1.0, rtol=1e-6)


def test_delta_l_weights_global_with_axis_name():
  lens = jnp.array([3.0, 17.0, 120.0, 64.0, 5.0, 9.0, 40.0, 2.0])
  full = _token_level.delta_l_weights(lens, 1.0)
  sharded = jax.vmap(lambda l: _token_level.delta_l_weights(l, 1.0, axis_name="d"), axis_name="d")(lens.reshape(2, 4))
  np.testing.assert_allclose(np.asarray(sharded).reshape(8), full, rtol=1e-6)


def test_delta_l_weights_invalid_alpha():
  with pytest.raises(ValueError, match="alpha"):
    _token_level.delta_l_weights(jnp.array([1.0, 2.0]), -1.0)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_dpo_nll_delta_l_against_numpy(alpha):
  c_lens, r_lens = [8, 3, 6, 1], [5, 9, 2, 4]
  policy, reference, toks, cm, rm = token_pairs(10, c_lens, r_lens)
  out = pofx.losses.get("dpo_nll_delta_l")(policy, reference, beta=0.1, alpha=alpha, nll_weight=0.5)
  pi_w = (toks[0] * cm).sum(-1)
  rho = (pi_w - (toks[2] * cm).sum(-1)) - ((toks[1] - toks[3]) * rm).sum(-1)
  lw = np.array(c_lens, np.float64)
  w = lw**-alpha / np.mean(lw**-alpha)
  expected = softplus(-0.1 * rho) + 0.5 * w * (-pi_w) / lw.mean()
  np.testing.assert_allclose(out, expected, rtol=1e-5)
  if alpha == 0.0:
    # Batch mean = DPO mean + the batch token-mean NLL (TRL's `sft` term).
    np.testing.assert_allclose(np.mean(out), np.mean(softplus(-0.1 * rho)) + 0.5 * (-pi_w).sum() / lw.sum(), rtol=1e-5)


def test_dpo_nll_delta_l_zero_weight_is_dpo_and_validates():
  policy, reference, _, _, _ = token_pairs(11, [3, 5], [4, 2])
  np.testing.assert_allclose(
    _token_level.dpo_nll_delta_l(policy, reference, nll_weight=0.0), pofx.losses.dpo(policy, reference), rtol=1e-6
  )
  with pytest.raises(ValueError, match="nll_weight"):
    _token_level.dpo_nll_delta_l(policy, reference, nll_weight=-1.0)
