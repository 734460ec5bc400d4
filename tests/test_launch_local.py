"""experiments.launch_local: N processes on one machine; a 2-process x 2-device run equals the
single-process run; a dead process fails the run in bounded time with a message."""

import io
import json
import os
import subprocess
import sys
import time

import pytest

from experiments import launch_local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("tests", "parallel_multiprocess.py")


def _launch(*args, timeout):
  env = dict(os.environ)  # the launcher replaces XLA_FLAGS' device count and keeps the rest
  t0 = time.monotonic()
  p = subprocess.run(
    [sys.executable, "-m", "experiments.launch_local", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return p, time.monotonic() - t0


def test_two_processes_two_devices_equal_single_process():
  p, _ = _launch(
    "--num_processes", "2", "--devices_per_process", "2", "--timeout", "400", "--", SCRIPT, "train", timeout=450
  )
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
  reports = {}
  for line in p.stdout.splitlines():
    prefix, _, rest = line.partition(" ")
    if rest.startswith("{"):
      reports[prefix] = json.loads(rest)
  assert sorted(reports) == ["[p0]", "[p1]"], p.stdout[-4000:]
  for prefix, r in reports.items():
    assert r["process"] == int(prefix[2]) and r["devices"] == 4 and r["local"] == 2, r
    assert r["jit"] <= 1e-5 and r["shard_map"] <= 1e-5, r
    assert r["moved"] > 1e-2, r  # the runs trained: equality is not vacuous
    assert r["fsdp_sharded"] > 10, r  # the parameters were split over the processes' devices
  assert "all 2 processes succeeded" in p.stderr


def test_dead_process_fails_the_run_in_bounded_time():
  p, elapsed = _launch(
    "--num_processes",
    "2",
    "--devices_per_process",
    "2",
    "--grace",
    "1",
    "--timeout",
    "120",
    "--",
    SCRIPT,
    "die",
    timeout=150,
  )
  assert p.returncode == 3, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
  assert "process 1 exited with status 3" in p.stderr and "stopped process(es) [0]" in p.stderr, p.stderr
  assert elapsed < 60, elapsed
  assert "[p1] process 1: exiting with status 3" in p.stdout


def _run(cmd, **kw):
  out, err = io.StringIO(), io.StringIO()
  t0 = time.monotonic()
  status = launch_local.launch(cmd, out=out, err=err, platform=None, **kw)
  return status, out.getvalue(), err.getvalue(), time.monotonic() - t0


def test_environment_and_prefixed_output():
  code = (
    "import os; print(os.environ['POFX_PROCESS_ID'], os.environ['POFX_NUM_PROCESSES'], "
    "os.environ['POFX_COORDINATOR_ADDRESS'].split(':')[0], os.environ['XLA_FLAGS'])"
  )
  status, out, err, _ = _run([sys.executable, "-c", code], num_processes=3, devices_per_process=4)
  assert status == 0, err
  lines = sorted(out.splitlines())
  caller = os.environ.get("XLA_FLAGS", "").split()  # the caller's other flags stay
  others = " ".join(f for f in caller if not f.startswith("--xla_force_host_platform_device_count"))
  flags = (others + " --xla_force_host_platform_device_count=4").strip()
  assert lines == [f"[p{i}] {i} 3 127.0.0.1 {flags}" for i in range(3)], lines
  assert "all 3 processes succeeded" in err


def test_process_env_replaces_the_device_count_flag():
  env = launch_local.process_env(
    {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"},
    process_id=1,
    num_processes=2,
    port=1234,
    devices_per_process=2,
    platform="cpu",
    init_timeout=10,
    heartbeat_timeout=5,
  )
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
  assert env["POFX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234" and env["POFX_PROCESS_ID"] == "1"
  assert env["JAX_PLATFORMS"] == "cpu" and env["POFX_HEARTBEAT_TIMEOUT"] == "5"
  assert 0 < launch_local.free_port() < 65536
  assert launch_local._command(["-m", "experiments.main"])[0] == sys.executable
  assert launch_local._command(["echo", "x"]) == ["echo", "x"]


def test_timeout_and_failure_statuses():
  status, _, err, elapsed = _run([sys.executable, "-c", "import time; time.sleep(60)"], num_processes=2, timeout=1.0)
  assert status == 124 and "timed out after 1 s" in err and elapsed < 20, (status, err, elapsed)
  code = "import os, time; pid = int(os.environ['POFX_PROCESS_ID']); time.sleep(0.2 + 0.5 * pid); raise SystemExit(5)"
  status, _, err, _ = _run([sys.executable, "-c", code], num_processes=2)
  assert status == 5 and "process 0 exited with status 5" in err, err
  code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
  status, _, err, _ = _run([sys.executable, "-c", code], num_processes=1)
  assert status == 137 and "killed by signal 9" in err, (status, err)


def test_bad_arguments():
  with pytest.raises(SystemExit):
    launch_local.main(["--num_processes", "2"])
  with pytest.raises(ValueError, match="num_processes"):
    launch_local.launch(["true"], num_processes=0)
