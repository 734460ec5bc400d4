"""Every check of an experiment config, in one place, run before any compute.

    from configs import validate
    validate.validate(config, process_count=jax.process_count(), device_count=jax.device_count())

`validate` raises `ValueError("config.<field>=<value> is not allowed; allowed: ...")` naming the
field and what is allowed. It checks each field (the allowed values are `pofx.options`' tuples,
the loss and its hyperparameters are `pofx.losses`' registry), the rules between fields
(block-sparse attention and the row buckets, a loss and its reference, rwp and its threshold),
the rules that depend on the run's processes and devices (given as arguments: index lists that
span the global batch need one process; a sweep runs in one process; the batch divides over the
data-parallel devices) and the kernel backend against the JAX backend this process runs on
(`pofx_backends.unavailable_reason`).

`unknown_field_message(config, "train.lerning_rate")` is the one-line error of a misspelt
command-line key: it names the nearest dotted path of the whole config
(`train.optimizer.learning_rate`).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from typing import List, Optional, Sequence, Tuple

import ml_collections

import pofx_backends
from pofx import losses, options
from pofx.diffusion import unet
from pofx.diffusion import world as world_lib
from pofx.models import llama

# Losses that read the reference's per-token log-probs, which a reference cache does not hold.
REFERENCE_TOKEN_LOSSES = ("bmc", "two_d_dpo", "full_step_dpo", "sampo", "sgdpo", "dmpo", "ld_dpo")

# Fields that must be integers > 0.
POSITIVE_INTEGERS = (
  "sft.steps",
  "sft.batch_size",
  "data.num_prompts",
  "data.samples_per_prompt",
  "train.steps",
  "train.batch_size",
  "train.grad_accum_steps",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "eval.num_prompts",
  "eval.samples_per_prompt",
)


# ------------------------------------------------------------------------------------------------
# Field names.


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
  """Every dotted path of `config`: its leaves and the dicts that hold them."""
  out = []
  for key in config.keys():
    path = f"{prefix}{key}"
    out.append(path)
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += field_paths(value, path + ".")
  return out


def has_field(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def nearest_field(config: ml_collections.ConfigDict, dotted: str) -> Optional[str]:
  """The existing dotted path closest to `dotted` over the whole config.

  Ranked by the similarity of the last name (what was meant), then by how well the given parents
  appear among the candidate's parents (where it was meant), then by the whole path's similarity:
  `train.lerning_rate` -> `train.optimizer.learning_rate` (not `sft.learning_rate`)."""
  ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()
  *parents, leaf = dotted.split(".")

  def score(path: str) -> Tuple[float, float, float]:
    *cand_parents, cand_leaf = path.split(".")
    parent_match = (
      sum(max((ratio(p, q) for q in cand_parents), default=0.0) for p in parents) / len(parents) if parents else 0.0
    )
    return ratio(leaf, cand_leaf), parent_match, ratio(dotted, path)

  candidates = [p for p in field_paths(config) if p != dotted]
  if not candidates:
    return None
  best = max(candidates, key=score)
  return best if score(best)[0] >= 0.5 or score(best)[2] >= 0.6 else None


# Fields that were replaced: what to set instead.
REPLACED = {
  "data.attention_kernel": "config.model.kernels (the kernel backend: pofx.options.KERNEL_BACKENDS)",
  "model.matmul": "config.model.kernels (the kernel backend: pofx.options.KERNEL_BACKENDS)",
  "model.blas": "config.model.kernels (the kernel backend: pofx.options.KERNEL_BACKENDS)",
  "host_memory": "nothing: the program keeps freed memory on CPU by default (pofx_backends.startup)",
}


def unknown_field_message(config: ml_collections.ConfigDict, dotted: str) -> str:
  """One line: the config has no field `dotted`; the nearest one (or what replaced it)."""
  if dotted in REPLACED:
    return f"config has no field {dotted!r} any more; set {REPLACED[dotted]}."
  near = nearest_field(config, dotted)
  hint = f"; did you mean config.{near}?" if near else "."
  return f"config has no field {dotted!r}{hint}"


# ------------------------------------------------------------------------------------------------
# Values.


def mesh_shape(text: str) -> Tuple[int, ...]:
  """`train.parallel.mesh`: "" -> all devices on `data`; "8" -> (8,); "4x2" -> data 4 x fsdp 2;
  "2x2x2" adds a tensor axis."""
  if not text:
    return (-1,)
  try:
    dims = tuple(int(x) for x in str(text).lower().split("x"))
  except ValueError:
    dims = ()
  if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
    raise ValueError(
      f"config.train.parallel.mesh={text!r} is not allowed; allowed: '' (all devices on data), "
      "'<data>', '<data>x<fsdp>' or '<data>x<fsdp>x<tensor>' with positive integers."
    )
  return dims


def _get(c, dotted: str):
  node = c
  for part in dotted.split("."):
    node = node[part]
  return node


# A sweep override value that is exactly "{config.<dotted.field>}": that field's value in the
# sweep's config (experiments.main resolves it when it builds the members).
FIELD_VALUE = re.compile(r"^\{config\.([A-Za-z0-9_.]+)\}$")


def field_value(c, dotted: str):
  """The value of the existing dotted field `dotted` of config `c`; ValueError naming the nearest one."""
  if not has_field(c, dotted) or isinstance(_get(c, dotted), ml_collections.ConfigDict):
    raise ValueError(unknown_field_message(c, dotted))
  return _get(c, dotted)


def _allowed(c, field: str, allowed: Sequence[str]):
  value = _get(c, field)
  if value not in allowed:
    raise ValueError(f"config.{field}={value!r} is not allowed; allowed: {list(allowed)}.")


def _positive(field, value, *, integer=True, zero_ok=False):
  ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
  if not ok or (value < 0 if zero_ok else value <= 0):
    kind = "an integer" if integer else "a number"
    raise ValueError(f"config.{field}={value!r} is not allowed; allowed: {kind} {'>= 0' if zero_ok else '> 0'}.")


def _optional_positive(field, value):
  if value is not None:
    _positive(field, value)


def _check_data(c) -> None:
  _allowed(c, "data.source", options.SOURCES)
  _allowed(c, "data.layout", options.LAYOUTS)
  _allowed(c, "data.on_bad_record", options.ON_BAD_RECORD)
  _allowed(c, "data.attention", options.ATTENTION_MODES)
  _allowed(c, "data.scored", options.SCORED_MODES)
  if c.data.attention == "block_sparse":
    _positive("data.attention_block_size", c.data.attention_block_size)
    if not isinstance(c.data.seq_bucket, int) or c.data.seq_bucket % c.data.attention_block_size:
      raise ValueError(
        f"config.data.seq_bucket={c.data.seq_bucket!r} is not allowed with data.attention='block_sparse' "
        f"and data.attention_block_size={c.data.attention_block_size}; allowed: a multiple of "
        f"{c.data.attention_block_size} (every row length must be whole blocks)."
      )
  if c.data.samples_per_prompt < 2:
    raise ValueError(f"config.data.samples_per_prompt={c.data.samples_per_prompt} is not allowed; allowed: >= 2.")
  _optional_positive("data.max_prompt_len", c.data.max_prompt_len)
  _optional_positive("data.max_completion_len", c.data.max_completion_len)
  rate, (low, high) = c.data.max_unknown_token_rate, options.UNKNOWN_TOKEN_RATE_RANGE
  if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not low <= rate <= high):
    raise ValueError(
      f"config.data.max_unknown_token_rate={rate!r} is not allowed; allowed: a number in [{low}, {high}] "
      "(the largest share of unknown tokens a split may have), or None (no limit)."
    )
  if c.data.source != "files":
    return
  if not c.data.files:
    raise ValueError(
      "config.data.files is empty; allowed: comma-separated JSONL/Parquet paths when data.source='files'."
    )
  for f in [x.strip() for x in (c.data.files + "," + c.data.eval_files).split(",") if x.strip()]:
    if not os.path.exists(f):
      raise ValueError(f"config.data.files: {f!r} does not exist.")
  if not c.data.tokenizer_dir or not os.path.exists(os.path.join(c.data.tokenizer_dir, "tokenizer.json")):
    raise ValueError(
      f"config.data.tokenizer_dir={c.data.tokenizer_dir!r} has no tokenizer.json; allowed: a folder "
      "with tokenizer.json (and tokenizer_config.json for chat templates)."
    )
  _allowed(c, "data.format", options.FORMATS)
  _allowed(c, "data.truncation", options.TRUNCATION)
  if c.train.reference.kind == "multi":
    raise ValueError(
      "config.train.reference.kind='multi' builds its second reference from the controlled world; "
      "with data.source='files' use frozen, cached, synced, ema, guiding or none."
    )


def check_loss(c) -> None:
  """`train.loss` and `train.loss_hyper` (names and values) and the loss's rules with the reference;
  also what a sweep runs for each member before its shared stages."""
  # A canonical pofx.losses name, or a TRL 1.16 loss_type written "trl.<loss_type>" (pofx.losses.trl).
  try:
    spec = losses.spec(c.train.loss)
  except ValueError:
    raise ValueError(
      f"config.train.loss={c.train.loss!r} is not allowed; allowed: {losses.names()}, or a TRL 1.16 "
      f"loss_type written 'trl.<loss_type>' ({losses.trl.names()})."
    ) from None
  hyper = dict(c.train.loss_hyper)
  unknown = sorted(set(hyper) - set(spec.hyperparameters))
  if unknown:
    raise ValueError(
      f"config.train.loss_hyper has {unknown}, not hyperparameters of {spec.name!r}; "
      f"allowed: {sorted(spec.hyperparameters)}."
    )
  if spec.name.startswith(losses.trl.PREFIX):  # the DPOConfig field combinations TRL refuses
    try:
      losses.trl.check_fields(spec.name, **hyper)
    except ValueError as e:
      raise ValueError(f"config.train.loss_hyper={hyper!r} is not allowed with train.loss={spec.name!r}: {e}") from None
  beta = hyper.get("beta")
  if "beta" in hyper and not (isinstance(beta, (int, float)) and beta > 0):
    raise ValueError(f"config.train.loss_hyper.beta={beta!r} is not allowed; allowed: beta > 0.")
  try:  # the loss's own checks of the values (ranges, choices, required names), nothing computed
    losses.check_values(spec, hyper)
  except ValueError as e:
    raise ValueError(f"config.train.loss_hyper: {e}") from None
  if "list" in spec.requires:
    raise ValueError(f"config.train.loss={spec.name!r} is a K-way listwise loss; the training program trains pairs.")
  if spec.reference == "required" and c.train.reference.kind == "none":
    raise ValueError(
      f"config.train.reference.kind='none', but loss {spec.name!r} needs a reference; allowed: "
      f"{[k for k in options.REFERENCE_KINDS if k != 'none']}."
    )
  if spec.reference == "unused" and c.train.reference.kind != "none":
    raise ValueError(
      f"config.train.reference.kind={c.train.reference.kind!r}, but loss {spec.name!r} is "
      "reference-free; allowed: 'none'."
    )
  # Losses needing scores read the files' score_chosen / score_rejected (the loader refuses pairs
  # without them; the program checks the training split against the loss's score domain before
  # training). The world's scores are raw gold rewards under Bradley-Terry labels (any real number;
  # the chosen completion's can be the lower): refused here unless the domain takes any finite pair.
  # Unpaired world feedback (KTO) writes the labels as scores in kto_unpaired's domain.
  unpaired_world = c.data.get("feedback", "pairs") == "unpaired" and spec.name == "kto_unpaired"
  if "scores" in spec.requires and c.data.source == "world" and not spec.score_domain.any_real and not unpaired_world:
    raise ValueError(
      f"config.train.loss={spec.name!r} reads per-pair scores, defined for {spec.score_domain.text}; the "
      "controlled world's scores are raw gold rewards (any real number) with Bradley-Terry labels, so the "
      "chosen completion's can be the lower one; allowed: data.source='files' with score_chosen / "
      "score_rejected in that domain."
    )
  if "risk" in spec.requires:
    raise ValueError(f"loss {spec.name!r} needs 'risk' inputs that the training program does not produce.")
  if "companions" in spec.requires:
    raise ValueError(
      f"config.train.loss={spec.name!r} reads the EMA companions of the policy on its reference "
      "(pofx.references.ema_companions), which only the image program builds; allowed: config.domain='image' "
      "(configs/diffusion_adaptive_dpo.py)."
    )
  kind = c.train.reference.kind
  if kind in ("cached", "multi") and (
    "kl" in spec.requires or "eos_logps" in spec.requires or spec.name in REFERENCE_TOKEN_LOSSES
  ):
    what = "per-token reference log-probs"
    if "kl" in spec.requires:
      what = "the reference log-probs of its KL batch"
    elif "eos_logps" in spec.requires:
      what = "the reference's per-state EOS log-probs"
    raise ValueError(
      f"config.train.reference.kind={kind!r}, but loss {spec.name!r} needs {what}, which a cache does not "
      "hold; allowed: 'frozen', 'guiding', 'synced' or 'ema'."
    )
  if "eos_logps" in spec.requires and c.data.source == "files":  # GDPO reads log pi(EOS | state)
    from pofx import data as data_lib  # the tokenizer's files (checked to exist above)

    if data_lib.Tokenizer.from_dir(c.data.tokenizer_dir).eos_id is None:
      raise ValueError(
        f"config.train.loss={spec.name!r} reads the EOS token's log-probs, but the tokenizer in "
        f"config.data.tokenizer_dir={c.data.tokenizer_dir!r} has no eos_token; allowed: a tokenizer with one."
      )
  # The world's annotations (pofx.world.World.embed_* / segment_scores) exist for world data only.
  for need in ("embeddings", "segments", "turn_ids"):
    if need in spec.requires and c.data.source != "world":
      raise ValueError(
        f"config.data.source={c.data.source!r}, but loss {spec.name!r} reads {need!r}, which the program "
        "makes from the controlled world; allowed: data.source='world'."
      )
  if "kl" in spec.requires:  # KTO's mismatched pairs are built within each micro-batch
    if c.train.parallel.mode != "single":
      raise ValueError(
        f"config.train.parallel.mode={c.train.parallel.mode!r}, but loss {spec.name!r} builds its KL batch "
        "in the single-device step only; allowed: 'single'."
      )
    if c.train.batch_size // c.train.grad_accum_steps < 2:
      raise ValueError(
        f"config.train.batch_size={c.train.batch_size} with grad_accum_steps={c.train.grad_accum_steps} gives "
        f"micro-batches of {c.train.batch_size // c.train.grad_accum_steps} pair; loss {spec.name!r} pairs each "
        "prompt with another pair's completions: allowed: at least 2 pairs per micro-batch."
      )


def _check_lora(c) -> None:
  l, kind = c.train.lora, c.train.reference.kind
  if not isinstance(l.enabled, bool):
    raise ValueError(f"config.train.lora.enabled={l.enabled!r} is not allowed; allowed: True or False.")
  if not l.enabled:
    if kind == "adapters_off":
      raise ValueError(
        "config.train.reference.kind='adapters_off' needs LoRA (the base with the adapters disabled); set "
        "train.lora.enabled=True, or use another reference kind."
      )
    return
  _positive("train.lora.rank", l.rank)
  _positive("train.lora.alpha", l.alpha, integer=False)
  targets = [t.strip() for t in str(l.targets).split(",") if t.strip()]
  bad = [t for t in targets if t not in options.LORA_TARGETS]
  if not targets or bad or len(set(targets)) != len(targets):
    raise ValueError(
      f"config.train.lora.targets={l.targets!r} is not allowed; allowed: distinct comma-separated names from "
      f"{list(options.LORA_TARGETS)}."
    )
  if isinstance(l.dropout, bool) or not isinstance(l.dropout, (int, float)) or not 0.0 <= l.dropout < 1.0:
    raise ValueError(
      f"config.train.lora.dropout={l.dropout!r} is not allowed; allowed: a number in [0, 1) (PEFT's lora_dropout, "
      "on the adapter branch's input; 0 = none)."
    )
  if kind in ("frozen", "guiding"):
    raise ValueError(
      f"config.train.reference.kind={kind!r} is not allowed with LoRA (it would hold a second copy of the base); "
      "allowed: 'adapters_off' (the base without the adapters), 'synced' or 'ema' (of the adapters), 'cached', "
      "'multi' or 'none'."
    )


def _check_train(c) -> None:
  _allowed(c, "train.on_nonfinite", options.ON_NONFINITE)
  _allowed(c, "train.input_perturbation.kind", options.INPUT_PERTURBATION_KINDS)
  _positive("train.input_perturbation.radius", c.train.input_perturbation.radius, integer=False, zero_ok=True)
  rate = c.train.dropout.rate
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
    raise ValueError(
      f"config.train.dropout.rate={rate!r} is not allowed; allowed: a number in [0, 1) (0 = no dropout)."
    )
  _positive("train.dropout.samples", c.train.dropout.samples)
  _allowed(c, "train.reference.kind", options.REFERENCE_KINDS)
  _check_lora(c)
  _allowed(c, "train.perturbation.kind", options.PERTURBATION_KINDS)
  _allowed(c, "train.optimizer.name", options.OPTIMIZERS)
  _allowed(c, "train.parallel.mode", options.PARALLEL_MODES)
  mesh_shape(c.train.parallel.mesh)
  _positive("train.optimizer.learning_rate", c.train.optimizer.learning_rate, integer=False)
  if c.train.batch_size % c.train.grad_accum_steps:
    raise ValueError(
      f"config.train.batch_size={c.train.batch_size} must be a multiple of "
      f"config.train.grad_accum_steps={c.train.grad_accum_steps}."
    )
  alpha = c.train.reference.mrpo_alpha
  if alpha is not None and not 0.0 <= alpha <= 1.0:
    raise ValueError(
      f"config.train.reference.mrpo_alpha={alpha!r} is not allowed; allowed: None (adaptive per pair) "
      "or a weight in [0, 1]."
    )
  p = c.train.perturbation
  if p.kind == "sam" and p.m is not None:
    _positive("train.perturbation.m", p.m)
    micro = c.train.batch_size // c.train.grad_accum_steps
    if micro % p.m:
      raise ValueError(
        f"config.train.perturbation.m={p.m} is not allowed with train.batch_size={c.train.batch_size} and "
        f"train.grad_accum_steps={c.train.grad_accum_steps}; allowed: None (one ascent per micro-batch) or a "
        f"divisor of the {micro} pairs of a micro-batch (m = examples per ascent)."
      )
  if p.kind in ("saf", "mesa"):
    _positive("train.perturbation.lam", p.lam, integer=False, zero_ok=True)
    _positive("train.perturbation.temperature", p.temperature, integer=False)
    if not isinstance(p.start_epoch, int) or isinstance(p.start_epoch, bool):
      raise ValueError(
        f"config.train.perturbation.start_epoch={p.start_epoch!r} is not allowed; allowed: an integer (the term "
        "is on for epochs > start_epoch; -1: from the first step)."
      )
    if p.end_epoch is not None and (not isinstance(p.end_epoch, int) or p.end_epoch <= p.start_epoch):
      raise ValueError(
        f"config.train.perturbation.end_epoch={p.end_epoch!r} is not allowed; allowed: None (no end) or an "
        f"integer > start_epoch={p.start_epoch}."
      )
    if p.kind == "saf":
      _positive("train.perturbation.minus_epochs", p.minus_epochs)
    if p.kind == "mesa":
      if not isinstance(p.decay, (int, float)) or isinstance(p.decay, bool) or not 0.0 <= p.decay <= 1.0:
        raise ValueError(f"config.train.perturbation.decay={p.decay!r} is not allowed; allowed: a number in [0, 1].")
      if c.train.grad_accum_steps > 1:
        raise ValueError(
          "config.train.perturbation.kind='mesa' with train.grad_accum_steps > 1 is not allowed: its EMA would "
          "move once per micro-batch; allowed: train.grad_accum_steps=1."
        )
  if p.kind == "rwp":
    if p.c_min is None or not math.isfinite(p.c_min):
      raise ValueError(
        f"config.train.perturbation.c_min={p.c_min!r} is not allowed with kind='rwp'; allowed: a finite "
        "per-pair loss threshold (e.g. 1.0 for DPO, whose loss is log 2 = 0.693 at zero margin)."
      )
    _positive("train.perturbation.steps", p.steps)
    if p.gamma < 0:
      raise ValueError(f"config.train.perturbation.gamma={p.gamma!r} is not allowed; allowed: >= 0.")
  if c.train.reference.kind == "guiding" and not os.path.exists(c.train.reference.guide_checkpoint or ""):
    raise ValueError(
      f"config.train.reference.guide_checkpoint={c.train.reference.guide_checkpoint!r} is not a "
      "checkpoint; allowed: the path of a finished run's params checkpoint (e.g. <first-stage "
      "workdir>/final_params)."
    )
  cache_dir = c.train.reference.get("cache_dir", None)
  if cache_dir is not None and (not cache_dir or (os.path.exists(cache_dir) and not os.path.isdir(cache_dir))):
    raise ValueError(
      f"config.train.reference.cache_dir={cache_dir!r} is not allowed; allowed: None (the run's own "
      "workdir) or the path of a folder (created if absent) shared by the runs that read the same "
      "reference log-probs."
    )
  check_loss(c)


def _check_loop(c) -> None:
  """`config.loop` (experiments/loops.py): the kind, labeller, pairing and reference against
  `pofx.options`, the counts and weights, and what a loop needs of the rest of the config."""
  if "loop" not in c:
    return
  lp = c.loop
  _allowed(c, "loop.kind", options.LOOP_KINDS)
  if lp.kind == "offline":
    return
  if c.sweep:
    raise ValueError(f"config.loop.kind={lp.kind!r} with a config.sweep is not allowed; allowed: one loop per run.")
  _allowed(c, "loop.labeller", options.LABELLERS)
  _allowed(c, "loop.pairing", options.PAIR_CONSTRUCTIONS)
  _allowed(c, "loop.reference", options.LOOP_REFERENCES)
  _allowed(c, "loop.estimator", options.RL_ESTIMATORS)
  for f in ("rounds", "steps_per_round", "prompts_per_round", "samples_per_prompt"):
    _positive(f"loop.{f}", lp[f])
  _positive("loop.temperature", lp.temperature, integer=False)
  _positive("loop.min_margin", lp.min_margin, integer=False, zero_ok=True)
  _positive("loop.kl_coef", lp.kl_coef, integer=False, zero_ok=True)
  if lp.length_alpha is not None:
    _positive("loop.length_alpha", lp.length_alpha, integer=False, zero_ok=True)
  if isinstance(lp.replay, bool) or not isinstance(lp.replay, (int, float)) or not 0.0 <= lp.replay < 1.0:
    raise ValueError(f"config.loop.replay={lp.replay!r} is not allowed; allowed: a fraction in [0, 1).")
  if c.data.source != "world":
    raise ValueError(
      f"config.loop.kind={lp.kind!r} needs the controlled world (config.data.source='world'), not "
      f"{c.data.source!r}: a loop samples prompts and labels completions there."
    )
  if c.train.parallel.mode != "single" or c.train.grad_accum_steps != 1 or c.train.lora.enabled:
    raise ValueError(
      f"config.loop.kind={lp.kind!r} runs with train.parallel.mode='single', train.grad_accum_steps=1 and LoRA off."
    )
  if c.train.perturbation.kind != "none" or c.train.input_perturbation.kind != "none" or c.train.dropout.rate:
    raise ValueError(f"config.loop.kind={lp.kind!r} trains without perturbations or dropout (train.perturbation, ...).")
  if lp.kind == "rlhf":
    if lp.labeller not in ("gold", "reward_model"):
      raise ValueError(
        f"config.loop.labeller={lp.labeller!r} is not allowed with loop.kind='rlhf'; allowed: ['gold', 'reward_model']."
      )
    if lp.estimator == "rloo" and lp.samples_per_prompt < 2:
      raise ValueError(
        f"config.loop.samples_per_prompt={lp.samples_per_prompt} is not allowed with loop.estimator='rloo'; "
        "allowed: >= 2 (the leave-one-out baseline of each sample is the mean of the others)."
      )
    return
  if lp.labeller == "self_play":
    if lp.pairing != "best_worst":
      raise ValueError(
        f"config.loop.pairing={lp.pairing!r} is not allowed with loop.labeller='self_play'; allowed: "
        "['best_worst'] (the demonstration against a sample)."
      )
  elif lp.samples_per_prompt < 2:
    raise ValueError(
      f"config.loop.samples_per_prompt={lp.samples_per_prompt} is not allowed with loop.labeller="
      f"{lp.labeller!r}; allowed: >= 2 (a pair needs two samples of a prompt)."
    )
  if lp.labeller == "implicit" and not lp.offline_first:
    raise ValueError(
      "config.loop.labeller='implicit' needs config.loop.offline_first=True: the implicit reward of the "
      "SFT base against itself is 0, so the loop first trains DPO on the stage-2 pairs (DICE starts from "
      "a DPO model)."
    )
  if lp.labeller == "reward_model" and not os.path.exists(lp.reward_model_checkpoint or ""):
    raise ValueError(
      f"config.loop.reward_model_checkpoint={lp.reward_model_checkpoint!r} is not a checkpoint; allowed: the "
      "path of a trained reward model's parameters (labeller 'reward_model')."
    )
  if c.train.reference.kind not in ("frozen", "cached"):
    raise ValueError(
      f"config.train.reference.kind={c.train.reference.kind!r} is not allowed with loop.kind={lp.kind!r}; "
      "allowed: ['frozen', 'cached'] (the loop's reference is config.loop.reference: 'keep' or 'refresh')."
    )
  spec = losses.spec(c.train.loss)
  unsupported = set(spec.requires) - {"lengths", "tokens", "key", "state"}
  if unsupported:
    raise ValueError(
      f"config.train.loss={c.train.loss!r} reads {sorted(unsupported)}, which a loop's pairs do not carry; "
      "allowed: a pairwise loss that reads log-probs only (lengths, per-token arrays, a key or a state)."
    )


def _check_processes(c, process_count: int, device_count: Optional[int]) -> None:
  """The rules that depend on how many processes and devices the run has."""
  mode = c.train.parallel.mode
  if process_count > 1:
    if c.sweep:
      raise ValueError("config.sweep runs in one process; multi-process runs take one training config.")
    if mode == "pmap":
      raise ValueError(
        "config.train.parallel.mode='pmap' runs in one process; with several processes use 'jit' or 'shard_map'."
      )
    if mode == "jit" and (c.data.attention == "block_sparse" or c.data.scored == "compact"):
      raise ValueError(
        "config.data.attention='block_sparse' / data.scored='compact' with train.parallel.mode='jit' "
        "needs one process (their index lists span the global batch); allowed with several processes: "
        "train.parallel.mode='shard_map' (lists built per device), or data.attention='dense' and "
        "data.scored='slots'."
      )
  if mode == "single" or device_count is None:
    return
  sizes = list(mesh_shape(c.train.parallel.mesh)) + [1] * (3 - len(mesh_shape(c.train.parallel.mesh)))
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if device_count % known:
      raise ValueError(
        f"config.train.parallel.mesh={c.train.parallel.mesh!r} does not divide the {device_count} devices of this run."
      )
    sizes[sizes.index(-1)] = device_count // known
  if math.prod(sizes) != device_count:
    raise ValueError(
      f"config.train.parallel.mesh={c.train.parallel.mesh!r} needs {math.prod(sizes)} devices; this run "
      f"has {device_count}."
    )
  batch_devices = sizes[0] * sizes[1]
  p = c.train.perturbation
  if p.kind == "sam" and p.m is not None and p.m % batch_devices:
    raise ValueError(
      f"config.train.perturbation.m={p.m} must be a multiple of the {batch_devices} data-parallel devices "
      "(each ascent's m pairs are spread over them)."
    )
  if c.train.batch_size % (c.train.grad_accum_steps * batch_devices):
    raise ValueError(
      f"config.train.batch_size={c.train.batch_size} must be a multiple of train.grad_accum_steps x "
      f"data-parallel devices = {c.train.grad_accum_steps} x {batch_devices}."
    )


def _check_kernels(c) -> None:
  """model.kernels: an allowed name, and a named backend that can run on this process's JAX backend."""
  _allowed(c, "model.kernels", options.KERNEL_BACKENDS)
  name = c.model.kernels
  if name in ("auto", "xla"):
    return
  reason = pofx_backends.unavailable_reason(name)
  runnable = ["auto"] + [
    b for b in options.KERNEL_BACKENDS[1:] if b != name and not pofx_backends.unavailable_reason(b)
  ]
  if reason:
    raise ValueError(f"config.model.kernels={name!r} cannot run here: {reason}; runnable here: {runnable}.")
  if name == "cpu" and c.train.parallel.mode != "single":
    raise ValueError(
      f"config.model.kernels='cpu' runs with train.parallel.mode='single' only (its custom calls are "
      f"not partitioned across devices); got {c.train.parallel.mode!r}."
    )


