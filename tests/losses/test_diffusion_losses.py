"""The diffusion preference losses against the authors' code lines, transcribed in PyTorch here.

Each expected value comes from the authors' own formula run on the same numbers (their loss
lines written out in torch, on per-image errors or per-step log-probs), or from a hand
derivation in numpy; never from the function under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pofx
from pofx.diffusion import methods

B = 4


def _errors(seed):
  rng = np.random.default_rng(seed)
  # Per-image mean squared errors of a denoiser, around 0.1-0.3 as for a trained model.
  return {k: rng.uniform(0.1, 0.3, B).astype(np.float32) for k in ("w", "l", "ref_w", "ref_l")}


def _diffusion_pairs(e):
  """The diffusion PairLogps of the contract: chosen = -0.5 e_w, rejected = -0.5 e_l."""
  policy = pofx.PairLogps(chosen=jnp.asarray(-0.5 * e["w"]), rejected=jnp.asarray(-0.5 * e["l"]))
  reference = pofx.PairLogps(chosen=jnp.asarray(-0.5 * e["ref_w"]), rejected=jnp.asarray(-0.5 * e["ref_l"]))
  return policy, reference


def test_diffusion_dpo_is_dpo_with_the_authors_beta():
  # Salesforce DiffusionDPO train.py: model_diff = e_w - e_l, ref_diff likewise,
  # inside_term = -0.5 * beta_dpo * (model_diff - ref_diff), loss = -logsigmoid(inside_term).mean().
  e = _errors(0)
  # Errors that differ by ~1e-3 as late in training, so that beta = 5000 leaves the sigmoid unsaturated.
  e["ref_w"], e["ref_l"] = e["w"] + np.float32(4e-4) * np.arange(1, B + 1), e["l"] - np.float32(3e-4)
  t = {k: torch.tensor(v, dtype=torch.float64) for k, v in e.items()}
  inside = -0.5 * 5000.0 * ((t["w"] - t["l"]) - (t["ref_w"] - t["ref_l"]))
  expected = (-F.logsigmoid(inside)).numpy()
  policy, reference = _diffusion_pairs(e)
  got = pofx.losses.dpo(policy, reference, beta=5000.0)
  np.testing.assert_allclose(got, expected, rtol=2e-4)
  assert float(np.std(expected)) > 0.05  # the pairs are not all at the same loss
  np.testing.assert_allclose(pofx.losses.batch_loss("dpo", policy, reference, beta=5000.0), expected.mean(), rtol=2e-4)


def test_pair_logps_from_predictions_and_the_sdpo_scale():
  rng = np.random.default_rng(1)
  shape = (B, 4, 4, 3)
  pred_w, pred_l, tgt_w, tgt_l = (rng.normal(size=shape).astype(np.float32) for _ in range(4))
  pred_l = tgt_l + 0.5 * (pred_w - tgt_w) + 0.3 * rng.normal(size=shape).astype(np.float32)  # correlated residuals
  mu = 0.6

  # The authors' get_adaptive_lose_l_scale (AIDC-AI/Diffusion-SDPO train.py), transcribed.
  pw = torch.tensor(pred_w, dtype=torch.float64, requires_grad=True)
  pl = torch.tensor(pred_l, dtype=torch.float64, requires_grad=True)
  a = ((pw - torch.tensor(tgt_w, dtype=torch.float64)) ** 2).mean()
  b = ((pl - torch.tensor(tgt_l, dtype=torch.float64)) ** 2).mean()
  (g_a,) = torch.autograd.grad(a, pw)
  (g_b,) = torch.autograd.grad(b, pl)
  num, den = g_a.pow(2).sum(), (g_b * g_a).sum()
  lam = float(torch.where(den > 0, (1 - mu) * num / (den + 1e-9), torch.tensor(1.0, dtype=torch.float64)).clamp(0, 1))
  assert 0.0 < lam < 1.0  # the safeguard is active on these numbers

  got = methods.winner_preserving_scale(pred_w, tgt_w, pred_l, tgt_l, mu=mu)
  np.testing.assert_allclose(float(got), lam, rtol=1e-4)
  # Anti-correlated residuals: g_B . g_A < 0, no constraint: lambda = max_lambda = 1.
  anti = tgt_l - (pred_w - tgt_w)
  np.testing.assert_allclose(float(methods.winner_preserving_scale(pred_w, tgt_w, anti, tgt_l, mu=mu)), 1.0)

  # The PairLogps: values -0.5 * per-image MSE; with the safeguard the loser's gradient is lam times.
  e_w = ((pred_w - tgt_w) ** 2).mean(axis=(1, 2, 3))
  e_l = ((pred_l - tgt_l) ** 2).mean(axis=(1, 2, 3))
  plain = methods.pair_logps(pred_w, pred_l, tgt_w, tgt_l)
  safe = methods.pair_logps(pred_w, pred_l, tgt_w, tgt_l, winner_preserving_mu=mu)
  for p in (plain, safe):
    np.testing.assert_allclose(p.chosen, -0.5 * e_w, rtol=1e-5)
    np.testing.assert_allclose(p.rejected, -0.5 * e_l, rtol=1e-5)
  ref = pofx.PairLogps(chosen=plain.chosen + 1e-4, rejected=plain.rejected - 1e-4)

  def loss(pw_, pl_, mu_):
    return jnp.sum(
      pofx.losses.dpo(methods.pair_logps(pw_, pl_, tgt_w, tgt_l, winner_preserving_mu=mu_), ref, beta=5000.0)
    )

  gw0, gl0 = jax.jit(jax.grad(lambda a, b: loss(a, b, None), argnums=(0, 1)))(pred_w, pred_l)
  gw1, gl1 = jax.jit(jax.grad(lambda a, b: loss(a, b, mu), argnums=(0, 1)))(pred_w, pred_l)
  np.testing.assert_allclose(gw1, gw0, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(gl1, lam * gl0, rtol=1e-4, atol=1e-9)
  with pytest.raises(ValueError, match=r"mu=1.5; allowed: \[0, 1\]"):
    methods.winner_preserving_scale(pred_w, tgt_w, pred_l, tgt_l, mu=1.5)


def _steps(seed, s=5, scale=0.15):
  rng = np.random.default_rng(seed)
  arrays = [rng.normal(-1.0, 0.3, (B, s)).astype(np.float32) for _ in range(2)]
  ref = [a + rng.normal(0, scale, (B, s)).astype(np.float32) for a in arrays]
  mask = np.ones((B, s), np.float32)
  mask[1, 3:] = 0  # pair 1 trains on 3 steps only
  policy = pofx.PairLogps.from_tokens(arrays[0], mask, arrays[1], mask)
  reference = pofx.PairLogps.from_tokens(ref[0], mask, ref[1], mask)
  return arrays, ref, mask, policy, reference


def test_d3po_matches_the_authors_per_step_loss():
  (pw, pl), (rw, rl), mask, policy, reference = _steps(2)
  beta, eps = 0.1, 0.1
  # yk7333/d3po scripts/train.py: ratio = clamp(exp(l - l_ref), 1 - eps, 1 + eps);
  # loss = -log(sigmoid(beta*log(ratio_0)*pref_0 + beta*log(ratio_1)*pref_1)), pref = (+1, -1).
  t = lambda x: torch.tensor(x, dtype=torch.float64)
  r0 = torch.clamp(torch.exp(t(pw) - t(rw)), 1 - eps, 1 + eps)
  r1 = torch.clamp(torch.exp(t(pl) - t(rl)), 1 - eps, 1 + eps)
  per_step = -torch.log(torch.sigmoid(beta * torch.log(r0) * 1 + beta * torch.log(r1) * -1)).numpy()
  inside = (np.abs(pw - rw) < 0.09).mean()
  assert 0.2 < inside < 0.9  # some steps inside the clip range, some clipped
  expected = (per_step * mask).sum(1) / mask.sum(1)  # accumulated one step at a time: the mean
  np.testing.assert_allclose(pofx.losses.d3po(policy, reference, beta=beta, eps=eps), expected, rtol=1e-5)

  # Gradient: d/dl_w of beta-log-ratio DPO is -beta sigmoid(-beta m) inside the clip range, 0 outside.
  g = jax.jit(jax.grad(lambda c: jnp.sum(pofx.losses.d3po(policy.replace(chosen_token_logps=c), reference))))(
    policy.chosen_token_logps
  )
  m = np.clip(pw - rw, math.log(0.9), math.log(1.1)) - np.clip(pl - rl, math.log(0.9), math.log(1.1))
  inner = (pw - rw > math.log(0.9)) & (pw - rw < math.log(1.1))
  hand = np.where(inner, -beta / (1 + np.exp(beta * m)), 0.0) * mask / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(g, hand, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match=r"eps=1.0; allowed: \(0.0, 1.0\)"):
    pofx.losses.d3po(policy, reference, eps=1.0)


def test_dense_reward_dpo_is_the_expectation_of_the_authors_estimator():
  (pw, pl), (rw, rl), mask, policy, reference = _steps(3, scale=4e-4)
  beta, gamma, c = 12.5, 0.9, 5e-4
  # Hand derivation: w_t = gamma^t m_t / (sum + 1e-8); z = beta sum_t w_t clip(d_t, -c, c).
  w = gamma ** np.arange(5)[None, :] * mask
  w = w / (w.sum(1, keepdims=True) + 1e-8)
  z_w = beta * (w * np.clip(pw - rw, -c, c)).sum(1)
  z_l = beta * (w * np.clip(pl - rl, -c, c)).sum(1)
  # The authors' listMLELoss (reward_loss.py) for K = 2, winner first, on these logits.
  y_pred = torch.tensor(np.stack([z_w, z_l], 1), dtype=torch.float64)
  mx = y_pred.max(dim=1, keepdim=True).values
  cums = torch.cumsum((y_pred - mx).exp().flip(dims=[1]), dim=1).flip(dims=[1])
  listmle = (torch.log(cums + 1e-10) - (y_pred - mx)).sum(1).numpy()
  got = pofx.losses.dense_reward_dpo(policy, reference)
  np.testing.assert_allclose(got, listmle, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pofx.losses.dense_reward_step_weights(mask, gamma=gamma), w, rtol=1e-6)
  # Their Monte Carlo estimator (steps drawn from Categorical(w), M of them) averages to the same logits.
  rng = np.random.default_rng(0)
  draws = np.stack([rng.choice(5, size=20000, p=w[0] / w[0].sum())])[0]
  mc = beta * np.clip(pw[0] - rw[0], -c, c)[draws].mean()
  np.testing.assert_allclose(mc, z_w[0], atol=0.02 * beta * c)


def test_diffusion_kto_matches_the_authors_loss_block():
  e = _errors(4)
  e["ref_w"], e["ref_l"] = e["w"] + 1e-3 * np.array([1, -2, 3, 1]), e["l"] + 1e-3 * np.array([-1, 2, 0.5, -3])
  labels_w, labels_l = np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0, 0.0])
  beta, lam_d, lam_u = 1000.0, 1.0, 2.0
  # jacklishufan/diffusion-kto train_kto_sd_v1.5.py on the 2B images (winners then losers):
  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)
  model_losses = torch.cat([t(e["w"]), t(e["l"])])
  ref_loss = torch.cat([t(e["ref_w"]), t(e["ref_l"])])
  labels = torch.cat([t(labels_w), t(labels_l)])
  g_term = -model_losses - -ref_loss
  kl = g_term.mean().detach().clamp(min=0)
  g_term = g_term - kl
  label_sgn = 2 * labels - 1
  h = torch.sigmoid(label_sgn * beta * g_term)
  w_y = lam_d * (labels == 1) + lam_u * (labels != 1)
  l_kto = (w_y * (1 - h)).numpy()
  assert float(kl) > 0  # the reference point is active
  policy, reference = _diffusion_pairs(e)
  got = pofx.losses.diffusion_kto(
    policy,
    reference,
    beta=beta,
    undesirable_weight=lam_u,
    chosen_scores=jnp.asarray(labels_w),
    rejected_scores=jnp.asarray(labels_l),
  )
  np.testing.assert_allclose(got, 0.5 * (l_kto[:B] + l_kto[B:]), rtol=1e-4)
  np.testing.assert_allclose(
    pofx.losses.batch_loss(
      "diffusion_kto",
      policy,
      reference,
      beta=beta,
      undesirable_weight=lam_u,
      chosen_scores=labels_w,
      rejected_scores=labels_l,
    ),
    l_kto.mean(),
    rtol=1e-4,
  )
  with pytest.raises(ValueError, match=r"diffusion_kto: 1 of 4 pairs .* allowed: binary labels"):
    pofx.losses.diffusion_kto(policy, reference, chosen_scores=np.array([1.0, 0.5, 0, 1]), rejected_scores=labels_l)


def test_smpo_matches_the_authors_scale_term():
  e = _errors(5)
  e["ref_w"], e["ref_l"] = e["w"] + 2e-5 * np.arange(1, B + 1), e["l"] - 1e-5
  s_w = np.array([0.25, 0.2, 0.13, 0.21])  # PickScore-like rewards; pair 2's label disagrees with them
  s_l = np.array([0.15, 0.19, 0.2, 0.21])
  beta = 5000.0
  # JaydenLyh/SmPO train.py: min-max normalised scores, probs = softmax, scale = -0.5 beta (2p - 1) * 10.
  max_val, min_val = 0.28201571106910706, 0.11543526500463486
  n_w, n_l = ((torch.tensor(s, dtype=torch.float64) - min_val) / (max_val - min_val) for s in (s_w, s_l))
  p = torch.exp(n_w) / (torch.exp(n_w) + torch.exp(n_l))
  t = {k: torch.tensor(v, dtype=torch.float64) for k, v in e.items()}
  inside = -0.5 * beta * (2 * p - 1) * 10 * ((t["w"] - t["l"]) - (t["ref_w"] - t["ref_l"]))
  expected = (-F.logsigmoid(inside)).numpy()
  policy, reference = _diffusion_pairs(e)
  got = pofx.losses.smpo(policy, reference, chosen_scores=jnp.asarray(s_w), rejected_scores=jnp.asarray(s_l))
  np.testing.assert_allclose(got, expected, rtol=2e-4)
  np.testing.assert_allclose(got[3], math.log(2.0), rtol=1e-6)  # equal scores: p = 1/2, loss log 2


def test_reg_dpo_and_diffusion_dro():
  e = _errors(6)
  e["ref_w"], e["ref_l"] = e["w"] + 1e-4, e["l"] - 4e-4 * np.arange(B)
  policy, reference = _diffusion_pairs(e)
  d = (e["w"] - e["l"]) - (e["ref_w"] - e["ref_l"])
  # Reg-DPO: Diffusion-DPO + lam * e_w (hand derivation).
  dpo = np.log1p(np.exp(0.5 * 5000.0 * d))
  np.testing.assert_allclose(pofx.losses.reg_dpo(policy, reference, lam=0.3), dpo + 0.3 * e["w"], rtol=1e-4)
  with pytest.raises(ValueError, match="missing required argument"):
    pofx.losses.batch_loss("reg_dpo", policy, reference)
  # basiclab/DiffusionDRO train.py: diff = (e_E - e0_E) - (e_pi - e0_pi); loss = max(diff + margin, 0).
  t = {k: torch.tensor(v, dtype=torch.float64) for k, v in e.items()}
  diff = (t["w"] - t["ref_w"]) - (t["l"] - t["ref_l"])
  expected = torch.maximum(diff + 0.001, torch.zeros_like(diff)).numpy()
  got = pofx.losses.diffusion_dro(policy, reference)
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-7)
  assert (expected > 0).any() and (expected == 0).any()


def test_patch_dpo_is_the_authors_weighted_mse_on_quality_maps():
  rng = np.random.default_rng(7)
  b, h, w, c = 2, 4, 4, 3
  pred_w, pred_l, noise = (rng.normal(size=(b, h, w, c)).astype(np.float32) for _ in range(3))
  q_w, q_l = rng.uniform(size=(b, 2, 2)), rng.uniform(size=(b, 2, 2))  # one quality per 2x2 patch
  # hqhQAQ/PatchDPO train_patchdpo.py, NCHW: region_weight = cat([1 - target_rmap, contra_rmap]) (maps at the
  # prediction's resolution, here each patch's value repeated over its 2x2 pixels), weighted_mse_loss = mean(w * d^2).
  up = lambda q: torch.tensor(np.repeat(np.repeat(q, 2, axis=1), 2, axis=2))[:, None]
  nchw = lambda x: torch.tensor(x).permute(0, 3, 1, 2).double()
  model_pred = torch.cat([nchw(pred_w), nchw(pred_l)])
  target = torch.cat([nchw(noise), nchw(noise)])
  region_weight = torch.cat([1 - up(q_w), up(q_l)], dim=0)
  expected = float(torch.mean((model_pred - target) ** 2 * region_weight))
  policy = methods.patch_pair_logps(pred_w, pred_l, noise, noise, q_w, q_l)
  np.testing.assert_allclose(pofx.losses.batch_loss("patch_dpo", policy), expected, rtol=1e-5)
  # The logps_fn reads the maps from the batch.
  fn = methods.make_patch_logps_fn(lambda params, batch: (pred_w, pred_l, noise, noise))
  p2 = fn(None, {"chosen_patch_quality": q_w, "rejected_patch_quality": q_l})
  np.testing.assert_allclose(p2.chosen, policy.chosen)
  with pytest.raises(ValueError, match=r"patch_weights must be \[B, h, w\] with h dividing 4"):
    methods.patch_weighted_errors(pred_w, noise, np.ones((b, 3, 3)))


# -------------------------------------------------------------------------------------------------
# Adaptive-DPO


def _adaptive_errors(seed, b=6):
  """Per-image errors of the policy, the reference and two EMA companions; the models' errors
  differ by ~1e-3 (late in training), so beta * l stays in the sigmoid's unsaturated range."""
  rng = np.random.default_rng(seed)
  e = {"ref_w": rng.uniform(0.1, 0.3, b), "ref_l": rng.uniform(0.1, 0.3, b)}
  for m in ("pol", "ema1", "ema2"):
    e[f"{m}_w"] = e["ref_w"] + rng.normal(0.0, 1e-3, b)
    e[f"{m}_l"] = e["ref_l"] + rng.normal(0.0, 1e-3, b)
  return {k: v.astype(np.float32) for k, v in e.items()}


