r"""A Llama-family decoder-only language model, written once as pure functions of its parameters.

Architecture (the Hugging Face `LlamaForCausalLM` layout, so weights convert one to one):
token embedding -> N x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head.

- RMSNorm: `w * x / sqrt(mean(x^2) + eps)`, computed in float32 (Zhang & Sennrich 2019,
  arXiv:1910.07467).
- Rotary positions (RoPE, Su et al. 2021, arXiv:2104.09864; the "rotate-half" layout of HF/Meta)
  from **explicit** `positions` `[B, L]`, optionally with Llama 3 frequency scaling.
- Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245): `num_heads` query heads share
  `num_kv_heads` key/value heads.
- SwiGLU MLP (Shazeer 2020, arXiv:2002.05202): `down(silu(gate(x)) * up(x))`; no biases anywhere.
- Optional tied embeddings (LM head = embedding matrix transposed).
- Optional residual dropout (`LlamaConfig.dropout`, 0 by default; Vaswani et al. 2017,
  arXiv:1706.03762, Sec. 5.4 "Residual Dropout"): on the token embeddings and on each sub-layer's
  output (attention after its output projection, MLP) before it is added to the residual stream,
  kept entries scaled by 1 / (1 - rate). It acts only when `apply_fn` is given a `dropout_key`
  (training); without one, or with rate 0, the model is exactly the deterministic one.
- Optional LoRA adapter branches (PEFT's form of Hu et al. 2021, arXiv:2106.09685, Eq. 3, with
  PEFT's `lora_dropout` on the branch's input): a projection whose parameters hold
  `lora_a [in, r]`, `lora_b [r, out]` (already scaled by alpha / r) and `lora_dropout` (a scalar
  rate), as `pofx.lora.apply` builds them for training with adapter dropout, computes

      y = x W0 + dropout(x) lora_a lora_b

  with inverted dropout (entries kept with probability 1 - rate, scaled by 1 / (1 - rate)) when
  `apply_fn` is given a `dropout_key`, and `x W0 + x lora_a lora_b` without one. Each adapted
  projection draws its own mask: layer i's block key (the same key as its residual dropout),
  folded in with `LORA_DROPOUT_STREAM` and then with the projection's index in
  `LORA_PROJECTIONS` (`lora_dropout_key`). A projection without `lora_a` is the plain `x W0`.

Family switches (`LlamaConfig` fields whose defaults are Llama's; docs/models.md) make the same
decoder Mistral (sliding-window attention), Qwen2/2.5 (q/k/v biases), Qwen3 (QK-norm), Gemma 2
(offset RMSNorm, norms on the attention and MLP outputs, GELU-tanh, scaled embeddings, attention
and final logit soft-capping, alternating sliding and full layers) and Gemma 3 (Gemma 2's, with
QK-norm and a local RoPE base in the sliding layers). `pofx.models.hf` reads and writes their
Hugging Face folders.

Attention masking. Token i may attend to token j iff

    segment_ids[i] == segment_ids[j]  and  j <= i  (column order)  and
    (branch_ids[j] == 0  or  branch_ids[j] == branch_ids[i])

(`pofx.kernels.SegmentMask`). `segment_ids` 0 marks padding (padding only ever attends to
padding, so its outputs are finite garbage that callers mask out). `branch_ids` (optional,
default all 0) is the extra restriction that prompt sharing needs: in a row `[prompt | chosen |
rejected]` the prompt has branch 0 and the two completions branches 1 and 2, so each completion
sees the prompt and itself but not the other completion (see `pofx.batching`).

One block, three uses. `_block` (RMSNorm, grouped-query attention, SwiGLU MLP) is the only
transformer block. Training with dense attention (`apply_fn`), training with block-sparse
attention (`apply_fn(..., attention_blocks=...)`) and cached decoding (`decode`) run the same
block and differ only in the attention call handed to it. Every matrix product goes through the
injected `kernels.dot_general` and every attention through `kernels.attention` (a
`pofx.kernels.Kernels` record, `pofx.kernels.XLA` by default): training passes a
`pofx.kernels.SegmentMask` and the rotary tables `rope=(cos, sin)` (so a backend may rotate
inside its kernel), decoding rotates q and k itself before writing them to the cache and passes
a `pofx.kernels.CacheMask`. Activations travel as `[tokens, D]` matrices between the blocks.

Flax (`flax.linen`) only declares and initialises the parameter tree (a plain nested dict:
`embed/embedding`, `layers_i/{input_norm,post_attn_norm}/scale`,
`layers_i/attn/{q,k,v,o}_proj/kernel`, `layers_i/mlp/{gate,up,down}_proj/kernel`, `norm/scale`,
`lm_head`; with the switches also `layers_i/attn/{q,k,v}_proj/bias`, `layers_i/attn/{q,k}_norm/scale`,
`layers_i/{attn_out,mlp_out}_norm/scale`); the rest of pofx sees the model only through the pure functions `init_params`,
`apply_fn`, `lm_head`, `logits_fn`, `init_cache` and `decode`, or the `LlamaModel` record of
them that `make(config, kernels)` binds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pofx import kernels as kernels_lib
from pofx import options, sparse_attention

Array = jax.Array
Params = Any
Kernels = kernels_lib.Kernels

_REMAT_POLICIES = {
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}
MLP_ACTIVATIONS = options.MLP_ACTIVATIONS
LAYER_TYPES = options.ATTENTION_LAYER_TYPES
# The projections that can carry a LoRA branch, in the order that numbers their dropout keys.
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# fold_in constant of the LoRA dropout keys (ASCII "lora"), apart from the residual dropout's split.
LORA_DROPOUT_STREAM = 0x6C6F7261


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a Llama-family decoder. Frozen and hashable (usable as a static arg).

  Which kernels compute the products and the attention is not part of the config: they are
  injected (`make(config, kernels=...)`, `apply_fn(..., kernels=...)`).

  Attributes:
    vocab_size: vocabulary size V.
    hidden_size: model width D.
    num_layers: number of decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); must divide `num_heads`.
    mlp_size: SwiGLU inner width.
    head_dim: per-head width; None means `hidden_size // num_heads`.
    rope_theta: RoPE base wavelength.
    rope_scaling: None, or Llama 3 frequency scaling as a tuple
      `(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)`.
    rms_norm_eps: RMSNorm epsilon (HF `LlamaConfig` default 1e-6; Llama 3 checkpoints use 1e-5).
    tie_embeddings: if True the LM head is the embedding matrix transposed (no `lm_head` param).
    dtype: compute dtype name: "float32" or "bfloat16" (parameters always stay `param_dtype`).
    param_dtype: parameter dtype name (default "float32").
    init_std: standard deviation of the normal initialiser of every matrix (HF: 0.02).
    remat: wrap every block in `jax.checkpoint` to trade compute for memory.
    remat_policy: a name of `jax.checkpoint_policies` used when `remat` (see `_REMAT_POLICIES`).
    dropout: residual dropout rate in [0, 1) (see the module docstring); used only by an
      `apply_fn` call that passes a `dropout_key`.

  Family switches (docs/models.md; the defaults are Llama's and leave it bit for bit unchanged):
    qkv_bias: biases on the q, k and v projections (Qwen2, arXiv:2407.10671, section 2.1).
    qk_norm: RMSNorm over each head's `head_dim` of q and k, before RoPE (Qwen3,
      arXiv:2505.09388, section 2; Gemma 3).
    norm_offset: every RMSNorm multiplies by `norm_offset + w` (Gemma stores `w` with offset 1;
      its scales then initialise to 0). 0.0 for Llama.
    sandwich_norms: an extra RMSNorm on the attention output and on the MLP output before each
      residual add (Gemma 2, arXiv:2408.00118, section 2).
    mlp_activation: the gated MLP's activation, "silu" (SwiGLU) or "gelu_tanh" (GeGLU with the
      tanh approximation of GELU; Gemma).
    scale_embeddings: multiply the token embeddings by `sqrt(hidden_size)` (Gemma).
    query_pre_attn_scalar: the score scale is `query_pre_attn_scalar ** -0.5` (Gemma 2/3); None
      means `head_dim ** -0.5`.
    attn_logit_softcap: attention scores become `c * tanh(s / c)` before masking (Gemma 2).
    final_logit_softcap: LM-head logits become `c * tanh(z / c)` (Gemma 2).
    sliding_window: the window W of sliding-window attention (Mistral, arXiv:2310.06825, section
      2): in a sliding layer a token sees the W most recent positions, itself included.
    layer_types: per layer "full_attention" or "sliding_attention" (Hugging Face's names); None
      means every layer is sliding when `sliding_window` is set, else full.
    rope_local_theta: RoPE base of the sliding layers (Gemma 3's local layers; unscaled); None
      means they use the global RoPE.
    rope_linear_factor: linear position interpolation (positions divided by the factor; Chen et
      al. 2023, arXiv:2306.15595) of the global RoPE; exclusive with `rope_scaling`.
    max_position_embeddings: the context length the model was made for (Hugging Face's key of
      that name; other tools read it as the longest context). Not used by the computation; kept
      so that a loaded model exports with it (`pofx.models.hf`).
  """

  vocab_size: int = 4096
  hidden_size: int = 256
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 4
  mlp_size: int = 688
  head_dim: Optional[int] = None
  rope_theta: float = 10000.0
  rope_scaling: Optional[Tuple[float, float, float, int]] = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  dropout: float = 0.0
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_offset: float = 0.0
  sandwich_norms: bool = False
  mlp_activation: str = "silu"
  scale_embeddings: bool = False
  query_pre_attn_scalar: Optional[float] = None
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  sliding_window: Optional[int] = None
  layer_types: Optional[Tuple[str, ...]] = None
  rope_local_theta: Optional[float] = None
  rope_linear_factor: Optional[float] = None
  max_position_embeddings: Optional[int] = None

  def __post_init__(self):
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"LlamaConfig.dropout must be in [0, 1), got {self.dropout!r}.")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads}).")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
        f"LlamaConfig.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
        f"({self.num_heads}) unless head_dim is given."
      )
    if self.resolved_head_dim % 2:
      raise ValueError(f"LlamaConfig: the head dimension must be even for RoPE, got {self.resolved_head_dim}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"LlamaConfig.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}.")
    if self.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat_policy must be one of {sorted(_REMAT_POLICIES)}, got {self.remat_policy!r}.")
    if self.rope_scaling is not None:
      if len(self.rope_scaling) != 4:
        raise ValueError(
          "LlamaConfig.rope_scaling must be (factor, low_freq_factor, high_freq_factor, "
          f"original_max_position_embeddings), got {self.rope_scaling!r}."
        )
      object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(
        f"LlamaConfig.mlp_activation must be one of {list(MLP_ACTIVATIONS)}, got {self.mlp_activation!r}."
      )
    for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
      v = getattr(self, name)
      if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
        raise ValueError(f"LlamaConfig.{name} must be None or a positive number, got {v!r}.")
    if self.rope_linear_factor is not None:
      if not (isinstance(self.rope_linear_factor, (int, float)) and self.rope_linear_factor > 0):
        raise ValueError(
          f"LlamaConfig.rope_linear_factor must be None or a positive number, got {self.rope_linear_factor!r}."
        )
      if self.rope_scaling is not None:
        raise ValueError("LlamaConfig: rope_linear_factor and rope_scaling (Llama 3) cannot both be set.")
    w = self.sliding_window
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
      raise ValueError(f"LlamaConfig.sliding_window must be None or an integer >= 1, got {w!r}.")
    if self.layer_types is not None:
      types = tuple(self.layer_types)
      object.__setattr__(self, "layer_types", types)
      if len(types) != self.num_layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(
          f"LlamaConfig.layer_types must list one of {list(LAYER_TYPES)} per layer ({self.num_layers}), got {types!r}."
        )
      if "sliding_attention" in types and w is None:
        raise ValueError("LlamaConfig.layer_types has sliding_attention layers but sliding_window is None.")

  @property
  def resolved_layer_types(self) -> Tuple[str, ...]:
    """Each layer's attention: "full_attention" or "sliding_attention"."""
    if self.layer_types is not None:
      return self.layer_types
    return (("sliding_attention" if self.sliding_window is not None else "full_attention"),) * self.num_layers

  @property
  def attention_scale(self) -> float:
    """The factor on the attention scores: `query_pre_attn_scalar ** -0.5`, else `head_dim ** -0.5`."""
    if self.query_pre_attn_scalar is not None:
      return float(self.query_pre_attn_scalar) ** -0.5
    return kernels_lib.default_scale(self.resolved_head_dim)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def parameter_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Closed-form parameter count (must equal the size of `init_params(self, rng)`)."""
    d, f, v, hd = self.hidden_size, self.mlp_size, self.vocab_size, self.resolved_head_dim
    attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2  # q, o; k, v
    if self.qkv_bias:
      attn += (self.num_heads + 2 * self.num_kv_heads) * hd
    if self.qk_norm:
      attn += 2 * hd
    block = attn + 3 * d * f + (4 if self.sandwich_norms else 2) * d  # + gated MLP + norms
    return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * block + d


# Presets ---------------------------------------------------------------------------------------


def tiny(**overrides) -> LlamaConfig:
  """A tiny model for tests (runs in milliseconds on CPU): D=32, 2 layers, 4 heads, 2 KV heads."""
  return LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_size=64).replace(
    **overrides
  )


def bench(**overrides) -> LlamaConfig:
  """The model of `benchmarks/trl_dpo_baseline.py`: HF `LlamaConfig(vocab_size=4096,
  hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
  intermediate_size=688, tie_word_embeddings=False)`, float32: 4,999,424 parameters."""
  return LlamaConfig(
    vocab_size=4096,
    hidden_size=256,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    mlp_size=688,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_embeddings=False,
  ).replace(**overrides)


def llama_3_2_1b(**overrides) -> LlamaConfig:
  """Llama-3.2-1B shapes (meta-llama/Llama-3.2-1B `config.json`): D=2048, 16 layers, 32 heads,
  8 KV heads, head_dim 64, MLP 8192, vocab 128256, tied embeddings, rope_theta 5e5 with Llama 3
  scaling (32, 1, 4, 8192), eps 1e-5: 1,235,814,400 parameters. bf16 compute by default."""
  return LlamaConfig(
    vocab_size=128256,
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    mlp_size=8192,
    head_dim=64,
    rope_theta=500000.0,
    rope_scaling=(32.0, 1.0, 4.0, 8192),
    rms_norm_eps=1e-5,
    tie_embeddings=True,
    dtype="bfloat16",
  ).replace(**overrides)


def llama_3_1_8b(**overrides) -> LlamaConfig:
  """Llama-3.1-8B shapes (meta-llama/Llama-3.1-8B `config.json`): D=4096, 32 layers, 32 heads,
  8 KV heads, head_dim 128, MLP 14336, vocab 128256, untied embeddings, rope_theta 5e5 with
  Llama 3.1 scaling (8, 1, 4, 8192), eps 1e-5: 8,030,261,248 parameters. bf16 compute by default."""
  return LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    mlp_size=14336,
    head_dim=128,
    rope_theta=500000.0,
    rope_scaling=(8.0, 1.0, 4.0, 8192),
    rms_norm_eps=1e-5,
    tie_embeddings=False,
    dtype="bfloat16",
  ).replace(**overrides)


def llama_3_1_70b(**overrides) -> LlamaConfig:
  """Llama-3.1-70B shapes (meta-llama/Llama-3.1-70B `config.json`): D=8192, 80 layers, 64 heads,
  8 KV heads, head_dim 128, MLP 28672, vocab 128256, untied embeddings, rope_theta 5e5 with
  Llama 3.1 scaling (8, 1, 4, 8192), eps 1e-5: 70,553,706,496 parameters. bf16 compute by default."""
  return LlamaConfig(
    vocab_size=128256,
    hidden_size=8192,
    num_layers=80,
    num_heads=64,
    num_kv_heads=8,
    mlp_size=28672,
    head_dim=128,
    rope_theta=500000.0,
    rope_scaling=(8.0, 1.0, 4.0, 8192),
    rms_norm_eps=1e-5,
    tie_embeddings=False,
    dtype="bfloat16",
  ).replace(**overrides)


PRESETS: Mapping[str, Callable[..., LlamaConfig]] = {
  "tiny": tiny,
  "bench": bench,
  "llama_3_2_1b": llama_3_2_1b,
  "1b": llama_3_2_1b,
  "llama3_1b": llama_3_2_1b,
  "llama_3_1_8b": llama_3_1_8b,
  "llama3_8b": llama_3_1_8b,
  "llama_3_1_70b": llama_3_1_70b,
  "llama3_70b": llama_3_1_70b,
}


def preset(name: str, **overrides) -> LlamaConfig:
  """`LlamaConfig` preset by name: "tiny", "bench", "llama_3_2_1b" (aliases "1b", "llama3_1b"),
  "llama_3_1_8b" (alias "llama3_8b"), "llama_3_1_70b" (alias "llama3_70b")."""
  if name not in PRESETS:
    raise ValueError(f"Unknown Llama preset {name!r}; allowed: {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


# Rotary positions ------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig, layer_type: str = "full_attention") -> np.ndarray:
  """RoPE inverse frequencies `[head_dim // 2]` (float64 numpy) of a layer type: the global RoPE
  (`rope_theta`, with Llama 3 scaling or linear interpolation if set), or for "sliding_attention"
  layers with `rope_local_theta` set, the unscaled RoPE of that base."""
  hd = config.resolved_head_dim
  exponents = np.arange(0, hd, 2, dtype=np.float64) / hd
  if layer_type == "sliding_attention" and config.rope_local_theta is not None:
    return 1.0 / (config.rope_local_theta**exponents)
  inv_freq = 1.0 / (config.rope_theta**exponents)
  if config.rope_linear_factor is not None:
    inv_freq = inv_freq / config.rope_linear_factor
  if config.rope_scaling is not None:
    factor, low, high, old_len = config.rope_scaling
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq


def rope_tables(positions: Array, inv_freq: np.ndarray) -> Tuple[Array, Array]:
  """`cos, sin [B, L, hd/2]` (float32) of the angles `positions [B, L] * inv_freq`, computed once
  per forward and handed to the attention (`kernels.attention(..., rope=(cos, sin))`).

  Multiplying by the identity matrix returns the table exactly (each output is one product by 1
  plus exact zeros). It only matters on XLA:CPU: XLA fuses elementwise producers into each
  consumer, so a plain `jnp.cos` table would be recomputed (a cosine and a sine per element)
  inside every fusion that reads it (every layer's query/key rotation and every gathered
  attention tile, forward and backward), while a dot's output is not fused into its consumers
  and is materialised once.
  """
  angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  table = jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=0)
  eye = jnp.eye(table.shape[-1], dtype=table.dtype)
  table = jnp.einsum("...i,ij->...j", table, eye, precision=jax.lax.Precision.HIGHEST)
  return table[0], table[1]


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotates `x [B, L, H, hd]` by the angles `positions [B, L] * inv_freq` (rotate-half form)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B,L,hd/2]
  return sparse_attention.rotary(x, jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :])


attention_mask = kernels_lib.attention_mask


# Parameters (declared and initialised by Flax) -------------------------------------------------


class _Dense(nn.Module):
  """Declares `kernel [in_features, features]` as `nn.Dense(use_bias=False)` would (same key, same
  values), and with `use_bias` a zero `bias [features]` as `nn.Dense` would."""

  features: int
  config: LlamaConfig
  use_bias: bool = False

  @nn.compact
  def __call__(self, in_features: int):
    self.param(
      "kernel", nn.initializers.normal(self.config.init_std), (in_features, self.features), self.config.parameter_dtype
    )
    if self.use_bias:
      self.param("bias", nn.initializers.zeros, (self.features,), self.config.parameter_dtype)


class _Norm(nn.Module):
  """An RMSNorm scale of `size` (default `hidden_size`): `1 - norm_offset`, so that the effective
  factor `norm_offset + scale` starts at 1."""

  config: LlamaConfig
  size: Optional[int] = None

  @nn.compact
  def __call__(self):
    cfg = self.config
    one = 1.0 - cfg.norm_offset
    self.param("scale", nn.initializers.constant(one), (self.size or cfg.hidden_size,), cfg.parameter_dtype)


class _Embed(nn.Module):
  """Declares `embedding [V, D]` as `nn.Embed` would (same key, same values)."""

  config: LlamaConfig

  @nn.compact
  def __call__(self):
    cfg = self.config
    self.param(
      "embedding", nn.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.hidden_size), cfg.parameter_dtype
    )


class _Block(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self):
    cfg = self.config
    _Norm(cfg, name="input_norm")()
    _Attention(cfg, name="attn")()
    _Norm(cfg, name="post_attn_norm")()  # the norm before the MLP (HF: post_attention_layernorm in Llama)
    _Mlp(cfg, name="mlp")()
    if cfg.sandwich_norms:  # the norms of the attention and MLP outputs (Gemma 2/3)
      _Norm(cfg, name="attn_out_norm")()
      _Norm(cfg, name="mlp_out_norm")()


class _Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self):
    cfg = self.config
    d, hd = cfg.hidden_size, cfg.resolved_head_dim
    _Dense(cfg.num_heads * hd, cfg, cfg.qkv_bias, name="q_proj")(d)
    _Dense(cfg.num_kv_heads * hd, cfg, cfg.qkv_bias, name="k_proj")(d)
    _Dense(cfg.num_kv_heads * hd, cfg, cfg.qkv_bias, name="v_proj")(d)
    _Dense(d, cfg, name="o_proj")(cfg.num_heads * hd)
    if cfg.qk_norm:
      _Norm(cfg, hd, name="q_norm")()
      _Norm(cfg, hd, name="k_norm")()


class _Mlp(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self):
    cfg = self.config
    _Dense(cfg.mlp_size, cfg, name="gate_proj")(cfg.hidden_size)
    _Dense(cfg.mlp_size, cfg, name="up_proj")(cfg.hidden_size)
    _Dense(cfg.hidden_size, cfg, name="down_proj")(cfg.mlp_size)


class _Decoder(nn.Module):
  """The parameter tree: Flax derives each parameter's key from its path, so these values are
  those of the equivalent `nn.Embed` / `nn.Dense` modules."""

  config: LlamaConfig

  @nn.compact
  def __call__(self):
    cfg = self.config
    init = nn.initializers.normal(cfg.init_std)
    _Embed(cfg, name="embed")()
    for i in range(cfg.num_layers):
      _Block(cfg, name=f"layers_{i}")()
    _Norm(cfg, name="norm")()
    if not cfg.tie_embeddings:
      self.param("lm_head", init, (cfg.hidden_size, cfg.vocab_size), cfg.parameter_dtype)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: LlamaConfig, rng: Array) -> Params:
  return _Decoder(config).init(rng)["params"]


def init_params(config: LlamaConfig, rng: Array) -> Params:
  """Initial parameters (a nested dict of float arrays) for `config`, from the PRNG key `rng`:
  every matrix `N(0, init_std^2)`, every norm scale 1. One program per config (traced once, reused
  for every key); nests in `jit` and `eval_shape`."""
  return _init_params(config, rng)


# The transformer block ---------------------------------------------------------------------------


def _rms_norm(x: Array, scale: Array, eps: float, dtype, offset: float = 0.0) -> Array:
  """`(offset + scale) * x / sqrt(mean(x^2) + eps)` over the last axis, in float32, returned in
  `dtype` (offset 0: Llama's RMSNorm; 1: Gemma's)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  factor = scale.astype(jnp.float32)
  if offset:
    factor = offset + factor
  return (factor * x32).astype(dtype)


