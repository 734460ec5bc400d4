r"""Processed FLOPs of a DPO train step, counted analytically, and model-FLOPs utilisation (MFU).

One forward pass of a Llama-family decoder (`pofx.models`) over a batch, in multiply-adds times 2
(a product `[M, K] . [K, N]` is `2 M K N` FLOPs), with D the width, H query heads, K key/value
heads, hd the head dimension, F the MLP width, V the vocabulary and n_layers blocks:

    projections  per token and layer   2 (D H hd + 2 D K hd + H hd D + 3 D F)      (q, k, v, o; gate, up, down)
    attention    per computed (query, key) entry, query head and layer   4 hd       (q.k and p.v)
    LM head      per scored token       2 D V

(Kaplan et al. 2020, arXiv:2001.08361, Table 1; with grouped-query heads and the SwiGLU MLP).
The LM head is counted: at a vocabulary of 128k it is a large share of a 1B model's step, and MFU
figures that leave it out are wrong. Embedding lookups, norms, the rotary embedding, softmax,
SwiGLU's product and the optimizer are elementwise and not counted (XLA's cost analysis counts
them, so it comes out somewhat higher on small models).

The attention entries are those the kernel **computes**: dense masked attention computes every
`L x L` entry of a row; the XLA path's causal query blocks (`pofx.kernels.xla_attention`,
`query_block` 128) compute each block of queries against the key prefix it can see; block-sparse
attention (`pofx.sparse_attention`) computes `block_size^2` entries per listed block pair,
padding pairs included. `useful_attention_entries` counts the entries the mask allows, for a
"useful FLOPs" figure.

A train step (`dpo_step_flops`): the backward pass costs twice the forward (a gradient for the
inputs and one for the weights of every product), so the policy's forward and backward are
`3 x forward`; a reference forward when the reference runs one each step (frozen, guiding, EMA,
synced: `+1 x forward`; cached: 0); a perturbation that takes its gradient at moved weights adds
forward-backward passes (SAM, ASAM, AWP: one more, `+3 x forward`; RWP: `steps` proxy ascents,
`+3 steps x forward`). Rematerialisation and the LM head's recomputed logits are not counted:
these are model FLOPs, the numerator of MFU as Chowdhery et al. 2022 (PaLM, arXiv:2204.02311,
Appendix B) define it: `MFU = model FLOPs per second / peak FLOP/s`.

`peak_flops(device_kind)` is the vendor's dense bf16 peak of a known accelerator (matched on
`jax.devices()[0].device_kind`), `mfu(flops_per_second, device_kind)` the ratio; both are None on
unknown devices (CPUs). This module imports no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Work:
  """What one forward pass over a batch processes.

  tokens: positions through the transformer blocks (`R x L` rows, padding included).
  head_tokens: positions through the LM head (the scored completion tokens, or every slot scored).
  attention_entries: (query, key) entries whose scores are computed, summed over rows (per query
    head and layer).
  last_block_tokens: positions through the last block's output projection and MLP when fewer
    than `tokens` (the model's compact scoring: only the positions that predict a completion
    token); None: `tokens`.
  """

  tokens: int
  head_tokens: int
  attention_entries: int
  last_block_tokens: Optional[int] = None

  def __post_init__(self):
    for name in ("tokens", "head_tokens", "attention_entries"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"flops.Work.{name} must be >= 0, got {getattr(self, name)!r}.")
    if self.last_block_tokens is not None and not 0 <= int(self.last_block_tokens) <= int(self.tokens):
      raise ValueError(
        f"flops.Work.last_block_tokens must be in [0, tokens={self.tokens}], got {self.last_block_tokens!r}."
      )


class Breakdown(NamedTuple):
  """FLOPs of one pass by part; `total` is their sum."""

  projections: float
  attention: float
  head: float

  @property
  def total(self) -> float:
    return self.projections + self.attention + self.head

  def scaled(self, factor: float) -> Breakdown:
    return Breakdown(*(factor * x for x in self))

  def __add__(self, other):  # part by part (a NamedTuple's + would concatenate)
    return Breakdown(*(a + b for a, b in zip(self, other)))


def _shape(config) -> Tuple[int, int, int, int, int, int, int]:
  """(D, H, K, hd, F, V, n_layers) of a `LlamaConfig`-like object."""
  hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_heads
  return (
    int(config.hidden_size),
    int(config.num_heads),
    int(config.num_kv_heads),
    int(hd),
    int(config.mlp_size),
    int(config.vocab_size),
    int(config.num_layers),
  )


def projection_flops_per_token(config) -> Tuple[int, int]:
  """Forward FLOPs per token and layer of the products before attention (q, k, v) and after it
  (o, gate, up, down): `(2 (D H hd + 2 D K hd), 2 (H hd D + 3 D F))`."""
  D, H, K, hd, F, _, _ = _shape(config)
  return 2 * (D * H * hd + 2 * D * K * hd), 2 * (H * hd * D + 3 * D * F)


def forward_flops(config, work: Work) -> Breakdown:
  """FLOPs of one forward pass of `config`'s model over `work` (see the module docstring)."""
  D, H, _, hd, _, V, n_layers = _shape(config)
  before, after = projection_flops_per_token(config)
  last = work.tokens if work.last_block_tokens is None else int(work.last_block_tokens)
  projections = n_layers * work.tokens * before + (n_layers - 1) * work.tokens * after + last * after
  attention = n_layers * H * 4 * hd * int(work.attention_entries)
  head = 2 * D * V * int(work.head_tokens)
  return Breakdown(float(projections), float(attention), float(head))


