r"""TFDS builders for preference data, in the array_record format (no TensorFlow needed).

Two builders with the same features:

* `PreferenceFiles`: local JSONL / Parquet files in TRL's formats (`pofx.data.records`),
  tokenised with a local tokenizer (`pofx.data.tokenize`).
* `GeneratedPreferences`: records that are already token ids (e.g. the controlled world's
  pairs): dicts with `prompt`, `chosen`, `rejected` id sequences and optional `score_chosen`,
  `score_rejected`, `example_id`.

Features of every example:
  prompt, chosen, rejected: int32 token ids `[None]`.
  score_chosen, score_rejected: float32 (NaN when the record has none).
  example_id: int64, unique within the split: 0, 1, ... in generation order (files in the given
    order, lines in file order, the pairs of a ranking in turn; skipped records take no id), or
    the records' own `example_id` for `GeneratedPreferences`.
  group_id: int64, the example id of the first pair of the same source record (rankings give
    several pairs per record; otherwise == example_id).
  source_file: text (the file's base name, or "<generated>"); source_line: int64 (1-based line
    or Parquet row; for generated records the record's index + 1).
  truncated: int32, 1 when a truncation policy shortened the pair.

The prepared data (array_record shards) is read back, by anyone, with `data_source(path, split)`
or `tfds.builder_from_directory(path).as_data_source(split)`; the ingestion counts (`Stats` per
split) are in the dataset's metadata (`stats(path)`). A fingerprint of the inputs (file contents,
tokenizer, options) is stored too, and preparing different inputs into an existing dataset
directory is refused (never silently reused).

A file that yields no pair (empty, or every record skipped) stops the preparation with
`NoUsableRecords` naming it, before anything is written; `prepare_files(max_unknown_token_rate=)`
refuses a split whose share of unknown tokens (`Stats.unknown_token_rate`) is above the limit.
Preparing local data prints nothing of TFDS's own (its "Downloading and preparing dataset" lines
and its warning about a custom builder config are about downloads and registered configs, which
these builders do not have); its progress bars follow `tfds.display_progress_bar`.

Typical use:
    tok = pofx.data.Tokenizer.from_dir("examples/data")
    info = pofx.data.prepare_files({"train": ["examples/data/standard.jsonl"]}, data_dir=tmp,
                                   tokenizer=tok, on_bad_record="skip")
    source = info.source("train")    # random access, len(source), source[i] -> dict of numpy
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from pofx.data import records as records_lib
from pofx.data import tokenize as tokenize_lib
from pofx.data import unpaired as unpaired_lib
from pofx.data.records import BadRecord, DataError, NoUsableRecords, Stats, UnknownTokenRate
from pofx.options import UNKNOWN_TOKEN_RATE_RANGE

VERSION = "1.0.0"


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def features():
  """The `tfds.features.FeaturesDict` shared by both builders."""
  tfds = _tfds()
  ids = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)  # noqa: E731
  return tfds.features.FeaturesDict(
    {
      "prompt": ids(),
      "chosen": ids(),
      "rejected": ids(),
      "score_chosen": tfds.features.Scalar(dtype=np.float32),
      "score_rejected": tfds.features.Scalar(dtype=np.float32),
      "example_id": tfds.features.Scalar(dtype=np.int64),
      "group_id": tfds.features.Scalar(dtype=np.int64),
      "source_file": tfds.features.Text(),
      "source_line": tfds.features.Scalar(dtype=np.int64),
      "truncated": tfds.features.Scalar(dtype=np.int32),
    }
  )


def _example_dict(pair: tokenize_lib.TokenizedPair, example_id, group_id, source_file, line):
  return {
    "prompt": np.asarray(pair.prompt, np.int32),
    "chosen": np.asarray(pair.chosen, np.int32),
    "rejected": np.asarray(pair.rejected, np.int32),
    "score_chosen": np.float32(pair.score_chosen),
    "score_rejected": np.float32(pair.score_rejected),
    "example_id": int(example_id),
    "group_id": int(group_id),
    "source_file": source_file,
    "source_line": int(line),
    "truncated": int(pair.truncated),
  }


def _sha_file(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def iter_examples(
  paths: Sequence[str],
  *,
  tokenizer: Optional[tokenize_lib.Tokenizer] = None,
  format: str = "auto",
  ranking: str = "all_pairs",  # pylint: disable=redefined-builtin
  limits: tokenize_lib.Limits = tokenize_lib.Limits(),
  add_eos: bool = True,
  add_special_tokens: bool = True,
  on_bad_record: str = "error",
  stats: Optional[Stats] = None,
):
  """Yields `(example_id, feature dict)` for the records of `paths`, in order: what
  `PreferenceFiles` writes, without writing it. Bad records raise `BadRecord` (file, line,
  reason) or, with `on_bad_record="skip"`, are counted in `stats` (updated in place, with the
  token ids written and how many are the tokenizer's unknown token). A file that yields no pair
  raises `NoUsableRecords` once it has been read."""
  records_lib.check_choice("format", format, records_lib.FORMATS)
  records_lib.check_choice("ranking", ranking, records_lib.RANKING_MODES)
  records_lib.check_choice("on_bad_record", on_bad_record, records_lib.ON_BAD_RECORD)
  stats = Stats() if stats is None else stats
  unk = tokenizer.unk_id if tokenizer is not None else None
  next_id = 0
  for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
    path = os.fspath(path)
    base = os.path.basename(path)
    read0, written0, skipped0 = stats.records_read, stats.examples_written, dict(stats.skipped)
    if format == "unpaired":  # KTO's unpaired feedback: the whole file, then the mismatched partners
      for ex, pair in _unpaired_pairs(path, tokenizer, limits, add_eos, add_special_tokens, on_bad_record, stats):
        yield next_id, _example_dict(pair, next_id, next_id, base, ex.group)
        next_id += 1
        _count(stats, pair, unk)
    for line, rec in [] if format == "unpaired" else records_lib.read_records(path):
      stats.records_read += 1
      try:
        if isinstance(rec, BadRecord):
          raise rec
        examples = records_lib.parse_record(rec, format, ranking=ranking, group=line)
        pairs = [
          tokenize_lib.tokenize_example(
            ex, tokenizer, limits=limits, add_eos=add_eos, add_special_tokens=add_special_tokens
          )
          for ex in examples
        ]
      except BadRecord as err:
        if on_bad_record == "error":
          raise err.at(path, line) from None
        stats.skip(err.reason)
        continue
      group_id = next_id
      for pair in pairs:
        yield next_id, _example_dict(pair, next_id, group_id, base, line)
        next_id += 1
        _count(stats, pair, unk)
    if stats.examples_written == written0:
      skipped = {k: v - skipped0.get(k, 0) for k, v in stats.skipped.items() if v != skipped0.get(k, 0)}
      raise NoUsableRecords(path, Stats(records_read=stats.records_read - read0, skipped=skipped))


def _unpaired_pairs(path, tokenizer, limits, add_eos, add_special_tokens, on_bad_record, stats):
  """The tokenised pairs that carry the unpaired examples of one file (`pofx.data.unpaired`):
  every record validated first (bad ones raise or are skipped), then paired with its mismatched
  completion; a pair that cannot be tokenised is a bad record of its example's line."""
  base = os.path.basename(path)
  good = []
  for line, rec in records_lib.read_records(path):
    stats.records_read += 1
    try:
      if isinstance(rec, BadRecord):
        raise rec
      good.append(unpaired_lib.parse_unpaired(rec, group=line))
    except BadRecord as err:
      if on_bad_record == "error":
        raise err.at(path, line) from None
      stats.skip(err.reason)
  if not good:
    return
  for ex in unpaired_lib.to_examples(good, file=base):
    try:
      pair = tokenize_lib.tokenize_example(
        ex, tokenizer, limits=limits, add_eos=add_eos, add_special_tokens=add_special_tokens
      )
    except BadRecord as err:
      if on_bad_record == "error":
        raise err.at(path, ex.group) from None
      stats.skip(err.reason)
      continue
    yield ex, pair


def _count(stats: Stats, pair: tokenize_lib.TokenizedPair, unk_id: Optional[int]):
  """Counts one written pair: its tokens, and those that are the unknown token."""
  stats.examples_written += 1
  stats.truncated += int(pair.truncated)
  ids = (pair.prompt, pair.chosen, pair.rejected)
  stats.tokens += sum(len(x) for x in ids)
  if unk_id is not None and stats.unknown_tokens is not None:
    stats.unknown_tokens += sum(x.count(unk_id) for x in ids)


class _Base:
  """Shared machinery (mixed into the TFDS builder classes created lazily below)."""

  VERSION_STR = VERSION

  def _init_common(self, on_bad_record):
    records_lib.check_choice("on_bad_record", on_bad_record, records_lib.ON_BAD_RECORD)
    self._on_bad_record = on_bad_record
    self.stats: Dict[str, Stats] = {}

  def _info(self):
    tfds = _tfds()
    return tfds.core.DatasetInfo(
      builder=self, description=self.__doc__.splitlines()[0], features=features(), metadata=tfds.core.MetadataDict()
    )

  def _bad(self, stats: Stats, err: BadRecord):
    if self._on_bad_record == "error":
      raise err
    stats.skip(err.reason)

  def _finish(self, split, stats):
    if stats.examples_written == 0:  # otherwise TFDS fails on the empty split, naming no file
      raise NoUsableRecords(f"<generated> split {split!r}", stats)
    self.stats[split] = stats
    self.info.metadata["stats"] = {k: v.as_dict() for k, v in sorted(self.stats.items())}
    self.info.metadata["fingerprint"] = self.fingerprint


def _builder_classes():
  """Builds the TFDS builder classes on first use (so importing pofx.data does not import TFDS)."""
  global _CLASSES
  if _CLASSES is not None:
    return _CLASSES
  tfds = _tfds()

  class _Builder(_Base, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the pofx builders: no code directory, so no checksums file to look up (TFDS's
    lookup needs the `importlib_resources` backport, which its dependencies do not pull in)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=invalid-overridden-method
      return None

    # Local data: TFDS's "Downloading and preparing dataset ..." / "... downloaded and prepared"
    # lines (stdout) describe downloads there are none of, and its warning "Using custom data
    # configuration" is about registered configs, which these builders have none of by design.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

    def _create_builder_config(self, builder_config, version):
      if isinstance(builder_config, tfds.core.BuilderConfig):
        return builder_config
      return super()._create_builder_config(builder_config, version)

  class PreferenceFiles(_Builder, skip_registration=True):
    """Preference pairs from local JSONL/Parquet files in TRL's formats, tokenised."""

    name = "pofx_preference_files"
    VERSION = tfds.core.Version(VERSION)

    def __init__(
      self,
      *,
      files: Mapping[str, Union[str, Sequence[str]]],
      tokenizer: Optional[tokenize_lib.Tokenizer] = None,
      format: str = "auto",  # pylint: disable=redefined-builtin
      ranking: str = "all_pairs",
      limits: tokenize_lib.Limits = tokenize_lib.Limits(),
      add_eos: bool = True,
      add_special_tokens: bool = True,
      on_bad_record: str = "error",
      name: str = "default",
      **kwargs,
    ):
      records_lib.check_choice("format", format, records_lib.FORMATS)
      records_lib.check_choice("ranking", ranking, records_lib.RANKING_MODES)
      if not files:
        raise ValueError("files: give at least one split, e.g. {'train': ['a.jsonl']}.")
      self._files = {
        s: [os.fspath(f)] if isinstance(f, (str, os.PathLike)) else [os.fspath(x) for x in f] for s, f in files.items()
      }
      for split, paths in self._files.items():
        if not paths:
          raise ValueError(f"files[{split!r}] is empty.")
        for p in paths:
          if not os.path.isfile(p):
            raise ValueError(f"files[{split!r}]: {p} does not exist.")
      self._tokenizer, self._format, self._ranking = tokenizer, format, ranking
      self._limits, self._add_eos, self._add_special = limits, add_eos, add_special_tokens
      self._init_common(on_bad_record)
      self.fingerprint = hashlib.sha256(
        json.dumps(
          {
            "version": VERSION,
            "files": {s: [(os.path.basename(p), _sha_file(p)) for p in ps] for s, ps in sorted(self._files.items())},
            "tokenizer": tokenizer.fingerprint if tokenizer is not None else None,
            "format": format,
            "ranking": ranking,
            "limits": limits.as_dict(),
            "add_eos": add_eos,
            "add_special_tokens": add_special_tokens,
            "on_bad_record": on_bad_record,
          },
          sort_keys=True,
        ).encode()
      ).hexdigest()
      super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, paths) for split, paths in self._files.items()}

    def _generate_examples(self, split, paths):
      stats = Stats()
      yield from iter_examples(
        paths,
        tokenizer=self._tokenizer,
        format=self._format,
        ranking=self._ranking,
        limits=self._limits,
        add_eos=self._add_eos,
        add_special_tokens=self._add_special,
        on_bad_record=self._on_bad_record,
        stats=stats,
      )
      self._finish(split, stats)

  class GeneratedPreferences(_Builder, skip_registration=True):
    """Generated preference pairs that are already token ids (e.g. the controlled world)."""

    name = "pofx_generated_preferences"
    VERSION = tfds.core.Version(VERSION)

    def __init__(
      self,
      *,
      records: Mapping[str, Iterable[Mapping[str, Any]]],
      limits: tokenize_lib.Limits = tokenize_lib.Limits(),
      vocab_size: Optional[int] = None,
      on_bad_record: str = "error",
      name: str = "default",
      fingerprint: Optional[str] = None,
      **kwargs,
    ):
      if not records:
        raise ValueError("records: give at least one split, e.g. {'train': [...]}.")
      self._records, self._limits, self._vocab_size = dict(records), limits, vocab_size
      self._init_common(on_bad_record)
      # Generated records may be a one-shot iterator: the caller may pass its own fingerprint
      # (e.g. the world's seed and config); otherwise one is computed when the records are
      # sequences.
      if fingerprint is None:
        h = hashlib.sha256(
          json.dumps(
            {"version": VERSION, "limits": limits.as_dict(), "vocab_size": vocab_size, "on_bad_record": on_bad_record},
            sort_keys=True,
          ).encode()
        )
        for split, recs in sorted(self._records.items()):
          if not isinstance(recs, Sequence):
            raise ValueError(
              "records given as an iterator: pass fingerprint= (something that "
              "identifies them, e.g. the generator's seed and config)."
            )
          h.update(split.encode())
          for rec in recs:
            for k in ("prompt", "chosen", "rejected"):
              h.update(np.asarray(rec.get(k, []), np.int64).tobytes() + b"|")
            for k in ("score_chosen", "score_rejected", "example_id"):
              h.update(repr(rec.get(k)).encode())
        fingerprint = h.hexdigest()
      self.fingerprint = fingerprint
      super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, recs) for split, recs in self._records.items()}

    def _generate_examples(self, split, recs):
      stats = Stats()
      seen = set()
      tok = _VocabOnly(self._vocab_size) if self._vocab_size else None
      for index, rec in enumerate(recs):
        stats.records_read += 1
        line = index + 1
        try:
          if not isinstance(rec, Mapping):
            raise BadRecord("wrong_type", f"a record must be a mapping, got {type(rec).__name__}")
          rec = dict(rec)
          fields = {
            "prompt_input_ids": rec.get("prompt"),
            "chosen_input_ids": rec.get("chosen"),
            "rejected_input_ids": rec.get("rejected"),
            "score_chosen": _maybe_float(rec.get("score_chosen")),
            "score_rejected": _maybe_float(rec.get("score_rejected")),
          }
          [ex] = records_lib.parse_record(fields, "tokenized", group=line)
          pair = tokenize_lib.tokenize_example(ex, tok, limits=self._limits)
          eid = rec.get("example_id", index)
          if isinstance(eid, (bool, float)) or not isinstance(eid, (int, np.integer)):
            raise BadRecord("wrong_type", f"example_id must be an integer, got {eid!r}")
          eid = int(eid)
        except BadRecord as err:
          self._bad(stats, err.at("<generated>", line))
          continue
        if eid in seen:
          raise ValueError(f"<generated>:{line}: duplicate example_id {eid} in split {split!r}.")
        seen.add(eid)
        yield eid, _example_dict(pair, eid, eid, "<generated>", line)
        _count(stats, pair, None)
      self._finish(split, stats)

  _CLASSES = {"PreferenceFiles": PreferenceFiles, "GeneratedPreferences": GeneratedPreferences}
  return _CLASSES


