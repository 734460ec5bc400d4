"""The pofx training program: one config, five resumable stages.

    python -m experiments.main --config=configs/dpo.py[:arg] --workdir=/tmp/run [--config.a.b=value ...]

Stages (each skipped when its output in the workdir is complete and was computed under the same
config, so a killed run resumes; a rerun under another config is refused before any compute, or
with --overwrite recomputes the stages that differ: `experiments/provenance.py`):
  1. sft        the supervised base policy on the controlled world's demonstrations (world data)
  2. data       preference pairs sampled from the base and labelled by Bradley-Terry on the gold
                reward (or the user's JSONL/Parquet files), stored as an array_record TFDS dataset
  3. reference  the reference log-probs cached once per dataset (cached / multi references)
  4. train      preference training with orbax checkpoints every N steps (exact resume)
  5. eval       gold reward, win rate vs base (95% CI), KL to base, lengths, reward / ranking
                accuracy, chosen / rejected log-ratios (held-out and training pairs);
                summary.json, a console table, PNG plots

A config's `sweep` runs several trainings after one shared SFT + data stage (the GPO chart, the
two rounds of Pre-DPO), each in `<workdir>/sweep/<label>`. A config with `domain = "image"`
(configs/diffusion_*.py) runs the image world's diffusion pipeline instead (experiments/diffusion.py).

Before any compute the program applies the process-wide start-up of the kernel backends
(`pofx_backends.startup`: on a CPU platform glibc keeps freed memory; in one malloc arena
except for the image domain), joins a multi-process run
(`experiments.distributed`), checks the config (`configs/validate.py`; a misspelt or mistyped
`--config.` flag fails with one line) and settles the kernel backend (`config.model.kernels`;
"auto" is decided once per workdir and recorded in `<workdir>/kernels.json` and `summary.json`;
a resumed run reuses the record).

Then the workdir is claimed (`experiments.workdir`): a workdir that cannot be written fails at
once, and a lock file makes a second run in the same workdir fail at once (the lock of a killed
run is taken over). Checkpoints are sealed with SHA-256 digests and verified at restore
(`experiments.checkpointing`): a damaged one is named, set aside, and the run falls back to the
previous intact one. The training counters (non-finite steps, timed steps, seconds, FLOPs) are
stored in each checkpoint, so the summary after kills and resumes equals the uninterrupted run's
apart from wall-clock figures. A run that fails (a non-finite step under
`train.on_nonfinite='halt'`, which stops at that step; a checkpoint of another config; a bad data
file) ends with one line on stderr and exit status 1.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import signal
import sys
import time
import zlib
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

import pofx_backends
from configs import validate as config_validation
from experiments import (
  checkpointing,
  diffusion,
  distributed,
  export_hf,
  lora_io,
  optimizers,
  plots,
  provenance,
  reference_cache,
)
from experiments import metrics as metrics_lib
from experiments import sft as sft_lib
from experiments import workdir as workdir_lib
from pofx import (
  batching,
  evaluation,
  fingerprints,
  lora,
  losses,
  models,
  parallel,
  perturbations,
  policy,
  references,
  train,
)
from pofx import data as data_lib
from pofx import world as world_lib
from pofx.data import pipeline
from pofx.data import unpaired as unpaired_lib
from pofx_backends.cpu import host_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<family>.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, data, metrics, plots and the summary.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a live progress bar.")
_MAX_TRAIN_STEPS = flags.DEFINE_integer(
  "stop_after_steps", None, "Stop training after this step (testing resume); the next run continues."
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "Recompute the workdir's stages that were computed under another config (their outputs are replaced); "
  "without it such a rerun is refused before any compute.",
)

_FAULT = flags.DEFINE_string(
  "fault",
  None,
  "Testing: SIGKILL this process at a point: 'step:N' after step N, 'save:N' inside the save of step N "
  "(files written, not yet sealed), 'eval' as evaluation starts.",
)

# Pair metrics also reported on the first training pairs (summary keys "train_<key>").
TRAIN_PAIR_KEYS = ("chosen_logratio", "rejected_logratio", "logratio_margin", "ranking_accuracy", "ranking_changed")

KERNELS_RECORD = "kernels.json"  # <workdir>/kernels.json: the kernel backend this workdir runs with

SUMMARY_KEYS = (
  "gold_reward_base",
  "gold_reward_policy",
  "win_rate_vs_base",
  "win_rate_ci95",
  "kl_to_base",
  "reward_accuracy",
  "ranking_accuracy",
  "mean_length_base",
  "mean_length_policy",
  "pairs_per_second",
)


def _set(config, dotted: str, value):
  node = config
  *parents, last = dotted.split(".")
  for p in parents:
    node = node[p]
  node[last] = value


def _say(msg, *args):
  """Stage progress on stderr (absl logging is quieted: orbax logs every file it writes)."""
  print("[pofx] " + (msg % args if args else msg), file=sys.stderr, flush=True)


def _fault(point: str) -> None:
  """Fault injection for the kill-and-resume tests: SIGKILLs this process when `--fault` names
  `point` (never when the program's flags are not parsed, as when the stages run as a library)."""
  if flags.FLAGS.is_parsed() and _FAULT.value == point:
    os.kill(os.getpid(), signal.SIGKILL)


def _scalar(x) -> float:
  """A replicated (possibly multi-process) scalar as a float, without a collective."""
  if hasattr(x, "is_fully_addressable") and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return float(np.asarray(x))


def _local_values(metrics):
  return {k: _scalar(v) for k, v in metrics.items()}


def _primary_first(fn, *args, **kwargs):
  """Runs a stage that writes its output to the workdir without collectives (the TFDS dataset, the
  reference cache): in a multi-process run, process 0 runs it first, then (after a barrier) the
  others run it and find the output there (they load it). Orbax stages run on every process."""
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  out = fn(*args, **kwargs) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"pofx:{fn.__name__}")
  return out if jax.process_index() == 0 else fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# The kernel backend of a workdir


def _decide_kernels(config, workdir: str) -> Dict[str, Any]:
  """The kernel backend record of `workdir`: `{"requested", "name", "details"}`.

  A record already in `<workdir>/kernels.json` is kept when the config asks for "auto" or for the
  recorded backend (a resumed run never re-decides); otherwise the config's backend is resolved
  (`pofx_backends.resolve`: "auto" by the JAX platform and, on the CPU, by a short calibration)
  and recorded. On the CPU a multi-device mode resolves "auto" to "xla" (the CPU kernels' custom
  calls run on one device)."""
  path = os.path.join(workdir, KERNELS_RECORD)
  requested = config.model.kernels
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    if requested in ("auto", record["name"]):
      reason = pofx_backends.unavailable_reason(record["name"])
      if record["name"] == "cpu" and config.train.parallel.mode != "single":
        reason = f"the CPU kernels run with train.parallel.mode='single' only, not {config.train.parallel.mode!r}"
      if reason:
        raise ValueError(
          f"{path} records kernel backend {record['name']!r} for this workdir, which cannot run here: "
          f"{reason}; use another workdir, or set config.model.kernels."
        )
      _say("kernels: reusing the record in %s", path)
      return record
  if requested == "auto" and config.train.parallel.mode != "single" and jax.default_backend() == "cpu":
    name, details = (
      "xla",
      {
        "requested": requested,
        "platform": "cpu",
        "rule": f"train.parallel.mode={config.train.parallel.mode!r}: the CPU kernels run on one device",
      },
    )
  else:
    name, details = pofx_backends.resolve(requested)
  record = {
    "requested": requested,
    "name": name,
    "details": details,
    "provenance": provenance.kernels_record(config, jax.default_backend()).to_json(),
  }
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  return record


def planned_kernels(config, workdir: str) -> Optional[str]:
  """The kernel backend a run of `config` in `workdir` will use, without deciding it: the
  recorded one when the config asks for "auto" or for it, else the requested one; None when
  "auto" is still to be decided (no record)."""
  path = os.path.join(os.path.abspath(workdir), KERNELS_RECORD)
  requested = config.model.kernels
  if os.path.exists(path):
    with open(path) as f:
      name = json.load(f)["name"]
    if requested in ("auto", name):
      return name
  return None if requested == "auto" else requested


