"""Reference-model strategies: where the reference log-probs of a step come from.

A `Reference` is a record of pure functions, in the spirit of optax's GradientTransformation:

    init(policy_params) -> ref_state
    logps(ref_state, batch) -> PairLogps | None        # None = reference-free
    update(ref_state, policy_params, step) -> ref_state

`logps_fn(params, batch) -> PairLogps` is the policy's own log-prob function (the model forward
plus the chunked log-probs); strategies that run a reference forward call it with the
reference's parameters. Reference log-probs do not depend on the policy, so the train step
calls `logps` once per step, outside any weight perturbation, under `stop_gradient`.

Strategies:
  none()                      reference-free (SimPO-style losses).
  frozen(params, logps_fn)    the SFT/initial policy, frozen (DPO; Rafailov et al. 2023).
  cached(fingerprint)         log-probs precomputed once (`precompute`) and read from the batch.
  multi(refs, eta, alpha)     MRPO (Le et al. 2024, arXiv:2405.16388): clipped, adaptively weighted
                              harmonic combination of K references.
  guiding(params, logps_fn)   Pre-DPO (Pan et al. 2025, arXiv:2504.15843): a finished run's policy.
  synced(alpha, tau, logps_fn)       TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656): every tau steps
                              ref <- alpha * policy + (1 - alpha) * ref (alpha = 1: hard update).
  ema(decay, logps_fn)        ref <- decay * ref + (1 - decay) * policy every step.
  ema_companions(base, logps_fn, decays, warmup)
                              `base` plus EMA copies of the policy evaluated beside it (their
                              log-probs in the reference's `companion_*` fields): Adaptive-DPO
                              (Zhang et al. 2025, arXiv:2503.16921).
  adapters_off(base_logps_fn) with LoRA (`pofx.lora`): the frozen base with the adapters disabled.
  over_frozen(ref)            a strategy over the adapters alone (e.g. synced or ema of them).

Strategies with `reads_frozen` get `(frozen, ref_state)` as their state in `logps`, where
`frozen` is the train state's frozen base (`TrainState.frozen`, LoRA): they read the one copy of
the base that the policy uses instead of holding their own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pofx import fingerprints
from pofx._pair_logps import PairLogps

LogpsFn = Callable[[Any, Any], PairLogps]

CACHE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclasses.dataclass(frozen=True)
class Reference:
  """A reference strategy. `updates`: the reference changes during training (TR-DPO, EMA);
  `cached`: log-probs come from the batch (a precomputed cache)."""

  name: str
  init: Callable[[Any], Any]
  logps: Callable[[Any, Any], Optional[PairLogps]]
  update: Callable[[Any, Any, Any], Any]
  updates: bool = False
  cached: bool = False
  reads_frozen: bool = False


def _identity_update(ref_state, policy_params, step):
  del policy_params, step
  return ref_state


def _forward(logps_fn: LogpsFn, params, batch) -> PairLogps:
  return jax.tree.map(jax.lax.stop_gradient, logps_fn(jax.lax.stop_gradient(params), batch))


def _need_fn(name, logps_fn):
  if logps_fn is None or not callable(logps_fn):
    raise ValueError(f"references.{name} runs a reference forward and needs logps_fn(params, batch) -> PairLogps.")


def none() -> Reference:
  """Reference-free: `logps` returns None, so losses use the policy's log-probs alone."""
  return Reference("none", init=lambda p: (), logps=lambda s, b: None, update=_identity_update)


def frozen(params, logps_fn: LogpsFn) -> Reference:
  """A frozen reference with its own parameters (usually the SFT policy's)."""
  _need_fn("frozen", logps_fn)
  return Reference(
    "frozen", init=lambda p: params, logps=lambda s, b: _forward(logps_fn, s, b), update=_identity_update
  )


