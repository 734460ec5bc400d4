"""Tokenisation: chat template rendering, BOS/EOS, implicit prompts, truncation policies.

Expected ids come from `tests.data.ids` (the vocabulary read from tokenizer.json with json and a
regex, no pofx) or are written out by hand; the chat rendering is compared with a hand-written
string and with transformers' `apply_chat_template`.
"""

import math

import jinja2
import pytest

from pofx import data
from pofx.data import BadRecord, Example, Limits
from tests.data import BOS, EOS, example, ids


@pytest.fixture(scope="module")
def tok():
  return data.Tokenizer.from_dir(example(""))


CONV = [
  {"role": "system", "content": "You answer briefly ."},
  {"role": "user", "content": "What colour is the sky ?"},
  {"role": "assistant", "content": "The sky is blue ."},
  {"role": "user", "content": "What size is the sun ?"},
]


def test_special_tokens(tok):
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 0)
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")


def test_chat_template_matches_hand_written_string(tok):
  expected = (
    "<s><|system|>\nYou answer briefly .<|end|>\n"
    "<|user|>\nWhat colour is the sky ?<|end|>\n"
    "<|assistant|>\nThe sky is blue .<|end|>\n"
    "<|user|>\nWhat size is the sun ?<|end|>\n"
  )
  assert tok.apply_chat_template(CONV) == expected
  assert tok.apply_chat_template(CONV, add_generation_prompt=True) == expected + "<|assistant|>\n"


def test_chat_template_raise_exception(tok):
  with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role: tool"):
    tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_render_chat_template_hf_conventions():
  # trim_blocks / lstrip_blocks, loop controls and the non-escaping tojson filter.
  template = (
    "{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
    "{{ m['content'] | tojson }};{% endfor %}{{ bos_token }}"
  )
  msgs = [{"content": "a<b"}, {"content": "é"}, {"content": "z"}]
  assert data.render_chat_template(template, msgs, bos_token="B") == '"a<b";"é";B'


