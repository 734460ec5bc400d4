"""Policy models, exposed to the rest of pofx only as pure functions (no Flax outside here).

`pofx.models.llama`: the one decoder-only transformer (Llama, and by config switches Mistral,
Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3: docs/models.md). `make(config, kernels=pofx.kernels.XLA)`
binds a `LlamaConfig` and the injected kernels into a `LlamaModel` record: `init(rng)`,
`apply(params, tokens, positions, segment_ids, branch_ids=None, *, attention_blocks=None,
output_index=None) -> hidden [B, L, D]`, `head(params) -> [D, V]`, `logits(...)`,
`init_cache(batch_size, max_length)` and `decode(params, tokens, positions, valid, cache) ->
(logits, cache)`. The same functions exist at module level with `config=` and `kernels=`
(`init_params`, `apply_fn`, `lm_head`, `logits_fn`, `init_cache`, `decode`).

`pofx.models.hf`: Hugging Face folders (`config.json` + safetensors) in both directions,
`load_pretrained(path) -> (config, params)` and `save_pretrained(path, params, config)`.
"""

from pofx.models import hf, llama
from pofx.models.llama import (
  KVCache,
  LlamaConfig,
  LlamaModel,
  apply_fn,
  decode,
  init_cache,
  init_params,
  lm_head,
  logits_fn,
  make,
  params_from_hf,
  params_to_hf,
  preset,
)

__all__ = [
  "hf",
  "llama",
  "KVCache",
  "LlamaConfig",
  "LlamaModel",
  "apply_fn",
  "decode",
  "init_cache",
  "init_params",
  "lm_head",
  "logits_fn",
  "make",
  "params_from_hf",
  "params_to_hf",
  "preset",
]
