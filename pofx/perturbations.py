"""Weight and input perturbations: how the gradient used by the optimizer is computed.

A `Perturbation` is a record of pure functions:

    init(params) -> pstate
    value_and_grad(objective, params, pstate, rng, batch) -> ((loss, aux), grads, pstate)

with `objective(params, batch) -> (loss, aux)`. The batch is passed through (not closed over)
so that m-sharpness can split it into shards (every leaf along axis 0). The train step passes
`(batch, reference_logps)` as the batch: the reference log-probs are computed once per step,
outside the perturbation, and split with the pairs.

  none()                       plain `jax.value_and_grad`.
  sam(rho, adaptive, m)        SAM (Foret et al. 2021, arXiv:2010.01412, Eq. 2 with p = 2):
                               v = rho g / ||g||, gradient taken at theta + v, applied at theta.
                               adaptive=True is ASAM (Kwon et al. 2021, arXiv:2102.11600, as the
                               authors' asam.py): v = rho T^2 g / (||T g|| + 1e-16), T = |theta| +
                               eta on every leaf but biases (T = 1 there). m: m-sharpness, one
                               ascent per subset of m examples, the subsets' SAM gradients averaged.
  awp(gamma)                   AWP (Wu et al. 2020, arXiv:2004.05884, Eq. 8-9, authors' code): one
                               ascent step; per weight matrix v_l = gamma ||theta_l|| g_l / ||g_l||
                               (matrices only: ndim > 1; vectors unperturbed).

  rwp(gamma, c_min, steps)     RWP (Yu et al. 2022, "Robust Weight Perturbation for Adversarial
                               Training", IJCAI, arXiv:2205.14826; as the authors' code
                               `utils_rwp.py` computes it): `steps` proxy ascent steps on the examples that
                               satisfy the loss-stationary condition l_i < c_min, accumulated and
                               scaled to one global radius gamma ||theta||. The objective's aux
                               must carry the per-pair losses (`aux["per_pair"]`, as
                               `pofx.train`'s does); c_min has no default (see `rwp`).
  saf(N, lam, ...)             SAF (Du et al. 2022, arXiv:2205.14083, the authors' SAF_train.py):
                               the gradient of L + lam T^2 KL(past outputs || outputs), the past
                               outputs those of minus_epochs epochs ago, kept in pstate.
  mesa(N, lam, ...)            MESA (same paper, MESA_train.py): the same term against the outputs
                               of an EMA of the weights, kept in pstate.
The loss and aux reported are those at the unperturbed parameters (for SAF and MESA, the loss
without the trajectory term).

An `InputPerturbation` (`adversarial_embeddings`: adversarial token-embedding offsets within a
radius) changes the batch before a weight perturbation evaluates the objective; `pofx.train`
composes the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Perturbation:
  name: str
  init: Callable[[Any], Any]
  value_and_grad: Callable[..., Any]


def none() -> Perturbation:
  """Plain gradient: `jax.value_and_grad(objective, has_aux=True)`."""

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
    return (loss, aux), grads, pstate

  return Perturbation("none", init=lambda p: (), value_and_grad=value_and_grad)


def _ascend_then_grad(objective, params, batch, direction):
  """Loss/aux and gradient at `params`, then the gradient at `params + direction(grads, params)`."""
  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
  perturbed = jax.tree.map(lambda p, d: p + d, params, direction(grads, params))
  return (loss, aux), jax.grad(lambda p: objective(p, batch)[0])(perturbed)


def _leaf_name(path) -> str:
  """The last key of a pytree path (a dict key, attribute or index), as a string."""
  if not path:
    return ""
  last = path[-1]
  for attr in ("key", "name", "idx"):
    if hasattr(last, attr):
      return str(getattr(last, attr))
  return str(last)


def asam_scaled(path) -> bool:
  """Whether ASAM scales a parameter by `T = |theta| + eta`: every leaf except those named `bias`.

  The authors' code (`asam.py`, `ASAM.ascent_step`) scales the PyTorch parameters whose name
  contains `weight` (linear and convolution weights, embeddings, normalisation scales) and leaves
  biases unscaled; pofx's leaf names for those weights are `kernel`, `embedding`, `scale` (and
  `lm_head`), and `bias` for biases.
  """
  return _leaf_name(path) != "bias"


def _sam_direction(grads, params, rho, adaptive, eta):
  if adaptive:
    # ASAM as the authors' asam.py computes it: T g on the scaled leaves (g elsewhere), one global
    # norm plus 1e-16, then v = rho T (T g) / norm.
    t = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.abs(p) + eta if asam_scaled(path) else jnp.ones_like(p), params
    )
    tg = jax.tree.map(lambda ti, g: ti * g, t, grads)
    norm = optax.global_norm(tg) + 1e-16
    return jax.tree.map(lambda ti, x: rho * ti * x / norm, t, tg)
  norm = optax.global_norm(grads)
  return jax.tree.map(lambda g: rho * g / (norm + 1e-12), grads)


def _holds_pair_batch(batch) -> bool:
  """Whether `batch` holds a `pofx.batching.PairBatch` (its row indices span the whole batch)."""
  leaves = jax.tree.leaves(batch, is_leaf=lambda x: hasattr(x, "chosen_index"))
  return any(hasattr(x, "chosen_index") for x in leaves)


def sam(rho: float = 0.05, *, adaptive: bool = False, eta: float = 0.01, m: Optional[int] = None) -> Perturbation:
  """Sharpness-aware minimisation; `sam(rho=0)` equals `none()` exactly.

  SAM (Foret et al. 2021, arXiv:2010.01412, Eq. 2 with p = 2): `v = rho g / ||g||` with
  `g = grad L(theta)`; the gradient is taken at `theta + v` and applied at `theta`.

  ASAM (`adaptive=True`; Kwon et al. 2021, arXiv:2102.11600, Eq. 11 with the operator
  `T_theta = |theta| + eta`), exactly as the authors' code computes it (SamsungLabs/ASAM,
  `asam.py`, `ASAM.ascent_step`): with `T = |theta| + eta` on the scaled leaves (every leaf
  except biases, see `asam_scaled`) and `T = 1` on biases,

      v = rho T^2 g / (||T g|| + 1e-16)       (one norm over all leaves)

  Defaults rho 0.5 and eta 0.01 are that class's defaults (`ASAM(rho=0.5, eta=0.01)`; the
  example script's `--eta` flag defaults to 0).

  m-sharpness (Foret et al. Sec. 4.1): the batch is divided into disjoint subsets of `m` examples,
  one ascent per subset, and the subsets' SAM gradients are averaged. `m` is the number of
  examples per ascent (Foret's m, e.g. the per-accelerator batch); None: one ascent for the whole
  batch. Every leaf of the batch is split along axis 0, so `m` must divide its size; a batch that
  holds a `PairBatch` (whose row indices span the batch) is refused: in the train step use
  `grad_accum_steps = B / m` (one ascent per micro-batch, which is what the program does for
  `train.perturbation.m`).

  Args:
    rho: neighbourhood radius (SAM default 0.05; ASAM uses larger ones, 0.5 or 1.0 in the authors'
      README).
    adaptive: ASAM's scale-invariant neighbourhood.
    eta: ASAM's offset in `T = |theta| + eta` (0.01, the authors' class default).
    m: examples per ascent (m-sharpness), or None.
  """
  if float(rho) < 0:
    raise ValueError(f"perturbations.sam: invalid rho={rho!r}; allowed: rho >= 0.")
  if m is not None and (isinstance(m, bool) or int(m) != m or int(m) < 1):
    raise ValueError(f"perturbations.sam: invalid m={m!r}; allowed: None (whole batch) or an integer >= 1.")

  def one(objective, params, batch):
    return _ascend_then_grad(objective, params, batch, lambda g, p: _sam_direction(g, p, rho, adaptive, eta))

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng
    if m is None:
      out, grads = one(objective, params, batch)
      return out, grads, pstate
    if _holds_pair_batch(batch):
      raise ValueError(
        f"perturbations.sam: m={m} cannot split a batch that holds a PairBatch (its row indices span "
        "the batch); use make_train_step(grad_accum_steps=B // m) with sam(m=None): one ascent per "
        "micro-batch of m pairs."
      )
    # m-sharpness: subsets of m examples; the reported loss/aux are those of the whole batch.
    leading = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(leading) != 1 or next(iter(leading)) % m:
      raise ValueError(f"perturbations.sam: m={m} examples per ascent must divide the batch size {sorted(leading)}.")
    n = next(iter(leading)) // m
    shards = jax.tree.map(lambda x: x.reshape((n, m) + x.shape[1:]), batch)
    (_, _), shard_grads = jax.lax.map(lambda b: one(objective, params, b), shards)
    grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), shard_grads)
    loss, aux = objective(params, batch)
    return (loss, aux), grads, pstate

  return Perturbation("asam" if adaptive else "sam", init=lambda p: (), value_and_grad=value_and_grad)


def awp_direction(grads, params, gamma):
  """AWP's layer-wise perturbation: `gamma ||theta_l|| g_l / ||g_l||` for ndim > 1, else 0."""

  def leaf(p, g):
    if p.ndim <= 1:
      return jnp.zeros_like(p)
    return gamma * jnp.linalg.norm(p) * g / (jnp.linalg.norm(g) + 1e-20)

  return jax.tree.map(leaf, params, grads)


