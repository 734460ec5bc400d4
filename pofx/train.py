"""The functional train step: loss x reference strategy x weight perturbation, one jitted function.

    state = train.init_state(params, optimizer, reference, perturbation, loss="dpo", rng=key)
    step = train.make_train_step(logps_fn, optimizer, loss="dpo", reference=ref, perturbation=pert)
    state, metrics = step(state, batch, rng)        # jitted, donates `state`

Inside one step (all on device, no host syncs):
  1. reference log-probs, once, under stop_gradient, outside the perturbation;
  2. the policy forward and the loss, differentiated by the perturbation (plain / SAM / AWP),
     optionally accumulated over micro-batches;
  3. the optax update (`pofx.optimizers.apply_update`), the reference update (TR-DPO / EMA), the
     loss state (beta-DPO, gamma-PO);
  4. metrics as device arrays: loss, rewards, margins, reward accuracy, log-probs, grad norm, lr.

`logps_fn(params, batch) -> PairLogps` is the policy's log-prob function (model forward plus
chunked log-probs); the step knows nothing else about the model. Batches are dicts of arrays
with a leading batch axis; per-pair extra inputs that a loss requires are read from the batch
under the names of `pofx.losses.REQUIREMENTS` (e.g. `chosen_scores`; a listwise loss's
`scores` `[B, K]` beside a `logps_fn` that returns `ListLogps`). KTO's `kl_logratios` are
either in the batch or computed by the step from the mismatched pairs in `batch["kl"]`
(`{"pairs": PairBatch}`, the loader's `kl_pairs=True`): policy and reference log-ratios of those
pairs, detached, `[2B]`. The loss is a canonical
`pofx.losses` name, a TRL 1.16 loss_type written `"trl.<loss_type>"` (e.g. `"trl.sigmoid"`), or a
`LossSpec`.

The objective the perturbation differentiates is `objective(params, (batch, reference_logps))`:
the reference log-probs (a `PairLogps`, computed once per (micro-)batch) travel beside the batch,
not inside it, so that m-sharpness splits them with the pairs; the loss state and the loss's
PRNG key are arguments of the objective that are never split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from pofx import collectives, optimizers
from pofx import evaluation as evaluation_lib
from pofx import losses as losses_lib
from pofx import perturbations as perturbations_lib
from pofx import references as references_lib
from pofx._pair_logps import ListLogps, PairLogps

# Batch keys that a loss requirement reads.
_BATCH_INPUTS = {
  "scores": ("chosen_scores", "rejected_scores"),
  "turn_ids": ("chosen_turn_ids", "rejected_turn_ids"),
  "risk": ("chosen_risk", "rejected_risk"),
  "kl": ("kl_logratios",),
  "diff_masks": ("chosen_diff_mask", "rejected_diff_mask"),
  "embeddings": ("prompt_embeddings", "chosen_embeddings"),
  "segments": ("chosen_segment_ids", "rejected_segment_ids", "chosen_segment_scores", "rejected_segment_scores"),
  "list": ("scores",),
}
# fold_in constant of the dropout keys' stream (ASCII "drop"), apart from the loss and perturbation keys.
_DROPOUT_STREAM = 0x64726F70


@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a run carries from step to step (a pytree). `frozen`: parameters the step reads
  but never trains (LoRA's base, `make_train_step(..., combine=)`); () otherwise."""

  params: Any
  opt_state: Any
  ref_state: Any
  perturbation_state: Any
  loss_state: Any
  step: jax.Array
  rng: jax.Array
  frozen: Any = ()

  def replace(self, **kw) -> TrainState:
    return dataclasses.replace(self, **kw)


jax.tree_util.register_dataclass(
  TrainState, data_fields=[f.name for f in dataclasses.fields(TrainState)], meta_fields=[]
)


def _spec(loss):
  """The LossSpec of `loss`: a canonical name, `"trl.<loss_type>"`, or a LossSpec."""
  if isinstance(loss, losses_lib.LossSpec):
    return loss
  return losses_lib.spec(loss)


