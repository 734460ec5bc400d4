"""Runs that never lie (issue 21, items 2, 3, 4, 6), each tested by running the program as a user
would (`python -m experiments.main --config=configs/dpo.py:tiny`) from the session's shared SFT
base and data (`seed_dir`):

- kills (SIGKILL after a step, inside a checkpoint save, as evaluation starts) and resumes, with
  a byte flipped inside array data of one checkpoint and another truncated on the way: every
  damaged checkpoint is named and the run falls back to the previous intact one; the final
  parameters are bitwise those of the uninterrupted run and the summary is equal apart from its
  wall-clock fields;
- a second run in a workdir in use fails at once; the lock of a killed run is taken over;
- a workdir that cannot be written fails before any compute;
- the non-finite step count survives a kill during evaluation; `on_nonfinite=halt` stops at the
  step where it happens and says truly what was saved.

The kill points are drawn by `--fault` (the program SIGKILLs itself there), so every kill lands
where the test id says.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import main as main_lib
from tests.program import ROOT, _config, _final_params, _main, _seed_from

TINY = ["--config=configs/dpo.py:tiny", "--noprogress"]
KILLED = -signal.SIGKILL
WALL_CLOCK = ("pairs_per_second", "flops_per_second", "mfu", "seconds_total")


def _stderr_lines(out):
  return [line for line in out.stderr.splitlines() if line.strip()]


def _largest_array_file(step_dir):
  """The largest file of the checkpoint's array data (orbax's OCDBT data files under state/)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs if os.sep + "d" in r]
  return max(files, key=os.path.getsize)


def _kill_points(seed):
  """SIGKILL points of the kill-and-resume test, from a fixed-seed generator: after a step k1 in
  [4, 7] (checkpoints every 2 steps: the latest, k1 rounded down to even, has an older one to fall
  back to); inside the save of an even step k2 in (latest, 10]; then as evaluation starts."""
  rng = np.random.default_rng(seed)
  k1 = int(rng.integers(4, 8))
  latest = k1 - k1 % 2
  k2 = int(rng.choice(np.arange(latest + 2, 11, 2)))
  return k1, k2


SEED = 0
K1, K2 = _kill_points(SEED)


