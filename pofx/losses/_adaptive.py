r"""Adaptive losses with explicit state: beta-DPO (batch-adaptive beta) and gamma-PO (per-pair margins).

Both carry statistics across steps. The state is a pytree passed in and returned, never held:

    state = spec.init_state()                                   # or beta_dpo_init_state()
    losses, state = beta_dpo(policy, reference, state=state, key=key)

Both are random (beta-DPO's filter, gamma-PO's pool sample) and take a `key`; given the key and
the state they are deterministic.

Data parallelism. beta-DPO's statistics are over the *global* batch (the authors all-gather the
margins). All batch-wide reductions of beta-DPO go through one function,
`beta_dpo_batch_statistics(gaps, axis_name=None)`: pass `axis_name` when the loss runs inside
`shard_map`/`pmap`/`vmap` over a named batch axis and it all-gathers the gaps over that axis, so
every device sees the same statistics and the same kept set (the key must be replicated).
gamma-PO's pool is per device in the authors' code (no all-gather), and is per call here too.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pofx import gpo as gpo_fns
from pofx._pair_logps import PairLogps
from pofx.losses import _common
from pofx.losses._registry import LossSpec

Array = jax.Array

_BETA_DPO_SOURCE = (
  "Wu et al. 2024, beta-DPO, arXiv:2407.08639; code junkangwu/beta-DPO "
  "trainers.py::preference_loss + update_and_sync_tensor_mean"
)
_GAMMA_PO_SOURCE = (
  "Sun et al. 2025, gamma-PO, arXiv:2506.03690 (ACL 2025); code sunjie279/gammaPO "
  "scripts/simpo_trainer.py::get_gamma_dq, scripts/xpo_trainer.py"
)

# -------------------------------------------------------------------------------------------------
# beta-DPO
# -------------------------------------------------------------------------------------------------


class BetaDpoState(NamedTuple):
  """Running statistics of the (unscaled) DPO margin: EMA mean `M0` and EMA std `sigma0` (scalars)."""

  gap_mean: Array
  gap_std: Array


def beta_dpo_init_state(**unused_hyper) -> BetaDpoState:
  """Zero-initialised statistics, as the authors' trainer (`torch.zeros(1)` for both)."""
  del unused_hyper
  return BetaDpoState(gap_mean=jnp.zeros((), jnp.float32), gap_std=jnp.zeros((), jnp.float32))


def beta_dpo_batch_statistics(gaps: Array, *, axis_name: Optional[str] = None):
  r"""**The** batch-wide reduction of beta-DPO: the global gaps, their mean and their std.

  Args:
    gaps: `[B]` local margins (already detached).
    axis_name: None for a single-device batch. Inside `shard_map`/`pmap`/`vmap` over a named
      batch axis, the name of that axis: the gaps are all-gathered (`jax.lax.all_gather`,
      tiled, in device order) so the statistics, the filter and beta are global, as in the
      authors' code (`all_gather_if_needed`).

  Returns:
    `(all_gaps [B_global], mean, std)`, std with Bessel's correction (`torch.Tensor.std`'s
    default), and 0 for a global batch of one pair (where torch would return NaN).
  """
  all_gaps = gaps if axis_name is None else jax.lax.all_gather(gaps, axis_name, tiled=True)
  n = all_gaps.shape[0]
  mean = jnp.mean(all_gaps)
  std = jnp.std(all_gaps, ddof=1) if n > 1 else jnp.zeros((), all_gaps.dtype)
  return all_gaps, mean, std


def _gumbel_top_k_mask(key, log_weights: Array, k: int) -> Array:
  """0/1 mask of k indices drawn without replacement with probabilities proportional to exp(log_weights).

  Gumbel-top-k is exactly sequential sampling without replacement (`torch.multinomial(...,
  replacement=False)`), with a static k, so it jits.
  """
  n = log_weights.shape[0]
  if k >= n:
    return jnp.ones((n,), jnp.float32)
  scores = log_weights + jax.random.gumbel(key, (n,), jnp.float32)
  _, idx = jax.lax.top_k(scores, k)
  return jnp.zeros((n,), jnp.float32).at[idx].set(1.0)


