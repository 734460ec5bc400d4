r"""Hugging Face model folders in both directions: `config.json` + `*.safetensors` <-> pofx.

    config, params = pofx.models.hf.load_pretrained("path/to/hf_folder")        # read
    model = pofx.models.make(config)
    pofx.models.hf.save_pretrained("out/", params, config)                      # write
    # transformers.AutoModelForCausalLM.from_pretrained("out/") gives the same logits

Families (Hugging Face `model_type` -> the `LlamaConfig` switches of the one pofx decoder,
`pofx.models.llama`; docs/models.md):

| model_type | switches |
|---|---|
| `llama` | none (RoPE with Llama 3 or linear scaling) |
| `mistral` | `sliding_window` on every layer |
| `qwen2` | `qkv_bias`; sliding layers from `max_window_layers` when `use_sliding_window` |
| `qwen3` | `qk_norm`; sliding layers as Qwen2 |
| `gemma2` | `norm_offset=1`, `sandwich_norms`, `mlp_activation="gelu_tanh"`, `scale_embeddings`, `query_pre_attn_scalar`, both soft-caps, alternating sliding / full layers |
| `gemma3_text` | Gemma 2's switches (soft-caps usually off) + `qk_norm`, `rope_local_theta` for the sliding layers, five sliding layers per full one |

`config_from_hf(dict)` reads a `config.json` (the current `rope_parameters` form and the older
`rope_theta` / `rope_scaling` / `rope_local_base_freq` / `sliding_window_pattern` keys) and
refuses what the decoder does not compute (another `model_type`, a RoPE kind other than default /
llama3 / linear, biases on other projections, another activation, partial rotary, bidirectional
attention, quantised weights) with an error naming the key, its value and what is allowed. A key
missing from the file takes the value transformers' config class gives it.

`config_to_hf(config, model_type=None)` writes the `config.json` of the family (inferred from the
switches when not given) and refuses a config the family cannot express: the written dict is read
back with `config_from_hf` and every field that does not come back is named.

Weights: every `*.safetensors` file of the folder (sharded folders through
`model.safetensors.index.json`), any dtype (bfloat16 too), converted with
`pofx.models.llama.params_from_hf`; written as one `model.safetensors` in float32 (exact) or
bfloat16. This module reads files; it is a library function a program calls, it holds no state.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from pofx import options
from pofx.models import llama

MODEL_TYPES = options.HF_MODEL_TYPES
ROPE_TYPES = ("default", "llama3", "linear")
EXPORT_DTYPES = ("float32", "bfloat16")

_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "gemma3_text": "Gemma3ForCausalLM",
}
_GEMMA = ("gemma2", "gemma3_text")
_QWEN = ("qwen2", "qwen3")

# What transformers' config class of each family gives a key that a config.json leaves out.
_DEFAULTS: Dict[str, Dict[str, Any]] = {
  "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", rope_theta=10000.0),
  "mistral": dict(
    num_key_value_heads=8,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    rope_theta=10000.0,
    sliding_window=4096,
  ),
  "qwen2": dict(
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    rope_theta=10000.0,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
  ),
  "qwen3": dict(
    head_dim=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    rope_theta=10000.0,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
  ),
  "gemma2": dict(
    num_key_value_heads=4,
    head_dim=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
    rope_theta=10000.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
  ),
  "gemma3_text": dict(
    num_key_value_heads=4,
    head_dim=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    sliding_window_pattern=6,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
  ),
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
# Fields of a LlamaConfig that say how pofx computes, not what the model is (not in config.json).
_RUNTIME_FIELDS = ("dtype", "param_dtype", "init_std", "remat", "remat_policy", "dropout")


def _err(key: str, value, allowed: str) -> ValueError:
  return ValueError(f"config.json: {key}={value!r} is not supported; {allowed}.")


def _rope(hf: Mapping[str, Any], mt: str, get) -> Tuple[dict, Optional[dict]]:
  """(global RoPE parameters, local RoPE parameters or None) from either config.json form."""
  rp = hf.get("rope_parameters")
  if rp is not None and not isinstance(rp, Mapping):
    raise _err("rope_parameters", rp, "a dict is expected")
  local = None
  if rp is not None and any(k in rp for k in options.ATTENTION_LAYER_TYPES):  # per layer type
    glob = dict(rp.get("full_attention") or {})
    local = dict(rp.get("sliding_attention") or {})
  elif rp is not None:
    glob = dict(rp)
  else:
    glob = dict(hf.get("rope_scaling") or {})
    if mt == "gemma3_text":
      local = {"rope_type": "default", "rope_theta": get("rope_local_base_freq")}
  glob.setdefault("rope_theta", get("rope_theta"))
  if local is not None:
    local.setdefault("rope_theta", get("rope_local_base_freq") if mt == "gemma3_text" else glob["rope_theta"])
  for name, params in (("rope (global)", glob), ("rope (sliding layers)", local)):
    if params is None:
      continue
    kind = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = kind
    allowed = ROPE_TYPES if name == "rope (global)" else ("default",)
    if kind not in allowed:
      raise _err(f"{name} rope_type", kind, f"allowed: {list(allowed)}")
    prf = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if prf not in (None, 1, 1.0):
      raise _err("partial_rotary_factor", prf, "pofx rotates the whole head (1.0)")
  return glob, local


def config_from_hf(hf: Mapping[str, Any], **overrides) -> llama.LlamaConfig:
  """The `LlamaConfig` of a Hugging Face `config.json` dict (module docstring); `overrides` are
  `LlamaConfig` fields set on top (e.g. `dtype="bfloat16"`, `remat=True`). ValueError, naming
  the key, for what pofx does not compute."""
  mt = hf.get("model_type")
  if mt not in MODEL_TYPES:
    hint = " (for Gemma 3 use the text model's config, model_type 'gemma3_text')" if mt == "gemma3" else ""
    raise _err("model_type", mt, f"allowed: {list(MODEL_TYPES)}{hint}")
  defaults = _DEFAULTS[mt]

  def get(key):
    return hf[key] if key in hf else defaults.get(key)

  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    if not isinstance(hf.get(key), int):
      raise ValueError(f"config.json: {key} is missing or not an integer (got {hf.get(key)!r}).")
  if hf.get("quantization_config"):
    raise _err("quantization_config", "...", "pofx reads unquantised weights only")
  act_key = "hidden_activation" if mt in _GEMMA else "hidden_act"
  act = get(act_key)
  if mt in _GEMMA and act is None:
    act = hf.get("hidden_act")
  if act not in _ACTIVATIONS:
    raise _err(act_key, act, f"allowed: {sorted(_ACTIVATIONS)}")
  bias = bool(hf.get("attention_bias", False))
  if bias and mt != "qwen2":
    raise _err("attention_bias", True, "pofx has biases on q, k and v only, as Qwen2 (model_type 'qwen2')")
  if hf.get("mlp_bias"):
    raise _err("mlp_bias", True, "pofx's MLP has no biases")
  if hf.get("use_bidirectional_attention"):
    raise _err("use_bidirectional_attention", True, "pofx's decoder is causal")
  if hf.get("attention_chunk_size") or hf.get("no_rope_layers"):
    raise _err("attention_chunk_size / no_rope_layers", "set", "not computed by pofx")
  n = hf["num_hidden_layers"]
  heads = hf["num_attention_heads"]
  head_dim = get("head_dim")
  glob, local = _rope(hf, mt, get)

  window = get("sliding_window")
  layer_types = hf.get("layer_types")
  if mt == "llama":  # Llama has no sliding window
    window, layer_types = None, None
  elif mt == "mistral":
    layer_types = None  # every layer slides when a window is set
  elif mt in _QWEN:
    if not get("use_sliding_window"):
      window, layer_types = None, None
    elif layer_types is None:
      m = get("max_window_layers")
      layer_types = ["sliding_attention" if i >= m else "full_attention" for i in range(n)]
  elif layer_types is None:  # Gemma
    every = 2 if mt == "gemma2" else int(get("sliding_window_pattern"))
    layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
  if layer_types is not None and "sliding_attention" not in layer_types:
    window, layer_types = None, None
  if layer_types is not None and set(layer_types) == {"sliding_attention"}:
    layer_types = None
  if layer_types is not None and mt not in _GEMMA and mt not in _QWEN:
    raise _err("layer_types", layer_types, f"{mt} has no per-layer attention kinds")

  rope_scaling, linear = None, None
  if glob["rope_type"] == "llama3":
    rope_scaling = (
      float(glob["factor"]),
      float(glob["low_freq_factor"]),
      float(glob["high_freq_factor"]),
      int(glob["original_max_position_embeddings"]),
    )
  elif glob["rope_type"] == "linear":
    linear = float(glob["factor"])
  local_theta = None
  if local is not None and (float(local["rope_theta"]) != float(glob["rope_theta"]) or glob["rope_type"] != "default"):
    local_theta = float(local["rope_theta"])
  gemma = mt in _GEMMA
  fields = dict(
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    num_layers=n,
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or get("num_key_value_heads") or heads,
    mlp_size=hf["intermediate_size"],
    head_dim=head_dim,
    rope_theta=float(glob["rope_theta"]),
    rope_scaling=rope_scaling,
    rope_linear_factor=linear,
    rms_norm_eps=float(get("rms_norm_eps")),
    tie_embeddings=bool(get("tie_word_embeddings")),
    qkv_bias=mt == "qwen2",
    qk_norm=mt in ("qwen3", "gemma3_text"),
    norm_offset=1.0 if gemma else 0.0,
    sandwich_norms=gemma,
    mlp_activation=_ACTIVATIONS[act],
    scale_embeddings=gemma,
    query_pre_attn_scalar=float(get("query_pre_attn_scalar")) if gemma else None,
    attn_logit_softcap=float(get("attn_logit_softcapping")) if gemma and get("attn_logit_softcapping") else None,
    final_logit_softcap=float(get("final_logit_softcapping")) if gemma and get("final_logit_softcapping") else None,
    sliding_window=None if window is None else int(window),
    layer_types=None if layer_types is None else tuple(layer_types),
    rope_local_theta=local_theta,
    max_position_embeddings=hf.get("max_position_embeddings"),
  )
  fields.update(overrides)
  return llama.LlamaConfig(**fields)


def family(config: llama.LlamaConfig) -> str:
  """The Hugging Face `model_type` whose switches a config uses (module docstring)."""
  if config.sandwich_norms:
    return "gemma3_text" if config.qk_norm else "gemma2"
  if config.qk_norm:
    return "qwen3"
  if config.qkv_bias:
    return "qwen2"
  if config.sliding_window is not None:
    return "mistral"
  return "llama"


def config_to_hf(config: llama.LlamaConfig, model_type: Optional[str] = None, *, dtype: str = "float32") -> dict:
  """The `config.json` dict of `config` as a Hugging Face `model_type` (default: `family`).
  ValueError naming every field the family cannot express."""
  mt = family(config) if model_type is None else model_type
  if mt not in MODEL_TYPES:
    raise ValueError(f"config_to_hf: model_type {mt!r} is not supported; allowed: {list(MODEL_TYPES)}.")
  c = config
  hd = c.resolved_head_dim
  out: Dict[str, Any] = {
    "model_type": mt,
    "architectures": [_ARCHITECTURES[mt]],
    "vocab_size": c.vocab_size,
    "hidden_size": c.hidden_size,
    "intermediate_size": c.mlp_size,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "rms_norm_eps": c.rms_norm_eps,
    "tie_word_embeddings": c.tie_embeddings,
    "max_position_embeddings": c.max_position_embeddings or 8192,
    "torch_dtype": dtype,
    "attention_dropout": 0.0,
  }
  if c.head_dim is not None or mt in ("qwen3",) + _GEMMA:  # these families' defaults are not D / heads
    out["head_dim"] = hd
  glob: Dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    f, low, high, old = c.rope_scaling
    glob.update(
      rope_type="llama3", factor=f, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=old
    )
  elif c.rope_linear_factor is not None:
    glob.update(rope_type="linear", factor=c.rope_linear_factor)
  types = list(c.resolved_layer_types)
  if mt in _GEMMA:
    out["hidden_activation"] = _HF_ACTIVATION[c.mlp_activation]
    qpas = c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else hd
    out["query_pre_attn_scalar"] = int(qpas) if float(qpas).is_integer() else qpas  # an int in transformers
    out["attn_logit_softcapping"] = c.attn_logit_softcap
    out["final_logit_softcapping"] = c.final_logit_softcap
    out["attention_bias"] = False
    out["sliding_window"] = c.sliding_window or 4096
    out["layer_types"] = types
    if mt == "gemma3_text":
      local = {"rope_type": "default", "rope_theta": c.rope_local_theta or c.rope_theta}
      out["rope_parameters"] = {"full_attention": glob, "sliding_attention": local}
  else:
    out["hidden_act"] = _HF_ACTIVATION[c.mlp_activation]
    if mt in _QWEN:
      sliding = "sliding_attention" in types
      first = types.index("sliding_attention") if sliding else c.num_layers
      out.update(use_sliding_window=sliding, sliding_window=c.sliding_window, max_window_layers=first)
      out["layer_types"] = types
      if mt == "qwen3":
        out["attention_bias"] = False
    elif mt == "mistral":
      out["sliding_window"] = c.sliding_window
    else:
      out.update(attention_bias=False, mlp_bias=False)
  if "rope_parameters" not in out:
    out["rope_parameters"] = glob
  # The older keys too, for tools that read config.json without transformers 5.
  out["rope_theta"] = c.rope_theta
  if glob["rope_type"] != "default":
    out["rope_scaling"] = {k: v for k, v in glob.items() if k != "rope_theta"}
  if mt == "gemma3_text":
    out["rope_local_base_freq"] = c.rope_local_theta or c.rope_theta
  back = config_from_hf(out, **{f: getattr(c, f) for f in _RUNTIME_FIELDS})
  differ = [
    f"{f}={getattr(c, f)!r}"
    for f in llama.LlamaConfig.__dataclass_fields__
    if getattr(back, f) != getattr(c, f)
    and not (f == "max_position_embeddings" and c.max_position_embeddings is None)
    and not (f == "query_pre_attn_scalar" and math.isclose(back.attention_scale, c.attention_scale, rel_tol=1e-12))
    and not (f == "head_dim" and back.resolved_head_dim == c.resolved_head_dim)
  ]
  if differ:
    raise ValueError(
      f"config_to_hf: a {mt!r} model cannot express {', '.join(differ)} (the family pofx infers for this config "
      f"is {family(c)!r})."
    )
  return out


# Files -------------------------------------------------------------------------------------------


def _safetensors_files(path: str):
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      return sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
  files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
  if not files:
    raise ValueError(f"{path}: no *.safetensors weights (pofx reads safetensors only).")
  return files


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Every tensor of the folder's safetensors files, as numpy arrays (bfloat16 as `ml_dtypes`)."""
  out = {}
  for file in _safetensors_files(path):
    with safetensors.safe_open(file, framework="flax") as f:
      for name in f.keys():
        out[name] = np.asarray(f.get_tensor(name))
  return out


