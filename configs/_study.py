"""The size every study config shares (`python -m experiments.study`): a full run of three seeds
fits in about ten minutes on two CPU cores; `:tiny` is `configs/_shrink.tiny` (the SFT base and
data of every tiny world config, so the test session's one base serves them) with `tiny_steps`
training steps and no training-curve chart per sweep member (`sweep_member_charts`)."""

from configs import _shrink


def sized(c, arg, *, steps: int = 200, tiny_steps: int = 4):
  """The study size for `arg` in ("", "tiny"): `steps` training steps of 32 pairs on 1024
  prompts (2048 pairs), evaluated on 512 held-out prompts; or the tiny size."""
  c.data.num_prompts, c.data.num_eval_pairs = 1024, 512
  # One bucket holds every pair of the world (prompt-shared rows of at most 8 + 2 x 12 tokens):
  # one compiled train step per member instead of one per bucket shape.
  c.data.seq_bucket, c.data.completion_bucket = 32, 16
  c.train.steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = steps, 32, 10, steps
  c.eval.num_prompts = 512
  _shrink.apply(c, arg)
  if arg == "tiny":
    c.train.steps, c.train.log_every, c.train.checkpoint_every = tiny_steps, 2, tiny_steps
    c.sweep_member_charts = False  # the study draws its own chart; no training-curve chart per member
  return c


def member(label: str, loss: str, hyper: dict, *, reference: str = "cached", **overrides):
  """A sweep member: its loss, its hyperparameters (the whole `train.loss_hyper`) and reference."""
  return {
    "label": label,
    "overrides": {"train.loss": loss, "train.loss_hyper": dict(hyper), "train.reference.kind": reference, **overrides},
  }
