"""XLA:CPU (JAX) against PyTorch on the float32 matmuls of the `bench` model's DPO step.

    python benchmarks/matmul_parity.py [--reps 3] [--calls 15] [--threads all,1]
        [--jax_matmul {xla,mkl,openblas}] [--json PATH]

The fixed workload's step (8 pairs, prompt-shared rows of 192 tokens: 1536 tokens per step, 1024
scored completion tokens) is, apart from attention and elementwise work, these dots, each in the
three forms a training step runs:

    forward  Y = X W            [N, in] x [in, out]           ("NN")
    dX       dX = dY W^T        [N, out] x [in, out]^T        ("NT", contracting both last axes)
    dW       dW = X^T dY        [N, in]^T x [N, out]          ("TN", contracting both first axes)

for W in {q [256, 256], k and v [256, 128], o [256, 256], gate|up [256, 1376], down [688, 256]}
per layer (x 4 layers, N = 1536) and the LM head [256, 4096] (N = 1024). Each side times every
shape in its own process (`--threads all`: every core of this machine, `1`: pinned to one core),
as the median over `--calls` calls of one dot (a jitted `lax.dot_general` in JAX, blocking on
its result; `torch.mm` into a preallocated output in PyTorch). One dot per call because XLA runs
independent dots of one program concurrently, each wanting every core. The per-call cost of an
empty call (a jitted identity / `torch.mm` of 1 x 1 matrices) is printed beside the figures:
tens of microseconds against dots of 0.4-7 ms. The two sides alternate, `--reps` times; the
medians, the ratio JAX / PyTorch per shape, and the time each side needs for the whole step's
set of dots (FLOP-weighted) are printed.

`--jax_matmul mkl` (or `openblas`) times the JAX side's products as pofx's step computes them
with the CPU backend (`pofx_backends.kernels("cpu", products="blas_all", blas=...)`'s
`dot_general`): a BLAS sgemm per part of the product on each of XLA's threads, through XLA's FFI
(the transposed forms as sgemm's transpose flags).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pofx, pofx_backends

LAYERS, TOKENS, SCORED = 4, 1536, 1024
WEIGHTS = [
  ("q_proj", 256, 256, LAYERS, TOKENS),
  ("k_proj", 256, 128, LAYERS, TOKENS),
  ("v_proj", 256, 128, LAYERS, TOKENS),
  ("o_proj", 256, 256, LAYERS, TOKENS),
  ("gate_up", 256, 1376, LAYERS, TOKENS),
  ("down_proj", 688, 256, LAYERS, TOKENS),
  ("lm_head", 256, 4096, 1, SCORED),
]
FORMS = ("NN", "NT", "TN")


def shapes():
  """(name, form, lhs shape, rhs shape, contracting dims, flops, count per step)."""
  out = []
  for name, d_in, d_out, count, n in WEIGHTS:
    flops = 2 * n * d_in * d_out
    out.append((name, "NN", (n, d_in), (d_in, d_out), ((1,), (0,)), flops, count))
    out.append((name, "NT", (n, d_out), (d_in, d_out), ((1,), (1,)), flops, count))
    out.append((name, "TN", (n, d_in), (n, d_out), ((0,), (0,)), flops, count))
  return out


def measure(side: str, calls: int, jax_matmul: str = "xla"):
  """Seconds per dot for every shape, and of an empty call (runs in the child process)."""
  import time

  import numpy as np

  rng = np.random.default_rng(0)

  def timed(call):
    for _ in range(3):
      call()
    times = []
    for _ in range(calls):
      t = time.perf_counter()
      call()
      times.append(time.perf_counter() - t)
    return statistics.median(times)

  res = {}
  if side == "jax":
    import jax

    one = jax.device_put(np.ones((1, 1), np.float32))
    ident = jax.jit(lambda x: x)
    res["empty_call"] = timed(lambda: ident(one).block_until_ready())
  else:
    import torch

    one, out1 = torch.ones(1, 1), torch.empty(1, 1)
    res["empty_call"] = timed(lambda: torch.mm(one, one, out=out1))
  for name, form, ls, rs, (lc, rc), _, _ in shapes():
    lhs, rhs = rng.standard_normal(ls, np.float32), rng.standard_normal(rs, np.float32)
    if side == "jax" and jax_matmul != "xla":
      import pofx_backends

      dot_general = pofx_backends.kernels("cpu", products="blas_all", blas=jax_matmul).dot_general
      dims = (lc, rc)
      fn = jax.jit(lambda a, b: dot_general(a, b, (dims, ((), ()))))  # noqa: B023
      a, b = jax.device_put(lhs), jax.device_put(rhs)
      call = lambda: fn(a, b).block_until_ready()
    elif side == "jax":
      dims = (lc, rc)
      fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (dims, ((), ()))))
      a, b = jax.device_put(lhs), jax.device_put(rhs)
      call = lambda: fn(a, b).block_until_ready()
    else:
      a, b = torch.from_numpy(lhs), torch.from_numpy(rhs)
      a = a.t() if form == "TN" else a  # strided views: torch picks its own kernels
      b = b.t() if form == "NT" else b
      out = torch.empty(a.shape[0], b.shape[1])
      call = lambda: torch.mm(a, b, out=out)
    res[f"{name}/{form}"] = timed(call)
  return res


def child(side: str, threads: str, calls: int, jax_matmul: str):
  if threads == "1":
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    os.environ["OMP_NUM_THREADS"] = "1"
  if side == "torch":
    import torch

    if threads == "1":
      torch.set_num_threads(1)
  print(json.dumps(measure(side, calls, jax_matmul)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--calls", type=int, default=15)
  ap.add_argument("--threads", default="all,1", help="comma-separated: 'all' (every core) and/or '1'")
  ap.add_argument(
    "--jax_matmul",
    choices=["xla", "mkl", "openblas"],
    default="xla",
    help="the JAX side's products: XLA's dot, or the CPU backend's dot_general with that BLAS",
  )
  ap.add_argument("--json", default=None)
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    side, threads = a.child.split(":")
    child(side, threads, a.calls, a.jax_matmul)
    return
  settings = [t.strip() for t in a.threads.split(",") if t.strip()]
  if a.reps < 1 or a.calls < 1 or not settings or any(t not in ("all", "1") for t in settings):
    ap.error(f"need --reps >= 1, --calls >= 1 and --threads from 'all', '1' (got {a.reps}, {a.calls}, {a.threads!r}).")
  report = {"cores": len(os.sched_getaffinity(0)), "jax_matmul": a.jax_matmul, "settings": {}}
  for threads in settings:
    runs = {"jax": [], "torch": []}
    for rep in range(a.reps):
      for side in ("jax", "torch") if rep % 2 == 0 else ("torch", "jax"):
        out = subprocess.run(
          [
            sys.executable,
            __file__,
            "--child",
            f"{side}:{threads}",
            "--calls",
            str(a.calls),
            "--jax_matmul",
            a.jax_matmul,
          ],
          check=True,
          capture_output=True,
          text=True,
        ).stdout
        runs[side].append(json.loads(out.strip().splitlines()[-1]))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    print(
      f"\nthreads={threads} ({report['cores'] if threads == 'all' else 1} core(s)), medians of {a.reps} runs; "
      f"empty call: JAX {med['jax']['empty_call'] * 1e6:.0f} us, torch {med['torch']['empty_call'] * 1e6:.0f} us"
    )
    print(f"  {'dot':18s} {'JAX GFLOP/s':>12s} {'torch GFLOP/s':>14s} {'JAX/torch':>10s}")
    total = {"jax": 0.0, "torch": 0.0}
    flops_total = 0.0
    rows = {}
    for name, form, _, _, _, flops, count in shapes():
      k = f"{name}/{form}"
      gj, gt = flops / med["jax"][k] / 1e9, flops / med["torch"][k] / 1e9
      rows[k] = {"jax_gflops": round(gj, 1), "torch_gflops": round(gt, 1), "ratio": round(gj / gt, 3)}
      print(f"  {k:18s} {gj:12.1f} {gt:14.1f} {gj / gt:10.2f}")
      for side in total:
        total[side] += count * med[side][k]
      flops_total += count * flops
    summary = {
      side: {"seconds": round(t, 5), "gflops_per_s": round(flops_total / t / 1e9, 1)} for side, t in total.items()
    }
    print(
      f"  the step's {flops_total / 1e9:.1f} GFLOP of dots: JAX {total['jax'] * 1e3:.1f} ms "
      f"({summary['jax']['gflops_per_s']} GFLOP/s), torch {total['torch'] * 1e3:.1f} ms "
      f"({summary['torch']['gflops_per_s']} GFLOP/s); JAX / torch throughput {total['torch'] / total['jax']:.2f}"
    )
    report["settings"][threads] = {
      "per_dot": rows,
      "step_dots": summary,
      "empty_call_us": {k: round(v["empty_call"] * 1e6, 1) for k, v in med.items()},
      "jax_over_torch": round(total["torch"] / total["jax"], 3),
    }
  if a.json:
    with open(a.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
