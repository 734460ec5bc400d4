"""The configs and their validation: every config builds and validates; bad values, misspelt and
mistyped keys fail before any compute with one line naming the field; the allowed values are
defined once (`pofx.options`, importable without JAX); the kernel backend is decided once per
workdir."""

import importlib
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import pofx
import pofx_backends
from configs import common, validate
from experiments import main as main_lib
from pofx import batching, options, parallel
from pofx import data as data_lib
from tests import forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_FAMILIES = tuple(
  f"study_{n}" for n in ("likelihood", "length", "gpo_frontier", "ranking", "overopt", "references", "online")
)
FAMILIES = (
  "dpo",
  "gpo",
  "simpo",
  "ipo",
  "mrpo",
  "predpo",
  "trdpo",
  "sam",
  "awp",
  "rwp",
  "beta_dpo",
  "dpo_files",
  "gamma_po",
  "rpo",
  "saf",
  "mesa",
  "msd",
  "adv_embeddings",
  "gradient_field",
  "new_methods",
  "reward_model",
  "curry_dpo",
  "kto_unpaired",
) + STUDY_FAMILIES
ARGS = {
  "dpo": ("", "tiny"),
  "gpo": ("", "tiny"),
  "simpo": ("", "tiny"),
  "ipo": ("", "tiny", "sum", "sum,tiny"),
  "mrpo": ("", "tiny"),
  "predpo": ("", "tiny"),
  "trdpo": ("", "tiny", "hard", "hard,tiny"),
  "sam": ("", "tiny", "asam", "asam,tiny"),
  "awp": ("", "tiny"),
  "rwp": ("", "tiny"),
  "beta_dpo": ("", "tiny"),
  "dpo_files": ("", "tiny"),
  "gamma_po": ("", "tiny"),
  "rpo": ("", "tiny"),
  "saf": ("", "tiny"),
  "mesa": ("", "tiny"),
  "msd": ("", "tiny"),
  "adv_embeddings": ("", "tiny"),
  "gradient_field": ("", "tiny"),
  "new_methods": ("", "tiny"),
  "reward_model": ("", "tiny"),
  "curry_dpo": ("", "tiny"),
  "kto_unpaired": ("", "tiny"),
  **dict.fromkeys(STUDY_FAMILIES, ("", "tiny")),
}


def _config(family="dpo", arg="tiny"):
  return importlib.import_module(f"configs.{family}").get_config(arg)


def _edited(edits, family="dpo", arg="tiny"):
  c = _config(family, arg)
  with c.unlocked():
    for field, value in edits.items():
      *parents, last = field.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[last] = value
  return c


def _main(args, **kw):
  return forked.run_module("experiments.main", args, **kw)


