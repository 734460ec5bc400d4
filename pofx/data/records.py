r"""Reading and validating preference records (TRL's dataset formats), with bad-record handling.

Record formats (one JSON object per JSONL line, or one Parquet row), as in TRL:

  standard                 {"prompt": str, "chosen": str, "rejected": str}
  implicit                 {"chosen": str, "rejected": str}            (prompt = shared prefix)
  conversational           {"prompt": [msg], "chosen": [msg], "rejected": [msg]}
  conversational_implicit  {"chosen": [msg], "rejected": [msg]}        (prompt = shared messages)
  tokenized                {"prompt_input_ids": [int], "chosen_input_ids": [int],
                            "rejected_input_ids": [int]}
  ranking                  {"prompt": str | [msg], "completions": [str | [msg]],
                            "scores": [float]  or  "ranks": [int]}   (K >= 2; rank 1 = best)

where `msg = {"role": str, "content": str}`. Standard, conversational and tokenized records may
carry `score_chosen` / `score_rejected` (numbers). `format="auto"` picks the format of each record
from its fields (the first match in the order tokenized, ranking, [conversational] with a prompt,
[conversational] implicit); a named format requires its fields.

Implicit prompts. Conversational: the prompt is the longest common prefix of the two message
lists (TRL's `extract_prompt`). Strings: the split is made on *token ids* (see
`pofx.data.tokenize`), so no text is cut inside a token; `split_implicit_text` gives TRL's
character split for reference.

K-way rankings become pairs (`ranking=`): "all_pairs" (every pair with different scores, higher
score chosen), "best_vs_rest" (the best against each other), "best_worst" (the best against the
worst). Tied completions never form a pair. Each pair keeps the scores of its two completions
(NaN for ranks) and a `group` index (the source record), so the ranking can be regrouped.

Bad records (`REASONS`) raise `BadRecord` (a ValueError whose message names the file, the line
and the reason) or, with `on_bad_record="skip"`, are skipped and counted in `Stats`. A JSONL line
that is not valid UTF-8 is a bad record too ("invalid_utf8"), so one stray byte costs one record,
not the file. A file that yields no pair at all (empty, or every record skipped) raises
`NoUsableRecords`; an unknown-token rate above a caller's limit raises `UnknownTokenRate`. All
three are `DataError`s (ValueErrors whose message is one line naming the file or split).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from pofx.options import FORMATS, ON_BAD_RECORD, RANKING_MODES  # noqa: F401  (allowed values, defined once)

# Every reason a record can be rejected for (the keys of `Stats.skipped`).
REASONS = (
  "invalid_utf8",  # a JSONL line whose bytes are not valid UTF-8
  "malformed_json",  # a JSONL line that is not a JSON object
  "missing_field",  # a required field is absent or null
  "wrong_type",  # a field has the wrong type (e.g. chosen is a number, bad message)
  "empty_prompt",  # the prompt has no tokens
  "empty_completion",  # chosen or rejected is empty (as text, messages or tokens)
  "identical",  # chosen == rejected
  "too_long",  # over a length limit (with truncation="reject", or still after truncating)
  "bad_token_id",  # a pre-tokenised id outside [0, vocab_size)
  "prompt_boundary",  # the tokenised prompt is not a prefix of the tokenised prompt + completion
)

Messages = List[Dict[str, str]]
Text = Union[str, Messages, List[int]]


class DataError(ValueError):
  """Input data that cannot be used; the message is one line naming the file (and line) or split."""


class NoUsableRecords(DataError):
  """A file that yields no pair: it is empty, or every record in it was skipped."""

  def __init__(self, file: str, stats: Stats):
    self.file, self.stats = file, stats
    if stats.records_read == 0:
      why = "the file has no records"
    else:
      why = f"every record was skipped ({stats.records_read} read; skipped {_reasons(stats.skipped)})"
    super().__init__(f"no usable records in {file}: {why}.")


class UnknownTokenRate(DataError):
  """A split whose share of unknown tokens is above the caller's limit."""

  def __init__(self, split: str, stats: Stats, limit: float, unk_token: Optional[str] = None):
    self.split, self.rate, self.limit = split, stats.unknown_token_rate, limit
    unk = f" ({unk_token})" if unk_token else ""
    super().__init__(
      f"split {split!r}: unknown-token rate {self.rate:.4f} ({stats.unknown_tokens} of {stats.tokens} tokens "
      f"are the unknown token{unk}) is above max_unknown_token_rate={limit}: the tokenizer does not cover "
      f"this text; use one that does, or raise the limit."
    )


def _reasons(skipped: Dict[str, int]) -> str:
  return ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))


