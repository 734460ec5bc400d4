r"""Jitted batched autoregressive sampling with a key/value cache: temperature, top-k, top-p, stop
tokens, per-row lengths, sharded over the data axis of a mesh.

    prompt_tokens, prompt_mask = sampling.left_pad(prompts, pad_id=0)
    out = sampling.sample(params, prompt_tokens, prompt_mask, key, model=model,
                          max_new_tokens=16, eos_id=3, temperature=1.0, top_k=0, top_p=1.0)
    out.tokens, out.mask, out.logps          # [B, T] completion tokens, 0/1 mask, log pi(y_t | ...)
    sampling.score(params_base, out, model=model)   # teacher-forced [B, T] log-probs of another model

The model is used only through its pure functions, the same ones training uses: `model` is a
`pofx.models.LlamaModel` (`pofx.models.make(config, kernels)`) or any hashable record with
`apply(params, tokens, positions, segment_ids) -> hidden`, `head(params) -> [D, V]`,
`init_cache(batch_size, max_length) -> cache` and `decode(params, tokens, positions, valid, cache)
-> (logits, cache)` (optionally accepting `last_only=True`, and optionally with `kernels`, whose
`dot_general` then computes the LM head of `score`). A LoRA policy samples with its adapters and
`frozen=` base through a `combine` (`lambda f, a: pofx.lora.merge(f, a, spec)`, the folded
adapters; the train step's `pofx.lora.apply` is the same model up to float rounding, in the
branch form when the spec has dropout, whose masks sampling never draws).

Layout. Prompts of varying length are **left-padded** to a common width P, so that every row's
last prompt token sits in column P - 1 and the t-th new token of every row in column P + t (one
cache slot per step for the whole batch). RoPE positions count real tokens only (a prompt of n
tokens has positions 0..n-1 whatever its padding, and completion token t has position n + t), so
the logits equal those of the unpadded sequence; padding is never attended to.

Decoding. The whole generation is one jitted program: one prefill over the prompts
(`model.decode`, LM head on each row's last token only), then one cached step per new token
inside `lax.while_loop`s (no host round trip per token) that stop as soon as every row is done:
with a model that can `resize_cache`, one loop per segment of the new tokens (`cache_segments`),
each over a cache only as long as its last step needs, so early steps attend over fewer slots.
A row is done when it has produced a stop token (`eos_id` or one of `stop_ids`; the completion
includes it, `finished` True) or `max_lengths[b]` tokens (default `max_new_tokens`; `finished`
False). After its end a row holds `pad_id` with mask 0. With a `mesh`, the rows are split over the
mesh's data axes (`shard_map`): each device decodes its rows with the same program and the same
random numbers, so the result equals the single-device one.

Token choice at each step, from the model's next-token logits z (float32, `[V]` per row) and one
uniform number u in [0, 1) per row and step (drawn from `key` before the loop, `[B, T]`):
  temperature == 0      greedy: the first index of max z (top-k and top-p are irrelevant);
  temperature > 0       the candidates are all tokens, or the top_k largest logits when
                        top_k > 0 (ties broken towards lower ids); on them q ∝ exp(z / temperature);
                        with top_p < 1 the candidates are cut to the nucleus (Holtzman et al. 2019,
                        "The Curious Case of Neural Text Degeneration", arXiv:1904.09751, section
                        3.1, Eq. 2-3): the smallest set of the most probable candidates whose mass
                        under q reaches top_p, i.e. candidate i stays iff the q-mass of the
                        candidates strictly more probable than i is < top_p (tokens tied with the
                        last one kept stay too), then q is renormalised on them;
                        the token is drawn by inverting q's cumulative distribution at u (a
                        categorical draw, exact up to float32 summation; two levels of blocks so
                        that no step scans more than ~2 sqrt(V) cumulative sums).
Temperature, then top-k, then top-p: the order of Hugging Face's logits warpers.

Log-probs returned per completion token (0 where the mask is 0):
  `logps`          log softmax(z)[y_t]: the **model's** log-prob (temperature 1, full vocabulary),
                   the quantity DPO and KL(pi || pi_base) estimates need. It is the sampling
                   distribution's log-prob exactly when temperature == 1, top_k == 0, top_p == 1.
  `sample_logps`   the log-prob under the distribution actually sampled from (tempered,
                   top-k / top-p renormalised; 0 for greedy choices).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

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


def _first_argmax(z):
  """The first index of each row's maximum of `z [B, N]` (two plain reductions, which XLA:CPU
  runs much faster than `argmax`'s reduction over (value, index) pairs)."""
  n = z.shape[-1]
  iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
  return jnp.min(jnp.where(z == jnp.max(z, axis=-1, keepdims=True), iota, n), axis=-1)


