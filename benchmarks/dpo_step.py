"""pofx's DPO train step on exactly the model and data of `trl_dpo_baseline.py`.

    python benchmarks/dpo_step.py --workload {fixed,variable} --reference {frozen,cached,multi}
        --perturbation {none,sam,awp,rwp} [--layout {prompt_shared,fused,packed}]
        [--logprobs {chunked,naive}] [--attention {block_sparse,dense}] [--block_size 64]
        [--save_probs] [--scored {compact,slots}] [--row_length 1024 | 0] [--per_doubling 8]
        [--attention_kernel {xla,native}] [--matmul {xla,blas,blas_all}] [--blas {auto,mkl,openblas}]
        [--rwp_steps 10]
        [--host_memory {default,retain}] [--steps 30] [--warmup 5] [--bs 8] [--json PATH]

Model: the `bench` preset (hidden 256, 4 layers, 8 heads, 4 KV heads, MLP 688, vocab 4096,
untied; 5.0 M parameters), float32, AdamW lr 1e-6, DPO beta 0.1: the TRL baseline's settings.
Data: 256 pairs with the baseline's lengths (same seeded draws: fixed = 64/64/64; variable =
prompt U[16,192], chosen and rejected U[16,256]); token ids are random (they do not change the
arithmetic). 8 pairs per step in a seeded shuffled order, as a DataLoader would.

Reported (steady state: the first --warmup of --steps steps are excluded, as in the TRL
baseline; every distinct batch shape is compiled before timing, and the compile time is reported
separately): pairs/s, real tokens/s (counted as TRL counts them, 2p + c + r per pair, so the two
figures compare), peak RSS, the step's FLOPs from XLA's cost analysis (with the native kernels,
of the same step built with XLA's ops, which the analysis can see into; a loop body, e.g. RWP's
proxy ascents, is counted once), the achieved FLOP/s, and that as a fraction of a float32 matmul peak (2048^3) measured in this process.
Host-side batch building is inside the timed loop, as TRL's collation is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import pofx  # noqa: E402
from pofx import batching, host_memory, models, native, perturbations, policy, references, train  # noqa: E402

VOCAB = 4096
N_PAIRS = 256

GEOMETRIC = {k: batching.geometric_buckets(1 << 20, per_doubling=k) for k in (2, 4, 8, 16)}


def lengths(workload: str, seed: int = 0):
  """(prompt, chosen, rejected) lengths: the same draws as trl_dpo_baseline.py's `lengths`."""
  rng = np.random.default_rng(seed)
  if workload == "fixed":
    return [(64, 64, 64)] * N_PAIRS
  return [(int(rng.integers(16, 193)), int(rng.integers(16, 257)), int(rng.integers(16, 257)))
          for _ in range(N_PAIRS)]


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
  return [order[i * bs:(i + 1) * bs] for i in range(n_steps)]


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
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times)


