"""pofx: preference optimization in JAX (DPO and the methods that grew out of it).

`pofx.<module>` loads the Flax-free core on first use (losses, log-probs, batching, reference
strategies, perturbations, the train step); models live in `pofx.models` (Flax). `import pofx`
itself imports nothing else, so `pofx.options` (the allowed option values) imports without JAX.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
  "batching",
  "fingerprints",
  "gpo",
  "logprobs",
  "losses",
  "perturbations",
  "policy",
  "references",
  "train",
)
_PAIR_LOGPS = ("ListLogps", "PairLogps")


def __getattr__(name):
  """`pofx.losses`, `pofx.PairLogps`, ...: imported on first access (PEP 562)."""
  if name in _SUBMODULES:
    return importlib.import_module(f"pofx.{name}")
  if name in _PAIR_LOGPS:
    return getattr(importlib.import_module("pofx._pair_logps"), name)
  raise AttributeError(f"module 'pofx' has no attribute {name!r}")


__all__ = [*_PAIR_LOGPS, *_SUBMODULES, "__version__"]