@pytest.mark.parametrize("k1,k2", [(K1, K2)], ids=[f"seed{SEED}-step{K1}-save{K2}-eval"])
def test_kills_and_damaged_checkpoints_resume_to_the_uninterrupted_run(seed_dir, tmp_path, k1, k2):
  """Uninterrupted run (and, while it runs, a second run in its workdir that must fail at once) vs
  the chain: kill after step k1; flip a byte inside the array data of the latest checkpoint, resume
  and kill inside the save of step k2; resume (the unsealed k2 is damaged) and kill as evaluation
  starts; truncate the final checkpoint's array file, resume to the end."""
  args = TINY + ["--config.train.steps=10", "--config.train.checkpoint_every=2", "--config.train.log_every=2"]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  for w in (straight, killed):
    _seed_from(seed_dir, w)
  env = {**os.environ, "PYTHONPATH": ROOT}
  first = subprocess.Popen(
    [sys.executable, "-m", "experiments.main", *args, f"--workdir={straight}"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  lock = straight / ".pofx.lock"
  deadline = time.time() + 120
  while not (lock.exists() and lock.read_text()) and time.time() < deadline and first.poll() is None:
    time.sleep(0.05)
  second = _main(args + [f"--workdir={straight}"])
  assert first.poll() is None, "the first run ended before the second could try its workdir"
  assert second.returncode == 2
  assert _stderr_lines(second)[-1].startswith(
    f"experiments.main: workdir {straight} is in use by another run (pid {first.pid} on "
  ), second.stderr
  assert len(_stderr_lines(second)) <= 10 and "kernels:" not in second.stderr  # before any compute

  # The chain runs while the uninterrupted run finishes (two cores).
  ckpts = killed / "checkpoints"
  out = _main(args + [f"--workdir={killed}", f"--fault=step:{k1}"])
  assert out.returncode == KILLED, out.stderr[-2000:]
  latest = k1 - k1 % 2
  assert sorted(int(d) for d in os.listdir(ckpts)) == [latest - 2, latest]

  path = _largest_array_file(ckpts / str(latest))
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))
  out = _main(args + [f"--workdir={killed}", f"--fault=save:{k2}"])
  assert out.returncode == KILLED, out.stderr[-2000:]
  assert f"taking over the stale lock {killed / '.pofx.lock'}" in out.stderr
  said = [line for line in _stderr_lines(out) if "checkpoint" in line]
  assert said[0].startswith(f"[pofx] checkpoint {ckpts / str(latest)} is damaged: "), out.stderr
  assert "SHA-256" in said[0] and f"falling back to step {latest - 2}" in said[0], said[0]
  assert f"train: resumed from step {latest - 2}" in out.stderr

  out = _main(args + [f"--workdir={killed}", "--fault=eval"])
  assert out.returncode == KILLED, out.stderr[-2000:]
  said = [line for line in _stderr_lines(out) if "checkpoint" in line]
  assert said[0].startswith(f"[pofx] checkpoint {ckpts / str(k2)} is damaged: it has no "), out.stderr
  assert f"falling back to step {k2 - 2}" in said[0]
  assert (killed / "final_params").exists() and not (killed / "summary.json").exists()

  path = _largest_array_file(ckpts / "10")
  os.truncate(path, os.path.getsize(path) // 2)
  out = _main(args + [f"--workdir={killed}"])
  assert out.returncode == 0, out.stderr[-2000:]
  lines = _stderr_lines(out)
  said = [line for line in lines if "checkpoint" in line]
  assert said[0].startswith(f"[pofx] checkpoint {ckpts / '10'} is damaged: "), out.stderr
  assert "truncated" in said[0] and "falling back to step 8" in said[0], said[0]
  assert len(lines) <= 10 and "Traceback" not in out.stderr, out.stderr
  damaged = sorted(os.listdir(str(ckpts) + ".damaged"))
  assert damaged == sorted({str(latest), str(k2), "10"} if k2 != 10 else {str(latest), "10", "10.1"})

  stdout, stderr = first.communicate(timeout=300)
  assert first.returncode == 0, stderr[-2000:]
  assert not lock.exists() and not (killed / ".pofx.lock").exists()  # a clean end leaves no lock
  a, b = _final_params(straight), _final_params(killed)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  logged = [
    [r["step"] for r in map(json.loads, open(w / "metrics.jsonl")) if r.get("stage") == "train"]
    for w in (straight, killed)
  ]
  assert logged[1] == logged[0] == [2, 4, 6, 8, 10]  # redone steps are not logged twice
  s_straight, s_killed = (json.load(open(w / "summary.json")) for w in (straight, killed))
  for s in (s_straight, s_killed):
    assert all(np.isfinite(s[k]) for k in ("pairs_per_second", "flops_per_second", "seconds_total")), s
    for k in WALL_CLOCK:
      s.pop(k)
  assert s_killed == s_straight


@pytest.mark.parametrize("how", ["parent_is_a_file", "read_only_dir"])
def test_unwritable_workdir_fails_before_any_compute(tmp_path, how):
  """A workdir under a regular file (fails for root too), or an existing directory without write
  permission (only meaningful when not root: root ignores permissions)."""
  if how == "parent_is_a_file":
    (tmp_path / "file").write_text("x")
    work = tmp_path / "file" / "work"
  else:
    if os.geteuid() == 0:
      pytest.skip("root writes to a directory without write permission")
    work = tmp_path / "ro"
    work.mkdir()
    work.chmod(0o555)
  out = _main(TINY + [f"--workdir={work}"])
  lines = _stderr_lines(out)
  assert out.returncode == 2
  assert lines[-1].startswith(f"experiments.main: workdir {work} is not writable: "), out.stderr
  assert len(lines) <= 10 and "kernels:" not in out.stderr and "sft:" not in out.stderr


HUGE_LR = [
  "--config.train.optimizer.name=sgd",
  "--config.train.optimizer.learning_rate=1e30",
  "--config.train.optimizer.warmup_steps=0",
  "--config.train.steps=6",
]
# The learning rate warms up linearly from 0 over max(warmup_steps, 1) = 1 step: step 1 has rate 0
# and leaves the SFT base unchanged (finite); step 2 moves the parameters by up to 1e30 (gradient
# clipped to norm 1), so from step 3 on the logits overflow and every loss is non-finite.
FIRST_NONFINITE = 3


def test_nonfinite_count_and_throughput_survive_a_kill_during_evaluation(seed_dir, tmp_path, capfd):
  """Killed (a subprocess of the program) as evaluation starts; resumed through the program's
  stages in this process (`run_one` on the same config)."""
  work = tmp_path / "w"
  _seed_from(seed_dir, work)
  out = _main(TINY + HUGE_LR + [f"--workdir={work}", "--fault=eval"])
  assert out.returncode == KILLED, out.stderr[-2000:]
  c = _config("dpo")
  with c.unlocked():
    c.train.optimizer.name, c.train.optimizer.learning_rate = "sgd", 1e30
    c.train.optimizer.warmup_steps, c.train.steps = 0, 6
  main_lib.run_one(c, str(work), progress=False)
  err = capfd.readouterr().err
  assert "train: resumed from step 6" in err, err[-2000:]
  s = json.load(open(work / "summary.json"))
  assert s["nonfinite_steps"] == 6 - FIRST_NONFINITE + 1
  assert np.isfinite(s["pairs_per_second"]) and s["pairs_per_second"] > 0
  assert np.isfinite(s["flops_per_second"]) and s["flops_per_second"] > 0


@pytest.mark.parametrize("every", [2, 4], ids=["checkpoint_at_2", "no_checkpoint_yet"])
def test_halt_stops_at_the_nonfinite_step_and_says_what_was_saved(seed_dir, tmp_path, every):
  work = tmp_path / "w"
  _seed_from(seed_dir, work)
  out = _main(
    TINY
    + HUGE_LR
    + [f"--workdir={work}", "--config.train.on_nonfinite=halt", f"--config.train.checkpoint_every={every}"]
  )
  lines = _stderr_lines(out)
  assert out.returncode == 1 and len(lines) <= 10 and "Traceback" not in out.stderr, out.stderr
  head = f"experiments.main: train: non-finite loss or gradient at step {FIRST_NONFINITE}; halted there"
  assert lines[-1].startswith(head), lines[-1]
  ckpts = work / "checkpoints"
  if every == 2:
    assert f"the last checkpoint is step 2 ({ckpts / '2'})" in lines[-1]
    assert sorted(os.listdir(ckpts)) == ["2"]
  else:
    assert "no checkpoint was written (the first was due at step 4)" in lines[-1]
    assert not ckpts.exists() or os.listdir(ckpts) == []
  steps = [json.loads(r)["step"] for r in open(work / "metrics.jsonl")]
  assert steps[-1] == FIRST_NONFINITE  # the halting step is logged, none after it
  assert not (work / ".pofx.lock").exists()
