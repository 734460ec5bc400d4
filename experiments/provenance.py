"""Workdir provenance: what each stage of the training program depends on, and the rule on a rerun.

Every stage output in a workdir carries a record of the config fields and input fingerprints it
was computed from (`pofx.fingerprints`): `provenance.json` inside `sft_params/`,
`sft_params_second_reference/`, `data/` and `final_params/` (inside, so that an output shared by a
symlink carries its record), `train_provenance.json` next to `checkpoints/` (written before the
first checkpoint; the checkpoint folder holds orbax's step folders only), the `provenance` entry of
`summary.json`, and that of `kernels.json`. A stage's fingerprint covers exactly what it reads:

  sft        seed, world.*, sft.*, model.{preset,dtype,remat}, data.source (and which SFT model:
             the MRPO second reference has its own seed offset)
  data       seed, world.*, data.{source,num_prompts,samples_per_prompt,num_eval_pairs} and the
             SFT fingerprint (pairs are sampled from the SFT base); with data.source="files", the
             data.* fields that read the files (their contents are checked by the dataset's own
             fingerprint, `pofx.data`)
  reference  the reference weights, vocabulary, length limits and the dataset fingerprint
             (`pofx.references.fingerprint`, checked where the cache is read)
  train      seed; model.{preset,dtype,remat,init_checkpoint}; the batching fields of data.*;
             train.{loss,loss_hyper,batch_size,grad_accum_steps,optimizer,parallel}; the fields of
             the chosen reference and perturbation kinds; when set, train.perturbation.m (SAM),
             train.dropout (rate > 0, or LoRA with dropout > 0: the masks per step),
             train.input_perturbation (kind not "none") and
             train.lora (enabled; all but export_merged), fields
             added later and recorded only then, so earlier records stay valid; the SFT and data
             fingerprints; the
             resolved kernel backend; the guiding policy's fingerprint (Pre-DPO) or the second
             SFT model's (MRPO)
  eval       eval.*, train.steps and the train fingerprint
  kernels    model.kernels, train.parallel.mode and the JAX platform

Fields left out change no result: train.log_every, train.checkpoint_every,
train.keep_checkpoints, train.on_nonfinite (what to do if a step is non-finite; the state stays
the same either way until one is), train.gradient_field (extra metrics only), the progress bar, and train.steps for training: the learning
rate schedule and the data order do not depend on it, so raising train.steps continues a
finished or partial run exactly (then evaluation is redone, as its fingerprint holds
train.steps); lowering it below the step a workdir reached is refused. The kernel backend is a
training input, but not an SFT or data input: the backends compute the same functions (to
float32 rounding), and a workdir's SFT base and data are shared across backends.

The rule on a rerun (`check`, called for every stage before any compute):
  sft, data, train   a stage whose recorded fields or inputs differ (or whose output has no
                     record) is refused, naming every field that differs, unless the program runs
                     with --overwrite: then its outputs and everything computed from them are
                     removed and recomputed, one line each saying which and why. These stages hold
                     trained models or sampled data, so they are never replaced silently.
  reference, eval    recomputed when they differ (cheap, and derived from outputs kept in the
                     workdir), one line saying why.
A sweep checks its shared stages and every member before any compute, and refuses with one line
naming every member that differs; a Pre-DPO round whose guide is an earlier round of the same
sweep is checked against the identity that round's final parameters will have (`final_identity`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from pofx import fingerprints

RECORD = "provenance.json"
TRAIN_RECORD = "train_provenance.json"  # <workdir>/train_provenance.json: the record of checkpoints/

# Stages in order, and the workdir entries each one owns (removed with --overwrite, with those
# of every later stage).
STAGES = ("sft", "data", "train", "eval")
OUTPUTS = {
  "sft": ("sft_params", "sft_params_second_reference"),
  "data": ("data", "reference_cache"),
  "train": (TRAIN_RECORD, "checkpoints", "final_params", "metrics.jsonl", "tensorboard", "training_curves.png"),
  "eval": ("summary.json", "reward_vs_kl.png"),
}

ADVICE = "Use a new --workdir, or --overwrite to recompute these stages (their outputs in this workdir are replaced)."

_MODEL = ("model.preset", "model.dtype", "model.remat")
_BATCHING = (
  "data.layout",
  "data.seq_bucket",
  "data.completion_bucket",
  "data.attention",
  "data.scored",
)
_REFERENCE_FIELDS = {
  "none": (),
  "frozen": (),
  "cached": (),
  "multi": ("eta", "mrpo_alpha"),
  "guiding": ("guide_checkpoint",),
  "synced": ("alpha", "tau"),
  "ema": ("decay",),
}
_PERTURBATION_FIELDS = {
  "none": (),
  "sam": ("rho", "adaptive"),
  "awp": ("gamma",),
  "rwp": ("gamma", "c_min", "steps"),
  "saf": ("lam", "temperature", "minus_epochs", "start_epoch", "end_epoch"),
  "mesa": ("lam", "temperature", "decay", "start_epoch", "end_epoch"),
}
_FILES = (
  "data.files",
  "data.eval_files",
  "data.format",
  "data.tokenizer_dir",
  "data.max_prompt_len",
  "data.max_completion_len",
  "data.truncation",
  "data.on_bad_record",
)


class Refused(ValueError):
  """A rerun whose config differs from what the workdir's stages were computed under."""


