r"""Native CPU kernels, compiled on first use and registered with XLA's FFI.

`block_sparse_attention` is `pofx.sparse_attention.block_sparse_attention` computed by fused
AVX-512 kernels (`block_sparse_attention.cc`): same inputs, same result (tested to 1e-6 against
the XLA op and dense softmax), faster where a tile's scores stay in cache instead of passing
through memory between XLA's separate ops. The CPU backend's attention
(`pofx_backends.cpu.kernels`) calls it for the block lists it supports. With `rope=(cos, sin)`
the kernels also apply the rotary embedding to q and k, and the query scale, as they load them
(the model passes the projections as they are: no rotated copies in memory).

The shared library is built with the system C++ compiler (`$CXX`, else `g++` / `c++`, with
OpenMP) the first time it is needed, into `~/.cache/pofx/native/` (else a per-user folder in the
temporary directory) under a name that hashes the sources, the compiler, the flags and the CPU's
feature flags (`-march=native`), and reused afterwards. `available()` says whether this
machine can use it (x86-64 with AVX-512F, a compiler); `load()` raises `NativeUnavailable` with
the reason otherwise. Supported shapes: 64-token blocks, head dimension 16, 32, 64 or 128,
float32 (inputs of other floating dtypes are computed in float32).

`conv3x3(x, w, stride=)` is the 3x3 convolution with one pixel of zero padding, at stride 1 ("SAME")
or 2, of NHWC float32 images with an HWIO kernel by direct-convolution AVX-512 kernels
(`conv3x3.h`, `conv3x3.cc`), differentiable: a tile of output pixels times output channels is held
in vector registers while the input values under it are broadcast against the kernel's rows, so
no patches are gathered and nothing is transposed. The forward and the input gradient share one
kernel (the input gradient's flipped kernel built inside its call); the kernel gradient has its
own. At stride 1 on even image sizes with at least 16 input channels, the forward and the input
gradient compute by Winograd's F(2x2, 3x3) by default, and so does the kernel gradient of the
larger layers (2.25 times fewer multiply-adds; `winograd=False` keeps the direct sums). Outputs of
fewer than 16 channels (a U-Net's last convolution) have narrow kernels that sum contiguous rows
of input channels instead. The images are split over XLA's intra-op threads. Channel rule:
`conv3x3_supports`.

`group_norm(x, scale, bias, groups=, eps=, silu=)` is `pofx.group_norm.group_norm` (GroupNorm
with float32 statistics, optionally followed by SiLU) by AVX-512 kernels (`group_norm.cc`): per
image, the two statistics passes and one pass that normalises and applies SiLU; the backward one
pass of per-channel sums (recomputing SiLU's input from x) and one pass that writes the input
gradient. Channels must be multiples of 16 (`group_norm_supports`).

`adamw_apply(hyper, params, grads, mu, nu)` applies AdamW's step to every leaf in one pass
(`adamw.cc`): the parameter, gradient and both moments read once, the parameter and moments written
in place (the results alias the inputs), the leaves' elements split over XLA's intra-op threads;
`pofx_backends.cpu.optimizers.adamw` is the optimizer around it.

`product(a, b, ...)` is `op(a) @ op(b)` of 2-D arrays (op: an optional transpose), differentiable,
whose products (the forward one and the two of its gradient) go to a BLAS's sgemm
(`blas_matmul.cc`, called single-threaded on each of XLA's own threads) when they contract the
left operand's leading axis, `x^T g` (XLA:CPU's slowest form: a weight gradient), or, with
`all_products=True`, always; the others stay XLA dots. `dense(x, w)` is `x @ w` for `x [..., D]`
through it. Two BLAS libraries (`BLAS_LIBRARIES`; argument `library`): Intel MKL ("mkl":
`libmkl_rt` from the `mkl` PyPI package, `pip install pofx[mkl]`, found in this Python's `lib/`
folder or on the system's library path, and switched to its sequential threading layer), and the
OpenBLAS numpy's PyPI wheels bundle ("openblas": found among the libraries numpy loaded; it must
export `openblas_set_num_threads_local`, as the one tested here, 0.3.31, does). `library="auto"`
is MKL where it is installed, else OpenBLAS. `blas_available(library)` /
`blas_unavailable_reason(library)` say whether this process can use one; the wrapper is built
like the attention kernels, without CPU-specific flags.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "block_sparse_attention.cc")
CONV_SOURCE = os.path.join(HERE, "conv3x3.cc")
GROUP_NORM_SOURCE = os.path.join(HERE, "group_norm.cc")
FULL_ATTENTION_SOURCE = os.path.join(HERE, "full_attention.cc")
ADAMW_SOURCE = os.path.join(HERE, "adamw.cc")
# `full_attention`'s head dimensions and most keys (`full_attention.cc`).
FULL_ATTENTION_HEAD_DIMS, FULL_ATTENTION_MAX_KEYS = (16, 32, 64), 512
HEADERS = tuple(os.path.join(HERE, h) for h in ("vector_exp.h", "conv3x3.h", "thread_parts.h"))
BLOCK_SIZE, HEAD_DIMS = 64, (16, 32, 64, 128)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BLAS_SOURCE = os.path.join(HERE, "blas_matmul.cc")
BLAS_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++17")
# (cblas_sgemm's name, whether its integers are 64-bit) in the scipy-openblas builds numpy and
# scipy bundle: numpy's is ILP64 (suffix 64_), scipy's LP64.
_SGEMM_SYMBOLS = (("scipy_cblas_sgemm64_", True), ("scipy_cblas_sgemm", False))
_SET_LOCAL_SYMBOLS = (
  "openblas_set_num_threads_local",
  "scipy_openblas_set_num_threads_local64_",
  "scipy_openblas_set_num_threads_local",
)
# The BLAS libraries `dense` / `matmul` can call; the position is the FFI attribute `library`.
BLAS_LIBRARIES = ("openblas", "mkl")
# mkl_service.h: MKL_THREADING_SEQUENTIAL, MKL_INTERFACE_LP64 / ILP64.
_MKL_THREADING_SEQUENTIAL, _MKL_INTERFACE_LP64, _MKL_INTERFACE_ILP64 = 1, 0, 1
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

  for d in (
    os.path.join(os.path.expanduser("~"), ".cache", "pofx", "native"),
    os.path.join(tempfile.gettempdir(), f"pofx-native-{os.getuid()}"),
  ):
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
    raise NativeUnavailable(
      "the native kernels are compiled on first use and no C++ compiler was found ($CXX, g++, c++)"
    )
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
  """Builds (once) and registers the attention (block-sparse and full), convolution, GroupNorm and
  AdamW kernels; returns the shared library's path."""
  with _lock:
    if "path" in _loaded:
      return _loaded["path"]
    reason = unavailable_reason()
    if reason:
      raise NativeUnavailable(reason)
    path = _build(
      "pofx_native",
      (SOURCE, CONV_SOURCE, GROUP_NORM_SOURCE, FULL_ATTENTION_SOURCE, ADAMW_SOURCE) + HEADERS,
      FLAGS,
      cache_dir,
    )
    lib = ctypes.cdll.LoadLibrary(path)
    for name, handler in (
      ("pofx_block_sparse_attention_fwd", lib.PofxBsaFwd),
      ("pofx_block_sparse_attention_bwd", lib.PofxBsaBwd),
      ("pofx_conv3x3_fwd", lib.PofxConv3x3Fwd),
      ("pofx_conv3x3_input_grad", lib.PofxConv3x3InputGrad),
      ("pofx_conv3x3_kernel_grad", lib.PofxConv3x3KernelGrad),
      ("pofx_group_norm_fwd", lib.PofxGroupNormFwd),
      ("pofx_group_norm_bwd", lib.PofxGroupNormBwd),
      ("pofx_full_attention_fwd", lib.PofxFullAttentionFwd),
      ("pofx_full_attention_bwd", lib.PofxFullAttentionBwd),
      ("pofx_adamw_apply", lib.PofxAdamwApply),
    ):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    _loaded["path"], _loaded["lib"] = path, lib
    return path


