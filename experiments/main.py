"""The pofx training program: one config, five resumable stages.

    python -m experiments.main --config=configs/dpo.py[:arg] --workdir=/tmp/run [--config.a.b=value ...]

Stages (each skipped when its output in the workdir is complete, so a killed run resumes):
  1. sft        the supervised base policy on the controlled world's demonstrations (world data)
  2. data       preference pairs sampled from the base and labelled by Bradley-Terry on the gold
                reward (or the user's JSONL/Parquet files), stored as an array_record TFDS dataset
  3. reference  the reference log-probs cached once per dataset (cached / multi references)
  4. train      preference training with orbax checkpoints every N steps (exact resume)
  5. eval       gold reward, win rate vs base (95% CI), KL to base, lengths, reward / ranking
                accuracy; summary.json, a console table, PNG plots

A config's `sweep` runs several trainings after one shared SFT + data stage (the GPO chart, the
two rounds of Pre-DPO), each in `<workdir>/sweep/<label>`.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Any, Dict, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<family>.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, data, metrics, plots and the summary.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a live progress bar.")
_MAX_TRAIN_STEPS = flags.DEFINE_integer("stop_after_steps", None,
                                        "Stop training after this step (testing resume); the next run continues.")

SUMMARY_KEYS = ("gold_reward_base", "gold_reward_policy", "win_rate_vs_base", "win_rate_ci95", "kl_to_base",
                "reward_accuracy", "ranking_accuracy", "mean_length_base", "mean_length_policy", "pairs_per_second")


def _set(config, dotted: str, value):
  node = config
  *parents, last = dotted.split(".")
  for p in parents:
    node = node[p]
  node[last] = value


def _say(msg, *args):
  """Stage progress on stderr (absl logging is quieted: orbax logs every file it writes)."""
  print("[pofx] " + (msg % args if args else msg), file=sys.stderr, flush=True)


def _scalar(x) -> float:
  """A replicated (possibly multi-process) scalar as a float, without a collective."""
  if hasattr(x, "is_fully_addressable") and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return float(_np().asarray(x))


def _local_values(metrics):
  return {k: _scalar(v) for k, v in metrics.items()}


def _primary_first(fn, *args, **kwargs):
  """Runs a stage that writes its output to the workdir without collectives (the TFDS dataset, the
  reference cache): in a multi-process run, process 0 runs it first, then (after a barrier) the
  others run it and find the output there (they load it). Orbax stages run on every process."""
  import jax
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  from jax.experimental import multihost_utils
  out = fn(*args, **kwargs) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"pofx:{fn.__name__}")
  return out if jax.process_index() == 0 else fn(*args, **kwargs)


def _np():
  import numpy as np
  return np


# ------------------------------------------------------------------------------------------------
# Stage helpers


class Run:
  """Everything the stages share: the config, the world, the model and the workdir."""

  def __init__(self, config, workdir: str, *, progress: bool = True):
    import jax
    from pofx import models
    from pofx import world as world_lib

    self.config, self.workdir, self.progress = config, os.path.abspath(workdir), progress
    os.makedirs(self.workdir, exist_ok=True)
    c = config
    self.world = world_lib.World(world_lib.WorldConfig(seed=c.seed, **dict(c.world)))
    self.tokenizer = None
    vocab = self.world.config.vocab_size
    if c.data.source == "files":
      from pofx import data as data_lib
      self.tokenizer = data_lib.Tokenizer.from_dir(c.data.tokenizer_dir)
      vocab = self.tokenizer.vocab_size
    if c.model.preset == "world":
      self.model_config = self.world.model_config(dtype=c.model.dtype, remat=c.model.remat, vocab_size=vocab,
                                                  matmul=c.model.matmul, blas=c.model.blas)
    else:
      self.model_config = models.preset(c.model.preset, dtype=c.model.dtype, remat=c.model.remat, vocab_size=vocab,
                                        matmul=c.model.matmul, blas=c.model.blas)
    self.model = models.make(self.model_config)
    self.key = jax.random.key(c.seed)

  def path(self, *parts):
    return os.path.join(self.workdir, *parts)

  def key_for(self, name: str):
    import zlib
    import jax
    return jax.random.fold_in(self.key, zlib.crc32(name.encode()))


def _save_params(path, params):
  import orbax.checkpoint as ocp
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(path), params)
  ckpt.wait_until_finished()


def _load_params(path, like):
  import jax
  import orbax.checkpoint as ocp
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)


def stage_sft(run: Run, *, seed_offset: int = 0, name: str = "sft_params"):
  """The base policy: SFT on the world's demonstrations (stage 1)."""
  from pofx import world as world_lib
  c = run.config
  path = run.path(name)
  init = run.model.init(run.key_for(f"init{seed_offset}"))
  if c.data.source == "files":
    # No controlled world: the base policy is the initial checkpoint (or a random init).
    if c.model.init_checkpoint:
      return _load_params(c.model.init_checkpoint, init)
    if seed_offset == 0:
      _say("sft: data.source='files' and model.init_checkpoint is empty: the base policy is a random init")
    return init
  if os.path.exists(path):
    _say("sft: reusing %s", path)
    return _load_params(path, init)
  t = time.perf_counter()
  demos = run.world.demonstrations(c.sft.num_demos, seed=c.seed * 1000 + 1 + seed_offset)
  params = world_lib.sft(init, demos, config=run.model_config, seed=c.seed * 1000 + 2 + seed_offset,
                         steps=c.sft.steps, batch_size=c.sft.batch_size, learning_rate=c.sft.learning_rate)
  _save_params(path, params)
  _say("sft: %d steps in %.1fs -> %s", c.sft.steps, time.perf_counter() - t, path)
  return params


