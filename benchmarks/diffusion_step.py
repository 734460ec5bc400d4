"""pofx's Diffusion-DPO train step against diffusers' (`diffusers_dpo_baseline.py`), side by side.

    python benchmarks/diffusion_step.py [--reps 3] [--steps 30] [--warmup 5] [--kernels auto]
        [--json PATH] [--markdown PATH]                        # both sides, alternating (the comparison)
    python benchmarks/diffusion_step.py --side pofx [--preset bench|large|tiny] [--dtype float32|bfloat16]
        [--pairs 16] [--kernels {auto,xla,cpu,gpu,tpu}] [--conv {xla,im2col,native}] [--products {xla,blas,blas_all}]
        [--cpu_attention {on,off}] [--cpu_group_norm {on,off}] [--compile {auto,default,low_memory}] [--conv_threads {auto,one,all}]
        [--denoiser_calls {auto,1,2,4}]
        [--breakdown] [--json PATH]

**The comparison** (default, `--side both`): every run is a separate process, either
`diffusers_dpo_baseline.py` (diffusers 0.42's UNet2DModel on PyTorch, unchanged: `--pairs 16
--size 16 --channels 1`) or this script with `--side pofx`; each repetition runs both, the order
reversed on every other repetition so that both see the same machine conditions. Reported: each
side's median pairs per second and peak RSS over the repetitions, the ratio of the medians and
the median of the per-repetition ratios (each from two adjacent runs: the figure to trust on a
loaded machine), the load average around every run, the CPU model, and pofx's processed FLOPs,
achieved FLOP/s, the float32 matmul rate and where its step's time goes (from one `--breakdown`
run after the repetitions). Nothing is set in the children's environment (glibc's `MALLOC_*` and
`GLIBC_TUNABLES` are removed): each side runs as its documented command.

**pofx's side** (`--side pofx`): the same model and batch as the baseline: the `bench` preset of
`pofx.diffusion.unet` (diffusers' `UNet2DModel` with the baseline's `unet_config(16, 1)`:
16x16x1 images, block channels 32, 64, 64, attention at the two coarser resolutions, 10 classes;
1.16 M parameters), float32; 16 pairs per step of random images uniform in [-1, 1] with random
class labels and a fresh noise key per pair (host-built inside the timed loop, as the baseline
draws its tensors inside its step); DDPM's linear schedule with T = 1000
(`pofx.diffusion.schedules.linear`, diffusers' `DDPMScheduler(num_train_timesteps=1000)`); the
pair errors of `pofx.diffusion.pairs.make_logps_fn` and the library's train step
(`pofx.train.make_train_step`, loss "dpo" with beta 5000, a `frozen` reference whose forward runs
every step, AdamW lr 1e-5 with PyTorch's defaults: betas 0.9, 0.999, eps 1e-8, weight decay 0.01;
`--optimizer`: with the cpu kernels by default the CPU backend's AdamW, one native kernel that
applies the step to every array in place, `pofx_backends.cpu.optimizers.adamw`; otherwise by default
optax's AdamW on one flat vector of all the parameters, `optax.flatten`: the same elementwise update
in one operation instead of a few per array; `--optimizer per_leaf` applies optax's array by array).
That is `-log sigmoid(-beta/2 ((e_w - e_ref_w) - (e_l - e_ref_l)))` with e the per-image mean
squared noise-prediction error, the baseline's loss. It first applies the image program's
start-up, `pofx_backends.startup(single_arena=False)` (`--startup language`: one malloc arena, as
the language programs; `none`: glibc's defaults), and, as a training program should with it,
hands the heap's free pages back after the compilation and after the first step
(`pofx_backends.cpu.host_memory.release_after_first_step`), then resolves `--kernels` ("auto": on
the CPU the faster of "xla" and "cpu" timed on this step, each candidate in a child process; `--conv`, `--products`, `--cpu_attention`, `--cpu_group_norm` set the CPU
backend's options: `pofx_backends.cpu`). Steady state: the first `--warmup` of `--steps` steps excluded, the
median step time, as the baseline. Reported: pairs/s, peak RSS (before the breakdown), the step's
FLOPs both analytically (`pofx.diffusion.unet.flops`: reference forward + policy forward and
backward = 4 forwards of the 2B images) and by XLA's cost analysis of the compiled step, the
achieved FLOP/s (analytic count / median step time), a float32 2048^3 matmul by XLA in the same
process and the fraction of it achieved, the MFU against the dense bf16 peak on a known
accelerator (`pofx.flops`), the compile time, and the CPU threads the process may use. With
`--breakdown`, where the step's time goes: the reference forward, the policy forward and
backward, the optimizer update, each jitted alone on the same batch (medians), and the rest
(the step's loss, metrics and non-finite guard, host batch building and dispatch).

How pofx's step is built and compiled on the CPU: `--compile low_memory` compiles with
`pofx_backends.cpu.LOW_MEMORY_COMPILER_OPTIONS` (XLA:CPU's older emitters, the module compiled as
one piece: a lower peak RSS and a longer compilation), `--compile default` with XLA's defaults;
`--conv_threads all` adds `pofx_backends.cpu.THREADED_CONV_COMPILER_OPTIONS` (each convolution is
XLA's own, split over all threads, instead of XLA:CPU's default YNNPACK call on one thread: `one`);
`--denoiser_calls n` computes the pair errors' denoiser call on [chosen; rejected] as n independent
calls on slices of the batch (`pofx_backends.cpu.split.split_batch`). All default to "auto": on
JAX's CPU platform the low-memory options, threaded convolutions and one call (the setting
measured fastest with the lowest peak RSS on the 2-core machine: docs/benchmarks.md); elsewhere
XLA's defaults and one call. `--compile default --conv_threads one` is the step as `jax.jit`
gives it with no CPU-backend choice.

`--preset large` (DDPM's CIFAR-10 U-Net with 10 classes, 32x32x3, 35.75 M parameters) with `--dtype bfloat16` is the
accelerator figure: there is no baseline run for it (the baseline script only builds its own
model), only pofx's side and its MFU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

BASELINE = os.path.join(HERE, "diffusers_dpo_baseline.py")
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES",)
ALLOCATOR_PREFIXES = ("MALLOC_",)
NUM_CLASSES = 10
BETA = 5000.0
LEARNING_RATE = 1e-5


def parser():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--side", choices=["both", "pofx", "diffusers"], default="both")
  ap.add_argument("--reps", type=int, default=3, help="repetitions of the comparison (each runs both sides)")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--warmup", type=int, default=5, help="first steps excluded (as the baseline)")
  ap.add_argument("--pairs", type=int, default=16, help="preference pairs per step")
  ap.add_argument("--preset", default="bench", help="pofx.diffusion.unet.PRESETS name (the baseline: bench)")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the U-Net's compute dtype")
  ap.add_argument(
    "--kernels",
    choices=["auto", "xla", "cpu", "gpu", "tpu"],
    default="auto",
    help="kernel backend (pofx_backends): auto = the faster of xla and cpu timed on this step on the CPU",
  )
  ap.add_argument(
    "--conv",
    choices=["xla", "im2col", "native"],
    default=None,
    help="the CPU backend's convolution (pofx_backends.cpu.conv; default: the backend's)",
  )
  ap.add_argument(
    "--products",
    choices=["xla", "blas", "blas_all"],
    default=None,
    help="the CPU backend's products (pofx_backends.cpu: which go to a BLAS; default: the backend's)",
  )
  ap.add_argument(
    "--cpu_attention",
    choices=["on", "off"],
    default=None,
    help="the CPU backend's attention kernels (the U-Net's: its full-attention kernels; off: pofx.kernels.xla_attention)",
  )
  ap.add_argument(
    "--cpu_group_norm",
    choices=["on", "off"],
    default=None,
    help="the CPU backend's native GroupNorm (+ SiLU) kernels (off: pofx.group_norm.group_norm)",
  )
  ap.add_argument(
    "--optimizer",
    choices=["auto", "native", "flat", "per_leaf"],
    default="auto",
    help="AdamW applied by the CPU backend's native kernel (pofx_backends.cpu.optimizers.adamw: one pass "
    "over every array, in place), on one flat vector of all the parameters (optax.flatten: the same "
    "update, far fewer operations than array by array) or array by array (optax.adamw); auto: native "
    "with the cpu kernels, else flat",
  )
  ap.add_argument(
    "--compile",
    choices=["auto", "default", "low_memory"],
    default="auto",
    help="pofx: XLA's compile options (low_memory: pofx_backends.cpu.LOW_MEMORY_COMPILER_OPTIONS; "
    "auto: low_memory on JAX's CPU platform, else default)",
  )
  ap.add_argument(
    "--conv_threads",
    choices=["auto", "one", "all"],
    default="auto",
    help="pofx: one: XLA:CPU's YNNPACK convolution, one thread per convolution; all: XLA's own convolution "
    "over all threads (pofx_backends.cpu.THREADED_CONV_COMPILER_OPTIONS); auto: all on JAX's CPU platform, else one",
  )
  ap.add_argument(
    "--denoiser_calls",
    choices=["auto", "1", "2", "4"],
    default="auto",
    help="pofx: the pair errors' denoiser call as this many calls on batch slices (pofx_backends.cpu.split; auto: 1)",
  )
  ap.add_argument("--breakdown", action="store_true", help="pofx: time the step's parts (after the timed steps)")
  ap.add_argument(
    "--startup",
    choices=["image", "language", "none"],
    default="image",
    help="pofx: the process's start-up, first: the image program's (pofx_backends.startup(single_arena=False)), "
    "the language programs' (one malloc arena), or none (glibc's defaults)",
  )
  ap.add_argument("--measure_only", default=None, help=argparse.SUPPRESS)  # a child of --kernels auto
  ap.add_argument("--json", default=None)
  ap.add_argument("--markdown", default=None, help="both: write the markdown table here")
  return ap


def parse(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  a = parser().parse_args(argv)
  a.argv = argv
  if not 0 <= a.warmup < a.steps:
    raise SystemExit(f"diffusion_step.py: --warmup must be in [0, --steps), got {a.warmup} with --steps {a.steps}.")
  if a.pairs < 1 or a.reps < 1:
    raise SystemExit(f"diffusion_step.py: --pairs and --reps must be >= 1, got {a.pairs} and {a.reps}.")
  if a.side != "pofx" and a.preset != "bench":
    raise SystemExit(
      f"diffusion_step.py: the baseline builds only the bench model; --preset {a.preset} needs --side pofx."
    )
  return a


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor()
  except OSError:
    return platform.processor()


def threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# pofx's side ------------------------------------------------------------------------------------


class PofxStep:
  """The baseline's model, batch and Diffusion-DPO step, through pofx's library functions."""

  def __init__(self, a, kernels):
    import jax
    import jax.numpy as jnp
    import optax

    from pofx import perturbations, references, train
    from pofx.diffusion import pairs, schedules, unet
    from pofx_backends.cpu import split

    self.a = a
    self.config = unet.preset(a.preset)
    compute_dtype = None if a.dtype == "float32" else a.dtype
    self.model = unet.make(self.config, kernels=kernels, compute_dtype=compute_dtype)
    self.params = self.model.init(jax.random.key(0))
    self.n_params = sum(int(x.size) for x in jax.tree.leaves(self.params))
    self.schedule = schedules.linear()
    self.denoiser_calls = denoiser_calls(a)
    self.logps_fn = pairs.make_logps_fn(split.split_batch(self.model.denoise, self.denoiser_calls), self.schedule)
    self.reference = pairs.check_reference(references.frozen(jax.tree.map(jnp.array, self.params), self.logps_fn))
    # PyTorch's AdamW defaults (the baseline's optimizer): betas (0.9, 0.999), eps 1e-8, weight decay 0.01;
    # `--optimizer` says how it is applied.
    hyper = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    self.optimizer_form = a.optimizer if a.optimizer != "auto" else ("native" if kernels.name == "cpu" else "flat")
    if self.optimizer_form == "native":
      from pofx_backends.cpu import optimizers as cpu_optimizers

      self.optimizer = cpu_optimizers.adamw(LEARNING_RATE, **hyper)
    else:
      adamw = optax.adamw(LEARNING_RATE, **hyper)
      self.optimizer = optax.flatten(adamw) if self.optimizer_form == "flat" else adamw
    self.step = train.make_train_step(
      self.logps_fn, self.optimizer, loss="dpo", loss_hyper={"beta": BETA}, reference=self.reference
    )
    self.state = train.init_state(
      self.params, self.optimizer, self.reference, perturbations.none(), loss="dpo", rng=jax.random.key(0)
    )
    size = self.config.sample_size
    self.image_shape = (
      (size, size, self.config.in_channels) if isinstance(size, int) else (*size, self.config.in_channels)
    )
    self.rng = np.random.default_rng(0)
    self.pairs_lib = pairs
    self.steps_run = 0
    self.trim_after_first_step = True  # xla_cpu_kernels.py stages --no_trim turns it off

  def batch(self):
    """One step's batch, drawn on the host: random images in [-1, 1], labels, one noise key per pair."""
    B, shape, rng = self.a.pairs, self.image_shape, self.rng
    images = lambda: (rng.random((B, *shape), dtype=np.float32) * 2 - 1).astype(np.float32)
    return {
      "pairs": self.pairs_lib.ImagePairs(
        chosen=images(),
        rejected=images(),
        class_labels=rng.integers(0, NUM_CLASSES, B).astype(np.int32),
        noise_keys=rng.integers(0, 2**32, (B, 2), dtype=np.uint32),
        pair_mask=np.ones(B, np.float32),
      )
    }

  def compile(self):
    import jax

    from pofx_backends.cpu import host_memory

    # The executables of the eager initialisation's small operations are not needed again: free
    # them (and hand glibc's freed pages back) before the compilation, whose peak is the run's.
    jax.clear_caches()
    host_memory.release_freed_memory()

    self.compile_options = compile_options(self.a)
    self.conv_threads = conv_threads(self.a)
    options = xla_compiler_options(self.compile_options, self.conv_threads)
    t0 = time.perf_counter()
    self.compiled = self.step.lower(self.state, self.batch(), jax.random.key(0)).compile(compiler_options=options)
    self.t_compile = time.perf_counter() - t0
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    jax.clear_caches()  # tracing and lowering caches (the compiled executable is kept)
    host_memory.release_freed_memory()

  def run(self, n: int):
    """Seconds of each of n steps (batch drawing inside, blocking on each step's loss)."""
    import jax

    from pofx_backends.cpu import host_memory

    times = []
    for i in range(n):
      t = time.perf_counter()
      self.state, self.metrics = self.compiled(self.state, self.batch(), jax.random.fold_in(jax.random.key(1), i))
      self.metrics["loss"].block_until_ready()
      times.append(time.perf_counter() - t)
      if not self.steps_run and self.trim_after_first_step:
        # Once, after the first step: the freed temporaries' block is too small for the next
        # step's aligned request (host_memory.release_freed_memory); hand its pages back.
        jax.block_until_ready(self.state)
        host_memory.release_after_first_step()
      self.steps_run += 1
    return times

  def analytic_flops(self) -> float:
    """Reference forward + policy forward and backward: 4 forwards of the 2B images (`unet.flops`)."""
    from pofx.diffusion import unet

    return 4.0 * unet.flops(self.config, 2 * self.a.pairs)

  def breakdown(self, reps: int = 10):
    """Median seconds of the step's parts, each jitted alone on one batch (see the module docstring)."""
    import jax

    from pofx import losses, optimizers

    b = self.batch()
    params = self.state.params
    ref_params = self.state.ref_state
    forward = jax.jit(self.logps_fn)
    ref = forward(ref_params, b)

    def objective(p):
      return jnp_mean(losses.get("dpo")(self.logps_fn(p, b), ref, beta=BETA))

    policy = jax.jit(jax.value_and_grad(objective))
    _, grads = policy(params)

    @jax.jit
    def update(grads, opt_state, params):
      return optimizers.apply_update(self.optimizer, grads, opt_state, params)

    parts = {
      "reference_forward": lambda: forward(ref_params, b),
      "policy_forward_backward": lambda: policy(params),
      "optimizer_update": lambda: update(grads, self.state.opt_state, params),
    }
    out = {}
    for name, f in parts.items():
      jax.block_until_ready(f())
      ts = []
      for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t)
      out[name] = statistics.median(ts)
    return out


