"""Sampling with a KV cache: cached logits == full forward, greedy, top-k, determinism, EOS masking.

Expected values come from the full-sequence `llama.logits_fn` (no cache) with a plain
`jax.nn.log_softmax`, written out here, never from the sampler itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import sampling
from pofx.models import llama

EOS = 3


@pytest.fixture(scope="module")
def model():
  cfg = llama.tiny(vocab_size=16)
  return cfg, llama.init_params(cfg, jax.random.key(0))


def _prompts():
  return [[1, 5, 6, 7, 2], [1, 9, 2], [1, 4, 4, 11, 12, 13, 2], [1, 2]]


_WIDTH = 24


def _full_logits_batch(params, cfg, seqs):
  """Logits `[len, V]` of each unpadded sequence, without cache: one `logits_fn` call on rows
  right-padded to a fixed width (causal attention: padding after a token cannot change it)."""
  tok = np.zeros((len(seqs), _WIDTH), np.int32)
  for i, s in enumerate(seqs):
    tok[i, : len(s)] = s
  pos = np.broadcast_to(np.arange(_WIDTH, dtype=np.int32), tok.shape)
  out = np.asarray(_jit_logits(params, tok, pos, np.ones_like(tok), config=cfg))
  return [out[i, : len(s)] for i, s in enumerate(seqs)]


_jit_logits = jax.jit(llama.logits_fn, static_argnames=("config",))
_jit_decode = jax.jit(llama.decode, static_argnames=("config",))


def _full_logits(params, cfg, prompt, completion):
  return _full_logits_batch(params, cfg, [list(prompt) + list(completion)])[0]


def _completion_logits(params, cfg, prompt, completion):
  """[len(completion), V] next-token logits that predicted each completion token."""
  full = _full_logits(params, cfg, prompt, completion)
  return full[len(prompt) - 1 : len(prompt) - 1 + len(completion)]


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"num_kv_heads": 4}])
def test_cached_decode_matches_full_forward(overrides):
  cfg = llama.tiny(vocab_size=16, **overrides)
  params = llama.init_params(cfg, jax.random.key(1))
  B, L, P = 3, 11, 6
  tok = jax.random.randint(jax.random.key(2), (B, L), 0, cfg.vocab_size)
  npad = jnp.array([0, 2, 5])
  valid = jnp.arange(L)[None] >= npad[:, None]
  pos = jnp.maximum(jnp.arange(L)[None] - npad[:, None], 0)
  full = _jit_logits(params, tok, pos, valid.astype(jnp.int32), config=cfg)
  cache = llama.init_cache(cfg, B, L + 2)
  logits, cache = _jit_decode(params, tok[:, :P], pos[:, :P], valid[:, :P], cache, config=cfg)
  outs = [logits]
  for t in range(P, L):
    logits, cache = _jit_decode(params, tok[:, t : t + 1], pos[:, t : t + 1], valid[:, t : t + 1], cache, config=cfg)
    outs.append(logits)
  got = jnp.concatenate(outs, axis=1)
  assert int(cache.index) == L
  m = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got)[m], np.asarray(full)[m], atol=1e-5, rtol=0)
  # Each row also equals the unpadded sequence run alone (positions from 0).
  for b in range(B):
    alone = _full_logits(params, cfg, np.asarray(tok[b, int(npad[b]) :]), [])
    np.testing.assert_allclose(np.asarray(got[b, int(npad[b]) :]), np.asarray(alone), atol=1e-5, rtol=0)


def test_left_pad():
  tok, mask = sampling.left_pad([[1, 2, 3], [4]], pad_id=0, bucket=4)
  np.testing.assert_array_equal(tok, [[0, 1, 2, 3], [0, 0, 0, 4]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  tok, _ = sampling.left_pad([[1, 2, 3]], length=5, pad_id=9)
  np.testing.assert_array_equal(tok, [[9, 9, 1, 2, 3]])
  with pytest.raises(ValueError, match="empty"):
    sampling.left_pad([[1], []])
  with pytest.raises(ValueError, match="length"):
    sampling.left_pad([[1, 2, 3]], length=2)


def _sample(model, key, **kw):
  cfg, params = model
  tok, mask = sampling.left_pad(_prompts(), length=8)
  kw = {"max_new_tokens": 6, "eos_id": EOS, **kw}
  return sampling.sample(params, tok, mask, key, model=llama.make(cfg), **kw)


def test_sample_logps_equal_full_forward_log_softmax(model):
  cfg, params = model
  out = _sample(model, jax.random.key(3))
  for b, prompt in enumerate(_prompts()):
    n = int(out.lengths[b])
    comp = np.asarray(out.tokens[b, :n])
    lp = jax.nn.log_softmax(_completion_logits(params, cfg, prompt, comp), axis=-1)
    expect = np.asarray(lp)[np.arange(n), comp]
    np.testing.assert_allclose(np.asarray(out.logps[b, :n]), expect, atol=1e-5, rtol=0)
    # temperature 1, no top-k: the sampling distribution is the model's.
    np.testing.assert_allclose(np.asarray(out.sample_logps[b, :n]), expect, atol=1e-5, rtol=0)
    assert np.all(np.asarray(out.logps[b, n:]) == 0.0)
  # Teacher-forced scoring of the samples gives the same log-probs.
  scored = sampling.score(params, out, model=llama.make(cfg))
  np.testing.assert_allclose(np.asarray(scored), np.asarray(out.logps), atol=1e-5)


def _greedy_reference(params, cfg, prompt, steps):
  comp = []
  for _ in range(steps):
    nxt = int(jnp.argmax(_full_logits(params, cfg, prompt, comp)[-1]))
    comp.append(nxt)
    if nxt == EOS:
      break
  return comp


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 1}])
def test_greedy(model, kw):
  cfg, params = model
  out = _sample(model, jax.random.key(4), **kw)
  for b, prompt in enumerate(_prompts()):
    expect = _greedy_reference(params, cfg, prompt, 6)
    n = int(out.lengths[b])
    assert np.asarray(out.tokens[b, :n]).tolist() == expect
  np.testing.assert_array_equal(np.asarray(out.sample_logps), 0.0)
  # Greedy does not depend on the key.
  again = _sample(model, jax.random.key(99), **kw)
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))


def test_seeded_determinism(model):
  a = _sample(model, jax.random.key(5))
  b = _sample(model, jax.random.key(5))
  c = _sample(model, jax.random.key(6))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_top_k_never_outside_top_k(model):
  cfg, params = model
  k = 3
  prompts = _prompts() * 16
  tok, mask = sampling.left_pad(prompts, length=8)
  # A high temperature makes tokens outside the top 3 likely if top-k were not applied.
  out = sampling.sample(
    params, tok, mask, jax.random.key(7), model=llama.make(cfg), max_new_tokens=6, eos_id=EOS, temperature=50.0, top_k=k
  )
  seen = 0
  comps = sampling.completions(out)
  full = _full_logits_batch(params, cfg, [list(p) + c.tolist() for p, c in zip(prompts, comps)])
  for b, prompt in enumerate(prompts):
    comp = comps[b]
    n = comp.size
    logits = full[b][len(prompt) - 1 : len(prompt) - 1 + n]
    for t in range(n):
      top = np.argsort(-logits[t])[:k]
      assert comp[t] in top
      # sample_logps: the top-k renormalised tempered distribution.
      z = logits[t][top] / 50.0
      lse = np.log(np.sum(np.exp(z - z.max()))) + z.max()
      np.testing.assert_allclose(float(out.sample_logps[b, t]), logits[t][comp[t]] / 50.0 - lse, atol=1e-5)
      seen += 1
  assert seen > 100
  # All k candidates do get sampled (the restriction is to k tokens, not fewer).
  first = np.asarray(out.tokens[:, 0]).reshape(16, len(_prompts()))
  assert all(len(set(first[:, j].tolist())) == k for j in range(len(_prompts())))


def test_eos_masking_and_lengths():
  cfg = llama.tiny(vocab_size=6)  # EOS (3) is likely: every row sees several ends
  params = llama.init_params(cfg, jax.random.key(8))
  prompts = [[1, 4, 2], [1, 5, 5, 2]] * 32
  tok, mask = sampling.left_pad(prompts, length=4)
  T = 7
  out = sampling.sample(
    params, tok, mask, jax.random.key(9), model=llama.make(cfg), max_new_tokens=T, eos_id=EOS, pad_id=0
  )
  toks, m = np.asarray(out.tokens), np.asarray(out.mask)
  assert toks.shape == (64, T) and m.shape == (64, T)
  n_finished = 0
  for b in range(64):
    n = int(out.lengths[b])
    assert n == int(m[b].sum()) and np.all(m[b, :n] == 1) and np.all(m[b, n:] == 0)
    assert np.all(toks[b, n:] == 0)
    eos_at = np.nonzero(toks[b, :n] == EOS)[0]
    if bool(out.finished[b]):
      n_finished += 1
      assert eos_at.tolist() == [n - 1]
    else:
      assert n == T and eos_at.size == 0
  assert 0 < n_finished < 64
  comps = sampling.completions(out)
  assert [c.size for c in comps] == np.asarray(out.lengths).tolist()
  assert [p.tolist() for p in sampling.prompts_of(out)] == prompts


def test_padding_width_does_not_change_samples(model):
  cfg, params = model
  outs = []
  for width in (8, 13):
    tok, mask = sampling.left_pad(_prompts(), length=width)
    outs.append(
      sampling.sample(params, tok, mask, jax.random.key(10), model=llama.make(cfg), max_new_tokens=6, eos_id=EOS)
    )
  np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
  np.testing.assert_allclose(np.asarray(outs[0].logps), np.asarray(outs[1].logps), atol=1e-5)


def test_temperature_is_traced_not_static(model):
  cfg, params = model
  tok, mask = sampling.left_pad(_prompts(), length=8)
  sampling.sample(
    params, tok, mask, jax.random.key(0), model=llama.make(cfg), max_new_tokens=6, eos_id=EOS, temperature=0.7
  )
  n = sampling._sample._cache_size()
  sampling.sample(
    params, tok, mask, jax.random.key(0), model=llama.make(cfg), max_new_tokens=6, eos_id=EOS, temperature=1.3
  )
  assert sampling._sample._cache_size() == n


def test_bad_arguments(model):
  cfg, params = model
  tok, mask = sampling.left_pad(_prompts(), length=8)
  with pytest.raises(ValueError, match="top_k"):
    sampling.sample(params, tok, mask, jax.random.key(0), model=llama.make(cfg), max_new_tokens=4, eos_id=EOS, top_k=-1)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampling.sample(params, tok, mask, jax.random.key(0), model=llama.make(cfg), max_new_tokens=0, eos_id=EOS)
  with pytest.raises(ValueError, match="temperature"):
    sampling.sample(
      params, tok, mask, jax.random.key(0), model=llama.make(cfg), max_new_tokens=4, eos_id=EOS, temperature=-1.0
    )
  with pytest.raises(ValueError, match="left-padded"):
    sampling.sample(
      params,
      tok[:, ::-1].copy(),
      mask[:, ::-1].copy(),
      jax.random.key(0),
      model=llama.make(cfg),
      max_new_tokens=4,
      eos_id=EOS,
    )
