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

# What the program runs (`config.stage`; configs without the field run "policy"): preference
# training of a policy, a Bradley-Terry reward model (`experiments/reward_model.py`), or a
# Curry-DPO curriculum of stages (`experiments/curriculum.py`).
STAGES = ("policy", "reward_model", "curriculum")
# How a reward model's backbone starts: from the SFT base or from a random init.
REWARD_MODEL_INITS = ("sft", "random")

# Where the preference pairs come from: the controlled world, or the user's JSONL/Parquet files.
SOURCES = ("world", "files")

# What the world's training split holds (`data.feedback`; configs without the field: "pairs"):
# Bradley-Terry-labelled pairs, or unpaired examples labelled by a gold-reward threshold for KTO
# (`pofx.data.unpaired`).
FEEDBACK = ("pairs", "unpaired")

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
# "unpaired": TRL's unpaired feedback (prompt, completion, label) for KTO (`pofx.data.unpaired`).
FORMATS = (
  "auto",
  "standard",
  "implicit",
  "conversational",
  "conversational_implicit",
  "tokenized",
  "ranking",
  "unpaired",
)
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
# a state, per-pair scores (the pairs' gold rewards), the reference's EMA companions of the policy
# (Adaptive-DPO: `pofx.references.ema_companions`, from `train.reference.companion_decays`). A loss
# needing anything else (token counts, per-token arrays, ...) is refused for images.
IMAGE_LOSS_REQUIREMENTS = ("key", "state", "scores", "companions")
# Loops of the training program (`experiments/loops.py`, docs/online.md): "offline" trains once on the
# stage-2 pairs; "iterative" runs rounds of sample -> label -> pairs -> train; "online" the same with
# fresh samples every few steps; "rlhf" the REINFORCE / RLOO baseline with a KL penalty.
LOOP_KINDS = ("offline", "iterative", "online", "rlhf")
# Labellers of sampled completions (`pofx.labellers`): the world's gold reward, the DPO implicit
# reward (DICE), self-play against demonstrations (SPIN), a reward model's score function.
LABELLERS = ("gold", "implicit", "self_play", "reward_model")
# Pair construction from K scored completions per prompt (`pofx.pair_construction`).
PAIR_CONSTRUCTIONS = ("best_worst", "random", "all")
# The reference of an iterative loop: kept (the SFT base throughout) or refreshed to the previous
# round's policy at each round's start.
LOOP_REFERENCES = ("keep", "refresh")
# Policy-gradient estimators of the RLHF baseline: RLOO (leave-one-out baseline) or REINFORCE with
# a running-mean baseline (Ahmadian et al. 2024, arXiv:2402.14740).
RL_ESTIMATORS = ("rloo", "reinforce")
# How the image program makes a pair (`data.pairing`): two samples of the base ordered by a
# Bradley-Terry label, or a training digit of the class (chosen, the "expert" or ground-truth
# image of Diffusion-DRO and Reg-DPO's GT-pairs) against one sample of the base (rejected).
IMAGE_PAIRINGS = ("samples", "data_vs_sample")
# How the image program labels two samples (`data.labeller`): a Bradley-Terry label sampled on
# the gold reward, or the majority vote of several metrics (`data.metrics`, names of
# `pofx.diffusion.world.METRICS`; `pofx.diffusion.methods.majority_preferences`, BalancedDPO),
# which drops the pairs without a majority.
IMAGE_LABELLERS = ("bradley_terry", "majority")
# What a loss that reads per-pair scores gets in the image program (`train.scores`): the images'
# gold rewards, or their binary feedback (1 desirable, 0 not; Diffusion-KTO).
IMAGE_SCORES = ("reward", "binary")
# What the image program's pair stage records beside the images (`data.record`): the images only;
# the two reverse chains of each pair, sampled with DDIM(eta > 0) or DDPM from one shared x_T (every
# latent, the sampler's per-step log-probs and the gold reward of each step's predicted clean image:
# D3PO, the dense-reward view, step-wise labels); or SPO's step-wise pairs (at each step of one
# chain, the best and the worst of k candidates x_{t-1} from a shared x_t, by the gold reward of
# their predicted clean images); or K-way lists (`data.list_size` samples per prompt, each with the
# share of the others it beats under Bradley-Terry labels: RankDPO); or Curriculum DPO's pairs (every
# pair of `data.list_size` samples of a prompt whose gold-reward gap exceeds
# `data.curriculum_keep_threshold`, the higher-scored image chosen, with its gap); or DenseDPO's
# structurally similar pairs (two samples denoised from two noised copies of one training digit,
# with a label per band of rows).
IMAGE_PAIR_RECORDS = ("images", "chains", "spo_steps", "tailor_steps", "lists", "curriculum", "segments")
# How the image program's train step scores a pair (`train.logps`): the denoising errors of the two
# images under a shared timestep and noise (Diffusion-DPO's `PairLogps`); the per-step log-probs
# of the recorded chains (`pofx.diffusion.methods.make_trajectory_logps_fn`); or the errors weighted
# by per-patch quality maps (PatchDPO, `make_patch_logps_fn`); or the errors of the K images of a
# list under one timestep and noise per list (`pofx.diffusion.pairs.make_list_logps_fn`, for a loss
# that takes K-way lists: RankDPO); or the errors signed band by band by the segment labels and
# averaged over the non-tie bands (DenseDPO, `make_dense_logps_fn`).
IMAGE_LOGPS = ("pairs", "trajectory", "patch", "lists", "segments")
# Rows per segment of DenseDPO's band labels (`data.segment_rows`): divisors of the 8 rows (8: one
# label per pair, StructuralDPO's).
IMAGE_SEGMENT_ROWS = (1, 2, 4, 8)
# The side of a square patch of the quality maps (`data.patch_size`, pixels; 0: no maps): divisors
# of the world's 8x8 images.
IMAGE_PATCH_SIZES = (0, 1, 2, 4, 8)