def settle_kernels(config, workdir: str) -> Dict[str, Any]:
  """`_decide_kernels` once for every process (process 0 decides and records; the others read)."""
  record = _primary_first(_decide_kernels, config, os.path.abspath(workdir))
  _say("kernels: %s (%s)", record["name"], record["details"].get("rule", "recorded"))
  return record


# ------------------------------------------------------------------------------------------------
# Stage helpers


class Run:
  """Everything the stages share: the config, the world, the model and the workdir."""

  def __init__(self, config, workdir: str, *, progress: bool = True, kernels_record: Optional[Dict[str, Any]] = None):
    self.config, self.workdir, self.progress = config, os.path.abspath(workdir), progress
    os.makedirs(self.workdir, exist_ok=True)
    c = config
    # The kernel backend: the given record (a sweep's members share their parent's), else this workdir's.
    self.kernels_record = kernels_record or settle_kernels(c, self.workdir)
    self.kernels = pofx_backends.kernels(self.kernels_record["name"])
    self.world = world_lib.World(world_lib.WorldConfig(seed=c.seed, **dict(c.world)))
    self.tokenizer = data_lib.Tokenizer.from_dir(c.data.tokenizer_dir) if c.data.source == "files" else None
    self.model_config = export_hf.model_config(c, self.world, self.tokenizer)
    self.model = models.make(self.model_config, kernels=self.kernels)
    self.key = jax.random.key(c.seed)

  def path(self, *parts):
    return os.path.join(self.workdir, *parts)

  def key_for(self, name: str):
    return jax.random.fold_in(self.key, zlib.crc32(name.encode()))


def _save_params(path, params):
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(path), params, force=True)  # a resume that redoes the last steps rewrites it
  ckpt.wait_until_finished()


