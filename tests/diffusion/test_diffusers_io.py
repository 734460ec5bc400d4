"""diffusers `UNet2DModel` folders (`pofx.diffusion.diffusers_io`): pofx's export loads in diffusers
(PyTorch, the reference) with the same outputs; bfloat16 folders written by diffusers load with
the outputs of their weights; a bfloat16 export holds the rounded weights; bad folders and
bad parameter trees fail with errors that name the problem.

Tolerances as in tests/diffusion/test_unet.py: float32 on both sides, 1e-4 absolute on outputs of
size about 1.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from pofx.diffusion import diffusers_io, unet
from tests.diffusion.test_unet import PARITY

_apply = jax.jit(unet.apply, static_argnames=("config", "kernels", "compute_dtype"))

# The parity config of tests/diffusion/test_unet.py (same shapes: its compiled programs are reused).
CONFIG = unet.UNetConfig(**PARITY)
X = np.random.default_rng(0).standard_normal((3, 2, 8, 8)).astype(np.float32)  # NCHW
T = np.array([0, 17, 999])
LABELS = np.array([0, 3, 4])


def _pofx_out(config, params):
  x = jnp.asarray(X.transpose(0, 2, 3, 1))
  out = _apply(params, x, jnp.asarray(T), jnp.asarray(LABELS), config=config)
  return np.asarray(out).transpose(0, 3, 1, 2)


def _torch_out(torch, model):
  with torch.no_grad():
    return model(torch.from_numpy(X), torch.from_numpy(T), class_labels=torch.from_numpy(LABELS)).sample.numpy()


def _random_params(config, seed=0):
  """Random parameters of `config` (numpy, nothing compiled): weights of variance 1/fan-in, biases
  and GroupNorm shifts about 0.3, GroupNorm scales about 1."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    names = [str(getattr(k, "key", "")) for k in path]
    dims = shape.shape
    if names[-1] == "scale":
      x = 1 + 0.3 * rng.standard_normal(dims)
    elif names[-1] == "kernel":
      x = rng.standard_normal(dims) / np.sqrt(np.prod(dims[:-1]))
    else:
      x = 0.3 * rng.standard_normal(dims)
    return x.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, unet.param_shapes(config))


def test_export_loads_in_diffusers_with_the_same_outputs(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  params = _random_params(CONFIG)
  folder = diffusers_io.save(str(tmp_path / "unet"), CONFIG, params)
  model = diffusers.UNet2DModel.from_pretrained(folder).eval()
  expected = _torch_out(torch, model)
  np.testing.assert_allclose(_pofx_out(CONFIG, params), expected, rtol=0, atol=1e-4)
  assert np.abs(expected).max() > 0.1
  # And back: the same config and the same float32 weights, exactly.
  config, loaded = diffusers_io.load(folder)
  assert config == CONFIG
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_reads_bfloat16_folders(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(**{f.name: getattr(CONFIG, f.name) for f in dataclasses.fields(CONFIG)})
  model.to(torch.bfloat16).save_pretrained(str(tmp_path))
  config, params = diffusers_io.load(str(tmp_path))
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
  expected = _torch_out(torch, model.float().eval())  # the bfloat16 weights, computed in float32
  np.testing.assert_allclose(_pofx_out(config, params), expected, rtol=0, atol=1e-4)


def test_bfloat16_export_holds_the_rounded_weights(tmp_path):
  config = unet.PRESETS["tiny"]
  params = _random_params(config, seed=1)
  diffusers_io.save(str(tmp_path), config, params, dtype="bfloat16")
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["_class_name"] == "UNet2DModel"
  _, loaded = diffusers_io.load(str(tmp_path))
  rounded = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, rounded)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  config = unet.PRESETS["tiny"]
  return diffusers_io.save(str(tmp_path_factory.mktemp("tiny")), config, _random_params(config))


def _edit_config(**changes):
  def edit(folder):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
      cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
      json.dump(cfg, f)

  return edit


def _edit_weights(fn):
  def edit(folder):
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = safetensors.numpy.load_file(path)
    fn(state)
    safetensors.numpy.save_file(state, path)

  return edit


def _remove(name):
  return lambda folder: os.remove(os.path.join(folder, name))


def _write(name, text):
  def edit(folder):
    with open(os.path.join(folder, name), "w") as f:
      f.write(text)

  return edit


BAD_FOLDERS = {
  "no config": (_remove("config.json"), "no config.json"),
  "not json": (_write("config.json", "{"), "not valid JSON"),
  "other model": (_edit_config(_class_name="UNet1DModel"), "_class_name is 'UNet1DModel'"),
  "unknown key": (_edit_config(cross_attention_dim=64), r"unknown UNet2DModel config keys \['cross_attention_dim'\]"),
  "unsupported block": (
    _edit_config(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]),
    r"'CrossAttnDownBlock2D' is not supported; supported: \['DownBlock2D', 'AttnDownBlock2D'\]",
  ),
  "no weights": (_remove("diffusion_pytorch_model.safetensors"), "no diffusion_pytorch_model.safetensors"),
  "missing tensor": (
    _edit_weights(lambda s: s.pop("mid_block.attentions.0.to_k.bias")),
    r"missing tensors \['mid_block.attentions.0.to_k.bias'\]",
  ),
  "extra tensor": (
    _edit_weights(lambda s: s.update({"mid_block.attentions.0.to_k.extra": np.zeros(3, np.float32)})),
    r"unexpected tensors \['mid_block.attentions.0.to_k.extra'\]",
  ),
  "wrong shape": (
    _edit_weights(lambda s: s.update({"conv_in.weight": np.zeros((4, 1, 5, 5), np.float32)})),
    r"conv_in.weight has shape \(4, 1, 5, 5\); config.json implies \(4, 1, 3, 3\)",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folders_fail_clearly(tiny_folder, tmp_path, case):
  edit, message = BAD_FOLDERS[case]
  folder = str(tmp_path / "copy")
  shutil.copytree(tiny_folder, folder)
  edit(folder)
  with pytest.raises(ValueError, match=message):
    diffusers_io.load(folder)


def test_a_missing_folder_and_bad_saves_fail_clearly(tiny_folder, tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    diffusers_io.load(str(tmp_path / "nowhere"))
  _, params = diffusers_io.load(tiny_folder)
  with pytest.raises(ValueError, match="does not match the config"):
    diffusers_io.save(str(tmp_path / "a"), unet.PRESETS["bench"], params)
  with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'bfloat16'\]"):
    diffusers_io.save(str(tmp_path / "b"), unet.PRESETS["tiny"], params, dtype="float16")
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
