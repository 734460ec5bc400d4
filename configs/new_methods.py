"""Every new method trained on the controlled world after one shared SFT stage and dataset.

    python -m experiments.main --config=configs/new_methods.py --workdir=/tmp/pofx_new_methods

One DPO training and evaluation per member in <workdir>/sweep/<label>, each with the settings
of its own config file: SAM with m-sharpness (`sam.py`, m = 8 pairs per ascent), SAF
(`saf.py`), MESA (`mesa.py`), multi-sample dropout (`msd.py`), adversarial token embeddings
(`adv_embeddings.py`); the SAF member also logs the gradient-field diagnostic
(`gradient_field.py`). `:tiny` runs every member for a few steps (the trajectory terms switched on
at once, 2 dropout masks).
"""

from configs import _shrink, common


def _members(tiny):
  start = -1 if tiny else 0
  return (
    {
      "label": "sam_m",
      "overrides": {
        "train.perturbation.kind": "sam",
        "train.perturbation.rho": 0.05,
        "train.perturbation.m": 4 if tiny else 8,
      },
    },
    {
      "label": "saf",
      "overrides": {
        "train.perturbation.kind": "saf",
        "train.perturbation.lam": 0.3,
        "train.perturbation.minus_epochs": 1,
        "train.perturbation.start_epoch": start,
        "train.gradient_field": True,  # the diagnostic rides along (it changes no result)
      },
    },
    {
      "label": "mesa",
      "overrides": {
        "train.perturbation.kind": "mesa",
        "train.perturbation.lam": 0.8,
        "train.perturbation.decay": 0.99,
        "train.perturbation.start_epoch": start,
      },
    },
    {"label": "msd", "overrides": {"train.dropout.rate": 0.1, "train.dropout.samples": 2 if tiny else 4}},
    {
      "label": "adv_embeddings",
      "overrides": {"train.input_perturbation.kind": "embeddings", "train.input_perturbation.radius": 0.05},
    },
  )


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  _shrink.apply(c, arg)
  c.sweep = _members(arg == "tiny")
  c.lock()
  return c
