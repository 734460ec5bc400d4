"""BMC, Sem-DPO, 2D-DPO and Full-Step-DPO: hand-worked examples and numpy re-derivations written from the formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx


def softplus(x):
  return np.logaddexp(0.0, x)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def mask(lens, t):
  return (np.arange(t)[None, :] < np.asarray(lens)[:, None]).astype(np.float32)


def token_pairs(seed, c_lens, r_lens, t=8):
  rng = np.random.default_rng(seed)
  b = len(c_lens)
  toks = [-rng.uniform(0.05, 3.0, (b, t)).astype(np.float32) for _ in range(4)]
  cm, rm = mask(c_lens, t), mask(r_lens, t)
  policy = pofx.PairLogps.from_tokens(toks[0], cm, toks[1], rm)
  reference = pofx.PairLogps.from_tokens(toks[2], cm, toks[3], rm)
  return policy, reference, [x.astype(np.float64) * m for x, m in zip(toks, (cm, rm, cm, rm))], cm, rm


# -------------------------------------------------------------------------------------------------
# BMC
# -------------------------------------------------------------------------------------------------


def test_bmc_modified_tokens_hand_example():
  # rejected 5 6 7 8 -> chosen 5 9 7 8 10: "6" replaced by "9", "10" inserted at the end.
  c, r = pofx.losses.bmc_modified_tokens([5, 9, 7, 8, 10], [5, 6, 7, 8])
  np.testing.assert_array_equal(c, [0, 1, 0, 0, 1])
  np.testing.assert_array_equal(r, [0, 1, 0, 0])
  # A deleted token of the rejected completion; tokens in `ignore` (stop words) are never marked.
  c, r = pofx.losses.bmc_modified_tokens([5, 7], [5, 6, 7])
  np.testing.assert_array_equal(c, [0, 0])
  np.testing.assert_array_equal(r, [0, 1, 0])
  c, r = pofx.losses.bmc_modified_tokens([5, 9, 7, 8, 10], [5, 6, 7, 8], ignore=[10, 6])
  np.testing.assert_array_equal(c, [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(r, [0, 0, 0, 0])


def test_bmc_one_pair_by_hand():
  # Chosen tokens (policy) -0.1, -2.0 with the second modified: weights 1 and 1 + min(e^2, 2) = 3.
  # Rejected token -0.5 modified: 1 + min(e^0.5, 2) = 2.648721. Reference: chosen -0.2, -1.0
  # (weights 1, 1 + min(e, 2) = 3); rejected -3.0 (1 + min(e^3, 2) = 3).
  cm, rm = np.ones((1, 2), np.float32), np.array([[1.0, 0.0]], np.float32)
  policy = pofx.PairLogps.from_tokens(np.array([[-0.1, -2.0]]), cm, np.array([[-0.5, 0.0]]), rm)
  reference = pofx.PairLogps.from_tokens(np.array([[-0.2, -1.0]]), cm, np.array([[-3.0, 0.0]]), rm)
  out = pofx.losses.bmc(
    policy, reference, beta=0.1, delta=2.0, chosen_diff_mask=np.array([[0, 1]]), rejected_diff_mask=np.array([[1, 0]])
  )
  pi_w, ref_w = -0.1 + 3 * -2.0, -0.2 + 3 * -1.0
  pi_l, ref_l = (1 + math.exp(0.5)) * -0.5, 3 * -3.0
  np.testing.assert_allclose(out, [softplus(-0.1 * ((pi_w - ref_w) - (pi_l - ref_l)))], rtol=1e-6)


def test_bmc_matches_numpy_and_is_dpo_without_modified_tokens():
  policy, reference, (pc, pr, rc, rr), cm, rm = token_pairs(3, [8, 3, 5], [2, 8, 6])
  rng = np.random.default_rng(9)
  dc = (rng.uniform(size=cm.shape) < 0.5) * cm
  dr = (rng.uniform(size=rm.shape) < 0.5) * rm
  for beta, delta in ((0.1, 2.0), (0.5, 1.5)):
    w = lambda lp, m: 1.0 + m * np.minimum(np.exp(-lp), delta)
    rho = (w(pc, dc) * pc).sum(1) - (w(rc, dc) * rc).sum(1) - (w(pr, dr) * pr).sum(1) + (w(rr, dr) * rr).sum(1)
    out = pofx.losses.bmc(policy, reference, beta=beta, delta=delta, chosen_diff_mask=dc, rejected_diff_mask=dr)
    np.testing.assert_allclose(out, softplus(-beta * rho), rtol=1e-5)
  zeros = pofx.losses.bmc(policy, reference, chosen_diff_mask=0 * cm, rejected_diff_mask=0 * rm)
  np.testing.assert_allclose(zeros, pofx.losses.dpo(policy, reference, beta=0.1), rtol=1e-6)


def test_bmc_rejects_bad_inputs():
  policy, reference, _, cm, rm = token_pairs(0, [3], [4])
  with pytest.raises(ValueError, match="delta"):
    pofx.losses.bmc(policy, reference, delta=0.5, chosen_diff_mask=cm, rejected_diff_mask=rm)
  with pytest.raises(ValueError, match="shapes of the token log-probs"):
    pofx.losses.bmc(policy, reference, chosen_diff_mask=cm[:, :3], rejected_diff_mask=rm)


# -------------------------------------------------------------------------------------------------
# Sem-DPO
# -------------------------------------------------------------------------------------------------


def seq_pairs():
  # The worked example (rho = 2) and a second pair with rho = -1.
  policy = pofx.PairLogps(chosen=np.array([-10.0, -4.0], np.float32), rejected=np.array([-12.0, -5.0], np.float32))
  reference = pofx.PairLogps(chosen=np.array([-11.0, -3.0], np.float32), rejected=np.array([-11.0, -5.0], np.float32))
  return policy, reference


def test_sem_dpo_by_hand():
  policy, reference = seq_pairs()
  e_x = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
  e_w = np.array([[1.0, 1.0], [3.0, 0.0]], np.float32)  # cos 1/sqrt(2), and orthogonal (distance 1)
  out = pofx.losses.sem_dpo(policy, reference, beta=0.1, alpha=1.0, prompt_embeddings=e_x, chosen_embeddings=e_w)
  w = np.exp(-np.array([1.0 - 1.0 / math.sqrt(2.0), 1.0]))
  np.testing.assert_allclose(out, w * softplus(-0.1 * np.array([2.0, -1.0])), rtol=1e-6)
  np.testing.assert_allclose(out[0], 0.746102 * 0.598139, rtol=1e-5)
  # alpha = 0 is DPO; identical directions give weight 1 for any alpha.
  same = pofx.losses.sem_dpo(policy, reference, alpha=0.0, prompt_embeddings=e_x, chosen_embeddings=e_w)
  np.testing.assert_allclose(same, pofx.losses.dpo(policy, reference), rtol=1e-6)
  aligned = pofx.losses.sem_dpo(policy, reference, alpha=5.0, prompt_embeddings=e_x, chosen_embeddings=3 * e_x)
  np.testing.assert_allclose(aligned, pofx.losses.dpo(policy, reference), rtol=1e-5)


def test_sem_dpo_needs_alpha_and_matching_embeddings():
  policy, reference = seq_pairs()
  e = np.ones((2, 3), np.float32)
  with pytest.raises(ValueError, match="missing required argument"):
    pofx.losses.batch_loss("sem_dpo", policy, reference, prompt_embeddings=e, chosen_embeddings=e)
  with pytest.raises(ValueError, match="alpha"):
    pofx.losses.sem_dpo(policy, reference, alpha=-1.0, prompt_embeddings=e, chosen_embeddings=e)
  with pytest.raises(AssertionError):
    pofx.losses.sem_dpo(policy, reference, alpha=1.0, prompt_embeddings=e, chosen_embeddings=e[:, :2])


# -------------------------------------------------------------------------------------------------
# 2D-DPO
# -------------------------------------------------------------------------------------------------


def two_d_numpy(pc, pr, rc, rr, seg_c, seg_r, sc_c, sc_r, beta, w):
  """The group loss written as a loop over pairs, as the paper describes it."""
  out = []
  w = np.asarray(w, np.float64) / np.sum(w)
  for b in range(pc.shape[0]):
    n_c, n_r = seg_c[b].max() + 1, seg_r[b].max() + 1
    lr_c = [np.sum((pc[b] - rc[b])[seg_c[b] == k]) for k in range(n_c)]
    lr_r = [np.sum((pr[b] - rr[b])[seg_r[b] == k]) for k in range(n_r)]
    rew_c = [float(sc_c[b, k] @ w) for k in range(n_c)]
    rew_r = [float(sc_r[b, k] @ w) for k in range(n_r)]
    best_c = sorted(range(n_c), key=lambda k: -rew_c[k])
    worst_r = sorted(range(n_r), key=lambda k: rew_r[k])
    loss = 0.0
    for i in range(min(n_c, n_r)):
      kc, kr = best_c[i], worst_r[i]
      loss -= log_sigmoid(beta * (rew_c[kc] * lr_c[kc] - rew_r[kr] * lr_r[kr]))
    out.append(loss)
  return np.array(out)


def seg_ids(lens, size, t=8):
  ids = np.arange(t)[None, :] // size + np.zeros((len(lens), 1), np.int64)
  return np.where(mask(lens, t) > 0, ids, -1)


def test_two_d_dpo_worked_example():
  # One pair: chosen 4 tokens in 2 segments, rejected 3 tokens in 3 segments; one aspect.
  # Chosen rewards (0.2, 0.9) -> order seg 1, seg 0; rejected (0.5, 0.1, 0.7) -> seg 1, seg 0.
  cm, rm = mask([4], 4), mask([3], 4)
  policy = pofx.PairLogps.from_tokens(np.array([[-1.0, -2.0, -0.5, -0.5]]), cm, np.array([[-1.0, -1.0, -2.0, 0]]), rm)
  reference = pofx.PairLogps.from_tokens(
    np.array([[-1.5, -1.5, -1.0, -1.0]]), cm, np.array([[-0.5, -2.0, -1.0, 0]]), rm
  )
  out = pofx.losses.two_d_dpo(
    policy,
    reference,
    beta=0.5,
    chosen_segment_ids=np.array([[0, 0, 1, 1]]),
    rejected_segment_ids=np.array([[0, 1, 2, -1]]),
    chosen_segment_scores=np.array([[[0.2], [0.9], [0.0]]]),
    rejected_segment_scores=np.array([[[0.5], [0.1], [0.7]]]),
  )
  # Chosen segment log-ratios: seg 0 = (-1 + 1.5) + (-2 + 1.5) = 0, seg 1 = 0.5 + 0.5 = 1.
  # Rejected: seg 0 = -1 + 0.5 = -0.5, seg 1 = -1 + 2 = 1, seg 2 = -2 + 1 = -1.
  first = log_sigmoid(0.5 * (0.9 * 1.0 - 0.1 * 1.0))
  second = log_sigmoid(0.5 * (0.2 * 0.0 - 0.5 * -0.5))
  np.testing.assert_allclose(out, [-(first + second)], rtol=1e-6)


@pytest.mark.parametrize("weights", [None, (3.0, 1.0)])
def test_two_d_dpo_matches_numpy(weights):
  c_lens, r_lens = [8, 3, 5, 7], [2, 8, 6, 7]
  policy, reference, toks, _, _ = token_pairs(5, c_lens, r_lens)
  seg_c, seg_r = seg_ids(c_lens, 3), seg_ids(r_lens, 2)
  rng = np.random.default_rng(2)
  sc_c, sc_r = rng.uniform(0, 1, (4, 5, 2)), rng.uniform(0, 1, (4, 5, 2))
  out = pofx.losses.two_d_dpo(
    policy,
    reference,
    beta=0.3,
    aspect_weights=weights,
    chosen_segment_ids=seg_c,
    rejected_segment_ids=seg_r,
    chosen_segment_scores=sc_c.astype(np.float32),
    rejected_segment_scores=sc_r.astype(np.float32),
  )
  want = two_d_numpy(*toks, seg_c, seg_r, sc_c, sc_r, 0.3, (1.0, 1.0) if weights is None else weights)
  np.testing.assert_allclose(out, want, rtol=1e-5)


def test_two_d_dpo_one_segment_unit_scores_is_dpo():
  policy, reference, _, cm, rm = token_pairs(1, [8, 3, 5], [2, 8, 6])
  ids = lambda m: np.where(m > 0, 0, -1)
  ones = np.ones((3, 2, 1), np.float32)
  out = pofx.losses.two_d_dpo(
    policy,
    reference,
    chosen_segment_ids=ids(cm),
    rejected_segment_ids=ids(rm),
    chosen_segment_scores=ones,
    rejected_segment_scores=ones,
  )
  np.testing.assert_allclose(out, pofx.losses.dpo(policy, reference, beta=0.1), rtol=1e-6)


def test_two_d_dpo_rejects_bad_aspect_weights_and_shapes():
  policy, reference, _, cm, rm = token_pairs(1, [4], [5])
  kw = dict(
    chosen_segment_ids=np.where(cm > 0, 0, -1),
    rejected_segment_ids=np.where(rm > 0, 0, -1),
    chosen_segment_scores=np.ones((1, 2, 2), np.float32),
    rejected_segment_scores=np.ones((1, 2, 2), np.float32),
  )
  with pytest.raises(ValueError, match="aspect_weights"):
    pofx.losses.two_d_dpo(policy, reference, aspect_weights=(1.0, -1.0), **kw)
  with pytest.raises(ValueError, match="aspect_weights"):
    pofx.losses.two_d_dpo(policy, reference, aspect_weights=(1.0,), **kw)
  with pytest.raises(ValueError, match="segment_ids"):
    pofx.losses.two_d_dpo(policy, reference, **{**kw, "chosen_segment_ids": kw["chosen_segment_ids"][:, :2]})


# -------------------------------------------------------------------------------------------------
# Full-Step-DPO
# -------------------------------------------------------------------------------------------------


def full_step_numpy(toks, seg_c, seg_r, sc_c, sc_r, beta, rate, temp):
  """The authors' per-pair computation in numpy: per-token step weights w (the step's score, 0 off
  the steps), step reward softmax(+-temp w - 999 [w == 0]) times the step-token count, token reward
  sigmoid(-+rate (log pi - log ref)), both sums divided by the step-token count; then
  -sigmoid(-beta margin) (pos - neg). Returns the losses and d loss / d policy token log-probs."""
  pc, pr, rc, rr = toks
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))

  def weights(seg, sc):
    w = np.where(seg >= 0, sc.mean(-1)[np.arange(len(seg))[:, None], np.maximum(seg, 0)], 0.0)
    return w

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  w_c, w_r = weights(seg_c, sc_c), weights(seg_r, sc_r)
  n_c, n_r = (w_c != 0).sum(-1, keepdims=True), (w_r != 0).sum(-1, keepdims=True)
  step_pos = softmax(w_c * temp - 999 * (w_c == 0)) * n_c
  step_neg = softmax(-w_r * temp - 999 * (w_r == 0)) * n_r
  tok_pos, tok_neg = sig(-(pc - rc) * rate), sig((pr - rr) * rate)
  pos = (pc * tok_pos * step_pos).sum(-1) / n_c[:, 0]
  neg = (pr * tok_neg * step_neg).sum(-1) / n_r[:, 0]
  g = sig(-beta * ((pc.sum(-1) - rc.sum(-1)) - (pr.sum(-1) - rr.sum(-1))))
  return -g * (pos - neg), -g[:, None] * tok_pos * step_pos / n_c, g[:, None] * tok_neg * step_neg / n_r


def test_full_step_dpo_matches_the_authors_computation_in_numpy():
  c_lens, r_lens = [8, 3, 5, 7], [2, 8, 6, 7]
  policy, reference, toks, _, _ = token_pairs(7, c_lens, r_lens)
  seg_c, seg_r = seg_ids(c_lens, 3), seg_ids(r_lens, 2)
  rng = np.random.default_rng(4)
  sc_c, sc_r = rng.uniform(0.1, 1, (4, 5, 2)), rng.uniform(0.1, 1, (4, 5, 2))
  kw = dict(
    beta=0.3,
    token_rate=1.5,
    reward_temp=2.0,
    chosen_segment_ids=seg_c,
    rejected_segment_ids=seg_r,
    chosen_segment_scores=sc_c.astype(np.float32),
    rejected_segment_scores=sc_r.astype(np.float32),
  )
  fn = lambda p: pofx.losses.full_step_dpo(p, reference, **kw)
  want, d_chosen, d_rejected = full_step_numpy(toks, seg_c, seg_r, sc_c, sc_r, 0.3, 1.5, 2.0)
  np.testing.assert_allclose(fn(policy), want, rtol=1e-5, atol=1e-6)
  # the gradient: DPO's weight times the detached step and token weights, on the token log-probs only
  grads = jax.grad(lambda p: jnp.sum(fn(p)))(policy)
  np.testing.assert_allclose(grads.chosen_token_logps, d_chosen, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grads.rejected_token_logps, d_rejected, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(grads.chosen), 0.0)


def test_full_step_dpo_one_step_flat_weights_by_hand():
  # One pair, one step per completion (so the step softmax is 1/n on each token), token_rate 0
  # (token weights 1/2): L = -sigmoid(-beta m) (mean_t log pi_w,t - mean_t log pi_l,t) / 2.
  cm, rm = mask([2], 3), mask([3], 3)
  policy = pofx.PairLogps.from_tokens(np.array([[-1.0, -3.0, 0.0]]), cm, np.array([[-2.0, -2.0, -5.0]]), rm)
  reference = pofx.PairLogps.from_tokens(np.array([[-2.0, -2.0, 0.0]]), cm, np.array([[-3.0, -3.0, -3.0]]), rm)
  one = np.ones((1, 1, 1), np.float32)
  out = pofx.losses.full_step_dpo(
    policy,
    reference,
    beta=0.5,
    token_rate=0.0,
    chosen_segment_ids=np.array([[0, 0, -1]]),
    rejected_segment_ids=np.array([[0, 0, 0]]),
    chosen_segment_scores=one,
    rejected_segment_scores=one,
  )
  margin = (-4.0 - -4.0) - (-9.0 - -9.0)  # 0: the DPO weight is sigmoid(0) = 1/2
  want = -(1.0 / (1.0 + math.exp(0.5 * margin))) * ((-4.0 / 2) - (-9.0 / 3)) / 2
  np.testing.assert_allclose(out, [want], rtol=1e-6)
