"""Sampling with a KV cache: cached logits == full forward, greedy, top-k, determinism, EOS masking.

Expected values come from the full-sequence `llama.logits_fn` (no cache) with a plain
`jax.nn.log_softmax`, written out here, never from the sampler itself.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pofx import sampling
from pofx.models import llama

EOS = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ------------------------------------------------------------------------------------------------
# Token choice against numpy: the inverse CDF, the nucleus, and whole sampling distributions.


def test_invert_cdf_matches_numpy_searchsorted():
  rng = np.random.default_rng(0)
  invert = jax.jit(sampling._invert_cdf)
  for n in (97, 4096):  # off and on the two-level block size
    w = rng.exponential(size=(64, n)).astype(np.float32) * (rng.random((64, n)) < 0.7)
    w[:, 0] += 1e-3  # every row has mass
    u = rng.random(64).astype(np.float32)
    got = np.asarray(invert(jnp.asarray(w), jnp.asarray(u)))
    c = np.cumsum(w.astype(np.float64), axis=1)
    want = np.array([np.searchsorted(c[i], u[i] * c[i, -1], side="right") for i in range(64)])
    # float32 partial sums may move a draw that lands within rounding of a boundary by one token
    close = np.abs(c[np.arange(64), np.minimum(want, n - 1)] - u * c[:, -1]) < 1e-4 * c[:, -1]
    assert np.all((got == want) | close) and np.mean(got == want) > 0.95
    assert np.all(w[np.arange(64), got] > 0)  # a zero weight is never drawn
  # u at the very top of [0, 1): the last positive weight, never the zero tail.
  w = np.array([[1.0, 2.0, 0.0, 0.0]], np.float32)
  assert int(invert(jnp.asarray(w), jnp.asarray([np.float32(1 - 2**-24)]))[0]) == 1


def _np_nucleus(z, top_p):
  """Holtzman et al.'s nucleus of logits `z` (numpy, by sorting): the smallest prefix of the
  tokens in decreasing probability whose mass reaches top_p."""
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  return set(order[before < top_p].tolist())


def test_nucleus_threshold_matches_numpy_sort():
  rng = np.random.default_rng(1)
  z = (rng.normal(size=(40, 200)) * rng.uniform(0.1, 4.0, size=(40, 1))).astype(np.float32)
  z[:5] -= 50.0  # all negative logits: the float keys' order holds below 0 too
  nucleus = jax.jit(lambda s, p: sampling._nucleus_threshold(s, jnp.exp(s), p))
  for top_p in (0.05, 0.5, 0.9, 0.999):
    thr, keys = nucleus(jnp.asarray(z - z.max(axis=1, keepdims=True)), jnp.float32(top_p))
    kept = np.asarray(keys >= thr[:, None])
    for i in range(z.shape[0]):
      assert set(np.nonzero(kept[i])[0].tolist()) == _np_nucleus(z[i].astype(np.float64), top_p)


def _np_sampling_dist(z, temperature, top_k, top_p):
  """The distribution HF's warpers sample from (temperature, then top-k, then top-p), numpy."""
  s = z.astype(np.float64) / temperature
  keep = np.ones_like(s, bool)
  if top_k:
    keep[np.argsort(-s, kind="stable")[top_k:]] = False
  s = np.where(keep, s, -np.inf)
  if top_p < 1:
    nucleus = _np_nucleus(np.where(keep, s, -1e30), top_p)
    keep &= np.isin(np.arange(s.size), list(nucleus))
  q = np.where(keep, np.exp(s - s[keep].max()), 0.0)
  return q / q.sum()


@pytest.mark.parametrize(
  "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 5, 1.0), (1.4, 0, 0.8), (1.0, 6, 0.7)], ids=str
)
def test_sampling_distribution_matches_numpy(model, temperature, top_k, top_p):
  """2048 first tokens of one prompt: `sample_logps` is log q of the drawn token for the numpy
  distribution q, no token outside q's support is drawn, and the frequencies fit q (chi-square)."""
  cfg, params = model
  params = {**params, "lm_head": params["lm_head"] * 12.0}  # top probability ~0.25: the cuts matter
  prompt = [1, 5, 6, 7, 2]
  n = 2048
  tok, mask = sampling.left_pad([prompt] * n, length=8)
  out = sampling.sample(
    params,
    tok,
    mask,
    jax.random.key(11),
    model=llama.make(cfg),
    max_new_tokens=1,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )
  z = _full_logits(params, cfg, prompt, [])[-1]
  q = _np_sampling_dist(z, temperature, top_k, top_p)
  assert 2 <= np.sum(q > 0) < cfg.vocab_size or (top_k == 0 and top_p == 1.0)
  drawn = np.asarray(out.tokens[:, 0])
  assert np.all(q[drawn] > 0)
  np.testing.assert_allclose(np.asarray(out.sample_logps[:, 0]), np.log(q[drawn]), atol=2e-5)
  lp = z - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
  np.testing.assert_allclose(np.asarray(out.logps[:, 0]), lp[drawn], atol=2e-5)
  counts = np.bincount(drawn, minlength=cfg.vocab_size)
  support = q > 0
  expected = n * q[support]
  chi2 = np.sum((counts[support] - expected) ** 2 / expected)
  dof = int(support.sum()) - 1
  assert chi2 < dof + 6 * np.sqrt(2 * dof) + 10, (chi2, dof, counts[support], expected.round(1))