@functools.cache
def _numpy_openblas():
  """`(path, sgemm address, ILP64?, set_num_threads_local address)` of the OpenBLAS numpy loaded,
  or a string saying why there is none."""
  import numpy  # pylint: disable=g-import-not-at-top,unused-import  (loads its BLAS)

  try:
    with open("/proc/self/maps") as f:
      paths = sorted(
        {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower() and ".so" in line}
      )
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
    return (
      "it calls the OpenBLAS that numpy's PyPI wheels bundle (scipy-openblas), and this numpy "
      f"({numpy.__version__}) loaded none"
    )
  return (
    f"numpy's OpenBLAS ({', '.join(paths)}) lacks scipy_cblas_sgemm[64_] or "
    "openblas_set_num_threads_local (recent scipy-openblas releases export both)"
  )


@functools.cache
def _mkl():
  """`(path, sgemm address, ILP64?, set_num_threads_local address)` of Intel MKL's single dynamic
  library, or a string saying why there is none.

  Looks for `libmkl_rt.so*` in this Python's `lib/` folder (where the `mkl` PyPI package puts it),
  then on the system's library path. The first one found is loaded and set to MKL's sequential
  threading layer (no MKL threads beside XLA's; this must precede every other MKL call, so it is
  done here, once, and holds for the whole process) and to 32-bit integers where the layer can
  still be chosen."""
  if not sys.platform.startswith("linux"):
    return f"pofx_backends.cpu.native looks for Intel MKL (libmkl_rt) on Linux only (this is {sys.platform})"
  paths = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")), reverse=True)
  system = ctypes.util.find_library("mkl_rt")
  paths += [system] if system else []
  if not paths:
    return (
      f"Intel MKL was not found: no libmkl_rt.so* in {os.path.join(sys.prefix, 'lib')} or on the library "
      "path (pip install mkl, or pofx[mkl])"
    )
  errors = []
  for path in paths:
    try:
      lib = ctypes.CDLL(path)
    except OSError as e:
      errors.append(f"{path}: {e}")
      continue
    if not all(
      hasattr(lib, n)
      for n in ("cblas_sgemm", "MKL_Set_Num_Threads_Local", "MKL_Set_Threading_Layer", "MKL_Set_Interface_Layer")
    ):
      errors.append(f"{path} lacks cblas_sgemm or MKL's service functions")
      continue
    lib.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL)
    layer = lib.MKL_Set_Interface_Layer(_MKL_INTERFACE_LP64)  # returns the layer in force
    if layer not in (_MKL_INTERFACE_LP64, _MKL_INTERFACE_ILP64):
      errors.append(f"{path}: unknown MKL interface layer {layer}")
      continue
    address = lambda n: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value  # noqa: B023
    return path, address("cblas_sgemm"), layer == _MKL_INTERFACE_ILP64, address("MKL_Set_Num_Threads_Local")
  return "Intel MKL could not be loaded: " + "; ".join(errors)


