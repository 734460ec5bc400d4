"""pofx.flops: the analytic FLOPs of a DPO step against a hand derivation and XLA's cost analysis."""

import jax
import numpy as np
import optax
import pytest

from pofx import batching, flops, models, perturbations, policy, references, train

# The tiny preset: V = 97, D = 32, 2 layers, H = 4 query heads, K = 2 key/value heads, hd = 32 / 4 = 8, F = 64.
TINY = models.preset("tiny")


def test_projection_flops_by_hand():
  # Before attention (q, k, v): 2 (D H hd + 2 D K hd) = 2 (32*4*8 + 2*32*2*8) = 2 (1024 + 1024) = 4096.
  # After (o, gate, up, down): 2 (H hd D + 3 D F) = 2 (4*8*32 + 3*32*64) = 2 (1024 + 6144) = 14336.
  assert flops.projection_flops_per_token(TINY) == (4096, 14336)


def test_forward_and_step_flops_by_hand():
  # Two rows of 16 tokens (32 positions), dense attention (2 * 16 * 16 = 512 entries), 10 scored tokens.
  work = flops.Work(tokens=32, head_tokens=10, attention_entries=512)
  # projections: 2 layers * 32 tokens * (4096 + 14336) = 1,179,648
  # attention:   2 layers * 4 heads * 4 hd (= 32) * 512 entries = 131,072
  # LM head:     2 D V * 10 = 2 * 32 * 97 * 10 = 62,080
  fwd = flops.forward_flops(TINY, work)
  assert fwd == (1_179_648.0, 131_072.0, 62_080.0)
  assert fwd.total == 1_372_800.0
  # Cached reference: forward + backward (2 x forward) = 3 x 1,372,800.
  assert flops.dpo_step_flops(TINY, work).total == 4_118_400.0
  # Frozen reference: + one reference forward = 4 x.
  assert flops.dpo_step_flops(TINY, work, reference="frozen").total == 5_491_200.0
  # SAM with a frozen reference: two forward-backward passes + the reference forward = 7 x.
  assert flops.dpo_step_flops(TINY, work, reference="frozen", perturbation="sam").total == 9_609_600.0
  # RWP, 10 proxy steps, cached reference: 11 forward-backward passes = 33 x.
  assert flops.dpo_step_flops(TINY, work, perturbation="rwp", rwp_steps=10).total == 45_302_400.0
  # A multi-reference with two frozen members: 3 + 2 = 5 x.
  assert flops.dpo_step_flops(TINY, work, reference="multi", reference_forwards=2).total == 6_864_000.0
  # Compact scoring: the last block's o, gate, up, down on the 10 scored positions only:
  # 2 layers * 32 * 4096 + (32 + 10) * 14336 = 262,144 + 602,112 = 864,256.
  compact_work = flops.Work(tokens=32, head_tokens=10, attention_entries=512, last_block_tokens=10)
  compact = flops.forward_flops(TINY, compact_work)
  assert compact.projections == 864_256.0
  with pytest.raises(ValueError, match="unknown perturbation"):
    flops.dpo_step_flops(TINY, work, perturbation="bogus")
  with pytest.raises(ValueError, match="unknown reference"):
    flops.dpo_step_flops(TINY, work, reference="multi")


def test_attention_entries_by_hand():
  # Dense rows of 100 tokens, no query blocks: 3 * 100^2.
  assert flops.dense_attention_entries(3, 100) == 30_000
  # One row of 300 tokens in causal query blocks of 128: [0,128) x 128 + [128,256) x 256 + [256,300) x 300
  # = 16,384 + 32,768 + 13,200 = 62,352.
  assert flops.dense_attention_entries(1, 300, query_block=128) == 62_352
  assert flops.dense_attention_entries(1, 100, query_block=128) == 10_000  # shorter than a block: dense
  # Block-sparse: 7 block pairs of 64 x 64.
  assert flops.block_sparse_attention_entries(7, 64) == 28_672
  # A prompt-shared row [p p c c r pad]: query 0 sees 1 key, 1 sees 2, the chosen tokens see the prompt
  # and the chosen ones before them (3, 4), the rejected token the prompt and itself (3): 13; padding 0.
  seg = np.array([[1, 1, 1, 1, 1, 0]])
  br = np.array([[0, 0, 1, 1, 2, 0]])
  assert flops.useful_attention_entries(seg, br) == 13
  # Without branches the row is plainly causal: 1 + 2 + 3 + 4 + 5 = 15.
  assert flops.useful_attention_entries(seg) == 15