def test_options_import_without_jax():
  # The allowed values and the base config load in a process that never imports JAX.
  code = (
    "import sys\nfrom pofx import options\nfrom configs import common\nc = common.base_config()\n"
    "assert c.model.kernels in options.KERNEL_BACKENDS\n"
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


def test_the_library_reads_the_allowed_values_from_options():
  # One definition: the library's names are the very tuples of pofx.options.
  assert batching.LAYOUTS is options.LAYOUTS
  assert parallel.MODES is options.DEVICE_PARALLEL_MODES
  assert options.PARALLEL_MODES == ("single", "jit", "shard_map", "pmap")
  assert data_lib.FORMATS is options.FORMATS and data_lib.TRUNCATION is options.TRUNCATION
  assert data_lib.RANKING_MODES is options.RANKING_MODES
  assert pofx_backends.BACKENDS is options.KERNEL_BACKENDS


@pytest.mark.parametrize("family", FAMILIES)
def test_every_config_builds_locked_and_valid(family):
  for arg in ARGS[family]:
    c = _config(family, arg)
    validate.validate(c)
    assert c.is_locked
    assert c.model.kernels == "auto"
    assert "python -m experiments.main --config=configs/" in importlib.import_module(f"configs.{family}").__doc__
  with pytest.raises(ValueError, match="allowed"):
    _config(family, "no_such_arg")


def test_online_study_methods_validate_and_share_one_base(tmp_path):
  """Every run of the online study (configs/study_online.py) validates at both sizes, is evaluated
  last at its full length, and shares the seed's SFT base and data with the others."""
  from configs import study_online
  from experiments import provenance

  for arg in (None, "tiny"):
    cs = [study_online.get_config(arg), study_online.reward_model_config(arg, seed=2)]
    cs[0] = cs[0].copy_and_resolve_references()
    with cs[0].unlocked():
      cs[0].seed = 2
    for m in study_online.METHODS + (study_online.RM_METHOD,):
      c, points = study_online.method_config(m, arg, seed=2, reward_model_checkpoint=str(tmp_path))
      validate.validate(c)
      per = c.loop.steps_per_round if c.loop.kind != "offline" else 1
      assert points[-1] * per == c.train.steps and len(points) >= (1 if arg else 4), m
      cs.append(c)
    validate.validate(cs[1])
    assert len({provenance.sft_record(c).fingerprint for c in cs}) == 1
    assert len({provenance.data_record(c).fingerprint for c in cs}) == 1


def test_every_new_methods_member_validates():
  # A sweep member is validated when it runs, after the shared stages: check them all here.
  c = _config("new_methods")
  members = main_lib._sweep_members(c, "/nonexistent")
  assert len(members) == len(c.sweep) >= 4
  for item, member in members:
    assert member.train.loss == item["overrides"]["train.loss"]
    validate.validate(member)


@pytest.mark.parametrize(
  "hyper,message",
  [
    ({"alpha": -0.5}, r"config.train.loss_hyper: ilr_dpo: invalid alpha=-0.5; allowed: alpha >= 0"),
    ({"beta": 0.1}, r"config.train.loss_hyper: Loss 'ilr_dpo': missing required argument\(s\) \['alpha'\]"),
  ],
)
def test_a_loss_hyperparameter_value_the_loss_refuses_fails_validation(hyper, message):
  # The loss's own range checks run in validation (traced, nothing computed), before the SFT stage.
  with pytest.raises(ValueError, match=message):
    validate.validate(_edited({"train.loss": "ilr_dpo", "train.loss_hyper": hyper}))


def test_a_sweep_member_with_a_refused_value_fails_before_the_shared_stages(tmp_path):
  c = _config("new_methods")
  bad = {"label": "bad", "overrides": {"train.loss": "ilr_dpo", "train.loss_hyper": {"alpha": -1.0}}}
  with c.unlocked():
    c.sweep = tuple(c.sweep) + (bad,)
  with pytest.raises(ValueError, match=r"ilr_dpo: invalid alpha=-1.0; allowed: alpha >= 0"):
    main_lib.run_sweep(c, str(tmp_path), progress=False)
  assert os.listdir(tmp_path) == []  # no SFT base, no data


def test_options_without_a_value_are_none():
  c = common.base_config()
  assert c.train.reference.mrpo_alpha is None  # MRPO's adaptive weight per pair
  assert c.train.perturbation.c_min is None  # required for rwp
  assert c.data.max_prompt_len is None and c.data.max_completion_len is None  # no limit
  assert _config("rwp").train.perturbation.c_min == 1.0
  # A value of the field's type can be set on top of None.
  c.train.reference.mrpo_alpha, c.data.max_prompt_len = 0.25, 128
  assert (c.train.reference.mrpo_alpha, c.data.max_prompt_len) == (0.25, 128)


def test_sam_m_is_examples_per_ascent_and_sets_the_micro_batches():
  # Foret et al.'s m: examples per ascent. The program takes one ascent per micro-batch of m pairs.
  c = _config("sam", "tiny")  # batch_size 8
  assert c.train.perturbation.m is None and main_lib.micro_batches(c) == 1
  c.train.perturbation.m = 2
  validate.validate(c)
  assert main_lib.micro_batches(c) == 4
  c.train.grad_accum_steps = 2  # micro-batches of 4 pairs; m = 2 still gives 4 ascents of 2 pairs
  validate.validate(c)
  assert main_lib.micro_batches(c) == 4
  c.train.perturbation.m = 3
  with pytest.raises(ValueError, match=r"perturbation.m=3 is not allowed .* a divisor of the 4 pairs"):
    validate.validate(c)
  c.train.grad_accum_steps, c.train.perturbation.m = 1, 2
  c.train.parallel.mode = "jit"
  with pytest.raises(ValueError, match="perturbation.m=2 must be a multiple of the 4 data-parallel devices"):
    validate.validate(c, device_count=4)
  c.train.perturbation.m = 0
  with pytest.raises(ValueError, match="perturbation.m=0 is not allowed"):
    validate.validate(c)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("train.loss", "dpoo", r"config.train.loss='dpoo' is not allowed; allowed: \["),
    ("train.loss_hyper.beta", 0.0, "beta > 0"),
    ("train.reference.kind", "none", "needs a reference"),
    (
      "train.loss",
      "adaptive_dpo",
      r"reads the EMA companions .* only the image program builds; allowed: config.domain",
    ),
    ("train.reference.kind", "frozn", "config.train.reference.kind='frozn'"),
    ("train.reference.kind", "guiding", r"config.train.reference.guide_checkpoint='' is not a checkpoint"),
    ("model.preset", "llama9", r"config.model.preset='llama9' is not allowed; allowed: 'world' or a pofx.models"),
    ("train.reference.mrpo_alpha", -1.0, r"mrpo_alpha=-1.0 is not allowed; allowed: None \(adaptive per pair\)"),
    (
      "train.reference.cache_dir",
      "",
      r"config.train.reference.cache_dir='' is not allowed; allowed: None \(the run's own",
    ),
    ("train.reference.cache_dir", "/dev/null", r"cache_dir='/dev/null' is not allowed; allowed: None"),
    ("train.perturbation.kind", "sharp", "config.train.perturbation.kind"),
    ("train.perturbation.kind", "rwp", r"config.train.perturbation.c_min=None is not allowed with kind='rwp'"),
    ("train.steps", 0, "config.train.steps=0 is not allowed; allowed: an integer > 0"),
    (
      "data.layout",
      "zigzag",
      r"config.data.layout='zigzag' is not allowed; allowed: \['fused', 'prompt_shared', "
      r"'packed'\]",
    ),
    ("data.max_prompt_len", 0, r"config.data.max_prompt_len=0 is not allowed; allowed: an integer > 0"),
    (
      "data.max_unknown_token_rate",
      1.5,
      r"max_unknown_token_rate=1.5 is not allowed; allowed: a number in \[0.0, 1.0\]",
    ),
    ("data.max_unknown_token_rate", -0.1, r"max_unknown_token_rate=-0.1 is not allowed; allowed: a number in \[0.0"),
    ("train.on_nonfinite", "ignore", "config.train.on_nonfinite"),
    ("train.parallel.mode", "dp", r"allowed: \['single', 'jit', 'shard_map', 'pmap'\]"),
    ("train.parallel.mesh", "2y2", "config.train.parallel.mesh='2y2'"),
    ("data.attention", "flash", r"config.data.attention='flash' is not allowed; allowed: \['dense', 'block_sparse'\]"),
    ("data.scored", "some", r"config.data.scored='some' is not allowed; allowed: \['slots', 'compact'\]"),
    (
      "model.kernels",
      "cuda",
      r"config.model.kernels='cuda' is not allowed; allowed: \['auto', 'xla', 'cpu', 'gpu', "
      r"'tpu'\]",
    ),
  ],
)
def test_invalid_config_values_name_the_field(field, value, message):
  # (rows for the dropout, input-perturbation and trajectory-loss fields are in
  # test_new_training_fields_are_checked)
  with pytest.raises(ValueError, match=message):
    validate.validate(_edited({field: value}))