def beta_dpo(
  policy: PairLogps,
  reference: PairLogps,
  *,
  beta: float = 0.1,
  a: float = 0.6,
  filter_ratio: float = 0.2,
  momentum: float = 0.9,
  state: BetaDpoState,
  key: Array,
  axis_name: Optional[str] = None,
):
  r"""beta-DPO: DPO with a batch-adaptive, detached beta and Gaussian data filtering.

  With `M_i = rho_i` (the **unscaled** margin `(pi_w - ref_w) - (pi_l - ref_l)`, detached, over
  the global batch of n pairs), one call does what the authors' trainer does per step:

    1. statistics first (EMA from the zero init, momentum m = 0.9):
       `M0 <- m M0 + (1 - m) mean(M)`,  `sigma0 <- m sigma0 + (1 - m) std(M)`;
    2. filter: draw `k = floor((1 - filter_ratio) n)` pairs without replacement with
       probabilities `p_i ∝ exp(-(M_i - M0)^2 / (2 sigma0^2))` (by Gumbel-top-k with `key`);
    3. `beta_used = sg(max(beta (1 + a (mean_{kept} M - M0)), 1e-3))`;
    4. `l_i = -log sigmoid(beta_used * rho_i)`.

  The authors' loss is the **masked mean over the kept pairs**. To keep the `[B]`-per-pair
  contract, pofx returns `l_i * keep_i * n / k`, so the plain mean over the batch (what
  `batch_loss` takes) is exactly that masked mean; dropped pairs return 0. (Under data
  parallelism the normaliser is the global kept count; the authors' code normalises each
  device's slice by its local kept count before DDP averages.)

  Reduces to DPO for `a = 0` and `filter_ratio = 0` (then `beta_used = beta`, all kept).

  Deviations from the code, for robustness only: `k >= 1` (the code would fail with k = 0), and
  sigma0 is floored at 1e-12 inside the filter (the code divides by sigma0 = 0 when a batch
  has identical margins at the first step).

  Args:
    policy, reference: `PairLogps` (summed log-probs; the reference is required).
    beta: base beta0 (> 0).
    a: the scaling factor of the beta update (README example 0.6; the yaml default is 0.0).
    filter_ratio: fraction of the batch dropped by the filter, in [0, 1) (`mode_weight`, 0.2).
    momentum: EMA momentum of the statistics in [0, 1] (hard-coded 0.9 in the code).
    state: `BetaDpoState` from `beta_dpo_init_state()` or the previous call.
    key: PRNG key for the filter (replicated across devices when `axis_name` is given).
    axis_name: name of the mapped batch axis for global statistics; see
      `beta_dpo_batch_statistics`.

  Returns:
    `(losses [B], new_state)`.

  References: Wu et al. 2024, "beta-DPO: Direct Preference Optimization with Dynamic beta",
  NeurIPS 2024, arXiv:2407.08639; code junkangwu/beta-DPO `trainers.py::preference_loss`
  (mode_loss="beta_DPO") and `update_and_sync_tensor_mean`.
  """
  name = "beta_dpo"
  _common.check_inputs(name, policy, reference, need_reference=True)
  _common.check_beta(name, beta)
  _common.check_range(name, "a", a)
  _common.check_range(name, "filter_ratio", filter_ratio, low=0.0, high=1.0, high_open=True)
  _common.check_range(name, "momentum", momentum, low=0.0, high=1.0)
  rho = jnp.asarray(_common.margins(policy, reference), jnp.float32)
  local_b = rho.shape[0]

  all_gaps, batch_mean, batch_std = beta_dpo_batch_statistics(jax.lax.stop_gradient(rho), axis_name=axis_name)
  gap_mean = momentum * jnp.asarray(state.gap_mean, jnp.float32) + (1.0 - momentum) * batch_mean
  gap_std = momentum * jnp.asarray(state.gap_std, jnp.float32) + (1.0 - momentum) * batch_std

  n = all_gaps.shape[0]
  k = max(1, int(n * (1 - float(filter_ratio)))) if _common._is_static(filter_ratio) else None
  if k is None:
    raise ValueError(f"{name}: filter_ratio must be a static Python number (it sets the kept count).")
  z = (all_gaps - gap_mean) / jnp.maximum(gap_std, 1e-12)
  keep = _gumbel_top_k_mask(key, -0.5 * jnp.square(z), k)
  kept_mean = jnp.sum(keep * all_gaps) / k
  beta_used = jax.lax.stop_gradient(jnp.maximum(beta * (1.0 + a * (kept_mean - gap_mean)), 1e-3))

  if axis_name is not None:
    keep = jax.lax.dynamic_slice_in_dim(keep, jax.lax.axis_index(axis_name) * local_b, local_b)
  losses = gpo_fns.logistic(beta_used * rho) * (keep * (n / k))
  return losses, BetaDpoState(gap_mean=gap_mean, gap_std=gap_std)


