r"""Many devices and many processes: meshes, sharding rules, three ways to run the train step.

    mesh = parallel.make_mesh(data=4, fsdp=2)                     # axes ("data", "fsdp")
    step = parallel.make_train_step(logps_fn, opt, mode="jit", mesh=mesh, loss="dpo", reference=ref)
    state = step.put_state(train.init_state(...))                 # placed by the sharding rules
    state, metrics = step(state, step.put_batch(batch), rng)

The three modes run the same `pofx.train` step and give the single-device result (tested to
1e-5 on 8 simulated CPU devices, `tests/test_parallel.py`):

  "jit"        `jax.jit` over NamedShardings (GSPMD). The whole `TrainState` (params, optimizer
               state, reference params) is placed by the sharding rules (data parallel, FSDP,
               tensor); the global batch is split over the batch axes ("data", "fsdp"). XLA
               inserts the collectives; batch statistics (aot's sort, beta-DPO's moments) are
               global by construction.
  "shard_map"  `jax.shard_map` data parallelism over all batch axes, state replicated, with
               explicit collectives (`pofx.collectives`) and `check_vma=False`: every
               evaluation of the objective all-gathers the policy's and the reference's
               log-probs and the loss's per-pair inputs (`all_gather_batch`), so every device
               computes the loss of the *global* batch, and the parameters enter the objective
               through `grad_pmean`, an identity whose backward is `pmean` over the axis. The
               batch is per-device micro-batches stacked on a leading device axis
               (`stack_per_device`, `split_per_device`).
  "pmap"       the same step under `jax.pmap` (state broadcast with in_axes=None).

Why this gradient is right (the N-times trap). Each device evaluates the same global loss L;
the all-gather's transpose is a reduce-scatter, so device i receives N dL/d(its log-probs) and
its local backward gives N c_i, where sum_i c_i is the true gradient; `pmean` gives sum_i c_i.
With the default `check_vma=True`, a gradient with respect to a replicated parameter comes back
already summed over the axis: a local-mean loss followed by `pmean` is then N times the global
gradient (`tests/test_parallel.py` shows the trap and the fix side by side). Because the
averaging happens where the parameters enter the objective, SAM's ascent gradient and AWP's are
global too, so a perturbed step equals its single-device run.

Sharding rules are data: a sequence of `(regex, value)` pairs matched (`re.search`, first match
wins) against a leaf's path in the `TrainState`, written `params/layers_0/attn/q_proj/kernel`,
`opt_state/0/mu/layers_0/...`, `ref_state/...` (optimizer moments and reference parameters
carry the parameter's path, so one rule covers all three). A value is a `PartitionSpec`, `FSDP`
(shard the largest dimension divisible by the fsdp axis size, for leaves of at least
`min_fsdp_size` elements) or `REPLICATE`. Axis names absent from the mesh, and axes that do not
divide their dimension, are dropped, so one rule set serves every mesh. Unmatched leaves,
scalars and PRNG keys are replicated.

Multi-process (a pod slice, a SLURM job, or `experiments/launch_local.py`): the program joins
the run first (`experiments/distributed.py`: `jax.distributed.initialize`), then every process
builds the same mesh over all devices, places the state with `put_state` (all processes pass
the same values) and feeds only its own rows of the global batch: `process_rows(mesh,
global_batch_size)` says which, `put_process_batch` assembles the global array
(`jax.make_array_from_process_local_data`), `to_host` brings results back.
Per-device `pofx.batching.PairBatch`es are joined into one global batch with
`concat_pair_batches` (row indices offset so that the flat indices stay valid).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pofx import batching, options
from pofx import train as train_lib

DATA, FSDP_AXIS, TENSOR = "data", "fsdp", "tensor"
BATCH_AXES = (DATA, FSDP_AXIS)
MODES = options.DEVICE_PARALLEL_MODES

FSDP = "fsdp"  # rule value: shard the largest divisible dimension over the fsdp axis
REPLICATE = "replicate"  # rule value: replicate

Rule = Tuple[str, Union[P, str]]

# Every leaf big enough is FSDP-sharded (plain data parallelism when the mesh has fsdp = 1).
DEFAULT_RULES: Tuple[Rule, ...] = ((r".*", FSDP),)
# Replicate everything (plain data parallelism on any mesh).
REPLICATED_RULES: Tuple[Rule, ...] = ((r".*", REPLICATE),)
# Megatron-style tensor parallelism for `pofx.models.llama` (column-parallel q/k/v/gate/up,
# row-parallel o/down, vocab-parallel embedding and head) combined with FSDP.
LLAMA_RULES: Tuple[Rule, ...] = (
  (r"attn/(q_proj|k_proj|v_proj)/kernel$", P(FSDP_AXIS, TENSOR)),
  (r"attn/(q_proj|k_proj|v_proj)/bias$", P(TENSOR)),  # Qwen2: split like the columns it adds to
  (r"attn/o_proj/kernel$", P(TENSOR, FSDP_AXIS)),
  (r"mlp/(gate_proj|up_proj)/kernel$", P(FSDP_AXIS, TENSOR)),
  (r"mlp/down_proj/kernel$", P(TENSOR, FSDP_AXIS)),
  (r"embed/embedding$", P(TENSOR, FSDP_AXIS)),
  (r"lm_head$", P(FSDP_AXIS, TENSOR)),
  (r".*", FSDP),
)


# ------------------------------------------------------------------------------------------------
# Mesh.


def make_mesh(
  data: int = -1, fsdp: int = 1, tensor: Optional[int] = None, *, devices: Optional[Sequence[Any]] = None
) -> jax.sharding.Mesh:
  """A mesh with axes ("data", "fsdp"[, "tensor"]) and Auto axis types (classic GSPMD).

  One size may be -1 (the remaining devices). `tensor=None` leaves the axis out. `devices`
  defaults to all devices of all processes (`jax.make_mesh` orders them for the topology).
  """
  names = [DATA, FSDP_AXIS] + ([TENSOR] if tensor is not None else [])
  sizes = [int(data), int(fsdp)] + ([int(tensor)] if tensor is not None else [])
  n_dev = len(devices) if devices is not None else jax.device_count()
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"make_mesh: invalid axis sizes {dict(zip(names, sizes))}; allowed: positive, at most one -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_dev % known:
      raise ValueError(f"make_mesh: {n_dev} devices are not divisible by {known} ({dict(zip(names, sizes))}).")
    sizes[sizes.index(-1)] = n_dev // known
  if math.prod(sizes) != n_dev:
    raise ValueError(
      f"make_mesh: axis sizes {dict(zip(names, sizes))} need {math.prod(sizes)} devices; there are {n_dev}."
    )
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  if devices is None:
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=axis_types)
  return jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(sizes), tuple(names), axis_types=axis_types)


def batch_axes(mesh) -> Tuple[str, ...]:
  """The mesh axes the batch is split over: those of ("data", "fsdp") that the mesh has."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