# Reference strategies whose step runs a reference forward (`pofx.references`); the cached ones
# (and "none", reference-free losses) read log-probs from the batch.
REFERENCE_FORWARD = {"frozen": 1, "guiding": 1, "ema": 1, "synced": 1, "adapters_off": 1, "cached": 0, "none": 0}
# Perturbations: forward-backward passes on top of the plain gradient (`pofx.perturbations`).
PERTURBATION_PASSES = {"none": 0, "sam": 1, "asam": 1, "awp": 1, "saf": 0, "mesa": 0}
# ... and forwards without a backward (MESA: the EMA weights' outputs).
PERTURBATION_FORWARDS = {"mesa": 1}


def dpo_step_flops(
  config,
  work: Work,
  *,
  reference: str = "cached",
  perturbation: str = "none",
  reference_forwards: Optional[int] = None,
  rwp_steps: int = 10,
  dropout_samples: int = 1,
  input_passes: int = 0,
) -> Breakdown:
  """Model FLOPs of one train step on `work`:
  `(M (3 (1 + extra gradient passes) + extra forwards) + reference forwards) x forward`.

  reference: a name of `REFERENCE_FORWARD`, or any name with `reference_forwards` given (e.g. a
    multi-reference with two frozen members: 2; with cached members: 0).
  perturbation: "none", "saf" (no extra pass), "sam", "asam", "awp" (one more gradient pass),
    "rwp" (`rwp_steps` more) or "mesa" (one more forward, of the EMA weights).
  dropout_samples: M, the policy's forwards per objective evaluation (multi-sample dropout).
  input_passes: forward-backward passes of an input perturbation per objective evaluation
    (`adversarial_embeddings`: 1).
  """
  if reference_forwards is None:
    if reference not in REFERENCE_FORWARD:
      raise ValueError(
        f"flops.dpo_step_flops: unknown reference {reference!r}; allowed: "
        f"{sorted(REFERENCE_FORWARD)}, or pass reference_forwards=."
      )
    reference_forwards = REFERENCE_FORWARD[reference]
  if perturbation == "rwp":
    extra = int(rwp_steps)
  elif perturbation in PERTURBATION_PASSES:
    extra = PERTURBATION_PASSES[perturbation]
  else:
    raise ValueError(
      f"flops.dpo_step_flops: unknown perturbation {perturbation!r}; allowed: {sorted(PERTURBATION_PASSES) + ['rwp']}."
    )
  passes = (1 + extra) * (1 + int(input_passes))
  policy = int(dropout_samples) * (3 * passes + PERTURBATION_FORWARDS.get(perturbation, 0))
  return forward_flops(config, work).scaled(policy + int(reference_forwards))


# Attention entries ----------------------------------------------------------------------------


def dense_attention_entries(rows: int, length: int, *, query_block: int = 0) -> int:
  """Entries computed by dense masked attention over `rows` rows of `length` tokens: `L^2` per
  row; with causal query blocks of `query_block` tokens (rows longer than it), each block of
  queries `[s, e)` against keys `[0, e)`: `sum (e - s) e`."""
  L = int(length)
  if not query_block or L <= query_block:
    return int(rows) * L * L
  return int(rows) * sum((min(s + query_block, L) - s) * min(s + query_block, L) for s in range(0, L, query_block))


def block_sparse_attention_entries(num_block_pairs: int, block_size: int) -> int:
  """Entries computed by block-sparse attention: `block_size^2` per listed block pair."""
  return int(num_block_pairs) * int(block_size) ** 2


def useful_attention_entries(segment_ids, branch_ids=None) -> int:
  """Entries the mask allows (`pofx.kernels.SegmentMask`: same segment > 0, causal, compatible
  branch), summed over rows: the attention a perfect kernel would compute (numpy, host-side)."""
  seg = np.asarray(segment_ids)
  br = None if branch_ids is None else np.asarray(branch_ids)
  L = seg.shape[-1]
  causal = np.tril(np.ones((L, L), bool))
  total = 0
  for r in range(seg.shape[0]):
    m = (seg[r][:, None] == seg[r][None, :]) & (seg[r][:, None] > 0) & causal
    if br is not None:
      m &= (br[r][None, :] == 0) | (br[r][None, :] == br[r][:, None])
    total += int(m.sum())
  return total


