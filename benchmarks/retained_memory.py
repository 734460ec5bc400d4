"""Runs a Python script with freed host memory retained for reuse (glibc), for either side.

    python benchmarks/retained_memory.py SCRIPT [ARGS ...]

Calls `pofx_backends.cpu.host_memory.retain_freed_memory()` (loaded from its file, so the
script's process imports nothing else of pofx, nor JAX: glibc keeps freed memory, with one arena,
no `mmap` for large blocks and no trimming) and then runs SCRIPT as `__main__` with ARGS.
`compare_trl.py` starts both TRL and pofx this way for its "same allocator" comparison, so the
setting is the same on both sides (pofx's own start-up hook then sets the same values again).
"""

import importlib.util
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  spec = importlib.util.spec_from_file_location(
    "_pofx_host_memory", os.path.join(os.path.dirname(HERE), "pofx_backends", "cpu", "host_memory.py")
  )
  host_memory = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(host_memory)
  if not host_memory.retain_freed_memory():
    print("retained_memory.py: glibc mallopt unavailable; running with the default allocator.", file=sys.stderr)
  script, sys.argv = sys.argv[1], sys.argv[1:]
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main()
