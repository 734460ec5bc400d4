r"""LoRA: low-rank adapters on the projections of `pofx.models.llama`, the base frozen.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685), Sec. 4.1,
Eq. (3): a frozen weight `W0` is adapted as `h = W0 x + (alpha / r) B A x`, with `A` of shape
`[r, in]`, `B` of shape `[out, r]`, `B = 0` at initialisation (so training starts at the base
model) and `A` random; only `A` and `B` are trained.

pofx's kernels are `[in, out]` (`y = x @ W`), so the adapters are stored in that layout:
`a = A^T [in, r]`, `b = B^T [r, out]`, and the adapted kernel is

    W = W0 + (alpha / r) * a @ b.

The adapters are a pytree beside the base, with the base's paths:
`{"layers_i": {"attn": {"q_proj": {"a": [in, r], "b": [r, out]}, ...}, "mlp": {...}}}`. `init`
adapts every block; a tree with entries for some blocks only (PEFT's `layers_to_transform`)
adapts those, and `apply`, `merge` and `unmerge` leave the other blocks as the base's (the PEFT
layout is for trees of every block: `to_peft` writes no `layers_to_transform` and `from_peft` reads
every block).

`apply(base, adapters, spec)` returns the model's parameter tree for a training forward. With
`spec.dropout == 0` (the folded form) each targeted kernel is replaced by `W0 + (alpha / r) a @ b`
(computed in float32, cast to the kernel's dtype); the model code sees ordinary kernels and casts
to its compute dtype as usual, so LoRA works in any compute dtype. With `spec.dropout > 0` (the
branch form, PEFT's `lora_dropout`) each targeted projection keeps `W0` and carries its adapter
branch, `{"kernel": W0, "lora_a": a, "lora_b": (alpha / r) b, "lora_dropout": rate}`, which
`pofx.models.llama` computes as

    y = x W0 + dropout(x) a (alpha / r) b

(inverted dropout keyed by the forward's `dropout_key`, a fresh mask per projection; without a
key, no dropout: the same function as the folded form up to float rounding). Gradients reach `a`
and `b` through the sum or the branch; the base is an argument, never an optimizer variable.
`merge` is the folded sum whatever the dropout (evaluation, references, sampling, export),
`unmerge` subtracts it again.

Initialisation follows PEFT's default (`init_lora_weights=True`): `A` Kaiming-uniform with
`a = sqrt(5)`, i.e. uniform in `[-1/sqrt(in), 1/sqrt(in)]`, and `B = 0`.

PEFT layout (`to_peft`, `from_peft`): the state dict of `peft.get_peft_model_state_dict` for a
Hugging Face `LlamaForCausalLM`: `base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.
lora_{A,B}.weight` and `...mlp.{gate,up,down}_proj.lora_{A,B}.weight`, with `lora_A.weight = A
[r, in]` and `lora_B.weight = B [out, r]`, and the `adapter_config.json` fields of a `LoraConfig`.
Files are written by programs (`experiments/`), not here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pofx import options

Params = Any

# pofx module path of each target (PEFT / Hugging Face Llama module names).
_MODULE = {
  "q_proj": ("attn", "self_attn"),
  "k_proj": ("attn", "self_attn"),
  "v_proj": ("attn", "self_attn"),
  "o_proj": ("attn", "self_attn"),
  "gate_proj": ("mlp", "mlp"),
  "up_proj": ("mlp", "mlp"),
  "down_proj": ("mlp", "mlp"),
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections carry adapters and how they are scaled.

  Attributes:
    rank: r >= 1.
    alpha: the scale numerator; the update is `(alpha / rank) a @ b` (arXiv:2106.09685, Sec. 4.1).
    targets: names from `pofx.options.LORA_TARGETS` (Hugging Face / PEFT module names).
    dropout: PEFT's `lora_dropout`, in [0, 1): dropout on the adapter branch's input during
      training (`apply` then builds the branch form; see the module docstring). Written to the
      PEFT config.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
  dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1:
      raise ValueError(f"LoraSpec.rank={self.rank!r}; allowed: an integer >= 1.")
    if not float(self.alpha) > 0:
      raise ValueError(f"LoraSpec.alpha={self.alpha!r}; allowed: a number > 0.")
    if not self.targets:
      raise ValueError(f"LoraSpec.targets is empty; allowed: a non-empty subset of {list(options.LORA_TARGETS)}.")
    bad = [t for t in self.targets if t not in options.LORA_TARGETS]
    if bad or len(set(self.targets)) != len(self.targets):
      raise ValueError(
        f"LoraSpec.targets={list(self.targets)!r}; allowed: distinct names from {list(options.LORA_TARGETS)}."
      )
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"LoraSpec.dropout={self.dropout!r}; allowed: 0 <= dropout < 1.")

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)


def _layers(base: Params):
  names = sorted((k for k in base if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
  if not names:
    raise ValueError("pofx.lora: the parameters have no `layers_i` blocks; expected a pofx.models.llama tree.")
  return names


def init(base: Params, spec: LoraSpec, rng: jax.Array) -> Params:
  """Adapters for `base` (a `pofx.models.llama` parameter tree): `a` uniform in
  `[-1/sqrt(in), 1/sqrt(in)]` (PEFT's Kaiming-uniform, a = sqrt(5)), `b = 0`, float32."""
  out = {}
  keys = iter(jax.random.split(rng, len(_layers(base)) * len(spec.targets)))
  for layer in _layers(base):
    out[layer] = {}
    for t in spec.targets:
      group = _MODULE[t][0]
      w = base[layer][group][t]["kernel"]
      fan_in, fan_out = w.shape
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(next(keys), (fan_in, spec.rank), jnp.float32, -bound, bound)
      out[layer].setdefault(group, {})[t] = {"a": a, "b": jnp.zeros((spec.rank, fan_out), jnp.float32)}
  return out


def _delta(ab, scale):
  a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
  return scale * jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


def _map_adapted(base: Params, adapters: Params, fn) -> Params:
  """`base` with each adapted projection's parameters `p` replaced by `fn(p, {"a", "b"})`; the
  rest of the tree shared, not copied."""
  out = dict(base)
  for layer, groups in adapters.items():
    out[layer] = dict(base[layer])
    for group, mods in groups.items():
      out[layer][group] = dict(base[layer][group])
      for name, ab in mods.items():
        out[layer][group][name] = fn(base[layer][group][name], ab)
  return out


def _combine(base: Params, adapters: Params, scale: float, sign: float) -> Params:
  def fold(p, ab):
    w = p["kernel"]
    return {**p, "kernel": (w.astype(jnp.float32) + sign * _delta(ab, scale)).astype(w.dtype)}

  return _map_adapted(base, adapters, fold)


def _branches(base: Params, adapters: Params, scale: float, rate: float) -> Params:
  def branch(p, ab):
    return {
      **p,
      "lora_a": ab["a"].astype(jnp.float32),
      "lora_b": scale * ab["b"].astype(jnp.float32),
      "lora_dropout": jnp.asarray(rate, jnp.float32),
    }

  return _map_adapted(base, adapters, branch)


def apply(base: Params, adapters: Params, spec: LoraSpec) -> Params:
  """The model's parameters for a training forward (arXiv:2106.09685, Eq. 3); differentiable in
  `adapters` (and `base`, which callers hold fixed).

  `spec.dropout == 0`: every adapted kernel folded, `W0 + (alpha / r) a @ b` (`merge`).
  `spec.dropout > 0`: every adapted projection as `{"kernel": W0, "lora_a": a, "lora_b":
  (alpha / r) b, "lora_dropout": spec.dropout}`, the branch form `x W0 + dropout(x) a (alpha / r) b`
  that `pofx.models.llama` computes, with dropout only in a forward given a `dropout_key`
  (PEFT's `LoraLayer` with `lora_dropout`)."""
  if float(spec.dropout) > 0.0:
    return _branches(base, adapters, spec.scale, float(spec.dropout))
  return _combine(base, adapters, spec.scale, 1.0)


def merge(base: Params, adapters: Params, spec: LoraSpec) -> Params:
  """Folds the adapters into the base: `W0 + (alpha / r) a @ b` (for export)."""
  return _combine(base, adapters, spec.scale, 1.0)


def unmerge(merged: Params, adapters: Params, spec: LoraSpec) -> Params:
  """Undoes `merge`: `W - (alpha / r) a @ b` (equal to the base up to float rounding)."""
  return _combine(merged, adapters, spec.scale, -1.0)


def num_params(adapters: Params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(adapters)))