# ------------------------------------------------------------------------------------------------
# Stop tokens and per-row lengths.


def test_stop_ids_and_max_lengths_cut_the_unconstrained_samples():
  """Same key, same uniforms: a run with stop tokens and per-row lengths is, row by row, the
  prefix of the unconstrained run that ends at the first stop token or at the row's length (the
  unconstrained run decoding over a cache grown in 3 segments, the other in one loop)."""
  cfg = llama.tiny(vocab_size=8)  # stops are likely
  params = llama.init_params(cfg, jax.random.key(8))
  params = {**params, "lm_head": params["lm_head"] * 30.0}
  m = llama.make(cfg)
  prompts = [[1, 4, 2], [1, 5, 5, 2], [6], [1, 2, 7, 7, 2]] * 8
  tok, mask = sampling.left_pad(prompts, length=6)
  T, stops = 7, (3, 5)
  max_len = np.random.default_rng(0).integers(0, T + 1, len(prompts)).astype(np.int32)
  # The free run also decodes in 3 loops over a growing cache: segments must not change samples.
  free = sampling.sample(params, tok, mask, jax.random.key(9), model=m, max_new_tokens=T, pad_id=0, cache_segments=3)
  cut = sampling.sample(
    params, tok, mask, jax.random.key(9), model=m, max_new_tokens=T, pad_id=0, stop_ids=stops, max_lengths=max_len
  )
  ftok, ctok, cmask = np.asarray(free.tokens), np.asarray(cut.tokens), np.asarray(cut.mask)
  assert np.all(np.asarray(free.lengths) == T) and not np.any(np.asarray(free.finished))
  n_stopped = n_cut = 0
  for b in range(len(prompts)):
    hits = [t for t in range(T) if ftok[b, t] in stops]
    first_stop = hits[0] + 1 if hits else T + 1
    n = min(first_stop, int(max_len[b]))
    assert int(cut.lengths[b]) == n and np.all(cmask[b, :n] == 1) and np.all(cmask[b, n:] == 0)
    np.testing.assert_array_equal(ctok[b, :n], ftok[b, :n])
    assert np.all(ctok[b, n:] == 0)
    np.testing.assert_allclose(np.asarray(cut.logps[b, :n]), np.asarray(free.logps[b, :n]), atol=1e-6)
    assert np.all(np.asarray(cut.logps[b, n:]) == 0)
    assert bool(cut.finished[b]) == (first_stop <= max_len[b])
    n_stopped += bool(cut.finished[b])
    n_cut += (not cut.finished[b]) and 0 < n < T
  assert n_stopped >= 4 and n_cut >= 2  # both ways of ending occur


# ------------------------------------------------------------------------------------------------
# Greedy decoding equals the argmax of a full forward, fixed and variable prompt lengths.


@pytest.mark.parametrize(
  "prompts", [_prompts(), [[1, 5, 6, 7, 2], [1, 9, 2, 8, 8], [4, 4, 11, 12, 13]]], ids=["variable", "fixed"]
)
def test_greedy_equals_full_forward_argmax_without_stop(model, prompts):
  cfg, params = model
  tok, mask = sampling.left_pad(prompts, length=8)
  T = 9
  out = sampling.sample(params, tok, mask, jax.random.key(4), model=llama.make(cfg), max_new_tokens=T, temperature=0.0)
  for b, prompt in enumerate(prompts):
    comp = []
    for _ in range(T):
      comp.append(int(np.argmax(_full_logits(params, cfg, prompt, comp)[-1])))
    assert np.asarray(out.tokens[b]).tolist() == comp


# ------------------------------------------------------------------------------------------------
# LoRA: the adapters and the frozen base through the train step's combine.


