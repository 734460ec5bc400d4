"""Block-sparse attention: the host-built block list by hand and against a brute-force scan of the
mask, and the model's outputs and gradients with block-sparse attention against its dense masked
attention (an independent implementation: `jax.nn.softmax` over the full `[L, L]` scores of
`pofx.kernels.xla_attention` and autodiff), for every batch layout, several block sizes, float32
and bfloat16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import batching, kernels, policy, sparse_attention
from pofx.models import llama


def _pairs(seed, n, max_p=9, max_c=11, vocab=97):
  rng = np.random.default_rng(seed)
  ids = lambda k: rng.integers(1, vocab, k).tolist()
  lens = [(int(rng.integers(1, max_p)), int(rng.integers(1, max_c)), int(rng.integers(1, max_c))) for _ in range(n)]
  return [ids(p) for p, _, _ in lens], [ids(c) for _, c, _ in lens], [ids(r) for _, _, r in lens]


def test_block_list_by_hand():
  # One prompt-shared row [p p | c c | r r] of 6 tokens + 2 padding, blocks of 2:
  # block 0 = prompt, 1 = chosen, 2 = rejected, 3 = padding.
  b = batching.prompt_shared([[1, 2]], [[3, 4]], [[5, 6]], seq_bucket=8, completion_bucket=1)
  blocks = sparse_attention.attention_blocks(b.segment_ids, b.branch_ids, block_size=2, bucket=4)
  # prompt->prompt, chosen->prompt, chosen->chosen, rejected->prompt, rejected->rejected; no
  # rejected->chosen, nothing for the padding block. Padding entries point one past (4).
  np.testing.assert_array_equal(blocks.query_block, [0, 1, 1, 2, 2, 4, 4, 4])
  np.testing.assert_array_equal(blocks.key_block, [0, 0, 1, 0, 2, 4, 4, 4])
  assert blocks.block_size == 2 and blocks.num_pairs == 8


@pytest.mark.parametrize("layout", ["fused", "prompt_shared", "packed"])
def test_block_list_covers_exactly_the_used_blocks(layout):
  p, c, r = _pairs(0, 7)
  kw = dict(row_length=48) if layout == "packed" else dict(seq_bucket=8)
  b = batching.build(layout, p, c, r, completion_bucket=4, **kw)
  bs = 8
  blocks = sparse_attention.attention_blocks(b.segment_ids, b.branch_ids, block_size=bs, bucket=1)
  R, L = b.tokens.shape
  nb = L // bs
  mask = np.asarray(kernels.attention_mask(b.segment_ids, b.branch_ids)) & (b.segment_ids > 0)[:, :, None]
  expected = {
    (row * nb + i, row * nb + j)
    for row in range(R)
    for i in range(nb)
    for j in range(nb)
    if mask[row, i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].any()
  }
  got = list(zip(blocks.query_block.tolist(), blocks.key_block.tolist()))
  assert len(got) == len(set(got)) and set(got) == expected
  assert got == sorted(got)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_list_on_arbitrary_segments_and_branches(seed):
  # Not only the layouts' contiguous runs: scattered segment ids, padding anywhere, branch ids
  # with gaps and negative values. Brute force over the full mask as the reference.
  rng = np.random.default_rng(seed)
  R, L, bs = 3, 48, 8
  seg = rng.integers(0, 4, (R, L))
  br = rng.choice([-3, 0, 0, 2, 7], (R, L))
  blocks = sparse_attention.attention_blocks(seg, br, block_size=bs, bucket=1)
  mask = np.asarray(kernels.attention_mask(seg, br)) & (seg > 0)[:, :, None]
  nb = L // bs
  expected = sorted(
    (r * nb + i, r * nb + j)
    for r in range(R)
    for i in range(nb)
    for j in range(nb)
    if mask[r, i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].any()
  )
  got = list(zip(blocks.query_block.tolist(), blocks.key_block.tolist()))
  assert got == expected


def test_bad_row_length_and_arguments():
  b = batching.prompt_shared([[1, 2]], [[3]], [[4]], seq_bucket=6, completion_bucket=1)
  with pytest.raises(ValueError, match="multiple of block_size 4"):
    sparse_attention.attention_blocks(b.segment_ids, b.branch_ids, block_size=4)
  with pytest.raises(ValueError, match="block_size and bucket must be >= 1"):
    sparse_attention.attention_blocks(b.segment_ids, b.branch_ids, block_size=0)
  with pytest.raises(ValueError, match=r"must be \[R, L\]"):
    sparse_attention.attention_blocks(np.ones(5, np.int32))


@functools.cache
def _params(dtype, seed):
  """`llama.init_params(llama.tiny(dtype=dtype), jax.random.key(seed))`, made once per module
  (each call of init_params traces the model again; the tests only read them)."""
  return llama.init_params(llama.tiny(dtype=dtype), jax.random.key(seed))


def _model_and_batch(layout, block_size, dtype="float32", seed=0, n=6):
  config = llama.tiny(dtype=dtype)
  params = _params(dtype, seed)
  p, c, r = _pairs(seed + 1, n)
  bucket = max(block_size, 8)
  if layout == "packed_one_row":  # every pair in one row, its length a multiple of the block size
    b = batching.packed(p, c, r, length_bucket=block_size, completion_bucket=4)
    assert b.tokens.shape[0] == 1
    return config, params, b, batching.attention_blocks(b, block_size=block_size, bucket=4)
  kw = dict(row_length=4 * bucket) if layout == "packed" else dict(seq_bucket=bucket)
  b = batching.build(layout, p, c, r, completion_bucket=4, **kw)
  blocks = batching.attention_blocks(b, block_size=block_size, bucket=4)
  return config, params, b, blocks


@pytest.mark.parametrize(
  "layout,block_size",
  [("fused", 8), ("prompt_shared", 8), ("prompt_shared", 4), ("packed", 8), ("packed", 16), ("packed_one_row", 8)],
)
def test_hidden_states_match_dense_attention(layout, block_size):
  config, params, b, blocks = _model_and_batch(layout, block_size)
  dense = jax.jit(functools.partial(llama.apply_fn, config=config))(
    params, b.tokens, b.positions, b.segment_ids, b.branch_ids
  )
  sparse = jax.jit(functools.partial(llama.apply_fn, config=config))(
    params, b.tokens, b.positions, b.segment_ids, b.branch_ids, attention_blocks=blocks
  )
  real = np.asarray(b.segment_ids) > 0
  np.testing.assert_allclose(np.asarray(sparse)[real], np.asarray(dense)[real], atol=2e-5, rtol=2e-5)
  assert np.isfinite(np.asarray(sparse)).all()


@pytest.mark.parametrize("layout", ["fused", "prompt_shared", "packed", "packed_one_row"])
def test_dpo_gradients_match_dense_attention(layout):
  config, params, b, blocks = _model_and_batch(layout, 8, seed=3)
  model = llama.make(config)
  fn = policy.make_logps_fn(model.apply, model.head)

  def loss(params, batch):
    out = fn(params, batch)
    w = jnp.arange(1, out.chosen.shape[0] + 1, dtype=jnp.float32)
    return jnp.sum(w * jax.nn.log_sigmoid(0.1 * (out.chosen - out.rejected)))

  v0, g0 = jax.jit(jax.value_and_grad(loss))(params, {"pairs": b})
  v1, g1 = jax.jit(jax.value_and_grad(loss))(params, {"pairs": b, "attention_blocks": blocks})
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for path, a, e in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(
      a, e, rtol=1e-4, atol=1e-5 * float(np.abs(e).max()) + 1e-8, err_msg=jax.tree_util.keystr(path[0])
    )


def test_attention_op_gradients_against_dense_softmax():
  # The op alone: random q, k, v on a packed batch; dense reference = softmax over the full mask.
  p, c, r = _pairs(5, 5)
  b = batching.packed(p, c, r, row_length=32, completion_bucket=4)
  blocks = sparse_attention.attention_blocks(b.segment_ids, b.branch_ids, block_size=8, bucket=8)
  R, L = b.tokens.shape
  K, G, hd = 2, 3, 4
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (R, L, K, G, hd))
  k = jax.random.normal(ks[1], (R, L, K, hd))
  v = jax.random.normal(ks[2], (R, L, K, hd))
  real = jnp.asarray(b.segment_ids > 0, jnp.float32)
  w = jax.random.normal(ks[3], (R, L, K, G, hd)) * real[:, :, None, None, None]
  mask = kernels.attention_mask(b.segment_ids, b.branch_ids)

  def dense(q, k, v):
    s = jnp.einsum("rqkgd,rskd->rkgqs", q, k)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    return jnp.einsum("rkgqs,rskd->rqkgd", jax.nn.softmax(s, axis=-1), v)

  sparse = lambda q, k, v: sparse_attention.block_sparse_attention(q, k, v, b.segment_ids, b.branch_ids, blocks)
  f0 = jax.jit(lambda *a: jnp.sum(w * dense(*a)))
  f1 = jax.jit(lambda *a: jnp.sum(w * sparse(*a)))
  # value and gradients from one compiled program per side
  (v1, g1), (v0, g0) = [jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v) for f in (f1, f0)]
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, e in zip(g1, g0):
    np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)
  jax.test_util.check_grads(f1, (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_bfloat16_close_to_float32_dense():
  config, params, b, blocks = _model_and_batch("prompt_shared", 8, dtype="bfloat16", seed=7)
  ref = jax.jit(functools.partial(llama.apply_fn, config=config.replace(dtype="float32")))(
    params, b.tokens, b.positions, b.segment_ids, b.branch_ids
  )
  out = jax.jit(functools.partial(llama.apply_fn, config=config))(
    params, b.tokens, b.positions, b.segment_ids, b.branch_ids, attention_blocks=blocks
  )
  assert out.dtype == jnp.bfloat16
  real = np.asarray(b.segment_ids) > 0
  np.testing.assert_allclose(np.asarray(out, np.float32)[real], np.asarray(ref)[real], atol=0.1, rtol=0.05)


def test_remat_same_gradients():
  config, params, b, blocks = _model_and_batch("prompt_shared", 8, seed=2)

  def grads(cfg):
    model = llama.make(cfg)
    fn = policy.make_logps_fn(model.apply, model.head)
    return jax.jit(jax.grad(lambda p: jnp.sum(fn(p, {"pairs": b, "attention_blocks": blocks}).chosen)))(params)

  for a, e in zip(jax.tree.leaves(grads(config.replace(remat=True))), jax.tree.leaves(grads(config))):
    np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-5)


# Scored-token compaction (`batching.scored_tokens`): the head and the last block's per-token work
# run on real completion tokens only; the log-probs must equal the padded-slot computation.


def test_scored_tokens_by_hand():
  b = batching.prompt_shared([[5, 6], [11]], [[7, 8, 9], [12]], [[10], [13, 14]], seq_bucket=1, completion_bucket=4)
  st = batching.scored_tokens(b, bucket=4)
  # B=2, T=4: chosen slots 0-3 (pair 0), 4-7 (pair 1); rejected slots 8-15. Real: chosen 0,1,2 and
  # 4; rejected 8 and 12, 13. Row length 6 (pair 0) -> flat index row * 6 + column.
  np.testing.assert_array_equal(st.slot, [0, 1, 2, 4, 8, 12, 13, 16])
  np.testing.assert_array_equal(st.index, [1, 2, 3, 6 + 0, 1, 6 + 0, 6 + 2, 0])
  with pytest.raises(ValueError, match="must be >= 1"):
    batching.scored_tokens(b, bucket=0)
  assert batching.scored_tokens(b, bucket=[5, 9]).index.shape == (9,)
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    batching.scored_tokens(b, bucket=[3])


def test_geometric_buckets_and_block_bucket_function():
  assert batching.geometric_buckets(40) == [
    8,
    9,
    10,
    11,
    12,
    13,
    14,
    15,
    16,
    18,
    20,
    22,
    24,
    26,
    28,
    30,
    32,
    36,
    40,
    44,
    48,
    52,
    56,
    60,
  ]
  assert batching.geometric_buckets(5, per_doubling=2, smallest=1) == [2, 3, 4, 6]
  b = batching.prompt_shared([[1, 2]], [[3, 4]], [[5, 6]], seq_bucket=8, completion_bucket=1)
  # 5 used pairs (see test_block_list_by_hand) -> 6 with buckets [2, 3, 4, 6]; exact size 7; too small 4.
  assert batching.attention_blocks(b, block_size=2, bucket=[2, 3, 4, 6]).num_pairs == 6
  assert sparse_attention.attention_blocks(b.segment_ids, b.branch_ids, block_size=2, size=7).num_pairs == 7
  with pytest.raises(ValueError, match="needs 5 block pairs"):
    sparse_attention.attention_blocks(b.segment_ids, b.branch_ids, block_size=2, size=4)


@pytest.mark.parametrize(
  "layout,sparse", [("fused", False), ("prompt_shared", True), ("packed", True), ("packed", False)]
)
def test_scored_tokens_same_logps_and_gradients(layout, sparse):
  config, params, b, blocks = _model_and_batch(layout, 8, seed=11)
  model = llama.make(config)
  fn = policy.make_logps_fn(model.apply, model.head, with_log_sum_sq_probs=True)
  compact = {"pairs": b, "scored_tokens": batching.scored_tokens(b, bucket=16)}
  if sparse:
    compact["attention_blocks"] = blocks

  def loss(params, batch):
    out = fn(params, batch)
    value = jnp.sum(jax.nn.log_sigmoid(0.1 * (out.chosen - out.rejected))) + 1e-3 * jnp.sum(out.chosen_log_sum_sq_probs)
    return value, out

  # the log-probs and the gradients from one compiled program per batch form
  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, ref), g0 = value_and_grad(params, {"pairs": b})
  (_, got), g1 = value_and_grad(params, compact)
  for name in ("chosen", "rejected", "chosen_token_logps", "rejected_token_logps"):
    np.testing.assert_allclose(getattr(got, name), getattr(ref, name), atol=2e-5, rtol=1e-5, err_msg=name)
  for side in ("chosen", "rejected"):
    m = np.asarray(getattr(ref, f"{side}_mask")) > 0
    np.testing.assert_allclose(
      np.asarray(getattr(got, f"{side}_log_sum_sq_probs"))[m],
      np.asarray(getattr(ref, f"{side}_log_sum_sq_probs"))[m],
      atol=2e-5,
      rtol=1e-5,
    )
  for a, e in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * float(np.abs(e).max()) + 1e-8)


def test_rope_tables_equal_apply_rope_and_are_computed_once():
  # The block-sparse forward rotates queries and keys with tables computed once per forward
  # (llama.rope_tables): same values as apply_rope's inline cos/sin, ...
  rng = np.random.default_rng(0)
  positions = rng.integers(0, 3000, (2, 16))
  inv_freq = llama.rope_inv_freq(llama.tiny())
  x = jnp.asarray(rng.normal(size=(2, 16, 3, 2 * len(inv_freq))), jnp.float32)
  cos, sin = llama.rope_tables(jnp.asarray(positions), inv_freq)
  assert cos.shape == sin.shape == (2, 16, len(inv_freq))
  np.testing.assert_array_equal(
    sparse_attention.rotary(x, cos[:, :, None], sin[:, :, None]), llama.apply_rope(x, jnp.asarray(positions), inv_freq)
  )
  # ... and the compiled forward+backward holds one cosine, not one per consumer (XLA:CPU would
  # otherwise recompute it inside every rotation and every gathered attention tile).
  config, params, b, blocks = _model_and_batch("packed", 8)
  model = llama.make(config)
  fn = policy.make_logps_fn(model.apply, model.head)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(fn(p, {"pairs": b, "attention_blocks": blocks}).chosen)))
  hlo = grad.lower(params).compile().as_text()
  assert hlo.count(" cosine(") == 1, hlo.count(" cosine(")


def test_pad_index_lists_by_hand_and_same_logps_as_dense():
  # Two one-pair prompt-shared batches of different sizes: their lists differ in length.
  short = batching.prompt_shared([[1, 2]], [[3, 4]], [[5, 6]], seq_bucket=8, completion_bucket=2)
  long_ = batching.prompt_shared([[1, 2, 3]], [[4, 5, 6, 7]], [[8, 9, 10]], seq_bucket=12, completion_bucket=4)
  batches = [
    {
      "pairs": b,
      "attention_blocks": batching.attention_blocks(b, block_size=2, bucket=1),
      "scored_tokens": batching.scored_tokens(b, bucket=1),
      "other": np.ones(3),
    }
    for b in (short, long_)
  ]
  # short: 5 block pairs (see test_block_list_by_hand), 4 scored tokens. long: row [p p | p c |
  # c c | c r | r r | pad pad] -> query block i uses key blocks 0..i, except rejected block 4 not
  # chosen block 2: 1 + 2 + 3 + 4 + 4 = 14 pairs; 4 + 3 = 7 scored tokens.
  assert [b["attention_blocks"].num_pairs for b in batches] == [5, 14]
  assert [len(b["scored_tokens"].index) for b in batches] == [4, 7]
  padded = batching.pad_index_lists(batches)
  assert batches[0]["attention_blocks"].num_pairs == 5  # the inputs are left as they were
  s = padded[0]
  # short: R=1, L=8, blocks of 2 -> 4 blocks, padding block 4; B=1, T=2 -> padding slot 4.
  np.testing.assert_array_equal(s["attention_blocks"].query_block[5:], [4] * 9)
  np.testing.assert_array_equal(s["attention_blocks"].key_block[5:], [4] * 9)
  np.testing.assert_array_equal(s["attention_blocks"].query_block[:5], batches[0]["attention_blocks"].query_block)
  # chosen tokens from columns 1, 2; rejected from the last prompt column 1, then column 4.
  np.testing.assert_array_equal(s["scored_tokens"].index, [1, 2, 1, 4, 0, 0, 0])
  np.testing.assert_array_equal(s["scored_tokens"].slot, [0, 1, 2, 3, 4, 4, 4])
  assert s["other"] is batches[0]["other"] and padded[1]["attention_blocks"].num_pairs == 14
  # The padded lists give the dense, every-slot log-probs (an independent computation).
  config = llama.tiny(dtype="float32")
  params = _params("float32", 0)
  model = llama.make(config)
  fn = policy.make_logps_fn(model.apply, model.head)
  got, ref = jax.jit(fn)(params, s), jax.jit(fn)(params, {"pairs": short})
  np.testing.assert_allclose(got.chosen, ref.chosen, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.rejected, ref.rejected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="some batches carry"):
    batching.pad_index_lists([batches[0], {"pairs": long_}])
