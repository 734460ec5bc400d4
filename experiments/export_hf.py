r"""Writes a run's parameters as a Hugging Face folder, for transformers, vLLM, lm-eval, AlpacaEval.

    python -m experiments.export_hf --config=configs/dpo_files.py --workdir=runs/dpo --out=runs/dpo/hf \
        [--params=final_params] [--model_type=llama] [--dtype=bfloat16] [--config.a.b=value ...]

`--config` (with the same `--config.*` overrides) is the training run's: it gives the model
(`model.preset`, the vocabulary of the world or of `data.tokenizer_dir`). `--params` names the
orbax parameters in the workdir: `final_params` (the trained policy, the default) or
`sft_params` (the base). The folder gets `config.json` and `model.safetensors`
(`pofx.models.hf.save_pretrained`: float32, or bfloat16 with `--dtype`; the family inferred from
the model's switches unless `--model_type` says which) and, for a run on the user's files, the
tokenizer files of `data.tokenizer_dir`. Bad input (no such parameters, a family that cannot
express the model) ends the program with one line, exit status 2, before anything is written.

`model_config(c, world, tokenizer)` is the one place the program turns `config.model` into the
model's `LlamaConfig` (`experiments.main.Run` uses it too).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import jax
import orbax.checkpoint as ocp
from absl import app, flags
from ml_collections import config_flags

from pofx import data as data_lib
from pofx import models
from pofx import world as world_lib

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def model_config(c, world: world_lib.World, tokenizer: Optional[data_lib.Tokenizer] = None) -> models.LlamaConfig:
  """The policy's `LlamaConfig` of a config: the world's small Llama (`model.preset="world"`) or a
  named preset, with `model.dtype`, `model.remat` and the vocabulary of the tokenizer (the
  world's without one)."""
  vocab = tokenizer.vocab_size if tokenizer is not None else world.config.vocab_size
  if c.model.preset == "world":
    return world.model_config(dtype=c.model.dtype, remat=c.model.remat, vocab_size=vocab)
  return models.preset(c.model.preset, dtype=c.model.dtype, remat=c.model.remat, vocab_size=vocab)


def export(c, workdir: str, out: str, *, params: str = "final_params", model_type: str = "", dtype: str = "float32"):
  """Writes `<workdir>/<params>` as a Hugging Face folder `out`; returns the `model_type` written."""
  path = os.path.join(os.path.abspath(workdir), params)
  if c.train.lora.enabled and params == "final_params":
    raise ValueError(
      f"{path} holds a LoRA run's adapters (also in {os.path.join(workdir, 'adapters')}, PEFT's layout); export "
      "the merged model with --params=merged_params, written by a run with train.lora.export_merged=True."
    )
  if not os.path.isdir(path):
    raise ValueError(f"no parameters at {path} (--params: final_params after training, sft_params for the base).")
  world = world_lib.World(world_lib.WorldConfig(seed=c.seed, **dict(c.world)))
  tokenizer = data_lib.Tokenizer.from_dir(c.data.tokenizer_dir) if c.data.source == "files" else None
  config = model_config(c, world, tokenizer)
  family = model_type or models.hf.family(config)
  models.hf.config_to_hf(config, family)  # refuses a family that cannot express the model, before any I/O
  like = jax.eval_shape(lambda k: models.init_params(config, k), jax.random.key(0))
  restored = ocp.StandardCheckpointer().restore(path, like)
  extra = {}
  if tokenizer is not None:
    extra = {k: v for k, v in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)) if v is not None}
  models.hf.save_pretrained(out, restored, config, model_type=family, dtype=dtype, extra_config=extra)
  if tokenizer is not None:
    for name in TOKENIZER_FILES:
      src = os.path.join(c.data.tokenizer_dir, name)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(out, name))
  return family


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    family = export(f.config, f.workdir, f.out, params=f.params, model_type=f.model_type, dtype=f.dtype)
  except ValueError as e:
    print(f"experiments.export_hf: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  print(f"exported {os.path.join(f.workdir, f.params)} as a {family!r} model to {os.path.abspath(f.out)}")


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "The training run's config file (configs/<family>.py[:arg]).")
  flags.DEFINE_string("workdir", None, "The training run's workdir.")
  flags.DEFINE_string("out", None, "The Hugging Face folder to write.")
  flags.DEFINE_string("params", "final_params", "The parameters in the workdir: final_params or sft_params.")
  flags.DEFINE_string("model_type", "", "The Hugging Face model_type to write (default: inferred from the model).")
  flags.DEFINE_enum("dtype", "float32", list(models.hf.EXPORT_DTYPES), "The weights' dtype in the folder.")
  flags.mark_flags_as_required(["config", "workdir", "out"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
