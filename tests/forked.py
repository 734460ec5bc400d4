"""`python -m <module> ARGS` for the tests, in a process forked from one that has already imported
the programs' libraries.

Most slow tests start the training program (`python -m experiments.main ...`), and each such
process first spends about 2.5 CPU-seconds importing JAX, pofx and the program's libraries before
it does anything the test is about. `run_module` runs the module instead in a fork of a server
process (`python -m tests.forked`, one per test process, started on first use) that has imported
those libraries once (tests/_preload.py). The module itself is not imported in the server, so the
child executes it as `__main__` as `python -m` does (`runpy.run_module`), with its own argv,
working directory, environment, stdin (/dev/null), stdout and stderr (files, returned as text),
absl flags and JAX backend. The server initialises no JAX backend and starts no thread, so forking
it is safe, and every child starts from the same clean server state: runs share nothing but the
imported modules' code and the persistent compilation cache every test process shares anyway
(tests/conftest.py). The server waits for each child, so a child's CPU time is counted to the test
session as a subprocess's is.

Falls back to a fresh `python -m` when the environment's `JAX_*` variables differ from the
server's (JAX reads them on import), and for `fresh=True` (tests about start-up itself).

Returns a `subprocess.CompletedProcess` (args, returncode, stdout, stderr) as
`subprocess.run(..., capture_output=True, text=True)` does; an uncaught exception prints its
traceback to stderr and exits with status 1, and a child killed by signal N reports -N.
"""

import atexit
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_server = None  # (Popen, the JAX_* environment it imported under)
_buffers = {}  # server pid -> bytes read from its stdout and not yet returned


def _jax_env(env):
  return {k: v for k, v in env.items() if k.startswith("JAX_")}


def _stop(proc):
  if proc.poll() is None:
    proc.stdin.close()
    proc.wait()


def _get_server():
  global _server
  if _server is None or _server[0].poll() is not None:
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
      [sys.executable, "-m", "tests.forked"],
      cwd=ROOT,
      env=env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    atexit.register(_stop, proc)
    _server = (proc, _jax_env(env))
  return _server


def _reply(proc, timeout):
  """The server's next JSON line, or None after `timeout` seconds (None: wait). Reads the pipe's
  file descriptor directly: a buffered reader could take both of a run's lines at once and leave
  `select` waiting on an empty pipe."""
  buffer = _buffers.setdefault(proc.pid, bytearray())
  deadline = None if timeout is None else time.monotonic() + timeout
  while b"\n" not in buffer:
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not select.select([proc.stdout], [], [], left)[0]:
      return None
    chunk = os.read(proc.stdout.fileno(), 65536)
    if not chunk:
      raise RuntimeError(f"tests/forked.py's server exited with status {proc.wait()}")
    buffer += chunk
  line, _, rest = bytes(buffer).partition(b"\n")
  buffer[:] = rest
  return json.loads(line)


def run_module(module, args, env=None, cwd=ROOT, timeout=None, fresh=False):
  """`python -m module *args` with captured text output; see the module docstring."""
  env = dict(os.environ if env is None else env)
  env.setdefault("PYTHONPATH", ROOT)
  cmd = [sys.executable, "-m", module, *args]
  if fresh:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  proc, server_jax_env = _get_server()
  if _jax_env(env) != server_jax_env:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  with tempfile.TemporaryDirectory(prefix="pofx-forked-") as tmp:
    out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    request = {"module": module, "argv": list(args), "env": env, "cwd": str(cwd), "out": out, "err": err}
    proc.stdin.write(json.dumps(request) + "\n")
    proc.stdin.flush()
    pid = _reply(proc, None)["pid"]
    status = _reply(proc, timeout)
    if status is None:
      os.kill(pid, signal.SIGKILL)
      _reply(proc, None)
      raise subprocess.TimeoutExpired(cmd, timeout)
    with open(out, errors="backslashreplace") as f_out, open(err, errors="backslashreplace") as f_err:
      return subprocess.CompletedProcess(cmd, status["status"], f_out.read(), f_err.read())


def _child(module, argv, env, cwd, out, err):
  """In the forked child: stdin from /dev/null, fds 1 and 2 to the files, the environment and
  working directory set, the module run as `__main__`; exits with its status."""
  code = 1
  try:
    for fd, path, flags in (
      (0, os.devnull, os.O_RDONLY),
      (1, out, os.O_WRONLY | os.O_CREAT),
      (2, err, os.O_WRONLY | os.O_CREAT),
    ):
      f = os.open(path, flags, 0o644)
      os.dup2(f, fd)
      os.close(f)
    sys.stdin = open(0, closefd=False)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [module, *argv]
    sys.path[0] = cwd  # as `python -m` puts the working directory first
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      if e.code is None or isinstance(e.code, int):
        code = e.code or 0
      else:
        print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter does: the traceback, status 1
      traceback.print_exc()
    atexit._run_exitfuncs()
  finally:
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # noqa: BLE001
        pass
    os._exit(code)


def _serve():
  """The server: one JSON request per stdin line; forks a child per request, replies with its pid
  and then its exit status (`os.waitstatus_to_exitcode`), and ends when stdin closes."""
  import tests._preload  # noqa: F401

  for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
      _child(**request)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
  _serve()
