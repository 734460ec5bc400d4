"""End to end on the shipped example files: parse -> tokenize -> TFDS (array_record) -> grain ->
PairBatch, for every format; bad records through the builder; the generated-records builder.

Expected token ids are computed from the source records with `tests.data.ids` (json + regex over
tokenizer.json's vocabulary) and hand-written chat rendering, not with pofx.
"""

import json
import logging
import math
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pofx import data
from pofx.data import BadRecord
from tests.data import BOS, EOS, example, ids, vocab

FILES = {
  "standard": "standard.jsonl",
  "standard_parquet": "standard.parquet",
  "implicit": "implicit.jsonl",
  "conversational": "conversational.jsonl",
  "conversational_implicit": "conversational_implicit.jsonl",
  "tokenized": "tokenized.parquet",
  "ranking": "ranking.jsonl",
}
COUNTS = {
  "standard": 200,
  "standard_parquet": 50,
  "implicit": 200,
  "conversational": 200,
  "conversational_implicit": 200,
  "tokenized": 200,
  "ranking": 200 * 6,
}
LAYOUTS = {
  "standard": ("fused", dict(seq_bucket=16, completion_bucket=8)),
  "standard_parquet": ("prompt_shared", dict(seq_bucket=32, completion_bucket=8)),
  "implicit": ("packed", dict(row_length=64, completion_bucket=8)),
  "conversational": ("prompt_shared", dict(seq_bucket=(32, 64), completion_bucket=8)),
  "conversational_implicit": ("fused", dict(seq_bucket=64, completion_bucket=8)),
  "tokenized": ("packed", dict(row_length=48, num_rows=8, completion_bucket=8)),
  "ranking": ("fused", dict(seq_bucket=32, completion_bucket=8)),
}


@pytest.fixture(scope="module")
def tok():
  return data.Tokenizer.from_dir(example(""))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
  out = data.prepare_files(
    {split: example(f) for split, f in FILES.items()}, data_dir=str(tmp_path_factory.mktemp("tfds")), tokenizer=tok
  )
  assert "tensorflow" not in sys.modules  # TFDS without TensorFlow
  return out


def _source_records(name):
  path = example(name)
  if path.endswith(".parquet"):
    return pq.read_table(path).to_pylist()
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _render(messages, gen=False):
  s = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
  return s + ("<|assistant|>" if gen else "")


def _reply(messages):
  # The prompt ends with the generation prompt "<|assistant|>"; the completion is the rest.
  assert len(messages) == 1 and messages[0]["role"] == "assistant"
  return ids(messages[0]["content"] + "<|end|>")


def _expected(split, rec):
  """Independent expectation of (prompt, chosen, rejected) ids for non-ranking records."""
  if split in ("standard", "standard_parquet"):
    return ([BOS] + ids(rec["prompt"]), ids(rec["chosen"]) + [EOS], ids(rec["rejected"]) + [EOS])
  if split == "tokenized":
    return rec["prompt_input_ids"], rec["chosen_input_ids"], rec["rejected_input_ids"]
  if split == "implicit":
    c, r = [BOS] + ids(rec["chosen"]) + [EOS], [BOS] + ids(rec["rejected"]) + [EOS]
    n = next(i for i, (a, b) in enumerate(zip(c, r)) if a != b)
    return c[:n], c[n:], r[n:]
  if split == "conversational":
    return ([BOS] + ids(_render(rec["prompt"], gen=True)), _reply(rec["chosen"]), _reply(rec["rejected"]))
  assert split == "conversational_implicit"
  c, r = rec["chosen"], rec["rejected"]
  n = next(i for i, (a, b) in enumerate(zip(c, r)) if a != b)
  return ([BOS] + ids(_render(c[:n], gen=True)), _reply(c[n:]), _reply(r[n:]))