def _adaptive_pairs(e, mask=1.0):
  """pofx's diffusion PairLogps (-e/2), the companions on the reference."""
  h = lambda x: jnp.asarray(-0.5 * np.asarray(x, np.float32))
  policy = pofx.PairLogps(chosen=h(e["pol_w"]), rejected=h(e["pol_l"]))
  reference = pofx.PairLogps(
    chosen=h(e["ref_w"]),
    rejected=h(e["ref_l"]),
    companion_chosen=h(np.stack([e["ema1_w"], e["ema2_w"]], 1)),
    companion_rejected=h(np.stack([e["ema1_l"], e["ema2_l"]], 1)),
    companion_mask=jnp.full((len(e["ref_w"]), 2), mask, jnp.float32),
  )
  return policy, reference


def _authors_adaptive_loss(e, *, beta, rho=15.0, k=10.0, c=1.0, weight_type="linear", margin="quadratic", norm=True):
  """fanfanffff1/Adaptive-DPO dpo_train_un.py @ a64ae01, lines 793-808, 623-628, 818-852, 888-907 and
  916-928, transcribed to float64 NumPy (after the EMA warm-up). Returns (loss per pair, u, weight)."""
  d = {k_: np.asarray(v, np.float64) for k_, v in e.items()}
  ref_diff = d["ref_w"] - d["ref_l"]
  logits = ref_diff - (d["pol_w"] - d["pol_l"])  # line 808
  logits1 = ref_diff - (d["ema1_w"] - d["ema1_l"])  # cal_loss with the EMA 0.9999 weights
  logits2 = ref_diff - (d["ema2_w"] - d["ema2_l"])  # ... and the EMA 0.5 weights
  stacked = np.stack([logits, logits1, logits2])
  if norm:  # use_logits_normalization
    stacked = stacked / np.linalg.norm(stacked, axis=1, keepdims=True)
  logit = stacked * rho
  train_std = np.minimum(np.std(logit, axis=0, ddof=1), 1.0)  # cal_un_wy_wstd, torch's unbiased std
  train_mean = np.mean(1.0 / (1.0 + np.exp(-logit)), axis=0)
  u = np.abs(train_mean - 1.0) * train_std
  weight = {
    "linear": 1.0 / (u * k + c),
    "quadratic": 1.0 / (u * u * k + c),
    "sqrt": 1.0 / (np.exp(k * np.sqrt(u)) + c),
    "sigmoid": 1.0 / (np.exp(k * u) + c),
  }[weight_type]
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  if margin == "linear":
    inside = beta * logits - (-u / beta + logits.mean())
  elif margin == "quadratic":
    inside = beta * logits - (-u * u / beta + logits.mean())
  else:
    inside = beta * logits
  return -weight * log_sigmoid(inside), u, weight