# -------------------------------------------------------------------------------------------------
# gamma-PO
# -------------------------------------------------------------------------------------------------


class GammaPoState(NamedTuple):
  """FIFO pool of past reward gaps as a fixed-size ring buffer.

  Attributes:
    pool: `[P]` float32 gaps (entries at index >= count are unused).
    count: int32 number of valid entries (<= P).
    next: int32 index where the next gap is written (oldest entry once the pool is full).
  """

  pool: Array
  count: Array
  next: Array


def gamma_po_init_state(*, pool_size: int = 2048, num_init: int = 8, seed: int = 0, **unused_hyper) -> GammaPoState:
  """A pool of `pool_size` slots holding `num_init` N(0, 1) draws, as the authors' deque.

  The authors' `deque(np.random.randn(8), maxlen=2048)` is unseeded; here the draws come from
  `jax.random.key(seed)`.
  """
  del unused_hyper
  if pool_size < 1 or not 0 <= num_init <= pool_size:
    raise ValueError(
      f"gamma_po_init_state: invalid pool_size={pool_size!r}, num_init={num_init!r}; "
      "allowed: pool_size >= 1 and 0 <= num_init <= pool_size."
    )
  init = jax.random.normal(jax.random.key(seed), (num_init,), jnp.float32)
  pool = jnp.zeros((pool_size,), jnp.float32).at[:num_init].set(init)
  return GammaPoState(
    pool=pool, count=jnp.asarray(num_init, jnp.int32), next=jnp.asarray(num_init % pool_size, jnp.int32)
  )


def gamma_po_margins(gaps: Array, active: Array, *, gamma0, tau, num_steps: int = 20, eps: float = 1e-10) -> Array:
  r"""Per-gap target margins `gamma_i = gamma0 * N * p_i` by exponentiated gradient on the simplex.

  Over the N active gaps (`active` is a 0/1 mask; inactive entries get p = 0, gamma = 0), from
  uniform `p = 1/N`, repeat `num_steps` times: `gamma = gamma0 N p`;
  `grad_i = tau (1 + log(N (p_i + eps))) + gamma0 sigmoid(gamma_i - g_i)`;
  `p <- p exp(-lr grad) / sum(p exp(-lr grad))` with `lr = min(0.5 / tau, 1)`. As in the code,
  the returned gamma is the one computed at the start of the last iteration (after
  `num_steps - 1` updates). This is mirror descent on
  `(1/N) sum_i -log sigmoid(g_i - gamma0 N p_i) + tau KL(p || uniform)`. The update is done
  in log space (same map, no overflow). Mean of the active gammas is gamma0.
  """
  gaps = jnp.asarray(gaps, jnp.float32)
  active = jnp.asarray(active, jnp.float32)
  n = jnp.maximum(jnp.sum(active), 1.0)
  lr = min(0.5 / tau, 1.0) if _common._is_static(tau) else jnp.minimum(0.5 / tau, 1.0)
  log_p = jnp.where(active > 0, -jnp.log(n), -jnp.inf)

  def gamma_of(log_p):
    return gamma0 * n * jnp.exp(log_p)

  def step(log_p, _):
    p = jnp.exp(log_p)
    grad = tau * (1.0 + jnp.log(n * (p + eps))) + gamma0 * jax.nn.sigmoid(gamma_of(log_p) - gaps)
    new = jnp.where(active > 0, log_p - lr * grad, -jnp.inf)
    return new - jax.nn.logsumexp(new), None

  log_p, _ = jax.lax.scan(step, log_p, None, length=num_steps - 1)
  return jnp.where(active > 0, gamma_of(log_p), 0.0)


def _gamma_po_gaps(policy, reference, base, beta):
  if base == "simpo":
    len_w, len_l = _common.lengths(policy, "gamma_po")
    return beta * (jnp.asarray(policy.chosen, jnp.float32) / len_w - jnp.asarray(policy.rejected, jnp.float32) / len_l)
  return beta * jnp.asarray(_common.margins(policy, reference), jnp.float32)