def awp(gamma: float = 0.01) -> Perturbation:
  """Adversarial weight perturbation; `awp(gamma=0)` equals `none()` exactly.

  One ascent step on the loss (the proxy SGD step of the authors' code, whose learning rate
  cancels after the per-layer normalisation), `v_l = gamma ||theta_l|| d_l / ||d_l||` with
  d_l the ascent direction of weight matrix l; the gradient is taken at theta + v and applied
  at theta. Default gamma 0.01 (authors' AT setting).
  """
  if float(gamma) < 0:
    raise ValueError(f"perturbations.awp: invalid gamma={gamma!r}; allowed: gamma >= 0.")

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng
    out, grads = _ascend_then_grad(objective, params, batch, lambda g, p: awp_direction(g, p, gamma))
    return out, grads, pstate

  return Perturbation("awp", init=lambda p: (), value_and_grad=value_and_grad)


def _matrices(tree):
  """`tree` with every leaf of ndim <= 1 replaced by zeros (RWP/AWP perturb weight matrices only)."""
  return jax.tree.map(lambda x: x if x.ndim > 1 else jnp.zeros_like(x), tree)


def rwp(gamma: float = 0.01, *, c_min: float, steps: int = 10, proxy_lr: float = 0.01) -> Perturbation:
  """Robust weight perturbation with the loss-stationary condition; `rwp(gamma=0)` equals `none()`.

  Yu et al. 2022 (arXiv:2205.14826), as their code computes it (`RobustWeightPerturb.calc_awp`).
  With W the weight matrices (ndim > 1; vectors are never perturbed), D = 0 and v = 0, repeat
  `steps` times:

      m_i  = 1[l_i(theta + gamma v) < c_min]                 (loss-stationary condition, LSC)
      D   += proxy_lr * grad_W mean_i(m_i l_i)(theta + gamma v)   (one SGD ascent step of a proxy)
      v    = (||theta_W|| / (||D|| + 1e-20)) D              (one norm over all matrices together)

  then the gradient of the objective is taken at theta + gamma v and applied at theta. The mean
  runs over every real pair (masked ones count as zero), as the code's `loss.mul(Indicator).mean()`;
  pairs with `aux["mask"] == 0` (padding) are left out. Only pairs whose loss is still below
  c_min drive the perturbation, so already-violated pairs do not push the weights further.
  `proxy_lr` cancels in the normalisation (it only scales D against the 1e-20). Cost: `steps`
  forward-backward passes plus the main one.

  Args:
    gamma: relative radius (the authors' `--awp-gamma`, default 0.01).
    c_min: the LSC threshold on the per-pair loss. Required: the paper's 1.7 is for per-example
      cross-entropy on CIFAR. For the logistic (DPO) loss, log 2 ~ 0.693 is the loss at zero
      margin (a value for preference losses has not been established; tune it).
    steps: proxy ascent steps (10, hard-coded in the authors' code).
    proxy_lr: the proxy SGD learning rate (0.01 in the code).
  """
  if float(gamma) < 0:
    raise ValueError(f"perturbations.rwp: invalid gamma={gamma!r}; allowed: gamma >= 0.")
  if int(steps) < 1 or int(steps) != steps:
    raise ValueError(f"perturbations.rwp: invalid steps={steps!r}; allowed: integer >= 1.")
  if not float(proxy_lr) > 0:
    raise ValueError(f"perturbations.rwp: invalid proxy_lr={proxy_lr!r}; allowed: proxy_lr > 0.")
  c_min, steps = float(c_min), int(steps)

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng

    def lsc_loss(p):
      loss, aux = objective(p, batch)
      if not isinstance(aux, dict) or "per_pair" not in aux:
        raise ValueError(
          "perturbations.rwp needs the per-pair losses: the objective's aux must be a dict with "
          "'per_pair' [B] (pofx.train's objective provides it)."
        )
      per_pair = aux["per_pair"]
      real = jnp.asarray(aux.get("mask", jnp.ones_like(per_pair)), per_pair.dtype)
      lsc = jax.lax.stop_gradient((per_pair < c_min).astype(per_pair.dtype))
      return jnp.sum(real * lsc * per_pair) / jnp.maximum(jnp.sum(real), 1.0), (loss, aux)

    theta_norm = optax.global_norm(_matrices(params))

    def scaled(d):
      return jax.tree.map(lambda x: x * (theta_norm / (optax.global_norm(d) + 1e-20)), d)

    ascent = jax.grad(lsc_loss, has_aux=True)
    g, (loss, aux) = ascent(params)  # the first proxy sits at theta: the reported loss and aux
    diff = jax.tree.map(lambda x: proxy_lr * x, _matrices(g))

    def body(_, diff):
      g, _ = ascent(jax.tree.map(lambda p, v: p + gamma * v, params, scaled(diff)))
      return jax.tree.map(lambda d, x: d + proxy_lr * x, diff, _matrices(g))

    diff = jax.lax.fori_loop(1, steps, body, diff)
    perturbed = jax.tree.map(lambda p, v: p + gamma * v, params, scaled(diff))
    grads = jax.grad(lambda p: objective(p, batch)[0])(perturbed)
    return (loss, aux), grads, pstate

  return Perturbation("rwp", init=lambda p: (), value_and_grad=value_and_grad)


