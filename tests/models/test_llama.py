"""Llama decoder: parameter counts (closed form), parity with Hugging Face `LlamaForCausalLM`
(a reference implementation), segment/branch masking, remat, attention implementations, dtypes,
and the injection points: every product and every attention goes through the given kernels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import kernels as kernels_lib
from pofx.models import llama


def _query_blocks(n):
  """XLA kernels whose dense attention runs in causal query blocks of `n` tokens (0: one full product)."""
  return kernels_lib.Kernels(attention=functools.partial(kernels_lib.xla_attention, query_block=n))


def _pos(B, L):
  return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))


@pytest.fixture(scope="module")
def tiny_params():
  cfg = llama.tiny()
  return cfg, llama.init_params(cfg, jax.random.key(0))


def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_bench_param_count_closed_form():
  # HF LlamaForCausalLM(hidden 256, 4 layers, 8 heads, 4 KV heads, MLP 688, vocab 4096, untied):
  # embed + lm_head = 2 * 4096 * 256; per layer q,o = 256*256 each, k,v = 256*(4*32) each,
  # gate/up/down = 3 * 256 * 688, two norms 2 * 256; final norm 256.
  per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 688 + 2 * 256
  expected = 2 * 4096 * 256 + 4 * per_layer + 256
  assert expected == 4_999_424
  cfg = llama.bench()
  shapes = jax.eval_shape(lambda k: llama.init_params(cfg, k), jax.random.key(0))
  assert _count(shapes) == expected == cfg.num_params()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))


def test_1b_preset_param_count():
  # Llama-3.2-1B has 1,235,814,400 parameters (tied embeddings): 128256*2048
  # + 16 * (2*2048*2048 + 2*2048*512 + 3*2048*8192 + 2*2048) + 2048.
  expected = 128256 * 2048 + 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048) + 2048
  assert expected == 1_235_814_400
  cfg = llama.preset("1b")
  shapes = jax.eval_shape(lambda k: llama.init_params(cfg, k), jax.random.key(0))
  assert _count(shapes) == expected == cfg.num_params()
  assert "lm_head" not in shapes


def test_tiny_tied_has_no_head_param(tiny_params):
  cfg = llama.tiny(tie_embeddings=True)
  params = llama.init_params(cfg, jax.random.key(1))
  assert "lm_head" not in params and _count(params) == cfg.num_params()
  np.testing.assert_array_equal(llama.lm_head(params, cfg), params["embed"]["embedding"].T)


def test_bad_config_raises():
  with pytest.raises(ValueError, match="num_kv_heads"):
    llama.tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match="dtype"):
    llama.tiny(dtype="float64x")
  for removed in ("attention_impl", "attention_block", "matmul", "blas"):  # kernels are injected instead
    with pytest.raises(TypeError, match=removed):
      llama.tiny(**{removed: "xla"})
  with pytest.raises(ValueError, match="remat_policy"):
    llama.tiny(remat_policy="everything")
  with pytest.raises(ValueError, match="preset"):
    llama.preset("7b")
  with pytest.raises(ValueError, match="B, L"):
    cfg, params = llama.tiny(), None
    llama.apply_fn(
      params, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 3), jnp.int32), config=cfg
    )


@pytest.mark.parametrize("variant", ["untied", "tied_llama3_rope"])
def test_matches_hugging_face_llama(variant):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  if variant == "untied":
    cfg = llama.tiny()
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  else:
    # head_dim set explicitly (16 != 32 / 4), short original context so that all three Llama 3
    # frequency regimes (kept, interpolated, divided) occur.
    cfg = llama.tiny(
      tie_embeddings=True, head_dim=16, rope_theta=500.0, rope_scaling=(4.0, 1.0, 4.0, 64), rms_norm_eps=1e-5
    )
    rope = {
      "rope_type": "llama3",
      "rope_theta": 500.0,
      "factor": 4.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    }
  hf_cfg = transformers.LlamaConfig(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    intermediate_size=cfg.mlp_size,
    head_dim=cfg.resolved_head_dim,
    rms_norm_eps=cfg.rms_norm_eps,
    tie_word_embeddings=cfg.tie_embeddings,
    rope_parameters=rope,
    max_position_embeddings=512,
    attn_implementation="eager",
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  with torch.no_grad():  # norms are ones at init: make them matter
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.3 * torch.randn_like(p))
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params = llama.params_from_hf(state, cfg)
  assert _count(params) == cfg.num_params()
  rng = np.random.default_rng(0)
  B, L = 2, 40
  tokens = rng.integers(0, cfg.vocab_size, (B, L))
  # Positions that do not start at 0 for row 1 (explicit positions are honoured).
  positions = np.stack([np.arange(L), np.arange(L) + 100])
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens), position_ids=torch.tensor(positions)).logits.numpy()
  got = jax.jit(functools.partial(llama.logits_fn, config=cfg))(
    params, jnp.asarray(tokens), jnp.asarray(positions), jnp.ones((B, L), jnp.int32)
  )
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=1e-5)


def test_params_from_hf_rejects_unknown_and_missing(tiny_params):
  cfg, _ = tiny_params
  with pytest.raises(ValueError, match="missing"):
    llama.params_from_hf({}, cfg)


def test_attention_mask_by_hand():
  # One row: prompt (2 tokens, branch 0) | chosen (2, branch 1) | rejected (1, branch 2) | pad.
  seg = np.array([[1, 1, 1, 1, 1, 0]])
  br = np.array([[0, 0, 1, 1, 2, 0]])
  expected = np.array(
    [
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 1, 0, 0],
      [1, 1, 0, 0, 1, 0],  # rejected sees the prompt and itself, not the chosen tokens
      [0, 0, 0, 0, 0, 1],  # padding sees only padding
    ],
    bool,
  )
  np.testing.assert_array_equal(np.asarray(kernels_lib.attention_mask(seg, br))[0], expected)
  no_branch = np.tril(np.ones((6, 6), bool))
  no_branch[5, :5] = False
  np.testing.assert_array_equal(np.asarray(kernels_lib.attention_mask(seg))[0], no_branch)
  assert llama.attention_mask is kernels_lib.attention_mask  # the model's name for the same rule


def test_segments_are_isolated(tiny_params):
  cfg, params = tiny_params
  apply = jax.jit(llama.make(cfg).apply)
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, cfg.vocab_size, 5), rng.integers(0, cfg.vocab_size, 4)
  # Packed row [a | b | pad pad] with positions restarting per segment.
  row = np.concatenate([a, b, [0, 0]])[None]
  pos = np.concatenate([np.arange(5), np.arange(4), [0, 0]])[None]
  seg = np.array([[1] * 5 + [2] * 4 + [0, 0]])
  h = apply(params, row, pos, seg)
  ha = apply(params, a[None], _pos(1, 5), np.ones((1, 5), np.int32))
  hb = apply(params, b[None], _pos(1, 4), np.ones((1, 4), np.int32))
  np.testing.assert_allclose(h[0, :5], ha[0], atol=1e-5)
  np.testing.assert_allclose(h[0, 5:9], hb[0], atol=1e-5)
  assert np.all(np.isfinite(np.asarray(h)))


def _loss(cfg, kernels=kernels_lib.XLA):
  def f(params, tokens, pos, seg):
    return jnp.sum(jnp.sin(llama.logits_fn(params, tokens, pos, seg, config=cfg, kernels=kernels)))

  return jax.jit(jax.value_and_grad(f))


def test_remat_and_xla_attention_match(tiny_params):
  cfg, params = tiny_params
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, cfg.vocab_size, (2, 9))
  seg = np.array([[1] * 9, [1] * 6 + [0] * 3])
  args = (params, tokens, _pos(2, 9), seg)
  v0, g0 = _loss(cfg, _query_blocks(0))(*args)  # the reference: the full L x L product
  for other, kernels in (
    (cfg.replace(remat=True), kernels_lib.XLA),
    (cfg.replace(remat=True, remat_policy="dots_saveable"), _query_blocks(4)),
    (cfg, _query_blocks(4)),  # causal query blocks: 3 blocks of <= 4 tokens
    (cfg, kernels_lib.XLA),
  ):
    v1, g1 = _loss(other, kernels)(*args)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5), g1, g0)


def test_bf16_compute_keeps_f32_params(tiny_params):
  cfg, params = tiny_params
  bf = cfg.replace(dtype="bfloat16")
  params_bf = jax.eval_shape(lambda k: llama.init_params(bf, k), jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_bf))
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 7))
  args = (tokens, _pos(2, 7), np.ones((2, 7), np.int32))
  h = jax.jit(llama.make(bf).apply)(params, *args)
  assert h.dtype == jnp.bfloat16
  h32 = jax.jit(llama.make(cfg).apply)(params, *args)
  assert h32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(h, np.float32), h32, atol=0.1, rtol=0.05)


def test_logits_fn_is_hidden_times_head(tiny_params):
  cfg, params = tiny_params
  model = llama.make(cfg)
  tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 6))
  args = (params, tokens, _pos(1, 6), np.ones((1, 6), np.int32))
  h = np.asarray(jax.jit(model.apply)(*args), np.float64)
  w = np.asarray(model.head(params), np.float64)
  np.testing.assert_allclose(jax.jit(model.logits)(*args), h @ w, atol=1e-5)


def test_causal_query_blocks_equal_full_attention_with_branches(tiny_params):
  cfg, params = tiny_params
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, cfg.vocab_size, (2, 11))
  seg = np.array([[1] * 11, [1] * 4 + [2] * 5 + [0] * 2])
  branch = np.array([[0] * 3 + [1] * 4 + [2] * 4, [0] * 2 + [1] + [2] + [0] * 2 + [1] * 3 + [0] * 2])
  pos = _pos(2, 11)
  full = jax.jit(functools.partial(llama.apply_fn, config=cfg, kernels=_query_blocks(0)))(
    params, tokens, pos, seg, branch
  )
  blocked = jax.jit(functools.partial(llama.apply_fn, config=cfg, kernels=_query_blocks(3)))(
    params, tokens, pos, seg, branch
  )
  np.testing.assert_allclose(blocked, full, atol=1e-6, rtol=1e-6)


def test_every_product_and_attention_goes_through_the_kernels(tiny_params):
  # Counting kernels (XLA's products and attention underneath): per block q, k, v, o, [gate | up]
  # and down are 6 products, plus 1 for the LM head; one attention per block, with the mask
  # description of its use (training: segments and rotary tables; decoding: the cache, q and k
  # already rotated).
  cfg, params = tiny_params
  calls = {"dot": 0, "attention": []}

  def dot_general(*a, **kw):
    calls["dot"] += 1
    return jax.lax.dot_general(*a, **kw)

  def attention(q, k, v, mask, *, scale, rope=None):
    calls["attention"].append((type(mask).__name__, rope is not None))
    return kernels_lib.xla_attention(q, k, v, mask, scale=scale, rope=rope)

  model = llama.make(cfg, kernels_lib.Kernels(dot_general=dot_general, attention=attention, name="counting"))
  assert model == llama.make(cfg, model.kernels) and hash(model) == hash(llama.make(cfg, model.kernels))
  tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 5))
  args = (params, tokens, _pos(2, 5), np.ones((2, 5), np.int32))
  n = cfg.num_layers
  h = model.apply(*args)
  assert calls == {"dot": 6 * n, "attention": [("SegmentMask", True)] * n}
  np.testing.assert_allclose(h, llama.apply_fn(*args, config=cfg), atol=1e-6)
  calls.update(dot=0, attention=[])
  model.logits(*args)
  assert calls == {"dot": 6 * n + 1, "attention": [("SegmentMask", True)] * n}
  calls.update(dot=0, attention=[])
  logits, cache = model.decode(params, tokens, _pos(2, 5), np.ones((2, 5), bool), model.init_cache(2, 6))
  assert calls == {"dot": 6 * n + 1, "attention": [("CacheMask", False)] * n}
  np.testing.assert_allclose(logits, model.logits(*args), atol=1e-5)
  assert int(cache.index) == 5
