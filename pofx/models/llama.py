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
`lm_head`); the rest of pofx sees the model only through the pure functions `init_params`,
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
from pofx import sparse_attention

Array = jax.Array
Params = Any
Kernels = kernels_lib.Kernels

_REMAT_POLICIES = {
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
    block = attn + 3 * d * f + 2 * d  # + SwiGLU + 2 norms
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


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies `[head_dim // 2]` (float64 numpy), with Llama 3 scaling if set."""
  hd = config.resolved_head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
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
  """Declares `kernel [in_features, features]` as `nn.Dense(use_bias=False)` would (same key, same values)."""

  features: int
  config: LlamaConfig

  @nn.compact
  def __call__(self, in_features: int):
    self.param(
      "kernel", nn.initializers.normal(self.config.init_std), (in_features, self.features), self.config.parameter_dtype
    )


class _Norm(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self):
    self.param("scale", nn.initializers.ones, (self.config.hidden_size,), self.config.parameter_dtype)


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
    _Norm(cfg, name="post_attn_norm")()
    _Mlp(cfg, name="mlp")()


class _Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self):
    cfg = self.config
    d, hd = cfg.hidden_size, cfg.resolved_head_dim
    _Dense(cfg.num_heads * hd, cfg, name="q_proj")(d)
    _Dense(cfg.num_kv_heads * hd, cfg, name="k_proj")(d)
    _Dense(cfg.num_kv_heads * hd, cfg, name="v_proj")(d)
    _Dense(d, cfg, name="o_proj")(cfg.num_heads * hd)


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


def init_params(config: LlamaConfig, rng: Array) -> Params:
  """Initial parameters (a nested dict of float arrays) for `config`, from the PRNG key `rng`:
  every matrix `N(0, init_std^2)`, every norm scale 1."""
  return jax.jit(lambda rng: _Decoder(config).init(rng)["params"])(rng)  # one program; nests in jit / eval_shape


# The transformer block ---------------------------------------------------------------------------


def _rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
  """`scale * x / sqrt(mean(x^2) + eps)` over the last axis, in float32, returned in `dtype`."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * x32).astype(dtype)


def _mlp(p: Params, h: Array, *, config: LlamaConfig, kernels: Kernels) -> Array:
  """SwiGLU `down(silu(gate(h)) * up(h))` on `h [N, D]`; gate and up as one product `h [gate | up]`."""
  dtype, F = config.compute_dtype, config.mlp_size
  gate_up = kernels.dense(h, jnp.concatenate([p["gate_proj"]["kernel"], p["up_proj"]["kernel"]], axis=1), dtype)
  gate, up = gate_up[:, :F], gate_up[:, F:]
  return kernels.dense(jax.nn.silu(gate) * up, p["down_proj"]["kernel"], dtype)


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
  """One decoder block on `x [B * L, D]`: `x + Attn(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))`.

  `attend(q [B, L, K, G, hd], k [B, L, K, hd], v [B, L, K, hd]) -> (out [B, L, K, G, hd], extra)`
  is the only part that differs between training (dense or block-sparse) and cached decoding.
  With `index` (`[N]` flat positions), everything after the attention runs on those rows only.
  With `dropout_key`, the two sub-layer outputs get residual dropout at `config.dropout`.
  Returns `(x [B * L or N, D], extra)`.
  """
  cfg = config
  dtype = cfg.compute_dtype
  B, L = shape
  K, hd = cfg.num_kv_heads, cfg.resolved_head_dim
  G = cfg.num_heads // K
  a = p["attn"]
  h = _rms_norm(x, p["input_norm"]["scale"], cfg.rms_norm_eps, dtype)
  q = kernels.dense(h, a["q_proj"]["kernel"], dtype).reshape(B, L, K, G, hd)
  k = kernels.dense(h, a["k_proj"]["kernel"], dtype).reshape(B, L, K, hd)
  v = kernels.dense(h, a["v_proj"]["kernel"], dtype).reshape(B, L, K, hd)
  out, extra = attend(q, k, v)
  out = out.reshape(B * L, K * G * hd)
  if index is not None:  # only these positions' outputs are used: the rest is per-token work
    x, out = x[index], out[index]
  k_attn, k_mlp = (None, None) if dropout_key is None else jax.random.split(dropout_key)
  x = x + _dropout(kernels.dense(out, a["o_proj"]["kernel"], dtype), k_attn, cfg.dropout)
  h = _rms_norm(x, p["post_attn_norm"]["scale"], cfg.rms_norm_eps, dtype)
  return x + _dropout(_mlp(p["mlp"], h, config=cfg, kernels=kernels), k_mlp, cfg.dropout), extra


def _embed(params: Params, tokens: Array, dtype) -> Array:
  """Token embeddings `[B * L, D]` in `dtype`."""
  return jnp.take(params["embed"]["embedding"].astype(dtype), jnp.asarray(tokens).reshape(-1), axis=0)


def _head_logits(x: Array, w: Array, kernels: Kernels) -> Array:
  """float32 logits `x [..., D] . w [D, V]` (operands in x's dtype, float32 accumulation)."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  return kernels.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=jnp.float32).astype(jnp.float32)


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
    dropout_key: a PRNG key: residual dropout at `config.dropout` (training); None: none.
    embedding_offset: optional `[B, L, D]` added to the token embeddings (input-embedding
      perturbations, `pofx.perturbations.InputPerturbation`); None: the embeddings as they are.
  """
  _check_inputs(tokens, positions, segment_ids, branch_ids)
  cfg = config
  dtype = cfg.compute_dtype
  B, L = np.shape(tokens)
  rope = rope_tables(positions, rope_inv_freq(cfg))
  mask = kernels_lib.SegmentMask(segment_ids, branch_ids, attention_blocks)
  scale = kernels_lib.default_scale(cfg.resolved_head_dim)

  def attend(q, k, v):
    return kernels.attention(q, k, v, mask, scale=scale, rope=rope), None

  # Activations stay [B * L, D]: with one token axis XLA:CPU computes the weight gradients
  # without writing transposed copies of the activation gradients (2-D x 2-D dots).
  block = functools.partial(_block, attend=attend, shape=(B, L), config=cfg, kernels=kernels)
  if cfg.remat:
    block = jax.checkpoint(block, prevent_cse=True, policy=_REMAT_POLICIES[cfg.remat_policy])
  x = _embed(params, tokens, dtype)
  if embedding_offset is not None:
    x = x + jnp.asarray(embedding_offset).reshape(x.shape).astype(dtype)
  drop = dropout_key is not None and cfg.dropout > 0.0
  keys = jax.random.split(dropout_key, cfg.num_layers + 1) if drop else [None] * (cfg.num_layers + 1)
  x = _dropout(x, keys[-1], cfg.dropout)
  for i in range(cfg.num_layers):
    last = i == cfg.num_layers - 1
    index = jnp.asarray(output_index) if last and output_index is not None else None
    x, _ = block(x, params[f"layers_{i}"], index, keys[i])
  x = _rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps, dtype)
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
  """Full float32 logits `[B, L, V]` (for tests and sampling; training uses `pofx.logprobs`)."""
  h = apply_fn(params, tokens, positions, segment_ids, branch_ids, config=config, kernels=kernels)
  return _head_logits(h, lm_head(params, config), kernels)


