"""Example inputs for any registered loss, built from its `LossSpec.requires`.

Used by the registry contract test and by `python -m pofx.losses`-style sweeps. A new
requirement kind in `pofx.losses.REQUIREMENTS` must get a builder here, or the contract test
fails for it (`test_every_requirement_has_a_builder`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pofx

B, T, K = 4, 7, 3
CHOSEN_LENS = np.array([7, 3, 5, 1])
REJECTED_LENS = np.array([2, 7, 4, 6])


def _mask(lens, t=T):
  return (np.arange(t)[None, :] < lens[:, None]).astype(np.float32)


def eos_states(seed: int, prefix: str = "") -> dict:
  """Per-state EOS log-probs `[B, T+1]` in (-4, -0.05) for both completions (`prefix` "" or
  "tempered_"), as `PairLogps.from_tokens` keyword arguments."""
  rng = np.random.default_rng(seed + 50)
  return {
    f"{side}_{prefix}eos_logps": -rng.uniform(0.05, 4.0, (B, T + 1)).astype(np.float32)
    for side in ("chosen", "rejected")
  }


def token_pair(seed: int, *, log_sum_sq: bool, shift=0.0, eos=None) -> pofx.PairLogps:
  """A PairLogps from random per-token log-probs in (-3, -0.05) with unequal lengths; with
  `eos` ("" or "tempered_") also per-state EOS log-probs (`eos_states`)."""
  rng = np.random.default_rng(seed)
  c_tok = -rng.uniform(0.05, 3.0, (B, T)).astype(np.float32)
  r_tok = -rng.uniform(0.05, 3.0, (B, T)).astype(np.float32) - shift
  extra = {}
  if log_sum_sq:
    # log sum_v p_v^2 <= max_v log p_v: any value below the token's own log-prob is realisable.
    extra = dict(
      chosen_log_sum_sq_probs=c_tok - rng.uniform(0.1, 2.0, (B, T)).astype(np.float32),
      rejected_log_sum_sq_probs=r_tok - rng.uniform(0.1, 2.0, (B, T)).astype(np.float32),
    )
  if eos is not None:
    extra.update(eos_states(seed, eos))
  return pofx.PairLogps.from_tokens(c_tok, _mask(CHOSEN_LENS), r_tok, _mask(REJECTED_LENS), **extra)


def turn_ids(lens):
  """Two tokens per turn; -1 on padding."""
  ids = np.arange(T)[None, :] // 2 + np.zeros((B, 1), np.int32)
  return np.where(_mask(lens) > 0, ids, -1).astype(np.int32)


NUM_SEGMENTS = 4  # segments of 3 tokens: at most ceil(T / 3) = 3 used, one padding slot


def segment_ids(lens):
  """Three tokens per segment; -1 on padding."""
  ids = np.arange(T)[None, :] // 3 + np.zeros((B, 1), np.int32)
  return np.where(_mask(lens) > 0, ids, -1).astype(np.int32)


def with_companions(reference, seed: int, m: int = 2):
  """`reference` with M companion models' log-probs `[B, M]` near its own (within +-1), in use."""
  rng = np.random.default_rng(seed + 30)
  shift = lambda x: jnp.asarray(np.asarray(x, np.float32)[:, None] + rng.uniform(-1, 1, (B, m)), jnp.float32)
  return reference.replace(
    companion_chosen=shift(reference.chosen),
    companion_rejected=shift(reference.rejected),
    companion_mask=jnp.ones((B, m), jnp.float32),
  )