def _last_positive(w):
  """The last index of each row of `w [B, N]` holding a positive weight (-1 if none)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, w.shape, w.ndim - 1)
  return jnp.max(jnp.where(w > 0, iota, -1), axis=-1)


def _invert_cdf(w, u):
  """Index drawn from the categorical distribution of non-negative weights `w [B, N]` (each row
  with a positive sum) at the uniform `u [B]` in [0, 1): the index j with
  `c_{j-1} <= u c_N < c_j`, c the cumulative sums. Two levels: block sums, then one block (so no
  cumulative sum longer than ~sqrt(N)); a rounding at a block or row end is sent to the last
  positive weight before it, so a zero weight is never drawn."""
  B, N = w.shape
  blk = max(8, 1 << int(math.ceil(math.log2(math.sqrt(N)))))
  nb = -(-N // blk)
  w = jnp.pad(w, ((0, 0), (0, nb * blk - N))).reshape(B, nb, blk)
  sums = jnp.sum(w, axis=-1)  # [B, nb]
  ends = jnp.cumsum(sums, axis=-1)
  target = u * ends[:, -1]
  jb = jnp.minimum(jnp.sum(ends <= target[:, None], axis=-1), _last_positive(sums))
  rest = target - (jnp.take_along_axis(ends - sums, jb[:, None], axis=-1)[:, 0])
  wb = jnp.take_along_axis(w, jb[:, None, None], axis=1)[:, 0]  # [B, blk]
  ji = jnp.minimum(jnp.sum(jnp.cumsum(wb, axis=-1) <= rest[:, None], axis=-1), _last_positive(wb))
  return (jb * blk + ji).astype(jnp.int32)


def _float_key(x):
  """int32 keys ordered like the float32 values `x` (IEEE bits, negatives flipped)."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)


def _nucleus_threshold(scaled, w, top_p):
  """The smallest int key x (`_float_key` order) such that the weight of the candidates with key
  > x is < top_p times the total: the nucleus is then every candidate with key >= x. Found by
  bisection over the 2^32 keys (32 masked sums over the vocabulary; no sort)."""
  keys = _float_key(scaled)
  limit = top_p * jnp.sum(w, axis=-1)
  B = scaled.shape[0]
  lo = jnp.full((B,), jnp.iinfo(jnp.int32).min, jnp.int32)  # the answer is in (lo - 1, hi]
  hi = jnp.max(keys, axis=-1)  # the top candidate: nothing is above it, so it satisfies the test

  def body(_, bounds):
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
    above = jnp.sum(jnp.where(keys > mid[:, None], w, 0.0), axis=-1)
    ok = above < limit
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  lo, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return hi, keys