def _norm(x: Array, p: Params, config: LlamaConfig) -> Array:
  """The RMSNorm of parameters `p` (`{"scale": ...}`) under `config` (eps, offset, compute dtype)."""
  return _rms_norm(x, p["scale"], config.rms_norm_eps, config.compute_dtype, config.norm_offset)


def lora_dropout_key(block_key: Optional[Array], name: str) -> Optional[Array]:
  """The dropout key of projection `name`'s LoRA branch in a block whose dropout key is
  `block_key`: `fold_in(fold_in(block_key, LORA_DROPOUT_STREAM), LORA_PROJECTIONS.index(name))`
  (None without a block key)."""
  if block_key is None:
    return None
  return jax.random.fold_in(jax.random.fold_in(block_key, LORA_DROPOUT_STREAM), LORA_PROJECTIONS.index(name))


def lora_branch(h: Array, p: Params, dtype, kernels: Kernels, key: Optional[Array] = None) -> Array:
  """The adapter branch `dropout(h) lora_a lora_b` of a projection's parameters `p` (PEFT's
  `lora_B(lora_A(lora_dropout(x))) * scaling`, arXiv:2106.09685 Eq. 3, with `lora_b` holding
  `(alpha / r) b`), on `h [N, in]`, in the compute `dtype`.

  With `key`, inverted dropout at the rate `p["lora_dropout"]`: the mask is
  `jax.random.bernoulli(key, 1 - rate, h.shape)` and kept entries are scaled by 1 / (1 - rate);
  without a key (or without a `lora_dropout` entry), no dropout. The products go through `kernels.dense` (`[N, in] . [in, r]`, then
  `[N, r] . [r, out]`): the branch costs `2 N r (in + out)` flops, not a second `[in, out]` product.
  """
  if key is not None and "lora_dropout" in p:
    rate = jnp.asarray(p["lora_dropout"], jnp.float32)
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    h = jnp.where(keep, h.astype(jnp.float32) / (1.0 - rate), 0.0).astype(h.dtype)
  return kernels.dense(kernels.dense(h, p["lora_a"], dtype), p["lora_b"], dtype)


