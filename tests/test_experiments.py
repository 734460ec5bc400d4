"""The training program: every config family trains on `:tiny`; a run writes its summary, metrics,
plots and kernel-backend record; the CPU kernels end where XLA ends; parallel and multi-process
runs equal the single-device run. The config checks are in tests/test_configs.py; kills, resumes,
damaged checkpoints and workdir faults are in tests/test_reliability.py.

Every run here starts from one shared SFT base and dataset (`seed_dir` in conftest.py, built once
per session): the program reuses a workdir's `sft_params`, `data` and `kernels.json` when they
are present and their provenance records match the config (tests/test_provenance.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import pofx_backends
from configs import validate
from experiments import main as main_lib
from pofx.optimizers import FusedOptimizer
from tests.conftest import shared_across_workers
from tests.data import ids, vocab
from tests.program import ROOT, _config, _final_params, _main, _seed_from


@pytest.fixture(scope="module")
def tiny_run(seed_dir, tmp_path_factory):
  """One real CLI run of configs/dpo.py:tiny from the seed's SFT base, data and kernel-backend
  record (the record the program decided, by calibration, when it built the seed: kept, as a
  resumed run keeps it; the calibration itself is tested in tests/backends/test_backends.py)."""
  work = tmp_path_factory.mktemp("dpo_tiny")
  _seed_from(seed_dir, work)
  out = _main(["--config=configs/dpo.py:tiny", f"--workdir={work}", "--noprogress"])
  assert out.returncode == 0, out.stderr[-3000:]
  return work, out.stdout + out.stderr


def test_tiny_dpo_run_writes_summary_table_metrics_and_plots(tiny_run):
  work, output = tiny_run
  summary = json.load(open(work / "summary.json"))
  for key in (
    "gold_reward_base",
    "gold_reward_policy",
    "win_rate_vs_base",
    "win_rate_ci95",
    "kl_to_base",
    "reward_accuracy",
    "ranking_accuracy",
    "mean_length_base",
    "mean_length_policy",
    "pairs_per_second",
  ):
    assert key in summary, key
    assert key in output, key
  assert "sft: reusing" in output  # the shared base, not trained again
  low, high = summary["win_rate_ci95"]
  assert 0.0 <= low <= summary["win_rate_vs_base"] <= high <= 1.0
  recs = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in recs if r["stage"] == "train"] == [2, 4]
  assert os.listdir(work / "tensorboard" / "train")
  for png in ("training_curves.png", "reward_vs_kl.png"):
    assert (work / png).stat().st_size > 1000


def test_tiny_dpo_run_records_its_kernel_backend_and_start_up(tiny_run, seed_dir):
  work, output = tiny_run
  summary = json.load(open(work / "summary.json"))
  record = json.load(open(work / "kernels.json"))
  assert record == json.load(open(seed_dir / "kernels.json"))  # kept as the seed's build decided it
  assert f"kernels: reusing the record in {work / 'kernels.json'}" in output
  assert record["requested"] == "auto" and record["name"] in ("xla", "cpu", "gpu", "tpu")
  assert record["details"]["rule"]
  assert summary["kernels"] == record["name"] and summary["kernels_record"] == record
  assert f"kernels: {record['name']}" in output
  started = summary["startup"]
  assert started["host_memory"] in ("retain", "default") and started["detail"] in output
  if jax.default_backend() == "cpu" and started["platform"] == "cpu":
    assert started["host_memory"] == "retain"  # glibc keeps freed memory by default on CPU


@pytest.mark.parametrize(
  "family,arg",
  [
    ("simpo", "tiny"),
    ("ipo", "sum,tiny"),
    ("mrpo", "tiny"),
    ("trdpo", "tiny"),
    ("sam", "tiny"),
    ("awp", "tiny"),
    ("rwp", "tiny"),
    ("beta_dpo", "tiny"),
    ("predpo", "tiny"),
    ("gpo", "tiny"),
  ],
)
def test_every_family_runs_on_tiny(seed_dir, tmp_path, family, arg):
  work = tmp_path / family
  _seed_from(seed_dir, work)
  c = _config(family, arg)
  if family == "gpo":  # the sweep's mechanics and chart need two members; every f is tested in test_gpo.py
    with c.unlocked():
      c.sweep = c.sweep[:2]
  validate.validate(c)
  if c.sweep:
    summaries, chart = main_lib.run_sweep(c, str(work), progress=False)
    assert len(summaries) == len(c.sweep) and os.path.getsize(chart) > 1000
    s = next(iter(summaries.values()))
  else:
    s, _ = main_lib.run_one(c, str(work), progress=False)
  assert np.isfinite(s["gold_reward_policy"]) and np.isfinite(s["kl_to_base"])
  assert s["kernels"] == json.load(open(seed_dir / "kernels.json"))["name"]  # the record is reused


def test_new_methods_sweep_trains_every_member_on_tiny(seed_dir, tmp_path):
  # configs/new_methods.py as a user runs it: the session's SFT base and data are reused, then
  # every member (new losses; SAM with m-sharpness, SAF with the gradient-field diagnostic, MESA,
  # multi-sample dropout, adversarial embeddings) trains and is evaluated, and the chart has them all.
  work = tmp_path / "new_methods"
  _seed_from(seed_dir, work)
  out = _main(["--config=configs/new_methods.py:tiny", f"--workdir={work}", "--noprogress"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "sft: reusing" in out.stderr and "[pofx] data:" not in out.stderr  # one shared SFT base and dataset
  c = _config("new_methods")
  summaries = json.load(open(work / "sweep_summary.json"))
  assert list(summaries) == [item["label"] for item in c.sweep]
  for item in c.sweep:
    s = summaries[item["label"]]
    assert s["config"]["train"]["loss"] == item["overrides"]["train.loss"]
    assert s["config"]["train"]["loss_hyper"] == dict(item["overrides"]["train.loss_hyper"])
    assert np.isfinite(s["gold_reward_policy"]) and np.isfinite(s["kl_to_base"])
    # trained: the policy moved off the SFT base on the training pairs
    assert abs(s["train_chosen_logratio"]) + abs(s["train_rejected_logratio"]) > 0, item["label"]
    recs = [json.loads(line) for line in open(work / "sweep" / item["label"] / "metrics.jsonl")]
    train = [r for r in recs if r["stage"] == "train"]
    assert [r["step"] for r in train] == [2, 4] and all(np.isfinite(r["loss"]) for r in train)
    # `:tiny` asks for no per-member chart (sweep_member_charts=False)
    assert not (work / "sweep" / item["label"] / "training_curves.png").exists()
  assert (work / "reward_vs_kl.png").stat().st_size > 1000
  # the diagnostic of the DPO loss (SAF member): dl/d log pi_w = -dl/d log pi_l at every logged step
  rows = [r for r in _metrics(work / "sweep" / "saf" / "metrics.jsonl") if "gradient_field/ratio" in r]
  assert rows and all(abs(r["gradient_field/ratio"] - 1.0) < 1e-4 for r in rows)
  assert all(r["gradient_field/chosen"] < 0 < r["gradient_field/rejected"] for r in rows)
  # SAM's m is a recorded training input of that member (m = 4 of the 8 pairs per ascent)
  fields = json.load(open(work / "sweep" / "sam_m" / "train_provenance.json"))["fields"]
  assert fields["train.perturbation.m"] == 4 and fields["train.perturbation.kind"] == "sam", fields


@pytest.mark.skipif(
  pofx_backends.unavailable_reason("cpu") is not None, reason=f"{pofx_backends.unavailable_reason('cpu')}"
)
def test_cpu_kernels_run_equals_the_xla_run(seed_dir, tmp_path, capfd):
  # config.model.kernels reaches the model and the LM head: the world model (head dimension 16)
  # with block-sparse attention of 64-token blocks, trained with the CPU backend (the fused
  # attention kernels, every product by a BLAS), ends where the XLA run ends.
  # The two runs share a reference cache folder (train.reference.cache_dir): the same reference,
  # data and model, so the first writes the entry and the second reads it.
  params, cache = {}, tmp_path / "reference_cache"
  for name in ("xla", "cpu"):
    work = tmp_path / name
    _seed_from(seed_dir, work, names=("sft_params", "data"))
    c = _config("dpo")
    with c.unlocked():
      c.model.kernels = name
      c.data.attention, c.data.attention_block_size, c.data.seq_bucket = "block_sparse", 64, 64
      c.train.reference.cache_dir = str(cache)
    validate.validate(c)
    with mock.patch.object(main_lib, "_optimizer", wraps=main_lib._optimizer) as make_optimizer:
      s, _ = main_lib.run_one(c, str(work), progress=False)
    # With the CPU kernels the optimizer is the backend's fused AdamW (one native kernel in place).
    assert make_optimizer.call_args.kwargs["kernels"] == name, make_optimizer.call_args
    assert isinstance(main_lib._optimizer(c, kernels=name)[0], FusedOptimizer) == (name == "cpu")
    assert s["kernels"] == name and np.isfinite(s["gold_reward_policy"])
    params[name] = [np.asarray(x) for x in jax.tree.leaves(_final_params(work))]
    assert not os.path.exists(work / "reference_cache")
    (entry,) = os.listdir(cache)
    log = capfd.readouterr().err
    assert f"reference: {'wrote' if name == 'xla' else 'read'} {cache / entry} (shared cache)" in log, log[-2000:]
  for a, b in zip(params["cpu"], params["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The CPU kernels did run: their float32 summation order differs from XLA's in the last bits.
  assert any(not np.array_equal(a, b) for a, b in zip(params["cpu"], params["xla"]))


@pytest.fixture(scope="module")
def parallel_runs(seed_dir, tmp_path_factory):
  """The runs of tests/experiments_parallel_check.py from the seed (once per session, also under
  pytest-xdist): (its JSON report, its root folder, which holds `single/final_params`)."""

  def build(root):
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "experiments_parallel_check.py"), str(root), str(seed_dir)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (root / "report.json").write_text(out.stdout.strip().splitlines()[-1])

  root = shared_across_workers(tmp_path_factory, "experiments_parallel_check", build)
  return json.loads((root / "report.json").read_text()), root


def test_parallel_modes_of_the_program_equal_the_single_device_run(parallel_runs):
  """configs/dpo.py:tiny under mode jit (2 data x 2 fsdp), shard_map and pmap on 4 simulated
  devices ends with the single-device parameters, dense (every mode) and with block-sparse
  attention and compact scored tokens (`*_fast`: jit and shard_map; pmap takes shard_map's
  per-device batches and step), with 2 accumulated micro-batches in one dense and one fast run:
  every run against the one dense single-device run."""
  res, _ = parallel_runs
  assert res["devices"] == 4
  assert len(res["runs"]) == 6, sorted(res["runs"])
  for name, r in res["runs"].items():
    assert r["moved"] > 1e-3, (name, r)  # training changed the parameters
    assert r["max_abs_diff"] < 1e-5, (name, r)  # and every mode agrees with one device


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_metric_writer_loads_tensorboardx_without_torch(tmp_path):
  # tensorboardX imports PyTorch when it is installed; the program's writer keeps it out (a
  # costly import that every run would pay) and leaves `import torch` working afterwards.
  code = (
    "import sys, importlib\nfrom experiments import metrics\n"
    f"w = metrics.MetricWriter({str(tmp_path)!r}, 'train', 1, progress=False)\n"
    "w.write(1, {'loss': 0.5})\nw.close()\n"
    "print('torch' in sys.modules, importlib.util.find_spec('torch') is not None)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False", "True"]
  (events,) = os.listdir(tmp_path / "tensorboard" / "train")
  assert (tmp_path / "tensorboard" / "train" / events).stat().st_size > 0


def test_own_files_run_end_to_end(tmp_path):
  """configs/dpo_files.py:tiny: TRL-format JSONL + a local tokenizer -> TFDS -> training -> pair metrics."""
  s, _ = main_lib.run_one(_config("dpo_files", "tiny"), str(tmp_path / "files"), progress=False)
  assert s["data_pairs"]["train"] == 200 and s["data_pairs"]["eval"] == 200
  assert 0.0 <= s["reward_accuracy"] <= 1.0 and s["num_pairs"] == 200
  assert (tmp_path / "files" / "final_params").exists()


def _pair_tokens(rec):
  """(tokens, unknown tokens) of a standard record as written, by the independent word-level
  tokenisation of tests/data (BOS + prompt, each completion's tail + EOS)."""
  p = ids(rec["prompt"])
  pair = [[2] + p] + [ids(rec["prompt"] + rec[k])[len(p) :] + [3] for k in ("chosen", "rejected")]
  return sum(map(len, pair)), sum(x.count(vocab()["<unk>"]) for x in pair)


def test_bad_record_fails_with_file_and_line_or_is_skipped_and_counted(tmp_path):
  """One workdir, as a user would go: a bad record stops the run (file:line); with skip, an
  unknown-token rate above the limit stops it (split, rate, limit); without the limit it trains on
  the prepared data and reports the skipped records and the rate (summary.json and the table)."""
  good = open(_config("dpo_files", "tiny").data.files, "rb").read().splitlines()[:40]
  missing = b'{"prompt": "w1 w2", "chosen": "w3"}'
  latin1 = b'{"prompt": "Question \xff :", "chosen": " blue", "rejected": " red"}'
  oov = {"prompt": "Question : What colour is the zebra ? Answer :", "chosen": " The zebra is blue ."}
  oov = json.dumps({**oov, "rejected": " The zorp is red ."}).encode()  # zebra x 2 + zorp: 3 unknown tokens
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(
    b"\n".join(good[:20] + [missing] + good[20:30] + [latin1, oov] + good[30:]) + b"\n"
  )  # lines 21, 32, 33
  work = str(tmp_path / "work")
  c = _config("dpo_files", "tiny")
  with c.unlocked():
    c.data.files, c.data.eval_files = str(bad), ""
  with pytest.raises(ValueError, match=r"bad.jsonl:21: bad record \(missing_field\)"):
    main_lib.run_one(c, work, progress=False)
  assert not (tmp_path / "work" / "checkpoints").exists()  # failed before any training
  counts = [_pair_tokens(json.loads(line)) for line in good + [oov]]
  assert sum(u for _, u in counts) == 3
  rate = 3 / sum(n for n, _ in counts)
  with c.unlocked():
    c.data.on_bad_record, c.data.max_unknown_token_rate = "skip", 0.001
  with pytest.raises(
    ValueError, match=rf"^split 'train': unknown-token rate {rate:.4f} \(3 of \d+ tokens.* above max_unk"
  ):
    main_lib.run_one(c, work, progress=False, overwrite=True)  # on_bad_record changed: the data stage again
  assert not (tmp_path / "work" / "checkpoints").exists()  # refused before any training
  with c.unlocked():
    c.data.max_unknown_token_rate = None
  s, _ = main_lib.run_one(c, work, progress=False)
  assert s["data_skipped"]["train"] == {"missing_field": 1, "invalid_utf8": 1} and s["data_pairs"]["train"] == 41
  assert s["data_unknown_token_rate"] == {"train": pytest.approx(rate)}
  assert json.load(open(tmp_path / "work" / "summary.json"))["data_unknown_token_rate"] == s["data_unknown_token_rate"]
  [row] = [r for r in main_lib._table(s).splitlines() if "unknown_token_rate[train]" in r]  # the printed table
  assert row.rstrip(" |").endswith(f"{rate:.4f}")


def test_unusable_data_file_fails_in_one_line_before_training(tmp_path):
  """A user's file whose only record is not UTF-8, with on_bad_record=skip: one line naming the
  file, exit status 2, no training, and none of TFDS's download lines or absl warnings."""
  bad = tmp_path / "latin1.jsonl"
  bad.write_bytes(b'{"prompt": "Question :", "chosen": " caf\xe9", "rejected": " red"}\n')
  work = tmp_path / "work"
  args = ["--config=configs/dpo_files.py:tiny", f"--config.data.files={bad}", "--config.data.eval_files="]
  out = _main([*args, "--config.data.on_bad_record=skip", "--config.model.kernels=xla", f"--workdir={work}"])
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.splitlines()[-1] == (
    f"experiments.main: no usable records in {bad}: every record was skipped (1 read; skipped invalid_utf8: 1)."
  )
  assert "Traceback" not in out.stderr and not (work / "checkpoints").exists()
  assert "Downloading" not in out.stdout + out.stderr and "WARNING" not in out.stdout + out.stderr


def test_two_processes_of_the_program_equal_the_single_process_run(seed_dir, parallel_runs, tmp_path):
  """launch_local: 2 processes x 2 CPU devices run experiments.main (mode jit on a 2 data x 2 fsdp
  mesh, each process feeding its shard of the data), stop after step 2 (checkpoint written by
  both), resume (restored by both) and finish with the parameters of a single-process run: the
  single-device run of tests/experiments_parallel_check.py, the same config (its `config()`: SGD,
  XLA kernels, the tiny config's 4 steps) from the same seed."""
  args = [
    "--config=configs/dpo.py:tiny",
    "--noprogress",
    "--config.train.optimizer.name=sgd",
    "--config.train.optimizer.grad_clip=0.0",
    "--config.train.optimizer.learning_rate=0.5",
    "--config.train.steps=4",
    "--config.model.kernels=xla",
  ]
  _, parallel_root = parallel_runs
  single, multi = parallel_root / "single", tmp_path / "multi"
  _seed_from(seed_dir, multi)
  env = {**os.environ, "PYTHONPATH": ROOT}
  launch = [
    sys.executable,
    "-m",
    "experiments.launch_local",
    "--num_processes",
    "2",
    "--devices_per_process",
    "2",
    "--timeout",
    "300",
    "--",
    "-m",
    "experiments.main",
    *args,
    "--config.train.parallel.mode=jit",
    "--config.train.parallel.mesh=2x2",
    f"--workdir={multi}",
  ]
  first = subprocess.run(launch + ["--stop_after_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
  assert sorted(os.listdir(multi / "checkpoints")) == ["2"]
  second = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True)
  assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
  assert second.stdout.count("resumed from step 2") + second.stderr.count("resumed from step 2") == 2
  a = ocp.StandardCheckpointer().restore(str(single / "final_params"))
  b = ocp.StandardCheckpointer().restore(str(multi / "final_params"), jax.tree.map(ocp.utils.to_shape_dtype_struct, a))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), a, b)
  assert json.load(open(multi / "summary.json"))["win_rate_ci95"]  # process 0 evaluated and wrote it


def _metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
