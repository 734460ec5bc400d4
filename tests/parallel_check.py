"""Multi-device equality checks, run by tests/test_parallel.py in its own process.

Sets 8 simulated CPU devices before importing JAX (keeping the caller's other XLA flags), runs
the train step on one device and in every parallel mode of `pofx.parallel` (each reference
strategy in a cover of the modes: `TOY_MODES`), and prints one JSON line `{"results": {name: {...}}}`
with, per check, the largest difference from the single-device run (parameters and metrics
after a few steps; |a - b| / (1 + |b|)) and how far the single-device run moved the
parameters (so that an equality cannot hold vacuously). The assertions live in the test file.

  python tests/parallel_check.py [group ...]      groups: toy, fused_optimizer, awp_accum, batchstat, trap, llama (default all)

The single-device runs of a group are compiled as one program (`_run_single`); every parallel
run goes through `pofx.parallel.make_train_step` on its own.
"""

import os
import sys

# The caller's XLA flags (the test suite's cheaper-compilation options, tests/conftest.py) are
# kept; only the device count is set here.
_flags = [
  f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
]
os.environ["XLA_FLAGS"] = " ".join([*_flags, "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from pofx import collectives, parallel, perturbations, references, train  # noqa: E402
from tests import toy  # noqa: E402

N_DEV = 8
STEPS = 3
MODES = {
  "jit_8": ("jit", (8, 1)),
  "jit_4x2": ("jit", (4, 2)),
  "jit_2x4": ("jit", (2, 4)),
  "shard_map_8": ("shard_map", (8, 1)),
  "pmap_8": ("pmap", (8, 1)),
}


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  both_nan = np.isnan(a) & np.isnan(b)
  d = np.where(both_nan, 0.0, np.abs(a - b) / (1.0 + np.abs(b)))
  return float(np.max(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0


def _tree_err(x, y):
  xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
  if len(xs) != len(ys):
    return float("inf")
  return max([_rel_err(a, b) for a, b in zip(xs, ys)] or [0.0])


def _host(state, metrics, first_metrics):
  return (
    parallel.to_host(state.params),
    parallel.to_host(state.ref_state),
    parallel.to_host(metrics),
    parallel.to_host(first_metrics),
  )


def _init(params, kw, opt=None):
  # SGD with momentum: linear in the gradient, so a gradient off by a factor (the N-times trap)
  # shows in the parameters (Adam's g / sqrt(v) would hide it); the momentum is optimizer state.
  opt = opt or optax.sgd(1.0, momentum=0.9)
  pert = kw.get("perturbation") or perturbations.none()
  state = train.init_state(
    jax.tree.map(jnp.array, params),
    opt,
    kw["reference"],
    pert,
    loss=kw.get("loss", "dpo"),
    loss_hyper=kw.get("loss_hyper"),
    rng=jax.random.key(3),
    frozen=kw.get("frozen", ()),
  )
  return opt, state


def _step_kw(kw):
  return {k: v for k, v in kw.items() if k != "frozen"}  # LoRA's base goes to the state only


def _run(
  logps_fn, params, batch, per_device, *, mode, mesh_shape, rules=parallel.DEFAULT_RULES, steps=STEPS, opt=None, **kw
):
  """(params, ref_state, last metrics, first metrics) on host after `steps` steps of `mode`."""
  opt, state = _init(params, kw, opt)
  mesh = parallel.make_mesh(*mesh_shape)
  step = parallel.make_train_step(logps_fn, opt, mode=mode, mesh=mesh, rules=rules, min_fsdp_size=1, **_step_kw(kw))
  state = step.put_state(state)
  b = step.put_batch(batch if mode == "jit" else per_device)
  first = None
  for i in range(steps):
    state, metrics = step(state, b, jax.random.fold_in(jax.random.key(7), i))
    first = metrics if i == 0 else first
  return _host(state, metrics, first)


def _run_single(logps_fn, params, runs, *, steps=STEPS, opt=None):
  """The single-device runs `[(batch, step kwargs), ...]`, as `_run` returns them, all in one
  compiled program (one `pofx.train` step per run side by side: one XLA compilation instead of
  one per run; each run's computation is its own)."""
  states, fns, batches = [], [], []
  for batch, kw in runs:
    o, state = _init(params, kw, opt)
    fns.append(train.make_train_step(logps_fn, o, jit=False, **_step_kw(kw)))
    states.append(state)
    batches.append(batch)

  @jax.jit
  def all_steps(states, batches, rng):
    return tuple(zip(*[f(s, b, rng) for f, s, b in zip(fns, states, batches)]))

  states = tuple(states)
  first = None
  for i in range(steps):
    states, metrics = all_steps(states, tuple(batches), jax.random.fold_in(jax.random.key(7), i))
    first = metrics if i == 0 else first
  return [_host(s, m, f) for s, m, f in zip(states, metrics, first)]


def _compare(base, out, params0):
  p0 = parallel.to_host(params0)
  return {
    "err": max(_tree_err(out[0], base[0]), _tree_err(out[1], base[1]), _tree_err(out[2], base[2])),
    "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(base[0]), jax.tree.leaves(p0))),
    "loss": float(base[2]["loss"]),
  }


# ------------------------------------------------------------------------------------------------
# Toy model: every reference strategy and SAM/AWP in the parallel modes.
#
# The modes are of two kinds. "jit" is GSPMD: the single-device step compiled for a mesh, with the
# state (parameters, optimizer and reference state) placed by the sharding rules; jit_2x4 splits
# the batch over all 8 devices as jit_8 does and also shards the state (FSDP over 4). "shard_map"
# and "pmap" run the same per-device step (`pofx.train.make_train_step` with `axis_name`, whose
# collectives carry each strategy's global quantities) under two different mappings. So every
# strategy runs in jit_2x4 and in at least one per-device mode, and each per-device mode runs
# several strategies: frozen (also jit_8 and jit_4x2, the other meshes) and SAM (a global gradient
# norm) in both, the others alternating.
TOY_MODES = toy.TOY_MODES  # the cover (tests/toy.py, where it is listed)


def _toy_batch(b=16):
  batch = toy.batch(5, b=b)
  ref = toy.logps_fn(toy.init(1), batch)
  return {**batch, "ref_chosen_logps": ref.chosen, "ref_rejected_logps": ref.rejected}


def _toy_config(name):
  ref_params = toy.init(1)
  if name == "none":
    return dict(loss="simpo", reference=references.none())
  if name == "frozen":
    return dict(reference=references.frozen(ref_params, toy.logps_fn))
  if name == "cached":
    fp = references.fingerprint(ref_params, vocab="toy", max_prompt_len=1, max_completion_len=5)
    return dict(reference=references.cached(fp, fp))
  if name == "multi":
    return dict(
      reference=references.multi(
        [references.frozen(ref_params, toy.logps_fn), references.frozen(toy.init(9), toy.logps_fn)]
      )
    )
  if name == "synced":
    return dict(reference=references.synced(0.5, 2, toy.logps_fn))
  if name == "ema":
    return dict(reference=references.ema(0.9, toy.logps_fn))
  if name == "ema_companions":  # Adaptive-DPO: batch norms and means over the companions' logits
    base = references.frozen(ref_params, toy.logps_fn)
    return dict(
      loss="adaptive_dpo",
      loss_hyper={"beta": 0.5},
      reference=references.ema_companions(base, toy.logps_fn, decays=(0.9, 0.5), warmup=0),
    )
  if name == "sam":
    return dict(reference=references.frozen(ref_params, toy.logps_fn), perturbation=perturbations.sam(0.05))
  if name == "awp":
    return dict(reference=references.frozen(ref_params, toy.logps_fn), perturbation=perturbations.awp(0.05))
  raise ValueError(name)


def toy_group(results, strategies=("none", "frozen", "cached", "multi", "synced", "ema", "ema_companions", "sam")):
  params = toy.init(0)
  batch = _toy_batch()
  per_device = parallel.split_per_device(batch, N_DEV)
  bases = _run_single(toy.logps_fn, params, [(batch, _toy_config(n)) for n in strategies])
  for name, base in zip(strategies, bases):
    kw = _toy_config(name)
    for mode_name in TOY_MODES[name]:
      mode, shape = MODES[mode_name]
      out = _run(toy.logps_fn, params, batch, per_device, mode=mode, mesh_shape=shape, **kw)
      results[f"toy/{name}/{mode_name}"] = _compare(base, out, params)
      if name == "frozen" and mode_name == "shard_map_8":
        # The step's own gradient (trap group): the first step's grad_norm under shard_map is
        # the single-device one.
        g, g0 = out[3]["grad_norm"], base[3]["grad_norm"]
        results["trap/step_grad_norm"] = {"err": _rel_err(g, g0), "ratio": float(g) / float(g0)}


def awp_accum_group(results):
  """AWP in every mode, and gradient accumulation: 2 micro-batches; device d holds its slice of each."""
  toy_group(results, strategies=("awp",))
  params = toy.init(0)
  batch = _toy_batch()
  micro = [jax.tree.map(lambda x: x[:8], batch), jax.tree.map(lambda x: x[8:], batch)]
  stacked = train.stack_microbatches(micro)
  accum = dict(grad_accum_steps=2, **_toy_config("frozen"))
  (base,) = _run_single(toy.logps_fn, params, [(stacked, accum)])
  per_device = parallel.split_per_device(stacked, N_DEV, grad_accum_steps=2)
  for mode_name in ("jit_4x2", "shard_map_8"):
    mode, shape = MODES[mode_name]
    out = _run(toy.logps_fn, params, stacked, per_device, mode=mode, mesh_shape=shape, **accum)
    results[f"toy/accum2/{mode_name}"] = _compare(base, out, params)


# ------------------------------------------------------------------------------------------------
# Losses with batch statistics: aot (sorts the batch), beta-DPO (moments, filter over the batch).


def batchstat_group(results):
  params = toy.init(0)
  batch = _toy_batch()
  per_device = parallel.split_per_device(batch, N_DEV)
  ref = references.frozen(toy.init(1), toy.logps_fn)
  configs = {
    "aot": dict(loss="aot"),
    "aot_unpaired": dict(loss="aot_unpaired"),
    "beta_dpo": dict(loss="beta_dpo", loss_hyper={"a": 0.6, "filter_ratio": 0.25}),
  }
  bases = _run_single(toy.logps_fn, params, [(batch, dict(reference=ref, **kw)) for kw in configs.values()])
  # The loss of one device's batch (2 pairs) differs: the equality below is not vacuous.
  local = _run_single(
    toy.logps_fn,
    params,
    [(jax.tree.map(lambda x: x[:2], batch), dict(reference=ref, **kw)) for kw in configs.values()],
    steps=1,
  )
  for (name, kw), base, loc in zip(configs.items(), bases, local):
    for mode_name in ("jit_2x4", "shard_map_8", "pmap_8"):  # jit_2x4 splits the batch 8 ways as jit_8 does
      mode, shape = MODES[mode_name]
      out = _run(toy.logps_fn, params, batch, per_device, mode=mode, mesh_shape=shape, reference=ref, **kw)
      results[f"batchstat/{name}/{mode_name}"] = _compare(base, out, params)
    results[f"batchstat/{name}/local_differs"] = {"err": abs(float(loc[3]["loss"]) - float(base[3]["loss"]))}


# ------------------------------------------------------------------------------------------------
# The N-times gradient trap under shard_map, explicitly.


def trap_group(results):
  params = toy.init(0)
  batch = _toy_batch()
  mesh = parallel.make_mesh(N_DEV)
  ref_params = toy.init(1)

  def dpo_mean(policy, ref):
    rho = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)  # DPO's margin (not times beta)
    return jnp.mean(jax.nn.softplus(-0.1 * rho))

  def objective(p, b):
    return dpo_mean(toy.logps_fn(p, b), toy.logps_fn(ref_params, b))

  single = jax.jit(jax.grad(objective))(params, batch)

  # Naive: replicated params, per-device mean loss, pmean; check_vma=True (the default).
  def naive(p, b):
    return jax.lax.pmean(jax.grad(objective)(p, b), "data")

  # pofx: grad_pmean where the params enter, the log-probs gathered, the global loss.
  def pofx_dp(p, b):
    def obj(p):
      p = collectives.grad_pmean(p, "data")
      pol, ref = collectives.all_gather_batch((toy.logps_fn(p, b), toy.logps_fn(ref_params, b)), "data")
      return dpo_mean(pol, ref)

    return jax.grad(obj)(p)

  # Also: params cast to varying, per-device mean, pmean (the other correct pattern).
  def pcast_dp(p, b):
    pv = jax.tree.map(lambda x: jax.lax.pcast(x, "data", to="varying"), p)
    return jax.lax.pmean(jax.grad(objective)(pv, b), "data")

  specs = dict(mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
  outs = {
    "naive": jax.jit(jax.shard_map(naive, **specs))(params, batch),
    "pofx": jax.jit(jax.shard_map(pofx_dp, check_vma=False, **specs))(params, batch),
    "pcast": jax.jit(jax.shard_map(pcast_dp, **specs))(params, batch),
  }
  g0 = parallel.to_host(single)
  norm0 = float(optax.global_norm(single))
  for name, g in outs.items():
    g = parallel.to_host(g)
    results[f"trap/{name}"] = {"err": _tree_err(g, g0), "ratio": float(optax.global_norm(g)) / norm0}
  # The step's own gradient (grad_norm of a shard_map step) is checked in the toy group.


# ------------------------------------------------------------------------------------------------
# The tiny Llama with real PairBatches built per device on the host.


def llama_group(results):
  from pofx import batching, models, policy

  model = models.make(models.preset("tiny", num_layers=1))  # one block: every rule's leaves, half the compile time
  logps_fn = policy.make_logps_fn(model.apply, model.head, chunk_size=64)
  params = model.init(jax.random.key(0))
  ref = references.frozen(model.init(jax.random.key(1)), logps_fn)
  rng = np.random.default_rng(0)
  V = model.config.vocab_size
  pairs = [
    (
      rng.integers(1, V, rng.integers(2, 6)),
      rng.integers(1, V, rng.integers(1, 6)),
      rng.integers(1, V, rng.integers(1, 6)),
    )
    for _ in range(N_DEV)
  ]
  buckets = dict(seq_bucket=16, completion_bucket=8)
  whole = {
    "pairs": batching.fused([p for p, _, _ in pairs], [c for _, c, _ in pairs], [r for _, _, r in pairs], **buckets)
  }
  per_dev_batches = [batching.fused([p], [c], [r], **buckets) for p, c, r in pairs]
  per_device = parallel.stack_per_device([{"pairs": b} for b in per_dev_batches])
  joined = {"pairs": parallel.concat_pair_batches(per_dev_batches)}
  opt = optax.sgd(1.0)  # linear in the gradient: differences are not amplified as by Adam's g/|g|
  (base,) = _run_single(logps_fn, params, [(whole, dict(reference=ref))], opt=opt)
  runs = {
    "jit_4x2": ("jit", (4, 2), parallel.DEFAULT_RULES),
    "jit_2x2x2_tensor": ("jit", (2, 2, 2), parallel.LLAMA_RULES),
    "shard_map_8": ("shard_map", (8, 1), parallel.DEFAULT_RULES),
  }
  for name, (mode, shape, rules) in runs.items():
    out = _run(logps_fn, params, joined, per_device, mode=mode, mesh_shape=shape, rules=rules, reference=ref, opt=opt)
    results[f"llama/{name}"] = _compare(base, out, params)
  # LoRA: adapters trained with SAM against the adapters_off reference over a frozen base that
  # the rules place like the model's parameters (tensor-parallel with LLAMA_RULES).
  from pofx import lora

  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "o_proj", "up_proj", "down_proj"))
  adapters = lora.init(params, spec, jax.random.key(5))
  adapters = jax.tree.map(
    lambda x: x if x.shape[0] != 2 else 0.1 * jax.random.normal(jax.random.key(6), x.shape), adapters
  )
  lora_kw = dict(
    reference=references.adapters_off(logps_fn),
    perturbation=perturbations.sam(0.05),
    combine=lambda f, a: lora.apply(f, a, spec),
    frozen=params,
  )
  (lora_base,) = _run_single(logps_fn, adapters, [(whole, lora_kw)], opt=opt)
  for name in ("jit_2x2x2_tensor", "shard_map_8"):
    mode, shape, rules = runs[name]
    out = _run(logps_fn, adapters, joined, per_device, mode=mode, mesh_shape=shape, rules=rules, opt=opt, **lora_kw)
    results[f"llama/lora/{name}"] = _compare(lora_base, out, adapters)
  # The FSDP/tensor placement really shards: count sharded parameter leaves of each mesh.
  for name, (_, shape, rules) in runs.items():
    specs = parallel.tree_specs(params, parallel.make_mesh(*shape), rules, min_fsdp_size=1)
    results[f"llama/{name}/sharded_leaves"] = {
      "count": sum(any(e is not None for e in s) for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
    }


def fused_optimizer_group(results):
  """The CPU backend's AdamW (`pofx.optimizers.FusedOptimizer`: one native custom call applying the
  step in place) in the parallel modes, against the same optimizer on one device."""
  from pofx_backends.cpu import native
  from pofx_backends.cpu import optimizers as cpu_optimizers

  if not native.available():
    results["fused_adamw/unavailable"] = {"reason": native.unavailable_reason()}
    return
  params = toy.init(0)
  batch = _toy_batch()
  per_device = parallel.split_per_device(batch, N_DEV)
  kw = _toy_config("frozen")
  opt = cpu_optimizers.adamw(0.1, weight_decay=0.01, max_grad_norm=1.0)
  (base,) = _run_single(toy.logps_fn, params, [(batch, kw)], opt=opt)
  for mode_name in FUSED_OPTIMIZER_MODES:
    mode, shape = MODES[mode_name]
    out = _run(toy.logps_fn, params, batch, per_device, mode=mode, mesh_shape=shape, opt=opt, **kw)
    results[f"fused_adamw/{mode_name}"] = _compare(base, out, params)


FUSED_OPTIMIZER_MODES = ("jit_2x4", "shard_map_8", "pmap_8")

GROUPS = {
  "toy": toy_group,
  "fused_optimizer": fused_optimizer_group,
  "awp_accum": awp_accum_group,
  "batchstat": batchstat_group,
  "trap": trap_group,
  "llama": llama_group,
}


def main(argv):
  assert jax.device_count() == N_DEV, jax.devices()
  results = {}
  for g in argv or list(GROUPS):
    GROUPS[g](results)
  print(json.dumps({"results": results}))


if __name__ == "__main__":
  main(sys.argv[1:])