# ------------------------------------------------------------------------------------------------
# Sharding rules.


def path_str(path) -> str:
  """`jax.tree_util` key path -> "params/layers_0/attn/q_proj/kernel" (the rules' subject)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _sanitize(spec: P, shape, mesh) -> P:
  """Drops axes the mesh lacks or that do not divide their dimension; pads to the leaf's rank."""
  out = []
  entries = tuple(spec) + (None,) * max(0, len(shape) - len(spec))
  for dim, entry in zip(shape, entries[: len(shape)]):
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if axes and dim % _axis_size(mesh, axes):
      axes = ()
    out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*out)


def _fsdp(spec: P, shape, mesh, min_size: int) -> P:
  n = mesh.shape[FSDP_AXIS] if FSDP_AXIS in mesh.axis_names else 1
  used = {a for e in spec for a in ((e,) if isinstance(e, str) else (e or ()))}
  if n == 1 or FSDP_AXIS in used or math.prod(shape) < min_size:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  free = [i for i, d in enumerate(shape) if entries[i] is None and d % n == 0]
  if not free:
    return spec
  best = max(free, key=lambda i: (shape[i], -i))  # the largest dimension; the first on ties
  entries[best] = FSDP_AXIS
  return P(*entries)


def leaf_spec(path: str, leaf, mesh, rules: Sequence[Rule] = DEFAULT_RULES, *, min_fsdp_size: int = 2**16) -> P:
  """The PartitionSpec of one leaf at `path` by the first matching rule (replicated if none)."""
  shape = tuple(getattr(leaf, "shape", ()))
  if not shape or (hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)):
    return P()
  for pattern, value in rules:
    if re.search(pattern, path):
      if isinstance(value, str):
        if value == REPLICATE:
          return P()
        if value == FSDP:
          return _fsdp(P(), shape, mesh, min_fsdp_size)
        raise ValueError(
          f"sharding rule {pattern!r}: invalid value {value!r}; allowed: a PartitionSpec, {FSDP!r} or {REPLICATE!r}."
        )
      if not isinstance(value, P):
        raise ValueError(
          f"sharding rule {pattern!r}: invalid value {value!r}; allowed: a PartitionSpec, {FSDP!r} or {REPLICATE!r}."
        )
      return _sanitize(value, shape, mesh)
  return P()