# Trajectory losses: SAF and MESA (Du et al. 2022, arXiv:2205.14083) --------------------------------


def pair_outputs(aux) -> jax.Array:
  """The per-pair outputs the trajectory losses compare: `[B, 2]` policy log-probs
  `(log pi(y_w|x), log pi(y_l|x))` from the objective's aux (`pofx.train`'s objective provides
  `logps_chosen`, `logps_rejected`)."""
  if not isinstance(aux, dict) or "logps_chosen" not in aux or "logps_rejected" not in aux:
    raise ValueError(
      "perturbations.saf / mesa need the policy's log-probs: the objective's aux must be a dict with "
      "'logps_chosen' and 'logps_rejected' [B] (pofx.train's objective provides them)."
    )
  return jnp.stack([aux["logps_chosen"], aux["logps_rejected"]], axis=-1).astype(jnp.float32)


def trajectory_kl(past, current, temperature: float) -> jax.Array:
  """`[B]` `T^2 KL(softmax(past / T) || softmax(current / T))` over the last axis.

  The trajectory loss of SAF and MESA (Du et al. 2022, arXiv:2205.14083; the authors'
  `SAF_train.py`: `F.kl_div(log_softmax(z / T), softmax(z_past / T)).sum(-1) * T**2`); `past`
  is treated as a constant.
  """
  t = float(temperature)
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(past) / t, axis=-1)
  log_q = jax.nn.log_softmax(current / t, axis=-1)
  return t * t * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _real_and_ids(aux, num_examples):
  if "example_id" not in aux:
    raise ValueError(
      "perturbations.saf needs the pairs' example ids: the batch must hold 'example_id' [B] "
      "(pofx.data's loader provides it; pofx.train puts it in the objective's aux)."
    )
  ids = jnp.asarray(aux["example_id"], jnp.int32)
  real = (jnp.asarray(aux.get("mask", jnp.ones(ids.shape)), jnp.float32) > 0) & (ids >= 0) & (ids < num_examples)
  return real, ids


