"""The Diffusion-DPO step's CPU time on one thread, per side, and where it goes, op by op.

    python benchmarks/diffusion_cpu.py [--rounds 2] [--steps 12] [--profile]     # both sides, alternating
    python benchmarks/diffusion_cpu.py --side pofx [--kernels xla|cpu] [--profile] [--parts]
    python benchmarks/diffusion_cpu.py --side diffusers [--profile]

On a machine shared with other work, wall-clock ratios measure the two runtimes' tolerance of
oversubscription (PyTorch's OpenMP threads collapse when a third process competes), not their
speed. This script measures what survives load: the process's CPU time (`time.process_time`)
per training step with ONE compute thread on each side, the fastest and the median of `--steps`
steps after 3 warm-up steps. Each side runs in its own process (the sides alternate, the order
reversed every other round), as a user would run it:

- `--side diffusers`: the step of `diffusers_dpo_baseline.py` (imported from it: its model, batch,
  loss and AdamW, unchanged) with `torch.set_num_threads(1)`. With `--profile`, `torch.profiler`
  over 3 steps: self CPU time per operator, in percent of the profiled total (the profiler's own
  overhead inflates the absolute figures).
- `--side pofx`: `diffusion_step.PofxStep` (the library's step on the same model and batch) with
  XLA:CPU on one thread (`--xla_cpu_multi_thread_eigen=false` in this process's `XLA_FLAGS`, set
  before JAX starts; the benchmark proper sets nothing). With `--profile`, a `jax.profiler` trace
  of 3 steps, each executed thunk's time attributed to its HLO instruction in the compiled step
  and summed by kind: convolutions by their window (a 3x3 window with a 3x3 kernel is a forward or
  an input gradient; a window the size of the image is a kernel gradient), dots, the loop fusions
  by what they contain (transposes, reductions, exponentials: SiLU and softmax, concatenations,
  the rest elementwise), in percent of the traced thunk time. With `--parts`, the reference
  forward and the policy forward and backward each jitted alone (CPU ms, fastest of 7).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WARMUP = 3
# pofx's step as `jax.jit` compiles it: one denoiser call, XLA's default options (diffusion_step.py's
# CPU defaults add the low-memory compile and convolutions over all threads; this script measures
# the work on one thread).
PLAIN_STEP = ("--denoiser_calls", "1", "--compile", "default", "--conv_threads", "one")


def parser():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--side", choices=["both", "pofx", "diffusers"], default="both")
  ap.add_argument("--rounds", type=int, default=2, help="both: rounds of the two sides, alternating")
  ap.add_argument("--steps", type=int, default=12, help="timed steps per run (after 3 warm-up steps)")
  ap.add_argument("--kernels", choices=["xla", "cpu"], default="xla", help="pofx's kernel backend")
  ap.add_argument("--profile", action="store_true", help="op-by-op breakdown of 3 steps")
  ap.add_argument("--parts", action="store_true", help="pofx: the reference forward and policy forward+backward alone")
  ap.add_argument("--json", default=None)
  return ap


def cpu_times(step, n: int):
  for _ in range(WARMUP):
    step()
  times = []
  for _ in range(n):
    t = time.process_time()
    step()
    times.append(time.process_time() - t)
  return {"min_ms": round(min(times) * 1e3, 1), "median_ms": round(statistics.median(times) * 1e3, 1)}


# diffusers' side ----------------------------------------------------------------------------------


def run_diffusers(a):
  import copy

  import torch
  import torch.nn.functional as F

  sys.path.insert(0, HERE)
  from diffusers import DDPMScheduler, UNet2DModel
  from diffusers_dpo_baseline import unet_config

  torch.set_num_threads(1)
  torch.manual_seed(0)
  unet = UNet2DModel(**unet_config(16, 1))
  ref = copy.deepcopy(unet).requires_grad_(False).eval()
  sched = DDPMScheduler(num_train_timesteps=1000)
  opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
  B, C, S, beta = 16, 1, 16, 5000.0

  def step():  # the baseline's step, line for line
    w = torch.rand(B, C, S, S) * 2 - 1
    l = torch.rand(B, C, S, S) * 2 - 1
    labels = torch.randint(0, 10, (B,))
    x0 = torch.cat([w, l])
    noise = torch.randn(B, C, S, S).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (B,)).repeat(2)
    xt = sched.add_noise(x0, noise, t)
    cls = labels.repeat(2)
    pred = unet(xt, t, class_labels=cls).sample
    err = (pred - noise).pow(2).mean(dim=[1, 2, 3])
    e_w, e_l = err.chunk(2)
    with torch.no_grad():
      rerr = (ref(xt, t, class_labels=cls).sample - noise).pow(2).mean(dim=[1, 2, 3])
      r_w, r_l = rerr.chunk(2)
    loss = -F.logsigmoid(-0.5 * beta * ((e_w - e_l) - (r_w - r_l))).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  res = {"side": "diffusers", "system": f"torch {torch.__version__}", "threads": torch.get_num_threads()}
  res["step_cpu"] = cpu_times(step, a.steps)
  if a.profile:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
      for _ in range(3):
        step()
    events = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    res["profile_percent"] = {e.key: round(100 * e.self_cpu_time_total / total, 1) for e in events[:25]}
  return res


# pofx's side --------------------------------------------------------------------------------------


def _hlo_index(hlo: str):
  """(instruction name -> its line, computation name -> its body text) of an HLO module's text."""
  lines, bodies, current = {}, {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      current = m.group(1)
      bodies[current] = []
      continue
    if current is not None:
      bodies[current].append(line)
    m = re.match(rf"\s+(?:ROOT )?%?([\w.\-]+) = {_TYPE} [\w\-]+\(", line)
    if m:
      lines[m.group(1)] = line
  return lines, {k: "\n".join(v) for k, v in bodies.items()}


# An HLO instruction's result type: one array type, or a tuple of them (a custom call with several outputs).
_TYPE = r"(?:\([^=]*?\)|\S+)"


def _conv_kind(text: str, image_sides) -> str:
  window = re.search(r"window=\{size=(\d+)x(\d+)", text)
  if window is None:
    return "convolution"
  if int(window.group(1)) in image_sides and int(window.group(1)) > 3:
    return "convolution: kernel gradient"
  return f"convolution {window.group(1)}x{window.group(2)}: forward or input gradient"


def _kind(name: str, lines, bodies, image_sides) -> str:
  line = lines.get(name)
  if line is None:
    return "runtime (not an HLO instruction)"
  op = re.match(rf"\s+(?:ROOT )?%?[\w.\-]+ = {_TYPE} ([\w\-]+)\(", line).group(1)
  body = line
  if op == "fusion":
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = bodies.get(called.group(1), "") if called else ""
  ops = set(re.findall(rf"= {_TYPE} ([\w\-]+)\(", body)) | {op}
  if op == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', line)
    return f"custom-call: {target.group(1)}" if target else "custom-call"
  if "convolution" in ops:
    return _conv_kind(re.search(r"convolution\(.*", body).group(0), image_sides)
  if "dot" in ops:
    return "dot"
  for kind in ("transpose", "reduce", "exponential", "concatenate"):
    if kind in ops:
      return f"fusion: {kind}" if op == "fusion" else kind
  return "fusion: elementwise" if op == "fusion" else op


def thunk_times(compiled, run):
  """`(by_kind, by_thread)`: the nanoseconds of the thunks `compiled` executed during `run()`, traced
  with `jax.profiler`, summed by the kind of their HLO instruction (`_kind`) and by executor thread."""
  import jax
  from jax._src.lib import _profile_data

  lines, bodies = _hlo_index(compiled.as_text())
  by_kind, by_thread = collections.Counter(), collections.Counter()
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    run()
    jax.profiler.stop_trace()
    data = _profile_data.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  for plane in data.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name and "PjRtCpuClient" not in line.name:
        continue
      for ev in line.events:
        if ev.name.startswith(("ThunkExecutor", "end:")):
          continue
        by_kind[_kind(ev.name, lines, bodies, (16, 8, 4))] += ev.duration_ns
        by_thread[line.name] += ev.duration_ns
  return by_kind, by_thread


def run_pofx(a):
  sys.path.insert(0, HERE)
  import diffusion_step
  import jax

  import pofx_backends

  b = diffusion_step.PofxStep(
    diffusion_step.parse(["--side", "pofx", "--kernels", a.kernels, *PLAIN_STEP]), pofx_backends.kernels(a.kernels)
  )
  b.compile()
  state = [b.state]

  def step():
    state[0], metrics = b.compiled(state[0], b.batch(), jax.random.key(1))
    metrics["loss"].block_until_ready()

  res = {"side": "pofx", "system": f"jax {jax.__version__}", "kernels": a.kernels, "xla_flags": os.environ["XLA_FLAGS"]}
  res["step_cpu"] = cpu_times(step, a.steps)
  if a.profile:
    by_kind, _ = thunk_times(b.compiled, lambda: [step() for _ in range(3)])
    total = sum(by_kind.values())
    res["profile_percent"] = {k: round(100 * v / total, 1) for k, v in by_kind.most_common()}
  if a.parts:
    from pofx import losses

    batch = b.batch()
    forward = jax.jit(b.logps_fn)
    ref = forward(state[0].ref_state, batch)  # b.state was donated to the timed steps
    objective = lambda p: losses.get("dpo")(b.logps_fn(p, batch), ref, beta=diffusion_step.BETA).mean()
    policy = jax.jit(jax.value_and_grad(objective))
    parts = {
      "reference_forward": lambda: jax.block_until_ready(forward(state[0].ref_state, batch)),
      "policy_forward_backward": lambda: jax.block_until_ready(policy(state[0].params)),
    }
    res["parts_cpu_ms_min"] = {k: cpu_times(f, 7)["min_ms"] for k, f in parts.items()}
  return res


# Both sides ---------------------------------------------------------------------------------------


def child(a, side: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--steps", str(a.steps), "--kernels", a.kernels]
  cmd += ["--profile"] * a.profile
  env = dict(os.environ)
  if side == "pofx":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  load = os.getloadavg()[0]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
  if out.returncode:
    raise SystemExit(f"diffusion_cpu.py: the {side} run failed:\n{out.stderr[-2000:]}")
  res = json.loads(out.stdout.strip().splitlines()[-1])
  res["load_1min_at_start"] = round(load, 1)
  return res


def main(argv=None):
  a = parser().parse_args(argv)
  if a.side == "pofx" and "--xla_cpu_multi_thread_eigen=false" not in os.environ.get("XLA_FLAGS", ""):
    # One XLA thread: the flag must be in the environment before JAX starts, so re-run this process with it.
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false")}
    raise SystemExit(subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env).returncode)
  if a.side != "both":
    res = run_pofx(a) if a.side == "pofx" else run_diffusers(a)
    print(json.dumps(res))
    return res
  runs = {"diffusers": [], "pofx": []}
  for r in range(a.rounds):
    for side in ("diffusers", "pofx") if r % 2 == 0 else ("pofx", "diffusers"):
      res = child(a, side)
      runs[side].append(res)
      print(
        f"round {r} {side:9s} CPU ms per step min {res['step_cpu']['min_ms']:7.1f} median "
        f"{res['step_cpu']['median_ms']:7.1f}  load {res['load_1min_at_start']}",
        flush=True,
      )
  best = {s: min(r["step_cpu"]["min_ms"] for r in rs) for s, rs in runs.items()}
  print(
    f"fastest step, CPU ms on one thread: diffusers {best['diffusers']}, pofx {best['pofx']}; "
    f"pofx / diffusers speed {best['diffusers'] / best['pofx']:.2f}x"
  )
  for side, rs in runs.items():
    if rs and "profile_percent" in rs[-1]:
      print(f"\n{side}: share of the profiled time (%)")
      for k, v in rs[-1]["profile_percent"].items():
        print(f"  {v:5.1f}  {k}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"runs": runs, "fastest_ms": best}, f, indent=1)
  return runs


if __name__ == "__main__":
  main()
