"""pofx's DPO train step on exactly the model and data of `trl_dpo_baseline.py`.

    python benchmarks/dpo_step.py --workload {fixed,variable}          # the fast path of the workload
        [--kernels {auto,xla,cpu,gpu,tpu}] [--auto_measure {step,calibration}]
        [--blas {auto,mkl,openblas}] [--products {xla,blas,blas_all}] [--cpu_attention {on,off}]
        [--no_startup] [--reference {frozen,cached,multi}] [--perturbation {none,sam,awp,rwp}]
        [--layout {prompt_shared,fused,packed}] [--row_length 1024 | 0] [--completion_bucket 64]
        [--per_doubling 8] [--logprobs {chunked,naive}] [--attention {block_sparse,dense}]
        [--block_size 64] [--save_probs] [--scored {compact,slots}] [--rwp_steps 10]
        [--steps 30] [--warmup 5] [--bs 8] [--json PATH]

With no option but `--workload`, each workload runs the best setting known for it (`WORKLOADS`):
fixed: cached reference, prompt-shared rows; variable: cached reference, all pairs of a step in
one packed row of bucketed length (`--row_length 0`), completion bucket 256, 4 geometric buckets
per doubling. Any option given on the command line overrides the workload's value.

Kernels (`pofx_backends`): the program first calls `pofx_backends.startup()` (on the CPU, glibc
keeps freed memory for reuse; `--no_startup` skips it, e.g. when a launcher already set the
allocator), then resolves `--kernels`: "auto" picks by measurement on the CPU, timing this
benchmark's own step on a few of its batches with each candidate (`--auto_measure step`, the
default) or the backend's short calibration (`--auto_measure calibration`). Each candidate is
measured in a child process, so the timed process never holds the losing candidate's compiled
step nor the heap its measurement left behind. `--blas`,
`--products` and `--cpu_attention` are the CPU backend's options (`pofx_backends.cpu.kernels`).

Model: the `bench` preset (hidden 256, 4 layers, 8 heads, 4 KV heads, MLP 688, vocab 4096,
untied; 5.0 M parameters), float32, AdamW lr 1e-6, DPO beta 0.1: the TRL baseline's settings.
Data: 256 pairs with the baseline's lengths (same seeded draws: fixed = 64/64/64; variable =
prompt U[16,192], chosen and rejected U[16,256]); token ids are random (they do not change the
arithmetic). 8 pairs per step in a seeded shuffled order, as a DataLoader would.

Reported (steady state: the first --warmup of --steps steps are excluded, as in the TRL
baseline; every distinct batch shape is compiled before timing, and the compile time is reported
separately): pairs/s, real tokens/s (counted as TRL counts them, 2p + c + r per pair, so the two
figures compare), peak RSS; the step's processed FLOPs counted analytically (`pofx.flops`: the
policy forward and backward, the LM head, the reference forward when it runs, the perturbation's
passes), the achieved FLOP/s, that as a fraction of a float32 2048^3 matmul measured in this
process, and the model-FLOPs utilisation against the dense bf16 peak on a known accelerator
(None on CPUs); the minor page faults and the system CPU time per timed step (`getrusage`
differences over the timed steps). Host-side batch building is inside the timed loop, as TRL's
collation is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import pofx  # noqa: E402
import pofx_backends  # noqa: E402
from pofx import batching, flops, models, perturbations, policy, references, train  # noqa: E402
from pofx.options import KERNEL_BACKENDS  # noqa: E402
from pofx_backends.cpu import host_memory  # noqa: E402

VOCAB = 4096
N_PAIRS = 256

GEOMETRIC = {k: batching.geometric_buckets(1 << 20, per_doubling=k) for k in (2, 4, 8, 16)}

# The best setting known for each workload: what the documented command runs by default.
WORKLOADS = {
  "fixed": {
    "reference": "cached",
    "layout": "prompt_shared",
    "row_length": 1024,
    "completion_bucket": 64,
    "per_doubling": 8,
  },
  "variable": {"reference": "cached", "layout": "packed", "row_length": 0, "completion_bucket": 256, "per_doubling": 4},
}


def lengths(workload: str, seed: int = 0):
  """(prompt, chosen, rejected) lengths: the same draws as trl_dpo_baseline.py's `lengths`."""
  rng = np.random.default_rng(seed)
  if workload == "fixed":
    return [(64, 64, 64)] * N_PAIRS
  return [(int(rng.integers(16, 193)), int(rng.integers(16, 257)), int(rng.integers(16, 257))) for _ in range(N_PAIRS)]