def parser():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workload", choices=["fixed", "variable"], default="fixed")
  ap.add_argument("--reference", choices=["frozen", "cached", "multi"], default="cached")
  ap.add_argument("--perturbation", choices=["none", "sam", "awp", "rwp"], default="none",
                  help="rwp: gamma 0.01, c_min 1.0 and --rwp_steps proxy ascents (pofx.perturbations.rwp)")
  ap.add_argument("--rwp_steps", type=int, default=10, help="RWP proxy ascent steps (the authors' 10)")
  ap.add_argument("--layout", choices=list(batching.LAYOUTS), default="prompt_shared")
  ap.add_argument("--logprobs", choices=["chunked", "naive"], default="chunked")
  ap.add_argument("--attention", choices=["dense", "block_sparse"], default="block_sparse",
                  help="block_sparse: only the (query, key) block pairs the mask uses (pofx.sparse_attention)")
  ap.add_argument("--block_size", type=int, default=64, help="block_sparse attention block size")
  ap.add_argument("--attention_kernel", choices=["xla", "native"], default="xla",
                  help="block_sparse: XLA ops (pofx.sparse_attention) or fused AVX-512 kernels (pofx.native)")
  ap.add_argument("--matmul", choices=["xla", "blas", "blas_all"], default="xla",
                  help="blas: the weight gradients of the projections and the LM head by a BLAS; blas_all: their "
                       "forward products and input gradients too (LlamaConfig.matmul, policy.make_logps_fn(matmul=), "
                       "pofx.native.dense)")
  ap.add_argument("--blas", choices=["auto", "mkl", "openblas"], default="auto",
                  help="the BLAS of --matmul blas/blas_all: auto = Intel MKL where the mkl package is installed, "
                       "else numpy's OpenBLAS")
  ap.add_argument("--completion_bucket", type=int, default=64,
                  help="padded completion length T rounded up to a multiple of this (with --scored compact the "
                       "[B, T] arrays are only indices, so a coarse bucket costs nothing and means fewer shapes)")
  ap.add_argument("--blocks_bucket", type=int, default=0,
                  help="block-pair count rounded up to a multiple of this; 0: geometric buckets")
  ap.add_argument("--scored_bucket", type=int, default=0,
                  help="scored-token count rounded up to a multiple of this; 0: geometric buckets")
  ap.add_argument("--per_doubling", type=int, choices=[2, 4, 8, 16], default=8,
                  help="geometric buckets per doubling (padding < 1/per_doubling; fewer = fewer compiled shapes)")
  ap.add_argument("--save_probs", action="store_true", help="store head probabilities (no logits recompute)")
  ap.add_argument("--scored", choices=["compact", "slots"], default="compact",
                  help="compact: the head and the last block's MLP run on real completion tokens only "
                       "(batching.scored_tokens); slots: on every padded [B, T] completion slot")
  ap.add_argument("--chunk_size", type=int, default=4096, help="LM-head chunk (tokens); one chunk per step here")
  ap.add_argument("--row_length", type=int, default=1024,
                  help="packed layout row length; 0: all pairs in one row, its length bucketed (--per_doubling)")
  ap.add_argument("--host_memory", choices=["default", "retain"], default="default",
                  help="retain: glibc keeps freed memory for reuse (pofx.host_memory.retain_freed_memory)")
  ap.add_argument("--preset", default="bench")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--remat", action="store_true", help="rematerialise each transformer block (memory for compute)")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--warmup", type=int, default=5, help="first steps excluded from the figures (as the TRL baseline)")
  ap.add_argument("--bs", type=int, default=8, help="pairs per step")
  ap.add_argument("--json", default=None)
  return ap


