"""pofx_backends.cpu.host_memory: with freed memory retained, re-allocating a large buffer no longer
page-faults. Measured in fresh subprocesses (the setting is process-wide), from the kernel's
minor-fault counter (`getrusage`), not from anything pofx reports."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Allocates, touches and frees a 48 MiB buffer 8 times (on a thread, as XLA's runtime allocates),
# and prints the minor page faults of the last 6 rounds. Touching 48 MiB of fresh pages costs
# 12288 faults with 4 KiB pages; reused pages cost none. By default glibc maps a block that size
# afresh every time (it is above the largest mmap threshold, 32 MiB); a thread's own arena (when
# `single_arena` is False) holds blocks up to its heaps' 64 MiB.
PROBE = r"""
import ctypes, json, resource, sys, threading
sys.path.insert(0, {root!r})
retain = {retain}
if retain:
  import importlib.util
  spec = importlib.util.spec_from_file_location("hm", {path!r})
  hm = importlib.util.module_from_spec(spec); spec.loader.exec_module(hm)
  assert hm.retain_freed_memory(single_arena={single_arena})
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 48 << 20
out = {{}}
def work():
  faults = []
  for i in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  out["faults"] = sum(faults[2:])
t = threading.Thread(target=work); t.start(); t.join()
print(json.dumps(out))
"""


def _faults(retain, single_arena=True):
  path = os.path.join(ROOT, "pofx_backends", "cpu", "host_memory.py")
  code = PROBE.format(root=ROOT, retain=retain, single_arena=single_arena, path=path)
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return json.loads(res.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize("single_arena", [True, False])
def test_retained_memory_stops_page_faults(single_arena):
  default, retained = _faults(False), _faults(True, single_arena)
  pages = 6 * (48 << 20) // os.sysconf("SC_PAGE_SIZE")
  assert default > 0.9 * pages, (default, pages)  # mmap'd afresh every round
  assert retained < 0.01 * pages, (retained, pages)  # the same pages reused


def test_release_and_retain_return_bools():
  # In a subprocess: the retain setting must not leak into the test process.
  path = os.path.join(ROOT, "pofx_backends", "cpu", "host_memory.py")
  code = (
    f"import importlib.util as u; s = u.spec_from_file_location('hm', {path!r}); m = u.module_from_spec(s); "
    "s.loader.exec_module(m); print(m.release_freed_memory(), m.retain_freed_memory())"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
  expected = "True" if sys.platform.startswith("linux") else "False"
  assert out == [expected, expected]


# What both probes below start with, in a fresh process: the module loaded from its file, freed
# memory retained, glibc's malloc and free, the resident set (the kernel's count, /proc/self/statm)
# and `aligned()`: a 64-byte-aligned (XLA:CPU's alignment) 64 MiB block, touched.
PROBE_HEAD = r"""
import ctypes, json, os, threading, time
import importlib.util
spec = importlib.util.spec_from_file_location("hm", {path!r})
hm = importlib.util.module_from_spec(spec); spec.loader.exec_module(hm)
assert hm.retain_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
def resident():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * page
n = 64 << 20
def aligned():
  p = ctypes.c_void_p()
  assert libc.posix_memalign(ctypes.byref(p), 64, ctypes.c_size_t(n)) == 0
  ctypes.memset(p, 1, n)
  return p.value
"""

# Allocates an aligned block, then an 8 MiB block just above it (larger than any free chunk, so it
# comes from the top of the heap), frees the first and asks for the same aligned size again,
# touching it. Prints whether the same block came back and how much resident memory grew.
ALIGNED_PROBE = r"""
before = resident()
first = aligned()
above = libc.malloc(8 << 20)
libc.free(first)
if {release}:
  hm.release_freed_memory()
second = aligned()
print(json.dumps({{"reused": second == first, "grew": (resident() - before) / n}}))
"""

# An aligned block is freed by another thread 30 ms after the main thread asks for the release
# (as XLA frees a step's temporaries after its outputs are ready); prints how much of it stayed
# resident, in blocks, after the call, and how long the call took.
LATE_FREE_PROBE = r"""
first = aligned()
above = libc.malloc(8 << 20)
before = resident()
threading.Thread(target=lambda: (time.sleep(0.03), libc.free(first))).start()
t = time.perf_counter()
{call}
print(json.dumps({{"kept": (resident() - before + n) / n, "seconds": time.perf_counter() - t}}))
"""


def _probe(body, **fields):
  path = os.path.join(ROOT, "pofx_backends", "cpu", "host_memory.py")
  code = PROBE_HEAD.format(path=path) + body.format(**fields)
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_release_after_the_first_step_keeps_one_aligned_block_resident():
  # glibc serves an aligned request of n bytes from a chunk of n + alignment + a minimum chunk, so
  # the freed block (with a neighbour above it) is too small for the same request: a second block
  # is carved, and without a release both stay resident (host_memory.release_freed_memory).
  # The chunk below the freed block may itself have been freed meanwhile (by the interpreter), and
  # the two together then fit the request: that probe shows nothing, so it is drawn again.
  probes = (_probe(ALIGNED_PROBE, release=False) for _ in range(3))
  kept = next((k for k in probes if not k["reused"]), None)
  assert kept is not None, "the freed aligned block was reused in 3 probes: the alignment rule did not show"
  assert kept["grew"] > 1.9, kept  # two 64 MiB blocks resident
  # With the release, one block's pages stay resident, whether the request reused the freed block's
  # address or carved a new one.
  released = _probe(ALIGNED_PROBE, release=True)
  assert 0.9 < released["grew"] < 1.1, released


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallinfo2 / malloc_trim")
def test_release_after_first_step_waits_for_a_late_free():
  # Trimmed at once, the block is still allocated: its pages stay. Waiting until the heap is still
  # for 50 ms (release_after_first_step) sees the free at 30 ms and trims after it.
  assert _probe(LATE_FREE_PROBE, call="hm.release_freed_memory()")["kept"] > 0.9
  waited = _probe(LATE_FREE_PROBE, call="hm.release_after_first_step()")
  assert waited["kept"] < 0.1 and 0.07 < waited["seconds"] < 1.0, waited