class BadRecord(DataError):
  """A record that cannot be used; `str(err)` is `"<file>:<line>: bad record (<reason>): ..."`."""

  def __init__(self, reason: str, detail: str, file: str = "<unknown>", line: int = 0):
    if reason not in REASONS:
      raise AssertionError(f"unknown bad-record reason {reason!r}")
    self.reason, self.detail, self.file, self.line = reason, detail, file, line
    super().__init__(f"{file}:{line}: bad record ({reason}): {detail}")

  def at(self, file: str, line: int) -> BadRecord:
    """The same error located at `file:line`."""
    return BadRecord(self.reason, self.detail, file, line)


@dataclasses.dataclass
class Stats:
  """Counts of one ingestion: records read, examples written, skipped records by reason,
  examples shortened by a truncation policy (they carry `truncated=1`), and the token ids written
  (prompt + chosen + rejected of every pair, special tokens included) with how many of them are
  the tokenizer's unknown token (text the tokenizer does not cover). `unknown_tokens` is None for
  a dataset prepared before it was counted."""

  records_read: int = 0
  examples_written: int = 0
  truncated: int = 0
  skipped: Dict[str, int] = dataclasses.field(default_factory=dict)
  tokens: int = 0
  unknown_tokens: Optional[int] = 0

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  @property
  def unknown_token_rate(self) -> Optional[float]:
    """unknown_tokens / tokens: 0.0 for a tokenizer without an unknown token (a byte-level one
    maps every text); None when nothing was counted."""
    if self.unknown_tokens is None or self.tokens == 0:
      return None
    return self.unknown_tokens / self.tokens

  def skip(self, reason: str):
    self.skipped[reason] = self.skipped.get(reason, 0) + 1

  def merge(self, other: Stats) -> Stats:
    skipped = collections.Counter(self.skipped)
    skipped.update(other.skipped)
    unknown = (
      None if None in (self.unknown_tokens, other.unknown_tokens) else self.unknown_tokens + other.unknown_tokens
    )
    return Stats(
      self.records_read + other.records_read,
      self.examples_written + other.examples_written,
      self.truncated + other.truncated,
      dict(skipped),
      self.tokens + other.tokens,
      unknown,
    )

  def as_dict(self) -> dict:
    return {
      "records_read": self.records_read,
      "examples_written": self.examples_written,
      "truncated": self.truncated,
      "skipped": dict(sorted(self.skipped.items())),
      "tokens": self.tokens,
      "unknown_tokens": self.unknown_tokens,
    }

  @classmethod
  def from_dict(cls, d: dict) -> Stats:
    counted = d.get("unknown_tokens") is not None  # absent in datasets prepared before it was counted
    return cls(
      int(d["records_read"]),
      int(d["examples_written"]),
      int(d["truncated"]),
      {str(k): int(v) for k, v in dict(d["skipped"]).items()},
      int(d.get("tokens", 0)),
      int(d["unknown_tokens"]) if counted else None,
    )


@dataclasses.dataclass(frozen=True)
class Example:
  """One preference pair before tokenisation.

  kind: "text" (strings), "chat" (message lists) or "ids" (token ids).
  prompt: the prompt (text, messages or ids); None for implicit text (split after tokenising).
  chosen, rejected: completions of the same kind (for implicit text: the full texts).
  score_chosen, score_rejected: floats, NaN when absent.
  group: index of the source record within its file (several pairs share it for rankings).
  """

  kind: str
  prompt: Optional[Text]
  chosen: Text
  rejected: Text
  score_chosen: float = math.nan
  score_rejected: float = math.nan
  group: int = 0


def check_choice(name: str, value: str, allowed: Sequence[str]):
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not allowed; allowed: {list(allowed)}.")


# ---------------------------------------------------------------------------------------------
# Reading files.


