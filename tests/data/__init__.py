"""Shared helpers of the pofx.data tests: the shipped example files and an independent reading
of the example tokenizer's vocabulary (plain json + regex, not pofx)."""

import functools
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples", "data")


def example(name):
  return os.path.join(EXAMPLES, name)


@functools.cache
def vocab():
  """token -> id, read straight from tokenizer.json."""
  with open(example("tokenizer.json"), encoding="utf-8") as f:
    return dict(json.load(f)["model"]["vocab"])


SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_SPECIAL_RE = "|".join(re.escape(s) for s in SPECIAL)


def ids(text):
  """Independent word-level tokenisation: special tokens, then `\\w+|[^\\w\\s]+` pieces (the
  `Whitespace` pre-tokenizer's pattern) looked up in the vocabulary. No BOS added."""
  v = vocab()
  out = []
  for part in re.split(f"({_SPECIAL_RE})", text):
    if part in SPECIAL:
      out.append(v[part])
      continue
    for piece in re.findall(r"\w+|[^\w\s]+", part):
      out.append(v.get(piece, v["<unk>"]))
  return out


BOS, EOS = 2, 3