def work_of_batch(
  batch: Mapping[str, Any],
  *,
  query_block: int = 128,
  head_on_all_positions: bool = False,
  compact_last_block: Optional[bool] = None,
  useful: bool = False,
) -> Work:
  """The `Work` of a train-step batch `{"pairs": PairBatch, "attention_blocks"?: ..., "scored_tokens"?: ...}`
  (shapes only, except with `useful`).

  pairs `[R, L]` rows; with `attention_blocks`, block-sparse entries, else dense ones with causal
  query blocks of `query_block` (0: full `L x L`); with `scored_tokens` (N entries) the head runs
  on N tokens, else on the `2 B T` completion slots (`head_on_all_positions`: on every `R x L`
  position, as a naive full-logits head does). `compact_last_block` (None: when the batch has
  scored tokens, as `pofx.models` runs it): the last block's output projection and MLP run on the
  N scored positions only. `useful`: count the entries the mask allows instead of the computed
  ones. Batches stacked on leading axes (micro-batches for gradient accumulation, per-device
  blocks) count every stacked batch: `tokens [..., R, L]`, block lists `[..., T]`, scored tokens
  `[..., N]`.
  """
  pairs = batch["pairs"]
  shape = np.shape(pairs.tokens)
  R, L = shape[-2:]
  stacked = int(np.prod(shape[:-2], dtype=np.int64))
  blocks, scored = batch.get("attention_blocks"), batch.get("scored_tokens")
  if useful:
    entries = useful_attention_entries(
      np.reshape(pairs.segment_ids, (-1, L)),
      None if pairs.branch_ids is None else np.reshape(pairs.branch_ids, (-1, L)),
    )
  elif blocks is not None:
    entries = block_sparse_attention_entries(np.size(blocks.query_block), blocks.block_size)
  else:
    entries = dense_attention_entries(stacked * R, L, query_block=query_block)
  scored_count = None if scored is None else int(np.size(scored.index))
  if head_on_all_positions:
    head_tokens = stacked * R * L
  elif scored is not None:
    head_tokens = scored_count
  else:
    head_tokens = int(np.size(pairs.chosen_targets) + np.size(pairs.rejected_targets))
  if compact_last_block is None:
    compact_last_block = scored is not None
  last = scored_count if compact_last_block and scored is not None else None
  return Work(
    tokens=int(stacked * R * L), head_tokens=int(head_tokens), attention_entries=int(entries), last_block_tokens=last
  )


# Accelerators' peaks ----------------------------------------------------------------------------

# Dense bf16 peak FLOP/s from the vendors' datasheets (NVIDIA prints the sparse figure, twice the
# dense one, with an asterisk; the dense one is used here). Matched in order, on lower-cased
# `device_kind` substrings, so the more specific names come first.
PEAK_BF16_FLOPS: Sequence[Tuple[Tuple[str, ...], str, float]] = (
  # NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS (SXM) and 1,513 (PCIe)
  # with sparsity, i.e. 989.4 and 756 dense.
  (("h100 pcie",), "NVIDIA H100 PCIe", 756e12),
  (("h100",), "NVIDIA H100 SXM", 989.4e12),
  # NVIDIA H200 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS (SXM) and 1,671 (NVL)
  # with sparsity, i.e. 989.4 and 835.5 dense.
  (("h200 nvl",), "NVIDIA H200 NVL", 835.5e12),
  (("h200",), "NVIDIA H200 SXM", 989.4e12),
  # NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), every form factor.
  (("a100",), "NVIDIA A100", 312e12),
  # Google Cloud TPU system architecture pages: peak bf16 compute per chip.
  (("tpu v6 lite", "tpu v6e"), "TPU v6e (Trillium)", 918e12),  # 918 TFLOPs
  (("tpu v5 lite", "tpu v5e", "tpu v5litepod"), "TPU v5e", 197e12),  # 197 TFLOPs
  (("tpu v5p", "tpu v5"), "TPU v5p", 459e12),  # 459 TFLOPs
  (("tpu v4",), "TPU v4", 275e12),  # 275 TFLOPs
)


def accelerator(device_kind: str) -> Optional[Tuple[str, float]]:
  """(name, dense bf16 peak FLOP/s) of the known accelerator `device_kind` names, else None."""
  kind = " ".join(str(device_kind).lower().split())
  for patterns, name, peak in PEAK_BF16_FLOPS:
    if any(p in kind for p in patterns):
      return name, peak
  return None


def peak_flops(device_kind: str) -> Optional[float]:
  """Dense bf16 peak FLOP/s of one `device_kind` device (`jax.devices()[0].device_kind`), or None."""
  known = accelerator(device_kind)
  return None if known is None else known[1]


def mfu(flops_per_second: float, device_kind: str, num_devices: int = 1) -> Optional[float]:
  """Model-FLOPs utilisation: `flops_per_second / (num_devices x peak_flops(device_kind))`;
  None where the device is not a known accelerator (e.g. CPUs)."""
  peak = peak_flops(device_kind)
  if peak is None or not np.isfinite(flops_per_second):
    return None
  return float(flops_per_second) / (int(num_devices) * peak)