def gamma_po(
  policy: PairLogps,
  reference: Optional[PairLogps],
  *,
  base: str = "simpo",
  beta: float = 2.0,
  gamma_beta_ratio: float = 0.25,
  tau: float = 1.0,
  opt_size: int = 256,
  num_steps: int = 20,
  state: GammaPoState,
  key: Array,
):
  r"""gamma-PO: logistic loss with per-pair target margins solved on a pool of recent gaps.

  Reward gaps: `g_i = beta (pi_w/|y_w| - pi_l/|y_l|)` (base "simpo", reference unused) or
  `g_i = beta rho_i` (base "dpo", summed log-ratios). With `gamma0 = gamma_beta_ratio * beta`:

    1. draw `min(count, opt_size - B)` past gaps from the pool uniformly without replacement
       (Gumbel-top-k with `key`) and append the B current gaps: N gaps;
    2. `gamma = gamma_po_margins(...)` (20 steps of exponentiated gradient, see there), keep the
       B current entries, detached;
    3. simpo: `l_i = -log sigmoid(g_i - sg(gamma_i))` (gm-simpo);
       dpo:   `l_i = -log sigmoid(g_i - sg(gamma_i - gamma0))` (gm-dpo: a zero-mean adjustment
       of DPO, which has no margin of its own);
    4. push the B current gaps (detached) into the FIFO pool (ring buffer).

  With one pair and an empty pool, N = 1, gamma = gamma0 and gamma-SimPO is SimPO.

  Args:
    policy: `PairLogps` (lengths needed for base "simpo").
    reference: reference `PairLogps` for base "dpo"; ignored for "simpo".
    base: "simpo" or "dpo".
    beta: beta (SimPOConfig default 2.0; the released gamma-SimPO runs use 2.5-10).
    gamma_beta_ratio: gamma0 / beta (default 0.25; released runs 0.15-0.5).
    tau: KL regularisation of the margin distribution (> 0; default 1.0; released runs 3-20).
    opt_size: N at most (256 in the code). Requires B <= opt_size.
    num_steps: exponentiated-gradient iterations (20 in the code).
    state: `GammaPoState` from `gamma_po_init_state()` (pool of 2048) or the previous call.
    key: PRNG key for the pool sample.

  Returns:
    `(losses [B], new_state)`; the batch loss is the mean.

  References: Sun et al. 2025, "Robust Preference Optimization via Dynamic Target Margins"
  (gamma-PO), ACL 2025, arXiv:2506.03690; code sunjie279/gammaPO
  `scripts/simpo_trainer.py::get_gamma_dq` / `simpo_loss` (gm-simpo) and
  `scripts/xpo_trainer.py::xpo_loss` (gm-dpo).
  """
  name = "gamma_po"
  _common.check_choice(name, "base", base, ("simpo", "dpo"))
  _common.check_inputs(name, policy, reference, need_reference=base == "dpo", need_lengths=base == "simpo")
  _common.check_beta(name, beta)
  _common.check_range(name, "gamma_beta_ratio", gamma_beta_ratio)
  _common.check_range(name, "tau", tau, low=0.0, low_open=True)
  _common.check_range(name, "num_steps", num_steps, low=1)
  b = policy.chosen.shape[0]
  pool_size = state.pool.shape[0]
  if not isinstance(opt_size, int) or opt_size < b:
    raise ValueError(f"{name}: invalid opt_size={opt_size!r}; allowed: an int >= the batch size {b}.")
  if b > pool_size:
    raise ValueError(f"{name}: batch size {b} exceeds the pool size {pool_size}; allowed: B <= pool size.")
  gamma0 = gamma_beta_ratio * beta

  g = _gamma_po_gaps(policy, reference, base, beta)
  g_sg = jax.lax.stop_gradient(g)

  # 1. Sample min(count, opt_size - B) pooled gaps without replacement.
  n_draw = min(opt_size - b, pool_size)
  if n_draw > 0:
    valid = jnp.arange(pool_size) < state.count
    scores = jnp.where(valid, jax.random.gumbel(key, (pool_size,), jnp.float32), -jnp.inf)
    _, idx = jax.lax.top_k(scores, n_draw)
    drawn = state.pool[idx]
    drawn_active = (jnp.arange(n_draw) < state.count).astype(jnp.float32)
  else:
    drawn = jnp.zeros((0,), jnp.float32)
    drawn_active = jnp.zeros((0,), jnp.float32)
  gaps = jnp.concatenate([drawn, g_sg])
  active = jnp.concatenate([drawn_active, jnp.ones((b,), jnp.float32)])

  # 2. Margins, detached; 3. loss.
  gamma = jax.lax.stop_gradient(gamma_po_margins(gaps, active, gamma0=gamma0, tau=tau, num_steps=num_steps)[-b:])
  offset = gamma if base == "simpo" else gamma - gamma0
  losses = gpo_fns.logistic(g - offset)

  # 4. FIFO push of the current gaps.
  pos = (state.next + jnp.arange(b)) % pool_size
  new_state = GammaPoState(
    pool=state.pool.at[pos].set(g_sg),
    count=jnp.minimum(state.count + b, pool_size).astype(jnp.int32),
    next=((state.next + b) % pool_size).astype(jnp.int32),
  )
  return losses, new_state