def _dense(h: Array, p: Params, dtype, kernels: Kernels, key: Optional[Array] = None) -> Array:
  """`h . kernel`, plus the LoRA branch when `p` carries one (`lora_branch`, its dropout keyed by `key`)."""
  out = kernels.dense(h, p["kernel"], dtype)
  return out + lora_branch(h, p, dtype, kernels, key) if "lora_a" in p else out


def _mlp(p: Params, h: Array, *, config: LlamaConfig, kernels: Kernels, keys: Optional[Mapping] = None) -> Array:
  """Gated MLP `down(act(gate(h)) * up(h))` on `h [N, D]` (act = SiLU: SwiGLU; GELU-tanh: GeGLU);
  gate and up as one product `h [gate | up]`, their LoRA branches (if any) added after the split.
  `keys`: the LoRA dropout key of each projection (None: no dropout)."""
  dtype, F = config.compute_dtype, config.mlp_size
  keys = keys or {}
  gate_up = kernels.dense(h, jnp.concatenate([p["gate_proj"]["kernel"], p["up_proj"]["kernel"]], axis=1), dtype)
  gate, up = gate_up[:, :F], gate_up[:, F:]
  if "lora_a" in p["gate_proj"]:
    gate = gate + lora_branch(h, p["gate_proj"], dtype, kernels, keys.get("gate_proj"))
  if "lora_a" in p["up_proj"]:
    up = up + lora_branch(h, p["up_proj"], dtype, kernels, keys.get("up_proj"))
  return _dense(_ACTIVATIONS[config.mlp_activation](gate) * up, p["down_proj"], dtype, kernels, keys.get("down_proj"))