def _load_params(path, like):
  """The orbax checkpoint at `path`, restored to the structure, shapes, dtypes and placement of
  `like` (arrays, or `jax.ShapeDtypeStruct`s with their sharding)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)


def _refuse_if_changed(run: Run, stage: str, output: str, record: provenance.Record):
  """The stage's own check of an output it is about to reuse (the program checks every stage
  before any compute, `provenance.check`; this guards the stage functions called directly)."""
  why = provenance.differences(provenance.read(run.path(output)), record)
  if why:
    raise provenance.Refused(provenance.refusal(run.workdir, [provenance.Finding(stage, output, why)]))


def stage_sft(run: Run, *, seed_offset: int = 0, name: str = "sft_params"):
  """The base policy: SFT on the world's demonstrations (stage 1). Its output carries its
  provenance record (`experiments.provenance.sft_record`); a reused output must match it."""
  c = run.config
  path = run.path(name)
  key = run.key_for(f"init{seed_offset}")
  if c.data.source == "files":
    # No controlled world: the base policy is the initial checkpoint (or a random init).
    init = run.model.init(key)
    if c.model.init_checkpoint:
      return _load_params(c.model.init_checkpoint, init)
    if seed_offset == 0:
      _say("sft: data.source='files' and model.init_checkpoint is empty: the base policy is a random init")
    return init
  record = provenance.sft_record(c, seed_offset)
  if os.path.exists(path):
    _refuse_if_changed(run, "sft", name, record)
    _say("sft: reusing %s", path)
    # The restore needs only the parameters' shapes, dtypes and placement: no initialisation is run.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), jax.eval_shape(run.model.init, key)
    )
    return _load_params(path, like)
  init = run.model.init(key)
  t = time.perf_counter()
  demos = run.world.demonstrations(c.sft.num_demos, seed=c.seed * 1000 + 1 + seed_offset)
  params = sft_lib.sft(
    init,
    demos,
    model=run.model,
    seed=c.seed * 1000 + 2 + seed_offset,
    steps=c.sft.steps,
    batch_size=c.sft.batch_size,
    learning_rate=c.sft.learning_rate,
  )
  _save_params(path, params)
  provenance.write(path, record)
  _say("sft: %d steps in %.1fs -> %s", c.sft.steps, time.perf_counter() - t, path)
  return params


def _records(data, offset=0):
  return [
    {
      "prompt": np.asarray(p, np.int32),
      "chosen": np.asarray(ch, np.int32),
      "rejected": np.asarray(rj, np.int32),
      "score_chosen": float(sc),
      "score_rejected": float(sr),
      "example_id": offset + i,
    }
    for i, (p, ch, rj, sc, sr) in enumerate(
      zip(data.prompt, data.chosen, data.rejected, data.chosen_score, data.rejected_score)
    )
  ]


def stage_data(run: Run, base_params):
  """Preference data (stage 2): TFDS array_record dataset with train and eval splits. The record
  (`experiments.provenance.data_record`) is written before the data, so a dataset interrupted
  while being written is finished under the same config or refused under another."""
  c = run.config
  data_dir = run.path("data")
  meta_path = run.path("data", "pairs_meta.json")
  record = provenance.data_record(c)
  if os.path.exists(data_dir):
    _refuse_if_changed(run, "data", "data", record)
  else:
    provenance.write(data_dir, record)
  if c.data.source == "files":
    split = lambda text: [f.strip() for f in text.split(",") if f.strip()]
    files = {"train": split(c.data.files)}
    if c.data.eval_files:
      files["eval"] = split(c.data.eval_files)
    limits = data_lib.Limits(
      max_prompt_len=c.data.max_prompt_len, max_completion_len=c.data.max_completion_len, truncation=c.data.truncation
    )
    prepared = data_lib.prepare_files(
      files,
      data_dir=data_dir,
      tokenizer=run.tokenizer,
      format=c.data.format,
      limits=limits,
      on_bad_record=c.data.on_bad_record,
      max_unknown_token_rate=c.data.max_unknown_token_rate,
    )
    for name, st in prepared.stats.items():
      _say(
        "data: %s: %d records read, %d pairs written, %d truncated, skipped %s, unknown-token rate %s",
        name,
        st.records_read,
        st.examples_written,
        st.truncated,
        dict(st.skipped) or "none",
        "n/a" if st.unknown_token_rate is None else f"{st.unknown_token_rate:.4f}",
      )
    return prepared, {"files": True}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    prepared = data_lib.Prepared(meta["path"], data_lib.stats(meta["path"]), meta["fingerprint"])
    return prepared, meta
  t = time.perf_counter()
  k = c.data.samples_per_prompt
  train_data = world_lib.preference_data(
    run.world,
    base_params,
    run.world.prompts(c.data.num_prompts, seed=c.seed * 1000 + 3),
    run.key_for("data/train"),
    model=run.model,
    num_samples=k,
  )
  n_eval_prompts = max(1, -(-c.data.num_eval_pairs // (k // 2)))
  held = world_lib.preference_data(
    run.world,
    base_params,
    run.world.prompts(n_eval_prompts, seed=c.seed * 1000 + 4, split="eval"),
    run.key_for("data/eval"),
    model=run.model,
    num_samples=k,
  )
  records = {"train": _records(train_data)}
  if c.data.get("feedback", "pairs") == "unpaired":  # KTO's unpaired feedback (pofx.data.unpaired)
    ps, cs, labels, threshold = unpaired_lib.world_feedback(
      train_data.list_prompt, train_data.list_completions, train_data.list_scores, threshold=c.data.unpaired_threshold
    )
    records["train"] = unpaired_lib.pair_records(ps, cs, labels)
    _say("data: %d unpaired examples, %.3f desirable (gold reward > %.4f)", len(ps), labels.mean(), threshold)
  records["eval"] = _records(held, offset=len(records["train"]))
  prepared = data_lib.prepare_generated(
    records,
    data_dir=data_dir,
    vocab_size=run.model_config.vocab_size,
    on_bad_record="skip",
    fingerprint=record.fingerprint,
  )
  meta = {
    "path": prepared.path,
    "fingerprint": prepared.fingerprint,
    "train_pairs": len(records["train"]),
    "eval_label_prob": [float(x) for x in held.label_prob],
    "seconds": time.perf_counter() - t,
  }
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  _say("data: %d train / %d eval pairs in %.1fs", len(records["train"]), len(records["eval"]), meta["seconds"])
  return prepared, meta


def _layout_kwargs(c, fixed: bool = False):
  """Batch layout arguments. `fixed`: one shape for every batch (micro-batches and per-device
  batches are stacked): a single bucket at the world's longest pair (files: the configured buckets)."""
  if c.data.layout == "packed":
    return {"row_length": 4 * c.data.seq_bucket, "completion_bucket": c.data.completion_bucket}
  if fixed and c.data.source == "world":
    longest_prompt, longest_completion = c.world.max_prompt_len + 2, c.world.max_completion_len  # + BOS, SEP
    rows = longest_prompt + longest_completion * (2 if c.data.layout == "prompt_shared" else 1)
    up = lambda n, b: -(-n // b) * b
    return {
      "seq_bucket": [up(rows, c.data.seq_bucket)],
      "completion_bucket": [up(longest_completion, c.data.completion_bucket)],
    }
  return {"seq_bucket": c.data.seq_bucket, "completion_bucket": c.data.completion_bucket}


def _index_kwargs(c):
  """Loader arguments of the fast paths: block-sparse attention lists and compact scored tokens."""
  return {
    "attention_block_size": c.data.attention_block_size if c.data.attention == "block_sparse" else 0,
    "scored_tokens": c.data.scored == "compact",
  }


# Tokens per segment of the world's segment scores (2D-DPO's segments; `pofx.world.World.segment_scores`).
SEGMENT_LEN = 3


def _pair_inputs_fn(run: Run, spec):
  """The loader's `pair_inputs`: the per-pair inputs a loss reads beyond log-probs and scores, made
  from each batch's examples. BMC's diff masks come from the token ids (any data source);
  Sem-DPO's embeddings (`World.embed_prompt` / `embed_completion`) and 2D-DPO's segment ids and
  scores (`World.segment_scores`) from the controlled world, whose completions are single-turn:
  DMPO's turn ids are the segment ids (each segment one turn). None when the loss reads none."""
  need = set(spec.requires) & {"diff_masks", "embeddings", "segments", "turn_ids"}
  if not need:
    return None
  world = run.world

  def fn(examples, pairs):
    b, t = np.shape(pairs.chosen_targets)
    out = {}
    if "diff_masks" in need:
      masks = {"chosen": np.zeros((b, t), np.float32), "rejected": np.zeros((b, t), np.float32)}
      for i, e in enumerate(examples):
        mc, mr = losses.bmc_modified_tokens(e["chosen"], e["rejected"])
        masks["chosen"][i, : mc.size], masks["rejected"][i, : mr.size] = mc, mr
      out.update(chosen_diff_mask=masks["chosen"], rejected_diff_mask=masks["rejected"])
    if "embeddings" in need:
      d = world.config.num_content
      prompt, chosen = np.zeros((b, d), np.float32), np.zeros((b, d), np.float32)
      for i, e in enumerate(examples):
        prompt[i], chosen[i] = world.embed_prompt(e["prompt"]), world.embed_completion(e["chosen"])
      out.update(prompt_embeddings=prompt, chosen_embeddings=chosen)
    if "segments" in need:
      s = world.num_segments(SEGMENT_LEN)
      for side in ("chosen", "rejected"):
        ids, scores = np.full((b, t), -1, np.int32), np.full((b, s, 2), 0.5, np.float32)
        for i, e in enumerate(examples):
          k, v = world.segment_scores(e["prompt"], e[side], SEGMENT_LEN)
          ids[i, : k.size], scores[i] = k, v
        out[f"{side}_segment_ids"], out[f"{side}_segment_scores"] = ids, scores
    if "turn_ids" in need:  # the world is single-turn: its segments stand in for DMPO's turns
      for side in ("chosen", "rejected"):
        ids = np.full((b, t), -1, np.int32)
        for i, e in enumerate(examples):
          k, _ = world.segment_scores(e["prompt"], e[side], SEGMENT_LEN)
          ids[i, : k.size] = k
        out[f"{side}_turn_ids"] = ids
    return out

  return fn


def stage_reference_cache(run: Run, prepared, ref_params_list, logps_fn):
  """Reference log-probs computed once over the training split (stage 3). Returns `joined`.

  With `ld_alpha` in the loss's hyperparameters (LD-DPO, TRL's `ld_alpha`), the cached sums are
  LD-weighted (`pofx.losses.ld_weighted_sums`), as TRL's `precompute_ref_log_probs` stores them;
  the losses take a reference given as sums only as already LD-weighted. The value is part of
  the cache's fingerprint. With `train.reference.cache_dir` set, the entries live in that folder
  under their fingerprints and are shared by every run that reads the same reference log-probs
  (`experiments/reference_cache.py`)."""
  c = run.config
  source = prepared.source("train")
  ld_alpha = c.train.loss_hyper.get("ld_alpha", None)
  # What else the log-probs depend on: the data (tokenised, so the tokenizer too), the model's
  # architecture and compute dtype, and LD-DPO's weighting of the sums.
  extra = {
    "data": prepared.fingerprint,
    "model": dataclasses.asdict(run.model_config),
    "dtype": c.model.dtype,
    "ld_alpha": None if ld_alpha is None else float(ld_alpha),
  }
  fps = [
    references.fingerprint(
      p,
      vocab=run.model_config.vocab_size,
      max_prompt_len=c.world.max_prompt_len + 2,
      max_completion_len=c.world.max_completion_len,
      extra=extra,
    )
    for p in ref_params_list
  ]
  joined = {"example_id": None}
  fwd = jax.jit(logps_fn)
  shared_dir = c.train.reference.cache_dir
  for k, (params, fp) in enumerate(zip(ref_params_list, fps)):
    if shared_dir:
      path = reference_cache.shared_path(shared_dir, fp)
    else:
      path = run.path("reference_cache", f"ref{k}.npz")
    entry = reference_cache.read(path, fp, shared=bool(shared_dir))
    if entry is not None:
      if shared_dir:
        _say("reference: read %s (shared cache)", path)
      joined.update(
        {"example_id": entry.example_id, f"ref{k}_chosen_logps": entry.chosen, f"ref{k}_rejected_logps": entry.rejected}
      )
      continue
    if os.path.exists(path):
      _say(
        "reference: recomputing %s: it was computed from other reference weights, data or length limits",
        path,
      )
    loader = data_lib.PreferenceLoader(
      source,
      batch_size=c.train.batch_size,
      layout=c.data.layout,
      layout_kwargs=_layout_kwargs(c),
      shuffle=False,
      num_epochs=1,
      drop_remainder=False,
      process_index=0,
      process_count=1,
      **_index_kwargs(c),
    )
    ids, ch, rj = [], [], []
    for batch in loader.iterator():
      out = fwd(params, batch)
      if ld_alpha is not None:
        out = losses.ld_weighted_sums(out, ld_alpha)
      keep = np.asarray(batch["example_id"]) >= 0
      ids.append(np.asarray(batch["example_id"])[keep])
      ch.append(np.asarray(out.chosen)[keep])
      rj.append(np.asarray(out.rejected)[keep])
    entry = reference_cache.Entry(np.concatenate(ids), np.concatenate(ch), np.concatenate(rj))
    reference_cache.write(path, entry, fp)
    if shared_dir:
      _say("reference: wrote %s (shared cache)", path)
    joined.update(
      {"example_id": entry.example_id, f"ref{k}_chosen_logps": entry.chosen, f"ref{k}_rejected_logps": entry.rejected}
    )
  if len(ref_params_list) == 1:  # the single cached reference reads the plain keys
    joined["ref_chosen_logps"] = joined.pop("ref0_chosen_logps")
    joined["ref_rejected_logps"] = joined.pop("ref0_rejected_logps")
  return joined, fps


class _Counters:
  """The training counters that survive a resume (stored in each checkpoint's metadata): non-finite
  steps, and the steps, seconds and FLOPs of the timed steps (each segment's first step, which
  compiles, is not timed) and of all steps."""

  FIELDS = ("nonfinite_steps", "timed_steps", "timed_seconds", "timed_flops", "steps", "seconds", "flops")

  def __init__(self, **values):
    self.values = {k: values.get(k, 0) for k in self.FIELDS}

  def plus(self, **more) -> _Counters:
    return _Counters(**{k: self.values[k] + more.get(k, 0) for k in self.FIELDS})

  def as_dict(self) -> Dict[str, float]:
    return dict(self.values)

  def info(self, batch_size: int) -> Dict[str, Any]:
    """The summary's counters: throughput over the timed steps, else over all steps (so one-step
    segments still give a number); no NaN."""
    v = self.values
    steps, seconds, flops = (
      (v["timed_steps"], v["timed_seconds"], v["timed_flops"])
      if v["timed_steps"] and v["timed_seconds"] > 0
      else (v["steps"], v["seconds"], v["flops"])
    )
    return {
      "pairs_per_second": batch_size * steps / seconds if seconds > 0 else 0.0,
      "flops_per_second": flops / seconds if seconds > 0 else 0.0,
      "nonfinite_steps": int(v["nonfinite_steps"]),
    }


_optimizer = optimizers.from_config  # also read by experiments/loops.py and plan.py


def micro_batches(c) -> int:
  """Micro-batches per step: `train.grad_accum_steps`, or with SAM's m-sharpness
  (`train.perturbation.m`, examples per ascent) `train.batch_size // m`: the step takes one
  ascent per micro-batch of m pairs and averages their SAM gradients (Foret et al. Sec. 4.1),
  which is how `pofx.train` accumulates gradients."""
  p = c.train.perturbation
  if p.kind == "sam" and p.m is not None:
    return c.train.batch_size // p.m
  return c.train.grad_accum_steps


def _num_examples(source) -> int:
  """One more than the largest example id of a prepared split: the rows of SAF's memory."""
  return 1 + max(int(source[i]["example_id"]) for i in range(len(source)))


def _perturbation(c, num_examples: int = 1):
  """The config's perturbation; `num_examples` (the training split's size, `_num_examples`) sizes
  SAF's memory and counts SAF's and MESA's epochs."""
  p = c.train.perturbation
  window = dict(lam=p.lam, temperature=p.temperature, start_epoch=p.start_epoch, end_epoch=p.end_epoch)
  if p.kind == "saf":
    return perturbations.saf(num_examples, minus_epochs=p.minus_epochs, **window)
  if p.kind == "mesa":
    return perturbations.mesa(num_examples, decay=p.decay, **window)
  if p.kind == "sam":  # m-sharpness is made by the micro-batches (`micro_batches`)
    return perturbations.sam(p.rho, adaptive=p.adaptive)
  if p.kind == "awp":
    return perturbations.awp(p.gamma)
  if p.kind == "rwp":
    return perturbations.rwp(p.gamma, c_min=p.c_min, steps=p.steps)
  return perturbations.none()


def lora_spec_of(c) -> Optional[lora.LoraSpec]:
  """The `pofx.lora.LoraSpec` of `config.train.lora`, or None when LoRA is off."""
  if not c.train.lora.enabled:
    return None
  targets = tuple(t.strip() for t in str(c.train.lora.targets).split(",") if t.strip())
  return lora.LoraSpec(
    rank=int(c.train.lora.rank), alpha=float(c.train.lora.alpha), targets=targets, dropout=float(c.train.lora.dropout)
  )


def dropout_masks(c) -> int:
  """The policy's dropout masks per objective evaluation (`make_train_step(dropout_samples=)`):
  `train.dropout.samples` when the run trains with dropout (the model's residual dropout,
  `train.dropout.rate > 0`, or LoRA's adapter dropout, `train.lora.dropout > 0`), else 0."""
  lora_drop = bool(c.train.lora.enabled) and float(c.train.lora.dropout) > 0
  return int(c.train.dropout.samples) if c.train.dropout.rate > 0 or lora_drop else 0


def train_record(run: Run) -> provenance.Record:
  """What this run's training depends on (`experiments.provenance.train_record`), with the
  resolved kernel backend and the guiding policy's identity."""
  c = run.config
  return provenance.train_record(c, kernels=run.kernels_record["name"], guide=provenance.guide_identity(c))


def check_training_scores(spec, hyper, prepared) -> None:
  """Before training a loss that reads scores: every pair of the training split has scores in the
  loss's documented domain (`spec.score_domain`, as `pofx.losses.check_scores`: ODPO chosen >
  rejected, MaPPO in [0, 1] with chosen >= rejected, UNA in [0, 1] or -1). ValueError otherwise,
  naming the loss, how many pairs, the first ones by example id (for files: the pairs in file and
  line order, skipped records taking no id) and the domain: the method is never trained on scores
  it is not defined for."""
  src = prepared.source("train")
  rows = [src[i] for i in range(len(src))]
  s_w = np.asarray([float(r["score_chosen"]) for r in rows], np.float64)
  s_l = np.asarray([float(r["score_rejected"]) for r in rows], np.float64)
  ok = np.asarray(spec.score_domain.valid(s_w, s_l, **dict(hyper)), bool).reshape(-1)
  if ok.all():
    return
  bad = sorted(np.flatnonzero(~ok), key=lambda i: int(rows[i]["example_id"]))
  shown = ", ".join(f"example {int(rows[i]['example_id'])}: ({s_w[i]:.6g}, {s_l[i]:.6g})" for i in bad[:3])
  raise ValueError(
    f"the training split's scores do not fit loss {spec.name!r}: {len(bad)} of {ok.size} pairs have "
    f"(score_chosen, score_rejected) outside its domain ({shown}{', ...' if len(bad) > 3 else ''}); "
    f"allowed: {spec.score_domain.text}."
  )


def _eos_kwargs(run: Run, spec, hyper) -> Dict[str, Any]:
  """`make_logps_fn`'s EOS arguments for a loss that reads per-state EOS log-probs (GDPO): the
  world's EOS id or the tokenizer's, and the loss's `gamma` as the temperature of the tempered ones
  (its default unless `train.loss_hyper` sets it). Empty for the other losses."""
  if "eos_logps" not in spec.requires:
    return {}
  eos_id = world_lib.EOS if run.config.data.source == "world" else getattr(run.tokenizer, "eos_id", None)
  if eos_id is None:  # configs/validate.py refuses this before any compute; this guards direct calls
    raise ValueError(f"loss {spec.name!r} needs the EOS token id: give data.tokenizer_dir with an eos_token.")
  return {"eos_id": int(eos_id), "eos_temperature": float(hyper.get("gamma", spec.hyperparameters["gamma"]))}


def stage_train(run: Run, prepared, base_params, *, stop_after: Optional[int] = None):
  """Preference training (stage 4). Returns (final params, train info).

  Checkpoints continue only under the train record they were written under
  (`<workdir>/train_provenance.json`); `final_params` records the step it holds, so raising
  train.steps continues a finished run, and a finished run is reused only at that step."""
  c = run.config
  spec = losses.spec(c.train.loss)
  final_path = run.path("final_params")
  record = train_record(run)
  ckpt_dir = run.path("checkpoints")
  found = provenance.findings(c, run.workdir, kernels=record.inputs["kernels"], stages=("train",))
  if found:  # before any compute (the program checked already; this guards direct calls)
    raise provenance.Refused(provenance.refusal(run.workdir, found))
  hyper = dict(c.train.loss_hyper)
  if "scores" in spec.requires:  # before the reference cache and training
    check_training_scores(spec, hyper, prepared)
  # WPO weights need log sum_v p_v^2: the canonical wpo, or a TRL loss type with use_weighting.
  lssp = "log_sum_sq_probs" in spec.requires or bool(hyper.get("use_weighting", False))
  # With dropout the policy's model has the rate; it applies only to forwards given a dropout key
  # (the policy's, from the train step), so the reference and the cache use the same function.
  model = run.model
  if c.train.dropout.rate > 0:
    model = models.make(run.model_config.replace(dropout=float(c.train.dropout.rate)), kernels=run.kernels)
  logps_fn = policy.make_logps_fn(
    model.apply,
    model.head,
    kernels=run.kernels,
    with_log_sum_sq_probs=lssp,
    logit_softcap=model.logit_softcap,
    **_eos_kwargs(run, spec, hyper),
  )
  kind = c.train.reference.kind
  joined = None
  lora_spec = lora_spec_of(c)
  if lora_spec is not None:  # the reference's own forward of base + its adapters (synced, ema): folded, no dropout
    lora_logps_fn = lambda fa, batch: logps_fn(lora.merge(fa[0], fa[1], lora_spec), batch)
  if kind == "none":
    reference = references.none()
  elif kind == "adapters_off":
    reference = references.adapters_off(logps_fn)
  elif kind in ("synced", "ema") and lora_spec is not None:
    ref = c.train.reference
    inner = (
      references.synced(ref.alpha, ref.tau, lora_logps_fn)
      if kind == "synced"
      else references.ema(ref.decay, lora_logps_fn)
    )
    reference = references.over_frozen(inner)
  elif kind == "frozen":
    reference = references.frozen(base_params, logps_fn)
  elif kind == "guiding":
    reference = references.guiding(_load_params(c.train.reference.guide_checkpoint, base_params), logps_fn)
  elif kind == "synced":
    reference = references.synced(c.train.reference.alpha, c.train.reference.tau, logps_fn)
  elif kind == "ema":
    reference = references.ema(c.train.reference.decay, logps_fn)
  elif kind == "cached":
    joined, (fp,) = _primary_first(stage_reference_cache, run, prepared, [base_params], logps_fn)
    reference = references.cached(fp, fp)
  else:  # multi: MRPO with the SFT base as primary and a second, independently trained SFT model
    second = stage_sft(run, seed_offset=17, name="sft_params_second_reference")
    joined, fps = _primary_first(stage_reference_cache, run, prepared, [base_params, second], logps_fn)
    reference = references.multi(
      [references.cached_member(k, fp, fp) for k, fp in enumerate(fps)],
      eta=c.train.reference.eta,
      alpha=c.train.reference.mrpo_alpha,
    )

  optimizer, schedule = _optimizer(c, kernels=run.kernels_record["name"])
  trajectory = c.train.perturbation.kind in ("saf", "mesa")
  perturbation = _perturbation(c, _num_examples(prepared.source("train")) if trajectory else 1)
  n_acc = micro_batches(c)
  step_kwargs = dict(
    loss=spec,
    loss_hyper=hyper,
    reference=reference,
    perturbation=perturbation,
    input_perturbation=(
      perturbations.adversarial_embeddings(c.train.input_perturbation.radius, run.model_config.hidden_size)
      if c.train.input_perturbation.kind == "embeddings"
      else None
    ),
    grad_accum_steps=n_acc,
    learning_rate_fn=schedule,
    gradient_field=bool(c.train.gradient_field),
    dropout_samples=dropout_masks(c),  # LoRA with dropout > 0: lora.apply builds the branch form
    combine=None if lora_spec is None else (lambda f, a: lora.apply(f, a, lora_spec)),
  )
  mode, n_dev, pstep = c.train.parallel.mode, 1, None
  if mode == "single":
    step_fn = train.make_train_step(logps_fn, optimizer, **step_kwargs)
  else:
    shape = config_validation.mesh_shape(c.train.parallel.mesh)
    mesh = parallel.make_mesh(*shape)
    n_dev = int(np.prod([mesh.shape[a] for a in parallel.batch_axes(mesh)]))
    rules = parallel.LLAMA_RULES if len(shape) > 2 and shape[2] > 1 else parallel.DEFAULT_RULES
    pstep = step_fn = parallel.make_train_step(logps_fn, optimizer, mode=mode, mesh=mesh, rules=rules, **step_kwargs)
    mine = parallel.process_rows(mesh, n_dev)  # the device blocks of the global batch this process feeds
  n_local = n_dev if pstep is None else len(mine)
  micro = c.train.batch_size // (n_acc * n_dev)
  loader = data_lib.PreferenceLoader(
    prepared.source("train"),
    batch_size=micro,
    layout=c.data.layout,
    layout_kwargs=_layout_kwargs(c, fixed=n_dev > 1 or n_acc > 1),
    seed=c.seed,
    shuffle=True,
    with_scores="scores" in spec.requires,
    kl_pairs="kl" in spec.requires,  # KTO: the step scores the mismatched pairs for its reference point
    pair_inputs=_pair_inputs_fn(run, spec),
    joined=joined,
    **_index_kwargs(c),
  )
  # The step donates its state: the policy starts from a copy, so `base_params` stays valid. With
  # LoRA the trained parameters are the adapters and the base is the state's frozen part.
  trained = jax.tree.map(jnp.copy, base_params)
  if lora_spec is not None:
    trained = lora.init(base_params, lora_spec, run.key_for("lora"))
  state = train.init_state(
    trained,
    optimizer,
    reference,
    perturbation,
    loss=spec,
    loss_hyper=hyper,
    rng=run.key_for("train"),
    frozen=() if lora_spec is None else base_params,
  )
  if pstep is not None:
    state = pstep.put_state(state)  # placed before a restore, so the restore keeps the shardings
  else:  # committed to the device like the step's outputs, so the step compiles once, not twice
    state = jax.device_put(state, jax.local_devices()[0])
  if not provenance.checkpoint_steps(ckpt_dir) and jax.process_index() == 0:
    provenance.write(run.path(provenance.TRAIN_RECORD), record)  # before the first checkpoint
  ckpts = checkpointing.Checkpoints(
    ckpt_dir,
    keep=c.train.keep_checkpoints,
    say=_say,
    on_written=lambda s: _fault(f"save:{s}"),
  )
  start, counters = 0, _Counters()
  restored = ckpts.restore(state)
  if restored is not None:
    state, meta = restored
    start = int(meta["step"])
    counters = _Counters(**meta.get("counters", {}))
    _say("train: resumed from step %d", start)
  final = provenance.read(final_path) if os.path.exists(final_path) else None
  if start >= c.train.steps and final is not None and final.get("step") == c.train.steps:
    if final.get("fingerprint") == record.fingerprint:
      info = {**counters.info(c.train.batch_size), "steps": start, "resumed_complete": True}
      n_used = 1 if pstep is None else int(np.prod(shape))
      info["mfu"] = metrics_lib.mfu(info["flops_per_second"], n_used) if info["flops_per_second"] else None
      if lora_spec is not None:
        return lora.merge(base_params, _load_params(final_path, trained), lora_spec), info
      return _load_params(final_path, base_params), info
  if os.path.exists(final_path):  # another step (train.steps raised) or no record: made again at the end
    _say("train: %s holds step %s; continuing to train.steps=%d", final_path, (final or {}).get("step"), c.train.steps)
    if jax.process_index() == 0:
      provenance.remove(final_path)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("pofx:final_params")

  def clean(b):  # SAF's memory is indexed by the pairs' example ids
    return {k: v for k, v in b.items() if k != "example_id" or c.train.perturbation.kind == "saf"}

  index_lists = ("attention_blocks", "scored_tokens")

  def join(parts):
    """This process's per-device loader batches -> its block of the global batch (mode "jit"):
    PairBatches joined with their flat row indices offset to the global device positions;
    per-pair arrays concatenated; block lists and scored tokens rebuilt on the joined pairs
    (one process: the config validation refuses them with several)."""
    out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0] if k not in ("pairs",) + index_lists}
    out["pairs"] = parallel.concat_pair_batches([p["pairs"] for p in parts], start=int(mine[0]))
    kw = _index_kwargs(c)
    if kw["attention_block_size"]:
      out["attention_blocks"] = batching.attention_blocks(
        out["pairs"], block_size=kw["attention_block_size"], bucket=pipeline.INDEX_BUCKET
      )
    if kw["scored_tokens"]:
      out["scored_tokens"] = batching.scored_tokens(out["pairs"], bucket=pipeline.INDEX_BUCKET)
    return out

  def place(batch):
    if pstep is None:
      return batch
    if jax.process_count() > 1:  # every process feeds only its own rows / device blocks
      return parallel.put_process_batch(batch, pstep.mesh, grad_accum_steps=n_acc if mode == "jit" else 1)
    return pstep.put_batch(batch)

  def take(it):
    # One step's pairs: n_acc x n_local consecutive loader batches of this process's shard; over the
    # processes, the same pairs as one loader batch of train.batch_size pairs in a single process.
    per = [[clean(next(it)) for _ in range(n_local)] for _ in range(n_acc)]
    if n_local * n_acc > 1:  # stacked batches: equal-length block lists and scored tokens
      flat = batching.pad_index_lists([b for row in per for b in row])
      per = [flat[i * n_local : (i + 1) * n_local] for i in range(n_acc)]
    shapes = {tuple(np.shape(x) for x in jax.tree.leaves(b)) for row in per for b in row}
    if len(shapes) != 1:
      raise ValueError(
        "micro-batches of different shapes; with grad_accum_steps > 1 or several devices every "
        "pair must fit one bucket (raise config.data.seq_bucket / completion_bucket)."
      )
    if mode in ("shard_map", "pmap"):
      devs = [
        per[0][d] if n_acc == 1 else train.stack_microbatches([per[a][d] for a in range(n_acc)]) for d in range(n_local)
      ]
      return place(parallel.stack_per_device(devs))
    micro_batches = [row[0] if pstep is None else join(row) for row in per]
    if n_acc > 1 and pstep is not None:
      micro_batches = batching.pad_index_lists(micro_batches)
    batch = micro_batches[0] if n_acc == 1 else train.stack_microbatches(micro_batches)
    return place(batch)

  primary = jax.process_index() == 0
  if primary:  # the steps after the restored checkpoint are logged again as they are redone
    metrics_lib.drop_after(run.workdir, "train", start)
  n_devices_used = 1 if pstep is None else int(np.prod(shape))
  writer = (
    metrics_lib.MetricWriter(run.workdir, "train", c.train.steps, progress=run.progress, num_devices=n_devices_used)
    if primary
    else metrics_lib.NullWriter()
  )
  # Processed FLOPs of each step (pofx.flops: policy forward and backward, LM head, reference forward).
  step_flops_of = metrics_lib.step_flops_fn(
    run.model_config,
    reference=c.train.reference.kind,
    perturbation=c.train.perturbation.kind,
    rwp_steps=getattr(c.train.perturbation, "steps", 10),
    dropout_samples=max(dropout_masks(c), 1),
    input_passes=int(c.train.input_perturbation.kind != "none"),
  )
  it = loader.iterator(start * n_acc * n_local)
  nonfinite = jnp.zeros(())  # this segment's non-finite steps (on the device: no sync per step)
  t0, seg_start, steps_timed, flops_timed, flops_all = None, time.perf_counter(), 0, 0.0, 0.0
  halt = c.train.on_nonfinite == "halt"

  def totals():
    """The run's counters so far: those restored plus this segment's."""
    return counters.plus(
      nonfinite_steps=int(_scalar(nonfinite)),
      timed_steps=steps_timed,
      timed_seconds=time.perf_counter() - t0 if t0 is not None and steps_timed else 0.0,
      timed_flops=flops_timed,
      steps=done - start,
      seconds=time.perf_counter() - seg_start,
      flops=flops_all,
    )

  end = c.train.steps if stop_after is None else min(c.train.steps, stop_after)
  for step in range(start, end):
    batch = take(it)
    step_flops = step_flops_of(batch)  # from the batch's shapes, before the step
    writer.add_flops(step_flops)
    state, m = step_fn(state, batch, jax.random.fold_in(run.key_for("train/steps"), step))
    nonfinite = nonfinite + m["nonfinite"]
    done = step + 1
    flops_all += step_flops
    if t0 is None:
      # With freed memory retained (pofx_backends.startup), the first step's freed temporaries
      # cannot serve the next step's aligned request: hand their pages back once, here.
      jax.block_until_ready((state, m))
      host_memory.release_after_first_step()
      t0 = time.perf_counter()  # the first step (compilation) is not timed
    else:
      steps_timed += 1
      flops_timed += step_flops
    if done % c.train.log_every == 0 or done == end:
      writer.write(done, _local_values(m), pairs=c.train.batch_size)
    if halt and _scalar(m["nonfinite"]) > 0:  # the step left the state unchanged; stop here
      writer.write(done, _local_values(m), pairs=c.train.batch_size)
      writer.close()
      saved = [s for s in ckpts.all_steps() if s <= step]
      ckpts.close()
      what = (
        f"the last checkpoint is step {saved[-1]} ({ckpts.step_dir(saved[-1])}), written before this step"
        if saved
        else f"no checkpoint was written (the first was due at step {c.train.checkpoint_every})"
      )
      raise FloatingPointError(
        f"train: non-finite loss or gradient at step {done}; halted there (train.on_nonfinite='halt'): {what}."
      )
    if done % c.train.checkpoint_every == 0 or done == end:
      meta = {"step": done, "data_step": done * n_acc * n_local, "counters": totals().as_dict()}
      ckpts.save(done, state, meta)
    _fault(f"step:{done}")
  jax.block_until_ready(state.params)
  writer.close()
  done = end
  info = {**totals().info(c.train.batch_size), "steps": end}
  info["mfu"] = metrics_lib.mfu(info["flops_per_second"], n_devices_used) if info["flops_per_second"] else None
  if end == c.train.steps:
    _save_params(final_path, state.params)  # every process writes its shards (LoRA: the adapters)
    if jax.process_index() == 0:
      provenance.write(final_path, record, step=end)
  ckpts.close()
  params = state.params
  if pstep is not None:
    params = parallel.to_host(params)  # evaluation runs on host copies (a collective: every process)
  if lora_spec is not None:
    if end == c.train.steps and jax.process_index() == 0:
      lora_io.save_adapters(run.path("adapters"), jax.device_get(params), lora_spec)
    params = lora.merge(base_params, params, lora_spec)  # evaluation and export use the merged model
    if end == c.train.steps and c.train.lora.export_merged:
      _save_params(run.path("merged_params"), params)
  return params, info