# ------------------------------------------------------------------------------------------------
# The image domain (experiments/diffusion.py).

IMAGE_POSITIVE_INTEGERS = (
  "model.num_train_timesteps",
  "pretrain.steps",
  "pretrain.batch_size",
  "data.num_pairs",
  "data.num_steps",
  "data.sample_batch",
  "train.steps",
  "train.batch_size",
  "train.grad_accum_steps",
  "train.log_every",
  "eval.num_samples",
  "eval.grid_per_class",
)


def _check_image_loss(c) -> None:
  """The loss of an image run: a registered pairwise loss whose extra inputs the image program
  makes, with a reference kind of the image domain."""
  try:
    spec = losses.spec(c.train.loss)
  except ValueError:
    raise ValueError(f"config.train.loss={c.train.loss!r} is not allowed; allowed: {losses.names()}.") from None
  trajectory, lists = c.train.logps == "trajectory", c.train.logps == "lists"
  allowed = options.IMAGE_LOSS_REQUIREMENTS + (("tokens",) if trajectory else ()) + (("list",) if lists else ())
  missing = sorted(set(spec.requires) - set(allowed))
  if lists and "list" not in spec.requires:
    raise ValueError(
      f"config.train.logps='lists' feeds K-way lists, which loss {spec.name!r} does not take; allowed: a listwise "
      f"loss ({[n for n in losses.names() if 'list' in losses.spec(n).requires]})."
    )
  if missing == ["list"]:
    raise ValueError(
      f"config.train.loss={spec.name!r} takes K-way lists ('list'), which only the recorded lists give; allowed: "
      f"train.logps='lists' with data.record='lists' (got train.logps={c.train.logps!r})."
    )
  if missing == ["tokens"]:
    raise ValueError(
      f"config.train.loss={spec.name!r} needs per-step log-probs ('tokens'), which only the recorded chains give; "
      f"allowed: train.logps='trajectory' with data.record in ['chains', 'spo_steps'] (got train.logps={c.train.logps!r})."
    )
  if missing:
    raise ValueError(
      f"config.train.loss={spec.name!r} needs {missing}, which images do not have (no tokens or lengths); "
      f"allowed for config.domain='image': losses whose extra inputs are within {list(allowed)}."
    )
  if "scores" in spec.requires and c.train.scores == "reward" and not spec.score_domain.any_real:
    raise ValueError(
      f"config.train.scores='reward' is not allowed with train.loss={spec.name!r}, defined for "
      f"{spec.score_domain.text}; allowed: train.scores='binary' (each image's binary feedback)."
    )
  hyper = dict(c.train.loss_hyper)
  unknown = sorted(set(hyper) - set(spec.hyperparameters))
  if unknown:
    raise ValueError(
      f"config.train.loss_hyper has {unknown}, not hyperparameters of {spec.name!r}; "
      f"allowed: {sorted(spec.hyperparameters)}."
    )
  beta = hyper.get("beta")
  if "beta" in hyper and not (isinstance(beta, (int, float)) and beta > 0):
    raise ValueError(f"config.train.loss_hyper.beta={beta!r} is not allowed; allowed: beta > 0.")
  try:
    losses.check_values(spec, hyper)
  except ValueError as e:
    raise ValueError(f"config.train.loss_hyper: {e}") from None
  kind = c.train.reference.kind
  if spec.reference == "required" and kind == "none":
    raise ValueError(
      f"config.train.reference.kind='none', but loss {spec.name!r} needs a reference; allowed: "
      f"{[k for k in options.IMAGE_REFERENCE_KINDS if k != 'none']}."
    )
  if spec.reference == "unused" and kind != "none":
    raise ValueError(
      f"config.train.reference.kind={kind!r}, but loss {spec.name!r} is reference-free; allowed: 'none'."
    )
  _check_image_companions(c, spec)


