"""pofx.reward_models against hand-derived values: a backbone whose hidden states are known, the
Bradley-Terry loss written out in numpy, the real decoder's full hidden states read by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import models, reward_models


class _EmbeddingBackbone:
  """A backbone whose final hidden state at a token is that token's row of a fixed table: the
  reward of a row is then `table[last real token] . w`, computable by hand."""

  def __init__(self, table):
    self.table = jnp.asarray(table, jnp.float32)

  def apply(self, params, tokens, positions, segment_ids, output_index=None):
    hidden = params["table"][tokens]  # [N, L, D]
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat[output_index]


def test_score_reads_the_last_real_token():
  rng = np.random.default_rng(0)
  table = rng.standard_normal((10, 3)).astype(np.float32)
  w = np.asarray([0.5, -1.0, 2.0], np.float32)
  params = {"backbone": {"table": table}, "head": {"kernel": w}}
  prompts, completions = [[1, 4], [1, 5, 6, 2], [1]], [[7, 3], [8], [9, 9, 3]]
  rows = reward_models.pack(prompts, completions, width=6)
  got = reward_models.score_fn(_EmbeddingBackbone(table))(params, *rows)
  last = [3, 3, 3]  # every completion's last token (EOS 3, or 8 for the second row)
  last[1] = 8
  want = np.asarray([table[t] @ w for t in last], np.float32)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  # The tokens after the last real one are padding: row 1 (5 tokens) ends at column 4.
  np.testing.assert_array_equal(np.asarray(reward_models.last_token_index(rows[3])), [3, 4, 3])


def test_score_of_the_decoder_equals_its_hidden_state_by_hand():
  cfg = models.LlamaConfig(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_size=32)
  model = models.make(cfg)
  params = reward_models.init(cfg, jax.random.key(0))
  prompts, completions = [[1, 4, 5, 2], [1, 6, 2]], [[7, 8, 3], [9, 3]]
  score = jax.jit(reward_models.score_fn(model))
  rows = reward_models.pack(prompts, completions, width=8)
  got = np.asarray(score(params, *rows))
  # By hand: the full [N, L, D] hidden states, read at each row's last real column.
  hidden = np.asarray(jax.jit(model.apply)(params["backbone"], *rows[:3]), np.float64)
  w = np.asarray(params["head"]["kernel"], np.float64)
  want = np.asarray([hidden[0, 6] @ w, hidden[1, 4] @ w])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # Padding width does not change a reward (padding is never attended to).
  wide = np.asarray(score(params, *reward_models.pack(prompts, completions, width=12)))
  np.testing.assert_allclose(wide, got, rtol=2e-5, atol=1e-6)
  # A reward model on the policy's weights copies them and adds a [D] head.
  rm = reward_models.from_backbone(params["backbone"], jax.random.key(2), cfg)
  assert rm["head"]["kernel"].shape == (16,)
  for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(rm["backbone"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pair_loss_margin_and_centering_by_hand():
  r_w = np.asarray([1.0, -0.5, 3.0, 0.0], np.float32)
  r_l = np.asarray([0.0, 0.5, -1.0, 0.0], np.float32)
  m = np.asarray([0.0, 0.25, 1.0, 2.0], np.float32)
  nll = lambda z: np.log1p(np.exp(-z.astype(np.float64)))  # -log sigmoid(z)
  np.testing.assert_allclose(np.asarray(reward_models.pair_loss(r_w, r_l)), nll(r_w - r_l), rtol=1e-6)
  want = nll(r_w - r_l - m) + 0.01 * (r_w.astype(np.float64) + r_l) ** 2
  got = reward_models.pair_loss(r_w, r_l, margin=m, center_coefficient=0.01)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  # Worked values: sigmoid(1) = 0.7310586 -> 0.3132617; the fourth pair: log(1 + e^2) + 0 = 2.1269280.
  np.testing.assert_allclose(np.asarray(got)[[0, 3]], [0.3132617 + 0.01, 2.1269280], rtol=1e-6)


def test_accuracy_counts_ties_as_wrong():
  r_w = np.asarray([1.0, 0.0, 2.0, -1.0])
  r_l = np.asarray([0.0, 0.0, 3.0, -2.0])
  assert float(reward_models.accuracy(r_w, r_l)) == pytest.approx(0.5)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="center_coefficient"):
    reward_models.pair_loss(np.zeros(2), np.zeros(2), center_coefficient=-1.0)
  with pytest.raises(ValueError, match="one shape"):
    reward_models.accuracy(np.zeros(2), np.zeros(3))
  with pytest.raises(ValueError, match="more than width"):
    reward_models.pack([[1, 2, 3]], [[4, 5]], width=4)
  with pytest.raises(ValueError, match="2 prompts but 1"):
    reward_models.pack([[1], [2]], [[3]])


def test_reward_model_program_trains_saves_and_reports(seed_dir, tmp_path):
  """configs/reward_model.py:tiny as a user runs it, on the session's SFT base and data: the
  summary's held-out accuracy is that of the saved reward model on the held-out pairs."""
  import json
  import os

  from experiments import reward_model
  from pofx import world as world_lib
  from pofx.data import tfds_builders
  from tests.program import _config, _main, _seed_from

  work = str(tmp_path / "rm")
  _seed_from(str(seed_dir), work)
  r = _main(["--config=configs/reward_model.py:tiny", f"--workdir={work}", "--noprogress"])
  assert r.returncode == 0, r.stderr[-2000:]
  assert "sft: reusing" in r.stderr and "reward model: 6 steps" in r.stderr
  with open(os.path.join(work, "summary.json")) as f:
    s = json.load(f)
  assert s["stage"] == "reward_model" and s["steps"] == 6
  c = _config("reward_model")
  w = world_lib.World(world_lib.WorldConfig(seed=c.seed, **dict(c.world)))
  params = reward_model.load(os.path.join(work, "reward_model"), w.model_config())
  with open(os.path.join(work, "data", "pairs_meta.json")) as f:
    src = tfds_builders.data_source(json.load(f)["path"], "eval")
  ex = [src[i] for i in range(len(src))]
  assert s["eval_pairs"] == len(ex) > 0  # every held-out pair of the data stage
  score = jax.jit(reward_models.score_fn(models.make(w.model_config())))
  rows = lambda side: reward_models.pack([e["prompt"] for e in ex], [e[side] for e in ex], width=20)
  r_w, r_l = np.asarray(score(params, *rows("chosen"))), np.asarray(score(params, *rows("rejected")))
  assert float(np.mean(r_w > r_l)) == pytest.approx(s["reward_accuracy"], abs=1.0 / len(ex) + 1e-6)