# Cached decoding (sampling) --------------------------------------------------------------------


class KVCache(NamedTuple):
  """Key/value cache of a batch of sequences being decoded (a pytree).

  Attributes:
    k, v: per layer, `[B, S, num_kv_heads, head_dim]` keys (after RoPE) and values, in the
      compute dtype; S is the cache capacity (prompt + new tokens).
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
  shape = (batch_size, max_length, config.num_kv_heads, config.resolved_head_dim)
  zeros = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
  return KVCache(k=zeros, v=zeros, valid=jnp.zeros((batch_size, max_length), jnp.bool_), index=jnp.zeros((), jnp.int32))


def decode(
  params: Params,
  tokens: Array,
  positions: Array,
  valid: Array,
  cache: KVCache,
  *,
  config: LlamaConfig,
  kernels: Kernels = kernels_lib.XLA,
) -> Tuple[Array, KVCache]:
  """Runs `tokens [B, L]` through the decoder with a key/value cache; returns float32 logits
  `[B, L, V]` and the updated cache.

  The L tokens occupy cache slots `cache.index ... cache.index + L - 1` (the same slots for every
  row, so prompts are left-padded). Token i attends to the slots j <= its own that are `valid`:
  the earlier cache entries and the new tokens, causally (`pofx.kernels.CacheMask`). With `L` =
  the prompt length this is the prefill; with `L = 1` one decoding step. The result equals
  `logits_fn` on the whole sequence with `segment_ids = valid` (a test pins this to 1e-5).

  Args:
    params: from `init_params`.
    tokens: `[B, L]` token ids.
    positions: `[B, L]` RoPE positions (e.g. 0, 1, ... from each row's first real token).
    valid: `[B, L]` bool or 0/1, False for padding tokens (they are never attended to).
    cache: a `KVCache` (from `init_cache`), with room for L more tokens.
    config: the model's `LlamaConfig` (static).
    kernels: the products and the attention (`pofx.kernels.Kernels`; static).
  """
  cfg = config
  dtype = cfg.compute_dtype
  B, L = np.shape(tokens)
  start = cache.index
  kv_valid = jax.lax.dynamic_update_slice(cache.valid, jnp.asarray(valid, jnp.bool_), (0, start))
  mask = kernels_lib.CacheMask(kv_valid, start)
  rope = rope_tables(positions, rope_inv_freq(cfg))
  scale = kernels_lib.default_scale(cfg.resolved_head_dim)

  def attend_with(layer):
    def attend(q, k, v):
      q, k = kernels_lib.apply_rope(q, k, rope)  # cached keys are stored rotated
      k_all = jax.lax.dynamic_update_slice(cache.k[layer], k.astype(cache.k[layer].dtype), (0, start, 0, 0))
      v_all = jax.lax.dynamic_update_slice(cache.v[layer], v.astype(cache.v[layer].dtype), (0, start, 0, 0))
      return kernels.attention(q, k_all, v_all, mask, scale=scale, rope=None), (k_all, v_all)

    return attend

  x = _embed(params, tokens, dtype)
  new_k, new_v = [], []
  for i in range(cfg.num_layers):
    x, (k_all, v_all) = _block(
      x, params[f"layers_{i}"], attend=attend_with(i), shape=(B, L), config=cfg, kernels=kernels
    )
    new_k.append(k_all)
    new_v.append(v_all)
  x = _rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps, dtype)
  logits = _head_logits(x, lm_head(params, cfg), kernels).reshape(B, L, -1)
  return logits, KVCache(k=tuple(new_k), v=tuple(new_v), valid=kv_valid, index=start + L)


# The model as a record of pure functions ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaModel:
  """The model with its config and kernels bound (like optax's transforms): pure functions only.

  `init(rng) -> params`; `apply(params, tokens, positions, segment_ids, branch_ids=None, *,
  attention_blocks=None, output_index=None, dropout_key=None, embedding_offset=None) -> hidden
  [B, L, D]`; `head(params) -> [D, V]`;
  `logits(params, tokens, positions, segment_ids, branch_ids=None) -> [B, L, V]`;
  `init_cache(batch_size, max_length) -> KVCache`; `decode(params, tokens, positions, valid,
  cache) -> (logits [B, L, V], cache)`. Frozen and hashable by (config, kernels), so a model (and
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

  def logits(
    self, params: Params, tokens: Array, positions: Array, segment_ids: Array, branch_ids: Optional[Array] = None
  ) -> Array:
    return logits_fn(params, tokens, positions, segment_ids, branch_ids, config=self.config, kernels=self.kernels)

  def init_cache(self, batch_size: int, max_length: int) -> KVCache:
    return init_cache(self.config, batch_size, max_length)

  def decode(
    self, params: Params, tokens: Array, positions: Array, valid: Array, cache: KVCache
  ) -> Tuple[Array, KVCache]:
    return decode(params, tokens, positions, valid, cache, config=self.config, kernels=self.kernels)


def make(config: LlamaConfig, kernels: Kernels = kernels_lib.XLA) -> LlamaModel:
  """Binds `config` and `kernels` (`pofx.kernels.Kernels`, XLA's by default) into the model's
  pure functions."""
  return LlamaModel(config=config, kernels=kernels)


# Hugging Face weights --------------------------------------------------------------------------


def params_from_hf(state_dict: Mapping[str, Any], config: LlamaConfig) -> Params:
  """Converts a Hugging Face `LlamaForCausalLM` state dict (name -> array-like, e.g. from
  `safetensors.numpy.load_file` or `{k: v.numpy()}` of a torch state dict) to pofx params.

  HF `nn.Linear` weights are `[out, in]`; pofx kernels are `[in, out]` (transposed here).
  Unknown or missing names raise a ValueError.
  """
  dtype = config.parameter_dtype
  sd = {k.removeprefix("model."): np.asarray(v, np.float32) for k, v in state_dict.items()}
  used = set()

  def take(name, transpose=False):
    if name not in sd:
      raise ValueError(f"params_from_hf: missing weight {name!r}.")
    used.add(name)
    w = sd[name].T if transpose else sd[name]
    return jnp.asarray(w, dtype)

  params = {"embed": {"embedding": take("embed_tokens.weight")}, "norm": {"scale": take("norm.weight")}}
  for i in range(config.num_layers):
    p = f"layers.{i}."
    params[f"layers_{i}"] = {
      "input_norm": {"scale": take(p + "input_layernorm.weight")},
      "post_attn_norm": {"scale": take(p + "post_attention_layernorm.weight")},
      "attn": {
        n: {"kernel": take(p + f"self_attn.{n}.weight", True)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")
      },
      "mlp": {n: {"kernel": take(p + f"mlp.{n}.weight", True)} for n in ("gate_proj", "up_proj", "down_proj")},
    }
  if not config.tie_embeddings:
    params["lm_head"] = take("lm_head.weight", True)
  else:
    sd.pop("lm_head.weight", None)  # tied checkpoints may store a copy
  extra = sorted(set(sd) - used - {k for k in sd if k.endswith("rotary_emb.inv_freq")})
  if extra:
    raise ValueError(f"params_from_hf: unexpected weights {extra[:5]}{'...' if len(extra) > 5 else ''}.")
  return params
