r"""Tokenisation of preference pairs with a local `tokenizer.json` and chat template.

`Tokenizer.from_files(tokenizer_json, tokenizer_config_json)` (or `Tokenizer.from_dir(path)`)
wraps the `tokenizers` library; the chat template comes from `tokenizer_config.json`
(`chat_template`, a string or a list of named templates, "default" used) or a `chat_template.jinja`
beside it, rendered with jinja2 the way Hugging Face does (sandboxed environment, `trim_blocks`,
`lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a non-escaping `tojson`; the
special tokens `bos_token`, `eos_token`, `pad_token`, `unk_token` as variables, and `tools` and
`documents`, None unless given, as transformers defines them). `ChatTemplate.from_file(path)` reads
a model family's template and special tokens from a `tokenizer_config.json` alone (docs/models.md
lists the families the tests render: Llama 3, Qwen2.5, Qwen3, Mistral, Gemma 2, Gemma 3).

How a pair becomes token ids (TRL 1.16 `DPOTrainer` semantics):

* text (standard and ranking): `P = encode(prompt)`, `C = encode(prompt + chosen)`,
  `R = encode(prompt + rejected)` with the tokenizer's special tokens (its post-processor adds
  BOS, if it has one; set `add_special_tokens=False` to not). The completions are the tails of C
  and R after P; then `eos_id` is appended to each completion that does not already end with it
  (`add_eos=True`, TRL appends the EOS string). Texts are concatenated as they are (no space is
  inserted).
* implicit text: `C = encode(chosen)`, `R = encode(rejected)` (whole texts); the prompt is their
  longest common prefix of token ids, the completions the rest (+ EOS as above). Token ids are
  never cut inside a token, and `prompt + completion` is exactly the tokenised text.
* chat: `P = encode(render(prompt, add_generation_prompt=True))`,
  `C = encode(render(prompt + chosen))`, `R = encode(render(prompt + rejected))`, without special
  tokens (the template writes BOS and end-of-turn markers itself); no EOS is appended.
* ids (pre-tokenised): used as given (no BOS/EOS added); with a tokenizer, ids outside
  `[0, vocab_size)` are bad records.

If P is not a prefix of C (or R) -- the template renders the prompt differently, or a token
merges across the boundary -- the record is bad ("prompt_boundary"); TRL instead drops the end of
the prompt with a warning. pofx never changes a record silently.

Length limits and truncation (`Limits`): `max_prompt_len`, `max_completion_len` (each
completion) and `max_length` (prompt + the longer completion), each optional. `truncation`:

* "reject" (default): a record over a limit is bad ("too_long").
* "truncate_prompt_left": drop the oldest prompt tokens (after a leading BOS, which is kept)
  until the prompt limits hold; completions over `max_completion_len` are still "too_long".
* "truncate_completion_right": cut both completions at the end (their EOS goes with it) until
  the limits hold; a prompt over its limit is still "too_long".
* "truncate_prompt_left_then_completion_right": the prompt first, then the completions.

A truncated pair is flagged (`TokenizedPair.truncated`, counted in `Stats.truncated`); a pair
whose completions become identical or empty, or whose prompt becomes empty, is a bad record.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
from typing import List, Optional, Sequence, Tuple

from pofx.data import records as records_lib
from pofx.data.records import BadRecord, Example
from pofx.options import TRUNCATION  # noqa: F401  (allowed values, defined once)


def _token_str(v) -> Optional[str]:
  if isinstance(v, dict):  # serialised AddedToken
    return v.get("content")
  return v


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext as jinja_ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja_ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)


def render_chat_template(
  template: str, messages, *, add_generation_prompt: bool = False, tools=None, documents=None, **variables
) -> str:
  """Renders a Hugging Face chat template (jinja2, as `transformers` does: `tools` and
  `documents` are always defined, None when not given, so that a template's `tools is not none`
  means what it means there)."""
  return _compile_template(template).render(
    messages=list(messages),
    add_generation_prompt=add_generation_prompt,
    tools=tools,
    documents=documents,
    **variables,
  )


def _template_of(value, source: str) -> Optional[str]:
  """The template of a `chat_template` entry: a string, or a list of `{"name", "template"}` of
  which "default" is used."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if "default" not in named:
      raise ValueError(f"{source}: chat_template lists {sorted(map(str, named))} but no 'default' template.")
    return named["default"]
  raise ValueError(
    f"{source}: chat_template must be a string or a list of named templates, got {type(value).__name__}."
  )


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A model family's chat template with the special tokens it writes (from the user's
  `tokenizer_config.json`): `render(messages, add_generation_prompt=False, **variables)`.

  Attributes:
    template: the jinja2 source.
    bos_token, eos_token, pad_token, unk_token: the strings of `tokenizer_config.json` (None when
      not set), passed to the template as variables.
  """

  template: str
  bos_token: Optional[str] = None
  eos_token: Optional[str] = None
  pad_token: Optional[str] = None
  unk_token: Optional[str] = None

  @classmethod
  def from_config(cls, config: dict, *, source: str = "tokenizer_config.json", template: Optional[str] = None):
    """From a parsed `tokenizer_config.json` (`template`, e.g. a `chat_template.jinja`'s text,
    replaces its `chat_template`). ValueError when there is no template."""
    text = template if template is not None else _template_of(config.get("chat_template"), source)
    if not text:
      raise ValueError(f"{source}: no chat_template (nor a chat_template.jinja); conversational records need one.")
    return cls(
      text,
      *(_token_str(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")),
    )

  @classmethod
  def from_file(cls, tokenizer_config_json: str, chat_template_file: Optional[str] = None) -> ChatTemplate:
    """Reads a `tokenizer_config.json` (and optionally a `chat_template.jinja` whose template
    takes precedence, as in transformers)."""
    with open(tokenizer_config_json, encoding="utf-8") as f:
      config = json.load(f)
    template = None
    if chat_template_file:
      with open(chat_template_file, encoding="utf-8") as f:
        template = f.read()
    return cls.from_config(config, source=os.fspath(tokenizer_config_json), template=template)

  def render(self, messages, *, add_generation_prompt: bool = False, **variables) -> str:
    """The conversation `messages` (`[{"role", "content"}]`) as text; `variables` (e.g. Qwen3's
    `enable_thinking=False`) are passed to the template."""
    specials = dict(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token)
    specials["unk_token"] = self.unk_token
    return render_chat_template(
      self.template, messages, add_generation_prompt=add_generation_prompt, **{**specials, **variables}
    )


class Tokenizer:
  """A local tokenizer: `tokenizers.Tokenizer` + the special tokens and chat template of
  `tokenizer_config.json`.

  Attributes:
    bos_token, eos_token, pad_token, unk_token: strings (None when not set).
    bos_id, eos_id, pad_id: their ids (pad_id falls back to eos_id, then 0).
    unk_id: the id text outside the vocabulary maps to (`unk_token`, else the tokenizer model's
      own unknown token), or None: a byte-level tokenizer has none, every text maps to tokens.
    chat_template: the template string, or None.
    vocab_size: size of the vocabulary, added tokens included.
    fingerprint: SHA-256 of the tokenizer files (for `pofx.references.fingerprint` and for
      detecting a stale prepared dataset).
  """

  def __init__(
    self, tokenizer, config: Optional[dict] = None, *, chat_template: Optional[str] = None, fingerprint: str = ""
  ):
    self._tok = tokenizer
    config = dict(config or {})
    self.bos_token = _token_str(config.get("bos_token"))
    self.eos_token = _token_str(config.get("eos_token"))
    self.pad_token = _token_str(config.get("pad_token"))
    self.unk_token = _token_str(config.get("unk_token"))
    self.chat_template = (
      chat_template if chat_template is not None else _template_of(config.get("chat_template"), "tokenizer_config.json")
    )
    self.bos_id = self._id(self.bos_token)
    self.eos_id = self._id(self.eos_token)
    pad = self._id(self.pad_token)
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
    model_unk = getattr(getattr(tokenizer, "model", None), "unk_token", None)
    self.unk_id = self._id(self.unk_token) if self.unk_token is not None else None
    if self.unk_id is None and isinstance(model_unk, str):
      self.unk_id = tokenizer.token_to_id(model_unk)
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    self.fingerprint = fingerprint

  def _id(self, token):
    if token is None:
      return None
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"special token {token!r} of tokenizer_config.json is not in the vocabulary.")
    return int(i)

  @classmethod
  def from_files(
    cls, tokenizer_json: str, tokenizer_config_json: Optional[str] = None, chat_template_file: Optional[str] = None
  ) -> Tokenizer:
    import tokenizers  # pylint: disable=g-import-not-at-top

    h = hashlib.sha256()
    paths = [p for p in (tokenizer_json, tokenizer_config_json, chat_template_file) if p]
    for p in paths:
      with open(p, "rb") as f:
        h.update(f.read())
    config = {}
    if tokenizer_config_json:
      with open(tokenizer_config_json, encoding="utf-8") as f:
        config = json.load(f)
    template = None
    if chat_template_file:
      with open(chat_template_file, encoding="utf-8") as f:
        template = f.read()
    return cls(
      tokenizers.Tokenizer.from_file(os.fspath(tokenizer_json)),
      config,
      chat_template=template,
      fingerprint=h.hexdigest(),
    )

  @classmethod
  def from_dir(cls, path: str) -> Tokenizer:
    """`tokenizer.json` (required), `tokenizer_config.json` and `chat_template.jinja` (optional)
    in a directory."""
    files = [os.path.join(path, n) for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")]
    if not os.path.exists(files[0]):
      raise ValueError(f"{path}: no tokenizer.json.")
    return cls.from_files(*[f if os.path.exists(f) else None for f in files])

  def encode(self, text: str, *, add_special_tokens: bool = True) -> List[int]:
    return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, **variables) -> str:
    """`messages` rendered with this tokenizer's chat template (`ChatTemplate.render`)."""
    if self.chat_template is None:
      raise ValueError(
        "this tokenizer has no chat template (tokenizer_config.json 'chat_template' "
        "or chat_template.jinja); conversational records need one."
      )
    template = ChatTemplate(self.chat_template, self.bos_token, self.eos_token, self.pad_token, self.unk_token)
    return template.render(messages, add_generation_prompt=add_generation_prompt, **variables)


