r"""pofx.data: preference data from files (TRL formats) or generators to train-step batches.

    tok = pofx.data.Tokenizer.from_dir("examples/data")          # tokenizer.json + chat template
    prepared = pofx.data.prepare_files({"train": "examples/data/standard.jsonl"},
                                       data_dir="/tmp/tfds", tokenizer=tok, on_bad_record="skip")
    prepared.stats["train"]                                       # counts, skipped by reason
    loader = pofx.data.PreferenceLoader(prepared.source("train"), batch_size=8,
                                        layout="prompt_shared", seed=0)
    for batch in loader.iterator():                              # batch["pairs"]: PairBatch
      ...

Modules: `records` (reading JSONL/Parquet, TRL formats, validation, bad-record reasons),
`unpaired` (TRL's unpaired feedback for KTO: each example with a mismatched completion),
`tokenize` (local tokenizer, chat template, BOS/EOS and truncation policies), `tfds_builders`
(array_record TFDS builders, no TensorFlow), `pipeline` (grain: shuffling, per-process
sharding, length grouping, layouts, prefetching, resume). TensorFlow is never imported;
TFDS and grain are imported on first use.
"""

from pofx.data.pipeline import LoaderIterator, PreferenceLoader
from pofx.data.records import (
  FORMATS,
  RANKING_MODES,
  REASONS,
  BadRecord,
  DataError,
  Example,
  NoUsableRecords,
  Stats,
  UnknownTokenRate,
  detect_format,
  parse_record,
  read_records,
  split_implicit_text,
)
from pofx.data.tfds_builders import Prepared, data_source, iter_examples, prepare_files, prepare_generated, stats
from pofx.data.tokenize import (
  TRUNCATION,
  ChatTemplate,
  Limits,
  TokenizedPair,
  Tokenizer,
  render_chat_template,
  tokenize_example,
)

__all__ = [
  "BadRecord",
  "DataError",
  "Example",
  "FORMATS",
  "Limits",
  "LoaderIterator",
  "NoUsableRecords",
  "PreferenceLoader",
  "Prepared",
  "RANKING_MODES",
  "REASONS",
  "Stats",
  "TRUNCATION",
  "UnknownTokenRate",
  "TokenizedPair",
  "Tokenizer",
  "ChatTemplate",
  "data_source",
  "detect_format",
  "iter_examples",
  "parse_record",
  "prepare_files",
  "prepare_generated",
  "read_records",
  "render_chat_template",
  "split_implicit_text",
  "stats",
  "tokenize_example",
]
