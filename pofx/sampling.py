r"""Jitted batched autoregressive sampling with a key/value cache, temperature and top-k.

    prompt_tokens, prompt_mask = sampling.left_pad(prompts, pad_id=0)
    out = sampling.sample(params, prompt_tokens, prompt_mask, key, model=model,
                          max_new_tokens=16, eos_id=3, temperature=1.0, top_k=0)
    out.tokens, out.mask, out.logps          # [B, T] completion tokens, 0/1 mask, log pi(y_t | ...)
    sampling.score(params_base, out, model=model)   # teacher-forced [B, T] log-probs of another model

The model is used only through its pure functions: `model` is a `pofx.models.LlamaModel`
(`pofx.models.make(config, kernels)`) or any hashable record with `apply(params, tokens,
positions, segment_ids) -> hidden`, `head(params) -> [D, V]`, `init_cache(batch_size,
max_length) -> cache` and `decode(params, tokens, positions, valid, cache) -> (logits, cache)`
(and optionally `kernels`, whose `dot_general` then computes the LM head of `score`).

Layout. Prompts of varying length are **left-padded** to a common width P, so that every row's
last prompt token sits in column P - 1 and the t-th new token of every row in column P + t (one
cache slot per step for the whole batch). RoPE positions count real tokens only (a prompt of n
tokens has positions 0..n-1 whatever its padding, and completion token t has position n + t), so
the logits equal those of the unpadded sequence; padding is never attended to.

Decoding. One prefill over the prompts (`model.decode`), then one cached step per new
token inside a `lax.while_loop` that stops as soon as every row has produced `eos_id` (or after
`max_new_tokens`). A row's completion includes its EOS token; everything after it is `pad_id`
with mask 0. A row that never produces EOS is cut at `max_new_tokens` (`finished` False).

Token choice at each step, from the model's next-token logits z:
  temperature == 0      greedy: argmax z (top-k is irrelevant);
  temperature > 0       sample from softmax(z / temperature), restricted to the top_k largest
                        logits when top_k > 0 (sampling draws an index among the top-k
                        candidates, so a token outside them is impossible, ties included).

Log-probs returned per completion token (0 where the mask is 0):
  `logps`          log softmax(z)[y_t]: the **model's** log-prob (temperature 1, full vocabulary),
                   the quantity DPO and KL(pi || pi_base) estimates need. It is the sampling
                   distribution's log-prob exactly when temperature == 1 and top_k == 0.
  `sample_logps`   the log-prob under the distribution actually sampled from (tempered,
                   top-k renormalised; 0 for greedy choices).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pofx import logprobs

Array = jax.Array


class Samples(NamedTuple):
  """Completions sampled for a batch of left-padded prompts (a pytree of arrays).

  Attributes:
    prompt_tokens: `[B, P]` int32, the left-padded prompts.
    prompt_mask: `[B, P]` float32, 1 on real prompt tokens.
    tokens: `[B, T]` int32 completion tokens (EOS included), `pad_id` after the end.
    mask: `[B, T]` float32, 1 on completion tokens (through EOS).
    logps: `[B, T]` float32 model log-probs log pi(y_t | x, y_<t) (temperature 1), 0 off the mask.
    sample_logps: `[B, T]` float32 log-probs under the sampling distribution, 0 off the mask.
    lengths: `[B]` int32 completion lengths (number of mask ones, EOS included).
    finished: `[B]` bool, True where the completion ended with EOS.
  """

  prompt_tokens: Array
  prompt_mask: Array
  tokens: Array
  mask: Array
  logps: Array
  sample_logps: Array
  lengths: Array
  finished: Array


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, length: Optional[int] = None, bucket: int = 8):
  """Left-pads 1-D token sequences to `[B, P]` (numpy, host-side).

  Args:
    prompts: non-empty integer token sequences.
    pad_id: padding token id.
    length: the width P; None: the longest prompt rounded up to a multiple of `bucket`.
    bucket: rounding of the automatic width (fewer compiled shapes).

  Returns:
    `(tokens [B, P] int32, mask [B, P] float32)`. Raises ValueError for an empty prompt or one
    longer than `length`.
  """
  arrs = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not arrs:
    raise ValueError("left_pad: no prompts given.")
  for i, a in enumerate(arrs):
    if a.size == 0:
      raise ValueError(f"left_pad: prompt {i} is empty; every prompt needs at least one token.")
  longest = max(a.size for a in arrs)
  if length is None:
    length = -(-longest // max(int(bucket), 1)) * max(int(bucket), 1)
  if longest > length:
    raise ValueError(f"left_pad: a prompt has {longest} tokens, more than length={length}.")
  tokens = np.full((len(arrs), length), pad_id, np.int32)
  mask = np.zeros((len(arrs), length), np.float32)
  for i, a in enumerate(arrs):
    tokens[i, length - a.size :] = a
    mask[i, length - a.size :] = 1.0
  return tokens, mask


def head_dot_general(model):
  """The product of the LM head: the model's injected `kernels.dot_general` where it has kernels
  (`pofx.models.LlamaModel`), else `jax.lax.dot_general`."""
  kernels = getattr(model, "kernels", None)
  return jax.lax.dot_general if kernels is None else kernels.dot_general


def head_logit_softcap(model):
  """The soft-cap of the model's LM-head logits (`pofx.models.LlamaModel.logit_softcap`; Gemma 2),
  or None (a model without one)."""
  return getattr(model, "logit_softcap", None)


def _prompt_positions(prompt_mask):
  m = jnp.asarray(prompt_mask) > 0
  return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0).astype(jnp.int32), m


def _choose(logits, key, temperature, top_k):
  """One token per row from float32 logits `[B, V]`; returns (token, model logp, sample logp)."""
  logp_model = jax.nn.log_softmax(logits, axis=-1)
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  t = jnp.maximum(temperature, 1e-6)
  scaled = logits / t
  if top_k:
    vals, idx = jax.lax.top_k(scaled, top_k)  # [B, k]
    choice = jax.random.categorical(key, vals, axis=-1)
    sampled_tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    sampled_lp = jnp.take_along_axis(jax.nn.log_softmax(vals, axis=-1), choice[:, None], axis=-1)[:, 0]
  else:
    sampled_tok = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    sampled_lp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), sampled_tok[:, None], axis=-1)[:, 0]
  is_greedy = temperature <= 0
  tok = jnp.where(is_greedy, greedy_tok, sampled_tok)
  sample_lp = jnp.where(is_greedy, 0.0, sampled_lp)
  model_lp = jnp.take_along_axis(logp_model, tok[:, None], axis=-1)[:, 0]
  return tok, model_lp, sample_lp


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id", "top_k"))
def _sample(params, prompt_tokens, prompt_mask, key, temperature, *, model, max_new_tokens, eos_id, pad_id, top_k):
  B, P = prompt_tokens.shape
  T = max_new_tokens
  positions, valid = _prompt_positions(prompt_mask)
  n_prompt = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]
  cache = model.init_cache(B, P + T)
  logits, cache = model.decode(params, prompt_tokens, positions, valid, cache)
  last = logits[:, -1]  # predicts completion token 0

  zeros_i = jnp.full((B, T), pad_id, jnp.int32)
  zeros_f = jnp.zeros((B, T), jnp.float32)
  state = (jnp.zeros((), jnp.int32), last, cache, jnp.zeros((B,), jnp.bool_), zeros_i, zeros_f, zeros_f, zeros_f)

  def cond(s):
    t, _, _, done = s[:4]
    return (t < T) & ~jnp.all(done)

  def body(s):
    t, last, cache, done, toks, mask, lps, slps = s
    tok, lp, slp = _choose(last, jax.random.fold_in(key, t), temperature, top_k)
    live = ~done
    tok = jnp.where(live, tok, pad_id)
    toks = toks.at[:, t].set(tok)
    mask = mask.at[:, t].set(live.astype(jnp.float32))
    lps = lps.at[:, t].set(jnp.where(live, lp, 0.0))
    slps = slps.at[:, t].set(jnp.where(live, slp, 0.0))
    done = done | (live & (tok == eos_id))
    logits, cache = model.decode(params, tok[:, None], (n_prompt + t)[:, None], jnp.ones((B, 1), jnp.bool_), cache)
    return (t + 1, logits[:, 0], cache, done, toks, mask, lps, slps)

  _, _, _, done, toks, mask, lps, slps = jax.lax.while_loop(cond, body, state)
  return Samples(
    prompt_tokens=prompt_tokens.astype(jnp.int32),
    prompt_mask=jnp.asarray(prompt_mask, jnp.float32),
    tokens=toks,
    mask=mask,
    logps=lps,
    sample_logps=slps,
    lengths=jnp.sum(mask, axis=1).astype(jnp.int32),
    finished=done,
  )


def sample(
  params,
  prompt_tokens,
  prompt_mask,
  key,
  *,
  model,
  max_new_tokens: int,
  eos_id: int,
  temperature=1.0,
  top_k: int = 0,
  pad_id: int = 0,
) -> Samples:
  """Samples one completion per left-padded prompt (jitted; see the module docstring).

  Args:
    params: the model's parameters (`model.init`).
    prompt_tokens: `[B, P]` int left-padded prompts (`left_pad`); every row needs >= 1 real token.
    prompt_mask: `[B, P]` 0/1, 1 on real prompt tokens.
    key: a PRNG key; the same key gives the same samples.
    model: the model's pure functions (see the module docstring; static, so hashable).
    max_new_tokens: the most completion tokens per row (static; T of the outputs).
    eos_id: the end-of-sequence token id (static).
    temperature: float >= 0 (traced: changing it does not recompile); 0 = greedy.
    top_k: int >= 0 (static); 0 = the full vocabulary.
    pad_id: token id written after the end of each completion.

  Returns:
    `Samples`.
  """
  if int(max_new_tokens) < 1:
    raise ValueError(f"sample: max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
  if top_k is None:
    top_k = 0
  vocab_size = jax.eval_shape(model.head, params).shape[-1]
  if int(top_k) < 0 or int(top_k) > vocab_size:
    raise ValueError(f"sample: top_k must be an integer in [0, vocab_size={vocab_size}], got {top_k!r}.")
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"sample: temperature must be >= 0, got {temperature!r}.")
  if isinstance(prompt_mask, np.ndarray) and prompt_mask.size and not np.all(prompt_mask[:, -1] > 0):
    raise ValueError(
      "sample: prompts must be left-padded and non-empty (prompt_mask[:, -1] must be 1); use sampling.left_pad."
    )
  return _sample(
    params,
    jnp.asarray(prompt_tokens, jnp.int32),
    jnp.asarray(prompt_mask, jnp.float32),
    key,
    jnp.asarray(temperature, jnp.float32),
    model=model,
    max_new_tokens=int(max_new_tokens),
    eos_id=int(eos_id),
    pad_id=int(pad_id),
    top_k=int(top_k),
  )


@functools.partial(jax.jit, static_argnames=("model",))
def _score(params, prompt_tokens, prompt_mask, tokens, mask, *, model):
  P = prompt_tokens.shape[1]
  seq = jnp.concatenate([prompt_tokens, tokens], axis=1).astype(jnp.int32)
  p_valid = jnp.asarray(prompt_mask) > 0
  c_valid = jnp.asarray(mask) > 0
  valid = jnp.concatenate([p_valid, c_valid], axis=1)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  hidden = model.apply(params, seq, positions, valid.astype(jnp.int32))
  # Column P - 1 + t predicts completion token t; chunked log-softmax fused with the LM head.
  lp = logprobs.token_logps(
    hidden[:, P - 1 : -1],
    model.head(params),
    tokens.astype(jnp.int32),
    dot_general=head_dot_general(model),
    logit_softcap=head_logit_softcap(model),
  ).logps
  return jnp.where(c_valid, lp, 0.0)


def score(params, samples: Samples, *, model) -> Array:
  """Teacher-forced per-token log-probs `[B, T]` (0 off the mask) of `samples`' completions
  under the model `params` (e.g. the base policy, for KL estimates). Jitted; one full forward
  over `[prompt | completion]` with the same positions as `sample`."""
  return _score(params, samples.prompt_tokens, samples.prompt_mask, samples.tokens, samples.mask, model=model)


def completions(samples: Samples) -> list:
  """The completions as a list of 1-D int32 numpy arrays (EOS included, padding removed)."""
  toks = np.asarray(samples.tokens)
  lens = np.asarray(samples.lengths)
  return [toks[i, : lens[i]].copy() for i in range(toks.shape[0])]


def prompts_of(samples: Samples) -> list:
  """The prompts as a list of 1-D int32 numpy arrays (left padding removed)."""
  toks = np.asarray(samples.prompt_tokens)
  m = np.asarray(samples.prompt_mask) > 0
  return [toks[i, m[i]].copy() for i in range(toks.shape[0])]
