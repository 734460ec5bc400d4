"""Variants of pofx's Diffusion-DPO step, compiled in one process and timed in alternating blocks.

    python benchmarks/diffusion_variants.py VARIANT [VARIANT ...] [--rounds 6] [--block 5] [--kernels cpu]
    python benchmarks/diffusion_variants.py VARIANT [VARIANT ...] --memory      # each in its own process

A VARIANT is a JSON object of XLA compile options (`.compile(compiler_options=...)`), e.g.
`'{}'` (XLA's defaults) or `'{"xla_cpu_multi_thread_eigen": false}'`, plus two keys of this
script: `"_silu": "tanh"` builds the U-Net with SiLU written as `x (1 + tanh(x / 2)) / 2` instead
of `jax.nn.silu` (the same function), and `"_chunks": n` (1, 2 or 4; default 1) calls the denoiser
on n equal slices of the batch (`diffusion_step.py --denoiser_calls n`,
`pofx_backends.cpu.split.split_batch`: independent computations the executor may run side by
side). `_conv_split: n` splits each convolution over n slices of its batch instead, and
`_ref_whole: true` keeps the reference's forward as one call while the policy's is split. With
`--kernels cpu`, `"_conv"` names the CPU backend's convolution (`pofx_backends.cpu.CONVS`; default
"native", its direct 3x3 kernels) and `"_attention": false` gives its attention to XLA
(`pofx_backends.kernels("cpu", attention=False)`). Changes to the step: `"_optimizer"` "flat" or
"per_leaf" (optax's AdamW on one flat vector or array by array instead of `diffusion_step.py`'s
default with the cpu kernels, the backend's native AdamW: `diffusion_step.py --optimizer`),
`"_guard": false` (`make_train_step(guard_nonfinite=False)`),
`"_heads": "together"` (the U-Net's self-attention with its q, k, v and output projections over all
heads at once and one attention call for all heads, instead of one call per head with column
slices of the projections). Upper bounds, which change what the step computes: `"_attention_core":
"identity"` (each head's `softmax(q k^T) v` replaced by `v`: what the attention itself costs) and
`"_conv_bias": false` (the convolutions' bias additions left out: what fusing them could save).
`"_native_conv": "wide_stride1"` (with `--kernels cpu` and the native convolution) restores the
native convolution's scope before the stride-2, narrow and Winograd kernels: only stride-1
convolutions with channels that are multiples of 16 are native, by direct sums, and their input
gradient's flipped kernel is transposed by XLA before the forward kernel's call. `"_winograd":
false` keeps today's scope with direct sums instead of Winograd's F(2x2, 3x3)
(`pofx_backends.cpu.conv.DirectConv(winograd=False)`).

The step is `diffusion_step.PofxStep` (`benchmarks/diffusion_step.py`: the `bench` U-Net, 16 pairs,
the library's train step with a frozen reference). Every variant is compiled first, then the
variants run `--block` steps each in turn for `--rounds` rounds, the order reversed every other
round, so that a change in the machine's speed during the run reaches all of them alike: the
figure to compare variants on a machine whose speed drifts (the comparison against diffusers is
`diffusion_step.py`). Reported per variant: the median and fastest step (wall ms, the steps of
all rounds) and pairs/s. With `--memory` each variant instead runs alone in a child process
(`diffusion_step.py`'s protocol: the image program's start-up, the eager initialisation's executables
freed before compiling) and reports its peak RSS (`ru_maxrss`) after `--steps` steps: a
process's high-water mark cannot be shared between variants. `--profile` adds, per variant, a
trace of 3 steps: the executed thunks' time by kind of operation (`diffusion_cpu.py`'s
classification) and the busy time of each executor thread, against the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

OWN_KEYS = (
  "_silu",
  "_chunks",
  "_conv_split",
  "_ref_whole",
  "_conv",
  "_attention",
  "_optimizer",
  "_guard",
  "_heads",
  "_attention_core",
  "_conv_bias",
  "_native_conv",
  "_winograd",
)
# The allowed values of the keys that name a choice (the first is the default).
CHOICES = {
  "_attention": (True, False),
  "_optimizer": ("auto", "native", "flat", "per_leaf"),
  "_guard": (True, False),
  "_heads": ("one_by_one", "together"),
  "_attention_core": ("softmax", "identity"),
  "_conv_bias": (True, False),
  "_native_conv": ("all", "wide_stride1"),
  "_winograd": (True, False),
}


def parser():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("variants", nargs="+", help="JSON objects: XLA compile options plus _silu / _chunks")
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--block", type=int, default=5, help="steps per variant per round")
  ap.add_argument(
    "--kernels",
    choices=["xla", "cpu"],
    default="cpu",
    help="cpu: the CPU backend (its convolution: the variant's _conv)",
  )
  ap.add_argument("--memory", action="store_true", help="peak RSS of each variant in its own process")
  ap.add_argument("--steps", type=int, default=10, help="--memory: steps before reading the peak")
  ap.add_argument("--profile", action="store_true", help="trace 3 steps of each variant: time per kind and thread")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return ap


def parse_variant(text: str) -> dict:
  try:
    spec = json.loads(text)
  except json.JSONDecodeError as e:
    raise SystemExit(f"diffusion_variants.py: variant {text!r} is not JSON ({e}).") from None
  if not isinstance(spec, dict):
    raise SystemExit(f"diffusion_variants.py: variant {text!r} must be a JSON object of compile options.")
  if spec.get("_silu", "logistic") not in ("logistic", "tanh"):
    raise SystemExit(f"diffusion_variants.py: _silu={spec['_silu']!r}; allowed: 'logistic', 'tanh'.")
  chunks = spec.get("_chunks", 1)
  if chunks not in (1, 2, 4) or isinstance(chunks, bool):
    raise SystemExit(
      f"diffusion_variants.py: _chunks={chunks!r}; allowed: 1, 2, 4 (diffusion_step.py --denoiser_calls)."
    )
  from pofx_backends import cpu

  if spec.get("_conv", "native") not in cpu.CONVS:
    raise SystemExit(f"diffusion_variants.py: _conv={spec['_conv']!r}; allowed: {', '.join(cpu.CONVS)}.")
  for key, allowed in CHOICES.items():
    if key in spec and (spec[key] not in allowed or type(spec[key]) is not type(allowed[0])):
      raise SystemExit(f"diffusion_variants.py: {key}={spec[key]!r}; allowed: {', '.join(map(repr, allowed))}.")
  return spec


def _model_changes(spec: dict):
  """{name: replacement} of `pofx.diffusion.unet`'s functions for the variant's model changes (in
  place while the variant is built and compiled; `_attention_core` overrides `_heads`)."""
  from pofx.diffusion import unet

  multi_head = unet._multi_head
  changes = {}
  if spec.get("_heads", "one_by_one") == "together":

    def together(h, p, heads, hd, kernels, dtype):  # the transformers' `_multi_head`, on full-width products
      q, k, v = (kernels.dense(h, p[n]["kernel"], dtype) + p[n]["bias"].astype(dtype) for n in ("to_q", "to_k", "to_v"))
      o = multi_head(q, k, v, heads, hd, kernels, dtype)
      return kernels.dense(o, p["to_out"][0]["kernel"], dtype) + p["to_out"][0]["bias"].astype(dtype)

    changes["_head_by_head"] = together
  if spec.get("_attention_core", "softmax") == "identity":

    def values_only(h, p, heads, hd, kernels, dtype):
      out = None
      for i in range(heads):
        cols = slice(i * hd, (i + 1) * hd)
        v = kernels.dense(h, p["to_v"]["kernel"][:, cols], dtype) + p["to_v"]["bias"][cols].astype(dtype)
        part = kernels.dense(v, p["to_out"][0]["kernel"][cols, :], dtype)
        out = part if out is None else out + part
      return out + p["to_out"][0]["bias"].astype(dtype)

    changes["_head_by_head"] = values_only
  if not spec.get("_conv_bias", True):

    def bias_free(x, p, kernels, dtype, *, stride=1, padding=None):
      k = p["kernel"].shape[0]
      padding = ((k // 2, k // 2), (k // 2, k // 2)) if padding is None else padding
      return kernels.conv_general_dilated(
        x.astype(dtype),
        p["kernel"].astype(dtype),
        window_strides=(stride, stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )

    changes["_conv"] = bias_free
  return changes


def _wide_stride1_conv():
  """The CPU backend's `DirectConv` as it was before the stride-2, narrow and Winograd kernels
  (`_native_conv`)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pofx_backends.cpu import conv as conv_lib
  from pofx_backends.cpu import native

  def call(x, w):
    out = jax.ShapeDtypeStruct(x.shape[:3] + (w.shape[3],), jnp.float32)
    return jax.ffi.ffi_call("pofx_conv3x3_fwd", out, vmap_method="sequential")(x, w, stride=np.int64(1), winograd=False)

  @jax.custom_vjp
  def conv3x3(x, w):
    return call(x, w)

  def bwd(res, g):
    x, w = res
    d_w = jax.ffi.ffi_call("pofx_conv3x3_kernel_grad", jax.ShapeDtypeStruct(w.shape, jnp.float32))(
      x, g, stride=np.int64(1), winograd=False
    )
    return call(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)), d_w

  conv3x3.defvjp(lambda x, w: (call(x, w), (x, w)), bwd)

  def conv(lhs, rhs, window_strides, padding, *args, dimension_numbers=None, **kwargs):
    stride = conv_lib._native_stride(lhs, rhs, window_strides, padding, None, None, 1, 1)
    wide = lhs.shape[-1] % 16 == 0 and rhs.shape[-1] % 16 == 0 and lhs.dtype == jnp.float32
    if not args and not kwargs and stride == 1 and wide and dimension_numbers == ("NHWC", "HWIO", "NHWC"):
      native.load()
      return conv3x3(lhs, rhs)
    return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, *args, dimension_numbers=dimension_numbers, **kwargs
    )

  return conv