def adapters_off(base_logps_fn: LogpsFn) -> Reference:
  """LoRA's reference: the frozen base with the adapters disabled (`reads_frozen`).

  `logps((frozen, ()), batch) = base_logps_fn(frozen, batch)`: the same base weights the policy
  adapts, without the low-rank update, so no second copy of the base is held. With `B = 0` at
  initialisation (arXiv:2106.09685, Sec. 4.1) this is the initial policy, i.e. DPO's frozen
  reference (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7).
  """
  _need_fn("adapters_off", base_logps_fn)
  return Reference(
    "adapters_off",
    init=lambda p: (),
    logps=lambda s, b: _forward(base_logps_fn, s[0], b),
    update=_identity_update,
    reads_frozen=True,
  )


def over_frozen(ref: Reference) -> Reference:
  """`ref` over the adapters of a LoRA run: its state holds adapters (e.g. `synced`/`ema` mix
  the policy's adapters), and its `logps_fn` is called with `(frozen, ref_state)`, so it must be
  the LoRA log-prob function `lambda fa, batch: logps(lora.apply(fa[0], fa[1], spec), batch)`."""
  if ref.reads_frozen or ref.cached:
    raise ValueError(f"references.over_frozen: {ref.name!r} cannot be taken over the adapters.")
  return dataclasses.replace(ref, logps=lambda s, b: ref.logps(s, b), reads_frozen=True)


def guiding(params, logps_fn: LogpsFn) -> Reference:
  """Pre-DPO's guiding reference: the policy of a finished run, frozen (arXiv:2504.15843, Sec. 3).

  `params` is that policy's parameter pytree (a program restores it from the run's checkpoint,
  e.g. `experiments/main.py` for `train.reference.guide_checkpoint`).
  """
  if isinstance(params, (str, bytes, bytearray)) or hasattr(params, "__fspath__"):
    raise TypeError(
      f"references.guiding takes the guiding policy's parameters, not a path ({params!r}); restore "
      "the checkpoint first (the library does no checkpoint I/O)."
    )
  ref = frozen(params, logps_fn)
  return dataclasses.replace(ref, name="guiding")


def synced(alpha: float = 0.6, tau: int = 512, logps_fn: Optional[LogpsFn] = None) -> Reference:
  """TR-DPO: every `tau` steps, `ref <- alpha * policy + (1 - alpha) * ref` (TRL's unified rule).

  alpha = 1 is the hard update (copy every tau steps); tau = 1 is a per-step soft update.
  Defaults are TRL's (alpha 0.6, tau 512). arXiv:2404.09656, Sec. 3 (soft and hard updates).
  """
  if logps_fn is None:
    raise ValueError(
      "references.synced: a TR-DPO reference changes during training, so its log-probs cannot come "
      "from a precomputed cache; pass logps_fn (and do not combine it with a cached reference)."
    )
  _need_fn("synced", logps_fn)
  if not (0.0 < float(alpha) <= 1.0):
    raise ValueError(f"references.synced: invalid alpha={alpha!r}; allowed: 0 < alpha <= 1.")
  if int(tau) < 1:
    raise ValueError(f"references.synced: invalid tau={tau!r}; allowed: integer >= 1.")

  def update(ref_state, policy_params, step):
    do_sync = (jnp.asarray(step) % tau) == 0
    mixed = jax.tree.map(lambda r, p: alpha * p + (1.0 - alpha) * r, ref_state, policy_params)
    return jax.tree.map(lambda m, r: jnp.where(do_sync, m, r), mixed, ref_state)

  return Reference(
    "synced",
    init=lambda p: jax.tree.map(jnp.array, p),
    logps=lambda s, b: _forward(logps_fn, s, b),
    update=update,
    updates=True,
  )