def _check_trajectory_args(name, lam, temperature, start_epoch, end_epoch, num_examples):
  if not float(lam) >= 0:
    raise ValueError(f"perturbations.{name}: invalid lam={lam!r}; allowed: lam >= 0.")
  if not float(temperature) > 0:
    raise ValueError(f"perturbations.{name}: invalid temperature={temperature!r}; allowed: temperature > 0.")
  if int(num_examples) != num_examples or int(num_examples) < 1:
    raise ValueError(f"perturbations.{name}: invalid num_examples={num_examples!r}; allowed: integer >= 1.")
  if int(start_epoch) != start_epoch or (end_epoch is not None and int(end_epoch) != end_epoch):
    raise ValueError(
      f"perturbations.{name}: start_epoch={start_epoch!r}, end_epoch={end_epoch!r}; allowed: integers (end None: no end)."
    )


def _active(epoch, start_epoch, end_epoch):
  """The authors' window `start_epoch < epoch < end_epoch` (end None: no end)."""
  on = epoch > start_epoch
  return on if end_epoch is None else on & (epoch < end_epoch)


def saf(
  num_examples: int,
  *,
  lam: float = 0.3,
  temperature: float = 5.0,
  minus_epochs: int = 3,
  start_epoch: int = 5,
  end_epoch: Optional[int] = None,
) -> Perturbation:
  """SAF, sharpness-aware training for free (Du et al. 2022, arXiv:2205.14083, the trajectory loss;
  as the authors' `SAF_train.py` computes it). `saf(..., lam=0)` equals `none()`.

  The trajectory loss penalises how far each example's outputs moved since `minus_epochs`
  (E~) epochs ago. A memory holds every example's outputs of the last E~ + 1 epochs; at epoch e
  (counted from the real pairs seen: e = seen // num_examples), for a batch B,

      L = L_pref + lam 1[start < e < end] (1/|B|) sum_{i in B} T^2 KL(softmax(z_i^{e - E~} / T) || softmax(z_i / T))

  and z_i (this step's outputs, stop_gradient) is written to the memory slot e mod (E~ + 1)
  (the reference is read from slot (e - E~) mod (E~ + 1); never-written slots hold zeros, a
  uniform distribution, as the code's zero-initialised array). The gradient is that of L; the
  loss and aux reported are the preference objective's.

  Outputs for preference pairs: the paper's z are a classifier's logits; here z_i is the pair's
  two policy log-probs `(log pi(y_w|x), log pi(y_l|x))` (`pair_outputs`), so the KL is between
  the two-way softmaxes of the pair, a function of the log-prob margin (an adaptation: the
  paper has no preference-pair form). Pairs are identified by `aux["example_id"]` in
  [0, num_examples) (`pofx.train` copies `batch["example_id"]`; padding pairs, id -1 or
  mask 0, are neither read nor written).

  Args:
    num_examples: N, the training set's size (memory `[N, E~ + 1, 2]` float32 in the state).
    lam: the coefficient lambda (`--reinforce`; 0.3 in the authors' ImageNet SAF command).
    temperature: T (`--temperature`, 5).
    minus_epochs: E~ >= 1 (`--minus_epoch`; 3 by the code's default, 2 in its run.sh).
    start_epoch: the term is on for epochs > start_epoch (`--kl_start_epoch`, 5).
    end_epoch: ... and < end_epoch (`--kl_end_epoch`, 300 in the code; None: no end).
  """
  _check_trajectory_args("saf", lam, temperature, start_epoch, end_epoch, num_examples)
  if int(minus_epochs) != minus_epochs or int(minus_epochs) < 1:
    raise ValueError(f"perturbations.saf: invalid minus_epochs={minus_epochs!r}; allowed: integer >= 1.")
  n, slots, lam, temperature = int(num_examples), int(minus_epochs) + 1, float(lam), float(temperature)

  def init(params):
    del params
    return {"memory": jnp.zeros((n, slots, 2), jnp.float32), "seen": jnp.zeros((), jnp.int32)}

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng
    memory, seen = pstate["memory"], pstate["seen"]
    epoch = seen // n

    def total(p):
      loss, aux = objective(p, batch)
      out = pair_outputs(aux)
      real, ids = _real_and_ids(aux, n)
      past = memory[jnp.clip(ids, 0, n - 1), (epoch - (slots - 1)) % slots]
      kl = trajectory_kl(past, out, temperature)
      term = jnp.sum(jnp.where(real, kl, 0.0)) / jnp.maximum(jnp.sum(real), 1)
      value = loss + lam * jnp.where(_active(epoch, start_epoch, end_epoch), term, 0.0)
      return value, (loss, aux, out, real, ids)

    (_, (loss, aux, out, real, ids)), grads = jax.value_and_grad(total, has_aux=True)(params)
    memory = memory.at[jnp.where(real, ids, n), epoch % slots].set(jax.lax.stop_gradient(out), mode="drop")
    return (loss, aux), grads, {"memory": memory, "seen": seen + jnp.sum(real).astype(jnp.int32)}

  return Perturbation("saf", init=init, value_and_grad=value_and_grad)