def projection(h: Array, p: Params, dtype, kernels: Kernels, key: Optional[Array] = None) -> Array:
  """A projection of `h [N, in]` in the compute `dtype`: `h . kernel (+ LoRA branch) (+ bias)` of
  its parameters `p` (`{"kernel"}`, with `"bias"` for the q/k/v biases of some families, and with
  `"lora_a"`, `"lora_b"`, `"lora_dropout"` in LoRA's branch form: `lora_branch`, its dropout keyed
  by `key`)."""
  out = _dense(h, p, dtype, kernels, key)
  return out + p["bias"].astype(dtype) if "bias" in p else out


def _dropout(x: Array, key: Optional[Array], rate: float) -> Array:
  """Inverted dropout: each entry kept with probability 1 - rate and scaled by 1 / (1 - rate)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _block(
  x: Array,
  p: Params,
  index: Optional[Array] = None,
  dropout_key: Optional[Array] = None,
  *,
  attend: Callable,
  shape: Tuple[int, int],
  config: LlamaConfig,
  kernels: Kernels,
):
  """One decoder block on `x [B * L, D]`: `x + Attn(RMSNorm(x))`, then `x + MLP(RMSNorm(x))`
  (with `sandwich_norms`, each output normed again before its residual add; with `qk_norm`, q and
  k normed per head before the attention).

  `attend(q [B, L, K, G, hd], k [B, L, K, hd], v [B, L, K, hd]) -> (out [B, L, K, G, hd], extra)`
  is the only part that differs between training (dense or block-sparse) and cached decoding.
  With `index` (`[N]` flat positions), everything after the attention runs on those rows only.
  With `dropout_key`, the two sub-layer outputs get residual dropout at `config.dropout`, and the
  projections that carry a LoRA branch drop its input (`lora_branch`, keys `lora_dropout_key`).
  Returns `(x [B * L or N, D], extra)`.
  """
  cfg = config
  dtype = cfg.compute_dtype
  B, L = shape
  K, hd = cfg.num_kv_heads, cfg.resolved_head_dim
  G = cfg.num_heads // K
  a = p["attn"]
  lk = {name: lora_dropout_key(dropout_key, name) for name in LORA_PROJECTIONS}
  h = _norm(x, p["input_norm"], cfg)
  q = projection(h, a["q_proj"], dtype, kernels, lk["q_proj"]).reshape(B, L, K, G, hd)
  k = projection(h, a["k_proj"], dtype, kernels, lk["k_proj"]).reshape(B, L, K, hd)
  v = projection(h, a["v_proj"], dtype, kernels, lk["v_proj"]).reshape(B, L, K, hd)
  if cfg.qk_norm:
    q, k = _norm(q, a["q_norm"], cfg), _norm(k, a["k_norm"], cfg)
  out, extra = attend(q, k, v)
  out = out.reshape(B * L, K * G * hd)
  if index is not None:  # only these positions' outputs are used: the rest is per-token work
    x, out = x[index], out[index]
  k_attn, k_mlp = (None, None) if dropout_key is None else jax.random.split(dropout_key)
  out = _dense(out, a["o_proj"], dtype, kernels, lk["o_proj"])
  if cfg.sandwich_norms:
    out = _norm(out, p["attn_out_norm"], cfg)
  x = x + _dropout(out, k_attn, cfg.dropout)
  out = _mlp(p["mlp"], _norm(x, p["post_attn_norm"], cfg), config=cfg, kernels=kernels, keys=lk)
  if cfg.sandwich_norms:
    out = _norm(out, p["mlp_out_norm"], cfg)
  return x + _dropout(out, k_mlp, cfg.dropout), extra


def _embed(params: Params, tokens: Array, config: LlamaConfig) -> Array:
  """Token embeddings `[B * L, D]` in the compute dtype (times `sqrt(D)` with `scale_embeddings`)."""
  dtype = config.compute_dtype
  x = jnp.take(params["embed"]["embedding"].astype(dtype), jnp.asarray(tokens).reshape(-1), axis=0)
  if config.scale_embeddings:
    x = x * jnp.asarray(math.sqrt(config.hidden_size), dtype)
  return x


def _head_logits(x: Array, w: Array, kernels: Kernels, softcap: Optional[float] = None) -> Array:
  """float32 logits `x [..., D] . w [D, V]` (operands in x's dtype, float32 accumulation),
  soft-capped (`softcap * tanh(z / softcap)`) when `softcap` is given."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  z = kernels.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=jnp.float32).astype(jnp.float32)
  return kernels_lib.softcap_scores(z, softcap)


def _attention_kwargs(config: LlamaConfig) -> dict:
  """The optional keywords of `kernels.attention` this config needs (soft-capping only when set,
  so that attention functions written for Llama-family models keep working)."""
  return {} if config.attn_logit_softcap is None else {"softcap": float(config.attn_logit_softcap)}


# Pure-function interface -----------------------------------------------------------------------


def _check_inputs(tokens, positions, segment_ids, branch_ids):
  shapes = [np.shape(tokens), np.shape(positions), np.shape(segment_ids)]
  if branch_ids is not None:
    shapes.append(np.shape(branch_ids))
  if len(shapes[0]) != 2 or any(s != shapes[0] for s in shapes):
    raise ValueError(f"tokens, positions, segment_ids (and branch_ids) must all be [B, L]; got {shapes}.")


def apply_fn(
  params: Params,
  tokens: Array,
  positions: Array,
  segment_ids: Array,
  branch_ids: Optional[Array] = None,
  *,
  config: LlamaConfig,
  kernels: Kernels = kernels_lib.XLA,
  attention_blocks: Optional[sparse_attention.AttentionBlocks] = None,
  output_index: Optional[Array] = None,
  dropout_key: Optional[Array] = None,
  embedding_offset: Optional[Array] = None,
) -> Array:
  """Final hidden states `[B, L, D]` (in `config.dtype`) for `tokens [B, L]` int.

  Args:
    params: from `init_params`.
    tokens: `[B, L]` token ids.
    positions: `[B, L]` RoPE positions (per segment, usually 0, 1, ...).
    segment_ids: `[B, L]` int, 0 = padding; attention stays within a segment, causally.
    branch_ids: optional `[B, L]` int; a token with branch b > 0 does not see tokens of another
      branch b' > 0 (branch 0 is visible to all). See the module docstring.
    config: the model's `LlamaConfig` (static).
    kernels: the products and the attention (`pofx.kernels.Kernels`; static).
    attention_blocks: optional `pofx.sparse_attention.AttentionBlocks` built host-side for this
      batch (`sparse_attention.attention_blocks(segment_ids, branch_ids)`), handed to the
      attention in its `SegmentMask`: attention is then computed only on the block pairs the
      mask uses, same result for every real token. None: dense masked attention.
    output_index: optional `[N]` int flat positions `row * L + column`; the result is then the
      `[N, D]` hidden states at those positions only: the last block's output projection, MLP
      and the final norm run at those positions only (every position's keys and values are
      still computed).
    dropout_key: a PRNG key: residual dropout at `config.dropout`, and dropout on the input of the
      LoRA branches that `params` carry at their `lora_dropout` rate (training); None: none.
    embedding_offset: optional `[B, L, D]` added to the token embeddings (input-embedding
      perturbations, `pofx.perturbations.InputPerturbation`); None: the embeddings as they are.
  """
  _check_inputs(tokens, positions, segment_ids, branch_ids)
  cfg = config
  B, L = np.shape(tokens)
  scale = cfg.attention_scale
  extra = _attention_kwargs(cfg)

  def attend_with(rope, mask):
    def attend(q, k, v):
      return kernels.attention(q, k, v, mask, scale=scale, rope=rope, **extra), None

    return attend

  # One attention per layer type: the rotary tables and the mask (with the window) of its layers.
  blocks = {}
  for kind in sorted(set(cfg.resolved_layer_types)):
    window = cfg.sliding_window if kind == "sliding_attention" else None
    mask = kernels_lib.SegmentMask(
      segment_ids, branch_ids, attention_blocks, positions if window is not None else None, window
    )
    rope = rope_tables(positions, rope_inv_freq(cfg, kind))
    # Activations stay [B * L, D]: with one token axis XLA:CPU computes the weight gradients
    # without writing transposed copies of the activation gradients (2-D x 2-D dots).
    block = functools.partial(_block, attend=attend_with(rope, mask), shape=(B, L), config=cfg, kernels=kernels)
    if cfg.remat:
      block = jax.checkpoint(block, prevent_cse=True, policy=_REMAT_POLICIES[cfg.remat_policy])
    blocks[kind] = block
  dtype = cfg.compute_dtype
  x = _embed(params, tokens, cfg)
  if embedding_offset is not None:
    x = x + jnp.asarray(embedding_offset).reshape(x.shape).astype(dtype)
  # One key per block and one for the embeddings (residual dropout and LoRA-branch dropout).
  keys = jax.random.split(dropout_key, cfg.num_layers + 1) if dropout_key is not None else [None] * (cfg.num_layers + 1)
  x = _dropout(x, keys[-1], cfg.dropout)
  for i, kind in enumerate(cfg.resolved_layer_types):
    last = i == cfg.num_layers - 1
    index = jnp.asarray(output_index) if last and output_index is not None else None
    x, _ = blocks[kind](x, params[f"layers_{i}"], index, keys[i])
  x = _norm(x, params["norm"], cfg)
  return x if output_index is not None else x.reshape(B, L, -1)


def lm_head(params: Params, config: LlamaConfig) -> Array:
  """The LM-head weight `[D, V]` (the embedding transposed when embeddings are tied)."""
  if config.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]