@pytest.mark.parametrize("split", sorted(FILES))
def test_format_end_to_end(prepared, split):
  src = prepared.source(split)
  assert len(src) == COUNTS[split]
  st = prepared.stats[split]
  assert st.examples_written == COUNTS[split] and st.num_skipped == 0 and st.truncated == 0
  recs = _source_records(FILES[split])
  by_id = {}
  for i in range(len(src)):
    ex = src[i]
    assert ex["prompt"].dtype == np.int32 and ex["chosen"].dtype == np.int32
    assert ex["source_file"].decode() == FILES[split]
    rec = recs[ex["source_line"] - 1]
    got = (ex["prompt"].tolist(), ex["chosen"].tolist(), ex["rejected"].tolist())
    if split == "ranking":
      # Each pair: prompt and two of the record's completions, the better one chosen.
      comp_ids = [ids(c) + [EOS] for c in rec["completions"]]
      assert got[0] == [BOS] + ids(rec["prompt"])
      ci, ri = comp_ids.index(got[1]), comp_ids.index(got[2])
      if "scores" in rec:
        assert (float(ex["score_chosen"]), float(ex["score_rejected"])) == pytest.approx(
          (rec["scores"][ci], rec["scores"][ri])
        )
        assert rec["scores"][ci] > rec["scores"][ri]
      else:
        assert rec["ranks"][ci] < rec["ranks"][ri] and math.isnan(ex["score_chosen"])
    else:
      assert got == tuple(list(x) for x in _expected(split, rec))
      for key in ("score_chosen", "score_rejected"):
        if key in rec:
          assert float(ex[key]) == pytest.approx(rec[key])
        else:
          assert math.isnan(ex[key])
      assert ex["group_id"] == ex["example_id"]
    by_id[int(ex["example_id"])] = got
  assert sorted(by_id) == list(range(COUNTS[split]))

  # grain -> PairBatch: one epoch, every example exactly once, targets = the stored ids.
  layout, kwargs = LAYOUTS[split]
  loader = data.PreferenceLoader(
    src,
    batch_size=8,
    layout=layout,
    layout_kwargs=kwargs,
    seed=1,
    num_epochs=1,
    drop_remainder=False,
    process_index=0,
    process_count=1,
  )
  seen = []
  for batch in loader.iterator():
    pairs = batch["pairs"]
    assert pairs.layout == layout and pairs.num_pairs == 8
    for b, eid in enumerate(batch["example_id"].tolist()):
      if eid < 0:
        assert pairs.pair_mask[b] == 0
        continue
      _, c, r = by_id[eid]
      assert pairs.chosen_targets[b][pairs.chosen_mask[b] > 0].tolist() == c
      assert pairs.rejected_targets[b][pairs.rejected_mask[b] > 0].tolist() == r
      seen.append(eid)
  assert sorted(seen) == list(range(COUNTS[split]))


def test_ranking_group_ids(prepared):
  src = prepared.source("ranking")
  groups = {}
  for i in range(len(src)):
    groups.setdefault(int(src[i]["group_id"]), set()).add(int(src[i]["source_line"]))
  assert len(groups) == 200 and all(len(v) == 1 for v in groups.values())


def _bad_file(tmp_path):
  good = {
    "prompt": "Question : What colour is the sky ? Answer :",
    "chosen": " The sky is blue .",
    "rejected": " The sky is red .",
  }
  lines = [
    json.dumps(good),
    "{oops",
    json.dumps(good),
    json.dumps({"prompt": "Question :", "chosen": " red", "rejected": " red"}),
    json.dumps({"prompt": "Question :", "rejected": " red"}),
  ]
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_builder_bad_records_error(tmp_path, tok):
  path = _bad_file(tmp_path)
  with pytest.raises(BadRecord, match=r"bad.jsonl:2: bad record \(malformed_json\)"):
    data.prepare_files({"train": path}, data_dir=str(tmp_path / "d"), tokenizer=tok)


def test_builder_bad_records_skip_counts_stored(tmp_path, tok):
  path = _bad_file(tmp_path)
  prep = data.prepare_files({"train": path}, data_dir=str(tmp_path / "d"), tokenizer=tok, on_bad_record="skip")
  expected = {"malformed_json": 1, "identical": 1, "missing_field": 1}
  assert prep.stats["train"].skipped == expected
  assert prep.stats["train"].records_read == 5 and prep.stats["train"].examples_written == 2
  assert data.stats(prep.path)["train"] == prep.stats["train"]  # stored with the dataset
  src = data.data_source(prep.path, "train")
  assert sorted(int(src[i]["source_line"]) for i in range(len(src))) == [1, 3]
  # Same inputs: reused as is. Other options into the same directory: refused.
  files = os.listdir(prep.path)
  again = data.prepare_files({"train": path}, data_dir=str(tmp_path / "d"), tokenizer=tok, on_bad_record="skip")
  assert again.stats == prep.stats and os.listdir(prep.path) == files
  with pytest.raises(ValueError, match="prepared from different inputs"):
    data.prepare_files(
      {"train": path},
      data_dir=str(tmp_path / "d"),
      tokenizer=tok,
      on_bad_record="skip",
      limits=data.Limits(max_length=8),
    )


def test_builder_truncation_counted(tmp_path, tok):
  prep = data.prepare_files(
    {"train": example("standard.parquet")},
    data_dir=str(tmp_path),
    tokenizer=tok,
    limits=data.Limits(max_length=12, truncation="truncate_prompt_left"),
  )
  src = prep.source("train")
  flags = [int(src[i]["truncated"]) for i in range(len(src))]
  assert prep.stats["train"].truncated == sum(flags) == 50  # prompts are 11-12 tokens
  for i in range(len(src)):
    ex = src[i]
    assert ex["prompt"][0] == BOS
    assert len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) <= 12


