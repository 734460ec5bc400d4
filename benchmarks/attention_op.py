"""The block-sparse attention op alone, on one layer's shapes of the benchmark workloads.

    [XLA_FLAGS=...] python benchmarks/attention_op.py [--workload fixed,variable] [--calls 21]
        [--kernels {xla,cpu}] [--no_startup] [--json PATH]

For the first 8 pairs of each workload, laid out as `dpo_step.py` lays them out by default
(fixed: prompt-shared rows of 192 tokens; variable: the 8 pairs packed in one row of bucketed
length), with the bench model's heads (8 query heads, 4 key/value heads, head dimension 32) and
64-token blocks, times the attention injection point of `--kernels` (`xla`:
`pofx.kernels.xla_attention`, i.e. `pofx.sparse_attention.block_sparse_attention`; `cpu`: the fused
AVX-512 kernels of `pofx_backends.cpu`) forward, and forward plus backward (the gradient
with respect to q, k and v of a fixed random projection of the output),
as medians over `--calls` jitted calls. Also prints the block pairs computed and the op's dot
FLOPs (2 dots forward; forward plus backward counted as 7: the forward's 2, the recomputed
scores, dP, dQ, dK, dV), so the achieved GFLOP/s of the op can be read off. XLA flags are
process-wide: compare settings by running the script once per setting, alternating.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dpo_step  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 4, 32, 64


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workload", default="fixed,variable")
  ap.add_argument("--calls", type=int, default=21)
  ap.add_argument("--kernels", choices=["xla", "cpu"], default="xla")
  ap.add_argument("--no_startup", action="store_true", help="skip pofx_backends.startup() (glibc's defaults)")
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  workloads = [w.strip() for w in a.workload.split(",") if w.strip()]
  if a.calls < 1 or not workloads or any(w not in ("fixed", "variable") for w in workloads):
    ap.error(f"need --calls >= 1 and --workload from fixed, variable (got {a.calls}, {a.workload!r}).")
  if not a.no_startup:
    dpo_step.pofx_backends.startup()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pofx import batching
  from pofx import kernels as kernels_lib

  attention = dpo_step.pofx_backends.kernels(a.kernels).attention

  def timed(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(a.calls):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t)
    return statistics.median(times)

  report = {
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "kernels": a.kernels,
    "startup": not a.no_startup,
    "workloads": {},
  }
  for wl in workloads:
    base = dpo_step.parse(["--workload", wl])
    data = dpo_step.dataset(wl)
    pairs = dpo_step.make_pairs(
      base.layout,
      data,
      list(range(8)),
      row_length=base.row_length,
      completion_bucket=base.completion_bucket,
      per_doubling=base.per_doubling,
      block_size=BLOCK,
    )
    seg, br = np.asarray(pairs.segment_ids), np.asarray(pairs.branch_ids)
    R, L = seg.shape
    blocks = batching.attention_blocks(pairs, block_size=BLOCK, bucket=dpo_step.GEOMETRIC[base.per_doubling])
    mask = kernels_lib.SegmentMask(seg, br, blocks)
    ks = jax.random.split(jax.random.key(0), 4)
    G = HEADS // KV_HEADS
    q = jax.random.normal(ks[0], (R, L, KV_HEADS, G, HEAD_DIM)) / HEAD_DIM**0.5
    k = jax.random.normal(ks[1], (R, L, KV_HEADS, HEAD_DIM))
    v = jax.random.normal(ks[2], (R, L, KV_HEADS, HEAD_DIM))
    proj = jax.random.normal(ks[3], q.shape) * jnp.asarray(seg > 0, jnp.float32)[:, :, None, None, None]

    # q is pre-scaled (scale 1), no rotary embedding: the op alone.
    fwd = jax.jit(lambda q, k, v: attention(q, k, v, mask, scale=1.0))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, scale=1.0) * proj), argnums=(0, 1, 2)))
    t_fwd, t_both = timed(fwd, q, k, v), timed(grad, q, k, v)
    dot_flops = 2 * blocks.num_pairs * HEADS * BLOCK * BLOCK * HEAD_DIM  # one [b, hd] x [hd, b] per head
    row = {
      "rows": R,
      "row_length": L,
      "block_pairs": blocks.num_pairs,
      "fwd_ms": round(t_fwd * 1e3, 2),
      "fwd_bwd_ms": round(t_both * 1e3, 2),
      "fwd_gflops_per_s": round(2 * dot_flops / t_fwd / 1e9, 1),
      "fwd_bwd_gflops_per_s": round(7 * dot_flops / t_both / 1e9, 1),
    }
    report["workloads"][wl] = row
    print(
      f"{wl}: rows {R} x {L}, {blocks.num_pairs} block pairs; forward {row['fwd_ms']} ms "
      f"({row['fwd_gflops_per_s']} GFLOP/s), forward + backward {row['fwd_bwd_ms']} ms "
      f"({row['fwd_bwd_gflops_per_s']} GFLOP/s)",
      flush=True,
    )
  if a.json:
    with open(a.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
