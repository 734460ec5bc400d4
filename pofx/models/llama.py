r"""A Llama-family decoder-only language model in Flax (`flax.linen`), exposed as pure functions.

Architecture (the Hugging Face `LlamaForCausalLM` layout, so weights convert one to one):
token embedding -> N x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head.

- RMSNorm: `w * x / sqrt(mean(x^2) + eps)`, computed in float32.
- Rotary positions (RoPE, "rotate-half" convention of HF/Meta) from **explicit** `positions`
  `[B, L]`, optionally with Llama 3 frequency scaling.
- Grouped-query attention: `num_heads` query heads share `num_kv_heads` key/value heads.
- SwiGLU MLP: `down(silu(gate(x)) * up(x))`; no biases anywhere.
- Optional tied embeddings (LM head = embedding matrix transposed).

Attention masking. Token i may attend to token j iff

    segment_ids[i] == segment_ids[j]  and  j <= i  (column order)  and
    (branch_ids[j] == 0  or  branch_ids[j] == branch_ids[i])

`segment_ids` 0 marks padding (padding only ever attends to padding, so its outputs are finite
garbage that callers mask out). `branch_ids` (optional, default all 0) is the extra restriction
that prompt sharing needs: in a row `[prompt | chosen | rejected]` the prompt has branch 0 and the
two completions branches 1 and 2, so each completion sees the prompt and itself but not the
other completion (see `pofx.batching`).

Why `flax.linen`: its `init`/`apply` are already pure functions of a plain nested-dict parameter
pytree, which is exactly what pofx's train step, optax, orbax, reference strategies (EMA copies,
SAM perturbations) and sharding rules want; `flax.nnx` would need a split/merge at this boundary
for no gain here.

The rest of pofx sees the model only through `init_params`, `apply_fn`, `lm_head` and
`logits_fn` (or the `LlamaModel` record of them built by `make`), never through Flax.
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

from pofx import native
from pofx import sparse_attention

Array = jax.Array
Params = Any

_ATTENTION_IMPLS = ("einsum", "xla", "cudnn")
_MATMULS = ("xla", "blas", "blas_all")
_BLAS_LIBRARIES = ("auto",) + native.BLAS_LIBRARIES
_REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a Llama-family decoder. Frozen and hashable (usable as a static arg).

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
    remat: wrap every block in `jax.checkpoint` (`nn.remat`) to trade compute for memory.
    remat_policy: a name of `jax.checkpoint_policies` used when `remat` (see `_REMAT_POLICIES`).
    attention_impl: "einsum" (explicit masked softmax, any backend), or "xla" / "cudnn" (through
      `jax.nn.dot_product_attention` with the same boolean mask).
    attention_block: with "einsum", rows longer than this are attended in causal query blocks of
      this many tokens, each against the key prefix it can see (about half the scores of the
      full L x L product; identical results). 0 disables it.
    matmul: "xla"; "blas": the weight gradients of the projection matrices (q, k, v, o, gate,
      up, down) are computed by a BLAS (`pofx.native.dense`; XLA:CPU's dot is slowest in that
      form), the other products stay XLA dots; or "blas_all": their forward products and input
      gradients too. CPU only; same values up to float32 summation order. The LM head is not
      affected (`policy.make_logps_fn(matmul=)`).
    blas: with a BLAS `matmul`, which library (`pofx.native.BLAS_LIBRARIES`): "auto" (Intel MKL
      where the `mkl` package is installed, else the OpenBLAS numpy bundles), "mkl", "openblas".
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
  attention_impl: str = "einsum"
  attention_block: int = 128
  matmul: str = "xla"
  blas: str = "auto"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads "
                       f"({self.num_heads}).")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"LlamaConfig.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                       f"({self.num_heads}) unless head_dim is given.")
    if self.resolved_head_dim % 2:
      raise ValueError(f"LlamaConfig: the head dimension must be even for RoPE, got {self.resolved_head_dim}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"LlamaConfig.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}.")
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(f"LlamaConfig.attention_impl must be one of {_ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}.")
    if self.matmul not in _MATMULS:
      raise ValueError(f"LlamaConfig.matmul must be one of {_MATMULS}, got {self.matmul!r}.")
    if self.blas not in _BLAS_LIBRARIES:
      raise ValueError(f"LlamaConfig.blas must be one of {_BLAS_LIBRARIES}, got {self.blas!r}.")
    if self.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat_policy must be one of {sorted(_REMAT_POLICIES)}, "
                       f"got {self.remat_policy!r}.")
    if self.rope_scaling is not None:
      if len(self.rope_scaling) != 4:
        raise ValueError("LlamaConfig.rope_scaling must be (factor, low_freq_factor, high_freq_factor, "
                         f"original_max_position_embeddings), got {self.rope_scaling!r}.")
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

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Closed-form parameter count (must equal the size of `init_params(self, rng)`)."""
    d, f, v, hd = self.hidden_size, self.mlp_size, self.vocab_size, self.resolved_head_dim
    attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2   # q, o; k, v
    block = attn + 3 * d * f + 2 * d                                        # + SwiGLU + 2 norms
    return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * block + d