@dataclasses.dataclass(frozen=True)
class Record:
  """What one stage output was computed from: config fields and input fingerprints."""

  stage: str
  fields: Dict[str, Any]
  inputs: Dict[str, Optional[str]]

  @property
  def fingerprint(self) -> str:
    return fingerprints.of(self.fields, self.inputs)

  def to_json(self, **extra) -> Dict[str, Any]:
    return {"stage": self.stage, "fingerprint": self.fingerprint, "fields": self.fields, "inputs": self.inputs, **extra}


# ------------------------------------------------------------------------------------------------
# What each stage reads


def sft_record(c, seed_offset: int = 0) -> Record:
  fields = fingerprints.fields(c, ("seed", "world", "sft", "data.source") + _MODEL)
  fields["sft_model"] = int(seed_offset)
  return Record("sft", fields, {})


def base_record(c) -> Record:
  """The base policy of data.source="files": model.init_checkpoint (identified by its files'
  names, sizes and modification times) or a random init."""
  fields = fingerprints.fields(c, ("seed", "data.source", "model.init_checkpoint", "data.tokenizer_dir") + _MODEL)
  return Record("base", fields, {"init_checkpoint": directory_identity(c.model.init_checkpoint)})


def base_fingerprint(c) -> str:
  return (sft_record(c) if c.data.source == "world" else base_record(c)).fingerprint


def data_record(c) -> Record:
  if c.data.source == "files":
    return Record("data", fingerprints.fields(c, ("data.source",) + _FILES), {})
  fields = fingerprints.fields(
    c, ("seed", "world", "data.source", "data.num_prompts", "data.samples_per_prompt", "data.num_eval_pairs")
  )
  if c.data.get("feedback", "pairs") != "pairs":  # unpaired feedback (KTO): recorded only when set
    fields.update(fingerprints.fields(c, ("data.feedback", "data.unpaired_threshold")))
  return Record("data", fields, {"sft": sft_record(c).fingerprint})


# What a LoRA run's result depends on (export_merged only adds a file).
_LORA_FIELDS = ("enabled", "rank", "alpha", "targets", "dropout")