@dataclasses.dataclass(frozen=True)
class Limits:
  """Length limits (None = no limit) and the truncation policy (see the module docstring)."""

  max_prompt_len: Optional[int] = None
  max_completion_len: Optional[int] = None
  max_length: Optional[int] = None
  truncation: str = "reject"

  def __post_init__(self):
    records_lib.check_choice("truncation", self.truncation, TRUNCATION)
    for name in ("max_prompt_len", "max_completion_len", "max_length"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}.")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
  prompt: List[int]
  chosen: List[int]
  rejected: List[int]
  score_chosen: float
  score_rejected: float
  group: int
  truncated: bool = False


def _tails(tok: Tokenizer, p, c, r):
  for name, full in (("chosen", c), ("rejected", r)):
    if full[: len(p)] != p:
      n = records_lib.common_prefix_length(p, full)
      raise BadRecord(
        "prompt_boundary",
        f"the tokenised prompt is not a prefix of the tokenised "
        f"prompt + {name}: they differ from prompt token {n} "
        f"({tok.decode(p[n : n + 5])!r} vs {tok.decode(full[n : n + 5])!r})",
      )
  return c[len(p) :], r[len(p) :]


def _add_eos(tok: Tokenizer, ids: List[int]) -> List[int]:
  if tok.eos_id is None:
    raise ValueError("add_eos=True needs an eos_token in tokenizer_config.json (or add_eos=False).")
  return ids if ids and ids[-1] == tok.eos_id else ids + [tok.eos_id]