def mesa(
  num_examples: int,
  *,
  lam: float = 0.8,
  temperature: float = 5.0,
  decay: float = 0.9998,
  start_epoch: int = 5,
  end_epoch: Optional[int] = None,
) -> Perturbation:
  """MESA, memory-efficient sharpness-aware training (Du et al. 2022, arXiv:2205.14083; as the
  authors' `MESA_train.py` computes it). `mesa(..., lam=0)` equals `none()` in its gradient.

  SAF's trajectory loss with an exponential moving average of the weights in place of the
  memory of past outputs: the state holds `theta_ema`; each call first moves it,

      theta_ema <- decay theta_ema + (1 - decay) theta        (timm's ModelEmaV2, decay 0.9998)

  (the state starts at the initial weights, so the first call leaves it there: the code's order,
  which updates the EMA after each optimizer step and reads it at the next), then

      L = L_pref + lam 1[start < e < end] (1/|B|) sum_i T^2 KL(softmax(z_i^ema / T) || softmax(z_i / T))

  with z^ema the outputs of the EMA weights on the same batch (one extra forward, no gradient).
  Outputs are the pair log-probs as in `saf` (an adaptation); e = seen // num_examples counts
  epochs from the real pairs seen. One EMA update per call: with gradient accumulation it
  would move once per micro-batch (the program refuses that combination).

  Args:
    num_examples: N, the training set's size (for the epoch count only).
    lam: lambda (`--reinforce`; 0.8 in the authors' MESA command, 0.3 the script default).
    temperature: T (5).
    decay: the EMA decay (`--model-ema-decay`, 0.9998).
    start_epoch, end_epoch: the term is on for start_epoch < e < end_epoch (5; None: no end).
  """
  _check_trajectory_args("mesa", lam, temperature, start_epoch, end_epoch, num_examples)
  if not 0.0 <= float(decay) <= 1.0:
    raise ValueError(f"perturbations.mesa: invalid decay={decay!r}; allowed: 0 <= decay <= 1.")
  n, lam, temperature, decay = int(num_examples), float(lam), float(temperature), float(decay)

  def init(params):
    return {"ema": jax.tree.map(jnp.copy, params), "seen": jnp.zeros((), jnp.int32)}

  def value_and_grad(objective, params, pstate, rng, batch):
    del rng
    ema = jax.tree.map(
      lambda e, p: (decay * e + (1.0 - decay) * jax.lax.stop_gradient(p)).astype(e.dtype), pstate["ema"], params
    )
    epoch = pstate["seen"] // n
    ema_out = jax.lax.stop_gradient(pair_outputs(objective(ema, batch)[1]))

    def total(p):
      loss, aux = objective(p, batch)
      real = jnp.asarray(aux.get("mask", jnp.ones(ema_out.shape[:1])), jnp.float32) > 0
      kl = trajectory_kl(ema_out, pair_outputs(aux), temperature)
      term = jnp.sum(jnp.where(real, kl, 0.0)) / jnp.maximum(jnp.sum(real), 1)
      return loss + lam * jnp.where(_active(epoch, start_epoch, end_epoch), term, 0.0), (loss, aux, real)

    (_, (loss, aux, real)), grads = jax.value_and_grad(total, has_aux=True)(params)
    return (loss, aux), grads, {"ema": ema, "seen": pstate["seen"] + jnp.sum(real).astype(jnp.int32)}

  return Perturbation("mesa", init=init, value_and_grad=value_and_grad)