def test_work_of_batch_shapes():
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 90, 20).astype(np.int32) for _ in range(3)]
  chosen = [rng.integers(0, 90, 30).astype(np.int32) for _ in range(3)]
  rejected = [rng.integers(0, 90, 25).astype(np.int32) for _ in range(3)]
  pairs = batching.build("prompt_shared", prompts, chosen, rejected, seq_bucket=64, completion_bucket=16)
  R, L = pairs.tokens.shape
  B, T = pairs.chosen_targets.shape
  work = flops.work_of_batch({"pairs": pairs})
  assert work == flops.Work(tokens=R * L, head_tokens=2 * B * T, attention_entries=R * L * L)
  blocks = batching.attention_blocks(pairs, block_size=16)
  scored = batching.scored_tokens(pairs, bucket=16)
  work = flops.work_of_batch({"pairs": pairs, "attention_blocks": blocks, "scored_tokens": scored})
  n = len(scored.index)
  assert work == flops.Work(
    tokens=R * L, head_tokens=n, attention_entries=len(blocks.query_block) * 256, last_block_tokens=n
  )
  # Two micro-batches stacked on a leading axis (gradient accumulation) count twice.
  batch = {"pairs": pairs, "attention_blocks": blocks, "scored_tokens": scored}
  stacked = flops.work_of_batch(jax.tree.map(lambda *xs: np.stack(xs), batch, batch))
  assert stacked == flops.Work(
    tokens=2 * R * L, head_tokens=2 * n, attention_entries=2 * work.attention_entries, last_block_tokens=2 * n
  )
  # 3 pairs, each 20 + 30 + 25 real tokens; useful entries <= computed ones.
  useful = flops.work_of_batch({"pairs": pairs}, useful=True).attention_entries
  assert 0 < useful <= work.attention_entries


