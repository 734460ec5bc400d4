"""Ra-DPO: the sequence risk against a torch transcription of the authors' code, and the two losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pofx
from pofx.losses import _risk


def softplus(x):
  return np.logaddexp(0.0, x)


def risk_torch(policy_logits, reference_logits, mask, confidence_level, split):
  """zlj123-max/Ra-DPO Ra_DPOTrainer.get_batch_logps + calculate_cvar (risk part), logits pre-shifted."""
  logits = torch.tensor(policy_logits, dtype=torch.float64)
  ref_logits = torch.tensor(reference_logits, dtype=torch.float64)
  distribution_logps = logits.log_softmax(-1)
  reference_ps = ref_logits.softmax(-1)
  reference_logps = reference_ps.log()
  d = reference_logps - distribution_logps
  if split:
    mid = d.size(2) // 2
    parts = [(d[:, :, :mid], reference_ps[:, :, :mid]), (d[:, :, mid:], reference_ps[:, :, mid:])]
  else:
    parts = [(d, reference_ps)]
  cvar = []
  for dist, probs in parts:
    var = torch.quantile(dist, 1 - confidence_level, dim=2).unsqueeze(-1)
    cvar.append(probs * dist * (dist > var).double())
  per_position = torch.cat(cvar, dim=2).sum(-1)
  return (per_position * torch.tensor(mask, dtype=torch.float64)).sum(-1).numpy()


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("cl,vocab", [(0.95, 64), (0.97, 101), (0.5, 10)])
def test_sequence_risk_against_authors_code(split, cl, vocab):
  rng = np.random.default_rng(0)
  pol = rng.normal(0, 2, (3, 5, vocab)).astype(np.float32)
  ref = rng.normal(0, 2, (3, 5, vocab)).astype(np.float32)
  m = (np.arange(5)[None] < np.array([5, 2, 4])[:, None]).astype(np.float32)
  got = _risk.ra_dpo_sequence_risk(
    jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(m), confidence_level=cl, split_vocab=split
  )
  np.testing.assert_allclose(got, risk_torch(pol, ref, m, cl, split), rtol=1e-5, atol=1e-6)


def test_sequence_risk_zero_for_identical_models_and_nonnegative_tail():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(0, 1, (2, 4, 32)), jnp.float32)
  m = jnp.ones((2, 4))
  np.testing.assert_allclose(_risk.ra_dpo_sequence_risk(logits, logits, m), 0.0, atol=1e-7)
  # confidence_level -> 1 keeps (almost) the whole vocabulary: close to the full KL(ref || policy).
  other = jnp.asarray(rng.normal(0, 1, (2, 4, 32)), jnp.float32)
  lp, lr = jax.nn.log_softmax(other), jax.nn.log_softmax(logits)
  kl = jnp.sum(jnp.exp(lr) * (lr - lp), axis=-1).sum(-1)
  r = _risk.ra_dpo_sequence_risk(other, logits, m, confidence_level=0.999999, split_vocab=False)
  assert np.all(np.asarray(r) >= np.asarray(kl) - 1e-5)  # only the lowest (most negative) term dropped


def test_sequence_risk_gradients_reach_policy_not_reference():
  rng = np.random.default_rng(2)
  pol = jnp.asarray(rng.normal(0, 1, (2, 3, 16)), jnp.float32)
  ref = jnp.asarray(rng.normal(0, 1, (2, 3, 16)), jnp.float32)
  m = jnp.ones((2, 3))
  gp, gr = jax.grad(lambda p, r: jnp.sum(_risk.ra_dpo_sequence_risk(p, r, m)), argnums=(0, 1))(pol, ref)
  assert np.all(np.isfinite(gp)) and np.any(np.asarray(gp) != 0)
  np.testing.assert_array_equal(np.asarray(gr), 0.0)


def test_sequence_risk_validation():
  x = jnp.zeros((1, 2, 4))
  with pytest.raises(ValueError, match="confidence_level"):
    _risk.ra_dpo_sequence_risk(x, x, jnp.ones((1, 2)), confidence_level=1.0)


def batch(seed, b=8):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-30, -1, (4, b)).astype(np.float32).astype(np.float64)
  risk = rng.uniform(0, 3, (2, b)).astype(np.float32).astype(np.float64)
  f = lambda v: jnp.asarray(v, jnp.float32)
  policy = pofx.PairLogps(chosen=f(x[0]), rejected=f(x[1]))
  reference = pofx.PairLogps(chosen=f(x[2]), rejected=f(x[3]))
  return policy, reference, x, risk, dict(chosen_risk=f(risk[0]), rejected_risk=f(risk[1]))


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (0.5, 2.0)])
def test_losses_against_authors_formula(beta, alpha):
  policy, reference, x, risk, kw = batch(3)
  rho = (x[0] - x[2]) - (x[1] - x[3])
  ra1 = softplus(-beta * (rho - (risk[1] - risk[0])))
  ra2 = softplus(-beta * (rho - alpha * (risk[1] - risk[0])))
  np.testing.assert_allclose(pofx.losses.get("ra_dpo")(policy, reference, beta=beta, **kw), ra1, rtol=1e-5)
  np.testing.assert_allclose(
    pofx.losses.get("ra_dpo2")(policy, reference, beta=beta, alpha=alpha, **kw), ra2, rtol=1e-5
  )


def test_reduces_to_dpo_and_between_variants():
  policy, reference, _, _, kw = batch(4)
  dpo = pofx.losses.dpo(policy, reference)
  zeros = dict(chosen_risk=jnp.zeros(8), rejected_risk=jnp.zeros(8))
  np.testing.assert_allclose(_risk.ra_dpo(policy, reference, **zeros), dpo, rtol=1e-6)
  np.testing.assert_allclose(_risk.ra_dpo2(policy, reference, alpha=0.0, **kw), dpo, rtol=1e-6)
  np.testing.assert_allclose(
    _risk.ra_dpo2(policy, reference, alpha=1.0, **kw), _risk.ra_dpo(policy, reference, **kw), rtol=1e-6
  )


def test_ra_dpo2_detaches_the_chosen_risk_only():
  policy, reference, _, _, kw = batch(5)
  g1 = jax.grad(lambda c, r: jnp.sum(_risk.ra_dpo(policy, reference, chosen_risk=c, rejected_risk=r)), argnums=(0, 1))(
    kw["chosen_risk"], kw["rejected_risk"]
  )
  g2 = jax.grad(lambda c, r: jnp.sum(_risk.ra_dpo2(policy, reference, chosen_risk=c, rejected_risk=r)), argnums=(0, 1))(
    kw["chosen_risk"], kw["rejected_risk"]
  )
  assert np.all(np.asarray(g1[0]) < 0) and np.all(np.asarray(g1[1]) > 0)
  np.testing.assert_array_equal(np.asarray(g2[0]), 0.0)
  assert np.all(np.asarray(g2[1]) > 0)


def test_validation():
  policy, reference, _, _, kw = batch(6)
  with pytest.raises(ValueError, match="beta"):
    _risk.ra_dpo(policy, reference, beta=0.0, **kw)
  with pytest.raises(ValueError, match="alpha"):
    _risk.ra_dpo2(policy, reference, alpha=-1.0, **kw)
  with pytest.raises(ValueError, match="reference"):
    _risk.ra_dpo(policy, None, **kw)