def stage_eval(run: Run, prepared, base_params, params, data_meta, *, base_eval=None):
  """Evaluation on held-out prompts and pairs (stage 5). Returns (results, base_eval).

  `base_eval`: what the evaluation computed of the base policy alone (its samples of the eval
  prompts, its log-probs of the eval and train pairs), from an earlier evaluation of the same
  base, prompts and pairs (a sweep's previous member); it is reused, and returned with what this
  call added."""
  c = run.config
  base_eval = dict(base_eval or {})
  if c.data.source == "files":
    out = {
      "data_skipped": {k: dict(v.skipped) for k, v in prepared.stats.items()},
      "data_pairs": {k: v.examples_written for k, v in prepared.stats.items()},
      "data_unknown_token_rate": {k: v.unknown_token_rate for k, v in prepared.stats.items()},
    }
    if "eval" in prepared.stats:
      src = prepared.source("eval")
      ex = [src[i] for i in range(len(src))]
      out.update(
        evaluation.evaluate_pairs(
          params,
          base_params,
          [e["prompt"] for e in ex],
          [e["chosen"] for e in ex],
          [e["rejected"] for e in ex],
          model=run.model,
          beta=float(c.train.loss_hyper.get("beta", 0.1)),
        )
      )
    return out, None
  prompts = run.world.prompts(c.eval.num_prompts, seed=c.seed * 1000 + 5, split="eval")
  pol = evaluation.evaluate_policy(
    run.world,
    params,
    base_params,
    prompts,
    run.key_for("eval"),
    model=run.model,
    num_samples=c.eval.samples_per_prompt,
    temperature=c.eval.temperature,
    top_k=c.eval.top_k,
    base_samples=base_eval.get("samples"),
  )
  base_eval["samples"] = pol["base_samples"]
  out = {
    "gold_reward_base": pol["base_gold_reward"],
    "gold_reward_policy": pol["gold_reward"],
    "win_rate_vs_base": pol["win_rate"],
    "win_rate_ci95": [pol["win_rate_low"], pol["win_rate_high"]],
    "kl_to_base": pol["kl"],
    "mean_length_base": pol["base_length"],
    "mean_length_policy": pol["length"],
    "gold_reward_stderr": pol["gold_reward_stderr"],
    "kl_stderr": pol["kl_stderr"],
    "finished_fraction": pol["finished_fraction"],
    "num_comparisons": pol["num_comparisons"],
  }
  if data_meta is not None and "eval_label_prob" in data_meta:
    src = prepared.source("eval")
    ex = [src[i] for i in range(len(src))]
    args = ([e["prompt"] for e in ex], [e["chosen"] for e in ex], [e["rejected"] for e in ex])
    if "eval_pairs" not in base_eval:
      base_eval["eval_pairs"] = evaluation.pair_logps(base_params, *args, model=run.model)
    pairs = evaluation.evaluate_pairs(
      params,
      base_params,
      *args,
      model=run.model,
      beta=float(c.train.loss_hyper.get("beta", 0.1)),
      pref_prob=np.asarray(data_meta["eval_label_prob"][: len(ex)], np.float32),
      betas=tuple(c.eval.idealized_betas),
      reference_logps=base_eval["eval_pairs"],
    )
    out.update(pairs)
    # The same log-ratios on training pairs (as many as held-out ones): what the loss pushed on.
    src = prepared.source("train")
    tr = [src[i] for i in range(min(len(src), len(ex)))]
    args = ([e["prompt"] for e in tr], [e["chosen"] for e in tr], [e["rejected"] for e in tr])
    if "train_pairs" not in base_eval:
      base_eval["train_pairs"] = evaluation.pair_logps(base_params, *args, model=run.model)
    on_train = evaluation.evaluate_pairs(
      params,
      base_params,
      *args,
      model=run.model,
      beta=float(c.train.loss_hyper.get("beta", 0.1)),
      reference_logps=base_eval["train_pairs"],
    )
    out.update({f"train_{k}": on_train[k] for k in TRAIN_PAIR_KEYS})
  return out, base_eval


