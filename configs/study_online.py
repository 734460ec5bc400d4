"""Study 7, online and iterative preference optimisation at matched KL (issue 19, section 4).

    python -m experiments.study online --workdir=/tmp/pofx_studies        (3 seeds: table, charts)
    python -m experiments.main --config=configs/study_online.py --workdir=/tmp/run   (offline DPO, one seed)

From one SFT base and dataset per seed: offline DPO (beta 0.1, cached SFT reference), iterative DPO,
online DPO, DICE, SPIN and the RLHF baseline (RLOO), each one run of `TRAIN_STEPS` steps of 32
pairs (RLHF: 32 prompts x 4 samples) evaluated at `len(points)` points along training (KL to the
base, gold reward, win rate; the training length is the swept quantity); a Bradley-Terry reward
model trained on the seed's preference pairs; online DPO with that reward model as labeller
(`online_dpo_rm`: gold reward against the reward model's reward along training); and the
accuracy of the DPO implicit reward against the reward model's on held-out pairs of the training
prompt distribution and of prompts shifted by `SHIFT` (`pofx.world.World.prompts(shift=)`).

`get_config(arg)` is offline DPO (the config `experiments.study` validates and shares the base of);
`method_config(name, arg, seed=)` the config of each method and the points (values of
`train.steps`, or of `loop.rounds` for a loop) where it is evaluated; `reward_model_config`
the reward model's. The methods' SFT and data fields are the study's (one base, one dataset).
"""

import importlib

from configs import _study, common
from configs import reward_model as reward_model_family

METHODS = ("dpo", "iterative_dpo", "online_dpo", "dice", "spin", "rlhf")
RM_METHOD = "online_dpo_rm"  # online DPO labelled by the reward model
BETA = 0.1
TRAIN_STEPS = 200
SHIFT = 2.0  # the shifted prompts' tilt: tokens drawn with p_v ∝ exp(SHIFT z_v)
# The methods whose implicit reward `beta (log pi - log pi_sft)` is scored (reference: the SFT base).
IMPLICIT = ("dpo", "online_dpo")


def _sized(c, arg):
  """The study's world, SFT, data and evaluation sizes (`configs/_study.py`) and 200 steps of 32."""
  with c.unlocked():
    _study.sized(c, arg, steps=TRAIN_STEPS)
  return c


def get_config(arg=None):
  c = common.base_config()
  c.train.loss, c.train.reference.kind = "dpo", "cached"
  c.train.loss_hyper.beta = BETA
  _sized(c, arg)
  c.lock()
  return c


def _loop(c, *, rounds, steps, prompts, samples, **fields):
  lp = c.loop
  lp.rounds, lp.steps_per_round, lp.prompts_per_round, lp.samples_per_prompt = rounds, steps, prompts, samples
  for k, v in fields.items():
    lp[k] = v
  c.train.steps = rounds * steps


def method_config(name: str, arg=None, *, seed: int = 0, reward_model_checkpoint: str = ""):
  """`(config, points)` of method `name` (`METHODS` or `RM_METHOD`): the points are the values of
  `train.steps` (offline DPO) or `loop.rounds` (a loop) at which the run is evaluated, the last
  one its full length (`:tiny`: two points for offline and online DPO, one for the others). Each loop config is its family's (`configs/<family>.py`) at the study's
  sizes: 200 steps in all."""
  tiny = arg == "tiny"
  family = {"dpo": "dpo", RM_METHOD: "online_dpo"}.get(name, name)
  if name not in METHODS + (RM_METHOD,):
    raise ValueError(f"study_online: unknown method {name!r}; allowed: {list(METHODS + (RM_METHOD,))}.")
  if name == "dpo":
    c = get_config(arg)
  else:  # at :tiny the family's own tiny config (its compiled programs are the suite's loop tests')
    c = importlib.import_module(f"configs.{family}").get_config(arg)
    if not tiny:
      _sized(c, arg)
  with c.unlocked():
    c.seed = int(seed)
    if name != "rlhf":
      c.train.loss_hyper.beta = BETA
    if name == "dpo":
      points = (2, 4) if tiny else (50, 100, 150, 200)
      c.train.steps, c.train.checkpoint_every = points[-1], points[-1]
    elif name in ("online_dpo", RM_METHOD):
      # Fresh samples every step: one pair per prompt from 2 samples, a batch's worth of prompts.
      if tiny:
        _loop(c, rounds=4, steps=1, prompts=8, samples=2)
        points = (2, 4) if name == "online_dpo" else (4,)
      else:
        _loop(c, rounds=TRAIN_STEPS, steps=1, prompts=c.train.batch_size, samples=2)
        points = (50, 100, 150, 200)
      if name == RM_METHOD:
        c.loop.labeller, c.loop.reward_model_checkpoint = "reward_model", reward_model_checkpoint
    else:
      # Four rounds of 50 steps (tiny: two of two); DICE's first round is offline DPO on the
      # stage-2 pairs, SPIN samples one completion for each demonstration's prompt.
      if tiny:
        _loop(c, rounds=2, steps=2, prompts=16 if name == "spin" else 4, samples=c.loop.samples_per_prompt)
        points = (2,)
      else:
        per = {"iterative_dpo": (256, 4), "dice": (256, 8), "spin": (256, 1), "rlhf": (c.train.batch_size, 4)}[name]
        _loop(c, rounds=4, steps=TRAIN_STEPS // 4, prompts=per[0], samples=per[1])
        points = (1, 2, 3, 4)
    c.train.checkpoint_every = c.train.steps if name == "dpo" else c.train.checkpoint_every
  return c, points


def reward_model_config(arg=None, *, seed: int = 0):
  """The Bradley-Terry reward model (`configs/reward_model.py`) on the study's SFT base and data:
  300 steps of 32 pairs (tiny: 6 of 8)."""
  c = reward_model_family.get_config(arg)
  with c.unlocked():
    c.seed = int(seed)
    if arg != "tiny":
      _sized(c, arg)
      c.reward_model.steps, c.reward_model.batch_size = 300, 32
  return c