def ema(decay: float = 0.99, logps_fn: Optional[LogpsFn] = None) -> Reference:
  """Exponential moving average of the policy: `ref <- decay * ref + (1 - decay) * policy` each step."""
  if logps_fn is None:
    raise ValueError("references.ema: an EMA reference changes every step and cannot be cached; pass logps_fn.")
  _need_fn("ema", logps_fn)
  if not (0.0 <= float(decay) < 1.0):
    raise ValueError(f"references.ema: invalid decay={decay!r}; allowed: 0 <= decay < 1.")

  def update(ref_state, policy_params, step):
    del step
    return jax.tree.map(lambda r, p: decay * r + (1.0 - decay) * p, ref_state, policy_params)

  return Reference(
    "ema",
    init=lambda p: jax.tree.map(jnp.array, p),
    logps=lambda s, b: _forward(logps_fn, s, b),
    update=update,
    updates=True,
  )


def diffusers_ema_decay(decay, count):
  """The decay diffusers' `EMAModel` (no `use_ema_warmup`, `update_after_step=0`, `min_decay=0`)
  applies at its `count`-th update (1-based, an integer array or int):

    0 at count 1 (the EMA becomes a copy of the model),   min(decay, count / (count + 9)) after,

  i.e. `min(decay, (1 + s) / (10 + s))` with `s = count - 1` its internal step
  (`diffusers.training_utils.EMAModel.get_decay`). A float32 scalar.
  """
  n = jnp.asarray(count, jnp.float32)
  return jnp.where(n <= 1.0, 0.0, jnp.minimum(jnp.float32(decay), n / (n + 9.0))).astype(jnp.float32)


def ema_companions(
  base: Reference, logps_fn: LogpsFn, *, decays: Sequence[float] = (0.9999, 0.5), warmup: int = 2
) -> Reference:
  r"""`base` plus M EMA copies of the policy (the "companions"), scored on every batch beside it.

  Adaptive-DPO (Zhang et al. 2025, arXiv:2503.16921) measures each pair's disagreement among the
  policy and two exponential moving averages of it. The authors' code
  (fanfanffff1/Adaptive-DPO `dpo_train_un.py` at a64ae01, lines 639-652 and 1026-1028) keeps two
  diffusers `EMAModel`s of the trained weights, decays 0.9999 and 0.5, stepped after every
  optimizer step, and scores them (`cal_loss`, lines 826-847) on the same noisy inputs as the
  policy and the reference from the step `step >= ema_warmup_steps` (2 by default; the step
  counts micro-batches there and the warm-up is scaled by the accumulation, so it is 2 optimizer
  steps). This strategy is that bookkeeping as a reference:

    init(p)      -> {"base": base.init(p), "emas": (p, ..., p) (M copies), "count": 0}
    update(s, p) -> base updated; count n <- n + 1; each EMA e_m <- e_m - (1 - d_m(n)) (e_m - p)
                    with diffusers' effective decay d_m(n) = `diffusers_ema_decay(decays[m], n)`
                    (0 at the first update, so each EMA is then a copy of the policy, whatever it
                    started from; min(decay, n / (n + 9)) after: the 0.9999 EMA runs at
                    n / (n + 9), about 0.97 at n = 300)
    logps(s, b)  -> base.logps(s["base"], b) with `companion_chosen`, `companion_rejected` `[B, M]`
                    (`logps_fn` at each EMA's parameters, detached) and `companion_mask` `[B, M]`,
                    1 once count >= warmup, else 0 (before it, Adaptive-DPO's uncertainty is 0).

  `count` counts this strategy's own updates (the train step calls `update` after each finite
  step), as `EMAModel` counts its own `step` calls. The companions' forwards run every step,
  also during the warm-up (their values are then masked), on the same batch as the reference, so
  they see the same timesteps and noise (a diffusion `logps_fn`) as the method requires.

  Args:
    base: the reference proper (e.g. `frozen(sft_params, logps_fn)`); not `none`, not `cached`
      (the companions' and the reference's values must come from one batch's forwards), not one
      that reads a LoRA run's frozen base (`reads_frozen`: not supported).
    logps_fn: the policy's `logps_fn(params, batch) -> PairLogps`, run at the EMA parameters.
    decays: the EMAs' decays, each in [0, 1) (the code's 0.9999 and 0.5).
    warmup: updates before the companions are in use (an integer >= 0; the code's 2).
  """
  _need_fn("ema_companions", logps_fn)
  if not isinstance(base, Reference):
    raise TypeError(f"references.ema_companions: base must be a pofx.references.Reference, got {type(base).__name__}.")
  if base.name == "none" or base.cached or base.reads_frozen:
    raise ValueError(
      f"references.ema_companions: base={base.name!r} is not allowed; allowed: a strategy with its own "
      "parameters that runs a forward every step (frozen, guiding, synced, ema)."
    )
  decays = tuple(decays)
  bad = [d for d in decays if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0]
  if not decays or bad:
    raise ValueError(
      f"references.ema_companions: invalid decays={decays!r}; allowed: a non-empty sequence of numbers in [0, 1)."
    )
  if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
    raise ValueError(f"references.ema_companions: invalid warmup={warmup!r}; allowed: an integer >= 0.")

  def init(params):
    return {
      "base": base.init(params),
      "emas": tuple(jax.tree.map(jnp.array, params) for _ in decays),
      "count": jnp.zeros((), jnp.int32),
    }

  def update(ref_state, policy_params, step):
    count = ref_state["count"] + 1
    emas = []
    for d, e in zip(decays, ref_state["emas"]):
      keep = diffusers_ema_decay(d, count)
      emas.append(jax.tree.map(lambda x, p, k=keep: (x - (1.0 - k) * (x - p)).astype(x.dtype), e, policy_params))
    return {"base": base.update(ref_state["base"], policy_params, step), "emas": tuple(emas), "count": count}

  def logps(ref_state, batch):
    out = base.logps(ref_state["base"], batch)
    comps = [_forward(logps_fn, e, batch) for e in ref_state["emas"]]
    chosen = jnp.stack([jnp.asarray(o.chosen, jnp.float32) for o in comps], axis=1)
    rejected = jnp.stack([jnp.asarray(o.rejected, jnp.float32) for o in comps], axis=1)
    on = (ref_state["count"] >= warmup).astype(jnp.float32)
    return out.replace(
      companion_chosen=chosen, companion_rejected=rejected, companion_mask=jnp.broadcast_to(on, chosen.shape)
    )

  return Reference(f"ema_companions({base.name})", init=init, logps=logps, update=update, updates=True)


