"""The controlled world: gold reward on hand-computed cases, labeller, prompts and splits,
demonstrations, SFT (data and loss here, the loop of `experiments.sft`), preference-data generation
(pairings, BT labels, determinism)."""

import math

import jax
import numpy as np
import pytest

from experiments import sft as sft_lib
from pofx import models, world

BOS, SEP, EOS, PAD = world.BOS, world.SEP, world.EOS, world.PAD


def _small_world(**kw):
  """V = 8: content tokens 4, 5, 6, 7 (content indices 0..3), with tables set by hand."""
  cfg = world.WorldConfig(
    vocab_size=8,
    max_prompt_len=3,
    max_completion_len=8,
    min_good_len=2,
    max_good_len=3,
    demo_min_len=1,
    demo_max_len=5,
    **kw,
  )
  w = world.World(cfg)
  w.affinity_table = np.array(
    [[1.0, 0.0, -1.0, 2.0], [0.0, 3.0, 1.0, -2.0], [0.5, 0.5, 0.5, 0.5], [-1.0, -1.0, 4.0, 0.0]], np.float32
  )
  w.bigram_table = np.array([[-1, 1, 0, 0], [0, -1, 1, 0], [0, 0, -1, 1], [1, 0, 0, -1]], np.float32)
  return w


def test_gold_reward_hand_computed():
  w = _small_world()
  x = [BOS, 4, 5, SEP]  # content (0, 1): a = (A[0] + A[1]) / sqrt(2)
  a = np.array([1.0, 3.0, 0.0, 0.0]) / math.sqrt(2)
  # y = (4, 5, 6) + EOS: n = 3 (inside the window [2, 3]); bigrams G[0,1] = 1, G[1,2] = 1.
  r = w.gold_reward([x], [[4, 5, 6, EOS]])[0]
  np.testing.assert_allclose(r, (a[0] + a[1] + a[2]) / 3 + 1.0, rtol=1e-6)
  # y = (5, 5, 5, 5) + EOS: n = 4 (one over the window), repeats G = -1.
  r = w.gold_reward([x], [[5, 5, 5, 5, EOS]])[0]
  np.testing.assert_allclose(r, a[1] - 1.0 - 0.5 * 1, rtol=1e-6)
  # Unfinished (no EOS), n = 2, bigram G[3, 0] = 1.
  r = w.gold_reward([x], [[7, 4]])[0]
  np.testing.assert_allclose(r, (a[3] + a[0]) / 2 + 1.0 - 1.0, rtol=1e-6)
  # Empty completion: token and bigram terms 0, two short of the window.
  np.testing.assert_allclose(w.gold_reward([x], [[EOS]])[0], -0.5 * 2, rtol=1e-6)
  # Everything after the first EOS is ignored.
  np.testing.assert_allclose(
    w.gold_reward([x], [[4, 5, 6, EOS, 7, 7, EOS]])[0], w.gold_reward([x], [[4, 5, 6, EOS]])[0], rtol=1e-6
  )
  # A special token inside a completion: affinity -2, bigrams touching it 0.
  r = w.gold_reward([x], [[4, SEP, 5, EOS]])[0]
  np.testing.assert_allclose(r, (a[0] - 2.0 + a[1]) / 3 + 0.0, rtol=1e-6)


def test_gold_reward_weights_and_prompt_dependence():
  w = _small_world(affinity_scale=2.0, bigram_weight=0.5, length_penalty=0.25, unfinished_penalty=3.0)
  x = [BOS, 7, SEP]  # content (3,): a = 2 * A[3] / sqrt(1)
  a = 2.0 * np.array([-1.0, -1.0, 4.0, 0.0])
  r = w.gold_reward([x, x], [[6, 7, 6, 7, 6], [6, EOS]])
  np.testing.assert_allclose(r[0], (3 * a[2] + 2 * a[3]) / 5 + 0.5 * (1 + 0 + 1 + 0) / 4 - 0.25 * 2 - 3.0, rtol=1e-6)
  np.testing.assert_allclose(r[1], a[2] - 0.25 * 1, rtol=1e-6)
  # The same completion scores differently under different prompts.
  y = [6, 7, EOS]
  assert w.gold_reward([[BOS, 7, SEP]], [y])[0] != w.gold_reward([[BOS, 4, SEP]], [y])[0]