def tree_specs(tree, mesh, rules: Sequence[Rule] = DEFAULT_RULES, *, min_fsdp_size: int = 2**16):
  """PartitionSpecs of every leaf of `tree` (a TrainState, params, ...) by the rules."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: leaf_spec(path_str(p), x, mesh, rules, min_fsdp_size=min_fsdp_size), tree
  )


def tree_shardings(tree, mesh, rules: Sequence[Rule] = DEFAULT_RULES, *, min_fsdp_size: int = 2**16):
  """NamedShardings of every leaf of `tree` by the rules."""
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s),
    tree_specs(tree, mesh, rules, min_fsdp_size=min_fsdp_size),
    is_leaf=lambda x: isinstance(x, P),
  )


# Batch entries that index the whole batch (block lists, compacted token lists): replicated.
BATCH_WIDE_KEYS = ("attention_blocks", "scored_tokens")


def batch_specs(batch, mesh, *, grad_accum_steps: int = 1):
  """Global batch: the pair/row axis (axis 1 when micro-batches are stacked) over ("data", "fsdp").

  The entries named in `BATCH_WIDE_KEYS` (`pofx.batching.attention_blocks` / `scored_tokens`,
  whose flat indices refer to the whole batch) are replicated instead. In modes "shard_map" and
  "pmap" build them per device, from each device's own `PairBatch`.
  """
  axes = batch_axes(mesh)
  n = _axis_size(mesh, axes)
  dim = 0 if grad_accum_steps == 1 else 1

  def one(path, x):
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) <= dim or any(getattr(k, "key", None) in BATCH_WIDE_KEYS for k in path):
      return P()
    if shape[dim] % n:
      raise ValueError(
        f"batch leaf {path_str(path)!r} has {shape[dim]} rows on axis {dim}, not divisible by the "
        f"{n} devices of the batch axes {axes}; pad the batch (num_pairs=...) to a multiple."
      )
    return P(*([None] * dim + [axes]))

  return jax.tree_util.tree_map_with_path(one, batch)


def _put(x, sharding):
  """device_put that also works when the sharding spans other processes (same value everywhere)."""
  if sharding.is_fully_addressable:
    # A fresh copy: device_put may alias the caller's buffer on one device, and the step donates.
    return jax.device_put(x.copy() if isinstance(x, jax.Array) else x, sharding)
  if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=impl)
  arr = np.asarray(x)
  return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def put(tree, shardings):
  """Places every leaf of `tree` with the matching sharding (a tree of NamedShardings)."""
  return jax.tree.map(_put, tree, shardings)


# ------------------------------------------------------------------------------------------------
# Batches.


def split_per_device(batch, num_devices: int, *, grad_accum_steps: int = 1):
  """A global dict-of-arrays batch -> per-device blocks stacked on a new leading axis.

  Device d gets pairs `[d * B / n, (d + 1) * B / n)` (the order `all_gather_batch` restores).
  With stacked micro-batches (`grad_accum_steps > 1`, shape `[k, B, ...]`) each micro-batch is
  split the same way (result `[n, k, B / n, ...]`). Not for `PairBatch`es (their flat row
  indices are global): build one per device and use `stack_per_device`.
  """
  dim = 0 if grad_accum_steps == 1 else 1

  def one(x):
    x = jnp.asarray(x)
    b = x.shape[dim]
    if b % num_devices:
      raise ValueError(f"split_per_device: batch size {b} is not divisible by {num_devices} devices.")
    y = x.reshape(x.shape[:dim] + (num_devices, b // num_devices) + x.shape[dim + 1 :])
    return jnp.moveaxis(y, dim, 0)

  return jax.tree.map(one, batch)


def stack_per_device(batches):
  """Per-device batches (same structure and shapes) -> one tree stacked on a leading device axis."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


