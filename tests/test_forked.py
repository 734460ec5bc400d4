"""tests/forked.py runs a module as `python -m` does: each case compares the forked run with a
fresh interpreter's on the same command."""

import os
import subprocess
import sys
import time

import pytest

from tests import forked


@pytest.mark.parametrize("mode", ["ok", "exit3", "message", "raise"])
def test_forked_run_equals_a_fresh_interpreter(mode, tmp_path):
  env = {**os.environ, "POFX_PROBE": "seen"}
  args = [mode, "x y", "--flag=1"]
  fresh = forked.run_module("tests._forked_probe", args, env=env, cwd=tmp_path, fresh=True)
  forked_run = forked.run_module("tests._forked_probe", args, env=env, cwd=tmp_path)
  assert forked_run.returncode == fresh.returncode == {"ok": 0, "exit3": 3, "message": 1, "raise": 1}[mode]
  assert forked_run.stdout == fresh.stdout
  assert '"probe": "seen"' in forked_run.stdout and f'"cwd": "{tmp_path}"' in forked_run.stdout
  assert '"stdin": ""' in forked_run.stdout
  if mode == "raise":  # the traceback's frames differ (runpy's against the interpreter's); its end does not
    assert forked_run.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == "ValueError: boom"
  else:
    assert forked_run.stderr == fresh.stderr


def test_timeout_kills_the_child():
  with pytest.raises(subprocess.TimeoutExpired):
    forked.run_module("tests._forked_probe", ["sleep"], timeout=2)
  assert forked.run_module("tests._forked_probe", ["ok"]).returncode == 0  # the server still serves


def test_preload_starts_no_thread_and_no_jax_backend():
  code = (
    "import threading, tests._preload, jax._src.xla_bridge as xb; "
    "print(threading.active_count(), len(xb._backends), 'experiments.main' in __import__('sys').modules)"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=forked.ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["1", "0", "False"]


def test_replies_already_in_the_pipe_are_each_returned():
  # A run can end before its pid reply is read: both of its lines then wait in the pipe together
  # while the server lives on, and the second must come from what was already read, not from a new
  # wait on the (now empty) pipe.
  server = subprocess.Popen(
    ["sh", "-c", 'printf \'{"pid": 7}\\n{"status": 3}\\n\'; sleep 30'], stdout=subprocess.PIPE, text=True
  )
  try:
    time.sleep(0.5)  # both lines written
    assert forked._reply(server, 5) == {"pid": 7}
    assert forked._reply(server, 5) == {"status": 3}
    assert forked._reply(server, 0.2) is None  # nothing more: a timeout, not a hang
  finally:
    server.kill()
    server.wait()