class Bench:
  """One configured pofx DPO step on the baseline's model and data, compiled and ready to time."""

  def __init__(self, a):
    self.a = a
    config = models.preset(a.preset, dtype=a.dtype, remat=a.remat, matmul=a.matmul, blas=a.blas)
    model = models.make(config)
    params = model.init(jax.random.key(0))
    self.n_params = sum(x.size for x in jax.tree.leaves(params))

    def logps_for(model, matmul):
      if a.logprobs == "naive":
        return naive_logps_fn(model)
      return policy.make_logps_fn(model.apply, model.head, chunk_size=a.chunk_size, save_probs=a.save_probs,
                                  matmul=matmul, blas=a.blas)

    logps_fn = logps_for(model, a.matmul)
    self.data = dataset(a.workload)
    self.steps_idx = batch_order(a.steps, a.bs)

    # Reference.
    self.t_pre = 0.0
    ref_params = jax.tree.map(jnp.array, params)
    self.cache = {}
    if a.reference == "frozen":
      reference = references.frozen(ref_params, logps_fn)
    else:
      fp = references.fingerprint(ref_params, vocab=VOCAB, max_prompt_len=192, max_completion_len=256)
      # One pass over the dataset (8 pairs at a time), as TRL's precompute_ref_log_probs does.
      t0 = time.perf_counter()
      members = [ref_params] + ([model.init(jax.random.key(1))] if a.reference == "multi" else [])
      all_idx = [list(range(i, min(i + a.bs, N_PAIRS))) for i in range(0, N_PAIRS, a.bs)]
      pre = jax.jit(logps_fn)
      for k, mp in enumerate(members):
        ch = np.zeros(N_PAIRS, np.float32)
        rj = np.zeros(N_PAIRS, np.float32)
        for idx in all_idx:
          out = pre(mp, self.model_batch(idx))
          ch[idx], rj[idx] = np.asarray(out.chosen), np.asarray(out.rejected)
        self.cache[k] = (ch, rj)
      self.t_pre = time.perf_counter() - t0
      del pre
      jax.clear_caches()
      host_memory.release_freed_memory()
      if a.reference == "cached":
        reference = references.cached(fp, fp)
      else:
        reference = references.multi([references.cached_member(0, fp, fp), references.cached_member(1, fp, fp)])

    pert = {"none": perturbations.none, "sam": lambda: perturbations.sam(0.05),
            "awp": lambda: perturbations.awp(0.01),
            "rwp": lambda: perturbations.rwp(0.01, c_min=1.0, steps=a.rwp_steps)}[a.perturbation]()
    optimizer = optax.adamw(1e-6)
    step_for = lambda fn, ref: train.make_train_step(fn, optimizer, loss="dpo", loss_hyper={"beta": 0.1},
                                                     reference=ref, perturbation=pert)
    self.step = step_for(logps_fn, reference)
    self.state = train.init_state(params, optimizer, reference, pert, loss="dpo", rng=jax.random.key(0))
    # XLA's cost analysis does not see inside the native kernels' custom calls: the FLOPs are
    # those of the same step with XLA's ops (same arithmetic), compiled for the count only.
    self.native = a.attention_kernel == "native" or a.matmul != "xla"
    counted_step = self.step
    if self.native:
      twin_fn = logps_for(models.make(config.replace(matmul="xla")), "xla")
      counted_step = step_for(twin_fn, references.frozen(ref_params, twin_fn) if a.reference == "frozen" else reference)

    # Compile every distinct shape first (a run compiles a handful of bucketed shapes once).
    t0 = time.perf_counter()
    self.flops_by_shape, self.compiled = {}, {}
    for i in range(len(self.steps_idx)):
      b = self.batch(i)
      key = self._shape_key(b)
      if key not in self.flops_by_shape:
        compiled = self.step.lower(self.state, b, jax.random.key(0)).compile()
        if self.native:
          xla_b = dict(b)
          if "attention_blocks" in b:
            xla_b["attention_blocks"] = dataclasses.replace(b["attention_blocks"], kernel="xla")
          cost = counted_step.lower(self.state, xla_b, jax.random.key(0)).compile().cost_analysis()
        else:
          cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops_by_shape[key] = float(cost.get("flops", float("nan")))
        self.compiled[key] = compiled  # timed steps call these executables: no compile inside timing
        host_memory.release_freed_memory()
    self.t_compile = time.perf_counter() - t0
    jax.clear_caches()   # tracing and lowering caches of the compiled shapes (the executables are kept)
    host_memory.release_freed_memory()
    self.metrics = None

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
    pairs = make_pairs(a.layout, self.data, idx, row_length=a.row_length, completion_bucket=a.completion_bucket,
                       per_doubling=a.per_doubling, block_size=a.block_size)
    b = {"pairs": pairs}
    if a.attention == "block_sparse":
      b["attention_blocks"] = batching.attention_blocks(pairs, block_size=a.block_size, kernel=a.attention_kernel,
                                                       bucket=a.blocks_bucket or GEOMETRIC[a.per_doubling])
    if a.scored == "compact":
      b["scored_tokens"] = batching.scored_tokens(pairs, bucket=a.scored_bucket or GEOMETRIC[a.per_doubling])
    return b

  def run(self, first: int, n: int):
    """Times steps first..first+n-1 (batch building inside, blocking on each step's loss)."""
    ends, flops = [], []
    t_start = time.perf_counter()
    for i in range(first, first + n):
      b = self.batch(i)
      key = self._shape_key(b)
      self.state, self.metrics = self.compiled[key](self.state, b, jax.random.fold_in(jax.random.key(1), i))
      self.metrics["loss"].block_until_ready()
      ends.append(time.perf_counter())
      flops.append(self.flops_by_shape[key])
    return np.diff([t_start] + ends), np.asarray(flops)

  def real_tokens_per_step(self, first: int, n: int) -> float:
    lens = self.data[3]
    idxs = [self.steps_idx[i % len(self.steps_idx)] for i in range(first, first + n)]
    return sum(2 * lens[i][0] + lens[i][1] + lens[i][2] for idx in idxs for i in idx) / len(idxs)