def concat_pair_batches(batches, *, start: int = 0):
  """Joins per-device `PairBatch`es (same shapes and layout) into one global `PairBatch`.

  Rows and pairs are concatenated in order; the flat indices `row * L + column` of batch d are
  offset by `(start + d) * R * L`, so the result is a valid batch of all the pairs (for mode
  "jit", where each device's rows and pairs sit on that device). In a multi-process run a
  process joins the batches of its own devices with `start` = the global index of its first
  device block (`process_rows(mesh, n_blocks)[0]`) and feeds them with `put_process_batch`.
  Works on numpy arrays (host side).
  """
  batches = list(batches)
  first = batches[0]
  if not all(isinstance(b, batching.PairBatch) and b.layout == first.layout for b in batches):
    raise ValueError("concat_pair_batches: expected PairBatches of one layout.")
  R, L = np.shape(first.tokens)
  shapes = {(np.shape(b.tokens), np.shape(b.chosen_index), np.shape(b.rejected_index)) for b in batches}
  if len(shapes) != 1:
    raise ValueError(f"concat_pair_batches: batches of different shapes {sorted(shapes)}; use the same buckets.")
  out = {}
  for f in dataclasses.fields(batching.PairBatch):
    if f.name == "layout":
      continue
    vals = [getattr(b, f.name) for b in batches]
    if vals[0] is None:
      out[f.name] = None
      continue
    if f.name in ("chosen_index", "rejected_index"):
      vals = [np.asarray(v) + np.asarray((start + d) * R * L, np.asarray(v).dtype) for d, v in enumerate(vals)]
    out[f.name] = np.concatenate([np.asarray(v) for v in vals], axis=0)
  return batching.PairBatch(**out, layout=first.layout)


# ------------------------------------------------------------------------------------------------
# Multi-process.


def process_rows(mesh, global_batch_size: int) -> np.ndarray:
  """The rows of the global batch that this process must feed (sorted indices), for a batch
  split over the batch axes of `mesh`."""
  sharding = NamedSharding(mesh, P(batch_axes(mesh)))
  rows = set()
  for idx in sharding.addressable_devices_indices_map((int(global_batch_size),)).values():
    rows.update(range(*idx[0].indices(int(global_batch_size))))
  return np.asarray(sorted(rows), np.int64)


def put_process_batch(local_batch, mesh, *, grad_accum_steps: int = 1):
  """This process's rows of the global batch -> global arrays split over the batch axes."""
  axes = batch_axes(mesh)
  dim = 0 if grad_accum_steps == 1 else 1

  def one(x):
    x = np.asarray(x)
    spec = P(*([None] * dim + [axes])) if x.ndim > dim else P()
    shape = list(x.shape)
    if x.ndim > dim:
      shape[dim] = shape[dim] * _axis_size(mesh, axes) // _local_batch_devices(mesh)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, tuple(shape))

  return jax.tree.map(one, local_batch)


def _local_batch_devices(mesh) -> int:
  """How many distinct batch shards live on this process."""
  n = _axis_size(mesh, batch_axes(mesh))
  return len(process_rows(mesh, n))


def to_host(tree):
  """Numpy copies of (possibly multi-process) arrays: gathers shards from other processes."""

  def one(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


# ------------------------------------------------------------------------------------------------
# The parallel train step.


@dataclasses.dataclass(frozen=True)
class ParallelStep:
  """A train step bound to a mesh and a mode. Call it as `step(state, batch, rng)`.

  `put_state(state)`: place a TrainState (rules in mode "jit", replicated otherwise).
  `put_batch(batch)`: mode "jit": the global batch, split over the batch axes; modes
  "shard_map"/"pmap": per-device batches stacked on a leading device axis (`stack_per_device`).
  Every process passes the whole batch; in a multi-process run feed only this process's part
  with `put_process_batch` instead (its rows, or its stacked device blocks).
  """

  mode: str
  mesh: jax.sharding.Mesh
  rules: Tuple[Rule, ...]
  min_fsdp_size: int
  grad_accum_steps: int
  fn: Callable[..., Any]

  def __call__(self, state, batch, rng):
    return self.fn(state, batch, rng)

  def state_shardings(self, state):
    if self.mode == "jit":
      return tree_shardings(state, self.mesh, self.rules, min_fsdp_size=self.min_fsdp_size)
    return jax.tree.map(lambda _: NamedSharding(self.mesh, P()), state)

  def put_state(self, state):
    if self.mode == "pmap":
      return state  # broadcast by pmap (in_axes=None)
    return put(state, self.state_shardings(state))

  def put_batch(self, batch):
    if self.mode == "jit":
      specs = batch_specs(batch, self.mesh, grad_accum_steps=self.grad_accum_steps)
      return put(batch, jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda x: isinstance(x, P)))
    n = self.mesh.devices.size
    for x in jax.tree.leaves(batch):
      if np.shape(x)[:1] != (n,):
        raise ValueError(
          f"mode {self.mode!r}: the batch must be per-device batches stacked on a leading axis of "
          f"{n} (stack_per_device / split_per_device); got a leaf of shape {np.shape(x)}."
        )
    if self.mode == "pmap":
      return batch
    axes = batch_axes(self.mesh)
    return put(batch, jax.tree.map(lambda _: NamedSharding(self.mesh, P(axes)), batch))


