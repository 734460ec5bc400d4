"""The base config every experiment family starts from, and its validation.

Every value is overridable on the command line as `--config.a.b=value`. Validation
(`validate`) runs before any compute and names the field and the allowed values.
"""

from __future__ import annotations

import math
import os

import ml_collections

REFERENCE_KINDS = ("none", "frozen", "cached", "multi", "guiding", "synced", "ema")
PERTURBATION_KINDS = ("none", "sam", "awp", "rwp")
OPTIMIZERS = ("adamw", "adam", "sgd")
SOURCES = ("world", "files")
ON_NONFINITE = ("skip", "halt")
LAYOUTS = ("fused", "prompt_shared", "packed")
PARALLEL_MODES = ("single", "jit", "shard_map", "pmap")
ATTENTION = ("dense", "block_sparse")
ATTENTION_KERNELS = ("xla", "native")
MATMULS = ("xla", "blas", "blas_all")         # pofx.models.LlamaConfig.matmul
BLAS_LIBRARIES = ("auto", "openblas", "mkl")  # "auto" + pofx.native.BLAS_LIBRARIES
SCORED = ("slots", "compact")
HOST_MEMORY = ("default", "retain")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # fixes data generation, initialisation and sampling: --config.seed=N is a replicate
  # "retain": glibc keeps freed memory in the process for the next step's temporaries
  # (pofx.host_memory.retain_freed_memory; process-wide, so the program applies it at start-up).
  c.host_memory = "default"

  # The controlled world (pofx.world.WorldConfig fields); its gold reward, prompts and labeller.
  c.world = ml_collections.ConfigDict(dict(
      vocab_size=32, min_prompt_len=2, max_prompt_len=6, max_completion_len=12, label_scale=2.0,
      length_bias=0.0, eval_fraction=0.1))

  # The policy: "world" = the small Llama sized for the world; or a pofx.models preset name.
  # init_checkpoint: an orbax params checkpoint to start from (data.source="files"; "" = random init).
  # matmul: "xla" | "blas" (weight gradients by a BLAS) | "blas_all" (every product of the
  # projections and the LM head by a BLAS; the fastest float32 setting on CPU with Intel MKL);
  # blas: "auto" (MKL where the mkl package is installed, else numpy's OpenBLAS) | "mkl" | "openblas".
  c.model = ml_collections.ConfigDict(dict(preset="world", dtype="float32", remat=False, init_checkpoint="",
                                           matmul="xla", blas="auto"))

  # Stage 1: supervised base policy on the world's demonstrations.
  c.sft = ml_collections.ConfigDict(dict(num_demos=8192, steps=600, batch_size=64, learning_rate=3e-3))

  # Stage 2: preference data.
  c.data = ml_collections.ConfigDict(dict(
      source="world",               # "world" | "files"
      num_prompts=2048,             # world: training prompts
      samples_per_prompt=4,         # world: completions sampled per prompt (pairs of adjacent samples)
      num_eval_pairs=512,           # world: held-out pairs for reward / ranking accuracy
      files="",                     # files: comma-separated JSONL/Parquet paths (training split)
      eval_files="",                # files: optional held-out pairs (reward / ranking accuracy)
      format="auto",                # files: pofx.data FORMATS
      tokenizer_dir="",             # files: folder with tokenizer.json (+ tokenizer_config.json)
      max_prompt_len=0,             # files: token limits (0 = none) and what happens beyond them
      max_completion_len=0,
      truncation="reject",          # files: "reject" (bad record) | pofx.data TRUNCATION policies
      on_bad_record="error",        # "error" | "skip"
      layout="prompt_shared",       # "fused" | "prompt_shared" | "packed"
      seq_bucket=16,
      completion_bucket=8,
      attention="dense",            # "dense" | "block_sparse": attention only on the mask's used blocks
      attention_block_size=64,      # block_sparse: tokens per block; seq_bucket must be a multiple of it
      attention_kernel="xla",       # block_sparse: "xla" ops | "native" fused CPU kernels (pofx.native)
      scored="slots",               # "slots" | "compact": the LM head on real completion tokens only
  ))

  # Stage 3-4: preference training.
  c.train = ml_collections.ConfigDict(dict(
      loss="dpo",
      steps=300,
      batch_size=64,
      grad_accum_steps=1,
      log_every=25,
      checkpoint_every=100,
      keep_checkpoints=2,
      on_nonfinite="skip",          # "skip": keep going (the step leaves the state unchanged); "halt"
  ))
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=0.1))
  c.train.reference = ml_collections.ConfigDict(dict(
      kind="cached", alpha=0.6, tau=64, decay=0.99, eta=0.1, mrpo_alpha=-1.0, guide_checkpoint=""))
  # rwp: c_min (the loss-stationary threshold on the per-pair loss) must be set; steps: proxy ascents.
  c.train.perturbation = ml_collections.ConfigDict(dict(kind="none", rho=0.05, adaptive=False, gamma=0.01,
                                                        c_min=float("nan"), steps=10))
  c.train.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, warmup_steps=20, weight_decay=0.0, grad_clip=1.0))
  c.train.parallel = ml_collections.ConfigDict(dict(mode="single", mesh=""))

  # Stage 5: evaluation on held-out prompts.
  c.eval = ml_collections.ConfigDict(dict(num_prompts=1024, samples_per_prompt=1, temperature=1.0, top_k=0))

  # Optional sweep: a list of {"label": str, "overrides": {dotted.key: value}} run after one
  # shared SFT + data stage; each member trains and evaluates in <workdir>/sweep/<label>.
  c.sweep = ()
  return c


