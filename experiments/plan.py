r"""Plan a pod run before paying for the pod: memory per device and FLOPs per step, nothing allocated.

    python -m experiments.plan --config=configs/dpo.py:llama3_8b --mesh=16x4 [--json=plan.json]
        [--rules=auto|default|llama|replicated] [--min_fsdp_size=65536] [--compile | --no-compile]
        [--seq_len=L] [--completion_len=T] [--config.train.batch_size=256 ...]

What it does:
  * Builds the model config from `config.model` (`pofx.models.preset`, dtype, remat) and the
    abstract `TrainState` with `jax.eval_shape` over `init_params` + `train.init_state`, with the
    run's own optimizer (`experiments.main._optimizer`), reference strategy and perturbation:
    only `ShapeDtypeStruct`s, no parameter is ever allocated.
  * Per-device bytes follow the sharding rules of `pofx.parallel`: `parallel.tree_specs` (the
    rule -> PartitionSpec machinery the "jit" mode uses) on the abstract TrainState, over an
    abstract mesh of the requested shape; each leaf's bytes are its dimensions divided by the
    sizes of the mesh axes its PartitionSpec names (replicated leaves count whole). Gradients
    are counted with the parameters' specs (they are the parameters' shape and dtype).
  * Activations are an estimate (formula below, `activation_estimate`).
  * FLOPs per step: from the compiled step's `cost_analysis()` when it is compiled
    (`jax.jit(step, in_shardings=..., out_shardings=...).lower(abstract_state, abstract_batch,
    key).compile()` on simulated CPU devices, in a subprocess with
    `XLA_FLAGS=--xla_force_host_platform_device_count=N` when this process has fewer than N
    devices), else analytically (`analytic_flops`); the report says which. By default
    (neither --compile nor --no-compile) the step is compiled only for small models on small
    meshes (at most `AUTO_COMPILE_MAX_PARAMS` parameters and `AUTO_COMPILE_MAX_DEVICES`
    devices): an 8B step on 64 simulated CPU devices takes too long and too much host memory.

Batch shapes. Rows of the layout `config.data.layout` with every row in the first bucket:
prompt_shared: B rows of L = `data.seq_bucket` tokens; fused: 2B rows of L; packed: ceil(B / 4)
rows of 4L (the row length `experiments.main` uses, four pairs a row assumed); completions
padded to T = `data.completion_bucket`. `--seq_len` / `--completion_len` override L and T.
With `train.grad_accum_steps` = k the step sees k stacked micro-batches of B / k pairs.

Activation estimate (bytes per device), with b the compute dtype's bytes, tp the tensor axis
size, tokens per device t = rows x L / (data x fsdp) (of one micro-batch), and per layer and
token the tensors the backward pass keeps (no remat):
    full = b (4D + (2 H hd + 2 K hd + 3F) / tp) + H L (4 + b) / tp
  (norm inputs and outputs 4D; rotated q, k and v; the attention output; gate, up and their
  product; fp32 softmax probabilities and their compute-dtype copy for the einsum/xla
  attention of XLA's kernels; a flash-attention backend keeps H x 4 bytes of statistics instead)
    remat nothing_saveable:                saved = b D (the block input)
    remat dots_with_no_batch_dims_saveable: saved = b (3D + (H hd + 2 K hd + 2F) / tp)
    remat dots_saveable:                   saved = b (3D + (2 H hd + 2 K hd + 2F) / tp) + 4 H L / tp
    activations = t (n_layers saved + full)      [remat: one block recomputed at a time]
                  (no remat: t n_layers full)
                + 2 B_dev T D b                 [gathered completion hidden states]
                + 2 x 4 x chunk x V / tp        [one fp32 logits block of the chunked head and
                                                 its gradient, counted whole]
This ignores XLA's fusion and scheduling (which can keep less or, transiently, more); when the
step is compiled, XLA's own temp-buffer size on the CPU backend is reported beside it.

Analytic FLOPs (global, per step; matmuls only, 2 flops per multiply-add), with R rows of L
tokens, B pairs, T completion tokens:
    blocks  = 2 P_blocks R L,   P_blocks = n_layers (2 D H hd + 2 D K hd + 3 D F)
    attn    = 4 n_layers R L^2 H hd       (QK^T and PV over the full L x L square, as computed)
    head    = 2 D V (2 B T)                (the LM head on completion tokens only)
    policy  = 3 (blocks + attn + head)     (forward + backward at twice the forward)
            + blocks + attn   if remat nothing_saveable (the forward recomputed once)
            + attn            if remat dots_with_no_batch_dims_saveable
            + head            (the chunked head recomputes its logits in the backward)
    x 2 for SAM/AWP (two gradient evaluations); + (blocks + attn + head) for a reference that
    runs a forward (frozen, guiding, synced, ema).
This is the "6 N D + 12 n_layers L^2 D" rule written for this model and step; the compiled
number also counts elementwise work (norms, softmax, the optimizer) and the loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import validate as config_validation
from experiments import main as main_lib  # the training program's --config flag and optimizer
from pofx import batching, losses, models, parallel, policy, references, train
from pofx import world as world_lib
from pofx.models import llama

_CONFIG = main_lib._CONFIG
_MESH = flags.DEFINE_string("mesh", None, "Mesh '<data>x<fsdp>[x<tensor>]' (default: config.train.parallel.mesh).")
_RULES = flags.DEFINE_enum(
  "rules",
  "auto",
  ["auto", "default", "llama", "replicated"],
  "Sharding rules of pofx.parallel: auto = llama when the mesh has tensor > 1, else default.",
)
_MIN_FSDP = flags.DEFINE_integer("min_fsdp_size", 2**16, "Smallest leaf (elements) that FSDP splits.")
_COMPILE = flags.DEFINE_bool(
  "compile",
  None,
  "Compile the step for its FLOPs (--no-compile: analytic only; unset: only small models on small meshes).",
)
_JSON = flags.DEFINE_string("json", None, "Also write the plan as JSON to this path.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Row length L (default: config.data.seq_bucket).")
_COMPLETION_LEN = flags.DEFINE_integer(
  "completion_len", None, "Completion length T (default: config.data.completion_bucket)."
)
_COMPILE_TIMEOUT = flags.DEFINE_integer("compile_timeout", 900, "Seconds allowed for the compile subprocess.")

AUTO_COMPILE_MAX_PARAMS = 2_000_000_000
AUTO_COMPILE_MAX_DEVICES = 16
MESH_AXES = ("data", "fsdp", "tensor")
RULE_SETS = ("default", "llama", "replicated")
HEAD_CHUNK = 1024  # pofx.policy.make_logps_fn's default chunk_size
_CHILD = "--_compile_child"
_MESH_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(?:x\s*(\d+)\s*)?$")


# ------------------------------------------------------------------------------------------------
# Inputs.


def parse_mesh(text) -> Dict[str, int]:
  """'16x4' -> {"data": 16, "fsdp": 4}; '8x4x2' -> {..., "tensor": 2}. ValueError otherwise."""
  m = _MESH_RE.match(text) if isinstance(text, str) else None
  if m is None:
    raise ValueError(
      f"--mesh={text!r} is not a mesh; allowed: '<data>x<fsdp>' or '<data>x<fsdp>x<tensor>' with "
      "positive integers, e.g. '16x4' (64 devices) or '8x4x2'."
    )
  sizes = [int(g) for g in m.groups() if g is not None]
  if any(s < 1 for s in sizes):
    raise ValueError(f"--mesh={text!r}: every axis size must be a positive integer (got {sizes}).")
  return dict(zip(MESH_AXES, sizes))


def mesh_text(shape: Dict[str, int]) -> str:
  return "x".join(str(shape[a]) for a in MESH_AXES if a in shape)


def rules_for(name: str, shape: Dict[str, int]):
  """(resolved name, rules) of pofx.parallel for a rule-set name ("auto" picks by the mesh)."""
  if name == "auto":
    name = "llama" if shape.get("tensor", 1) > 1 else "default"
  table = {"default": parallel.DEFAULT_RULES, "llama": parallel.LLAMA_RULES, "replicated": parallel.REPLICATED_RULES}
  if name not in table:
    raise ValueError(f"--rules={name!r}; allowed: {['auto', *RULE_SETS]}.")
  return name, table[name]


def model_config_of(c):
  """The LlamaConfig the plan sizes: `config.model.preset` with its dtype and remat.

  Unlike `experiments.main.Run` (which sets a preset's vocabulary to the controlled world's),
  a named preset keeps its own vocabulary here: a pod run trains on real tokenised data.
  """
  if c.model.preset == "world":
    return world_lib.World(world_lib.WorldConfig(seed=c.seed, **dict(c.world))).model_config(
      dtype=c.model.dtype, remat=c.model.remat
    )
  return models.preset(c.model.preset, dtype=c.model.dtype, remat=c.model.remat)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The step's batch shapes (one micro-batch: `rows` x `length` tokens, `pairs` pairs)."""

  layout: str
  pairs: int  # per micro-batch
  rows: int
  length: int
  completion: int
  accum: int

  @property
  def global_pairs(self) -> int:
    return self.pairs * self.accum

  @property
  def tokens(self) -> int:  # per micro-batch
    return self.rows * self.length


