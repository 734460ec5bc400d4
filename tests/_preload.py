"""The libraries the repository's programs import, imported once in tests/forked.py's server
process so that each program run forked from it starts with them loaded. Importing this starts no
thread and initialises no JAX backend (tests/test_forked.py checks both). The programs' own
modules (`experiments.main`, `experiments.study`, `experiments.plan`) are left out: they define
absl flags on import and run as `__main__`."""

import jax  # noqa: F401
import jax.numpy  # noqa: F401
import numpy  # noqa: F401
import orbax.checkpoint  # noqa: F401
import tensorflow_datasets  # noqa: F401
from absl import app, flags, logging  # noqa: F401
from jax.experimental import multihost_utils  # noqa: F401
from ml_collections import config_flags  # noqa: F401

import pofx_backends  # noqa: F401
from configs import validate  # noqa: F401
from experiments import (  # noqa: F401
  checkpointing,
  diffusion,
  distributed,
  export_hf,
  loops,
  lora_io,
  metrics,
  optimizers,
  plots,
  provenance,
  reference_cache,
  reward_model,
  sft,
  workdir,
)
from pofx import (  # noqa: F401
  batching,
  data,
  evaluation,
  fingerprints,
  labellers,
  lora,
  losses,
  models,
  parallel,
  perturbations,
  policy,
  references,
  reward_models,
  sampling,
  train,
  world,
)
