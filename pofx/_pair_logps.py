"""Log-prob records that every loss consumes: `PairLogps` (pairs) and `ListLogps` (K-way lists).

Naming (used throughout pofx):

| name                     | meaning                                                    | shape  |
|--------------------------|------------------------------------------------------------|--------|
| `chosen`, `rejected`     | sum over completion tokens of log pi(y_t | x, y_<t)        | [B]    |
| `chosen_len`             | number of completion tokens (the 0/1 mask's sum)           | [B]    |
| `chosen_token_logps`     | per-token log-probs, zero where the mask is zero           | [B, T] |
| `chosen_mask`            | 0/1 completion-token mask                                  | [B, T] |
| `chosen_log_sum_sq_probs`| per token, log sum_v p_v^2 of the model's next-token dist. | [B, T] |
| `chosen_eos_logps`       | log pi(EOS | state) at the completion's states s_0..s_n     | [B, T+1] |
| `chosen_tempered_eos_logps` | the same at a temperature: log softmax(z / tau)_EOS     | [B, T+1] |
| `companion_chosen`       | on a reference: the chosen log-probs of M companion models | [B, M] |
| `companion_mask`         | 1 where a companion's value is in use, 0 before it is      | [B, M] |

The completion's states: `s_t = x + y_<t+1`, i.e. state `t` is the prefix that predicts token `t`
(0-based, so `s_0` is the prompt) for `t < n`, and `s_n` is the prompt and the whole completion
(the state after the last token; n = the completion's token count). Entries past `n` are 0.

Sums are taken in float32 whatever the dtype of the token log-probs, and masked positions
contribute exactly zero even when the token log-prob there is -inf or NaN (padding).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

_TOKEN_FIELDS = ("token_logps", "mask", "log_sum_sq_probs")


def state_mask(mask: Array) -> Array:
  """`[B, T+1]` 0/1 float32 mask of a completion's states `s_0..s_n` from its token mask `[B, T]`:
  state 0 (the prompt) always, state `t >= 1` where token `t - 1` is real."""
  mask = (jnp.asarray(mask) > 0).astype(jnp.float32)
  return jnp.concatenate([jnp.ones(mask.shape[:-1] + (1,), jnp.float32), mask], axis=-1)


def _masked_sum(values: Array, mask: Array) -> Array:
  """float32 sum over the last axis of `values` where `mask` is nonzero (other entries ignored)."""
  values = jnp.asarray(values, jnp.float32)
  return jnp.sum(jnp.where(jnp.asarray(mask) > 0, values, 0.0), axis=-1)


@dataclasses.dataclass(frozen=True)
class PairLogps:
  """Log-probs of the chosen and rejected completions of B preference pairs.

  Attributes:
    chosen: `[B]` float32, summed completion-token log-probs of the chosen completion.
    rejected: `[B]` float32, the same for the rejected completion.
    chosen_len: `[B]` float32 completion-token counts of the chosen completion, or None
      (allowed for a cached reference, whose lengths are the policy's).
    rejected_len: `[B]` float32 counts for the rejected completion, or None.
    chosen_token_logps: optional `[B, T]` per-token log-probs (zero outside the mask).
    chosen_mask: optional `[B, T]` 0/1 float32 completion mask.
    rejected_token_logps: optional `[B, T']`.
    rejected_mask: optional `[B, T']`.
    chosen_log_sum_sq_probs: optional `[B, T]`, per token `log sum_v p_v^2` (WPO weights).
    rejected_log_sum_sq_probs: optional `[B, T']`.
    chosen_eos_logps: optional `[B, T+1]`, `log pi(EOS | s_t)` at the chosen completion's states
      `s_0..s_n` (module docstring; 0 past n). GDPO's terminating probabilities.
    rejected_eos_logps: optional `[B, T'+1]`.
    chosen_tempered_eos_logps: optional `[B, T+1]`, `log softmax(z_t / tau)_EOS` at the same
      states, for the temperature `tau` the log-prob function was built with (GDPO's reward).
    rejected_tempered_eos_logps: optional `[B, T'+1]`.
    companion_chosen: optional `[B, M]`, set on a *reference* `PairLogps` only: the chosen
      log-probs (summed as `chosen`) of M companion models evaluated on the same batch as the
      reference (`pofx.references.ema_companions`: EMA copies of the policy), detached. Read by
      losses that require "companions" (Adaptive-DPO, `pofx.losses.adaptive_dpo`).
    companion_rejected: optional `[B, M]`, the same for the rejected completion.
    companion_mask: optional `[B, M]` float32, 1 where companion m's values are in use, 0 where
      they are not yet (e.g. before the companions' warm-up steps); the three come together.

  A `PairLogps` is a pytree (None fields are empty subtrees), so it passes through `jit`,
  `vmap`, `grad` and sharding unchanged.
  """

  chosen: Array
  rejected: Array
  chosen_len: Optional[Array] = None
  rejected_len: Optional[Array] = None
  chosen_token_logps: Optional[Array] = None
  chosen_mask: Optional[Array] = None
  rejected_token_logps: Optional[Array] = None
  rejected_mask: Optional[Array] = None
  chosen_log_sum_sq_probs: Optional[Array] = None
  rejected_log_sum_sq_probs: Optional[Array] = None
  chosen_eos_logps: Optional[Array] = None
  rejected_eos_logps: Optional[Array] = None
  chosen_tempered_eos_logps: Optional[Array] = None
  rejected_tempered_eos_logps: Optional[Array] = None
  companion_chosen: Optional[Array] = None
  companion_rejected: Optional[Array] = None
  companion_mask: Optional[Array] = None

  @classmethod
  def from_tokens(
    cls,
    chosen_token_logps,
    chosen_mask,
    rejected_token_logps,
    rejected_mask,
    *,
    chosen_log_sum_sq_probs=None,
    rejected_log_sum_sq_probs=None,
    chosen_eos_logps=None,
    rejected_eos_logps=None,
    chosen_tempered_eos_logps=None,
    rejected_tempered_eos_logps=None,
  ) -> PairLogps:
    """Builds every field from per-token log-probs `[B, T]` and 0/1 completion masks `[B, T]`.

    `chosen = sum_t mask_t * logp_t` (float32), `chosen_len = sum_t mask_t`; the per-token
    arrays are stored with masked positions set to exactly 0, the per-state EOS arrays `[B, T+1]`
    (optional, in pairs) with the states past the completion (`state_mask`) set to 0. Chosen and
    rejected may have different padded lengths T and T'.
    """
    chex.assert_rank([chosen_token_logps, chosen_mask, rejected_token_logps, rejected_mask], 2)
    chex.assert_equal_shape([chosen_token_logps, chosen_mask])
    chex.assert_equal_shape([rejected_token_logps, rejected_mask])
    chex.assert_equal_shape_prefix([chosen_token_logps, rejected_token_logps], 1)
    c_mask = (jnp.asarray(chosen_mask) > 0).astype(jnp.float32)
    r_mask = (jnp.asarray(rejected_mask) > 0).astype(jnp.float32)
    c_tok = jnp.where(c_mask > 0, jnp.asarray(chosen_token_logps, jnp.float32), 0.0)
    r_tok = jnp.where(r_mask > 0, jnp.asarray(rejected_token_logps, jnp.float32), 0.0)
    if (chosen_log_sum_sq_probs is None) != (rejected_log_sum_sq_probs is None):
      raise ValueError("Give both chosen_log_sum_sq_probs and rejected_log_sum_sq_probs, or neither.")
    if chosen_log_sum_sq_probs is not None:
      chex.assert_equal_shape([chosen_log_sum_sq_probs, chosen_token_logps])
      chex.assert_equal_shape([rejected_log_sum_sq_probs, rejected_token_logps])
      chosen_log_sum_sq_probs = jnp.where(c_mask > 0, jnp.asarray(chosen_log_sum_sq_probs, jnp.float32), 0.0)
      rejected_log_sum_sq_probs = jnp.where(r_mask > 0, jnp.asarray(rejected_log_sum_sq_probs, jnp.float32), 0.0)
    states = {}
    given = {
      "eos_logps": (chosen_eos_logps, rejected_eos_logps),
      "tempered_eos_logps": (chosen_tempered_eos_logps, rejected_tempered_eos_logps),
    }
    for name, (c_v, r_v) in given.items():
      if (c_v is None) != (r_v is None):
        raise ValueError(f"Give both chosen_{name} and rejected_{name}, or neither.")
      if c_v is None:
        continue
      for who, v, m in (("chosen", c_v, c_mask), ("rejected", r_v, r_mask)):
        if jnp.shape(v) != m.shape[:-1] + (m.shape[-1] + 1,):
          raise ValueError(f"{who}_{name} must be [B, T+1] = {m.shape[:-1] + (m.shape[-1] + 1,)}, got {jnp.shape(v)}.")
        states[f"{who}_{name}"] = jnp.where(state_mask(m) > 0, jnp.asarray(v, jnp.float32), 0.0)
    return cls(
      chosen=jnp.sum(c_tok, axis=-1),
      rejected=jnp.sum(r_tok, axis=-1),
      chosen_len=jnp.sum(c_mask, axis=-1),
      rejected_len=jnp.sum(r_mask, axis=-1),
      chosen_token_logps=c_tok,
      chosen_mask=c_mask,
      rejected_token_logps=r_tok,
      rejected_mask=r_mask,
      chosen_log_sum_sq_probs=chosen_log_sum_sq_probs,
      rejected_log_sum_sq_probs=rejected_log_sum_sq_probs,
      **states,
    )

  @property
  def batch_size(self) -> int:
    return self.chosen.shape[0]

  @property
  def has_tokens(self) -> bool:
    return self.chosen_token_logps is not None and self.rejected_token_logps is not None

  @property
  def has_eos(self) -> bool:
    return self.chosen_eos_logps is not None and self.rejected_eos_logps is not None

  @property
  def has_companions(self) -> bool:
    return self.companion_chosen is not None and self.companion_rejected is not None and self.companion_mask is not None

  def replace(self, **changes) -> PairLogps:
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
  PairLogps,
  data_fields=[f.name for f in dataclasses.fields(PairLogps)],
  meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class ListLogps:
  """Log-probs of K completions per prompt, for listwise losses (InfoNCA / NCA with K > 2).

  Attributes:
    logps: `[B, K]` float32 summed completion log-probs.
    lengths: optional `[B, K]` completion-token counts.
  """

  logps: Array
  lengths: Optional[Array] = None

  def replace(self, **changes) -> ListLogps:
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(ListLogps, data_fields=["logps", "lengths"], meta_fields=[])


def check_pair_logps(
  policy: PairLogps,
  reference: Optional[PairLogps] = None,
  *,
  name: str = "loss",
  need_lengths: bool = False,
  need_tokens: bool = False,
) -> None:
  """Shape/dtype checks at a loss's public boundary (trace-time only; free under `jit`)."""
  if not isinstance(policy, PairLogps):
    raise TypeError(f"{name}: `policy` must be a pofx.PairLogps, got {type(policy).__name__}.")
  if reference is not None and not isinstance(reference, PairLogps):
    raise TypeError(f"{name}: `reference` must be a pofx.PairLogps or None, got {type(reference).__name__}.")
  chex.assert_rank([policy.chosen, policy.rejected], 1)
  chex.assert_equal_shape([policy.chosen, policy.rejected])
  if reference is not None:
    chex.assert_equal_shape([policy.chosen, reference.chosen, reference.rejected])
  if need_lengths and (policy.chosen_len is None or policy.rejected_len is None):
    raise ValueError(
      f"{name} needs completion lengths: build the policy with PairLogps.from_tokens "
      "or pass chosen_len and rejected_len."
    )
  if need_tokens:
    for who, p in (("policy", policy), ("reference", reference)):
      if p is not None and not p.has_tokens:
        raise ValueError(f"{name} needs per-token log-probs on the {who}: build it with PairLogps.from_tokens(...).")