def main(argv=None):
  a = parser().parse_args(argv)
  if not 0 <= a.warmup < a.steps:   # before the precompute and compilation
    raise ValueError(f"--warmup must be in [0, --steps), got {a.warmup} with --steps {a.steps}.")
  if a.host_memory == "retain":
    host_memory.retain_freed_memory()   # before the first computation (see its docstring)
  if a.attention_kernel == "native" or a.matmul != "xla":   # build the kernels now (or say why not) before the precompute
    if a.attention_kernel == "native":
      native.load()
    if a.matmul != "xla":
      native.load_blas(library=a.blas)
  bench = Bench(a)
  usage0 = resource.getrusage(resource.RUSAGE_SELF)
  durations, step_flops = bench.run(0, a.steps)
  usage1 = resource.getrusage(resource.RUSAGE_SELF)
  # Steady state as the TRL baseline measures it: the first --warmup steps are excluded.
  durations, step_flops = durations[a.warmup:], step_flops[a.warmup:]
  total = float(np.sum(durations))
  sec_per_step = total / len(durations)
  real_tokens = bench.real_tokens_per_step(a.warmup, a.steps - a.warmup)
  peak = matmul_peak()
  achieved = float(np.sum(step_flops)) / total
  res = {
      "system": f"pofx {pofx.__version__} / jax {jax.__version__}", "device": str(jax.devices()[0].device_kind),
      "workload": a.workload, "reference": a.reference, "perturbation": a.perturbation, "layout": a.layout,
      "logprobs": a.logprobs, "attention": a.attention, "attention_kernel": a.attention_kernel, "matmul": a.matmul,
      "blas": (native.resolve_blas(a.blas) if a.matmul != "xla" else None), "block_size": a.block_size,
      "save_probs": a.save_probs, "scored": a.scored, "row_length": a.row_length,
      "host_memory": a.host_memory, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "preset": a.preset, "dtype": a.dtype, "remat": a.remat,
      "n_params": int(bench.n_params),
      "pairs_per_step": a.bs, "steps": a.steps, "warmup": a.warmup, "distinct_shapes": len(bench.flops_by_shape),
      "compile_s": round(bench.t_compile, 2), "precompute_s": round(bench.t_pre, 2),
      "steady_sec_per_step_mean": round(sec_per_step, 4),
      "steady_sec_per_step_median": round(float(np.median(durations)), 4),
      "pairs_per_s": round(a.bs / sec_per_step, 3),
      "real_tokens_per_s": round(real_tokens / sec_per_step, 1),
      "step_gflops_mean": round(float(np.mean(step_flops)) / 1e9, 2),
      "achieved_gflops_per_s": round(achieved / 1e9, 1),
      "matmul_peak_gflops_per_s": round(peak / 1e9, 1),
      "fraction_of_matmul_peak": round(achieved / peak, 3),
      "maxrss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      # Over all --steps steps (host memory: page faults and kernel time spent serving them).
      "minor_page_faults_per_step": round((usage1.ru_minflt - usage0.ru_minflt) / a.steps),
      "system_cpu_s_per_step": round((usage1.ru_stime - usage0.ru_stime) / a.steps, 4),
      "final_loss": float(bench.metrics["loss"]),
  }
  print(json.dumps(res, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