def logits_fn(
  params: Params,
  tokens: Array,
  positions: Array,
  segment_ids: Array,
  branch_ids: Optional[Array] = None,
  *,
  config: LlamaConfig,
  kernels: Kernels = kernels_lib.XLA,
) -> Array:
  """Full float32 logits `[B, L, V]` (for tests and sampling; training uses `pofx.logprobs`),
  soft-capped when `config.final_logit_softcap` is set."""
  h = apply_fn(params, tokens, positions, segment_ids, branch_ids, config=config, kernels=kernels)
  return _head_logits(h, lm_head(params, config), kernels, config.final_logit_softcap)


# Cached decoding (sampling) --------------------------------------------------------------------


class KVCache(NamedTuple):
  """Key/value cache of a batch of sequences being decoded (a pytree).

  Attributes:
    k: per layer, `[B, num_kv_heads, head_dim, S]` keys (after RoPE), transposed;
    v: per layer, `[B, num_kv_heads, S, head_dim]` values; both in the compute dtype, S the cache
      capacity (prompt + new tokens). Heads first, keys transposed: the attention's two batched
      products per (row, head), `q [G, hd] . k [hd, S]` and `p [G, S] . v [S, hd]`, then read
      the cache in place with neither operand transposed, and a decoding step writes one slot.
    valid: `[B, S]` bool, True where a slot holds a real token (False for padding and for slots
      not yet written).
    index: `[]` int32, the next slot to write.
  """

  k: Tuple[Array, ...]
  v: Tuple[Array, ...]
  valid: Array
  index: Array