def train_record(c, *, kernels: Optional[str], guide: Optional[str] = None) -> Record:
  """`kernels`: the resolved kernel backend; `guide`: the guiding policy's fingerprint (`guide_identity`)."""
  kind, pert = c.train.reference.kind, c.train.perturbation.kind
  names = (
    ("seed", "model.init_checkpoint")
    + _MODEL
    + _BATCHING
    + ("train.loss", "train.loss_hyper", "train.batch_size", "train.grad_accum_steps")
    + ("train.optimizer", "train.parallel", "train.reference.kind", "train.perturbation.kind")
    + tuple(f"train.reference.{k}" for k in _REFERENCE_FIELDS.get(kind, ()))
    + tuple(f"train.perturbation.{k}" for k in _PERTURBATION_FIELDS.get(pert, ()))
    + (("data.attention_block_size",) if c.data.attention == "block_sparse" else ())
    # fields added later, recorded only when set, so earlier workdirs keep their records
    + (("train.perturbation.m",) if pert == "sam" and c.train.perturbation.m is not None else ())
    + (("train.dropout",) if c.train.dropout.rate > 0 or (c.train.lora.enabled and c.train.lora.dropout > 0) else ())
    + (("train.input_perturbation",) if c.train.input_perturbation.kind != "none" else ())
    + (tuple(f"train.lora.{k}" for k in _LORA_FIELDS) if c.train.lora.enabled else ())
  )
  inputs = {"base": base_fingerprint(c), "data": data_record(c).fingerprint, "kernels": kernels}
  if kind == "multi":
    inputs["second_reference"] = sft_record(c, seed_offset=17).fingerprint
  if kind == "guiding":
    inputs["guide"] = guide
  return Record("train", fingerprints.fields(c, names), inputs)


def eval_record(c, train_fp: str) -> Record:
  return Record("eval", fingerprints.fields(c, ("eval", "train.steps")), {"train": train_fp})


def kernels_record(c, platform: str) -> Record:
  return Record("kernels", fingerprints.fields(c, ("model.kernels", "train.parallel.mode")), {"platform": platform})


def directory_identity(path: str) -> Optional[str]:
  """A fingerprint of a directory made outside this workdir (an init checkpoint): its record's
  fingerprint when it has one, else its files' relative paths, sizes and modification times;
  None when it does not exist."""
  if not path or not os.path.exists(path):
    return None
  rec = read(path)
  if rec is not None:
    return fingerprints.of_values({"record": rec.get("fingerprint"), "step": rec.get("step")})
  entries = []
  for root, _, files in os.walk(path):
    for name in sorted(files):
      p = os.path.join(root, name)
      st = os.stat(p)
      entries.append([os.path.relpath(p, path), st.st_size, st.st_mtime_ns])
  return fingerprints.of_values(sorted(entries))


def guide_identity(c) -> Optional[str]:
  return directory_identity(c.train.reference.guide_checkpoint) if c.train.reference.kind == "guiding" else None


def final_identity(c, kernels: Optional[str], guide: Optional[str] = None) -> str:
  """The identity (`directory_identity`) the final parameters of a run of `c` will have: what a
  later Pre-DPO round reads as its guide."""
  return fingerprints.of_values(
    {"record": train_record(c, kernels=kernels, guide=guide).fingerprint, "step": c.train.steps}
  )


# ------------------------------------------------------------------------------------------------
# Records on disk


def read(output: str) -> Optional[Dict[str, Any]]:
  """The record inside the output directory `output`, or the record file `output` itself (None
  when there is none)."""
  path = output if output.endswith(".json") else os.path.join(output, RECORD)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write(output: str, record: Record, **extra) -> None:
  """Writes the record inside the directory `output`, or as the file `output` when it names a
  .json file (atomically: a temporary file renamed)."""
  path = output if output.endswith(".json") else os.path.join(output, RECORD)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(record.to_json(**extra), f, indent=1)
  os.replace(path + ".tmp", path)


def differences(old: Optional[Mapping[str, Any]], new: Record) -> List[str]:
  """What differs between a recorded stage and this run's: field changes, then changed inputs."""
  if old is None:
    return ["no provenance record (made by an older pofx, or interrupted while being written)"]
  out = fingerprints.differences(old.get("fields", {}), new.fields)
  out += [f"input {d}" for d in fingerprints.differences(old.get("inputs", {}), new.inputs)]
  if not out and old.get("fingerprint") != new.fingerprint:
    out.append(f"fingerprint {str(old.get('fingerprint'))[:12]}... -> {new.fingerprint[:12]}...")
  return out