# ------------------------------------------------------------------------------------------------


def _table(summary: Dict[str, Any]) -> str:
  rows = []
  for k in SUMMARY_KEYS + ("ranking_accuracy_mean", "idealized_ranking_accuracy", "nonfinite_steps", "seconds_total"):
    if k in summary:
      v = summary[k]
      v = (
        "[" + ", ".join(f"{x:.3f}" for x in v) + "]"
        if isinstance(v, list)
        else (f"{v:.4f}" if isinstance(v, float) else str(v))
      )
      rows.append((k, v))
  for split, rate in sorted(summary.get("data_unknown_token_rate", {}).items()):
    rows.append((f"unknown_token_rate[{split}]", "n/a" if rate is None else f"{rate:.4f}"))
  w = max(len(k) for k, _ in rows)
  line = "+" + "-" * (w + 2) + "+" + "-" * 24 + "+"
  return "\n".join([line] + [f"| {k.ljust(w)} | {v.rjust(22)} |" for k, v in rows] + [line])


def preflight(
  config, workdir: str, *, kernels: Optional[str], overwrite: bool, stages=provenance.STAGES, guide="on disk"
):
  """Before any compute: `provenance.check` for every process (each reads the records; process 0
  removes what --overwrite replaces). `guide`: see `provenance.findings`."""
  workdir = os.path.abspath(workdir)
  found = provenance.findings(config, workdir, kernels=kernels, stages=stages, guide=guide)
  if found and not overwrite:
    raise provenance.Refused(provenance.refusal(workdir, found))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("pofx:provenance-read")
  if found and jax.process_index() == 0:
    provenance.check(config, workdir, kernels=kernels, overwrite=True, say=_say, stages=stages, guide=guide)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("pofx:provenance-removed")