def _find_blas(library: str):
  """`(name, path, sgemm, ILP64?, set_local)` for `library` ("auto" resolved), or a reason string."""
  name = resolve_blas(library)
  found = _mkl() if name == "mkl" else _numpy_openblas()
  return found if isinstance(found, str) else (name,) + found


def resolve_blas(library: str = "auto") -> str:
  """The BLAS `library` means here: itself, or for "auto" "mkl" when MKL is installed, else
  "openblas" (ValueError for an unknown name)."""
  if library not in ("auto",) + BLAS_LIBRARIES:
    raise ValueError(
      f"pofx_backends.cpu.native: unknown BLAS library {library!r}; allowed: {('auto',) + BLAS_LIBRARIES}."
    )
  if library != "auto":
    return library
  return "openblas" if isinstance(_mkl(), str) else "mkl"


def blas_unavailable_reason(library: str = "auto"):
  """None when `dense`/`matmul` can run here with `library`, else why not."""
  if library in _loaded.get("blas", {}):
    return None
  if _compiler() is None:
    return "the native kernels are compiled on first use and no C++ compiler was found ($CXX, g++, c++)"
  found = _find_blas(library)
  return found if isinstance(found, str) else None


def blas_available(library: str = "auto") -> bool:
  return blas_unavailable_reason(library) is None


