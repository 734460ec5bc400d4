r"""A controlled preference world with a known gold reward: prompts, gold reward, demonstrations, labels.

In the spirit of Gao et al. 2023 (arXiv:2210.10760) and the controlled experiment of GPO (Tang et
al. 2024, arXiv:2402.05749): prompts from a small vocabulary, a known gold reward r*(x, y), an
SFT base policy trained on demonstrations, preference pairs sampled from it and labelled by
Bradley-Terry on the gold reward (optionally with a length bias in the labeller), and evaluation
by sampling (`pofx.evaluation`).

    w = world.World(world.WorldConfig(seed=0))
    model, base = experiments.sft.sft_base(w, seed=0)   # small Llama (w.model_config()) + SFT on demonstrations
    data = world.preference_data(w, base, w.prompts(2048, seed=3), key, model=model, num_samples=4)
    data.prompt, data.chosen, data.rejected                  # lists of 1-D int32 arrays (pofx.batching)

The policy is used only through its pure functions (`model.apply`, `model.head`,
`model.init_cache`, `model.decode`: a `pofx.models.LlamaModel`); the SFT training loop lives in
the program (`experiments.sft`), this module gives its data and loss (`sft_arrays`, `sft_loss`).

Vocabulary (`vocab_size` V, default 32): PAD 0, BOS 1, SEP 2, EOS 3, content tokens 4..V-1
(C = V - 4 of them). A prompt is `[BOS, x_1..x_m, SEP]` with m content tokens (m uniform in
`[min_prompt_len, max_prompt_len]`, tokens uniform). A completion is `y_1..y_n` content tokens
then EOS (at most `max_completion_len` tokens in all, EOS included); one without EOS is
"unfinished".

Gold reward (all tables fixed by `WorldConfig.seed`; c(t) = t - 4 maps a token to a content index):

    a(x, v)  = affinity_scale * sum_i A[c(x_i), v] / sqrt(m)          A ~ N(0, 1)  [C, C]
    r*(x, y) = mean_{t<=n} a(x, c(y_t))                                prompt-dependent preferences
             + bigram_weight * mean_{t=2..n} G[c(y_{t-1}), c(y_t)]     structure (a fixed "grammar")
             - length_penalty * dist(n, [min_good_len, max_good_len])   length window
             - unfinished_penalty * [no EOS]

with G[u, v] = +1 for a fixed random `good_bigram_fraction` of the transitions, -1 for
repeats (u == v) and 0 otherwise; dist is the distance of n to the window (0 inside). A
completion with n = 0 content tokens gets the token and bigram terms 0. A special token (PAD,
BOS, SEP) before EOS counts as a token of affinity -invalid_token_penalty, and the bigrams
touching it as 0. The token term rewards
prompt-conditional word choice (one attention layer over the prompt can represent it), the
bigram term a prompt-independent structure, and the length window stops "one best token then
EOS" from being optimal. Measured with the defaults (seed 0): uniformly random content of
demonstration lengths scores about -0.18, the demonstrator 0.92, the SFT base of `experiments.sft.sft_base`
0.7-0.8, the base after 300 DPO steps (beta 0.1, 64 pairs, Adam 1e-3) 1.2-1.3 (win rate vs base
0.70-0.78 over seeds 0-2), and a simple hand-made policy (alternate the best bigram pair, 6
tokens) 2.25, a lower bound of the maximum.

Demonstrations (for SFT) come from a noisy demonstrator: n uniform in
`[demo_min_len, demo_max_len]` and `y_t ~ softmax(demo_affinity_temp * a(x, .) + demo_bigram_temp
* G[c(y_{t-1}), .])`, so the SFT base has a moderate gold reward and real diversity.

Labels (Bradley-Terry): for two completions of one prompt,

    P(y_1 > y_2) = sigmoid(label_scale * (r*(x, y_1) - r*(x, y_2)) + length_bias * (|y_1| - |y_2|))

where |y| counts completion tokens (EOS included). `length_bias` > 0 makes the labeller prefer
longer answers although the gold reward does not (to study verbosity). The gold scores of both
completions and the labeller's probability are kept with every pair.

Train/eval prompt split: a fixed hash of each prompt (from the seed) sends `eval_fraction` of
all possible prompts to the held-out split; `prompts(..., split="eval")` draws only those, so
held-out prompts never appear in training data.

Prompt shift: `prompts(..., shift=s)` draws the content tokens from `p_v ∝ exp(s * z_v)` (z a
fixed standard-normal score per token) instead of uniformly, for tests of generalisation to
prompts unlike the training ones (`prompt_token_probs`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pofx import logprobs, sampling
from pofx.models import llama

Array = jax.Array

PAD, BOS, SEP, EOS = 0, 1, 2, 3
FIRST_CONTENT = 4
# The policy sized for the world (`World.model_config`): 78,144 parameters at V = 32.
MODEL_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_size=128)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Everything that defines a world (frozen; the same config gives the same world).

  Attributes:
    seed: seeds the gold-reward tables and the train/eval prompt hash.
    vocab_size: V (>= 8); content tokens are 4..V-1.
    min_prompt_len, max_prompt_len: content tokens per prompt (uniform).
    max_completion_len: the most completion tokens, EOS included (sampling's max_new_tokens).
    affinity_scale: scale of the prompt-dependent token affinities a(x, v).
    bigram_weight: weight of the bigram structure term.
    good_bigram_fraction: fraction of transitions u -> v (u != v) with G = +1.
    min_good_len, max_good_len: the window of content lengths n without length penalty.
    length_penalty: penalty per content token outside the window.
    unfinished_penalty: penalty of a completion without EOS.
    invalid_token_penalty: a special token (PAD, BOS, SEP) inside a completion counts as a
      token of affinity -invalid_token_penalty (and as a bigram of value 0).
    label_scale: Bradley-Terry inverse temperature on the gold-reward difference.
    length_bias: labeller bias per completion token of length difference (0 = none).
    demo_min_len, demo_max_len: content lengths of demonstrations (uniform).
    demo_affinity_temp, demo_bigram_temp: how strongly the demonstrator follows a and G.
    eval_fraction: fraction of all prompts reserved for evaluation.
  """

  seed: int = 0
  vocab_size: int = 32
  min_prompt_len: int = 2
  max_prompt_len: int = 6
  max_completion_len: int = 12
  affinity_scale: float = 1.0
  bigram_weight: float = 1.0
  good_bigram_fraction: float = 0.25
  min_good_len: int = 4
  max_good_len: int = 8
  length_penalty: float = 0.5
  unfinished_penalty: float = 1.0
  invalid_token_penalty: float = 2.0
  label_scale: float = 2.0
  length_bias: float = 0.0
  demo_min_len: int = 2
  demo_max_len: int = 10
  demo_affinity_temp: float = 1.0
  demo_bigram_temp: float = 1.0
  eval_fraction: float = 0.1

  def __post_init__(self):
    if self.vocab_size < 8:
      raise ValueError(f"WorldConfig.vocab_size must be >= 8, got {self.vocab_size!r}.")
    if not 1 <= self.min_prompt_len <= self.max_prompt_len:
      raise ValueError(
        f"WorldConfig: need 1 <= min_prompt_len <= max_prompt_len, got "
        f"{self.min_prompt_len!r}, {self.max_prompt_len!r}."
      )
    if not 0 <= self.demo_min_len <= self.demo_max_len <= self.max_completion_len - 1:
      raise ValueError(
        f"WorldConfig: need 0 <= demo_min_len <= demo_max_len <= max_completion_len - 1, got "
        f"{self.demo_min_len!r}, {self.demo_max_len!r}, {self.max_completion_len!r}."
      )
    if not 0 <= self.min_good_len <= self.max_good_len:
      raise ValueError(
        f"WorldConfig: need 0 <= min_good_len <= max_good_len, got {self.min_good_len!r}, {self.max_good_len!r}."
      )
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"WorldConfig.eval_fraction must be in (0, 1), got {self.eval_fraction!r}.")
    if not 0.0 <= self.good_bigram_fraction <= 1.0:
      raise ValueError(f"WorldConfig.good_bigram_fraction must be in [0, 1], got {self.good_bigram_fraction!r}.")
    if self.label_scale < 0:
      raise ValueError(f"WorldConfig.label_scale must be >= 0, got {self.label_scale!r}.")

  def replace(self, **changes) -> WorldConfig:
    return dataclasses.replace(self, **changes)

  @property
  def num_content(self) -> int:
    return self.vocab_size - FIRST_CONTENT

  @property
  def prompt_width(self) -> int:
    """Width of a left-padded prompt batch: BOS + max_prompt_len + SEP."""
    return self.max_prompt_len + 2