def test_default_tables():
  w = world.World()
  c = w.config.num_content
  assert w.affinity_table.shape == (c, c) and w.bigram_table.shape == (c, c)
  np.testing.assert_array_equal(np.diag(w.bigram_table), -1.0)
  off = w.bigram_table[~np.eye(c, dtype=bool)]
  assert set(np.unique(off).tolist()) <= {0.0, 1.0}
  assert 0.1 < off.mean() < 0.4
  # Same seed, same world; another seed, another world.
  np.testing.assert_array_equal(world.World().affinity_table, w.affinity_table)
  assert not np.array_equal(world.World(world.WorldConfig(seed=1)).affinity_table, w.affinity_table)


def test_label_prob_bradley_terry():
  w = world.World(world.WorldConfig(label_scale=2.0, length_bias=0.3))
  p = w.label_prob([1.0, 0.0], [0.5, 0.0], [4, 7], [6, 3])
  z = np.array([2.0 * 0.5 + 0.3 * (4 - 6), 0.3 * (7 - 3)])
  np.testing.assert_allclose(p, 1 / (1 + np.exp(-z)), rtol=1e-6)
  q = w.label_prob([0.5, 0.0], [1.0, 0.0], [6, 3], [4, 7])
  np.testing.assert_allclose(p + q, 1.0, rtol=1e-6)


def test_prompts_format_split_and_determinism():
  w = world.World()
  cfg = w.config
  ps = w.prompts(300, seed=0)
  for p in ps:
    assert p[0] == BOS and p[-1] == SEP and p.dtype == np.int32
    assert cfg.min_prompt_len <= p.size - 2 <= cfg.max_prompt_len
    assert np.all(p[1:-1] >= world.FIRST_CONTENT) and np.all(p[1:-1] < cfg.vocab_size)
  assert len({p.size for p in ps}) == cfg.max_prompt_len - cfg.min_prompt_len + 1
  assert [p.tolist() for p in w.prompts(300, seed=0)] == [p.tolist() for p in ps]
  assert [p.tolist() for p in w.prompts(300, seed=1)] != [p.tolist() for p in ps]
  ev = w.prompts(300, seed=0, split="eval")
  assert all(w.is_eval_prompt(p) for p in ev) and not any(w.is_eval_prompt(p) for p in ps)
  assert not {tuple(p) for p in ev} & {tuple(p) for p in w.prompts(3000, seed=2)}
  frac = np.mean([w.is_eval_prompt(p) for p in w.prompts(4000, seed=3, split="any")])
  assert abs(frac - cfg.eval_fraction) < 0.03
  with pytest.raises(ValueError, match="split"):
    w.prompts(3, seed=0, split="test")


def test_shifted_prompts():
  """The prompt shift tilts the content-token distribution exponentially: uniform at 0, log-odds
  that scale linearly with the shift, empirical frequencies that follow it, the split kept."""
  w = world.World()
  c = w.config.num_content
  np.testing.assert_allclose(w.prompt_token_probs(0.0), np.full(c, 1.0 / c), rtol=1e-12)
  p1, p2 = w.prompt_token_probs(1.0), w.prompt_token_probs(2.0)
  assert abs(p2.sum() - 1.0) < 1e-12
  l1, l2 = np.log(p1) - np.log(p1[0]), np.log(p2) - np.log(p2[0])
  np.testing.assert_allclose(l2, 2.0 * l1, atol=1e-9)  # exp(s z): log-odds proportional to s
  assert all(w.is_eval_prompt(p) for p in w.prompts(50, seed=7, split="eval", shift=2.0))
  ps = w.prompts(3000, seed=7, split="any", shift=2.0)
  toks = np.concatenate([p[1:-1] for p in ps]) - world.FIRST_CONTENT
  freq = np.bincount(toks, minlength=c) / toks.size
  assert np.abs(freq - p2).max() < 0.02
  assert [p.tolist() for p in w.prompts(50, seed=7, shift=0.0)] == [p.tolist() for p in w.prompts(50, seed=7)]
  with pytest.raises(ValueError, match="shift"):
    w.prompts(3, seed=0, shift=-1.0)