def mesh_shape(text: str):
  """`train.parallel.mesh`: "" -> all devices on `data`; "8" -> (8,); "4x2" -> data 4 x fsdp 2;
  "2x2x2" adds a tensor axis."""
  if not text:
    return (-1,)
  try:
    dims = tuple(int(x) for x in str(text).lower().split("x"))
  except ValueError:
    dims = ()
  if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
    raise ValueError(f"config.train.parallel.mesh={text!r} is not allowed; allowed: '' (all devices on data), "
                     "'<data>', '<data>x<fsdp>' or '<data>x<fsdp>x<tensor>' with positive integers.")
  return dims


def _allowed(field, value, allowed):
  if value not in allowed:
    raise ValueError(f"config.{field}={value!r} is not allowed; allowed: {list(allowed)}.")


def _positive(field, value, *, integer=True, zero_ok=False):
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  if not ok or (value < 0 if zero_ok else value <= 0):
    kind = "integer" if integer else "number"
    raise ValueError(f"config.{field}={value!r} is not allowed; allowed: a {kind} {'>= 0' if zero_ok else '> 0'}.")


def _check_native_attention(c) -> None:
  """data.attention_kernel='native': block-sparse attention of 64-token blocks, one device, a
  head dimension the kernels are compiled for, and a machine that can build them."""
  from pofx import native  # pylint: disable=g-import-not-at-top
  from pofx import models  # pylint: disable=g-import-not-at-top
  if c.data.attention != "block_sparse" or c.data.attention_block_size != native.BLOCK_SIZE:
    raise ValueError(f"config.data.attention_kernel='native' needs data.attention='block_sparse' and "
                     f"data.attention_block_size={native.BLOCK_SIZE}; got {c.data.attention!r} and "
                     f"{c.data.attention_block_size}.")
  if c.train.parallel.mode != "single":
    raise ValueError(f"config.data.attention_kernel='native' runs with train.parallel.mode='single' only (its custom "
                     f"call is not partitioned across devices); got {c.train.parallel.mode!r}.")
  if c.model.preset == "world":
    from pofx import world  # pylint: disable=g-import-not-at-top
    hd = world.MODEL_SHAPE["hidden_size"] // world.MODEL_SHAPE["num_heads"]
  else:
    hd = models.preset(c.model.preset).resolved_head_dim
  if hd not in native.HEAD_DIMS:
    raise ValueError(f"config.data.attention_kernel='native' supports head dimensions {native.HEAD_DIMS}; "
                     f"model {c.model.preset!r} has {hd}.")
  reason = native.unavailable_reason()
  if reason:
    raise ValueError(f"config.data.attention_kernel='native' cannot run on this machine: {reason}.")