class Demonstrations(NamedTuple):
  """SFT data: prompts and demonstrated completions (lists of 1-D int32 arrays, EOS included)."""

  prompt: List[np.ndarray]
  completion: List[np.ndarray]


class PreferenceData(NamedTuple):
  """Bradley-Terry-labelled pairs and the K-way lists they came from.

  Pairs (N of them):
    prompt, chosen, rejected: lists of 1-D int32 arrays (completions end with EOS unless cut).
    chosen_score, rejected_score: `[N]` float32 gold rewards.
    label_prob: `[N]` float32, the labeller's P(chosen > rejected) (its BT probability; the
      "true preference fraction" of idealized ranking accuracy).
    prompt_id: `[N]` int32 index of the pair's prompt in `list_prompt`.
  Lists (M prompts x K samples):
    list_prompt: list of M prompts; list_completions: M lists of K completions;
    list_scores: `[M, K]` float32 gold rewards; list_logps: `[M, K]` float32 summed log-probs
      of the sampling policy (temperature 1 model log-probs).
  num_identical: pairs dropped because both completions were identical.
  """

  prompt: List[np.ndarray]
  chosen: List[np.ndarray]
  rejected: List[np.ndarray]
  chosen_score: np.ndarray
  rejected_score: np.ndarray
  label_prob: np.ndarray
  prompt_id: np.ndarray
  list_prompt: List[np.ndarray]
  list_completions: List[List[np.ndarray]]
  list_scores: np.ndarray
  list_logps: np.ndarray
  num_identical: int

  def __len__(self):
    return len(self.chosen)

  def subset(self, idx) -> PreferenceData:
    """The pairs at `idx` (lists unchanged)."""
    idx = np.asarray(idx)
    pick = lambda xs: [xs[i] for i in idx]
    return self._replace(
      prompt=pick(self.prompt),
      chosen=pick(self.chosen),
      rejected=pick(self.rejected),
      chosen_score=self.chosen_score[idx],
      rejected_score=self.rejected_score[idx],
      label_prob=self.label_prob[idx],
      prompt_id=self.prompt_id[idx],
    )


