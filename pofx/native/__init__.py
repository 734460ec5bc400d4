r"""Native CPU kernels, compiled on first use and registered with XLA's FFI.

`block_sparse_attention` is `pofx.sparse_attention.block_sparse_attention` computed by fused
AVX-512 kernels (`block_sparse_attention.cc`): same inputs, same result (tested to 1e-6 against
the XLA op and dense softmax), about 3x faster on the benchmark's variable workload, because a
tile's scores stay in cache instead of passing through memory between XLA's separate ops.
Select it per batch with `attention_blocks(..., kernel="native")`. With `rope=(cos, sin)` the
kernels also apply the rotary embedding to q and k, and the query scale, as they load them (the
model passes the projections as they are: no rotated copies in memory).

The shared library is built with the system C++ compiler (`$CXX`, else `g++` / `c++`, with
OpenMP) the first time it is needed, into `~/.cache/pofx/native/` (else a per-user folder in the
temporary directory) under a name that hashes the sources, the compiler, the flags and the CPU's
feature flags (`-march=native`), and reused afterwards. `available()` says whether this
machine can use it (x86-64 with AVX-512F, a compiler); `load()` raises `NativeUnavailable` with
the reason otherwise. Supported shapes: 64-token blocks, head dimension 16, 32, 64 or 128,
float32 (inputs of other floating dtypes are computed in float32).

`dense(x, w)` is `x @ w` whose weight gradient `x^T g` is computed by OpenBLAS's sgemm
(`blas_matmul.cc`) instead of XLA:CPU's dot: the OpenBLAS numpy's PyPI wheels bundle (found
among the libraries numpy loaded), called single-threaded on each of XLA's own threads. Select it
for the Llama model with `LlamaConfig(matmul="blas")`. `blas_available()` /
`blas_unavailable_reason()` say whether this process can use it (Linux, numpy from a PyPI wheel
whose bundled OpenBLAS exports `openblas_set_num_threads_local`, as the one tested here, 0.3.31,
does); it is built like the attention kernels, without CPU-specific flags.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "block_sparse_attention.cc")
HEADERS = (os.path.join(HERE, "vector_exp.h"),)
BLOCK_SIZE, HEAD_DIMS = 64, (16, 32, 64, 128)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BLAS_SOURCE = os.path.join(HERE, "blas_matmul.cc")
BLAS_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++17")
# (cblas_sgemm's name, whether its integers are 64-bit) in the scipy-openblas builds numpy and
# scipy bundle: numpy's is ILP64 (suffix 64_), scipy's LP64.
_SGEMM_SYMBOLS = (("scipy_cblas_sgemm64_", True), ("scipy_cblas_sgemm", False))
_SET_LOCAL_SYMBOLS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_",
                      "scipy_openblas_set_num_threads_local")
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


def _build(name, sources, flags, cache_dir=None) -> str:
  """Compiles `sources` into `<cache>/lib<name>_<key>.so` unless already there; returns the path."""
  cxx = _compiler()
  if cxx is None:
    raise NativeUnavailable("the native kernels are compiled on first use and no C++ compiler was found "
                            "($CXX, g++, c++)")
  digest = hashlib.sha256()
  for source in sources:
    with open(source, "rb") as f:
      digest.update(f.read())
  # -march=native: the CPU's features are part of the key (a shared home on another CPU rebuilds).
  digest.update(repr((cxx, flags, jax.ffi.include_dir(), _cpu_flags())).encode())
  key = digest.hexdigest()[:16]
  cache_dir = cache_dir or _writable_cache_dir()
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"lib{name}_{key}.so")
  if not os.path.exists(path):
    tmp = f"{path}.{os.getpid()}.tmp"
    cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), *[x for x in sources if x.endswith(".cc")], "-o", tmp]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
      raise NativeUnavailable(f"building the native kernels failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    os.replace(tmp, path)  # atomic: concurrent builders leave one complete library
  return path


def load(cache_dir=None) -> str:
  """Builds (once) and registers the attention kernels; returns the shared library's path."""
  with _lock:
    if "path" in _loaded:
      return _loaded["path"]
    reason = unavailable_reason()
    if reason:
      raise NativeUnavailable(reason)
    path = _build("pofx_native", (SOURCE,) + HEADERS, FLAGS, cache_dir)
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target("pofx_block_sparse_attention_fwd", jax.ffi.pycapsule(lib.PofxBsaFwd), platform="cpu")
    jax.ffi.register_ffi_target("pofx_block_sparse_attention_bwd", jax.ffi.pycapsule(lib.PofxBsaBwd), platform="cpu")
    _loaded["path"], _loaded["lib"] = path, lib
    return path


