"""Host (CPU) memory of a training process: opt-in glibc allocator settings, and trimming.

XLA:CPU allocates each executable's temporaries afresh on every call. glibc serves blocks above
its mmap threshold (at most 32 MiB) with `mmap` and unmaps them when freed, so every training
step page-faults and zeroes its temporaries again: on the 2-core benchmark machine, 69 000 minor
page faults and 0.11 s of kernel time per step of `benchmarks/dpo_step.py --workload fixed`
(a 0.24 s step). `retain_freed_memory()` keeps freed memory in the process for the next step.

These change process-wide allocator state, so the library (`pofx`) never calls them: a program (a
benchmark, a training script, a notebook) applies them once, at start-up, through
`pofx_backends.startup()` (which does so on a CPU JAX platform).

Transparent huge pages for the heap cannot be asked for from here: glibc (>= 2.35) reads them
from its tunables when the process starts. Launch the program with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (the kernel's THP mode must be `madvise` or `always`);
on the benchmark machine this made the fixed-workload step about 2% faster
(`benchmarks/README.md`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import time
from typing import Optional

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.cache
def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  name = ctypes.util.find_library("c")
  if not name:
    return None
  lib = ctypes.CDLL(name)
  return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def retain_freed_memory(*, single_arena: bool = True) -> bool:
  """Keeps freed heap memory in the process, for reuse, instead of returning it to the OS.

  Sets glibc's `mallopt`: no `mmap` for large blocks (`M_MMAP_MAX` 0), no automatic trimming
  (`M_TRIM_THRESHOLD` at its maximum) and, with `single_arena`, one malloc arena (`M_ARENA_MAX`
  1). After the first steps, a step's temporaries reuse pages that are already mapped: no page
  faults, no zeroing. The process's resident memory then stays at its high-water mark between
  steps (call `release_freed_memory()` after a phase that will not recur, e.g. compilation).

  One arena serves every thread's blocks from one heap, whatever their size; but every thread
  then takes the same lock. `single_arena=False` keeps glibc's per-thread arenas, whose heaps hold
  blocks up to 64 MiB (a larger block on a worker thread is mapped afresh): the image program's
  choice, whose many small steps ran 25-35% slower with one arena on two cores (docs/diffusion.md),
  and whose benchmark step was 7-10% faster with per-thread arenas (docs/benchmarks.md).

  Call it at start-up, before the first JAX computation: threads that already allocated keep
  their own arenas. Returns False, changing nothing, where glibc is not the C library.
  """
  lib = _glibc()
  if lib is None:
    return False
  ok = (lib.mallopt(_M_ARENA_MAX, 1) == 1) if single_arena else True
  ok &= lib.mallopt(_M_MMAP_MAX, 0) == 1
  ok &= lib.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
  return bool(ok)


class _Mallinfo2(ctypes.Structure):
  _fields_ = [
    (name, ctypes.c_size_t)
    for name in (
      "arena",
      "ordblks",
      "smblks",
      "hblks",
      "hblkhd",
      "usmblks",
      "fsmblks",
      "uordblks",
      "fordblks",
      "keepcost",
    )
  ]


def heap_in_use() -> Optional[int]:
  """Bytes of the heap in use (glibc `mallinfo2().uordblks`, glibc >= 2.33); None where unavailable."""
  lib = _glibc()
  if lib is None or not hasattr(lib, "mallinfo2"):
    return None
  if lib.mallinfo2.restype is not _Mallinfo2:
    lib.mallinfo2.restype = _Mallinfo2
  return int(lib.mallinfo2().uordblks)


def release_after_first_step(*, quiet_s: float = 0.05, timeout_s: float = 1.0) -> bool:
  """`release_freed_memory()` once the first training step's temporaries are freed.

  Call it once, after the first step, after blocking on all of its outputs. XLA frees an
  execution's temporaries when the execution is done, which can come after its outputs are ready
  (in about 1 step in 5 of `benchmarks/diffusion_step.py`'s, even after blocking on the whole
  state), so this waits until the heap's in-use bytes have not changed for `quiet_s` (at most
  `timeout_s`, polling every millisecond), then trims. Why the trim matters: `release_freed_memory`.
  Returns False, changing nothing, where glibc is not the C library.
  """
  if _glibc() is None:
    return False
  last, start = heap_in_use(), time.perf_counter()
  still_since = start
  while last is not None and time.perf_counter() - start < timeout_s:
    time.sleep(0.001)
    now, current = time.perf_counter(), heap_in_use()
    if current != last:
      last, still_since = current, now
    elif now - still_since >= quiet_s:
      break
  return release_freed_memory()


def release_freed_memory() -> bool:
  """Returns the heap's free pages to the OS (glibc `malloc_trim(0)`); False where unavailable.

  With freed memory retained, call it after a phase that will not recur (compilation) and once
  after the first training step has finished. The second call matters because XLA:CPU asks for
  64-byte-aligned blocks, and glibc serves an aligned request of n bytes from a free chunk of at
  least n + alignment + a minimum chunk: the block a step's temporaries were freed from, once the
  first step has allocated something just above it (its outputs, runtime caches), is a few bytes
  too small for the next step's identical request. The heap then grows by a second block of that
  size, and the first one's pages stay resident with nothing on them: on
  `benchmarks/diffusion_step.py`'s step (a 90 MiB temporary buffer) 683-699 MiB of peak RSS
  instead of about 590. Trimmed after the first step, the old block's pages go back to the OS
  before the new one is touched, and the next steps usually reuse the new block (a block split by
  something allocated between two later steps grows the heap again: not covered). The
  temporaries must be freed by then: `release_after_first_step` waits for that.
  """
  lib = _glibc()
  if lib is None:
    return False
  lib.malloc_trim(0)
  return True
