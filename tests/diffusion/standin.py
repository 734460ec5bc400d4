"""A tiny stand-in denoiser for the schedule, sampler and pair tests, in JAX and (its twin) in torch.

prediction = conv3x3(x_t, w) + b + emb(t) @ wt + cls[cond], with emb(t) = [sin(t f), cos(t f)] and
f = 10000^(-k / (D/2 - 1)) / 1000 for k = 0 .. D/2 - 1: smooth in x_t and t, class-conditional,
with a null class (`NULL_CLASS`) for classifier-free guidance. The torch twin computes the same
function with `torch.nn.functional.conv2d` on NCHW arrays.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

EMB = 8
NUM_CLASSES = 3
NULL_CLASS = NUM_CLASSES  # the extra label trained as "no condition"


def init(key, channels=1, scale=0.1):
  k = jax.random.split(key, 4)
  return {
    "w": scale * jax.random.normal(k[0], (3, 3, channels, channels)),
    "b": scale * jax.random.normal(k[1], (channels,)),
    "wt": scale * jax.random.normal(k[2], (EMB, channels)),
    "cls": scale * jax.random.normal(k[3], (NUM_CLASSES + 1, channels)),
  }


def _freqs():
  half = EMB // 2
  return 10000.0 ** (-np.arange(half) / (half - 1)) / 1000.0


def embed_np(t):
  a = np.asarray(t, np.float64)[:, None] * _freqs()[None]
  return np.concatenate([np.sin(a), np.cos(a)], axis=-1)


def denoise(params, x_t, t, cond):
  """The denoiser protocol: `(params, x_t [B, H, W, C], t [B], cond [B] or None) -> [B, H, W, C]`."""
  y = jax.lax.conv_general_dilated(x_t, params["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  a = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(_freqs(), jnp.float32)[None]
  emb = jnp.concatenate([jnp.sin(a), jnp.cos(a)], axis=-1) @ params["wt"]
  y = y + params["b"] + emb[:, None, None, :]
  if cond is not None:
    y = y + params["cls"][cond][:, None, None, :]
  return y


@functools.cache
def _torch():
  import torch

  return torch


def torch_denoise(params, x_nchw, t, cond):
  """The torch twin on NCHW tensors, with `params` the JAX stand-in's (converted here)."""
  torch = _torch()
  p = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in params.items()}
  y = torch.nn.functional.conv2d(x_nchw, p["w"].permute(3, 2, 0, 1), padding=1)
  freqs = torch.from_numpy(_freqs().astype(np.float32))
  a = t.to(torch.float32)[:, None] * freqs[None]
  emb = torch.cat([torch.sin(a), torch.cos(a)], dim=-1) @ p["wt"]
  y = y + p["b"][None, :, None, None] + emb[:, :, None, None]
  if cond is not None:
    y = y + p["cls"][cond][:, :, None, None]
  return y