def _check_image_companions(c, spec) -> None:
  """Adaptive-DPO's EMA companions (`pofx.references.ema_companions` around the reference):
  `train.reference.companion_decays` and `companion_warmup` are set exactly when the loss
  requires "companions", and the pairs are scored by their denoising errors."""
  r = c.train.reference
  fields = [f for f in ("companion_decays", "companion_warmup") if f in r]
  if "companions" not in spec.requires:
    if fields:
      raise ValueError(
        f"config.train.reference.{fields[0]} is read only by a loss that requires the EMA companions "
        f"('companions': {[n for n in losses.names() if 'companions' in losses.spec(n).requires]}); "
        f"train.loss={spec.name!r} does not (start from configs/diffusion_dpo.py instead)."
      )
    return
  if len(fields) < 2:
    raise ValueError(
      f"config.train.loss={spec.name!r} scores EMA companions of the policy beside the reference; it needs "
      "config.train.reference.companion_decays (a tuple of decays in [0, 1)) and companion_warmup (an integer "
      ">= 0): start from configs/diffusion_adaptive_dpo.py."
    )
  decays = r.companion_decays
  ok = isinstance(decays, (tuple, list)) and len(decays) >= 1
  ok = ok and all(not isinstance(d, bool) and isinstance(d, (int, float)) and 0.0 <= d < 1.0 for d in decays)
  if not ok:
    raise ValueError(
      f"config.train.reference.companion_decays={decays!r} is not allowed; allowed: a non-empty tuple of EMA "
      "decays, each a number in [0, 1) (the authors' (0.9999, 0.5))."
    )
  warmup = r.companion_warmup
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ValueError(
      f"config.train.reference.companion_warmup={warmup!r} is not allowed; allowed: an integer >= 0 (steps "
      "before the companions are in use; the authors' 2)."
    )
  if c.train.logps != "pairs":
    raise ValueError(
      f"config.train.logps={c.train.logps!r} is not allowed with train.loss={spec.name!r} (Adaptive-DPO weighs "
      "Diffusion-DPO's pair errors); allowed: 'pairs'."
    )