def _choose(z, u, temperature, top_p, *, top_k, use_top_p):
  """One token per row from float32 logits `z [B, V]` and uniforms `u [B]`; returns (token, model
  log-prob, sampling log-prob). See the module docstring."""
  m = jnp.max(z, axis=-1)
  model_lse = m + jnp.log(jnp.sum(jnp.exp(z - m[:, None]), axis=-1))
  greedy_tok = _first_argmax(z)
  t = jnp.maximum(temperature, 1e-6)
  if top_k:
    vals, idx = jax.lax.top_k(z, top_k)  # descending; ties towards lower ids
    scaled = (vals - vals[:, :1]) / t
    w = jnp.exp(scaled)
    if use_top_p:
      before = jnp.cumsum(w, axis=-1) - w
      keep = before < top_p * jnp.sum(w, axis=-1, keepdims=True)
      keep |= scaled == jnp.min(jnp.where(keep, scaled, jnp.inf), axis=-1, keepdims=True)  # ties stay
      w = jnp.where(keep, w, 0.0)
    j = _invert_cdf(w, u)
    tok = jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0].astype(jnp.int32)
    sampled = jnp.take_along_axis(scaled, j[:, None], axis=-1)[:, 0]
  else:
    scaled = (z - m[:, None]) / t
    w = jnp.exp(scaled)
    if use_top_p:
      threshold, keys = _nucleus_threshold(scaled, w, top_p)
      w = jnp.where(keys >= threshold[:, None], w, 0.0)
    tok = _invert_cdf(w, u)
    sampled = jnp.take_along_axis(scaled, tok[:, None], axis=-1)[:, 0]
  sample_lp = sampled - jnp.log(jnp.sum(w, axis=-1))
  is_greedy = temperature <= 0
  tok = jnp.where(is_greedy, greedy_tok, tok)
  sample_lp = jnp.where(is_greedy, 0.0, sample_lp)
  model_lp = jnp.take_along_axis(z, tok[:, None], axis=-1)[:, 0] - model_lse
  return tok, model_lp, sample_lp


def _decode_last(model, params, tokens, positions, valid, cache):
  """`model.decode` keeping the last token's logits `[B, V]` (LM head on that token only when the
  model's decode takes `last_only`)."""
  if "last_only" in inspect.signature(model.decode).parameters:
    logits, cache = model.decode(params, tokens, positions, valid, cache, last_only=True)
  else:
    logits, cache = model.decode(params, tokens, positions, valid, cache)
  return logits[:, -1].astype(jnp.float32), cache