# ----------------------------------------------------------------------------------------------
# Cached reference log-probs.


def fingerprint(params, *, vocab: Any, max_prompt_len: int, max_completion_len: int, extra: Any = None) -> str:
  """SHA-256 of the reference weights, the vocabulary/tokenizer identity and the length limits.

  A cache is valid only for the exact reference, tokenisation and truncation that produced it;
  `cached` refuses a cache whose fingerprint differs. `extra`: anything else the cache depends on
  (a program passes its dataset's fingerprint). Built with `pofx.fingerprints`.
  """
  meta = {"vocab": vocab, "max_prompt_len": int(max_prompt_len), "max_completion_len": int(max_completion_len)}
  return fingerprints.of(meta, {"params": fingerprints.of_arrays(params), "extra": extra})


def precompute(logps_fn: LogpsFn, params, batches, *, fingerprint: str):
  """One pass of the reference over `batches`: returns a dict of float32 arrays and the fingerprint.

  `{"ref_chosen_logps": [N], "ref_rejected_logps": [N], "fingerprint": str}` in batch order; the
  caller stores them next to the examples (and their ids) and feeds them back in the batches.
  """
  fwd = jax.jit(lambda p, b: _forward(logps_fn, p, b))
  chosen, rejected = [], []
  for batch in batches:
    out = fwd(params, batch)
    chosen.append(np.asarray(out.chosen, np.float32))
    rejected.append(np.asarray(out.rejected, np.float32))
  return {
    "ref_chosen_logps": np.concatenate(chosen),
    "ref_rejected_logps": np.concatenate(rejected),
    "fingerprint": fingerprint,
  }


