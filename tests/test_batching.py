"""Batch layouts for one forward pass: hand-built expected arrays, bucketing, bad records, and the
central check that fused, prompt-shared and packed layouts give the same per-token log-probs and
the same DPO gradients as scoring each sequence alone (float64 numpy log-softmax of the tiny
model's logits, with the causal shift written out by hand)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx import batching, logprobs
from pofx.models import llama

# Two pairs small enough to lay out by hand.
P2 = [[5, 6], [11]]
C2 = [[7, 8, 9], [12]]
R2 = [[10], [13, 14]]


def test_fused_layout_by_hand():
  b = batching.fused(P2, C2, R2, seq_bucket=1, completion_bucket=1)
  assert b.layout == "fused" and b.branch_ids is None and b.num_pairs == 2
  np.testing.assert_array_equal(b.tokens, [[5, 6, 7, 8, 9], [11, 12, 0, 0, 0], [5, 6, 10, 0, 0], [11, 13, 14, 0, 0]])
  np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(b.positions, [[0, 1, 2, 3, 4], [0, 1, 0, 0, 0], [0, 1, 2, 0, 0], [0, 1, 2, 0, 0]])
  # Completion token k at column p + k is predicted by column p + k - 1 (flat index row * 5 + col).
  np.testing.assert_array_equal(b.chosen_index, [[1, 2, 3], [5, 0, 0]])
  np.testing.assert_array_equal(b.chosen_targets, [[7, 8, 9], [12, 0, 0]])
  np.testing.assert_array_equal(b.chosen_mask, [[1, 1, 1], [1, 0, 0]])
  np.testing.assert_array_equal(b.rejected_index, [[11, 0, 0], [15, 16, 0]])
  np.testing.assert_array_equal(b.rejected_targets, [[10, 0, 0], [13, 14, 0]])
  np.testing.assert_array_equal(b.rejected_mask, [[1, 0, 0], [1, 1, 0]])
  np.testing.assert_array_equal(b.pair_mask, [1, 1])


def test_prompt_shared_layout_by_hand():
  b = batching.prompt_shared(P2, C2, R2, seq_bucket=1, completion_bucket=1)
  np.testing.assert_array_equal(b.tokens, [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
  # Rejected positions continue from the prompt length, not from the chosen end.
  np.testing.assert_array_equal(b.positions, [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]])
  np.testing.assert_array_equal(b.segment_ids, [[1] * 6, [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(b.branch_ids, [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(b.chosen_index, [[1, 2, 3], [6, 0, 0]])
  # First rejected token predicted from the last prompt position (col 1 / col 0 of row 1 = 6).
  np.testing.assert_array_equal(b.rejected_index, [[1, 0, 0], [6, 8, 0]])
  np.testing.assert_array_equal(b.rejected_targets, [[10, 0, 0], [13, 14, 0]])


def test_packed_layout_by_hand():
  b = batching.packed(P2, C2, R2, row_length=10, completion_bucket=1)
  assert b.tokens.shape == (1, 10)
  np.testing.assert_array_equal(b.tokens, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
  np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
  np.testing.assert_array_equal(b.positions, [[0, 1, 2, 3, 4, 2, 0, 1, 1, 2]])
  np.testing.assert_array_equal(b.branch_ids, [[0, 0, 1, 1, 1, 2, 0, 1, 2, 2]])
  np.testing.assert_array_equal(b.chosen_index, [[1, 2, 3], [6, 0, 0]])
  np.testing.assert_array_equal(b.rejected_index, [[1, 0, 0], [6, 8, 0]])
  # Rows of 6: pair 1 (4 tokens) does not fit after pair 0 (6 tokens) -> second row; num_rows pads.
  b = batching.packed(P2, C2, R2, row_length=6, num_rows=3, completion_bucket=1)
  assert b.tokens.shape == (3, 6)
  np.testing.assert_array_equal(b.segment_ids[2], 0)
  np.testing.assert_array_equal(b.rejected_index[1, :2], [6, 8])


def test_packed_auto_length_by_hand():
  # row_length=None: every pair in one row, L = the fill (10) rounded up by length_bucket.
  b = batching.packed(P2, C2, R2, length_bucket=4, completion_bucket=1)
  assert b.tokens.shape == (1, 12)
  np.testing.assert_array_equal(b.tokens, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0, 0]])
  np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
  np.testing.assert_array_equal(b.positions, [[0, 1, 2, 3, 4, 2, 0, 1, 1, 2, 0, 0]])
  np.testing.assert_array_equal(b.branch_ids, [[0, 0, 1, 1, 1, 2, 0, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(b.rejected_index, [[1, 0, 0], [6, 8, 0]])
  # Bucket lengths (a sequence): the smallest >= 10.
  assert batching.packed(P2, C2, R2, length_bucket=(8, 16, 32)).tokens.shape == (1, 16)
  # Two rows: each pair to the least-filled row (pair 0 -> row 0, pair 1 -> row 1), L = 6.
  b = batching.packed(P2, C2, R2, num_rows=2, length_bucket=1, completion_bucket=1)
  np.testing.assert_array_equal(b.tokens, [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
  np.testing.assert_array_equal(b.segment_ids, [[1] * 6, [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(b.chosen_index, [[1, 2, 3], [6, 0, 0]])
  np.testing.assert_array_equal(b.rejected_index, [[1, 0, 0], [6, 8, 0]])
  # Three pairs over two rows: the third goes to the emptier row 1 (fills 6 and 4).
  b = batching.packed(P2 + [[1]], C2 + [[2]], R2 + [[3]], num_rows=2, length_bucket=1, completion_bucket=1)
  np.testing.assert_array_equal(b.tokens, [[5, 6, 7, 8, 9, 10, 0], [11, 12, 13, 14, 1, 2, 3]])
  np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 2, 2, 2]])
  with pytest.raises(ValueError, match="num_rows must be >= 1"):
    batching.packed(P2, C2, R2, num_rows=0)


def test_bucket_length():
  assert batching.bucket_length(1, 64) == 64
  assert batching.bucket_length(64, 64) == 64
  assert batching.bucket_length(65, 64) == 128
  assert batching.bucket_length(100, (512, 128, 256)) == 128
  assert batching.bucket_length(128, (128, 256)) == 128
  with pytest.raises(ValueError, match="exceeds the largest bucket 256"):
    batching.bucket_length(300, (128, 256))
  with pytest.raises(ValueError, match=">= 1"):
    batching.bucket_length(3, 0)


def test_bucketed_shapes_and_padding_pairs():
  rng = np.random.default_rng(0)
  shapes = set()
  for _ in range(20):
    n = [int(x) for x in rng.integers(1, 40, 9)]
    P = [rng.integers(0, 50, n[i]) for i in range(3)]
    C = [rng.integers(0, 50, n[3 + i]) for i in range(3)]
    R = [rng.integers(0, 50, n[6 + i]) for i in range(3)]
    b = batching.prompt_shared(P, C, R, seq_bucket=(32, 64, 128), completion_bucket=16, num_pairs=4)
    shapes.add((b.tokens.shape, b.chosen_mask.shape))
    np.testing.assert_array_equal(b.pair_mask, [1, 1, 1, 0])
    np.testing.assert_array_equal(b.chosen_mask[3], 0)
    np.testing.assert_array_equal(b.segment_ids[3], 0)
    np.testing.assert_array_equal(b.chosen_mask.sum(1)[:3], n[3:6])
    np.testing.assert_array_equal(b.rejected_mask.sum(1)[:3], n[6:9])
  assert len(shapes) <= 6, shapes  # 3 row buckets x 3 completion buckets at most, far fewer than 20
  for L, T in ((s[0][1], s[1][1]) for s in shapes):
    assert L in (32, 64, 128) and T % 16 == 0


def test_bad_records_raise_with_index():
  with pytest.raises(ValueError, match="pair 1: the chosen must be a non-empty"):
    batching.fused([[1], [2]], [[3], []], [[4], [5]])
  with pytest.raises(ValueError, match="pair 0: the prompt must be a non-empty"):
    batching.prompt_shared([[]], [[3]], [[4]])
  with pytest.raises(ValueError, match="non-negative integer"):
    batching.fused([[1]], [[-3]], [[4]])
  with pytest.raises(ValueError, match="one entry per pair"):
    batching.fused([[1], [2]], [[3]], [[4]])
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    batching.fused([[1] * 10], [[3] * 10], [[4]], seq_bucket=(16,))
  with pytest.raises(ValueError, match="pair 0: prompt \\+ chosen \\+ rejected = 9 tokens"):
    batching.packed([[1] * 3], [[2] * 3], [[3] * 3], row_length=8)
  with pytest.raises(ValueError, match="num_rows=1"):
    batching.packed(P2, C2, R2, row_length=6, num_rows=1)
  with pytest.raises(ValueError, match="num_pairs=1"):
    batching.fused(P2, C2, R2, num_pairs=1)
  with pytest.raises(ValueError, match="layout"):
    batching.build("interleaved", P2, C2, R2)


def test_gather_completions_numpy():
  b = batching.prompt_shared(P2, C2, R2, seq_bucket=1, completion_bucket=1)
  out = np.arange(2 * 6 * 2).reshape(2, 6, 2)
  c, r = batching.gather_completions(out, b)
  assert c.shape == (2, 3, 2)
  np.testing.assert_array_equal(c[0, :, 0], [2, 4, 6])  # flat positions 1, 2, 3
  np.testing.assert_array_equal(r[1, :2, 0], [12, 16])  # flat positions 6, 8


# --- The central equivalence on the tiny model -------------------------------------------------

CFG = llama.tiny()
# Unequal lengths everywhere; pair 1 has a one-token prompt and completions of different lengths.
PROMPTS = [[3, 17, 42, 8], [61], [5, 9, 33, 71, 2, 14, 90]]
CHOSEN = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]]
REJECTED = [[41, 42], [51, 52, 53, 54, 55, 56], [66, 67, 68, 69]]
BETA = 0.5


def _layouts():
  return {
    "fused": batching.fused(PROMPTS, CHOSEN, REJECTED, seq_bucket=(16, 32), completion_bucket=8),
    "prompt_shared": batching.prompt_shared(PROMPTS, CHOSEN, REJECTED, seq_bucket=8, completion_bucket=4, num_pairs=4),
    "packed": batching.packed(PROMPTS, CHOSEN, REJECTED, row_length=24, num_rows=3, completion_bucket=8),
    "packed_one_row": batching.packed(PROMPTS, CHOSEN, REJECTED, length_bucket=16, completion_bucket=8),
  }


def _forward(params, batch):
  h = llama.apply_fn(params, batch.tokens, batch.positions, batch.segment_ids, batch.branch_ids, config=CFG)
  return logprobs.pair_logps(
    h, llama.lm_head(params, CFG), batch, chunk_size=16, with_log_sum_sq_probs=True, with_entropy=True
  )


def _dpo(params, batch):
  pair, _ = _forward(params, batch)
  per_pair = jax.nn.softplus(-BETA * (pair.chosen - pair.rejected))
  mask = jnp.asarray(batch.pair_mask)
  return jnp.sum(mask * per_pair) / jnp.sum(mask)


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def reference(params):
  """Each sequence scored alone by a plain causal forward (right-padded with real tokens, which a
  causal model never looks back at), float64 numpy log-softmax, shift written out by hand."""
  seqs = [list(p) + list(y) for p, c, r in zip(PROMPTS, CHOSEN, REJECTED) for y in (c, r)]
  L = max(map(len, seqs))
  tokens = np.array([s + [1] * (L - len(s)) for s in seqs])
  logits = jax.jit(llama.make(CFG).logits)(params, tokens, np.tile(np.arange(L), (len(seqs), 1)), np.ones_like(tokens))
  z = np.asarray(logits, np.float64)
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  out = {"chosen": [], "rejected": [], "chosen_lss": [], "rejected_lss": [], "chosen_ent": [], "rejected_ent": []}
  for i, s in enumerate(seqs):
    name = "chosen" if i % 2 == 0 else "rejected"
    p = len(PROMPTS[i // 2])
    cols = np.arange(p - 1, len(s) - 1)  # the output at t predicts token t + 1
    out[name].append(logp[i, cols, np.array(s)[cols + 1]])
    out[name + "_lss"].append(np.log(np.exp(2 * logp[i, cols]).sum(-1)))
    out[name + "_ent"].append(-(np.exp(logp[i, cols]) * logp[i, cols]).sum(-1))
  return out


@pytest.mark.parametrize("layout", ["fused", "prompt_shared", "packed", "packed_one_row"])
def test_layouts_match_each_sequence_alone(params, reference, layout):
  batch = _layouts()[layout]
  pair, ents = jax.jit(_forward)(params, batch)
  assert isinstance(pair, pofx.PairLogps)
  for name in ("chosen", "rejected"):
    tok = np.asarray(getattr(pair, name + "_token_logps"))
    lss = np.asarray(getattr(pair, name + "_log_sum_sq_probs"))
    ent = np.asarray(ents[name])
    mask = np.asarray(getattr(pair, name + "_mask"))
    for b, ref in enumerate(reference[name]):
      n = len(ref)
      np.testing.assert_array_equal(mask[b, :n], 1)
      np.testing.assert_array_equal(mask[b, n:], 0)
      np.testing.assert_allclose(tok[b, :n], ref, atol=1e-5, rtol=1e-5, err_msg=f"{layout} {name} {b}")
      np.testing.assert_allclose(lss[b, :n], reference[name + "_lss"][b], atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(ent[b, :n], reference[name + "_ent"][b], atol=1e-5, rtol=1e-5)
      np.testing.assert_array_equal(tok[b, n:], 0.0)
      np.testing.assert_allclose(getattr(pair, name)[b], ref.sum(), atol=2e-5, rtol=1e-5)
      assert float(getattr(pair, name + "_len")[b]) == n
  if layout == "prompt_shared":  # the padding pair (num_pairs=4)
    assert float(pair.chosen[3]) == 0.0 and float(pair.chosen_len[3]) == 0.0


def test_prompt_shared_and_packed_gradients_equal_fused(params):
  batches = _layouts()
  grad = jax.jit(jax.value_and_grad(_dpo))
  v0, g0 = grad(params, batches["fused"])
  assert np.isfinite(float(v0))
  leaves0 = jax.tree.leaves(g0)
  assert max(float(jnp.max(jnp.abs(g))) for g in leaves0) > 1e-3  # a non-trivial gradient
  for layout in ("prompt_shared", "packed", "packed_one_row"):
    v1, g1 = grad(params, batches[layout])
    np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), leaves0):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=layout)


def test_dropping_the_branch_mask_changes_rejected_logps(params):
  # Sanity check that the comparison above can fail: without branch_ids the rejected tokens of
  # the prompt-shared row see the chosen tokens and their log-probs change.
  batch = _layouts()["prompt_shared"]
  pair, _ = jax.jit(_forward)(params, batch)
  leaky = dataclasses.replace(batch, branch_ids=np.zeros_like(batch.branch_ids))
  pair2, _ = jax.jit(_forward)(params, leaky)
  np.testing.assert_allclose(pair2.chosen, pair.chosen, atol=1e-5)
  assert np.max(np.abs(np.asarray(pair2.rejected - pair.rejected))) > 1e-3