# PEFT layout -------------------------------------------------------------------------------------


def _peft_key(layer: str, target: str, which: str) -> str:
  i = int(layer.split("_")[1])
  return f"base_model.model.model.layers.{i}.{_MODULE[target][1]}.{target}.lora_{which}.weight"


def to_peft(adapters: Params, spec: LoraSpec) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """`(state_dict, adapter_config)` in PEFT's layout (see the module docstring): float32 numpy
  arrays `lora_A.weight = a^T [r, in]`, `lora_B.weight = b^T [out, r]`, and the `LoraConfig`
  fields (`r`, `lora_alpha`, `target_modules`, `lora_dropout`, ...)."""
  state = {}
  for layer, groups in adapters.items():
    for _, mods in groups.items():
      for t, ab in mods.items():
        state[_peft_key(layer, t, "A")] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
        state[_peft_key(layer, t, "B")] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": int(spec.rank),
    "lora_alpha": float(spec.alpha),
    "lora_dropout": float(spec.dropout),
    "target_modules": sorted(spec.targets),
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "base_model_name_or_path": None,
    "inference_mode": True,
  }
  return state, config


def spec_from_peft(config: Mapping[str, Any]) -> LoraSpec:
  """The `LoraSpec` of a PEFT `adapter_config.json` dict; refuses variants pofx does not compute."""
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"PEFT adapter of type {config.get('peft_type')!r}; allowed: 'LORA'.")
  for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
    if config.get(field):
      raise ValueError(f"PEFT adapter with {field}=True; pofx reads plain LoRA adapters only.")
  if config.get("bias", "none") != "none":
    raise ValueError(f"PEFT adapter with bias={config.get('bias')!r}; allowed: 'none'.")
  if config.get("rank_pattern") or config.get("alpha_pattern"):
    raise ValueError("PEFT adapter with rank_pattern/alpha_pattern; pofx reads one rank and alpha for all.")
  targets = config.get("target_modules")
  if isinstance(targets, str):
    raise ValueError(f"PEFT adapter with a regex target_modules={targets!r}; allowed: a list of module names.")
  return LoraSpec(
    rank=int(config["r"]),
    alpha=float(config["lora_alpha"]),
    targets=tuple(sorted(targets)),
    dropout=float(config.get("lora_dropout", 0.0)),
  )


def from_peft(state: Mapping[str, Any], spec: LoraSpec, num_layers: int) -> Params:
  """Adapters from a PEFT state dict (arrays indexable as numpy; the inverse of `to_peft`)."""
  out = {}
  for i in range(num_layers):
    layer = f"layers_{i}"
    out[layer] = {}
    for t in spec.targets:
      ka, kb = _peft_key(layer, t, "A"), _peft_key(layer, t, "B")
      if ka not in state or kb not in state:
        raise ValueError(f"PEFT state dict lacks {ka!r} or {kb!r} (targets {list(spec.targets)}, {num_layers} layers).")
      a, b = np.asarray(state[ka], np.float32), np.asarray(state[kb], np.float32)
      if a.shape[0] != spec.rank or b.shape[1] != spec.rank:
        raise ValueError(f"PEFT adapter {t} of layer {i}: rank {a.shape[0]}, expected r={spec.rank}.")
      out[layer].setdefault(_MODULE[t][0], {})[t] = {"a": jnp.asarray(a.T), "b": jnp.asarray(b.T)}
  return out