def checkpoint_steps(directory: str) -> List[int]:
  """The steps of the checkpoints under `directory` (orbax's numbered step folders)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


# ------------------------------------------------------------------------------------------------
# The rule on a rerun


@dataclasses.dataclass
class Finding:
  stage: str
  output: str
  why: List[str]


def findings(
  c, workdir: str, *, kernels: Optional[str], stages: Sequence[str] = STAGES, guide: Any = "on disk"
) -> List[Finding]:
  """The refusable stages of `workdir` (sft, data, train) whose outputs differ from what this
  config would compute. Reads records only; computes nothing. `guide`: the guiding policy's
  identity when it is still to be made in this run (a sweep's earlier member), else read from disk."""
  out = []
  here = lambda *p: os.path.join(workdir, *p)
  if "sft" in stages and c.data.source == "world":
    for name, offset in (("sft_params", 0), ("sft_params_second_reference", 17)):
      if os.path.exists(here(name)) and (offset == 0 or c.train.reference.kind == "multi"):
        why = differences(read(here(name)), sft_record(c, offset))
        if why:
          out.append(Finding("sft", name, why))
  if "data" in stages and os.path.exists(here("data")):
    why = differences(read(here("data")), data_record(c))
    if why:
      out.append(Finding("data", "data", why))
  if "train" in stages:
    rec = train_record(c, kernels=kernels, guide=guide_identity(c) if guide == "on disk" else guide)
    if os.path.exists(here("checkpoints")) and checkpoint_steps(here("checkpoints")):
      old = read(here(TRAIN_RECORD))
      if kernels is None and old is not None:  # the backend is decided later: compare the rest
        rec = dataclasses.replace(rec, inputs={**rec.inputs, "kernels": old.get("inputs", {}).get("kernels")})
      why = differences(old, rec)
      reached = checkpoint_steps(here("checkpoints"))[-1]
      if not why and reached > c.train.steps:
        why = [f"checkpoints reach step {reached}, beyond train.steps={c.train.steps} (a run cannot be shortened)"]
      if why:
        out.append(Finding("train", "checkpoints", why))
  return out


def refusal(workdir: str, found: Sequence[Finding], *more) -> str:
  """One line: the workdir, each stage that differs and how, and what to do. `more`: further
  (workdir, findings) pairs (a sweep's members)."""
  texts = []
  for wd, fs in ((workdir, found),) + tuple(more):
    parts = [f"{f.stage} ({f.output}): {'; '.join(f.why)}" for f in fs]
    texts.append(f"{wd} holds stages computed under another config: {' | '.join(parts)}")
  return f"{'; and '.join(texts)}. Nothing was computed. {ADVICE}"


def remove(path: str) -> bool:
  """Removes one workdir entry (a symlink loses its link only; what it points to is left alone)."""
  if os.path.islink(path) or os.path.isfile(path):
    os.unlink(path)
  elif os.path.isdir(path):
    shutil.rmtree(path)
  else:
    return False
  return True


def remove_from(workdir: str, stage: str, say: Callable[..., None]) -> None:
  """Removes the outputs of `stage` and of every later stage from `workdir`."""
  for later in STAGES[STAGES.index(stage) :]:
    for name in OUTPUTS[later]:
      if remove(os.path.join(workdir, name)):
        say("%s: removed %s (--overwrite)", later, os.path.join(workdir, name))


def check(
  c,
  workdir: str,
  *,
  kernels: Optional[str],
  overwrite: bool,
  say,
  stages: Sequence[str] = STAGES,
  guide: Any = "on disk",
) -> None:
  """Before any compute: refuses (`Refused`) a workdir whose sft, data or train outputs were
  computed under other fields or inputs, or with `overwrite` removes them (and what follows them)
  so that they are recomputed, saying which and why, one line each."""
  found = findings(c, workdir, kernels=kernels, stages=stages, guide=guide)
  if not found:
    return
  if not overwrite:
    raise Refused(refusal(workdir, found))
  for f in found:
    say("%s: recomputing (--overwrite): %s", f.stage, "; ".join(f.why))
  remove_from(workdir, found[0].stage, say)