def _check_blas(c) -> None:
  """model.matmul='blas'/'blas_all': float32 on one device, and a BLAS this machine can call."""
  from pofx import native  # pylint: disable=g-import-not-at-top
  if c.model.dtype != "float32":
    raise ValueError(f"config.model.matmul={c.model.matmul!r} computes in float32 only; got model.dtype="
                     f"{c.model.dtype!r} (use model.matmul='xla').")
  if c.train.parallel.mode != "single":
    raise ValueError(f"config.model.matmul={c.model.matmul!r} runs with train.parallel.mode='single' only (its "
                     f"custom call is not partitioned across devices); got {c.train.parallel.mode!r}.")
  reason = native.blas_unavailable_reason(c.model.blas)
  if reason:
    raise ValueError(f"config.model.matmul={c.model.matmul!r} with model.blas={c.model.blas!r} cannot run on this "
                     f"machine: {reason}.")


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks every field a run reads; raises ValueError naming the field and what is allowed."""
  import pofx  # local: configs stay importable without jax for `--help`

  _positive("seed", c.seed, zero_ok=True)
  _allowed("data.source", c.data.source, SOURCES)
  _allowed("data.layout", c.data.layout, LAYOUTS)
  _allowed("data.on_bad_record", c.data.on_bad_record, ("error", "skip"))
  _allowed("data.attention", c.data.attention, ATTENTION)
  _allowed("data.scored", c.data.scored, SCORED)
  _allowed("data.attention_kernel", c.data.attention_kernel, ATTENTION_KERNELS)
  _allowed("model.matmul", c.model.matmul, MATMULS)
  _allowed("model.blas", c.model.blas, BLAS_LIBRARIES)
  if c.model.matmul != "xla":
    _check_blas(c)
  if c.data.attention_kernel == "native":
    _check_native_attention(c)
  if c.data.attention == "block_sparse":
    _positive("data.attention_block_size", c.data.attention_block_size)
    if not isinstance(c.data.seq_bucket, int) or c.data.seq_bucket % c.data.attention_block_size:
      raise ValueError(f"config.data.seq_bucket={c.data.seq_bucket!r} is not allowed with data.attention='block_sparse' "
                       f"and data.attention_block_size={c.data.attention_block_size}; allowed: a multiple of "
                       f"{c.data.attention_block_size} (every row length must be whole blocks).")
  if c.data.source == "files":
    from pofx import data as data_lib
    if not c.data.files:
      raise ValueError("config.data.files is empty; allowed: comma-separated JSONL/Parquet paths when "
                       "data.source='files'.")
    for f in [x.strip() for x in (c.data.files + "," + c.data.eval_files).split(",") if x.strip()]:
      if not os.path.exists(f):
        raise ValueError(f"config.data.files: {f!r} does not exist.")
    if not c.data.tokenizer_dir or not os.path.exists(os.path.join(c.data.tokenizer_dir, "tokenizer.json")):
      raise ValueError(f"config.data.tokenizer_dir={c.data.tokenizer_dir!r} has no tokenizer.json; allowed: a folder "
                       "with tokenizer.json (and tokenizer_config.json for chat templates).")
    _allowed("data.format", c.data.format, data_lib.FORMATS)
    _allowed("data.truncation", c.data.truncation, data_lib.TRUNCATION)
    if c.train.reference.kind == "multi":
      raise ValueError("config.train.reference.kind='multi' builds its second reference from the controlled world; "
                       "with data.source='files' use frozen, cached, synced, ema, guiding or none.")
  for f in ("sft.steps", "sft.batch_size", "data.num_prompts", "data.samples_per_prompt", "train.steps",
            "train.batch_size", "train.grad_accum_steps", "train.log_every", "train.checkpoint_every",
            "train.keep_checkpoints", "eval.num_prompts", "eval.samples_per_prompt"):
    node = c
    for part in f.split("."):
      node = node[part]
    _positive(f, node)
  if c.data.samples_per_prompt < 2:
    raise ValueError(f"config.data.samples_per_prompt={c.data.samples_per_prompt} is not allowed; allowed: >= 2.")
  if c.train.batch_size % c.train.grad_accum_steps:
    raise ValueError(f"config.train.batch_size={c.train.batch_size} must be a multiple of "
                     f"config.train.grad_accum_steps={c.train.grad_accum_steps}.")
  _allowed("train.on_nonfinite", c.train.on_nonfinite, ON_NONFINITE)
  _allowed("host_memory", c.host_memory, HOST_MEMORY)
  _allowed("train.reference.kind", c.train.reference.kind, REFERENCE_KINDS)
  _allowed("train.perturbation.kind", c.train.perturbation.kind, PERTURBATION_KINDS)
  if c.train.perturbation.kind == "rwp":
    if not math.isfinite(c.train.perturbation.c_min):
      raise ValueError(f"config.train.perturbation.c_min={c.train.perturbation.c_min!r} is not allowed with kind='rwp'; "
                       "allowed: a finite per-pair loss threshold (e.g. 1.0 for DPO, whose loss is log 2 = 0.693 "
                       "at zero margin).")
    _positive("train.perturbation.steps", c.train.perturbation.steps)
    if c.train.perturbation.gamma < 0:
      raise ValueError(f"config.train.perturbation.gamma={c.train.perturbation.gamma!r} is not allowed; allowed: >= 0.")
  _allowed("train.optimizer.name", c.train.optimizer.name, OPTIMIZERS)
  _allowed("train.parallel.mode", c.train.parallel.mode, PARALLEL_MODES)
  mesh_shape(c.train.parallel.mesh)
  _positive("train.optimizer.learning_rate", c.train.optimizer.learning_rate, integer=False)
  if c.train.loss not in pofx.losses.REGISTRY:
    raise ValueError(f"config.train.loss={c.train.loss!r} is not allowed; allowed: {pofx.losses.names()}.")
  spec = pofx.losses.spec(c.train.loss)
  hyper = dict(c.train.loss_hyper)
  allowed = spec.hyperparameters
  unknown = sorted(set(hyper) - set(allowed))
  if unknown:
    raise ValueError(f"config.train.loss_hyper has {unknown}, not hyperparameters of {spec.name!r}; "
                     f"allowed: {sorted(allowed)}.")
  for k, v in hyper.items():
    if k == "beta" and not (isinstance(v, (int, float)) and v > 0):
      raise ValueError(f"config.train.loss_hyper.beta={v!r} is not allowed; allowed: beta > 0.")
  if "list" in spec.requires:
    raise ValueError(f"config.train.loss={spec.name!r} is a K-way listwise loss; the training program trains pairs.")
  if spec.reference == "required" and c.train.reference.kind == "none":
    raise ValueError(f"config.train.reference.kind='none', but loss {spec.name!r} needs a reference; allowed: "
                     f"{[k for k in REFERENCE_KINDS if k != 'none']}.")
  if spec.reference == "unused" and c.train.reference.kind not in ("none",):
    raise ValueError(f"config.train.reference.kind={c.train.reference.kind!r}, but loss {spec.name!r} is "
                     "reference-free; allowed: 'none'.")
  # Losses needing scores read them from the data: the world's gold rewards, or the files'
  # score_chosen / score_rejected (the loader refuses pairs without them).
  for kind in ("turn_ids", "risk", "kl"):
    if kind in spec.requires:
      raise ValueError(f"loss {spec.name!r} needs {kind!r} inputs that the training program does not produce.")
  if c.train.reference.kind == "guiding" and not c.train.reference.guide_checkpoint:
    raise ValueError("config.train.reference.guide_checkpoint is empty; allowed: the path of a finished run's "
                     "params checkpoint (e.g. <first-stage workdir>/final_params).")
  for item in c.sweep:
    if "label" not in item or "overrides" not in item:
      raise ValueError("config.sweep entries must be {'label': str, 'overrides': {dotted.key: value}}.")