def batch_shapes(c, seq_len: Optional[int] = None, completion_len: Optional[int] = None) -> Shapes:
  k = int(main_lib.micro_batches(c))
  B = int(c.train.batch_size) // k
  L = int(seq_len or c.data.seq_bucket)
  T = int(completion_len or c.data.completion_bucket)
  if L < 2 or T < 1 or T >= L:
    raise ValueError(
      f"row length L={L} and completion length T={T}: allowed 1 <= T < L (a row holds a prompt and its completions)."
    )
  if c.data.layout == "fused":
    return Shapes("fused", B, 2 * B, L, T, k)
  if c.data.layout == "packed":
    return Shapes("packed", B, -(-B // 4), 4 * L, T, k)
  return Shapes("prompt_shared", B, B, L, T, k)


def _reference(c, logps_fn, params):
  """The run's reference strategy (as `experiments.main.stage_train` builds it)."""
  kind = c.train.reference.kind
  if kind == "none":
    return references.none()
  if kind in ("frozen", "guiding"):
    return dataclasses.replace(references.frozen(params, logps_fn), name=kind)
  if kind == "synced":
    return references.synced(c.train.reference.alpha, c.train.reference.tau, logps_fn)
  if kind == "ema":
    return references.ema(c.train.reference.decay, logps_fn)
  if kind == "cached":
    return references.cached("plan", "plan")
  return references.multi(
    [references.cached_member(k, "plan", "plan") for k in range(2)],
    eta=c.train.reference.eta,
    alpha=c.train.reference.mrpo_alpha,
  )


def _pieces(c, model_cfg, chunk_size: int = HEAD_CHUNK):
  spec = losses.spec(c.train.loss)
  model = models.make(model_cfg)
  logps_fn = policy.make_logps_fn(
    model.apply,
    model.head,
    chunk_size=chunk_size,
    with_log_sum_sq_probs="log_sum_sq_probs" in spec.requires,
    logit_softcap=model.logit_softcap,
  )
  optimizer, schedule = main_lib._optimizer(c)
  perturbation = main_lib._perturbation(c)
  return spec, model, logps_fn, optimizer, schedule, perturbation


def abstract_state(c, model_cfg):
  """`TrainState` of ShapeDtypeStructs (jax.eval_shape over init_params + init_state)."""
  spec, model, logps_fn, optimizer, _, perturbation = _pieces(c, model_cfg)
  hyper = dict(c.train.loss_hyper)

  def build(rng):
    params = model.init(rng)
    return train.init_state(
      params, optimizer, _reference(c, logps_fn, params), perturbation, loss=spec, loss_hyper=hyper, rng=rng
    )

  return jax.eval_shape(build, jax.random.key(0))


def abstract_batch(c, shapes: Shapes):
  """The train step's batch as ShapeDtypeStructs (a PairBatch plus the loss's and cache's inputs)."""
  spec = losses.spec(c.train.loss)
  lead = (shapes.accum,) if shapes.accum > 1 else ()
  R, L, B, T = shapes.rows, shapes.length, shapes.pairs, shapes.completion
  i32 = lambda *s: jax.ShapeDtypeStruct(lead + s, jnp.int32)
  f32 = lambda *s: jax.ShapeDtypeStruct(lead + s, jnp.float32)
  layout = "prompt_shared" if shapes.layout == "prompt_shared" else shapes.layout
  pairs = batching.PairBatch(
    tokens=i32(R, L),
    positions=i32(R, L),
    segment_ids=i32(R, L),
    branch_ids=None if shapes.layout == "fused" else i32(R, L),
    chosen_index=i32(B, T),
    chosen_targets=i32(B, T),
    chosen_mask=f32(B, T),
    rejected_index=i32(B, T),
    rejected_targets=i32(B, T),
    rejected_mask=f32(B, T),
    pair_mask=f32(B),
    layout=layout,
  )
  batch = {"pairs": pairs}
  kind = c.train.reference.kind
  if kind == "cached":
    batch.update({k: f32(B) for k in references.CACHE_KEYS})
  elif kind == "multi":
    batch.update({f"ref{k}_{side}_logps": f32(B) for k in range(2) for side in ("chosen", "rejected")})
  for req in spec.requires:
    batch.update({name: f32(B) for name in train._BATCH_INPUTS.get(req, ())})
  return batch


# ------------------------------------------------------------------------------------------------
# Bytes per device by the sharding rules.


def _abstract_mesh(shape: Dict[str, int]):
  names = tuple(a for a in MESH_AXES if a in shape)
  return AbstractMesh(tuple(shape[a] for a in names), names)


def local_shape(shape: Sequence[int], spec, mesh_shape: Dict[str, int]) -> Tuple[int, ...]:
  """A leaf's per-device shape: each dimension divided by the sizes of the axes its spec entry names."""
  out = []
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  for dim, entry in zip(shape, entries):
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    n = math.prod(mesh_shape[a] for a in axes)
    if dim % n:
      raise ValueError(f"dimension {dim} is not divisible by the axes {axes} ({n} devices)")
    out.append(dim // n)
  return tuple(out)


def _nbytes(shape, dtype) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 8  # a threefry key: 2 x uint32
  return int(math.prod(shape)) * np.dtype(dtype).itemsize


def leaf_table(tree, mesh_shape: Dict[str, int], rules, *, min_fsdp_size: int = 2**16, prefix: str = ""):
  """One row per leaf: path, shape, dtype, PartitionSpec (by `parallel.tree_specs`), global and
  per-device bytes."""
  mesh = _abstract_mesh(mesh_shape)
  specs = parallel.tree_specs(tree, mesh, rules, min_fsdp_size=min_fsdp_size)
  rows = []
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for (path, leaf), spec in zip(leaves, spec_leaves):
    shape = tuple(leaf.shape)
    local = local_shape(shape, spec, mesh_shape)
    rows.append(
      {
        "path": prefix + parallel.path_str(path),
        "shape": list(shape),
        "dtype": str(leaf.dtype),
        "spec": str(spec),
        "bytes": _nbytes(shape, leaf.dtype),
        "bytes_per_device": _nbytes(local, leaf.dtype),
      }
    )
  return rows


def _batch_rows(batch, mesh_shape, accum):
  mesh = _abstract_mesh(mesh_shape)
  specs = parallel.batch_specs(batch, mesh, grad_accum_steps=accum)
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  rows = []
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(batch), spec_leaves):
    shape = tuple(leaf.shape)
    rows.append(
      {
        "path": "batch/" + parallel.path_str(path),
        "shape": list(shape),
        "dtype": str(leaf.dtype),
        "spec": str(spec),
        "bytes": _nbytes(shape, leaf.dtype),
        "bytes_per_device": _nbytes(local_shape(shape, spec, mesh_shape), leaf.dtype),
      }
    )
  return rows


def _sum(rows, key="bytes_per_device"):
  return int(sum(r[key] for r in rows))


# ------------------------------------------------------------------------------------------------
# Estimates.


def activation_estimate(
  model_cfg, shapes: Shapes, mesh_shape: Dict[str, int], *, chunk: int = HEAD_CHUNK
) -> Dict[str, Any]:
  """Activation bytes per device (the module docstring's formula), with its parts."""
  m = model_cfg
  b = np.dtype(m.compute_dtype).itemsize
  D, F, H, K, hd, V, n = (
    m.hidden_size,
    m.mlp_size,
    m.num_heads,
    m.num_kv_heads,
    m.resolved_head_dim,
    m.vocab_size,
    m.num_layers,
  )
  L = shapes.length
  tp = mesh_shape.get("tensor", 1)
  batch_devices = mesh_shape["data"] * mesh_shape["fsdp"]
  tokens = shapes.tokens / batch_devices
  attn = H * L * (4 + b) / tp  # XLA's attention keeps the probabilities (pofx.kernels.xla_attention)
  full = b * (4 * D + (2 * H * hd + 2 * K * hd + 3 * F) / tp) + attn
  if not m.remat:
    policy, saved = "none", full
    layers = tokens * n * full
  else:
    policy = m.remat_policy
    saved = {
      "nothing_saveable": b * D,
      "dots_with_no_batch_dims_saveable": b * (3 * D + (H * hd + 2 * K * hd + 2 * F) / tp),
      "dots_saveable": b * (3 * D + (2 * H * hd + 2 * K * hd + 2 * F) / tp) + 4 * H * L / tp,
    }[policy]
    layers = tokens * (n * saved + full)
  hidden = 2 * shapes.pairs / batch_devices * shapes.completion * D * b
  head = 2 * 4 * min(chunk, 2 * shapes.pairs * shapes.completion) * V / tp
  total = layers + hidden + head
  return {
    "bytes_per_device": int(total),
    "layers": int(layers),
    "gathered_hidden": int(hidden),
    "head_chunk": int(head),
    "tokens_per_device": tokens,
    "per_layer_token_saved": saved,
    "per_layer_token_full": full,
    "remat_policy": policy,
    "formula": "t (n_layers saved + full) [remat] | t n_layers full [no remat]; + 2 B_dev T D b + 8 chunk V / tp",
  }


def _reference_runs_forward(kind: str) -> bool:
  return kind in ("frozen", "guiding", "synced", "ema", "adapters_off")


def analytic_flops(
  model_cfg, shapes: Shapes, *, reference_kind: str = "cached", perturbation_kind: str = "none", rwp_steps: int = 10
) -> Dict[str, Any]:
  """Global matmul FLOPs per step (the module docstring's formula), with its parts."""
  m = model_cfg
  D, F, H, K, hd, V, n = (
    m.hidden_size,
    m.mlp_size,
    m.num_heads,
    m.num_kv_heads,
    m.resolved_head_dim,
    m.vocab_size,
    m.num_layers,
  )
  k = shapes.accum
  R, L, B, T = shapes.rows * k, shapes.length, shapes.pairs * k, shapes.completion
  p_blocks = n * (2 * D * H * hd + 2 * D * K * hd + 3 * D * F)
  blocks = 2 * p_blocks * R * L
  attn = 4 * n * R * L * L * H * hd
  head = 2 * D * V * (2 * B * T)
  forward = blocks + attn + head
  policy = 3 * forward + head
  if m.remat and m.remat_policy == "nothing_saveable":
    policy += blocks + attn
  elif m.remat and m.remat_policy == "dots_with_no_batch_dims_saveable":
    policy += attn
  if perturbation_kind in ("sam", "awp"):
    policy *= 2
  elif perturbation_kind == "mesa":  # the EMA weights' forward
    policy += forward
  elif perturbation_kind == "rwp":  # rwp_steps proxy ascents, then the main gradient
    policy *= rwp_steps + 1
  ref = forward if _reference_runs_forward(reference_kind) else 0
  total = policy + ref
  return {
    "flops": float(total),
    "forward": float(forward),
    "blocks_forward": float(blocks),
    "attention_forward": float(attn),
    "head_forward": float(head),
    "reference_forward": float(ref),
    "six_n_tokens": float(6 * p_blocks * R * L),
    "matmul_params_in_blocks": p_blocks,
    "formula": "3 (blocks + attn + head) + head [+ remat recompute] [x2 SAM/AWP, x(steps + 1) RWP] "
    "[+ reference forward]; "
    "blocks = 2 P_blocks R L, attn = 4 n_layers R L^2 H hd, head = 4 D V B T",
  }


# ------------------------------------------------------------------------------------------------
# The compiled step.


def compiled_cost(
  c, model_cfg, mesh_shape: Dict[str, int], rules_name: str, *, min_fsdp_size: int, seq_len=None, completion_len=None
) -> Dict[str, Any]:
  """Lowers and compiles the "jit"-mode step on abstract inputs over the first N devices of this
  process; returns XLA's per-device cost and memory analysis. Needs N devices here."""
  n_dev = math.prod(mesh_shape.values())
  if jax.device_count() < n_dev:
    raise ValueError(f"compiled_cost needs {n_dev} devices; this process has {jax.device_count()}.")
  t0 = time.perf_counter()
  shapes = batch_shapes(c, seq_len, completion_len)
  _, rules = rules_for(rules_name, mesh_shape)
  mesh = parallel.make_mesh(
    mesh_shape["data"], mesh_shape["fsdp"], mesh_shape.get("tensor"), devices=jax.devices()[:n_dev]
  )
  # One head chunk (the whole micro-batch's completion tokens): XLA's cost_analysis counts a
  # loop body once, whatever its trip count, so the chunked head's scan would be undercounted.
  # Chunking changes the head's memory, not its FLOPs.
  chunk = 2 * shapes.pairs * shapes.completion
  spec, _, logps_fn, optimizer, schedule, perturbation = _pieces(c, model_cfg, chunk)
  state = abstract_state(c, model_cfg)
  batch = abstract_batch(c, shapes)
  reference = _reference(c, logps_fn, None)
  raw = train.make_train_step(
    logps_fn,
    optimizer,
    loss=spec,
    loss_hyper=dict(c.train.loss_hyper),
    reference=reference,
    perturbation=perturbation,
    grad_accum_steps=shapes.accum,
    learning_rate_fn=schedule,
    jit=False,
  )
  state_sh = parallel.tree_shardings(state, mesh, rules, min_fsdp_size=min_fsdp_size)
  batch_sh = jax.tree.map(
    lambda s: NamedSharding(mesh, s),
    parallel.batch_specs(batch, mesh, grad_accum_steps=shapes.accum),
    is_leaf=lambda x: isinstance(x, P),
  )
  replicated = NamedSharding(mesh, P())
  key = jax.eval_shape(lambda: jax.random.key(0))
  lowered = jax.jit(
    raw,
    in_shardings=(state_sh, batch_sh, replicated),
    out_shardings=(state_sh, replicated),
    donate_argnums=(0,),
    keep_unused=True,
  ).lower(state, batch, key)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  # With k > 1 micro-batches the step is a scan over them, its body counted once: x k (the
  # optimizer update, outside the scan, is then counted k times: a negligible excess).
  out = {
    "flops_per_device": float(cost.get("flops", float("nan"))) * shapes.accum,
    "devices": n_dev,
    "head_chunk": chunk,
    "accum_multiplier": shapes.accum,
    "lower_seconds": t1 - t0,
    "compile_seconds": t2 - t1,
    "backend": jax.default_backend(),
  }
  out["flops"] = out["flops_per_device"] * n_dev
  if mem is not None:
    out.update(
      {
        "argument_bytes_per_device": int(mem.argument_size_in_bytes),
        "output_bytes_per_device": int(mem.output_size_in_bytes),
        "temp_bytes_per_device": int(mem.temp_size_in_bytes),
        "alias_bytes_per_device": int(mem.alias_size_in_bytes),
      }
    )
  return out


def _compiled_cost_subprocess(
  c, model_cfg, mesh_shape, rules_name, *, min_fsdp_size, seq_len, completion_len, timeout: int
) -> Dict[str, Any]:
  """`compiled_cost` in a fresh process with N simulated CPU devices."""
  n_dev = math.prod(mesh_shape.values())
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
    with open(spec_path, "w") as f:
      json.dump(
        {
          "config": json.loads(c.to_json()),
          "model": dataclasses.asdict(model_cfg),
          "mesh": mesh_shape,
          "rules": rules_name,
          "min_fsdp_size": min_fsdp_size,
          "seq_len": seq_len,
          "completion_len": completion_len,
        },
        f,
      )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_dev}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
      proc = subprocess.run(
        [sys.executable, "-m", "experiments.plan", _CHILD, spec_path, out_path],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
      )
    except subprocess.TimeoutExpired:
      raise RuntimeError(
        f"compiling the step on {n_dev} simulated CPU devices took more than {timeout} s; "
        "use --no-compile (analytic FLOPs) or a smaller mesh."
      ) from None
    if proc.returncode != 0 or not os.path.exists(out_path):
      tail = (proc.stderr or "")[-3000:]
      raise RuntimeError(
        f"compiling the step on {n_dev} simulated CPU devices failed (exit {proc.returncode}):\n{tail}"
      )
    with open(out_path) as f:
      return json.load(f)


def _child(spec_path: str, out_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  c = ml_collections.ConfigDict(spec["config"])
  m = dict(spec["model"])
  if m.get("rope_scaling") is not None:
    m["rope_scaling"] = tuple(m["rope_scaling"])
  out = compiled_cost(
    c,
    llama.LlamaConfig(**m),
    spec["mesh"],
    spec["rules"],
    min_fsdp_size=spec["min_fsdp_size"],
    seq_len=spec["seq_len"],
    completion_len=spec["completion_len"],
  )
  with open(out_path, "w") as f:
    json.dump(out, f)


# ------------------------------------------------------------------------------------------------
# The plan.


def make_plan(
  c,
  mesh: Optional[str] = None,
  *,
  rules: str = "auto",
  min_fsdp_size: int = 2**16,
  compile: Optional[bool] = None,
  seq_len: Optional[int] = None,
  completion_len: Optional[int] = None,
  compile_timeout: int = 900,
  config_name: str = "",
) -> Dict[str, Any]:
  """The plan as a dict (see the module docstring). `compile`: True / False / None (auto)."""
  if c.train.lora.enabled:
    raise ValueError(
      "config.train.lora.enabled=True: the planner does not plan LoRA runs yet (its state holds the full "
      "parameters with their optimizer moments and a frozen reference); plan the run with train.lora.enabled=False "
      "for an upper bound."
    )
  mesh = mesh or c.train.parallel.mesh
  if not mesh:
    raise ValueError("no mesh: pass --mesh=<data>x<fsdp>[x<tensor>] (config.train.parallel.mesh is empty).")
  mesh_shape = parse_mesh(mesh)
  n_dev = math.prod(mesh_shape.values())
  rules_name, rule_set = rules_for(rules, mesh_shape)
  model_cfg = model_config_of(c)
  shapes = batch_shapes(c, seq_len, completion_len)
  batch_devices = mesh_shape["data"] * mesh_shape["fsdp"]
  if shapes.pairs % batch_devices or shapes.rows % batch_devices:
    raise ValueError(
      f"config.train.batch_size={c.train.batch_size} (micro-batch of {shapes.pairs} pairs in {shapes.rows} "
      f"rows of layout {shapes.layout}) is not divisible by the {batch_devices} devices of the batch axes "
      f"data x fsdp = {mesh_shape['data']} x {mesh_shape['fsdp']}; allowed: pairs and rows multiples of "
      f"{batch_devices}."
    )

  state = abstract_state(c, model_cfg)
  n_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))
  groups = {}
  for field in ("params", "opt_state", "ref_state", "perturbation_state", "loss_state", "step", "rng"):
    groups[field] = leaf_table(
      getattr(state, field), mesh_shape, rule_set, min_fsdp_size=min_fsdp_size, prefix=field + "/"
    )
  # Gradients: the parameters' shapes and dtypes, counted with the parameters' specs.
  grads = [dict(r, path="grads" + r["path"][len("params") :]) for r in groups["params"]]
  batch_rows = _batch_rows(abstract_batch(c, shapes), mesh_shape, shapes.accum)
  acts = activation_estimate(model_cfg, shapes, mesh_shape)
  kind = c.train.reference.kind
  if kind in ("cached", "multi"):
    k = 1 if kind == "cached" else 2
    ref_label = f"reference cache ({k}x2 float32 per pair)"
    ref_bytes = sum(r["bytes_per_device"] for r in batch_rows if "ref" in r["path"].split("/")[-1])
  elif kind == "none":
    ref_label, ref_bytes = "reference (none)", 0
  else:
    ref_label, ref_bytes = f"reference parameters ({kind})", _sum(groups["ref_state"])
  other = _sum(groups["perturbation_state"]) + _sum(groups["loss_state"]) + _sum(groups["step"]) + _sum(groups["rng"])
  batch_other = _sum(batch_rows) - (ref_bytes if kind in ("cached", "multi") else 0)
  memory = {
    "parameters": _sum(groups["params"]),
    "optimizer_state": _sum(groups["opt_state"]),
    "reference": ref_bytes,
    "gradients": _sum(grads),
    "batch": batch_other,
    "other_state": other,
    "activations_estimate": acts["bytes_per_device"],
  }
  memory["total"] = int(sum(memory.values()))
  # What the compiled step takes as arguments: the whole state, the batch and the step's key.
  arguments = sum(_sum(rows) for rows in groups.values()) + _sum(batch_rows) + _nbytes((), jax.random.key(0).dtype)
  opt_leaves = groups["opt_state"]
  moment_dtypes = sorted({r["dtype"] for r in opt_leaves if r["shape"]})

  analytic = analytic_flops(
    model_cfg,
    shapes,
    reference_kind=kind,
    perturbation_kind=c.train.perturbation.kind,
    rwp_steps=c.train.perturbation.steps,
  )
  auto = compile is None
  do_compile = (
    compile if compile is not None else (n_params <= AUTO_COMPILE_MAX_PARAMS and n_dev <= AUTO_COMPILE_MAX_DEVICES)
  )
  compiled, note = None, ""
  if do_compile:
    try:
      kw = dict(min_fsdp_size=min_fsdp_size, seq_len=seq_len, completion_len=completion_len)
      if jax.device_count() >= n_dev:
        compiled = compiled_cost(c, model_cfg, mesh_shape, rules_name, **kw)
      else:
        compiled = _compiled_cost_subprocess(c, model_cfg, mesh_shape, rules_name, timeout=compile_timeout, **kw)
    except Exception as e:  # report and fall back to the analytic count
      if not auto:
        raise
      note = f"compiling failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); analytic FLOPs used."
  elif auto:
    note = (
      f"not compiled: {n_params:,} parameters on {n_dev} simulated CPU devices exceeds the automatic limit "
      f"({AUTO_COMPILE_MAX_PARAMS:,} parameters, {AUTO_COMPILE_MAX_DEVICES} devices); analytic FLOPs used "
      "(--compile forces compilation)."
    )
  else:
    note = "not compiled (--no-compile); analytic FLOPs used."
  flops = {
    "source": "compiled" if compiled else "analytic",
    "analytic": analytic,
    "compiled": compiled,
    "note": note,
    "per_step": compiled["flops"] if compiled else analytic["flops"],
    "per_device": compiled["flops_per_device"] if compiled else analytic["flops"] / n_dev,
  }
  if compiled:
    flops["compiled_over_analytic"] = compiled["flops"] / analytic["flops"]

  return {
    "config": config_name,
    "mesh": mesh_text(mesh_shape),
    "mesh_axes": mesh_shape,
    "devices": n_dev,
    "rules": rules_name,
    "min_fsdp_size": min_fsdp_size,
    "model": {
      "preset": c.model.preset,
      "num_params": n_params,
      "num_params_closed_form": model_cfg.num_params(),
      **dataclasses.asdict(model_cfg),
    },
    "batch": {
      "layout": shapes.layout,
      "pairs_per_step": shapes.global_pairs,
      "grad_accum_steps": shapes.accum,
      "rows": shapes.rows,
      "row_length": shapes.length,
      "completion_length": shapes.completion,
      "tokens_per_step": shapes.tokens * shapes.accum,
      "tokens_per_device": acts["tokens_per_device"],
    },
    "reference": {"kind": kind, "label": ref_label},
    "optimizer": {"name": c.train.optimizer.name, "moment_dtypes": moment_dtypes},
    "memory_per_device": memory,
    "argument_bytes_per_device": int(arguments),
    "activations": acts,
    "flops": flops,
    "leaves": groups["params"]
    + groups["opt_state"]
    + groups["ref_state"]
    + groups["perturbation_state"]
    + groups["loss_state"]
    + groups["step"]
    + groups["rng"]
    + batch_rows,
  }