def _truncate(p, c, r, limits: Limits, bos_id) -> Tuple[List[int], List[int], List[int], bool]:
  mp, mc, ml = limits.max_prompt_len, limits.max_completion_len, limits.max_length
  pol = limits.truncation
  cut_prompt = pol in ("truncate_prompt_left", "truncate_prompt_left_then_completion_right")
  cut_comp = pol in ("truncate_completion_right", "truncate_prompt_left_then_completion_right")
  p0, c0, r0 = p, c, r
  if cut_prompt:
    target = len(p)
    if mp is not None:
      target = min(target, mp)
    if ml is not None:
      longest = max(len(c), len(r))
      if cut_comp and mc is not None:
        longest = min(longest, mc)
      target = min(target, ml - longest)
    if target < len(p):
      keep = 1 if (p and bos_id is not None and p[0] == bos_id) else 0
      if target > keep:
        p = p[:keep] + p[len(p) - (target - keep) :]
      else:
        p = p[: max(target, 0)]
  if cut_comp:
    t = len(c) if mc is None else mc
    if ml is not None:
      t = min(t, ml - len(p))
    t = max(t, 0)
    c, r = c[:t], r[:t]
  truncated = (p, c, r) != (p0, c0, r0)
  if truncated:
    if not p:
      raise BadRecord("too_long", f"the prompt ({len(p0)} tokens) would be truncated to nothing")
    if not c or not r:
      raise BadRecord(
        "too_long", f"a completion would be truncated to nothing (prompt {len(p)} tokens, max_length {ml})"
      )
    if c == r:
      raise BadRecord("identical", "chosen and rejected become identical after truncation")
  over = []
  if mp is not None and len(p) > mp:
    over.append(f"prompt {len(p)} > max_prompt_len {mp}")
  if mc is not None and max(len(c), len(r)) > mc:
    over.append(f"completion {max(len(c), len(r))} > max_completion_len {mc}")
  if ml is not None and len(p) + max(len(c), len(r)) > ml:
    over.append(f"prompt + completion {len(p) + max(len(c), len(r))} > max_length {ml}")
  if over:
    raise BadRecord("too_long", "; ".join(over) + f" (truncation={pol!r})")
  return p, c, r, truncated