def _check_image_records(c) -> None:
  """What the pair stage records (`data.record`, `data.patch_size`, SPO's fields) against what the
  train step reads (`train.logps`, `train.step_labels`)."""
  d, t = c.data, c.train
  _allowed(c, "data.record", options.IMAGE_PAIR_RECORDS)
  _allowed(c, "train.logps", options.IMAGE_LOGPS)
  if isinstance(d.patch_size, bool) or d.patch_size not in options.IMAGE_PATCH_SIZES:
    raise ValueError(
      f"config.data.patch_size={d.patch_size!r} is not allowed; allowed: {list(options.IMAGE_PATCH_SIZES)} "
      "(pixels per side of a square patch of the 8x8 images; 0: no quality maps)."
    )
  if not isinstance(t.step_labels, bool):
    raise ValueError(f"config.train.step_labels={t.step_labels!r} is not allowed; allowed: True or False.")
  k = d.list_size
  if isinstance(k, bool) or not isinstance(k, int) or k < 2:
    raise ValueError(f"config.data.list_size={k!r} is not allowed; allowed: an integer >= 2 (images per list).")
  if d.record == "lists":
    if d.pairing != "samples":
      raise ValueError(
        f"config.data.pairing={d.pairing!r} is not allowed with data.record='lists' (a list holds samples of the "
        "base); allowed: 'samples'."
      )
    if d.patch_size:
      raise ValueError(
        f"config.data.patch_size={d.patch_size!r} is not allowed with data.record='lists' (quality maps are made "
        "for pairs); allowed: 0."
      )
  if d.record == "curriculum":
    if d.pairing != "samples":
      raise ValueError(
        f"config.data.pairing={d.pairing!r} is not allowed with data.record='curriculum' (its pairs are drawn "
        "among a prompt's samples of the base); allowed: 'samples'."
      )
    if t.logps != "pairs":
      raise ValueError(
        f"config.train.logps={t.logps!r} is not allowed with data.record='curriculum' (Curriculum DPO trains "
        "Diffusion-DPO's pair errors); allowed: 'pairs'."
      )
    thr = d.curriculum_keep_threshold
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not thr >= 0:
      raise ValueError(
        f"config.data.curriculum_keep_threshold={thr!r} is not allowed; allowed: a number >= 0 (a gold-reward gap)."
      )
    cur = t.curriculum
    for field, low in (("groups", 2), ("update_every", 1)):
      v = cur[field]
      if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"config.train.curriculum.{field}={v!r} is not allowed; allowed: an integer >= {low}.")
  mu = t.winner_preserving_mu
  if mu is not None:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 <= mu <= 1.0:
      raise ValueError(
        f"config.train.winner_preserving_mu={mu!r} is not allowed; allowed: None (off) or a number in [0, 1]."
      )
    if t.logps != "pairs":
      raise ValueError(
        f"config.train.winner_preserving_mu={mu!r} is not allowed with train.logps={t.logps!r}: Diffusion-SDPO's "
        "safeguard scales the loser's pair error; allowed: train.logps='pairs', or winner_preserving_mu=None."
      )
  _allowed(c, "data.labeller", options.IMAGE_LABELLERS)
  if d.labeller == "majority":
    names = tuple(d.metrics) if isinstance(d.metrics, (tuple, list)) else None
    if not names or any(n not in world_lib.METRICS for n in names) or len(set(names)) != len(names):
      raise ValueError(
        f"config.data.metrics={d.metrics!r} is not allowed with data.labeller='majority'; allowed: a non-empty "
        f"tuple of distinct names from {list(world_lib.METRICS)}."
      )
    if d.record != "images" or d.pairing != "samples":
      raise ValueError(
        f"config.data.labeller='majority' is not allowed with data.record={d.record!r} and "
        f"data.pairing={d.pairing!r}: the metrics vote on two samples of the base; allowed: data.record='images' "
        "and data.pairing='samples'."
      )
  if (d.record == "lists") != (t.logps == "lists"):
    raise ValueError(
      f"config.train.logps={t.logps!r} is not allowed with data.record={d.record!r}: the K-way lists are recorded "
      "by data.record='lists' and read by train.logps='lists' only; allowed: both 'lists', or neither."
    )
  if d.record in ("chains", "spo_steps", "tailor_steps"):
    if d.pairing != "samples":
      raise ValueError(
        f"config.data.pairing={d.pairing!r} is not allowed with data.record={d.record!r} (its pairs are sampled "
        "chains of the base); allowed: 'samples'."
      )
    if d.sampler == "ddim" and not d.eta > 0:
      raise ValueError(
        f"config.data.eta={d.eta!r} is not allowed with data.record={d.record!r}: a deterministic DDIM step has "
        "no density; allowed: 0 < eta <= 1."
      )
    if d.num_steps < 2:
      raise ValueError(
        f"config.data.num_steps={d.num_steps} is not allowed with data.record={d.record!r} (the last step, to the "
        "clean image, is deterministic); allowed: an integer >= 2."
      )
  if d.record == "spo_steps":
    k = d.spo_candidates
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
      raise ValueError(f"config.data.spo_candidates={k!r} is not allowed; allowed: an integer >= 2.")
    th = d.spo_threshold
    if isinstance(th, bool) or not isinstance(th, (int, float)) or not 0.0 <= th < 1.0:
      raise ValueError(f"config.data.spo_threshold={th!r} is not allowed; allowed: a number in [0, 1).")
  if d.record == "tailor_steps":
    every = d.tailor_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise ValueError(f"config.data.tailor_every={every!r} is not allowed; allowed: an integer >= 1.")
    for name, low, text in (("tailor_eta", 0.0, ">= 0"), ("tailor_delta", None, "> 0")):
      v = d[name]
      bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
      if bad or (v < low if low is not None else v <= 0):
        raise ValueError(f"config.data.{name}={v!r} is not allowed; allowed: a finite number {text}.")
  if d.record in ("spo_steps", "tailor_steps"):
    s0 = d.spo_start_step
    if isinstance(s0, bool) or not isinstance(s0, int) or not 0 <= s0 <= d.num_steps - 2:
      raise ValueError(
        f"config.data.spo_start_step={s0!r} is not allowed; allowed: an integer in [0, {d.num_steps - 2}] "
        "(data.num_steps - 2: the last random step)."
      )
  if t.logps == "trajectory" and d.record == "images":
    raise ValueError(
      "config.train.logps='trajectory' reads the recorded chains, which data.record='images' does not keep; "
      "allowed: data.record in ['chains', 'spo_steps', 'tailor_steps']."
    )
  if d.record in ("spo_steps", "tailor_steps") and t.logps != "trajectory":
    raise ValueError(
      f"config.train.logps={t.logps!r} is not allowed with data.record={d.record!r} (step-wise pairs of latents, "
      "not of images); allowed: 'trajectory'."
    )
  if t.logps == "patch" and d.patch_size == 0:
    raise ValueError(
      "config.train.logps='patch' reads per-patch quality maps, which data.patch_size=0 does not make; allowed: "
      f"data.patch_size in {list(options.IMAGE_PATCH_SIZES[1:])}."
    )
  if (d.record == "segments") != (t.logps == "segments"):
    raise ValueError(
      f"config.train.logps={t.logps!r} is not allowed with data.record={d.record!r}: DenseDPO's band labels are "
      "recorded by data.record='segments' and read by train.logps='segments' only; allowed: both 'segments', or "
      "neither."
    )
  if d.record == "segments":
    if d.pairing != "samples" or d.labeller != "bradley_terry" or d.patch_size:
      raise ValueError(
        f"config.data.record='segments' makes its own pairs (two samples denoised from one noised training digit) "
        f"and labels (per band); allowed: data.pairing='samples', data.labeller='bradley_terry', "
        f"data.patch_size=0 (got {d.pairing!r}, {d.labeller!r}, {d.patch_size!r})."
      )
    if isinstance(d.segment_rows, bool) or d.segment_rows not in options.IMAGE_SEGMENT_ROWS:
      raise ValueError(
        f"config.data.segment_rows={d.segment_rows!r} is not allowed; allowed: {list(options.IMAGE_SEGMENT_ROWS)} "
        "(rows per band of the 8x8 images)."
      )
    g0, g1 = d.guidance_min, d.guidance_max
    nums = all(not isinstance(v, bool) and isinstance(v, (int, float)) for v in (g0, g1))
    if not nums or not 0.0 < g0 <= g1 < 1.0:
      raise ValueError(
        f"config.data.guidance_min={g0!r}, guidance_max={g1!r} are not allowed; allowed: 0 < guidance_min <= "
        "guidance_max < 1 (rectified-flow times; the paper's 0.65 and 0.8)."
      )
    tie = d.segment_tie
    if isinstance(tie, bool) or not isinstance(tie, (int, float)) or not 0.0 <= tie < math.inf:
      raise ValueError(f"config.data.segment_tie={tie!r} is not allowed; allowed: a finite number >= 0.")
    frac = d.min_nontie_fraction
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < frac <= 1.0:
      raise ValueError(
        f"config.data.min_nontie_fraction={frac!r} is not allowed; allowed: a number in (0, 1] (a pair of ties "
        "only carries no label)."
      )
  flip = d.get("label_flip", 0.0)
  if isinstance(flip, bool) or not isinstance(flip, (int, float)) or not 0.0 <= flip <= 0.5:
    raise ValueError(
      f"config.data.label_flip={flip!r} is not allowed; allowed: a number in [0, 0.5] (the share of pairs whose "
      "label is reversed; above 0.5 the labels would mostly say the opposite)."
    )
  if flip and (d.pairing != "samples" or d.record != "images"):
    raise ValueError(
      f"config.data.label_flip={flip!r} reverses the labels of two-sample pairs; allowed with data.pairing='samples' "
      f"and data.record='images' only (got {d.pairing!r}, {d.record!r}); else 0."
    )
  if t.step_labels and (t.logps != "trajectory" or d.record != "chains"):
    raise ValueError(
      f"config.train.step_labels=True needs the step-wise labels of recorded chains; allowed: train.logps='trajectory' "
      f"with data.record='chains' (got train.logps={t.logps!r}, data.record={d.record!r})."
    )


