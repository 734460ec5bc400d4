"""Evaluation: Wilson interval (scipy reference), win rate with ties, KL / gold reward / win rate
by Monte Carlo against exact enumeration over every completion, reward/ranking accuracy and the
idealized ranking accuracy of Chen et al. 2024 (arXiv:2405.19534) on hand-computed numbers."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from pofx import evaluation, world
from pofx._pair_logps import PairLogps
from pofx.models import llama


def _pairs(chosen, rejected, chosen_len=None, rejected_len=None):
  f = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return PairLogps(chosen=f(chosen), rejected=f(rejected), chosen_len=f(chosen_len), rejected_len=f(rejected_len))


# Intervals, win rate, KL ---------------------------------------------------------------------------


@pytest.mark.parametrize("k,n,conf", [(8, 10, 0.95), (0, 10, 0.95), (10, 10, 0.95), (37, 50, 0.9), (512, 1024, 0.95)])
def test_wilson_matches_scipy(k, n, conf):
  ref = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
  lo, hi = evaluation.wilson_interval(k, n, conf)
  np.testing.assert_allclose([lo, hi], [ref.low, ref.high], atol=1e-12)


def test_wilson_known_value_and_fractional():
  # 8 of 10 at 95%: (0.4901625, 0.9433178) (Wilson 1927; also scipy above).
  np.testing.assert_allclose(evaluation.wilson_interval(8, 10), (0.4901625, 0.9433178), atol=1e-7)
  # Fractional successes (ties counted half): the formula written out.
  z = 1.959963984540054
  p, n = 2.5 / 4, 4
  c = (p + z * z / (2 * n)) / (1 + z * z / n)
  h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  np.testing.assert_allclose(evaluation.wilson_interval(2.5, 4), (c - h, c + h), atol=1e-12)
  with pytest.raises(ValueError, match="n must be positive"):
    evaluation.wilson_interval(0, 0)
  with pytest.raises(ValueError, match="successes"):
    evaluation.wilson_interval(11, 10)
  with pytest.raises(ValueError, match="confidence"):
    evaluation.wilson_interval(1, 10, confidence=1.0)


def test_win_rate_ties_count_half():
  wr = evaluation.win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0])
  assert (wr.wins, wr.ties, wr.losses, wr.n) == (2, 1, 1, 4)
  assert wr.rate == 0.625
  np.testing.assert_allclose((wr.low, wr.high), evaluation.wilson_interval(2.5, 4), atol=1e-12)
  assert evaluation.win_rate([1.0] * 6, [1.0] * 6).rate == 0.5
  with pytest.raises(ValueError, match="same shape|one shape"):
    evaluation.win_rate([1.0, 2.0], [1.0])


def test_kl_estimate_and_stderr():
  mean, se = evaluation.kl_estimate([-1.0, -2.0, -3.0], [-2.0, -2.0, -5.0])  # diffs 1, 0, 2
  np.testing.assert_allclose([mean, se], [1.0, 1.0 / math.sqrt(3)], rtol=1e-12)
  assert evaluation.mean_and_stderr([4.0]) == (4.0, 0.0)


# Pair metrics -------------------------------------------------------------------------------------


def test_reward_accuracy():
  pol = _pairs([-10.0, -5.0, -3.0], [-12.0, -4.0, -3.0])
  ref = _pairs([-11.0, -5.0, -3.0], [-11.0, -5.0, -3.0])
  # margins: (1) - (-1) = 2; 0 - 1 = -1; 0 (strictly > 0 needed).
  np.testing.assert_array_equal(evaluation.reward_accuracy(pol, ref), [1.0, 0.0, 0.0])


def test_ranking_accuracy_llm_md_example():
  # Chen et al. 2024 (arXiv:2405.19534): summed -10 > -12 is correct; length-normalised -10/5 = -12/6 = -2 is a
  # tie, which counts as wrong.
  pol = _pairs([-10.0, -3.0], [-12.0, -1.0], [5.0, 1.0], [6.0, 2.0])
  np.testing.assert_array_equal(evaluation.ranking_accuracy(pol, normalize="sum"), [1.0, 0.0])
  np.testing.assert_array_equal(evaluation.ranking_accuracy(pol, normalize="mean"), [0.0, 0.0])  # -3 < -0.5
  with pytest.raises(ValueError, match="normalize"):
    evaluation.ranking_accuracy(pol, normalize="median")
  with pytest.raises(ValueError, match="chosen_len"):
    evaluation.ranking_accuracy(_pairs([-1.0], [-2.0]), normalize="mean")


def test_idealized_ranking_accuracy_hand_cases():
  ira = evaluation.idealized_ranking_accuracy
  # Equal reference probabilities, 3:1 votes, beta = 0.1: pi* ratio 3^(1/beta) = 3^10 = 59049 -> correct.
  assert float(ira(_pairs([-11.0], [-11.0]), [0.75], beta=0.1)[0]) == 1.0
  # Reference misranks by 5 nats: log ratio -5 + log(3)/beta: wrong at beta = 1, fixed at beta = 0.1.
  ref = _pairs([-15.0], [-10.0])
  assert float(ira(ref, [0.75], beta=1.0)[0]) == 0.0  # -5 + 1.0986 < 0
  assert float(ira(ref, [0.75], beta=0.1)[0]) == 1.0  # -5 + 10.986 > 0
  # Truth prefers the rejected one (p = 0.2) and so does pi*: agreement counts as correct.
  assert float(ira(_pairs([-11.0], [-11.0]), [0.2], beta=1.0)[0]) == 1.0
  # Tie band +-5% on the ratio: p = 1/2 is a true tie; pi* ratio e^0.01 = 1.01 is a tie, e^0.2 is not.
  assert float(ira(_pairs([-10.99], [-11.0]), [0.5], beta=1.0)[0]) == 1.0
  assert float(ira(_pairs([-10.8], [-11.0]), [0.5], beta=1.0)[0]) == 0.0
  # p = 1 is clipped to 1 - 1e-3: log(999) = 6.9068; with h_ref = -7 the ratio is e^-0.093 (wrong),
  # with h_ref = -6.8 it is e^0.107 (right).
  assert float(ira(_pairs([-17.0], [-10.0]), [1.0], beta=1.0)[0]) == 0.0
  assert float(ira(_pairs([-16.8], [-10.0]), [1.0], beta=1.0)[0]) == 1.0
  # Normalisation: sums -10 vs -6 (h = -4) but means -2 vs -3 (h = +1); p = 0.6, beta = 1 (logit 0.405).
  ref = _pairs([-10.0], [-6.0], [5.0], [2.0])
  assert float(ira(ref, [0.6], beta=1.0, normalize="sum")[0]) == 0.0
  assert float(ira(ref, [0.6], beta=1.0, normalize="mean")[0]) == 1.0
  with pytest.raises(ValueError, match="beta"):
    ira(ref, [0.6], beta=0.0)


def test_flip_threshold_loss():
  ref = _pairs([-12.0], [-10.0])
  np.testing.assert_allclose(
    evaluation.flip_threshold_loss(ref, beta=0.1), [-math.log(1 / (1 + math.exp(-0.2)))], rtol=1e-6
  )
  # The policy ranks a pair correctly iff its DPO loss is below the threshold (Chen et al. 2024, arXiv:2405.19534).
  rng = np.random.default_rng(0)
  pw, pl, rw, rl = (rng.normal(-20, 5, 2000) for _ in range(4))
  beta = 0.3
  z = beta * ((pw - rw) - (pl - rl))
  dpo = np.logaddexp(0.0, -z)
  thr = np.asarray(evaluation.flip_threshold_loss(_pairs(rw, rl), beta=beta), np.float64)
  np.testing.assert_array_equal(dpo < thr - 1e-5, (pw > pl) & (np.abs(dpo - thr) > 1e-5))
  with pytest.raises(ValueError, match="beta"):
    evaluation.flip_threshold_loss(ref, beta=-1.0)


# Sampled metrics against exact enumeration ---------------------------------------------------------


@pytest.fixture(scope="module")
def small():
  """V = 8 (content 4..7), completions of at most 3 tokens: 400 possible completions per prompt."""
  w = world.World(
    world.WorldConfig(
      vocab_size=8,
      max_prompt_len=3,
      max_completion_len=3,
      min_good_len=1,
      max_good_len=2,
      demo_min_len=1,
      demo_max_len=2,
    )
  )
  model = llama.make(llama.tiny(vocab_size=8, init_std=0.4))
  return w, model, model.init(jax.random.key(0)), model.init(jax.random.key(1))


def _all_completions(V=8, T=3, eos=3):
  out = []
  for n in range(1, T + 1):
    for prefix in itertools.product([t for t in range(V) if t != eos], repeat=n - 1):
      out.append(list(prefix) + [eos])
      if n == T:
        out += [list(prefix) + [t] for t in range(V) if t != eos]
  return out


def _exact_logps(params, logits_fn, prompt, comps):
  """log pi(y | x) of each completion, by one plain full forward (no cache, no pofx.sampling):
  `logits_fn` is the model's `logits`, compiled."""
  W = len(prompt) + 3
  tok = np.zeros((len(comps), W), np.int32)
  for i, y in enumerate(comps):
    tok[i, : len(prompt) + len(y)] = list(prompt) + y
  pos = np.broadcast_to(np.arange(W, dtype=np.int32), tok.shape)
  logp = np.asarray(jax.nn.log_softmax(logits_fn(params, tok, pos, np.ones_like(tok)), -1), np.float64)
  P = len(prompt)
  return np.array([sum(logp[i, P - 1 + t, y[t]] for t in range(len(y))) for i, y in enumerate(comps)])


