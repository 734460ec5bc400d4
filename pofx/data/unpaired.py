r"""Unpaired binary feedback for KTO (TRL's unpaired format) from files and from the world.

Record formats (JSONL line or Parquet row), as TRL's unpaired preference type:

  unpaired                  {"prompt": str, "completion": str, "label": bool}
                            {"prompt": [msg], "completion": [msg], "label": bool}   (conversational)
                            {"prompt_input_ids": [int], "completion_input_ids": [int], "label": bool}

`label` True marks a desirable completion, False an undesirable one (a JSON boolean; numbers are
refused, so 0.7 is never read as "desirable"). Bad records get the reasons of `pofx.data.records`
(missing_field, wrong_type, empty_prompt, empty_completion, ...), located at file and line.

How an unpaired example travels. The pipeline, the batch layouts and the train step carry pairs;
an unpaired example becomes the pair `(prompt_i, chosen = completion_i, rejected = completion_j)`
whose rejected slot is a **mismatched** completion `y'_i` of another example `j`: the completion
KTO scores against the prompt `x_i` for its reference point z0 (TRL builds the same KL dataset by
shifting the completions by one within a batch). `partners(completions)` picks j: the next
example, cyclically, whose completion differs from i's. The label travels as `score_chosen`
(1.0 desirable, 0.0 undesirable) and the partner's label as `score_rejected`; the loss
`pofx.losses.kto_unpaired` reads them. One forward per example thus gives both log-ratios KTO
needs (no separate KL batch).

From the world (`world_feedback`): every sampled completion of the training prompts is one
example, labelled desirable when its **gold reward is above a threshold** (default: the median
gold reward of those completions, so about half are desirable); the threshold is returned.
Examples are listed prompt by prompt, so a completion's partner is the next prompt's first
differing completion (a mismatched completion from the marginal, as KTO's estimate wants).
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from pofx.data.records import BadRecord, DataError, Example, _ids, _is_messages, _messages, _require, _string


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
  """One unpaired example before tokenisation: kind ("text", "chat" or "ids"), prompt,
  completion, label (True: desirable) and its source record's index within its file."""

  kind: str
  prompt: object
  completion: object
  label: bool
  group: int = 0


def _label(rec: dict) -> bool:
  v = rec["label"]
  if type(v).__name__ not in ("bool", "bool_"):  # Python or numpy booleans (Parquet)
    raise BadRecord("wrong_type", f"label must be a boolean (True: desirable), got {v!r}")
  return bool(v)


def is_unpaired(rec: dict) -> bool:
  """Whether a record has the unpaired format's fields (a completion and a label)."""
  return isinstance(rec, dict) and "label" in rec and ("completion" in rec or "completion_input_ids" in rec)


def parse_unpaired(rec: dict, *, group: int = 0) -> UnpairedExample:
  """A record of the unpaired format -> `UnpairedExample`; `BadRecord` (unlocated) otherwise."""
  if not isinstance(rec, dict):
    raise BadRecord("malformed_json", f"a record must be an object, got {type(rec).__name__}")
  if "completion_input_ids" in rec or "prompt_input_ids" in rec:
    _require(rec, ("prompt_input_ids", "completion_input_ids", "label"))
    p, c = _ids(rec["prompt_input_ids"], "prompt_input_ids"), _ids(rec["completion_input_ids"], "completion_input_ids")
    kind = "ids"
  else:
    _require(rec, ("prompt", "completion", "label"))
    chat = _is_messages(rec["prompt"]) or _is_messages(rec["completion"])
    if chat:
      p, c, kind = _messages(rec["prompt"], "prompt"), _messages(rec["completion"], "completion"), "chat"
    else:
      p, c, kind = _string(rec["prompt"], "prompt"), _string(rec["completion"], "completion"), "text"
  label = _label(rec)
  if len(p) == 0 or (isinstance(p, str) and not p.strip()):
    raise BadRecord("empty_prompt", "the prompt is empty")
  if len(c) == 0 or (isinstance(c, str) and not c.strip()):
    raise BadRecord("empty_completion", "the completion is empty")
  return UnpairedExample(kind, p, c, label, group)


