r"""A class-conditional U-Net denoiser with the architecture of diffusers' `UNet2DModel` (and its
cross-attention variant, `UNet2DConditionModel`), as pure functions.

The network (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239,
section 4 and Appendix B: a PixelCNN++-style U-Net with group normalisation, self-attention at
chosen resolutions and a sinusoidal time embedding; diffusers 0.42's `UNet2DModel` layout, so
weights convert one to one with `pofx.diffusion.diffusers_io`). Images are NHWC everywhere in
pofx (diffusers is NCHW). With `C0 = block_out_channels[0]` and `T = time_embedding_dim or 4 C0`:

- Time embedding: the sinusoidal embedding of the (int or float) timestep t,

      f_i = exp(-ln(10000) i / (C0/2 - freq_shift)),   i = 0 .. C0/2 - 1
      e(t) = [sin(t f), cos(t f)]   ([cos, sin] when `flip_sin_to_cos`; a zero appended if C0 is odd)

  (Vaswani et al. 2017, arXiv:1706.03762, section 3.5, used as DDPM's timestep embedding), then
  `emb = W2 silu(W1 e(t) + b1) + b2` (`[B, T]`). Class conditioning (`num_class_embeds`): a
  learned table `E [num_class_embeds, T]` whose row of the class label is added to `emb`.
- `conv_in` (3x3), then one down block per entry of `block_out_channels`: `layers_per_block`
  ResNet blocks (each followed by a self-attention block in an `AttnDownBlock2D`), then, except in
  the last, a Downsample2D: a 3x3 convolution of stride 2 with `downsample_padding` zeros on every
  side (padding 0: one zero row and column at the bottom and right only, as diffusers). Every
  ResNet (and attention) output and every downsampled map is kept as a skip connection.
- The mid block (`UNetMidBlock2D`): ResNet, self-attention (when `add_attention`), ResNet, with
  `mid_block_scale_factor` as the output scale of all three.
- One up block per resolution, deepest first: `layers_per_block + 1` ResNet blocks, each fed the
  channel concatenation `[h, skip]` of the running map and the last unused skip connection (each
  followed by self-attention in an `AttnUpBlock2D`), then, except in the last, an Upsample2D:
  nearest-neighbour x2 and a 3x3 convolution.
- Output: GroupNorm, SiLU, `conv_out` (3x3).

ResNet block (`ResnetBlock2D`; He et al. 2016, arXiv:1603.05027; the DDPM variant with the time
embedding added between the two convolutions), with `act = act_fn`:

    h = conv1(act(GN1(x)))
    "default":      h = act(GN2(h + W_t act(emb) + b_t))
    "scale_shift":  [s, b] = W_t act(emb) + b_t;  h = act(GN2(h) (1 + s) + b)
    out = (shortcut(x) + conv2(dropout(h))) / output_scale_factor

with `shortcut` a 1x1 convolution when the channel count changes, else the identity.

Self-attention block (diffusers' `Attention` over the H*W positions, `heads = C //
attention_head_dim` heads of width `attention_head_dim`, or one head of width C when it is None):

    h = GN(x) (flattened to [B, H*W, C]);  q, k, v = h Wq + bq, h Wk + bk, h Wv + bv
    out = (softmax(q k^T / sqrt(hd)) v Wo + bo + x) / rescale_output_factor

Cross-attention (`UNetConditionConfig`: diffusers' `UNet2DConditionModel`, the conditioning of
latent diffusion, Rombach et al. 2022, arXiv:2112.10752, section 3.3: the U-Net attends to an
encoding tau(y) of the condition, `encoder_hidden_states [B, L, D]`, D = `cross_attention_dim`).
Its `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D` follow each ResNet block with a transformer
(diffusers' `Transformer2DModel`) and its mid block (`UNetMidBlock2DCrossAttn`) is ResNet,
transformer, ResNet. A transformer over C channels with h heads of width hd = C // h (inner width
I = h hd), on the flattened positions of x:

    h = proj_in(GN(x))                       (GroupNorm eps 1e-6; proj_in a 1x1 conv or Linear, C -> I)
    per BasicTransformerBlock (`transformer_layers_per_block` of them):
      h = h + Attn(LN1(h), LN1(h))            (self-attention)
      h = h + Attn(LN2(h), context)           (cross-attention: keys and values from the L embeddings)
      [a, g] = LN3(h) W1 + b1;  h = h + (a * gelu(g)) W2 + b2      (GEGLU, width 4 I; exact gelu)
    out = proj_out(h) + x                    (I -> C)

with `Attn(u, s) = softmax((u Wq)(s Wk)^T / sqrt(hd)) (s Wv) Wo + bo` per head (no q/k/v
biases), LayerNorms over the I channels with eps 1e-5 (Ba et al. 2016, arXiv:1607.06450). The
time embedding MLP and the output use `act_fn` there (SiLU in UNet2DModel).

GroupNorm (Wu & He 2018, arXiv:1803.08494) normalises each of `norm_num_groups` channel groups
over (H, W, its channels) with the biased variance and `norm_eps`, then scales and shifts per
channel. It goes through the injected `kernels.group_norm` (by default `pofx.group_norm.group_norm`:
per-(image, channel) sums, one affine map, its derivative written out); where the activation that
follows it is SiLU the model asks for both in one call (`silu=True`), so that a backend may fuse
them.

Precision: parameters are float32; `compute_dtype` (e.g. bfloat16) is the dtype of every
convolution and dense product and of the activations between them; GroupNorm statistics, the
attention scores and their softmax, the SiLU fused into a norm, and the returned prediction are
float32. Every 3x3
convolution goes through the injected `kernels.conv_general_dilated`, every attention (the
self-attention blocks' heads, one call each, and the transformers' self- and cross-attention)
through `kernels.attention` with `mask=None` (every position sees every key), and every dense
product (projections and the 1x1 shortcut convolutions, which are products over the channels)
through `kernels.dot_general` (`pofx.kernels.Kernels`); the transformers' too (their 1x1
projections, the feed-forward), LayerNorm statistics in float32.

Parameters: a nested dict (lists for diffusers' `ModuleList`s) whose paths are diffusers' module
names, e.g. `down_blocks[1]["attentions"][0]["to_q"]`, `up_blocks[0]["upsamplers"][0]["conv"]`,
`mid_block["resnets"][1]["time_emb_proj"]`, `mid_block["attentions"][0]["transformer_blocks"][0]
["attn2"]["to_k"]` (the feed-forward's `ff.net.0.proj` and `ff.net.2` are `["ff"]["net"]["0"]
["proj"]` and `["ff"]["net"]["2"]`: a dict, since `net.1` is a parameter-free dropout). Leaves: `kernel` (convolutions `[kh, kw, C_in,
C_out]`, HWIO; dense `[in, out]`), `bias`, `scale` (GroupNorm) and `embedding` (the class table).
`init` draws them as PyTorch's default initialisers do (weights and biases uniform in
`+-1/sqrt(fan_in)`, GroupNorm scale 1 and shift 0, the class table standard normal), so a pofx
model starts from the distribution of a freshly built diffusers one.

Dropout (`dropout` > 0) acts, inside each ResNet block, only when `apply` gets a `dropout_key`;
without one the network is deterministic (diffusers' `eval()` mode).

`flops(config, batch)` counts the multiply-adds (x2) of one forward pass, for MFU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pofx import kernels as kernels_lib

Array = jax.Array
Params = Any
Kernels = kernels_lib.Kernels

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)
# UNetConditionConfig (diffusers' UNet2DConditionModel): plain and cross-attention blocks.
CROSS_DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
CROSS_UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
CROSS_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
# The fixed constants of diffusers' Transformer2DModel and BasicTransformerBlock as
# UNet2DConditionModel builds them: the GroupNorm's eps, the LayerNorms' eps, the feed-forward
# width multiple of GEGLU.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5
FF_MULT = 4
TIME_SCALE_SHIFTS = ("default", "scale_shift")
TIME_EMBEDDING_TYPES = ("positional",)
SAMPLING_TYPES = ("conv",)
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

_ACT = {
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
}


def _block_kind(name: str) -> str:
  """diffusers accepts a `UNetRes` prefix on block type names and strips it."""
  return name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """diffusers' `UNet2DModel` constructor arguments, with its names and defaults. Frozen, hashable.

  Supported values (others are refused at construction, naming what is allowed): block types
  `DOWN_BLOCK_TYPES`, `UP_BLOCK_TYPES` (with or without diffusers' `UNetRes` prefix), mid block
  `UNetMidBlock2D` or None, `time_embedding_type` "positional", `downsample_type` and
  `upsample_type` "conv", `resnet_time_scale_shift` "default" or "scale_shift", `act_fn` one of
  `ACTIVATIONS`, `class_embed_type` None (class conditioning through `num_class_embeds`).
  `num_train_timesteps` is carried for diffusers (it only sizes the "learned" time embedding, which
  pofx does not support). `sample_size` is the image side (int or (H, W)); `apply` takes any size
  divisible by `2 ** (len(block_out_channels) - 1)`.
  """

  sample_size: Any = None
  in_channels: int = 3
  out_channels: int = 3
  center_input_sample: bool = False
  time_embedding_type: str = "positional"
  time_embedding_dim: Optional[int] = None
  freq_shift: int = 0
  flip_sin_to_cos: bool = True
  down_block_types: Tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
  mid_block_type: Optional[str] = "UNetMidBlock2D"
  up_block_types: Tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
  block_out_channels: Tuple[int, ...] = (224, 448, 672, 896)
  layers_per_block: int = 2
  mid_block_scale_factor: float = 1
  downsample_padding: int = 1
  downsample_type: str = "conv"
  upsample_type: str = "conv"
  dropout: float = 0.0
  act_fn: str = "silu"
  attention_head_dim: Optional[int] = 8
  norm_num_groups: int = 32
  attn_norm_num_groups: Optional[int] = None
  norm_eps: float = 1e-5
  resnet_time_scale_shift: str = "default"
  add_attention: bool = True
  class_embed_type: Optional[str] = None
  num_class_embeds: Optional[int] = None
  num_train_timesteps: Optional[int] = None

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      value = getattr(self, name)
      if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ValueError(f"UNetConfig.{name} must be a sequence, got {value!r}.")
      object.__setattr__(self, name, tuple(value))
    if isinstance(self.sample_size, (list, tuple)):
      object.__setattr__(self, "sample_size", tuple(self.sample_size))
    _validate(self)

  @property
  def time_embed_dim(self) -> int:
    """T: the width of the time (and class) embedding."""
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def num_resolutions(self) -> int:
    return len(self.block_out_channels)


def _allowed(name, value, allowed, cls="UNetConfig"):
  if value not in allowed:
    raise ValueError(f"{cls}.{name}={value!r} is not supported; allowed: {list(allowed)}.")


def _validate_common(c, cls: str, down_types, up_types, optional_ints) -> None:
  """The checks both config classes share (`cls` names the class in the messages)."""
  n = len(c.block_out_channels)
  if n == 0:
    raise ValueError(f"{cls}.block_out_channels is empty; give one channel count per resolution.")
  if len(c.down_block_types) != n or len(c.up_block_types) != n:
    raise ValueError(
      f"{cls}: down_block_types ({len(c.down_block_types)}), up_block_types ({len(c.up_block_types)}) and "
      f"block_out_channels ({n}) must have the same length."
    )
  for name, types, allowed in (("down", c.down_block_types, down_types), ("up", c.up_block_types, up_types)):
    for t in types:
      if _block_kind(t) not in allowed:
        hint = ""
        if cls == "UNetConfig" and _block_kind(t) in CROSS_DOWN_BLOCK_TYPES + CROSS_UP_BLOCK_TYPES:
          hint = " (cross-attention blocks: use a UNetConditionConfig)"
        raise ValueError(f"{cls}.{name}_block_types: {t!r} is not supported; supported: {list(allowed)}{hint}.")
  _allowed("resnet_time_scale_shift", c.resnet_time_scale_shift, TIME_SCALE_SHIFTS, cls)
  _allowed("act_fn", c.act_fn, ACTIVATIONS, cls)
  positive = {"in_channels": c.in_channels, "out_channels": c.out_channels, "layers_per_block": c.layers_per_block}
  positive.update({f"block_out_channels[{i}]": ch for i, ch in enumerate(c.block_out_channels)})
  positive["norm_num_groups"] = c.norm_num_groups
  for opt in optional_ints:
    if getattr(c, opt) is not None:
      positive[opt] = getattr(c, opt)
  for name, v in positive.items():
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{cls}.{name} must be a positive integer, got {v!r}.")
  if not isinstance(c.downsample_padding, (int, np.integer)) or c.downsample_padding < 0:
    raise ValueError(f"{cls}.downsample_padding must be an integer >= 0, got {c.downsample_padding!r}.")
  for ch in c.block_out_channels:
    if ch % c.norm_num_groups:
      raise ValueError(
        f"{cls}: norm_num_groups={c.norm_num_groups} must divide every entry of block_out_channels "
        f"{list(c.block_out_channels)}."
      )
  if not (0.0 <= float(c.dropout) < 1.0):
    raise ValueError(f"{cls}.dropout must be in [0, 1), got {c.dropout!r}.")
  if not c.norm_eps > 0:
    raise ValueError(f"{cls}.norm_eps must be positive, got {c.norm_eps!r}.")


def _validate(c: UNetConfig) -> None:
  _validate_common(
    c,
    "UNetConfig",
    DOWN_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    ("time_embedding_dim", "attention_head_dim", "attn_norm_num_groups", "num_class_embeds"),
  )
  _allowed("mid_block_type", c.mid_block_type, MID_BLOCK_TYPES)
  _allowed("time_embedding_type", c.time_embedding_type, TIME_EMBEDDING_TYPES)
  _allowed("downsample_type", c.downsample_type, SAMPLING_TYPES)
  _allowed("upsample_type", c.upsample_type, SAMPLING_TYPES)
  _allowed("class_embed_type", c.class_embed_type, (None,))
  attended = [ch for ch, t in zip(c.block_out_channels, c.down_block_types) if _block_kind(t) == "AttnDownBlock2D"]
  attended += [
    ch for ch, t in zip(reversed(c.block_out_channels), c.up_block_types) if _block_kind(t) == "AttnUpBlock2D"
  ]
  if c.mid_block_type is not None and c.add_attention:
    attended.append(c.block_out_channels[-1])
  for ch in attended:
    if c.attention_head_dim is not None and c.attention_head_dim > ch:
      raise ValueError(
        f"UNetConfig: attention_head_dim={c.attention_head_dim} is larger than an attention block's {ch} channels "
        "(zero heads)."
      )
  if c.attn_norm_num_groups is not None and c.block_out_channels[-1] % c.attn_norm_num_groups:
    raise ValueError(
      f"UNetConfig: attn_norm_num_groups={c.attn_norm_num_groups} must divide block_out_channels[-1]="
      f"{c.block_out_channels[-1]}."
    )


@dataclasses.dataclass(frozen=True)
class UNetConditionConfig:
  """diffusers' `UNet2DConditionModel` constructor arguments that pofx supports, with its names and
  defaults: the U-Net of latent diffusion (Rombach et al. 2022, arXiv:2112.10752, section 3.3),
  conditioned on a sequence `encoder_hidden_states [B, L, cross_attention_dim]` by cross-attention.
  Frozen, hashable.

  The same network as `UNetConfig`'s, with these differences (all diffusers'): the attention blocks
  are `Transformer2DModel`s (`CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`,
  `CrossAttnUpBlock2D`; see the module docstring); the time embedding MLP and the output use
  `act_fn` (UNet2DModel: SiLU); the mid block is ResNet, transformer, ResNet.

  `attention_head_dim` is, as in diffusers (a naming it keeps for compatibility), the NUMBER of
  heads of each transformer, an int or one per resolution (down blocks in order; the mid block
  takes the last, the up blocks the reversed tuple); each head has `channels // heads` channels.
  `transformer_layers_per_block`: BasicTransformerBlocks per transformer (an int).
  `use_linear_projection`: `proj_in`/`proj_out` are Linear layers over the channels (True) or 1x1
  convolutions (False): the same map, stored in another shape.

  Supported values (others are refused at construction, naming what is allowed): block types
  `CROSS_DOWN_BLOCK_TYPES`, `CROSS_UP_BLOCK_TYPES`, mid block `CROSS_MID_BLOCK_TYPES`,
  `resnet_time_scale_shift` "default" or "scale_shift", `act_fn` one of `ACTIVATIONS`. The other
  arguments of `UNet2DConditionModel` (extra embeddings, dual or cross-only attention, other kernel
  sizes, ...) keep diffusers' defaults (`pofx.diffusion.diffusers_io` refuses folders that change
  them).
  """

  sample_size: Any = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: Tuple[str, ...] = (
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
  )
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1
  dropout: float = 0.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int = 1
  attention_head_dim: Any = 8
  use_linear_projection: bool = False
  num_class_embeds: Optional[int] = None
  resnet_time_scale_shift: str = "default"
  time_embedding_dim: Optional[int] = None

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      value = getattr(self, name)
      if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ValueError(f"UNetConditionConfig.{name} must be a sequence, got {value!r}.")
      object.__setattr__(self, name, tuple(value))
    for name in ("sample_size", "attention_head_dim"):
      if isinstance(getattr(self, name), (list, tuple)):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    _validate_condition(self)

  @property
  def time_embed_dim(self) -> int:
    """T: the width of the time (and class) embedding."""
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def num_resolutions(self) -> int:
    return len(self.block_out_channels)

  @property
  def head_counts(self) -> Tuple[int, ...]:
    """The heads of each resolution's transformers (down-block order)."""
    h = self.attention_head_dim
    return tuple(h) if isinstance(h, tuple) else (h,) * self.num_resolutions


