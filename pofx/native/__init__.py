r"""Native CPU kernels, compiled on first use and registered with XLA's FFI.

`block_sparse_attention` is `pofx.sparse_attention.block_sparse_attention` computed by fused
AVX-512 kernels (`block_sparse_attention.cc`): same inputs, same result (tested to 1e-6 against
the XLA op and dense softmax), about 3x faster on the benchmark's variable workload, because a
tile's scores stay in cache instead of passing through memory between XLA's separate ops.
Select it per batch with `attention_blocks(..., kernel="native")`.

The shared library is built with the system C++ compiler (`$CXX`, else `g++` / `c++`, with
OpenMP) the first time it is needed, into `~/.cache/pofx/native/` (else a per-user folder in the
temporary directory) under a name that hashes the sources, the compiler, the flags and the CPU's
feature flags (`-march=native`), and reused afterwards. `available()` says whether this
machine can use it (x86-64 with AVX-512F, a compiler); `load()` raises `NativeUnavailable` with
the reason otherwise. Supported shapes: 64-token blocks, head dimension 32, float32 (inputs of
other floating dtypes are computed in float32).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "block_sparse_attention.cc")
HEADERS = (os.path.join(HERE, "vector_exp.h"),)
BLOCK_SIZE, HEAD_DIM = 64, 32
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_lock = threading.Lock()
_loaded = {}


class NativeUnavailable(RuntimeError):
  """The native kernels cannot be built or run on this machine (the message says why)."""


def _compiler():
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_flags() -> str:
  """The first `flags` line of /proc/cpuinfo ("" when unreadable)."""
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return ""


def _cpu_has_avx512() -> bool:
  return platform.machine().lower() in ("x86_64", "amd64") and " avx512f" in _cpu_flags()


def unavailable_reason():
  """None when the kernels can be used here, else why not."""
  if not _cpu_has_avx512():
    return f"the native kernels need an x86-64 CPU with AVX-512F (this is {platform.machine()} without it)"
  if _compiler() is None:
    return "the native kernels are compiled on first use and no C++ compiler was found ($CXX, g++, c++)"
  return None


def available() -> bool:
  return unavailable_reason() is None


def _writable_cache_dir() -> str:
  """`~/.cache/pofx/native`, or a per-user folder in the temporary directory if that is not writable."""
  import tempfile  # pylint: disable=g-import-not-at-top
  for d in (os.path.join(os.path.expanduser("~"), ".cache", "pofx", "native"),
            os.path.join(tempfile.gettempdir(), f"pofx-native-{os.getuid()}")):
    try:
      os.makedirs(d, exist_ok=True)
      if os.access(d, os.W_OK):
        return d
    except OSError:
      continue
  raise NativeUnavailable("no writable folder for the compiled native kernels (~/.cache/pofx/native, the temp dir)")


def load(cache_dir=None) -> str:
  """Builds (once) and registers the kernels; returns the shared library's path."""
  with _lock:
    if "path" in _loaded:
      return _loaded["path"]
    reason = unavailable_reason()
    if reason:
      raise NativeUnavailable(reason)
    cxx = _compiler()
    digest = hashlib.sha256()
    for name in (SOURCE,) + HEADERS:
      with open(name, "rb") as f:
        digest.update(f.read())
    # -march=native: the CPU's features are part of the key (a shared home on another CPU rebuilds).
    digest.update(repr((cxx, FLAGS, jax.ffi.include_dir(), _cpu_flags())).encode())
    key = digest.hexdigest()[:16]
    cache_dir = cache_dir or _writable_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"libpofx_native_{key}.so")
    if not os.path.exists(path):
      tmp = f"{path}.{os.getpid()}.tmp"
      cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
      out = subprocess.run(cmd, capture_output=True, text=True)
      if out.returncode != 0:
        raise NativeUnavailable(f"building the native kernels failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
      os.replace(tmp, path)  # atomic: concurrent builders leave one complete library
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target("pofx_block_sparse_attention_fwd", jax.ffi.pycapsule(lib.PofxBsaFwd), platform="cpu")
    jax.ffi.register_ffi_target("pofx_block_sparse_attention_bwd", jax.ffi.pycapsule(lib.PofxBsaBwd), platform="cpu")
    _loaded["path"], _loaded["lib"] = path, lib
    return path


def _fwd_call(q, k, v, seg, br, query, key):
  return jax.ffi.ffi_call("pofx_block_sparse_attention_fwd",
                          (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)))(
      q, k, v, seg, br, query, key, block_size=np.int64(BLOCK_SIZE))


@jax.custom_vjp
def _attention(q, k, v, seg, br, query, key):
  return _fwd_call(q, k, v, seg, br, query, key)[0]


def _attention_fwd(q, k, v, seg, br, query, key):
  out, lse = _fwd_call(q, k, v, seg, br, query, key)
  return out, (q, k, v, seg, br, query, key, out, lse)


def _attention_bwd(res, d_out):
  q, k, v, seg, br, query, key, out, lse = res
  dq, dk, dv = jax.ffi.ffi_call(
      "pofx_block_sparse_attention_bwd",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
       jax.ShapeDtypeStruct(v.shape, jnp.float32)))(
          q, k, v, seg, br, query, key, out, lse, d_out.astype(jnp.float32), block_size=np.int64(BLOCK_SIZE))
  zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return dq, dk, dv, zero(seg), zero(br), zero(query), zero(key)


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, segment_ids, branch_ids, blocks):
  """`pofx.sparse_attention.block_sparse_attention` by the native kernels (same arguments)."""
  load()
  R, L, K, G, hd = q.shape
  if blocks.block_size != BLOCK_SIZE or hd != HEAD_DIM:
    raise ValueError(f"native block-sparse attention supports block_size={BLOCK_SIZE} and head dimension "
                     f"{HEAD_DIM}; got block_size={blocks.block_size}, head dimension {hd} (use kernel='xla').")
  N = R * L
  seg = jnp.asarray(segment_ids, jnp.int32).reshape(N)
  br = jnp.zeros((N,), jnp.int32) if branch_ids is None else jnp.asarray(branch_ids, jnp.int32).reshape(N)
  out = _attention(q.astype(jnp.float32).reshape(N, K, G, hd), k.astype(jnp.float32).reshape(N, K, hd),
                   v.astype(jnp.float32).reshape(N, K, hd), seg, br, jnp.asarray(blocks.query_block, jnp.int32),
                   jnp.asarray(blocks.key_block, jnp.int32))
  return out.reshape(R, L, K, G, hd).astype(q.dtype)
