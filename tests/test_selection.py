"""pofx.selection on hand-worked examples (Curry-DPO's Fig. 1 ratings, margins written out)."""

import numpy as np
import pytest

from pofx import selection


def test_curry_pairs_follow_the_papers_example():
  # arXiv:2403.07230 Fig. 1: four responses rated 5, 3, 4, 2 -> R1 = response 0 is chosen in every
  # pair; (R1, rated 2) has the largest gap 3 (stage 0, easy), then the gap-2 pair, then gap 1.
  # Prompt 1: two responses tie for best (the first is chosen; the tie forms no pair).
  p = selection.curry_pairs([[5.0, 3.0, 4.0, 2.0], [1.0, 1.0, 0.0, 0.5]])
  np.testing.assert_array_equal(p.prompt, [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(p.chosen, [0, 0, 0, 0, 0])
  np.testing.assert_array_equal(p.rejected, [3, 1, 2, 2, 3])
  np.testing.assert_array_equal(p.gap, [3.0, 2.0, 1.0, 1.0, 0.5])
  np.testing.assert_array_equal(p.stage, [0, 1, 2, 0, 1])
  stages = selection.stage_indices(p.stage)
  assert [s.tolist() for s in stages] == [[0, 3], [1, 4], [2]]
  merged = selection.stage_indices(p.stage, num_stages=2)
  assert [s.tolist() for s in merged] == [[0, 3], [1, 2, 4]]
  # Non-iterative: stage by stage, larger gaps first within a stage.
  assert selection.curriculum_order(p.gap, p.stage).tolist() == [0, 3, 1, 4, 2]
  assert selection.curriculum_order(p.gap).tolist() == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match=r"\[M, K\]"):
    selection.curry_pairs([1.0, 2.0])


def test_margins_by_hand():
  m = selection.implicit_reward_margin([-3.0, -1.0], [-4.0, -1.5], [-3.5, -2.0], [-3.0, -1.0], beta=0.5)
  # 0.5 * ((-3 + 3.5) - (-4 + 3)) = 0.75;  0.5 * ((-1 + 2) - (-1.5 + 1)) = 0.75
  np.testing.assert_allclose(m, [0.75, 0.75])
  np.testing.assert_allclose(selection.reference_margin([-6.0, -2.0], [-3.0, -4.0]), [-3.0, 2.0])
  np.testing.assert_allclose(selection.reference_margin([-6.0, -2.0], [-3.0, -4.0], [3, 1], [1, 4]), [1.0, -1.0])
  with pytest.raises(ValueError, match="beta"):
    selection.implicit_reward_margin([0.0], [0.0], [0.0], [0.0], beta=0.0)


def test_bayes_fusion_is_the_product_rule():
  m1, m2 = np.asarray([1.0, -2.0, 0.0]), np.asarray([-0.5, -1.0, 3.0])
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  p1, p2 = sig(m1), sig(m2 / 2.0)
  want = p1 * p2 / (p1 * p2 + (1 - p1) * (1 - p2))
  got = selection.bayes_fusion([m1, m2], scales=[1.0, 2.0])
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(selection.bayes_fusion([m1]), sig(m1), rtol=1e-12)
  with pytest.raises(ValueError, match="scales"):
    selection.bayes_fusion([m1, m2], scales=[1.0])


def test_select_top_keeps_the_largest_fraction():
  v = [0.1, 0.9, 0.5, 0.9, -1.0]
  assert selection.select_top(v, 0.4).tolist() == [1, 3]  # ceil(2.0) = 2
  assert selection.select_top(v, 0.5).tolist() == [1, 2, 3]  # ceil(2.5) = 3
  assert selection.select_top(v, 0.01).tolist() == [1]  # at least one; the tie goes to the lower index
  assert selection.select_by_margin([1.0, 2.0, 0.0], [0.5, -1.0, 0.0], 0.34).tolist() == [0, 1]
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    selection.select_top(v, 0.0)


def test_curry_dpo_program_refreshes_the_reference_per_stage(seed_dir, tmp_path):
  """configs/curry_dpo.py:tiny on the session's SFT base and data, in this process (the
  curriculum stage the program hands it to, `experiments.curriculum.run`): two stages, easy to
  hard, the second one's cached reference computed from the first one's policy."""
  import json
  import os

  import jax

  from experiments import curriculum
  from experiments import main as main_lib
  from pofx import data, evaluation, models
  from pofx import world as world_lib
  from tests.program import _config, _seed_from

  work = str(tmp_path / "curry")
  _seed_from(str(seed_dir), work)
  curriculum.run(_config("curry_dpo", "tiny"), work, lib=main_lib, progress=False)
  with open(os.path.join(work, "summary.json")) as f:
    s = json.load(f)
  stages = s["curriculum_stages"]
  # Stage 0: best vs worst of each prompt (64 pairs); stage 1: the two harder ranks merged.
  assert [(x["stage"], x["pairs"], x["steps"]) for x in stages] == [(0, 64, 2), (1, 128, 2)]
  assert stages[0]["mean_gap"] > stages[1]["mean_gap"] > 0
  assert 0.0 <= s["win_rate_vs_base"] <= 1.0 and s["stage"] == "curriculum"
  # Each stage's cached reference log-probs are the previous stage's policy's (scored here by
  # teacher forcing, another route than the program's loader), not the SFT base's.
  c = _config("curry_dpo")
  w = world_lib.World(world_lib.WorldConfig(seed=c.seed, **dict(c.world)))
  model = models.make(w.model_config())
  like = jax.eval_shape(lambda: model.init(jax.random.key(0)))
  load = lambda *p: main_lib._load_params(os.path.join(work, *p), like)
  for k in (1,):
    here = os.path.join(work, "curriculum", f"stage_{k}")
    with open(os.path.join(here, "data", "stage_meta.json")) as f:
      src = data.data_source(json.load(f)["path"], "train")
    cache = np.load(os.path.join(here, "reference_cache", "ref0.npz"))
    ids = [int(i) for i in cache["example_id"][:8]]
    ex = [next(src[j] for j in range(len(src)) if int(src[j]["example_id"]) == i) for i in ids]
    args = ([e["prompt"] for e in ex], [e["chosen"] for e in ex], [e["rejected"] for e in ex])
    prev = evaluation.pair_logps(load("curriculum", f"stage_{k - 1}", "final_params"), *args, model=model)
    np.testing.assert_allclose(cache["chosen"][:8], np.asarray(prev.chosen), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cache["rejected"][:8], np.asarray(prev.rejected), rtol=1e-4, atol=1e-4)
    sft = evaluation.pair_logps(load("sft_params"), *args, model=model)
    assert np.abs(np.asarray(sft.chosen) - cache["chosen"][:8]).max() > 1e-3