def _gib(x) -> str:
  return f"{x / 2**30:,.3f}"


def format_plan(plan: Dict[str, Any]) -> str:
  """A readable table of the plan."""
  m, b, mem, fl = plan["model"], plan["batch"], plan["memory_per_device"], plan["flops"]
  axes = " x ".join(f"{k}={v}" for k, v in plan["mesh_axes"].items())
  lines = [
    f"pofx plan  {plan['config']}",
    f"mesh       {plan['mesh']} ({axes}; {plan['devices']} devices), rules {plan['rules']}, "
    f"min_fsdp_size {plan['min_fsdp_size']:,}",
    f"model      {m['preset']}: {m['num_params']:,} parameters (closed form {m['num_params_closed_form']:,}); "
    f"D={m['hidden_size']}, {m['num_layers']} layers, {m['num_heads']} heads / {m['num_kv_heads']} KV, "
    f"MLP {m['mlp_size']}, vocab {m['vocab_size']}, {'tied' if m['tie_embeddings'] else 'untied'}; "
    f"params {m['param_dtype']}, compute {m['dtype']}, remat {plan['activations']['remat_policy']}",
    f"batch      {b['pairs_per_step']} pairs/step ({b['grad_accum_steps']} micro-batch(es)), layout {b['layout']}: "
    f"{b['rows']} rows x {b['row_length']} tokens, completions T={b['completion_length']}; "
    f"{b['tokens_per_step']:,} tokens/step, {b['tokens_per_device']:,.0f} per device per micro-batch",
    f"optimizer  {plan['optimizer']['name']} (state dtypes {', '.join(plan['optimizer']['moment_dtypes'])}); "
    f"{plan['reference']['label']}",
    "",
  ]
  rows = [
    ("parameters", mem["parameters"]),
    ("optimizer state", mem["optimizer_state"]),
    (plan["reference"]["label"], mem["reference"]),
    ("gradients", mem["gradients"]),
    ("batch (inputs)", mem["batch"]),
    ("other state (step, rng, ...)", mem["other_state"]),
    ("activations (estimate)", mem["activations_estimate"]),
    ("total", mem["total"]),
  ]
  w = max(len(r[0]) for r in rows)
  sep = "+" + "-" * (w + 2) + "+" + "-" * 20 + "+" + "-" * 12 + "+"
  lines += [sep, f"| {'per device'.ljust(w)} | {'bytes'.rjust(18)} | {'GiB'.rjust(10)} |", sep]
  for i, (k, v) in enumerate(rows):
    if i == len(rows) - 1:
      lines.append(sep)
    lines.append(f"| {k.ljust(w)} | {v:>18,} | {_gib(v).rjust(10)} |")
  lines.append(sep)
  a = plan["activations"]
  if a["remat_policy"] == "none":
    per_token = f"{m['num_layers']} layers x {a['per_layer_token_full']:,.0f} B, no remat"
  else:
    per_token = (
      f"{m['num_layers']} layers x {a['per_layer_token_saved']:,.0f} B saved + "
      f"{a['per_layer_token_full']:,.0f} B of one block recomputed"
    )
  lines += [
    f"activations: {a['tokens_per_device']:,.0f} tokens/device x ({per_token}) = {_gib(a['layers'])} GiB; "
    f"gathered completion states {_gib(a['gathered_hidden'])} GiB; head logits chunk {_gib(a['head_chunk'])} GiB",
    "",
  ]
  an = fl["analytic"]
  lines.append(f"FLOPs/step ({fl['source']}): {fl['per_step']:.4e} total, {fl['per_device']:.4e} per device")
  lines.append(
    f"  analytic: {an['flops']:.4e} = policy fwd+bwd (blocks {an['blocks_forward']:.3e}, attention "
    f"{an['attention_forward']:.3e}, head {an['head_forward']:.3e} per forward) + reference forward "
    f"{an['reference_forward']:.3e}; 6 N_blocks x tokens = {an['six_n_tokens']:.4e}"
  )
  if fl["compiled"]:
    cpl = fl["compiled"]
    lines.append(
      f"  compiled: {cpl['flops_per_device']:.4e} per device x {cpl['devices']} (XLA cost_analysis, "
      f"{cpl['backend']}; compiled/analytic = {fl['compiled_over_analytic']:.3f}); lower "
      f"{cpl['lower_seconds']:.1f} s, compile {cpl['compile_seconds']:.1f} s"
    )
    if "argument_bytes_per_device" in cpl:
      lines.append(
        f"  XLA argument bytes per device (state + batch + step key): {cpl['argument_bytes_per_device']:,} "
        f"(planned by the rules: {plan['argument_bytes_per_device']:,})"
      )
  if fl["note"]:
    lines.append(f"  note: {fl['note']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  c = _CONFIG.value
  if c is None:
    raise app.UsageError("--config is required (e.g. --config=configs/dpo.py:llama3_8b).")
  logging.set_verbosity(logging.WARNING)
  config_validation.validate(c)
  try:
    plan = make_plan(
      c,
      _MESH.value,
      rules=_RULES.value,
      min_fsdp_size=_MIN_FSDP.value,
      compile=_COMPILE.value,
      seq_len=_SEQ_LEN.value,
      completion_len=_COMPLETION_LEN.value,
      compile_timeout=_COMPILE_TIMEOUT.value,
      config_name=flags.FLAGS["config"].serialize().split("=", 1)[-1],
    )
  except ValueError as e:
    print(f"experiments.plan: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print(format_plan(plan))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(plan, f, indent=1, default=str)
    print(f"plan: {os.path.abspath(_JSON.value)}")


def _argv(argv):
  """`--no-compile` (and `--no_compile`) as absl's `--nocompile`."""
  return [("--nocompile" if a in ("--no-compile", "--no_compile") else a) for a in argv]


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == _CHILD:
    _child(sys.argv[2], sys.argv[3])
  else:
    app.run(main, argv=_argv(sys.argv))