def load_blas(cache_dir=None, library: str = "auto") -> str:
  """Builds (once) the BLAS matmul, points it at `library` ("auto": MKL if installed, else numpy's
  OpenBLAS) and registers it; returns the path of the BLAS it calls."""
  with _lock:
    name = resolve_blas(library)
    if name in _loaded.get("blas", {}):
      return _loaded["blas"][name]
    found = _find_blas(name)
    if isinstance(found, str):
      raise NativeUnavailable(f"pofx_backends.cpu.native.dense cannot run here with library={library!r}: {found}")
    _, blas_path, sgemm, ilp64, set_local = found
    if "blas_lib" not in _loaded:
      lib = ctypes.cdll.LoadLibrary(_build("pofx_blas", (BLAS_SOURCE,), BLAS_FLAGS, cache_dir))
      jax.ffi.register_ffi_target("pofx_blas_matmul", jax.ffi.pycapsule(lib.PofxBlasMatmul), platform="cpu")
      _loaded["blas_lib"], _loaded["blas"] = lib, {}
    if (
      _loaded["blas_lib"].PofxSetBlas(
        ctypes.c_int(BLAS_LIBRARIES.index(name)),
        ctypes.c_void_p(sgemm),
        ctypes.c_int(int(ilp64)),
        ctypes.c_void_p(set_local),
      )
      != 0
    ):
      raise NativeUnavailable(f"pofx_backends.cpu.native: the compiled BLAS wrapper does not know library {name!r}")
    _loaded["blas"][name] = blas_path
    return blas_path


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False, library: str = "auto"):
  """`op(a) @ op(b)` of 2-D float32 arrays by the BLAS `library` (op: transpose when asked).

  Not differentiable by itself (see `dense`)."""
  name = resolve_blas(library)
  load_blas(library=name)
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"pofx_backends.cpu.native.matmul takes 2-D operands, got shapes {a.shape} and {b.shape}.")
  m, k = (a.shape[1], a.shape[0]) if transpose_a else a.shape
  k2, n = (b.shape[1], b.shape[0]) if transpose_b else b.shape
  if k != k2:
    raise ValueError(
      f"pofx_backends.cpu.native.matmul: contracting sizes differ: {a.shape}{'^T' * transpose_a} x "
      f"{b.shape}{'^T' * transpose_b}."
    )
  return jax.ffi.ffi_call("pofx_blas_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32))(
    a.astype(jnp.float32),
    b.astype(jnp.float32),
    transpose_a=bool(transpose_a),
    transpose_b=bool(transpose_b),
    library=np.int64(BLAS_LIBRARIES.index(name)),
  )


def _product_now(a, b, transpose_a, transpose_b, all_products, library):
  """`op(a) @ op(b)` in float32: by the BLAS when `all_products` or `transpose_a` (the form that
  contracts both operands' leading axis when b is not transposed), else by XLA's dot."""
  if all_products or transpose_a:
    return matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b, library=library)
  dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b.astype(a.dtype), dims, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _product(a, b, transpose_a, transpose_b, all_products, library):
  return _product_now(a, b, transpose_a, transpose_b, all_products, library)


def _product_fwd(a, b, transpose_a, transpose_b, all_products, library):
  return _product(a, b, transpose_a, transpose_b, all_products, library), (a, b)


def _product_bwd(transpose_a, transpose_b, all_products, library, res, g):
  # C = A B with A = op(a), B = op(b): dA = G B^T and dB = A^T G, written on the stored a and b.
  a, b = res
  mm = lambda x, y, tx, ty: _product_now(x, y, tx, ty, all_products, library)
  if transpose_a:
    da = mm(b, g, True, True) if transpose_b else mm(b, g, False, True)  # (G B^T)^T = B G^T
  else:
    da = mm(g, b, False, False) if transpose_b else mm(g, b, False, True)  # G B^T
  if transpose_b:
    db = mm(g, a, True, True) if transpose_a else mm(g, a, True, False)  # (A^T G)^T = G^T A
  else:
    db = mm(a, g, False, False) if transpose_a else mm(a, g, True, False)  # A^T G
  return da.astype(a.dtype), db.astype(b.dtype)


_product.defvjp(_product_fwd, _product_bwd)