class World:
  """The gold reward, prompt distribution, demonstrator and labeller of a `WorldConfig`."""

  def __init__(self, config: WorldConfig = WorldConfig()):
    self.config = config
    c = config.num_content
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5EED]))
    self.affinity_table = rng.standard_normal((c, c)).astype(np.float32)  # A [C, C]
    good = rng.random((c, c)) < config.good_bigram_fraction
    bigram = np.where(good, 1.0, 0.0)
    np.fill_diagonal(bigram, -1.0)
    self.bigram_table = bigram.astype(np.float32)  # G [C, C]
    # A fixed random hash of (length, tokens by position) decides each prompt's split.
    self._hash_len = rng.integers(0, 1 << 30, size=(config.max_prompt_len + 1,))
    self._hash_tok = rng.integers(0, 1 << 30, size=(config.max_prompt_len, c))

  # Prompts -------------------------------------------------------------------------------------

  def model_config(self, **overrides) -> llama.LlamaConfig:
    """A small Llama sized for this world (D=64, 2 layers, 4 heads, 2 KV heads, MLP 128;
    78,144 parameters at V = 32)."""
    return llama.LlamaConfig(vocab_size=self.config.vocab_size, **MODEL_SHAPE).replace(**overrides)

  def is_eval_prompt(self, prompt) -> bool:
    """Whether a prompt (with or without BOS/SEP) belongs to the held-out split (a fixed hash)."""
    x = self._content(prompt)
    if x.size > self.config.max_prompt_len:
      raise ValueError(f"is_eval_prompt: prompt has {x.size} content tokens, more than max_prompt_len.")
    h = int(self._hash_len[x.size]) + sum(int(self._hash_tok[i, t]) for i, t in enumerate(x))
    return (h % 10000) < self.config.eval_fraction * 10000

  def prompt_token_probs(self, shift: float = 0.0) -> np.ndarray:
    """The distribution `[C]` of a prompt's content tokens under a prompt shift of strength
    `shift`: `p_v ∝ exp(shift * s_v)` with `s` a fixed standard-normal score per content token
    (from the world's seed). `shift = 0` is the uniform distribution of `prompts`' default."""
    s = np.random.default_rng(np.random.SeedSequence([self.config.seed, 0x5417])).standard_normal(
      self.config.num_content
    )
    z = float(shift) * s
    p = np.exp(z - z.max())
    return p / p.sum()

  def prompts(self, n: int, seed: int, split: str = "train", shift: float = 0.0) -> List[np.ndarray]:
    """`n` prompts `[BOS, x_1..x_m, SEP]` from the split "train" or "eval" (or "any").

    `shift` > 0 draws the content tokens from `prompt_token_probs(shift)` instead of uniformly
    (a shift of the prompt distribution, for generalisation tests; the lengths and the split
    rule are unchanged). `shift = 0` gives the prompts of the default, token for token."""
    if split not in ("train", "eval", "any"):
      raise ValueError(f"World.prompts: split must be one of ('train', 'eval', 'any'), got {split!r}.")
    if not (math.isfinite(float(shift)) and float(shift) >= 0.0):
      raise ValueError(f"World.prompts: shift must be a finite number >= 0, got {shift!r}.")
    cfg = self.config
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xA11, int(seed)]))
    probs = self.prompt_token_probs(shift) if shift else None
    out = []
    while len(out) < n:
      m = int(rng.integers(cfg.min_prompt_len, cfg.max_prompt_len + 1))
      if probs is None:
        x = rng.integers(FIRST_CONTENT, cfg.vocab_size, size=m)
      else:
        x = FIRST_CONTENT + rng.choice(cfg.num_content, size=m, p=probs)
      if split != "any" and self.is_eval_prompt(x) != (split == "eval"):
        continue
      out.append(np.concatenate([[BOS], x, [SEP]]).astype(np.int32))
    return out

  # Gold reward ---------------------------------------------------------------------------------

  @staticmethod
  def _content(prompt) -> np.ndarray:
    p = np.asarray(prompt).reshape(-1)
    return p[p >= FIRST_CONTENT] - FIRST_CONTENT

  def affinities(self, prompt) -> np.ndarray:
    """a(x, .) `[C]` float32 for one prompt."""
    x = self._content(prompt)
    if x.size == 0:
      return np.zeros((self.config.num_content,), np.float32)
    return (self.config.affinity_scale * self.affinity_table[x].sum(0) / math.sqrt(x.size)).astype(np.float32)

  def gold_reward(self, prompts: Sequence, completions: Sequence) -> np.ndarray:
    """r*(x, y) `[N]` float32 for N (prompt, completion) pairs of 1-D token sequences. A
    completion is read up to its first EOS (anything after it is ignored); without EOS it is
    unfinished and all its tokens count."""
    if len(prompts) != len(completions):
      raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(completions)} completions.")
    out = np.zeros((len(prompts),), np.float32)
    for i, (x, y) in enumerate(zip(prompts, completions)):
      out[i] = self._reward_one(self.affinities(x), np.asarray(y).reshape(-1))
    return out

  def _reward_one(self, aff, y) -> float:
    cfg = self.config
    eos = np.nonzero(y == EOS)[0]
    finished = eos.size > 0
    body = y[: eos[0]] if finished else y
    n = body.size
    is_content = body >= FIRST_CONTENT
    c = np.where(is_content, body - FIRST_CONTENT, 0)
    r = 0.0
    if n:
      r += float(np.mean(np.where(is_content, aff[c], -cfg.invalid_token_penalty)))
    if n > 1:
      both = is_content[:-1] & is_content[1:]
      r += cfg.bigram_weight * float(np.mean(np.where(both, self.bigram_table[c[:-1], c[1:]], 0.0)))
    r -= cfg.length_penalty * (max(0, cfg.min_good_len - n) + max(0, n - cfg.max_good_len))
    if not finished:
      r -= cfg.unfinished_penalty
    return r

  def label_prob(self, score_1, score_2, len_1, len_2) -> np.ndarray:
    """The labeller's Bradley-Terry P(y_1 > y_2) from gold scores and completion lengths."""
    cfg = self.config
    z = cfg.label_scale * (np.asarray(score_1, np.float64) - np.asarray(score_2, np.float64))
    z = z + cfg.length_bias * (np.asarray(len_1, np.float64) - np.asarray(len_2, np.float64))
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # sigmoid, no overflow

  # Annotations for losses that read more than a pair (embeddings, segment scores) ---------------

  def embed_prompt(self, prompt) -> np.ndarray:
    """The prompt's embedding `[C]` float32: its affinity vector a(x, .) (what the gold reward's
    token term asks of a completion)."""
    return self.affinities(prompt)

  def embed_completion(self, completion) -> np.ndarray:
    """The completion's embedding `[C]` float32: the share of each content token among its content
    tokens, read up to the first EOS (zeros when it has none). With `embed_prompt`, the cosine of
    the two grows with the completion's affinity term."""
    y = np.asarray(completion).reshape(-1)
    eos = np.nonzero(y == EOS)[0]
    body = y[: eos[0]] if eos.size else y
    content = body[body >= FIRST_CONTENT] - FIRST_CONTENT
    out = np.zeros((self.config.num_content,), np.float32)
    if content.size:
      np.add.at(out, content, 1.0)
      out /= content.size
    return out

  def num_segments(self, segment_len: int) -> int:
    """The most segments of `segment_len` tokens a completion can have: ceil(max_completion_len / segment_len)."""
    return -(-self.config.max_completion_len // int(segment_len))

  def segment_scores(self, prompt, completion, segment_len: int = 3):
    """Segments of a completion and their scores on two aspects, from the gold reward's terms.

    The completion's tokens (EOS included) are cut into consecutive segments of `segment_len`
    tokens: `ids[t] = t // segment_len`. Segment k scores, in [0, 1]:
      aspect 0 (relevance): `sigmoid(mean a(x, y_t))` over its tokens before the first EOS (a
        special token counts -invalid_token_penalty, as in r*);
      aspect 1 (structure): `(1 + mean G[y_{t-1}, y_t]) / 2` over the bigrams ending in it whose
        two tokens are content tokens before the first EOS;
    0.5 where a segment has no such token or bigram. Returns `(ids [n] int32, scores [S, 2]
    float32)` with n = the completion's length and S = `num_segments(segment_len)` (rows past the
    last segment are 0.5).
    """
    cfg = self.config
    if int(segment_len) < 1:
      raise ValueError(f"segment_scores: segment_len must be >= 1, got {segment_len!r}.")
    y = np.asarray(completion).reshape(-1)
    if y.size > cfg.max_completion_len:
      raise ValueError(f"segment_scores: completion has {y.size} tokens, more than max_completion_len.")
    aff = self.affinities(prompt)
    eos = np.nonzero(y == EOS)[0]
    n_body = int(eos[0]) if eos.size else y.size
    ids = (np.arange(y.size) // int(segment_len)).astype(np.int32)
    scores = np.full((self.num_segments(segment_len), 2), 0.5, np.float32)
    is_content = y >= FIRST_CONTENT
    c = np.where(is_content, y - FIRST_CONTENT, 0)
    token_aff = np.where(is_content, aff[c], -cfg.invalid_token_penalty)
    for k in range(int(ids.max()) + 1 if y.size else 0):
      pos = np.nonzero((ids == k) & (np.arange(y.size) < n_body))[0]
      if pos.size:
        scores[k, 0] = 1.0 / (1.0 + np.exp(-float(np.mean(token_aff[pos]))))
      big = [t for t in pos if t >= 1 and is_content[t] and is_content[t - 1]]
      if big:
        scores[k, 1] = 0.5 * (1.0 + float(np.mean([self.bigram_table[c[t - 1], c[t]] for t in big])))
    return ids, scores

  # Demonstrations ------------------------------------------------------------------------------

  def demonstrations(self, n: int, seed: int, split: str = "train") -> Demonstrations:
    """`n` (prompt, completion) demonstrations from the noisy demonstrator (module docstring)."""
    cfg = self.config
    prompts = self.prompts(n, seed=seed, split=split)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xDE30, int(seed)]))
    comps = []
    for x in prompts:
      aff = cfg.demo_affinity_temp * self.affinities(x)
      n_tok = int(rng.integers(cfg.demo_min_len, cfg.demo_max_len + 1))
      y, prev = [], None
      for _ in range(n_tok):
        z = aff if prev is None else aff + cfg.demo_bigram_temp * self.bigram_table[prev]
        p = np.exp(z - z.max())
        prev = int(rng.choice(cfg.num_content, p=p / p.sum()))
        y.append(prev + FIRST_CONTENT)
      comps.append(np.asarray(y + [EOS], np.int32))
    return Demonstrations(prompts, comps)


