r"""Optional kernel backends of pofx: the entry points a program uses to pick and start one.

The core (`pofx`) computes with XLA's own operations and never imports this package; a backend
plugs in only through the injection points of `pofx.kernels.Kernels`. The backends
(`pofx.options.KERNEL_BACKENDS`): "xla" (the core's own `pofx.kernels.XLA`), "cpu"
(`pofx_backends.cpu`: fused AVX-512 block-sparse attention and BLAS products through XLA's FFI),
"gpu" (`pofx_backends.gpu`) and "tpu" (`pofx_backends.tpu`); "auto" resolves on the machine at
hand. A program does, in this order:

    import pofx_backends
    started = pofx_backends.startup()                  # first thing: process-wide settings
    name, details = pofx_backends.resolve("auto")      # before any compute; record both
    kernels = pofx_backends.kernels(name)
    model = pofx.models.make(config, kernels=kernels)

- `unavailable_reason(name)`: why a backend cannot run in this process (None if it can), from
  the JAX backend the run uses (`jax.default_backend()`), not only the host's instruction set.
- `kernels(name, **options)`: the backend's `Kernels`, `name` set.
- `resolve(name, measure=None)`: "auto" is "gpu" on a JAX GPU backend, "tpu" on a TPU one, and on
  the CPU the faster of "xla" and "cpu" by measurement (`measure(kernels) -> seconds`, the
  program's own timing of its step shapes, or `pofx_backends.cpu.calibration.measure`): which of
  the two is faster differs between CPUs, so the instruction set alone does not decide.
- `startup(single_arena=True)`: on a CPU JAX platform, glibc keeps freed memory for reuse
  (`pofx_backends.cpu.host_memory.retain_freed_memory`), so XLA:CPU's per-step temporaries stop
  page-faulting. Process-wide: programs call it; the library never does.

Importing this package compiles nothing (the CPU kernels are built when `kernels("cpu")` asks).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import jax

from pofx import kernels as kernels_lib
from pofx.options import KERNEL_BACKENDS
from pofx_backends import cpu
from pofx_backends.cpu import host_memory

BACKENDS = KERNEL_BACKENDS
NAMED_BACKENDS = tuple(b for b in BACKENDS if b != "auto")


def _check_name(name: str, *, auto: bool) -> None:
  allowed = BACKENDS if auto else NAMED_BACKENDS
  if name not in allowed:
    raise ValueError(f"kernels={name!r} is not a kernel backend; allowed: {allowed}.")


def _module(name: str):
  """`pofx_backends.<name>` for "gpu" / "tpu" (imported on use), or a string saying why not."""
  try:
    return importlib.import_module(f"pofx_backends.{name}")
  except ImportError as e:
    return f"pofx_backends.{name} cannot be imported ({e})"


def unavailable_reason(name: str) -> Optional[str]:
  """None when backend `name` ("xla", "cpu", "gpu", "tpu") can run in this process, else why not.

  "xla": always. "cpu": JAX's CPU platform, an x86-64 CPU with AVX-512F, a C++ compiler, a BLAS
  (`pofx_backends.cpu.unavailable_reason`). "gpu" / "tpu": a JAX GPU / TPU backend, as their
  modules say. Initialises JAX's backend (call `startup()` first); compiles nothing.
  """
  _check_name(name, auto=False)
  if name == "xla":
    return None
  if name == "cpu":
    return cpu.unavailable_reason()
  module = _module(name)
  return module if isinstance(module, str) else module.unavailable_reason()


def _refuse(name: str, reason: str):
  here = [b for b in NAMED_BACKENDS if b == name or unavailable_reason(b) is None]
  runnable = ["auto"] + [b for b in here if b != name]
  return ValueError(f"kernels={name!r} cannot run here: {reason}. Allowed: {BACKENDS}; runnable here: {runnable}.")


def kernels(name: str, **options) -> kernels_lib.Kernels:
  """The `pofx.kernels.Kernels` of backend `name` ("xla", "cpu", "gpu", "tpu"; resolve "auto"
  with `resolve` first), built with the backend's `options` (e.g. the CPU backend's `blas`,
  `products`, `attention`), its `name` field set to `name`.

  Raises:
    ValueError: an unknown name or option, or the reason the backend cannot run here.
  """
  if name == "auto":
    raise ValueError(
      "kernels('auto'): resolve it first (`name, details = pofx_backends.resolve('auto')`), then kernels(name)."
    )
  _check_name(name, auto=False)
  reason = unavailable_reason(name)
  if reason:
    raise _refuse(name, reason)
  if name == "xla":
    if options:
      raise ValueError(f"kernels('xla') takes no options, got {sorted(options)}.")
    return kernels_lib.XLA
  built = cpu.kernels(**options) if name == "cpu" else _module(name).kernels(**options)
  return built if built.name == name else built._replace(name=name)


def resolve(
  name: str, *, measure: Optional[Callable[[kernels_lib.Kernels], float]] = None
) -> Tuple[str, Dict[str, Any]]:
  """`(backend, details)`: the backend `name` means in this process, and how it was decided.

  A named backend is itself (ValueError with the reason and the allowed names when it cannot run
  here). "auto": "gpu" on a JAX GPU backend and "tpu" on a TPU one (else "xla" where their
  module cannot run, with the reason); on the CPU "xla" when the CPU kernels cannot run here
  (with the reason), else whichever of "xla" and "cpu" (default options) `measure(kernels) ->
  seconds` finds faster; `measure` defaults to `pofx_backends.cpu.calibration.measure` (a few
  seconds on two cores, compilation included; run in a child process, once per process, then
  reused). `details` (JSON-serialisable, for the run's records):
  "requested", "platform", "rule", and for a measurement "seconds" per candidate.
  """
  _check_name(name, auto=True)
  platform = jax.default_backend()
  details: Dict[str, Any] = {"requested": name, "platform": platform}
  if name != "auto":
    reason = unavailable_reason(name)
    if reason:
      raise _refuse(name, reason)
    return name, {**details, "rule": "named"}
  if platform in ("gpu", "tpu"):
    reason = unavailable_reason(platform)
    if reason is None:
      return platform, {**details, "rule": f"JAX's {platform} backend"}
    return "xla", {**details, "rule": f"JAX's {platform} backend, whose kernels cannot run: {reason}"}
  if platform != "cpu":
    return "xla", {**details, "rule": f"no pofx backend for JAX platform {platform!r}"}
  reason = cpu.unavailable_reason()
  if reason:
    return "xla", {**details, "rule": f"the CPU kernels cannot run here: {reason}"}
  seconds = dict(_calibrated_seconds()) if measure is None else _seconds(measure)
  chosen = min(seconds, key=seconds.get)
  return chosen, {**details, "rule": "the faster measured step", "seconds": seconds, "cpu_options": cpu.DEFAULT_OPTIONS}


def _seconds(measure: Callable[[kernels_lib.Kernels], float]) -> Dict[str, float]:
  return {candidate: float(measure(kernels(candidate))) for candidate in ("xla", "cpu")}


@functools.cache
def _calibrated_seconds() -> Dict[str, float]:
  """The default calibration's timings, measured once per process (callers copy them), in a child
  process: the caller then holds neither the candidates' compiled programs nor the heap their
  measurement grew (after such a measurement in-process, a long run's steps were measurably
  slower)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
  code = (
    "import json, pofx_backends\n"
    "from pofx_backends.cpu import calibration\n"
    "print(json.dumps(pofx_backends._seconds(calibration.measure)))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"pofx_backends: the kernel calibration failed in its child process:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _accelerator_plugins() -> list:
  """Names of the installed JAX plugins (GPU, TPU, ...) and of libtpu, found without importing them."""
  names = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
  if importlib.util.find_spec("libtpu") is not None:
    names.add("libtpu")
  return sorted(names)


def startup(*, single_arena: bool = True) -> Dict[str, Any]:
  """The process-wide start-up of a program using pofx: call it first, before any JAX computation.

  On a CPU JAX platform it tells glibc to keep freed memory for reuse
  (`pofx_backends.cpu.host_memory.retain_freed_memory`: no `mmap` for large blocks, no trimming,
  and with `single_arena` one malloc arena: the language programs' setting; the image program
  passes False), so XLA:CPU's per-step temporaries reuse mapped pages instead of
  page-faulting and zeroing them on every step. The setting concerns threads that allocate
  afterwards, so it must come before JAX's backend starts its thread pools; therefore the
  platform is decided without initialising the backend: from `jax.config.jax_platforms`
  (`JAX_PLATFORMS`; its first entry is the platform JAX will use) and, when that is unset, from
  whether an accelerator plugin (a `jax_plugins` entry point or module, libtpu) is installed:
  without one JAX can only run on the CPU; with one the platform is undecided until JAX starts,
  and nothing is changed (set `JAX_PLATFORMS=cpu` to run on the CPU with the setting).

  Returns `{"platform": "cpu" | <platform> | "undecided", "host_memory": "retain" | "default",
  "detail": <what was done, in words>}`, for the run's summary. The library never calls it.
  """
  platforms = [p.strip() for p in (jax.config.jax_platforms or "").split(",") if p.strip()]
  if platforms:
    platform, source = platforms[0], f"JAX_PLATFORMS={','.join(platforms)}"
  else:
    plugins = _accelerator_plugins()
    if plugins:
      return {
        "platform": "undecided",
        "host_memory": "default",
        "detail": f"accelerator plugins installed ({', '.join(plugins)}) and JAX_PLATFORMS unset: allocator "
        "unchanged (JAX_PLATFORMS=cpu runs on the CPU with freed memory retained)",
      }
    platform, source = "cpu", "no accelerator plugin installed"
  if platform != "cpu":
    return {"platform": platform, "host_memory": "default", "detail": f"{source}: allocator unchanged"}
  if host_memory.retain_freed_memory(single_arena=single_arena):
    arenas = "M_ARENA_MAX=1, " if single_arena else "per-thread arenas, "
    return {
      "platform": "cpu",
      "host_memory": "retain",
      "detail": f"{source}: glibc keeps freed memory (mallopt {arenas}M_MMAP_MAX=0, M_TRIM_THRESHOLD max)",
    }
  return {"platform": "cpu", "host_memory": "default", "detail": f"{source}: the C library is not glibc, unchanged"}
