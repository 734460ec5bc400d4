"""DPO on your own preference files (TRL formats: standard, implicit prompt, conversational,
pre-tokenised; JSONL or Parquet) with a local tokenizer.

    python -m experiments.main --config=configs/dpo_files.py --workdir=/tmp/pofx_files \\
        --config.data.files=my_train.jsonl --config.data.eval_files=my_eval.jsonl \\
        --config.data.tokenizer_dir=path/to/tokenizer --config.model.preset=tiny \\
        [--config.model.init_checkpoint=path/to/orbax_params]

Defaults point at the small generated examples in examples/data (a word-level tokenizer with a
chat template), so the command runs as is. Bad records fail with file, line and reason
(`--config.data.on_bad_record=skip` skips and counts them instead). `:tiny` is a few steps.
"""

import os

from configs import common

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data")


def get_config(arg=None):
  c = common.base_config()
  c.data.source = "files"
  c.data.files = os.path.join(EXAMPLES, "standard.jsonl")
  c.data.eval_files = os.path.join(EXAMPLES, "implicit.jsonl")
  c.data.tokenizer_dir = EXAMPLES
  c.data.layout = "prompt_shared"
  c.data.seq_bucket, c.data.completion_bucket = 32, 16
  c.model.preset = "tiny"
  c.train.loss = "dpo"
  c.train.reference.kind = "cached"
  c.train.steps, c.train.batch_size = 100, 16
  if arg == "tiny":
    c.train.steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 4, 8, 2, 2
  elif arg not in (None, ""):
    raise ValueError(f"unknown config arg {arg!r}; allowed: ['', 'tiny'].")
  c.lock()
  return c