@pytest.mark.parametrize(
  "hyper",
  [
    {},
    {"beta": 2500.0, "weighting": "quadratic", "margin": "linear"},
    {"weighting": "sqrt", "margin": "none", "rho": 5.0},
    {"weighting": "sigmoid", "k": 3.0, "c": 0.5, "normalize": False, "rho": 800.0},
  ],
  ids=["readme", "quadratic_linear", "sqrt_none", "sigmoid_raw"],
)
def test_adaptive_dpo_matches_the_authors_loss(hyper):
  e = _adaptive_errors(11)
  policy, reference = _adaptive_pairs(e)
  kw = dict(beta=1000.0, rho=15.0, k=10.0, c=1.0, weighting="linear", margin="quadratic", normalize=True)
  kw.update(hyper)
  expected, u, w = _authors_adaptive_loss(
    e,
    beta=kw["beta"],
    rho=kw["rho"],
    k=kw["k"],
    c=kw["c"],
    weight_type=kw["weighting"],
    margin=kw["margin"],
    norm=kw["normalize"],
  )
  assert np.std(u) > 1e-3 and np.all(u >= 0)  # the pairs get different uncertainties
  assert np.std(expected) > 0.05 * np.mean(expected)  # and different losses
  got = pofx.losses.adaptive_dpo(policy, reference, **kw)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(
    pofx.losses.batch_loss("adaptive_dpo", policy, reference, **kw), expected.mean(), rtol=2e-4
  )
  # The uncertainty alone (the policy's and the companions' logits, l = 2 rho).
  l0, l_comp, in_use = pofx.losses.adaptive_dpo_logits(policy, reference)
  assert bool(jnp.all(in_use))
  models = jnp.concatenate([l0[None], l_comp.T])
  got_u = pofx.losses.adaptive_dpo_uncertainty(models, rho=kw["rho"], normalize=kw["normalize"])
  np.testing.assert_allclose(got_u, u, rtol=1e-4, atol=1e-6)


