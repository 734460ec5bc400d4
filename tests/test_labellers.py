"""Labellers (`pofx.labellers`) against independent values: the world's gold reward per candidate, a
hand-made reward model over the documented row layout, the DPO implicit reward with DICE's length
penalty against log-probs computed here with a full numpy softmax, DICE's alpha search on a table
worked by hand, SPIN's self-play scores, and the checks on a user's labeller."""

import jax
import numpy as np
import pytest

from pofx import labellers, models, world

PROMPTS = [[1, 5, 6, 2], [1, 7, 2]]
COMPLETIONS = [[[4, 5, 3], [6, 3]], [[9, 9, 9, 3], [10, 3]]]


def test_gold_scores_every_candidate_in_prompt_major_order():
  w = world.World(world.WorldConfig(seed=3))
  s = labellers.gold(w)(PROMPTS, COMPLETIONS)
  assert s.shape == (2, 2) and s.dtype == np.float32
  for i, row in enumerate(COMPLETIONS):
    for j, y in enumerate(row):
      assert s[i, j] == w.gold_reward([PROMPTS[i]], [y])[0]


def test_reward_model_reads_right_padded_rows_at_the_last_real_token():
  seen = {}

  def score(params, tokens, positions, segment_ids, mask):
    seen.update(tokens=tokens, positions=positions, mask=mask)
    last = mask.sum(1) - 1
    return params * tokens[np.arange(tokens.shape[0]), last] + 0.5 * mask.sum(1)

  s = labellers.reward_model(score, 2.0)(PROMPTS, COMPLETIONS)
  # Rows: [1 5 6 2 4 5 3] (7), [1 5 6 2 6 3] (6), [1 7 2 9 9 9 3] (7), [1 7 2 10 3] (5); last token 3 each.
  np.testing.assert_array_equal(s, [[6.0 + 3.5, 6.0 + 3.0], [6.0 + 3.5, 6.0 + 2.5]])
  assert seen["tokens"].shape == (4, 8)  # the longest row (7) rounded up to 8
  np.testing.assert_array_equal(seen["tokens"][3], [1, 7, 2, 10, 3, 0, 0, 0])
  np.testing.assert_array_equal(seen["positions"][0], np.arange(8))
  with pytest.raises(ValueError, match="returned 3 values for 4 rows"):
    labellers.reward_model(lambda *a: np.zeros(3), None)(PROMPTS, COMPLETIONS)


def test_reward_model_labeller_with_pofx_reward_models_equals_its_own_packing():
  # The labeller's rows against pofx.reward_models.pack (written independently): same rewards.
  from pofx import reward_models

  w = world.World(world.WorldConfig(seed=0))
  cfg = w.model_config()
  model = models.make(cfg)
  params = reward_models.init(cfg, jax.random.key(4))
  score = jax.jit(reward_models.score_fn(model))
  s = labellers.reward_model(score, params)(PROMPTS, COMPLETIONS)
  flat_p = [p for p, row in zip(PROMPTS, COMPLETIONS) for _ in row]
  flat_y = [y for row in COMPLETIONS for y in row]
  want = np.asarray(score(params, *reward_models.pack(flat_p, flat_y, width=8))).reshape(2, 2)
  np.testing.assert_allclose(s, want, rtol=1e-6, atol=1e-6)
  assert np.ptp(want) > 0  # four different rewards: a mix-up of rows would show


def _numpy_logps(model, params):
  """log p(completion | prompt) of the four (prompt, completion) pairs, prompt-major, from one
  forward of right-padded rows (causal: padding after a row's end is never seen) and a float64
  numpy softmax over the full vocabulary."""
  pairs = [(p, y) for p, row in zip(PROMPTS, COMPLETIONS) for y in row]
  seq = np.zeros((len(pairs), 8), np.int32)
  for i, (p, y) in enumerate(pairs):
    seq[i, : len(p) + len(y)] = p + y
  pos = np.broadcast_to(np.arange(8, dtype=np.int32), seq.shape)
  hidden = np.asarray(jax.jit(model.apply)(params, seq, pos, np.ones_like(seq)), np.float64)
  logits = hidden @ np.asarray(model.head(params), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  out = [sum(logp[i, len(p) - 1 + t, tok] for t, tok in enumerate(y)) for i, (p, y) in enumerate(pairs)]
  return np.asarray(out).reshape(2, 2)


def test_implicit_reward_is_beta_log_ratio_minus_alpha_length():
  w = world.World(world.WorldConfig(seed=0))
  model = models.make(w.model_config())
  pi, ref = model.init(jax.random.key(1)), model.init(jax.random.key(2))
  beta, alpha = 0.5, 0.25
  s = labellers.implicit_reward(pi, ref, model=model, beta=beta, length_alpha=alpha)(PROMPTS, COMPLETIONS)
  lengths = np.asarray([[len(y) for y in row] for row in COMPLETIONS])
  want = beta * (_numpy_logps(model, pi) - _numpy_logps(model, ref)) - alpha * lengths
  np.testing.assert_allclose(s, want, rtol=0, atol=2e-4)
  assert np.ptp(want) > 0.1  # the four values differ: the test sees a mix-up of candidates


def test_dice_length_alpha_zeroes_the_mean_length_gap():
  # Prompt 0: scores (1.0, 0.0), lengths (10, 2): best-vs-worst is (0, 1), gap +8, until
  # 1 - 10 a <= -2 a, i.e. a >= 1/8, where at a = 1/8 both tie (argmax = argmin = 0: gap 0).
  # Prompt 1: equal lengths, gap 0 for every a. Mean gap: 4 below 1/8, 0 at 1/8.
  scores, lengths = [[1.0, 0.0], [0.5, 0.0]], [[10, 2], [3, 3]]
  assert labellers.dice_length_alpha(scores, lengths) == 0.125
  # On a coarse grid the gap is 4, 4, -4 (a = 0, 0.1, 0.2): the first of the closest is 0.
  assert labellers.dice_length_alpha(scores, lengths, grid=[0.0, 0.1, 0.2]) == 0.0


def test_self_play_prefers_the_demonstration():
  lab = labellers.self_play([(PROMPTS[0], [6, 3]), (PROMPTS[1], [11, 3])])
  np.testing.assert_array_equal(lab(PROMPTS, COMPLETIONS), [[0.0, 1.0], [0.0, 0.0]])
  with pytest.raises(ValueError, match="prompt 0 .* has no demonstration"):
    labellers.self_play({(1, 2): [3]})(PROMPTS, COMPLETIONS)


def test_user_labeller_output_and_inputs_are_checked():
  lengths = labellers.from_callable(lambda p, c: [[len(y) for y in row] for row in c], name="length")
  np.testing.assert_array_equal(lengths(PROMPTS, COMPLETIONS), [[3, 2], [4, 2]])
  with pytest.raises(ValueError, match=r"labeller bad: returned scores of shape \(2,\); expected \(2, 2\)"):
    labellers.from_callable(lambda p, c: [0.0, 1.0], name="bad")(PROMPTS, COMPLETIONS)
  with pytest.raises(ValueError, match="not finite .* completion 1 of prompt 0"):
    labellers.from_callable(lambda p, c: [[0.0, np.inf], [0.0, 0.0]])(PROMPTS, COMPLETIONS)
  with pytest.raises(ValueError, match="same number K"):
    lengths(PROMPTS, [[[4, 3]], [[5, 3], [6, 3]]])
  with pytest.raises(ValueError, match="completion 0 of prompt 1 is empty"):
    lengths(PROMPTS, [[[4, 3], [5]], [[], [6, 3]]])