def make_train_step(
  logps_fn,
  optimizer,
  *,
  mode: str = "jit",
  mesh=None,
  rules: Sequence[Rule] = DEFAULT_RULES,
  min_fsdp_size: int = 2**16,
  donate: bool = True,
  **step_kwargs,
) -> ParallelStep:
  """`pofx.train.make_train_step` run on `mesh` in one of `MODES` (see the module docstring).

  Args:
    logps_fn, optimizer, **step_kwargs: as `pofx.train.make_train_step` (loss, loss_hyper,
      reference, perturbation, grad_accum_steps, learning_rate_fn, guard_nonfinite).
    mode: "jit" (GSPMD with the sharding rules), "shard_map" or "pmap" (data parallel).
    mesh: from `make_mesh` (default: all devices on "data"). In modes "shard_map" and "pmap"
      every device is a data-parallel replica (a "tensor" axis > 1 is refused).
    rules: sharding rules (mode "jit"); `min_fsdp_size`: smallest leaf (elements) FSDP splits.
    donate: donate the state's buffers (modes "jit" and "shard_map").
  """
  if mode not in MODES:
    raise ValueError(f"parallel.make_train_step: invalid mode={mode!r}; allowed: {list(MODES)}.")
  for k in ("jit", "axis_name"):
    if k in step_kwargs:
      raise ValueError(f"parallel.make_train_step: {k!r} is set by the mode; do not pass it.")
  if "axis_name" in (step_kwargs.get("loss_hyper") or {}):
    raise ValueError(
      "parallel.make_train_step: do not pass loss_hyper['axis_name']; in every mode the loss already "
      "sees the global batch (a loss-level all-gather would gather it twice)."
    )
  mesh = make_mesh() if mesh is None else mesh
  rules = tuple(rules)
  accum = int(step_kwargs.get("grad_accum_steps", 1))
  replicated = NamedSharding(mesh, P())

  if mode == "jit":
    raw = train_lib.make_train_step(logps_fn, optimizer, jit=False, **step_kwargs)
    cache = {}

    def fn(state, batch, rng):
      key = (jax.tree.structure(state), tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves(state)))
      if key not in cache:
        sh = tree_shardings(state, mesh, rules, min_fsdp_size=min_fsdp_size)
        cache[key] = jax.jit(
          raw,
          in_shardings=(sh, None, replicated),
          out_shardings=(sh, replicated),
          donate_argnums=(0,) if donate else (),
        )
      return cache[key](state, batch, rng)

  else:
    if TENSOR in mesh.axis_names and mesh.shape[TENSOR] > 1:
      raise ValueError(
        f"mode {mode!r} is data parallel only; the mesh has tensor={mesh.shape[TENSOR]}. Use mode='jit'."
      )
    if mode == "shard_map":
      axes = batch_axes(mesh)
      axis = axes if len(axes) > 1 else axes[0]
      raw = train_lib.make_train_step(logps_fn, optimizer, jit=False, axis_name=axis, **step_kwargs)

      def local(state, batch, rng):
        return raw(state, jax.tree.map(lambda x: x[0], batch), rng)  # [1, ...] block -> [...]

      mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P()), out_specs=(P(), P()), check_vma=False)
      fn = jax.jit(mapped, donate_argnums=(0,) if donate else ())
    else:
      if jax.process_count() > 1:
        raise ValueError("mode 'pmap' runs in one process; with several processes use mode 'jit' or 'shard_map'.")
      raw = train_lib.make_train_step(logps_fn, optimizer, jit=False, axis_name=DATA, **step_kwargs)
      fn = jax.pmap(raw, axis_name=DATA, in_axes=(None, 0, None), out_axes=None, devices=list(mesh.devices.flat))

  return ParallelStep(
    mode=mode, mesh=mesh, rules=rules, min_fsdp_size=int(min_fsdp_size), grad_accum_steps=accum, fn=fn
  )