def product(
  a, b, *, transpose_a: bool = False, transpose_b: bool = False, all_products: bool = False, library: str = "auto"
):
  """`op(a) @ op(b)` of 2-D arrays, differentiable, in a's dtype (float32 accumulation).

  Each of its three products (the forward one, and `dA = G B^T`, `dB = A^T G` of the backward,
  with A = op(a), B = op(b)) is computed by the BLAS `library` when it contracts its left
  operand's leading axis (`x^T y`: a weight gradient, XLA:CPU's slowest form) or when
  `all_products`, else by XLA's dot. Same values as `op(a) @ op(b)` up to float32 summation order.
  """
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"pofx_backends.cpu.native.product takes 2-D operands, got shapes {a.shape} and {b.shape}.")
  k = a.shape[0] if transpose_a else a.shape[1]
  k2 = b.shape[1] if transpose_b else b.shape[0]
  if k != k2:
    raise ValueError(
      f"pofx_backends.cpu.native.product: contracting sizes differ: {a.shape}{'^T' * transpose_a} x "
      f"{b.shape}{'^T' * transpose_b}."
    )
  out = _product(a, b, bool(transpose_a), bool(transpose_b), bool(all_products), resolve_blas(library))
  return out.astype(a.dtype)


def dense(x, w, *, all_products: bool = False, library: str = "auto"):
  """`x @ w` (`x [..., D]`, `w [D, F]`) with the weight gradient `x^T g` computed by a BLAS.

  `all_products=False`: the forward product and the input gradient `g w^T` stay XLA dots; only
  the weight gradient, a dot contracting both operands' leading (token) axis, goes to `matmul`
  (XLA:CPU's slowest form). `all_products=True`: all three products go to the BLAS. `library`: as
  in `load_blas`. Same values as `jnp.dot` up to float32 summation order (`product` on the
  flattened leading axes)."""
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(
      f"pofx_backends.cpu.native.dense: x {x.shape} and w {w.shape} do not multiply (x [..., D], w [D, F])."
    )
  lead = x.shape[:-1]
  out = product(x.reshape(-1, x.shape[-1]), w, all_products=all_products, library=library)
  return out.reshape(*lead, w.shape[1])


def _fwd_call(q, k, v, seg, br, query, key, cos, sin, rope, q_scale):
  return jax.ffi.ffi_call(
    "pofx_block_sparse_attention_fwd",
    (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)),
  )(
    q,
    k,
    v,
    seg,
    br,
    query,
    key,
    cos,
    sin,
    block_size=np.int64(BLOCK_SIZE),
    rope=np.int64(rope),
    q_scale=np.float32(q_scale),
  )


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
    (
      jax.ShapeDtypeStruct(q.shape, jnp.float32),
      jax.ShapeDtypeStruct(k.shape, jnp.float32),
      jax.ShapeDtypeStruct(v.shape, jnp.float32),
    ),
  )(
    q,
    k,
    v,
    seg,
    br,
    query,
    key,
    cos,
    sin,
    out,
    lse,
    d_out.astype(jnp.float32),
    block_size=np.int64(BLOCK_SIZE),
    rope=np.int64(rope),
    q_scale=np.float32(q_scale),
  )
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
    raise ValueError(
      f"native block-sparse attention supports block_size={BLOCK_SIZE} and a head dimension in "
      f"{HEAD_DIMS}; got block_size={blocks.block_size}, head dimension {hd} (the CPU backend's "
      "attention falls back to the XLA op for them)."
    )
  N = R * L
  seg = jnp.asarray(segment_ids, jnp.int32).reshape(N)
  br = jnp.zeros((N,), jnp.int32) if branch_ids is None else jnp.asarray(branch_ids, jnp.int32).reshape(N)
  if rope is None:
    cos = sin = jnp.zeros((1, 1), jnp.float32)  # not read
  else:
    cos, sin = (jnp.asarray(t, jnp.float32).reshape(N, hd // 2) for t in rope)
  out = _attention(
    q.astype(jnp.float32).reshape(N, K, G, hd),
    k.astype(jnp.float32).reshape(N, K, hd),
    v.astype(jnp.float32).reshape(N, K, hd),
    seg,
    br,
    jnp.asarray(blocks.query_block, jnp.int32),
    jnp.asarray(blocks.key_block, jnp.int32),
    cos,
    sin,
    rope is not None,
    float(q_scale),
  )
  return out.reshape(R, L, K, G, hd).astype(q.dtype)


def full_attention_supports(q, k, v) -> bool:
  """Whether `full_attention` computes this call: float32 `q [B, Lq, K, G, hd]`, `k, v [B, Lk, K,
  hd]` with hd in `FULL_ATTENTION_HEAD_DIMS` and 1 <= Lk <= `FULL_ATTENTION_MAX_KEYS`."""
  return (
    q.ndim == 5
    and k.ndim == 4
    and v.shape == k.shape
    and q.shape[0] == k.shape[0]
    and q.shape[2] == k.shape[2]
    and q.shape[4] == k.shape[3]
    and q.shape[4] in FULL_ATTENTION_HEAD_DIMS
    and 1 <= k.shape[1] <= FULL_ATTENTION_MAX_KEYS
    and all(x.dtype == jnp.float32 for x in (q, k, v))
  )


def _full_attention_call(q, k, v, scale):
  B, Lq, K, G, _ = q.shape
  out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, K, G, Lq), jnp.float32))
  return jax.ffi.ffi_call("pofx_full_attention_fwd", out, vmap_method="sequential")(q, k, v, scale=np.float32(scale))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _full_attention(q, k, v, scale):
  return _full_attention_call(q, k, v, scale)[0]