# Presets ---------------------------------------------------------------------------------------

def tiny(**overrides) -> LlamaConfig:
  """A tiny model for tests (runs in milliseconds on CPU): D=32, 2 layers, 4 heads, 2 KV heads."""
  return LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     mlp_size=64).replace(**overrides)


def bench(**overrides) -> LlamaConfig:
  """The model of `shared/bench/trl_dpo_baseline.py`: HF `LlamaConfig(vocab_size=4096,
  hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
  intermediate_size=688, tie_word_embeddings=False)`, float32: 4,999,424 parameters."""
  return LlamaConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                     mlp_size=688, rope_theta=10000.0, rms_norm_eps=1e-6,
                     tie_embeddings=False).replace(**overrides)


def llama_3_2_1b(**overrides) -> LlamaConfig:
  """Llama-3.2-1B shapes (meta-llama/Llama-3.2-1B `config.json`): D=2048, 16 layers, 32 heads,
  8 KV heads, head_dim 64, MLP 8192, vocab 128256, tied embeddings, rope_theta 5e5 with Llama 3
  scaling (32, 1, 4, 8192), eps 1e-5: 1,235,814,400 parameters. bf16 compute by default."""
  return LlamaConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                     num_kv_heads=8, mlp_size=8192, head_dim=64, rope_theta=500000.0,
                     rope_scaling=(32.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
                     tie_embeddings=True, dtype="bfloat16").replace(**overrides)


def llama_3_1_8b(**overrides) -> LlamaConfig:
  """Llama-3.1-8B shapes (meta-llama/Llama-3.1-8B `config.json`): D=4096, 32 layers, 32 heads,
  8 KV heads, head_dim 128, MLP 14336, vocab 128256, untied embeddings, rope_theta 5e5 with
  Llama 3.1 scaling (8, 1, 4, 8192), eps 1e-5: 8,030,261,248 parameters. bf16 compute by default."""
  return LlamaConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                     num_kv_heads=8, mlp_size=14336, head_dim=128, rope_theta=500000.0,
                     rope_scaling=(8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
                     tie_embeddings=False, dtype="bfloat16").replace(**overrides)


def llama_3_1_70b(**overrides) -> LlamaConfig:
  """Llama-3.1-70B shapes (meta-llama/Llama-3.1-70B `config.json`): D=8192, 80 layers, 64 heads,
  8 KV heads, head_dim 128, MLP 28672, vocab 128256, untied embeddings, rope_theta 5e5 with
  Llama 3.1 scaling (8, 1, 4, 8192), eps 1e-5: 70,553,706,496 parameters. bf16 compute by default."""
  return LlamaConfig(vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64,
                     num_kv_heads=8, mlp_size=28672, head_dim=128, rope_theta=500000.0,
                     rope_scaling=(8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
                     tie_embeddings=False, dtype="bfloat16").replace(**overrides)


PRESETS: Mapping[str, Callable[..., LlamaConfig]] = {
    "tiny": tiny, "bench": bench,
    "llama_3_2_1b": llama_3_2_1b, "1b": llama_3_2_1b, "llama3_1b": llama_3_2_1b,
    "llama_3_1_8b": llama_3_1_8b, "llama3_8b": llama_3_1_8b,
    "llama_3_1_70b": llama_3_1_70b, "llama3_70b": llama_3_1_70b}


def preset(name: str, **overrides) -> LlamaConfig:
  """`LlamaConfig` preset by name: "tiny", "bench", "llama_3_2_1b" (aliases "1b", "llama3_1b"),
  "llama_3_1_8b" (alias "llama3_8b"), "llama_3_1_70b" (alias "llama3_70b")."""
  if name not in PRESETS:
    raise ValueError(f"Unknown Llama preset {name!r}; allowed: {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


# Building blocks -------------------------------------------------------------------------------

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


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotates `x [B, L, H, hd]` by the angles `positions [B, L] * inv_freq` (rotate-half form)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B,L,hd/2]
  return sparse_attention.rotary(x, jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :])