def test_sampled_metrics_match_exact_enumeration(small):
  w, model, pol, base = small
  prompts = [[world.BOS, 5, 6, world.SEP], [world.BOS, 7, world.SEP]]
  comps = _all_completions()
  assert len(comps) == 400
  logits_fn = jax.jit(model.logits)
  kl_exact, gold_exact, win_exact = [], [], []
  for x in prompts:
    lp, lb = _exact_logps(pol, logits_fn, x, comps), _exact_logps(base, logits_fn, x, comps)
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0, rtol=1e-5)  # the enumeration is complete
    pp, pb = np.exp(lp), np.exp(lb)
    r = w.gold_reward([x] * len(comps), comps).astype(np.float64)
    kl_exact.append(np.sum(pp * (lp - lb)))
    gold_exact.append(np.sum(pp * r))
    win_exact.append(np.sum(pp[:, None] * pb[None, :] * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :]))))
  n = 3000
  ev = evaluation.evaluate_policy(w, pol, base, prompts, jax.random.key(2), model=model, num_samples=n, batch_size=1000)
  assert ev["num_comparisons"] == 2 * n
  assert abs(ev["kl"] - np.mean(kl_exact)) < 4 * ev["kl_stderr"] and ev["kl_stderr"] < 0.1 * np.mean(kl_exact)
  assert abs(ev["gold_reward"] - np.mean(gold_exact)) < 4 * ev["gold_reward_stderr"]
  assert ev["win_rate_low"] < np.mean(win_exact) < ev["win_rate_high"]
  assert ev["win_rate_high"] - ev["win_rate_low"] < 0.06
  # Against itself: KL exactly 0 (same log-probs) and a win rate of 1/2 up to noise.
  same = evaluation.evaluate_policy(
    w, base, base, prompts, jax.random.key(3), model=model, num_samples=n, batch_size=1000
  )
  assert abs(same["kl"]) < 1e-5 and same["win_rate_low"] < 0.5 < same["win_rate_high"]
  np.testing.assert_allclose(same["gold_reward"], same["base_gold_reward"], atol=4 * same["gold_reward_stderr"] * 1.5)
  # Reusing the base samples gives the same base statistics.
  again = evaluation.evaluate_policy(
    w,
    pol,
    base,
    prompts,
    jax.random.key(2),
    model=model,
    num_samples=n,
    batch_size=1000,
    base_samples=ev["base_samples"],
  )
  assert again["win_rate"] == ev["win_rate"] and again["base_length"] == ev["base_length"]


