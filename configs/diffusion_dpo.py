"""Diffusion-DPO on the image world (`pofx.diffusion.world`: class-conditioned 8x8 digits, gold
reward = a fixed classifier's log-probability of the prompt's class + a weighted ink term).

    python -m experiments.main --config=configs/diffusion_dpo.py --workdir=/tmp/pofx_diffusion_dpo

`config.domain = "image"` sends the program to `experiments/diffusion.py`: pretrain the
class-conditioned base denoiser (epsilon loss) -> sample pairs from it with DDIM -> label them by
Bradley-Terry on the gold reward -> Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908, Eq. 14:
the logistic loss of -beta/2 * ((e_w - e_ref_w) - (e_l - e_ref_l)) with the per-image mean squared
errors e, T and 1/(C*H*W) folded into beta, as the authors' code) with a frozen reference ->
evaluation against the base (gold reward, win rate with a 95% interval, class accuracy,
diversity, Fréchet distance on the classifier's features) and PNG sample grids. `:tiny` shrinks
every stage for the tests (seconds of compute after compilation).

`image_config()` is the base the other diffusion families (`configs/diffusion_*.py`) start from;
every value is overridable as `--config.a.b=value`.
"""

import ml_collections
from ml_collections import config_dict


def image_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.domain = "image"  # pofx.options.DOMAINS: experiments/diffusion.py runs it
  c.seed = 0  # the world's split and classifier, initialisation, sampling, labels and batches

  # The image world (pofx.diffusion.world.ImageWorldConfig fields; its seed is config.seed).
  c.world = ml_collections.ConfigDict(dict(style_weight=4.0, label_scale=4.0, eval_fraction=0.2))

  # The denoiser: a pofx.diffusion.unet preset with the fields below replaced (8x8 grey digits,
  # 10 classes), and its noise schedule (pofx.diffusion.schedules: pofx.options.DIFFUSION_SCHEDULES).
  # kernels: pofx.options.KERNEL_BACKENDS ("auto" = "xla" for the image domain).
  c.model = ml_collections.ConfigDict(
    dict(
      preset="tiny",
      block_out_channels=(16, 32),
      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"),
      layers_per_block=1,
      attention_head_dim=16,
      norm_num_groups=8,
      schedule="linear",
      num_train_timesteps=1000,
      prediction_type="epsilon",
      kernels="auto",
    )
  )

  # Stage 1: the base denoiser on the world's training images (epsilon loss, uniform timesteps),
  # AdamW with a cosine decay; the base is the EMA of the weights when ema_decay > 0.
  c.pretrain = ml_collections.ConfigDict(
    dict(steps=1000, batch_size=128, learning_rate=3e-3, warmup_steps=50, ema_decay=0.995)
  )

  # Stage 2: preference pairs: num_pairs class prompts (balanced over the 10 classes), two samples
  # each from the base (pofx.diffusion.samplers: `sampler`, num_steps, eta), labelled by
  # Bradley-Terry on the gold reward; or (pairing "data_vs_sample", pofx.options.IMAGE_PAIRINGS) a
  # training digit of the class against one sample. sample_batch: images per sampler call (the
  # evaluation too).
  # record (pofx.options.IMAGE_PAIR_RECORDS): what is kept beside the images: "chains" (the two
  # reverse chains of a pair from one shared x_T, for the trajectory methods, eta > 0) or
  # "spo_steps" (SPO's step-wise pairs: at each step from spo_start_step on, spo_candidates
  # samples of x_{t-1} from a shared x_t, the best and worst by the gold reward of their predicted
  # clean images, kept when softmax(label_scale * rewards) differ by more than spo_threshold) or
  # "tailor_steps" (TailorPO: two samples of x_{t-1} from a shared x_t at every random step, ranked
  # by the gold reward of their predicted clean images, the chain continuing from the preferred
  # one; the pairs of steps spo_start_step, + tailor_every, ... kept; with tailor_eta > 0
  # (TailorPO-G) the preferred sample first moved by tailor_eta times the gradient of
  # (r + tailor_delta - r(x))^2, the reward rise tailor_delta held fixed).
  # patch_size (pofx.options.IMAGE_PATCH_SIZES, 0: none): per-patch quality maps (PatchDPO).
  # list_size: images per prompt of record "lists" (K >= 2; RankDPO's ranked lists) and of record
  # "curriculum" (Curriculum DPO: every pair of a prompt's K samples whose gold-reward gap exceeds
  # curriculum_keep_threshold, the higher-scored chosen).
  # record "segments" (DenseDPO): per class prompt a training digit noised twice to the sampler step
  # of rectified-flow time eta ~ U[guidance_min, guidance_max] and denoised twice from there; each
  # band of segment_rows rows (pofx.options.IMAGE_SEGMENT_ROWS) labelled by Bradley-Terry on its
  # swap advantage, a tie where that is below segment_tie in absolute value; pairs with fewer than
  # min_nontie_fraction of their bands labelled dropped.
  # labeller (pofx.options.IMAGE_LABELLERS): "bradley_terry" on the gold reward, or "majority" of
  # the world's `metrics` (pofx.diffusion.world.METRICS; BalancedDPO), for pairing "samples" of
  # record "images".
  # label_flip: the share of those pairs (pairing "samples", record "images") whose label is then
  # reversed, chosen uniformly at random: synthetic label noise, as Adaptive-DPO's experiments add
  # to Pick-a-Pic (the pairs record which ones, `label_flipped`). 0: none.
  c.data = ml_collections.ConfigDict(
    dict(
      num_pairs=2048,
      pairing="samples",
      sampler="ddim",
      num_steps=10,
      eta=1.0,
      sample_batch=256,
      clip_sample=1.0,
      record="images",
      spo_candidates=2,
      spo_threshold=0.3,
      spo_start_step=2,
      tailor_every=2,
      tailor_eta=0.0,
      tailor_delta=0.5,
      patch_size=0,
      list_size=4,
      labeller="bradley_terry",
      metrics=("class_log_prob", "second_class_log_prob", "ink"),
      curriculum_keep_threshold=0.01,
      segment_rows=2,
      segment_tie=0.05,
      guidance_min=0.65,
      guidance_max=0.8,
      min_nontie_fraction=0.2,
      label_flip=0.0,
    )
  )

  # Stage 3: preference training through pofx.train.make_train_step (by default on
  # pofx.diffusion.pairs.make_logps_fn: one timestep and noise per pair, drawn per step).
  # scores (pofx.options.IMAGE_SCORES): what a loss reading per-pair scores gets, the images' gold
  # rewards or their binary feedback. logps (pofx.options.IMAGE_LOGPS): what the step scores,
  # the pair's denoising errors, the recorded chains' per-step log-probs ("trajectory", with
  # step_labels: each step's own Bradley-Terry label on its predicted clean images), the
  # patch-weighted errors ("patch"), the errors signed by DenseDPO's band labels ("segments", with
  # record "segments") or the errors of a list's K images ("lists"; batch_size then counts lists).
  c.train = ml_collections.ConfigDict(
    dict(
      loss="dpo",
      steps=300,
      batch_size=64,
      grad_accum_steps=1,
      log_every=25,
      scores="reward",
      logps="pairs",
      step_labels=False,
    )
  )
  c.train.loss_hyper = ml_collections.ConfigDict(dict(beta=5000.0))
  # Diffusion-SDPO's winner-preserving safeguard on the pair errors (train.logps "pairs"): None =
  # off, or mu in [0, 1] (pofx.diffusion.methods.winner_preserving_scale; the authors' 0.9 / 0.6).
  c.train.winner_preserving_mu = config_dict.placeholder(float)
  # Curriculum DPO's schedule (record "curriculum"): `groups` gap thresholds, one stage more (a band
  # of harder pairs) every `update_every` steps (pofx.diffusion.methods.curriculum_stage / _mask).
  c.train.curriculum = ml_collections.ConfigDict(dict(groups=5, update_every=60))
  # pofx.options.IMAGE_REFERENCE_KINDS ("cached" is refused: the timestep and noise are drawn per
  # step, so the reference's errors cannot be computed once).
  c.train.reference = ml_collections.ConfigDict(dict(kind="frozen", alpha=0.6, tau=64, decay=0.99))
  # pofx.options.IMAGE_PERTURBATION_KINDS (as configs/common.py).
  c.train.perturbation = ml_collections.ConfigDict(
    dict(
      kind="none",
      rho=0.05,
      adaptive=False,
      m=config_dict.placeholder(int),
      gamma=0.01,
      c_min=config_dict.placeholder(float),
      steps=10,
    )
  )
  c.train.optimizer = ml_collections.ConfigDict(
    dict(name="adamw", learning_rate=1e-4, warmup_steps=20, weight_decay=0.0, grad_clip=1.0)
  )

  # Stage 4: evaluation: num_samples class prompts (balanced), one sample each from the policy and
  # the base with the same initial noise and step noise; grid_per_class images per class in the PNGs.
  c.eval = ml_collections.ConfigDict(dict(num_samples=1024, grid_per_class=8))
  return c


def tiny(c):
  """Every stage shrunk for tests: a few pretraining and training steps, a few dozen pairs."""
  # One resolution, no attention: a third of the default model's compile time (the U-Net's own
  # tests cover attention and several resolutions).
  m = c.model
  m.block_out_channels, m.down_block_types, m.up_block_types = (8,), ("DownBlock2D",), ("UpBlock2D",)
  m.attention_head_dim, m.norm_num_groups = 4, 2
  c.pretrain.steps, c.pretrain.batch_size = 20, 32
  c.data.num_pairs, c.data.num_steps, c.data.sample_batch = 32, 4, 32
  c.train.steps, c.train.batch_size, c.train.log_every = 4, 8, 2
  c.train.reference.tau = 2
  c.eval.num_samples, c.eval.grid_per_class = 32, 2
  return c


def finish(c, arg, tiny=tiny):
  """A family's `get_config` ending: `tiny(c)` for the ":tiny" argument (none other is known),
  then the config locked."""
  if arg == "tiny":
    tiny(c)
  elif arg not in (None, ""):
    raise ValueError(f"unknown config arg {arg!r}; allowed: ['', 'tiny'].")
  c.lock()
  return c


def get_config(arg=None):
  c = image_config()
  return finish(c, arg)