# SFT data and loss (the training loop is `experiments.sft`) -------------------------------------


def sft_arrays(demos: Demonstrations, width: Optional[int] = None):
  """Demonstrations as right-padded rows `[prompt | completion | padding]` of `width` tokens
  (default: the longest demonstration): `(tokens [N, W] int32, positions [N, W] int32,
  segment_ids [N, W] int32 (1 on real tokens), loss_mask [N, W] float32)`. `loss_mask` is 1 at the
  columns whose next token is a completion token (column t scores `tokens[t + 1]`)."""
  if width is None:
    width = max(p.size + c.size for p, c in zip(demos.prompt, demos.completion))
  n = len(demos.prompt)
  tokens = np.zeros((n, width), np.int32)
  seg = np.zeros((n, width), np.int32)
  loss_mask = np.zeros((n, width), np.float32)
  for i, (p, c) in enumerate(zip(demos.prompt, demos.completion)):
    seq = np.concatenate([p, c])
    if seq.size > width:
      raise ValueError(f"sft: demonstration {i} has {seq.size} tokens, more than the width {width}.")
    tokens[i, : seq.size] = seq
    seg[i, : seq.size] = 1
    loss_mask[i, p.size - 1 : seq.size - 1] = 1.0
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy()
  return tokens, positions, seg, loss_mask