def _records(data, offset=0):
  np = _np()
  return [{"prompt": np.asarray(p, np.int32), "chosen": np.asarray(ch, np.int32), "rejected": np.asarray(rj, np.int32),
           "score_chosen": float(sc), "score_rejected": float(sr), "example_id": offset + i}
          for i, (p, ch, rj, sc, sr) in enumerate(zip(data.prompt, data.chosen, data.rejected, data.chosen_score,
                                                      data.rejected_score))]


def stage_data(run: Run, base_params):
  """Preference data (stage 2): TFDS array_record dataset with train and eval splits."""
  from pofx import data as data_lib
  from pofx import world as world_lib
  c = run.config
  data_dir = run.path("data")
  meta_path = run.path("data", "pairs_meta.json")
  if c.data.source == "files":
    split = lambda text: [f.strip() for f in text.split(",") if f.strip()]
    files = {"train": split(c.data.files)}
    if c.data.eval_files:
      files["eval"] = split(c.data.eval_files)
    limits = data_lib.Limits(max_prompt_len=c.data.max_prompt_len or None,
                             max_completion_len=c.data.max_completion_len or None, truncation=c.data.truncation)
    prepared = data_lib.prepare_files(files, data_dir=data_dir, tokenizer=run.tokenizer, format=c.data.format,
                                      limits=limits, on_bad_record=c.data.on_bad_record)
    for name, st in prepared.stats.items():
      _say("data: %s: %d records read, %d pairs written, %d truncated, skipped %s", name, st.records_read,
           st.examples_written, st.truncated, dict(st.skipped) or "none")
    return prepared, {"files": True}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    prepared = data_lib.Prepared(meta["path"], data_lib.stats(meta["path"]), meta["fingerprint"])
    return prepared, meta
  t = time.perf_counter()
  k = c.data.samples_per_prompt
  train = world_lib.preference_data(run.world, base_params, run.world.prompts(c.data.num_prompts, seed=c.seed * 1000 + 3),
                                    run.key_for("data/train"), config=run.model_config, num_samples=k)
  n_eval_prompts = max(1, -(-c.data.num_eval_pairs // (k // 2)))
  held = world_lib.preference_data(run.world, base_params,
                                   run.world.prompts(n_eval_prompts, seed=c.seed * 1000 + 4, split="eval"),
                                   run.key_for("data/eval"), config=run.model_config, num_samples=k)
  records = {"train": _records(train), "eval": _records(held, offset=len(train.prompt))}
  prepared = data_lib.prepare_generated(records, data_dir=data_dir, vocab_size=run.model_config.vocab_size,
                                        on_bad_record="skip",
                                        fingerprint=f"world-seed{c.seed}-{json.dumps(c.world.to_dict(), sort_keys=True)}"
                                                    f"-{c.data.num_prompts}x{k}-sft{c.sft.steps}")
  meta = {"path": prepared.path, "fingerprint": prepared.fingerprint, "train_pairs": len(records["train"]),
          "eval_label_prob": [float(x) for x in held.label_prob], "seconds": time.perf_counter() - t}
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
    return {"seq_bucket": [up(rows, c.data.seq_bucket)],
            "completion_bucket": [up(longest_completion, c.data.completion_bucket)]}
  return {"seq_bucket": c.data.seq_bucket, "completion_bucket": c.data.completion_bucket}




def _index_kwargs(c):
  """Loader arguments of the fast paths: block-sparse attention lists and compact scored tokens."""
  return {"attention_block_size": c.data.attention_block_size if c.data.attention == "block_sparse" else 0,
          "scored_tokens": c.data.scored == "compact", "attention_kernel": c.data.attention_kernel}


def stage_reference_cache(run: Run, prepared, ref_params_list, logps_fn):
  """Reference log-probs computed once over the training split (stage 3). Returns `joined`."""
  import jax
  from pofx import data as data_lib
  from pofx import references
  np = _np()
  c = run.config
  source = prepared.source("train")
  fps = [references.fingerprint(p, vocab=run.model_config.vocab_size, max_prompt_len=c.world.max_prompt_len + 2,
                                max_completion_len=c.world.max_completion_len, extra=prepared.fingerprint)
         for p in ref_params_list]
  joined = {"example_id": None}
  fwd = jax.jit(logps_fn)
  for k, (params, fp) in enumerate(zip(ref_params_list, fps)):
    path = run.path("reference_cache", f"ref{k}.npz")
    if os.path.exists(path):
      z = np.load(path)
      if str(z["fingerprint"]) == fp:
        ids, ch, rj = z["example_id"], z["chosen"], z["rejected"]
        joined.update({"example_id": ids, f"ref{k}_chosen_logps": ch, f"ref{k}_rejected_logps": rj})
        continue
      _say("reference cache %s is stale (fingerprint differs): recomputing", path)
    loader = data_lib.PreferenceLoader(source, batch_size=c.train.batch_size, layout=c.data.layout,
                                       layout_kwargs=_layout_kwargs(c), shuffle=False, num_epochs=1,
                                       drop_remainder=False, process_index=0, process_count=1, **_index_kwargs(c))
    ids, ch, rj = [], [], []
    for batch in loader.iterator():
      out = fwd(params, batch)
      keep = np.asarray(batch["example_id"]) >= 0
      ids.append(np.asarray(batch["example_id"])[keep])
      ch.append(np.asarray(out.chosen)[keep])
      rj.append(np.asarray(out.rejected)[keep])
    ids, ch, rj = np.concatenate(ids), np.concatenate(ch), np.concatenate(rj)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, example_id=ids, chosen=ch, rejected=rj, fingerprint=np.asarray(fp))
    joined.update({"example_id": ids, f"ref{k}_chosen_logps": ch, f"ref{k}_rejected_logps": rj})
  if len(ref_params_list) == 1:  # the single cached reference reads the plain keys
    joined["ref_chosen_logps"] = joined.pop("ref0_chosen_logps")
    joined["ref_rejected_logps"] = joined.pop("ref0_rejected_logps")
  return joined, fps


def _optimizer(c):
  import optax
  o = c.train.optimizer
  schedule = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
                                   optax.constant_schedule(o.learning_rate)], [max(o.warmup_steps, 1)])
  inner = {"adamw": lambda: optax.adamw(schedule, weight_decay=o.weight_decay),
           "adam": lambda: optax.adam(schedule), "sgd": lambda: optax.sgd(schedule)}[o.name]()
  parts = ([optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip and o.grad_clip > 0 else []) + [inner]
  return optax.chain(*parts), schedule


def _perturbation(c):
  from pofx import perturbations
  p = c.train.perturbation
  if p.kind == "sam":
    return perturbations.sam(p.rho, adaptive=p.adaptive)
  if p.kind == "awp":
    return perturbations.awp(p.gamma)
  if p.kind == "rwp":
    return perturbations.rwp(p.gamma, c_min=p.c_min, steps=p.steps)
  return perturbations.none()


def stage_train(run: Run, prepared, base_params, *, stop_after: Optional[int] = None):
  """Preference training (stage 4). Returns (final params, train info)."""
  import jax
  import jax.numpy as jnp
  from configs import common
  from pofx import data as data_lib
  from pofx import losses, policy, references, train
  from experiments import checkpointing, metrics as metrics_lib
  np = _np()
  c = run.config
  spec = losses.spec(c.train.loss)
  final_path = run.path("final_params")
  logps_fn = policy.make_logps_fn(run.model.apply, run.model.head, matmul=c.model.matmul, blas=c.model.blas,
                                  with_log_sum_sq_probs="log_sum_sq_probs" in spec.requires)
  kind = c.train.reference.kind
  joined = None
  if kind == "none":
    reference = references.none()
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
    reference = references.multi([references.cached_member(k, fp, fp) for k, fp in enumerate(fps)],
                                 eta=c.train.reference.eta, alpha=c.train.reference.mrpo_alpha)

  optimizer, schedule = _optimizer(c)
  perturbation = _perturbation(c)
  hyper = dict(c.train.loss_hyper)
  n_acc = c.train.grad_accum_steps
  step_kwargs = dict(loss=spec, loss_hyper=hyper, reference=reference, perturbation=perturbation,
                     grad_accum_steps=n_acc, learning_rate_fn=schedule)
  mode, n_dev, pstep = c.train.parallel.mode, 1, None
  if mode == "single":
    step_fn = train.make_train_step(logps_fn, optimizer, **step_kwargs)
  else:
    from pofx import parallel
    if jax.process_count() > 1 and mode == "pmap":
      raise ValueError("config.train.parallel.mode='pmap' runs in one process; with several processes use 'jit' "
                       "or 'shard_map'.")
    shape = common.mesh_shape(c.train.parallel.mesh)
    mesh = parallel.make_mesh(*shape)
    n_dev = int(np.prod([mesh.shape[a] for a in parallel.batch_axes(mesh)]))
    rules = parallel.LLAMA_RULES if len(shape) > 2 and shape[2] > 1 else parallel.DEFAULT_RULES
    pstep = step_fn = parallel.make_train_step(logps_fn, optimizer, mode=mode, mesh=mesh, rules=rules, **step_kwargs)
    mine = parallel.process_rows(mesh, n_dev)  # the device blocks of the global batch this process feeds
  n_local = n_dev if pstep is None else len(mine)
  if c.train.batch_size % (n_acc * n_dev):
    raise ValueError(f"config.train.batch_size={c.train.batch_size} must be a multiple of grad_accum_steps x "
                     f"data-parallel devices = {n_acc * n_dev}.")
  micro = c.train.batch_size // (n_acc * n_dev)
  loader = data_lib.PreferenceLoader(prepared.source("train"), batch_size=micro, layout=c.data.layout,
                                     layout_kwargs=_layout_kwargs(c, fixed=n_dev > 1 or n_acc > 1), seed=c.seed,
                                     shuffle=True, with_scores="scores" in spec.requires, joined=joined,
                                     **_index_kwargs(c))
  # The step donates its state: the policy starts from a copy, so `base_params` stays valid.
  state = train.init_state(jax.tree.map(jnp.copy, base_params), optimizer, reference, perturbation, loss=spec,
                           loss_hyper=hyper, rng=run.key_for("train"))
  if pstep is not None:
    state = pstep.put_state(state)  # placed before a restore, so the restore keeps the shardings
  ckpts = checkpointing.Checkpoints(run.path("checkpoints"), keep=c.train.keep_checkpoints)
  start = 0
  if ckpts.latest_step() is not None:
    state, meta = ckpts.restore(state)
    start = int(meta["step"])
    _say("train: resumed from step %d", start)
  if start >= c.train.steps and os.path.exists(final_path):
    return _load_params(final_path, base_params), {"resumed_complete": True}

  def clean(b):
    return {k: v for k, v in b.items() if k != "example_id"}

  index_lists = ("attention_blocks", "scored_tokens")

  def join(parts):
    """This process's per-device loader batches -> its block of the global batch (mode "jit"):
    PairBatches joined with their flat row indices offset to the global device positions;
    per-pair arrays concatenated; block lists and scored tokens rebuilt on the joined pairs
    (one process: `main` refuses them with several)."""
    from pofx import batching, parallel
    from pofx.data import pipeline
    out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0] if k not in ("pairs",) + index_lists}
    out["pairs"] = parallel.concat_pair_batches([p["pairs"] for p in parts], start=int(mine[0]))
    kw = _index_kwargs(c)
    if kw["attention_block_size"]:
      out["attention_blocks"] = batching.attention_blocks(out["pairs"], block_size=kw["attention_block_size"],
                                                          bucket=pipeline.INDEX_BUCKET, kernel=kw["attention_kernel"])
    if kw["scored_tokens"]:
      out["scored_tokens"] = batching.scored_tokens(out["pairs"], bucket=pipeline.INDEX_BUCKET)
    return out

  def place(batch):
    from pofx import parallel
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
      from pofx import batching
      flat = batching.pad_index_lists([b for row in per for b in row])
      per = [flat[i * n_local:(i + 1) * n_local] for i in range(n_acc)]
    shapes = {tuple(np.shape(x) for x in jax.tree.leaves(b)) for row in per for b in row}
    if len(shapes) != 1:
      raise ValueError("micro-batches of different shapes; with grad_accum_steps > 1 or several devices every "
                       "pair must fit one bucket (raise config.data.seq_bucket / completion_bucket).")
    if mode in ("shard_map", "pmap"):
      devs = [per[0][d] if n_acc == 1 else train.stack_microbatches([per[a][d] for a in range(n_acc)])
              for d in range(n_local)]
      from pofx import parallel
      return place(parallel.stack_per_device(devs))
    micro_batches = [row[0] if pstep is None else join(row) for row in per]
    if n_acc > 1 and pstep is not None:
      from pofx import batching
      micro_batches = batching.pad_index_lists(micro_batches)
    batch = micro_batches[0] if n_acc == 1 else train.stack_microbatches(micro_batches)
    return place(batch)

  primary = jax.process_index() == 0
  writer = (metrics_lib.MetricWriter(run.workdir, "train", c.train.steps, progress=run.progress) if primary
            else metrics_lib.NullWriter())
  it = loader.iterator(start * n_acc * n_local)
  nonfinite = jnp.zeros(())
  t0, steps_timed = None, 0
  end = c.train.steps if stop_after is None else min(c.train.steps, stop_after)
  for step in range(start, end):
    batch = take(it)
    state, m = step_fn(state, batch, jax.random.fold_in(run.key_for("train/steps"), step))
    nonfinite = nonfinite + m["nonfinite"]
    done = step + 1
    if t0 is None:
      jax.block_until_ready(m["loss"])
      t0 = time.perf_counter()  # the first step (compilation) is not timed
    else:
      steps_timed += 1
    if done % c.train.log_every == 0 or done == end:
      writer.write(done, _local_values(m), pairs=c.train.batch_size)
    if done % c.train.checkpoint_every == 0 or done == end:
      if _scalar(nonfinite) > 0 and c.train.on_nonfinite == "halt":
        writer.close()
        raise FloatingPointError(f"train: non-finite loss or gradient in {int(_scalar(nonfinite))} step(s) before step "
                                 f"{done}; halting (train.on_nonfinite='halt'). The last checkpoint is intact.")
      ckpts.save(done, state, {"step": done, "data_step": done * n_acc * n_local})
  jax.block_until_ready(state.params)
  seconds = time.perf_counter() - t0 if t0 else float("nan")
  writer.close()
  info = {"pairs_per_second": c.train.batch_size * steps_timed / seconds if steps_timed else float("nan"),
          "nonfinite_steps": int(_scalar(nonfinite)), "steps": end}
  if end == c.train.steps:
    _save_params(final_path, state.params)  # every process writes its shards
  ckpts.close()
  params = state.params
  if pstep is not None:
    from pofx import parallel
    params = parallel.to_host(params)  # evaluation runs on host copies (a collective: every process)
  return params, info


