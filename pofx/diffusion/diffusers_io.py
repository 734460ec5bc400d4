r"""diffusers `UNet2DModel` (and `UNet2DConditionModel`) folders in both directions: `config.json` +
safetensors <-> pofx.

A folder written by diffusers' `UNet2DModel.save_pretrained` (or a hub snapshot of one) holds
`config.json` (the constructor arguments, plus `_class_name`, `_diffusers_version` and other
underscore-prefixed bookkeeping) and `diffusion_pytorch_model.safetensors` (the state dict; sharded
folders through `diffusion_pytorch_model.safetensors.index.json`). `load(folder)` returns
`(pofx.diffusion.unet.UNetConfig, params)`; `save(folder, config, params)` writes the same layout,
which `diffusers.UNet2DModel.from_pretrained(folder)` loads.

Weights: the parameter tree of `pofx.diffusion.unet` mirrors diffusers' module names, so a tensor
`down_blocks.1.attentions.0.to_q.weight` is `params["down_blocks"][1]["attentions"][0]["to_q"]
["kernel"]`. Layouts: convolutions are stored `[C_out, C_in, kh, kw]` (OIHW) by PyTorch and
`[kh, kw, C_in, C_out]` (HWIO) by pofx, linear weights `[out, in]` and `[in, out]`; GroupNorm
weights are pofx's `scale`, the class table's weight its `embedding`. Any float dtype is read
(float32, bfloat16, float16) and converted to float32; `save` writes float32 (exact) or bfloat16.

A `UNet2DConditionModel` folder (its `_class_name`) reads as a `unet.UNetConditionConfig`: the
same layout, its transformers' tensors named as diffusers' (`...attentions.0.transformer_blocks.0.
attn2.to_k.weight`, `...ff.net.0.proj.weight`, LayerNorm weights pofx's `scale`). Its `config.json`
also holds the arguments pofx does not model (`CONDITION_FIXED`): each must keep its one supported
value (diffusers' default), and `save` writes them.

Errors (ValueError, before any weight is converted) name the folder and what is wrong: a missing
file, a model class other than `UNet2DModel`, a `config.json` key pofx does not know or a value it
does not support (with the allowed values), missing or unexpected tensors (listed), a tensor of
the wrong shape. This module reads and writes files when called; it holds no state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Tuple

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from pofx.diffusion import unet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CLASS_NAME = "UNet2DModel"
CONDITION_CLASS_NAME = "UNet2DConditionModel"
CLASS_NAMES = (CLASS_NAME, CONDITION_CLASS_NAME)
DIFFUSERS_VERSION = "0.42.1"  # the version whose format this module was checked against
EXPORT_DTYPES = ("float32", "bfloat16")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_FIELDS = tuple(f.name for f in dataclasses.fields(unet.UNetConfig))
_CONDITION_FIELDS = tuple(f.name for f in dataclasses.fields(unet.UNetConditionConfig))
# The UNet2DConditionModel arguments pofx does not model, with the one value it supports (diffusers'
# default, written by save_pretrained): a folder that changes one is refused.
CONDITION_FIXED = {
  "only_cross_attention": False,
  "reverse_transformer_layers_per_block": None,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "num_attention_heads": None,
  "dual_cross_attention": False,
  "class_embed_type": None,
  "addition_embed_type": None,
  "addition_time_embed_dim": None,
  "upcast_attention": False,
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "time_embedding_type": "positional",
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "time_cond_proj_dim": None,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "projection_class_embeddings_input_dim": None,
  "attention_type": "default",
  "class_embeddings_concat": False,
  "mid_block_only_cross_attention": None,
  "cross_attention_norm": None,
  "addition_embed_type_num_heads": 64,
}


def _path_name(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      raise ValueError(f"unexpected parameter tree key {k!r}")
  return ".".join(parts[:-1] + [_LEAF_TO_TORCH[parts[-1]]])


def _torch_shape(shape, leaf: str) -> Tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _to_pofx(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and x.ndim == 4:
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  if leaf == "kernel" and x.ndim == 2:
    return np.ascontiguousarray(x.T)
  return x


def _to_torch(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and x.ndim == 4:
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  if leaf == "kernel" and x.ndim == 2:
    return np.ascontiguousarray(x.T)
  return x


def _expected(config):
  """(treedef, [(torch name, leaf kind, pofx shape)]) of the parameters of `config`."""
  shapes = unet.param_shapes(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, s in leaves:
    out.append((_path_name(path), str(path[-1].key), tuple(s.shape)))
  return treedef, out


def weight_names(config) -> Tuple[str, ...]:
  """The state-dict names of the diffusers `UNet2DModel` (`UNet2DConditionModel`) of `config`, in
  pofx's tree order."""
  return tuple(name for name, _, _ in _expected(config)[1])