def test_evaluate_pairs(small):
  w, model, pol, base = small
  prompts = w.prompts(64, seed=0)
  data = world.preference_data(w, base, prompts, jax.random.key(4), model=model, num_samples=2, batch_size=64)
  # pair_logps (teacher forcing) reproduces the sampler's own log-probs of its samples.
  lp = evaluation.pair_logps(
    base,
    data.list_prompt,
    [c[0] for c in data.list_completions],
    [c[1] for c in data.list_completions],
    model=model,
    prompt_width=w.config.prompt_width,
  )
  np.testing.assert_allclose(np.asarray(lp.chosen), data.list_logps[:, 0], atol=1e-5)
  np.testing.assert_allclose(np.asarray(lp.rejected), data.list_logps[:, 1], atol=1e-5)
  out = evaluation.evaluate_pairs(
    base, base, data.prompt, data.chosen, data.rejected, model=model, beta=0.1, pref_prob=data.label_prob
  )
  assert out["reward_accuracy"] == 0.0  # policy == reference: every margin is 0
  assert out["ranking_accuracy"] == out["ref_ranking_accuracy"]
  assert out["num_pairs"] == len(data)
  # By hand from the two models' log-probs.
  p = evaluation.pair_logps(pol, data.prompt, data.chosen, data.rejected, model=model)
  r = evaluation.pair_logps(base, data.prompt, data.chosen, data.rejected, model=model)
  out = evaluation.evaluate_pairs(
    pol,
    base,
    data.prompt,
    data.chosen,
    data.rejected,
    model=model,
    beta=0.5,
    pref_prob=data.label_prob,
    betas=evaluation.IDEALIZED_BETAS,
  )
  pw, pl, rw, rl = (np.asarray(a, np.float64) for a in (p.chosen, p.rejected, r.chosen, r.rejected))
  np.testing.assert_allclose(out["reward_accuracy"], np.mean((pw - rw) - (pl - rl) > 0), atol=1e-12)
  np.testing.assert_allclose(out["chosen_logratio"], np.mean(pw - rw), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["rejected_logratio"], np.mean(pl - rl), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["logratio_margin"], np.mean((pw - rw) - (pl - rl)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["ranking_changed"], np.mean((pw > pl) != (rw > rl)), atol=1e-12)
  np.testing.assert_allclose(out["ranking_accuracy"], np.mean(pw > pl), atol=1e-12)
  lw = np.array([c.size for c in data.chosen])
  ll = np.array([c.size for c in data.rejected])
  np.testing.assert_allclose(out["ranking_accuracy_mean"], np.mean(pw / lw > pl / ll), atol=1e-12)
  q = np.clip(data.label_prob.astype(np.float64), 1e-3, 1 - 1e-3)
  ideal = (rw - rl) + np.log(q / (1 - q)) / 0.5
  rank = lambda lr: np.where(np.abs(np.expm1(lr)) < 0.05, 0, np.sign(lr))
  np.testing.assert_allclose(
    out["idealized_ranking_accuracy"], np.mean(rank(ideal) == rank(np.log(q / (1 - q)))), atol=1e-12
  )

  # Over the authors' sweep of beta (calculate_upper_bound_rlhf.py: 0.01, 0.1, 1, 5, 10), summed and
  # per-token mean reference log-probs: the optimum's log ratio h_ref + log(q / (1 - q)) / beta.
  assert evaluation.IDEALIZED_BETAS == (0.01, 0.1, 1.0, 5.0, 10.0)
  by_sum, by_mean = out["idealized_ranking_accuracy_by_beta"], out["idealized_ranking_accuracy_mean_by_beta"]
  assert list(by_sum) == ["0.01", "0.1", "1", "5", "10"] == list(by_mean)
  truth = rank(np.log(q / (1 - q)))
  for key, b in zip(by_sum, evaluation.IDEALIZED_BETAS):
    np.testing.assert_allclose(by_sum[key], np.mean(rank((rw - rl) + np.log(q / (1 - q)) / b) == truth), atol=1e-12)
    ideal_mean = (rw / lw - rl / ll) + np.log(q / (1 - q)) / b
    np.testing.assert_allclose(by_mean[key], np.mean(rank(ideal_mean) == truth), atol=1e-12)
  assert by_sum["0.01"] != by_sum["10"]  # small beta trusts the preferences, large beta the reference
  # The reference's log-probs given (a sweep's base, scored once): the same metrics, the reference's
  # parameters not read; log-probs of other pairs are refused.
  kw = dict(model=model, beta=0.5, pref_prob=data.label_prob, betas=evaluation.IDEALIZED_BETAS)
  assert evaluation.evaluate_pairs(pol, None, data.prompt, data.chosen, data.rejected, reference_logps=r, **kw) == out
  with pytest.raises(ValueError, match="reference_logps hold 3 pairs"):
    short = jax.tree.map(lambda a: a[:3], r)
    evaluation.evaluate_pairs(pol, None, data.prompt, data.chosen, data.rejected, reference_logps=short, model=model)


# Gradient field over the two log-probs (Feng et al. 2024, arXiv:2404.04626) ------------------------


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_gradient_field_of_dpo_ipo_and_simpo_is_closed_form():
  from pofx import losses

  pw, pl = np.array([-4.0, -9.0, -2.5]), np.array([-6.0, -3.0, -2.0])
  rw, rl = np.array([-5.0, -7.0, -3.0]), np.array([-5.5, -4.0, -2.5])
  nw, nl = np.array([3.0, 5.0, 2.0]), np.array([4.0, 2.0, 6.0])
  policy = _pairs(pw, pl, nw, nl)
  reference = _pairs(rw, rl, nw, nl)
  beta = 0.5
  h = (pw - rw) - (pl - rl)
  # DPO: l = -log sigmoid(beta h): dl/dpi_w = -beta sigmoid(-beta h) = -dl/dpi_l
  f = evaluation.gradient_field(lambda p: losses.get("dpo")(p, reference, beta=beta), policy)
  np.testing.assert_allclose(f.d_chosen, -beta * _sigmoid(-beta * h), rtol=1e-5)
  np.testing.assert_allclose(f.d_rejected, beta * _sigmoid(-beta * h), rtol=1e-5)
  np.testing.assert_allclose(f.log_ratio, 0.0, atol=1e-6)
  np.testing.assert_allclose(f.log_prob_ratio, pl - pw, rtol=1e-5)  # |dl/dpi_w| / |dl/dpi_l| = pi_l / pi_w
  # IPO as the paper writes it: l = (h - 1/(2 tau))^2: dl/dpi_w = 2 (h - 1/(2 tau)) = -dl/dpi_l
  f = evaluation.gradient_field(lambda p: losses.get("ipo_sum")(p, reference, beta=beta), policy)
  np.testing.assert_allclose(f.d_chosen, 2 * (h - 1 / (2 * beta)), rtol=1e-5)
  np.testing.assert_allclose(f.d_rejected, -2 * (h - 1 / (2 * beta)), rtol=1e-5)
  # SimPO: l = -log sigmoid(beta (pi_w / n_w - pi_l / n_l) - gamma): the ratio is n_l / n_w
  gbr = 0.25
  z = beta * (pw / nw - pl / nl - gbr)
  f = evaluation.gradient_field(lambda p: losses.get("simpo")(p, None, beta=beta, gamma_beta_ratio=gbr), policy)
  np.testing.assert_allclose(f.d_chosen, -beta / nw * _sigmoid(-z), rtol=1e-5)
  np.testing.assert_allclose(f.d_rejected, beta / nl * _sigmoid(-z), rtol=1e-5)
  np.testing.assert_allclose(f.log_ratio, np.log(nl / nw), rtol=1e-5, atol=1e-6)
