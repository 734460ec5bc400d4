"""The training program: every config family trains on `:tiny`; a run writes its summary, metrics,
plots and kernel-backend record; the CPU kernels end where XLA ends; a run killed with SIGKILL
resumes to the same parameters as an uninterrupted run; parallel and multi-process runs equal the
single-device run. The config checks are in tests/test_configs.py.

Every run here starts from one shared SFT base and dataset (`seed_dir` in conftest.py, built once
per session): the program reuses a workdir's `sft_params`, `data` and `kernels.json` when they
are present and their provenance records match the config (tests/test_provenance.py)."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import pofx_backends
from configs import validate
from experiments import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("sft_params", "data", "kernels.json")


def _config(family, arg="tiny"):
  return importlib.import_module(f"configs.{family}").get_config(arg)


def _main(args, **kw):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run(
    [sys.executable, "-m", "experiments.main", *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw
  )


def _seed_from(src, dst, names=SHARED):
  """Share the seed's SFT base and data (symlinks) and its kernel-backend record (a copy), so a
  run trains and evaluates only."""
  os.makedirs(dst, exist_ok=True)
  for name in names:
    if name == "kernels.json":
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    else:
      os.symlink(os.path.join(src, name), os.path.join(dst, name))


@pytest.fixture(scope="module")
def tiny_run(seed_dir, tmp_path_factory):
  """One real CLI run of configs/dpo.py:tiny from the seed's SFT base and data (it decides its own
  kernel backend)."""
  work = tmp_path_factory.mktemp("dpo_tiny")
  _seed_from(seed_dir, work, names=("sft_params", "data"))
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


def test_tiny_dpo_run_records_its_kernel_backend_and_start_up(tiny_run):
  work, output = tiny_run
  summary = json.load(open(work / "summary.json"))
  record = json.load(open(work / "kernels.json"))
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


def _final_params(work):
  return ocp.StandardCheckpointer().restore(os.path.join(work, "final_params"))


@pytest.mark.skipif(
  pofx_backends.unavailable_reason("cpu") is not None, reason=f"{pofx_backends.unavailable_reason('cpu')}"
)
def test_cpu_kernels_run_equals_the_xla_run(seed_dir, tmp_path):
  # config.model.kernels reaches the model and the LM head: the world model (head dimension 16)
  # with block-sparse attention of 64-token blocks, trained with the CPU backend (the fused
  # attention kernels, every product by a BLAS), ends where the XLA run ends.
  params = {}
  for name in ("xla", "cpu"):
    work = tmp_path / name
    _seed_from(seed_dir, work, names=("sft_params", "data"))
    c = _config("dpo")
    with c.unlocked():
      c.model.kernels = name
      c.data.attention, c.data.attention_block_size, c.data.seq_bucket = "block_sparse", 64, 64
    validate.validate(c)
    s, _ = main_lib.run_one(c, str(work), progress=False)
    assert s["kernels"] == name and np.isfinite(s["gold_reward_policy"])
    params[name] = [np.asarray(x) for x in jax.tree.leaves(_final_params(work))]
  for a, b in zip(params["cpu"], params["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The CPU kernels did run: their float32 summation order differs from XLA's in the last bits.
  assert any(not np.array_equal(a, b) for a, b in zip(params["cpu"], params["xla"]))


def test_sigkill_resume_equals_uninterrupted(seed_dir, tmp_path):
  args = [
    "--config=configs/dpo.py:tiny",
    "--noprogress",
    "--config.train.steps=10",
    "--config.train.checkpoint_every=2",
    "--config.train.log_every=2",
  ]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  for w in (straight, killed):
    _seed_from(seed_dir, w)
  out = _main(args + [f"--workdir={straight}"])
  assert out.returncode == 0, out.stderr[-2000:]

  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.Popen(
    [sys.executable, "-m", "experiments.main", *args, f"--workdir={killed}"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpt_dir = killed / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
    if steps and max(steps) >= 4:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "final_params").exists(), "the run finished before it could be killed"
  out = _main(args + [f"--workdir={killed}"])
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resumed from step" in out.stderr
  a, b = _final_params(straight), _final_params(killed)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_parallel_modes_of_the_program_equal_the_single_device_run(tiny_run, tmp_path):
  """configs/dpo.py:tiny under mode jit (2 data x 2 fsdp), shard_map and pmap on 4 simulated
  devices, and with 2 accumulated micro-batches, ends with the single-device parameters; so do
  the runs with block-sparse attention and compact scored tokens (`*_fast`: single, jit,
  shard_map, pmap, accumulation), against the dense single-device run."""
  src, _ = tiny_run
  env = {**os.environ, "PYTHONPATH": ROOT}
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "experiments_parallel_check.py"), str(tmp_path), str(src)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["devices"] == 4
  for name, r in res["runs"].items():
    assert r["moved"] > 1e-3, (name, r)  # training changed the parameters
    assert r["max_abs_diff"] < 1e-5, (name, r)  # and every mode agrees with one device


def test_own_files_run_end_to_end(tmp_path):
  """configs/dpo_files.py:tiny: TRL-format JSONL + a local tokenizer -> TFDS -> training -> pair metrics."""
  s, _ = main_lib.run_one(_config("dpo_files", "tiny"), str(tmp_path / "files"), progress=False)
  assert s["data_pairs"]["train"] == 200 and s["data_pairs"]["eval"] == 200
  assert 0.0 <= s["reward_accuracy"] <= 1.0 and s["num_pairs"] == 200
  assert (tmp_path / "files" / "final_params").exists()


def test_bad_record_fails_with_file_and_line_or_is_skipped_and_counted(tmp_path):
  good = open(_config("dpo_files", "tiny").data.files).read().splitlines()
  bad = tmp_path / "bad.jsonl"
  bad.write_text("\n".join(good[:20] + ['{"prompt": "w1 w2", "chosen": "w3"}'] + good[20:40]) + "\n")
  c = _config("dpo_files", "tiny")
  with c.unlocked():
    c.data.files, c.data.eval_files = str(bad), ""
  with pytest.raises(ValueError, match=r"bad.jsonl:21: bad record \(missing_field\)"):
    main_lib.run_one(c, str(tmp_path / "strict"), progress=False)
  assert not (tmp_path / "strict" / "checkpoints").exists()  # failed before any training
  with c.unlocked():
    c.data.on_bad_record = "skip"
  s, _ = main_lib.run_one(c, str(tmp_path / "lenient"), progress=False)
  assert s["data_skipped"]["train"] == {"missing_field": 1} and s["data_pairs"]["train"] == 40


def test_two_processes_of_the_program_equal_the_single_process_run(seed_dir, tmp_path):
  """launch_local: 2 processes x 2 CPU devices run experiments.main (mode jit on a 2 data x 2 fsdp
  mesh, each process feeding its shard of the data), stop after step 2 (checkpoint written by
  both), resume (restored by both) and finish with the parameters of a single-process run."""
  args = [
    "--config=configs/dpo.py:tiny",
    "--noprogress",
    "--config.train.optimizer.name=sgd",
    "--config.train.optimizer.grad_clip=0.0",
    "--config.train.optimizer.learning_rate=0.5",
    "--config.train.steps=6",
    "--config.model.kernels=xla",
  ]
  single, multi = tmp_path / "single", tmp_path / "multi"
  for w in (single, multi):
    _seed_from(seed_dir, w)
  out = _main(args + [f"--workdir={single}"])
  assert out.returncode == 0, out.stderr[-2000:]
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
