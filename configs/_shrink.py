"""The `:tiny` variant every config accepts: every stage shrunk so a test runs it in seconds."""


def tiny(c):
  c.sft.num_demos, c.sft.steps = 256, 20
  c.data.num_prompts, c.data.num_eval_pairs = 64, 32
  c.train.steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 4, 8, 2, 2
  c.train.reference.tau = 2
  c.eval.num_prompts = 16
  return c


def apply(c, arg, allowed=("", "tiny")):
  if arg in (None, ""):
    return c
  if arg == "tiny":
    return tiny(c)
  raise ValueError(f"unknown config arg {arg!r}; allowed: {list(allowed)}.")