def _validate_image(c, process_count: int) -> None:
  """Every field of an image-domain config (configs/diffusion_*.py)."""
  _positive("seed", c.seed, zero_ok=True)
  for f in IMAGE_POSITIVE_INTEGERS:
    _positive(f, _get(c, f))
  if process_count > 1:
    raise ValueError("config.domain='image' runs in one process.")
  for f in ("world.style_weight", "world.label_scale"):
    _positive(f, _get(c, f), integer=False, zero_ok=True)
  if not 0.0 < c.world.eval_fraction < 1.0:
    raise ValueError(
      f"config.world.eval_fraction={c.world.eval_fraction!r} is not allowed; allowed: a number in (0, 1)."
    )
  if c.model.preset not in unet.PRESETS:
    raise ValueError(f"config.model.preset={c.model.preset!r} is not allowed; allowed: {sorted(unet.PRESETS)}.")
  m = c.model
  fields = dict(
    block_out_channels=tuple(m.block_out_channels),
    down_block_types=tuple(m.down_block_types),
    up_block_types=tuple(m.up_block_types),
    layers_per_block=m.layers_per_block,
    attention_head_dim=m.attention_head_dim,
    norm_num_groups=m.norm_num_groups,
  )
  cross = isinstance(unet.PRESETS[m.preset], unet.UNetConditionConfig)
  if m.get("cross_attention_dim") is not None:
    if not cross:
      raise ValueError(
        f"config.model.cross_attention_dim={m.cross_attention_dim!r} is read only by a cross-attention preset; "
        f"allowed with model.preset={m.preset!r}: None (cross-attention presets: "
        f"{sorted(k for k, v in unet.PRESETS.items() if isinstance(v, unet.UNetConditionConfig))})."
      )
    fields["cross_attention_dim"] = m.cross_attention_dim
  try:  # the U-Net's own checks of its fields (block types, channels, groups), nothing built
    unet.preset(m.preset, **fields)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model: {e}") from None
  _allowed(c, "model.schedule", options.DIFFUSION_SCHEDULES)
  _allowed(c, "model.prediction_type", options.DIFFUSION_PREDICTION_TYPES)
  _allowed(c, "model.kernels", options.KERNEL_BACKENDS)
  reason = pofx_backends.unavailable_reason(c.model.kernels) if c.model.kernels not in ("auto", "xla") else None
  if reason:
    raise ValueError(f"config.model.kernels={c.model.kernels!r} cannot run here: {reason}; allowed: 'auto' or 'xla'.")
  _allowed(c, "data.sampler", options.DIFFUSION_SAMPLERS)
  _allowed(c, "data.pairing", options.IMAGE_PAIRINGS)
  _allowed(c, "train.scores", options.IMAGE_SCORES)
  if not (isinstance(c.data.eta, (int, float)) and 0.0 <= c.data.eta <= 1.0):
    raise ValueError(f"config.data.eta={c.data.eta!r} is not allowed; allowed: a number in [0, 1].")
  if c.data.num_steps > c.model.num_train_timesteps:
    raise ValueError(
      f"config.data.num_steps={c.data.num_steps} is not allowed; allowed: at most "
      f"model.num_train_timesteps={c.model.num_train_timesteps}."
    )
  _check_image_records(c)
  for f in ("pretrain.learning_rate", "train.optimizer.learning_rate"):
    _positive(f, _get(c, f), integer=False)
  if not 0.0 <= c.pretrain.ema_decay < 1.0:
    raise ValueError(
      f"config.pretrain.ema_decay={c.pretrain.ema_decay!r} is not allowed; allowed: [0, 1) (0 = no EMA)."
    )
  kind = c.train.reference.kind
  if kind not in options.IMAGE_REFERENCE_KINDS:
    why = (
      " (the timestep and noise of each pair are drawn anew at every step, so the reference's errors "
      "cannot be computed once)"
      if kind == "cached"
      else ""
    )
    raise ValueError(
      f"config.train.reference.kind={kind!r} is not allowed for config.domain='image'{why}; allowed: "
      f"{list(options.IMAGE_REFERENCE_KINDS)}."
    )
  _allowed(c, "train.perturbation.kind", options.IMAGE_PERTURBATION_KINDS)
  _allowed(c, "train.optimizer.name", options.OPTIMIZERS)
  if c.train.batch_size % c.train.grad_accum_steps:
    raise ValueError(
      f"config.train.batch_size={c.train.batch_size} must be a multiple of "
      f"config.train.grad_accum_steps={c.train.grad_accum_steps}."
    )
  p = c.train.perturbation
  if p.kind == "sam" and p.m is not None:
    _positive("train.perturbation.m", p.m)
    if (c.train.batch_size // c.train.grad_accum_steps) % p.m:
      raise ValueError(
        f"config.train.perturbation.m={p.m} is not allowed; allowed: None or a divisor of the "
        f"{c.train.batch_size // c.train.grad_accum_steps} pairs of a micro-batch."
      )
  if p.kind == "rwp" and (p.c_min is None or not math.isfinite(p.c_min)):
    raise ValueError(
      f"config.train.perturbation.c_min={p.c_min!r} is not allowed with kind='rwp'; allowed: a finite per-pair "
      "loss threshold."
    )
  _check_image_loss(c)


def _check_stage(c, process_count: int = 1) -> None:
  """`config.stage` (absent: "policy") and the fields of the stage it names."""
  if "stage" not in c:
    return
  stage = c.stage
  _allowed(c, "stage", options.STAGES)
  if stage == "reward_model":
    if "reward_model" not in c:
      raise ValueError("config.stage='reward_model' needs config.reward_model (see configs/reward_model.py).")
    _allowed(c, "reward_model.init", options.REWARD_MODEL_INITS)
    for f in ("reward_model.steps", "reward_model.batch_size", "reward_model.log_every"):
      _positive(f, _get(c, f))
    _positive("reward_model.learning_rate", c.reward_model.learning_rate, integer=False)
    for f in ("reward_model.weight_decay", "reward_model.grad_clip", "reward_model.center_coefficient"):
      _positive(f, _get(c, f), integer=False, zero_ok=True)
    m = c.reward_model.margin_scale
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
      raise ValueError(f"config.reward_model.margin_scale={m!r} is not allowed; allowed: a finite number.")
  if stage == "curriculum":
    if "curriculum" not in c:
      raise ValueError("config.stage='curriculum' needs config.curriculum (see configs/curry_dpo.py).")
    for f in ("curriculum.num_stages", "curriculum.steps_per_stage"):
      _positive(f, _get(c, f))
    if c.data.source != "world":
      raise ValueError("config.stage='curriculum' rates the world's sampled completions; allowed: data.source='world'.")
    if c.train.reference.kind not in ("cached", "frozen"):
      raise ValueError(
        f"config.stage='curriculum' uses each stage's starting policy as its reference; "
        f"config.train.reference.kind={c.train.reference.kind!r} is not allowed; allowed: ['cached', 'frozen']."
      )
  if stage != "policy" and c.sweep:
    raise ValueError(f"config.stage={stage!r} runs no sweep; set config.sweep=().")
  if stage != "policy" and (process_count > 1 or c.train.parallel.mode != "single"):
    raise ValueError(
      f"config.stage={stage!r} runs in one process on one device; allowed: train.parallel.mode='single' "
      f"and one process (got mode {c.train.parallel.mode!r}, {process_count} processes)."
    )


def _check_feedback(c) -> None:
  """Unpaired feedback (KTO): `data.feedback` for the world, `data.format='unpaired'` for files,
  and the loss that reads it (`kto_unpaired`) only with one of them."""
  feedback = c.data.get("feedback", "pairs")
  if "feedback" in c.data:
    _allowed(c, "data.feedback", options.FEEDBACK)
  if feedback == "unpaired":
    if c.data.source != "world":
      raise ValueError(
        "config.data.feedback='unpaired' is for data.source='world'; for files set config.data.format='unpaired'."
      )
    t = c.data.get("unpaired_threshold", None)
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
      raise ValueError(
        f"config.data.unpaired_threshold={t!r} is not allowed; allowed: a finite number or None (median)."
      )
  unpaired = feedback == "unpaired" or (c.data.source == "files" and c.data.format == "unpaired")
  if unpaired != (c.train.loss == "kto_unpaired") and c.get("stage", "policy") == "policy":
    if unpaired:
      raise ValueError(
        f"unpaired feedback trains config.train.loss='kto_unpaired' only, not {c.train.loss!r} "
        "(each example's rejected slot holds a mismatched completion)."
      )
    raise ValueError(
      "config.train.loss='kto_unpaired' needs unpaired data: config.data.feedback='unpaired' (world) or "
      "config.data.format='unpaired' (files)."
    )


def validate(c: ml_collections.ConfigDict, *, process_count: int = 1, device_count: Optional[int] = None) -> None:
  """Checks every field a run reads; raises ValueError naming the field and what is allowed.

  process_count / device_count: the run's JAX processes and devices (`jax.process_count()`,
  `jax.device_count()`); the device rules are skipped when `device_count` is None. An image-domain
  config (`config.domain == "image"`) has its own fields (`_validate_image`)."""
  domain = c.get("domain", "text")
  if domain not in options.DOMAINS:
    raise ValueError(f"config.domain={domain!r} is not allowed; allowed: {list(options.DOMAINS)}.")
  if domain == "image":
    _validate_image(c, process_count)
    return
  _positive("seed", c.seed, zero_ok=True)
  if c.model.preset != "world" and c.model.preset not in llama.PRESETS:
    raise ValueError(
      f"config.model.preset={c.model.preset!r} is not allowed; allowed: 'world' or a pofx.models "
      f"preset {sorted(llama.PRESETS)}."
    )
  for f in POSITIVE_INTEGERS:
    _positive(f, _get(c, f))
  betas = c.eval.idealized_betas
  if not isinstance(betas, (tuple, list)) or not all(
    isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0 for b in betas
  ):
    raise ValueError(
      f"config.eval.idealized_betas={betas!r} is not allowed; allowed: a tuple of numbers > 0 (may be empty)."
    )
  _check_stage(c, process_count)
  _check_data(c)
  _check_feedback(c)
  _check_train(c)
  _check_loop(c)
  charts = c.get("sweep_member_charts", True)
  if not isinstance(charts, bool):
    raise ValueError(f"config.sweep_member_charts={charts!r} is not allowed; allowed: True or False.")
  for item in c.sweep:
    if "label" not in item or "overrides" not in item:
      raise ValueError("config.sweep entries must be {'label': str, 'overrides': {dotted.key: value}}.")
    for key, value in dict(item["overrides"]).items():
      if not has_field(c, key):
        raise ValueError(f"config.sweep[{item['label']!r}].overrides: {unknown_field_message(c, key)}")
      ref = FIELD_VALUE.match(value) if isinstance(value, str) else None
      if ref:
        try:
          field_value(c, ref.group(1))
        except ValueError as e:
          raise ValueError(f"config.sweep[{item['label']!r}].overrides[{key!r}]={value!r}: {e}") from None
  _check_processes(c, process_count, device_count)
  _check_kernels(c)