def _auto(value: str, on_cpu: str, elsewhere: str) -> str:
  """A flag's value with "auto" resolved: `on_cpu` on JAX's CPU platform, else `elsewhere`."""
  import jax

  if value != "auto":
    return value
  return on_cpu if jax.default_backend() == "cpu" else elsewhere


def compile_options(a) -> str:
  """`--compile` resolved: "auto" is "low_memory" on JAX's CPU platform, else "default"."""
  return _auto(a.compile, "low_memory", "default")


def conv_threads(a) -> str:
  """`--conv_threads` resolved: "auto" is "all" on JAX's CPU platform, else "one" (no option)."""
  return _auto(a.conv_threads, "all", "one")


def xla_compiler_options(compile_setting: str, threads: str) -> dict | None:
  """The `compiler_options` of pofx's step for resolved `--compile` and `--conv_threads` values."""
  from pofx_backends import cpu

  options = {}
  if compile_setting == "low_memory":
    options.update(cpu.LOW_MEMORY_COMPILER_OPTIONS)
  if threads == "all":
    options.update(cpu.THREADED_CONV_COMPILER_OPTIONS)
  return options or None


def denoiser_calls(a) -> int:
  """`--denoiser_calls` resolved: "auto" is 1 (one call on the whole batch)."""
  return 1 if a.denoiser_calls == "auto" else int(a.denoiser_calls)


