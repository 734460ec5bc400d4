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
import sys

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  name = ctypes.util.find_library("c")
  if not name:
    return None
  lib = ctypes.CDLL(name)
  return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def retain_freed_memory() -> bool:
  """Keeps freed heap memory in the process, for reuse, instead of returning it to the OS.

  Sets glibc's `mallopt`: one malloc arena (`M_ARENA_MAX` 1), no `mmap` for large blocks
  (`M_MMAP_MAX` 0) and no automatic trimming (`M_TRIM_THRESHOLD` at its maximum). After the first
  steps, a step's temporaries reuse pages that are already mapped: no page faults, no zeroing.
  The process's resident memory then stays at its high-water mark between steps (call
  `release_freed_memory()` after a phase that will not recur, e.g. compilation).

  Call it at start-up, before the first JAX computation: threads that already allocated keep
  their own arenas. Returns False, changing nothing, where glibc is not the C library.
  """
  lib = _glibc()
  if lib is None:
    return False
  ok = lib.mallopt(_M_ARENA_MAX, 1) == 1
  ok &= lib.mallopt(_M_MMAP_MAX, 0) == 1
  ok &= lib.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
  return bool(ok)


def release_freed_memory() -> bool:
  """Returns the heap's free pages to the OS (glibc `malloc_trim(0)`); False where unavailable.

  With freed memory retained, call it after a phase that will not recur (compilation) and once
  after the first training step has finished. The second call matters because XLA:CPU asks for
  64-byte-aligned blocks, and glibc serves an aligned request of n bytes from a free chunk of at
  least n + alignment + a minimum chunk: the block a step's temporaries were freed from, once the
  first step has allocated something just above it (its outputs, runtime caches), is a few bytes
  too small for the next step's identical request. The heap then grows by a second block of that
  size, and the first one's pages stay resident with nothing on them: on
  `benchmarks/diffusion_step.py`'s step (a 90 MiB temporary buffer) 684-699 MiB of peak RSS
  instead of about 590. Trimmed after the first step, the old block's pages go back to the OS
  before the new one is touched; from the second step on each step reuses the same block. Block
  on all of the step's outputs first (`jax.block_until_ready((state, metrics))`): the runtime
  frees the temporaries when the execution is done, which is often after the loss is ready.
  """
  lib = _glibc()
  if lib is None:
    return False
  lib.malloc_trim(0)
  return True
