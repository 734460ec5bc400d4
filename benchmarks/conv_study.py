"""The convolutions of the diffusion benchmark's UNet, alone: XLA's kernel in two layouts against matmuls.

    python benchmarks/conv_study.py [--batch 32] [--reps 15] [--methods xla_nhwc,xla_nchw,im2col,...]
        [--shapes all|3x3] [--json PATH]

Every convolution shape of the `bench` denoiser (diffusers' `UNet2DModel` of
`diffusers_dpo_baseline.py`: 16x16x1 images, block channels 32, 64, 64) on a batch of `--batch`
images (32: the 16 pairs' chosen and rejected images of one step), float32, in each of
`--methods`:

- `xla_nhwc`: `jax.lax.conv_general_dilated`, NHWC input, HWIO kernel (pofx's layout);
- `xla_nchw`: the same in NCHW / OIHW (PyTorch's layout);
- `im2col`: `pofx_backends.cpu.conv.Im2colConv()`: the shifted windows side by side, one XLA dot,
  the hand-written backward;
- `im2col_blas`: the same, its products by the CPU backend's BLAS (`pofx_backends.cpu`, every
  2-D float32 product; where the BLAS is installed);
- `shifted`: `kh x kw` XLA dots of the shifted input with one kernel tap each, summed (JAX's
  automatic derivative);
- `native`: `pofx_backends.cpu.conv.DirectConv()`: the CPU backend's AVX-512 kernels for the 3x3
  convolutions padded by one pixel at stride 1 or 2 (output channels a multiple of 16, or fewer
  with input channels a multiple of 16), the stride-1 ones on even sizes by Winograd's F(2x2,
  3x3), XLA's NHWC convolution for the others (1x1, stride 2's input gradient);
- `native_direct`: the same kernels with direct sums instead of Winograd's
  (`DirectConv(winograd=False)`).

For each: the median seconds of the forward and of the forward plus backward (the output, the
input gradient and the kernel gradient for a given output gradient) over `--reps` calls (or the
fastest call, `--statistic min`; `--clock cpu`: the process's CPU time instead of wall time), the methods interleaved call by call so that they share the machine's conditions, and their GFLOP/s
(2 N Ho Wo Cout Cin kh kw per forward, three times that forward plus backward). Then each
method's convolution seconds per training step: per shape, its count in one forward of the UNet
times (one forward for the frozen reference + one forward and backward for the policy), summed;
and XLA's float32 2048^3 matmul rate in the same process (the rate a convolution-as-matmul aims
at). Threads: XLA's default (all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dpo_step  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from pofx_backends.cpu import conv as conv_lib  # noqa: E402

# (input size, in channels, out channels, kernel, stride, padding): count in one forward of the
# bench UNet (read from diffusers' UNet2DModel with forward hooks on its Conv2d modules).
SHAPES = {
  (16, 1, 32, 3, 1, 1): 1,
  (16, 32, 32, 3, 1, 1): 4,
  (16, 64, 32, 3, 1, 1): 1,
  (16, 96, 32, 3, 1, 1): 1,
  (16, 64, 64, 3, 1, 1): 1,
  (16, 32, 1, 3, 1, 1): 1,
  (16, 32, 32, 3, 2, 1): 1,
  (16, 64, 32, 1, 1, 0): 1,
  (16, 96, 32, 1, 1, 0): 1,
  (8, 32, 64, 3, 1, 1): 1,
  (8, 64, 64, 3, 1, 1): 4,
  (8, 96, 64, 3, 1, 1): 1,
  (8, 128, 64, 3, 1, 1): 1,
  (8, 64, 64, 3, 2, 1): 1,
  (8, 32, 64, 1, 1, 0): 1,
  (8, 96, 64, 1, 1, 0): 1,
  (8, 128, 64, 1, 1, 0): 1,
  (4, 64, 64, 3, 1, 1): 8,
  (4, 128, 64, 3, 1, 1): 2,
  (4, 128, 64, 1, 1, 0): 2,
}


def shifted_conv(x, w, strides, pads):
  """NHWC x HWIO as a sum of `kh kw` products of shifted (strided) input slices with one tap each."""
  kh, kw, c, o = w.shape
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  n = x.shape[0]
  ho = (x.shape[1] + sum(pads[0]) - kh) // strides[0] + 1
  wo = (x.shape[2] + sum(pads[1]) - kw) // strides[1] + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      sl = lax.slice(
        xp, (0, i, j, 0), (n, i + (ho - 1) * strides[0] + 1, j + (wo - 1) * strides[1] + 1, c), (1, *strides, 1)
      )
      out = out + jnp.einsum("nhwc,co->nhwo", sl, w[i, j])
  return out


def method_fn(name: str, stride: int, pad: int):
  """`f(x, w)` of method `name` with x and w in that method's layout."""
  s, p = (stride, stride), ((pad, pad), (pad, pad))
  if name == "xla_nhwc":
    return lambda x, w: lax.conv_general_dilated(x, w, s, p, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if name == "xla_nchw":
    return lambda x, w: lax.conv_general_dilated(x, w, s, p, dimension_numbers=("NCHW", "OIHW", "NCHW"))
  if name == "im2col":
    conv = conv_lib.Im2colConv()
    return lambda x, w: conv(x, w, s, p, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if name == "im2col_blas":
    from pofx_backends import cpu

    conv = conv_lib.Im2colConv(cpu.kernels(products="blas_all", attention=False).dot_general)
    return lambda x, w: conv(x, w, s, p, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if name == "shifted":
    return lambda x, w: shifted_conv(x, w, s, p)
  if name in ("native", "native_direct"):
    conv = conv_lib.DirectConv(winograd=name == "native")
    return lambda x, w: conv(x, w, s, p, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  raise SystemExit(f"conv_study.py: unknown method {name!r}; allowed: {METHODS}.")


METHODS = ("xla_nhwc", "xla_nchw", "im2col", "im2col_blas", "shifted", "native", "native_direct")


def operands(name, batch, size, cin, cout, k, stride, pad, key):
  kx, kw_, kg = jax.random.split(key, 3)
  out = (size + 2 * pad - k) // stride + 1
  x = jax.random.uniform(kx, (batch, size, size, cin), jnp.float32, -1, 1)
  w = jax.random.normal(kw_, (k, k, cin, cout), jnp.float32) / np.sqrt(k * k * cin)
  g = jax.random.normal(kg, (batch, out, out, cout), jnp.float32)
  if name == "xla_nchw":
    x, w, g = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), g.transpose(0, 3, 1, 2)
  return x, w, g


def study(methods, batch, reps, shapes, stat=statistics.median, clock=time.perf_counter):
  rows = []
  for shape, count in shapes.items():
    size, cin, cout, k, stride, pad = shape
    out = (size + 2 * pad - k) // stride + 1
    flop = 2 * batch * out * out * cout * cin * k * k
    fns = {}
    for m in methods:
      f = method_fn(m, stride, pad)
      x, w, g = operands(m, batch, size, cin, cout, k, stride, pad, jax.random.key(0))
      fwd = jax.jit(f)
      fb = jax.jit(lambda x, w, g, f=f: (lambda y, vjp: (y, *vjp(g)))(*jax.vjp(f, x, w)))
      jax.block_until_ready(fwd(x, w))
      jax.block_until_ready(fb(x, w, g))
      fns[m] = (fwd, fb, x, w, g)
    times = {m: ([], []) for m in methods}
    for _ in range(reps):
      for m in methods:
        fwd, fb, x, w, g = fns[m]
        t = clock()
        jax.block_until_ready(fwd(x, w))
        t1 = clock()
        jax.block_until_ready(fb(x, w, g))
        times[m][0].append(t1 - t)
        times[m][1].append(clock() - t1)
    row = {
      "shape": {"size": size, "cin": cin, "cout": cout, "k": k, "stride": stride},
      "count": count,
      "gflop": flop / 1e9,
    }
    for m in methods:
      tf, tb = stat(times[m][0]), stat(times[m][1])
      row[m] = {"fwd_s": tf, "fwdbwd_s": tb, "fwd_gflops": flop / tf / 1e9, "fwdbwd_gflops": 3 * flop / tb / 1e9}
    rows.append(row)
    print(
      f"{size:2d}x{size:<2d} {cin:3d}->{cout:<3d} {k}x{k} s{stride} x{count}: "
      + "  ".join(f"{m} {row[m]['fwd_gflops']:6.1f}/{row[m]['fwdbwd_gflops']:6.1f}" for m in methods),
      flush=True,
    )
  return rows


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor()
  except OSError:
    return platform.processor()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=32, help="images per convolution (32: one step's 16 pairs)")
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--methods", default="xla_nhwc,xla_nchw,im2col,im2col_blas,shifted")
  ap.add_argument("--shapes", choices=["all", "3x3"], default="all")
  ap.add_argument(
    "--statistic",
    choices=["median", "min"],
    default="median",
    help="of each method's call times (min: the least disturbed call, on a loaded machine)",
  )
  ap.add_argument(
    "--clock",
    choices=["wall", "cpu"],
    default="wall",
    help="wall time, or the process's CPU time (all its threads: on a loaded machine with one XLA "
    "thread, XLA_FLAGS=--xla_cpu_multi_thread_eigen=false, the time the work itself took)",
  )
  ap.add_argument("--json", default=None)
  a = ap.parse_args(argv)
  methods = [m.strip() for m in a.methods.split(",") if m.strip()]
  bad = [m for m in methods if m not in METHODS]
  if bad:
    ap.error(f"--methods: unknown {bad}; allowed: {list(METHODS)}.")
  shapes = {s: c for s, c in SHAPES.items() if a.shapes == "all" or s[3] == 3}
  print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()}", flush=True)
  print("GFLOP/s forward / forward+backward:", flush=True)
  stat = {"median": statistics.median, "min": min}[a.statistic]
  rows = study(methods, a.batch, a.reps, shapes, stat, {"wall": time.perf_counter, "cpu": time.process_time}[a.clock])
  peak = dpo_step.matmul_peak()
  totals = {}
  for m in methods:
    totals[m] = sum(r["count"] * (r[m]["fwd_s"] + r[m]["fwdbwd_s"]) for r in rows)
  step_gflop = sum(r["count"] * 4 * r["gflop"] for r in rows)
  print(f"XLA float32 2048^3 matmul: {peak / 1e9:.1f} GFLOP/s; load average {os.getloadavg()}")
  print(f"convolutions of one step ({step_gflop:.2f} GFLOP: reference forward + policy forward and backward):")
  for m in methods:
    print(f"  {m:12s} {totals[m] * 1e3:8.1f} ms  {step_gflop / totals[m]:6.1f} GFLOP/s")
  res = {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "jax": jax.__version__,
    "batch": a.batch,
    "reps": a.reps,
    "statistic": a.statistic,
    "clock": a.clock,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "matmul_peak_gflops": peak / 1e9,
    "step_conv_gflop": step_gflop,
    "step_conv_seconds": totals,
    "rows": rows,
    "load_average": os.getloadavg(),
  }
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
