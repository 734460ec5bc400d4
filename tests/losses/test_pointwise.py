"""NCA / InfoNCA (pairwise, K-way), UNA and KTO: worked examples, numpy re-derivations, identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx.losses import _pointwise

PI_W, PI_L, REF_W, REF_L = -10.0, -12.0, -11.0, -11.0


def softplus(x):
  return np.logaddexp(0.0, x)


def log_sigmoid(x):
  return -softplus(-x)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def pairs(pi_w, pi_l, ref_w, ref_l):
  f = lambda x: jnp.asarray(np.asarray(x, np.float32))
  return pofx.PairLogps(chosen=f(pi_w), rejected=f(pi_l)), pofx.PairLogps(chosen=f(ref_w), rejected=f(ref_l))


def example():
  return pairs([PI_W], [PI_L], [REF_W], [REF_L])


def random_pairs(seed, b=10):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-30, -1, (4, b)).astype(np.float32).astype(np.float64)
  return (*pairs(*x), x)


# -------------------------------------------------------------------------------------------------
# NCA / InfoNCA
# -------------------------------------------------------------------------------------------------


def test_worked_examples():
  # Worked example (beta = 0.1, r_w = 0.1, r_l = -0.1), by hand: NCA = log(1 + e^{-0.1}) + 0.5 log(1 + e^{0.1})
  # + 0.5 log(1 + e^{-0.1}) = 1.338793.
  policy, reference = example()
  np.testing.assert_allclose(pofx.losses.get("nca")(policy, reference), [1.338793], rtol=1e-6)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_pairwise_against_numpy(beta):
  policy, reference, x = random_pairs(0)
  r_w, r_l = beta * (x[0] - x[2]), beta * (x[1] - x[3])
  nca = -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l)
  np.testing.assert_allclose(_pointwise.nca(policy, reference, beta=beta), nca, rtol=1e-5)
  # Pairwise InfoNCA with hard labels, -log softmax(r_w, r_l)[w], is DPO: the canonical name is `dpo`.
  np.testing.assert_allclose(pofx.losses.dpo(policy, reference, beta=beta), softplus(-(r_w - r_l)), rtol=1e-5)


def lists(seed, b=5, k=4):
  rng = np.random.default_rng(seed)
  pol = rng.uniform(-30, -1, (b, k)).astype(np.float32)
  ref = rng.uniform(-30, -1, (b, k)).astype(np.float32)
  scores = rng.uniform(0, 10, (b, k)).astype(np.float32)
  return (
    pofx.ListLogps(jnp.asarray(pol)),
    pofx.ListLogps(jnp.asarray(ref)),
    jnp.asarray(scores),
    pol.astype(np.float64),
    ref.astype(np.float64),
    scores.astype(np.float64),
  )


@pytest.mark.parametrize("beta,alpha_t", [(0.1, 1.0), (0.01, 3.0), (0.5, 0.7)])
def test_kway_against_numpy(beta, alpha_t):
  policy, reference, scores, pol, ref, s = lists(1)
  r = beta * (pol - ref)
  z = s / alpha_t
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  log_softmax = r - np.log(np.exp(r - r.max(-1, keepdims=True)).sum(-1, keepdims=True)) - r.max(-1, keepdims=True)
  info = -(p * log_softmax).sum(-1)
  nca = -(p * log_sigmoid(r)).sum(-1) - log_sigmoid(-r).mean(-1)
  kw = dict(beta=beta, temperature_alpha=alpha_t, scores=scores)
  np.testing.assert_allclose(pofx.losses.get("infonca_kway")(policy, reference, **kw), info, rtol=1e-5)
  np.testing.assert_allclose(pofx.losses.get("nca_kway")(policy, reference, **kw), nca, rtol=1e-5)
  # The batch mean equals the code's scalar: -mean_{b,i} log sig(-r) - mean_b sum_i p log sig(r).
  code_nca = -log_sigmoid(-r).mean() - (p * log_sigmoid(r)).sum(-1).mean()
  np.testing.assert_allclose(np.mean(_pointwise.nca_kway(policy, reference, **kw)), code_nca, rtol=1e-5)


def test_kway_with_two_one_hot_responses_is_pairwise():
  policy, reference, x = random_pairs(2)
  to_list = lambda a, b: pofx.ListLogps(jnp.stack([jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)], -1))
  pl, rl = to_list(x[0], x[1]), to_list(x[2], x[3])
  scores = jnp.tile(jnp.array([[1.0, 0.0]]), (10, 1))  # with temperature 1e-4: one-hot on the chosen
  np.testing.assert_allclose(
    _pointwise.infonca_kway(pl, rl, scores=scores), pofx.losses.dpo(policy, reference), rtol=1e-5
  )
  np.testing.assert_allclose(_pointwise.nca_kway(pl, rl, scores=scores), _pointwise.nca(policy, reference), rtol=1e-5)


def test_kway_labels_are_constants():
  policy, reference, scores, _, _, _ = lists(3)
  g = jax.grad(lambda s: jnp.sum(_pointwise.infonca_kway(policy, reference, temperature_alpha=1.0, scores=s)))(scores)
  assert np.any(np.asarray(g) != 0)  # scores do shape the loss (they are data, no detach needed)
  gp = jax.grad(lambda l: jnp.sum(_pointwise.nca_kway(pofx.ListLogps(l), reference, scores=scores)))(policy.logps)
  assert np.all(np.isfinite(gp))


def test_kway_validation():
  policy, reference, scores, _, _, _ = lists(4)
  with pytest.raises(ValueError, match="temperature_alpha"):
    _pointwise.nca_kway(policy, reference, temperature_alpha=0.0, scores=scores)
  with pytest.raises(ValueError, match="beta"):
    _pointwise.infonca_kway(policy, reference, beta=0.0, scores=scores)
  with pytest.raises(TypeError, match="ListLogps"):
    _pointwise.infonca_kway(*example(), scores=scores)


# -------------------------------------------------------------------------------------------------
# UNA
# -------------------------------------------------------------------------------------------------


def test_una_worked_examples():
  # Worked example by hand (beta = 0.1, so r_w = 0.1, r_l = -0.1; s = (0.8, 0.3)): 0.106269 / 0.451290 / 1.288793.
  policy, reference = example()
  s = dict(chosen_scores=jnp.array([0.8]), rejected_scores=jnp.array([0.3]))
  una = pofx.losses.get("una")
  np.testing.assert_allclose(una(policy, reference, beta=0.1, **s), [0.106269], rtol=1e-5)
  np.testing.assert_allclose(una(policy, reference, beta=0.1, variant="binary_mse", **s), [0.451290], rtol=1e-5)
  np.testing.assert_allclose(una(policy, reference, beta=0.1, variant="binary_bce", **s), [1.288793], rtol=1e-6)
  np.testing.assert_allclose(una(policy, reference, beta=0.1, variant="binary_bce"), [1.288793], rtol=1e-6)


def test_una_against_numpy_with_dummy_answers():
  policy, reference, x = random_pairs(5)
  rng = np.random.default_rng(6)
  s_w = rng.uniform(0, 1, 10).astype(np.float32)
  s_l = rng.uniform(0, 1, 10).astype(np.float32)
  s_w[[1, 4]] = -1.0  # dummy chosen answers
  s_l[[2]] = -1.0
  b = 0.03
  q_w, q_l = sigmoid(b * (x[0] - x[2])), sigmoid(b * (x[1] - x[3]))
  keep_w, keep_l = s_w >= 0, s_l >= 0
  expected = {
    "score_mse": keep_w * (q_w - s_w) ** 2 + keep_l * (q_l - s_l) ** 2,
    "binary_mse": keep_w * (q_w - 1) ** 2 + keep_l * q_l**2,
    "binary_bce": keep_w * -np.log(q_w) + keep_l * -np.log(1 - q_l),
  }
  for variant, value in expected.items():
    out = _pointwise.una(
      policy, reference, variant=variant, chosen_scores=jnp.asarray(s_w), rejected_scores=jnp.asarray(s_l)
    )
    np.testing.assert_allclose(out, value, rtol=1e-5, err_msg=variant)
  # The registry reduction is the code's torch.sum.
  total = pofx.losses.batch_loss(
    "una", policy, reference, chosen_scores=jnp.asarray(s_w), rejected_scores=jnp.asarray(s_l)
  )
  np.testing.assert_allclose(total, expected["score_mse"].sum(), rtol=1e-5)


def test_una_raw_rewards_are_refused_not_read_as_dummy_answers():
  # A negative (unnormalised) reward used to drop its term as if it marked a dummy answer. Only the
  # authors' marker -1 does; any other score outside [0, 1] is outside UNA's domain.
  policy, reference, x = random_pairs(8)
  s_w = np.full(10, 0.7, np.float32)
  s_l = np.full(10, 0.2, np.float32)
  s_w[3], s_l[5], s_l[6] = -0.4, 1.7, -1.0  # two raw rewards, one dummy marker
  sw, sl = jnp.asarray(s_w), jnp.asarray(s_l)
  for variant in _pointwise.UNA_VARIANTS:
    with pytest.raises(
      ValueError, match=r"una: 2 of 10 pairs have scores outside its domain \(pair 3: .*-1 for a dummy"
    ):
      _pointwise.una(policy, reference, variant=variant, chosen_scores=sw, rejected_scores=sl)
    out = np.asarray(
      jax.jit(lambda a, b: _pointwise.una(policy, reference, variant=variant, chosen_scores=a, rejected_scores=b))(
        sw, sl
      )
    )
    assert np.isnan(out[[3, 5]]).all() and np.isfinite(np.delete(out, [3, 5])).all()
    q_w = sigmoid(0.03 * (x[0] - x[2]))
    # Pair 6: the dummy rejected answer's term is dropped, the chosen one's kept.
    kept = {"score_mse": (q_w[6] - 0.7) ** 2, "binary_mse": (q_w[6] - 1) ** 2, "binary_bce": -np.log(q_w[6])}[variant]
    np.testing.assert_allclose(out[6], kept, rtol=1e-5)


def test_una_reference_free_and_identities():
  policy, reference, x = random_pairs(7)
  out = _pointwise.una(policy, None, beta=0.01, variant="binary_bce")
  np.testing.assert_allclose(out, -log_sigmoid(0.01 * x[0]) - log_sigmoid(-0.01 * x[1]), rtol=1e-5)
  # binary_bce = NCA's biasedNCA; score MSE with targets (1, 0) = binary MSE.
  ones, zeros = jnp.ones(10), jnp.zeros(10)
  np.testing.assert_allclose(
    _pointwise.una(policy, reference, variant="score_mse", chosen_scores=ones, rejected_scores=zeros),
    _pointwise.una(policy, reference, variant="binary_mse"),
    rtol=1e-6,
  )


def test_una_validation():
  policy, reference = example()
  with pytest.raises(ValueError, match="variant"):
    _pointwise.una(policy, reference, variant="mse")
  with pytest.raises(ValueError, match="score_mse"):
    _pointwise.una(policy, reference)
  with pytest.raises(ValueError, match="both"):
    _pointwise.una(policy, reference, chosen_scores=jnp.array([0.5]))
  with pytest.raises(ValueError, match="beta"):
    _pointwise.una(policy, reference, beta=0.0, variant="binary_bce")


# -------------------------------------------------------------------------------------------------
# KTO
# -------------------------------------------------------------------------------------------------


def kto_trl_numpy(x, kl, beta, lam_d, lam_u):
  """TRL kto_trainer._compute_loss (loss_type="kto") on B desirable + B undesirable examples."""
  z0 = max(kl.mean(), 0.0)
  chosen = lam_d * (1 - sigmoid(beta * ((x[0] - x[2]) - z0)))
  rejected = lam_u * (1 - sigmoid(beta * (z0 - (x[1] - x[3]))))
  return chosen, rejected, np.concatenate([chosen, rejected]).mean()


@pytest.mark.parametrize("kl_shift", [-3.0, 0.5, 4.0])
def test_kto_against_trl_formula(kl_shift):
  policy, reference, x = random_pairs(8)
  kl = (np.random.default_rng(9).normal(0, 2, 10) + kl_shift).astype(np.float32).astype(np.float64)
  chosen, rejected, trl_loss = kto_trl_numpy(x, kl, 0.1, 1.33, 0.8)
  kw = dict(beta=0.1, desirable_weight=1.33, undesirable_weight=0.8, kl_logratios=jnp.asarray(kl, jnp.float32))
  out = pofx.losses.get("kto")(policy, reference, **kw)
  np.testing.assert_allclose(out, 0.5 * (chosen + rejected), rtol=1e-5)
  np.testing.assert_allclose(pofx.losses.batch_loss("kto", policy, reference, **kw), trl_loss, rtol=1e-5)


def test_kto_reference_point_is_detached_and_clamped():
  policy, reference, x = random_pairs(10)
  kl = jnp.asarray(np.linspace(-2.0, 1.0, 10), jnp.float32)  # mean -0.5 -> z0 = 0
  np.testing.assert_allclose(_pointwise.kto_reference_point(kl), 0.0)
  g = jax.grad(lambda k: jnp.sum(_pointwise.kto(policy, reference, kl_logratios=k)))(kl + 1.0)
  np.testing.assert_array_equal(np.asarray(g), 0.0)
  sharded = jax.vmap(lambda k: _pointwise.kto_reference_point(k, axis_name="d"), axis_name="d")(kl.reshape(2, 5) + 1.0)
  np.testing.assert_allclose(sharded, [0.5, 0.5], rtol=1e-6)


def test_kto_validation():
  policy, reference = example()
  kl = jnp.zeros(1)
  for bad in (dict(beta=0.0), dict(desirable_weight=-1.0), dict(undesirable_weight=-0.5)):
    with pytest.raises(ValueError, match=list(bad)[0]):
      _pointwise.kto(policy, reference, kl_logratios=kl, **bad)
  with pytest.raises(ValueError, match="reference"):
    _pointwise.kto(policy, None, kl_logratios=kl)