@pytest.mark.parametrize(
  "edits,message",
  [
    ({"train.dropout.rate": 1.0}, r"config.train.dropout.rate=1.0 is not allowed; allowed: a number in \[0, 1\)"),
    ({"train.dropout.samples": 0}, "config.train.dropout.samples=0 is not allowed; allowed: an integer > 0"),
    ({"train.input_perturbation.kind": "pixels"}, r"config.train.input_perturbation.kind='pixels' is not allowed"),
    ({"train.input_perturbation.radius": -0.1}, "config.train.input_perturbation.radius=-0.1 is not allowed"),
    ({"train.perturbation.kind": "saf", "train.perturbation.lam": -1.0}, "perturbation.lam=-1.0 is not allowed"),
    ({"train.perturbation.kind": "saf", "train.perturbation.minus_epochs": 0}, "perturbation.minus_epochs=0"),
    ({"train.perturbation.kind": "mesa", "train.perturbation.temperature": 0.0}, "perturbation.temperature=0.0"),
    ({"train.perturbation.kind": "mesa", "train.perturbation.decay": 1.5}, "perturbation.decay=1.5 is not allowed"),
    (
      {"train.perturbation.kind": "saf", "train.perturbation.start_epoch": 3, "train.perturbation.end_epoch": 3},
      r"end_epoch=3 is not allowed; allowed: None \(no end\) or an integer > start_epoch=3",
    ),
    ({"train.perturbation.kind": "mesa", "train.grad_accum_steps": 2}, "EMA would move once per micro-batch"),
  ],
)
def test_new_training_fields_are_checked(edits, message):
  with pytest.raises(ValueError, match=message):
    validate.validate(_edited(edits))


