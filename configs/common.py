"""The base config every experiment family starts from.

Every value is overridable on the command line as `--config.a.b=value`; a misspelt key fails
with the nearest existing one. The allowed values of every choice are `pofx.options`' tuples, and
`configs/validate.py` checks a config (the fields, their combinations, the machine) before any
compute. Options with no value are `None` (`ml_collections.config_dict.placeholder`: set them
on the command line as a value of their type, e.g. `--config.train.perturbation.c_min=1.0`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from pofx import options


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # fixes data generation, initialisation and sampling: --config.seed=N is a replicate

  # The controlled world (pofx.world.WorldConfig fields); its gold reward, prompts and labeller.
  c.world = ml_collections.ConfigDict(
    dict(
      vocab_size=32,
      min_prompt_len=2,
      max_prompt_len=6,
      max_completion_len=12,
      label_scale=2.0,
      length_bias=0.0,
      eval_fraction=0.1,
    )
  )

  # The policy: "world" = the small Llama sized for the world; or a pofx.models preset name.
  # init_checkpoint: an orbax params checkpoint to start from (data.source="files"; "" = random init).
  # kernels: the kernel backend (pofx.options.KERNEL_BACKENDS): "auto" decides on this machine
  # (once per workdir, recorded in <workdir>/kernels.json and summary.json, kept on resume);
  # "xla" the core's own operations; "cpu" / "gpu" / "tpu" the backends of pofx_backends.
  c.model = ml_collections.ConfigDict(
    dict(preset="world", dtype="float32", remat=False, init_checkpoint="", kernels="auto")
  )

  # Stage 1: supervised base policy on the world's demonstrations.
  c.sft = ml_collections.ConfigDict(dict(num_demos=8192, steps=600, batch_size=64, learning_rate=3e-3))

  # Stage 2: preference data.
  c.data = ml_collections.ConfigDict(
    dict(
      source="world",  # pofx.options.SOURCES: "world" | "files"
      num_prompts=2048,  # world: training prompts
      samples_per_prompt=4,  # world: completions sampled per prompt (pairs of adjacent samples)
      num_eval_pairs=512,  # world: held-out pairs for reward / ranking accuracy
      files="",  # files: comma-separated JSONL/Parquet paths (training split)
      eval_files="",  # files: optional held-out pairs (reward / ranking accuracy)
      format="auto",  # files: pofx.options.FORMATS
      tokenizer_dir="",  # files: folder with tokenizer.json (+ tokenizer_config.json)
      max_prompt_len=config_dict.placeholder(int),  # files: token limits (None = no limit) and
      max_completion_len=config_dict.placeholder(int),  # what happens to a pair beyond them:
      truncation="reject",  # files: pofx.options.TRUNCATION ("reject": a bad record)
      on_bad_record="error",  # pofx.options.ON_BAD_RECORD: "error" | "skip"
      # files: refuse a split whose share of unknown tokens (text the tokenizer does not cover)
      # is above this, in pofx.options.UNKNOWN_TOKEN_RATE_RANGE; None = no limit (the rate is
      # reported either way: summary.json `data_unknown_token_rate`, the table).
      max_unknown_token_rate=config_dict.placeholder(float),
      layout="prompt_shared",  # pofx.options.LAYOUTS: "fused" | "prompt_shared" | "packed"
      seq_bucket=16,
      completion_bucket=8,
      attention="dense",  # pofx.options.ATTENTION_MODES: "block_sparse" = only the mask's used blocks
      attention_block_size=64,  # block_sparse: tokens per block; seq_bucket must be a multiple of it
      scored="slots",  # pofx.options.SCORED_MODES: "compact" = the LM head on real completion tokens only
    )
  )

  # Stage 3-4: preference training.
  c.train = ml_collections.ConfigDict(
    dict(
      loss="dpo",
      steps=300,
      batch_size=64,
      grad_accum_steps=1,
      log_every=25,
      checkpoint_every=100,
      keep_checkpoints=2,
      on_nonfinite="skip",  # "skip": keep going (the step leaves the state unchanged); "halt"
      # log the loss's gradient field over the chosen / rejected log-probs (pofx.evaluation.gradient_field)
      gradient_field=False,
    )
  )
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=0.1))
  # mrpo_alpha (multi): the weight of the second reference; None = adaptive per pair (MRPO's ARWC).
  c.train.reference = ml_collections.ConfigDict(
    dict(
      kind="cached",
      alpha=0.6,
      tau=64,
      decay=0.99,
      eta=0.1,
      mrpo_alpha=config_dict.placeholder(float),
      guide_checkpoint="",
      # cache_dir (cached, multi): a folder of reference log-prob caches shared across runs, each
      # entry named by its fingerprint (weights, vocabulary, length limits, data, model); None =
      # this run's own workdir. Other reference kinds compute no cache and ignore it.
      cache_dir=config_dict.placeholder(str),
    )
  )
  # sam: m = examples per ascent (m-sharpness, Foret et al.; None = one ascent per (micro-)batch).
  # rwp: c_min (the loss-stationary threshold on the per-pair loss) has no default and must be set;
  # steps: proxy ascents.
  # saf / mesa (trajectory loss): lam its weight, temperature, on for start_epoch < epoch <
  # end_epoch (None: no end); saf: minus_epochs (the past outputs' age); mesa: decay (EMA).
  c.train.perturbation = ml_collections.ConfigDict(
    dict(
      kind="none",
      rho=0.05,
      adaptive=False,
      m=config_dict.placeholder(int),
      gamma=0.01,
      c_min=config_dict.placeholder(float),
      steps=10,
      lam=0.3,
      temperature=5.0,
      minus_epochs=3,
      start_epoch=5,
      end_epoch=config_dict.placeholder(int),
      decay=0.9998,
    )
  )
  # Input perturbation (pofx.options.INPUT_PERTURBATION_KINDS): "embeddings" = adversarial token
  # embeddings, each moved by at most `radius` (L2), composing with the weight perturbation.
  c.train.input_perturbation = ml_collections.ConfigDict(dict(kind="none", radius=0.0))
  # Dropout training of the policy (off with rate 0): residual dropout at `rate` in the model
  # (pofx.models.LlamaConfig.dropout) and multi-sample dropout over `samples` masks (Inoue 2019;
  # 1 = plain dropout). The reference and the evaluation never use dropout.
  c.train.dropout = ml_collections.ConfigDict(dict(rate=0.0, samples=1))
  # LoRA (pofx.lora; off unless enabled): adapters of rank `rank` scaled by alpha / rank on the
  # comma-separated `targets` (pofx.options.LORA_TARGETS) are trained, the base stays frozen;
  # reference.kind "adapters_off" is the base without them (no second copy). `dropout`: PEFT's
  # lora_dropout, dropout on the adapter branch's input in training (train.dropout.samples masks
  # per step, as the model's dropout); written to the adapter config. The run writes the adapters
  # in PEFT's layout to <workdir>/adapters; export_merged also writes the merged weights.
  c.train.lora = ml_collections.ConfigDict(
    dict(enabled=False, rank=8, alpha=16.0, targets="q_proj,k_proj,v_proj,o_proj", dropout=0.0, export_merged=False)
  )
  c.train.optimizer = ml_collections.ConfigDict(
    dict(name="adamw", learning_rate=1e-3, warmup_steps=20, weight_decay=0.0, grad_clip=1.0)
  )
  # mode: pofx.options.PARALLEL_MODES; mesh: "" (all devices on data), "<data>", "<data>x<fsdp>"
  # or "<data>x<fsdp>x<tensor>".
  c.train.parallel = ml_collections.ConfigDict(dict(mode="single", mesh=""))

  # Stage 5: evaluation on held-out prompts.
  # idealized_betas: the betas at which the idealized ranking accuracy is also reported (summary.json
  # `idealized_ranking_accuracy_by_beta`); the sweep of Chen et al. 2024 (arXiv:2405.19534) by default.
  c.eval = ml_collections.ConfigDict(
    dict(num_prompts=1024, samples_per_prompt=1, temperature=1.0, top_k=0, idealized_betas=options.IDEALIZED_BETAS)
  )

  # Loops (experiments/loops.py, docs/online.md): kind in pofx.options.LOOP_KINDS. "offline" (the
  # default) is the five stages above. The others train rounds x steps_per_round steps from the SFT
  # base, each round sampling samples_per_prompt completions for prompts_per_round training prompts
  # from the current policy (temperature), labelling them (labeller: pofx.options.LABELLERS),
  # building pairs (pairing: pofx.options.PAIR_CONSTRUCTIONS, pairs under min_margin dropped) and
  # training on them with `replay` of each batch drawn from earlier rounds (and the stage-2 pairs
  # when offline_first: round 0 trains on those only). reference: pofx.options.LOOP_REFERENCES.
  # length_alpha: the implicit labeller's length penalty per token (None: DICE's search, the alpha
  # that makes the mean chosen-minus-rejected length of the round's pairs closest to 0).
  # reward_model_checkpoint: the reward model (labeller "reward_model"): <workdir of a
  # config.stage="reward_model" run>/reward_model.
  # rlhf: estimator (pofx.options.RL_ESTIMATORS) and kl_coef (the KL penalty's weight).
  c.loop = ml_collections.ConfigDict(
    dict(
      kind="offline",
      rounds=3,
      steps_per_round=100,
      prompts_per_round=256,
      samples_per_prompt=4,
      temperature=1.0,
      labeller="gold",
      pairing="best_worst",
      min_margin=0.0,
      reference="keep",
      replay=0.0,
      offline_first=False,
      length_alpha=config_dict.placeholder(float),
      reward_model_checkpoint="",
      estimator="rloo",
      kl_coef=0.05,
    )
  )

  # Optional sweep: a list of {"label": str, "overrides": {dotted.key: value}} run after one
  # shared SFT + data stage; each member trains and evaluates in <workdir>/sweep/<label>.
  # sweep_member_charts: each member also draws its training_curves.png (False: only its
  # metrics.jsonl and TensorBoard events; the sweep's reward_vs_kl.png is drawn either way).
  c.sweep = ()
  c.sweep_member_charts = True
  return c
