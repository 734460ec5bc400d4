r"""Runs one program as N JAX processes on this machine, the way a multi-host pod runs it.

    python -m experiments.launch_local --num_processes 2 -- -m experiments.main --config ...
    python -m experiments.launch_local --num_processes 2 --devices_per_process 2 -- tests/parallel_multiprocess.py train

Every process gets the coordinator address (127.0.0.1 and a free port), the process count and
its process id in `POFX_COORDINATOR_ADDRESS`, `POFX_NUM_PROCESSES`, `POFX_PROCESS_ID` (the
program calls `experiments.distributed.initialize()` first), and `XLA_FLAGS` with
`--xla_force_host_platform_device_count=<devices_per_process>` (CPU devices). A command that
starts with `-m` or a `.py` file runs under this Python. On a real cluster (a TPU pod slice, a
SLURM job) the cluster starts the processes instead: see docs/pods.md.

Each process's output (stdout and stderr) is streamed with a `[p<id>]` prefix. Bounded waits:
when a process fails, the others get `--grace` seconds to finish and are then stopped (their
collectives would otherwise wait for the dead peer); the whole run is stopped after
`--timeout` seconds. The exit status is 0 when every process succeeded, otherwise the failing
process's status (124 on timeout), with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
  """A TCP port that was free on 127.0.0.1 a moment ago (bound to port 0, then released)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(
  base: dict,
  *,
  process_id: int,
  num_processes: int,
  port: int,
  devices_per_process: int,
  platform: Optional[str],
  init_timeout: int,
  heartbeat_timeout: int,
) -> dict:
  """The environment of one process (see the module docstring)."""
  env = dict(base)
  flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={int(devices_per_process)}").strip()
  if platform:
    env["JAX_PLATFORMS"] = platform
  env.update(
    {
      "POFX_COORDINATOR_ADDRESS": f"127.0.0.1:{int(port)}",
      "POFX_NUM_PROCESSES": str(int(num_processes)),
      "POFX_PROCESS_ID": str(int(process_id)),
      "POFX_INIT_TIMEOUT": str(int(init_timeout)),
      "POFX_HEARTBEAT_TIMEOUT": str(int(heartbeat_timeout)),
      "PYTHONUNBUFFERED": "1",
    }
  )
  return env


def _command(cmd: Sequence[str]) -> List[str]:
  cmd = list(cmd)
  if cmd and (cmd[0] == "-m" or cmd[0].endswith(".py")):
    return [sys.executable] + cmd
  return cmd


def _pump(proc: subprocess.Popen, prefix: str, out, lock: threading.Lock) -> None:
  for line in iter(proc.stdout.readline, ""):
    with lock:
      out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
      out.flush()
  proc.stdout.close()


def _stop(procs: Sequence[subprocess.Popen], wait: float = 5.0) -> None:
  """SIGTERM to each still-running process group we started, then SIGKILL after `wait` s."""
  alive = [p for p in procs if p.poll() is None]
  for p in alive:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + wait
  for p in alive:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def launch(
  cmd: Sequence[str],
  *,
  num_processes: int,
  devices_per_process: int = 1,
  timeout: float = 600.0,
  grace: float = 10.0,
  platform: Optional[str] = "cpu",
  init_timeout: int = 60,
  heartbeat_timeout: int = 30,
  out=None,
  err=None,
) -> int:
  """Starts the processes, streams their output, waits with bounded timeouts; returns the exit status."""
  out = out or sys.stdout
  err = err or sys.stderr
  if int(num_processes) < 1:
    raise ValueError(f"launch_local: invalid num_processes={num_processes!r}; allowed: integer >= 1.")
  if int(devices_per_process) < 1:
    raise ValueError(f"launch_local: invalid devices_per_process={devices_per_process!r}; allowed: integer >= 1.")
  if not cmd:
    raise ValueError("launch_local: no command given (put it after `--`).")
  port = free_port()
  argv = _command(cmd)
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(int(num_processes)):
    env = process_env(
      os.environ,
      process_id=i,
      num_processes=num_processes,
      port=port,
      devices_per_process=devices_per_process,
      platform=platform,
      init_timeout=init_timeout,
      heartbeat_timeout=heartbeat_timeout,
    )
    p = subprocess.Popen(
      argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # its own process group: stopped with its children
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p, f"[p{i}]", out, lock), daemon=True)
    t.start()
    pumps.append(t)

  start = time.monotonic()
  failure = None  # (process id, status)
  failed_at = None
  status, reason = 0, ""
  try:
    while True:
      codes = [p.poll() for p in procs]
      if failure is None:
        for i, c in enumerate(codes):
          if c is not None and c != 0:
            failure, failed_at = (i, c), time.monotonic()
            break
      if all(c is not None for c in codes):
        break
      now = time.monotonic()
      if failure is not None and now - failed_at > grace:
        running = [i for i, c in enumerate(codes) if c is None]
        reason = f"stopped process(es) {running} {grace:g} s after the failure"
        break
      if now - start > timeout:
        running = [i for i, c in enumerate(codes) if c is None]
        status, reason = 124, f"timed out after {timeout:g} s; stopped process(es) {running}"
        break
      time.sleep(0.05)
  except KeyboardInterrupt:
    status, reason = 130, "interrupted"
  finally:
    _stop(procs)
    for t in pumps:
      t.join(timeout=5)

  if failure is not None:
    i, c = failure
    what = f"exited with status {c}" if c > 0 else f"was killed by signal {-c}"
    msg = f"launch_local: process {i} {what}" + (f"; {reason}" if reason else "")
    status = c if c > 0 else 128 - c
  elif status:
    msg = f"launch_local: {reason}"
  else:
    msg = f"launch_local: all {num_processes} processes succeeded in {time.monotonic() - start:.1f} s"
  err.write(msg + "\n")
  err.flush()
  return status


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    k = argv.index("--")
    own, cmd = argv[:k], argv[k + 1 :]
  else:
    own, cmd = argv, []
  ap = argparse.ArgumentParser(prog="python -m experiments.launch_local", description=__doc__.split("\n\n")[0])
  ap.add_argument("--num_processes", type=int, required=True)
  ap.add_argument("--devices_per_process", type=int, default=1, help="simulated CPU devices per process")
  ap.add_argument("--timeout", type=float, default=600.0, help="seconds before the whole run is stopped")
  ap.add_argument("--grace", type=float, default=10.0, help="seconds the others get after a process fails")
  ap.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the processes ('' keeps the environment's)")
  ap.add_argument("--init_timeout", type=int, default=60, help="jax.distributed initialization timeout (s)")
  ap.add_argument("--heartbeat_timeout", type=int, default=30, help="jax.distributed heartbeat timeout (s)")
  args = ap.parse_args(own)
  if not cmd:
    ap.error("no command: put it after `--`, e.g. `-- -m experiments.main --config ...`")
  return launch(
    cmd,
    num_processes=args.num_processes,
    devices_per_process=args.devices_per_process,
    timeout=args.timeout,
    grace=args.grace,
    platform=args.platform or None,
    init_timeout=args.init_timeout,
    heartbeat_timeout=args.heartbeat_timeout,
  )


if __name__ == "__main__":
  sys.exit(main())