def test_block_sparse_needs_whole_blocks_per_row():
  base = {"data.attention": "block_sparse", "data.attention_block_size": 64, "data.seq_bucket": 48}
  with pytest.raises(ValueError, match=r"config.data.seq_bucket=48 is not allowed .* a multiple of 64"):
    validate.validate(_edited(base))
  with pytest.raises(ValueError, match="config.data.attention_block_size=0"):
    validate.validate(_edited({**base, "data.attention_block_size": 0}))
  validate.validate(_edited({**base, "data.attention_block_size": 16}))


def test_rules_of_processes_and_devices():
  fast_jit = _edited({"train.parallel.mode": "jit", "data.attention": "block_sparse", "data.attention_block_size": 16})
  validate.validate(fast_jit, process_count=1)
  with pytest.raises(ValueError, match="needs one process"):
    validate.validate(fast_jit, process_count=2)
  with pytest.raises(ValueError, match="mode='pmap' runs in one process"):
    validate.validate(_edited({"train.parallel.mode": "pmap"}), process_count=2)
  with pytest.raises(ValueError, match="config.sweep runs in one process"):
    validate.validate(_config("gpo"), process_count=2)
  # The batch of 8 pairs over the data-parallel devices: 4 divide it, 3 do not; a mesh needs its devices.
  validate.validate(_edited({"train.parallel.mode": "shard_map"}), device_count=4)
  validate.validate(_edited({"train.parallel.mode": "jit", "train.parallel.mesh": "2x2"}), device_count=4)
  with pytest.raises(ValueError, match=r"batch_size=8 must be a multiple of .* = 1 x 3"):
    validate.validate(_edited({"train.parallel.mode": "shard_map"}), device_count=3)
  with pytest.raises(ValueError, match=r"batch_size=8 must be a multiple of .* = 2 x 8"):
    validate.validate(_edited({"train.parallel.mode": "jit", "train.grad_accum_steps": 2}), device_count=8)
  with pytest.raises(ValueError, match=r"mesh='4x2' needs 8 devices; this run has 4"):
    validate.validate(_edited({"train.parallel.mode": "jit", "train.parallel.mesh": "4x2"}), device_count=4)