def cached(expected_fingerprint: str, cache_fingerprint: str) -> Reference:
  """Reference log-probs read from the batch (`ref_chosen_logps`, `ref_rejected_logps`, `[B]`).

  Args:
    expected_fingerprint: `fingerprint(...)` of the reference, tokenizer and limits of this run.
    cache_fingerprint: the fingerprint stored with the cache.

  Raises:
    ValueError: the fingerprints differ (a stale cache is an error, never silently reused).
  """
  if expected_fingerprint != cache_fingerprint:
    raise ValueError(
      "references.cached: the cache was computed for a different reference, vocabulary or length "
      f"limits (cache fingerprint {cache_fingerprint[:12]}..., this run {expected_fingerprint[:12]}...). "
      "Recompute it with references.precompute."
    )

  return Reference(
    "cached",
    init=lambda p: (),
    logps=_read_cache(CACHE_KEYS, "references.cached"),
    update=_identity_update,
    cached=True,
  )


def _read_cache(keys, who):
  """`logps(ref_state, batch)` reading precomputed chosen/rejected log-probs from `batch[keys]`."""

  def logps(ref_state, batch):
    del ref_state
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f"{who}: the batch lacks {missing}; feed the precomputed log-probs with each batch.")
    return PairLogps(chosen=jnp.asarray(batch[keys[0]], jnp.float32), rejected=jnp.asarray(batch[keys[1]], jnp.float32))

  return logps


# ----------------------------------------------------------------------------------------------
# MRPO.


def mrpo_combine(
  primary: PairLogps, others: Sequence[PairLogps], *, eta: float = 0.1, alpha: Optional[float] = None
) -> PairLogps:
  r"""MRPO's combined reference log-probs (Le et al. 2024, arXiv:2405.16388; code thaihungle/MRPO).

  K = 2 (primary p2, usually the SFT model; external p1), per response y and per pair, exactly as
  the authors' code (`trainer_mref.py::get_batch_loss_metrics`):
    ARWC weight: a_k = p_k(y_w) - p_k(y_l); alpha = |a_1| / (|a_1| + |a_2| + 1e-6) when alpha is None
      (adaptive per pair; else the given weight in [0, 1]).
    CTRO clip: scale = |b_w| / (|b_w| + |b_l|), b_y = (p1(y) + p2(y)) / 2; eta_w = eta * scale,
      eta_l = eta * (1 - scale) (eta < 0: fixed |eta|); p1(y) <- clip(p1(y), (1 + eta_y) sg(p2(y)),
      (1 - eta_y) sg(p2(y))) (log-probs are negative).
    log ref(y) = p1 + p2 - log(alpha e^{p1} + (1 - alpha) e^{p2}), i.e. the weighted harmonic mean
      1/ref = alpha/pi_2 + (1 - alpha)/pi_1.
  Pairing of weights and references (the code's, kept): the weight computed from the *external*
  reference's confidence |a_1| multiplies 1/pi_2, the *primary*'s term.

  K >= 3 (the authors' code supports K = 2 only, and the paper's general-K equations could not be
  read here): each external reference k is combined with the primary exactly as above (its own
  clip and its own weight alpha_k from |a_k| and |a_primary|), and the K - 1 results are averaged
  harmonically:

    1/ref = (1/(K-1)) sum_k [alpha_k / pi_primary + (1 - alpha_k) / pi~_k],

  a weighted harmonic mean of all K references with weights on the simplex (primary
  `mean_k alpha_k`, external k `(1 - alpha_k)/(K - 1)`). With every external reference the same
  model (duplicated), every term is the K = 2 term, so the result is the K = 2 computation exactly;
  K = 2 is the code. Identical references give back that reference (DPO).
  """
  if not others:
    raise ValueError("MRPO needs K >= 2 references (a primary and at least one other).")
  if alpha is not None and not 0.0 <= alpha <= 1.0:
    raise ValueError(
      f"references.mrpo_combine: invalid alpha={alpha!r}; allowed: None (adaptive per pair) or a weight in [0, 1]."
    )
  eps = 1e-6
  sw, sl = jax.lax.stop_gradient(primary.chosen), jax.lax.stop_gradient(primary.rejected)
  a_primary = jnp.abs(primary.chosen - primary.rejected)

  def clip_to_primary(p1: PairLogps):
    b_w = (p1.chosen + primary.chosen) / 2
    b_l = (p1.rejected + primary.rejected) / 2
    scale = jnp.abs(b_w) / (jnp.abs(b_w) + jnp.abs(b_l) + 1e-12)
    if eta < 0:
      eta_w = eta_l = abs(eta)
    else:
      eta_w, eta_l = eta * scale, eta * (1.0 - scale)
    cw = jnp.minimum(jnp.maximum(p1.chosen, (1 + eta_w) * sw), (1 - eta_w) * sw)
    cl = jnp.minimum(jnp.maximum(p1.rejected, (1 + eta_l) * sl), (1 - eta_l) * sl)
    return cw, cl

  def neg_log_term(w, p_primary, p_other):
    # log(w / pi_primary + (1 - w) / pi_other) = -log ref_k (the K = 2 combination), stably.
    return jnp.logaddexp(jnp.log(jnp.maximum(w, 1e-30)) - p_primary, jnp.log(jnp.maximum(1 - w, 1e-30)) - p_other)

  terms_w, terms_l = [], []
  for other in others:
    w = jnp.abs(other.chosen - other.rejected)
    w = w / (w + a_primary + eps) if alpha is None else jnp.full_like(a_primary, alpha)
    cw, cl = clip_to_primary(other)
    terms_w.append(neg_log_term(w, primary.chosen, cw))
    terms_l.append(neg_log_term(w, primary.rejected, cl))

  def harmonic_mean(terms):  # -log( (1/n) sum_k exp(terms_k) ), terms_k = -log ref_k
    if len(terms) == 1:
      return -terms[0]
    return -(jax.nn.logsumexp(jnp.stack(terms), axis=0) - jnp.log(float(len(terms))))

  return PairLogps(
    chosen=harmonic_mean(terms_w),
    rejected=harmonic_mean(terms_l),
    chosen_len=primary.chosen_len,
    rejected_len=primary.rejected_len,
  )