def _summary_provenance(run: Run, config) -> Dict[str, Any]:
  """The records of the stages behind a summary (sft or base, data, train, eval)."""
  train_rec = train_record(run)
  base = provenance.sft_record(config) if config.data.source == "world" else provenance.base_record(config)
  return {
    r.stage: r.to_json()
    for r in (base, provenance.data_record(config), train_rec, provenance.eval_record(config, train_rec.fingerprint))
  }


def run_one(config, workdir: str, *, progress=True, stop_after=None, shared=None, startup=None, overwrite=False):
  """Stages 1-5 for one config; `shared` = (run, base_params, prepared, data_meta, base_eval)
  from a sweep (`base_eval`: `stage_eval`'s computations of the base, reused by the next member); `startup`: what `pofx_backends.startup()` did (recorded in the summary).

  Before any compute, the workdir's stages are checked against this config
  (`experiments.provenance`): a changed SFT, data or training stage is refused
  (`provenance.Refused`) or, with `overwrite`, removed and recomputed; a summary of another
  evaluation config is recomputed."""
  t = time.perf_counter()
  if shared is None:
    preflight(config, workdir, kernels=planned_kernels(config, workdir), overwrite=overwrite)
    run = Run(config, workdir, progress=progress)
    base = stage_sft(run)  # every process (orbax saves and restores are collective)
    prepared, data_meta = _primary_first(stage_data, run, base)
    base_eval = None
  else:
    parent, base, prepared, data_meta, base_eval = shared
    preflight(config, workdir, kernels=parent.kernels_record["name"], overwrite=overwrite, stages=("train",))
    run = Run(config, workdir, progress=progress, kernels_record=parent.kernels_record)
    run.model, run.model_config, run.world = parent.model, parent.model_config, parent.world
    # The SFT base and the data are shared; reference caches are shared through their files.
    if config.train.reference.kind in ("cached", "multi"):
      os.makedirs(run.path(), exist_ok=True)
      for name in ("reference_cache", "sft_params_second_reference"):
        src = parent.path(name)
        if os.path.exists(src) and not os.path.exists(run.path(name)):
          os.symlink(src, run.path(name))
  params, info = stage_train(run, prepared, base, stop_after=stop_after)
  if stop_after is not None and info.get("steps", 0) < config.train.steps:
    return None, None
  if jax.process_index() != 0:
    return None, None  # process 0 evaluates and writes the summary
  summary_path = run.path("summary.json")
  records = _summary_provenance(run, config)
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      old = json.load(f)
    eval_rec = provenance.Record("eval", records["eval"]["fields"], records["eval"]["inputs"])
    why = provenance.differences(old.get("provenance", {}).get("eval"), eval_rec)
    if not why and info.get("resumed_complete"):
      _say("eval: reusing %s (computed under this config)", summary_path)
      return old, None
    _say("eval: recomputing %s: %s", summary_path, "; ".join(why) or "training continued")
  _fault("eval")
  results, base_eval = stage_eval(run, prepared, base, params, data_meta, base_eval=base_eval)
  summary = {
    **results,
    "pairs_per_second": info.get("pairs_per_second", float("nan")),
    "flops_per_second": info.get("flops_per_second", float("nan")),
    "mfu": info.get("mfu"),
    "nonfinite_steps": info.get("nonfinite_steps", 0),
    "loss": config.train.loss,
    "loss_hyper": dict(config.train.loss_hyper),
    "reference": config.train.reference.kind,
    "perturbation": config.train.perturbation.kind,
    "seed": config.seed,
    "kernels": run.kernels_record["name"],
    "kernels_record": run.kernels_record,
    **({"startup": startup} if startup is not None else {}),
    "seconds_total": time.perf_counter() - t,
    "config": config.to_dict(),
    "config_fingerprint": fingerprints.of_values(config.to_dict()),
    "provenance": records,
  }
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  recs = metrics_lib.read_jsonl(run.path("metrics.jsonl")) if os.path.exists(run.path("metrics.jsonl")) else []
  if recs and (shared is None or config.get("sweep_member_charts", True)):
    plots.training_curves(recs, run.path("training_curves.png"))
  if "kl_to_base" in summary and shared is None:  # a sweep member's point is on the sweep's chart
    plots.reward_vs_kl(
      [{"label": f"{config.train.loss}", "kl": summary["kl_to_base"], "gold_reward": summary["gold_reward_policy"]}],
      run.path("reward_vs_kl.png"),
      base_reward=summary["gold_reward_base"],
    )
  return summary, (run, base, prepared, data_meta, base_eval)


