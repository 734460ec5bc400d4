"""The U-Net denoiser (`pofx.diffusion.unet`): outputs equal to diffusers' `UNet2DModel` (PyTorch,
the reference implementation) on random small configs read from a `save_pretrained` folder; the
bench preset's parameter count equal to diffusers' for the baseline's config; a hand count of the
tiny preset's FLOPs, convolutions and dense products (every one through the injected kernels);
gradients, bfloat16 compute, the denoiser protocol and refusals.

Tolerance: both sides compute in float32; outputs (of size about 1) differ by summation order
(a few 1e-7 in practice), so 1e-4 absolute is far below what a wrong layer, layout or switch moves.
GroupNorm scales and shifts are perturbed away from diffusers' 1 and 0 so that their mapping is
tested too.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import kernels as kernels_lib
from pofx.diffusion import diffusers_io, unet

# Two resolutions, attention at the coarser one, class conditioning, 8 groups, two layers per block.
PARITY = dict(
  sample_size=8,
  in_channels=2,
  out_channels=3,
  block_out_channels=(16, 32),
  layers_per_block=2,
  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
  up_block_types=("AttnUpBlock2D", "UpBlock2D"),
  attention_head_dim=8,
  norm_num_groups=8,
  num_class_embeds=5,
)
# The other switches: scale-shift time conditioning, cos/sin order and frequency shift, an odd
# embedding width (zero-padded), single-head attention at the finer resolution, the mid block's
# output scale and attention groups, padding-0 downsampling, mish, centred input, no classes.
VARIANT = dict(
  sample_size=(8, 12),
  in_channels=1,
  out_channels=2,
  block_out_channels=(9, 18),
  layers_per_block=1,
  down_block_types=("AttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "AttnUpBlock2D"),
  attention_head_dim=None,
  norm_num_groups=3,
  attn_norm_num_groups=6,
  norm_eps=1e-6,
  resnet_time_scale_shift="scale_shift",
  flip_sin_to_cos=False,
  freq_shift=1,
  time_embedding_dim=20,
  mid_block_scale_factor=2.0,
  downsample_padding=0,
  act_fn="mish",
  center_input_sample=True,
)
# `unet_config(16, 1)` of the diffusers Diffusion-DPO baseline (benchmarks/diffusers_dpo_baseline.py).
BASELINE = dict(
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
)


def _diffusers_model(torch, diffusers, cfg):
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(**cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Per config: (the folder diffusers saved, inputs NCHW, diffusers' outputs NCHW)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  rng = np.random.default_rng(0)
  out = {}
  cases = {
    "parity": (PARITY, (3, 2, 8, 8), np.array([0, 17, 999]), np.array([0, 3, 4])),
    "variant": (VARIANT, (2, 1, 8, 12), np.array([3.7, 250.25], np.float32), None),
  }
  for name, (cfg, shape, t, labels) in cases.items():
    model = _diffusers_model(torch, diffusers, cfg)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    x = rng.standard_normal(shape).astype(np.float32)
    with torch.no_grad():
      kw = {} if labels is None else {"class_labels": torch.from_numpy(labels)}
      y = model(torch.from_numpy(x), torch.from_numpy(t), **kw).sample.numpy()
    out[name] = (folder, x, t, labels, y)
  return out


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize("case", ["parity", "variant"])
def test_matches_diffusers(reference, case):
  folder, x, t, labels, expected = reference[case]
  config, params = diffusers_io.load(folder)
  got = unet.apply(params, _nhwc(x), jnp.asarray(t), None if labels is None else jnp.asarray(labels), config=config)
  assert got.dtype == jnp.float32
  got = np.transpose(np.asarray(got), (0, 3, 1, 2))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  assert np.abs(expected).max() > 0.1  # not a trivially small output


def test_bench_parameter_count_equals_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  config = unet.PRESETS["bench"]
  assert config == unet.UNetConfig(**BASELINE)
  model = diffusers.UNet2DModel(**BASELINE)
  assert unet.param_count(config) == sum(p.numel() for p in model.parameters())
  del torch


def _tiny_hand_count():
  """FLOPs of one 8x8 image through the tiny preset, layer by layer (T = 4 * 4 = 16)."""
  T = 16

  def conv(px, cin, cout, k=3):
    return 2 * px * k * k * cin * cout

  def attn(px, ch):  # 2 heads x 4 = 8 = ch: q, k, v, out projections; scores; weighted values
    return 4 * 2 * px * ch * 8 + 2 * px * px * 8 + 2 * px * px * 8

  terms = [
    2 * (4 * T + T * T),  # time MLP
    conv(64, 1, 4),  # conv_in
    conv(64, 4, 4) + conv(64, 4, 4) + 2 * T * 4,  # down 0 resnet 4->4 at 8x8
    conv(16, 4, 4),  # down 0 downsample to 4x4
    conv(16, 4, 8) + conv(16, 8, 8) + conv(16, 4, 8, 1) + 2 * T * 8,  # down 1 resnet 4->8 (+1x1 shortcut)
    attn(16, 8),
    2 * (conv(16, 8, 8) + conv(16, 8, 8) + 2 * T * 8),  # mid resnets
    attn(16, 8),  # mid attention
    conv(16, 16, 8) + conv(16, 8, 8) + conv(16, 16, 8, 1) + 2 * T * 8,  # up 0 resnet [8 | skip 8]
    conv(16, 12, 8) + conv(16, 8, 8) + conv(16, 12, 8, 1) + 2 * T * 8,  # up 0 resnet [8 | skip 4]
    2 * attn(16, 8),
    conv(64, 8, 8),  # upsample to 8x8
    conv(64, 12, 4) + conv(64, 4, 4) + conv(64, 12, 4, 1) + 2 * T * 4,  # up 1 resnet [8 | skip 4]
    conv(64, 8, 4) + conv(64, 4, 4) + conv(64, 8, 4, 1) + 2 * T * 4,  # up 1 resnet [4 | skip 4]
    conv(64, 4, 1),  # conv_out
  ]
  return sum(terms)


def test_flops_tiny_equals_hand_count():
  assert unet.flops(unet.PRESETS["tiny"], 3) == 3 * _tiny_hand_count()


def test_every_product_goes_through_the_kernels():
  calls = {"conv": 0, "dot": 0}

  def conv(*a, **k):
    calls["conv"] += 1
    return jax.lax.conv_general_dilated(*a, **k)

  def dot(*a, **k):
    calls["dot"] += 1
    return jax.lax.dot_general(*a, **k)

  counting = kernels_lib.Kernels(dot_general=dot, conv_general_dilated=conv, name="counting")
  config = unet.PRESETS["tiny"]
  params = unet.init(config, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t, y = jnp.array([5, 600]), jnp.array([1, 9], jnp.int32)
  got = unet.apply(params, x, t, y, config=config, kernels=counting)
  np.testing.assert_array_equal(got, unet.apply(params, x, t, y, config=config))
  # Hand count: conv_in, 2 + downsample, 2 + shortcut, mid 2 x 2, up 0 2 x (2 + shortcut) + upsample,
  # up 1 2 x (2 + shortcut), conv_out; time MLP 2, one time projection per ResNet (8), and per
  # attention block (4) q, k, v, out and the two attention products.
  assert calls == {"conv": 1 + 3 + 3 + 4 + 7 + 6 + 1, "dot": 2 + 8 + 4 * 6}


def test_init_is_pytorch_default_and_grad_runs():
  config = unet.PRESETS["tiny"]
  model = unet.make(config)
  params = model.init(jax.random.PRNGKey(0))
  assert unet.param_count(config) == sum(x.size for x in jax.tree_util.tree_leaves(params))
  w = params["up_blocks"][0]["resnets"][0]["conv1"]["kernel"]  # 3x3, 16 -> 8 channels: fan-in 144
  assert w.shape == (3, 3, 16, 8) and float(jnp.abs(w).max()) <= 1 / 12 and float(jnp.abs(w).max()) > 0.9 / 12
  np.testing.assert_array_equal(params["conv_norm_out"]["scale"], np.ones(4))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t, y = jnp.array([3, 900]), jnp.array([0, 7], jnp.int32)
  assert model.denoise(params, x, t, y).shape == (2, 8, 8, 1)
  np.testing.assert_array_equal(model.denoise(params, x, t, y), unet.apply(params, x, t, y, config=config))
  grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(model.denoise(p, x, t, y)))))(params)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(jnp.abs(grads["class_embedding"]["embedding"][7]).sum()) > 0  # used label: a gradient
  assert float(jnp.abs(grads["class_embedding"]["embedding"][5]).sum()) == 0  # unused label: none


def test_bfloat16_compute_stays_close_and_returns_float32():
  config = unet.PRESETS["tiny"]
  params = unet.init(config, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t, y = jnp.array([3, 900]), jnp.array([0, 7], jnp.int32)
  ref = unet.apply(params, x, t, y, config=config)
  got = unet.make(config, compute_dtype="bfloat16").denoise(params, x, t, y)
  assert got.dtype == jnp.float32
  err = float(jnp.abs(got - ref).max())
  assert 0 < err < 0.05 * float(jnp.abs(ref).max())


def test_dropout_acts_only_with_a_key():
  config = dataclasses.replace(unet.PRESETS["tiny"], dropout=0.5)
  params = unet.init(config, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t, y = jnp.array([3, 900]), jnp.array([0, 7], jnp.int32)
  plain = unet.apply(params, x, t, y, config=dataclasses.replace(config, dropout=0.0))
  np.testing.assert_array_equal(unet.apply(params, x, t, y, config=config), plain)
  dropped = unet.apply(params, x, t, y, config=config, dropout_key=jax.random.PRNGKey(2))
  assert float(jnp.abs(dropped - plain).max()) > 1e-3


@pytest.mark.parametrize(
  "change, message",
  [
    (
      dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")),
      r"supported: \['DownBlock2D', 'AttnDownBlock2D'\]",
    ),
    (dict(up_block_types=("UpBlock2D", "SkipUpBlock2D")), r"supported: \['UpBlock2D', 'AttnUpBlock2D'\]"),
    (dict(block_out_channels=(4, 8, 8)), "same length"),
    (dict(norm_num_groups=3), "norm_num_groups=3 must divide"),
    (dict(resnet_time_scale_shift="spatial"), r"allowed: \['default', 'scale_shift'\]"),
    (dict(time_embedding_type="fourier"), r"allowed: \['positional'\]"),
    (dict(attention_head_dim=16), "attention_head_dim=16 is larger"),
  ],
)
def test_bad_configs_are_refused(change, message):
  with pytest.raises(ValueError, match=message):
    unet.preset("tiny", **change)


def test_bad_inputs_are_refused():
  config = unet.PRESETS["tiny"]
  params = unet.init(config, jax.random.PRNGKey(0))
  x, t, y = jnp.zeros((2, 8, 8, 1)), jnp.array([1, 2]), jnp.array([0, 1], jnp.int32)
  with pytest.raises(ValueError, match=r"\[B, H, W, 1\] \(NHWC\)"):
    unet.apply(params, jnp.zeros((2, 1, 8, 8)), t, y, config=config)
  with pytest.raises(ValueError, match="multiples of 2"):
    unet.apply(params, jnp.zeros((2, 7, 8, 1)), t, y, config=config)
  with pytest.raises(ValueError, match="pass class_labels"):
    unet.apply(params, x, t, None, config=config)
  with pytest.raises(ValueError, match="timesteps must be"):
    unet.apply(params, x, jnp.array([1, 2, 3]), y, config=config)
  with pytest.raises(ValueError, match="unknown U-Net preset"):
    unet.preset("huge")