def segment_ends(max_new_tokens: int, segments: int) -> Tuple[int, ...]:
  """The steps at which the decoding loops end: `segments` loops of about equal length."""
  n = max(1, min(int(segments), int(max_new_tokens)))
  size = -(-int(max_new_tokens) // n)
  return tuple(min(int(max_new_tokens), size * (j + 1)) for j in range(-(-int(max_new_tokens) // size)))


def _generate(
  params,
  prompt_tokens,
  prompt_mask,
  uniforms,
  temperature,
  top_p,
  stop_ids,
  max_lengths,
  *,
  model,
  pad_id,
  top_k,
  use_top_p,
  segments,
):
  """The whole generation of `sample` for the rows given (one device's share under a mesh)."""
  B, P = prompt_tokens.shape
  T = uniforms.shape[1]
  ends = segment_ends(T, segments if hasattr(model, "resize_cache") else 1)
  positions, valid = _prompt_positions(prompt_mask)
  n_prompt = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]
  cache = model.init_cache(B, P + ends[0])
  last, cache = _decode_last(model, params, prompt_tokens, positions, valid, cache)  # predicts token 0

  pads = jnp.full((B, T), pad_id, jnp.int32)
  zeros = jnp.zeros((B, T), jnp.float32)
  done = max_lengths <= 0
  state = (jnp.zeros((), jnp.int32), last, cache, done, jnp.zeros((B,), jnp.bool_), pads, zeros, zeros, zeros)

  def body(s):
    t, last, cache, done, stopped, toks, mask, lps, slps = s
    u = jax.lax.dynamic_index_in_dim(uniforms, t, axis=1, keepdims=False)
    tok, lp, slp = _choose(last, u, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
    live = ~done
    tok = jnp.where(live, tok, pad_id)
    col = lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x, t, axis=1)
    toks = col(toks, tok)
    mask = col(mask, live.astype(jnp.float32))
    lps = col(lps, jnp.where(live, lp, 0.0))
    slps = col(slps, jnp.where(live, slp, 0.0))
    hit = live & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    stopped = stopped | hit
    done = done | hit | (t + 1 >= max_lengths)
    logits, cache = _decode_last(
      model, params, tok[:, None], (n_prompt + t)[:, None], jnp.ones((B, 1), jnp.bool_), cache
    )
    return (t + 1, logits, cache, done, stopped, toks, mask, lps, slps)

  # One loop per segment, each over a cache only as long as the segment's last step needs, so
  # that the attention reads the slots written so far rather than the final length's.
  for j, end in enumerate(ends):
    if j:
      state = state[:2] + (model.resize_cache(state[2], P + end),) + state[3:]
    state = jax.lax.while_loop(lambda s, end=end: (s[0] < end) & ~jnp.all(s[3]), body, state)
  _, _, _, _, stopped, toks, mask, lps, slps = state
  return toks, mask, lps, slps, stopped


def _place(x, mesh, spec):
  """`x` laid out as `spec` on `mesh` inside jit (`reshard` on a mesh with explicit axes, a
  sharding constraint on one with auto axes)."""
  sharding = NamedSharding(mesh, spec)
  if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def _batch_axes(mesh) -> Tuple[str, ...]:
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  if not axes:
    raise ValueError(
      f"sample: the mesh needs a 'data' or 'fsdp' axis to split the rows over, it has {mesh.axis_names}."
    )
  return axes


@functools.partial(
  jax.jit,
  static_argnames=("model", "max_new_tokens", "pad_id", "top_k", "use_top_p", "mesh", "combine", "segments"),
)
def _sample(
  params,
  prompt_tokens,
  prompt_mask,
  key,
  temperature,
  top_p,
  stop_ids,
  max_lengths,
  frozen,
  *,
  model,
  max_new_tokens,
  pad_id,
  top_k,
  use_top_p,
  mesh,
  combine,
  segments,
):
  B = prompt_tokens.shape[0]
  model_params = params if combine is None else combine(frozen, params)
  uniforms = jax.random.uniform(key, (B, max_new_tokens), jnp.float32)
  gen = functools.partial(_generate, model=model, pad_id=pad_id, top_k=top_k, use_top_p=use_top_p, segments=segments)
  args = (model_params, prompt_tokens, prompt_mask, uniforms, temperature, top_p, stop_ids, max_lengths)
  if mesh is None:
    toks, mask, lps, slps, stopped = gen(*args)
  else:
    rows = PartitionSpec(_batch_axes(mesh))
    specs = (PartitionSpec(), rows, rows, rows, PartitionSpec(), PartitionSpec(), PartitionSpec(), rows)
    args = tuple(jax.tree.map(lambda x, spec=spec: _place(x, mesh, spec), arg) for arg, spec in zip(args, specs))
    toks, mask, lps, slps, stopped = jax.shard_map(gen, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)(
      *args
    )
  return Samples(
    prompt_tokens=prompt_tokens.astype(jnp.int32),
    prompt_mask=jnp.asarray(prompt_mask, jnp.float32),
    tokens=toks,
    mask=mask,
    logps=lps,
    sample_logps=slps,
    lengths=jnp.sum(mask, axis=1).astype(jnp.int32),
    finished=stopped,
  )


def sample(
  params,
  prompt_tokens,
  prompt_mask,
  key,
  *,
  model,
  max_new_tokens: int,
  eos_id: Optional[int] = None,
  temperature=1.0,
  top_k: int = 0,
  pad_id: int = 0,
  top_p: float = 1.0,
  stop_ids: Sequence[int] = (),
  max_lengths=None,
  mesh=None,
  frozen=None,
  combine: Optional[Callable] = None,
  cache_segments: Optional[int] = None,
) -> Samples:
  """Samples one completion per left-padded prompt (jitted; see the module docstring).

  Args:
    params: the model's parameters (`model.init`), or with `combine` the trained part (LoRA's
      adapters).
    prompt_tokens: `[B, P]` int left-padded prompts (`left_pad`); every row needs >= 1 real token.
    prompt_mask: `[B, P]` 0/1, 1 on real prompt tokens.
    key: a PRNG key; the same key gives the same samples (with or without a mesh).
    model: the model's pure functions (see the module docstring; static, so hashable).
    max_new_tokens: the most completion tokens per row (static; T of the outputs).
    eos_id: the end-of-sequence token id, a stop token; None: none (with `stop_ids`, the stop
      tokens are their union).
    temperature: float >= 0 (traced: changing it does not recompile); 0 = greedy.
    top_k: int >= 0 (static); 0 = the full vocabulary.
    pad_id: token id written after the end of each completion.
    top_p: float in (0, 1]; 1 = no nucleus cut. Whether it is < 1 is static, its value traced.
    stop_ids: more stop token ids (a set; traced, so different ids of the same count share a
      compilation).
    max_lengths: optional `[B]` ints in [0, max_new_tokens], each row's most new tokens.
    mesh: optional `jax.sharding.Mesh`; the rows are split over its "data" (and "fsdp") axes,
      whose total size must divide B. The parameters are replicated.
    frozen, combine: the frozen base and `combine(frozen, params) -> model params` of a policy
      trained with `pofx.train.make_train_step(combine=...)` (LoRA); the combination is computed
      once, before decoding.
    cache_segments: decode in this many loops over a cache that grows by a segment each time
      (models with `resize_cache`); None: one per 32 new tokens, at most 4. Changes the speed,
      not the samples.

  Returns:
    `Samples`.
  """
  if int(max_new_tokens) < 1:
    raise ValueError(f"sample: max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
  if top_k is None:
    top_k = 0
  model_params = jax.eval_shape(combine, frozen, params) if combine is not None else params
  vocab_size = jax.eval_shape(model.head, model_params).shape[-1]
  if int(top_k) < 0 or int(top_k) > vocab_size:
    raise ValueError(f"sample: top_k must be an integer in [0, vocab_size={vocab_size}], got {top_k!r}.")
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"sample: temperature must be >= 0, got {temperature!r}.")
  if top_p is None:
    top_p = 1.0
  if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
    raise ValueError(f"sample: top_p must be a number in (0, 1], got {top_p!r}.")
  if isinstance(prompt_mask, np.ndarray) and prompt_mask.size and not np.all(prompt_mask[:, -1] > 0):
    raise ValueError(
      "sample: prompts must be left-padded and non-empty (prompt_mask[:, -1] must be 1); use sampling.left_pad."
    )
  B = np.shape(prompt_tokens)[0]
  stops = sorted({int(s) for s in stop_ids} | ({int(eos_id)} if eos_id is not None else set()))
  if any(s < 0 or s >= vocab_size for s in stops):
    raise ValueError(f"sample: stop token ids must be in [0, vocab_size={vocab_size}), got {stops}.")
  if max_lengths is None:
    max_lengths = np.full((B,), int(max_new_tokens), np.int32)
  else:
    if np.shape(max_lengths) != (B,):
      raise ValueError(f"sample: max_lengths must have shape [B] = ({B},), got {np.shape(max_lengths)}.")
    if isinstance(max_lengths, (np.ndarray, list, tuple)):
      ml = np.asarray(max_lengths)
      if not np.issubdtype(ml.dtype, np.integer) or ml.min() < 0 or ml.max() > int(max_new_tokens):
        raise ValueError(
          f"sample: max_lengths must be integers in [0, max_new_tokens={max_new_tokens}], got "
          f"{ml.min()}..{ml.max()} ({ml.dtype})."
        )
  if mesh is not None:
    n = math.prod(mesh.shape[a] for a in _batch_axes(mesh))
    if B % n:
      raise ValueError(f"sample: the {B} rows do not split evenly over the mesh's {n} data-parallel devices.")
  # No stop token: an id that never matches (-1) keeps the array's shape static and non-empty.
  stop_arr = np.asarray(stops if stops else [-1], np.int32)
  return _sample(
    params,
    jnp.asarray(prompt_tokens, jnp.int32),
    jnp.asarray(prompt_mask, jnp.float32),
    key,
    jnp.asarray(temperature, jnp.float32),
    jnp.asarray(top_p, jnp.float32),
    stop_arr,
    jnp.asarray(max_lengths, jnp.int32),
    frozen,
    model=model,
    max_new_tokens=int(max_new_tokens),
    pad_id=int(pad_id),
    top_k=int(top_k),
    use_top_p=bool(top_p < 1.0),
    mesh=mesh,
    combine=combine,
    segments=int(min(4, -(-int(max_new_tokens) // 32)) if cache_segments is None else cache_segments),
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