def build(spec, key, *, with_reference=True, seed=0):
  """Returns (policy, reference, kwargs) for `spec` (hyperparameters from example_hyper)."""
  req = spec.requires
  kwargs = dict(spec.example_hyper)
  if "list" in req:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 8, (B, K)).astype(np.float32)
    policy = pofx.ListLogps(logps=jnp.asarray(-rng.uniform(1, 10, (B, K)), jnp.float32), lengths=jnp.asarray(lens))
    reference = pofx.ListLogps(logps=jnp.asarray(-rng.uniform(1, 10, (B, K)), jnp.float32), lengths=jnp.asarray(lens))
    kwargs["scores"] = jnp.asarray(rng.uniform(0, 1, (B, K)), jnp.float32)
  else:
    eos = "eos_logps" in req  # GDPO: the policy's EOS log-probs, the reference's tempered ones
    policy = token_pair(seed, log_sum_sq="log_sum_sq_probs" in req, eos="" if eos else None)
    reference = token_pair(seed + 100, log_sum_sq=False, eos="tempered_" if eos else None)
  if "companions" in req:
    reference = with_companions(reference, seed)
  if spec.reference == "unused" or not with_reference:
    reference = None
  rng = np.random.default_rng(seed + 7)
  if "key" in req:
    kwargs["key"] = key
  if "scores" in req:
    kwargs["chosen_scores"] = jnp.asarray(rng.uniform(0.55, 1.0, B), jnp.float32)
    kwargs["rejected_scores"] = jnp.asarray(rng.uniform(0.05, 0.45, B), jnp.float32)
    if not np.all(spec.score_domain.valid(np.asarray(kwargs["chosen_scores"]), np.asarray(kwargs["rejected_scores"]))):
      # A domain of binary labels (Diffusion-KTO): each image desirable (1) or not (0), both kinds in each slot.
      kwargs["chosen_scores"] = jnp.asarray([1.0, 1.0, 0.0, 1.0], jnp.float32)[:B]
      kwargs["rejected_scores"] = jnp.asarray([0.0, 1.0, 0.0, 0.0], jnp.float32)[:B]
  if "turn_ids" in req:
    kwargs["chosen_turn_ids"] = jnp.asarray(turn_ids(CHOSEN_LENS))
    kwargs["rejected_turn_ids"] = jnp.asarray(turn_ids(REJECTED_LENS))
  if "risk" in req:
    kwargs["chosen_risk"] = jnp.asarray(rng.uniform(0, 1, B), jnp.float32)
    kwargs["rejected_risk"] = jnp.asarray(rng.uniform(0, 1, B), jnp.float32)
  if "kl" in req:
    kwargs["kl_logratios"] = jnp.asarray(rng.normal(0, 1, B), jnp.float32)
  if "diff_masks" in req:
    kwargs["chosen_diff_mask"] = jnp.asarray(_mask(CHOSEN_LENS) * (rng.uniform(size=(B, T)) < 0.5))
    kwargs["rejected_diff_mask"] = jnp.asarray(_mask(REJECTED_LENS) * (rng.uniform(size=(B, T)) < 0.5))
  if "embeddings" in req:
    kwargs["prompt_embeddings"] = jnp.asarray(rng.normal(0, 1, (B, 5)), jnp.float32)
    kwargs["chosen_embeddings"] = jnp.asarray(rng.normal(0, 1, (B, 5)), jnp.float32)
  if "segments" in req:
    kwargs["chosen_segment_ids"] = jnp.asarray(segment_ids(CHOSEN_LENS))
    kwargs["rejected_segment_ids"] = jnp.asarray(segment_ids(REJECTED_LENS))
    kwargs["chosen_segment_scores"] = jnp.asarray(rng.uniform(0, 1, (B, NUM_SEGMENTS, 2)), jnp.float32)
    kwargs["rejected_segment_scores"] = jnp.asarray(rng.uniform(0, 1, (B, NUM_SEGMENTS, 2)), jnp.float32)
  if "state" in req:
    hyper = {k: v for k, v in kwargs.items() if k in spec.hyperparameters and k in spec.example_hyper}
    kwargs["state"] = spec.init_state(**hyper)
  return policy, reference, kwargs


def extreme_pair(margin_sign: float, dtype, *, eos: bool = False) -> tuple:
  """Policy/reference whose GPO margin is about margin_sign * 1e4 with or without a reference.

  The policy's chosen (rejected) tokens sum to -1 or -1e4, the reference's to -1 on both
  sides, so both `lr_w - lr_l` and `pi_w - pi_l` are +-(1e4 - 1). With `eos`, the policy's
  per-state EOS log-probs are -1e4 on the side whose tokens are (-1 on the other) and the
  reference's tempered ones -1.
  """
  big = 1e4
  c_total, r_total = (-1.0, -big) if margin_sign > 0 else (-big, -1.0)
  c_tok = np.full((B, T), 0.0, np.float32)
  r_tok = np.full((B, T), 0.0, np.float32)
  c_mask, r_mask = _mask(CHOSEN_LENS), _mask(REJECTED_LENS)
  c_tok[:] = c_total / CHOSEN_LENS[:, None]
  r_tok[:] = r_total / REJECTED_LENS[:, None]
  states = {}
  if eos:
    c_eos, r_eos = (-1.0, -big) if margin_sign > 0 else (-big, -1.0)
    states = dict(
      chosen_eos_logps=np.full((B, T + 1), c_eos, np.float32), rejected_eos_logps=np.full((B, T + 1), r_eos, np.float32)
    )
  policy = pofx.PairLogps.from_tokens(
    c_tok, c_mask, r_tok, r_mask, chosen_log_sum_sq_probs=c_tok - 0.5, rejected_log_sum_sq_probs=r_tok - 0.5, **states
  )
  ref_c = np.full((B, T), 0.0, np.float32) - 1.0 / CHOSEN_LENS[:, None]
  ref_r = np.full((B, T), 0.0, np.float32) - 1.0 / REJECTED_LENS[:, None]
  tempered = {}
  if eos:
    tempered = {f"{side}_tempered_eos_logps": np.full((B, T + 1), -1.0, np.float32) for side in ("chosen", "rejected")}
  reference = pofx.PairLogps.from_tokens(ref_c, c_mask, ref_r, r_mask, **tempered)
  cast = lambda p: jax.tree.map(lambda x: jnp.asarray(x, dtype), p)
  return cast(policy), cast(reference)
