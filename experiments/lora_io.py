"""LoRA adapters on disk in PEFT's layout (a directory `peft.PeftModel.from_pretrained` loads):
`adapter_model.safetensors` (the state dict of `pofx.lora.to_peft`) and `adapter_config.json`."""

from __future__ import annotations

import json
import os

from safetensors.numpy import load_file, save_file

from pofx import lora

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def save_adapters(directory: str, adapters, spec: lora.LoraSpec, *, base_model_name_or_path=None) -> str:
  """Writes the adapters to `directory` (created if needed); returns it."""
  os.makedirs(directory, exist_ok=True)
  state, config = lora.to_peft(adapters, spec)
  config["base_model_name_or_path"] = base_model_name_or_path
  save_file(state, os.path.join(directory, WEIGHTS))
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return directory


def load_adapters(directory: str, num_layers: int):
  """`(adapters, spec)` from a PEFT adapter directory (pofx's or peft's `save_pretrained`)."""
  for name in (WEIGHTS, CONFIG):
    if not os.path.exists(os.path.join(directory, name)):
      raise FileNotFoundError(f"{directory!r} is not a PEFT adapter directory: it has no {name}.")
  with open(os.path.join(directory, CONFIG)) as f:
    spec = lora.spec_from_peft(json.load(f))
  return lora.from_peft(load_file(os.path.join(directory, WEIGHTS)), spec, num_layers), spec