def attention_mask(segment_ids: Array, branch_ids: Optional[Array] = None) -> Array:
  """Boolean `[B, L, L]` mask (query i, key j): same segment, causal, compatible branch."""
  seg = jnp.asarray(segment_ids)
  L = seg.shape[-1]
  mask = seg[:, :, None] == seg[:, None, :]
  mask &= jnp.tril(jnp.ones((L, L), jnp.bool_))[None]
  if branch_ids is not None:
    br = jnp.asarray(branch_ids)
    mask &= (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
  return mask


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    w = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (w.astype(jnp.float32) * x32).astype(self.dtype)


def _blas_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, all_products,
                      library):
  """`nn.Dense`'s product (`lhs [..., D]` . `rhs [D, F]`) by `pofx.native.dense`."""
  del precision, preferred_element_type
  if tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or any(dimension_numbers[1]):
    raise ValueError(f"LlamaConfig.matmul='blas' supports x [..., D] . w [D, F] only, got {dimension_numbers}.")
  return native.dense(lhs, rhs, all_products=all_products, library=library)


def _dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
  extra = {}
  if config.matmul != "xla":
    extra["dot_general"] = functools.partial(_blas_dot_general, all_products=config.matmul == "blas_all", library=config.blas)
  return nn.Dense(features, use_bias=False, dtype=config.compute_dtype,
                  param_dtype=config.parameter_dtype,
                  kernel_init=nn.initializers.normal(config.init_std), name=name, **extra)


class Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask):
    cfg = self.config
    B, L, _ = x.shape
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    q = _dense(cfg, H * hd, "q_proj")(x).reshape(B, L, H, hd)
    k = _dense(cfg, K * hd, "k_proj")(x).reshape(B, L, K, hd)
    v = _dense(cfg, K * hd, "v_proj")(x).reshape(B, L, K, hd)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if cfg.attention_impl == "einsum":
      G = H // K
      qg = q.reshape(B, L, K, G, hd)

      def attend(qb, kb, vb, mb):
        scores = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / math.sqrt(hd))
        scores = jnp.where(mb[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
        return jnp.einsum("bkgqs,bskd->bqkgd", probs, vb)

      blk = cfg.attention_block
      if blk and L > blk:
        # Causal blocks: queries [s, e) can only see keys [0, e) (the mask is causal), so each
        # query block attends to a prefix: about half the L^2 scores of the full product, same
        # result (masked scores contribute exactly 0 either way).
        outs = [attend(qg[:, s:min(s + blk, L)], k[:, :min(s + blk, L)], v[:, :min(s + blk, L)],
                       mask[:, s:min(s + blk, L), :min(s + blk, L)]) for s in range(0, L, blk)]
        out = jnp.concatenate(outs, axis=1).reshape(B, L, H * hd)
      else:
        out = attend(qg, k, v, mask).reshape(B, L, H * hd)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=cfg.attention_impl)
      out = out.reshape(B, L, H * hd)
    return _dense(cfg, cfg.hidden_size, "o_proj")(out)


class Mlp(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = _dense(cfg, cfg.mlp_size, "gate_proj")(x)
    up = _dense(cfg, cfg.mlp_size, "up_proj")(x)
    return _dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask):
    cfg = self.config
    norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                             param_dtype=cfg.parameter_dtype)
    x = x + Attention(cfg, name="attn")(norm(name="input_norm")(x), positions, mask)
    x = x + Mlp(cfg, name="mlp")(norm(name="post_attn_norm")(x))
    return x