def config_from_diffusers(raw: Dict[str, Any], where: str = "config.json"):
  """A `UNetConfig` (`_class_name` UNet2DModel) or `UNetConditionConfig` (UNet2DConditionModel) from
  the dict of a diffusers `config.json` (bookkeeping keys `_*` ignored)."""
  cls = raw.get("_class_name", CLASS_NAME)
  if cls not in CLASS_NAMES:
    raise ValueError(f"{where}: _class_name is {cls!r}; pofx reads {list(CLASS_NAMES)} folders only.")
  conditional = cls == CONDITION_CLASS_NAME
  fields = _CONDITION_FIELDS if conditional else _FIELDS
  fixed = CONDITION_FIXED if conditional else {}
  unknown = sorted(k for k in raw if not k.startswith("_") and k not in fields and k not in fixed)
  if unknown:
    raise ValueError(f"{where}: unknown {cls} config keys {unknown}; known: {list(fields) + list(fixed)}.")
  for k, allowed in fixed.items():
    if k in raw and raw[k] != allowed:
      raise ValueError(f"{where}: {cls} {k}={raw[k]!r} is not supported; pofx supports only {allowed!r}.")
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in fields}
  try:
    return (unet.UNetConditionConfig if conditional else unet.UNetConfig)(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from None


def config_to_diffusers(config) -> Dict[str, Any]:
  """The `config.json` dict diffusers writes for `config`."""
  conditional = isinstance(config, unet.UNetConditionConfig)
  out = {"_class_name": CONDITION_CLASS_NAME if conditional else CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION}
  for f in _CONDITION_FIELDS if conditional else _FIELDS:
    v = getattr(config, f)
    out[f] = list(v) if isinstance(v, tuple) else v
  if conditional:
    out.update(CONDITION_FIXED)
  return out


def _weight_files(folder: str):
  index = os.path.join(folder, WEIGHTS_INDEX_NAME)
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      return sorted({os.path.join(folder, n) for n in json.load(f)["weight_map"].values()})
  single = os.path.join(folder, WEIGHTS_NAME)
  if not os.path.exists(single):
    present = sorted(os.listdir(folder))
    raise ValueError(
      f"{folder}: no {WEIGHTS_NAME} (pofx reads diffusers' safetensors weights only; the folder holds {present})."
    )
  return [single]


def _short(names, n=8) -> str:
  names = sorted(names)
  return str(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def load(folder: str) -> Tuple[Any, Any]:
  """`(config, params)` of a diffusers `UNet2DModel` or `UNet2DConditionModel` folder; params
  float32 (see the module docstring for the errors)."""
  if not os.path.isdir(folder):
    raise ValueError(f"{folder}: not a directory (expected a diffusers UNet2DModel folder).")
  cfg_path = os.path.join(folder, CONFIG_NAME)
  if not os.path.exists(cfg_path):
    raise ValueError(
      f"{folder}: no {CONFIG_NAME} (a diffusers UNet2DModel folder has {CONFIG_NAME} and {WEIGHTS_NAME})."
    )
  with open(cfg_path, encoding="utf-8") as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_path}: not valid JSON ({e}).") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{cfg_path}: expected a JSON object of UNet2DModel arguments.")
  config = config_from_diffusers(raw, cfg_path)

  treedef, expected = _expected(config)
  files = _weight_files(folder)
  handles = {}
  for file in files:
    with safetensors.safe_open(file, framework="numpy") as f:
      for name in f.keys():
        handles[name] = file
  names = {n for n, _, _ in expected}
  missing, extra = names - handles.keys(), handles.keys() - names
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"missing tensors {_short(missing)}")
    if extra:
      parts.append(f"unexpected tensors {_short(extra)}")
    raise ValueError(f"{folder}: the weights do not match config.json: " + "; ".join(parts) + ".")

  tensors = {}
  for file in files:
    # numpy arrays (bfloat16 as ml_dtypes'), converted to float32 below. A safetensors whose numpy
    # reader lacks a dtype falls back to its flax reader for that tensor (which makes a JAX array,
    # at the cost of a small compilation per shape).
    with safetensors.safe_open(file, framework="numpy") as f, safetensors.safe_open(file, framework="flax") as g:
      for name in f.keys():
        try:
          tensors[name] = f.get_tensor(name)
        except (TypeError, ValueError):
          tensors[name] = g.get_tensor(name)
  leaves = []
  for name, leaf, shape in expected:
    x = np.asarray(tensors[name])
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16):
      raise ValueError(f"{folder}: tensor {name} has dtype {x.dtype}; expected a float dtype.")
    if tuple(x.shape) != _torch_shape(shape, leaf):
      raise ValueError(
        f"{folder}: tensor {name} has shape {tuple(x.shape)}; config.json implies {_torch_shape(shape, leaf)}."
      )
    leaves.append(_to_pofx(x.astype(np.float32), leaf))
  return config, jax.tree_util.tree_unflatten(treedef, leaves)


def save(folder: str, config, params: Any, dtype: str = "float32") -> str:
  """Writes `config.json` and `diffusion_pytorch_model.safetensors` (weights in `dtype`: float32 or
  bfloat16) to `folder` (created), loadable by `diffusers.UNet2DModel.from_pretrained(folder)`
  (`UNet2DConditionModel` for a `UNetConditionConfig`).
  The parameter tree is checked against `config` before anything is written. Returns `folder`."""
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"diffusers_io.save: dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}.")
  treedef, expected = _expected(config)
  leaves, got_def = jax.tree_util.tree_flatten(params)
  if got_def != treedef:
    raise ValueError("diffusers_io.save: the parameter tree does not match the config's (another config's params?).")
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  state = {}
  for (name, leaf, shape), x in zip(expected, leaves):
    x = np.asarray(x, dtype=np.float32)
    if tuple(x.shape) != shape:
      raise ValueError(f"diffusers_io.save: parameter {name} has shape {tuple(x.shape)}; the config implies {shape}.")
    state[name] = _to_torch(x, leaf).astype(np_dtype)
  os.makedirs(folder, exist_ok=True)
  safetensors.numpy.save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
  with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump(config_to_diffusers(config), f, indent=2, sort_keys=True)
  return folder