def _numpy_openblas():
  """`(path, sgemm address, ILP64?, set_num_threads_local address)` of the OpenBLAS numpy loaded,
  or a string saying why there is none."""
  import numpy  # pylint: disable=g-import-not-at-top,unused-import  (loads its BLAS)
  try:
    with open("/proc/self/maps") as f:
      paths = sorted({line.split()[-1] for line in f
                      if "openblas" in line.rsplit("/", 1)[-1].lower() and ".so" in line})
  except OSError:
    return "it finds numpy's OpenBLAS through /proc/self/maps, which this system does not have"
  for path in paths:
    lib = ctypes.CDLL(path)
    sgemm = next(((n, ilp64) for n, ilp64 in _SGEMM_SYMBOLS if hasattr(lib, n)), None)
    set_local = next((n for n in _SET_LOCAL_SYMBOLS if hasattr(lib, n)), None)
    if sgemm and set_local:
      address = lambda n: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value
      return path, address(sgemm[0]), sgemm[1], address(set_local)
  if not paths:
    return ("it calls the OpenBLAS that numpy's PyPI wheels bundle (scipy-openblas), and this numpy "
            f"({numpy.__version__}) loaded none")
  return (f"numpy's OpenBLAS ({', '.join(paths)}) lacks scipy_cblas_sgemm[64_] or "
          "openblas_set_num_threads_local (recent scipy-openblas releases export both)")


def blas_unavailable_reason():
  """None when `dense`/`matmul` can run here, else why not."""
  if "blas" in _loaded:
    return None
  if _compiler() is None:
    return "the native kernels are compiled on first use and no C++ compiler was found ($CXX, g++, c++)"
  found = _numpy_openblas()
  return found if isinstance(found, str) else None


def blas_available() -> bool:
  return blas_unavailable_reason() is None


def load_blas(cache_dir=None) -> str:
  """Builds (once) the BLAS matmul, points it at numpy's OpenBLAS and registers it; returns the
  path of the BLAS it calls."""
  with _lock:
    if "blas" in _loaded:
      return _loaded["blas"]
    found = _numpy_openblas()
    if isinstance(found, str):
      raise NativeUnavailable(f"pofx.native.dense cannot run here: {found}")
    blas_path, sgemm, ilp64, set_local = found
    lib = ctypes.cdll.LoadLibrary(_build("pofx_blas", (BLAS_SOURCE,), BLAS_FLAGS, cache_dir))
    lib.PofxSetBlas(ctypes.c_void_p(sgemm), ctypes.c_int(int(ilp64)), ctypes.c_void_p(set_local))
    jax.ffi.register_ffi_target("pofx_blas_matmul", jax.ffi.pycapsule(lib.PofxBlasMatmul), platform="cpu")
    _loaded["blas"], _loaded["blas_lib"] = blas_path, lib
    return blas_path


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
  """`op(a) @ op(b)` of 2-D float32 arrays by numpy's OpenBLAS (op: transpose when asked).

  Not differentiable by itself (see `dense`)."""
  load_blas()
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"pofx.native.matmul takes 2-D operands, got shapes {a.shape} and {b.shape}.")
  m, k = (a.shape[1], a.shape[0]) if transpose_a else a.shape
  k2, n = (b.shape[1], b.shape[0]) if transpose_b else b.shape
  if k != k2:
    raise ValueError(f"pofx.native.matmul: contracting sizes differ: {a.shape}{'^T' * transpose_a} x "
                     f"{b.shape}{'^T' * transpose_b}.")
  return jax.ffi.ffi_call("pofx_blas_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32))(
      a.astype(jnp.float32), b.astype(jnp.float32), transpose_a=bool(transpose_a), transpose_b=bool(transpose_b))


