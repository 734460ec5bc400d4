"""XLA:CPU's kernels behind the Diffusion-DPO step's CPU setting, measured alone.

    python benchmarks/xla_cpu_kernels.py conv [--calls 50]      # one 3x3 convolution: YNNPACK vs threaded
    python benchmarks/xla_cpu_kernels.py matmul [--calls 10]    # float32 2048^3: XLA vs PyTorch
    python benchmarks/xla_cpu_kernels.py stages [--without OPTION] [--no_trim] [diffusion_step.py flags ...]

`conv`: 3x3 convolutions of the `bench` U-Net's shapes (NHWC, "SAME"), jitted alone with XLA:CPU's
default options (each convolution a YNNPACK call on one thread) and with
`pofx_backends.cpu.THREADED_CONV_COMPILER_OPTIONS` (XLA's own convolution over all threads),
alternating between the two every call; the median wall and process CPU milliseconds and the
GFLOP/s by wall time. CPU time about equal to wall time means one thread did the work.

`matmul`: a float32 2048^3 product by XLA and, where torch is installed, by PyTorch on its default
threads, alternating; median and best GFLOP/s.

`stages`: the peak memory of `diffusion_step.py --side pofx` (its flags, e.g. `--compile default`)
stage by stage in this process, after `pofx_backends.startup()`: the resident set after the
parameters' initialisation, the resident set sampled every 5 ms during the compilation (its
peak), after it, and after `--steps` steps, with the compiled step's temporary buffer
(`memory_analysis().temp_size_in_bytes`) and the median step. `--without OPTION` compiles without
that key of `pofx_backends.cpu.LOW_MEMORY_COMPILER_OPTIONS` (e.g.
`xla_cpu_parallel_codegen_split_count`), in this process only. `--no_trim` skips the heap trim
after the first step (`pofx_backends.cpu.host_memory.release_freed_memory`): the process's peak
then shows the second copy of the temporary buffer that the trim avoids.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

CONV_SHAPES = ((16, 16, 32, 32), (16, 16, 64, 64), (32, 16, 64, 64), (16, 8, 64, 64))  # (B, H = W, C_in, C_out)


def _times(fn, calls):
  wall, cpu = [], []
  for _ in range(calls):
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return wall, cpu


def conv(calls: int):
  import jax
  import numpy as np

  from pofx_backends import cpu

  rng = np.random.default_rng(0)
  options = {"default (YNNPACK)": None, "threaded": cpu.THREADED_CONV_COMPILER_OPTIONS}
  for B, H, C, O in CONV_SHAPES:
    x = jax.numpy.asarray(rng.standard_normal((B, H, H, C)), jax.numpy.float32)
    k = jax.numpy.asarray(rng.standard_normal((3, 3, C, O)), jax.numpy.float32)

    def f(x, k):
      return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    lowered = jax.jit(f).lower(x, k)
    compiled = {name: lowered.compile(compiler_options=o) for name, o in options.items()}
    samples = {name: ([], []) for name in compiled}
    for c in compiled.values():
      _times(lambda c=c: jax.block_until_ready(c(x, k)), 5)
    for _ in range(calls):
      for name, c in compiled.items():
        w, p = _times(lambda c=c: jax.block_until_ready(c(x, k)), 1)
        samples[name][0].extend(w)
        samples[name][1].extend(p)
    flop = 2 * B * H * H * 9 * C * O
    for name, (w, p) in samples.items():
      wall, cpu_ms = statistics.median(w), statistics.median(p)
      print(
        f"[{B},{H},{H},{C}] -> {O} 3x3  {name:18s} wall {1e3 * wall:6.3f} ms  CPU {1e3 * cpu_ms:6.3f} ms  "
        f"{flop / wall / 1e9:6.1f} GFLOP/s"
      )


def matmul(calls: int):
  import jax
  import numpy as np

  n = 2048
  a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
  x = jax.numpy.asarray(a)
  f = jax.jit(lambda x, y: x @ y)
  sides = {"XLA": lambda: jax.block_until_ready(f(x, x))}
  try:
    import torch

    t = torch.from_numpy(a)
    sides[f"PyTorch ({torch.get_num_threads()} threads)"] = lambda: t @ t
  except ImportError:
    print("torch is not installed: XLA only")
  for fn in sides.values():
    _times(fn, 3)
  samples = {name: [] for name in sides}
  for _ in range(calls):
    for name, fn in sides.items():
      samples[name].extend(_times(fn, 1)[0])
  for name, w in samples.items():
    gflop = 2 * n**3 / 1e9
    print(f"{name:22s} median {gflop / statistics.median(w):6.1f} GFLOP/s  best {gflop / min(w):6.1f} GFLOP/s")


def _resident_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stages(flags, steps: int, without, trim: bool = True):
  import pofx_backends

  pofx_backends.startup()
  import diffusion_step

  from pofx_backends import cpu

  for key in without:
    if key not in cpu.LOW_MEMORY_COMPILER_OPTIONS:
      raise SystemExit(
        f"--without {key}: not a key of LOW_MEMORY_COMPILER_OPTIONS {sorted(cpu.LOW_MEMORY_COMPILER_OPTIONS)}"
      )
  cpu.LOW_MEMORY_COMPILER_OPTIONS = {k: v for k, v in cpu.LOW_MEMORY_COMPILER_OPTIONS.items() if k not in without}

  a = diffusion_step.parse(["--side", "pofx", *flags])
  bench = diffusion_step.PofxStep(a, diffusion_step.resolve_kernels(a)[0])
  bench.trim_after_first_step = trim
  print(f"after initialisation: resident {_resident_mib():.0f} MiB")
  peak, done = [0.0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _resident_mib())
      time.sleep(0.005)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  bench.compile()
  done.set()
  sampler.join()
  temp = bench.compiled.memory_analysis().temp_size_in_bytes / 2**20
  print(
    f"compilation ({bench.t_compile:.1f} s, {bench.compile_options}, convolutions {bench.conv_threads}): "
    f"sampled peak {peak[0]:.0f} MiB, resident after {_resident_mib():.0f} MiB; temporary buffer {temp:.1f} MiB"
  )
  times = bench.run(steps)
  print(
    f"after {steps} steps (median {1e3 * statistics.median(times[5:]):.1f} ms): resident {_resident_mib():.0f} MiB, "
    f"process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("what", choices=["conv", "matmul", "stages"])
  ap.add_argument("--calls", type=int, default=None, help="conv: 50, matmul: 10")
  ap.add_argument("--steps", type=int, default=20, help="stages: steps after the compilation")
  ap.add_argument("--without", action="append", default=[], help="stages: drop this low-memory compile option")
  ap.add_argument(
    "--no_trim",
    action="store_true",
    help="stages: keep the heap's free pages after the first step (host_memory.release_freed_memory)",
  )
  a, rest = ap.parse_known_args(argv)
  if a.what != "stages" and rest:
    ap.error(f"unknown arguments: {' '.join(rest)}")
  if a.what == "conv":
    conv(a.calls or 50)
  elif a.what == "matmul":
    matmul(a.calls or 10)
  else:
    stages(rest, a.steps, a.without, trim=not a.no_trim)


if __name__ == "__main__":
  main()