def _sweep_members(config, workdir: str):
  """(item, member config) of every sweep member: the config with the member's overrides (each
  is validated when it runs: a member may read an earlier member's output). In an override value,
  `{workdir}` is the sweep's workdir, and a value that is exactly `{config.<dotted.field>}` is that
  field's value in the sweep's config (after command-line overrides), e.g. Pre-DPO's round-2 beta
  `{config.predpo.round2_beta}`."""
  out = []
  for item in config.sweep:
    member = copy.deepcopy(config)
    with member.unlocked():
      member.sweep = ()
      for k, v in dict(item["overrides"]).items():
        ref = config_validation.FIELD_VALUE.match(v) if isinstance(v, str) else None
        if ref:
          v = config_validation.field_value(config, ref.group(1))
        elif isinstance(v, str) and "{workdir}" in v:
          v = v.replace("{workdir}", os.path.abspath(workdir))
        _set(member, k, v)
    out.append((item, member))
  return out


def _sweep_title(members) -> str:
  """The chart's subject: the loss every member trains, or how many losses the members train."""
  losses = sorted({m.train.loss for _, m in members})
  return f"{losses[0]} sweep" if len(losses) == 1 else f"{len(losses)} losses"


def run_sweep(config, workdir: str, *, progress=True, startup=None, overwrite=False):
  """The shared stages once, then each sweep member; one reward-vs-KL chart of all members.
  Every member's workdir is checked (`preflight`) before the shared stages compute."""
  members = _sweep_members(config, workdir)
  for _, m in members:  # every member's loss and its values, before the shared stages compute
    config_validation.check_loss(m)
  kernels = planned_kernels(config, workdir)
  checks = [(config, os.path.abspath(workdir), ("sft", "data"), "on disk")]
  finals = {}  # a member's final_params -> the identity this run gives it (a later round's guide)
  for item, m in members:
    wd = os.path.abspath(os.path.join(workdir, "sweep", item["label"]))
    guide = "on disk"
    if m.train.reference.kind == "guiding" and kernels is not None:
      guide = finals.get(os.path.abspath(m.train.reference.guide_checkpoint), "on disk")
    checks.append((m, wd, ("train",), guide))
    if kernels is not None:
      finals[os.path.join(wd, "final_params")] = provenance.final_identity(
        m, kernels, None if guide == "on disk" else guide
      )
  found = [(wd, provenance.findings(c, wd, kernels=kernels, stages=st, guide=g)) for c, wd, st, g in checks]
  found = [(wd, f) for wd, f in found if f]
  if found and not overwrite:  # every member that differs, in one line
    raise provenance.Refused(provenance.refusal(*found[0], *found[1:]))
  for c, wd, st, g in checks:
    preflight(c, wd, kernels=kernels, overwrite=overwrite, stages=st, guide=g)
  run = Run(config, workdir, progress=progress)
  base = stage_sft(run)
  prepared, data_meta = stage_data(run, base)
  shared = (run, base, prepared, data_meta, None)
  points, summaries = [], {}
  for item, member in members:
    config_validation.validate(member, process_count=jax.process_count())  # Pre-DPO: after round 1
    s, info = run_one(
      member,
      os.path.join(workdir, "sweep", item["label"]),
      progress=progress,
      shared=shared,
      startup=startup,
      overwrite=overwrite,
    )
    if info is not None:
      shared = (run, base, prepared, data_meta, info[4])
    summaries[item["label"]] = s
    points.append(
      {
        "label": item.get("group", item["label"]),
        "kl": s["kl_to_base"],
        "gold_reward": s["gold_reward_policy"],
        **({"beta": item["beta"]} if "beta" in item else {}),
      }
    )
  chart = plots.reward_vs_kl(
    points,
    os.path.join(workdir, "reward_vs_kl.png"),
    base_reward=next(iter(summaries.values()))["gold_reward_base"],
    title=f"gold reward vs KL: {_sweep_title(members)}",
  )
  with open(os.path.join(workdir, "sweep_summary.json"), "w") as f:
    json.dump(summaries, f, indent=1)
  return summaries, chart