def test_demonstrations():
  w = world.World()
  d = w.demonstrations(400, seed=0)
  assert len(d.prompt) == len(d.completion) == 400
  lens = []
  for y in d.completion:
    assert y[-1] == EOS and np.all(y[:-1] >= world.FIRST_CONTENT)
    lens.append(y.size - 1)
  assert min(lens) == w.config.demo_min_len and max(lens) == w.config.demo_max_len
  d2 = w.demonstrations(400, seed=0)
  assert all(np.array_equal(a, b) for a, b in zip(d.completion, d2.completion))
  # The demonstrator is better than uniformly random content of the same lengths, and diverse.
  rng = np.random.default_rng(0)
  rand = [np.append(rng.integers(world.FIRST_CONTENT, w.config.vocab_size, y.size - 1), EOS) for y in d.completion]
  r_demo, r_rand = w.gold_reward(d.prompt, d.completion), w.gold_reward(d.prompt, rand)
  assert r_demo.mean() > r_rand.mean() + 0.5
  assert len({tuple(y) for y in d.completion}) > 390


def test_config_validation():
  with pytest.raises(ValueError, match="vocab_size"):
    world.WorldConfig(vocab_size=5)
  with pytest.raises(ValueError, match="max_prompt_len"):
    world.WorldConfig(min_prompt_len=4, max_prompt_len=3)
  with pytest.raises(ValueError, match="demo_max_len"):
    world.WorldConfig(demo_max_len=20)
  with pytest.raises(ValueError, match="eval_fraction"):
    world.WorldConfig(eval_fraction=0.0)
  with pytest.raises(ValueError, match="label_scale"):
    world.WorldConfig(label_scale=-1.0)


@pytest.fixture(scope="module")
def tiny_world():
  w = world.World(world.WorldConfig(max_completion_len=6, demo_max_len=4))
  model = models.make(w.model_config(hidden_size=32, mlp_size=64))
  return w, model, model.init(jax.random.key(0))