class LlamaDecoder(nn.Module):
  """Embedding + blocks + final norm; returns hidden states `[B, L, D]` (compute dtype).

  The LM head (`lm_head/kernel [D, V]`, absent when embeddings are tied) is created at init but
  not applied: log-probs are computed from the hidden states fused with the head, in chunks
  (`pofx.logprobs`).
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens, positions, segment_ids, branch_ids=None):
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                     param_dtype=cfg.parameter_dtype,
                     embedding_init=nn.initializers.normal(cfg.init_std), name="embed")
    x = embed(tokens)
    mask = attention_mask(segment_ids, branch_ids)
    block_cls = Block
    if cfg.remat:
      block_cls = nn.remat(Block, prevent_cse=True, policy=_REMAT_POLICIES[cfg.remat_policy])
    for i in range(cfg.num_layers):
      x = block_cls(cfg, name=f"layers_{i}")(x, positions, mask)
    x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.parameter_dtype, name="norm")(x)
    if not cfg.tie_embeddings:   # declared (not applied) so that init creates it
      self.param("lm_head", nn.initializers.normal(cfg.init_std), (cfg.hidden_size, cfg.vocab_size),
                 cfg.parameter_dtype)
    return x


# Pure-function interface -----------------------------------------------------------------------

def _check_inputs(tokens, positions, segment_ids, branch_ids):
  shapes = [np.shape(tokens), np.shape(positions), np.shape(segment_ids)]
  if branch_ids is not None:
    shapes.append(np.shape(branch_ids))
  if len(shapes[0]) != 2 or any(s != shapes[0] for s in shapes):
    raise ValueError(f"tokens, positions, segment_ids (and branch_ids) must all be [B, L]; got {shapes}.")


def init_params(config: LlamaConfig, rng: Array) -> Params:
  """Initial parameters (a nested dict of float arrays) for `config`, from the PRNG key `rng`."""
  def init(rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return LlamaDecoder(config).init(rng, tokens, tokens, jnp.ones((1, 1), jnp.int32))["params"]
  return jax.jit(init)(rng)   # one compiled program (also nests inside an outer jit / eval_shape)


def apply_fn(params: Params, tokens: Array, positions: Array, segment_ids: Array,
             branch_ids: Optional[Array] = None, *, config: LlamaConfig,
             attention_blocks: Optional[sparse_attention.AttentionBlocks] = None,
             output_index: Optional[Array] = None) -> Array:
  """Final hidden states `[B, L, D]` (in `config.dtype`) for `tokens [B, L]` int.

  Args:
    params: from `init_params`.
    tokens: `[B, L]` token ids.
    positions: `[B, L]` RoPE positions (per segment, usually 0, 1, ...).
    segment_ids: `[B, L]` int, 0 = padding; attention stays within a segment, causally.
    branch_ids: optional `[B, L]` int; a token with branch b > 0 does not see tokens of another
      branch b' > 0 (branch 0 is visible to all). See the module docstring.
    config: the model's `LlamaConfig` (static).
    attention_blocks: optional `pofx.sparse_attention.AttentionBlocks` built host-side
      for this batch (`sparse_attention.attention_blocks(segment_ids, branch_ids)`): attention is
      then computed only on the block pairs the mask uses (`_apply_block_sparse`), same result
      for every real token. None: dense masked attention (`LlamaDecoder`).
    output_index: optional `[N]` int flat positions `row * L + column`; the result is then the
      `[N, D]` hidden states at those positions only. With `attention_blocks`, the last block's
      output projection, MLP and the final norm run at those positions only (every position's
      keys and values are still computed); without, the full output is gathered.
  """
  _check_inputs(tokens, positions, segment_ids, branch_ids)
  if attention_blocks is not None:
    return _apply_block_sparse(params, tokens, positions, segment_ids, branch_ids, attention_blocks, config,
                               output_index)
  h = LlamaDecoder(config).apply({"params": params}, tokens, positions, segment_ids, branch_ids)
  if output_index is None:
    return h
  return h.reshape(-1, h.shape[-1])[jnp.asarray(output_index)]


def _apply_block_sparse(params, tokens, positions, segment_ids, branch_ids, blocks, cfg: LlamaConfig,
                        output_index=None):
  """`LlamaDecoder`'s computation as plain functions of the same parameter tree, with the
  attention of `sparse_attention.block_sparse_attention` (only the listed block pairs); with
  `output_index`, the last block after its attention runs on those positions only."""
  dtype = cfg.compute_dtype
  R, L = tokens.shape
  H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  G = H // K
  inv_freq = rope_inv_freq(cfg)
  # Activations stay [R * L, D]: with one token axis XLA:CPU computes the weight gradients
  # without writing transposed copies of the activation gradients (2-D x 2-D dots).
  x = jnp.take(params["embed"]["embedding"].astype(dtype), tokens.reshape(R * L), axis=0)

  cos, sin = _rope_tables(positions, inv_freq)
  rope = (cos[:, :, 0, :], sin[:, :, 0, :])   # [R, L, hd/2]

  def block(x, p, index=None):
    h = _rms_norm(x, p["input_norm"]["scale"], cfg.rms_norm_eps, dtype)
    a = p["attn"]
    # Rotary positions and the 1/sqrt(hd) query scale are applied by the attention op (inside
    # the native kernel, which then never writes rotated copies of q and k).
    q = _matmul(h, a["q_proj"]["kernel"], dtype, cfg).reshape(R, L, K, G, hd)
    k = _matmul(h, a["k_proj"]["kernel"], dtype, cfg).reshape(R, L, K, hd)
    v = _matmul(h, a["v_proj"]["kernel"], dtype, cfg).reshape(R, L, K, hd)
    out = sparse_attention.block_sparse_attention(q, k, v, segment_ids, branch_ids, blocks, rope=rope,
                                                  q_scale=1.0 / math.sqrt(hd)).reshape(R * L, H * hd)
    if index is not None:   # only these positions' outputs are used: the rest is per-token work
      x, out = x[index], out[index]
    x = x + _matmul(out, a["o_proj"]["kernel"], dtype, cfg)
    h = _rms_norm(x, p["post_attn_norm"]["scale"], cfg.rms_norm_eps, dtype)
    m = p["mlp"]
    F = cfg.mlp_size
    gate_up = _matmul(h, jnp.concatenate([m["gate_proj"]["kernel"], m["up_proj"]["kernel"]], axis=1), dtype, cfg)
    gate, up = gate_up[:, :F], gate_up[:, F:]
    return x + _matmul(jax.nn.silu(gate) * up, m["down_proj"]["kernel"], dtype, cfg)

  if cfg.remat:
    block = jax.checkpoint(block, prevent_cse=True, policy=_REMAT_POLICIES[cfg.remat_policy])
  for i in range(cfg.num_layers):
    last = i == cfg.num_layers - 1
    x = block(x, params[f"layers_{i}"], *([jnp.asarray(output_index)] if last and output_index is not None else []))
  x = _rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps, dtype)
  return x if output_index is not None else x.reshape(R, L, -1)


def _rope_tables(positions, inv_freq):
  """`cos, sin [R, L, 1, hd/2]` of `apply_rope`'s angles, computed once per forward.

  XLA:CPU fuses elementwise producers into each consumer, so a plain `jnp.cos` table is
  recomputed (a cosine and a sine per element) inside every fusion that reads it: every layer's
  query/key rotation and every gathered attention tile, forward and backward. Multiplying by
  the identity matrix returns the table exactly (each output is one product by 1 plus exact
  zeros), and XLA does not fuse a dot's output into its consumers, so the table is materialised
  once.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  table = jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=0)
  eye = jnp.eye(table.shape[-1], dtype=table.dtype)
  table = jnp.einsum("...i,ij->...j", table, eye, precision=jax.lax.Precision.HIGHEST)
  return table[0][:, :, None, :], table[1][:, :, None, :]


