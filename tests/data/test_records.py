"""Record formats, K-way rankings, and every bad-record kind in both modes (error / skip)."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pofx import data
from pofx.data import BadRecord, Limits
from tests.data import BOS, EOS, example, ids

USER = lambda s: {"role": "user", "content": s}  # noqa: E731
ASSISTANT = lambda s: {"role": "assistant", "content": s}  # noqa: E731


@pytest.fixture(scope="module")
def tok():
  return data.Tokenizer.from_dir(example(""))


@pytest.mark.parametrize(
  "rec, fmt",
  [
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "standard"),
    ({"chosen": "q a", "rejected": "q b"}, "implicit"),
    ({"prompt": [USER("q")], "chosen": [ASSISTANT("a")], "rejected": [ASSISTANT("b")]}, "conversational"),
    ({"chosen": [USER("q"), ASSISTANT("a")], "rejected": [USER("q"), ASSISTANT("b")]}, "conversational_implicit"),
    ({"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]}, "tokenized"),
    ({"prompt": "q", "completions": ["a", "b"], "scores": [1, 0]}, "ranking"),
  ],
)
def test_detect_format(rec, fmt):
  assert data.detect_format(rec) == fmt


def test_conversational_implicit_prompt_is_common_messages():
  rec = {
    "chosen": [USER("q1"), ASSISTANT("a1"), USER("q2"), ASSISTANT("good")],
    "rejected": [USER("q1"), ASSISTANT("a1"), USER("q2"), ASSISTANT("bad")],
  }
  [ex] = data.parse_record(rec)
  assert ex.kind == "chat"
  assert ex.prompt == [USER("q1"), ASSISTANT("a1"), USER("q2")]
  assert ex.chosen == [ASSISTANT("good")] and ex.rejected == [ASSISTANT("bad")]


def test_scores_are_kept_and_nan_when_absent():
  [ex] = data.parse_record({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 7, "score_rejected": 2.5})
  assert (ex.score_chosen, ex.score_rejected) == (7.0, 2.5)
  [ex] = data.parse_record({"prompt": "q", "chosen": "a", "rejected": "b"})
  assert math.isnan(ex.score_chosen) and math.isnan(ex.score_rejected)


RANKED = {"prompt": "q", "completions": ["c0", "c1", "c2", "c3"], "scores": [0.5, 0.9, 0.1, 0.5]}


def _pairs(exs):
  return [(e.chosen, e.rejected, e.score_chosen, e.score_rejected) for e in exs]


def test_ranking_all_pairs_skips_ties():
  exs = data.parse_record(RANKED, ranking="all_pairs", group=4)
  # Best first: c1 (0.9), c0 (0.5), c3 (0.5), c2 (0.1); the tie c0 ~ c3 forms no pair.
  assert _pairs(exs) == [
    ("c1", "c0", 0.9, 0.5),
    ("c1", "c3", 0.9, 0.5),
    ("c1", "c2", 0.9, 0.1),
    ("c0", "c2", 0.5, 0.1),
    ("c3", "c2", 0.5, 0.1),
  ]
  assert {e.group for e in exs} == {4}


def test_ranking_best_vs_rest_and_best_worst():
  assert _pairs(data.parse_record(RANKED, ranking="best_vs_rest")) == [
    ("c1", "c0", 0.9, 0.5),
    ("c1", "c3", 0.9, 0.5),
    ("c1", "c2", 0.9, 0.1),
  ]
  assert _pairs(data.parse_record(RANKED, ranking="best_worst")) == [("c1", "c2", 0.9, 0.1)]


def test_ranking_with_ranks():
  rec = {"prompt": "q", "completions": ["x", "y", "z"], "ranks": [2, 3, 1]}  # z best, y worst
  exs = data.parse_record(rec, ranking="all_pairs")
  assert [(e.chosen, e.rejected) for e in exs] == [("z", "x"), ("z", "y"), ("x", "y")]
  assert all(math.isnan(e.score_chosen) for e in exs)


def test_conversational_ranking(tok):
  rec = {
    "prompt": [USER("What colour is the sky ?")],
    "completions": [[ASSISTANT("The sky is red .")], [ASSISTANT("The sky is blue .")]],
    "scores": [0.0, 1.0],
  }
  [ex] = data.parse_record(rec)
  assert ex.kind == "chat" and ex.chosen == [ASSISTANT("The sky is blue .")]
  pair = data.tokenize_example(ex, tok)
  assert pair.prompt == [BOS] + ids("<|user|>What colour is the sky ?<|end|><|assistant|>")
  assert pair.chosen == ids("The sky is blue .<|end|>")
  assert (pair.score_chosen, pair.score_rejected) == (1.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Bad records: one line of each kind.

GOOD = {
  "prompt": "Question : What colour is the sky ? Answer :",
  "chosen": " The sky is blue .",
  "rejected": " The sky is red .",
}
LIMITS = Limits(max_length=20)
BAD = {
  # "\udcff" is written as the single byte 0xff (see `_write`): a line that is not UTF-8.
  "invalid_utf8": '{"prompt": "Question :", "chosen": " blue \udcff", "rejected": " red"}',
  "malformed_json": '{"prompt": "Question :", "chosen": ',
  "missing_field": json.dumps({"prompt": "Question :", "chosen": " blue"}),
  "wrong_type": json.dumps({"prompt": "Question :", "chosen": 5, "rejected": " red"}),
  "empty_prompt": json.dumps({"prompt": [], "chosen": [ASSISTANT("blue")], "rejected": [ASSISTANT("red")]}),
  "empty_completion": json.dumps({"prompt": "Question :", "chosen": "", "rejected": " red"}),
  "identical": json.dumps({"prompt": "Question :", "chosen": " red", "rejected": " red"}),
  "too_long": json.dumps(
    {"prompt": "Question : " + "What colour is the sky ? " * 4, "chosen": " blue", "rejected": " red"}
  ),
  "bad_token_id": json.dumps({"prompt_input_ids": [2, 5], "chosen_input_ids": [6, 99999], "rejected_input_ids": [7]}),
  "prompt_boundary": json.dumps({"prompt": "Answer :", "chosen": ": The sky", "rejected": ": The sea"}),
}


def test_every_reason_is_covered():
  assert set(BAD) == set(data.REASONS)


def _write(path, lines):
  """UTF-8, except that a lone surrogate U+DC80..U+DCFF becomes the raw byte 0x80..0xff."""
  path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
  return str(path)


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_record_error_names_file_line_reason(tmp_path, tok, reason):
  # Line 1 good, line 2 blank (not a record), line 3 bad, line 4 good.
  path = _write(tmp_path / "prefs.jsonl", [json.dumps(GOOD), "", BAD[reason], json.dumps(GOOD)])
  with pytest.raises(ValueError) as err:
    list(data.iter_examples(path, tokenizer=tok, limits=LIMITS, on_bad_record="error"))
  assert isinstance(err.value, BadRecord)
  assert str(err.value).startswith(f"{path}:3: bad record ({reason}): ")
  assert (err.value.file, err.value.line, err.value.reason) == (path, 3, reason)


def test_bad_records_skipped_and_counted(tmp_path, tok):
  lines = [json.dumps(GOOD)]
  for reason in sorted(BAD):
    lines += [BAD[reason], json.dumps(GOOD)]
  lines.append(BAD["identical"])
  path = _write(tmp_path / "prefs.jsonl", lines)
  stats = data.Stats()
  out = list(data.iter_examples(path, tokenizer=tok, limits=LIMITS, on_bad_record="skip", stats=stats))
  expected = dict.fromkeys(BAD, 1)
  expected["identical"] = 2
  assert stats.skipped == expected
  assert stats.records_read == len(lines) == 2 * len(BAD) + 2
  assert stats.examples_written == len(out) == len(BAD) + 1
  assert stats.num_skipped == len(BAD) + 1
  # The good records keep their own lines and get consecutive ids.
  assert [f["source_line"] for _, f in out] == [1] + [2 * i + 3 for i in range(len(BAD))]
  assert [k for k, _ in out] == list(range(len(out)))
  f = out[0][1]
  assert f["prompt"].tolist() == [BOS] + ids(GOOD["prompt"])
  assert f["chosen"].tolist() == ids(GOOD["chosen"]) + [EOS]


def test_invalid_utf8_line_names_the_byte_and_the_next_lines_are_read(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"b": "caf\xe9"}\n{"c": "caf\xc3\xa9"}\n')  # BOM; Latin-1 e-acute; UTF-8
  got = list(data.read_records(str(path)))
  assert got[0] == (1, {"a": 1})  # the byte-order mark is not part of the record
  assert got[1][0] == 2 and isinstance(got[1][1], BadRecord)
  assert str(got[1][1]) == (
    f"{path}:2: bad record (invalid_utf8): not valid UTF-8 (byte 0xe9 at byte 11 of the line: invalid continuation byte)"
  )
  assert got[2] == (3, {"c": "caf\u00e9"})


def test_non_object_json_line_is_malformed(tmp_path, tok):
  path = _write(tmp_path / "p.jsonl", [json.dumps(GOOD), "[1, 2]"])
  with pytest.raises(BadRecord, match=r"p.jsonl:2: bad record \(malformed_json\)"):
    list(data.iter_examples(path, tokenizer=tok))


def test_parquet_rows_are_numbered_from_one(tmp_path, tok):
  rows = [GOOD, {"prompt": "Question :", "chosen": " red", "rejected": " red"}]
  path = str(tmp_path / "p.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  with pytest.raises(BadRecord, match=r"p.parquet:2: bad record \(identical\)"):
    list(data.iter_examples(path, tokenizer=tok))


def test_named_format_requires_its_fields(tok, tmp_path):
  path = _write(tmp_path / "p.jsonl", [json.dumps({"chosen": "a b", "rejected": "a c"})])
  with pytest.raises(BadRecord, match=r"missing_field.*\['prompt'\]"):
    list(data.iter_examples(path, tokenizer=tok, format="standard"))


def test_option_validation(tmp_path):
  with pytest.raises(ValueError, match="on_bad_record='drop' is not allowed; allowed"):
    list(data.iter_examples(example("standard.jsonl"), on_bad_record="drop"))
  with pytest.raises(ValueError, match="format='csv' is not allowed"):
    list(data.iter_examples(example("standard.jsonl"), format="csv"))
  with pytest.raises(ValueError, match="unsupported file type"):
    list(data.read_records(str(tmp_path / "x.csv")))