def init_cache(config: LlamaConfig, batch_size: int, max_length: int) -> KVCache:
  """An empty `KVCache` for `batch_size` sequences of at most `max_length` tokens."""
  K, hd, dtype = config.num_kv_heads, config.resolved_head_dim, config.compute_dtype
  keys = tuple(jnp.zeros((batch_size, K, hd, max_length), dtype) for _ in range(config.num_layers))
  values = tuple(jnp.zeros((batch_size, K, max_length, hd), dtype) for _ in range(config.num_layers))
  return KVCache(k=keys, v=values, valid=jnp.zeros((batch_size, max_length), jnp.bool_), index=jnp.zeros((), jnp.int32))


def resize_cache(cache: KVCache, max_length: int) -> KVCache:
  """`cache` with room for `max_length` tokens: empty slots appended (or unused trailing slots
  dropped); the written slots and `index` are unchanged. Lets a sampler attend over a cache
  that grows with the sequence instead of over its final length at every step."""
  S = cache.valid.shape[1]
  grow = max_length - S
  if grow < 0:
    return KVCache(
      k=tuple(k[..., :max_length] for k in cache.k),
      v=tuple(v[:, :, :max_length] for v in cache.v),
      valid=cache.valid[:, :max_length],
      index=cache.index,
    )
  return KVCache(
    k=tuple(jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, grow))) for k in cache.k),
    v=tuple(jnp.pad(v, ((0, 0), (0, 0), (0, grow), (0, 0))) for v in cache.v),
    valid=jnp.pad(cache.valid, ((0, 0), (0, grow))),
    index=cache.index,
  )


