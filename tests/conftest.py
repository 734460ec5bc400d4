"""Suite-wide settings: cheaper XLA compilation, and one JAX compilation cache shared by the test
session's processes.

Most of the suite's time is XLA compiling small programs. Three compiler options, appended to
`XLA_FLAGS` and inherited by every subprocess, make that cheaper:
- `--xla_backend_optimization_level=0` skips LLVM's optimisation of the CPU code: a third less
  compile time on the compile-bound tests, and the same arithmetic (no fast-math either way).
- `--xla_cpu_use_fusion_emitters=false` emits XLA:CPU's fused kernels with its loop emitters
  instead of its MLIR fusion emitters: about half the compile time of a training step. The
  operations are the same, in the same order; the emitted kernels round some elementary functions
  and reductions differently, so results agree with the default emitters to float32 rounding
  (about 1e-6 relative on a training run's losses and evaluations), not bit for bit.
- `--xla_cpu_parallel_codegen_split_count=1` hands LLVM each program as one module instead of
  splitting it for parallel code generation (the same code; two test workers already keep both
  cores busy): about 5% less CPU for a `:tiny` program run from a cold cache.
Every comparison in the suite is made between computations of the same process options, and
every expected value is independent of them; only measured speed differs, and speed is measured
by `benchmarks/` (with the default options), never by a test.

Many tests start the training program, the parallel checks or a notebook in subprocesses, and
most of them compile the same tiny programs (the `configs/dpo.py:tiny` step, its evaluation and
sampling). JAX's persistent compilation cache, pointed at one fresh directory for the whole
session, lets every process after the first load those executables instead of compiling them.
The directory is made by the first process that loads this file (the pytest-xdist controller,
or plain pytest) and inherited through the environment by the workers and every subprocess they
start; it is removed at the end of that process. A directory set by the caller
(`JAX_COMPILATION_CACHE_DIR`) is used as it is and kept.

A cached executable is the compiled program of the same computation, options and JAX version, so
the tests check the same numbers with or without it (`POFX_TEST_COMPILATION_CACHE=0` turns it
off).
"""

import atexit
import fcntl
import os
import shutil
import tempfile

import pytest

_FAST_COMPILE = (
  "--xla_backend_optimization_level=0",
  "--xla_cpu_use_fusion_emitters=false",
  "--xla_cpu_parallel_codegen_split_count=1",
)
for _flag in _FAST_COMPILE:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

if os.environ.get("POFX_TEST_COMPILATION_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="pofx-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  # Cache every executable, however quick to compile: the tiny programs are compiled once per
  # process otherwise, and a process starts for most of the slow tests.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def shared_across_workers(tmp_path_factory, name, build):
  """`build(path)` run once per test session, also under pytest-xdist: the workers share the
  result at `<the session's common temp dir>/<name>` (a file lock; the first worker to ask builds
  it, the others wait for it and reuse it). `build` makes the file or directory at `path`; after
  a build that raised, the next worker to ask builds it again from an empty path. Returns the
  path."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER") is not None:
    root = root.parent  # pytest-of-<user>/pytest-<n>, the parent of every worker's popen-gw<i>
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      build(path)
      done.touch()
  return path


@pytest.fixture(scope="session")
def seed_dir(tmp_path_factory):
  """The SFT base, the preference data and the kernel backend of configs/dpo.py:tiny, made once per
  session (once for all pytest-xdist workers) for the tests that run the program from it
  (`tests.program._seed_from`; identical for every tiny world config: the same seed, world, SFT and
  data settings). Tests only read it."""

  def build(work):
    from experiments import main as main_lib
    from tests.program import _config

    run = main_lib.Run(_config("dpo"), str(work), progress=False)
    base = main_lib.stage_sft(run)
    main_lib.stage_data(run, base)

  return shared_across_workers(tmp_path_factory, "seed", build)