def stage_eval(run: Run, prepared, base_params, params, data_meta, *, base_samples=None):
  """Evaluation on held-out prompts and pairs (stage 5)."""
  from pofx import evaluation
  np = _np()
  c = run.config
  if c.data.source == "files":
    out = {"data_skipped": {k: dict(v.skipped) for k, v in prepared.stats.items()},
           "data_pairs": {k: v.examples_written for k, v in prepared.stats.items()}}
    if "eval" in prepared.stats:
      src = prepared.source("eval")
      ex = [src[i] for i in range(len(src))]
      out.update(evaluation.evaluate_pairs(params, base_params, [e["prompt"] for e in ex], [e["chosen"] for e in ex],
                                           [e["rejected"] for e in ex], config=run.model_config,
                                           beta=float(c.train.loss_hyper.get("beta", 0.1))))
    return out, None
  prompts = run.world.prompts(c.eval.num_prompts, seed=c.seed * 1000 + 5, split="eval")
  pol = evaluation.evaluate_policy(run.world, params, base_params, prompts, run.key_for("eval"),
                                   config=run.model_config, num_samples=c.eval.samples_per_prompt,
                                   temperature=c.eval.temperature, top_k=c.eval.top_k, base_samples=base_samples)
  out = {
      "gold_reward_base": pol["base_gold_reward"], "gold_reward_policy": pol["gold_reward"],
      "win_rate_vs_base": pol["win_rate"], "win_rate_ci95": [pol["win_rate_low"], pol["win_rate_high"]],
      "kl_to_base": pol["kl"], "mean_length_base": pol["base_length"], "mean_length_policy": pol["length"],
      "gold_reward_stderr": pol["gold_reward_stderr"], "kl_stderr": pol["kl_stderr"],
      "finished_fraction": pol["finished_fraction"], "num_comparisons": pol["num_comparisons"],
  }
  if data_meta is not None and "eval_label_prob" in data_meta:
    src = prepared.source("eval")
    ex = [src[i] for i in range(len(src))]
    pairs = evaluation.evaluate_pairs(params, base_params, [e["prompt"] for e in ex], [e["chosen"] for e in ex],
                                      [e["rejected"] for e in ex], config=run.model_config,
                                      beta=float(c.train.loss_hyper.get("beta", 0.1)),
                                      pref_prob=np.asarray(data_meta["eval_label_prob"][:len(ex)], np.float32))
    out.update(pairs)
  return out, pol["base_samples"]


