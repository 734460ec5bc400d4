"""What the loop configs share (`configs/iterative_dpo.py`, `online_dpo.py`, `dice.py`, `spin.py`,
`rlhf.py`): the `:tiny` loop sizes and the argument parsing. The SFT and data stages at `:tiny` are
those of every tiny world config (`configs/_shrink.py`), so the tests share one SFT base."""

from configs import _shrink


def tiny_loop(c):
  """A loop small enough for the suite: 2 rounds of 2 steps, 4 prompts x 4 samples a round (16
  rows: the sampler's compiled shape is the tiny evaluation's, so the suite compiles it once)."""
  c.loop.rounds, c.loop.steps_per_round, c.loop.prompts_per_round, c.loop.samples_per_prompt = 2, 2, 4, 4
  return c


def finish(c, arg, variants=()):
  """Applies `arg`: comma-separated tokens, each "tiny" or one of `variants` (name -> function of
  the config); train.steps is set to the loop's rounds x steps_per_round (what it trains)."""
  parts = [p for p in (arg or "").split(",") if p]
  allowed = ["", "tiny", *variants]
  for p in parts:
    if p not in allowed:
      raise ValueError(f"unknown config arg {p!r}; allowed: comma-separated items of {allowed}.")
    if p in variants:
      variants[p](c)
  if "tiny" in parts:
    _shrink.tiny(c)
    tiny_loop(c)
  c.train.steps = c.loop.rounds * c.loop.steps_per_round
  c.lock()
  return c