def test_a_kernel_backend_that_cannot_run_here_is_refused_with_the_reason():
  platform = jax.default_backend()
  for name in ("gpu", "tpu"):
    if name == platform:
      continue
    with pytest.raises(
      ValueError, match=rf"config.model.kernels='{name}' cannot run here: .+; runnable here: \['auto'"
    ):
      validate.validate(_edited({"model.kernels": name}))
  validate.validate(_edited({"model.kernels": "xla"}))
  if pofx_backends.unavailable_reason("cpu") is None:
    validate.validate(_edited({"model.kernels": "cpu"}))
    with pytest.raises(ValueError, match="model.kernels='cpu' runs with train.parallel.mode='single' only"):
      validate.validate(_edited({"model.kernels": "cpu", "train.parallel.mode": "shard_map"}))


@pytest.mark.parametrize(
  "typed,nearest",
  [
    ("train.lerning_rate", "train.optimizer.learning_rate"),
    ("trian.steps", "train.steps"),
    ("model.kernel", "model.kernels"),
    ("train.refrence.mrpo_alpa", "train.reference.mrpo_alpha"),
    ("data.seq_buckets", "data.seq_bucket"),
  ],
)
def test_a_misspelt_key_names_the_nearest_dotted_path(typed, nearest):
  c = _config()
  assert not validate.has_field(c, typed) and validate.has_field(c, nearest)
  assert validate.nearest_field(c, typed) == nearest
  assert f"did you mean config.{nearest}?" in validate.unknown_field_message(c, typed)


def test_a_replaced_field_says_what_replaced_it():
  msg = validate.unknown_field_message(_config(), "model.matmul")
  assert "config.model.kernels" in msg


def _one_line_error(out):
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert len(lines) == 1, out.stderr
  return lines[0]


def test_cli_misspelt_key_fails_with_one_line(tmp_path):
  out = _main(["--config=configs/dpo.py:tiny", f"--workdir={tmp_path}/w", "--config.train.lerning_rate=1e-3"])
  line = _one_line_error(out)
  assert "'train.lerning_rate'" in line and "config.train.optimizer.learning_rate" in line, line
  assert not os.path.exists(tmp_path / "w")


def test_cli_wrong_value_type_fails_with_one_line(tmp_path):
  out = _main(["--config=configs/dpo.py:tiny", f"--workdir={tmp_path}/w", "--config.train.steps=ten"])
  line = _one_line_error(out)
  assert "config.train.steps" in line and "int" in line, line


def test_cli_rejects_bad_values_before_any_compute(tmp_path):
  t = time.perf_counter()
  out = _main(["--config=configs/dpo.py:tiny", f"--workdir={tmp_path}/w", "--config.train.loss_hyper.beta=-1"])
  line = _one_line_error(out)
  assert "config.train.loss_hyper.beta=-1" in line
  assert not os.path.exists(tmp_path / "w")  # nothing was computed or written
  assert time.perf_counter() - t < 120


def test_auto_kernels_are_decided_once_per_workdir(tmp_path, monkeypatch):
  calls = []

  def resolve(name):
    calls.append(name)
    return "xla", {"requested": name, "rule": "stub", "seconds": {"xla": 1.0, "cpu": 2.0}}

  monkeypatch.setattr(pofx_backends, "resolve", resolve)
  c = _config()
  first = main_lib.settle_kernels(c, str(tmp_path))
  assert calls == ["auto"]
  assert {k: v for k, v in first.items() if k != "provenance"} == {
    "requested": "auto",
    "name": "xla",
    "details": {"requested": "auto", "rule": "stub", "seconds": {"xla": 1.0, "cpu": 2.0}},
  }
  # What the decision depended on (experiments/provenance.py): the request, the mode, the platform.
  assert first["provenance"]["fields"] == {"model.kernels": "auto", "train.parallel.mode": "single"}
  assert first["provenance"]["inputs"] == {"platform": jax.default_backend()}
  assert json.load(open(tmp_path / "kernels.json")) == first
  # A resumed run reads the record and does not decide again.
  assert main_lib.settle_kernels(c, str(tmp_path)) == first and calls == ["auto"]
  # A named backend is itself (resolved, recorded).
  named = main_lib.settle_kernels(_edited({"model.kernels": "xla"}), str(tmp_path / "named"))
  assert named["name"] == "xla" and calls == ["auto", "xla"]
  # A multi-device mode on the CPU decides "xla" without calibrating.
  if jax.default_backend() == "cpu":
    multi = main_lib.settle_kernels(_edited({"train.parallel.mode": "shard_map"}), str(tmp_path / "multi"))
    assert multi["name"] == "xla" and calls == ["auto", "xla"]


