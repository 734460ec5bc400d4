"""Every allowed value of pofx's options, defined once (imports without JAX).

The library's functions, the experiment configs (`configs/`) and their validation
(`configs/validate.py`) all read these tuples; nothing else lists them.
"""

# Kernel backends (`pofx_backends`): "auto" resolves on the machine at hand; "xla" is the core's
# own operations; "cpu", "gpu", "tpu" the optional backends of those platforms.
KERNEL_BACKENDS = ("auto", "xla", "cpu", "gpu", "tpu")

# Reference strategies (`pofx.references`): none (reference-free losses), frozen (a forward of the
# initial policy), cached (log-probs computed once per dataset), multi (MRPO over two cached
# references), guiding (a frozen forward of another run's policy), synced (TR-DPO), ema,
# adapters_off (with LoRA: the frozen base with the adapters disabled, no second copy of it).
REFERENCE_KINDS = ("none", "frozen", "cached", "multi", "guiding", "synced", "ema", "adapters_off")

# LoRA (`pofx.lora`): the projections that can carry adapters (Hugging Face / PEFT module names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Weight perturbations (`pofx.perturbations`).
PERTURBATION_KINDS = ("none", "sam", "awp", "rwp", "saf", "mesa")

# Input perturbations (`pofx.perturbations.InputPerturbation`): none, or adversarial token
# embeddings within a radius (`adversarial_embeddings`).
INPUT_PERTURBATION_KINDS = ("none", "embeddings")

# Optimizers of the training program (optax).
OPTIMIZERS = ("adamw", "adam", "sgd")

# Where the preference pairs come from: the controlled world, or the user's JSONL/Parquet files.
SOURCES = ("world", "files")

# Row layouts of a batch of pairs (`pofx.batching`).
LAYOUTS = ("fused", "prompt_shared", "packed")

# Data-parallel modes of a multi-device step (`pofx.parallel`), and the training program's modes
# (those plus "single": one device, no mesh).
DEVICE_PARALLEL_MODES = ("jit", "shard_map", "pmap")
PARALLEL_MODES = ("single",) + DEVICE_PARALLEL_MODES

# Attention over a batch: every score of the mask's square, or only its used blocks.
ATTENTION_MODES = ("dense", "block_sparse")

# Which tokens the LM head scores: every completion slot, or the real completion tokens only.
SCORED_MODES = ("slots", "compact")

# What a training step with a non-finite loss or gradient does: skip it (the state is left
# unchanged) or halt the run.
ON_NONFINITE = ("skip", "halt")

# Preference files (`pofx.data`): their formats, how a K-way ranking record becomes pairs, what
# happens to a record over a length limit, and what happens to a record that cannot be used.
FORMATS = ("auto", "standard", "implicit", "conversational", "conversational_implicit", "tokenized", "ranking")
RANKING_MODES = ("all_pairs", "best_vs_rest", "best_worst")
TRUNCATION = (
  "reject",
  "truncate_prompt_left",
  "truncate_completion_right",
  "truncate_prompt_left_then_completion_right",
)
ON_BAD_RECORD = ("error", "skip")
# The most unknown tokens a split may have, as a share of its tokens (`data.max_unknown_token_rate`;
# None = no limit): a number in this closed range.
UNKNOWN_TOKEN_RATE_RANGE = (0.0, 1.0)
# The betas at which the idealized ranking accuracy is reported by default (`eval.idealized_betas`,
# `pofx.evaluation.IDEALIZED_BETAS`): its authors' sweep (Chen et al. 2024, arXiv:2405.19534; code
# `calculate_upper_bound_rlhf.py`, `betas = [0.01, 0.1, 1, 5, 10]`).
IDEALIZED_BETAS = (0.01, 0.1, 1.0, 5.0, 10.0)

# Model families (`pofx.models`, docs/models.md): the gated MLP's activation, each layer's
# attention kind (Hugging Face's names), and the Hugging Face `model_type`s that
# `pofx.models.hf` reads and writes.
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")

# The training program's domains (`config.domain`; a config without the field is "text"): the
# language pipeline of `experiments/main.py`, or the image world's diffusion pipeline of
# `experiments/diffusion.py`.
DOMAINS = ("text", "image")
# Diffusion (`pofx.diffusion`): the noise schedules by diffusers' `beta_schedule` names, what the
# denoiser predicts, and the samplers.
DIFFUSION_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DIFFUSION_PREDICTION_TYPES = ("epsilon", "v_prediction")
DIFFUSION_SAMPLERS = ("ddim", "ddpm")
# The reference strategies and perturbations of the image program. "cached" is not one: the
# timestep and noise of a pair are drawn anew at every step, so a reference's errors cannot be
# computed once; "multi" and "adapters_off" need a cache or LoRA, "guiding" a finished run.
IMAGE_REFERENCE_KINDS = ("none", "frozen", "synced", "ema")
IMAGE_PERTURBATION_KINDS = ("none", "sam", "awp", "rwp")
# The extra inputs (`pofx.losses.REQUIREMENTS`) a loss may need in the image program: a PRNG key,
# a state, per-pair scores (the pairs' gold rewards). A loss needing anything else (token counts,
# per-token arrays, ...) is refused for images.
IMAGE_LOSS_REQUIREMENTS = ("key", "state", "scores")