def _write_bytes(path, lines):
  path.write_bytes(b"".join(line + b"\n" for line in lines))
  return str(path)


def _json(rec):
  return json.dumps(rec).encode()


SKY = {
  "prompt": "Question : What colour is the sky ? Answer :",
  "chosen": " The sky is blue .",
  "rejected": " The sky is red .",
}


def test_no_usable_records_names_the_file_before_writing(tmp_path, tok):
  good = _write_bytes(tmp_path / "good.jsonl", [_json(SKY)])
  empty = _write_bytes(tmp_path / "empty.jsonl", [])
  blank = _write_bytes(tmp_path / "blank.jsonl", [b"", b"  "])  # blank lines are not records
  skipped = _write_bytes(
    tmp_path / "skipped.jsonl", [b'{"prompt": "Question \xff"}', _json({**SKY, "rejected": SKY["chosen"]})]
  )
  cases = [
    ({"train": empty}, "error", f"no usable records in {empty}: the file has no records."),
    ({"train": [good, blank]}, "error", f"no usable records in {blank}: the file has no records."),
    (
      {"train": good, "eval": skipped},
      "skip",
      f"no usable records in {skipped}: every record was skipped (2 read; skipped identical: 1, invalid_utf8: 1).",
    ),
  ]
  for i, (files, mode, message) in enumerate(cases):
    data_dir = tmp_path / f"d{i}"
    with pytest.raises(data.NoUsableRecords) as err:
      data.prepare_files(files, data_dir=str(data_dir), tokenizer=tok, on_bad_record=mode)
    assert str(err.value) == message
    assert not list(data_dir.rglob("dataset_info.json"))  # nothing prepared


def test_all_skipped_generated_split_is_named(tmp_path):
  with pytest.raises(data.NoUsableRecords, match=r"^no usable records in <generated> split 'eval': every record"):
    data.prepare_generated(
      {"train": _generated(2), "eval": [{"prompt": [1], "chosen": [2], "rejected": [2]}]},
      data_dir=str(tmp_path),
      vocab_size=64,
      on_bad_record="skip",
    )


def test_unknown_token_rate_per_split_and_its_limit(tmp_path, tok):
  # Word-level vocabulary: "zebra", "qwerty", "zorp" are not in it (checked below), so
  # each occurrence is one <unk>. Tokens per pair, counted by hand: prompt = BOS + 10 words
  # ("Question : What colour is the X ? Answer :"), each completion = 5 words + EOS: 11 + 6 + 6.
  assert not {"zebra", "qwerty", "zorp"} & set(vocab())
  zebra = {
    **SKY,
    "prompt": SKY["prompt"].replace("sky", "zebra"),
    "chosen": " The zebra is blue .",
    "rejected": " The zebra is red .",
  }
  qwerty = {
    "prompt": SKY["prompt"].replace("sky", "qwerty"),
    "chosen": " The qwerty is blue .",
    "rejected": " The qwerty is zorp .",
  }
  train = _write_bytes(tmp_path / "train.jsonl", [_json(SKY), _json(zebra)])  # 0 + 3 unknown of 2 x 23
  held = _write_bytes(tmp_path / "held.jsonl", [_json(qwerty)])  # 1 + 1 + 2 unknown of 23
  files = {"train": train, "eval": held}
  prep = data.prepare_files(files, data_dir=str(tmp_path / "d"), tokenizer=tok)
  assert (prep.stats["train"].tokens, prep.stats["train"].unknown_tokens) == (46, 3)
  assert prep.stats["train"].unknown_token_rate == pytest.approx(3 / 46)
  assert prep.stats["eval"].unknown_token_rate == pytest.approx(4 / 23)
  assert data.stats(prep.path) == prep.stats  # stored with the dataset
  # The limit is checked on the reused dataset too (nothing is prepared again).
  written = sorted(os.listdir(prep.path))
  again = data.prepare_files(files, data_dir=str(tmp_path / "d"), tokenizer=tok, max_unknown_token_rate=0.25)
  assert again.stats == prep.stats
  with pytest.raises(data.UnknownTokenRate) as err:
    data.prepare_files(files, data_dir=str(tmp_path / "d"), tokenizer=tok, max_unknown_token_rate=0.1)
  assert str(err.value).startswith(
    "split 'eval': unknown-token rate 0.1739 (4 of 23 tokens are the unknown token (<unk>)) is above "
    "max_unknown_token_rate=0.1"
  )
  assert sorted(os.listdir(prep.path)) == written
  with pytest.raises(ValueError, match=r"max_unknown_token_rate=1.5 is not allowed; allowed: None or a number in"):
    data.prepare_files(files, data_dir=str(tmp_path / "d"), tokenizer=tok, max_unknown_token_rate=1.5)


