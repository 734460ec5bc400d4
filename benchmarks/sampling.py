"""pofx's sampler against Hugging Face `generate`, on the model and prompts of `hf_generate_baseline.py`.

    python benchmarks/sampling.py [--variable] [--reps 5] [--json PATH]           # pofx alone
        [--kernels {xla,cpu}] [--no_startup] [--breakdown] [--peaks] [--step_cpu]
    python benchmarks/sampling.py --compare [--workloads fixed,variable] [--rounds 3] [--reps 5]
        [--hf_candidates "OMP_NUM_THREADS=1"] [--pofx_candidates "XLA_FLAGS=..."]
        [--markdown PATH] [--json PATH]                                           # side by side

pofx alone (`--side pofx`, the default) mirrors `hf_generate_baseline.py` (kept unchanged beside
this file): the same model shapes (hidden 256, 4 layers, 8 heads, 4 KV heads, MLP 688, vocab
4096, untied, float32; random weights, pofx's `bench` preset), the same prompts (32 rows of
random ids, all of length 64, or with `--variable` lengths uniform in [16, 64] left-padded with id
4094; drawn with torch's generator exactly as the baseline draws them when torch is importable,
else with numpy), temperature 1, no top-k / top-p, exactly 128 new tokens per row (no stop
token), and the same count: generated tokens per second = batch x new tokens / wall time of one
`pofx.sampling.sample` call (host prompts in, device results ready), median over `--reps` timed
calls after one warm-up call (which compiles). The program calls `pofx_backends.startup()` first,
as pofx's programs do (`--no_startup` skips it).

When the process has several devices (XLA:CPU's `--xla_force_host_platform_device_count=N` in
`XLA_FLAGS`), the rows are split over them through the sampler's `mesh` (each device decodes its
rows in its own thread; the samples equal one device's). With `--step_cpu`, the process CPU time
of a decoding step, per timed call: a call of `--new` tokens minus a call of one token, over
`--new - 1` steps (all threads counted; on a loaded machine the figure to compare, since the
wall time is not).

It also reports: the KV cache's memory; the analytic FLOPs of a call (prefill: every prompt
token through the blocks; decoding: every row through the blocks and the LM head per step;
attention over the valid slots) and the achieved FLOP/s; with `--peaks`, XLA's float32 matmul
FLOP/s on the step's shapes (`[32, 256] x [256, n]` ...) and on a 2048^3 product, and the achieved
FLOP/s as a fraction of each; with `--breakdown`, where the time of a decoding step goes (a
profiler trace of one call: the time of every XLA operation of the decoding loop, grouped).

`--compare` runs both sides in separate processes, alternating (each round runs every setting of
both sides on every workload, the order reversed on every other round, so both see the same
machine conditions). A side's settings are its default (its command as documented, in this
environment) and its candidates, environment settings (`--hf_candidates`, default one OpenMP
thread; `--pofx_candidates`, default XLA:CPU on one thread, two CPU devices with the rows split
over them, and two devices of one thread each). Reported per workload: the median
tokens/s of every setting, the default-vs-default ratio per round and its median, the ratio of
each side's best setting, the load average before each run, the CPU model, and a markdown table
for `docs/benchmarks.md`. On a shared machine the absolute figures move with the load, and
threads that wait for each other lose most (PyTorch's two OpenMP threads on a loaded 2-core
machine ran about 10 times slower than one thread): read the load column, and prefer a quiet
machine. The baseline needs torch and transformers in the same environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
BASELINE = os.path.join(HERE, "hf_generate_baseline.py")
VOCAB = 4096
PAD = VOCAB - 2


def prompts(batch: int, length: int, variable: bool):
  """`(tokens [B, P] int32, mask [B, P] float32)`: the baseline's prompts (its torch draws when
  torch is importable: `manual_seed(0)` generator, ids in [0, V - 2), lengths in [16, P])."""
  try:
    import torch  # optional: the exact draws of the baseline

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB - 2, (batch, length), generator=g).numpy().astype(np.int32)
    lens = torch.randint(16, length + 1, (batch,), generator=g).tolist() if variable else [length] * batch
  except ImportError:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB - 2, (batch, length)).astype(np.int32)
    lens = rng.integers(16, length + 1, batch).tolist() if variable else [length] * batch
  mask = np.ones((batch, length), np.float32)
  for i, n in enumerate(lens):
    ids[i, : length - n] = PAD
    mask[i, : length - n] = 0.0
  return ids, mask


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
  flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
  isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
  return f"{name}, {os.cpu_count()} cores, {isa}"


def call_flops(config, width: int, prompt_lengths, new: int) -> float:
  """Analytic FLOPs of one sampling call (2 per multiply-add): the prefill runs every prompt slot
  (`width` per row, padding included, as the program does) through the blocks and the LM head on
  each row's last token; each decoding step runs every row through the blocks and the LM head;
  attention counts the scores and the weighted sum over the slots each query attends to (its
  row's valid ones)."""
  d, f, v, hd = config.hidden_size, config.mlp_size, config.vocab_size, config.resolved_head_dim
  h, k, layers = config.num_heads, config.num_kv_heads, config.num_layers
  block = 2 * (d * h * hd * 2 + d * k * hd * 2 + 3 * d * f)  # q, o; k, v; gate, up, down
  head = 2 * d * v
  batch = len(prompt_lengths)
  prefill = batch * width * block * layers + batch * head
  attn_prefill = sum(4 * h * hd * n * (n + 1) / 2 for n in prompt_lengths) * layers
  decode = new * batch * (block * layers + head)
  attn_decode = sum(4 * h * hd * (n + t + 1) for n in prompt_lengths for t in range(new)) * layers
  return float(prefill + attn_prefill + decode + attn_decode)


def matmul_flops_per_s(m: int, kdim: int, n: int, reps: int = 20) -> float:
  """XLA's float32 `[m, k] x [k, n]` product in this process: FLOP/s, median of `reps` timings of
  a jitted loop of 16 products (each on a different operand, so none is hoisted)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (16, m, kdim), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (kdim, n), jnp.float32)
  f = jax.jit(lambda a, w: jax.lax.map(lambda x: x @ w, a))
  f(a, w).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, w).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * 16 * m * kdim * n / statistics.median(times)


def peaks(config, batch: int) -> dict:
  d, f, v = config.hidden_size, config.mlp_size, config.vocab_size
  kv = config.num_kv_heads * config.resolved_head_dim
  shapes = {
    "q_o": (batch, d, d),
    "k_v": (batch, d, kv),
    "gate_up": (batch, d, 2 * f),
    "down": (batch, f, d),
    "lm_head": (batch, d, v),
    "prefill_gate_up": (batch * 64, d, 2 * f),
  }
  out = {name: matmul_flops_per_s(*s) for name, s in shapes.items()}
  out["large_2048"] = matmul_flops_per_s(2048, 2048, 2048, reps=5)
  return out


def breakdown(run_once) -> dict:
  """Milliseconds per decoding step by group, from a profiler trace of one call: every XLA
  operation of the decoding loops (those that ran at least 8 times), grouped by the
  operation's shape and kind, divided by the number of steps."""
  import collections
  import glob
  import gzip
  import shutil

  import jax

  trace_dir = tempfile.mkdtemp(prefix="pofx_sampling_trace_")
  try:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      steps = run_once()
    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as fh:
      events = json.load(fh)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(("$", "Thunk", "Slinky", "PjRt")):
      total[e["name"]] += e.get("dur", 0) / 1e3
      count[e["name"]] += 1
  # Operations of the decoding loops run once per step of their segment; the prefill's run once.
  return {name: (ms, count[name]) for name, ms in total.items() if count[name] >= 8}, steps


def group_of(name: str, hlo: dict, vocab: int = VOCAB) -> str:
  """The group of an XLA operation of the decoding loops, from its name and result shape: results
  with 4 or more dimensions are per (row, key/value head) (attention); a last dimension of V or a
  block of the two-level draw is the token choice."""
  shape = hlo.get(name, "").split(" ", 1)[0]
  dims = [int(x) for x in re.findall(r"\d+", shape.split("[", 1)[-1].split("]", 1)[0])] if "[" in shape else []
  product = "ynn" in name or name.startswith("dot")
  if product:
    if dims and dims[-1] == vocab:
      return "LM head product"
    return "attention products" if len(dims) >= 4 else "projection and MLP products"
  if "dynamic-update-slice" in name:
    return "cache and output writes (dynamic-update-slice)"
  if len(dims) >= 4:
    return "attention softmax and mask"
  if dims and (dims[-1] == vocab or (len(dims) >= 2 and dims[-1] == 64)):
    return "token choice (softmax, inverse CDF)"
  return "other (norms, RoPE, residuals, loop control)"


def run_pofx(a) -> dict:
  import resource

  import jax
  import jax.numpy as jnp

  import pofx_backends
  from pofx import models, sampling

  if not a.no_startup:
    pofx_backends.startup()
  kernels = pofx_backends.kernels(a.kernels)
  config = models.preset("bench")
  model = models.make(config, kernels=kernels)
  params = model.init(jax.random.key(0))
  tokens, mask = prompts(a.batch, a.prompt, a.variable)
  key = jax.random.key(1)
  # Several devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=2): the rows are split
  # over them (the sampler's `mesh`), each device decoding its share in its own thread.
  n_dev = len(jax.devices())
  if a.batch % n_dev:
    raise SystemExit(f"sampling.py: --batch {a.batch} does not split over the {n_dev} devices of this process.")
  mesh = jax.make_mesh((n_dev,), ("data",)) if n_dev > 1 else None

  def once(new=a.new):
    out = sampling.sample(
      params, tokens, mask, key, model=model, max_new_tokens=new, eos_id=None, temperature=1.0, mesh=mesh
    )
    jax.block_until_ready(out)
    return out

  t = time.perf_counter()
  out = once()
  compile_s = time.perf_counter() - t
  assert out.tokens.shape == (a.batch, a.new) and int(np.asarray(out.lengths).min()) == a.new
  times = []
  for _ in range(a.reps):
    t = time.perf_counter()
    once()
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  step_cpu = []
  if a.step_cpu:
    # Process CPU time of a decoding step: a call of `new` tokens minus a call of 1 token (the
    # prefill and the call's fixed costs cancel), over `new - 1` steps; all threads counted.
    once(1)
    for _ in range(a.reps):
      t = time.process_time()
      once()
      full = time.process_time() - t
      t = time.process_time()
      once(1)
      step_cpu.append((full - (time.process_time() - t)) / (a.new - 1) * 1e3)
  lens = [int(n) for n in mask.sum(1)]
  flops = call_flops(config, a.prompt, lens, a.new)
  cache_bytes = (
    2 * config.num_layers * a.batch * config.num_kv_heads * (a.prompt + a.new) * config.resolved_head_dim * 4
  )
  res = {
    "system": f"pofx (jax {jax.__version__}, kernels {kernels.name}, {n_dev} device{'s' if n_dev > 1 else ''})",
    "devices": n_dev,
    "cpu": cpu_model(),
    "batch": a.batch,
    "prompt": a.prompt,
    "new_tokens": a.new,
    "variable": a.variable,
    "reps": a.reps,
    "sec_per_run_median": round(med, 4),
    "sec_per_run": [round(x, 4) for x in times],
    "generated_tokens_per_s": round(a.batch * a.new / med, 1),
    "compile_and_first_run_s": round(compile_s, 2),
    "kv_cache_MiB": round(cache_bytes / 2**20, 2),
    "flops_per_run": flops,
    "achieved_GFLOP_per_s": round(flops / med / 1e9, 1),
    "maxrss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "load_average": os.getloadavg(),
  }
  if step_cpu:
    res["step_cpu_ms"] = [round(x, 3) for x in step_cpu]
    res["step_cpu_ms_best"] = round(min(step_cpu), 3)
  if a.peaks:
    pk = peaks(config, a.batch)
    res["matmul_GFLOP_per_s"] = {k: round(v / 1e9, 1) for k, v in pk.items()}
    res["fraction_of_step_shape_peak"] = round(flops / med / max(pk[k] for k in ("q_o", "gate_up", "lm_head")), 3)
    res["fraction_of_large_peak"] = round(flops / med / pk["large_2048"], 3)
  if a.breakdown:
    ops, steps = breakdown(lambda: (once(), a.new)[1])
    hlo = {}
    lowered = sampling._sample.lower(  # the same program, for the shapes of its operations
      params,
      jnp.asarray(tokens),
      jnp.asarray(mask),
      key,
      jnp.float32(1.0),
      jnp.float32(1.0),
      np.asarray([-1], np.int32),
      jnp.full((a.batch,), a.new, jnp.int32),
      None,
      model=model,
      max_new_tokens=a.new,
      pad_id=0,
      top_k=0,
      use_top_p=False,
      mesh=mesh,
      combine=None,
      segments=min(4, -(-a.new // 32)),
    )
    for line in lowered.compile().as_text().splitlines():
      line = line.strip().removeprefix("ROOT ")
      if line.startswith("%") and " = " in line:
        name, rhs = line[1:].split(" = ", 1)
        hlo[name] = rhs
    groups = {}
    for name, (ms, _) in ops.items():
      g = group_of(name, hlo)
      groups[g] = groups.get(g, 0.0) + ms / steps
    step_ms = sum(groups.values())
    res["step_breakdown_ms"] = {g: round(ms, 3) for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])}
    res["step_ms_traced"] = round(step_ms, 3)
  return res


def parser():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--side", choices=("pofx",), default="pofx")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--variable", action="store_true")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--kernels", choices=("xla", "cpu"), default="xla")
  ap.add_argument("--no_startup", action="store_true")
  ap.add_argument("--peaks", action="store_true", help="XLA's matmul FLOP/s on the step's shapes and on 2048^3")
  ap.add_argument("--breakdown", action="store_true", help="profile one call: a decoding step's time by group")
  ap.add_argument(
    "--step_cpu", action="store_true", help="process CPU ms per decoding step (a call minus a 1-token call), per rep"
  )
  ap.add_argument("--compare", action="store_true", help="alternate the baseline and pofx in separate processes")
  ap.add_argument("--workloads", default="fixed,variable")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument(
    "--hf_candidates",
    default="OMP_NUM_THREADS=1",
    help="';'-separated environment settings also tried for the baseline ('' for none)",
  )
  ap.add_argument(
    "--pofx_candidates",
    default=(
      "XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1';"
      "XLA_FLAGS='--xla_force_host_platform_device_count=2';"
      "XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false "
      "intra_op_parallelism_threads=1'"
    ),
    help="';'-separated environment settings also tried for pofx ('' for none)",
  )
  ap.add_argument("--json", default=None)
  ap.add_argument("--markdown", default=None)
  return ap