def validate(loss, reference: references_lib.Reference, loss_hyper: Mapping[str, Any] | None = None) -> None:
  """Fails early, with the field and the allowed values, on combinations that cannot work."""
  spec = _spec(loss)
  hyper = dict(loss_hyper or {})
  losses_lib.check_kwargs(spec, {**hyper, **dict.fromkeys(_required_kwargs(spec))})
  if spec.reference == "required" and reference.name == "none":
    raise ValueError(
      f"loss {spec.name!r} needs a reference model, but reference=none(); use frozen, cached, multi, "
      "guiding, synced or ema, or a reference-free loss."
    )
  if reference.cached and reference.updates:
    raise ValueError("A cached reference cannot be combined with a strategy that updates the reference.")
  if reference.cached and "eos_logps" in spec.requires:
    raise ValueError(
      f"loss {spec.name!r} needs the reference's per-state EOS log-probs, which a cached reference does not "
      "hold; use frozen, guiding, synced or ema."
    )
  if "list" in spec.requires and reference.cached:
    raise ValueError(
      f"loss {spec.name!r} takes K-way lists (ListLogps), which a cached reference does not hold; use frozen, "
      "guiding, synced or ema."
    )


def _required_kwargs(spec):
  names = []
  for kind in spec.requires:
    names += list(_BATCH_INPUTS.get(kind, ()))
    if kind in ("key", "state"):
      names.append(kind)
  return names


def init_state(
  params,
  optimizer: optax.GradientTransformation,
  reference: references_lib.Reference,
  perturbation: perturbations_lib.Perturbation,
  *,
  loss="dpo",
  loss_hyper=None,
  rng=None,
  frozen=(),
) -> TrainState:
  """The first `TrainState`. `params` are the trained parameters (with LoRA, the adapters:
  `pofx.lora.init`), copied (the step donates its state); `frozen` the parameters held fixed
  (LoRA's base), which get no optimizer state, no perturbation and no reference copy. `frozen`
  is held as given, not copied: the jitted step of `make_train_step(combine=...)` does not donate
  it, so the caller's arrays stay valid and only one copy of the base exists."""
  spec = _spec(loss)
  loss_state = ()
  if spec.init_state is not None:
    hyper = {k: v for k, v in (loss_hyper or {}).items() if k in spec.hyperparameters}
    loss_state = spec.init_state(**hyper)
  # The jitted step donates its state: start from a copy so the caller's arrays (often also a
  # frozen reference's parameters) stay valid.
  params = jax.tree.map(jnp.copy, params)
  ref_state = jax.tree.map(jnp.copy, reference.init(params))  # e.g. frozen(params) holds the caller's arrays
  return TrainState(
    params=params,
    opt_state=optimizer.init(params),
    ref_state=ref_state,
    perturbation_state=perturbation.init(params),
    loss_state=loss_state,
    step=jnp.zeros((), jnp.int32),
    rng=jax.random.key(0) if rng is None else rng,
    frozen=frozen,
  )


def _metric_view(policy, ref, batch):
  """`(lr_w, lr_l, logps_w, logps_l)` `[B]` for the metrics: a pair's chosen and rejected, or for a
  K-way list (`ListLogps`, scores in `batch["scores"]`) its best- and worst-scored items (the first
  one on ties; NaN scores, padding items, are never picked)."""
  if not isinstance(policy, ListLogps):
    lr_w, lr_l = losses_lib.logratios(policy, ref)
    return lr_w, lr_l, policy.chosen, policy.rejected
  s = jnp.asarray(batch["scores"], jnp.float32)
  best = jnp.argmax(jnp.where(jnp.isfinite(s), s, -jnp.inf), axis=1)
  worst = jnp.argmin(jnp.where(jnp.isfinite(s), s, jnp.inf), axis=1)
  lp = policy.logps
  lr = lp if ref is None else lp - ref.logps
  take = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
  return take(lr, best), take(lr, worst), take(lp, best), take(lp, worst)


def _pair_mask(batch):
  """`[B]` 0/1 mask of real pairs: `batch["pair_mask"]`, else the PairBatch's, else None (all real)."""
  if "pair_mask" in batch:
    return batch["pair_mask"]
  pairs = batch.get("pairs")
  return getattr(pairs, "pair_mask", None)