def gamma_simpo(
  policy,
  reference=None,
  *,
  beta: float = 2.0,
  gamma_beta_ratio: float = 0.25,
  tau: float = 1.0,
  opt_size: int = 256,
  num_steps: int = 20,
  state: GammaPoState,
  key: Array,
):
  r"""gamma-SimPO: `-log sigmoid(beta (pi_w/|y_w| - pi_l/|y_l|) - sg(gamma_i))`, gamma_i from a gap pool.

  `gamma_po(base="simpo")`; reference-free. Defaults are the code's SimPOConfig (beta 2.0,
  gamma/beta 0.25, tau 1.0); the paper's Llama-3-8B-Instruct run uses beta 10, gamma/beta 0.4,
  tau 10. Returns `(losses [B], new_state)`.

  References: Sun et al. 2025, arXiv:2506.03690; sunjie279/gammaPO `simpo_trainer.py` (gm-simpo).
  """
  del reference
  return gamma_po(
    policy,
    None,
    base="simpo",
    beta=beta,
    gamma_beta_ratio=gamma_beta_ratio,
    tau=tau,
    opt_size=opt_size,
    num_steps=num_steps,
    state=state,
    key=key,
  )


def gamma_dpo(
  policy,
  reference,
  *,
  beta: float = 0.1,
  gamma_beta_ratio: float = 0.25,
  tau: float = 1.0,
  opt_size: int = 256,
  num_steps: int = 20,
  state: GammaPoState,
  key: Array,
):
  r"""gamma-DPO: `-log sigmoid(beta rho - sg(gamma_i - gamma0))`, gamma_i from a pool of `beta rho` gaps.

  `gamma_po(base="dpo")` on summed log-ratios. beta = 0.1 is DPO's default; gamma/beta 0.25 and
  tau 1.0 are the code's config defaults (no gamma-DPO run configuration is released). Returns
  `(losses [B], new_state)`.

  References: Sun et al. 2025, arXiv:2506.03690; sunjie279/gammaPO `xpo_trainer.py` (gm-dpo).
  """
  return gamma_po(
    policy,
    reference,
    base="dpo",
    beta=beta,
    gamma_beta_ratio=gamma_beta_ratio,
    tau=tau,
    opt_size=opt_size,
    num_steps=num_steps,
    state=state,
    key=key,
  )


SPECS = (
  # example_hyper a=0: beta_used is detached by design, so with a != 0 autodiff gradients differ
  # from finite differences of the loss value (the contract test compares the two).
  LossSpec(
    "beta_dpo",
    beta_dpo,
    "adaptive",
    _BETA_DPO_SOURCE,
    requires=frozenset({"state", "key"}),
    init_state=beta_dpo_init_state,
    detached_by_design="the batch beta and the filter are stop-gradient functions of the margins",
  ),
  LossSpec(
    "gamma_simpo",
    gamma_simpo,
    "adaptive",
    _GAMMA_PO_SOURCE + " (gm-simpo)",
    reference="unused",
    requires=frozenset({"state", "key", "lengths"}),
    init_state=gamma_po_init_state,
  ),
  LossSpec(
    "gamma_dpo",
    gamma_dpo,
    "adaptive",
    _GAMMA_PO_SOURCE + " (gm-dpo)",
    requires=frozenset({"state", "key"}),
    init_state=gamma_po_init_state,
  ),
)
