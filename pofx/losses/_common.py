"""Shared pieces of the loss catalogue: log-ratios, length normalisation, hyperparameter checks."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pofx._pair_logps import PairLogps, check_pair_logps

Array = jax.Array


def logratios(policy: PairLogps, reference: Optional[PairLogps]):
  """`(lr_w, lr_l) = (pi_w - ref_w, pi_l - ref_l)`; with no reference, the policy log-probs."""
  if reference is None:
    return policy.chosen, policy.rejected
  return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def f32(x) -> Array:
  return jnp.asarray(x, jnp.float32)


def checked_logratios(name: str, policy: PairLogps, reference: Optional[PairLogps], **need):
  """`logratios` in float32 after `check_inputs(name, ..., need_reference=True, **need)`."""
  check_inputs(name, policy, reference, need_reference=True, **need)
  lr_w, lr_l = logratios(policy, reference)
  return f32(lr_w), f32(lr_l)


def margins(policy: PairLogps, reference: Optional[PairLogps]) -> Array:
  """`rho = lr_w - lr_l`, the GPO margin (not multiplied by beta)."""
  lr_w, lr_l = logratios(policy, reference)
  return lr_w - lr_l


def lengths(policy: PairLogps, name: str):
  """Completion-token counts (float32, clamped at 1 as TRL does)."""
  if policy.chosen_len is None or policy.rejected_len is None:
    raise ValueError(
      f"{name} normalises by completion length: the policy PairLogps needs chosen_len "
      "and rejected_len (PairLogps.from_tokens sets them)."
    )
  return (
    jnp.maximum(jnp.asarray(policy.chosen_len, jnp.float32), 1.0),
    jnp.maximum(jnp.asarray(policy.rejected_len, jnp.float32), 1.0),
  )


def chosen_token_nll_sum(policy: PairLogps) -> Array:
  """`-sum_t log pi(y_w,t)`, the summed chosen negative log-likelihood, `[B]`."""
  return -policy.chosen


def _is_static(x) -> bool:
  return isinstance(x, (numbers.Number, np.ndarray, np.generic)) and not isinstance(x, jax.core.Tracer)


def check_range(
  name: str,
  field: str,
  value,
  *,
  low=None,
  high=None,
  low_open=False,
  high_open=False,
  allowed_text: Optional[str] = None,
) -> None:
  """Raises ValueError when a static (Python/numpy) hyperparameter lies outside its range.

  Traced values (under `jit`) cannot be checked and pass through.
  """
  if not _is_static(value):
    return
  v = float(np.asarray(value))
  bad = not np.isfinite(v)
  if low is not None:
    bad |= v <= low if low_open else v < low
  if high is not None:
    bad |= v >= high if high_open else v > high
  if bad:
    if allowed_text is None:
      lo = "-inf" if low is None else f"{low}"
      hi = "inf" if high is None else f"{high}"
      allowed_text = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    raise ValueError(f"{name}: invalid {field}={value!r}; allowed: {allowed_text}.")


def check_beta(name: str, beta) -> None:
  check_range(name, "beta", beta, low=0.0, low_open=True, allowed_text="beta > 0")


def check_choice(name: str, field: str, value, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"{name}: invalid {field}={value!r}; allowed: {sorted(allowed)}.")


def require_reference(name: str, reference) -> None:
  if reference is None:
    raise ValueError(
      f"{name} needs a reference model's log-probs (reference=None was given); use a "
      "reference-free loss (e.g. simpo, cpo, orpo) or pass the reference PairLogps."
    )


def check_inputs(
  name: str, policy, reference=None, *, need_reference=False, need_lengths=False, need_tokens=False
) -> None:
  """Type/shape checks every loss runs first."""
  check_pair_logps(policy, reference, name=name, need_lengths=need_lengths, need_tokens=need_tokens)
  if need_reference:
    require_reference(name, reference)
