"""The image program as a user runs it (`python -m experiments.main --config=configs/diffusion_dpo.py:tiny`),
and the validation of image configs (in-process, before any compute)."""

import json
import os

import numpy as np
import pytest

from configs import diffusion_dpo
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
# family's pretraining record equals diffusion_dpo's, so the base is reused (a symlink); those
# that make their pairs the same way reuse the pairs too. Trained here: one family per way of
# feeding the loss (per-image binary scores; data-vs-sample pairs); each costs a compilation of
# its train step, so SmPO (reward scores) and Reg-DPO (data-vs-sample pairs, as DRO) are
# validated only (test_every_image_family_validates).
FAMILIES = {"diffusion_kto": True, "diffusion_dro": False}
ALL_FAMILIES = ("diffusion_dpo", "diffusion_kto", "diffusion_smpo", "diffusion_reg_dpo", "diffusion_dro")


def test_method_families_train_on_one_pretraining(tiny_run, tmp_path):
  import importlib

  from experiments import diffusion

  work, _ = tiny_run
  for family, same_pairs in FAMILIES.items():
    dst = tmp_path / family
    dst.mkdir()
    for name in ("base_params",) + (("pairs",) if same_pairs else ()):
      os.symlink(os.path.join(work, name), dst / name)
    c = importlib.import_module(f"configs.{family}").get_config("tiny")
    config_validation.validate(c)
    s = diffusion.run(c, str(dst), progress=False)
    assert s["config"]["train"]["loss"] == c.train.loss
    assert os.path.islink(dst / "base_params") and os.path.isfile(dst / "final_params" / "provenance.json")
    assert 0.0 <= s["win_rate_ci95_low"] <= s["win_rate_vs_base"] <= s["win_rate_ci95_high"] <= 1.0, family
    assert np.isfinite(s["gold_reward_policy"]), family
    if not same_pairs:  # a training digit (chosen) against a sample of the base (rejected)
      with np.load(dst / "pairs" / "pairs.npz") as f:
        chosen, labels = f["chosen"], f["class_labels"]
      images, digit_labels = world_lib.load_digits()
      digits = {(img.tobytes(), int(y)) for img, y in zip(images, digit_labels)}
      assert all((img.tobytes(), int(y)) in digits for img, y in zip(chosen, labels)), family


def _tiny():
  c = diffusion_dpo.get_config("tiny")
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
  ],
)
def test_image_config_refused_with_field_and_allowed(field, value, message):
  c = _tiny()
  node = c
  *parents, last = field.split(".")
  for p in parents:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    config_validation.validate(c)


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
  ],
)
def test_stage_records_change_with_what_each_stage_reads(field, value, changed):
  from experiments import diffusion

  before = {k: r.fingerprint for k, r in diffusion.records(_tiny()).items()}
  c = _tiny()
  node = c
  *parents, last = field.split(".")
  for p in parents:
    node = node[p]
  node[last] = value
  after = {k: r.fingerprint for k, r in diffusion.records(c).items()}
  assert {k for k in before if before[k] != after[k]} == changed