def lm_head(params: Params, config: LlamaConfig) -> Array:
  """The LM-head weight `[D, V]` (the embedding transposed when embeddings are tied)."""
  if config.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]


def logits_fn(params: Params, tokens: Array, positions: Array, segment_ids: Array,
              branch_ids: Optional[Array] = None, *, config: LlamaConfig) -> Array:
  """Full float32 logits `[B, L, V]` (for tests and sampling; training uses `pofx.logprobs`)."""
  h = apply_fn(params, tokens, positions, segment_ids, branch_ids, config=config)
  w = lm_head(params, config)
  return jnp.einsum("bld,dv->blv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


class LlamaModel(NamedTuple):
  """The model as a record of pure functions with the config bound (like optax's transforms).

  `init(rng) -> params`; `apply(params, tokens, positions, segment_ids, branch_ids=None) ->
  hidden [B, L, D]`; `head(params) -> [D, V]`; `logits(params, tokens, positions, segment_ids,
  branch_ids=None) -> [B, L, V]`.
  """
  config: LlamaConfig
  init: Callable[[Array], Params]
  apply: Callable[..., Array]
  head: Callable[[Params], Array]
  logits: Callable[..., Array]


def make(config: LlamaConfig) -> LlamaModel:
  """Binds `config` into the pure functions of this module."""
  return LlamaModel(
      config=config,
      init=functools.partial(init_params, config),
      apply=functools.partial(apply_fn, config=config),
      head=functools.partial(lm_head, config=config),
      logits=functools.partial(logits_fn, config=config),
  )


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
        "attn": {n: {"kernel": take(p + f"self_attn.{n}.weight", True)}
                 for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {n: {"kernel": take(p + f"mlp.{n}.weight", True)}
                for n in ("gate_proj", "up_proj", "down_proj")},
    }
  if not config.tie_embeddings:
    params["lm_head"] = take("lm_head.weight", True)
  else:
    sd.pop("lm_head.weight", None)   # tied checkpoints may store a copy
  extra = sorted(set(sd) - used - {k for k in sd if k.endswith("rotary_emb.inv_freq")})
  if extra:
    raise ValueError(f"params_from_hf: unexpected weights {extra[:5]}{'...' if len(extra) > 5 else ''}.")
  return params


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
  return KVCache(k=zeros, v=zeros, valid=jnp.zeros((batch_size, max_length), jnp.bool_),
                 index=jnp.zeros((), jnp.int32))


def _rms_norm(x, scale, eps, dtype):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * x32).astype(dtype)


