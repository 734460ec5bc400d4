"""The policy as the train step sees it: `logps_fn(params, batch) -> PairLogps`.

`make_logps_fn(apply, head, ...)` joins a model's pure functions (`pofx.models.make(config)`
gives `apply` and `head`) with the chunked log-probs of `pofx.logprobs`: one forward over the
`pofx.batching.PairBatch` in `batch["pairs"]` (fused, prompt-shared or packed), then the
completion-token log-probs, summed in float32. The LM head's products go through the
injected `kernels.dot_general` (`pofx.kernels.Kernels`; the model takes the same record for its
own products and attention). Nothing here imports Flax.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from pofx import kernels as kernels_lib
from pofx import logprobs
from pofx._pair_logps import PairLogps


def make_logps_fn(
  apply: Callable[..., Any],
  head: Callable[[Any], Any],
  *,
  chunk_size: int = 1024,
  with_log_sum_sq_probs: bool = False,
  compute_dtype=None,
  save_probs: bool = False,
  kernels: kernels_lib.Kernels = kernels_lib.XLA,
  logit_softcap: Optional[float] = None,
  eos_id: Optional[int] = None,
  eos_temperature: Optional[float] = None,
) -> Callable[[Any, Any], PairLogps]:
  """Returns `logps_fn(params, batch)`; `batch["pairs"]` is a `PairBatch`.

  When the batch also holds `batch["attention_blocks"]` (a host-built
  `pofx.sparse_attention.AttentionBlocks` for these rows, `pofx.batching.attention_blocks(pairs)`),
  it is passed on as `apply(..., attention_blocks=...)`: block-sparse attention, same log-probs.
  When it holds `batch["scored_tokens"]` (`pofx.batching.scored_tokens(pairs)`), the model is
  asked for the outputs at the real completion positions only (`apply(..., output_index=...)`)
  and the head scores just those tokens: same log-probs, no work on padded completion slots.
  When it holds `batch["dropout_key"]` (set by `pofx.train` for dropout training) or
  `batch["embedding_offset"]` (`[R, L, D]`, set by an input perturbation), they are passed on as
  `apply(..., dropout_key=...)` / `apply(..., embedding_offset=...)`.

  Args:
    apply: `apply(params, tokens, positions, segment_ids, branch_ids) -> hidden [R, L, D]`
      (accepting `attention_blocks=` / `output_index=` when batches carry blocks / scored tokens).
    head: `head(params) -> [D, V]` LM-head weight.
    chunk_size: tokens per log-softmax chunk (see `pofx.logprobs.token_logps`).
    with_log_sum_sq_probs: also fill the per-token `log sum_v p_v^2` (needed by WPO weighting).
    compute_dtype: dtype of the head matmul operands (float32 accumulation either way).
    save_probs: store the completion tokens' `[N, V]` float32 probabilities for the backward
      instead of recomputing the logits (see `pofx.logprobs.token_logps`; ignored, i.e.
      recomputed, when `with_log_sum_sq_probs`).
    kernels: the injection points (`pofx.kernels.Kernels`); the head's products use its
      `dot_general` (`pofx.logprobs.token_logps(dot_general=)`). Pass the model's own.
    logit_softcap: the soft-cap of the head's logits (`model.logit_softcap`: Gemma 2's final
      soft-capping; None for the other families). Pass the model's own.
    eos_id: also fill the per-state `log pi(EOS | s_t)` of each completion
      (`PairLogps.chosen_eos_logps`, `[B, T+1]`; GDPO). The model's outputs are then taken at
      every position: `batch["scored_tokens"]` is not used (the state after a completion's last
      token predicts no completion token), see `pofx.logprobs.pair_logps`.
    eos_temperature: with `eos_id`, also fill `chosen/rejected_tempered_eos_logps`, the EOS
      log-prob of the softmax at this temperature (GDPO's reference reward, `gamma`).
  """

  def logps_fn(params, batch) -> PairLogps:
    pairs = batch["pairs"]
    get = batch.get if hasattr(batch, "get") else (lambda k: None)
    blocks, scored = get("attention_blocks"), get("scored_tokens")
    kwargs = {} if blocks is None else {"attention_blocks": blocks}
    if eos_id is not None:
      scored = None  # the end states are not among the scored positions
    if scored is not None:
      kwargs["output_index"] = scored.index
    for name in ("dropout_key", "embedding_offset"):
      if get(name) is not None:
        kwargs[name] = get(name)
    hidden = apply(params, pairs.tokens, pairs.positions, pairs.segment_ids, pairs.branch_ids, **kwargs)
    return logprobs.pair_logps(
      hidden,
      head(params),
      pairs,
      chunk_size=chunk_size,
      with_log_sum_sq_probs=with_log_sum_sq_probs,
      compute_dtype=compute_dtype,
      save_probs=save_probs,
      scored=scored,
      dot_general=kernels.dot_general,
      logit_softcap=logit_softcap,
      eos_id=eos_id,
      eos_temperature=eos_temperature,
    )

  return logps_fn
