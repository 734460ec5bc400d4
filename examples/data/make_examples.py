r"""Generates the small example files of `examples/data/` (deterministic; run from anywhere).

    python examples/data/make_examples.py            # rewrites the files next to this script

Files (a few hundred records each, < 1 MB in total):
  tokenizer.json, tokenizer_config.json   a word-level tokenizer of this toy world (BOS added by
                                          its post-processor) and a chat template;
  standard.jsonl          {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
  standard.parquet        the first 50 standard records, as Parquet;
  implicit.jsonl          {"chosen", "rejected"} (the prompt is the shared beginning);
  conversational.jsonl    {"prompt": [msg], "chosen": [msg], "rejected": [msg]} (some with a
                          system message or an earlier exchange);
  conversational_implicit.jsonl   {"chosen": [msg], "rejected": [msg]};
  tokenized.parquet       {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                           "score_chosen", "score_rejected"} (ids of this tokenizer);
  ranking.jsonl           {"prompt", "completions": [4 answers], "scores" or "ranks"}.

The world: questions about the colour, size or sound of things; the right answer is preferred
to a wrong one (scores: 1 for right, lower for wrong).
"""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
from tokenizers import models, pre_tokenizers, processors

HERE = os.path.dirname(os.path.abspath(__file__))
N = 200

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
  "{{ bos_token }}"
  "{% for message in messages %}"
  "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
  "{{ raise_exception('unknown role: ' + message['role']) }}"
  "{% endif %}"
  "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

THINGS = {
  "sky": ("blue", "big", "silent"),
  "grass": ("green", "small", "quiet"),
  "snow": ("white", "small", "soft"),
  "coal": ("black", "small", "silent"),
  "sun": ("yellow", "huge", "silent"),
  "cherry": ("red", "tiny", "quiet"),
  "sea": ("blue", "huge", "loud"),
  "lemon": ("yellow", "small", "quiet"),
  "crow": ("black", "small", "loud"),
  "cloud": ("white", "big", "silent"),
  "frog": ("green", "tiny", "loud"),
  "tomato": ("red", "small", "quiet"),
}
PROPS = (
  ("colour", ["blue", "green", "white", "black", "yellow", "red", "purple", "orange"]),
  ("size", ["tiny", "small", "big", "huge", "enormous"]),
  ("sound", ["silent", "quiet", "soft", "loud", "deafening"]),
)
SYSTEMS = ["You answer briefly .", "You are a careful assistant ."]


def _qa(rng):
  thing = rng.choice(sorted(THINGS))
  k = rng.randrange(3)
  prop, values = PROPS[k]
  right = THINGS[thing][k]
  wrongs = [v for v in values if v != right]
  rng.shuffle(wrongs)
  question = f"What {prop} is the {thing} ?"
  answer = lambda v: f"The {thing} is {v} ."  # noqa: E731
  return question, answer(right), [answer(w) for w in wrongs]


def _standard(rng):
  out = []
  for _ in range(N):
    q, good, bad = _qa(rng)
    out.append(
      {
        "prompt": f"Question : {q} Answer :",
        "chosen": f" {good}",
        "rejected": f" {bad[0]}",
        "score_chosen": 1.0,
        "score_rejected": round(rng.uniform(0.0, 0.5), 3),
      }
    )
  return out


def _implicit(rng):
  out = []
  for _ in range(N):
    q, good, bad = _qa(rng)
    out.append({"chosen": f"Question : {q} Answer : {good}", "rejected": f"Question : {q} Answer : {bad[0]}"})
  return out


def _conversation_prefix(rng):
  msgs = []
  if rng.random() < 0.3:
    msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
  if rng.random() < 0.3:
    q, good, _ = _qa(rng)
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": good}]
  return msgs


def _conversational(rng):
  out = []
  for _ in range(N):
    prefix = _conversation_prefix(rng)
    q, good, bad = _qa(rng)
    out.append(
      {
        "prompt": prefix + [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad[0]}],
      }
    )
  return out


def _conversational_implicit(rng):
  out = []
  for _ in range(N):
    prefix = _conversation_prefix(rng)
    q, good, bad = _qa(rng)
    turn = prefix + [{"role": "user", "content": q}]
    out.append(
      {
        "chosen": turn + [{"role": "assistant", "content": good}],
        "rejected": turn + [{"role": "assistant", "content": bad[0]}],
      }
    )
  return out


def _ranking(rng):
  out = []
  for i in range(N):
    q, good, bad = _qa(rng)
    comps = [good] + bad[:3]
    scores = [1.0] + sorted((round(rng.uniform(0.0, 0.9), 3) for _ in range(3)), reverse=True)
    perm = list(range(4))
    rng.shuffle(perm)
    rec = {"prompt": f"Question : {q} Answer :", "completions": [f" {comps[j]}" for j in perm]}
    if i % 2:
      rec["scores"] = [scores[j] for j in perm]
    else:
      rec["ranks"] = [j + 1 for j in perm]  # rank 1 = best
    out.append(rec)
  return out


def _texts(recs):
  for r in recs:
    for v in r.values():
      if isinstance(v, str):
        yield v
      elif isinstance(v, list):
        for m in v:
          if isinstance(m, str):
            yield m
          elif isinstance(m, dict):
            yield m["content"]


def _tokenizer(texts):
  pre = pre_tokenizers.Whitespace()
  words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
  vocab = {t: i for i, t in enumerate(SPECIAL)}
  for w in words:
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre
  tok.add_special_tokens(SPECIAL)
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
  )
  return tok


def main(out_dir: str = HERE):
  rng = random.Random(0)
  sets = {
    "standard": _standard(rng),
    "implicit": _implicit(rng),
    "conversational": _conversational(rng),
    "conversational_implicit": _conversational_implicit(rng),
    "ranking": _ranking(rng),
  }
  texts = [t for recs in sets.values() for t in _texts(recs)] + SYSTEMS
  tok = _tokenizer(texts)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(
      {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
      },
      f,
      indent=2,
    )
    f.write("\n")
  for name, recs in sets.items():
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
      for r in recs:
        f.write(json.dumps(r) + "\n")
  pq.write_table(pa.Table.from_pylist(sets["standard"][:50]), os.path.join(out_dir, "standard.parquet"))
  # Pre-tokenised: the standard records' ids, as TRL's tokenisation would give them.
  rows = []
  for r in _standard(random.Random(1)):
    p = tok.encode(r["prompt"]).ids
    c = tok.encode(r["prompt"] + r["chosen"]).ids[len(p) :] + [SPECIAL.index("</s>")]
    j = tok.encode(r["prompt"] + r["rejected"]).ids[len(p) :] + [SPECIAL.index("</s>")]
    rows.append(
      {
        "prompt_input_ids": p,
        "chosen_input_ids": c,
        "rejected_input_ids": j,
        "score_chosen": r["score_chosen"],
        "score_rejected": r["score_rejected"],
      }
    )
  pq.write_table(pa.Table.from_pylist(rows), os.path.join(out_dir, "tokenized.parquet"))


if __name__ == "__main__":
  main()
