"""Workdir provenance (issue 21, item 1): a rerun never reports results of another config.

The fingerprint module (`pofx.fingerprints`): canonical hashing of config values and arrays, and
the fields each stage of the program reads (`experiments.provenance`), checked field by field
against the list of what each stage depends on, written out here by hand.

The program (`configs/dpo.py:tiny`, from the session's seed SFT base and data; subprocesses where
a test reads what the program prints, its stages in this process where it reads the workdir): a
partial workdir rerun with another loss and a finished one rerun with another beta are refused
before any compute, with one line naming the fields; changed sft.* / world.* fields are refused
naming both stages; an unchanged rerun reuses every stage; summary.json holds the config and its
fingerprint; a changed eval.* field recomputes only the evaluation.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest

from configs import dpo
from experiments import main as main_lib
from experiments import provenance
from pofx import fingerprints
from tests import forked
from tests.program import _seed_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/dpo.py:tiny", "--noprogress"]


def _main(work, *args):
  return forked.run_module("experiments.main", [*TINY, f"--workdir={work}", *args], timeout=600)


def _snapshot(work):
  """{relative path: bytes} of every file the workdir holds itself (not through its symlinks)."""
  out = {}
  for root, dirs, files in os.walk(work):
    dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    for name in files:
      p = os.path.join(root, name)
      if not os.path.islink(p):
        out[os.path.relpath(p, work)] = open(p, "rb").read()
  return out


def _refusal_line(out):
  """The program's one-line refusal: exit status 2, no table, one `experiments.main:` line."""
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stdout == ""
  lines = [line for line in out.stderr.splitlines() if line.startswith("experiments.main:")]
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "Use a new --workdir, or --overwrite" in lines[0] and "Nothing was computed" in lines[0]
  return lines[0]


# ------------------------------------------------------------------------------------------------
# The fingerprint module


def test_of_values_is_sha256_of_sorted_compact_json_whatever_the_key_order():
  a = {"b": {"y": 2, "x": [1, 2.5]}, "a": "s"}
  b = {"a": "s", "b": {"x": [1, 2.5], "y": 2}}
  expected = hashlib.sha256(b'{"a":"s","b":{"x":[1,2.5],"y":2}}').hexdigest()
  assert fingerprints.of_values(a) == fingerprints.of_values(b) == expected
  assert fingerprints.of_values({**a, "a": "t"}) != expected
  assert fingerprints.of_values({"v": 1}) != fingerprints.of_values({"v": 1.0})  # int and float fields differ