def test_preparation_prints_no_download_lines_or_absl_warnings(tmp_path, tok, capfd, caplog):
  caplog.set_level("INFO")
  data.prepare_files({"train": example("standard.parquet")}, data_dir=str(tmp_path / "f"), tokenizer=tok)
  data.prepare_files({"train": example("standard.parquet")}, data_dir=str(tmp_path / "f"), tokenizer=tok)  # reused
  data.prepare_generated({"train": _generated(3)}, data_dir=str(tmp_path / "g"), vocab_size=64)
  out, err = capfd.readouterr()
  assert "Downloading" not in out + err and "downloaded and prepared" not in out + err
  assert "WARNING" not in out + err
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def _generated(n, start=100):
  rng = np.random.default_rng(0)
  return [
    {
      "prompt": rng.integers(1, 50, size=rng.integers(2, 6)).astype(np.int32),
      "chosen": [int(x) for x in rng.integers(1, 50, size=3)],
      "rejected": [int(x) for x in rng.integers(1, 50, size=2)],
      "score_chosen": np.float32(0.5 + i),
      "example_id": start + i,
    }
    for i in range(n)
  ]


def test_generated_records_roundtrip(tmp_path):
  recs = _generated(40)
  recs.append({"prompt": [1], "chosen": [5, 6], "rejected": [5, 6], "example_id": 7})  # identical
  prep = data.prepare_generated(
    {"train": recs}, data_dir=str(tmp_path), vocab_size=64, on_bad_record="skip", name="world"
  )
  assert prep.path.endswith(os.path.join("pofx_generated_preferences", "world", "1.0.0"))
  assert prep.stats["train"].skipped == {"identical": 1}
  src = prep.source("train")
  assert len(src) == 40
  got = {int(src[i]["example_id"]): src[i] for i in range(len(src))}
  assert sorted(got) == list(range(100, 140))
  for i, rec in enumerate(recs[:40]):
    ex = got[rec["example_id"]]
    assert ex["prompt"].tolist() == list(rec["prompt"]) and ex["chosen"].tolist() == rec["chosen"]
    assert ex["score_chosen"] == pytest.approx(0.5 + i) and math.isnan(ex["score_rejected"])
    assert ex["source_file"] == b"<generated>" and ex["source_line"] == i + 1
  with pytest.raises(ValueError, match="prepared from different inputs"):
    data.prepare_generated(
      {"train": _generated(40, start=0)}, data_dir=str(tmp_path), vocab_size=64, on_bad_record="skip", name="world"
    )


def test_generated_records_errors(tmp_path):
  with pytest.raises(BadRecord, match=r"<generated>:2: bad record \(bad_token_id\)"):
    data.prepare_generated(
      {"train": [{"prompt": [1], "chosen": [2], "rejected": [3]}, {"prompt": [1], "chosen": [2], "rejected": [64]}]},
      data_dir=str(tmp_path),
      vocab_size=64,
    )
  with pytest.raises(ValueError, match="pass fingerprint="):
    data.prepare_generated({"train": iter(_generated(3))}, data_dir=str(tmp_path))
  prep = data.prepare_generated(
    {"train": iter(_generated(3))}, data_dir=str(tmp_path), fingerprint="world-seed-0", name="it"
  )
  assert len(prep.source("train")) == 3


def test_batches_feed_the_policy_and_layouts_agree(prepared, tok):
  """Prepared conversational data -> loader -> tiny Llama log-probs: the fused and the
  prompt-shared layouts of the same pairs give the same per-pair log-probs."""
  import jax

  from pofx import models, policy

  model = models.make(models.llama.tiny(vocab_size=tok.vocab_size))
  params = model.init(jax.random.PRNGKey(0))
  logps_fn = jax.jit(policy.make_logps_fn(model.apply, model.head))
  src = prepared.source("conversational")
  out = {}
  for layout, kw in (("fused", dict(seq_bucket=64)), ("prompt_shared", dict(seq_bucket=128))):
    loader = data.PreferenceLoader(
      src, batch_size=4, layout=layout, layout_kwargs=kw, seed=0, process_index=0, process_count=1
    )
    batch = loader.batch_at(5)
    lp = logps_fn(params, {"pairs": batch["pairs"]})
    out[layout] = (batch["example_id"], np.asarray(lp.chosen), np.asarray(lp.rejected))
  np.testing.assert_array_equal(out["fused"][0], out["prompt_shared"][0])
  assert np.all(np.isfinite(out["fused"][1])) and np.all(out["fused"][1] < 0)
  np.testing.assert_allclose(out["fused"][1], out["prompt_shared"][1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["fused"][2], out["prompt_shared"][2], rtol=1e-5, atol=1e-5)