def test_peaks_and_mfu():
  # Vendors' dense bf16 figures (the datasheets print twice these with sparsity for NVIDIA).
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("NVIDIA H200") == 989.4e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5") == 459e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("TPU v6 lite") == 918e12
  assert flops.mfu(494.7e12, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
  assert flops.mfu(4 * 137.5e12, "TPU v4", num_devices=4) == pytest.approx(0.5)
  assert flops.mfu(1e11, "cpu") is None
  assert flops.mfu(1e11, str(jax.devices("cpu")[0].device_kind)) is None


def _tiny_batch(layout, sparse, length):
  rng = np.random.default_rng(1)
  n = 4
  prompts = [rng.integers(0, 500, length // 4).astype(np.int32) for _ in range(n)]
  chosen = [rng.integers(0, 500, length // 3).astype(np.int32) for _ in range(n)]
  rejected = [rng.integers(0, 500, length // 3 - 5).astype(np.int32) for _ in range(n)]
  pairs = batching.build(layout, prompts, chosen, rejected, seq_bucket=64, completion_bucket=16)
  batch = {"pairs": pairs}
  if sparse:
    batch["attention_blocks"] = batching.attention_blocks(pairs, block_size=16)
    batch["scored_tokens"] = batching.scored_tokens(pairs, bucket=16)
  return batch


# XLA's cost analysis counts every dot as 2 M N K, like the analytic count, plus the elementwise
# work the analytic count leaves out (norms, softmax, SwiGLU, the optimizer, the backward's
# recomputed attention scores): on this small model it is 3-5% above. Tolerance: XLA within
# [1.0, 1.08] x the analytic count. Leaving out the LM head (a quarter of this model's forward at
# V = 1024, D = 64) would fall far outside it.
SMALL = models.preset("tiny", vocab_size=1024, hidden_size=64, mlp_size=192, num_heads=4, num_kv_heads=2, num_layers=1)


@pytest.mark.parametrize(
  "layout,sparse,length,reference,perturbation",
  [
    ("prompt_shared", False, 192, "cached", "none"),  # dense rows of 256 in causal query blocks of 128
    ("prompt_shared", True, 64, "frozen", "sam"),  # block-sparse, compact scoring, SAM
  ],
)
def test_step_flops_match_xla_cost_analysis(layout, sparse, length, reference, perturbation):
  model = models.make(SMALL)
  params = model.init(jax.random.key(0))
  batch = _tiny_batch(layout, sparse, length)
  logps_fn = policy.make_logps_fn(model.apply, model.head)
  if reference == "frozen":
    ref = references.frozen(params, logps_fn)
  else:
    ref = references.cached("fp", "fp")
    B = batch["pairs"].num_pairs
    batch["ref_chosen_logps"] = np.zeros(B, np.float32)
    batch["ref_rejected_logps"] = np.zeros(B, np.float32)
  pert = {"none": perturbations.none(), "sam": perturbations.sam(0.05)}[perturbation]
  optimizer = optax.sgd(1e-3)
  step = train.make_train_step(
    logps_fn, optimizer, loss="dpo", reference=ref, perturbation=pert, guard_nonfinite=False, donate=False
  )
  state = train.init_state(params, optimizer, ref, pert, loss="dpo", rng=jax.random.key(0))
  cost = step.lower(state, batch, jax.random.key(0)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost["flops"])
  analytic = flops.dpo_step_flops(SMALL, flops.work_of_batch(batch), reference=reference, perturbation=perturbation)
  assert 1.0 <= xla / analytic.total <= 1.08, (xla, analytic)
  passes = analytic.total / flops.forward_flops(SMALL, flops.work_of_batch(batch)).total
  without_head = analytic.total - analytic.head
  assert xla / without_head > 1.08, "the LM head is a visible share of this step: the tolerance can tell"
  assert passes == {("cached", "none"): 3, ("frozen", "sam"): 7}[(reference, perturbation)]


def test_program_metrics_report_flops_per_second(tmp_path):
  from experiments import metrics

  rng = np.random.default_rng(0)
  seqs = [[rng.integers(0, 90, n).astype(np.int32) for _ in range(2)] for n in (10, 12, 9)]
  pairs = batching.build("prompt_shared", *seqs, seq_bucket=64, completion_bucket=16)
  batch = {"pairs": pairs}
  forward = flops.forward_flops(TINY, flops.work_of_batch(batch)).total
  # The program's multi reference is two cached references: no reference forward (3 x forward);
  # an EMA reference runs one (4 x); RWP with 3 proxy steps and a frozen reference: 3 (1 + 3) + 1 = 13 x.
  assert metrics.step_flops_fn(TINY, reference="multi", perturbation="none")(batch) == 3 * forward
  assert metrics.step_flops_fn(TINY, reference="ema", perturbation="none")(batch) == 4 * forward
  assert metrics.step_flops_fn(TINY, reference="frozen", perturbation="rwp", rwp_steps=3)(batch) == 13 * forward
  writer = metrics.MetricWriter(str(tmp_path), "train", 4, progress=False)
  first = writer.write(1, {"loss": 0.7}, pairs=2)
  assert "flops_per_second" not in first  # the first record has no interval before it
  writer.add_flops(1e9)
  writer.add_flops(1e9)
  rec = writer.write(3, {"loss": 0.6}, pairs=2)
  writer.close()
  # 2 GFLOP over the interval, at the same rate as the pairs: FLOP/s = 2e9 x pairs/s / (2 pairs x 2 steps).
  assert rec["flops_per_second"] == pytest.approx(2e9 * rec["pairs_per_second"] / 4)
  assert "mfu" not in rec  # CPUs have no peak in the table