def jnp_mean(x):
  import jax.numpy as jnp

  return jnp.mean(x)


def cpu_options(a) -> dict:
  """The CPU backend's options given on the command line."""
  on = lambda flag: None if flag is None else flag == "on"
  opts = {
    "products": a.products,
    "attention": on(a.cpu_attention),
    "conv": a.conv,
    "group_norm": on(a.cpu_group_norm),
  }
  return {k: v for k, v in opts.items() if v is not None}


def backend_kernels(a, name: str):
  import pofx_backends

  return pofx_backends.kernels(name, **(cpu_options(a) if name == "cpu" else {}))


def measure_in_child(a, name: str) -> float:
  """Seconds per step with kernel backend `name`, measured by a child process (`--measure_only`)."""
  with_value, flags = {"--kernels", "--json", "--measure_only", "--side"}, {"--breakdown"}
  args, skip = [], False
  for arg in a.argv:
    if skip:
      skip = False
      continue
    key = arg.split("=", 1)[0]
    if key in flags:
      continue
    if key in with_value:
      skip = "=" not in arg
      continue
    args.append(arg)
  cmd = [sys.executable, os.path.abspath(__file__), *args, "--side", "pofx", "--kernels", name, "--measure_only", name]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise SystemExit(f"diffusion_step.py: measuring --kernels {name} failed:\n{out.stderr[-2000:]}")
  return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def resolve_kernels(a):
  import pofx_backends

  if a.kernels == "auto":
    name, details = pofx_backends.resolve("auto", measure=lambda kernels: measure_in_child(a, kernels.name))
  else:
    name, details = pofx_backends.resolve(a.kernels)
  return backend_kernels(a, name), name, details