@jax.custom_vjp
def _dense2d(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _dense2d_fwd(x, w):
  return _dense2d(x, w), (x, w)


def _dense2d_bwd(res, g):
  x, w = res
  dx = jax.lax.dot_general(g, w.astype(g.dtype), (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32).astype(x.dtype)
  dw = matmul(x, g, transpose_a=True)
  return dx, dw.astype(w.dtype)


_dense2d.defvjp(_dense2d_fwd, _dense2d_bwd)


def dense(x, w):
  """`x @ w` (`x [..., D]`, `w [D, F]`) with the weight gradient `x^T g` computed by OpenBLAS.

  The forward product and the input gradient `g w^T` stay XLA dots; only the weight gradient, a
  dot contracting both operands' leading (token) axis, goes to `matmul` (XLA:CPU's slowest form;
  see `benchmarks/README.md`). Same values as `jnp.dot` up to float32 summation order."""
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"pofx.native.dense: x {x.shape} and w {w.shape} do not multiply (x [..., D], w [D, F]).")
  lead = x.shape[:-1]
  return _dense2d(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[1])


def _fwd_call(q, k, v, seg, br, query, key, cos, sin, rope, q_scale):
  return jax.ffi.ffi_call("pofx_block_sparse_attention_fwd",
                          (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)))(
      q, k, v, seg, br, query, key, cos, sin, block_size=np.int64(BLOCK_SIZE), rope=np.int64(rope),
      q_scale=np.float32(q_scale))


@partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _attention(q, k, v, seg, br, query, key, cos, sin, rope, q_scale):
  return _fwd_call(q, k, v, seg, br, query, key, cos, sin, rope, q_scale)[0]


def _attention_fwd(q, k, v, seg, br, query, key, cos, sin, rope, q_scale):
  out, lse = _fwd_call(q, k, v, seg, br, query, key, cos, sin, rope, q_scale)
  return out, (q, k, v, seg, br, query, key, cos, sin, out, lse)


def _attention_bwd(rope, q_scale, res, d_out):
  q, k, v, seg, br, query, key, cos, sin, out, lse = res
  dq, dk, dv = jax.ffi.ffi_call(
      "pofx_block_sparse_attention_bwd",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
       jax.ShapeDtypeStruct(v.shape, jnp.float32)))(
          q, k, v, seg, br, query, key, cos, sin, out, lse, d_out.astype(jnp.float32), block_size=np.int64(BLOCK_SIZE),
          rope=np.int64(rope), q_scale=np.float32(q_scale))
  zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  # The rotary tables are functions of the positions only: no gradient flows to them.
  return dq, dk, dv, zero(seg), zero(br), zero(query), zero(key), jnp.zeros_like(cos), jnp.zeros_like(sin)


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, segment_ids, branch_ids, blocks, *, rope=None, q_scale: float = 1.0):
  """`pofx.sparse_attention.block_sparse_attention` by the native kernels (same arguments).

  With `rope=(cos, sin)` (`[R, L, hd/2]`) the kernels apply the rotary embedding to q and k and
  the scale `q_scale` to q as they load them (q and k come as the projections give them); the
  gradients are those of q and k themselves."""
  load()
  R, L, K, G, hd = q.shape
  if blocks.block_size != BLOCK_SIZE or hd not in HEAD_DIMS:
    raise ValueError(f"native block-sparse attention supports block_size={BLOCK_SIZE} and a head dimension in "
                     f"{HEAD_DIMS}; got block_size={blocks.block_size}, head dimension {hd} (use kernel='xla').")
  N = R * L
  seg = jnp.asarray(segment_ids, jnp.int32).reshape(N)
  br = jnp.zeros((N,), jnp.int32) if branch_ids is None else jnp.asarray(branch_ids, jnp.int32).reshape(N)
  if rope is None:
    cos = sin = jnp.zeros((1, 1), jnp.float32)   # not read
  else:
    cos, sin = (jnp.asarray(t, jnp.float32).reshape(N, hd // 2) for t in rope)
  out = _attention(q.astype(jnp.float32).reshape(N, K, G, hd), k.astype(jnp.float32).reshape(N, K, hd),
                   v.astype(jnp.float32).reshape(N, K, hd), seg, br, jnp.asarray(blocks.query_block, jnp.int32),
                   jnp.asarray(blocks.key_block, jnp.int32), cos, sin, rope is not None, float(q_scale))
  return out.reshape(R, L, K, G, hd).astype(q.dtype)