@pytest.mark.parametrize("loss", ["odpo", "mappo", "una"])
def test_score_losses_are_refused_on_the_world_before_any_compute(loss):
  # The world's scores are raw gold rewards under Bradley-Terry labels: outside ODPO's, MaPPO's and
  # UNA's score domains, so the combination is refused (it used to train a silently different method).
  c = _edited({"train.loss": loss, "train.loss_hyper": {}})
  with pytest.raises(
    ValueError, match=rf"config.train.loss='{loss}' reads per-pair scores, defined for .*allowed: data.source='files'"
  ):
    validate.validate(c)


class _Split:
  """A prepared dataset's training split, as `check_training_scores` reads it."""

  def __init__(self, s_w, s_l):
    self.rows = [
      {"score_chosen": np.float32(a), "score_rejected": np.float32(b), "example_id": np.int64(10 + i)}
      for i, (a, b) in enumerate(zip(s_w, s_l))
    ]

  def source(self, split):
    assert split == "train"
    return self.rows


def test_file_scores_are_checked_against_the_loss_domain_before_training():
  odpo, mappo = pofx.losses.spec("odpo"), pofx.losses.spec("mappo")
  main_lib.check_training_scores(odpo, {"beta": 0.1}, _Split([2.0, 0.5], [1.0, -3.0]))  # gaps > 0: fine
  with pytest.raises(
    ValueError, match=r"training split's scores do not fit loss 'odpo': 1 of 2 pairs .*\(example 11: \(0.5, 3\)\)"
  ):
    main_lib.check_training_scores(odpo, {}, _Split([2.0, 0.5], [1.0, 3.0]))
  with pytest.raises(ValueError, match=r"'odpo': 1 of 2 pairs .*score_rejected > 0"):
    main_lib.check_training_scores(odpo, {"ratio": True}, _Split([2.0, 0.5], [1.0, -3.0]))
  with pytest.raises(ValueError, match=r"'mappo': 2 of 2 pairs"):
    main_lib.check_training_scores(mappo, {}, _Split([2.0, 0.5], [1.0, float("nan")]))


def test_gamma_po_and_rpo_configs_use_the_published_runs_values():
  # gamma-PO: the authors' Llama-3-8B-Instruct run (training_configs/llama-3-8b-it-gmsimpo-beta10-gm0.4-tau10-...),
  # where the code's SimPOConfig defaults are beta 2.0, gamma/beta 0.25, tau 1.0.
  g = _config("gamma_po", "")
  assert g.train.loss == "gamma_simpo" and g.train.reference.kind == "none"
  assert dict(g.train.loss_hyper) == {"beta": 10.0, "gamma_beta_ratio": 0.4, "tau": 10.0}
  assert pofx.losses.spec("gamma_simpo").hyperparameters["tau"] == 1.0  # the code default it replaces
  # RPO: the zephyr-7b-beta recipe (eta 0.005, beta 0.01), where pofx.losses.rpo's beta defaults to 0.1.
  r = _config("rpo", "")
  assert r.train.loss == "rpo" and r.train.reference.kind == "cached"
  assert dict(r.train.loss_hyper) == {"eta": 0.005, "beta": 0.01, "sft_form": "sum"}
  assert pofx.losses.spec("rpo").hyperparameters["beta"] == 0.1
  for c in (g, r, _config("gamma_po"), _config("rpo")):
    validate.validate(c)