def read_records(path: str) -> Iterator[Tuple[int, Union[dict, BadRecord]]]:
  """Yields `(line, record)` from a `.jsonl` / `.json` (one object per line) or `.parquet` file.

  `line` is 1-based: the JSONL line number (blank lines are not records and are passed over) or
  the Parquet row number. A JSONL line that is not a JSON object yields a `BadRecord`
  ("malformed_json") instead of a dict, and one whose bytes are not valid UTF-8 a `BadRecord`
  ("invalid_utf8"): the file is read as bytes and decoded line by line, so the lines after a
  stray byte are still read. A UTF-8 byte-order mark at the start of the file is passed over.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext in (".jsonl", ".json", ".ndjson"):
    with open(path, "rb") as f:
      for line_no, raw in enumerate(f, start=1):
        try:
          line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
          yield (
            line_no,
            BadRecord(
              "invalid_utf8",
              f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line: {e.reason})",
              path,
              line_no,
            ),
          )
          continue
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          yield line_no, BadRecord("malformed_json", f"not valid JSON ({e.msg} at column {e.colno})", path, line_no)
          continue
        if not isinstance(rec, dict):
          yield line_no, BadRecord("malformed_json", f"a JSON {type(rec).__name__}, not an object", path, line_no)
          continue
        yield line_no, rec
  elif ext in (".parquet", ".pq"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (only for Parquet input)

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
      for rec in batch.to_pylist():
        row += 1
        yield row, rec
  else:
    raise ValueError(f"{path}: unsupported file type {ext!r}; use .jsonl, .json, .ndjson or .parquet.")


# ---------------------------------------------------------------------------------------------
# Parsing one record.


def _present(rec: dict, key: str) -> bool:
  return key in rec and rec[key] is not None


def _require(rec: dict, keys: Sequence[str]):
  missing = [k for k in keys if not _present(rec, k)]
  if missing:
    raise BadRecord("missing_field", f"missing field(s) {missing}; the record has {sorted(rec)}")


def _is_messages(x) -> bool:
  return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def _messages(x, field: str) -> Messages:
  if not isinstance(x, list) or not all(isinstance(m, dict) for m in x):
    raise BadRecord("wrong_type", f"{field} must be a list of {{role, content}} messages, got {type(x).__name__}")
  out = []
  for i, m in enumerate(x):
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
      raise BadRecord(
        "wrong_type",
        f"{field}[{i}] must have string 'role' and 'content', got { {k: type(v).__name__ for k, v in m.items()} }",
      )
    out.append({"role": role, "content": content})
  return out


def _string(x, field: str) -> str:
  if not isinstance(x, str):
    raise BadRecord("wrong_type", f"{field} must be a string, got {type(x).__name__}")
  return x


def _ids(x, field: str) -> List[int]:
  if hasattr(x, "tolist"):
    x = x.tolist()
  if not isinstance(x, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
    raise BadRecord("wrong_type", f"{field} must be a list of integer token ids")
  return list(x)


def _score(rec: dict, field: str) -> float:
  if not _present(rec, field):
    return math.nan
  v = rec[field]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
    raise BadRecord("wrong_type", f"{field} must be a finite number, got {v!r}")
  return float(v)


def _check_pair(prompt, chosen, rejected, *, check_prompt: bool = True):
  if check_prompt and prompt is not None and len(prompt) == 0 and not isinstance(prompt, str):
    raise BadRecord("empty_prompt", "the prompt is empty")
  for name, y in (("chosen", chosen), ("rejected", rejected)):
    if len(y) == 0 or (isinstance(y, str) and not y.strip()):
      raise BadRecord("empty_completion", f"the {name} completion is empty")
  if chosen == rejected:
    raise BadRecord("identical", "chosen and rejected are identical")


def detect_format(rec: dict) -> str:
  """The TRL format of a record, from its fields (see the module docstring)."""
  if any(k in rec for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")):
    return "tokenized"
  if "completions" in rec:
    return "ranking"
  chat = _is_messages(rec.get("chosen")) or _is_messages(rec.get("rejected")) or _is_messages(rec.get("prompt"))
  if "prompt" in rec:
    return "conversational" if chat else "standard"
  return "conversational_implicit" if chat else "implicit"


def common_prefix_length(a: Sequence, b: Sequence) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def split_implicit_text(chosen: str, rejected: str) -> Tuple[str, str, str]:
  """TRL's character split of an implicit prompt (`trl.extract_prompt` on strings): the longest
  common prefix, less a trailing space (the space stays with the completions). Reference only:
  pofx splits implicit text on token ids (`pofx.data.tokenize`)."""
  n = common_prefix_length(chosen, rejected)
  if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
    n -= 1
  return chosen[:n], chosen[n:], rejected[n:]


def _ranking_pairs(scores: Sequence[float], higher_is_better: bool, mode: str):
  k = len(scores)
  key = [s if higher_is_better else -s for s in scores]
  order = sorted(range(k), key=lambda i: -key[i])  # best first (stable)
  best, worst = order[0], order[-1]
  if mode == "best_worst":
    cand = [(best, worst)]
  elif mode == "best_vs_rest":
    cand = [(best, j) for j in order[1:]]
  else:
    cand = [(order[a], order[b]) for a in range(k) for b in range(a + 1, k)]
  return [(i, j) for i, j in cand if key[i] > key[j]]


def parse_record(rec: dict, fmt: str = "auto", *, ranking: str = "all_pairs", group: int = 0) -> List[Example]:
  """A record -> its `Example`s (one, or several for a ranking). Raises `BadRecord` (unlocated:
  the caller adds the file and line with `.at`)."""
  check_choice("format", fmt, FORMATS)
  check_choice("ranking", ranking, RANKING_MODES)
  if not isinstance(rec, dict):
    raise BadRecord("malformed_json", f"a record must be an object, got {type(rec).__name__}")
  if fmt == "unpaired":
    raise ValueError("parse_record: unpaired records pair up across a file: use pofx.data.unpaired (iter_examples).")
  if fmt == "auto" and "label" in rec and ("completion" in rec or "completion_input_ids" in rec):
    raise BadRecord("missing_field", "an unpaired record (completion, label): read it with format='unpaired' (KTO)")
  if fmt == "auto":
    fmt = detect_format(rec)

  if fmt == "tokenized":
    _require(rec, ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    p, c, r = (_ids(rec[k], k) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    if not p:
      raise BadRecord("empty_prompt", "prompt_input_ids is empty")
    _check_pair(p, c, r)
    return [Example("ids", p, c, r, _score(rec, "score_chosen"), _score(rec, "score_rejected"), group)]

  if fmt == "ranking":
    _require(rec, ("prompt", "completions"))
    has_scores, has_ranks = _present(rec, "scores"), _present(rec, "ranks")
    if has_scores == has_ranks:
      raise BadRecord("missing_field", "a ranking needs exactly one of 'scores' or 'ranks'")
    comps = rec["completions"]
    if hasattr(comps, "tolist"):
      comps = comps.tolist()
    if not isinstance(comps, list) or len(comps) < 2:
      raise BadRecord("wrong_type", "completions must be a list of at least 2 completions")
    chat = _is_messages(rec["prompt"]) or any(_is_messages(c) for c in comps)
    if chat:
      prompt = _messages(rec["prompt"], "prompt")
      comps = [_messages(c, f"completions[{i}]") for i, c in enumerate(comps)]
    else:
      prompt = _string(rec["prompt"], "prompt")
      comps = [_string(c, f"completions[{i}]") for i, c in enumerate(comps)]
    field = "scores" if has_scores else "ranks"
    vals = rec[field]
    if hasattr(vals, "tolist"):
      vals = vals.tolist()
    if (
      not isinstance(vals, list)
      or len(vals) != len(comps)
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)
    ):
      raise BadRecord("wrong_type", f"{field} must be {len(comps)} finite numbers, one per completion")
    for i, c in enumerate(comps):
      if len(c) == 0 or (isinstance(c, str) and not c.strip()):
        raise BadRecord("empty_completion", f"completions[{i}] is empty")
    pairs = _ranking_pairs([float(v) for v in vals], has_scores, ranking)
    if not pairs:
      raise BadRecord("identical", f"all completions are tied in {field}")
    out = []
    for i, j in pairs:
      if comps[i] == comps[j]:
        raise BadRecord("identical", f"completions[{i}] and completions[{j}] are identical")
      sc = (float(vals[i]), float(vals[j])) if has_scores else (math.nan, math.nan)
      out.append(Example("chat" if chat else "text", prompt, comps[i], comps[j], sc[0], sc[1], group))
    return out

  if fmt in ("standard", "conversational"):
    _require(rec, ("prompt", "chosen", "rejected"))
  else:
    _require(rec, ("chosen", "rejected"))
  scores = (_score(rec, "score_chosen"), _score(rec, "score_rejected"))

  if fmt == "standard":
    p, c, r = (_string(rec[k], k) for k in ("prompt", "chosen", "rejected"))
    _check_pair(p, c, r)
    return [Example("text", p, c, r, *scores, group)]
  if fmt == "implicit":
    c, r = _string(rec["chosen"], "chosen"), _string(rec["rejected"], "rejected")
    if c == r:
      raise BadRecord("identical", "chosen and rejected are identical")
    _check_pair(None, c, r)
    return [Example("text", None, c, r, *scores, group)]
  if fmt == "conversational":
    p, c, r = (_messages(rec[k], k) for k in ("prompt", "chosen", "rejected"))
    _check_pair(p, c, r)
    return [Example("chat", p, c, r, *scores, group)]
  # conversational_implicit
  c, r = _messages(rec["chosen"], "chosen"), _messages(rec["rejected"], "rejected")
  if c == r:
    raise BadRecord("identical", "chosen and rejected are identical")
  n = common_prefix_length(c, r)
  p, c, r = c[:n], c[n:], r[n:]
  _check_pair(p, c, r)
  return [Example("chat", p, c, r, *scores, group)]