def sft_loss(model, params, tokens, positions, segment_ids, loss_mask) -> Array:
  """Supervised fine-tuning loss: the token-level negative log-likelihood of the demonstrated
  completions (prompt tokens not scored), averaged over the completion tokens of the batch,

      L = -sum_{i,t} m_{i,t} log pi(tokens_{i,t+1} | tokens_{i,<=t}) / max(sum m, 1),

  for rows of `sft_arrays`; `model` gives `apply` and `head` (e.g. `pofx.models.make(config)`)."""
  hidden = model.apply(params, tokens, positions, segment_ids)
  lp = logprobs.next_token_logps(
    hidden,
    model.head(params),
    tokens,
    dot_general=sampling.head_dot_general(model),
    logit_softcap=sampling.head_logit_softcap(model),
  ).logps
  m = loss_mask[:, :-1]
  return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)


# Sampling and preference data ------------------------------------------------------------------


def sample_completions(
  world: World, params, prompts: Sequence, key, *, model, temperature=1.0, top_k: int = 0, batch_size: int = 512
) -> sampling.Samples:
  """One completion per prompt (repeat prompts for several), sampled in fixed-size jitted
  batches of `batch_size` rows (the last one padded), returned as one `Samples` (numpy arrays).
  `model`: the policy's pure functions (`pofx.models.make(config)`; see `pofx.sampling`).

  Every batch uses the world's prompt width and `max_completion_len`, so one compiled shape
  serves all calls with the same batch size. Batch j uses the key `fold_in(key, j)`.
  """
  wc = world.config
  n = len(prompts)
  if n == 0:
    raise ValueError("sample_completions: no prompts given.")
  toks, mask = sampling.left_pad(prompts, pad_id=PAD, length=wc.prompt_width)
  bs = min(int(batch_size), n)
  parts = []
  for j, start in enumerate(range(0, n, bs)):
    t, m = toks[start : start + bs], mask[start : start + bs]
    real = t.shape[0]
    if real < bs:  # pad with copies of the first prompt (same compiled shape)
      t = np.concatenate([t, np.repeat(t[:1], bs - real, 0)])
      m = np.concatenate([m, np.repeat(m[:1], bs - real, 0)])
    out = sampling.sample(
      params,
      t,
      m,
      jax.random.fold_in(key, j),
      model=model,
      max_new_tokens=wc.max_completion_len,
      eos_id=EOS,
      pad_id=PAD,
      temperature=temperature,
      top_k=top_k,
    )
    parts.append(jax.tree.map(lambda a: np.asarray(a)[:real], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


PAIRINGS = ("adjacent", "all", "best_worst")


def preference_data(
  world: World,
  params,
  prompts: Sequence,
  key,
  *,
  model,
  num_samples: int = 4,
  pairing: str = "adjacent",
  temperature=1.0,
  top_k: int = 0,
  batch_size: int = 512,
) -> PreferenceData:
  """Samples K = `num_samples` completions per prompt from the policy `params`, scores them with
  the gold reward, and labels pairs by Bradley-Terry (the world's labeller).

  Pairing of the K samples of a prompt: "adjacent" (samples 2i, 2i+1: K/2 disjoint pairs),
  "all" (all K(K-1)/2 pairs) or "best_worst" (the highest and lowest gold score). Each pair's
  order is then drawn from the labeller's BT probability (a numpy generator seeded from `key`).
  Pairs of identical completions are dropped (counted in `num_identical`). The K-way lists
  with their gold scores are kept for listwise methods.
  """
  if pairing not in PAIRINGS:
    raise ValueError(f"preference_data: pairing must be one of {PAIRINGS}, got {pairing!r}.")
  K = int(num_samples)
  if K < 2 or (pairing == "adjacent" and K % 2):
    raise ValueError(f"preference_data: num_samples must be >= 2 (and even for 'adjacent'), got {num_samples!r}.")
  prompts = [np.asarray(p, np.int32) for p in prompts]
  M = len(prompts)
  k_sample, k_label = jax.random.split(key)
  rep = [prompts[i] for i in range(M) for _ in range(K)]
  s = sample_completions(
    world, params, rep, k_sample, model=model, temperature=temperature, top_k=top_k, batch_size=batch_size
  )
  comps = sampling.completions(s)
  scores = world.gold_reward(rep, comps).reshape(M, K)
  lens = np.asarray(s.lengths).reshape(M, K)
  seq_logps = np.asarray(s.logps).sum(-1).reshape(M, K).astype(np.float32)
  lists = [comps[i * K : (i + 1) * K] for i in range(M)]

  if pairing == "adjacent":
    idx = [(2 * j, 2 * j + 1) for j in range(K // 2)]
  elif pairing == "all":
    idx = [(a, b) for a in range(K) for b in range(a + 1, K)]
  rng = np.random.default_rng(np.asarray(jax.random.key_data(k_label)).astype(np.uint64).tolist())
  out = {k: [] for k in ("prompt", "chosen", "rejected", "cs", "rs", "p", "pid")}
  n_same = 0
  for i in range(M):
    pairs = idx if pairing != "best_worst" else [(int(np.argmax(scores[i])), int(np.argmin(scores[i])))]
    for a, b in pairs:
      ya, yb = lists[i][a], lists[i][b]
      if ya.size == yb.size and np.array_equal(ya, yb):
        n_same += 1
        continue
      p_ab = float(world.label_prob(scores[i, a], scores[i, b], lens[i, a], lens[i, b]))
      if rng.random() >= p_ab:
        a, b, p_ab = b, a, 1.0 - p_ab
      out["prompt"].append(prompts[i])
      out["chosen"].append(lists[i][a])
      out["rejected"].append(lists[i][b])
      out["cs"].append(scores[i, a])
      out["rs"].append(scores[i, b])
      out["p"].append(p_ab)
      out["pid"].append(i)
  f32 = lambda x: np.asarray(x, np.float32)
  return PreferenceData(
    prompt=out["prompt"],
    chosen=out["chosen"],
    rejected=out["rejected"],
    chosen_score=f32(out["cs"]),
    rejected_score=f32(out["rs"]),
    label_prob=f32(out["p"]),
    prompt_id=np.asarray(out["pid"], np.int32),
    list_prompt=prompts,
    list_completions=lists,
    list_scores=scores.astype(np.float32),
    list_logps=seq_logps,
    num_identical=n_same,
  )