def child(argv, env=None) -> dict:
  """Runs one side in a separate process (environment: this one's plus `env`); its JSON result
  (or {"error": ...})."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  load_before = os.getloadavg()
  t = time.perf_counter()
  proc = subprocess.run(
    argv + [out], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False
  )
  wall = time.perf_counter() - t
  if proc.returncode:
    return {"error": (proc.stderr or proc.stdout)[-2000:]}
  with open(out) as fh:
    res = json.load(fh)
  os.unlink(out)
  res["load_before"], res["load_after"], res["process_wall_s"] = load_before, os.getloadavg(), round(wall, 1)
  return res


def settings(a):
  """`[(side, label, env)]`: each side's default (its command as documented, this environment)
  and its candidates (`--hf_candidates`, `--pofx_candidates`: `;`-separated sets of
  `NAME=value` environment variables)."""
  out = [("hf", "default", {}), ("pofx", "default", {})]
  for side, spec in (("hf", a.hf_candidates), ("pofx", a.pofx_candidates)):
    for cand in (c.strip() for c in spec.split(";")):
      if cand:
        out.append((side, cand, dict(w.split("=", 1) for w in shlex.split(cand))))
  return out


def compare(a) -> dict:
  workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
  common = ["--batch", str(a.batch), "--prompt", str(a.prompt), "--new", str(a.new), "--reps", str(a.reps)]
  todo = settings(a)
  runs = {(w, side, label): [] for w in workloads for side, label, _ in todo}
  for r in range(a.rounds):
    for w in workloads:
      var = ["--variable"] if w == "variable" else []
      for side, label, env in todo if r % 2 == 0 else todo[::-1]:
        if side == "hf":
          argv = [sys.executable, BASELINE, *common, *var, "--out"]
        else:
          argv = [sys.executable, os.path.abspath(__file__), *common, *var, "--kernels", a.kernels, "--json"]
        res = child(argv, env)
        runs[(w, side, label)].append(res)
        tps = res.get("generated_tokens_per_s", res.get("error", "?")[-300:])
        print(f"round {r} {w:8s} {side:4s} {label:40s} tokens/s {tps}  load {res.get('load_before', '')}", flush=True)
  summary = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model()}
  try:
    summary["commit"] = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    summary["commit"] = "?"
  opts = [("workloads", a.workloads), ("rounds", a.rounds), ("reps", a.reps)]
  defaults = parser().parse_args([])
  opts += [
    (k, shlex.quote(getattr(a, k)))
    for k in ("hf_candidates", "pofx_candidates")
    if getattr(a, k) != getattr(defaults, k)
  ]
  summary["command"] = "python benchmarks/sampling.py --compare " + " ".join(f"--{k} {v}" for k, v in opts)
  summary["workloads"] = {}
  for w in workloads:
    med = {}
    entries = []
    for side, label, _ in todo:
      ok = [x for x in runs[(w, side, label)] if "error" not in x]
      tps = [x["generated_tokens_per_s"] for x in ok]
      med[(side, label)] = statistics.median(tps) if tps else None
      entries.append(
        {
          "side": side,
          "label": label,
          "tokens_per_s": tps,
          "median": med[(side, label)],
          "load_1min": [round(x["load_before"][0], 1) for x in ok],
          "errors": [x["error"][-300:] for x in runs[(w, side, label)] if "error" in x],
        }
      )
    hf_d, px_d = runs[(w, "hf", "default")], runs[(w, "pofx", "default")]
    ratios = [
      p["generated_tokens_per_s"] / h["generated_tokens_per_s"]
      for h, p in zip(hf_d, px_d)
      if "error" not in h and "error" not in p
    ]
    best = {
      side: max(((v, k[1]) for k, v in med.items() if k[0] == side and v is not None), default=(None, None))
      for side in ("hf", "pofx")
    }
    summary["workloads"][w] = {
      "settings": entries,
      "default_ratio_per_round": [round(x, 2) for x in ratios],
      "default_ratio_median": round(statistics.median(ratios), 2) if ratios else None,
      "hf_best": {"median": best["hf"][0], "label": best["hf"][1]},
      "pofx_best": {"median": best["pofx"][0], "label": best["pofx"][1]},
      "best_ratio": round(best["pofx"][0] / best["hf"][0], 2) if best["hf"][0] and best["pofx"][0] else None,
      "pofx_kv_cache_MiB": next((x.get("kv_cache_MiB") for x in px_d if "error" not in x), None),
      "hf_system": next((x.get("system") for x in hf_d if "error" not in x), None),
    }
  summary["markdown"] = markdown(summary)
  print(summary["markdown"])
  return summary


def markdown(s) -> str:
  fmt = lambda x: "-" if x is None else f"{x:,.0f}"
  lines = [
    f"{s['date']}, commit {s['commit']}, {s['cpu']}. Command: `{s['command']}`.",
    "",
    "| prompts | side | setting | tokens/s (median) | runs | load (1 min) at each run |",
    "|---|---|---|---|---|---|",
  ]
  for w, r in s["workloads"].items():
    for e in r["settings"]:
      lines.append(
        f"| {w} | {e['side']} | {e['label']} | {fmt(e['median'])} | {', '.join(fmt(x) for x in e['tokens_per_s'])} | "
        f"{', '.join(str(x) for x in e['load_1min'])} |"
      )
  lines += ["", "| prompts | pofx / HF, defaults (per round) | pofx best / HF best |", "|---|---|---|"]
  for w, r in s["workloads"].items():
    lines.append(
      f"| {w} | {r['default_ratio_median']} ({', '.join(str(x) for x in r['default_ratio_per_round'])}) | "
      f"{r['best_ratio']} ({r['pofx_best']['label']} / {r['hf_best']['label']}) |"
    )
  return "\n".join(lines)


def main(argv=None):
  a = parser().parse_args(argv)
  res = compare(a) if a.compare else run_pofx(a)
  if not a.compare:
    print(json.dumps(res, indent=1))
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(res, fh, indent=1)
  if a.markdown and a.compare:
    with open(a.markdown, "w") as fh:
      fh.write(res["markdown"] + "\n")


if __name__ == "__main__":
  main()
