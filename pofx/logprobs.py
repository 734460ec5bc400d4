r"""Completion-token log-probs from hidden states, fused with the LM head and chunked over tokens.

For hidden states `h_t [D]`, LM-head weight `W [D, V]` and target token `y_t`:

    z_t = h_t W                                   (logits, float32 accumulation)
    log p(y_t) = z_t[y_t] - logsumexp(z_t)
    entropy_t  = -sum_v p_v log p_v                       (from log p = z - logsumexp(z))
    log_sum_sq_probs_t = logsumexp_v(2 log p_v) = log sum_v p_v^2   (WPO's weights)

Memory. The tokens are flattened and processed in chunks of `chunk_size` tokens by a
`jax.lax.scan` whose body is wrapped in `jax.checkpoint`: each step materialises only one
`[chunk_size, V]` float32 logits block, and the backward pass recomputes it chunk by chunk, so
no `[B, T, V]` logits or log-softmax is ever stored (forward or backward). Gradients flow to the
hidden states and to the head weight.

Which tokens. These functions score whatever `(hidden, target)` pairs they are given. The
layouts of `pofx.batching` gather, for each completion token, the hidden state of the position
that predicts it (the position before it, or the last prompt position for the first token of a
prompt-shared rejected completion), so the vocabulary projection runs on completion tokens only.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pofx._pair_logps import PairLogps

Array = jax.Array


class TokenLogps(NamedTuple):
  """Per-token outputs of `token_logps`, each float32 with the shape of `targets`.

  `entropy` and `log_sum_sq_probs` are None unless requested.
  """
  logps: Array
  entropy: Optional[Array] = None
  log_sum_sq_probs: Optional[Array] = None


def token_logps(hidden: Array, head_weight: Array, targets: Array, *, chunk_size: int = 1024,
                with_entropy: bool = False, with_log_sum_sq_probs: bool = False,
                compute_dtype=None) -> TokenLogps:
  """Log-probs of `targets` under `softmax(hidden @ head_weight)`, chunked over tokens.

  Args:
    hidden: `[..., D]` hidden states (any float dtype), e.g. `[B, T, D]`.
    head_weight: `[D, V]` LM-head weight (`pofx.models.lm_head(params, config)`).
    targets: `[...]` int token ids, the shape of `hidden` without its last axis. Ids outside
      `[0, V)` (e.g. padding -1) are clipped; mask such positions downstream.
    chunk_size: tokens per chunk (the scan step's logits block is `[chunk_size, V]` float32).
    with_entropy: also return the per-token entropy of the next-token distribution.
    with_log_sum_sq_probs: also return `log sum_v p_v^2` per token.
    compute_dtype: dtype of the head matmul's operands (default: `hidden.dtype`); the matmul
      accumulates in float32 and everything after it is float32.

  Returns:
    `TokenLogps` of float32 arrays shaped like `targets`.
  """
  if chunk_size < 1:
    raise ValueError(f"token_logps: chunk_size must be a positive integer, got {chunk_size}.")
  hidden = jnp.asarray(hidden)
  targets = jnp.asarray(targets)
  if hidden.shape[:-1] != targets.shape:
    raise ValueError(f"token_logps: hidden {hidden.shape} must be targets {targets.shape} + [D].")
  D, V = head_weight.shape
  if hidden.shape[-1] != D:
    raise ValueError(f"token_logps: hidden width {hidden.shape[-1]} != head_weight rows {D}.")
  dtype = compute_dtype or hidden.dtype
  lead_shape = targets.shape
  n = targets.size
  c = max(1, min(int(chunk_size), n))
  n_chunks = -(-n // c)
  pad = n_chunks * c - n
  h = hidden.reshape(n, D).astype(dtype)
  t = jnp.clip(targets.reshape(n).astype(jnp.int32), 0, V - 1)
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    t = jnp.pad(t, (0, pad))
  h = h.reshape(n_chunks, c, D)
  t = t.reshape(n_chunks, c)
  w = head_weight.astype(dtype)

  def body(carry, xs):
    hc, tc = xs
    logits = jnp.dot(hc, w, preferred_element_type=jnp.float32)          # [c, V] float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    out = [target_logit - lse]
    if with_entropy or with_log_sum_sq_probs:
      # From the normalised log-probs (no cancellation between two large logsumexps).
      logp = logits - lse[:, None]
      if with_entropy:
        out.append(-jnp.sum(jnp.exp(logp) * logp, axis=-1))
      if with_log_sum_sq_probs:
        out.append(jax.nn.logsumexp(2.0 * logp, axis=-1))
    return carry, tuple(out)

  _, outs = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, (h, t))
  outs = [o.reshape(n_chunks * c)[:n].reshape(lead_shape) for o in outs]
  logps = outs.pop(0)
  entropy = outs.pop(0) if with_entropy else None
  lss = outs.pop(0) if with_log_sum_sq_probs else None
  return TokenLogps(logps, entropy, lss)


def pair_logps(hidden: Array, head_weight: Array, batch, *, chunk_size: int = 1024,
               with_log_sum_sq_probs: bool = False, with_entropy: bool = False,
               compute_dtype=None):
  """`PairLogps` of a preference batch from one forward pass over any `pofx.batching` layout.

  Gathers, for every chosen and rejected completion token, the hidden state of the position that
  predicts it (`batching.gather_completions`), scores chosen and rejected tokens together in one
  chunked pass (`token_logps`), and builds `PairLogps.from_tokens` (sums in float32 over the
  completion masks; masked positions exactly 0).

  Args:
    hidden: `[R, L, D]` model outputs for `batch.tokens` (`apply_fn(params, batch.tokens,
      batch.positions, batch.segment_ids, batch.branch_ids)`).
    head_weight: `[D, V]`.
    batch: a `pofx.batching.PairBatch` (any layout).
    chunk_size, compute_dtype: as in `token_logps`.
    with_log_sum_sq_probs: fill `chosen/rejected_log_sum_sq_probs` (WPO).
    with_entropy: also return the per-token entropies.

  Returns:
    `PairLogps`, or `(PairLogps, {"chosen": [B, T], "rejected": [B, T]})` entropies (zero outside
    the masks) when `with_entropy`.
  """
  from pofx import batching  # local import: batching is host-side numpy + this one gather
  h_c, h_r = batching.gather_completions(hidden, batch)
  B, Tc = batch.chosen_targets.shape
  Tr = batch.rejected_targets.shape[1]
  D = hidden.shape[-1]
  h = jnp.concatenate([h_c.reshape(B * Tc, D), h_r.reshape(B * Tr, D)], axis=0)
  t = jnp.concatenate([jnp.reshape(batch.chosen_targets, (-1,)), jnp.reshape(batch.rejected_targets, (-1,))])
  out = token_logps(h, head_weight, t, chunk_size=chunk_size, with_entropy=with_entropy,
                    with_log_sum_sq_probs=with_log_sum_sq_probs, compute_dtype=compute_dtype)
  split = lambda x: (x[:B * Tc].reshape(B, Tc), x[B * Tc:].reshape(B, Tr))
  c_lp, r_lp = split(out.logps)
  kw = {}
  if with_log_sum_sq_probs:
    c_l, r_l = split(out.log_sum_sq_probs)
    kw = dict(chosen_log_sum_sq_probs=c_l, rejected_log_sum_sq_probs=r_l)
  pair = PairLogps.from_tokens(c_lp, batch.chosen_mask, r_lp, batch.rejected_mask, **kw)
  if not with_entropy:
    return pair
  c_e, r_e = split(out.entropy)
  ents = {"chosen": jnp.where(pair.chosen_mask > 0, c_e, 0.0),
          "rejected": jnp.where(pair.rejected_mask > 0, r_e, 0.0)}
  return pair, ents


def pair_logps_from_fused(token_logps_2b: Array, mask_2b: Array, *,
                          log_sum_sq_probs_2b: Optional[Array] = None) -> PairLogps:
  """Splits per-token arrays of a fused `[2B, T]` batch (chosen rows first, then rejected rows)
  into a `PairLogps` (`PairLogps.from_tokens` on the two halves)."""
  n = token_logps_2b.shape[0]
  if n % 2 or mask_2b.shape != token_logps_2b.shape:
    raise ValueError(f"pair_logps_from_fused: need [2B, T] log-probs and mask of one shape, got "
                     f"{token_logps_2b.shape} and {mask_2b.shape}.")
  b = n // 2
  kw = {}
  if log_sum_sq_probs_2b is not None:
    kw = dict(chosen_log_sum_sq_probs=log_sum_sq_probs_2b[:b], rejected_log_sum_sq_probs=log_sum_sq_probs_2b[b:])
  return PairLogps.from_tokens(token_logps_2b[:b], mask_2b[:b], token_logps_2b[b:], mask_2b[b:], **kw)


def next_token_logps(hidden: Array, head_weight: Array, tokens: Array, **kwargs) -> TokenLogps:
  """Per-position log-probs of the *next* token: entry t is `log p(tokens[:, t+1] | ..., t)`.

  `hidden [B, L, D]`, `tokens [B, L]`; the last position has no next token, so the outputs are
  `[B, L-1]` (the shift convention of causal LMs). Keyword arguments go to `token_logps`.
  """
  return token_logps(hidden[:, :-1], head_weight, tokens[:, 1:], **kwargs)