_CLASSES = None


class _VocabOnly:
  """The part of a Tokenizer that pre-tokenised records use: the id range."""

  def __init__(self, vocab_size):
    self.vocab_size, self.bos_id, self.eos_id = int(vocab_size), None, None


def _maybe_float(v):
  if v is None:
    return None
  if isinstance(v, np.generic):
    v = v.item()
  return v


def __getattr__(name):  # PEP 562: `tfds_builders.PreferenceFiles` builds the class on first use.
  if name in ("PreferenceFiles", "GeneratedPreferences"):
    return _builder_classes()[name]
  raise AttributeError(name)


# ---------------------------------------------------------------------------------------------
# Preparing and reading back.


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared dataset: its directory, per-split ingestion counts and fingerprint."""

  path: str
  stats: Dict[str, Stats]
  fingerprint: str

  def source(self, split: str = "train"):
    return data_source(self.path, split)


def _prepare(builder) -> Prepared:
  tfds = _tfds()
  path = os.fspath(builder.data_path)
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    old = tfds.builder_from_directory(path).info.metadata or {}
    if old.get("fingerprint") != builder.fingerprint:
      raise ValueError(
        f"{path} holds a dataset prepared from different inputs (files, tokenizer "
        f"or options; fingerprint {str(old.get('fingerprint'))[:12]}... vs "
        f"{builder.fingerprint[:12]}...). Use another data_dir or name, or delete "
        f"it."
      )
    return Prepared(path, stats(path), builder.fingerprint)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return Prepared(path, dict(builder.stats), builder.fingerprint)


def prepare_files(
  files: Mapping[str, Union[str, Sequence[str]]],
  *,
  data_dir: str,
  tokenizer: Optional[tokenize_lib.Tokenizer] = None,
  format: str = "auto",  # pylint: disable=redefined-builtin
  ranking: str = "all_pairs",
  limits: tokenize_lib.Limits = tokenize_lib.Limits(),
  add_eos: bool = True,
  add_special_tokens: bool = True,
  on_bad_record: str = "error",
  name: str = "default",
  max_unknown_token_rate: Optional[float] = None,
) -> Prepared:
  """Parses, validates, tokenises and writes `files` ({split: path or paths}) as an array_record
  TFDS dataset under `data_dir/pofx_preference_files/<name>/1.0.0`; reuses it when the same
  inputs were prepared there before. Raises `BadRecord` (ValueError) with file, line and reason
  on the first bad record when `on_bad_record="error"`; with "skip", `Prepared.stats[split]`
  counts the skipped records by reason. A file that yields no pair raises `NoUsableRecords`.
  `max_unknown_token_rate` (None = no limit; else in `pofx.options.UNKNOWN_TOKEN_RATE_RANGE`):
  a split whose `Stats.unknown_token_rate` is above it raises `UnknownTokenRate` (checked on a
  reused dataset too, so the limit is not part of the fingerprint and changing it prepares
  nothing again)."""
  _check_rate_limit(max_unknown_token_rate)
  builder = _builder_classes()["PreferenceFiles"](
    files=files,
    tokenizer=tokenizer,
    format=format,
    ranking=ranking,
    limits=limits,
    add_eos=add_eos,
    add_special_tokens=add_special_tokens,
    on_bad_record=on_bad_record,
    name=name,
    data_dir=os.fspath(data_dir),
    file_format="array_record",
  )
  prepared = _prepare(builder)
  if max_unknown_token_rate is not None:
    unk_token = tokenizer.unk_token if tokenizer is not None else None
    for split, st in sorted(prepared.stats.items()):
      if st.unknown_token_rate is None and st.examples_written:
        raise DataError(
          f"{prepared.path} was prepared before unknown tokens were counted, so "
          f"max_unknown_token_rate={max_unknown_token_rate} cannot be checked: delete it to prepare it again."
        )
      if st.unknown_token_rate is not None and st.unknown_token_rate > max_unknown_token_rate:
        raise UnknownTokenRate(split, st, max_unknown_token_rate, unk_token)
  return prepared


def _check_rate_limit(limit):
  low, high = UNKNOWN_TOKEN_RATE_RANGE
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not low <= limit <= high):
    raise ValueError(f"max_unknown_token_rate={limit!r} is not allowed; allowed: None or a number in [{low}, {high}].")


def prepare_generated(
  records: Mapping[str, Iterable[Mapping[str, Any]]],
  *,
  data_dir: str,
  limits: tokenize_lib.Limits = tokenize_lib.Limits(),
  vocab_size: Optional[int] = None,
  on_bad_record: str = "error",
  name: str = "default",
  fingerprint: Optional[str] = None,
) -> Prepared:
  """Writes generated, already tokenised records ({split: records}) as an array_record TFDS
  dataset under `data_dir/pofx_generated_preferences/<name>/1.0.0` (see `GeneratedPreferences`)."""
  builder = _builder_classes()["GeneratedPreferences"](
    records=records,
    limits=limits,
    vocab_size=vocab_size,
    on_bad_record=on_bad_record,
    name=name,
    fingerprint=fingerprint,
    data_dir=os.fspath(data_dir),
    file_format="array_record",
  )
  return _prepare(builder)


def data_source(path: str, split: str = "train"):
  """Random-access source (`len`, `[i]` -> dict of numpy arrays) of a prepared dataset directory
  (the `.../<name>/1.0.0` folder). No TensorFlow; no builder class needed."""
  return _tfds().builder_from_directory(os.fspath(path)).as_data_source(split=split)


def stats(path: str) -> Dict[str, Stats]:
  """The ingestion counts stored with a prepared dataset, by split."""
  meta = _tfds().builder_from_directory(os.fspath(path)).info.metadata or {}
  return {k: Stats.from_dict(v) for k, v in dict(meta.get("stats", {})).items()}
