"""The cross-attention U-Net (`pofx.diffusion.unet.UNetConditionConfig`, diffusers'
`UNet2DConditionModel`): outputs equal to diffusers' (PyTorch, the reference implementation) on a
random small config read from its `save_pretrained` folder; pofx's export of other weights loads
in diffusers with pofx's outputs (Linear projections one way, 1x1 convolutions the other);
parameter count and FLOPs equal to diffusers' module and
PyTorch's FLOP counter; refusals of bad configs, inputs and folders.

Tolerance as in tests/diffusion/test_unet.py: both sides in float32, outputs of size about 1,
1e-4 absolute (a few 1e-6 in practice).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx.diffusion import diffusers_io, unet
from tests.diffusion.counting import counting_kernels

_apply = jax.jit(unet.apply, static_argnames=("config", "kernels", "compute_dtype"))

# Two resolutions; a transformer after the first down block's ResNet, in the mid block and in the
# last up block, with 2 heads at the 8-channel resolution and 4 in the mid block (so a wrong
# per-block head count changes the output), Linear projections, mish, class labels too.
CONDITION = dict(
  sample_size=8,
  in_channels=2,
  out_channels=3,
  block_out_channels=(8, 16),
  layers_per_block=1,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  cross_attention_dim=6,
  attention_head_dim=(2, 4),
  norm_num_groups=4,
  num_class_embeds=3,
  use_linear_projection=True,
  act_fn="mish",
)
B, L = 3, 5


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, 2, 8, 8)).astype(np.float32)  # NCHW
  context = rng.standard_normal((B, L, 6)).astype(np.float32)
  return x, np.array([0, 17, 999]), context, np.array([0, 2, 1])


def _torch_out(torch, model, x, t, context, labels):
  with torch.no_grad():
    args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context))
    return model(*args, class_labels=torch.from_numpy(labels)).sample.numpy()


def _pofx_out(config, params, x, t, context, labels):
  out = _apply(
    params,
    jnp.asarray(x.transpose(0, 2, 3, 1)),
    jnp.asarray(t),
    jnp.asarray(labels),
    config=config,
    encoder_hidden_states=jnp.asarray(context),
  )
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_matches_diffusers_both_ways(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from torch.nn.attention import SDPBackend, sdpa_kernel
  from torch.utils.flop_counter import FlopCounterMode

  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny products: a second thread only spins
  try:
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**CONDITION).eval()
    with torch.no_grad():  # every weight away from its initial value (norms from 1 and 0, biases from 0)
      for _, p in model.named_parameters():
        p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "theirs"))
    x, t, context, labels = _inputs()
    expected = _torch_out(torch, model, x, t, context, labels)

    config, params = diffusers_io.load(str(tmp_path / "theirs"))
    assert config == unet.UNetConditionConfig(**CONDITION)
    np.testing.assert_allclose(_pofx_out(config, params, x, t, context, labels), expected, rtol=0, atol=1e-4)
    assert np.abs(expected).max() > 0.1

    # Export other weights, with diffusers' default 1x1-convolution projections (the kernels
    # [C, I] -> [1, 1, C, I]); diffusers loads them and computes pofx's outputs.
    conv = dataclasses.replace(config, use_linear_projection=False)

    def convert(path, a):
      a = 0.8 * a + 0.1
      names = [getattr(k, "key", None) for k in path]
      return a.reshape((1, 1) + a.shape) if names[-2] in ("proj_in", "proj_out") and names[-1] == "kernel" else a

    other = jax.tree_util.tree_map_with_path(convert, params)
    folder = diffusers_io.save(str(tmp_path / "ours"), conv, other)
    exported = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
    assert not exported.config.use_linear_projection
    # PyTorch's FLOP counter over this forward (attention on the math path, so that its two
    # batched products are counted; the fused CPU kernel is not).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
      theirs = _torch_out(torch, exported, x, t, context, labels)
  finally:
    torch.set_num_threads(threads)
  np.testing.assert_allclose(_pofx_out(conv, other, x, t, context, labels), theirs, rtol=0, atol=1e-4)
  assert np.abs(theirs - expected).max() > 0.1  # other weights, other outputs
  assert unet.flops(conv, B, context_length=L) == counter.get_total_flops()
  assert unet.param_count(config) == unet.param_count(conv) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
  "change, message",
  [
    (
      dict(down_block_types=("AttnDownBlock2D", "DownBlock2D")),
      r"supported: \['DownBlock2D', 'CrossAttnDownBlock2D'\]",
    ),
    (dict(mid_block_type="UNetMidBlock2D"), r"allowed: \['UNetMidBlock2DCrossAttn', None\]"),
    (dict(attention_head_dim=(2, 4, 4)), "one per resolution"),
    (dict(attention_head_dim=16), r"attention_head_dim \(heads\)=16 exceeds a transformer's 8 channels"),
    (dict(cross_attention_dim=0), "cross_attention_dim must be a positive integer"),
    (dict(use_linear_projection="yes"), "use_linear_projection must be True or False"),
  ],
)
def test_bad_configs_are_refused(change, message):
  with pytest.raises(ValueError, match=message):
    unet.UNetConditionConfig(**{**CONDITION, **change})


def test_bad_inputs_and_folders_are_refused():
  config = unet.UNetConditionConfig(**CONDITION)
  params = unet.param_shapes(config)  # the checks run before any array is touched
  x, t, y = jnp.zeros((B, 8, 8, 2)), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32)
  with pytest.raises(ValueError, match=r"encoder_hidden_states \[B, L, 6\]; pass them"):
    unet.apply(params, x, t, y, config=config)
  with pytest.raises(ValueError, match=r"must be \[B=3, L>=1, cross_attention_dim=6\], got \(3, 5, 4\)"):
    unet.apply(params, x, t, y, config=config, encoder_hidden_states=jnp.zeros((B, L, 4)))
  with pytest.raises(ValueError, match=r"cond must be \(encoder_hidden_states"):
    unet.make(config).denoise(params, x, t, jnp.zeros((B, L, 6)))
  tiny = unet.PRESETS["tiny"]
  with pytest.raises(ValueError, match="has no cross-attention"):
    unet.apply(
      unet.param_shapes(tiny), jnp.zeros((B, 8, 8, 1)), t, y, config=tiny, encoder_hidden_states=jnp.zeros((B, L, 6))
    )
  with pytest.raises(ValueError, match="pass context_length"):
    unet.flops(config, 1)
  raw = diffusers_io.config_to_diffusers(config)
  assert diffusers_io.config_from_diffusers(raw) == config
  with pytest.raises(ValueError, match="dual_cross_attention=True is not supported; pofx supports only False"):
    diffusers_io.config_from_diffusers({**raw, "dual_cross_attention": True})
  with pytest.raises(ValueError, match=r"unknown UNet2DConditionModel config keys \['add_attention'\]"):
    diffusers_io.config_from_diffusers({**raw, "add_attention": True})


def test_image_configs_choose_the_cross_attention_denoiser_by_preset():
  from configs import diffusion_dpo, diffusion_dpo_prompted
  from configs import validate as config_validation
  from experiments import diffusion

  c = diffusion_dpo_prompted.get_config("tiny")
  model = diffusion.denoiser(c)
  assert isinstance(model, unet.Encoded) and model.encoder.dim == model.unet.config.cross_attention_dim == 8
  assert model.unet.config.num_class_embeds is None and model.unet.config.head_counts == (2,)
  c = diffusion_dpo.get_config("tiny")
  c.unlock()
  c.model.cross_attention_dim = 8
  with pytest.raises(ValueError, match="cross_attention_dim=8 is read only by a cross-attention preset"):
    config_validation.validate(c)
  c = diffusion_dpo_prompted.get_config("tiny")
  c.unlock()
  c.model.attention_head_dim = 16
  with pytest.raises(ValueError, match=r"config.model: UNetConditionConfig: attention_head_dim \(heads\)=16 exceeds"):
    config_validation.validate(c)


def test_every_transformer_product_goes_through_the_kernels_in_the_compute_dtype():
  config = unet.PRESETS["tiny_prompted"]
  counting, calls = counting_kernels()
  model = unet.make(config, kernels=counting, compute_dtype="bfloat16")
  x, t, context = jnp.zeros((2, 8, 8, 1)), jnp.array([3, 900]), jnp.zeros((2, 3, 8))
  out = jax.eval_shape(lambda p: model.denoise(p, x, t, context), unet.param_shapes(config))  # traces only
  assert (out.shape, out.dtype) == ((2, 8, 8, 1), jnp.float32)
  # Hand count: the 3x3 convolutions as in the tiny preset (conv_in, down 2 + downsample, 2, mid
  # 2 x 2, up 2 x 2 + upsample, 2 x 2, conv_out); products: time MLP 2, 8 time projections, 5 1x1
  # shortcuts, and 4 transformers (down block 1, mid, 2 in up block 0) of 12 each: proj_in,
  # proj_out, self- and cross-attention (q, k, v, out: 4 each), the feed-forward's two; and two
  # attention calls per transformer (self and cross, all heads in one call, mask None).
  assert len(calls["conv"]) == 1 + 3 + 2 + 4 + 5 + 4 + 1
  assert len(calls["dot"]) == 2 + 8 + 5 + 4 * 12
  assert len(calls["attention"]) == 4 * 2 and all(m is None for m in calls["attention_masks"])
  dtypes = {d for pair in calls["conv"] + calls["dot"] + calls["attention"] for d in pair}
  assert dtypes == {jnp.dtype("bfloat16")}
