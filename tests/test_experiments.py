"""The training program: every config builds and runs a few steps; bad configs fail early; a run
killed with SIGKILL resumes to the same parameters as an uninterrupted run."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import common
from pofx import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("dpo", "gpo", "simpo", "ipo", "mrpo", "predpo", "trdpo", "sam", "awp", "rwp", "beta_dpo", "dpo_files")
ARGS = {"dpo": ("", "tiny"), "gpo": ("", "tiny"), "simpo": ("", "tiny"), "ipo": ("", "tiny", "sum", "sum,tiny"),
        "mrpo": ("", "tiny"), "predpo": ("", "tiny"), "trdpo": ("", "tiny", "hard", "hard,tiny"),
        "sam": ("", "tiny", "asam", "asam,tiny"), "awp": ("", "tiny"), "rwp": ("", "tiny"), "beta_dpo": ("", "tiny"),
        "dpo_files": ("", "tiny")}


def _config(family, arg):
  return importlib.import_module(f"configs.{family}").get_config(arg)


def _main(args, **kw):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_config_builds_locked_and_valid(family):
  for arg in ARGS[family]:
    c = _config(family, arg)
    common.validate(c)
    assert c.is_locked
    assert "python -m experiments.main --config=configs/" in importlib.import_module(f"configs.{family}").__doc__
  with pytest.raises(ValueError, match="allowed"):
    _config(family, "no_such_arg")


@pytest.mark.parametrize("field,value,message", [
    ("train.loss", "dpoo", r"config.train.loss='dpoo' is not allowed; allowed: \["),
    ("train.loss_hyper.beta", 0.0, "beta > 0"),
    ("train.reference.kind", "none", "needs a reference"),
    ("train.reference.kind", "frozn", "config.train.reference.kind='frozn'"),
    ("train.perturbation.kind", "sharp", "config.train.perturbation.kind"),
    ("train.perturbation.kind", "rwp", r"config.train.perturbation.c_min=nan is not allowed with kind='rwp'"),
    ("train.steps", 0, "config.train.steps=0"),
    ("data.layout", "zigzag", "config.data.layout"),
    ("train.on_nonfinite", "ignore", "config.train.on_nonfinite"),
    ("data.attention", "flash", r"config.data.attention='flash' is not allowed; allowed: \['dense', 'block_sparse'\]"),
    ("data.scored", "some", r"config.data.scored='some' is not allowed; allowed: \['slots', 'compact'\]"),
    ("host_memory", "keep", r"config.host_memory='keep' is not allowed; allowed: \['default', 'retain'\]"),
    ("data.attention_kernel", "cuda", r"config.data.attention_kernel='cuda' is not allowed; allowed: \['xla', 'native'\]"),
    ("data.attention_kernel", "native", r"attention_kernel='native' needs data.attention='block_sparse'"),
    ("model.matmul", "mkl", r"config.model.matmul='mkl' is not allowed; allowed: \['xla', 'blas', 'blas_all'\]"),
    ("model.blas", "atlas", r"config.model.blas='atlas' is not allowed; allowed: \['auto', 'openblas', 'mkl'\]"),
])
def test_invalid_config_values_name_the_field(field, value, message):
  c = _config("dpo", "tiny")
  with c.unlocked():
    node = c
    *parents, last = field.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  with pytest.raises(ValueError, match=message):
    common.validate(c)


def test_block_sparse_needs_whole_blocks_per_row():
  c = _config("dpo", "tiny")
  with c.unlocked():
    c.data.attention, c.data.attention_block_size, c.data.seq_bucket = "block_sparse", 64, 48
  with pytest.raises(ValueError, match=r"config.data.seq_bucket=48 is not allowed .* a multiple of 64"):
    common.validate(c)
  with c.unlocked():
    c.data.attention_block_size = 0
  with pytest.raises(ValueError, match="config.data.attention_block_size=0"):
    common.validate(c)
  with c.unlocked():
    c.data.attention_block_size = 16
  common.validate(c)


def test_cli_rejects_bad_values_before_any_compute(tmp_path):
  t = time.perf_counter()
  out = _main(["--config=configs/dpo.py:tiny", f"--workdir={tmp_path}/w", "--config.train.loss_hyper.beta=-1"])
  assert out.returncode != 0
  assert "config.train.loss_hyper.beta=-1" in out.stderr
  assert not os.path.exists(tmp_path / "w" / "sft_params")  # nothing was computed or written
  assert time.perf_counter() - t < 60


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One real CLI run of configs/dpo.py:tiny; its SFT base and data seed the other runs."""
  work = tmp_path_factory.mktemp("dpo_tiny")
  out = _main(["--config=configs/dpo.py:tiny", f"--workdir={work}", "--noprogress", "--config.host_memory=retain"])
  assert out.returncode == 0, out.stderr[-3000:]
  return work, out.stdout