def dataset(workload: str, seed: int = 0):
  lens = lengths(workload, seed)
  rng = np.random.default_rng(seed + 1)
  eos = VOCAB - 1
  ids = lambda n: rng.integers(0, VOCAB - 2, n).astype(np.int32)
  prompts = [ids(p) for p, _, _ in lens]
  chosen = [np.append(ids(c - 1), eos).astype(np.int32) for _, c, _ in lens]
  rejected = [np.append(ids(r - 1), eos).astype(np.int32) for _, _, r in lens]
  return prompts, chosen, rejected, lens


def batch_order(n_steps: int, bs: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  order = []
  while len(order) < n_steps * bs:
    order.extend(rng.permutation(N_PAIRS).tolist())
  return [order[i * bs : (i + 1) * bs] for i in range(n_steps)]


def make_pairs(layout, data, idx, *, row_length, completion_bucket=64, per_doubling=8, block_size=64):
  """`row_length` 0 (packed layout): one row, its length rounded up to a geometric bucket that is
  a multiple of `block_size`."""
  prompts, chosen, rejected, _ = data
  p, c, r = [prompts[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx]
  if layout == "packed" and row_length == 0:
    lengths = [n for n in GEOMETRIC[per_doubling] if n % block_size == 0]
    return batching.packed(p, c, r, length_bucket=lengths, completion_bucket=completion_bucket)
  if layout == "packed":
    return batching.packed(p, c, r, row_length=row_length, rows_bucket=2, completion_bucket=completion_bucket)
  return batching.build(layout, p, c, r, seq_bucket=64, completion_bucket=completion_bucket)


def naive_logps_fn(model):
  """What the peers do: full [R, L, V] logits and a float32 log_softmax, then gather."""

  def fn(params, batch):
    pairs = batch["pairs"]
    kw = {"attention_blocks": batch["attention_blocks"]} if "attention_blocks" in batch else {}
    hidden = model.apply(params, pairs.tokens, pairs.positions, pairs.segment_ids, pairs.branch_ids, **kw)
    logits = jnp.einsum("rld,dv->rlv", hidden, model.head(params), preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    R, L, V = logp.shape
    flat = logp.reshape(R * L, V)
    c = jnp.take_along_axis(flat[pairs.chosen_index], pairs.chosen_targets[..., None], -1)[..., 0]
    r = jnp.take_along_axis(flat[pairs.rejected_index], pairs.rejected_targets[..., None], -1)[..., 0]
    return pofx.PairLogps.from_tokens(c, pairs.chosen_mask, r, pairs.rejected_mask)

  return fn


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of a float32 `n x n` matmul by XLA in this process (median of `reps`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times)


def parser():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workload", choices=sorted(WORKLOADS), default="fixed")
  ap.add_argument(
    "--kernels",
    choices=list(KERNEL_BACKENDS),
    default="auto",
    help="kernel backend (pofx_backends): auto = chosen on this machine by measurement on the CPU",
  )
  ap.add_argument(
    "--auto_measure",
    choices=["step", "calibration"],
    default="step",
    help="--kernels auto on the CPU: time this benchmark's step on a few of its batches with each "
    "candidate (step), or the backend's short calibration (calibration)",
  )
  ap.add_argument("--measure_only", default=None, help=argparse.SUPPRESS)  # a child of --kernels auto
  ap.add_argument(
    "--blas",
    choices=["auto", "mkl", "openblas"],
    default=None,
    help="CPU backend: the BLAS of its products (auto: Intel MKL where installed, else OpenBLAS)",
  )
  ap.add_argument(
    "--products",
    choices=["xla", "blas", "blas_all"],
    default=None,
    help="CPU backend: which products go to the BLAS (none, the weight gradients, every product)",
  )
  ap.add_argument(
    "--cpu_attention",
    choices=["on", "off"],
    default=None,
    help="CPU backend: the fused AVX-512 block-sparse attention kernels (off: XLA's attention)",
  )
  ap.add_argument(
    "--no_startup",
    action="store_true",
    help="skip pofx_backends.startup() (glibc's allocator settings stay as the process started)",
  )
  ap.add_argument(
    "--reference", choices=["frozen", "cached", "multi"], default=None, help="default: the workload's (cached)"
  )
  ap.add_argument(
    "--perturbation",
    choices=["none", "sam", "awp", "rwp"],
    default="none",
    help="rwp: gamma 0.01, c_min 1.0 and --rwp_steps proxy ascents (pofx.perturbations.rwp)",
  )
  ap.add_argument("--rwp_steps", type=int, default=10, help="RWP proxy ascent steps (the authors' 10)")
  ap.add_argument("--layout", choices=list(batching.LAYOUTS), default=None, help="default: the workload's")
  ap.add_argument("--logprobs", choices=["chunked", "naive"], default="chunked")
  ap.add_argument(
    "--attention",
    choices=["dense", "block_sparse"],
    default="block_sparse",
    help="block_sparse: only the (query, key) block pairs the mask uses (pofx.sparse_attention)",
  )
  ap.add_argument("--block_size", type=int, default=64, help="block_sparse attention block size")
  ap.add_argument(
    "--completion_bucket",
    type=int,
    default=None,
    help="padded completion length T rounded up to a multiple of this (with --scored compact the "
    "[B, T] arrays are only indices, so a coarse bucket costs nothing and means fewer shapes); "
    "default: the workload's",
  )
  ap.add_argument(
    "--blocks_bucket",
    type=int,
    default=0,
    help="block-pair count rounded up to a multiple of this; 0: geometric buckets",
  )
  ap.add_argument(
    "--scored_bucket",
    type=int,
    default=0,
    help="scored-token count rounded up to a multiple of this; 0: geometric buckets",
  )
  ap.add_argument(
    "--per_doubling",
    type=int,
    choices=[2, 4, 8, 16],
    default=None,
    help="geometric buckets per doubling (padding < 1/per_doubling; fewer = fewer compiled shapes); "
    "default: the workload's",
  )
  ap.add_argument("--save_probs", action="store_true", help="store head probabilities (no logits recompute)")
  ap.add_argument(
    "--scored",
    choices=["compact", "slots"],
    default="compact",
    help="compact: the head and the last block's MLP run on real completion tokens only "
    "(batching.scored_tokens); slots: on every padded [B, T] completion slot",
  )
  ap.add_argument("--chunk_size", type=int, default=4096, help="LM-head chunk (tokens); one chunk per step here")
  ap.add_argument(
    "--row_length",
    type=int,
    default=None,
    help="packed layout row length; 0: all pairs in one row, its length bucketed (--per_doubling); "
    "default: the workload's",
  )
  ap.add_argument("--preset", default="bench")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--remat", action="store_true", help="rematerialise each transformer block (memory for compute)")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--warmup", type=int, default=5, help="first steps excluded from the figures (as the TRL baseline)")
  ap.add_argument("--bs", type=int, default=8, help="pairs per step")
  ap.add_argument("--json", default=None)
  return ap


def parse(argv=None):
  """The parsed options, the workload's best setting filling every option not given."""
  argv = sys.argv[1:] if argv is None else list(argv)
  a = parser().parse_args(argv)
  a.argv = argv
  for name, value in WORKLOADS[a.workload].items():
    if getattr(a, name) is None:
      setattr(a, name, value)
  if not 0 <= a.warmup < a.steps:
    raise SystemExit(f"dpo_step.py: --warmup must be in [0, --steps), got {a.warmup} with --steps {a.steps}.")
  vocab = models.preset(a.preset).vocab_size
  if vocab < VOCAB:
    raise SystemExit(
      f"dpo_step.py: --preset {a.preset} has a vocabulary of {vocab} tokens; the workload's token ids reach "
      f"{VOCAB - 1}, so the preset needs vocab_size >= {VOCAB} (e.g. 'bench' or 'llama3_1b')."
    )
  return a


def cpu_options(a) -> dict:
  """The CPU backend's options given on the command line."""
  opts = {
    "blas": a.blas,
    "products": a.products,
    "attention": None if a.cpu_attention is None else a.cpu_attention == "on",
  }
  return {k: v for k, v in opts.items() if v is not None}


class Bench:
  """The baseline's model and data, with one configured pofx DPO step per kernel backend."""

  def __init__(self, a):
    self.a = a
    self.config = models.preset(a.preset, dtype=a.dtype, remat=a.remat)
    self.params = models.make(self.config).init(jax.random.key(0))
    self.n_params = sum(x.size for x in jax.tree.leaves(self.params))
    self.data = dataset(a.workload)
    self.steps_idx = batch_order(a.steps, a.bs)
    members = 2 if a.reference == "multi" else 1
    # Cached reference log-probs (zeros until `precompute`: the values do not change the step's work).
    self.cache = {k: (np.zeros(N_PAIRS, np.float32), np.zeros(N_PAIRS, np.float32)) for k in range(members)}
    self.t_pre = 0.0
    self.compiled, self.flops_by_shape, self.t_compile = {}, {}, 0.0
    self.metrics = None

  def logps_fn(self, kernels):
    a = self.a
    model = models.make(self.config, kernels=kernels)
    if a.logprobs == "naive":
      return naive_logps_fn(model)
    return policy.make_logps_fn(
      model.apply, model.head, chunk_size=a.chunk_size, save_probs=a.save_probs, kernels=kernels
    )

  def precompute(self, kernels):
    """One pass over the dataset (8 pairs at a time) per cached reference, as TRL's
    precompute_ref_log_probs does (the second `multi` member: other random weights)."""
    a = self.a
    if a.reference == "frozen":
      return
    t0 = time.perf_counter()
    model = models.make(self.config, kernels=kernels)
    members = [self.params] + ([model.init(jax.random.key(1))] if a.reference == "multi" else [])
    all_idx = [list(range(i, min(i + a.bs, N_PAIRS))) for i in range(0, N_PAIRS, a.bs)]
    pre = jax.jit(self.logps_fn(kernels))
    for k, member in enumerate(members):
      ch, rj = self.cache[k]
      for idx in all_idx:
        out = pre(member, self.model_batch(idx))
        ch[idx], rj[idx] = np.asarray(out.chosen), np.asarray(out.rejected)
    self.t_pre = time.perf_counter() - t0
    del pre
    jax.clear_caches()
    host_memory.release_freed_memory()

  def make_step(self, kernels):
    """`(step, state)` of the configured train step with `kernels`."""
    a = self.a
    logps_fn = self.logps_fn(kernels)
    if a.reference == "frozen":
      reference = references.frozen(jax.tree.map(jnp.array, self.params), logps_fn)
    else:
      fp = references.fingerprint(self.params, vocab=VOCAB, max_prompt_len=192, max_completion_len=256)
      if a.reference == "cached":
        reference = references.cached(fp, fp)
      else:
        reference = references.multi([references.cached_member(0, fp, fp), references.cached_member(1, fp, fp)])
    pert = {
      "none": perturbations.none,
      "sam": lambda: perturbations.sam(0.05),
      "awp": lambda: perturbations.awp(0.01),
      "rwp": lambda: perturbations.rwp(0.01, c_min=1.0, steps=a.rwp_steps),
    }[a.perturbation]()
    optimizer = optax.adamw(1e-6)
    step = train.make_train_step(
      logps_fn, optimizer, loss="dpo", loss_hyper={"beta": 0.1}, reference=reference, perturbation=pert
    )
    state = train.init_state(
      jax.tree.map(jnp.array, self.params), optimizer, reference, pert, loss="dpo", rng=jax.random.key(0)
    )
    return step, state

  def step_flops(self, b) -> float:
    """Processed FLOPs of the step on batch `b` (`pofx.flops`)."""
    a = self.a
    work = flops.work_of_batch(b, head_on_all_positions=a.logprobs == "naive")
    reference = {"frozen": "frozen", "cached": "cached", "multi": "cached"}[a.reference]
    return flops.dpo_step_flops(
      self.config, work, reference=reference, perturbation=a.perturbation, rwp_steps=a.rwp_steps
    ).total

  def compile(self, kernels, steps=None):
    """Compiles the step with `kernels` for every distinct batch shape of `steps` (default: all)."""
    self.step, self.state = self.make_step(kernels)
    t0 = time.perf_counter()
    self.compiled, self.flops_by_shape = {}, {}
    for i in range(len(self.steps_idx)) if steps is None else steps:
      b = self.batch(i)
      key = self._shape_key(b)
      if key not in self.compiled:
        self.compiled[key] = self.step.lower(self.state, b, jax.random.key(0)).compile()
        self.flops_by_shape[key] = self.step_flops(b)
        host_memory.release_freed_memory()
    self.t_compile = time.perf_counter() - t0
    jax.clear_caches()  # tracing and lowering caches of the compiled shapes (the executables are kept)
    host_memory.release_freed_memory()

  def measure(self, kernels, batches: int = 8, reps: int = 3) -> float:
    """Seconds per step with `kernels`, median over `reps` passes over the batches of the most
    frequent shape among the first `batches` (one untimed pass first): `--kernels auto`'s
    measurement."""
    keys = [self._shape_key(self.batch(i)) for i in range(min(batches, len(self.steps_idx)))]
    common = Counter(keys).most_common(1)[0][0]
    chosen = [i for i, k in enumerate(keys) if k == common]
    self.compile(kernels, chosen)
    times = []
    for rep in range(reps + 1):
      t = time.perf_counter()
      self.run(chosen[0], len(chosen), indices=chosen)
      if rep:
        times.append((time.perf_counter() - t) / len(chosen))
    self.compiled = {}
    jax.clear_caches()
    host_memory.release_freed_memory()
    return statistics.median(times)

  @staticmethod
  def _shape_key(b):
    return tuple(x.shape for x in jax.tree.leaves(b))

  def batch(self, i):
    """Host-side batch building for step i (layout + the cached reference log-probs)."""
    a, idx = self.a, self.steps_idx[i % len(self.steps_idx)]
    b = self.model_batch(idx)
    if a.reference == "cached":
      b["ref_chosen_logps"], b["ref_rejected_logps"] = self.cache[0][0][idx], self.cache[0][1][idx]
    elif a.reference == "multi":
      for k in (0, 1):
        b[f"ref{k}_chosen_logps"], b[f"ref{k}_rejected_logps"] = self.cache[k][0][idx], self.cache[k][1][idx]
    return b

  def model_batch(self, idx):
    """The layout of pairs `idx`, with the block list of its attention mask when block-sparse."""
    a = self.a
    pairs = make_pairs(
      a.layout,
      self.data,
      idx,
      row_length=a.row_length,
      completion_bucket=a.completion_bucket,
      per_doubling=a.per_doubling,
      block_size=a.block_size,
    )
    b = {"pairs": pairs}
    if a.attention == "block_sparse":
      b["attention_blocks"] = batching.attention_blocks(
        pairs, block_size=a.block_size, bucket=a.blocks_bucket or GEOMETRIC[a.per_doubling]
      )
    if a.scored == "compact":
      b["scored_tokens"] = batching.scored_tokens(pairs, bucket=a.scored_bucket or GEOMETRIC[a.per_doubling])
    return b

  def run(self, first: int, n: int, indices=None):
    """Times steps first..first+n-1, or `indices` (batch building inside, blocking on each step's loss)."""
    ends, step_flops = [], []
    t_start = time.perf_counter()
    for i in range(first, first + n) if indices is None else indices:
      b = self.batch(i)
      key = self._shape_key(b)
      self.state, self.metrics = self.compiled[key](self.state, b, jax.random.fold_in(jax.random.key(1), i))
      self.metrics["loss"].block_until_ready()
      ends.append(time.perf_counter())
      step_flops.append(self.flops_by_shape[key])
    return np.diff([t_start] + ends), np.asarray(step_flops)

  def real_tokens_per_step(self, first: int, n: int) -> float:
    lens = self.data[3]
    idxs = [self.steps_idx[i % len(self.steps_idx)] for i in range(first, first + n)]
    return sum(2 * lens[i][0] + lens[i][1] + lens[i][2] for idx in idxs for i in idx) / len(idxs)


def backend_kernels(a, name: str):
  """The kernels of backend `name`, with the CPU backend's command-line options when it is "cpu"."""
  return pofx_backends.kernels(name, **(cpu_options(a) if name == "cpu" else {}))


def measure_in_child(a, name: str) -> float:
  """Seconds per step of this benchmark's step with kernel backend `name` (`Bench.measure`),
  measured by a child process started with the same options."""
  drop = {"--kernels", "--json", "--measure_only"}
  args, skip = [], False
  for arg in a.argv:
    if skip:
      skip = False
      continue
    key = arg.split("=", 1)[0]
    if key in drop:
      skip = "=" not in arg
      continue
    args.append(arg)
  cmd = [sys.executable, os.path.abspath(__file__), *args, "--kernels", name, "--measure_only", name]
  if a.no_startup:
    cmd.append("--no_startup")
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise SystemExit(f"dpo_step.py: measuring --kernels {name} failed:\n{out.stderr[-2000:]}")
  return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def resolve_kernels(a):
  """`(kernels, name, details)` of `--kernels` (see the module docstring)."""
  if a.kernels == "auto":
    measure = None
    if a.auto_measure == "step":
      measure = lambda kernels: measure_in_child(a, kernels.name)
    name, details = pofx_backends.resolve("auto", measure=measure)
    details["measure"] = a.auto_measure
  else:
    name, details = pofx_backends.resolve(a.kernels)
  return backend_kernels(a, name), name, details


def main(argv=None):
  a = parse(argv)
  started = {"host_memory": "unchanged", "detail": "--no_startup"} if a.no_startup else pofx_backends.startup()
  bench = Bench(a)
  if a.measure_only:
    print(json.dumps({"seconds": bench.measure(backend_kernels(a, a.measure_only))}))
    return None
  t0 = time.perf_counter()
  kernels, kernels_name, kernels_details = resolve_kernels(a)
  t_resolve = time.perf_counter() - t0
  bench.precompute(kernels)
  bench.compile(kernels)
  bench.run(0, a.warmup)  # warm-up steps, excluded as TRL excludes them
  usage0 = resource.getrusage(resource.RUSAGE_SELF)
  durations, step_flops = bench.run(a.warmup, a.steps - a.warmup)
  usage1 = resource.getrusage(resource.RUSAGE_SELF)
  timed = a.steps - a.warmup
  total = float(np.sum(durations))
  sec_per_step = total / timed
  real_tokens = bench.real_tokens_per_step(a.warmup, timed)
  peak = matmul_peak()
  achieved = float(np.sum(step_flops)) / total
  device_kind = str(jax.devices()[0].device_kind)
  utilisation = flops.mfu(achieved, device_kind)
  res = {
    "system": f"pofx {pofx.__version__} / jax {jax.__version__}",
    "device": device_kind,
    "workload": a.workload,
    "kernels": kernels_name,
    "kernels_requested": a.kernels,
    "kernels_details": kernels_details,
    "kernels_resolve_s": round(t_resolve, 2),
    "cpu_options": cpu_options(a),
    "startup": started,
    "reference": a.reference,
    "perturbation": a.perturbation,
    "layout": a.layout,
    "logprobs": a.logprobs,
    "attention": a.attention,
    "block_size": a.block_size,
    "save_probs": a.save_probs,
    "scored": a.scored,
    "row_length": a.row_length,
    "completion_bucket": a.completion_bucket,
    "per_doubling": a.per_doubling,
    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    "preset": a.preset,
    "dtype": a.dtype,
    "remat": a.remat,
    "n_params": int(bench.n_params),
    "pairs_per_step": a.bs,
    "steps": a.steps,
    "warmup": a.warmup,
    "distinct_shapes": len(bench.flops_by_shape),
    "compile_s": round(bench.t_compile, 2),
    "precompute_s": round(bench.t_pre, 2),
    "steady_sec_per_step_mean": round(sec_per_step, 4),
    "steady_sec_per_step_median": round(float(np.median(durations)), 4),
    "pairs_per_s": round(a.bs / sec_per_step, 3),
    "real_tokens_per_s": round(real_tokens / sec_per_step, 1),
    # Processed FLOPs (pofx.flops: analytic, LM head and reference forward included).
    "step_gflops_mean": round(float(np.mean(step_flops)) / 1e9, 2),
    "flops_per_second": round(achieved, 1),
    "achieved_gflops_per_s": round(achieved / 1e9, 1),
    "matmul_peak_gflops_per_s": round(peak / 1e9, 1),
    "fraction_of_matmul_peak": round(achieved / peak, 3),
    "mfu": None if utilisation is None else round(utilisation, 4),
    "maxrss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    # Over the timed steps: host memory page faults and the kernel time spent serving them.
    "minor_page_faults_per_step": round((usage1.ru_minflt - usage0.ru_minflt) / timed),
    "system_cpu_s_per_step": round((usage1.ru_stime - usage0.ru_stime) / timed, 4),
    "final_loss": float(bench.metrics["loss"]),
  }
  print(json.dumps(res, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