def partners(completions: Sequence) -> np.ndarray:
  """For each example i, the index j of its mismatched completion: the next example (cyclically)
  whose completion differs from i's. ValueError when fewer than two different completions exist."""
  n = len(completions)
  keys = [tuple(np.asarray(c).reshape(-1).tolist()) if not isinstance(c, (str, list)) else repr(c) for c in completions]
  if n < 2 or len(set(keys)) < 2:
    raise ValueError(
      f"unpaired data: KTO's reference point needs at least 2 different completions, found {len(set(keys))} "
      f"among {n} examples."
    )
  out = np.empty((n,), np.int64)
  for i in range(n):
    j = (i + 1) % n
    while keys[j] == keys[i]:
      j = (j + 1) % n
    out[i] = j
  return out


def to_examples(examples: Sequence[UnpairedExample], *, file: str = "<unpaired>") -> List[Example]:
  """The pairs that carry unpaired examples (module docstring): `Example(kind, prompt_i,
  chosen=completion_i, rejected=completion_j, score_chosen=label_i, score_rejected=label_j)`.
  A `DataError` naming `file` when the examples mix kinds or have fewer than 2 different
  completions."""
  kinds = {e.kind for e in examples}
  if len(kinds) > 1:
    raise DataError(f"unpaired data in {file}: records mix kinds {sorted(kinds)} (text, messages, token ids).")
  try:
    j = partners([e.completion for e in examples])
  except ValueError as err:
    raise DataError(f"{file}: {err}") from None
  return [
    Example(e.kind, e.prompt, e.completion, examples[k].completion, float(e.label), float(examples[k].label), e.group)
    for e, k in zip(examples, j)
  ]


def world_feedback(
  prompts: Sequence, completions: Sequence[Sequence], gold: np.ndarray, *, threshold: Optional[float] = None
) -> Tuple[List[np.ndarray], List[np.ndarray], np.ndarray, float]:
  """Unpaired examples from M prompts with K sampled completions each and their gold rewards
  `gold [M, K]`: `(prompts, completions, labels, threshold)` flat, prompt by prompt, with
  `labels[i] = gold_i > threshold` (default threshold: the median of `gold`)."""
  g = np.asarray(gold, np.float64)
  if g.ndim != 2 or g.shape[0] != len(prompts) or len(completions) != len(prompts):
    raise ValueError(f"world_feedback: gold {g.shape} does not match {len(prompts)} prompts x their completions.")
  t = float(np.median(g)) if threshold is None else float(threshold)
  if not math.isfinite(t):
    raise ValueError(f"world_feedback: threshold must be finite, got {threshold!r}.")
  ps, cs, ls = [], [], []
  for i, p in enumerate(prompts):
    if len(completions[i]) != g.shape[1]:
      raise ValueError(f"world_feedback: prompt {i} has {len(completions[i])} completions, gold has {g.shape[1]}.")
    for k, c in enumerate(completions[i]):
      ps.append(np.asarray(p, np.int32))
      cs.append(np.asarray(c, np.int32))
      ls.append(g[i, k] > t)
  return ps, cs, np.asarray(ls, bool), t


def pair_records(prompts, completions, labels, *, offset: int = 0) -> List[dict]:
  """The generated-data records (`pofx.data.prepare_generated`) of unpaired token-id examples:
  `{"prompt", "chosen": completion_i, "rejected": completion_j, "score_chosen": label_i,
  "score_rejected": label_j, "example_id"}`, j = `partners(completions)[i]`."""
  j = partners(completions)
  return [
    {
      "prompt": np.asarray(prompts[i], np.int32),
      "chosen": np.asarray(completions[i], np.int32),
      "rejected": np.asarray(completions[k], np.int32),
      "score_chosen": float(labels[i]),
      "score_rejected": float(labels[k]),
      "example_id": offset + i,
    }
    for i, k in enumerate(j)
  ]


__all__ = [
  "UnpairedExample",
  "is_unpaired",
  "pair_records",
  "parse_unpaired",
  "partners",
  "to_examples",
  "world_feedback",
]