def _full_attention_fwd(q, k, v, scale):
  out, lse = _full_attention_call(q, k, v, scale)
  return out, (q, k, v, out, lse)


def _full_attention_bwd(scale, res, d_out):
  q, k, v, out, lse = res
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  return jax.ffi.ffi_call("pofx_full_attention_bwd", shapes, vmap_method="sequential")(
    q, k, v, out, lse, d_out.astype(jnp.float32), scale=np.float32(scale)
  )


_full_attention.defvjp(_full_attention_fwd, _full_attention_bwd)


def full_attention(q, k, v, *, scale: float):
  """`softmax(scale q k^T) v` with every query seeing every key (the attention injection point's
  `mask=None`) by the native kernels (`full_attention.cc`), differentiable: `q [B, Lq, K, G, hd]`,
  `k, v [B, Lk, K, hd]` float32 -> `[B, Lq, K, G, hd]`, for the calls `full_attention_supports`
  accepts; the values of `pofx.kernels.full_attention` up to float32 summation order (the
  exponential to about 1.2e-7 relative)."""
  if not full_attention_supports(q, k, v):
    raise ValueError(
      f"pofx_backends.cpu.native.full_attention takes float32 q [B, Lq, K, G, hd], k, v [B, Lk, K, hd] with hd in "
      f"{FULL_ATTENTION_HEAD_DIMS} and 1 <= Lk <= {FULL_ATTENTION_MAX_KEYS}; got q {q.shape} {q.dtype}, "
      f"k {k.shape} {k.dtype}, v {v.shape} {v.dtype}."
    )
  load()
  return _full_attention(q, k, v, float(scale))


def _conv3x3_channels_ok(out_channels: int, in_channels: int) -> bool:
  """The kernels' rule for a convolution's channels: output channels a multiple of 16 (the register
  tiles), or fewer than 16 with input channels a multiple of 16 (the narrow kernels)."""
  return out_channels % 16 == 0 or (out_channels < 16 and in_channels % 16 == 0)


def conv3x3_supports(x, w, stride: int = 1) -> bool:
  """Whether `conv3x3` computes `x [B, H, W, Ci]` with `w [3, 3, Ci, Co]` at `stride`: float32
  operands, stride 1 or 2, and Co a multiple of 16 or Co < 16 with Ci a multiple of 16. (The input
  gradient at stride 1 is native when Ci meets the same rule with Co; otherwise, and at stride 2,
  it is XLA's.)"""
  return (
    x.ndim == 4
    and w.ndim == 4
    and tuple(w.shape[:2]) == (3, 3)
    and w.shape[2] == x.shape[3]
    and stride in (1, 2)
    and _conv3x3_channels_ok(w.shape[3], w.shape[2])
    and x.dtype == jnp.float32
    and w.dtype == jnp.float32
  )


