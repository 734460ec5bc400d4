"""Policy models, exposed to the rest of pofx only as pure functions (no Flax outside here).

`pofx.models.llama`: a Llama-family decoder; `init_params(config, rng)`, `apply_fn(params,
tokens, positions, segment_ids, branch_ids=None, *, config) -> hidden [B, L, D]`,
`lm_head(params, config) -> [D, V]`, `logits_fn(...)`, and `make(config)` binding them.
`apply_fn(..., attention_blocks=...)` runs block-sparse attention (`pofx.sparse_attention`).
"""

from pofx.models import llama
from pofx.models.llama import (
    LlamaConfig,
    LlamaModel,
    apply_fn,
    init_params,
    lm_head,
    logits_fn,
    make,
    params_from_hf,
    preset,
)

__all__ = [
    "llama", "LlamaConfig", "LlamaModel", "apply_fn", "init_params", "lm_head", "logits_fn",
    "make", "params_from_hf", "preset",
]