# ------------------------------------------------------------------------------------------------
# The command line


def _fail(message: str):
  """Ends the program with one line on stderr and exit status 2 (a usage error, no traceback)."""
  print(f"experiments.main: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$")


def _config_flag_error(argv, error: Exception) -> str:
  """One line for a `--config` / `--config.<key>` flag that failed to parse: the misspelt key and
  the nearest existing dotted path, or the key, its value and the type it takes."""
  spec = next((a.split("=", 1)[1] for a in argv if re.match(r"^--?config=", a)), None)
  try:
    config = flags.FLAGS["config"].parser.parse(spec) if spec else None
  except Exception as e:  # the config file or its arg is itself the error: its innermost cause
    while e.__cause__ is not None or e.__context__ is not None:
      e = e.__cause__ or e.__context__
    return f"--config={spec}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if m and config is not None:
      key = m.group(1)
      if not config_validation.has_field(config, key):
        return f"--{arg.lstrip('-')}: {config_validation.unknown_field_message(config, key)}"
      if str(m.group(2)) in str(error) or key in str(error):
        *parents, last = key.split(".")
        node = config
        for part in parents:
          node = node[part]
        kind = getattr(node.get_type(last), "__name__", str(node.get_type(last)))
        return f"--config.{key}={m.group(2)}: config.{key} takes {kind} (default {node[last]!r})."
  return str(error).splitlines()[0] if str(error) else type(error).__name__


def parse_flags(argv):
  """absl's flag parsing; a bad `--config...` flag ends the program with one line, no traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_config_flag_error(argv, e) if any(re.match(r"^--?(no)?config[.=]", a) for a in argv) else str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections on a --config.<key> override
    _fail(_config_flag_error(argv, e))


def _startup(config) -> Dict[str, Any]:
  """`pofx_backends.startup()`; for the image domain with glibc's per-thread arenas kept
  (`single_arena=False`): with one arena its many small steps ran 25-35% slower on two cores
  (docs/diffusion.md)."""
  return pofx_backends.startup(single_arena=config is None or config.get("domain", "text") != "image")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  started = _startup(config)  # first: process-wide, before JAX's backend starts its threads
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required.")
  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  distributed.initialize()  # the local launcher's variables, a cluster (SLURM, TPU pod slice, ...), or one process
  try:
    config_validation.validate(config, process_count=jax.process_count(), device_count=jax.device_count())
  except ValueError as e:  # before any compute: one line
    _fail(str(e))
  _say("start-up: %s", started["detail"])
  workdir = _WORKDIR.value
  lock = None
  try:  # before any compute: a writable workdir, used by this run only
    workdir_lib.check_writable(workdir)
    if jax.process_index() == 0:
      lock = workdir_lib.Lock(workdir, say=lambda m: _say("%s", m)).acquire()
  except workdir_lib.WorkdirError as e:
    _fail(str(e))
  try:
    _run(config, workdir, started)
  except provenance.Refused as e:  # a workdir of another config: one line, nothing computed
    _fail(str(e))
  except data_lib.DataError as e:  # bad input data (file and line, or split): one line, exit 2
    _fail(str(e))
  except (FloatingPointError, ValueError, OSError) as e:  # a clean end: one line, no shutdown noise
    if lock is not None:
      lock.release()
    print(f"experiments.main: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # skips the atexit handlers of orbax's and absl's threads (their output is the noise)
  finally:  # also on Ctrl-C and unexpected errors (those keep their traceback)
    if lock is not None:
      lock.release()


def _run(config, workdir, started):
  if config.get("domain", "text") == "image":  # the image world's diffusion pipeline
    diffusion.main(config, workdir, progress=_PROGRESS.value, overwrite=_OVERWRITE.value)
    return
  stage = config.get("stage", "policy")  # another stage than policy training: its own module
  if stage != "policy":
    from experiments import curriculum, reward_model  # pylint: disable=g-import-not-at-top

    module = {"reward_model": reward_model, "curriculum": curriculum}[stage]
    summary = module.run(
      config, workdir, lib=sys.modules[__name__], progress=_PROGRESS.value, startup=started, overwrite=_OVERWRITE.value
    )
    print(module.table(summary))
    print(f"summary: {os.path.join(os.path.abspath(workdir), 'summary.json')}")
    return
  if config.loop.kind != "offline":  # iterative, online and RLHF loops (issue 19): experiments/loops.py
    from experiments import loops  # pylint: disable=g-import-not-at-top

    summary = loops.run(
      sys.modules[__name__], config, workdir, progress=_PROGRESS.value, startup=started, overwrite=_OVERWRITE.value
    )
    print(_table(summary))
    print(f"summary: {os.path.join(os.path.abspath(workdir), 'summary.json')}")
    return
  if config.sweep:
    summaries, chart = run_sweep(config, workdir, progress=_PROGRESS.value, startup=started, overwrite=_OVERWRITE.value)
    for label, s in summaries.items():
      print(f"\n{label}\n{_table(s)}")
    print(f"\nchart: {chart}")
    return
  summary, _ = run_one(
    config,
    workdir,
    progress=_PROGRESS.value,
    stop_after=_MAX_TRAIN_STEPS.value,
    startup=started,
    overwrite=_OVERWRITE.value,
  )
  if jax.process_index() != 0:
    return
  if summary is None:
    print(f"stopped after step {_MAX_TRAIN_STEPS.value}; run again to continue.")
    return
  print(_table(summary))
  print(f"summary: {os.path.join(os.path.abspath(workdir), 'summary.json')}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
