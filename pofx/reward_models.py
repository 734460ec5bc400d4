r"""Bradley-Terry reward models: a language-model backbone with a scalar head.

    params = reward_models.init(model_config, key)            # or from_backbone(sft_params, key, ...)
    score = reward_models.score_fn(model)                     # model = pofx.models.make(model_config)
    rows = reward_models.pack(prompts, completions)           # right-padded numpy rows
    r = score(params, *rows)                                  # [N] float32 rewards
    loss = reward_models.pair_loss(r_w, r_l, margin=m, center_coefficient=c)   # [N] per pair
    reward_models.accuracy(r_w, r_l)                          # share of pairs with r_w > r_l

The backbone is a `pofx.models` decoder used through its pure functions (`model.apply`, the same
function the policy runs): the reward of a sequence is the final (normed) hidden state at its
**last real token** projected by a head vector `w [D]` (no bias, as Hugging Face's
`LlamaForSequenceClassification` with one label):

    r(x, y) = h_L(x ; y)[last real token] . w

Only that token's hidden state is computed after the last block (`apply(output_index=...)`).
Parameters are `{"backbone": <pofx.models params>, "head": {"kernel": [D]}}`; the backbone's LM
head (if untied) is carried but unused.

Training is the Bradley-Terry model of the labels (Ouyang et al. 2022, arXiv:2203.02155, Eq. 1;
Stiennon et al. 2020, arXiv:2009.01325), per pair

    L = -log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2

with an optional margin `m` per pair (Llama 2, Touvron et al. 2023, arXiv:2307.09288, Eq. 2: a
margin that grows with the rating gap) and an optional reward-centering weight `c` (Eisenstein
et al. 2023, arXiv:2312.09244: the auxiliary `(r_w + r_l)^2` keeps rewards near zero).
The mean over a batch equals TRL's `RewardTrainer.compute_loss` (`margin`,
`center_rewards_coefficient`).

The training loop and checkpoint I/O are the program's (`experiments/reward_model.py`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pofx.models import llama

Array = jax.Array


def init(model_config: llama.LlamaConfig, key) -> dict:
  """A fresh reward model: a backbone of `model_config` (`pofx.models.init_params`) and a head
  vector drawn `N(0, init_std^2)` (the model's own matrix initialiser)."""
  k_backbone, k_head = jax.random.split(key)
  return from_backbone(llama.init_params(model_config, k_backbone), k_head, model_config)


def from_backbone(backbone: dict, key, model_config: llama.LlamaConfig) -> dict:
  """A reward model on existing backbone parameters (e.g. the SFT policy's; they are copied,
  never aliased) with a fresh head `N(0, init_std^2)` of size `model_config.hidden_size`."""
  d = int(model_config.hidden_size)
  head = float(model_config.init_std) * jax.random.normal(key, (d,), jnp.float32)
  return {"backbone": jax.tree.map(jnp.array, backbone), "head": {"kernel": head}}


def last_token_index(mask) -> Array:
  """`[N]` int32: the column of each row's last real token (the last column where `mask > 0`)."""
  m = jnp.asarray(mask) > 0
  width = m.shape[-1]
  return (width - 1 - jnp.argmax(m[:, ::-1], axis=-1)).astype(jnp.int32)


def score_fn(model):
  """`score(params, tokens, positions, segment_ids, mask) -> [N]` float32 rewards of N rows.

  `model`: the backbone's pure functions (`pofx.models.make(config)`). Rows are `[N, L]`:
  token ids, RoPE positions, segment ids (0 = padding) and `mask` (1 on real tokens; every row
  needs at least one). The reward is the head applied to the final hidden state at each row's
  last real token (`last_token_index`). Differentiable and jittable."""

  def score(params, tokens, positions, segment_ids, mask) -> Array:
    tokens = jnp.asarray(tokens)
    n, width = tokens.shape
    last = last_token_index(mask)
    flat = jnp.arange(n, dtype=jnp.int32) * width + last
    hidden = model.apply(params["backbone"], tokens, positions, segment_ids, output_index=flat)  # [N, D]
    return jnp.asarray(hidden, jnp.float32) @ jnp.asarray(params["head"]["kernel"], jnp.float32)

  return score


def pack(
  prompts: Sequence[Sequence[int]],
  completions: Sequence[Sequence[int]],
  *,
  width: Optional[int] = None,
  pad_id: int = 0,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded rows `[prompt | completion | pad]` for `score`: `(tokens [N, W] int32,
  positions [N, W] int32, segment_ids [N, W] int32, mask [N, W] float32)`, with `W = width` or
  the longest sequence. ValueError for a sequence longer than `width`, an empty one, or unequal
  numbers of prompts and completions."""
  if len(prompts) != len(completions):
    raise ValueError(f"pack: {len(prompts)} prompts but {len(completions)} completions.")
  seqs = [
    np.concatenate([np.asarray(p, np.int32).reshape(-1), np.asarray(c, np.int32).reshape(-1)])
    for p, c in zip(prompts, completions)
  ]
  if not seqs:
    raise ValueError("pack: no sequences given.")
  longest = max(s.size for s in seqs)
  w = longest if width is None else int(width)
  for i, s in enumerate(seqs):
    if s.size == 0:
      raise ValueError(f"pack: sequence {i} is empty (prompt and completion both empty).")
    if s.size > w:
      raise ValueError(f"pack: sequence {i} has {s.size} tokens, more than width={w}.")
  n = len(seqs)
  tokens = np.full((n, w), pad_id, np.int32)
  mask = np.zeros((n, w), np.float32)
  for i, s in enumerate(seqs):
    tokens[i, : s.size], mask[i, : s.size] = s, 1.0
  positions = np.broadcast_to(np.arange(w, dtype=np.int32), (n, w)).copy()
  return tokens, positions, mask.astype(np.int32), mask


def _check_pair_shapes(name, r_w, r_l):
  r_w, r_l = jnp.asarray(r_w, jnp.float32), jnp.asarray(r_l, jnp.float32)
  if r_w.ndim != 1 or r_w.shape != r_l.shape:
    raise ValueError(f"{name}: r_w and r_l must be [N] arrays of one shape, got {r_w.shape} and {r_l.shape}.")
  return r_w, r_l


def pair_loss(r_w, r_l, *, margin=None, center_coefficient: float = 0.0) -> Array:
  """`[N]` Bradley-Terry losses `-log sigmoid(r_w - r_l - margin) + c (r_w + r_l)^2` (module
  docstring). `margin`: None (0), a number or `[N]`; `center_coefficient` c >= 0."""
  r_w, r_l = _check_pair_shapes("pair_loss", r_w, r_l)
  c = float(center_coefficient)
  if not c >= 0.0:
    raise ValueError(f"pair_loss: center_coefficient must be >= 0, got {center_coefficient!r}.")
  m = 0.0 if margin is None else jnp.asarray(margin, jnp.float32)
  if margin is not None and jnp.ndim(m) not in (0, 1):
    raise ValueError(f"pair_loss: margin must be a number or an [N] array, got shape {jnp.shape(m)}.")
  if jnp.ndim(m) == 1 and jnp.shape(m) != r_w.shape:
    raise ValueError(f"pair_loss: margin has shape {jnp.shape(m)}, rewards {r_w.shape}.")
  loss = -jax.nn.log_sigmoid(r_w - r_l - m)
  return loss + c * jnp.square(r_w + r_l) if c else loss


def accuracy(r_w, r_l) -> Array:
  """The share of pairs whose chosen reward is strictly higher, `mean(r_w > r_l)` (a tie counts
  as wrong, as TRL's `RewardTrainer` metric)."""
  r_w, r_l = _check_pair_shapes("accuracy", r_w, r_l)
  return jnp.mean((r_w > r_l).astype(jnp.float32))


def bt_probability(r_1, r_2) -> Array:
  """The model's Bradley-Terry probability `P(y_1 > y_2) = sigmoid(r_1 - r_2)`."""
  return jax.nn.sigmoid(jnp.asarray(r_1, jnp.float32) - jnp.asarray(r_2, jnp.float32))