def test_adaptive_dpo_gradient_holds_the_weight_and_margin_fixed():
  # d/d pi_w of -w log sigmoid(beta l + g - mean l), l = 2 (pi_w - ref_w - pi_l + ref_l), with w, g
  # and the mean detached: -w beta 2 sigmoid(-z) per pair (over B for the batch mean).
  e = _adaptive_errors(12)
  policy, reference = _adaptive_pairs(e)
  beta = 1000.0
  expected, u, w = _authors_adaptive_loss(e, beta=beta)
  d = {k: np.asarray(v, np.float64) for k, v in e.items()}
  l = (d["ref_w"] - d["ref_l"]) - (d["pol_w"] - d["pol_l"])
  z = beta * l + u * u / beta - l.mean()
  grad = jax.grad(lambda pc: pofx.losses.batch_loss("adaptive_dpo", policy.replace(chosen=pc), reference, beta=beta))(
    policy.chosen
  )
  np.testing.assert_allclose(grad, -w * beta * 2.0 / (1.0 + np.exp(z)) / len(l), rtol=1e-3)


def test_adaptive_dpo_hand_values():
  beta = 1000.0
  # All three models agree (the companions' errors are the policy's): std 0, so u = 0, the weight
  # is 1 / c and the loss is -log sigmoid(beta l - mean l) / c.
  e = _adaptive_errors(13, b=3)
  for m in ("ema1", "ema2"):
    e[f"{m}_w"], e[f"{m}_l"] = e["pol_w"], e["pol_l"]
  policy, reference = _adaptive_pairs(e)
  l = 2.0 * (
    np.asarray(policy.chosen - reference.chosen, np.float64) - np.asarray(policy.rejected - reference.rejected)
  )
  expected = np.logaddexp(0.0, -(beta * l - l.mean())) / 2.0
  np.testing.assert_allclose(pofx.losses.adaptive_dpo(policy, reference, beta=beta, c=2.0), expected, rtol=1e-4)
  # Before the companions' warm-up (mask 0) u = 0 as well, whatever they hold.
  e2 = _adaptive_errors(14, b=3)
  p2, r2 = _adaptive_pairs(e2, mask=0.0)
  l2 = 2.0 * (np.asarray(p2.chosen - r2.chosen, np.float64) - np.asarray(p2.rejected - r2.rejected))
  np.testing.assert_allclose(
    pofx.losses.adaptive_dpo(p2, r2, beta=beta), np.logaddexp(0.0, -(beta * l2 - l2.mean())), rtol=1e-4
  )
  # One pair: normalisation leaves rho * sign(l_m). With the policy and one EMA saying "winner" and
  # the other "loser": L^ = (15, 15, -15), mean sigmoid = (2 s(15) + s(-15)) / 3 ~ 2/3, std = sqrt(300)
  # clipped to 1, so u ~ 1/3 and the weight 1 / (10/3 + 1) = 3/13.
  models = jnp.array([[2e-3], [5e-4], [-1e-3]])
  u = float(pofx.losses.adaptive_dpo_uncertainty(models)[0])
  s = lambda x: 1.0 / (1.0 + math.exp(-x))
  np.testing.assert_allclose(u, 1.0 - (2.0 * s(15.0) + s(-15.0)) / 3.0, rtol=1e-6)
  one = pofx.PairLogps(chosen=jnp.array([-0.5 * 0.1]), rejected=jnp.array([-0.5 * 0.2]))
  ref = pofx.PairLogps(
    chosen=jnp.array([-0.5 * 0.101]),
    rejected=jnp.array([-0.5 * 0.2]),
    companion_chosen=jnp.array([[-0.5 * 0.1, -0.5 * 0.102]]),
    companion_rejected=jnp.array([[-0.5 * 0.2, -0.5 * 0.2]]),
    companion_mask=jnp.ones((1, 2)),
  )
  l_one = 2.0 * 0.5 * 0.001  # ref_diff - model_diff = (0.101 - 0.2) - (0.1 - 0.2)
  z = beta * l_one + u * u / beta - l_one
  np.testing.assert_allclose(
    pofx.losses.adaptive_dpo(one, ref, beta=beta), (3.0 / 13.0) * math.log1p(math.exp(-z)), rtol=1e-3
  )


def test_adaptive_dpo_refusals():
  e = _adaptive_errors(15)
  policy, reference = _adaptive_pairs(e)
  bare = pofx.PairLogps(chosen=reference.chosen, rejected=reference.rejected)
  with pytest.raises(ValueError, match="no companions.*ema_companions"):
    pofx.losses.adaptive_dpo(policy, bare)
  with pytest.raises(ValueError, match=r"invalid margin='cubic'; allowed: \['linear', 'none', 'quadratic'\]"):
    pofx.losses.adaptive_dpo(policy, reference, margin="cubic")
  with pytest.raises(ValueError, match=r"invalid c=0.0; allowed: c > 0"):
    pofx.losses.adaptive_dpo(policy, reference, c=0.0)
  with pytest.raises(ValueError, match=r"invalid rho=0.0"):
    pofx.losses.adaptive_dpo(policy, reference, rho=0.0)