def _transpose(x: Array, axes, like: Array) -> Array:
  """`x [B, L, K, hd]` transposed to the layout of the cache array `like`, in its dtype."""
  return jnp.transpose(x, axes).astype(like.dtype)


def decode(
  params: Params,
  tokens: Array,
  positions: Array,
  valid: Array,
  cache: KVCache,
  *,
  config: LlamaConfig,
  kernels: Kernels = kernels_lib.XLA,
  last_only: bool = False,
) -> Tuple[Array, KVCache]:
  """Runs `tokens [B, L]` through the decoder with a key/value cache; returns float32 logits
  `[B, L, V]` (`[B, 1, V]`, the last token's, with `last_only`) and the updated cache.

  The L tokens occupy cache slots `cache.index ... cache.index + L - 1` (the same slots for every
  row, so prompts are left-padded). Token i attends to the slots j <= its own that are `valid`:
  the earlier cache entries and the new tokens, causally (`pofx.kernels.CacheMask`). With `L` =
  the prompt length this is the prefill; with `L = 1` one decoding step. The result equals
  `logits_fn` on the whole sequence with `segment_ids = valid` (a test pins this to 1e-5). In
  sliding-window layers a token sees the slots `j > slot - sliding_window` (`CacheMask.window`):
  slots, not positions, which agree when each row's real tokens fill consecutive slots (left
  padding, as `pofx.sampling` writes them). The cache keeps every slot (no ring buffer).

  Args:
    params: from `init_params`.
    tokens: `[B, L]` token ids.
    positions: `[B, L]` RoPE positions (e.g. 0, 1, ... from each row's first real token).
    valid: `[B, L]` bool or 0/1, False for padding tokens (they are never attended to).
    cache: a `KVCache` (from `init_cache`), with room for L more tokens.
    config: the model's `LlamaConfig` (static).
    kernels: the products and the attention (`pofx.kernels.Kernels`; static).
    last_only: the logits of each row's last token only (a prefill that samples from there):
      after the last block's attention, the rest of the network runs on that token alone.
  """
  cfg = config
  B, L = np.shape(tokens)
  start = cache.index
  kv_valid = jax.lax.dynamic_update_slice(cache.valid, jnp.asarray(valid, jnp.bool_), (0, start))
  scale = cfg.attention_scale
  extra = _attention_kwargs(cfg)
  kinds = sorted(set(cfg.resolved_layer_types))
  ropes = {kind: rope_tables(positions, rope_inv_freq(cfg, kind)) for kind in kinds}
  masks = {
    kind: kernels_lib.CacheMask(kv_valid, start, cfg.sliding_window if kind == "sliding_attention" else None)
    for kind in kinds
  }

  def attend_with(layer, kind):
    def attend(q, k, v):
      q, k = kernels_lib.apply_rope(q, k, ropes[kind])  # cached keys are stored rotated
      k_all = jax.lax.dynamic_update_slice(
        cache.k[layer], _transpose(k, (0, 2, 3, 1), cache.k[layer]), (0, 0, 0, start)
      )
      v_all = jax.lax.dynamic_update_slice(
        cache.v[layer], _transpose(v, (0, 2, 1, 3), cache.v[layer]), (0, 0, start, 0)
      )
      # The injection point takes `[B, S, K, hd]` views; XLA's decoding attention
      # (`pofx.kernels.cache_attention`) transposes them back to the cache's layout for its
      # products, and the two transposes cancel (no copy of the cache).
      k_view, v_view = jnp.transpose(k_all, (0, 3, 1, 2)), jnp.swapaxes(v_all, 1, 2)
      return kernels.attention(q, k_view, v_view, masks[kind], scale=scale, rope=None, **extra), (k_all, v_all)

    return attend

  x = _embed(params, tokens, cfg)
  new_k, new_v = [], []
  for i, kind in enumerate(cfg.resolved_layer_types):
    # last_only: after the last attention, only each row's last token goes on (`_block`'s index).
    index = jnp.arange(B) * L + (L - 1) if last_only and i == cfg.num_layers - 1 and L > 1 else None
    x, (k_all, v_all) = _block(
      x, params[f"layers_{i}"], index, attend=attend_with(i, kind), shape=(B, L), config=cfg, kernels=kernels
    )
    new_k.append(k_all)
    new_v.append(v_all)
  x = _norm(x, params["norm"], cfg)
  logits = _head_logits(x, lm_head(params, cfg), kernels, cfg.final_logit_softcap).reshape(B, 1 if last_only else L, -1)
  return logits, KVCache(k=tuple(new_k), v=tuple(new_v), valid=kv_valid, index=start + L)


