"""The image program as a user runs it (`python -m experiments.main --config=configs/diffusion_dpo.py:tiny`),
and the validation of image configs (in-process, before any compute)."""

import dataclasses
import json
import logging
import os
import pathlib
import re

import numpy as np
import pytest

from configs import validate as config_validation
from pofx.diffusion import world as world_lib
from tests.program import _main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  work = str(tmp_path_factory.mktemp("diffusion_dpo"))
  proc = _main(["--config=configs/diffusion_dpo.py:tiny", f"--workdir={work}", "--noprogress"], timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return work, proc


def test_tiny_run_writes_every_output(tiny_run):
  work, proc = tiny_run
  for name in ("summary.json", "metrics.jsonl", "base_samples.png", "policy_samples.png", "data_samples.png"):
    assert os.path.isfile(os.path.join(work, name)), name
  for name in ("base_params", "final_params", "pairs"):
    assert os.path.isfile(os.path.join(work, name, "provenance.json")), name
  with open(os.path.join(work, "summary.json")) as f:
    s = json.load(f)
  assert s["config"]["domain"] == "image" and s["num_samples"] == 32
  assert s["wins"] + s["ties"] + s["losses"] == 32
  assert s["win_rate_vs_base"] == pytest.approx((s["wins"] + 0.5 * s["ties"]) / 32)
  assert 0.0 <= s["win_rate_ci95_low"] <= s["win_rate_vs_base"] <= s["win_rate_ci95_high"] <= 1.0
  for k in ("gold_reward", "class_accuracy", "diversity", "frechet"):
    assert np.isfinite(s[f"{k}_base"]) and np.isfinite(s[f"{k}_policy"]), k
  assert "win_rate_vs_base" in proc.stdout  # the console table
  # The start-up keeps freed memory in glibc's per-thread arenas (the language programs': one arena)
  # where it changes the allocator at all (glibc, the CPU platform).
  started = next(line for line in proc.stderr.splitlines() if "start-up:" in line)
  if "keeps freed memory" in started:
    assert "per-thread arenas" in started and "M_ARENA_MAX" not in started, started
  else:
    assert "unchanged" in started, started
  stages = {json.loads(line)["stage"] for line in open(os.path.join(work, "metrics.jsonl"))}
  assert stages == {"pretrain", "train"}


def test_tiny_run_pairs_are_labelled_by_the_gold_reward(tiny_run):
  work, _ = tiny_run
  with np.load(os.path.join(work, "pairs", "pairs.npz")) as f:
    d = dict(f)
  assert d["chosen"].shape == (32, 8, 8, 1) and d["rejected"].shape == (32, 8, 8, 1)
  np.testing.assert_array_equal(d["class_labels"], np.arange(32) % 10)
  # The labeller's probability is Bradley-Terry on the stored rewards (label_scale 4).
  want = 1.0 / (1.0 + np.exp(-4.0 * (d["chosen_reward"].astype(np.float64) - d["rejected_reward"])))
  np.testing.assert_allclose(d["label_prob"], want, rtol=1e-5)


def test_tiny_run_png_grid(tiny_run):
  import matplotlib.image

  work, _ = tiny_run
  img = matplotlib.image.imread(os.path.join(work, "policy_samples.png"))
  # 10 class rows x 2 columns of 8x8 images with 1-pixel borders, each pixel drawn 4x4.
  assert img.shape[:2] == ((10 * 9 + 1) * 4, (2 * 9 + 1) * 4)


def test_tiny_rerun_with_other_training_is_refused_before_compute(tiny_run):
  work, _ = tiny_run
  proc = _main(["--config=configs/diffusion_dpo.py:tiny", f"--workdir={work}", "--config.train.steps=5"], timeout=300)
  assert proc.returncode == 2
  assert "final_params was computed under another config" in proc.stderr and "train.steps" in proc.stderr


# The method families (configs/diffusion_*.py) at :tiny, on the tiny run's pretrained base: every
# family's pretraining record equals diffusion_dpo's, so the base is reused (a symlink); a family
# that makes its pairs as another one did reuses those pairs too (the value: the family whose
# pairs it links, "tiny" for the tiny run's, None to make its own). Trained here: one family per
# way of feeding the loss (per-image binary scores; data-vs-sample pairs with quality maps;
# recorded chains, D3PO, with two micro-batches per step; SPO's step-wise pairs; RankDPO's K-way
# lists; Curriculum DPO's staged pools; DenseDPO's band labels); each costs a compilation of its
# train step (4-6 CPU-s at :tiny). The families whose training is one of these ways and whose
# difference lies in the pairs or the loss have their pairs made here without training
# (`stage_pairs`: BalancedDPO's majority labels, TailorPO-G's step-wise pairs) or their logps_fn
# checked directly (Diffusion-SDPO's safeguard), and like SmPO (reward scores), Reg-DPO and
# Diffusion-DRO (data-vs-sample pairs, as PatchDPO, with losses that tests/losses checks) and the
# dense-reward view (D3PO's chains and log-probs, another loss) are validated
# (test_every_image_family_validates), as is the prompted family (a cross-attention denoiser of
# its own: it cannot reuse the tiny run's base, and its whole run costs about 30 s of CPU).
FAMILIES = {
  "diffusion_kto": "tiny",
  "diffusion_d3po": None,
  "diffusion_spo": None,
  "diffusion_patch_dpo": None,
  "diffusion_rank_dpo": None,
  "diffusion_curriculum_dpo": None,
  "diffusion_dense_dpo": None,
}
ALL_FAMILIES = (
  "diffusion_dpo",
  "diffusion_kto",
  "diffusion_smpo",
  "diffusion_reg_dpo",
  "diffusion_dro",
  "diffusion_d3po",
  "diffusion_spo",
  "diffusion_dense_reward",
  "diffusion_patch_dpo",
  "diffusion_dpo_prompted",
  "diffusion_rank_dpo",
  "diffusion_balanced_dpo",
  "diffusion_sdpo",
  "diffusion_curriculum_dpo",
  "diffusion_tailor_po",
  "diffusion_tailor_po_g",
  "diffusion_dense_dpo",
  "diffusion_adaptive_dpo",
)


class _Compilations(logging.Handler):
  """The names of the programs JAX lowers for compilation while `jax.log_compiles()` is on."""

  def __init__(self):
    super().__init__()
    self.names = []

  def emit(self, record):
    m = re.match(r"Compiling (\S+) with global shapes", record.getMessage())
    if m:
      self.names.append(m.group(1))


@pytest.fixture(scope="module")
def family_runs(tiny_run, tmp_path_factory):
  """{family: (workdir, config, summary, names of the programs its run compiled)}."""
  import importlib

  import jax

  from experiments import diffusion

  work, _ = tiny_run
  root = tmp_path_factory.mktemp("families")
  dirs, out = {"tiny": work}, {}
  for family, pairs_from in FAMILIES.items():
    dst = root / family
    dst.mkdir()
    os.symlink(os.path.join(work, "base_params"), dst / "base_params")
    if pairs_from is not None:
      os.symlink(os.path.join(dirs[pairs_from], "pairs"), dst / "pairs")
    c = importlib.import_module(f"configs.{family}").get_config("tiny")
    if family == "diffusion_d3po":  # gradient accumulation: two micro-batches stacked
      c.unlock()
      c.train.grad_accum_steps = 2
    config_validation.validate(c)
    compiled, logger = _Compilations(), logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(compiled)
    try:
      with jax.log_compiles(True):
        summary = diffusion.run(c, str(dst), progress=False, world=_world(c))
    finally:
      logger.removeHandler(compiled)
    out[family] = (dst, c, summary, compiled.names)
    dirs[family] = str(dst)
  return out


def _set(c, field, value):
  """Sets the config's existing field "a.b.c" to `value`."""
  *parents, last = field.split(".")
  for name in parents:
    c = c[name]
  c[last] = value


def _pairs(dst):
  with np.load(dst / "pairs" / "pairs.npz") as f:
    return dict(f)


_WORLDS = {}


def _world(c):
  """The image world of config `c`, built once per world in this module (its classifiers are
  trained on construction and on first use): every :tiny family has the same one."""
  from experiments import diffusion

  key = diffusion.world_config(c)
  if key not in _WORLDS:
    _WORLDS[key] = world_lib.ImageWorld(key)
  return _WORLDS[key]


@pytest.fixture(scope="module")
def stage_pairs(tiny_run):
  """`pairs_of(family, overrides=None) -> (config, data)`: the family's pair stage at :tiny, with
  `{"a.b": value}` overrides (`experiments.diffusion.make_pairs`, with the key the program gives
  it) on the tiny run's pretrained base, nothing trained."""
  import importlib

  import jax

  from experiments import diffusion

  work, _ = tiny_run

  def pairs_of(family, overrides=None):
    c = importlib.import_module(f"configs.{family}").get_config("tiny")
    for field, value in (overrides or {}).items():
      _set(c, field, value)
    config_validation.validate(c)
    world = _world(c)
    model, schedule = diffusion.denoiser(c), diffusion.noise_schedule(c)
    key = jax.random.PRNGKey(int(c.seed))
    base = diffusion._load_params(os.path.join(work, "base_params"), jax.eval_shape(model.init, key))
    data = diffusion.make_pairs(c, world, model, base, schedule, jax.random.fold_in(key, sum(map(ord, "pairs"))))
    return c, data

  return pairs_of


def test_method_families_train_on_one_pretraining(family_runs):
  for family, (dst, c, s, _) in family_runs.items():
    assert s["config"]["train"]["loss"] == c.train.loss
    assert os.path.islink(dst / "base_params") and os.path.isfile(dst / "final_params" / "provenance.json")
    assert 0.0 <= s["win_rate_ci95_low"] <= s["win_rate_vs_base"] <= s["win_rate_ci95_high"] <= 1.0, family
    assert np.isfinite(s["gold_reward_policy"]), family
    metrics = [json.loads(line) for line in open(dst / "metrics.jsonl")]
    assert all(np.isfinite(m["loss"]) for m in metrics if m["stage"] == "train"), family
  images, digit_labels = world_lib.load_digits()
  digits = {(img.tobytes(), int(y)) for img, y in zip(images, digit_labels)}
  d = _pairs(family_runs["diffusion_patch_dpo"][0])  # a training digit (chosen) against a base sample
  assert all((img.tobytes(), int(y)) in digits for img, y in zip(d["chosen"], d["class_labels"]))


def test_each_family_compiles_its_train_step_once(family_runs):
  # The base is restored from the tiny run (committed arrays) and the step's outputs are committed:
  # a first state with uncommitted leaves would be lowered with other argument shardings than the
  # later ones, and the step compiled twice (experiments/diffusion.py puts it on the device).
  for family, (_, _, _, compiled) in family_runs.items():
    assert compiled.count("jit(step)") == 1, (family, compiled)


def test_recorded_chains_and_their_step_labels(family_runs):
  dst, c, _, _ = family_runs["diffusion_d3po"]
  d = _pairs(dst)
  n, s = c.data.num_pairs, c.data.num_steps
  assert d["chosen_latents"].shape == (n, s + 1, 8, 8, 1) and d["rejected_latents"].shape == (n, s + 1, 8, 8, 1)
  # One shared x_T per pair (D3PO's sampling), the final images the stored (clipped) pair.
  np.testing.assert_array_equal(d["chosen_latents"][:, 0], d["rejected_latents"][:, 0])
  np.testing.assert_array_equal(np.clip(d["chosen_latents"][:, -1], -1, 1), d["chosen"])
  # "leading" spacing of 1000 steps: t = 750, 500, 250, 0; the last step (to the clean image) is deterministic.
  np.testing.assert_array_equal(d["timesteps"], [750, 500, 250, 0])
  np.testing.assert_array_equal(d["prev_timesteps"], [500, 250, 0, -250])
  assert np.all(d["chosen_log_probs"][:, -1] == 0) and np.all(d["chosen_log_probs"][:, :-1] != 0)
  # The last step reaches the final image: its step reward is the image's gold reward.
  np.testing.assert_allclose(d["chosen_step_rewards"][:, -1], d["chosen_reward"], rtol=1e-5)
  np.testing.assert_allclose(d["rejected_step_rewards"][:, -1], d["rejected_reward"], rtol=1e-5)
  assert set(np.unique(d["step_preference"])) <= {-1.0, 1.0}


def test_program_recomputes_the_samplers_own_step_log_probs(family_runs):
  """The trainer's re-evaluation of the recorded transitions (the program's logps_fn and batch, the
  base's parameters) equals the log-probs the sampler returned while drawing them (summed over the
  64 pixels there, averaged in the trainer)."""
  import jax

  from experiments import diffusion
  from pofx import losses

  dst, c, _, _ = family_runs["diffusion_d3po"]
  d = _pairs(dst)
  model, schedule = diffusion.unet.make(diffusion.unet_config(c)), diffusion.noise_schedule(c)
  base = diffusion._load_params(str(dst / "base_params"), jax.eval_shape(model.init, jax.random.PRNGKey(0)))
  idx = np.arange(c.data.num_pairs)
  batch = diffusion.make_batch(c, losses.spec(c.train.loss), d, idx, None)
  got = jax.jit(diffusion.logps_fn_of(c, model, schedule))(base, batch)
  s = c.data.num_steps - 1  # the random steps
  assert diffusion.random_steps(d) == s and got.chosen_token_logps.shape == (len(idx), s)
  np.testing.assert_allclose(got.chosen_token_logps, d["chosen_log_probs"][:, :s] / 64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.rejected_token_logps, d["rejected_log_probs"][:, :s] / 64, rtol=1e-5, atol=1e-5)


def test_spo_step_pairs_and_patch_quality_maps(family_runs):
  dst, c, s, _ = family_runs["diffusion_spo"]
  d = _pairs(dst)
  # Step-wise pairs from one shared x_t at the branched random steps 1 and 2 (t = 500, 250; t_prev = t - 250).
  np.testing.assert_array_equal(d["chosen_latents"][:, 0], d["rejected_latents"][:, 0])
  assert set(d["timesteps"][:, 0].tolist()) <= {500, 250} and set(d["step_index"].tolist()) <= {1, 2}
  np.testing.assert_array_equal(d["prev_timesteps"], d["timesteps"] - 250)
  # Kept iff softmax(4 r_best, 4 r_worst) differ by more than the threshold: 2 sigmoid(4 (r_w - r_l)) - 1 > 0.3.
  gap = 2.0 / (1.0 + np.exp(-4.0 * (d["chosen_reward"].astype(np.float64) - d["rejected_reward"]))) - 1.0
  assert np.all(gap > c.data.spo_threshold) and s["pairs_count"] == len(gap) <= int(d["spo_steps_seen"])
  # PatchDPO's maps: q = sigmoid(4 (r(gen) - r(gen with the reference's 2x2 patch))), by hand for a few patches.
  dst, c, _, _ = family_runs["diffusion_patch_dpo"]
  d = _pairs(dst)
  assert d["rejected_patch_quality"].shape == (c.data.num_pairs, 4, 4)
  world = _world(c)
  for n, i, j in ((0, 0, 0), (3, 1, 2), (7, 3, 3)):
    gen = d["rejected"][n : n + 1].copy()
    swapped = gen.copy()
    swapped[0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = d["chosen"][n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
    y = d["class_labels"][n : n + 1]
    want = 1.0 / (1.0 + np.exp(-4.0 * (world.gold_reward(gen, y)[0] - world.gold_reward(swapped, y)[0])))
    # float32 rewards of one image here against a batch in the program: BLAS kernels differ by ~1e-6.
    np.testing.assert_allclose(d["rejected_patch_quality"][n, i, j], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(d["chosen_patch_quality"], d["rejected_patch_quality"])


def test_tailor_po_g_pairs_share_x_t_and_label_the_guided_winner(tiny_run, stage_pairs):
  """TailorPO-G's pairs (tiny: chains of 4 steps, recorded from step 1 every 2 steps: step 1 only,
  t = 500 -> 250): both samples drawn from one x_t; the stored rewards are the gold rewards of the
  clean images the base predicts at the two stored samples (recomputed here with the base), the
  preferred one's the higher; guidance moved most preferred samples."""
  import jax

  from experiments import diffusion
  from pofx.diffusion import schedules

  c, d = stage_pairs("diffusion_tailor_po_g")
  np.testing.assert_array_equal(d["chosen_latents"][:, 0], d["rejected_latents"][:, 0])
  assert set(d["step_index"].tolist()) == {1} and np.all(d["timesteps"] == 500) and np.all(d["prev_timesteps"] == 250)
  assert len(d["step_index"]) == int(d["tailor_steps_seen"]) == c.data.num_pairs
  model, schedule = diffusion.unet.make(diffusion.unet_config(c)), diffusion.noise_schedule(c)
  work, _ = tiny_run
  base = diffusion._load_params(os.path.join(work, "base_params"), jax.eval_shape(model.init, jax.random.PRNGKey(0)))
  world = _world(c)
  y = d["class_labels"]
  t = np.full(len(y), 250, np.int32)
  a = np.asarray(schedules.alpha_cumprod(schedule, t)).reshape(-1, 1, 1, 1)
  for key, latents in (("chosen_reward", d["chosen_latents"][:, 1]), ("rejected_reward", d["rejected_latents"][:, 1])):
    eps = np.asarray(model.denoise(base, latents, t, y), np.float64)  # epsilon prediction
    x0 = np.clip((latents - np.sqrt(1 - a) * eps) / np.sqrt(a), -1.0, 1.0)
    np.testing.assert_allclose(world.gold_reward(x0.astype(np.float32), y), d[key], rtol=1e-4, atol=1e-4)
  assert np.all(d["chosen_reward"] > d["rejected_reward"]) and d["guided"].mean() > 0.5


def test_ranked_lists_are_labelled_pairwise_by_the_gold_reward(family_runs):
  """RankDPO's lists: K = 3 base samples per prompt, their gold rewards, and phi = the share of the
  other two each beats, one Bradley-Terry outcome per pair: phi in {0, 1/2, 1}, summing to K / 2 per list."""
  dst, c, s, _ = family_runs["diffusion_rank_dpo"]
  d = _pairs(dst)
  n, k = c.data.num_pairs, c.data.list_size
  assert d["list_images"].shape == (n, k, 8, 8, 1) and d["list_scores"].shape == (n, k)
  np.testing.assert_array_equal(d["class_labels"], np.arange(n) % 10)
  world = _world(c)
  want = world.gold_reward(d["list_images"].reshape(n * k, 8, 8, 1), np.repeat(d["class_labels"], k))
  np.testing.assert_allclose(d["list_rewards"], want.reshape(n, k), rtol=1e-5)
  assert set(np.unique(d["list_scores"]).tolist()) <= {0.0, 0.5, 1.0}
  np.testing.assert_allclose(d["list_scores"].sum(axis=1), k / 2)
  assert not np.array_equal(d["list_images"][:, 0], d["list_images"][:, 1])  # distinct samples per prompt
  assert s["list_size"] == k and s["pairs_count"] == n and 0.0 <= s["pairs_label_agreement"] <= 1.0


def test_balanced_dpo_pairs_follow_the_metrics_majority(stage_pairs):
  """BalancedDPO's pairs: the chosen image wins the majority of the three metrics' votes (each
  metric recomputed here: the two classifiers' log-probabilities by numpy, the ink by its
  formula), and the reference is a synced copy of the policy."""
  c, d = stage_pairs("diffusion_balanced_dpo")
  world = _world(c)

  def votes(images, labels):
    rows = []
    for params in (world.classifier, world.second_classifier):
      h = images.reshape(len(images), -1).astype(np.float64)
      for layer in params[:-1]:
        h = np.maximum(h @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64), 0.0)
      z = h @ np.asarray(params[-1]["w"], np.float64) + np.asarray(params[-1]["b"], np.float64)
      z = z - z.max(1, keepdims=True)
      rows.append((z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(len(labels)), labels])
    rows.append(((images.reshape(len(images), -1) + 1.0) / 2.0).mean(1))
    return np.stack(rows)

  w, l = votes(d["chosen"], d["class_labels"]), votes(d["rejected"], d["class_labels"])
  close = np.isclose(w, l, rtol=1e-5, atol=1e-6)  # float32 scores: leave near-ties out of the count
  assert np.all(np.sum((w > l) & ~close, 0) >= np.sum((l > w) & ~close, 0))
  assert np.mean(np.sum(w > l, 0) >= 2) > 0.95
  assert 0 < len(d["chosen"]) <= c.data.num_pairs
  assert c.train.reference.kind == "synced" and c.train.reference.alpha == 1.0


def test_label_flip_reverses_that_share_of_the_pairs_and_nothing_else(stage_pairs):
  """`data.label_flip`: the same samples and draws as without it, with round(share n) pairs, and
  only those, stored the other way round and marked in `label_flipped`."""
  from experiments import diffusion

  _, plain = stage_pairs("diffusion_dpo")
  _, noisy = stage_pairs("diffusion_dpo", {"data.label_flip": 0.25})
  flipped = noisy["label_flipped"]
  n = len(plain["chosen"])
  assert "label_flipped" not in plain and flipped.dtype == bool and flipped.sum() == round(0.25 * n) == 8
  for key in ("chosen", "chosen_reward", "chosen_desirable"):
    other = key.replace("chosen", "rejected")
    np.testing.assert_array_equal(noisy[key][flipped], plain[other][flipped])
    np.testing.assert_array_equal(noisy[other][flipped], plain[key][flipped])
    np.testing.assert_array_equal(noisy[key][~flipped], plain[key][~flipped])
  np.testing.assert_array_equal(noisy["class_labels"], plain["class_labels"])
  assert diffusion.label_summary(noisy)["pairs_flipped_share"] == 0.25


def test_dense_dpo_pairs_are_guided_copies_labelled_band_by_band(family_runs):
  """DenseDPO's pairs: two samples denoised from noised copies of one digit, a label per band of 2
  rows. The band advantages are recomputed here by swapping rows with the world's gold reward; a
  band is a tie exactly where |advantage| < data.segment_tie; the stored labels are relative to the
  chosen sample, which wins at least as many bands as it loses."""
  from experiments import diffusion

  dst, c, s, _ = family_runs["diffusion_dense_dpo"]
  d = _pairs(dst)
  world = _world(c)
  lab, adv, y = d["segment_labels"], d["band_advantages"].astype(np.float64), d["class_labels"]
  p = len(y)
  assert lab.shape == adv.shape == (p, 4) and 0 < p <= c.data.num_pairs and s["pairs_count"] == p
  assert set(np.unique(lab)) <= {-1, 0, 1}
  assert np.all(np.mean(lab != 0, axis=1) >= c.data.min_nontie_fraction) and np.all(lab.sum(axis=1) >= 0)
  np.testing.assert_array_equal(lab == 0, np.abs(adv) < c.data.segment_tie)
  assert np.all((c.data.guidance_min <= d["guidance"]) & (d["guidance"] <= c.data.guidance_max))
  r = lambda x: world.gold_reward(x, y).astype(np.float64)
  for f in range(4):
    band = slice(2 * f, 2 * f + 2)
    w_sw, l_sw = d["chosen"].copy(), d["rejected"].copy()
    w_sw[:, band], l_sw[:, band] = d["rejected"][:, band], d["chosen"][:, band]
    np.testing.assert_allclose(adv[:, f], 0.5 * ((r(d["chosen"]) - r(w_sw)) + (r(l_sw) - r(d["rejected"]))), atol=2e-5)
  # Two images that differ in band 0 only: the other bands have no advantage, and band 0's is the
  # whole reward difference (both swap tests give it).
  a = d["chosen"][:3]
  b = a.copy()
  b[:, :2] = d["rejected"][:3, :2]
  got = diffusion.band_advantages(world, a, b, y[:3], 2)
  np.testing.assert_array_equal(got[:, 1:], 0.0)
  np.testing.assert_allclose(got[:, 0], world.gold_reward(a, y[:3]) - world.gold_reward(b, y[:3]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(diffusion.band_advantages(world, b, a, y[:3], 2), -got, atol=1e-6)


def test_sdpo_family_scales_the_losers_gradient(tiny_run):
  """Diffusion-SDPO's family: the program's logps_fn is the safeguarded one. Its values equal the
  plain pair errors' and its gradient is the plain one with the loser's part scaled by lambda
  (computed here from the residuals by the formula)."""
  import jax
  import jax.numpy as jnp

  from experiments import diffusion
  from pofx import losses
  from pofx.diffusion import pairs as pairs_lib

  c = _tiny("sdpo")
  assert c.train.winner_preserving_mu == 0.9
  config_validation.validate(c)
  model, schedule = diffusion.denoiser(c), diffusion.noise_schedule(c)
  params = model.init(jax.random.key(0))
  work, _ = tiny_run
  d = _pairs(pathlib.Path(work))  # Diffusion-SDPO's pairs are Diffusion-DPO's
  idx = np.arange(8)
  batch = diffusion.make_batch(c, losses.spec(c.train.loss), d, idx, jax.random.split(jax.random.PRNGKey(1), 8))
  sdpo, plain = diffusion.logps_fn_of(c, model, schedule), pairs_lib.make_logps_fn(model.denoise, schedule)
  predict = diffusion.methods.make_pairs_predict(model.denoise, schedule)

  @jax.jit
  def everything(params):  # one program: values, predictions and the four gradients
    values, grads = {}, {}
    for f, fn in (("sdpo", sdpo), ("plain", plain)):
      values[f], pullback = jax.vjp(lambda p: fn(p, batch), params)  # one forward, two backward passes
      for part in ("chosen", "rejected"):
        ones = jax.tree.map(jnp.zeros_like, values[f])
        ones = dataclasses.replace(ones, **{part: jnp.ones_like(getattr(values[f], part))})
        (grads[(f, part)],) = pullback(ones)
    return values["sdpo"], values["plain"], predict(params, batch), grads

  a, b, predictions, grads = everything(params)
  np.testing.assert_allclose(np.asarray(a.chosen), np.asarray(b.chosen), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(a.rejected), np.asarray(b.rejected), rtol=1e-6)
  # lambda from the residuals of the chosen (w) and rejected (l) halves, the authors' formula.
  pw, pl, tw, tl = (np.asarray(x, np.float64) for x in predictions)
  ga, gb = 2 * (pw - tw) / pw.size, 2 * (pl - tl) / pl.size
  num, den = np.sum(ga * ga), np.sum(gb * ga)
  lam = np.clip((1 - 0.9) * num / (den + 1e-9), 0, 1) if den > 0 else 1.0
  assert lam < 0.5  # the shared noise aligns the two residuals: the safeguard is active here
  for part, scale in (("chosen", 1.0), ("rejected", lam)):
    for x, y in zip(jax.tree.leaves(grads[("sdpo", part)]), jax.tree.leaves(grads[("plain", part)])):
      np.testing.assert_allclose(np.asarray(x), scale * np.asarray(y), rtol=2e-3, atol=1e-7)


def test_curriculum_pairs_and_their_stages(family_runs):
  """Curriculum DPO's pairs: within a prompt, the higher gold reward chosen, gaps above the keep
  threshold and recorded; the training draws stage 0's pairs (gap >= the second threshold of
  linspace(min, max, groups)[::-1]) first, then the next band."""
  from experiments import diffusion

  dst, c, s, _ = family_runs["diffusion_curriculum_dpo"]
  d = _pairs(dst)
  gap = d["chosen_reward"].astype(np.float64) - d["rejected_reward"]
  np.testing.assert_allclose(d["reward_gap"], gap, rtol=1e-4, atol=1e-6)
  assert np.all(gap > c.data.curriculum_keep_threshold)
  k = c.data.list_size
  assert 0 < len(gap) <= c.data.num_pairs * k * (k - 1) // 2 and s["pairs_count"] == len(gap)
  g = c.train.curriculum.groups
  thresholds = np.linspace(gap.min(), gap.max(), g)[::-1]
  for step, stage in ((0, 0), (1, 0), (2, 1), (3, 1), (10**6, g - 2)):
    want = np.flatnonzero(d["reward_gap"] >= np.float32(thresholds[stage + 1]) - 1e-6)
    got = diffusion.curriculum_pool(c, d, step)
    assert set(got.tolist()) <= set(want.tolist()) and len(want) - len(got) <= 1, (step, len(got), len(want))
  assert len(diffusion.curriculum_pool(c, d, 10**6)) == len(gap)  # the last stage: every pair


def _tiny(family=""):
  import importlib

  c = importlib.import_module(f"configs.diffusion_{family or 'dpo'}").get_config("tiny")
  c.unlock()
  return c


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("train.reference.kind", "cached", "timestep and noise of each pair are drawn anew"),
    ("train.reference.kind", "multi", "not allowed for config.domain='image'"),
    ("train.loss", "simpo", "needs ['lengths'], which images do not have"),
    ("train.loss", "no_such_loss", "config.train.loss='no_such_loss' is not allowed"),
    ("model.schedule", "cosine", "config.model.schedule='cosine' is not allowed"),
    ("data.sampler", "euler", "config.data.sampler='euler' is not allowed"),
    ("data.eta", 1.5, "config.data.eta=1.5 is not allowed"),
    ("model.preset", "huge", "config.model.preset='huge' is not allowed"),
    ("train.perturbation.kind", "saf", "config.train.perturbation.kind='saf' is not allowed"),
    ("train.loss", "diffusion_kto", "config.train.scores='reward' is not allowed with train.loss='diffusion_kto'"),
    ("data.pairing", "triplets", "config.data.pairing='triplets' is not allowed"),
    ("model.norm_num_groups", 3, "config.model: UNetConfig: norm_num_groups=3 must divide"),
    ("domain", "audio", "config.domain='audio' is not allowed"),
    ("data.record", "frames", "config.data.record='frames' is not allowed"),
    ("train.logps", "steps", "config.train.logps='steps' is not allowed"),
    ("train.logps", "trajectory", "config.train.logps='trajectory' reads the recorded chains"),
    ("train.loss", "d3po", "needs per-step log-probs .'tokens'., which only the recorded chains give"),
    ("data.patch_size", 3, "config.data.patch_size=3 is not allowed; allowed: [0, 1, 2, 4, 8]"),
    ("train.logps", "patch", "data.patch_size=0 does not make"),
    ("train.step_labels", True, "config.train.step_labels=True needs the step-wise labels"),
    ("d3po:data.eta", 0.0, "config.data.eta=0.0 is not allowed with data.record='chains'"),
    ("d3po:data.pairing", "data_vs_sample", "config.data.pairing='data_vs_sample' is not allowed with data.record"),
    ("d3po:data.num_steps", 1, "config.data.num_steps=1 is not allowed with data.record='chains'"),
    ("spo:data.spo_candidates", 1, "config.data.spo_candidates=1 is not allowed"),
    ("spo:data.spo_threshold", 1.0, "config.data.spo_threshold=1.0 is not allowed"),
    ("spo:data.spo_start_step", 3, "config.data.spo_start_step=3 is not allowed; allowed: an integer in [0, 2]"),
    ("spo:train.logps", "pairs", "config.train.logps='pairs' is not allowed with data.record='spo_steps'"),
    ("rank_dpo:data.list_size", 1, "config.data.list_size=1 is not allowed; allowed: an integer >= 2"),
    ("rank_dpo:train.logps", "pairs", "config.train.logps='pairs' is not allowed with data.record='lists'"),
    ("rank_dpo:train.loss", "dpo", "train.logps='lists' feeds K-way lists, which loss 'dpo' does not take"),
    (
      "rank_dpo:data.pairing",
      "data_vs_sample",
      "config.data.pairing='data_vs_sample' is not allowed with data.record='lists'",
    ),
    ("rank_dpo:train.loss_hyper.ranking", "best", "invalid ranking='best'; allowed: .'labels', 'predicted'."),
    ("train.loss", "rank_dpo", "config.train.loss='rank_dpo' takes K-way lists"),
    ("data.labeller", "vote", "config.data.labeller='vote' is not allowed"),
    ("train.winner_preserving_mu", 1.5, "config.train.winner_preserving_mu=1.5 is not allowed"),
    ("rank_dpo:train.winner_preserving_mu", 0.9, "is not allowed with train.logps='lists'"),
    ("curriculum_dpo:train.curriculum.update_every", 0, "config.train.curriculum.update_every=0 is not allowed"),
    ("curriculum_dpo:data.curriculum_keep_threshold", -1.0, "config.data.curriculum_keep_threshold=-1.0 is not"),
    ("curriculum_dpo:train.logps", "patch", "config.train.logps='patch' is not allowed with data.record='curriculum'"),
    ("data.label_flip", 0.6, "config.data.label_flip=0.6 is not allowed; allowed: a number in .0, 0.5."),
    ("d3po:data.label_flip", 0.2, "allowed with data.pairing='samples' and data.record='images' only"),
    ("dense_dpo:data.segment_rows", 3, "config.data.segment_rows=3 is not allowed; allowed: [1, 2, 4, 8]"),
    ("dense_dpo:data.guidance_max", 1.0, "allowed: 0 < guidance_min <= guidance_max < 1"),
    ("dense_dpo:data.guidance_min", 0.9, "allowed: 0 < guidance_min <= guidance_max < 1"),
    ("dense_dpo:data.segment_tie", -0.1, "config.data.segment_tie=-0.1 is not allowed; allowed: a finite number >= 0"),
    ("dense_dpo:data.min_nontie_fraction", 0.0, "config.data.min_nontie_fraction=0.0 is not allowed"),
    ("dense_dpo:train.logps", "pairs", "DenseDPO's band labels are recorded by data.record='segments'"),
    ("dense_dpo:data.pairing", "data_vs_sample", "config.data.record='segments' makes its own pairs"),
    ("train.logps", "segments", "DenseDPO's band labels are recorded by data.record='segments'"),
    (
      "balanced_dpo:data.metrics",
      ("ink", "clip"),
      "config.data.metrics=.'ink', 'clip'. is not allowed with data.labeller='majority'",
    ),
    ("balanced_dpo:data.metrics", ("ink", "ink"), "a non-empty tuple of distinct names from"),
    ("balanced_dpo:data.pairing", "data_vs_sample", "config.data.labeller='majority' is not allowed with data.record"),
    (
      "adaptive_dpo:train.reference.companion_decays",
      (0.9999, 1.0),
      "config.train.reference.companion_decays=.0.9999, 1.0. is not allowed; allowed: a non-empty tuple of EMA decays",
    ),
    ("adaptive_dpo:train.reference.companion_decays", (), "companion_decays=.. is not allowed"),
    (
      "adaptive_dpo:train.reference.companion_warmup",
      -1,
      "config.train.reference.companion_warmup=-1 is not allowed; allowed: an integer >= 0",
    ),
    ("adaptive_dpo:train.reference.kind", "none", "config.train.reference.kind='none', but loss 'adaptive_dpo' needs"),
    (
      "adaptive_dpo:train.loss_hyper.margin",
      "cubic",
      "adaptive_dpo: invalid margin='cubic'; allowed: ['linear', 'none'",
    ),
    ("adaptive_dpo:train.loss_hyper.c", 0.0, "adaptive_dpo: invalid c=0.0; allowed: c > 0"),
    ("train.loss", "adaptive_dpo", "it needs config.train.reference.companion_decays"),
  ],
)
def test_image_config_refused_with_field_and_allowed(field, value, message):
  family, _, field = field.rpartition(":")
  c = _tiny(family)
  _set(c, field, value)
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    config_validation.validate(c)


def test_run_refuses_a_world_of_another_config_before_writing(tmp_path):
  import types

  from experiments import diffusion

  c = _tiny()
  other = types.SimpleNamespace(config=world_lib.ImageWorldConfig(seed=1, **dict(c.world)))
  work = tmp_path / "run"
  with pytest.raises(ValueError, match=r"the given world was built for .*seed=1.*the config's world is .*seed=0"):
    diffusion.run(c, str(work), progress=False, world=other)
  assert not work.exists()


def test_adaptive_dpo_config_reads_the_pair_errors_and_builds_its_companions():
  """Adaptive-DPO's config: the EMA companions around the frozen reference with the authors' decays
  and warm-up, and only on the pair errors (patch-weighted errors are refused)."""
  import jax

  from experiments import diffusion
  from pofx import losses

  c = _tiny("adaptive_dpo")
  config_validation.validate(c)
  assert c.train.loss == "adaptive_dpo" and tuple(c.train.reference.companion_decays) == (0.9999, 0.5)
  assert c.train.reference.companion_warmup == 2 and c.train.loss_hyper.beta == 2500.0
  c.data.patch_size, c.train.logps = 2, "patch"
  with pytest.raises(ValueError, match="config.train.logps='patch' is not allowed with train.loss='adaptive_dpo'"):
    config_validation.validate(c)
  c = _tiny("adaptive_dpo")
  c.train.loss, c.train.loss_hyper = "dpo", {"beta": 5000.0}
  with pytest.raises(ValueError, match="companion_decays is read only by a loss that requires the EMA companions"):
    config_validation.validate(c)
  # The program's reference: ema_companions(frozen), whose state holds the base and two EMA copies.
  c = _tiny("adaptive_dpo")
  model, schedule = diffusion.denoiser(c), diffusion.noise_schedule(c)
  params = jax.eval_shape(model.init, jax.random.key(0))
  logps_fn = diffusion.logps_fn_of(c, model, schedule)
  ref = diffusion.reference_of(c, losses.spec(c.train.loss), params, logps_fn)
  assert ref.name == "ema_companions(frozen)" and ref.updates and not ref.cached
  state = jax.eval_shape(ref.init, params)
  assert len(state["emas"]) == 2
  assert all(jax.tree.structure(x) == jax.tree.structure(params) for x in (state["base"], *state["emas"]))
  assert diffusion.reference_of(_tiny(), losses.spec("dpo"), params, logps_fn).name == "frozen"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_image_family_validates(family):
  import importlib

  module = importlib.import_module(f"configs.{family}")
  for arg in (None, "tiny"):
    c = module.get_config(arg)
    assert c.is_locked and c.domain == "image"
    config_validation.validate(c)
  assert f"python -m experiments.main --config=configs/{family}.py" in module.__doc__


@pytest.mark.parametrize(
  "field, value, changed",
  [
    ("train.steps", 5, {"train", "eval"}),
    ("train.reference.kind", "ema", {"train", "eval"}),
    ("data.num_pairs", 16, {"pairs", "train", "eval"}),
    ("pretrain.steps", 3, {"pretrain", "pairs", "train", "eval"}),
    ("world.style_weight", 1.0, {"pretrain", "pairs", "train", "eval"}),
    ("eval.num_samples", 16, {"eval"}),
    ("model.kernels", "xla", set()),  # the backends compute the same functions
    ("data.record", "chains", {"pairs", "train", "eval"}),
    ("data.patch_size", 2, {"pairs", "train", "eval"}),
    ("train.logps", "patch", {"train", "eval"}),
    ("train.step_labels", True, {"train", "eval"}),
    ("data.list_size", 3, {"pairs", "train", "eval"}),
    ("data.labeller", "majority", {"pairs", "train", "eval"}),
    ("train.winner_preserving_mu", 0.5, {"train", "eval"}),
    ("train.curriculum.update_every", 3, {"train", "eval"}),
    ("data.curriculum_keep_threshold", 0.2, {"pairs", "train", "eval"}),
    ("data.segment_tie", 0.1, {"pairs", "train", "eval"}),
    ("data.label_flip", 0.2, {"pairs", "train", "eval"}),
  ],
)
def test_stage_records_change_with_what_each_stage_reads(field, value, changed):
  from experiments import diffusion

  before = {k: r.fingerprint for k, r in diffusion.records(_tiny()).items()}
  c = _tiny()
  _set(c, field, value)
  after = {k: r.fingerprint for k, r in diffusion.records(c).items()}
  assert {k for k in before if before[k] != after[k]} == changed
