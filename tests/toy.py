"""A tiny bigram language model and preference data, for strategy and step tests.

log p(y_t | y_{t-1}) = log_softmax(emb[y_{t-1}] @ w)[y_t]; the first completion token is
conditioned on the last prompt token. Written out here (not with pofx.logprobs) so that the
strategy tests do not depend on the model code.
"""

import jax
import jax.numpy as jnp
import numpy as np

import pofx

V, D = 11, 8


def init(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"emb": 0.3 * jax.random.normal(k1, (V, D)), "w": 0.3 * jax.random.normal(k2, (D, V)), "bias": jnp.zeros((V,))}


def _token_logps(params, prev, tokens):
  logits = params["emb"][prev] @ params["w"] + params["bias"]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def logps_fn(params, batch):
  def side(tokens):
    prev = jnp.concatenate([batch["last_prompt_token"][:, None], tokens[:, :-1]], axis=1)
    return _token_logps(params, prev, tokens)

  return pofx.PairLogps.from_tokens(
    side(batch["chosen_tokens"]), batch["chosen_mask"], side(batch["rejected_tokens"]), batch["rejected_mask"]
  )


def batch(seed=0, b=8, t=5):
  """Chosen completions follow y -> y+1 (mod V); rejected ones are random; unequal lengths."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, V, b)
  chosen = (start[:, None] + 1 + np.arange(t)[None, :]) % V
  rejected = rng.integers(0, V, (b, t))
  c_len = rng.integers(2, t + 1, b)
  r_len = rng.integers(2, t + 1, b)
  mask = lambda n: (np.arange(t)[None, :] < n[:, None]).astype(np.float32)
  return {
    "last_prompt_token": jnp.asarray(start, jnp.int32),
    "chosen_tokens": jnp.asarray(chosen, jnp.int32),
    "rejected_tokens": jnp.asarray(rejected, jnp.int32),
    "chosen_mask": jnp.asarray(mask(c_len)),
    "rejected_mask": jnp.asarray(mask(r_len)),
  }


# The parallel modes each toy strategy runs in (tests/parallel_check.py argues the cover: every
# strategy in jit_2x4 and in at least one per-device mode, shard_map or pmap, each of those with
# several strategies; frozen in every mode and mesh). Kept here, a module without side effects,
# so that the check script and tests/test_parallel.py read the same table.
TOY_MODES = {
  "none": ("jit_2x4", "pmap_8"),
  "frozen": ("jit_8", "jit_4x2", "jit_2x4", "shard_map_8", "pmap_8"),
  "cached": ("jit_2x4", "shard_map_8"),
  "multi": ("jit_2x4", "pmap_8"),
  "synced": ("jit_2x4", "shard_map_8"),
  "ema": ("jit_2x4", "pmap_8"),
  "ema_companions": ("jit_2x4", "shard_map_8"),
  "sam": ("jit_2x4", "shard_map_8", "pmap_8"),
  "awp": ("jit_2x4", "shard_map_8", "pmap_8"),
}