def run_pofx(a):
  import pofx_backends

  if a.startup == "none":
    started = {"host_memory": "default", "detail": "--startup none: allocator unchanged"}
  else:
    started = pofx_backends.startup(single_arena=a.startup == "language")
  import jax

  from pofx import flops

  if a.measure_only:
    bench = PofxStep(a, backend_kernels(a, a.measure_only))
    bench.compile()
    bench.run(3)
    print(json.dumps({"seconds": statistics.median(bench.run(8))}))
    return None
  t0 = time.perf_counter()
  kernels, kernels_name, kernels_details = resolve_kernels(a)
  t_resolve = time.perf_counter() - t0
  bench = PofxStep(a, kernels)
  bench.compile()
  load_before = os.getloadavg()
  times = bench.run(a.steps)
  load_after = os.getloadavg()
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  steady = times[a.warmup :]
  med = statistics.median(steady)
  analytic = bench.analytic_flops()
  from dpo_step import matmul_peak  # benchmarks/ is on sys.path when run as a script

  peak = matmul_peak()
  device_kind = str(jax.devices()[0].device_kind)
  achieved = analytic / med
  utilisation = flops.mfu(achieved, device_kind)
  res = {
    "system": f"pofx / jax {jax.__version__}",
    "device": device_kind,
    "cpu": cpu_model(),
    "threads": threads(),
    "kernels": kernels_name,
    "optimizer": bench.optimizer_form,
    "kernels_requested": a.kernels,
    "kernels_details": kernels_details,
    "kernels_resolve_s": round(t_resolve, 2),
    "cpu_options": cpu_options(a),
    "startup": started,
    "preset": a.preset,
    "dtype": a.dtype,
    "n_params": bench.n_params,
    "pairs_per_step": a.pairs,
    "steps": a.steps,
    "warmup": a.warmup,
    "compile_s": round(bench.t_compile, 2),
    "compile_options": bench.compile_options,
    "conv_threads": bench.conv_threads,
    "denoiser_calls": bench.denoiser_calls,
    "steady_sec_per_step_median": round(med, 4),
    "steady_sec_per_step_mean": round(statistics.mean(steady), 4),
    "pairs_per_s": round(a.pairs / med, 3),
    "step_gflop_analytic": round(analytic / 1e9, 3),
    "step_gflop_xla_cost_analysis": round(bench.xla_flops / 1e9, 3),
    "achieved_gflops_per_s": round(achieved / 1e9, 1),
    "matmul_peak_gflops_per_s": round(peak / 1e9, 1),
    "fraction_of_matmul_peak": round(achieved / peak, 3),
    "mfu": None if utilisation is None else round(utilisation, 4),
    "maxrss_MiB": round(maxrss, 1),
    "load_average_before": [round(x, 2) for x in load_before],
    "load_average_after": [round(x, 2) for x in load_after],
    "final_loss": float(bench.metrics["loss"]),
  }
  if a.breakdown:
    parts = bench.breakdown()
    parts["rest"] = med - parts["reference_forward"] - parts["policy_forward_backward"] - parts["optimizer_update"]
    res["breakdown_s"] = {k: round(v, 4) for k, v in parts.items()}
  print(json.dumps(res, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


# The comparison --------------------------------------------------------------------------------


def clean_environment() -> dict:
  return {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES and not k.startswith(ALLOCATOR_PREFIXES)}


def side_command(a, side: str, extra=()) -> list:
  if side == "diffusers":
    # The bench preset is the baseline's unet_config(16, 1).
    return [sys.executable, BASELINE, "--pairs", str(a.pairs), "--size", "16", "--channels", "1"] + [
      "--steps",
      str(a.steps),
      "--warmup",
      str(a.warmup),
    ]
  cmd = [sys.executable, os.path.abspath(__file__), "--side", "pofx", "--pairs", str(a.pairs)]
  cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--kernels", a.kernels, "--compile", a.compile]
  cmd += ["--denoiser_calls", a.denoiser_calls, "--conv_threads", a.conv_threads, "--startup", a.startup]
  for flag in ("conv", "products", "cpu_attention", "cpu_group_norm"):
    if getattr(a, flag) is not None:
      cmd += [f"--{flag}", getattr(a, flag)]
  return cmd + list(extra)


def run_child(a, side: str, extra=()) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  cmd = side_command(a, side, extra) + (["--out", out] if side == "diffusers" else ["--json", out])
  load = os.getloadavg()[0]
  t = time.perf_counter()
  proc = subprocess.run(
    cmd, env=clean_environment(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
  )
  if proc.returncode:
    return {"error": proc.stderr[-2000:], "side": side}
  with open(out) as f:
    res = json.load(f)
  os.unlink(out)
  res["wall_s"] = round(time.perf_counter() - t, 1)
  res["load_average_1min_at_start"] = round(load, 2)
  return res


def command_text(cmd) -> str:
  return " ".join(["python"] + [os.path.relpath(x, ROOT) if x.startswith(ROOT) else x for x in cmd[1:]])


def machine() -> dict:
  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      return ""

  dirty = git("status", "--porcelain", "--untracked-files=no", "--", "pofx", "pofx_backends", "benchmarks")
  return {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "commit": git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else ""),
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "threads": threads(),
  }


def fmt(x, digits=2):
  return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(summary) -> str:
  m, d, p = summary["machine"], summary["diffusers"], summary["pofx"]
  b = summary.get("breakdown") or {}
  runs = lambda rs: ", ".join(f"{r:.1f}" for r in rs)
  lines = [
    f"Measured {m['date']} at commit {m['commit']} on {m['cpu']} ({m['threads']} threads usable, "
    f"{m['cores']} cores), {summary['reps']} alternated repetitions of {summary['steps']} steps per side "
    f"(the first {summary['warmup']} excluded), load average (1 min) {summary['load_range'][0]:.1f} to "
    f"{summary['load_range'][1]:.1f} at the runs' starts.",
    "",
    "| side | pairs/s, median (runs) | peak RSS MiB, median |",
    "|---|---|---|",
    f"| diffusers {d['system']} | {fmt(d['median_pairs_per_s'])} ({runs(d['runs_pairs_per_s'])}) | "
    f"{fmt(d['median_maxrss_MiB'], 0)} |",
    f"| pofx ({', '.join(p['kernels'])} kernels) | {fmt(p['median_pairs_per_s'])} ({runs(p['runs_pairs_per_s'])}) | "
    f"{fmt(p['median_maxrss_MiB'], 0)} |",
    "",
    f"pofx / diffusers: **{fmt(summary['ratio_of_medians'])}x** (ratio of the medians); per repetition "
    f"{', '.join(fmt(r) for r in summary['ratios_per_rep'])} (median {fmt(summary['median_ratio_per_rep'])}x).",
  ]
  if b:
    lines += [
      "",
      f"pofx's step: {fmt(b['step_gflop_analytic'], 2)} GFLOP (`unet.flops`; XLA's cost analysis "
      f"{fmt(b['step_gflop_xla_cost_analysis'], 2)}), {fmt(b['achieved_gflops_per_s'], 1)} GFLOP/s achieved, "
      f"{fmt(b['fraction_of_matmul_peak'], 3)} of XLA's float32 2048^3 matmul here "
      f"({fmt(b['matmul_peak_gflops_per_s'], 1)} GFLOP/s on {b['threads']} threads). Where its "
      f"{fmt(b['steady_sec_per_step_median'] * 1e3, 1)} ms go (each part jitted alone, medians):",
      "",
      "| part | ms |",
      "|---|---|",
    ]
    for name, v in b["breakdown_s"].items():
      lines.append(f"| {name.replace('_', ' ')} | {v * 1e3:.1f} |")
  lines += ["", "Commands (from the repository root):", ""]
  for c in summary["commands"]:
    lines.append(f"    {c}")
  return "\n".join(lines) + "\n"


def compare(a):
  summary = {"machine": machine(), "reps": a.reps, "steps": a.steps, "warmup": a.warmup}
  sides = ["diffusers", "pofx"]
  runs = {s: [] for s in sides}
  ratios = []
  for rep in range(a.reps):
    order = sides if rep % 2 == 0 else sides[::-1]
    this = {}
    for s in order:
      r = run_child(a, s)
      runs[s].append(r)
      this[s] = r
      if "error" in r:
        print(f"rep {rep} {s}: FAILED\n{r['error'][-1500:]}", flush=True)
        continue
      print(
        f"rep {rep} {s:9s} pairs/s {r['pairs_per_s']:8.2f}  peak RSS {r['maxrss_MiB']:6.0f} MiB  "
        f"load {r['load_average_1min_at_start']:.1f}" + (f"  kernels {r['kernels']}" if s == "pofx" else ""),
        flush=True,
      )
    if all("error" not in this[s] for s in sides):
      ratios.append(this["pofx"]["pairs_per_s"] / this["diffusers"]["pairs_per_s"])
  ok = {s: [r for r in runs[s] if "error" not in r] for s in sides}
  med = lambda rs, k: statistics.median([r[k] for r in rs]) if rs else None
  summary["load_range"] = [
    min(r["load_average_1min_at_start"] for s in sides for r in ok[s]) if any(ok.values()) else float("nan"),
    max(r["load_average_1min_at_start"] for s in sides for r in ok[s]) if any(ok.values()) else float("nan"),
  ]
  for s in sides:
    summary[s] = {
      "system": ok[s][0].get("system", "") if ok[s] else "",
      "median_pairs_per_s": med(ok[s], "pairs_per_s"),
      "runs_pairs_per_s": [r["pairs_per_s"] for r in ok[s]],
      "median_maxrss_MiB": med(ok[s], "maxrss_MiB"),
      "runs_maxrss_MiB": [r["maxrss_MiB"] for r in ok[s]],
      "kernels": sorted({r.get("kernels") for r in ok[s] if r.get("kernels")}),
      "errors": [r["error"][-300:] for r in runs[s] if "error" in r],
    }
  d, p = summary["diffusers"]["median_pairs_per_s"], summary["pofx"]["median_pairs_per_s"]
  summary["ratio_of_medians"] = p / d if d and p else None
  summary["ratios_per_rep"] = ratios
  summary["median_ratio_per_rep"] = statistics.median(ratios) if ratios else None
  b = run_child(a, "pofx", ["--breakdown"])
  summary["breakdown"] = None if "error" in b else b
  if "error" in b:
    print(f"breakdown run FAILED\n{b['error'][-1500:]}", flush=True)
  summary["commands"] = [command_text(side_command(a, "diffusers")), command_text(side_command(a, "pofx"))]
  table = markdown(summary)
  print(table)
  rm, rd = summary["pofx"]["median_maxrss_MiB"], summary["diffusers"]["median_maxrss_MiB"]
  if summary["median_ratio_per_rep"] is not None:
    r = summary["median_ratio_per_rep"]
    verdict = "meets the 1.5x target" if r >= 1.5 else "meets the 1.0x floor" if r >= 1.0 else "BELOW the 1.0x floor"
    print(
      f"pofx / diffusers {r:.2f}x (median per repetition): {verdict}; peak RSS pofx {rm:.0f} vs diffusers {rd:.0f} MiB"
    )
  if a.json:
    with open(a.json, "w") as f:
      json.dump({**summary, "runs": runs}, f, indent=1)
  if a.markdown:
    with open(a.markdown, "w") as f:
      f.write(table)
  return summary


def main(argv=None):
  a = parse(argv)
  if a.side == "pofx":
    return run_pofx(a)
  if a.side == "diffusers":
    res = run_child(a, "diffusers")
    print(json.dumps(res, indent=1))
    return res
  return compare(a)


if __name__ == "__main__":
  main()