# ------------------------------------------------------------------------------------------------


def _table(summary: Dict[str, Any]) -> str:
  rows = []
  for k in SUMMARY_KEYS + ("ranking_accuracy_mean", "idealized_ranking_accuracy", "nonfinite_steps", "seconds_total"):
    if k in summary:
      v = summary[k]
      v = "[" + ", ".join(f"{x:.3f}" for x in v) + "]" if isinstance(v, list) else (f"{v:.4f}" if isinstance(v, float) else str(v))
      rows.append((k, v))
  w = max(len(k) for k, _ in rows)
  line = "+" + "-" * (w + 2) + "+" + "-" * 24 + "+"
  return "\n".join([line] + [f"| {k.ljust(w)} | {v.rjust(22)} |" for k, v in rows] + [line])


def run_one(config, workdir: str, *, progress=True, stop_after=None, shared=None):
  """Stages 1-5 for one config; `shared` = (run, base_params, prepared, data_meta) from a sweep."""
  from experiments import metrics as metrics_lib, plots
  t = time.perf_counter()
  if shared is None:
    run = Run(config, workdir, progress=progress)
    base = stage_sft(run)  # every process (orbax saves and restores are collective)
    prepared, data_meta = _primary_first(stage_data, run, base)
    base_samples = None
  else:
    parent, base, prepared, data_meta, base_samples = shared
    run = Run(config, workdir, progress=progress)
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
  import jax
  if jax.process_index() != 0:
    return None, None  # process 0 evaluates and writes the summary
  summary_path = run.path("summary.json")
  if os.path.exists(summary_path) and info.get("resumed_complete"):
    with open(summary_path) as f:
      return json.load(f), None
  results, base_samples = stage_eval(run, prepared, base, params, data_meta, base_samples=base_samples)
  summary = {**results, "pairs_per_second": info.get("pairs_per_second", float("nan")),
             "nonfinite_steps": info.get("nonfinite_steps", 0), "loss": config.train.loss,
             "loss_hyper": dict(config.train.loss_hyper), "reference": config.train.reference.kind,
             "perturbation": config.train.perturbation.kind, "seed": config.seed,
             "host_memory": config.host_memory, "seconds_total": time.perf_counter() - t}
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  recs = metrics_lib.read_jsonl(run.path("metrics.jsonl")) if os.path.exists(run.path("metrics.jsonl")) else []
  if recs:
    plots.training_curves(recs, run.path("training_curves.png"))
  if "kl_to_base" in summary:
    plots.reward_vs_kl([{"label": f"{config.train.loss}", "kl": summary["kl_to_base"],
                         "gold_reward": summary["gold_reward_policy"]}], run.path("reward_vs_kl.png"),
                       base_reward=summary["gold_reward_base"])
  return summary, (run, base, prepared, data_meta, base_samples)