def test_chat_template_and_encoding_match_transformers(tok):
  transformers = pytest.importorskip("transformers")
  import json

  with open(example("tokenizer_config.json")) as f:
    cfg = json.load(f)
  hf = transformers.PreTrainedTokenizerFast(
    tokenizer_file=example("tokenizer.json"),
    bos_token=cfg["bos_token"],
    eos_token=cfg["eos_token"],
    pad_token=cfg["pad_token"],
    unk_token=cfg["unk_token"],
  )
  hf.chat_template = cfg["chat_template"]
  for gen in (False, True):
    assert tok.apply_chat_template(CONV, add_generation_prompt=gen) == hf.apply_chat_template(
      CONV, add_generation_prompt=gen, tokenize=False
    )
    rendered = tok.apply_chat_template(CONV, add_generation_prompt=gen)
    hf_ids = hf.apply_chat_template(CONV, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
    assert tok.encode(rendered, add_special_tokens=False) == list(hf_ids)
  text = "Question : What colour is the sky ? Answer : The sky is blue ."
  assert tok.encode(text) == hf(text)["input_ids"]


def test_standard_pair_bos_eos(tok):
  ex = Example(
    "text", "Question : What colour is the sky ? Answer :", " The sky is blue .", " The sky is red .", 1.0, 0.25
  )
  pair = data.tokenize_example(ex, tok)
  assert pair.prompt == [BOS] + ids("Question : What colour is the sky ? Answer :")
  assert pair.chosen == ids("The sky is blue .") + [EOS]
  assert pair.rejected == ids("The sky is red .") + [EOS]
  assert (pair.score_chosen, pair.score_rejected, pair.truncated) == (1.0, 0.25, False)
  # An EOS already at the end is not doubled; add_eos=False / add_special_tokens=False.
  ex2 = Example("text", "Question :", " blue </s>", " red", math.nan, math.nan)
  pair2 = data.tokenize_example(ex2, tok)
  assert pair2.chosen == ids("blue") + [EOS] and pair2.rejected == ids("red") + [EOS]
  pair3 = data.tokenize_example(ex, tok, add_eos=False, add_special_tokens=False)
  assert pair3.prompt == ids("Question : What colour is the sky ? Answer :")
  assert pair3.chosen == ids("The sky is blue .")


def test_conversational_pair(tok):
  ex = Example(
    "chat",
    CONV,
    [{"role": "assistant", "content": "The sun is huge ."}],
    [{"role": "assistant", "content": "The sun is tiny ."}],
  )
  pair = data.tokenize_example(ex, tok)
  # Prompt = rendering with the generation prompt; completions = the assistant turn + <|end|>.
  assert pair.prompt == ids(
    "<s><|system|>You answer briefly .<|end|><|user|>What colour is the "
    "sky ?<|end|><|assistant|>The sky is blue .<|end|><|user|>What size "
    "is the sun ?<|end|><|assistant|>"
  )
  assert pair.chosen == ids("The sun is huge .<|end|>")
  assert pair.rejected == ids("The sun is tiny .<|end|>")


def test_implicit_text_split_on_tokens(tok):
  ex = Example(
    "text",
    None,
    "Question : What colour is the sky ? Answer : The sky is blue .",
    "Question : What colour is the sky ? Answer : The sky is black .",
  )
  pair = data.tokenize_example(ex, tok)
  assert pair.prompt == [BOS] + ids("Question : What colour is the sky ? Answer : The sky is")
  assert pair.chosen == ids("blue .") + [EOS]
  assert pair.rejected == ids("black .") + [EOS]
  # TRL's character split (reference): "bl" is shared, so TRL's prompt ends inside a word.
  p, c, r = data.split_implicit_text("Answer : The sky is blue .", "Answer : The sky is black .")
  assert (p, c, r) == ("Answer : The sky is bl", "ue .", "ack .")
  assert data.split_implicit_text("say yes", "say no") == ("say", " yes", " no")


def test_pretokenised_ids(tok):
  pair = data.tokenize_example(Example("ids", [2, 5, 6], [7, 3], [8, 3]), tok)
  assert (pair.prompt, pair.chosen, pair.rejected) == ([2, 5, 6], [7, 3], [8, 3])
  with pytest.raises(BadRecord, match=r"bad_token_id"):
    data.tokenize_example(Example("ids", [2, 5], [7, 9999], [8]), tok)
  with pytest.raises(BadRecord, match=r"bad_token_id"):
    data.tokenize_example(Example("ids", [2, -1], [7], [8]), None)


def test_prompt_boundary_is_a_bad_record(tok):
  # "Answer" + ":x" tokenises differently once joined: the prompt is not a prefix.
  ex = Example("text", "Answer :", ": The sky", ": The sea")
  with pytest.raises(BadRecord, match=r"prompt_boundary"):
    data.tokenize_example(ex, tok)


P = [BOS, 10, 11, 12, 13, 14]  # 6 prompt tokens, BOS first
C = [20, 21, 22, 23]  # 4
R = [30, 31]  # 2


def _tok_ids(limits, tokenizer=None):
  if tokenizer is None:
    tokenizer = data.Tokenizer.from_dir(example(""))  # knows BOS = 2
  return data.tokenize_example(Example("ids", P, C, R), tokenizer, limits=limits)


def test_truncation_reject():
  with pytest.raises(BadRecord, match=r"too_long.*prompt 6 > max_prompt_len 5"):
    _tok_ids(Limits(max_prompt_len=5))
  with pytest.raises(BadRecord, match=r"too_long.*prompt \+ completion 10 > max_length 9"):
    _tok_ids(Limits(max_length=9))
  assert not _tok_ids(Limits(max_prompt_len=6, max_completion_len=4, max_length=10)).truncated


def test_truncate_prompt_left_keeps_bos():
  # max_length 8 - longest completion 4 = 4 prompt tokens: BOS + the last three.
  pair = _tok_ids(Limits(max_length=8, truncation="truncate_prompt_left"))
  assert pair.prompt == [BOS, 12, 13, 14] and pair.chosen == C and pair.rejected == R
  assert pair.truncated
  # Without a tokenizer the BOS is unknown: plain left cut.
  pair = data.tokenize_example(
    Example("ids", P, C, R), None, limits=Limits(max_length=8, truncation="truncate_prompt_left")
  )
  assert pair.prompt == [11, 12, 13, 14]
  pair = _tok_ids(Limits(max_prompt_len=3, truncation="truncate_prompt_left"))
  assert pair.prompt == [BOS, 13, 14]
  # Completions over their own limit are not cut by this policy.
  with pytest.raises(BadRecord, match="too_long"):
    _tok_ids(Limits(max_completion_len=3, truncation="truncate_prompt_left"))


def test_truncate_completion_right():
  pair = _tok_ids(Limits(max_length=8, truncation="truncate_completion_right"))
  assert pair.prompt == P and pair.chosen == [20, 21] and pair.rejected == R and pair.truncated
  pair = _tok_ids(Limits(max_completion_len=3, truncation="truncate_completion_right"))
  assert pair.chosen == [20, 21, 22] and pair.rejected == R
  with pytest.raises(BadRecord, match="too_long"):
    _tok_ids(Limits(max_prompt_len=5, truncation="truncate_completion_right"))
  # Cutting may make the completions identical: a bad record, never a silent duplicate.
  with pytest.raises(BadRecord, match="identical"):
    data.tokenize_example(
      Example("ids", P, [1, 2, 3], [1, 2, 4]),
      None,
      limits=Limits(max_completion_len=2, truncation="truncate_completion_right"),
    )


def test_truncate_prompt_then_completion():
  limits = Limits(
    max_prompt_len=4, max_completion_len=3, max_length=6, truncation="truncate_prompt_left_then_completion_right"
  )
  pair = _tok_ids(limits)
  # Completions capped at 3 first, so the prompt may keep 6 - 3 = 3 tokens (BOS + last two).
  assert pair.prompt == [BOS, 13, 14] and pair.chosen == [20, 21, 22] and pair.rejected == R


def test_limits_validation():
  with pytest.raises(ValueError, match="truncation='left'.*allowed"):
    Limits(truncation="left")
  with pytest.raises(ValueError, match="max_length must be None or an integer >= 1"):
    Limits(max_length=0)


def test_text_needs_tokenizer():
  with pytest.raises(ValueError, match="need a tokenizer"):
    data.tokenize_example(Example("text", "a", "b", "c"), None)
