r"""Completion-token log-probs from hidden states, fused with the LM head and chunked over tokens.

For hidden states `h_t [D]`, LM-head weight `W [D, V]` and target token `y_t`:

    z_t = h_t W                                   (logits, float32 accumulation)
    log p(y_t) = z_t[y_t] - logsumexp(z_t)
    entropy_t  = -sum_v p_v log p_v                       (from log p = z - logsumexp(z))
    log_sum_sq_probs_t = logsumexp_v(2 log p_v) = log sum_v p_v^2   (WPO's weights)
    log p(EOS)_t = z_t[eos] - logsumexp(z_t)                (the EOS column of the same softmax)
    log p_tau(EOS)_t = z_t[eos] / tau - logsumexp(z_t / tau)  (at a temperature tau: its own logsumexp)

Memory and compute. The tokens are flattened and processed in chunks of `chunk_size` tokens by
a `jax.lax.scan`, each step materialising one `[chunk_size, V]` float32 logits block. Two
backward strategies, chosen by `save_probs`:

  save_probs=True (log-probs only; opt-in). A `jax.custom_vjp`: the forward stores, for every
    chunk, the softmax probabilities `p_t = exp(z_t - logsumexp(z_t))` (float32, `[chunk_size,
    V]`); given the cotangent `g_t` of each token's log-prob the backward forms
        G_t = g_t (onehot(y_t) - p_t)                 ([chunk_size, V] float32, one chunk at a time)
        dh_t = G_t W^T                                 (compute dtype, float32 accumulation)
        dW   = sum_chunks h^T G                        (float32, cast to the head's dtype)
    so the head runs 3 matmuls (1 forward + 2 backward) and the logits are never recomputed. The
    trade is memory: the stored probabilities are `[N, V]` float32 in total (N = tokens, rounded
    up to a whole number of chunks), exactly the `[B, T, V]` block the checkpointed path avoids.
  save_probs=False (default), or whenever `with_entropy` / `with_log_sum_sq_probs` is requested. The scan
    body is wrapped in `jax.checkpoint`: nothing of the `[chunk_size, V]` block is stored and the
    backward pass recomputes the logits chunk by chunk (4 head matmuls: the forward's, its
    recomputation and the 2 of the backward), so no `[B, T, V]` logits or log-softmax is ever
    stored (forward or backward). Entropy and `log sum p^2` always take this path (their
    gradients by autodiff).
Gradients flow to the hidden states and to the head weight on both paths; the save_probs path is
reverse-mode only (a `custom_vjp`: no `jax.jvp` / `jacfwd`). With a single chunk (`chunk_size >=
N`) XLA already merges the checkpointed path's recomputation with the forward matmul (the scan of
one step is unrolled and `prevent_cse=False`), so both paths then run 3 head matmuls and store a
`[N, V]` float32 block: save_probs only saves time with two chunks or more.

The head's products. Every product with the head weight goes through the injected
`dot_general` (`jax.lax.dot_general`'s signature; `pofx.kernels.Kernels.dot_general`, default
XLA's): the logits `h W` (contracting h's last axis with W's first), and on the save_probs path
the backward's `G W^T` (contracting both vocabulary axes) and `h^T G` (contracting both token
axes), all accumulated in float32 (`preferred_element_type`).

Which tokens. These functions score whatever `(hidden, target)` pairs they are given. The
layouts of `pofx.batching` gather, for each completion token, the hidden state of the position
that predicts it (the position before it, or the last prompt position for the first token of a
prompt-shared rejected completion), so the vocabulary projection runs on completion tokens only.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pofx import batching
from pofx._pair_logps import PairLogps

Array = jax.Array
DotGeneral = Callable[..., Array]

# dot_general dimension numbers of the head's products (2-D operands, no batch axes).
_LOGITS = (((1,), (0,)), ((), ()))  # h [c, D] . W [D, V] -> [c, V]  (h W)
_CONTRACT_VOCAB = (((1,), (1,)), ((), ()))  # G [c, V] . W [D, V] -> [c, D]  (G W^T)
_CONTRACT_TOKENS = (((0,), (0,)), ((), ()))  # h [c, D] . G [c, V] -> [D, V]  (h^T G)


class TokenLogps(NamedTuple):
  """Per-token outputs of `token_logps`, each float32 with the shape of `targets`.

  `entropy`, `log_sum_sq_probs`, `eos_logps` and `tempered_eos_logps` are None unless requested.
  """

  logps: Array
  entropy: Optional[Array] = None
  log_sum_sq_probs: Optional[Array] = None
  eos_logps: Optional[Array] = None
  tempered_eos_logps: Optional[Array] = None


def token_logps(
  hidden: Array,
  head_weight: Array,
  targets: Array,
  *,
  chunk_size: int = 1024,
  with_entropy: bool = False,
  with_log_sum_sq_probs: bool = False,
  compute_dtype=None,
  save_probs: bool = False,
  dot_general: DotGeneral = jax.lax.dot_general,
  logit_softcap: Optional[float] = None,
  eos_id: Optional[int] = None,
  eos_temperature: Optional[float] = None,
) -> TokenLogps:
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
    save_probs: True: store each chunk's float32 softmax probabilities for the backward pass
      (`[N, V]` float32 in all; no logits recomputation: 3 head matmuls per forward+backward).
      False: checkpointed scan (one `[chunk_size, V]` block at a time; the backward recomputes
      the logits: 4 head matmuls). Ignored (checkpointed) when `with_entropy` or
      `with_log_sum_sq_probs` is set. See the module docstring.
    dot_general: the head's products (`jax.lax.dot_general`'s signature; a backend's
      `pofx.kernels.Kernels.dot_general`); see the module docstring. Hashable (it is a static
      argument of the save_probs path's custom VJP).
    logit_softcap: the logits are `c * tanh(z / c)` (Gemma 2's final soft-capping,
      arXiv:2408.00118, section 2; `pofx.models.LlamaModel.logit_softcap`), or None. With a cap the
      checkpointed path is taken (`save_probs` is ignored) and autodiff differentiates the cap.
    eos_id: also return `log p(eos_id)` at every position (the EOS column of the same
      log-softmax; GDPO's terminating probabilities). Takes the checkpointed path.
    eos_temperature: with `eos_id`, also return `log softmax(z / eos_temperature)[eos_id]` (its
      own logsumexp over the tempered logits; GDPO's reference reward), `eos_temperature > 0`.

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
  t = jnp.clip(targets.reshape(n).astype(jnp.int32), 0, V - 1)
  if pad:
    t = jnp.pad(t, (0, pad))
  t = t.reshape(n_chunks, c)
  if logit_softcap is not None and not logit_softcap > 0:
    raise ValueError(f"token_logps: logit_softcap must be None or positive, got {logit_softcap!r}.")
  if eos_id is not None and not 0 <= int(eos_id) < V:
    raise ValueError(f"token_logps: eos_id must be in [0, {V}), got {eos_id!r}.")
  if eos_temperature is not None and (eos_id is None or not eos_temperature > 0):
    raise ValueError(f"token_logps: eos_temperature needs eos_id and must be > 0, got {eos_temperature!r}.")
  with_eos = eos_id is not None
  if save_probs and not (with_entropy or with_log_sum_sq_probs or with_eos or logit_softcap is not None):
    # Hidden and head keep their own dtypes here: the custom VJP casts them to `dtype` inside and
    # returns cotangents in their dtypes straight from the float32 accumulators.
    h = hidden.reshape(n, D)
    if pad:
      h = jnp.pad(h, ((0, pad), (0, 0)))
    logps = _logps_saved_probs(h.reshape(n_chunks, c, D), t, head_weight, jnp.dtype(dtype), dot_general)
    return TokenLogps(logps.reshape(n_chunks * c)[:n].reshape(lead_shape))
  h = hidden.reshape(n, D).astype(dtype)
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
  h = h.reshape(n_chunks, c, D)
  w = head_weight.astype(dtype)

  def body(carry, xs):
    hc, tc = xs
    logits = dot_general(hc, w, _LOGITS, preferred_element_type=jnp.float32)  # [c, V] float32
    if logit_softcap is not None:
      logits = logit_softcap * jnp.tanh(logits / logit_softcap)
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
    if with_eos:
      out.append(logits[:, eos_id] - lse)
      if eos_temperature is not None:
        out.append(logits[:, eos_id] / eos_temperature - jax.nn.logsumexp(logits / eos_temperature, axis=-1))
    return carry, tuple(out)

  _, outs = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, (h, t))
  outs = [o.reshape(n_chunks * c)[:n].reshape(lead_shape) for o in outs]
  logps = outs.pop(0)
  entropy = outs.pop(0) if with_entropy else None
  lss = outs.pop(0) if with_log_sum_sq_probs else None
  eos = outs.pop(0) if with_eos else None
  tempered = outs.pop(0) if eos_temperature is not None else None
  return TokenLogps(logps, entropy, lss, eos, tempered)


def _logits_cotangent(g: Array, targets: Array, probs: Array) -> Array:
  """`G = g[:, None] * (onehot(targets) - probs)`, float32 `[c, V]`, for one chunk.

  Written as one select against an iota (fused into a single elementwise loop by XLA): no
  float32 one-hot and no scatter."""
  is_target = jax.lax.broadcasted_iota(jnp.int32, probs.shape, 1) == targets[:, None]
  gp = g[:, None] * probs
  return jnp.where(is_target, g[:, None] - gp, -gp)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _logps_saved_probs(h: Array, t: Array, w: Array, dtype, dot_general: DotGeneral) -> Array:
  """`[n_chunks, c]` float32 `log p(t)` of `h [n_chunks, c, D]` under `softmax(h w)`; the
  backward uses the probabilities stored by the forward (no logits recomputation)."""
  return _saved_probs_fwd(h, t, w, dtype, dot_general)[0]


def _saved_probs_fwd(h, t, w, dtype, dot_general):
  wc = w.astype(dtype)

  def body(carry, xs):
    hc, tc = xs
    logits = dot_general(hc.astype(dtype), wc, _LOGITS, preferred_element_type=jnp.float32)  # [c, V] float32
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[:, 0]
    target_logit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    return carry, (target_logit - lse, e / s)

  _, (logps, probs) = jax.lax.scan(body, None, (h, t))
  # Residuals: the probabilities (the [n_chunks * c, V] float32 this path trades for the
  # recomputation) and the primal inputs themselves (no copies).
  return logps, (probs, h, t, w)


def _saved_probs_bwd(dtype, dot_general, res, g):
  probs, h, t, w = res
  wc = w.astype(dtype)

  def body(dw, xs):
    hc, tc, pc, gc = xs
    gz = _logits_cotangent(gc, tc, pc).astype(dtype)
    dh = dot_general(gz, wc, _CONTRACT_VOCAB, preferred_element_type=jnp.float32)
    dw = dw + dot_general(hc.astype(dtype), gz, _CONTRACT_TOKENS, preferred_element_type=jnp.float32)
    return dw, dh.astype(h.dtype)

  dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (h, t, probs, g))
  return dh, None, dw.astype(w.dtype)


_logps_saved_probs.defvjp(_saved_probs_fwd, _saved_probs_bwd)


def pair_logps(
  hidden: Array,
  head_weight: Array,
  batch,
  *,
  chunk_size: int = 1024,
  with_log_sum_sq_probs: bool = False,
  with_entropy: bool = False,
  compute_dtype=None,
  save_probs: bool = False,
  scored=None,
  dot_general: DotGeneral = jax.lax.dot_general,
  logit_softcap: Optional[float] = None,
  eos_id: Optional[int] = None,
  eos_temperature: Optional[float] = None,
):
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
    chunk_size, compute_dtype, save_probs, dot_general, logit_softcap: as in `token_logps` (`save_probs=True` stores the
      `[B (Tc + Tr), V]` float32 probabilities of all completion tokens for the backward pass).
    with_log_sum_sq_probs: fill `chosen/rejected_log_sum_sq_probs` (WPO).
    with_entropy: also return the per-token entropies.
    scored: optional `pofx.batching.ScoredTokens` of `batch`; then `hidden` is `[N, D]`, the
      outputs at `scored.index` only (`apply_fn(..., output_index=scored.index)`), and the head
      runs on those N real tokens; the per-token results are scattered back to the `[B, T]` slots
      (0 elsewhere), so the result is the same `PairLogps`.
    eos_id: also fill `chosen/rejected_eos_logps` `[B, T+1]`: `log p(eos_id)` at each
      completion's states `s_0..s_n` (`pofx.batching.state_index`: the T positions that predict
      the tokens and the position of the last token). The head then runs on those `T+1` states
      per completion (the token log-probs come from the same pass); needs `scored=None` (the
      position of the last token predicts no completion token, so it is not among the scored
      outputs).
    eos_temperature: with `eos_id`, also fill `chosen/rejected_tempered_eos_logps`
      (`log softmax(z / eos_temperature)[eos_id]` at the same states).

  Returns:
    `PairLogps`, or `(PairLogps, {"chosen": [B, T], "rejected": [B, T]})` entropies (zero outside
    the masks) when `with_entropy`.
  """
  B, Tc = batch.chosen_targets.shape
  Tr = batch.rejected_targets.shape[1]
  D = hidden.shape[-1]
  with_eos = eos_id is not None
  if with_eos and scored is not None:
    raise ValueError(
      "pair_logps: eos_id needs the outputs at every position (scored=None): the state after a "
      "completion's last token predicts no completion token, so scored tokens do not include it."
    )
  wc, wr = (Tc + 1, Tr + 1) if with_eos else (Tc, Tr)  # slots per completion: tokens (+ the end state)
  targets = [batch.chosen_targets, batch.rejected_targets]
  if with_eos:  # the end state's target is a placeholder: only its EOS columns are kept
    targets = [jnp.pad(jnp.asarray(x), ((0, 0), (0, 1))) for x in targets]
  t = jnp.concatenate([jnp.reshape(targets[0], (-1,)), jnp.reshape(targets[1], (-1,))])
  if with_eos:
    c_idx, r_idx = batching.state_index(batch)
    flat = hidden.reshape((-1, D))
    h = jnp.concatenate(
      [jnp.take(flat, jnp.reshape(c_idx, (-1,)), axis=0), jnp.take(flat, jnp.reshape(r_idx, (-1,)), axis=0)]
    )
  elif scored is None:
    h_c, h_r = batching.gather_completions(hidden, batch)
    h = jnp.concatenate([h_c.reshape(B * Tc, D), h_r.reshape(B * Tr, D)], axis=0)
  else:
    if hidden.ndim != 2 or hidden.shape[0] != np.shape(scored.index)[-1]:
      raise ValueError(
        f"pair_logps: with `scored`, hidden must be [N, D] with N = {np.shape(scored.index)[-1]} "
        f"(the outputs at scored.index); got {hidden.shape}."
      )
    h = hidden
    t = jnp.concatenate([t, jnp.zeros((1,), t.dtype)])[scored.slot]
  out = token_logps(
    h,
    head_weight,
    t,
    chunk_size=chunk_size,
    with_entropy=with_entropy,
    with_log_sum_sq_probs=with_log_sum_sq_probs,
    compute_dtype=compute_dtype,
    save_probs=save_probs,
    dot_general=dot_general,
    logit_softcap=logit_softcap,
    eos_id=eos_id,
    eos_temperature=eos_temperature,
  )
  if scored is not None:  # back to the [B * Tc + B * Tr] slots (padding entries land in one extra slot)
    n_slots = B * Tc + B * Tr
    out = TokenLogps(
      *[None if x is None else jnp.zeros((n_slots + 1,), x.dtype).at[scored.slot].set(x)[:n_slots] for x in out]
    )
  split_states = lambda x: (x[: B * wc].reshape(B, wc), x[B * wc :].reshape(B, wr))
  split = lambda x: tuple(a[:, :T] for a, T in zip(split_states(x), (Tc, Tr)))
  c_lp, r_lp = split(out.logps)
  kw = {}
  if with_log_sum_sq_probs:
    c_l, r_l = split(out.log_sum_sq_probs)
    kw = dict(chosen_log_sum_sq_probs=c_l, rejected_log_sum_sq_probs=r_l)
  if with_eos:
    kw["chosen_eos_logps"], kw["rejected_eos_logps"] = split_states(out.eos_logps)
    if eos_temperature is not None:
      kw["chosen_tempered_eos_logps"], kw["rejected_tempered_eos_logps"] = split_states(out.tempered_eos_logps)
  pair = PairLogps.from_tokens(c_lp, batch.chosen_mask, r_lp, batch.rejected_mask, **kw)
  if not with_entropy:
    return pair
  c_e, r_e = split(out.entropy)
  ents = {"chosen": jnp.where(pair.chosen_mask > 0, c_e, 0.0), "rejected": jnp.where(pair.rejected_mask > 0, r_e, 0.0)}
  return pair, ents


def pair_logps_from_fused(
  token_logps_2b: Array, mask_2b: Array, *, log_sum_sq_probs_2b: Optional[Array] = None
) -> PairLogps:
  """Splits per-token arrays of a fused `[2B, T]` batch (chosen rows first, then rejected rows)
  into a `PairLogps` (`PairLogps.from_tokens` on the two halves)."""
  n = token_logps_2b.shape[0]
  if n % 2 or mask_2b.shape != token_logps_2b.shape:
    raise ValueError(
      f"pair_logps_from_fused: need [2B, T] log-probs and mask of one shape, got "
      f"{token_logps_2b.shape} and {mask_2b.shape}."
    )
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