def run_sweep(config, workdir: str, *, progress=True):
  """The shared stages once, then each sweep member; one reward-vs-KL chart of all members."""
  from experiments import plots
  run = Run(config, workdir, progress=progress)
  base = stage_sft(run)
  prepared, data_meta = stage_data(run, base)
  shared = (run, base, prepared, data_meta, None)
  points, summaries = [], {}
  for item in config.sweep:
    member = copy.deepcopy(config)
    with member.unlocked():
      member.sweep = ()
      for k, v in dict(item["overrides"]).items():
        if isinstance(v, str) and "{workdir}" in v:
          v = v.replace("{workdir}", os.path.abspath(workdir))
        _set(member, k, v)
    from configs import common
    common.validate(member)
    s, info = run_one(member, os.path.join(workdir, "sweep", item["label"]), progress=progress, shared=shared)
    if info is not None:
      shared = (run, base, prepared, data_meta, info[4])
    summaries[item["label"]] = s
    points.append({"label": item.get("group", item["label"]), "kl": s["kl_to_base"], "gold_reward": s["gold_reward_policy"],
                   **({"beta": item["beta"]} if "beta" in item else {})})
  chart = plots.reward_vs_kl(points, os.path.join(workdir, "reward_vs_kl.png"),
                             base_reward=next(iter(summaries.values()))["gold_reward_base"],
                             title=f"gold reward vs KL: {config.train.loss} sweep")
  with open(os.path.join(workdir, "sweep_summary.json"), "w") as f:
    json.dump(summaries, f, indent=1)
  return summaries, chart


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from configs import common
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required.")
  common.validate(config)  # before any compute
  if config.host_memory == "retain":   # before the first allocation of any size
    from pofx import host_memory
    applied = host_memory.retain_freed_memory()
    print(f"host memory: freed memory retained in the process ({'glibc mallopt' if applied else 'not glibc: unchanged'})")
  logging.set_verbosity(logging.WARNING)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  from experiments import distributed
  distributed.initialize()  # the local launcher's variables, a cluster (SLURM, TPU pod slice, ...), or one process
  workdir = _WORKDIR.value
  import jax
  fast = config.data.attention == "block_sparse" or config.data.scored == "compact"
  if fast and config.train.parallel.mode == "jit" and jax.process_count() > 1:
    raise ValueError("config.data.attention='block_sparse' / data.scored='compact' with train.parallel.mode='jit' "
                     "needs one process (their index lists span the global batch); allowed with several processes: "
                     "train.parallel.mode='shard_map' (lists built per device), or data.attention='dense' and "
                     "data.scored='slots'.")
  if config.sweep and jax.process_count() > 1:
    raise ValueError("config.sweep runs in one process; multi-process runs take one training config.")
  if config.sweep:
    summaries, chart = run_sweep(config, workdir, progress=_PROGRESS.value)
    for label, s in summaries.items():
      print(f"\n{label}\n{_table(s)}")
    print(f"\nchart: {chart}")
    return
  summary, _ = run_one(config, workdir, progress=_PROGRESS.value, stop_after=_MAX_TRAIN_STEPS.value)
  if jax.process_index() != 0:
    return
  if summary is None:
    print(f"stopped after step {_MAX_TRAIN_STEPS.value}; run again to continue.")
    return
  print(_table(summary))
  print(f"summary: {os.path.join(os.path.abspath(workdir), 'summary.json')}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