def stack_microbatches(batches):
  """Stacks n host-built micro-batches (same shapes) on a new leading axis, for grad accumulation."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def _beta_of(spec, hyper):
  beta = hyper.get("beta", spec.hyperparameters.get("beta", 0.1))
  return 0.1 if not isinstance(beta, (int, float)) else float(beta)


def make_train_step(
  logps_fn: Callable[[Any, Any], PairLogps | ListLogps],
  optimizer: optax.GradientTransformation,
  *,
  loss="dpo",
  loss_hyper: Optional[Mapping[str, Any]] = None,
  reference: Optional[references_lib.Reference] = None,
  perturbation: Optional[perturbations_lib.Perturbation] = None,
  input_perturbation: Optional[perturbations_lib.InputPerturbation] = None,
  grad_accum_steps: int = 1,
  learning_rate_fn: Optional[Callable] = None,
  guard_nonfinite: bool = True,
  gradient_field: bool = False,
  dropout_samples: int = 0,
  jit: bool = True,
  donate: bool = True,
  axis_name=None,
  combine: Optional[Callable[[Any, Any], Any]] = None,
):
  """Builds the pure step `(state, batch, rng) -> (state, metrics)`, jitted once with donation.

  Args:
    logps_fn: `(params, batch) -> PairLogps` of the policy (and of the reference's params); for a
      loss that takes K-way lists ("list" in its requirements, e.g. `rank_dpo`) `-> ListLogps`
      `[B, K]`, with the lists' scores `[B, K]` under `batch["scores"]`. The metrics' chosen and
      rejected are then each list's best- and worst-scored items.
    optimizer: an optax transformation; a `pofx.optimizers.FusedOptimizer` is applied by its own
      `apply` (e.g. the CPU backend's AdamW, one native kernel updating every leaf in place).
    loss: a canonical loss name, a TRL loss_type as `"trl.<loss_type>"`, or a LossSpec;
      `loss_hyper` its hyperparameters.
    reference: a `pofx.references` strategy (default: none()).
    perturbation: a `pofx.perturbations` record (default: none()).
    input_perturbation: optional `pofx.perturbations.InputPerturbation` (e.g.
      `adversarial_embeddings`): the objective the weight perturbation differentiates is the loss
      on the batch it returns (recomputed at every weights evaluated); the reported loss is that
      perturbed-input loss.
    grad_accum_steps: the batch holds this many micro-batches stacked on a new leading axis
      (`stack_microbatches`); gradients are averaged over them with `lax.scan` and one update is
      applied. Losses with batch statistics (beta-DPO, aot) see micro-batch statistics. With
      `sam(rho)` this is m-sharpness with one ascent per micro-batch.
    learning_rate_fn: the optimizer's schedule, for the `learning_rate` metric.

    guard_nonfinite: keep the previous state when the loss or a gradient is not finite, and
      report `metrics["nonfinite"]` (1.0 on such a step).
    gradient_field: also report the loss's gradient field over the chosen and rejected log-probs
      (`pofx.evaluation.gradient_field`, at the unperturbed parameters, over the real pairs):
      `gradient_field/chosen` and `gradient_field/rejected` (means of dl/d log pi(y_w|x) and
      dl/d log pi(y_l|x)), `gradient_field/ratio` (mean |dl/d log pi_w| over mean
      |dl/d log pi_l|) and `gradient_field/log_prob_ratio` (mean of
      log(|dl/dpi_w| / |dl/dpi_l|) over the pairs where it is finite). It reads the log-probs
      under stop_gradient: no extra model pass, the update is unchanged.
    dropout_samples: 0 (default): the policy forward gets no dropout key (a deterministic model).
      M >= 1: multi-sample dropout (Inoue 2019, arXiv:1905.09788): the policy's
      log-probs and the loss are computed under M independent dropout masks
      (`batch["dropout_key"]`, keys split from the step's PRNG key, a new one per micro-batch;
      `pofx.policy.make_logps_fn` hands it to the model, whose `dropout` rate applies) and the
      objective is their mean, `(1/M) sum_m L(theta; mask_m)`; M = 1 is plain dropout. Every
      evaluation of one step (a perturbation's ascent and its gradient) sees the same M masks.
      Reported per-pair values are means over the masks; a stateful loss keeps the first
      mask's state. The reference log-probs never get a key (no dropout).
    axis_name: for data parallelism under `shard_map`/`pmap` (`pofx.parallel` sets it; then
      jit=False): the mapped batch axis name (or tuple of names). The policy's and reference's
      log-probs and the loss's per-pair batch inputs are all-gathered over it, so the loss sees
      the global batch (batch statistics and reductions are those of one device), and the
      gradient of every objective evaluation (SAM's ascent gradient included) is averaged over
      the axis by `pofx.collectives.grad_pmean`. Leave None under plain `jit` (GSPMD).
    combine: `(frozen, params) -> model params` (LoRA: `lambda f, a: pofx.lora.apply(f, a, spec)`):
      the policy's log-probs (those of KTO's KL pairs too) are
      `logps_fn(combine(state.frozen, params), batch)`, so only `params` (the adapters) are
      differentiated, perturbed and updated. A reference with
      `reads_frozen` (`references.adapters_off`, `references.over_frozen`) gets
      `(state.frozen, ref_state)`.

  Padding pairs (`batch["pair_mask"]` or the PairBatch's `pair_mask` equal to 0, e.g. from
  `batching.*(num_pairs=...)`) are left out of the loss reduction and the metrics; losses with
  batch statistics (aot, beta-DPO, gamma-PO) still see them, so pad only with reducible losses.
  """
  spec = _spec(loss)
  hyper = dict(loss_hyper or {})
  reference = reference or references_lib.none()
  perturbation = perturbation or perturbations_lib.none()
  validate(spec, reference, hyper)
  if reference.reads_frozen and combine is None:
    raise ValueError(
      f"reference {reference.name!r} reads the frozen base of a LoRA run; pass combine= (and frozen= to "
      "init_state), or use a reference with its own parameters (frozen, cached, synced, ema)."
    )
  if int(grad_accum_steps) < 1:
    raise ValueError(f"grad_accum_steps={grad_accum_steps!r}; allowed: integer >= 1.")
  if isinstance(dropout_samples, bool) or int(dropout_samples) != dropout_samples or dropout_samples < 0:
    raise ValueError(f"dropout_samples={dropout_samples!r}; allowed: 0 (no dropout) or an integer >= 1.")
  if gradient_field and "list" in spec.requires:
    raise ValueError(
      f"gradient_field=True reads a pair's chosen and rejected log-probs; loss {spec.name!r} takes K-way lists: "
      "use gradient_field=False."
    )
  beta = _beta_of(spec, hyper)
  stateful = "state" in spec.requires
  if axis_name is not None:
    if jit:
      raise ValueError(
        "make_train_step: axis_name is for a step run under shard_map/pmap; pass jit=False "
        "(pofx.parallel.make_train_step wraps and jits it)."
      )
  pair_input_names = [n for kind in spec.requires for n in _BATCH_INPUTS.get(kind, ())]

  def loss_kwargs(batch, loss_state, key):
    kw = dict(hyper)
    for kind in spec.requires:
      for name in _BATCH_INPUTS.get(kind, ()):
        if name not in batch:
          hint = " (or the mismatched pairs under batch['kl']: the loader's kl_pairs=True)" if kind == "kl" else ""
          raise ValueError(f"loss {spec.name!r} reads batch[{name!r}], which the batch lacks{hint}.")
        kw[name] = batch[name]
    if "key" in spec.requires:
      kw["key"] = key
    if stateful:
      kw["state"] = loss_state
    return kw

  def objective(params, batch, ref, loss_state, key, dropout_key=None, frozen=()):
    """`(loss, aux)` at `params` on `batch`; with `dropout_samples` M >= 1, the mean over M masks."""
    if not dropout_samples:
      return one_objective(params, batch, ref, loss_state, key, frozen)
    keys = jax.random.split(dropout_key, dropout_samples)
    values, auxs = jax.lax.map(
      lambda k: one_objective(params, {**batch, "dropout_key": k}, ref, loss_state, key, frozen), keys
    )
    aux = {
      k: jax.tree.map(lambda x: x[0], v) if k in ("loss_state", "mask", "example_id") else jnp.mean(v, axis=0)
      for k, v in auxs.items()
    }
    return jnp.mean(values), aux

  def one_objective(params, batch, ref, loss_state, key, frozen=()):
    """`(loss, aux)` of the policy at `params` on `batch`, against the reference log-probs `ref`."""
    if axis_name is not None:
      params = collectives.grad_pmean(params, axis_name)
    policy = logps_fn(params if combine is None else combine(jax.lax.stop_gradient(frozen), params), batch)
    mask = _pair_mask(batch)
    if axis_name is not None:  # the loss sees the global batch (see `axis_name`)
      extra = {n: batch[n] for n in pair_input_names + ["example_id"] if n in batch}
      policy, ref, extra, mask = collectives.all_gather_batch((policy, ref, extra, mask), axis_name)
      batch = {**batch, **extra}
    kwargs = loss_kwargs(batch, loss_state, key)
    out = spec.fn(policy, ref, **kwargs)
    per_pair, new_loss_state = out if stateful else (out, ())
    value = losses_lib.reduce(spec, per_pair, policy, mask)
    lr_w, lr_l, logps_w, logps_l = _metric_view(policy, ref, batch)
    aux = {
      "per_pair": per_pair,
      "lr_w": lr_w,
      "lr_l": lr_l,
      "logps_chosen": logps_w,
      "logps_rejected": logps_l,
      "loss_state": new_loss_state,
      "mask": jnp.ones_like(per_pair) if mask is None else jnp.asarray(mask, per_pair.dtype),
    }
    if "example_id" in batch:  # for perturbations with a per-example memory (SAF)
      aux["example_id"] = batch["example_id"]
    if gradient_field:
      frozen_ref = jax.lax.stop_gradient(ref)
      field = evaluation_lib.gradient_field(
        lambda p: spec.fn(p, frozen_ref, **kwargs)[0] if stateful else spec.fn(p, frozen_ref, **kwargs),
        jax.lax.stop_gradient(policy),
      )
      aux["field_chosen"], aux["field_rejected"] = field.d_chosen, field.d_rejected
      aux["field_log_prob_ratio"] = field.log_prob_ratio
    return value, aux

  def kl_logratios(state, kl_batch):
    """KTO's mismatched log-ratios: the policy (at the step's parameters) and the reference on the
    batch's KL pairs, detached; `[2B]`, each pair's chosen and rejected entries side by side."""
    if reference.cached:
      raise ValueError(
        f"loss {spec.name!r} computes its KL batch's reference log-probs with a reference forward; a cached "
        "reference has none: use frozen, synced, ema or guiding (or put 'kl_logratios' in the batch)."
      )
    params = state.params if combine is None else combine(state.frozen, state.params)  # LoRA: base + adapters
    policy_kl = logps_fn(jax.lax.stop_gradient(params), kl_batch)
    ref_in = (state.frozen, state.ref_state) if reference.reads_frozen else state.ref_state
    lr_c, lr_r = losses_lib.logratios(policy_kl, reference.logps(ref_in, kl_batch))
    return jax.lax.stop_gradient(jnp.stack([lr_c, lr_r], axis=1).reshape(-1).astype(jnp.float32))

  def one_batch(state, batch, pstate, k_loss, k_pert, k_drop):
    # KTO's reference point: when the batch holds the mismatched pairs ("kl", built by the loader's
    # kl_pairs) instead of ready-made kl_logratios, both models score them here, once per
    # (micro-)batch, outside the perturbation (the reference point is detached).
    if "kl" in spec.requires and "kl_logratios" not in batch and "kl" in batch:
      batch = {k: v for k, v in batch.items() if k != "kl"} | {"kl_logratios": kl_logratios(state, batch["kl"])}
    # The reference forward: once per (micro-)batch, outside the perturbation; its log-probs go to
    # the perturbation beside the batch, so that m-sharpness splits them with the pairs. The loss
    # state and key are closed over: never split.
    ref_in = (state.frozen, state.ref_state) if reference.reads_frozen else state.ref_state
    reference_logps = reference.logps(ref_in, batch)

    def obj(params, batch_and_reference):
      pairs, reference_logps = batch_and_reference
      if input_perturbation is not None:
        pairs = input_perturbation.perturb(
          lambda p, b: objective(p, b, reference_logps, state.loss_state, k_loss, k_drop, state.frozen), params, pairs
        )
      return objective(params, pairs, reference_logps, state.loss_state, k_loss, k_drop, state.frozen)

    return perturbation.value_and_grad(obj, state.params, pstate, k_pert, (batch, reference_logps))

  def step(state: TrainState, batch, rng):
    k_loss, k_pert = jax.random.split(rng)
    k_drop = jax.random.fold_in(rng, _DROPOUT_STREAM)  # its own stream: the other keys are unchanged
    if grad_accum_steps == 1:
      (loss_value, aux), grads, pstate = one_batch(state, batch, state.perturbation_state, k_loss, k_pert, k_drop)
    else:
      # `batch` holds grad_accum_steps micro-batches stacked on a leading axis (built host-side,
      # each with its own layout: see `stack_microbatches`).
      n = grad_accum_steps

      def body(carry, mb_and_index):
        g_acc, pstate = carry
        mb, i = mb_and_index
        (l, a), g, pstate = one_batch(state, mb, pstate, k_loss, k_pert, jax.random.fold_in(k_drop, i))
        return (jax.tree.map(jnp.add, g_acc, g), pstate), (l, a)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, pstate), (ls, auxs) = jax.lax.scan(body, (zeros, state.perturbation_state), (batch, jnp.arange(n)))
      grads = jax.tree.map(lambda g: g / n, grads)
      loss_value = jnp.mean(ls)
      aux = {
        k: (jax.tree.map(lambda x: x[-1], v) if k == "loss_state" else v.reshape((-1,) + v.shape[2:]))
        for k, v in auxs.items()
      }

    new_step = state.step + 1
    new_loss_state = aux["loss_state"] if stateful else state.loss_state
    grad_norm = optax.global_norm(grads)

    def apply_update(state):
      params, opt_state = optimizers.apply_update(optimizer, grads, state.opt_state, state.params)
      return state.replace(
        params=params,
        opt_state=opt_state,
        ref_state=reference.update(state.ref_state, params, new_step),
        perturbation_state=pstate,
        loss_state=new_loss_state,
        step=new_step,
      )

    lr_w, lr_l, m = aux["lr_w"], aux["lr_l"], aux["mask"]
    mean = lambda x: jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)  # over real pairs
    metrics = {
      "loss": loss_value,
      "rewards/chosen": beta * mean(lr_w),
      "rewards/rejected": beta * mean(lr_l),
      "rewards/margins": beta * mean(lr_w - lr_l),
      "rewards/accuracy": mean((lr_w > lr_l).astype(jnp.float32)),
      "logps/chosen": mean(aux["logps_chosen"]),
      "logps/rejected": mean(aux["logps_rejected"]),
      "grad_norm": grad_norm,
      "learning_rate": (
        jnp.asarray(learning_rate_fn(state.step), jnp.float32) if learning_rate_fn is not None else jnp.float32(jnp.nan)
      ),
    }
    if gradient_field:
      fc, fr, lpr = aux["field_chosen"], aux["field_rejected"], aux["field_log_prob_ratio"]
      finite = (m > 0) & jnp.isfinite(lpr)
      metrics["gradient_field/chosen"] = mean(fc)
      metrics["gradient_field/rejected"] = mean(fr)
      metrics["gradient_field/ratio"] = mean(jnp.abs(fc)) / mean(jnp.abs(fr))
      metrics["gradient_field/log_prob_ratio"] = jnp.sum(jnp.where(finite, lpr, 0.0)) / jnp.maximum(jnp.sum(finite), 1)
    if not guard_nonfinite:
      return apply_update(state), metrics
    # A non-finite loss or gradient leaves the state as it was (the step counter still moves),
    # so parameters, and therefore checkpoints, never hold NaN/inf. The caller sees
    # metrics["nonfinite"] and decides to skip on or to halt. The global norm is finite exactly
    # when every gradient entry is, unless its sum of squares overflows float32: only then are
    # the leaves checked one by one. The update runs under `lax.cond`, so a finite step costs one
    # scalar test instead of an extra pass over the gradients and a select over the whole state.
    grads_finite = jax.lax.cond(
      jnp.isfinite(grad_norm),
      lambda: jnp.bool_(True),
      lambda: jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])),
    )
    finite = jnp.isfinite(loss_value) & grads_finite
    new_state = jax.lax.cond(finite, apply_update, lambda state: state.replace(step=new_step), state)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  if not jit:
    return step
  if combine is None or not donate:
    return jax.jit(step, donate_argnums=(0,) if donate else ())

  # With a frozen part (LoRA's base) the state is donated without it: the base is an input the
  # step only reads, so it keeps its buffers (the caller's, shared by the state) from step to step.
  def without_frozen(rest, frozen, batch, rng):
    new, metrics = step(rest.replace(frozen=frozen), batch, rng)
    return new.replace(frozen=()), metrics

  jitted = jax.jit(without_frozen, donate_argnums=(0,))

  def run(state: TrainState, batch, rng):
    new, metrics = jitted(state.replace(frozen=()), state.frozen, batch, rng)
    return new.replace(frozen=state.frozen), metrics

  return run