def _validate_condition(c: UNetConditionConfig) -> None:
  cls = "UNetConditionConfig"
  _validate_common(
    c,
    cls,
    CROSS_DOWN_BLOCK_TYPES,
    CROSS_UP_BLOCK_TYPES,
    ("time_embedding_dim", "num_class_embeds", "cross_attention_dim", "transformer_layers_per_block"),
  )
  _allowed("mid_block_type", c.mid_block_type, CROSS_MID_BLOCK_TYPES, cls)
  if not isinstance(c.use_linear_projection, (bool, np.bool_)):
    raise ValueError(f"{cls}.use_linear_projection must be True or False, got {c.use_linear_projection!r}.")
  heads = c.attention_head_dim
  if isinstance(heads, tuple) and len(heads) != c.num_resolutions:
    raise ValueError(
      f"{cls}.attention_head_dim (the number of heads, as diffusers names it) must be an int or one per "
      f"resolution ({c.num_resolutions}), got {heads!r}."
    )
  for h in c.head_counts:
    if not isinstance(h, (int, np.integer)) or isinstance(h, bool) or h < 1:
      raise ValueError(
        f"{cls}.attention_head_dim (the number of heads, as diffusers names it) must hold positive integers, "
        f"got {heads!r}."
      )
  for i, ch in _transformer_channels(c):
    if c.head_counts[i] > ch:
      raise ValueError(
        f"{cls}: attention_head_dim (heads)={c.head_counts[i]} exceeds a transformer's {ch} channels "
        "(heads of zero width)."
      )