def _conv3x3_call(x, w, stride, winograd):
  B, H, W, _ = x.shape
  out = jax.ShapeDtypeStruct((B, (H - 1) // stride + 1, (W - 1) // stride + 1, w.shape[3]), jnp.float32)
  return jax.ffi.ffi_call("pofx_conv3x3_fwd", out, vmap_method="sequential")(
    x, w, stride=np.int64(stride), winograd=bool(winograd)
  )


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv3x3(x, w, stride, winograd):
  return _conv3x3_call(x, w, stride, winograd)


def _conv3x3_fwd(x, w, stride, winograd):
  return _conv3x3_call(x, w, stride, winograd), (x, w)


def _conv3x3_bwd(stride, winograd, res, g):
  # d_x at stride 1: the same convolution of g with the kernel flipped in space and its channel axes
  # swapped, d_x[b, y, x, ci] = sum_{ky, kx, co} g[b, y + 1 - ky, x + 1 - kx, co] w[ky, kx, ci, co]
  # (the kernel built inside the call); otherwise XLA's transposed convolution.
  # d_w[ky, kx, ci, co] = sum_{b, y, x} x_pad[b, S y + ky, S x + kx, ci] g[b, y, x, co].
  x, w = res
  g = g.astype(jnp.float32)
  if stride == 1 and _conv3x3_channels_ok(w.shape[2], w.shape[3]):
    d_x = jax.ffi.ffi_call(
      "pofx_conv3x3_input_grad", jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential"
    )(g, w, winograd=bool(winograd))
  else:
    conv = lambda x: jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    d_x = jax.vjp(conv, x)[1](g)[0]
  d_w = jax.ffi.ffi_call(
    "pofx_conv3x3_kernel_grad", jax.ShapeDtypeStruct(w.shape, jnp.float32), vmap_method="sequential"
  )(x, g, stride=np.int64(stride), winograd=bool(winograd))
  return d_x, d_w


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv3x3(x, w, *, stride: int = 1, winograd: bool = True):
  """The 3x3 convolution with one pixel of zero padding on every side of NHWC `x [B, H, W, Ci]`
  with HWIO `w [3, 3, Ci, Co]` at `stride` 1 or 2 by the native AVX-512 kernels (`conv3x3.h`),
  differentiable: `jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
  dimension_numbers=("NHWC", "HWIO", "NHWC"))` up to float32 rounding (at stride 1, "SAME"). With
  `winograd` (the default), the stride-1 forward on even image sizes with Co a multiple of 16 and
  Ci >= 16, and the kernel gradient where also Ci Co >= 3072, are computed by Winograd's minimal
  filtering F(2x2, 3x3) (Lavin & Gray 2016, arXiv:1509.09308): 16 multiply-adds per 2x2 outputs
  instead of 36 (the kernel gradient `dU = sum over tiles of (B^T d B) . (A dY A^T)`,
  `dw = G^T dU G`; below that size its transforms cost more than they save), with a rounding
  error of the same order as the direct sum's (the transforms' coefficients are 0, +-1 and 1/2).
  The input gradient at stride 1 is the forward on the output gradient with the kernel flipped and
  transposed. Both operands float32, Co a multiple of 16 or Co < 16 with Ci a multiple of 16
  (`conv3x3_supports`); the CPU backend's `DirectConv` sends anything else to XLA."""
  if not conv3x3_supports(x, w, stride):
    raise ValueError(
      f"pofx_backends.cpu.native.conv3x3 takes float32 x [B, H, W, Ci] and w [3, 3, Ci, Co] at stride 1 or 2, with "
      f"Co a multiple of 16, or Co < 16 and Ci a multiple of 16; got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, "
      f"stride {stride}."
    )
  load()
  return _conv3x3(x, w, int(stride), bool(winograd))


def group_norm_supports(x, scale, bias, groups: int) -> bool:
  """Whether `group_norm` computes this call: float32 `x [B, ..., C]`, `scale` and `bias` `[C]`, C a
  multiple of 16 and of `groups`."""
  C = x.shape[-1] if x.ndim else 0
  return (
    x.ndim >= 2
    and C % 16 == 0
    and groups >= 1
    and C % groups == 0
    and scale.shape == (C,)
    and bias.shape == (C,)
    and all(a.dtype == jnp.float32 for a in (x, scale, bias))
  )


def _group_norm_call(x, scale, bias, groups, eps, silu):
  stats = jax.ShapeDtypeStruct((x.shape[0], groups), jnp.float32)
  return jax.ffi.ffi_call(
    "pofx_group_norm_fwd", (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats), vmap_method="sequential"
  )(x, scale, bias, groups=np.int64(groups), eps=np.float32(eps), silu=bool(silu))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, groups, eps, silu):
  return _group_norm_call(x, scale, bias, groups, eps, silu)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, silu):
  y, mean, rstd = _group_norm_call(x, scale, bias, groups, eps, silu)
  return y, (x, scale, bias, mean, rstd)


