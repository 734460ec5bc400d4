"""Accelerator attention on the device at hand: equal to the XLA path, and how fast, in one short run.

    python benchmarks/device_check.py [--no_step] [--batch 4] [--length 2048] [--heads 32]
        [--kv_heads 8] [--head_dim 64] [--calls 5] [--budget 280]
    python benchmarks/device_check.py --smoke {gpu,tpu}       # tiny shapes, runnable on CPU

On a GPU (`pofx_backends.gpu`: `jax.nn.dot_product_attention`, cuDNN flash attention for bfloat16)
or a TPU (`pofx_backends.tpu`: Pallas splash attention), for the three row layouts (fused: one
sequence per row then padding; packed: several sequences per row; prompt-shared: a prompt and two
completions that see it and not each other) and two dtypes (bfloat16, float32):

- checks the backend's attention and `pofx.kernels.xla_attention` in the same dtype against the
  same XLA attention in float32 at the highest matmul precision: the output and the gradients in
  q, k and v of a fixed random projection of the output. The backend passes when its largest
  error is at most twice XLA's own (plus a floor of 1e-3 relative to the largest entry), since
  reduced-precision inputs (and TPU's default float32 matmuls) round differently on each path;
- times both, forward alone and forward plus backward (medians of `--calls` jitted calls), and
  prints a table with the speed-up;
- then, unless `--no_step`, times `benchmarks/dpo_step.py --preset llama3_1b --dtype bfloat16`
  for a few steps with `--kernels xla` and with the device's backend and prints their pairs/s,
  only as far as the time left of `--budget` seconds (the whole script's) allows: each run gets
  half of what is left, and none starts with under 60 s.

Sized to finish in under 5 minutes on one H100/H200 (the default shapes are Llama 3.2 1B's
attention: 32 query heads, 8 key/value heads, head dimension 64, rows of 2048 tokens). It was
written without access to a GPU or TPU: its device runs are still to be made. Exit status 1 when
a check fails; on a machine without an accelerator it stops with one line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pofx import kernels as kernels_lib  # noqa: E402
from pofx_backends import gpu, tpu  # noqa: E402

LAYOUTS = ("fused", "packed", "prompt_shared")
DTYPES = ("bfloat16", "float32")


def layout_masks(layout: str, batch: int, length: int, seed: int = 0) -> kernels_lib.SegmentMask:
  """Segment (and branch) ids of `batch` rows of `length` tokens in one of the three layouts."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, length), np.int32)
  br = np.zeros((batch, length), np.int32)
  for r in range(batch):
    if layout == "fused":
      n = int(rng.integers(length // 2, length + 1))
      seg[r, :n] = 1
    elif layout == "packed":
      pos, s = 0, 1
      while pos < length - 16:
        n = int(rng.integers(16, max(17, length // 3)))
        seg[r, pos : pos + n] = s
        pos, s = pos + n, s + 1
    else:
      pos, s = 0, 1
      while pos < length - 48:
        p, c, j = (int(rng.integers(16, max(17, length // 8))) for _ in range(3))
        if pos + p + c + j > length:
          break
        seg[r, pos : pos + p + c + j] = s
        br[r, pos + p : pos + p + c] = 1
        br[r, pos + p + c : pos + p + c + j] = 2
        pos, s = pos + p + c + j, s + 1
  if layout == "prompt_shared":
    return kernels_lib.SegmentMask(jnp.asarray(seg), jnp.asarray(br))
  return kernels_lib.SegmentMask(jnp.asarray(seg))


def value_and_grads_fn(attention, scale):
  """jit of (q, k, v, mask, w) -> (out, (dq, dk, dv)) for the loss sum(out * w)."""

  def run(q, k, v, mask, w):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, scale=scale), q, k, v)
    return out, vjp(w.astype(out.dtype))

  return jax.jit(run)


def forward_fn(attention, scale):
  return jax.jit(lambda q, k, v, mask: attention(q, k, v, mask, scale=scale))


def median_ms(fn, args, calls: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def max_error(values, reference) -> float:
  """Largest |value - reference| over the output and the three gradients, relative to the largest |reference|."""
  errs = []
  for x, ref in zip(jax.tree_util.tree_leaves(values), jax.tree_util.tree_leaves(reference)):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    errs.append(float(np.max(np.abs(x - ref))) / max(float(np.max(np.abs(ref))), 1e-30))
  return max(errs)


def check_attention(backend_kernels, a) -> bool:
  B, L, K, hd = a.batch, a.length, a.kv_heads, a.head_dim
  G = a.heads // a.kv_heads
  scale = kernels_lib.default_scale(hd)
  rng = np.random.default_rng(0)
  base = [rng.standard_normal(s, np.float32) for s in ((B, L, K, G, hd), (B, L, K, hd), (B, L, K, hd))]
  w = jnp.asarray(rng.standard_normal((B, L, K, G, hd), np.float32))
  print(
    f"attention: {backend_kernels.name} vs XLA; B={B} L={L} heads={a.heads} kv_heads={K} head_dim={hd}; "
    f"errors relative to XLA float32 at highest precision; times are medians of {a.calls} calls"
  )
  header = (
    f"{'layout':14s} {'dtype':9s} {'err ' + backend_kernels.name:>10s} {'err xla':>10s} "
    f"{'fwd ms':>8s} {'xla fwd':>8s} {'f+b ms':>8s} {'xla f+b':>8s} {'f+b x':>6s}  ok"
  )
  print(header)
  ok_all = True
  # One jitted function each, reused across layouts and dtypes (fused and packed masks share a compile).
  reference_vg = value_and_grads_fn(kernels_lib.xla_attention, scale)
  accel_vg, xla_vg = (value_and_grads_fn(f, scale) for f in (backend_kernels.attention, kernels_lib.xla_attention))
  accel_fwd, xla_fwd_fn = (forward_fn(f, scale) for f in (backend_kernels.attention, kernels_lib.xla_attention))
  f32 = [jnp.asarray(x) for x in base]
  for layout in LAYOUTS:
    mask = layout_masks(layout, B, L)
    with jax.default_matmul_precision("highest"):
      reference = jax.device_get(reference_vg(*f32, mask, w))
    for dtype in DTYPES:
      q, k, v = (x.astype(dtype) for x in f32)
      err_accel = max_error(accel_vg(q, k, v, mask, w), reference)
      err_xla = max_error(xla_vg(q, k, v, mask, w), reference)
      ok = bool(np.isfinite(err_accel)) and err_accel <= 2 * err_xla + 1e-3
      ok_all &= ok
      fwd = median_ms(accel_fwd, (q, k, v, mask), a.calls)
      xla_fwd = median_ms(xla_fwd_fn, (q, k, v, mask), a.calls)
      fb = median_ms(accel_vg, (q, k, v, mask, w), a.calls)
      xla_fb = median_ms(xla_vg, (q, k, v, mask, w), a.calls)
      print(
        f"{layout:14s} {dtype:9s} {err_accel:10.2e} {err_xla:10.2e} {fwd:8.2f} {xla_fwd:8.2f} {fb:8.2f} "
        f"{xla_fb:8.2f} {xla_fb / fb:6.2f}  {'yes' if ok else 'NO'}",
        flush=True,
      )
  return ok_all


def step_timing(backend: str, deadline: float) -> None:
  """`dpo_step.py` on Llama 3.2 1B in bfloat16 with --kernels xla and with the device backend: pairs/s."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo_step.py")
  print("dpo_step.py --preset llama3_1b --dtype bfloat16 --steps 6 --warmup 2")
  for i, kernels in enumerate(("xla", backend)):
    timeout = (deadline - time.perf_counter()) / (2 - i)
    if timeout < 60:
      print(f"  --kernels {kernels}: skipped ({timeout:.0f} s of the budget left for it)")
      continue
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
      cmd = [
        sys.executable,
        script,
        "--preset",
        "llama3_1b",
        "--dtype",
        "bfloat16",
        "--steps",
        "6",
        "--warmup",
        "2",
        "--kernels",
        kernels,
        "--json",
        out.name,
      ]
      t = time.perf_counter()
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
      except subprocess.TimeoutExpired:
        print(f"  --kernels {kernels}: stopped after {timeout:.0f} s")
        continue
      wall = time.perf_counter() - t
      if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        print(f"  --kernels {kernels}: exit {proc.returncode}: {last[0]}")
        continue
      with open(out.name) as f:
        res = json.load(f)
      keys = ("pairs_per_s", "real_tokens_per_s", "mfu", "compile_s")
      print(f"  --kernels {kernels}: " + ", ".join(f"{k}={res[k]}" for k in keys if k in res) + f" (run {wall:.0f} s)")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--length", type=int, default=2048)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--kv_heads", type=int, default=8)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--calls", type=int, default=5, help="timed calls per figure (median)")
  ap.add_argument("--no_step", action="store_true", help="skip the dpo_step.py timing")
  ap.add_argument("--budget", type=float, default=280.0, help="seconds for the whole script (the step runs fit in it)")
  ap.add_argument(
    "--smoke",
    choices=["gpu", "tpu"],
    default=None,
    help="tiny shapes with the CPU-runnable form of that backend (XLA implementation / interpreter)",
  )
  a = ap.parse_args(argv)
  platform = jax.default_backend()
  if a.smoke:
    a.batch, a.length, a.heads, a.kv_heads, a.head_dim, a.calls, a.no_step = 2, 40, 4, 2, 16, 1, True
    backend_kernels = gpu.kernels(implementation="xla") if a.smoke == "gpu" else tpu.kernels(interpret=True)
    backend = a.smoke
  elif platform == "gpu":
    backend, backend_kernels = "gpu", gpu.kernels()
  elif platform == "tpu":
    backend, backend_kernels = "tpu", tpu.kernels()
  else:
    print(
      f"device_check: needs a GPU or TPU; the JAX backend here is {platform!r} (try --smoke gpu on CPU)",
      file=sys.stderr,
    )
    return 2
  if a.heads % a.kv_heads:
    raise SystemExit(f"device_check: --heads {a.heads} must be a multiple of --kv_heads {a.kv_heads}")
  t = time.perf_counter()
  print(f"device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}")
  ok = check_attention(backend_kernels, a)
  print(f"attention checks: {'all passed' if ok else 'FAILED'} in {time.perf_counter() - t:.0f} s")
  if not a.no_step:
    step_timing(backend, t + a.budget)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