def _transformer_channels(c: UNetConditionConfig):
  """(index into head_counts, channels) of every transformer of `c`."""
  n = c.num_resolutions
  down = zip(c.block_out_channels, c.down_block_types)
  out = [(i, ch) for i, (ch, t) in enumerate(down) if _block_kind(t) == "CrossAttnDownBlock2D"]
  up = zip(reversed(c.block_out_channels), c.up_block_types)
  out += [(n - 1 - i, ch) for i, (ch, t) in enumerate(up) if _block_kind(t) == "CrossAttnUpBlock2D"]
  if c.mid_block_type is not None:
    out.append((n - 1, c.block_out_channels[-1]))
  return out


def _conditional(config) -> bool:
  return isinstance(config, UNetConditionConfig)


# Presets --------------------------------------------------------------------------------------

PRESETS = {
  # Tests: 8x8 grayscale, two resolutions (4 and 8 channels), attention at the coarser one (two
  # heads), 10 classes.
  "tiny": UNetConfig(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(4, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
    norm_num_groups=2,
    num_class_embeds=10,
  ),
  # The model of the diffusers Diffusion-DPO baseline (benchmarks/diffusers_dpo_baseline.py,
  # `unet_config(16, 1)`).
  "bench": UNetConfig(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    num_class_embeds=10,
  ),
  # The tiny preset with cross-attention instead of the class table: a transformer (2 heads) at
  # the coarser resolution, in the mid block and in the first up block, attending to an 8-wide
  # embedding sequence (the image world's prompts, pofx.diffusion.world.PromptEncoder).
  "tiny_prompted": UNetConditionConfig(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(4, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=2,
    norm_num_groups=2,
    cross_attention_dim=8,
  ),
  # A larger model for accelerator throughput: DDPM's CIFAR-10 U-Net (arXiv:2006.11239,
  # Appendix B; diffusers' google/ddpm-cifar10-32 config) with a 10-class embedding.
  "large": UNetConfig(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    num_class_embeds=10,
  ),
}


def preset(name: str, **overrides):
  """A preset config (`PRESETS`: a `UNetConfig`, or a `UNetConditionConfig` for "tiny_prompted"),
  with fields replaced by `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"unknown U-Net preset {name!r}; known: {sorted(PRESETS)}.")
  return dataclasses.replace(PRESETS[name], **overrides)


# Architecture walk (shared by init and flops) -------------------------------------------------


def _heads(config: UNetConfig, channels: int) -> Tuple[int, int]:
  """(heads, head_dim) of an attention block over `channels` (diffusers' rule)."""
  hd = config.attention_head_dim if config.attention_head_dim is not None else channels
  return channels // hd, hd


# The attention after each ResNet of a block: self-attention ("attn") or a transformer ("cross").
_ATTENTION_KINDS = {
  "AttnDownBlock2D": "attn",
  "AttnUpBlock2D": "attn",
  "CrossAttnDownBlock2D": "cross",
  "CrossAttnUpBlock2D": "cross",
}


def _down_specs(config):
  """Per down block: (attention kind: None, "attn" or "cross"; [(resnet in, out)]; downsample?;
  transformer heads or None) in diffusers' order."""
  specs = []
  ch = config.block_out_channels[0]
  for i, kind in enumerate(config.down_block_types):
    out = config.block_out_channels[i]
    resnets = [(ch if j == 0 else out, out) for j in range(config.layers_per_block)]
    attn = _ATTENTION_KINDS.get(_block_kind(kind))
    heads = config.head_counts[i] if attn == "cross" else None
    specs.append((attn, resnets, i < config.num_resolutions - 1, heads))
    ch = out
  return specs


def _up_specs(config):
  """Per up block: (attention kind, [(resnet in incl. skip, out)], upsample?, transformer heads)."""
  rev = list(reversed(config.block_out_channels))
  n = len(rev)
  specs = []
  out = rev[0]
  for i, kind in enumerate(config.up_block_types):
    prev, out = out, rev[i]
    skip_in = rev[min(i + 1, n - 1)]
    layers = config.layers_per_block + 1
    resnets = [((prev if j == 0 else out) + (skip_in if j == layers - 1 else out), out) for j in range(layers)]
    attn = _ATTENTION_KINDS.get(_block_kind(kind))
    heads = config.head_counts[n - 1 - i] if attn == "cross" else None
    specs.append((attn, resnets, i < n - 1, heads))
  return specs


def _mid_attention_groups(config: UNetConfig) -> Optional[int]:
  if config.attn_norm_num_groups is not None:
    return config.attn_norm_num_groups
  return config.norm_num_groups if config.resnet_time_scale_shift == "default" else None


# Initialisation -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Init:
  """How one parameter is initialised: "uniform" in +-1/sqrt(fan_in), "normal", "ones" or "zeros"."""

  kind: str
  shape: Tuple[int, ...]
  fan_in: int = 1


def _conv_init(cin, cout, k=3):
  fan_in = cin * k * k
  return {"kernel": _Init("uniform", (k, k, cin, cout), fan_in), "bias": _Init("uniform", (cout,), fan_in)}


def _linear_init(din, dout):
  return {"kernel": _Init("uniform", (din, dout), din), "bias": _Init("uniform", (dout,), din)}


def _norm_init(channels):
  return {"scale": _Init("ones", (channels,)), "bias": _Init("zeros", (channels,))}


def _resnet_init(config, cin, cout):
  temb_out = cout * (2 if config.resnet_time_scale_shift == "scale_shift" else 1)
  p = {
    "norm1": _norm_init(cin),
    "conv1": _conv_init(cin, cout),
    "time_emb_proj": _linear_init(config.time_embed_dim, temb_out),
    "norm2": _norm_init(cout),
    "conv2": _conv_init(cout, cout),
  }
  if cin != cout:
    p["conv_shortcut"] = _conv_init(cin, cout, k=1)
  return p


def _attention_init(config, channels, groups):
  heads, hd = _heads(config, channels)
  inner = heads * hd
  p = {}
  if groups is not None:
    p["group_norm"] = _norm_init(channels)
  p["to_q"] = _linear_init(channels, inner)
  p["to_k"] = _linear_init(channels, inner)
  p["to_v"] = _linear_init(channels, inner)
  p["to_out"] = [_linear_init(inner, channels)]
  return p


def _dense_init(din, dout, bias=True):
  p = {"kernel": _Init("uniform", (din, dout), din)}
  if bias:
    p["bias"] = _Init("uniform", (dout,), din)
  return p


def _transformer_init(config, channels, heads):
  """A `Transformer2DModel` (GroupNorm, proj_in, BasicTransformerBlocks, proj_out) over `channels`."""
  inner = heads * (channels // heads)
  proj = _dense_init if config.use_linear_projection else functools.partial(_conv_init, k=1)
  D, F = config.cross_attention_dim, FF_MULT * inner

  def attention(kv_dim):
    # diffusers' Attention inside BasicTransformerBlock: no q/k/v biases (attention_bias=False).
    return {
      "to_q": _dense_init(inner, inner, bias=False),
      "to_k": _dense_init(kv_dim, inner, bias=False),
      "to_v": _dense_init(kv_dim, inner, bias=False),
      "to_out": [_dense_init(inner, inner)],
    }

  def block():
    return {
      "norm1": _norm_init(inner),
      "attn1": attention(inner),
      "norm2": _norm_init(inner),
      "attn2": attention(D),
      "norm3": _norm_init(inner),
      # FeedForward's ModuleList: net.0 the GEGLU projection, net.1 dropout, net.2 the output.
      "ff": {"net": {"0": {"proj": _dense_init(inner, 2 * F)}, "2": _dense_init(F, inner)}},
    }

  return {
    "norm": _norm_init(channels),
    "proj_in": proj(channels, inner),
    "transformer_blocks": [block() for _ in range(config.transformer_layers_per_block)],
    "proj_out": proj(inner, channels),
  }


def _block_init(config, attn, resnets, resample, heads, resampler_key):
  """A down or up block's initialisers: its ResNets, their attentions, and its resampling conv."""
  block = {"resnets": [_resnet_init(config, i, o) for i, o in resnets]}
  if attn == "attn":
    block["attentions"] = [_attention_init(config, o, config.norm_num_groups) for _, o in resnets]
  elif attn == "cross":
    block["attentions"] = [_transformer_init(config, o, heads) for _, o in resnets]
  if resample:
    out = resnets[-1][1]
    block[resampler_key] = [{"conv": _conv_init(out, out)}]
  return block


def _layout(config) -> Params:
  """The parameter tree with an `_Init` at every leaf."""
  c0, temb = config.block_out_channels[0], config.time_embed_dim
  params = {
    "conv_in": _conv_init(config.in_channels, c0),
    "time_embedding": {"linear_1": _linear_init(c0, temb), "linear_2": _linear_init(temb, temb)},
  }
  if config.num_class_embeds is not None:
    params["class_embedding"] = {"embedding": _Init("normal", (config.num_class_embeds, temb))}
  params["down_blocks"] = [_block_init(config, *spec, "downsamplers") for spec in _down_specs(config)]
  if config.mid_block_type is not None:
    ch = config.block_out_channels[-1]
    mid = {"resnets": [_resnet_init(config, ch, ch), _resnet_init(config, ch, ch)]}
    if _conditional(config):
      mid["attentions"] = [_transformer_init(config, ch, config.head_counts[-1])]
    elif config.add_attention:
      mid["attentions"] = [_attention_init(config, ch, _mid_attention_groups(config))]
    params["mid_block"] = mid
  params["up_blocks"] = [_block_init(config, *spec, "upsamplers") for spec in _up_specs(config)]
  params["conv_norm_out"] = _norm_init(c0)
  params["conv_out"] = _conv_init(c0, config.out_channels)
  return params


def init(config, key: Array) -> Params:
  """Fresh float32 parameters (PyTorch's default initialisers; see the module docstring). One
  uniform and one normal draw of `key` cover every parameter, so this is cheap to trace and
  compile."""
  layout = _layout(config)
  leaves, treedef = jax.tree_util.tree_flatten(layout, is_leaf=lambda x: isinstance(x, _Init))
  sizes = {k: sum(math.prod(x.shape) for x in leaves if x.kind == k) for k in ("uniform", "normal")}
  k_uniform, k_normal = jax.random.split(key)
  draws = {
    "uniform": jax.random.uniform(k_uniform, (sizes["uniform"],), jnp.float32, -1.0, 1.0),
    "normal": jax.random.normal(k_normal, (sizes["normal"],), jnp.float32),
  }
  offsets = {"uniform": 0, "normal": 0}
  out = []
  for x in leaves:
    if x.kind in ("ones", "zeros"):
      out.append((jnp.ones if x.kind == "ones" else jnp.zeros)(x.shape, jnp.float32))
      continue
    n, o = math.prod(x.shape), offsets[x.kind]
    v = draws[x.kind][o : o + n].reshape(x.shape)
    offsets[x.kind] = o + n
    out.append(v / math.sqrt(x.fan_in) if x.kind == "uniform" else v)
  return jax.tree_util.tree_unflatten(treedef, out)


def param_shapes(config) -> Params:
  """The parameter tree of `config` with a float32 `jax.ShapeDtypeStruct` at every leaf (no arrays made)."""
  layout = _layout(config)
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), layout, is_leaf=lambda x: isinstance(x, _Init)
  )


def param_count(config) -> int:
  """The number of parameters."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(param_shapes(config))))


# Forward --------------------------------------------------------------------------------------


def _dtype(compute_dtype):
  if compute_dtype is None:
    return jnp.float32
  name = jnp.dtype(compute_dtype).name
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={compute_dtype!r} is not supported; allowed: {list(COMPUTE_DTYPES)}.")
  return jnp.dtype(name)


def timestep_embedding(timesteps: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Array:
  """The sinusoidal embedding `[B, dim]` float32 of `timesteps [B]` (see the module docstring)."""
  half = dim // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - freq_shift)).astype(np.float32)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def group_norm(x: Array, p: Params, groups: int, eps: float, dtype, kernels: Kernels = kernels_lib.XLA, silu=False):
  """GroupNorm of NHWC `x` with float32 statistics (biased variance), followed by SiLU when `silu`,
  result in `dtype`: `y = (x - mean_g) / sqrt(var_g + eps) * scale + bias` per (image, group g), by
  the `group_norm` injection point (`pofx.group_norm.group_norm` with XLA's operations by default)."""
  y = kernels.group_norm(
    x.astype(jnp.float32),
    p["scale"].astype(jnp.float32),
    p["bias"].astype(jnp.float32),
    groups=groups,
    eps=eps,
    silu=silu,
  )
  return y.astype(dtype)


def _norm_act(x: Array, p: Params, groups: int, eps: float, dtype, kernels: Kernels, act) -> Array:
  """`act(group_norm(x))`; SiLU is passed to the injection point, which may fuse it with the norm."""
  if act is jax.nn.silu:
    return group_norm(x, p, groups, eps, dtype, kernels, silu=True)
  return act(group_norm(x, p, groups, eps, dtype, kernels))


def _conv(x, p, kernels: Kernels, dtype, *, stride=1, padding=None):
  k = p["kernel"].shape[0]
  if padding is None:
    padding = ((k // 2, k // 2), (k // 2, k // 2))
  y = kernels.conv_general_dilated(
    x.astype(dtype),
    p["kernel"].astype(dtype),
    window_strides=(stride, stride),
    padding=padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  return y + p["bias"].astype(y.dtype)


def _pointwise(x, p, kernels: Kernels, dtype):
  """A 1x1 convolution (stride 1, no padding: the ResNet shortcut) as the dense product over the
  channels, `x [B, H, W, C_in] . w [C_in, C_out]` through `kernels.dot_general`: the same values,
  and a kernel gradient that is one `[B H W, C_in]^T [B H W, C_out]` product instead of a
  convolution over the whole image (which XLA:CPU computes with transposed copies of both)."""
  w = p["kernel"]
  return kernels.dense(x, w.reshape(w.shape[2], w.shape[3]), dtype) + p["bias"].astype(dtype)


def _linear(x, p, kernels: Kernels, dtype):
  return kernels.dense(x, p["kernel"], dtype) + p["bias"].astype(dtype)


def _dropout(x, key, rate):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _resnet(p, x, temb, *, config, kernels, dtype, scale_factor=1.0, dropout_key=None):
  act = _ACT[config.act_fn]
  groups, eps = config.norm_num_groups, config.norm_eps
  h = _norm_act(x, p["norm1"], groups, eps, dtype, kernels, act)
  h = _conv(h, p["conv1"], kernels, dtype)
  t = _linear(act(temb), p["time_emb_proj"], kernels, dtype)[:, None, None, :]
  if config.resnet_time_scale_shift == "default":
    h = _norm_act(h + t, p["norm2"], groups, eps, dtype, kernels, act)
  else:
    scale, shift = jnp.split(t, 2, axis=-1)
    h = act(group_norm(h, p["norm2"], groups, eps, dtype, kernels) * (1 + scale) + shift)
  h = _dropout(h, dropout_key, float(config.dropout))
  h = _conv(h, p["conv2"], kernels, dtype)
  shortcut = _pointwise(x, p["conv_shortcut"], kernels, dtype) if "conv_shortcut" in p else x
  out = shortcut + h
  return out / scale_factor if scale_factor != 1.0 else out


def _multi_head(q, k, v, heads: int, hd: int, kernels: Kernels, dtype):
  """softmax(q k^T / sqrt(hd)) v per head: `q [B, Lq, heads hd]`, `k, v [B, Lk, heads hd]` ->
  `[B, Lq, heads hd]`, through the attention injection point with every query seeing every key
  (`kernels.attention(..., mask=None)`; scores and softmax float32)."""
  B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
  o = kernels.attention(
    q.reshape(B, Lq, heads, 1, hd),
    k.reshape(B, Lk, heads, hd),
    v.reshape(B, Lk, heads, hd),
    None,
    scale=1.0 / math.sqrt(hd),
  )
  return o.astype(dtype).reshape(B, Lq, heads * hd)


def _head_by_head(h, p, heads: int, hd: int, kernels: Kernels, dtype):
  """The self-attention of `_attention` computed one head at a time, with no head axis: head i's
  `q, k, v [B, L, hd]` come from the columns `i hd .. (i + 1) hd` of the projections' kernels, and
  the output projection is the sum over heads of `o_i W_out[i hd .. (i + 1) hd, :]`, plus its bias
  once. The same values as `_multi_head` then `to_out` (up to float32 summation order), without
  the `[B, L, heads, hd] <-> [B, heads, L, hd]` transposes and the concatenation of the heads."""
  out = None
  for i in range(heads):
    cols = slice(i * hd, (i + 1) * hd)
    q, k, v = (
      kernels.dense(h, p[n]["kernel"][:, cols], dtype) + p[n]["bias"][cols].astype(dtype)
      for n in ("to_q", "to_k", "to_v")
    )
    o = kernels.attention(q[:, :, None, None], k[:, :, None], v[:, :, None], None, scale=1.0 / math.sqrt(hd))
    o = o[:, :, 0, 0].astype(dtype)  # [B, Lq, hd]
    part = kernels.dense(o, p["to_out"][0]["kernel"][cols, :], dtype)
    out = part if out is None else out + part
  return out + p["to_out"][0]["bias"].astype(dtype)


def _attention(p, x, *, config, kernels, dtype, groups, rescale=1.0):
  B, H, W, C = x.shape
  heads, hd = _heads(config, C)
  h = group_norm(x, p["group_norm"], groups, config.norm_eps, dtype, kernels) if groups is not None else x.astype(dtype)
  h = h.reshape(B, H * W, C)
  o = _head_by_head(h, p, heads, hd, kernels, dtype).reshape(B, H, W, C)
  out = o + x.astype(dtype)
  return out / rescale if rescale != 1.0 else out


def layer_norm(x: Array, p: Params, eps: float, dtype) -> Array:
  """LayerNorm over the last axis (Ba et al. 2016, arXiv:1607.06450) with float32 statistics
  (biased variance): `(x - mean) / sqrt(var + eps) * scale + bias`, result in `dtype`."""
  x = x.astype(jnp.float32)
  mean = x.mean(axis=-1, keepdims=True)
  var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
  return y.astype(dtype)


def _projection(x, p, kernels, dtype):
  """A bias-free (or biased) dense layer: `x W (+ b)`."""
  y = kernels.dense(x, p["kernel"], dtype)
  return y + p["bias"].astype(dtype) if "bias" in p else y


def _transformer_block(p, h, context, heads, hd, *, kernels, dtype):
  """diffusers' `BasicTransformerBlock` ("layer_norm"): self-attention, cross-attention on
  `context`, GEGLU feed-forward, each on a LayerNorm of the running sequence and added to it."""
  eps = TRANSFORMER_LAYER_NORM_EPS
  for name, source in (("attn1", None), ("attn2", context)):
    a, n = p[name], layer_norm(h, p["norm1" if name == "attn1" else "norm2"], eps, dtype)
    kv = n if source is None else source
    q, k, v = (_projection(x, a[w], kernels, dtype) for x, w in ((n, "to_q"), (kv, "to_k"), (kv, "to_v")))
    h = h + _linear(_multi_head(q, k, v, heads, hd, kernels, dtype), a["to_out"][0], kernels, dtype)
  n = layer_norm(h, p["norm3"], eps, dtype)
  value, gate = jnp.split(_linear(n, p["ff"]["net"]["0"]["proj"], kernels, dtype), 2, axis=-1)
  ff = value * jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(dtype)
  return h + _linear(ff, p["ff"]["net"]["2"], kernels, dtype)


def _transformer(p, x, context, heads, *, config, kernels, dtype):
  """diffusers' `Transformer2DModel` on NHWC `x` with `context [B, L, D]` (module docstring)."""
  B, H, W, C = x.shape
  hd = C // heads
  inner = heads * hd
  h = group_norm(x, p["norm"], config.norm_num_groups, TRANSFORMER_GROUP_NORM_EPS, dtype, kernels)
  # A 1x1 convolution and a Linear over the channels are the same product (`_pointwise` and
  # `_linear`); only the stored kernel's shape differs.
  project = _linear if config.use_linear_projection else _pointwise
  h = project(h, p["proj_in"], kernels, dtype).reshape(B, H * W, inner)
  for block in p["transformer_blocks"]:
    h = _transformer_block(block, h, context, heads, hd, kernels=kernels, dtype=dtype)
  h = project(h.reshape(B, H, W, inner), p["proj_out"], kernels, dtype)
  return h + x.astype(dtype)


def _downsample(p, x, *, config, kernels, dtype):
  pad = config.downsample_padding
  padding = ((0, 1), (0, 1)) if pad == 0 else ((pad, pad), (pad, pad))
  return _conv(x, p["conv"], kernels, dtype, stride=2, padding=padding)


def _upsample(p, x, *, kernels, dtype):
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return _conv(x, p["conv"], kernels, dtype)


def _check_inputs(config, sample, timesteps, class_labels, encoder_hidden_states):
  if sample.ndim != 4 or sample.shape[-1] != config.in_channels:
    raise ValueError(f"unet.apply: sample must be [B, H, W, {config.in_channels}] (NHWC), got {sample.shape}.")
  B, H, W, _ = sample.shape
  m = 2 ** (config.num_resolutions - 1)
  if H % m or W % m:
    raise ValueError(f"unet.apply: image sides {H}x{W} must be multiples of {m} (2 ** (resolutions - 1)).")
  if timesteps.ndim not in (0, 1) or (timesteps.ndim == 1 and timesteps.shape[0] != B):
    raise ValueError(f"unet.apply: timesteps must be [B]={B} (or a scalar), got {timesteps.shape}.")
  if config.num_class_embeds is not None:
    if class_labels is None:
      raise ValueError("unet.apply: this U-Net is class-conditional (num_class_embeds is set); pass class_labels [B].")
    if class_labels.shape != (B,) or not jnp.issubdtype(class_labels.dtype, jnp.integer):
      raise ValueError(
        f"unet.apply: class_labels must be [B]={B} integers, got {class_labels.shape} {class_labels.dtype}."
      )
  elif class_labels is not None:
    raise ValueError("unet.apply: class_labels given but the U-Net has no class embedding (num_class_embeds is None).")
  if _conditional(config):
    D = config.cross_attention_dim
    if encoder_hidden_states is None:
      raise ValueError(
        f"unet.apply: this U-Net (UNetConditionConfig) cross-attends to encoder_hidden_states [B, L, {D}]; pass them."
      )
    e = encoder_hidden_states
    if e.ndim != 3 or e.shape[0] != B or e.shape[2] != D or e.shape[1] < 1:
      raise ValueError(
        f"unet.apply: encoder_hidden_states must be [B={B}, L>=1, cross_attention_dim={D}], got {e.shape}."
      )
    if not jnp.issubdtype(e.dtype, jnp.floating):
      raise ValueError(f"unet.apply: encoder_hidden_states must be floats, got {e.dtype}.")
  elif encoder_hidden_states is not None:
    raise ValueError(
      "unet.apply: encoder_hidden_states given but this U-Net (UNetConfig) has no cross-attention; "
      "use a UNetConditionConfig."
    )


def apply(
  params: Params,
  sample: Array,
  timesteps: Array,
  class_labels: Optional[Array] = None,
  *,
  config,
  kernels: Kernels = kernels_lib.XLA,
  compute_dtype=None,
  dropout_key: Optional[Array] = None,
  encoder_hidden_states: Optional[Array] = None,
) -> Array:
  """The prediction `[B, H, W, out_channels]` float32 for `sample [B, H, W, in_channels]` (NHWC),
  `timesteps [B]` (int or float; a scalar is broadcast), `class_labels [B]` int (required when
  `num_class_embeds` is set, refused otherwise) and, for a `UNetConditionConfig` (required there,
  refused otherwise), `encoder_hidden_states [B, L, cross_attention_dim]`. See the module
  docstring for the network."""
  sample, timesteps = jnp.asarray(sample), jnp.asarray(timesteps)
  class_labels = None if class_labels is None else jnp.asarray(class_labels)
  context = None if encoder_hidden_states is None else jnp.asarray(encoder_hidden_states)
  _check_inputs(config, sample, timesteps, class_labels, context)
  dtype = _dtype(compute_dtype)
  cond = _conditional(config)
  if cond:
    context = context.astype(dtype)
  B = sample.shape[0]
  timesteps = jnp.broadcast_to(timesteps, (B,))
  n_resnets = sum(len(spec[1]) for spec in _down_specs(config) + _up_specs(config)) + 2
  drop_keys = iter(jax.random.split(dropout_key, n_resnets)) if dropout_key is not None else None
  next_drop = (lambda: next(drop_keys)) if drop_keys is not None else (lambda: None)
  # UNet2DConditionModel uses act_fn in the time embedding MLP and before conv_out; UNet2DModel SiLU.
  act = _ACT[config.act_fn] if cond else jax.nn.silu

  # Time and class embedding.
  c0 = config.block_out_channels[0]
  t = timestep_embedding(timesteps, c0, config.flip_sin_to_cos, config.freq_shift).astype(dtype)
  te = params["time_embedding"]
  emb = _linear(act(_linear(t, te["linear_1"], kernels, dtype)), te["linear_2"], kernels, dtype)
  if config.num_class_embeds is not None:
    emb = emb + jnp.take(params["class_embedding"]["embedding"], class_labels, axis=0).astype(dtype)

  kw = dict(config=config, kernels=kernels, dtype=dtype)

  def attend(p, h, attn, heads):
    if attn == "cross":
      return _transformer(p, h, context, heads, **kw)
    return _attention(p, h, groups=config.norm_num_groups, **kw)

  x = sample.astype(jnp.float32)
  if config.center_input_sample:
    x = 2 * x - 1.0
  h = _conv(x, params["conv_in"], kernels, dtype)
  skips = [h]
  for block, (attn, resnets, downsample, heads) in zip(params["down_blocks"], _down_specs(config)):
    for j in range(len(resnets)):
      h = _resnet(block["resnets"][j], h, emb, dropout_key=next_drop(), **kw)
      if attn:
        h = attend(block["attentions"][j], h, attn, heads)
      skips.append(h)
    if downsample:
      h = _downsample(block["downsamplers"][0], h, **kw)
      skips.append(h)

  if config.mid_block_type is not None:
    mid, s = params["mid_block"], float(config.mid_block_scale_factor)
    h = _resnet(mid["resnets"][0], h, emb, scale_factor=s, dropout_key=next_drop(), **kw)
    if cond:
      h = _transformer(mid["attentions"][0], h, context, config.head_counts[-1], **kw)
    elif config.add_attention:
      h = _attention(mid["attentions"][0], h, groups=_mid_attention_groups(config), rescale=s, **kw)
    h = _resnet(mid["resnets"][1], h, emb, scale_factor=s, dropout_key=next_drop(), **kw)

  for block, (attn, resnets, upsample, heads) in zip(params["up_blocks"], _up_specs(config)):
    for j in range(len(resnets)):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = _resnet(block["resnets"][j], h, emb, dropout_key=next_drop(), **kw)
      if attn:
        h = attend(block["attentions"][j], h, attn, heads)
    if upsample:
      h = _upsample(block["upsamplers"][0], h, kernels=kernels, dtype=dtype)

  h = _norm_act(h, params["conv_norm_out"], config.norm_num_groups, config.norm_eps, dtype, kernels, act)
  return _conv(h, params["conv_out"], kernels, dtype).astype(jnp.float32)


# FLOPs ----------------------------------------------------------------------------------------


def flops(
  config,
  batch: int,
  height: Optional[int] = None,
  width: Optional[int] = None,
  context_length: Optional[int] = None,
) -> int:
  """FLOPs of one forward pass over `batch` images of `height x width` (default `sample_size`),
  cross-attending (a `UNetConditionConfig`) to `context_length` embeddings.

  Multiply-adds count 2: a KxK convolution from C_in to C_out channels with an Ho x Wo output
  costs `2 Ho Wo K^2 C_in C_out` per image, a dense product `[M, K] . [K, N]` `2 M K N`, and an
  attention block over L = H W positions with `heads x hd = inner` costs its four projections
  `4 x 2 L C inner` plus `2 x 2 L^2 inner` for the scores and the weighted values. A transformer
  over C channels (inner width I, context length S of width D) costs `2 x 2 L C I` for proj_in and
  proj_out and per BasicTransformerBlock: self-attention `4 x 2 L I^2 + 2 x 2 L^2 I`,
  cross-attention `2 x 2 L I^2 + 2 x 2 S D I + 2 x 2 L S I`, the GEGLU feed-forward
  `2 L I (8 I) + 2 L (4 I) I`. The time embedding MLP (`2 (C0 T + T T)`) and each ResNet block's
  time projection (`2 T C_out`, twice that with "scale_shift") are counted per image. Norms,
  activations, softmax, additions, the class lookup and the sinusoidal embedding are elementwise
  and not counted.
  """
  if height is None or width is None:
    s = config.sample_size
    if s is None:
      raise ValueError("unet.flops: the config has no sample_size; pass height and width.")
    hh, ww = (s, s) if isinstance(s, int) else tuple(s)
    height, width = height or hh, width or ww
  if _conditional(config) and context_length is None:
    raise ValueError("unet.flops: a UNetConditionConfig cross-attends; pass context_length (L of [B, L, D]).")
  T, c0 = config.time_embed_dim, config.block_out_channels[0]
  tproj = T * (2 if config.resnet_time_scale_shift == "scale_shift" else 1)

  def conv(hw, cin, cout, k=3):
    return 2 * hw * k * k * cin * cout

  def resnet(hw, cin, cout):
    f = conv(hw, cin, cout) + conv(hw, cout, cout) + 2 * tproj * cout
    return f + (conv(hw, cin, cout, 1) if cin != cout else 0)

  def attention(hw, ch):
    heads, hd = _heads(config, ch)
    inner = heads * hd
    return 4 * 2 * hw * ch * inner + 2 * 2 * hw * hw * inner

  def transformer(hw, ch, heads):
    i, S, D = heads * (ch // heads), context_length, config.cross_attention_dim
    self_attn = 4 * 2 * hw * i * i + 2 * 2 * hw * hw * i
    cross_attn = 2 * 2 * hw * i * i + 2 * 2 * S * D * i + 2 * 2 * hw * S * i
    ff = 2 * hw * i * (2 * FF_MULT * i) + 2 * hw * (FF_MULT * i) * i
    return 2 * 2 * hw * ch * i + config.transformer_layers_per_block * (self_attn + cross_attn + ff)

  def attend(hw, ch, attn, heads):
    if attn == "cross":
      return transformer(hw, ch, heads)
    return attention(hw, ch) if attn else 0

  H, W = height, width
  total = 2 * (c0 * T + T * T) + conv(H * W, config.in_channels, c0)
  for attn, resnets, downsample, heads in _down_specs(config):
    for cin, cout in resnets:
      total += resnet(H * W, cin, cout) + attend(H * W, cout, attn, heads)
    if downsample:
      H, W = (H + 1) // 2, (W + 1) // 2
      total += conv(H * W, resnets[-1][1], resnets[-1][1])
  if config.mid_block_type is not None:
    ch = config.block_out_channels[-1]
    total += 2 * resnet(H * W, ch, ch)
    if _conditional(config):
      total += transformer(H * W, ch, config.head_counts[-1])
    elif config.add_attention:
      total += attention(H * W, ch)
  for attn, resnets, upsample, heads in _up_specs(config):
    for cin, cout in resnets:
      total += resnet(H * W, cin, cout) + attend(H * W, cout, attn, heads)
    if upsample:
      H, W = 2 * H, 2 * W
      total += conv(H * W, resnets[-1][1], resnets[-1][1])
  total += conv(H * W, c0, config.out_channels)
  return int(batch * total)


# The denoiser record --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNet:
  """A config, kernels and compute dtype bound to the pure functions (hashable: usable as a static
  argument of `jax.jit`).

  `init(key) -> params`; `apply(params, sample, timesteps, class_labels=None, *, dropout_key=None,
  encoder_hidden_states=None) -> prediction`; `denoise(params, x_t, timesteps, cond) ->
  prediction` (the denoiser protocol the samplers, pair errors and methods call). `cond` is, for a
  `UNetConfig`, the class labels `[B]` (None for an unconditional U-Net); for a
  `UNetConditionConfig`, the embedding sequence `encoder_hidden_states [B, L, cross_attention_dim]`
  (or the pair `(encoder_hidden_states, class_labels)` when it also has `num_class_embeds`).
  `flops(batch, context_length=None)` (the context length is needed by a UNetConditionConfig).
  """

  config: Any
  kernels: Kernels = kernels_lib.XLA
  compute_dtype: Optional[str] = None

  def init(self, key: Array) -> Params:
    return init(self.config, key)

  def apply(self, params, sample, timesteps, class_labels=None, *, dropout_key=None, encoder_hidden_states=None):
    return apply(
      params,
      sample,
      timesteps,
      class_labels,
      config=self.config,
      kernels=self.kernels,
      compute_dtype=self.compute_dtype,
      dropout_key=dropout_key,
      encoder_hidden_states=encoder_hidden_states,
    )

  def denoise(self, params: Params, x_t: Array, timesteps: Array, cond) -> Array:
    if not _conditional(self.config):
      return self.apply(params, x_t, timesteps, cond)
    if self.config.num_class_embeds is not None:
      if not isinstance(cond, (tuple, list)) or len(cond) != 2:
        raise ValueError(
          "UNet.denoise: this UNetConditionConfig has num_class_embeds; cond must be (encoder_hidden_states "
          "[B, L, D], class_labels [B])."
        )
      return self.apply(params, x_t, timesteps, cond[1], encoder_hidden_states=cond[0])
    return self.apply(params, x_t, timesteps, encoder_hidden_states=cond)

  def flops(self, batch: int, context_length: Optional[int] = None) -> int:
    return flops(self.config, batch, context_length=context_length)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A `UNet` of a `UNetConditionConfig` behind a fixed (untrained) encoder of its condition:
  `denoise(params, x_t, timesteps, cond)` cross-attends to `encoder(cond)` `[B, L, D]` (e.g. the
  image world's `PromptEncoder`, class labels -> prompt embeddings), so that callers pass `cond`
  as for a class-conditional U-Net. `encoder` must be hashable (a frozen dataclass); its output is
  a constant of the traced function, never a parameter. `init` and `flops` are the U-Net's."""

  unet: UNet
  encoder: Any

  def init(self, key: Array) -> Params:
    return self.unet.init(key)

  def denoise(self, params: Params, x_t: Array, timesteps: Array, cond) -> Array:
    return self.unet.denoise(params, x_t, timesteps, self.encoder(cond))

  def flops(self, batch: int, context_length: Optional[int] = None) -> int:
    return self.unet.flops(batch, context_length=context_length)


def make(config, kernels: Kernels = kernels_lib.XLA, compute_dtype=None) -> UNet:
  """Binds `config` (a `UNetConfig` or `UNetConditionConfig`), `kernels` (`pofx.kernels.Kernels`,
  XLA's by default) and `compute_dtype` (None: float32) into a `UNet` record."""
  if not isinstance(config, (UNetConfig, UNetConditionConfig)):
    raise ValueError(f"unet.make: config must be a UNetConfig or UNetConditionConfig, got {type(config).__name__}.")
  name = None if compute_dtype is None else _dtype(compute_dtype).name
  return UNet(config=config, kernels=kernels, compute_dtype=name)
