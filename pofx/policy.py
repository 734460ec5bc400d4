"""The policy as the train step sees it: `logps_fn(params, batch) -> PairLogps`.

`make_logps_fn(apply, head, ...)` joins a model's pure functions (`pofx.models.make(config)`
gives `apply` and `head`) with the chunked log-probs of `pofx.logprobs`: one forward over the
`pofx.batching.PairBatch` in `batch["pairs"]` (fused, prompt-shared or packed), then the
completion-token log-probs, summed in float32. Nothing here imports Flax.
"""

from __future__ import annotations

from typing import Any, Callable

from pofx import logprobs
from pofx._pair_logps import PairLogps


def make_logps_fn(apply: Callable[..., Any], head: Callable[[Any], Any], *, chunk_size: int = 1024,
                  with_log_sum_sq_probs: bool = False, compute_dtype=None,
                  save_probs: bool = False) -> Callable[[Any, Any], PairLogps]:
  """Returns `logps_fn(params, batch)`; `batch["pairs"]` is a `PairBatch`.

  When the batch also holds `batch["attention_blocks"]` (a host-built
  `pofx.sparse_attention.AttentionBlocks` for these rows, `pofx.batching.attention_blocks(pairs)`),
  it is passed on as `apply(..., attention_blocks=...)`: block-sparse attention, same log-probs.

  Args:
    apply: `apply(params, tokens, positions, segment_ids, branch_ids) -> hidden [R, L, D]`
      (accepting `attention_blocks=` when batches carry them).
    head: `head(params) -> [D, V]` LM-head weight.
    chunk_size: tokens per log-softmax chunk (see `pofx.logprobs.token_logps`).
    with_log_sum_sq_probs: also fill the per-token `log sum_v p_v^2` (needed by WPO weighting).
    compute_dtype: dtype of the head matmul operands (float32 accumulation either way).
    save_probs: store the completion tokens' `[N, V]` float32 probabilities for the backward
      instead of recomputing the logits (see `pofx.logprobs.token_logps`; ignored, i.e.
      recomputed, when `with_log_sum_sq_probs`).
  """

  def logps_fn(params, batch) -> PairLogps:
    pairs = batch["pairs"]
    blocks = batch.get("attention_blocks") if hasattr(batch, "get") else None
    kwargs = {} if blocks is None else {"attention_blocks": blocks}
    hidden = apply(params, pairs.tokens, pairs.positions, pairs.segment_ids, pairs.branch_ids, **kwargs)
    return logprobs.pair_logps(hidden, head(params), pairs, chunk_size=chunk_size,
                               with_log_sum_sq_probs=with_log_sum_sq_probs, compute_dtype=compute_dtype,
                               save_probs=save_probs)

  return logps_fn