def test_predpo_round2_beta_is_its_own_field(tmp_path):
  c = _config("predpo")
  assert c.predpo.round2_beta == 0.1 and c.train.loss_hyper.beta == 0.1
  with c.unlocked():
    c.train.loss_hyper.beta, c.predpo.round2_beta = 0.2, 0.05  # as --config.predpo.round2_beta=0.05 would
  (r1, m1), (r2, m2) = main_lib._sweep_members(c, str(tmp_path))
  assert (r1["label"], m1.train.loss_hyper.beta, m1.train.reference.kind) == ("round1", 0.2, "cached")
  assert (r2["label"], m2.train.loss_hyper.beta, m2.train.reference.kind) == ("round2", 0.05, "guiding")
  assert m2.train.reference.guide_checkpoint == os.path.join(str(tmp_path), "sweep", "round1", "final_params")
  validate.validate(c)
  with c.unlocked():
    c.sweep = ({"label": "x", "overrides": {"train.loss_hyper.beta": "{config.predpo.round3_beta}"}},)
  with pytest.raises(
    ValueError, match=r"overrides\['train.loss_hyper.beta'\]=.*did you mean config.predpo.round2_beta"
  ):
    validate.validate(c)


def test_idealized_betas_default_to_the_authors_sweep_and_are_checked():
  assert tuple(_config().eval.idealized_betas) == (0.01, 0.1, 1.0, 5.0, 10.0)
  validate.validate(_edited({"eval.idealized_betas": ()}))
  with pytest.raises(ValueError, match=r"config.eval.idealized_betas=\(0.1, -1.0\) is not allowed; allowed: a tuple"):
    validate.validate(_edited({"eval.idealized_betas": (0.1, -1.0)}))


def test_trl_loss_takes_every_dpo_config_field_and_trls_refusals_come_before_any_compute():
  # As TRL's DPOConfig: beta with sft is accepted; WPO weighting with aot is refused by TRL, so here
  # at validation (it used to pass and fail only at the first training step).
  validate.validate(_edited({"train.loss": "trl.sft", "train.reference.kind": "none"}))
  validate.validate(_edited({"train.loss": "trl.sigmoid", "train.loss_hyper": {"beta": 0.1, "label_smoothing": 0.2}}))
  with pytest.raises(ValueError, match=r"not allowed with train.loss='trl.aot': trl.aot: invalid use_weighting=True"):
    validate.validate(_edited({"train.loss": "trl.aot", "train.loss_hyper": {"beta": 0.1, "use_weighting": True}}))


@pytest.mark.parametrize(
  "family, edits, message",
  [
    ("reward_model", {"stage": "rm"}, r"config.stage='rm' is not allowed; allowed: \['policy', 'reward_model'"),
    ("reward_model", {"reward_model.init": "base"}, r"reward_model.init='base' is not allowed; allowed: \['sft'"),
    ("reward_model", {"reward_model.steps": 0}, r"reward_model.steps=0 is not allowed"),
    ("reward_model", {"reward_model.center_coefficient": -0.1}, r"center_coefficient=-0.1 is not allowed"),
    ("curry_dpo", {"train.reference.kind": "synced"}, r"reference.kind='synced' is not allowed; allowed: \['cached'"),
    ("curry_dpo", {"curriculum.num_stages": 0}, r"curriculum.num_stages=0 is not allowed"),
    ("reward_model", {"train.parallel.mode": "jit"}, r"runs in one process on one device"),
    ("kto_unpaired", {"train.loss": "dpo"}, r"unpaired feedback trains config.train.loss='kto_unpaired' only"),
    ("kto_unpaired", {"data.feedback": "binary"}, r"data.feedback='binary' is not allowed; allowed: \['pairs'"),
    ("dpo", {"train.loss": "kto_unpaired", "train.loss_hyper": {}}, r"'kto_unpaired' needs unpaired data"),
  ],
)
def test_stage_and_feedback_fields_are_checked(family, edits, message):
  with pytest.raises(ValueError, match=message):
    validate.validate(_edited(edits, family))