def _matmul(x, kernel, dtype, cfg=None):
  if cfg is not None and cfg.matmul != "xla":
    return native.dense(x.astype(dtype), kernel.astype(dtype), all_products=cfg.matmul == "blas_all", library=cfg.blas)
  return jnp.dot(x.astype(dtype), kernel.astype(dtype))


def decode(params: Params, tokens: Array, positions: Array, valid: Array, cache: KVCache, *,
           config: LlamaConfig) -> Tuple[Array, KVCache]:
  """Runs `tokens [B, L]` through the decoder with a key/value cache; returns float32 logits
  `[B, L, V]` and the updated cache.

  The L tokens occupy cache slots `cache.index ... cache.index + L - 1` (the same slots for every
  row, so prompts are left-padded). Token i attends to the slots j <= its own that are `valid`:
  the earlier cache entries and the new tokens, causally. With `L` = the prompt length this is
  the prefill; with `L = 1` one decoding step. The result equals `logits_fn` on the whole
  sequence with `segment_ids = valid` (a test pins this to 1e-5).

  Args:
    params: from `init_params`.
    tokens: `[B, L]` token ids.
    positions: `[B, L]` RoPE positions (e.g. 0, 1, ... from each row's first real token).
    valid: `[B, L]` bool or 0/1, False for padding tokens (they are never attended to).
    cache: a `KVCache` (from `init_cache`), with room for L more tokens.
    config: the model's `LlamaConfig` (static).
  """
  cfg = config
  dtype = cfg.compute_dtype
  B, L = tokens.shape
  H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  G = H // K
  S = cache.valid.shape[1]
  start = cache.index
  kv_valid = jax.lax.dynamic_update_slice(cache.valid, jnp.asarray(valid, jnp.bool_), (0, start))
  slot = start + jnp.arange(L)
  mask = kv_valid[:, None, :] & (jnp.arange(S)[None, None, :] <= slot[None, :, None])   # [B, L, S]
  inv_freq = rope_inv_freq(cfg)
  x = jnp.take(params["embed"]["embedding"].astype(dtype), tokens, axis=0)
  new_k, new_v = [], []
  for i in range(cfg.num_layers):
    p = params[f"layers_{i}"]
    h = _rms_norm(x, p["input_norm"]["scale"], cfg.rms_norm_eps, dtype)
    a = p["attn"]
    q = apply_rope(_matmul(h, a["q_proj"]["kernel"], dtype).reshape(B, L, H, hd), positions, inv_freq)
    k = apply_rope(_matmul(h, a["k_proj"]["kernel"], dtype).reshape(B, L, K, hd), positions, inv_freq)
    v = _matmul(h, a["v_proj"]["kernel"], dtype).reshape(B, L, K, hd)
    k_all = jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k[i].dtype), (0, start, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v[i].dtype), (0, start, 0, 0))
    new_k.append(k_all)
    new_v.append(v_all)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q.reshape(B, L, K, G, hd), k_all,
                        preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_all).reshape(B, L, H * hd)
    x = x + _matmul(out, a["o_proj"]["kernel"], dtype)
    h = _rms_norm(x, p["post_attn_norm"]["scale"], cfg.rms_norm_eps, dtype)
    m = p["mlp"]
    gate = _matmul(h, m["gate_proj"]["kernel"], dtype)
    up = _matmul(h, m["up_proj"]["kernel"], dtype)
    x = x + _matmul(nn.silu(gate) * up, m["down_proj"]["kernel"], dtype)
  x = _rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps, dtype)
  w = lm_head(params, cfg)
  logits = jnp.einsum("bld,dv->blv", x, w.astype(dtype), preferred_element_type=jnp.float32)
  return logits, KVCache(k=tuple(new_k), v=tuple(new_v), valid=kv_valid, index=start + L)
