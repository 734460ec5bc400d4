"""The SmolLM2 example study (`experiments/smollm2_study.py`).

Its gold reward on hand-written answers, its bad flags, and the whole program at a tiny size: a
tiny Llama GGUF file with a byte-level BPE tokenizer and a chat template written here (the
`gguf` package's writer, as in test_gguf.py), four train and four held-out prompts, two steps.
The summary's figures are recomputed from what it records: the gold reward of every held-out
answer by an independent re-implementation (a regular expression for the words, `str.find` on
the lower-cased text for the key), the base fail rate from those, and the win rate and its
Wilson interval from the recomputed per-prompt rewards.
"""

import json
import math
import os
import re

import jax
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from experiments import smollm2_study as study
from pofx.models import llama
from tests import forked
from tests.models.test_gguf import _write_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _gold(text, key, finished, n_max, lam):
  """The gold reward written again: 1[key named] + 1[ended and <= n_max words] - lam * words."""
  n = len(re.findall(r"\S+", text))
  named = text.lower().find(key.lower()) >= 0
  return (1.0 if named else 0.0) + (
    1.0 if finished and n <= n_max else 0.0
  ) - lam * n, named and finished and n <= n_max


@pytest.mark.parametrize(
  "text, key, finished, expected",
  [
    ("Photosynthesis turns light into sugar.", "photosynthesis", True, 2 - 0.05),  # 5 words, named, ended
    ("Plants turn light into sugar.", "photosynthesis", True, 1 - 0.05),  # not named
    ("Photosynthesis turns light into sugar.", "photosynthesis", False, 1 - 0.05),  # cut by the budget
    ("DNA is " + "very " * 10 + "long.", "dna", True, 1 - 0.13),  # 13 words > 12
    ("A black hole: nothing escapes.", "black hole", True, 2 - 0.05),  # two-word key
    ("Black holes\n\tswallow  light", "black hole", True, 2 - 0.04),  # plural; words split on any whitespace
    ("Black  holes swallow light", "black hole", True, 1 - 0.04),  # the key as written: one space
    ("", "gravity", True, 1.0),  # empty answer: ended, 0 words, not named
  ],
)
def test_gold_reward_on_hand_written_answers(text, key, finished, expected):
  got = study.gold_reward(text, key, finished, max_words=12, length_penalty=0.01)
  assert got == pytest.approx(expected, abs=1e-12)
  assert study.passes(text, key, finished, max_words=12) == (expected > 1.5)


def _tiny_gguf(path):
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens = alphabet + ["Ġt"] + SPECIAL
  types = [1] * (len(alphabet) + 1) + [3] * len(SPECIAL)
  cfg = llama.tiny().replace(vocab_size=len(tokens))
  params = llama.init_params(cfg, jax.random.key(0))

  def metadata(w):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ t"])
    w.add_token_types(types)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template(TEMPLATE)

  return _write_tiny(path, params, cfg, metadata=metadata)


def _study(args):
  return forked.run_module("experiments.smollm2_study", args)


def test_bad_flags_stop_with_one_line_before_loading(tmp_path):
  for flag, needle in (
    ("--samples_per_prompt=1", "--samples_per_prompt=1; allowed: an integer >= 2"),
    ("--lora_targets=q_proj,embed", "--lora_targets='q_proj,embed'; allowed: distinct names"),
    ("--gguf=/nonexistent.gguf", "--gguf=/nonexistent.gguf: no such file"),
  ):
    r = _study([f"--workdir={tmp_path}", flag])
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
  assert not os.listdir(tmp_path)


def test_tiny_study_records_figures_that_recompute(tmp_path):
  gguf_path = _tiny_gguf(tmp_path / "tiny.gguf")
  prompts = tmp_path / "prompts.jsonl"
  terms = ["t", "e", "sun", "a", "to", "i", "o", "n"]
  with open(prompts, "w", encoding="utf-8") as f:
    for i, t in enumerate(terms):
      f.write(json.dumps({"id": i, "key": t, "prompt": f"Explain {t}.", "split": "train" if i < 4 else "heldout"}))
      f.write("\n")
  work = tmp_path / "work"
  n_max, lam = 3, 0.05
  r = _study(
    [
      f"--workdir={work}",
      f"--gguf={gguf_path}",
      f"--prompts={prompts}",
      "--samples_per_prompt=3",
      "--max_new_tokens=6",
      f"--max_words={n_max}",
      f"--length_penalty={lam}",
      "--steps=2",
      "--batch_size=2",
      "--sample_batch=12",
      "--learning_rate=0.05",
      "--lora_rank=2",
      "--eval_temperature=1.0",
    ]
  )
  assert r.returncode == 0, r.stderr[-3000:]
  s = json.loads((work / "summary.json").read_text())
  assert (work / "report.md").read_text().startswith("# SmolLM2")
  assert list(s["stages"]) == list(study.STAGES)
  for t in [*s["stages"].values(), s["total"]]:
    assert t["wall_s"] >= 0 and t["cpu_s"] >= 0 and t["load_avg_1m"] >= 0
  assert len(s["sampling_calls"]["wall_cpu_s"]) == 1 and s["sampling_calls"]["rows"] == 12  # 4 x 3 rows, one call
  assert len(s["train_steps_wall_cpu_s"]) == 2
  e = s["evaluation"]
  per = s["per_prompt"]
  assert [p["key"] for p in per] == terms[4:] and e["heldout_prompts"] == 4
  base, pol = [], []
  for p in per:
    for who, out in (("base", base), ("policy", pol)):
      g, ok = _gold(p[who]["text"], p["key"], p[who]["finished"], n_max, lam)
      assert p[who]["gold"] == pytest.approx(g, abs=1e-12) and p[who]["pass"] == ok
      assert p[who]["finished"] or p[who]["tokens"] == 6  # an answer that did not end used the whole budget
      out.append((g, ok))
  assert e["base_fail_rate"] == pytest.approx(np.mean([not ok for _, ok in base]))
  assert e["policy_fail_rate"] == pytest.approx(np.mean([not ok for _, ok in pol]))
  bg, pg = np.array([g for g, _ in base]), np.array([g for g, _ in pol])
  wins, ties = int(np.sum(pg > bg)), int(np.sum(pg == bg))
  w = e["win_rate"]
  assert (w["wins"], w["ties"], w["losses"], w["n"]) == (wins, ties, 4 - wins - ties, 4)
  p_hat, z = (wins + ties / 2) / 4, 1.959963984540054
  centre = (p_hat + z * z / 8) / (1 + z * z / 4)
  half = z * math.sqrt(p_hat * (1 - p_hat) / 4 + z * z / 64) / (1 + z * z / 4)
  assert w["rate"] == pytest.approx(p_hat) and w["low"] == pytest.approx(max(0.0, centre - half))
  assert w["high"] == pytest.approx(min(1.0, centre + half))
  assert e["base_gold"][0] == pytest.approx(bg.mean()) and e["policy_gold"][0] == pytest.approx(pg.mean())
  assert e["kl"]["samples"] == 4 and math.isfinite(e["kl"]["mean"])
  # Two steps at a large learning rate move the adapters: the policy's answers are not the base's.
  assert e["changed_outputs"] >= 1
  assert s["labelling"]["samples"] == 12 and 1 <= s["labelling"]["pairs"] <= 4