def build(spec: dict, kernels_name: str):
  """A compiled `PofxStep` for one variant."""
  import diffusion_step
  import jax
  import jax.numpy as jnp

  import pofx_backends
  from pofx.diffusion import pairs, unet
  from pofx_backends.cpu import host_memory

  options = {k: v for k, v in spec.items() if k not in OWN_KEYS}
  silu = spec.get("_silu", "logistic")
  chunks = spec.get("_chunks", 1)
  saved_act = dict(unet._ACT)
  if silu == "tanh":
    unet._ACT["silu"] = unet._ACT["swish"] = lambda x: x * (0.5 + 0.5 * jnp.tanh(0.5 * x))
  changes = _model_changes(spec)
  saved = {name: getattr(unet, name) for name in changes}
  for name, fn in changes.items():
    setattr(unet, name, fn)
  try:
    # The denoiser split is diffusion_step's own (`--denoiser_calls`, pofx_backends.cpu.split).
    a = diffusion_step.parse(
      ["--side", "pofx", "--kernels", kernels_name, "--denoiser_calls", str(chunks)]
      + ["--optimizer", spec.get("_optimizer", "auto")]
    )
    if kernels_name == "xla":
      kernels = pofx_backends.kernels("xla")
    else:
      kernels = pofx_backends.kernels("cpu", conv=spec.get("_conv", "native"), attention=spec.get("_attention", True))
    if not spec.get("_winograd", True):
      from pofx_backends.cpu import conv as conv_lib

      kernels = kernels._replace(conv_general_dilated=conv_lib.DirectConv(winograd=False))
    if spec.get("_native_conv", "all") == "wide_stride1":
      kernels = kernels._replace(conv_general_dilated=_wide_stride1_conv())
    split = spec.get("_conv_split", 1)
    if split > 1:
      conv = kernels.conv_general_dilated

      def split_conv(lhs, rhs, *args, **kw):
        return jnp.concatenate([conv(part, rhs, *args, **kw) for part in jnp.split(lhs, split)])

      kernels = kernels._replace(conv_general_dilated=split_conv)
    bench = diffusion_step.PofxStep(a, kernels)
    if spec.get("_ref_whole") or not spec.get("_guard", True):
      from pofx import perturbations, references, train

      if spec.get("_ref_whole"):  # the reference's forward as one call, only the policy's split
        whole = pairs.make_logps_fn(bench.model.denoise, bench.schedule)
        bench.reference = pairs.check_reference(references.frozen(jax.tree.map(jnp.array, bench.params), whole))
      bench.step = train.make_train_step(
        bench.logps_fn,
        bench.optimizer,
        loss="dpo",
        loss_hyper={"beta": diffusion_step.BETA},
        reference=bench.reference,
        guard_nonfinite=spec.get("_guard", True),
      )
      bench.state = train.init_state(
        bench.params, bench.optimizer, bench.reference, perturbations.none(), loss="dpo", rng=jax.random.key(0)
      )
    jax.clear_caches()
    host_memory.release_freed_memory()
    bench.compiled = bench.step.lower(bench.state, bench.batch(), jax.random.key(0)).compile(
      compiler_options=options or None
    )
  finally:
    unet._ACT.clear()
    unet._ACT.update(saved_act)
    for name, fn in saved.items():
      setattr(unet, name, fn)
  jax.clear_caches()
  host_memory.release_freed_memory()
  return bench