def test_lora_policy_samples_like_its_merged_weights(model):
  from pofx import lora

  cfg, base = model
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
  adapters = lora.init(base, spec, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), adapters)  # b != 0
  merged = jax.tree.map(np.asarray, base)  # W0 + (alpha / r) a @ b by hand (arXiv:2106.09685, Eq. 3)
  for layer, groups in adapters.items():
    for grp, targets in groups.items():
      for target, ab in targets.items():
        w = merged[layer][grp][target]["kernel"]
        merged[layer][grp][target]["kernel"] = w + 2.0 * np.asarray(ab["a"]) @ np.asarray(ab["b"])
  tok, mask = sampling.left_pad(_prompts(), length=8)
  m = llama.make(cfg)
  kw = dict(model=m, max_new_tokens=6, eos_id=EOS)
  combine = functools.partial(lora.apply, spec=spec)
  got = sampling.sample(adapters, tok, mask, jax.random.key(3), frozen=base, combine=combine, **kw)
  want = sampling.sample(merged, tok, mask, jax.random.key(3), **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logps), np.asarray(want.logps), atol=1e-5)
  plain = sampling.sample(base, tok, mask, jax.random.key(3), **kw)
  assert not np.allclose(np.asarray(plain.logps), np.asarray(got.logps), atol=1e-3)  # the adapters matter


# ------------------------------------------------------------------------------------------------
# Sharded over 4 simulated devices: the same samples as on one device.

_SHARDED_CHILD = r"""
import json, sys
import jax, numpy as np
from pofx import sampling
from pofx.models import llama
cfg = llama.tiny(vocab_size=16)
params = llama.init_params(cfg, jax.random.key(0))
prompts = [[1, 5, 6, 7, 2], [1, 9, 2], [1, 4, 4, 11, 12, 13, 2], [1, 2]] * 2
tok, mask = sampling.left_pad(prompts, length=8)
from pofx import parallel
kw = dict(top_k=5, stop_ids=(3,), max_lengths=[6, 2, 6, 0, 5, 6, 1, 6])
one = sampling.sample(params, tok, mask, jax.random.key(5), model=llama.make(cfg), max_new_tokens=6, **kw)
out = {}
for name, mesh in {"explicit": jax.make_mesh((4,), ("data",)), "auto": parallel.make_mesh(data=2, fsdp=2)}.items():
  four = sampling.sample(params, tok, mask, jax.random.key(5), model=llama.make(cfg), max_new_tokens=6, mesh=mesh, **kw)
  out[name] = {
    "devices": sorted(d.id for d in four.tokens.sharding.device_set),
    "tokens_equal": bool(np.array_equal(np.asarray(one.tokens), np.asarray(four.tokens))),
    "mask_equal": bool(np.array_equal(np.asarray(one.mask), np.asarray(four.mask))),
    "logps_diff": float(np.max(np.abs(np.asarray(one.logps) - np.asarray(four.logps)))),
    "finished_equal": bool(np.array_equal(np.asarray(one.finished), np.asarray(four.finished))),
  }
print(json.dumps(out))
"""


def test_sharded_sampler_equals_single_device():
  # 4 CPU devices; the suite's other XLA flags (tests/conftest.py) stay.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
  env = {
    **os.environ,
    "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=4"]),
    "JAX_PLATFORMS": "cpu",
  }
  proc = subprocess.run(
    [sys.executable, "-c", _SHARDED_CHILD], cwd=REPO, env=env, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, r in out.items():
    assert r["devices"] == [0, 1, 2, 3], (name, r)
    assert r["tokens_equal"] and r["mask_equal"] and r["finished_equal"], (name, r)
    assert r["logps_diff"] < 1e-5, (name, r)


def test_bad_sampling_arguments(model):
  cfg, params = model
  tok, mask = sampling.left_pad(_prompts(), length=8)
  kw = dict(model=llama.make(cfg), max_new_tokens=4)
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="top_p"):
      sampling.sample(params, tok, mask, jax.random.key(0), top_p=bad, **kw)
  with pytest.raises(ValueError, match="stop token"):
    sampling.sample(params, tok, mask, jax.random.key(0), stop_ids=(16,), **kw)
  with pytest.raises(ValueError, match="max_lengths"):
    sampling.sample(params, tok, mask, jax.random.key(0), max_lengths=[1, 2], **kw)
  with pytest.raises(ValueError, match="max_lengths"):
    sampling.sample(params, tok, mask, jax.random.key(0), max_lengths=[1, 2, 5, 0], **kw)
  with pytest.raises(ValueError, match="split evenly"):
    sampling.sample(params, tok, mask, jax.random.key(0), mesh=_FakeMesh(), **kw)


class _FakeMesh:
  """Only what `sample`'s argument check reads of a mesh: 3 data-parallel devices."""

  axis_names = ("data",)
  shape = {"data": 3}