def multi(refs: Sequence[Reference], *, eta: float = 0.1, alpha: Optional[float] = None) -> Reference:
  """MRPO: K >= 2 references combined by `mrpo_combine`; the first is the primary (usually the SFT).

  Each member may be frozen, guiding or cached (cached members read their own batch keys:
  see `cached_member`). Updating members are refused.
  """
  refs = list(refs)
  if len(refs) < 2:
    raise ValueError(f"references.multi: MRPO needs K >= 2 references, got {len(refs)}.")
  if any(r.updates for r in refs):
    raise ValueError("references.multi: members must be static (frozen, guiding or cached); got an updating one.")

  def logps(ref_state, batch):
    outs = [r.logps(s, batch) for r, s in zip(refs, ref_state)]
    return mrpo_combine(outs[0], outs[1:], eta=eta, alpha=alpha)

  return Reference(
    "multi",
    init=lambda p: tuple(r.init(p) for r in refs),
    logps=logps,
    update=_identity_update,
    cached=all(r.cached for r in refs),
  )


def cached_member(index: int, expected_fingerprint: str, cache_fingerprint: str) -> Reference:
  """A cached MRPO member reading `ref{index}_chosen_logps` / `ref{index}_rejected_logps` from the batch."""
  base = cached(expected_fingerprint, cache_fingerprint)  # the fingerprint check
  keys = (f"ref{index}_chosen_logps", f"ref{index}_rejected_logps")
  return dataclasses.replace(base, name=f"cached{index}", logps=_read_cache(keys, f"references.cached_member({index})"))