def load_pretrained(path: str, **overrides) -> Tuple[llama.LlamaConfig, Any]:
  """`(config, params)` of a Hugging Face folder (`config.json` + safetensors weights).

  `overrides` are `LlamaConfig` fields set on the read config (`dtype`, `param_dtype`, `remat`,
  ...). Errors (ValueError) name the unsupported `config.json` key or the missing / unexpected
  weight, before any weight is converted.
  """
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{path}: no config.json (a Hugging Face model folder has config.json and *.safetensors).")
  with open(cfg_path, encoding="utf-8") as f:
    config = config_from_hf(json.load(f), **overrides)
  return config, llama.params_from_hf(read_state_dict(path), config)


def save_pretrained(
  path: str,
  params: Any,
  config: llama.LlamaConfig,
  *,
  model_type: Optional[str] = None,
  dtype: str = "float32",
  extra_config: Optional[Mapping[str, Any]] = None,
) -> str:
  """Writes `config.json` and `model.safetensors` (weights in `dtype`, float32 or bfloat16) to
  the folder `path` (created) so that `transformers.AutoModelForCausalLM.from_pretrained(path)`
  loads the model; `extra_config` keys (e.g. `bos_token_id`, `eos_token_id`) are added to
  `config.json`. Returns `path`. The config is checked (`config_to_hf`) before anything is
  written."""
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"save_pretrained: dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}.")
  hf_config = config_to_hf(config, model_type, dtype=dtype)
  hf_config.update(extra_config or {})
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  state = llama.params_to_hf(params, config, np_dtype)
  os.makedirs(path, exist_ok=True)
  safetensors.numpy.save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return path