def child(a) -> None:
  import pofx_backends

  pofx_backends.startup(single_arena=False)
  bench = build(parse_variant(a.variants[0]), a.kernels)
  times = bench.run(a.steps)
  print(
    json.dumps(
      {
        "maxrss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "median_ms": 1e3 * statistics.median(times),
      }
    )
  )


def memory(a) -> None:
  for text in a.variants:
    parse_variant(text)
    cmd = [sys.executable, os.path.abspath(__file__), text, "--child", "--kernels", a.kernels, "--steps", str(a.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode:
      print(f"{text}: failed\n{out.stderr[-1500:]}")
      continue
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(
      f"{text:<100} peak RSS {res['maxrss_MiB']:7.1f} MiB  (median step {res['median_ms']:.1f} ms, alone)", flush=True
    )


def profile(text: str, bench) -> None:
  """Traces 3 steps (`diffusion_cpu.thunk_times`): the executed thunks' time by the kind of their
  HLO instruction and by executor thread, in ms per step, and the wall time of a traced step."""
  import time

  import diffusion_cpu

  walls = []

  def run():
    t = time.perf_counter()
    bench.run(3)
    walls.append((time.perf_counter() - t) / 3)

  by_kind, by_thread = diffusion_cpu.thunk_times(bench.compiled, run)
  wall = walls[0]
  print(
    f"{text}: traced {sum(by_kind.values()) / 3e6:.1f} ms of thunks per step, {1e3 * wall:.1f} ms wall per traced step"
  )
  for kind, ns in by_kind.most_common():
    print(f"  {kind:<55} {ns / 3e6:7.1f} ms")
  for i, (_, ns) in enumerate(by_thread.most_common()):
    print(f"  thread {i}: busy {ns / 3e6:7.1f} ms")


def timing(a) -> None:
  import pofx_backends

  pofx_backends.startup(single_arena=False)
  runs = []
  for text in a.variants:
    bench = build(parse_variant(text), a.kernels)
    bench.run(3)
    runs.append((text, bench, []))
  for r in range(a.rounds):
    for _text, bench, times in runs if r % 2 == 0 else runs[::-1]:
      times.extend(bench.run(a.block))
  if a.profile:
    for text, bench, _ in runs:
      profile(text, bench)
  pairs_per_step = runs[0][1].a.pairs
  for text, _, times in runs:
    med = statistics.median(times)
    print(
      f"{text:<100} median {1e3 * med:6.1f} ms  fastest {1e3 * min(times):6.1f} ms  {pairs_per_step / med:6.1f} pairs/s"
    )


def main(argv=None):
  a = parser().parse_args(argv)
  if a.rounds < 1 or a.block < 1 or a.steps < 1:
    raise SystemExit("diffusion_variants.py: --rounds, --block and --steps must be >= 1.")
  if a.child:
    child(a)
  elif a.memory:
    memory(a)
  else:
    for text in a.variants:
      parse_variant(text)
    timing(a)


if __name__ == "__main__":
  main()
