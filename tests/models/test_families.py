"""Model families beyond Llama (Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3; Llama's export is in
tests/test_export_hf.py, its parity in tests/models/test_llama.py):
logits parity with Hugging Face transformers (PyTorch, a reference implementation) on random small
configs read from a `save_pretrained` folder; export back to a folder transformers loads with the
same logits; the sliding window and soft-capping in every attention layout (dense,
block-sparse, prompt-shared rows, the KV-cache decode) and in the backends; refusals.

Tolerances: pofx and PyTorch both compute in float32; the logits (of size about 1 to 10 here)
differ by summation order and by the RoPE tables (pofx's inverse frequencies in float64, PyTorch's
in float32), a few 1e-6 in practice, so 1e-4 absolute leaves room and is still far below what a
wrong switch moves (each family's `ablations` check that turning its switches off moves the logits
by more than 1e-2). The exported folder is loaded by the same PyTorch code as the original, with
the float32 weights unchanged: equal to 1e-6.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pofx import kernels as kernels_lib
from pofx import logprobs, sparse_attention
from pofx.models import hf, llama
from pofx_backends import cpu, gpu, tpu

V, D, L, B = 97, 32, 24, 2
COMMON = dict(
  vocab_size=V,
  hidden_size=D,
  intermediate_size=64,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
  initializer_range=0.1,
)

# family: (transformers config class, its arguments, LlamaConfig fields the loaded config must have,
#          config changes that must each move the logits)
FAMILIES = {
  "qwen2": (
    "Qwen2Config",
    dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    dict(qkv_bias=True, sliding_window=5, layer_types=("full_attention", "sliding_attention", "sliding_attention")),
    [dict(sliding_window=None, layer_types=None)],
  ),
  "qwen3": (
    "Qwen3Config",
    dict(num_hidden_layers=2, head_dim=16, tie_word_embeddings=True,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    dict(qk_norm=True, head_dim=16, tie_embeddings=True, sliding_window=None),
    [dict(qk_norm=False)],
  ),
  "mistral": (
    "MistralConfig",
    dict(num_hidden_layers=2, sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    dict(sliding_window=5, layer_types=None),
    [dict(sliding_window=None)],
  ),
  "gemma2": (
    "Gemma2Config",
    dict(num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=2.0,
         final_logit_softcapping=3.0, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    dict(norm_offset=1.0, sandwich_norms=True, mlp_activation="gelu_tanh", scale_embeddings=True,
         query_pre_attn_scalar=24.0, attn_logit_softcap=2.0, final_logit_softcap=3.0, sliding_window=5,
         layer_types=("sliding_attention", "full_attention"), tie_embeddings=True),
    [dict(attn_logit_softcap=None), dict(final_logit_softcap=None), dict(sliding_window=None, layer_types=None)],
  ),
  "gemma3_text": (
    "Gemma3TextConfig",
    dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
         layer_types=["sliding_attention", "sliding_attention", "full_attention"],
         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
    dict(qk_norm=True, sandwich_norms=True, norm_offset=1.0, rope_theta=500.0, rope_linear_factor=2.0,
         rope_local_theta=50.0, attn_logit_softcap=None, final_logit_softcap=None),
    [dict(rope_local_theta=None), dict(rope_linear_factor=None)],  # QK-norm: see qwen3
  ),
}  # fmt: skip


def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _logits(params, config, tokens):
  Bt, Lt = tokens.shape
  pos = np.broadcast_to(np.arange(Lt), (Bt, Lt))
  return np.asarray(jax.jit(llama.make(config).logits)(params, tokens, pos, np.ones((Bt, Lt), np.int32)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers_and_exports(family, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cls, kwargs, expect, ablations = FAMILIES[family]
  hf_cfg = getattr(transformers, cls)(**COMMON, **kwargs, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
  with torch.no_grad():  # norms start at 1 (Gemma: 0) and biases at 0: make them matter
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded: read through the index file
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()

  config, params = hf.load_pretrained(str(tmp_path / "hf"))
  assert {k: getattr(config, k) for k in expect} == expect
  assert _count(params) == config.num_params() == sum(p.numel() for p in model.parameters())
  tokens = np.random.default_rng(0).integers(0, V, (B, L))
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens)).logits.numpy()
  got = _logits(params, config, tokens)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  for change in ablations:  # each switch matters on these inputs: the parity above can fail
    assert np.abs(_logits(params, config.replace(**change), tokens) - ref).max() > 1e-2, change

  hf.save_pretrained(str(tmp_path / "out"), params, config)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
  assert type(back) is type(model)
  with torch.no_grad():
    again = back.float().eval()(input_ids=torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(again, ref, atol=1e-6, rtol=0)
  assert hf.load_pretrained(str(tmp_path / "out"))[0] == config


# The sliding window and soft-capping in every layout ---------------------------------------------

WINDOW = 3
GEMMA_LIKE = llama.tiny(
  sliding_window=WINDOW,
  layer_types=("sliding_attention", "full_attention"),
  attn_logit_softcap=1.0,
  final_logit_softcap=5.0,
  qk_norm=True,
  sandwich_norms=True,
  norm_offset=1.0,
  rope_local_theta=50.0,
)


def _random_params(config, seed=0, std=0.3):
  """Parameters of `config`'s shapes, every entry N(0, std^2) (norm scales included, so they
  matter), without compiling the initialiser."""
  shapes = jax.eval_shape(lambda k: llama.init_params(config, k), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), shapes)


@pytest.fixture(scope="module")
def gemma_like():
  return GEMMA_LIKE, _random_params(GEMMA_LIKE)


def _xla(query_block):
  return kernels_lib.Kernels(attention=functools.partial(kernels_lib.xla_attention, query_block=query_block))


def test_window_masks_by_hand():
  # One row of 6 tokens, two segments (4 + 2), positions restarting per segment, window 2.
  seg = np.array([[1, 1, 1, 1, 2, 2]])
  pos = np.array([[0, 1, 2, 3, 0, 1]])
  expected = np.array(
    [
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 1, 1, 0, 0, 0],
      [0, 0, 1, 1, 0, 0],
      [0, 0, 0, 0, 1, 0],
      [0, 0, 0, 0, 1, 1],
    ],
    bool,
  )
  mask = kernels_lib.SegmentMask(seg, positions=pos, window=2)
  np.testing.assert_array_equal(np.asarray(mask.dense())[0], expected)
  # Cache: 5 slots, the first one padding; two queries at slots 3 and 4, window 2.
  cache = kernels_lib.CacheMask(np.array([[False, True, True, True, True]]), 3, window=2)
  np.testing.assert_array_equal(np.asarray(cache.dense(2))[0], np.array([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], bool))
  with pytest.raises(ValueError, match="positions"):
    kernels_lib.SegmentMask(seg, window=2)
  with pytest.raises(ValueError, match="window"):
    kernels_lib.CacheMask(cache.kv_valid, 3, window=0)


def test_dense_blocked_and_block_sparse_agree_with_window_and_softcap(gemma_like):
  # The dense path is the one the transformers parity above pins; the block-sparse tiles
  # (hand-written backward) must give its values and gradients, up to float32 summation order
  # (gradients of size about 1 here: 5e-5 absolute). The causal query blocks slice the same dense
  # mask (tests/models/test_llama.py compares them with the full product).
  cfg, params = gemma_like
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, cfg.vocab_size, (2, 16))
  seg = np.array([[1] * 16, [1] * 7 + [2] * 6 + [0] * 3])
  pos = np.array([np.arange(16), np.r_[np.arange(7), np.arange(6), [0, 0, 0]]])
  blocks = sparse_attention.attention_blocks(seg, block_size=4)

  def loss(kernels, blocks=None):
    def f(p):
      h = llama.apply_fn(p, tokens, pos, seg, config=cfg, kernels=kernels, attention_blocks=blocks)
      return jnp.sum(jnp.sin(h) * (seg > 0)[..., None])

    return jax.jit(jax.value_and_grad(f))(params)

  v0, g0 = loss(_xla(0))  # one full L x L product
  v1, g1 = loss(kernels_lib.XLA, blocks)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=5e-5, rtol=1e-4), g1, g0)


def test_prompt_shared_row_equals_fused_rows_with_window(gemma_like):
  # Row 0: [prompt | chosen | rejected] with the rejected positions restarting at the prompt
  # length; rows 1, 2: the fused rows [prompt | chosen], [prompt | rejected]. With the window
  # measured in positions each completion sees the same keys in both layouts (in columns, the
  # rejected tokens would lose the end of the prompt). Dense and block-sparse attention.
  cfg, params = gemma_like
  rng = np.random.default_rng(2)
  p, c, r = (rng.integers(0, cfg.vocab_size, n) for n in (5, 4, 3))
  pad = lambda x: np.concatenate([x, np.zeros(16 - len(x), x.dtype)])  # noqa: E731
  tokens = np.stack([pad(np.concatenate([p, c, r])), pad(np.concatenate([p, c])), pad(np.concatenate([p, r]))])
  pos = np.stack([pad(np.r_[np.arange(9), np.arange(5, 8)]), pad(np.arange(9)), pad(np.arange(8))])
  seg = np.stack([pad(np.ones(12, int)), pad(np.ones(9, int)), pad(np.ones(8, int))])
  br = np.zeros_like(seg)
  br[0, 5:9], br[0, 9:12] = 1, 2
  apply = jax.jit(llama.make(cfg).apply)
  for blocks in (None, sparse_attention.attention_blocks(seg, br, block_size=4)):
    h = np.asarray(apply(params, tokens, pos, seg, br, attention_blocks=blocks))
    np.testing.assert_allclose(h[0, :9], h[1, :9], atol=1e-5)  # prompt and chosen
    np.testing.assert_allclose(h[0, 9:12], h[2, 5:8], atol=1e-5)  # rejected
  # The window is in effect in this row: without it the rejected tokens see the whole prompt.
  free = jax.jit(llama.make(cfg.replace(sliding_window=None, layer_types=None)).apply)
  assert np.abs(np.asarray(free(params, tokens, pos, seg, br))[0, 9:12] - h[0, 9:12]).max() > 1e-3


def test_cached_decode_equals_full_forward_with_window(gemma_like):
  cfg, params = gemma_like
  model = llama.make(cfg)
  rng = np.random.default_rng(3)
  # Left-padded prompts (3 and 6 real tokens) and 4 new tokens, positions counting real tokens.
  seq = rng.integers(1, cfg.vocab_size, (2, 10))
  valid = np.ones((2, 10), bool)
  valid[0, :3] = False
  pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
  full = jax.jit(model.logits)(params, seq, pos, valid.astype(np.int32))
  decode = jax.jit(model.decode)
  logits, cache = decode(params, seq[:, :6], pos[:, :6], valid[:, :6], model.init_cache(2, 10))
  steps = [logits]
  for t in range(6, 10):
    logits, cache = decode(params, seq[:, t : t + 1], pos[:, t : t + 1], valid[:, t : t + 1], cache)
    steps.append(logits)
  got = np.concatenate([np.asarray(s) for s in steps], axis=1)
  np.testing.assert_allclose(got[valid], np.asarray(full)[valid], atol=2e-5)


def test_backends_honour_or_hand_over_window_and_softcap():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(1, 8, 1, 2, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 8, 1, 8)), jnp.float32) for _ in range(2))
  mask = kernels_lib.SegmentMask(np.ones((1, 8), np.int32), positions=np.arange(8)[None], window=3)
  want = kernels_lib.xla_attention(q, k, v, mask, scale=0.5, softcap=2.0)
  plain = kernels_lib.xla_attention(q, k, v, kernels_lib.SegmentMask(np.ones((1, 8), np.int32)), scale=0.5)
  assert np.abs(np.asarray(want - plain)).max() > 1e-3
  np.testing.assert_allclose(gpu.dot_product_attention(q, k, v, mask, scale=0.5, softcap=2.0), want, atol=1e-6)
  windowed = kernels_lib.xla_attention(q, k, v, mask, scale=0.5)
  np.testing.assert_allclose(
    gpu.dot_product_attention(q, k, v, mask, scale=0.5, implementation="xla"), windowed, atol=1e-5
  )
  with pytest.raises(ValueError, match="soft-cap"):
    gpu.dot_product_attention(q, k, v, mask, scale=0.5, implementation="xla", softcap=2.0)
  np.testing.assert_allclose(tpu.splash_attention(q, k, v, mask, scale=0.5, softcap=2.0), want, atol=1e-6)
  # The CPU backend's fused kernels take neither: such calls go to the XLA path.
  blocks = sparse_attention.attention_blocks(np.ones((1, 64), np.int32), block_size=64)
  q64 = jnp.zeros((1, 64, 1, 2, 16), jnp.float32)
  k64 = jnp.zeros((1, 64, 1, 16), jnp.float32)
  plain64 = kernels_lib.SegmentMask(np.ones((1, 64), np.int32), blocks=blocks)
  assert cpu.native_attention_supports(q64, k64, k64, plain64)
  assert not cpu.native_attention_supports(q64, k64, k64, plain64, softcap=2.0)
  windowed64 = kernels_lib.SegmentMask(plain64.segment_ids, blocks=blocks, positions=np.arange(64)[None], window=8)
  assert not cpu.native_attention_supports(q64, k64, k64, windowed64)


# Refusals ----------------------------------------------------------------------------------------

BASE = dict(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4)  # fmt: skip


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(model_type="gpt2"), r"model_type='gpt2' is not supported; allowed: \['llama'"),
    (dict(model_type="gemma3"), "gemma3_text"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), r"rope_type='yarn' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope_type='dynamic' is not supported"),
    (dict(attention_bias=True), "attention_bias=True is not supported; pofx has biases on q, k and v only"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported; allowed"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(num_hidden_layers=None), "num_hidden_layers is missing"),
  ],
)
def test_config_refusals(change, message):
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf({**BASE, **change})


def test_export_refuses_what_the_family_cannot_express(tmp_path):
  cfg = llama.tiny(qkv_bias=True)
  params = _random_params(cfg)
  with pytest.raises(ValueError, match=r"a 'llama' model cannot express qkv_bias=True.*'qwen2'"):
    hf.save_pretrained(str(tmp_path / "x"), params, cfg, model_type="llama")
  assert not (tmp_path / "x").exists()  # nothing written
  with pytest.raises(ValueError, match="missing parameter"):
    hf.save_pretrained(
      str(tmp_path / "y"), llama.init_params(llama.tiny(), jax.random.key(0)), llama.tiny(qk_norm=True)
    )
  with pytest.raises(ValueError, match="no config.json"):
    hf.load_pretrained(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(BASE))
  with pytest.raises(ValueError, match="no \\*.safetensors"):
    hf.load_pretrained(str(tmp_path))


def test_bad_family_fields_raise():
  with pytest.raises(ValueError, match="sliding_window is None"):
    llama.tiny(layer_types=("sliding_attention", "full_attention"))
  with pytest.raises(ValueError, match="one of"):
    llama.tiny(layer_types=("full_attention",))  # two layers
  with pytest.raises(ValueError, match="mlp_activation"):
    llama.tiny(mlp_activation="relu")
  with pytest.raises(ValueError, match="cannot both"):
    llama.tiny(rope_linear_factor=2.0, rope_scaling=(8.0, 1.0, 4.0, 64))


def test_log_probs_apply_the_final_soft_cap(gemma_like):
  # Hand-computed: log softmax of c * tanh(h W / c) (numpy, float64), on both head paths.
  rng = np.random.default_rng(5)
  h, w = rng.normal(size=(6, 8)), rng.normal(size=(8, 11))
  t = rng.integers(0, 11, 6)
  z = 2.0 * np.tanh(h @ w / 2.0)
  want = z[np.arange(6), t] - np.log(np.exp(z).sum(-1))
  for save_probs in (False, True):  # the capped head always takes the checkpointed path
    got = logprobs.token_logps(h, w, t, logit_softcap=2.0, save_probs=save_probs, chunk_size=4).logps
    np.testing.assert_allclose(got, want, atol=1e-5)
  plain = logprobs.token_logps(h, w, t).logps
  assert np.abs(np.asarray(plain) - want).max() > 1e-2
  with pytest.raises(ValueError, match="logit_softcap"):
    logprobs.token_logps(h, w, t, logit_softcap=0.0)
  # The model's own head and cap (`model.logit_softcap`, the one its logits use: the transformers
  # parity above): next-token log-probs against numpy on its hidden states.
  cfg, params = gemma_like
  model = llama.make(cfg)
  assert model.logit_softcap == 5.0
  tokens = rng.integers(0, cfg.vocab_size, (1, 8))
  args = (params, tokens, np.arange(8)[None], np.ones((1, 8), np.int32))
  hidden = jax.jit(model.apply)(*args)
  z = np.asarray(hidden, np.float64)[0, :-1] @ np.asarray(model.head(params), np.float64)
  z = 5.0 * np.tanh(z / 5.0)
  want = z[np.arange(7), tokens[0, 1:]] - np.log(np.exp(z).sum(-1))
  got = logprobs.next_token_logps(hidden, model.head(params), tokens, logit_softcap=model.logit_softcap).logps
  np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-4)


def test_bfloat16_export_reads_back_rounded(tmp_path):
  # Weights written in bfloat16 and read back equal the float32 parameters rounded to bfloat16
  # (ml_dtypes' rounding, independent of pofx); the config comes back with the exported context.
  cfg = GEMMA_LIKE.replace(scale_embeddings=True, mlp_activation="gelu_tanh", query_pre_attn_scalar=16.0)  # Gemma 3
  params = _random_params(cfg, seed=7)
  hf.save_pretrained(str(tmp_path), params, cfg, dtype="bfloat16")
  assert hf.read_state_dict(str(tmp_path))["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
  back_cfg, back = hf.load_pretrained(str(tmp_path))
  assert back_cfg == cfg.replace(max_position_embeddings=8192, head_dim=cfg.resolved_head_dim)
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)
  jax.tree.map(np.testing.assert_array_equal, back, rounded)
