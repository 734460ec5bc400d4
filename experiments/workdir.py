"""The workdir of a run, claimed before any compute: writable, and used by one run at a time.

`check_writable` creates the directory and a probe file in it, so a workdir that cannot be
written (a read-only mount, a path through a file, missing permissions) fails at once, naming the
path and the reason, instead of after the first stage has been computed. It tries the write itself
rather than asking `os.access`, which reports every path writable to root.

`Lock` holds `<workdir>/.pofx.lock` with an exclusive `flock` for the whole run; the file records
the holder's pid, host and start time. A second run in the same workdir fails at once with a
message naming the holder. The kernel releases the `flock` of a process that dies, so the lock
left behind by a killed run is recognised as stale and taken over, with a note naming the process
that left it. In a multi-process run only process 0 takes the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from typing import Callable, Optional

LOCK = ".pofx.lock"


class WorkdirError(RuntimeError):
  """The workdir cannot be used by this run (not writable, or in use by another run)."""


def check_writable(workdir: str) -> str:
  """Creates `workdir` if needed and writes and removes a probe file in it; returns its absolute
  path. Raises WorkdirError naming the path and the reason."""
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".pofx-write-probe-", dir=path)
    try:
      os.write(fd, b"ok")
    finally:
      os.close(fd)
      os.unlink(probe)
  except OSError as e:
    where = e.filename or path
    raise WorkdirError(
      f"workdir {path} is not writable: {e.strerror or e} ({where}); pass a --workdir you can write to."
    ) from None
  return path


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """The exclusive lock of one workdir (`acquire`, `release`); see the module docstring."""

  def __init__(self, workdir: str, *, say: Callable[[str], None] = print):
    self.path = os.path.join(os.path.abspath(workdir), LOCK)
    self.say = say
    self.fd: Optional[int] = None

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return {}

  def acquire(self) -> Lock:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      h = self._holder()
      who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
      raise WorkdirError(
        f"workdir {os.path.dirname(self.path)} is in use by another run ({who}; lock {self.path}); "
        "wait for it to finish or pass another --workdir."
      ) from None
    old = self._holder()
    if old.get("pid") is not None:
      same_host = old.get("host") == socket.gethostname()
      state = ("no longer running" if not _alive(int(old["pid"])) else "its lock was released") if same_host else ""
      self.say(
        f"workdir: taking over the stale lock {self.path} of pid {old['pid']} on {old.get('host', '?')}"
        + (f" ({state})" if state else "")
      )
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    self.fd = fd
    return self

  def release(self) -> None:
    """Removes the lock file (a clean end leaves none behind) and drops the lock."""
    if self.fd is None:
      return
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    os.close(self.fd)
    self.fd = None