def tokenize_example(
  ex: Example,
  tokenizer: Optional[Tokenizer],
  *,
  limits: Limits = Limits(),
  add_eos: bool = True,
  add_special_tokens: bool = True,
) -> TokenizedPair:
  """An `Example` -> `TokenizedPair` (see the module docstring). Raises `BadRecord`."""
  tok = tokenizer
  if ex.kind != "ids" and tok is None:
    raise ValueError(f"{ex.kind} records need a tokenizer (Tokenizer.from_dir(...)).")
  if ex.kind == "ids":
    p, c, r = list(ex.prompt), list(ex.chosen), list(ex.rejected)
    if tok is not None:
      for name, ids in (("prompt", p), ("chosen", c), ("rejected", r)):
        bad = [t for t in ids if not 0 <= t < tok.vocab_size]
        if bad:
          raise BadRecord("bad_token_id", f"{name} has ids {bad[:5]} outside [0, {tok.vocab_size})")
    else:
      for name, ids in (("prompt", p), ("chosen", c), ("rejected", r)):
        if min(ids) < 0:
          raise BadRecord("bad_token_id", f"{name} has negative ids")
  elif ex.kind == "chat":
    p = tok.encode(tok.apply_chat_template(ex.prompt, add_generation_prompt=True), add_special_tokens=False)
    full_c = tok.encode(tok.apply_chat_template(list(ex.prompt) + list(ex.chosen)), add_special_tokens=False)
    full_r = tok.encode(tok.apply_chat_template(list(ex.prompt) + list(ex.rejected)), add_special_tokens=False)
    c, r = _tails(tok, p, full_c, full_r)
  elif ex.prompt is None:  # implicit text: split on token ids
    full_c = tok.encode(ex.chosen, add_special_tokens=add_special_tokens)
    full_r = tok.encode(ex.rejected, add_special_tokens=add_special_tokens)
    n = records_lib.common_prefix_length(full_c, full_r)
    p, c, r = full_c[:n], full_c[n:], full_r[n:]
  else:
    p = tok.encode(ex.prompt, add_special_tokens=add_special_tokens)
    full_c = tok.encode(ex.prompt + ex.chosen, add_special_tokens=add_special_tokens)
    full_r = tok.encode(ex.prompt + ex.rejected, add_special_tokens=add_special_tokens)
    c, r = _tails(tok, p, full_c, full_r)
  if ex.kind == "text" and add_eos:
    c, r = _add_eos(tok, c), _add_eos(tok, r)
  if not p:
    raise BadRecord("empty_prompt", "the prompt has no tokens")
  if (
    not c
    or not r
    or (tok is not None and tok.eos_id is not None and ex.kind == "text" and add_eos and (len(c) == 1 or len(r) == 1))
  ):
    raise BadRecord("empty_completion", "a completion has no tokens (besides EOS)")
  if c == r:
    raise BadRecord("identical", "chosen and rejected have the same token ids")
  p, c, r, truncated = _truncate(p, c, r, limits, tok.bos_id if tok is not None else None)
  return TokenizedPair(p, c, r, ex.score_chosen, ex.score_rejected, ex.group, truncated)
