"""pofx.diffusion.methods: orderings, step selection, step log-probs, inversion noise, and the
diffusion losses through `pofx.train.make_train_step` with a stand-in denoiser.

Expected values are hand derivations (written out here), torch's own Gaussian log-density, or
the authors' code transcribed; the train-step test checks composition against a step computed
by hand from the same stand-in denoiser.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from pofx import perturbations, references, train
from pofx.diffusion import methods, pairs, schedules
from tests.diffusion import standin

# A stand-in denoiser (the UNet lives on another branch): one 3x3 convolution of the noised image
# plus a per-class bias scaled by the timestep, NHWC.
H = W = 4
C = 1


def _init(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"conv": 0.2 * jax.random.normal(k1, (3, 3, C, C)), "cls": 0.1 * jax.random.normal(k2, (3, C))}


def _denoise(params, x_t, t, cond):
  y = jax.lax.conv_general_dilated(x_t, params["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + (t[:, None, None, None] / 1000.0) * params["cls"][cond][:, None, None, :]


ABAR = jnp.linspace(0.99, 0.05, 1000)


def _predict(params, batch):
  """Noised chosen and rejected images with one timestep and noise per pair; epsilon targets."""
  a = ABAR[batch["t"]][:, None, None, None]
  preds = []
  for x0 in (batch["chosen"], batch["rejected"]):
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * batch["noise"]
    preds.append(_denoise(params, x_t, batch["t"], batch["cond"]))
  return preds[0], preds[1], batch["noise"], batch["noise"]


def _batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "chosen": jnp.asarray(rng.uniform(-1, 1, (b, H, W, C)), jnp.float32),
    "rejected": jnp.asarray(rng.uniform(-1, 1, (b, H, W, C)), jnp.float32),
    "noise": jnp.asarray(rng.normal(size=(b, H, W, C)), jnp.float32),
    "t": jnp.asarray(rng.integers(0, 1000, b), jnp.int32),
    "cond": jnp.asarray(rng.integers(0, 3, b), jnp.int32),
  }


def test_diffusion_dpo_with_sam_and_a_synced_reference_through_the_train_step():
  logps_fn = methods.make_pair_logps_fn(_predict)
  params, batch, beta, rho, lr = _init(0), _batch(), 5000.0, 0.05, 1e-3

  # The authors' Diffusion-DPO loss of the policy `p` against the reference `r`, written out.
  def authors_loss(p, r):
    pw, pl, tw, tl = _predict(p, batch)
    rw, rl, _, _ = _predict(r, batch)
    e = lambda a, b: jnp.mean((a - b) ** 2, axis=(1, 2, 3))
    inside = -0.5 * beta * ((e(pw, tw) - e(pl, tl)) - (e(rw, tw) - e(rl, tl)))
    return jnp.mean(jax.nn.softplus(-inside))

  value_and_grad = jax.jit(jax.value_and_grad(authors_loss))
  # One step by hand: the synced reference starts as the policy; SAM ascends to p + rho g / |g|, the
  # gradient there updates p (SGD); then TR-DPO (tau = 1) mixes the reference: 0.5 p_new + 0.5 ref.
  value, g0 = value_and_grad(params, params)
  norm = optax.global_norm(g0)
  _, g_sam = value_and_grad(jax.tree.map(lambda p, g: p + rho * g / (norm + 1e-12), params, g0), params)
  new_params = jax.tree.map(lambda p, g: p - lr * g, params, g_sam)
  new_ref = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, new_params, params)

  ref = references.synced(0.5, 1, logps_fn)
  step = train.make_train_step(
    logps_fn, optax.sgd(lr), loss="dpo", loss_hyper={"beta": beta}, reference=ref, perturbation=perturbations.sam(rho)
  )
  state = train.init_state(params, optax.sgd(lr), ref, perturbations.sam(rho), rng=jax.random.key(1))
  state, metrics = step(state, batch, jax.random.key(2))
  np.testing.assert_allclose(metrics["loss"], np.log(2.0), rtol=1e-6)  # the reference is the policy
  np.testing.assert_allclose(value, np.log(2.0), rtol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  jax.tree.map(close, state.params, new_params)
  jax.tree.map(close, state.ref_state, new_ref)
  assert not np.allclose(state.params["conv"], params["conv"])
  state, metrics = step(state, batch, jax.random.key(3))  # the reference now differs from the policy
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) != np.log(2.0)


ABAR_LINEAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # diffusers' DDPMScheduler defaults, by hand
STEPS = ((800, 400), (400, 0))


def _hand_step(params, x_t, t, t_prev, cond, eta):
  """(mean, std) of diffusers' DDIM(eta) step from the torch twin's prediction, in float64 numpy."""
  eps = standin.torch_denoise(
    params,
    torch.tensor(x_t.transpose(0, 3, 1, 2), dtype=torch.float32),
    torch.full((x_t.shape[0],), t),
    torch.tensor(np.asarray(cond)),
  )
  eps = eps.numpy().transpose(0, 2, 3, 1).astype(np.float64)
  a, ap = ABAR_LINEAR[t], ABAR_LINEAR[t_prev]
  x0 = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
  std = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
  return np.sqrt(ap) * x0 + np.sqrt(1 - ap - std**2) * eps, std


def _chains(params, eta, b=2, seed=3):
  """Two chains per pair sampled by hand from the model at `params`; and their per-step log-probs."""
  rng = np.random.default_rng(seed)
  cond = rng.integers(0, 3, b)
  batch, expected = {}, {}
  for side in ("chosen", "rejected"):
    x = [rng.normal(size=(b, H, W, C))]
    lps = []
    for t, tp in STEPS:
      mean, std = _hand_step(params, x[-1], t, tp, cond, eta)
      x.append(mean + std * rng.normal(size=mean.shape))
      lp = -((x[-1] - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
      lps.append(lp.mean(axis=(1, 2, 3)))
    batch[f"{side}_latents"] = jnp.asarray(np.stack(x), jnp.float32)
    expected[side] = np.stack(lps, -1)
  batch["timesteps"] = jnp.asarray([t for t, _ in STEPS], jnp.int32)
  batch["prev_timesteps"] = jnp.asarray([tp for _, tp in STEPS], jnp.int32)
  batch["class_labels"] = jnp.asarray(cond, jnp.int32)
  return batch, expected


def test_trajectory_logps_fn_is_the_ddim_eta_gaussian_of_each_step():
  eta, schedule = 0.7, schedules.linear()
  params = standin.init(jax.random.key(0))
  batch, expected = _chains(params, eta)
  got = methods.make_trajectory_logps_fn(standin.denoise, schedule, eta=eta)(params, batch)
  np.testing.assert_allclose(got.chosen_token_logps, expected["chosen"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got.rejected_token_logps, expected["rejected"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got.chosen, expected["chosen"].sum(-1), rtol=1e-4, atol=1e-4)
  # Step-wise labels: step 1 of pair 0 won by the rejected chain (swapped), step 0 of pair 1 a tie (dropped).
  pref = np.array([[1.0, -1.0], [0.0, 1.0]])
  got = methods.make_trajectory_logps_fn(standin.denoise, schedule, eta=eta)(params, {**batch, "step_preference": pref})
  want_c = np.where(pref < 0, expected["rejected"], expected["chosen"]) * (pref != 0)
  want_r = np.where(pref < 0, expected["chosen"], expected["rejected"]) * (pref != 0)
  np.testing.assert_allclose(got.chosen_token_logps, want_c, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got.rejected_token_logps, want_r, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got.chosen_mask, pref != 0)
  with pytest.raises(ValueError, match="eta=0.0; a deterministic DDIM step has no density"):
    methods.make_trajectory_logps_fn(standin.denoise, schedule, eta=0.0)
  # Per-pair timesteps [S, B]: one-step chains, pair 0 at the chains' step 1 (400 -> 0), pair 1 at step 0 (800 -> 400).
  one = {
    f"{side}_latents": jnp.stack(
      [
        jnp.stack([batch[f"{side}_latents"][1, 0], batch[f"{side}_latents"][0, 1]]),
        jnp.stack([batch[f"{side}_latents"][2, 0], batch[f"{side}_latents"][1, 1]]),
      ]
    )
    for side in ("chosen", "rejected")
  }
  one |= {
    "timesteps": jnp.asarray([[400, 800]]),
    "prev_timesteps": jnp.asarray([[0, 400]]),
    "class_labels": batch["class_labels"],
  }
  got = methods.make_trajectory_logps_fn(standin.denoise, schedule, eta=eta)(params, one)
  for side in ("chosen", "rejected"):
    want = np.array([[expected[side][0, 1]], [expected[side][1, 0]]])
    np.testing.assert_allclose(getattr(got, f"{side}_token_logps"), want, rtol=1e-4, atol=1e-4)


def test_d3po_through_the_train_step_on_recorded_chains():
  params = standin.init(jax.random.key(1))
  batch, _ = _chains(params, 1.0, seed=4)
  logps_fn = methods.make_trajectory_logps_fn(standin.denoise, schedules.linear(), eta=1.0)
  ref_params = jax.tree.map(lambda x: x * 0.97, params)
  ref = references.frozen(ref_params, logps_fn)
  opt = optax.sgd(0.1)
  step = train.make_train_step(logps_fn, opt, loss="d3po", loss_hyper={"beta": 0.1}, reference=ref, donate=False)
  state = train.init_state(params, opt, ref, perturbations.none(), rng=jax.random.key(0))
  _, metrics = step(state, batch, jax.random.key(1))
  p, r = jax.jit(lambda a, b_: (logps_fn(a, batch), logps_fn(b_, batch)))(params, ref_params)
  lo, hi = np.log(0.9), np.log(1.1)
  m = np.clip(p.chosen_token_logps - r.chosen_token_logps, lo, hi) - np.clip(
    p.rejected_token_logps - r.rejected_token_logps, lo, hi
  )
  assert 0 < np.abs(m).max() < 0.19  # some log-ratios inside the clip range
  np.testing.assert_allclose(metrics["loss"], np.mean(np.log1p(np.exp(-0.1 * m))), rtol=1e-5)


def test_gaussian_step_logps_is_torchs_normal_density():
  rng = np.random.default_rng(4)
  x, m = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 2, 2, 2))
  std = np.array([0.5, 1.0, 2.0])[:, None, None, None]
  lp = torch.distributions.Normal(torch.tensor(m), torch.tensor(std)).log_prob(torch.tensor(x)).numpy()
  np.testing.assert_allclose(methods.gaussian_step_logps(x, m, std), lp.mean(axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(methods.gaussian_step_logps(x, m, std, reduce="sum"), lp.sum(axis=(1, 2, 3)), rtol=1e-5)
  with pytest.raises(ValueError, match="reduce='max'; allowed"):
    methods.gaussian_step_logps(x, m, std, reduce="max")


def test_spo_select_and_inversion_noise():
  # The authors' preference_score_compare: sort, take best and worst, softmax, valid iff p_best - p_worst > 0.3.
  scores = np.array([[0.1, 0.9, 0.5, 0.2], [0.30, 0.31, 0.32, 0.33]])
  best, worst, valid = methods.spo_select(scores)
  np.testing.assert_array_equal(best, [1, 3])
  np.testing.assert_array_equal(worst, [0, 0])
  # softmax(0.9, 0.1): p_best - p_worst = tanh(0.4) = 0.380 > 0.3; softmax(0.33, 0.30): tanh(0.015) < 0.3.
  np.testing.assert_array_equal(valid, [True, False])
  # The one-step chains: (x_t, best candidate) and (x_t, worst candidate), the invalid pair masked.
  x_t = np.zeros((2, 1, 1, 1))
  cands = np.arange(8.0).reshape(4, 2, 1, 1, 1)  # candidate j of pair i holds 2 j + i
  sb = methods.spo_step_batch(x_t, cands, scores, 500, 480, [1, 2])
  np.testing.assert_array_equal(np.asarray(sb["chosen_latents"])[1].ravel(), [2 * 1 + 0, 2 * 3 + 1])
  np.testing.assert_array_equal(np.asarray(sb["rejected_latents"])[1].ravel(), [0, 1])
  np.testing.assert_array_equal(sb["step_mask"], [[1.0], [0.0]])
  assert sb["timesteps"].tolist() == [500] and sb["prev_timesteps"].tolist() == [480]
  # inversion_noise inverts x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
  rng = np.random.default_rng(5)
  x0, eps = rng.normal(size=(2, 2, 2, 1)), rng.normal(size=(2, 2, 2, 1))
  abar = np.array([0.9, 0.3])
  x_t = np.sqrt(abar)[:, None, None, None] * x0 + np.sqrt(1 - abar)[:, None, None, None] * eps
  np.testing.assert_allclose(methods.inversion_noise(x0, x_t, abar), eps, rtol=1e-4, atol=1e-5)


def test_curriculum_orders_pairs_from_large_to_small_reward_gaps():
  # Two prompts: scores (1.0, 0.2, 0.6) and (0.5, 0.45, 0.0). Pairs with gap > 0.1, the higher first.
  pairs, gaps = methods.curriculum_pairs([1.0, 0.2, 0.6, 0.5, 0.45, 0.0], [0, 0, 0, 1, 1, 1], keep_threshold=0.1)
  np.testing.assert_array_equal(pairs, [[0, 1], [0, 2], [2, 1], [3, 5], [4, 5]])
  np.testing.assert_allclose(gaps, [0.8, 0.4, 0.4, 0.5, 0.45])
  # groups = 3: thresholds linspace(0.4, 0.8, 3)[::-1] = (0.8, 0.6, 0.4); stage 0 keeps gap >= 0.6,
  # stage 1 (the last) gap >= 0.4, i.e. every pair.
  np.testing.assert_allclose(methods.curriculum_thresholds(gaps, 3), [0.8, 0.6, 0.4])
  np.testing.assert_array_equal(methods.curriculum_mask(gaps, 0, groups=3), [True, False, False, False, False])
  np.testing.assert_array_equal(methods.curriculum_mask(gaps, 1, groups=3), [True] * 5)
  # One stage more every update_every steps, capped at groups - 2.
  assert [methods.curriculum_stage(s, update_every=500, groups=5) for s in (0, 499, 500, 1499, 10**6)] == [
    0,
    0,
    1,
    2,
    3,
  ]
  with pytest.raises(ValueError, match="groups=1; allowed: an integer >= 2"):
    methods.curriculum_thresholds(gaps, 1)


def test_inversion_divergence_is_the_authors_weighted_sum():
  rng = np.random.default_rng(6)
  n, b = 3, 2
  pol, ref = rng.normal(size=(2, n, b, 2, 2, 1))
  abar = np.array([0.9, 0.5, 0.2])
  # MIGHTYEZ/Inversion-DPO train_ddim.py: sum_t weight_t * mean((e - e_ref)^2) / num_inference_steps,
  # weight = (1 - abar) / (2 (1 - abar) abar), one image at a time.
  expected = [
    sum((1 - a) / (2 * (1 - a) * a) * np.mean((pol[t, i] - ref[t, i]) ** 2) for t, a in enumerate(abar)) / n
    for i in range(b)
  ]
  np.testing.assert_allclose(methods.inversion_divergence(pol, ref, abar), expected, rtol=1e-5)


def test_inversion_dpo_has_no_gradient_at_the_reference():
  # Hand derivation (docs/methods.md, Inversion-DPO): D = sum_t w_t mean((eps_theta - eps_ref)^2) / N
  # is a weighted squared distance, so D = 0 and dD/dtheta = 0 at theta = theta_ref, and so is the
  # gradient of -log sigmoid(+-beta/2 (D_w - D_l)) with either sign: a policy that starts at the
  # reference does not move. Away from it the gradient is not zero.
  rng = np.random.default_rng(7)
  latents = jnp.asarray(rng.normal(size=(3, 4, 2, 2, 1)), jnp.float32)  # [N, 2 pairs (w, w, l, l), H, W, C]
  abar = jnp.asarray([0.9, 0.5, 0.2], jnp.float32)
  theta_ref = jnp.asarray(rng.normal(size=(1,)), jnp.float32)
  predict = lambda theta: jnp.tanh(theta[0] * latents + 0.3)  # a stand-in denoiser, one parameter
  ref_preds = predict(theta_ref)

  def loss(theta, sign):
    d = methods.inversion_divergence(predict(theta), ref_preds, abar)
    return -jax.nn.log_sigmoid(sign * 2500.0 * (d[:2] - d[2:])).mean()

  for sign in (1.0, -1.0):
    assert float(jnp.abs(jax.grad(loss)(theta_ref, sign))[0]) == 0.0
    assert float(jnp.abs(jax.grad(loss)(theta_ref + 0.01, sign))[0]) > 0.0


def test_sdpo_logps_fn_on_image_pairs():
  # On an ImagePairs batch, make_pair_logps_fn(make_pairs_predict(...)) has the values of the
  # contract's pairs.make_logps_fn (the same draw of timesteps and noise), with or without the
  # safeguard, whose lambda is the authors' (checked in tests/losses/test_diffusion_losses.py).
  rng = np.random.default_rng(8)
  b = 3
  batch = {
    "pairs": pairs.ImagePairs(
      chosen=jnp.asarray(rng.uniform(-1, 1, (b, H, W, C)), jnp.float32),
      rejected=jnp.asarray(rng.uniform(-1, 1, (b, H, W, C)), jnp.float32),
      class_labels=jnp.asarray(rng.integers(0, 3, b), jnp.int32),
      noise_keys=jax.random.key_data(jax.random.split(jax.random.key(5), b)),
      pair_mask=jnp.ones((b,), jnp.float32),
    )
  }
  schedule, params = schedules.cosine(), standin.init(jax.random.key(2))
  fns = (
    pairs.make_logps_fn(standin.denoise, schedule),
    methods.make_pair_logps_fn(methods.make_pairs_predict(standin.denoise, schedule), winner_preserving_mu=0.9),
  )
  ref, got = jax.jit(lambda p: tuple(f(p, batch) for f in fns))(params)
  np.testing.assert_allclose(got.chosen, ref.chosen, rtol=1e-6)
  np.testing.assert_allclose(got.rejected, ref.rejected, rtol=1e-6)


def test_majority_preferences_count_each_metrics_vote():
  # Three metrics (rows) on four pairs (columns), a's scores against b's:
  #   pair 0: a wins 2 of 3 (the third on another scale: 1e3 vs -1e3 is still one vote) -> a;
  #   pair 1: b wins 2 of 3 -> b;  pair 2: one vote each and a tie -> no majority;
  #   pair 3: a wins 1, two ties -> a (a tie casts no vote).
  a = [[1.0, 0.0, 5.0, 2.0], [0.3, -1.0, 0.1, 7.0], [-1e3, 1e3, 0.2, 7.0]]
  b = [[0.0, 1.0, 4.0, 1.0], [0.2, 2.0, 0.1, 7.0], [1e3, 0.0, 0.3, 7.0]]
  prefer_a, decided = methods.majority_preferences(a, b)
  np.testing.assert_array_equal(prefer_a, [True, False, False, True])
  np.testing.assert_array_equal(decided, [True, True, False, True])
  # One metric: its own comparison; swapping the images swaps every decided label.
  np.testing.assert_array_equal(methods.majority_preferences([[1.0, 0.0]], [[0.0, 1.0]])[0], [True, False])
  swapped, decided_swapped = methods.majority_preferences(b, a)
  np.testing.assert_array_equal(decided_swapped, decided)
  np.testing.assert_array_equal(swapped[decided], ~prefer_a[decided])
  with pytest.raises(ValueError, match=r"\[M, N\]"):
    methods.majority_preferences([1.0, 2.0], [0.0, 1.0])


def test_tailor_rank_prefers_the_higher_step_wise_reward():
  # Pair 0: the second sample's reward is higher; pair 1: the first's; pair 2: a tie, not ranked.
  winner, loser, ranked = methods.tailor_rank(np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]]))
  np.testing.assert_array_equal(winner, [1, 0, 0])
  np.testing.assert_array_equal(loser, [0, 1, 1])
  np.testing.assert_array_equal(ranked, [True, True, False])
  with pytest.raises(ValueError, match=r"step_rewards must be \[B, 2\], got shape \(2, 3\)"):
    methods.tailor_rank(np.zeros((2, 3)))


def test_reward_guidance_moves_up_the_reward_and_keeps_only_a_rise():
  # r_b(x) = -k_b |x - a|^2: grad_x (r + delta - r(x))^2 = -2 delta grad r = 4 delta k_b (x - a), so
  # x+ = a + (1 - 4 eta delta k_b) (x - a); with eta delta = 0.1 the factor is 0.6 for k = 1 (the
  # reward rises: kept) and -1.4 for k = 6 (it overshoots and falls: x returned unchanged).
  a = np.array([0.5, -1.0, 2.0], np.float32).reshape(1, 3)
  k = jnp.asarray([1.0, 6.0])
  x = jnp.asarray([[1.5, 0.0, 1.0], [0.0, 0.0, 0.0]], jnp.float32)
  reward = lambda v: -k * jnp.sum((v - a) ** 2, axis=1)
  out, accepted = methods.reward_guidance(reward, x, eta=0.2, delta=0.5)
  np.testing.assert_array_equal(accepted, [True, False])
  np.testing.assert_allclose(np.asarray(out[0]), a[0] + 0.6 * (np.asarray(x[0]) - a[0]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(x[1]))


def test_segment_signed_errors_by_hand():
  # One image of 4 rows (W = C = 1) with residuals 1, 2, 3, 4 row by row: squared 1, 4, 9, 16.
  # Two segments of 2 rows hold 5 and 25. Signed by the labels, averaged over the non-tie rows.
  target = jnp.zeros((1, 4, 1, 1))
  pred = jnp.arange(1.0, 5.0).reshape(1, 4, 1, 1)
  e = lambda labels: float(methods.segment_signed_errors(pred, target, jnp.asarray([labels], jnp.float32))[0])
  assert e([1, -1]) == pytest.approx((5 - 25) / 4)
  assert e([0, 1]) == pytest.approx(25 / 2)
  assert e([-1, 0]) == pytest.approx(-5 / 2)
  assert e([0, 0]) == 0.0  # a pair of ties only carries nothing
  assert e([1, 1, 1, 1]) == pytest.approx(30 / 4)  # every segment +1: the mean squared error
  # Segments split axis 1 of any rank: a video [B, T, H, W, C] is split along its frames.
  video = jnp.arange(24.0).reshape(1, 4, 3, 2, 1)
  got = methods.segment_signed_errors(video, jnp.zeros_like(video), jnp.asarray([[0.0, 1.0, 0.0, -1.0]]))
  sq = np.arange(24.0).reshape(4, 6) ** 2
  assert float(got[0]) == pytest.approx((sq[1].sum() - sq[3].sum()) / 12)
  with pytest.raises(ValueError, match="F dividing 4"):
    methods.segment_signed_errors(pred, target, jnp.ones((1, 3)))


def test_dense_dpo_is_eq7_over_non_tie_tokens_and_diffusion_dpo_with_all_labels_positive():
  """`dpo` on `dense_pair_logps` against arXiv:2506.03517 eq. 7 written out in float64 numpy: per pair
  `-log sigmoid(-beta/2 * sum_f l_f (s_f(x0) - s_f(x1)) / n)`, s = policy minus reference squared
  error summed over the segment, n the element count of the non-tie segments (A.3); and, with every
  label +1, the same numbers as Diffusion-DPO's `pair_logps`."""
  import pofx.losses

  rng = np.random.default_rng(3)
  b, beta = 5, 5000.0
  p0, p1, r0, r1, tgt0, tgt1 = (rng.normal(size=(b, H, W, C)).astype(np.float32) for _ in range(6))
  labels = np.array([[1, -1], [0, 1], [-1, -1], [1, 0], [1, 1]], np.float32)
  policy = methods.dense_pair_logps(p0, p1, tgt0, tgt1, labels)
  reference = methods.dense_pair_logps(r0, r1, tgt0, tgt1, labels)
  got = np.asarray(pofx.losses.dpo(policy, reference, beta=beta))

  seg = lambda p, t: ((p.astype(np.float64) - t) ** 2).reshape(b, 2, -1).sum(axis=2)  # [B, F]
  s0, s1 = seg(p0, tgt0) - seg(r0, tgt0), seg(p1, tgt1) - seg(r1, tgt1)
  n = (labels != 0).sum(axis=1) * (H // 2) * W * C
  z = -beta / 2 * (labels * (s0 - s1)).sum(axis=1) / n
  np.testing.assert_allclose(got, np.logaddexp(0.0, -z), rtol=2e-4)

  ones = np.ones((b, 2), np.float32)
  dense = pofx.losses.dpo(
    methods.dense_pair_logps(p0, p1, tgt0, tgt1, ones), methods.dense_pair_logps(r0, r1, tgt0, tgt1, ones), beta=beta
  )
  plain = pofx.losses.dpo(methods.pair_logps(p0, p1, tgt0, tgt1), methods.pair_logps(r0, r1, tgt0, tgt1), beta=beta)
  np.testing.assert_allclose(np.asarray(dense), np.asarray(plain), rtol=1e-5)
  # Labels are data: no gradient reaches them.
  g = jax.grad(lambda lab: jnp.sum(methods.dense_pair_logps(p0, p1, tgt0, tgt1, lab).chosen))(jnp.asarray(labels))
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_guided_start_index_matches_the_rectified_flow_signal_to_noise_ratio():
  # abar_t = 1 - (t + 1) / 1001 on a 10-step run t = 900, 800, ..., 0. Rectified-flow time eta has
  # signal-to-noise ratio (1 - eta)^2 / eta^2, i.e. abar = (1 - eta)^2 / ((1 - eta)^2 + eta^2):
  # eta = 0.5 -> abar 0.5 -> t = 499.5: t = 500 (abar 0.4995) is nearer than 400 in log-SNR;
  # eta = 0.75 -> abar 0.1 -> t = 899.9: t = 900, index 0; eta = 0.25 -> abar 0.9 -> t = 99.1: t = 100.
  class Sched:
    alphas_cumprod = 1.0 - (np.arange(1000) + 1.0) / 1001.0

  ts = np.arange(9, -1, -1) * 100
  np.testing.assert_array_equal(methods.guided_start_index(Sched, ts, [0.5, 0.75, 0.25]), [4, 0, 8])
  assert int(methods.guided_start_index(Sched, ts, 0.5)) == 4
  with pytest.raises(ValueError, match=r"in \(0, 1\)"):
    methods.guided_start_index(Sched, ts, [0.5, 1.0])
