r"""Layouts of one preference batch for a single forward pass, built host-side with numpy.

Three layouts, all producing the same `PairBatch` record (so the train step is layout-agnostic):

(a) `fused`: `2B` rows, row `b` = `prompt_b + chosen_b`, row `B + b` = `prompt_b + rejected_b`
    (chosen and rejected concatenated along the batch axis). The prompt is processed twice.
(b) `prompt_shared`: one row per pair, `[prompt | chosen | rejected]`. Positions restart at the
    prompt length for the rejected completion (`p, p+1, ...`), and `branch_ids` (prompt 0,
    chosen 1, rejected 2) stop the rejected tokens from attending to the chosen ones, so each
    completion sees exactly `prompt + itself`, as in its own sequence. The prompt is processed
    once.
(c) `packed`: layout (b) for several pairs per row of a fixed length, separated by
    `segment_ids` (1, 2, ... per row; 0 = padding), first-fit in the given order.

Shift convention (causal LM): the output at position t predicts the token at t+1. So completion
token k (0-based) of a sequence whose completion starts at column s is scored from the output at
column `s + k - 1`. In the prompt-shared layouts the first rejected token is the exception: it is
predicted from the **last prompt position** (column `prompt_end - 1`), not from the last chosen
token that precedes it in the row; tokens k >= 1 of the rejected completion are predicted from
the rejected tokens before them. `PairBatch.chosen_index` / `rejected_index` hold, for each
completion token, the flat index `row * L + column` of the position that predicts it, so
`gather_completions(hidden, batch)` returns the right `[B, T, D]` hidden states and
`pofx.logprobs.pair_logps` turns them into `pofx.PairLogps`. (Gather *hidden states or logits*,
not next-token log-probs: one prompt position predicts two different tokens.)

Length bucketing: the row length L and the completion length T are rounded up with
`bucket_length` (to a multiple, or to the smallest of a few bucket lengths), so a run compiles a
handful of shapes. Records are never truncated: a pair longer than the largest bucket, an empty
prompt or an empty completion raises a ValueError naming the pair's index.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from pofx import sparse_attention
from pofx.options import LAYOUTS  # noqa: F401  (allowed values, defined once)

Bucket = Union[int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class PairBatch:
  """A preference batch laid out for one forward pass (a pytree of numpy/jax arrays).

  Model inputs (R rows of length L):
    tokens: `[R, L]` int32 (padding = `pad_id`).
    positions: `[R, L]` int32 RoPE positions (0 on padding).
    segment_ids: `[R, L]` int32, 0 = padding.
    branch_ids: `[R, L]` int32 (0 prompt/padding, 1 chosen, 2 rejected) for the prompt-shared
      layouts; None for `fused`.
  Completion tokens (B pairs, T = padded completion length):
    chosen_index, rejected_index: `[B, T]` int32 flat indices `row * L + column` of the positions
      whose outputs predict each completion token (0 where masked).
    chosen_targets, rejected_targets: `[B, T]` int32 completion token ids (0 where masked).
    chosen_mask, rejected_mask: `[B, T]` float32 0/1.
    pair_mask: `[B]` float32, 0 for padding pairs added by `num_pairs`.
  layout: "fused", "prompt_shared" or "packed" (static metadata).
  """

  tokens: np.ndarray
  positions: np.ndarray
  segment_ids: np.ndarray
  branch_ids: Optional[np.ndarray]
  chosen_index: np.ndarray
  chosen_targets: np.ndarray
  chosen_mask: np.ndarray
  rejected_index: np.ndarray
  rejected_targets: np.ndarray
  rejected_mask: np.ndarray
  pair_mask: np.ndarray
  layout: str = "fused"

  @property
  def num_pairs(self) -> int:
    return self.chosen_targets.shape[0]

  @property
  def model_inputs(self) -> dict:
    """Keyword arguments of `apply_fn`: tokens, positions, segment_ids, branch_ids."""
    return dict(tokens=self.tokens, positions=self.positions, segment_ids=self.segment_ids, branch_ids=self.branch_ids)

  def real_token_fraction(self) -> float:
    """Fraction of the `[R, L]` slots holding real tokens (host-side, numpy inputs only)."""
    return float(np.mean(np.asarray(self.segment_ids) > 0))


_DATA_FIELDS = [f.name for f in dataclasses.fields(PairBatch) if f.name != "layout"]
jax.tree_util.register_dataclass(PairBatch, data_fields=_DATA_FIELDS, meta_fields=["layout"])


def bucket_length(n: int, bucket: Bucket) -> int:
  """Rounds a length up: to a multiple of `bucket` (int), or to the smallest of the bucket
  lengths `bucket` (a sequence) that is >= n. Raises ValueError when n exceeds every bucket."""
  if isinstance(bucket, (int, np.integer)):
    if bucket < 1:
      raise ValueError(f"bucket_length: an integer bucket must be >= 1, got {bucket}.")
    return int(-(-max(int(n), 1) // int(bucket)) * int(bucket))
  sizes = sorted(int(b) for b in bucket)
  if not sizes:
    raise ValueError("bucket_length: empty bucket list.")
  for s in sizes:
    if s >= n:
      return s
  raise ValueError(f"length {n} exceeds the largest bucket {sizes[-1]} (buckets {sizes}).")


def gather_completions(outputs, batch: PairBatch):
  """Per-position model outputs `[R, L, ...]` -> (chosen `[B, T, ...]`, rejected `[B, T, ...]`).

  Row t of the result for completion token t is the output at the position that predicts it
  (see the module docstring). Works on hidden states or logits (jax or numpy arrays); entries
  where the mask is 0 are the output at flat index 0 (mask them).
  """
  R, L = outputs.shape[:2]
  flat = outputs.reshape((R * L,) + tuple(outputs.shape[2:]))
  take = jnp.take if isinstance(outputs, jax.Array) else np.take
  return (take(flat, batch.chosen_index, axis=0), take(flat, batch.rejected_index, axis=0))


def state_index(batch: PairBatch):
  """Flat indices `row * L + column` of each completion's states: (chosen `[B, T+1]`, rejected
  `[B, T+1]`), numpy or jax like the batch's index arrays.

  State `t < n` is the position that predicts completion token `t` (`chosen_index[:, t]`), and
  state `n` (n = the completion's token count) is the position of its last token: the output
  there is the next-token distribution after the whole completion. Every layout keeps a
  completion's tokens contiguous, so that position is `index[:, 0] + n` for the chosen
  completion and for a fused rejected one; in the prompt-shared layouts the rejected tokens
  follow the chosen ones, so it is `chosen end + n_rejected` there (the first rejected token is
  predicted from the prompt, not from the token before it). Entries past `n` are 0.
  """
  xp = jnp if isinstance(batch.chosen_index, jax.Array) else np
  out = []
  chosen_end = None
  for index, mask in ((batch.chosen_index, batch.chosen_mask), (batch.rejected_index, batch.rejected_mask)):
    n = xp.sum(xp.asarray(mask) > 0, axis=-1).astype(xp.int32)
    start = index[:, 0] if chosen_end is None or batch.layout == "fused" else chosen_end
    end = (start + n).astype(xp.int32)
    chosen_end = end if chosen_end is None else chosen_end
    B, T = index.shape
    states = xp.concatenate([xp.asarray(index, xp.int32), xp.zeros((B, 1), xp.int32)], axis=1)
    out.append(xp.where(xp.arange(T + 1)[None, :] == n[:, None], end[:, None], states).astype(xp.int32))
  return tuple(out)


def _validate(prompts, chosen, rejected):
  if not (len(prompts) == len(chosen) == len(rejected)):
    raise ValueError(
      f"prompts, chosen and rejected must have one entry per pair; got lengths "
      f"{len(prompts)}, {len(chosen)}, {len(rejected)}."
    )
  if not prompts:
    raise ValueError("empty batch: no pairs given.")
  out = []
  for i, triple in enumerate(zip(prompts, chosen, rejected)):
    arrs = []
    for name, seq in zip(("prompt", "chosen", "rejected"), triple):
      a = np.asarray(seq)
      if a.ndim != 1 or a.size == 0:
        raise ValueError(f"pair {i}: the {name} must be a non-empty 1-D sequence of token ids, got shape {a.shape}.")
      if not np.issubdtype(a.dtype, np.integer) or a.min() < 0:
        raise ValueError(f"pair {i}: the {name} must hold non-negative integer token ids.")
      arrs.append(a.astype(np.int32))
    out.append(tuple(arrs))
  return out


def _completion_arrays(n_pairs, T):
  return (np.zeros((n_pairs, T), np.int32), np.zeros((n_pairs, T), np.int32), np.zeros((n_pairs, T), np.float32))


def _num_pairs(n, num_pairs):
  if num_pairs is None:
    return n
  if num_pairs < n:
    raise ValueError(f"num_pairs={num_pairs} is smaller than the {n} pairs given.")
  return int(num_pairs)


def fused(
  prompts,
  chosen,
  rejected,
  *,
  seq_bucket: Bucket = 64,
  completion_bucket: Bucket = 16,
  num_pairs: Optional[int] = None,
  pad_id: int = 0,
) -> PairBatch:
  """Layout (a): `[2B, L]`, chosen rows `0..B-1` (`prompt + chosen`), rejected rows `B..2B-1`.

  Args:
    prompts, chosen, rejected: sequences (one per pair) of 1-D integer token-id sequences.
    seq_bucket: bucket spec (`bucket_length`) of the row length L = max(p + c, p + r).
    completion_bucket: bucket spec of T = the longest completion.
    num_pairs: pad the batch to this many pairs (padding pairs: all-padding rows, masks 0).
    pad_id: token id of padding.
  """
  pairs = _validate(prompts, chosen, rejected)
  B = _num_pairs(len(pairs), num_pairs)
  L = bucket_length(max(len(p) + max(len(c), len(r)) for p, c, r in pairs), seq_bucket)
  T = bucket_length(max(max(len(c), len(r)) for _, c, r in pairs), completion_bucket)
  tokens = np.full((2 * B, L), pad_id, np.int32)
  positions = np.zeros((2 * B, L), np.int32)
  segs = np.zeros((2 * B, L), np.int32)
  comp = {"chosen": _completion_arrays(B, T), "rejected": _completion_arrays(B, T)}
  for b, (p, c, r) in enumerate(pairs):
    for row, (name, y) in ((b, ("chosen", c)), (B + b, ("rejected", r))):
      seq = np.concatenate([p, y])
      n = len(seq)
      tokens[row, :n] = seq
      positions[row, :n] = np.arange(n)
      segs[row, :n] = 1
      index, targets, mask = comp[name]
      k = np.arange(len(y))
      index[b, k] = row * L + len(p) + k - 1
      targets[b, k] = y
      mask[b, k] = 1.0
  pair_mask = (np.arange(B) < len(pairs)).astype(np.float32)
  return PairBatch(tokens, positions, segs, None, *comp["chosen"], *comp["rejected"], pair_mask, layout="fused")


def _place(pairs, placements, R, L, T, B, pad_id, layout):
  """Writes pairs at (row, column offset, segment id) in the prompt-shared form."""
  tokens = np.full((R, L), pad_id, np.int32)
  positions = np.zeros((R, L), np.int32)
  segs = np.zeros((R, L), np.int32)
  branches = np.zeros((R, L), np.int32)
  c_idx, c_tgt, c_mask = _completion_arrays(B, T)
  r_idx, r_tgt, r_mask = _completion_arrays(B, T)
  for b, ((p, c, r), (row, o, seg)) in enumerate(zip(pairs, placements)):
    P, C, Rn = len(p), len(c), len(r)
    n = P + C + Rn
    tokens[row, o : o + n] = np.concatenate([p, c, r])
    positions[row, o : o + n] = np.concatenate([np.arange(P + C), P + np.arange(Rn)])
    segs[row, o : o + n] = seg
    branches[row, o + P : o + P + C] = 1
    branches[row, o + P + C : o + n] = 2
    base = row * L + o
    k = np.arange(C)
    c_idx[b, k] = base + P + k - 1
    c_tgt[b, k] = c
    c_mask[b, k] = 1.0
    k = np.arange(Rn)
    # First rejected token: predicted from the last prompt position (P - 1), not the last chosen.
    r_idx[b, k] = np.where(k == 0, base + P - 1, base + P + C + k - 1)
    r_tgt[b, k] = r
    r_mask[b, k] = 1.0
  pair_mask = (np.arange(B) < len(pairs)).astype(np.float32)
  return PairBatch(
    tokens, positions, segs, branches, c_idx, c_tgt, c_mask, r_idx, r_tgt, r_mask, pair_mask, layout=layout
  )


def prompt_shared(
  prompts,
  chosen,
  rejected,
  *,
  seq_bucket: Bucket = 64,
  completion_bucket: Bucket = 16,
  num_pairs: Optional[int] = None,
  pad_id: int = 0,
) -> PairBatch:
  """Layout (b): `[B, L]`, one row `[prompt | chosen | rejected]` per pair (see module docstring).

  L = bucket of max(p + c + r); other arguments as in `fused`. Padding pairs are empty rows.
  """
  pairs = _validate(prompts, chosen, rejected)
  B = _num_pairs(len(pairs), num_pairs)
  L = bucket_length(max(len(p) + len(c) + len(r) for p, c, r in pairs), seq_bucket)
  T = bucket_length(max(max(len(c), len(r)) for _, c, r in pairs), completion_bucket)
  placements = [(b, 0, 1) for b in range(len(pairs))]
  return _place(pairs, placements, B, L, T, B, pad_id, "prompt_shared")


def packed(
  prompts,
  chosen,
  rejected,
  *,
  row_length: Optional[int] = None,
  num_rows: Optional[int] = None,
  rows_bucket: Bucket = 1,
  length_bucket: Bucket = 64,
  completion_bucket: Bucket = 16,
  num_pairs: Optional[int] = None,
  pad_id: int = 0,
) -> PairBatch:
  """Layout (c): several prompt-shared pairs per row, told apart by `segment_ids` (1, 2, ...
  within a row).

  With `row_length` (fixed L, so the shape does not depend on the data), pairs go, in order, to
  the first row with room. With `row_length=None`, the pairs are spread over `num_rows` rows
  (default 1), each to the least-filled row, and L is the longest row's fill rounded up by
  `length_bucket`: the only padding is at the rows' ends, under one bucket step. That suits
  block-sparse attention (`pofx.sparse_attention`), which costs what the pairs' masks use, not
  L^2 per row; with dense attention prefer a fixed `row_length`. Use `num_rows` = the number of
  data-parallel devices (rows are what the batch is sharded over).

  Args:
    row_length: L, or None (see above).
    num_rows: fixed row count R (ValueError if the pairs do not fit); None: the rows used,
      rounded up by `rows_bucket` (fixed `row_length`), or 1 (`row_length=None`).
    length_bucket: rounding of L when `row_length` is None (an int multiple or bucket lengths,
      e.g. `geometric_buckets(...)`; keep them multiples of the attention block size).
    Others as in `fused`.
  """
  pairs = _validate(prompts, chosen, rejected)
  B = _num_pairs(len(pairs), num_pairs)
  T = bucket_length(max(max(len(c), len(r)) for _, c, r in pairs), completion_bucket)
  sizes = [len(p) + len(c) + len(r) for p, c, r in pairs]
  placements = []
  if row_length is None:
    R = 1 if num_rows is None else int(num_rows)
    if R < 1:
      raise ValueError(f"packed: num_rows must be >= 1, got {num_rows}.")
    fill, count = [0] * R, [0] * R
    for n in sizes:
      row = min(range(R), key=lambda j: fill[j])
      count[row] += 1
      placements.append((row, fill[row], count[row]))
      fill[row] += n
    return _place(pairs, placements, R, bucket_length(max(fill), length_bucket), T, B, pad_id, "packed")
  fill, count = [], []
  for i, n in enumerate(sizes):
    if n > row_length:
      raise ValueError(f"pair {i}: prompt + chosen + rejected = {n} tokens exceeds row_length {row_length}.")
    row = next((j for j, f in enumerate(fill) if f + n <= row_length), None)
    if row is None:
      row = len(fill)
      fill.append(0)
      count.append(0)
    count[row] += 1
    placements.append((row, fill[row], count[row]))
    fill[row] += n
  if num_rows is None:
    R = bucket_length(len(fill), rows_bucket)
  else:
    if len(fill) > num_rows:
      raise ValueError(f"the {len(pairs)} pairs need {len(fill)} rows of length {row_length}; num_rows={num_rows}.")
    R = int(num_rows)
  return _place(pairs, placements, R, int(row_length), T, B, pad_id, "packed")


@dataclasses.dataclass(frozen=True)
class ScoredTokens:
  """The real completion tokens of a `PairBatch`, compacted (host-built by `scored_tokens`).

  index: `[N]` int32 flat positions `row * L + column` whose outputs predict a real (mask 1)
    completion token: chosen tokens first (pair by pair), then rejected ones; padding entries 0.
  slot: `[N]` int32 where each one goes in the concatenated completion slots `[chosen [B, T] |
    rejected [B, T]]` flattened (`b * T + t`, rejected offset by `B * T`); padding entries hold
    `2 * B * T`, one past the end (dropped).
  N is the real-token count rounded up to the bucket, so the LM head runs on real tokens only
  instead of every `[B, T]` slot (padded completions can be half the slots).
  """

  index: np.ndarray
  slot: np.ndarray


jax.tree_util.register_dataclass(ScoredTokens, data_fields=["index", "slot"], meta_fields=[])


def scored_tokens(batch: PairBatch, *, bucket: Bucket = 128) -> ScoredTokens:
  """`ScoredTokens` of `batch` (numpy): pass them as `batch["scored_tokens"]` next to the pairs
  and `pofx.policy.make_logps_fn` scores only those (same `PairLogps`). The token count is
  rounded up by `bucket_length(n, bucket)`."""
  B, T = np.shape(batch.chosen_targets)
  if np.shape(batch.rejected_targets) != (B, T):
    raise ValueError(
      "scored_tokens: chosen and rejected completions must share the padded length T "
      f"(got {np.shape(batch.chosen_targets)} and {np.shape(batch.rejected_targets)})."
    )
  masks = np.concatenate([np.asarray(batch.chosen_mask).reshape(-1), np.asarray(batch.rejected_mask).reshape(-1)])
  indices = np.concatenate([np.asarray(batch.chosen_index).reshape(-1), np.asarray(batch.rejected_index).reshape(-1)])
  slot = np.flatnonzero(masks > 0).astype(np.int32)
  n = bucket_length(max(len(slot), 1), bucket)
  out_index = np.zeros(n, np.int32)
  out_slot = np.full(n, 2 * B * T, np.int32)
  out_index[: len(slot)] = indices[slot]
  out_slot[: len(slot)] = slot
  return ScoredTokens(out_index, out_slot)


def geometric_buckets(largest: int, *, per_doubling: int = 8, smallest: int = 8) -> list:
  """Bucket lengths `m * 2^k` (m = per_doubling ... 2 per_doubling - 1) from `smallest` up to
  the first >= `largest`: padding stays under 1 / per_doubling of the length, with few shapes."""
  if per_doubling < 1 or smallest < 1 or largest < 1:
    raise ValueError(f"geometric_buckets: arguments must be >= 1, got {largest}, {per_doubling}, {smallest}.")
  sizes, k = [], 0
  while not sizes or sizes[-1] < largest:
    sizes.extend(m << k for m in range(per_doubling, 2 * per_doubling) if (m << k) >= smallest)
    k += 1
  return sizes


def attention_blocks(batch: PairBatch, *, block_size: int = 64, bucket: Bucket = 8):
  """The block pairs of `batch`'s attention mask to compute (`pofx.sparse_attention`).

  Pass them with the batch, `{"pairs": batch, "attention_blocks": attention_blocks(batch)}`, and
  the policy's forward computes attention only there (`pofx.policy.make_logps_fn`). The row
  length must be a multiple of `block_size` (choose `seq_bucket` / `row_length` accordingly).
  `bucket`: the pair count is rounded up by `bucket_length` (a multiple, or e.g.
  `geometric_buckets(...)`).
  """
  return sparse_attention.attention_blocks(
    batch.segment_ids, batch.branch_ids, block_size=block_size, bucket=lambda n: bucket_length(n, bucket)
  )


def pad_index_lists(batches):
  """Pads the `attention_blocks` and `scored_tokens` of several batch dicts to common lengths.

  Batches that are stacked (micro-batches for gradient accumulation, per-device batches for
  `shard_map` / `pmap`) need equal shapes, but each batch's lists are rounded from its own
  counts. This extends every list to the longest one with entries that contribute nothing: block
  pairs `R * (L // block_size)` (one past the last block) and scored tokens index 0 / slot
  `2 * B * T` (one past the last slot), read from each batch's own `pairs`. Other keys are
  returned unchanged (new dicts; the inputs are not modified).
  """
  batches = [dict(b) for b in batches]
  if any(
    ("attention_blocks" in b) != ("attention_blocks" in batches[0])
    or ("scored_tokens" in b) != ("scored_tokens" in batches[0])
    for b in batches
  ):
    raise ValueError("pad_index_lists: some batches carry attention_blocks / scored_tokens and others do not.")
  if batches and "attention_blocks" in batches[0]:
    size = max(b["attention_blocks"].num_pairs for b in batches)
    for b in batches:
      blocks, (R, L) = b["attention_blocks"], np.shape(b["pairs"].segment_ids)
      pad = size - blocks.num_pairs
      end = R * (L // blocks.block_size)
      b["attention_blocks"] = sparse_attention.AttentionBlocks(
        np.concatenate([np.asarray(blocks.query_block, np.int32), np.full(pad, end, np.int32)]),
        np.concatenate([np.asarray(blocks.key_block, np.int32), np.full(pad, end, np.int32)]),
        blocks.block_size,
      )
  if batches and "scored_tokens" in batches[0]:
    size = max(len(b["scored_tokens"].index) for b in batches)
    for b in batches:
      scored, (B, T) = b["scored_tokens"], np.shape(b["pairs"].chosen_targets)
      pad = size - len(scored.index)
      b["scored_tokens"] = ScoredTokens(
        np.concatenate([np.asarray(scored.index, np.int32), np.zeros(pad, np.int32)]),
        np.concatenate([np.asarray(scored.slot, np.int32), np.full(pad, 2 * B * T, np.int32)]),
      )
  return batches


def build(layout: str, prompts, chosen, rejected, **kwargs) -> PairBatch:
  """Dispatches to `fused`, `prompt_shared` or `packed` by name."""
  fns = {"fused": fused, "prompt_shared": prompt_shared, "packed": packed}
  if layout not in fns:
    raise ValueError(f"Unknown batch layout {layout!r}; allowed: {list(LAYOUTS)}.")
  return fns[layout](prompts, chosen, rejected, **kwargs)
