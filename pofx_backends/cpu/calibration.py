r"""A short calibration: the seconds of one forward and backward of a small Llama workload.

`measure(kernels, shapes)` builds `shapes.layers` Llama blocks (RMSNorm, grouped-query attention
with the rotary embedding over packed causal segments, a SwiGLU MLP; Touvron et al. 2023,
arXiv:2302.13971) and the chunked LM-head log-probs of `pofx.logprobs.token_logps`, all through
the injection points of `kernels` (`dense`, `attention`, `dot_general`), compiles the value and
gradient of the mean log-prob with respect to every weight, and returns the median wall time of
`repeats` calls after one warm-up call. The attention mask is a `pofx.kernels.SegmentMask` with
block lists of `shapes.block_size` tokens (0: without them), as the block-sparse layouts give.

`pofx_backends.resolve("auto")` calls it with `DEFAULT_SHAPES` (the benchmark model's widths, a
few hundred milliseconds per candidate on two cores) unless the program supplies its own
measurement of the run's step.

`measure_conv(conv, shapes)` times one forward and backward of 3x3 convolutions (`CONV_SHAPES`:
the diffusion benchmark U-Net's most frequent shapes) by a `conv_general_dilated` replacement:
the CPU backend's `conv="auto"` chooses between XLA's convolution, im2col products and the native kernels with it
(`pofx_backends.cpu.conv_choice`).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pofx import kernels as kernels_lib
from pofx import logprobs, sparse_attention


class Shapes(NamedTuple):
  """The calibration workload: `rows x length` tokens in segments of `segment` tokens."""

  rows: int = 4
  length: int = 256
  segment: int = 96
  width: int = 256
  heads: int = 8
  kv_heads: int = 4
  mlp: int = 688
  vocab: int = 4096
  layers: int = 1
  block_size: int = 64


DEFAULT_SHAPES = Shapes()


def _rms_norm(x, scale, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _inputs(shapes: Shapes, seed: int = 0):
  """Weights, hidden states, targets and the attention mask of the workload (float32)."""
  s = shapes
  hd = s.width // s.heads
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / math.sqrt(shape[0]), jnp.float32)
  layers = [
    {
      "attn_norm": jnp.ones((s.width,)),
      "mlp_norm": jnp.ones((s.width,)),
      "q": normal(s.width, s.heads * hd),
      "k": normal(s.width, s.kv_heads * hd),
      "v": normal(s.width, s.kv_heads * hd),
      "o": normal(s.heads * hd, s.width),
      "gate_up": normal(s.width, 2 * s.mlp),
      "down": normal(s.mlp, s.width),
    }
    for _ in range(s.layers)
  ]
  params = {"layers": layers, "head": normal(s.width, s.vocab)}
  x = jnp.asarray(rng.normal(size=(s.rows, s.length, s.width)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, s.vocab, (s.rows, s.length)), jnp.int32)
  position = np.arange(s.length) % s.segment
  segment_ids = np.broadcast_to(np.arange(s.length) // s.segment + 1, (s.rows, s.length)).astype(np.int32)
  blocks = None
  if s.block_size:
    blocks = sparse_attention.attention_blocks(segment_ids, None, block_size=s.block_size)
  mask = kernels_lib.SegmentMask(jnp.asarray(segment_ids), None, blocks)
  inv_freq = 10000.0 ** (-np.arange(hd // 2) / (hd // 2))
  angles = np.broadcast_to(position[:, None] * inv_freq, (s.rows, s.length, hd // 2))
  rope = (jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32))
  return params, x, targets, mask, rope


def _loss(kernels: kernels_lib.Kernels, shapes: Shapes, params, x, targets, mask, rope):
  s = shapes
  hd = s.width // s.heads
  R, L = s.rows, s.length
  for p in params["layers"]:
    h = _rms_norm(x, p["attn_norm"])
    q = kernels.dense(h, p["q"]).reshape(R, L, s.kv_heads, s.heads // s.kv_heads, hd)
    k = kernels.dense(h, p["k"]).reshape(R, L, s.kv_heads, hd)
    v = kernels.dense(h, p["v"]).reshape(R, L, s.kv_heads, hd)
    out = kernels.attention(q, k, v, mask, scale=1.0 / math.sqrt(hd), rope=rope)
    x = x + kernels.dense(out.reshape(R, L, s.heads * hd), p["o"])
    gate, up = jnp.split(kernels.dense(_rms_norm(x, p["mlp_norm"]), p["gate_up"]), 2, axis=-1)
    x = x + kernels.dense(jax.nn.silu(gate) * up, p["down"])
  logps = logprobs.token_logps(x, params["head"], targets, chunk_size=512, dot_general=kernels.dot_general).logps
  return -jnp.mean(logps)


def measure(kernels: kernels_lib.Kernels, shapes: Shapes = DEFAULT_SHAPES, *, repeats: int = 3) -> float:
  """Median seconds of one forward and backward of the workload with `kernels` (after a warm-up)."""
  params, x, targets, mask, rope = _inputs(shapes)
  step = jax.jit(jax.value_and_grad(lambda p: _loss(kernels, shapes, p, x, targets, mask, rope)))
  jax.block_until_ready(step(params))
  times = []
  for _ in range(max(int(repeats), 1)):
    start = time.perf_counter()
    jax.block_until_ready(step(params))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# (batch, size, in channels, out channels) of 3x3, stride-1, "SAME" convolutions: the diffusion
# benchmark U-Net's most frequent shapes (one step's 32 images at 16x16 and 8x8).
CONV_SHAPES = ((32, 16, 32, 32), (32, 16, 96, 32), (32, 8, 64, 64), (32, 8, 128, 64))


def measure_conv(conv, shapes=CONV_SHAPES, *, repeats: int = 3) -> float:
  """Median seconds of one forward and backward (input and kernel gradients) of NHWC / HWIO 3x3
  convolutions of `shapes` by `conv` (`jax.lax.conv_general_dilated`'s signature), all in one
  jitted call, after a warm-up call."""
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.uniform(-1, 1, (b, s, s, ci)), jnp.float32) for b, s, ci, _ in shapes]
  ws = [jnp.asarray(rng.normal(size=(3, 3, ci, co)) / math.sqrt(9 * ci), jnp.float32) for _, _, ci, co in shapes]
  gs = [jnp.asarray(rng.normal(size=(b, s, s, co)), jnp.float32) for b, s, _, co in shapes]

  def loss(xs, ws):
    outs = [conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) for x, w in zip(xs, ws)]
    return sum(jnp.vdot(o, g) for o, g in zip(outs, gs))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(xs, ws))
  times = []
  for _ in range(max(int(repeats), 1)):
    start = time.perf_counter()
    jax.block_until_ready(step(xs, ws))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