# The model as a record of pure functions ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaModel:
  """The model with its config and kernels bound (like optax's transforms): pure functions only.

  `init(rng) -> params`; `apply(params, tokens, positions, segment_ids, branch_ids=None, *,
  attention_blocks=None, output_index=None, dropout_key=None, embedding_offset=None) -> hidden
  [B, L, D]`; `head(params) -> [D, V]`;
  `logits(params, tokens, positions, segment_ids, branch_ids=None) -> [B, L, V]`;
  `init_cache(batch_size, max_length) -> KVCache`; `resize_cache(cache, max_length) -> KVCache`;
  `decode(params, tokens, positions, valid,
  cache, *, last_only=False) -> (logits [B, L or 1, V], cache)`. Frozen and hashable by (config, kernels), so a model (and
  each of its bound functions) can be a static argument of `jax.jit`.
  """

  config: LlamaConfig
  kernels: Kernels = kernels_lib.XLA

  def init(self, rng: Array) -> Params:
    return init_params(self.config, rng)

  def apply(
    self,
    params: Params,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
    branch_ids: Optional[Array] = None,
    *,
    attention_blocks=None,
    output_index=None,
    dropout_key=None,
    embedding_offset=None,
  ) -> Array:
    return apply_fn(
      params,
      tokens,
      positions,
      segment_ids,
      branch_ids,
      config=self.config,
      kernels=self.kernels,
      attention_blocks=attention_blocks,
      output_index=output_index,
      dropout_key=dropout_key,
      embedding_offset=embedding_offset,
    )

  def head(self, params: Params) -> Array:
    return lm_head(params, self.config)

  @property
  def logit_softcap(self) -> Optional[float]:
    """The soft-cap of the LM-head logits (`config.final_logit_softcap`; None: none), which
    log-probs from `head` must apply (`pofx.logprobs.token_logps(logit_softcap=...)`)."""
    return self.config.final_logit_softcap

  def logits(
    self, params: Params, tokens: Array, positions: Array, segment_ids: Array, branch_ids: Optional[Array] = None
  ) -> Array:
    return logits_fn(params, tokens, positions, segment_ids, branch_ids, config=self.config, kernels=self.kernels)

  def init_cache(self, batch_size: int, max_length: int) -> KVCache:
    return init_cache(self.config, batch_size, max_length)

  def resize_cache(self, cache: KVCache, max_length: int) -> KVCache:
    return resize_cache(cache, max_length)

  def decode(
    self, params: Params, tokens: Array, positions: Array, valid: Array, cache: KVCache, *, last_only: bool = False
  ) -> Tuple[Array, KVCache]:
    return decode(
      params, tokens, positions, valid, cache, config=self.config, kernels=self.kernels, last_only=last_only
    )


def make(config: LlamaConfig, kernels: Kernels = kernels_lib.XLA) -> LlamaModel:
  """Binds `config` and `kernels` (`pofx.kernels.Kernels`, XLA's by default) into the model's
  pure functions."""
  return LlamaModel(config=config, kernels=kernels)


# Hugging Face weights --------------------------------------------------------------------------


def hf_weight_names(config: LlamaConfig):
  """`[(hf_name, pofx_path, transpose)]`: every weight of the Hugging Face `*ForCausalLM` state
  dict of this config (names without the `model.` prefix, except `lm_head.weight`), the path of
  the pofx parameter it is, and whether it is a linear layer's `[out, in]` matrix (pofx keeps
  `[in, out]`).

  The pofx `post_attn_norm` is the norm in front of the MLP: Hugging Face's
  `post_attention_layernorm` in Llama, Mistral and Qwen, `pre_feedforward_layernorm` in Gemma 2/3,
  whose `post_attention_layernorm` and `post_feedforward_layernorm` normalise the attention and
  MLP outputs (pofx `attn_out_norm`, `mlp_out_norm`).
  """
  names = [("embed_tokens.weight", ("embed", "embedding"), False), ("norm.weight", ("norm", "scale"), False)]
  for i in range(config.num_layers):
    h, p = f"layers.{i}.", f"layers_{i}"
    names.append((h + "input_layernorm.weight", (p, "input_norm", "scale"), False))
    if config.sandwich_norms:
      names.append((h + "post_attention_layernorm.weight", (p, "attn_out_norm", "scale"), False))
      names.append((h + "pre_feedforward_layernorm.weight", (p, "post_attn_norm", "scale"), False))
      names.append((h + "post_feedforward_layernorm.weight", (p, "mlp_out_norm", "scale"), False))
    else:
      names.append((h + "post_attention_layernorm.weight", (p, "post_attn_norm", "scale"), False))
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      names.append((h + f"self_attn.{n}.weight", (p, "attn", n, "kernel"), True))
      if config.qkv_bias and n != "o_proj":
        names.append((h + f"self_attn.{n}.bias", (p, "attn", n, "bias"), False))
    if config.qk_norm:
      names.append((h + "self_attn.q_norm.weight", (p, "attn", "q_norm", "scale"), False))
      names.append((h + "self_attn.k_norm.weight", (p, "attn", "k_norm", "scale"), False))
    for n in ("gate_proj", "up_proj", "down_proj"):
      names.append((h + f"mlp.{n}.weight", (p, "mlp", n, "kernel"), True))
  if not config.tie_embeddings:
    names.append(("lm_head.weight", ("lm_head",), True))
  return names


def params_from_hf(state_dict: Mapping[str, Any], config: LlamaConfig) -> Params:
  """Converts a Hugging Face `*ForCausalLM` state dict of the families of `pofx.models.hf`
  (name -> array-like, e.g. from `safetensors.numpy.load_file` or `{k: v.numpy()}` of a torch
  state dict) to pofx params (`hf_weight_names` lists the correspondence).

  HF `nn.Linear` weights are `[out, in]`; pofx kernels are `[in, out]` (transposed here).
  Unknown or missing names raise a ValueError.
  """
  dtype = config.parameter_dtype
  sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
  params: dict = {}
  used = set()
  for name, path, transpose in hf_weight_names(config):
    if name not in sd:
      raise ValueError(f"params_from_hf: missing weight {name!r}.")
    used.add(name)
    w = np.asarray(sd[name], np.float32)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(w.T if transpose else w, dtype)
  if config.tie_embeddings:
    used.add("lm_head.weight")  # tied checkpoints may store a copy
  extra = sorted(set(sd) - used - {k for k in sd if k.endswith("rotary_emb.inv_freq")})
  if extra:
    raise ValueError(f"params_from_hf: unexpected weights {extra[:5]}{'...' if len(extra) > 5 else ''}.")
  return params


def params_to_hf(params: Params, config: LlamaConfig, dtype=np.float32) -> dict:
  """pofx params -> the Hugging Face `*ForCausalLM` state dict (name -> numpy array in `dtype`,
  linear weights `[out, in]`); the inverse of `params_from_hf`. A tied model has no
  `lm_head.weight` (transformers ties it on load). Missing or unexpected parameters raise a
  ValueError."""
  flat = {}
  for name, path, transpose in hf_weight_names(config):
    node = params
    try:
      for key in path:
        node = node[key]
    except (KeyError, TypeError):
      raise ValueError(f"params_to_hf: missing parameter {'/'.join(path)!r} for this config.") from None
    w = np.asarray(jax.device_get(node), np.float32)
    flat[name if name == "lm_head.weight" else "model." + name] = np.ascontiguousarray(w.T if transpose else w, dtype)
  expected = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  if expected != sum(w.size for w in flat.values()):
    raise ValueError("params_to_hf: the params hold parameters this config does not have.")
  return flat