def test_of_arrays_hashes_paths_dtypes_shapes_and_bytes():
  tree = {"w": np.arange(3, dtype=np.float32), "b": np.zeros((1,), np.int32)}
  h = hashlib.sha256()
  for path, a in (("['b']", tree["b"]), ("['w']", tree["w"])):  # pytree order: sorted dict keys
    h.update(path.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
  assert fingerprints.of_arrays(tree) == fingerprints.of_arrays(dict(reversed(tree.items()))) == h.hexdigest()
  for changed in (
    {**tree, "w": np.array([0, 1, 3], np.float32)},
    {**tree, "w": np.arange(3, dtype=np.float64)},
    {**tree, "w": np.arange(3, dtype=np.float32).reshape(3, 1)},
    {**tree, "v": tree.pop("w")},
  ):
    assert fingerprints.of_arrays(changed) != h.hexdigest()


def test_fields_flatten_sub_configs_and_mark_absent_names():
  c = dpo.get_config("tiny")
  got = fingerprints.fields(c, ("train.loss_hyper", "sft.steps", "train.nope"))
  assert got == {"train.loss_hyper.beta": 0.1, "sft.steps": 20, "train.nope": fingerprints.MISSING}
  assert fingerprints.differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: 2 -> 3", "c: '<absent>' -> 4"]


# What each stage reads (the module docstring of experiments/provenance.py), written out by hand.
SFT_READS = {"seed", "data.source", "model.preset", "model.dtype", "model.remat"}
SFT_READS |= {f"world.{k}" for k in dpo.get_config("tiny").world} | {
  f"sft.{k}" for k in ("num_demos", "steps", "batch_size", "learning_rate")
}
DATA_READS = SFT_READS | {"data.num_prompts", "data.samples_per_prompt", "data.num_eval_pairs"}  # + the SFT base
TRAIN_READS = DATA_READS | {
  "model.init_checkpoint",
  "data.layout",
  "data.seq_bucket",
  "data.completion_bucket",
  "data.attention",
  "data.scored",
  "train.loss",
  "train.loss_hyper.beta",
  "train.batch_size",
  "train.grad_accum_steps",
  "train.optimizer.name",
  "train.optimizer.learning_rate",
  "train.optimizer.warmup_steps",
  "train.optimizer.weight_decay",
  "train.optimizer.grad_clip",
  "train.parallel.mode",
  "train.parallel.mesh",
  "train.reference.kind",  # cached: no other reference field
  "train.perturbation.kind",  # none: no other perturbation field
  "train.dropout.rate",  # recorded (with train.dropout.samples) when it is not 0
  "train.lora.enabled",  # recorded (with rank, alpha, targets, dropout) when True
  "train.input_perturbation.kind",  # recorded (with its radius) when it is not "none"
}
EVAL_READS = (
  TRAIN_READS
  | {"train.steps"}
  | {f"eval.{k}" for k in ("num_prompts", "samples_per_prompt", "temperature", "top_k", "idealized_betas")}
)


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _changed(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 + 1
  if isinstance(value, str):
    return value + "x"
  if isinstance(value, (tuple, list)):
    return tuple(value) + (7.0,)
  return 7  # a placeholder (None) set


def _stage_fps(c):
  train = provenance.train_record(c, kernels="xla").fingerprint
  return {
    "sft": provenance.sft_record(c).fingerprint,
    "data": provenance.data_record(c).fingerprint,
    "train": train,
    "eval": provenance.eval_record(c, train).fingerprint,
  }


def test_each_stage_fingerprint_changes_with_exactly_the_fields_it_reads():
  base = dpo.get_config("tiny")
  before = _stage_fps(base)
  expected = {"sft": SFT_READS, "data": DATA_READS, "train": TRAIN_READS, "eval": EVAL_READS}
  names = [n for n, v in _leaves(base.to_dict()) if n != "sweep"]
  assert len(names) > 50
  for name in names:
    c = dpo.get_config("tiny")
    with c.unlocked():
      try:
        main_lib._set(c, name, _changed(fingerprints.fields(c, (name,))[name]))
      except TypeError:  # a string placeholder (None) set
        main_lib._set(c, name, "x")
    after = _stage_fps(c)
    for stage, reads in expected.items():
      assert (after[stage] != before[stage]) == (name in reads), (stage, name)
  # The inputs: the resolved kernel backend is a training input (not an SFT or data one).
  assert provenance.train_record(base, kernels="cpu").fingerprint != before["train"]


def test_kind_specific_fields_count_only_for_their_kind():
  def train_fp(**sets):
    c = dpo.get_config("tiny")
    with c.unlocked():
      for k, v in sets.items():
        main_lib._set(c, k.replace("__", "."), v)
    return provenance.train_record(c, kernels="xla").fingerprint

  kinds = {"train__reference__kind": "synced"}
  assert train_fp(**kinds) != train_fp(**kinds, train__reference__tau=3)  # synced reads tau ...
  assert train_fp() == train_fp(train__reference__tau=3)  # ... cached does not
  # Fields added later count only when set, so earlier workdirs keep their records.
  assert train_fp(train__perturbation__kind="sam") != train_fp(
    train__perturbation__kind="sam", train__perturbation__m=2
  )
  assert train_fp() == train_fp(train__perturbation__m=2)
  assert train_fp(train__dropout__rate=0.1) != train_fp(train__dropout__rate=0.1, train__dropout__samples=3)
  assert train_fp() == train_fp(train__dropout__samples=3)
  lora_on = {"train__lora__enabled": True, "train__reference__kind": "adapters_off"}
  assert train_fp(**lora_on) != train_fp(**lora_on, train__lora__rank=4)
  assert train_fp(**lora_on) == train_fp(**lora_on, train__lora__export_merged=True)
  assert train_fp() == train_fp(train__lora__rank=4)
  # LoRA dropout trains with train.dropout.samples masks per step: recorded then, and only then.
  lora_drop = {**lora_on, "train__lora__dropout": 0.1}
  assert train_fp(**lora_drop) != train_fp(**lora_drop, train__dropout__samples=3)
  assert train_fp(**lora_on) == train_fp(**lora_on, train__dropout__samples=3)
  emb = {"train__input_perturbation__kind": "embeddings"}
  assert train_fp(**emb) != train_fp(**emb, train__input_perturbation__radius=0.2)
  assert train_fp() == train_fp(train__input_perturbation__radius=0.2)
  saf = {"train__perturbation__kind": "saf"}
  assert train_fp(**saf) != train_fp(**saf, train__perturbation__lam=0.5)
  assert train_fp() == train_fp(train__perturbation__lam=0.5)
  sparse = {"data__attention": "block_sparse"}
  assert train_fp(**sparse) != train_fp(**sparse, data__attention_block_size=16)
  assert train_fp() == train_fp(data__attention_block_size=16)
  # The kernel record depends on the requested backend and the parallel mode.
  c = dpo.get_config("tiny")
  k0 = provenance.kernels_record(c, "cpu").fingerprint
  with c.unlocked():
    c.train.parallel.mode = "jit"
  assert provenance.kernels_record(c, "cpu").fingerprint != k0


# ------------------------------------------------------------------------------------------------
# The program


@pytest.fixture(scope="module")
def partial(seed_dir, tmp_path_factory):
  """configs/dpo.py:tiny stopped after step 2 of 4 (checkpoint at step 2, no final parameters)."""
  work = tmp_path_factory.mktemp("partial") / "w"
  _seed_from(seed_dir, work)
  out = _main(work, "--stop_after_steps=2")
  assert out.returncode == 0 and "stopped after step 2" in out.stdout, out.stderr[-2000:]
  return work


@pytest.fixture(scope="module")
def finished(partial, tmp_path_factory):
  """A copy of `partial` run on to the end (an unchanged rerun of a partial workdir continues), in
  this process (the stages the program runs, `main_lib.run_one`, with its stderr captured)."""
  work = tmp_path_factory.mktemp("finished") / "w"
  shutil.copytree(partial, work, symlinks=True)
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    summary, _ = main_lib.run_one(dpo.get_config("tiny"), str(work), progress=False)
  assert summary is not None and "train: resumed from step 2" in err.getvalue(), err.getvalue()[-2000:]
  return work


def test_partial_workdir_rerun_with_another_loss_is_refused_not_continued(partial):
  before = _snapshot(partial)
  line = _refusal_line(_main(partial, "--config.train.loss=ipo"))
  assert "train (checkpoints): train.loss: 'dpo' -> 'ipo'" in line
  assert _snapshot(partial) == before  # the DPO checkpoint was neither continued nor touched


def test_finished_workdir_rerun_with_another_beta_is_refused_not_the_old_table(finished):
  before = _snapshot(finished)
  line = _refusal_line(_main(finished, "--config.train.loss_hyper.beta=0.5"))
  assert "train.loss_hyper.beta: 0.1 -> 0.5" in line
  assert _snapshot(finished) == before


def test_unchanged_rerun_of_a_finished_workdir_reuses_every_stage(finished):
  before = _snapshot(finished)
  out = _main(finished)
  assert out.returncode == 0, out.stderr[-2000:]
  for reused in ("sft: reusing", "train: resumed from step 4", "eval: reusing"):
    assert reused in out.stderr
  for computed in ("sft: 20 steps", "data: 128 train", "recomputing"):
    assert computed not in out.stderr
  assert _snapshot(finished) == before  # nothing written: no training, no evaluation
  summary = json.loads(before["summary.json"])
  assert f"{summary['kl_to_base']:.4f}" in out.stdout  # the table of this config's results


def test_summary_holds_the_resolved_config_its_fingerprint_and_the_stage_records(finished):
  summary = json.load(open(finished / "summary.json"))
  config = dpo.get_config("tiny").to_dict()
  assert summary["config"] == json.loads(json.dumps(config))
  canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
  assert summary["config_fingerprint"] == hashlib.sha256(canonical).hexdigest()
  records = summary["provenance"]
  assert set(records) == {"sft", "data", "train", "eval"}
  assert records["train"]["fields"]["train.loss_hyper.beta"] == 0.1 and records["train"]["inputs"]["kernels"]
  assert records["eval"]["fields"]["train.steps"] == 4
  assert records["eval"]["inputs"]["train"] == records["train"]["fingerprint"]
  assert records["data"]["inputs"]["sft"] == records["sft"]["fingerprint"]
  # The stage outputs carry the same records (the shared seed's SFT base and data included).
  assert json.load(open(finished / "sft_params" / "provenance.json"))["fingerprint"] == records["sft"]["fingerprint"]
  assert json.load(open(finished / "data" / "provenance.json"))["fingerprint"] == records["data"]["fingerprint"]
  final = json.load(open(finished / "final_params" / "provenance.json"))
  assert final["fingerprint"] == records["train"]["fingerprint"] and final["step"] == 4


def test_changed_sft_and_world_fields_are_refused_naming_both_stages(finished):
  before = _snapshot(finished)
  c = dpo.get_config("tiny")
  with c.unlocked():
    c.sft.steps, c.world.label_scale = 21, 3.0
  with pytest.raises(provenance.Refused) as e:
    main_lib.run_one(c, str(finished), progress=False)
  msg = str(e.value)
  assert "sft (sft_params): sft.steps: 20 -> 21; world.label_scale: 2.0 -> 3.0" in msg
  assert "data (data): world.label_scale: 2.0 -> 3.0; input sft:" in msg
  assert "train (checkpoints): input base:" in msg
  # Fewer steps than the workdir reached: refused too (a run cannot be shortened).
  c = dpo.get_config("tiny")
  with c.unlocked():
    c.train.steps = 2
  with pytest.raises(provenance.Refused, match=r"checkpoints reach step 4, beyond train.steps=2"):
    main_lib.run_one(c, str(finished), progress=False)
  assert _snapshot(finished) == before


def test_changed_eval_field_recomputes_the_evaluation_only(finished, tmp_path, capfd):
  work = tmp_path / "w"
  shutil.copytree(finished, work, symlinks=True)
  metrics = (work / "metrics.jsonl").read_bytes()
  c = dpo.get_config("tiny")
  with c.unlocked():
    c.eval.num_prompts = 8
  summary, _ = main_lib.run_one(c, str(work), progress=False)
  err = capfd.readouterr().err
  assert "eval: recomputing" in err and "eval.num_prompts: 16 -> 8" in err
  assert "train: resumed from step 4" in err and (work / "metrics.jsonl").read_bytes() == metrics
  assert json.load(open(work / "summary.json")) == json.loads(json.dumps(summary))
  assert summary["config"]["eval"]["num_prompts"] == 8 and summary["num_comparisons"] == 8


def test_overwrite_recomputes_the_changed_training_and_keeps_the_shared_base(finished, seed_dir, tmp_path, capfd):
  work = tmp_path / "w"
  shutil.copytree(finished, work, symlinks=True)
  seed_before = _snapshot(seed_dir)
  c = dpo.get_config("tiny")
  with c.unlocked():
    c.train.loss_hyper.beta = 0.5
  summary, _ = main_lib.run_one(c, str(work), progress=False, overwrite=True)
  err = capfd.readouterr().err
  assert "train: recomputing (--overwrite): train.loss_hyper.beta: 0.1 -> 0.5" in err
  assert "resumed from step" not in err and "sft: reusing" in err  # trained afresh on the same base
  assert summary["provenance"]["train"]["fields"]["train.loss_hyper.beta"] == 0.5
  assert json.load(open(work / "final_params" / "provenance.json"))["fields"]["train.loss_hyper.beta"] == 0.5
  steps = [json.loads(line)["step"] for line in open(work / "metrics.jsonl")]
  assert steps == [2, 4]  # the old run's metrics went with its checkpoints
  assert os.path.islink(work / "sft_params") and _snapshot(seed_dir) == seed_before  # the shared base is kept


def test_raised_train_steps_continue_the_finished_run_and_redo_the_evaluation(finished, tmp_path, capfd):
  work = tmp_path / "w"
  shutil.copytree(finished, work, symlinks=True)
  c = dpo.get_config("tiny")
  with c.unlocked():
    c.train.steps = 6
  summary, _ = main_lib.run_one(c, str(work), progress=False)
  err = capfd.readouterr().err
  assert "train: resumed from step 4" in err and "continuing to train.steps=6" in err
  assert "eval: recomputing" in err and "train.steps: 4 -> 6" in err
  assert [json.loads(line)["step"] for line in open(work / "metrics.jsonl")] == [2, 4, 6]
  assert json.load(open(work / "final_params" / "provenance.json"))["step"] == 6
  assert summary["provenance"]["eval"]["fields"]["train.steps"] == 6


def test_a_guide_made_in_this_sweep_is_known_before_it_is_made(tmp_path):
  """A Pre-DPO round 2 is checked before round 1 runs: the identity round 1's final parameters
  will have (`final_identity`) is the one read back from them once written (`directory_identity`)."""
  c = dpo.get_config("tiny")
  final = tmp_path / "final_params"
  provenance.write(str(final), provenance.train_record(c, kernels="xla"), step=c.train.steps)
  assert provenance.directory_identity(str(final)) == provenance.final_identity(c, "xla")
  with c.unlocked():
    c.train.steps = 6  # a longer round 1 is another guide
  assert provenance.directory_identity(str(final)) != provenance.final_identity(c, "xla")