def test_tiny_dpo_run_writes_summary_table_metrics_and_plots(tiny_run):
  work, stdout = tiny_run
  summary = json.load(open(work / "summary.json"))
  for key in ("gold_reward_base", "gold_reward_policy", "win_rate_vs_base", "win_rate_ci95", "kl_to_base",
              "reward_accuracy", "ranking_accuracy", "mean_length_base", "mean_length_policy", "pairs_per_second"):
    assert key in summary, key
    assert key in stdout, key
  assert summary["host_memory"] == "retain"
  assert "host memory: freed memory retained in the process (glibc mallopt)" in stdout
  low, high = summary["win_rate_ci95"]
  assert 0.0 <= low <= summary["win_rate_vs_base"] <= high <= 1.0
  recs = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in recs if r["stage"] == "train"] == [2, 4]
  assert os.listdir(work / "tensorboard" / "train")
  for png in ("training_curves.png", "reward_vs_kl.png"):
    assert (work / png).stat().st_size > 1000


def _seed_from(src, dst):
  """Share the tiny run's SFT base and data (identical for every tiny config), so each config
  runs only its own training and evaluation."""
  os.makedirs(dst, exist_ok=True)
  for name in ("sft_params", "data"):
    os.symlink(src / name, os.path.join(dst, name))


@pytest.mark.parametrize("family,arg", [("simpo", "tiny"), ("ipo", "sum,tiny"), ("mrpo", "tiny"), ("trdpo", "tiny"),
                                        ("sam", "tiny"), ("awp", "tiny"), ("rwp", "tiny"), ("beta_dpo", "tiny"), ("predpo", "tiny"),
                                        ("gpo", "tiny")])
def test_every_family_runs_on_tiny(tiny_run, tmp_path, family, arg):
  from experiments import main as main_lib
  src, _ = tiny_run
  work = tmp_path / family
  _seed_from(src, work)
  c = _config(family, arg)
  if c.sweep:
    summaries, chart = main_lib.run_sweep(c, str(work), progress=False)
    assert len(summaries) == len(c.sweep) and os.path.getsize(chart) > 1000
    s = next(iter(summaries.values()))
  else:
    s, _ = main_lib.run_one(c, str(work), progress=False)
  assert np.isfinite(s["gold_reward_policy"]) and np.isfinite(s["kl_to_base"])


def _final_params(work):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.join(work, "final_params"))


def _final_params_of_tiny_runs(tiny_run, tmp_path, variants):
  """Trains the tiny DPO config once per `variants` entry (name -> function editing the config)
  from the tiny run's SFT base and data; returns each run's final parameter leaves."""
  import jax
  from experiments import main as main_lib
  src, _ = tiny_run
  params = {}
  for name, edit in variants.items():
    work = tmp_path / name
    _seed_from(src, work)
    c = _config("dpo", "tiny")
    with c.unlocked():
      edit(c)
    common.validate(c)
    s, _ = main_lib.run_one(c, str(work), progress=False)
    assert np.isfinite(s["gold_reward_policy"])
    params[name] = [np.asarray(x) for x in jax.tree.leaves(_final_params(work))]
  return params


@pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")
def test_native_attention_kernel_run_equals_the_xla_op_run(tiny_run, tmp_path):
  # config.data.attention_kernel reaches the loader's block lists: the world model (head
  # dimension 16) trained with the fused kernels ends where the XLA op's run ends.
  def kernel(name):
    def edit(c):
      c.data.attention, c.data.seq_bucket, c.data.attention_kernel = "block_sparse", 64, name
    return edit
  params = _final_params_of_tiny_runs(tiny_run, tmp_path, {"xla": kernel("xla"), "native": kernel("native")})
  for a, b in zip(params["native"], params["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_config_choices_are_the_library_choices():
  # configs/common.py keeps its own tuples (configs import without jax); they must not drift.
  from pofx import logprobs
  from pofx.models import llama
  assert common.MATMULS == llama._MATMULS == logprobs.MATMULS
  assert common.BLAS_LIBRARIES == llama._BLAS_LIBRARIES == logprobs.BLAS_LIBRARIES == ("auto",) + native.BLAS_LIBRARIES


def test_blas_matmul_needs_float32_on_one_device():
  for field, value, message in (("model.dtype", "bfloat16", r"model.matmul='blas_all' computes in float32 only"),
                                ("train.parallel.mode", "shard_map", r"model.matmul='blas_all' runs with "
                                                                    r"train.parallel.mode='single' only")):
    c = _config("dpo", "tiny")
    with c.unlocked():
      c.model.matmul = "blas_all"
      node, *path = field.split(".")
      target = c[node]
      for p in path[:-1]:
        target = target[p]
      target[path[-1]] = value
    with pytest.raises(ValueError, match=message):
      common.validate(c)


@pytest.mark.skipif(not native.blas_available(), reason=f"{native.blas_unavailable_reason()}")
def test_blas_matmul_run_equals_the_xla_run(tiny_run, tmp_path):
  # config.model.matmul reaches the model and the LM head: the world model trained with every
  # product by the BLAS ends where the XLA run ends.
  def matmul(name):
    def edit(c):
      c.model.matmul = name
    return edit
  params = _final_params_of_tiny_runs(tiny_run, tmp_path, {"xla": matmul("xla"), "blas_all": matmul("blas_all")})
  for a, b in zip(params["blas_all"], params["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The BLAS did run: its float32 summation order differs from XLA's in the last bits.
  assert any(not np.array_equal(a, b) for a, b in zip(params["blas_all"], params["xla"]))


def test_sigkill_resume_equals_uninterrupted(tiny_run, tmp_path):
  src, _ = tiny_run
  args = ["--config=configs/dpo.py:tiny", "--noprogress", "--config.train.steps=10",
          "--config.train.checkpoint_every=2", "--config.train.log_every=2"]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  for w in (straight, killed):
    _seed_from(src, w)
  out = _main(args + [f"--workdir={straight}"])
  assert out.returncode == 0, out.stderr[-2000:]

  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.Popen([sys.executable, "-m", "experiments.main", *args, f"--workdir={killed}"], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "experiments_parallel_check.py"), str(tmp_path),
                        str(src)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["devices"] == 4
  for name, r in res["runs"].items():
    assert r["moved"] > 1e-3, (name, r)          # training changed the parameters
    assert r["max_abs_diff"] < 1e-5, (name, r)   # and every mode agrees with one device


def test_own_files_run_end_to_end(tmp_path):
  """configs/dpo_files.py:tiny: TRL-format JSONL + a local tokenizer -> TFDS -> training -> pair metrics."""
  from experiments import main as main_lib
  s, _ = main_lib.run_one(_config("dpo_files", "tiny"), str(tmp_path / "files"), progress=False)
  assert s["data_pairs"]["train"] == 200 and s["data_pairs"]["eval"] == 200
  assert 0.0 <= s["reward_accuracy"] <= 1.0 and s["num_pairs"] == 200
  assert (tmp_path / "files" / "final_params").exists()


def test_bad_record_fails_with_file_and_line_or_is_skipped_and_counted(tmp_path):
  from experiments import main as main_lib
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


def test_two_processes_of_the_program_equal_the_single_process_run(tiny_run, tmp_path):
  """launch_local: 2 processes x 2 CPU devices run experiments.main (mode jit on a 2 data x 2 fsdp
  mesh, each process feeding its shard of the data), stop after step 2 (checkpoint written by
  both), resume (restored by both) and finish with the parameters of a single-process run."""
  import orbax.checkpoint as ocp
  src, _ = tiny_run
  args = ["--config=configs/dpo.py:tiny", "--noprogress", "--config.train.optimizer.name=sgd",
          "--config.train.optimizer.grad_clip=0.0", "--config.train.optimizer.learning_rate=0.5",
          "--config.train.steps=6"]
  single, multi = tmp_path / "single", tmp_path / "multi"
  for w in (single, multi):
    _seed_from(src, w)
  out = _main(args + [f"--workdir={single}"])
  assert out.returncode == 0, out.stderr[-2000:]
  env = {**os.environ, "PYTHONPATH": ROOT}
  launch = [sys.executable, "-m", "experiments.launch_local", "--num_processes", "2", "--devices_per_process", "2",
            "--timeout", "300", "--", "-m", "experiments.main", *args, "--config.train.parallel.mode=jit",
            "--config.train.parallel.mesh=2x2", f"--workdir={multi}"]
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
