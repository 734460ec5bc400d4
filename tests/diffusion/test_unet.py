"""The U-Net denoiser (`pofx.diffusion.unet`): outputs equal to diffusers' `UNet2DModel` (PyTorch,
the reference implementation) on random small configs read from a `save_pretrained` folder; the
bench preset's parameter count equal to diffusers' for the baseline's config, and its FLOPs to
PyTorch's FLOP counter over diffusers' forward; a hand count of the tiny preset's FLOPs,
convolutions and dense products (every one through the injected kernels, in the compute dtype);
initialisation, gradients, dropout and refusals.

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

from pofx.diffusion import diffusers_io, unet
from tests.diffusion.counting import counting_kernels

_apply = jax.jit(unet.apply, static_argnames=("config", "kernels", "compute_dtype"))

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
  got = _apply(params, _nhwc(x), jnp.asarray(t), None if labels is None else jnp.asarray(labels), config=config)
  assert got.dtype == jnp.float32
  got = np.transpose(np.asarray(got), (0, 3, 1, 2))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  assert np.abs(expected).max() > 0.1  # not a trivially small output


def test_bench_preset_has_diffusers_parameter_and_flop_counts():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from torch.nn.attention import SDPBackend, sdpa_kernel
  from torch.utils.flop_counter import FlopCounterMode

  config = unet.PRESETS["bench"]
  assert config == unet.UNetConfig(**BASELINE)
  model = diffusers.UNet2DModel(**BASELINE)
  assert unet.param_count(config) == sum(p.numel() for p in model.parameters())
  # PyTorch's FLOP counter over diffusers' forward (attention on the math path, so that its two
  # batched products are counted; the fused CPU kernel is not).
  with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
    model(torch.zeros(2, 1, 16, 16), torch.tensor([1, 2]), class_labels=torch.tensor([0, 1]))
  assert unet.flops(config, 2) == counter.get_total_flops()


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


@pytest.fixture(scope="module")
def tiny():
  """The tiny preset: config, params and inputs (x, t, labels)."""
  config = unet.PRESETS["tiny"]
  params = jax.jit(unet.init, static_argnums=0)(config, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t, y = jnp.array([3, 900]), jnp.array([0, 7], jnp.int32)
  return config, params, (x, t, y)


@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
def test_every_product_goes_through_the_kernels_in_the_compute_dtype(tiny, compute_dtype):
  config, params, (x, t, y) = tiny
  counting, calls = counting_kernels()
  model = unet.make(config, kernels=counting, compute_dtype=compute_dtype)
  out = jax.eval_shape(lambda p: model.denoise(p, x, t, y), params)  # traces, computes nothing
  assert (out.shape, out.dtype) == ((2, 8, 8, 1), jnp.float32)
  # Hand count: conv_in, 2 + downsample, 2, mid 2 x 2, up 0 2 x 2 + upsample, up 1 2 x 2, conv_out;
  # time MLP 2, one time projection per ResNet (8), the 1x1 shortcuts as products (down 1: 1, up 0
  # and up 1: 2 each), and per attention block (4, on 8 channels) and head (2, of width 4) its
  # q, k, v and its share of out (the heads are computed one by one); one attention call per head,
  # every query seeing every key (mask None).
  assert unet._heads(config, 8) == (2, 4)
  assert len(calls["conv"]) == 1 + 3 + 2 + 4 + 5 + 4 + 1
  assert len(calls["dot"]) == 2 + 8 + 5 + 4 * 2 * 4
  assert len(calls["attention"]) == 4 * 2 and all(m is None for m in calls["attention_masks"])
  want = jnp.dtype(compute_dtype or "float32")
  assert {d for pair in calls["conv"] + calls["dot"] + calls["attention"] for d in pair} == {want}


def test_init_is_pytorch_default(tiny):
  config, params, _ = tiny
  assert unet.param_count(config) == sum(v.size for v in jax.tree_util.tree_leaves(params))
  # Every convolution and linear layer: weights and biases uniform in +-1/sqrt(fan_in), fan_in the
  # kernel's size without its output axis (kh kw C_in, or the input width).
  scaled = {"kernel": [], "bias": []}

  def walk(node):
    if isinstance(node, dict) and "kernel" in node:
      fan_in = int(np.prod(node["kernel"].shape[:-1]))
      for leaf in ("kernel", "bias"):
        scaled[leaf].append(np.abs(np.asarray(node[leaf])).ravel() * np.sqrt(fan_in))
    elif isinstance(node, dict):
      for v in node.values():
        walk(v)
    elif isinstance(node, list):
      for v in node:
        walk(v)

  walk(params)
  for leaf, parts in scaled.items():
    r = np.concatenate(parts)
    assert r.max() <= 1 + 1e-6 and r.max() > 0.99 and abs(r.mean() - 0.5) < 0.05, leaf  # |U(-1, 1)|
  assert abs(float(jnp.std(params["class_embedding"]["embedding"])) - 1) < 0.3
  np.testing.assert_array_equal(params["conv_norm_out"]["scale"], np.ones(4))
  np.testing.assert_array_equal(params["conv_norm_out"]["bias"], np.zeros(4))


def test_grad_runs_and_dropout_acts_only_with_a_key(tiny):
  config, params, (x, t, y) = tiny
  dropping = dataclasses.replace(config, dropout=0.5)
  # Without a key the program is the one of dropout 0 (so its values are too).
  jaxpr = lambda c: str(jax.make_jaxpr(lambda p: unet.apply(p, x, t, y, config=c))(params))
  assert jaxpr(dropping) == jaxpr(config)
  # The gradient, with dropout acting, on one resolution (the mid block's attention included), to
  # keep the compiled program small.
  small = dataclasses.replace(
    dropping, block_out_channels=(4,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)
  )
  rng = np.random.default_rng(0)
  p = jax.tree_util.tree_map(
    lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), unet.param_shapes(small)
  )

  def losses(p, key):
    kept = jnp.mean(jnp.square(unet.apply(p, x, t, y, config=small)))
    return jnp.mean(jnp.square(unet.apply(p, x, t, y, config=small, dropout_key=key))), kept

  (value, kept), grads = jax.jit(jax.value_and_grad(losses, has_aux=True))(p, jax.random.PRNGKey(2))
  assert abs(float(value) - float(kept)) > 1e-3 * float(kept)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(p)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads["mid_block"]["attentions"][0]["to_q"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["class_embedding"]["embedding"][7]).sum()) > 0  # used label: a gradient
  assert float(jnp.abs(grads["class_embedding"]["embedding"][5]).sum()) == 0  # unused label: none


def _group_norm_f64(x, scale, bias, groups, eps):
  """GroupNorm as Wu & He 2018 (arXiv:1803.08494) write it, in float64 numpy."""
  B, H, W, C = x.shape
  xg = x.reshape(B, H, W, groups, C // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(B, H, W, C) * scale + bias


def test_group_norm_and_its_written_out_derivative_match_the_formula():
  # The value against the textbook formula, and the hand-written derivative (`pofx.group_norm._group_norm_bwd`)
  # against central finite differences of that formula in float64, for a weighted sum of the
  # output (so that every output element's gradient counts). Inputs off zero mean, so that a
  # wrong mean term shows.
  rng = np.random.default_rng(0)
  x = 2.0 + 3.0 * rng.standard_normal((2, 3, 3, 6))
  scale, bias, weights = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(x.shape)
  groups, eps = 3, 1e-5
  p = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  got = unet.group_norm(jnp.asarray(x, jnp.float32), p, groups, eps, jnp.float32)
  np.testing.assert_allclose(np.asarray(got), _group_norm_f64(x, scale, bias, groups, eps), atol=2e-5)

  def objective(xx, ss, bb):
    return float((_group_norm_f64(xx, ss, bb, groups, eps) * weights).sum())

  def numeric(i, h=1e-5):
    args = [x, scale, bias]
    out = np.zeros_like(args[i])
    for idx in np.ndindex(out.shape):
      up = [a.copy() for a in args]
      down = [a.copy() for a in args]
      up[i][idx] += h
      down[i][idx] -= h
      out[idx] = (objective(*up) - objective(*down)) / (2 * h)
    return out

  grads = jax.grad(
    lambda xx, pp: jnp.sum(unet.group_norm(xx, pp, groups, eps, jnp.float32) * jnp.asarray(weights, jnp.float32)),
    argnums=(0, 1),
  )(jnp.asarray(x, jnp.float32), p)
  np.testing.assert_allclose(np.asarray(grads[0]), numeric(0), atol=2e-4)
  np.testing.assert_allclose(np.asarray(grads[1]["scale"]), numeric(1), atol=2e-4)
  np.testing.assert_allclose(np.asarray(grads[1]["bias"]), numeric(2), atol=2e-4)


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


def test_bad_inputs_are_refused(tiny):
  config, params, _ = tiny
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