def _group_norm_bwd(groups, eps, silu, res, g):
  x, scale, bias, mean, rstd = res
  out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, scale, bias))
  return jax.ffi.ffi_call("pofx_group_norm_bwd", out, vmap_method="sequential")(
    x, scale, bias, mean, rstd, g.astype(jnp.float32), groups=np.int64(groups), silu=bool(silu)
  )


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x, scale, bias, *, groups: int, eps: float, silu: bool = False):
  """`pofx.group_norm.group_norm(x, scale, bias, groups=, eps=, silu=)` by the native kernels
  (`group_norm.cc`), differentiable, for the calls `group_norm_supports` accepts; same values up to
  float32 summation order (SiLU's exponential to about 1.2e-7 relative)."""
  if not group_norm_supports(x, scale, bias, groups):
    raise ValueError(
      f"pofx_backends.cpu.native.group_norm takes float32 x [B, ..., C] with C a multiple of 16 and of groups, "
      f"and scale, bias [C]; got x {x.shape} {x.dtype}, scale {scale.shape}, bias {bias.shape}, groups {groups}."
    )
  load()
  return _group_norm(x, scale, bias, int(groups), float(eps), bool(silu))


def adamw_apply(hyper, params, grads, mu, nu):
  """AdamW's update applied in place by the native kernel (`adamw.cc`).

  `hyper`: float32 `[11]` = `[lr, b1, 1 - b1, b2, 1 - b2, eps, weight_decay, 1 - b1^t, 1 - b2^t,
  norm, max_norm]`; `params`, `grads`, `mu`, `nu`: equally long sequences of float32 arrays, leaf by
  leaf of the same shapes. Returns the new `(params, mu, nu)` as lists; the results alias the inputs
  (XLA updates the buffers in place where nothing else reads them). Per element, in optax's order:
  `g = (g / norm) max_norm` unless `norm < max_norm` (a global-norm clip; `max_norm = inf` for
  none), `mu = (1 - b1) g + b1 mu`, `nu = (1 - b2) g^2 + b2 nu`,
  `p = p - lr ((mu / bc1) / (sqrt(nu / bc2) + eps) + weight_decay p)`."""
  params, grads, mu, nu = (list(x) for x in (params, grads, mu, nu))
  n = len(params)
  if not (len(grads) == len(mu) == len(nu) == n):
    raise ValueError(
      f"adamw_apply: {n} params, {len(grads)} grads, {len(mu)} mu, {len(nu)} nu leaves; need as many of each."
    )
  for name, leaves in (("params", params), ("grads", grads), ("mu", mu), ("nu", nu)):
    for i, (x, p) in enumerate(zip(leaves, params)):
      if x.dtype != jnp.float32 or x.shape != p.shape:
        raise ValueError(
          f"adamw_apply: {name}[{i}] is {x.dtype}{list(x.shape)}; every leaf must be float32 with its "
          f"parameter's shape {list(p.shape)}."
        )
  hyper = jnp.asarray(hyper, jnp.float32)
  if hyper.shape != (11,):
    raise ValueError(f"adamw_apply: hyper has shape {hyper.shape}; expected (11,).")
  if n == 0:
    return [], [], []
  load()
  shapes = tuple(jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in params) * 3
  aliases = (
    {1 + i: i for i in range(n)}
    | {1 + 2 * n + i: n + i for i in range(n)}
    | {1 + 3 * n + i: 2 * n + i for i in range(n)}
  )
  out = jax.ffi.ffi_call("pofx_adamw_apply", shapes, input_output_aliases=aliases)(hyper, *params, *grads, *mu, *nu)
  return list(out[:n]), list(out[n : 2 * n]), list(out[2 * n :])