def test_sft_lowers_demonstration_nll(tiny_world):
  w, model, p0 = tiny_world
  demos = w.demonstrations(256, seed=0)
  params, losses = sft_lib.sft(
    p0, demos, model=model, seed=0, steps=60, batch_size=32, learning_rate=1e-2, warmup_steps=5, return_losses=True
  )
  assert losses.shape == (60,) and np.all(np.isfinite(losses))
  # Initial NLL is about log V (random init); SFT learns at least the special-token structure.
  assert abs(losses[0] - math.log(model.config.vocab_size)) < 0.2
  assert losses[-10:].mean() < losses[0] - 0.3
  again = sft_lib.sft(p0, demos, model=model, seed=0, steps=60, batch_size=32, learning_rate=1e-2, warmup_steps=5)
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_sft_arrays_and_loss_by_hand(tiny_world):
  w, model, params = tiny_world
  demos = world.Demonstrations(
    [np.array([BOS, 5, SEP], np.int32), np.array([BOS, SEP], np.int32)],
    [np.array([6, 7, EOS], np.int32), np.array([EOS], np.int32)],
  )
  tokens, positions, seg, loss_mask = world.sft_arrays(demos)
  np.testing.assert_array_equal(tokens, [[BOS, 5, SEP, 6, 7, EOS], [BOS, SEP, EOS, 0, 0, 0]])
  np.testing.assert_array_equal(positions, [list(range(6))] * 2)
  np.testing.assert_array_equal(seg, [[1] * 6, [1, 1, 1, 0, 0, 0]])
  # Column t scores tokens[t + 1]: the completion tokens only (after SEP).
  np.testing.assert_array_equal(loss_mask, [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
  # The loss: mean NLL over those 4 tokens, from the full logits and a plain log-softmax.
  logp = np.asarray(jax.nn.log_softmax(model.logits(params, tokens, positions, seg), -1), np.float64)
  targets = [(0, 2, 6), (0, 3, 7), (0, 4, EOS), (1, 1, EOS)]
  expected = -np.mean([logp[i, t, y] for i, t, y in targets])
  np.testing.assert_allclose(world.sft_loss(model, params, tokens, positions, seg, loss_mask), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="more than the width 4"):
    world.sft_arrays(demos, width=4)


def test_preference_data_adjacent(tiny_world):
  w, model, params = tiny_world
  prompts = w.prompts(40, seed=0)
  data = world.preference_data(w, params, prompts, jax.random.key(1), model=model, num_samples=4, batch_size=64)
  assert len(data) + data.num_identical == 40 * 2
  assert data.list_scores.shape == (40, 4) and data.list_logps.shape == (40, 4)
  assert len(data.list_completions) == 40 and all(len(c) == 4 for c in data.list_completions)
  # Scores are the gold reward of the stored completions, labels the world's BT probability.
  np.testing.assert_allclose(data.chosen_score, w.gold_reward(data.prompt, data.chosen), rtol=1e-6)
  np.testing.assert_allclose(data.rejected_score, w.gold_reward(data.prompt, data.rejected), rtol=1e-6)
  lens = lambda ys: np.array([y.size for y in ys])
  np.testing.assert_allclose(
    data.label_prob,
    w.label_prob(data.chosen_score, data.rejected_score, lens(data.chosen), lens(data.rejected)),
    rtol=1e-5,
  )
  flat = [w.gold_reward([p] * 4, cs) for p, cs in zip(data.list_prompt, data.list_completions)]
  np.testing.assert_allclose(data.list_scores, np.stack(flat), rtol=1e-6)
  for i in range(len(data)):
    pid = data.prompt_id[i]
    assert np.array_equal(data.prompt[i], prompts[pid])
    assert not np.array_equal(data.chosen[i], data.rejected[i])
    members = [c.tolist() for c in data.list_completions[pid]]
    assert data.chosen[i].tolist() in members and data.rejected[i].tolist() in members
  # Determinism given the key.
  again = world.preference_data(w, params, prompts, jax.random.key(1), model=model, num_samples=4, batch_size=64)
  assert all(np.array_equal(a, b) for a, b in zip(data.chosen, again.chosen))
  np.testing.assert_array_equal(data.label_prob, again.label_prob)
  with pytest.raises(ValueError, match="pairing"):
    world.preference_data(w, params, prompts, jax.random.key(1), model=model, pairing="best")
  with pytest.raises(ValueError, match="num_samples"):
    world.preference_data(w, params, prompts, jax.random.key(1), model=model, num_samples=3)


def test_preference_data_pairings_and_labels(tiny_world):
  w, model, params = tiny_world
  prompts = w.prompts(40, seed=1)
  det = world.World(w.config.replace(label_scale=1e4))  # a deterministic labeller
  alld = world.preference_data(
    det, params, prompts, jax.random.key(2), model=model, num_samples=3, pairing="all", batch_size=64
  )
  assert len(alld) + alld.num_identical == 40 * 3
  assert np.all(alld.chosen_score >= alld.rejected_score)
  bw = world.preference_data(
    det, params, prompts, jax.random.key(2), model=model, num_samples=3, pairing="best_worst", batch_size=64
  )
  for i in range(len(bw)):
    s = bw.list_scores[bw.prompt_id[i]]
    np.testing.assert_allclose([bw.chosen_score[i], bw.rejected_score[i]], [s.max(), s.min()], rtol=1e-6)
  # label_scale 0: labels are fair coin flips (BT probability 1/2), so about half the pairs
  # have the lower-scored completion as chosen.
  coin = world.World(w.config.replace(label_scale=0.0))
  cd = world.preference_data(
    coin, params, w.prompts(200, seed=3), jax.random.key(4), model=model, num_samples=4, batch_size=64
  )
  np.testing.assert_allclose(cd.label_prob, 0.5)
  differ = cd.chosen_score != cd.rejected_score
  frac = np.mean(cd.chosen_score[differ] > cd.rejected_score[differ])
  assert 0.4 < frac < 0.6