# Input-embedding perturbations ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputPerturbation:
  """A perturbation of the model's inputs, applied before any weight perturbation sees the objective.

  `perturb(objective, params, batch) -> batch'` returns the batch the objective is evaluated on
  (e.g. with `batch["embedding_offset"]`, which `pofx.policy.make_logps_fn` hands to the model).
  `pofx.train.make_train_step(input_perturbation=...)` wraps the objective with it, so a weight
  perturbation (SAM, AWP, ...) differentiates the perturbed-input loss and the input perturbation
  is recomputed at every weights it is evaluated at.
  """

  name: str
  perturb: Callable[..., Any]


def adversarial_embeddings(radius: float, hidden_size: int) -> InputPerturbation:
  """Adversarial token-embedding perturbation within a radius; `radius=0` leaves the batch's loss unchanged.

  One ascent step on the loss with respect to an offset added to the token embeddings (the fast
  gradient method on embeddings of Miyato et al. 2017, arXiv:1605.07725: r_adv =
  eps g / ||g||_2, g the loss gradient at zero offset), with the norm taken per token:

      delta_t = radius * g_t / ||g_t||_2      (every real token t: segment_ids > 0; 0 on padding)

  so that each token's embedding moves by at most `radius` whatever the row layout; the
  objective is then evaluated at embeddings + delta (the min-max form: minimise the preference
  loss at the worst-case embeddings of the radius, in the spirit of TARS, Zhang et al. 2025,
  arXiv:2507.21584, which perturbs selected token representations adversarially; pofx perturbs
  every real token). delta is a constant of the outer gradient (stop_gradient). Cost: one more
  forward-backward pass.

  Args:
    radius: the largest L2 norm of a token's embedding offset (>= 0).
    hidden_size: the model width D (the offset is `[R, L, D]`).
  """
  if not float(radius) >= 0:
    raise ValueError(f"perturbations.adversarial_embeddings: invalid radius={radius!r}; allowed: radius >= 0.")
  if int(hidden_size) != hidden_size or int(hidden_size) < 1:
    raise ValueError(
      f"perturbations.adversarial_embeddings: invalid hidden_size={hidden_size!r}; allowed: integer >= 1."
    )
  radius, hidden_size = float(radius), int(hidden_size)

  def perturb(objective, params, batch):
    pairs = batch["pairs"]
    rows, length = pairs.tokens.shape
    zero = jnp.zeros((rows, length, hidden_size), jnp.float32)
    # delta is a constant of the outer gradient: its inner gradient sees the weights as constants,
    # so nothing differentiates a backward pass (kernels with a custom VJP have no second order).
    fixed = jax.lax.stop_gradient(params)
    g = jax.grad(lambda d: objective(fixed, {**batch, "embedding_offset": d})[0])(zero)
    real = (jnp.asarray(pairs.segment_ids) > 0)[..., None]
    g = jnp.where(real, g, 0.0)
    norm = jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True))
    delta = jnp.where(norm > 0, radius * g / jnp.where(norm > 0, norm, 1.0), 0.0)
    return {**batch, "embedding_offset": jax.lax.stop_gradient(delta)}

  return InputPerturbation("adversarial_embeddings", perturb=perturb)
