"""The worked example of the loss catalogue and a table of every canonical loss on it.

One pair: pi_w = -10 over 5 chosen tokens, pi_l = -12 over 6 rejected tokens, ref_w = ref_l = -11,
beta = 0.1 (each loss's own defaults otherwise); tokens are uniform (policy -2 per token,
reference -11/5 and -11/6). So lr_w = +1, lr_l = -1, rho = 2. Scores (0.8, 0.3) where a loss uses
them ((1, 0) for a domain of binary labels); every token marked as differing (BMC), embeddings
(1, 0) and (1, 1) (Sem-DPO), one segment per completion with aspect scores (1, 0.5) and
(0.5, 0.5) (2D-DPO); per-state EOS log-probs (GDPO) -3 for the policy and -2 for the
reference's tempered ones at every state; two companion models on the reference (Adaptive-DPO)
with log-probs (-10.5, -11.5) and (-10, -12), in use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pofx._pair_logps import ListLogps, PairLogps
from pofx.losses import _registry

T = 6
LEN_W, LEN_L = 5, 6


def _tokens(total, n):
  mask = (np.arange(T)[None, :] < n).astype(np.float32)
  return jnp.asarray(mask) * (total / n), mask


def worked_example(shift: float = 0.0):
  """(policy, reference) of the worked example; `shift` moves rho by `shift` (half on each side)."""
  c_tok, c_mask = _tokens(-10.0 + shift / 2, LEN_W)
  r_tok, r_mask = _tokens(-12.0 - shift / 2, LEN_L)
  policy = PairLogps.from_tokens(
    c_tok, c_mask, r_tok, r_mask, chosen_log_sum_sq_probs=c_tok - 0.5, rejected_log_sum_sq_probs=r_tok - 0.5
  )
  rc_tok, _ = _tokens(-11.0, LEN_W)
  rr_tok, _ = _tokens(-11.0, LEN_L)
  reference = PairLogps.from_tokens(rc_tok, c_mask, rr_tok, r_mask)
  return policy, reference


def example_kwargs(spec, key=None):
  """Extra inputs of the worked example for a spec's requirements (not its hyperparameters)."""
  req = spec.requires
  kw = dict(spec.example_hyper)
  if "key" in req:
    kw["key"] = jax.random.key(0) if key is None else key
  if "scores" in req:
    kw["chosen_scores"], kw["rejected_scores"] = jnp.array([0.8]), jnp.array([0.3])
    if not bool(np.all(spec.score_domain.valid(np.array([0.8]), np.array([0.3])))):  # binary labels
      kw["chosen_scores"], kw["rejected_scores"] = jnp.array([1.0]), jnp.array([0.0])
  if "turn_ids" in req:
    kw["chosen_turn_ids"] = jnp.asarray(np.where(np.arange(T) < LEN_W, 0, -1)[None], jnp.int32)
    kw["rejected_turn_ids"] = jnp.asarray(np.where(np.arange(T) < LEN_L, 0, -1)[None], jnp.int32)
  if "risk" in req:
    kw["chosen_risk"], kw["rejected_risk"] = jnp.array([0.0]), jnp.array([0.0])
  if "kl" in req:
    kw["kl_logratios"] = jnp.array([0.0])
  if "list" in req:
    kw["scores"] = jnp.array([[0.8, 0.3]])
  if "diff_masks" in req:  # every token differs
    kw["chosen_diff_mask"] = jnp.asarray(np.arange(T)[None] < LEN_W, jnp.float32)
    kw["rejected_diff_mask"] = jnp.asarray(np.arange(T)[None] < LEN_L, jnp.float32)
  if "embeddings" in req:  # cosine 1/sqrt(2)
    kw["prompt_embeddings"], kw["chosen_embeddings"] = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 1.0]])
  if "segments" in req:  # one segment each; aspect scores (1, 0.5) and (0.5, 0.5)
    kw["chosen_segment_ids"] = jnp.asarray(np.where(np.arange(T) < LEN_W, 0, -1)[None], jnp.int32)
    kw["rejected_segment_ids"] = jnp.asarray(np.where(np.arange(T) < LEN_L, 0, -1)[None], jnp.int32)
    kw["chosen_segment_scores"], kw["rejected_segment_scores"] = jnp.array([[[1.0, 0.5]]]), jnp.array([[[0.5, 0.5]]])
  if "state" in req:
    hyper = {k: v for k, v in spec.example_hyper.items() if k in spec.hyperparameters}
    kw["state"] = spec.init_state(**hyper)
  return kw


def _inputs(spec, shift):
  policy, reference = worked_example(shift)
  if "list" in spec.requires:
    policy = ListLogps(
      logps=jnp.stack([policy.chosen, policy.rejected], -1), lengths=jnp.array([[LEN_W, LEN_L]], jnp.float32)
    )
    reference = ListLogps(
      logps=jnp.stack([reference.chosen, reference.rejected], -1), lengths=jnp.array([[LEN_W, LEN_L]], jnp.float32)
    )
  if "eos_logps" in spec.requires:
    states = lambda n, v: jnp.asarray(np.where(np.arange(T + 1)[None] <= n, v, 0.0), jnp.float32)
    policy = policy.replace(chosen_eos_logps=states(LEN_W, -3.0), rejected_eos_logps=states(LEN_L, -3.0))
    reference = reference.replace(
      chosen_tempered_eos_logps=states(LEN_W, -2.0), rejected_tempered_eos_logps=states(LEN_L, -2.0)
    )
  if "companions" in spec.requires:
    reference = reference.replace(
      companion_chosen=jnp.array([[-10.5, -10.0]]),
      companion_rejected=jnp.array([[-11.5, -12.0]]),
      companion_mask=jnp.ones((1, 2), jnp.float32),
    )
  if spec.reference == "unused":
    reference = None
  return policy, reference


def evaluate(spec):
  """(value, d value / d rho) of `spec`'s batch loss on the worked example."""
  kwargs = example_kwargs(spec)

  def value(shift):
    policy, reference = _inputs(spec, shift)
    out = spec.fn(policy, reference, **kwargs)
    per_pair = out[0] if "state" in spec.requires else out
    return _registry.reduce(spec, per_pair, policy)

  return jax.value_and_grad(value)(jnp.float32(0.0))


def table(registry) -> str:
  rows = [("name", "family", "reference", "value", "dL/drho", "source")]
  for name, spec in registry.items():
    v, g = evaluate(spec)
    rows.append((name, spec.family, spec.reference, f"{float(v):.6f}", f"{float(g):+.6f}", spec.source))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  lines = []
  for i, r in enumerate(rows):
    lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    if i == 0:
      lines.append("-" * (sum(widths) + 2 * 5 + 6))
  return "\n".join(lines)
