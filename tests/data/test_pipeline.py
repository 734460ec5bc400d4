"""The grain loader: seeded shuffling, per-process sharding, resume, length grouping, scores and
joined reference log-probs, padding of a final partial batch."""

import math

import numpy as np
import pytest

from pofx import batching, data

N = 96


def _source(n=N, seed=0, scores=True):
  """In-memory examples with the TFDS features (example_id = index * 10 + 3)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    out.append(
      {
        "prompt": rng.integers(1, 50, size=int(rng.integers(1, 20))).astype(np.int32),
        "chosen": rng.integers(1, 50, size=int(rng.integers(1, 9))).astype(np.int32),
        "rejected": rng.integers(1, 50, size=int(rng.integers(1, 9))).astype(np.int32),
        "score_chosen": np.float32(i) if scores else np.float32(math.nan),
        "score_rejected": np.float32(-i) if scores else np.float32(math.nan),
        "example_id": i * 10 + 3,
      }
    )
  return out


def _loader(src=None, **kw):
  kw.setdefault("batch_size", 8)
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  kw.setdefault("layout_kwargs", dict(seq_bucket=8, completion_bucket=8))
  return data.PreferenceLoader(_source() if src is None else src, **kw)


def _ids(batches):
  return [b["example_id"].tolist() for b in batches]


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_seeded_shuffle_is_deterministic_and_reshuffles_each_epoch():
  a = _ids(_loader(seed=5, num_epochs=2).iterator())
  b = _ids(_loader(seed=5, num_epochs=2).iterator())
  c = _ids(_loader(seed=6, num_epochs=2).iterator())
  assert a == b and a != c
  per_epoch = N // 8
  e1 = [i for batch in a[:per_epoch] for i in batch]
  e2 = [i for batch in a[per_epoch:] for i in batch]
  ids = [i * 10 + 3 for i in range(N)]
  assert sorted(e1) == ids and sorted(e2) == ids  # each epoch is a permutation
  assert e1 != e2 and e1 != ids  # reshuffled, and not the source order
  plain = [i for batch in _ids(_loader(shuffle=False, num_epochs=1).iterator()) for i in batch]
  assert plain == ids


def test_process_shards_are_disjoint_and_cover():
  shards = [
    [i for batch in _ids(_loader(seed=3, num_epochs=1, process_index=p, process_count=2).iterator()) for i in batch]
    for p in (0, 1)
  ]
  assert len(shards[0]) == len(shards[1]) == N // 2
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == [i * 10 + 3 for i in range(N)]
  # The same global order, split by position: process p holds elements p, p + 2, ...
  whole = [i for batch in _ids(_loader(seed=3, num_epochs=1, batch_size=16).iterator()) for i in batch]
  assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


def test_uneven_data_gives_every_process_the_same_number_of_steps():
  src = _source(n=50)
  lens = [len(_loader(src, num_epochs=1, batch_size=4, process_index=p, process_count=3)) for p in range(3)]
  assert lens == [4, 4, 4]  # 50 // 3 = 16 examples each -> 4 batches


@pytest.mark.parametrize("group", [0, 3])
def test_resume_continues_the_same_stream(group):
  loader = _loader(seed=11, num_epochs=None, group_by_length=group)
  it = loader.iterator()
  first = _take(it, 7)
  state = it.get_state()
  assert state["step"] == 7
  expected = _take(it, 9)
  # A "killed" run: a fresh loader with the same configuration, resumed from the saved state.
  resumed = _loader(seed=11, num_epochs=None, group_by_length=group).iterator(state)
  got = _take(resumed, 9)
  for x, y in zip(expected, got):
    assert x["example_id"].tolist() == y["example_id"].tolist()
    np.testing.assert_array_equal(x["pairs"].tokens, y["pairs"].tokens)
  for s, b in enumerate(first + expected):
    assert loader.batch_at(s)["example_id"].tolist() == b["example_id"].tolist()


def test_endless_stream_of_single_pair_batches():
  # One pair per batch (e.g. 8 pairs over 4 devices x 2 accumulated micro-batches), repeated
  # forever: the stream is the seeded permutation of the data, one example at a time.
  loader = _loader(seed=4, num_epochs=None, batch_size=1)
  got = [b["example_id"].tolist() for b in _take(loader.iterator(), N + 3)]
  assert all(len(ids) == 1 for ids in got)
  first_epoch = sorted(ids[0] for ids in got[:N])
  assert first_epoch == [i * 10 + 3 for i in range(N)]
  assert [ids[0] for ids in got[:N]] == [i for b in _ids(_loader(seed=4, num_epochs=1).iterator()) for i in b]
  assert loader.batch_at(N + 2)["example_id"].tolist() == got[N + 2]
  assert _loader(seed=4, num_epochs=None, batch_size=1).iterator(5).get_state()["step"] == 5


def test_resume_refuses_another_configuration():
  state = _loader(seed=1, num_epochs=None).iterator(5).get_state()
  with pytest.raises(ValueError, match="cannot resume"):
    _loader(seed=2, num_epochs=None).iterator(state)


def test_finite_stream_ends_and_length():
  loader = _loader(num_epochs=3)
  assert len(loader) == 3 * N // 8
  assert len(list(loader.iterator())) == len(loader)
  assert list(loader.iterator(len(loader))) == []
  with pytest.raises(ValueError, match="outside"):
    loader.batch_at(len(loader))


def test_length_grouping_reduces_padding_and_keeps_the_data():
  src = _source(n=256, seed=4)
  kw = dict(layout="prompt_shared", num_epochs=1, batch_size=8, layout_kwargs=dict(seq_bucket=4, completion_bucket=4))
  plain = list(_loader(src, **kw).iterator())
  grouped = list(_loader(src, group_by_length=8, **kw).iterator())
  frac = lambda bs: np.mean([b["pairs"].real_token_fraction() for b in bs])  # noqa: E731
  assert frac(grouped) > frac(plain) + 0.1
  flat = lambda bs: sorted(i for b in bs for i in b["example_id"].tolist())  # noqa: E731
  assert flat(grouped) == flat(plain) == [i * 10 + 3 for i in range(256)]


@pytest.mark.parametrize(
  "layout, kwargs",
  [
    ("fused", dict(seq_bucket=32, completion_bucket=8)),
    ("prompt_shared", dict(seq_bucket=64, completion_bucket=8)),
    ("packed", dict(row_length=64, num_rows=8, completion_bucket=8)),
  ],
)
def test_layouts_match_pofx_batching(layout, kwargs):
  src = _source()
  loader = _loader(src, layout=layout, layout_kwargs=kwargs, seed=2, num_epochs=1)
  batch = loader.batch_at(3)
  by_id = {e["example_id"]: e for e in src}
  exs = [by_id[i] for i in batch["example_id"].tolist()]
  ref = batching.build(
    layout, [e["prompt"] for e in exs], [e["chosen"] for e in exs], [e["rejected"] for e in exs], num_pairs=8, **kwargs
  )
  for field in (
    "tokens",
    "positions",
    "segment_ids",
    "chosen_index",
    "chosen_targets",
    "rejected_index",
    "rejected_targets",
    "chosen_mask",
    "rejected_mask",
  ):
    np.testing.assert_array_equal(getattr(batch["pairs"], field), getattr(ref, field))
  assert batch["pairs"].layout == layout


def test_scores_and_joined_reference_logps():
  src = _source()
  ids = np.array([e["example_id"] for e in src])
  joined = {
    "example_id": ids[::-1].copy(),
    "ref_chosen_logps": -ids[::-1] / 10.0,
    "ref_rejected_logps": -ids[::-1] / 5.0,
    "fingerprint": "abc",
  }
  batch = _loader(src, seed=0, num_epochs=1, with_scores=True, joined=joined).batch_at(2)
  eid = batch["example_id"]
  idx = (eid - 3) // 10
  np.testing.assert_array_equal(batch["chosen_scores"], idx.astype(np.float32))
  np.testing.assert_array_equal(batch["rejected_scores"], -idx.astype(np.float32))
  np.testing.assert_allclose(batch["ref_chosen_logps"], -eid / 10.0, rtol=1e-6)
  np.testing.assert_allclose(batch["ref_rejected_logps"], -eid / 5.0, rtol=1e-6)
  assert batch["ref_chosen_logps"].dtype == np.float32 and eid.dtype == np.int32
  with pytest.raises(ValueError, match="no entry for example ids"):
    partial = {k: v[:10] if k != "fingerprint" else v for k, v in joined.items()}
    for s in range(N // 8):
      _loader(src, seed=0, num_epochs=1, joined=partial).batch_at(s)
  with pytest.raises(ValueError, match="have no score_chosen"):
    _loader(_source(scores=False), num_epochs=1, with_scores=True).batch_at(0)


def test_final_partial_batch_is_padded():
  src = _source(n=20)
  batches = list(_loader(src, shuffle=False, num_epochs=1, drop_remainder=False).iterator())
  assert len(batches) == 3
  last = batches[-1]
  assert last["example_id"].tolist() == [163, 173, 183, 193, -1, -1, -1, -1]
  np.testing.assert_array_equal(last["pairs"].pair_mask, [1, 1, 1, 1, 0, 0, 0, 0])
  assert len(list(_loader(src, shuffle=False, num_epochs=1).iterator())) == 2


def test_prefetch_off_gives_the_same_batches():
  a = _ids(_loader(seed=9, num_epochs=1, num_threads=0).iterator())
  b = _ids(_loader(seed=9, num_epochs=1, num_threads=2, prefetch=4).iterator())
  assert a == b


def test_option_validation():
  with pytest.raises(ValueError, match="layout='rows' is not allowed"):
    _loader(layout="rows")
  with pytest.raises(ValueError, match="process_index must be in"):
    _loader(process_index=2, process_count=2)
  with pytest.raises(ValueError, match="num_pairs is set by the loader"):
    _loader(layout_kwargs=dict(num_pairs=8))
  with pytest.raises(ValueError, match="no full batch"):
    _loader(_source(n=5), num_epochs=1)
  with pytest.raises(TypeError, match="no length"):
    len(_loader(num_epochs=None))


@pytest.mark.parametrize(
  "layout,kwargs",
  [
    ("prompt_shared", dict(seq_bucket=16, completion_bucket=8)),
    ("packed", dict(row_length=64, completion_bucket=8)),
    ("packed", dict(length_bucket=32, completion_bucket=8)),
  ],
)
def test_block_lists_and_scored_tokens_attached_to_every_batch(layout, kwargs):
  loader = _loader(
    layout=layout, layout_kwargs=kwargs, num_epochs=1, attention_block_size=8, scored_tokens=True, index_bucket=4
  )
  for b in loader.iterator():
    pairs = b["pairs"]
    want_blocks = batching.attention_blocks(pairs, block_size=8, bucket=4)
    np.testing.assert_array_equal(b["attention_blocks"].query_block, want_blocks.query_block)
    np.testing.assert_array_equal(b["attention_blocks"].key_block, want_blocks.key_block)
    assert b["attention_blocks"].block_size == 8
    # Every real completion token is listed once, and no padding slot.
    real = int(np.sum(pairs.chosen_mask) + np.sum(pairs.rejected_mask))
    n = len(b["scored_tokens"].index)
    assert n % 4 == 0 and real <= n < real + 4
    assert np.sum(b["scored_tokens"].slot < 2 * pairs.chosen_mask.size) == real
  plain = next(_loader(layout=layout, layout_kwargs=kwargs, num_epochs=1).iterator())
  assert "attention_blocks" not in plain and "scored_tokens" not in plain


@pytest.mark.parametrize(
  "layout,kwargs,key",
  [
    ("prompt_shared", dict(seq_bucket=12), "seq_bucket"),
    ("fused", dict(seq_bucket=[16, 20]), "seq_bucket"),
    ("packed", dict(row_length=60), "row_length"),
    ("packed", dict(), "length_bucket"),
  ],
)
def test_block_size_must_divide_every_row_length(layout, kwargs, key):
  with pytest.raises(ValueError, match=rf"layout_kwargs\['{key}'\]=.*multiple of 128"):
    _loader(layout=layout, layout_kwargs=kwargs, attention_block_size=128)
  with pytest.raises(ValueError, match="attention_block_size must be an integer >= 0"):
    _loader(attention_block_size=-1)


def test_block_lists_travel_with_the_batches_and_cover_the_mask():
  # Which kernels compute the attention is the model's (pofx.kernels.Kernels), not the loader's:
  # the loader only lists the (query block, key block) pairs that hold an allowed entry of the
  # dense mask (pofx.kernels.attention_mask) for a real query, and nothing else.
  from pofx import kernels

  loader = _loader(
    layout="prompt_shared",
    layout_kwargs=dict(seq_bucket=64, completion_bucket=8),
    num_epochs=1,
    attention_block_size=64,
  )
  batches = list(loader.iterator())
  assert batches
  for b in batches:
    seg, br = np.asarray(b["pairs"].segment_ids), np.asarray(b["pairs"].branch_ids)
    R, L = seg.shape
    nb = L // 64
    mask = np.asarray(kernels.attention_mask(seg, br)) & (seg > 0)[:, :, None]
    used = mask.reshape(R, nb, 64, nb, 64).any(axis=(2, 4))
    rows, qb, kb = np.nonzero(used)
    blocks = b["attention_blocks"]
    assert blocks.block_size == 64
    listed = {(int(q), int(k)) for q, k in zip(blocks.query_block, blocks.key_block) if q < R * nb}
    assert listed == {(int(r * nb + q), int(r * nb + k)) for r, q, k in zip(rows, qb, kb)}
  with pytest.raises(TypeError, match="attention_kernel"):
    _loader(layout="prompt_shared", attention_block_size=64, attention_kernel="xla")
