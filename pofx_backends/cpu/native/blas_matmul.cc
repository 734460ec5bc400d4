// Float32 matrix products by a BLAS's sgemm, registered with XLA's FFI (pofx_backends.cpu.native.matmul):
// Intel MKL (the `mkl` PyPI package's libmkl_rt) or the OpenBLAS that numpy's PyPI wheels bundle
// (scipy-openblas). Attribute `library` picks one: 0 OpenBLAS, 1 MKL (pofx_backends.cpu.native.BLAS_LIBRARIES).
//
// C = op(A) op(B), row-major, op = identity or transpose (attributes transpose_a, transpose_b).
// XLA:CPU computes a weight gradient X^T G (a dot contracting both operands' first axis) with
// Eigen at 120-280 GFLOP/s on the benchmark's shapes, against 210-310 for OpenBLAS's sgemm; on two
// cores MKL's sgemm also beats XLA's forward and input-gradient dots (benchmarks/README.md).
//
// Threads: the product is cut into as many parts as XLA's intra-op thread pool has threads (rows
// of C, or columns when C is wider than tall, in multiples of 16), each part one single-threaded
// sgemm (the BLAS's set_num_threads_local(1) on the thread that runs it, restored afterwards), run
// on XLA's own pool. A BLAS's own threads would spin beside XLA's on the same cores. Parts are
// claimed from a shared counter, and the calling thread claims them too, so it never waits on a
// task queued behind it.
//
// No BLAS is linked: Python (pofx_backends/cpu/native/__init__.py) finds the library and passes the addresses
// of its cblas_sgemm and set_num_threads_local to PofxSetBlas.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
namespace {
// CBLAS enum values (cblas.h): CblasRowMajor, CblasNoTrans, CblasTrans.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                         int64_t, float, float*, int64_t);
using Sgemm32 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t, const float*,
                         int32_t, float, float*, int32_t);
using SetLocal = int (*)(int);
struct Blas {
  void* sgemm = nullptr;
  bool ilp64 = true;   // 64-bit integer arguments
  SetLocal set_local = nullptr;
};
constexpr int kLibraries = 2;
Blas g_blas[kLibraries];

void Sgemm(const Blas& blas, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
           const float* b, int64_t ldb, float* c, int64_t ldc) {
  const int prev = blas.set_local(1);
  if (blas.ilp64) {
    reinterpret_cast<Sgemm64>(blas.sgemm)(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f, a,
                                       lda, b, ldb, 0.0f, c, ldc);
  } else {
    reinterpret_cast<Sgemm32>(blas.sgemm)(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int32_t(m),
                                       int32_t(n), int32_t(k), 1.0f, a, int32_t(lda), b, int32_t(ldb), 0.0f, c,
                                       int32_t(ldc));
  }
  blas.set_local(prev);
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, bool ta, bool tb,
                  int64_t library, ffi::ResultBuffer<ffi::F32> c) {
  if (library < 0 || library >= kLibraries || g_blas[library].sgemm == nullptr || g_blas[library].set_local == nullptr)
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "pofx_backends.cpu.native: this BLAS was not registered (PofxSetBlas)");
  const Blas& blas = g_blas[library];
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "2-D operands only");
  const int64_t m = ta ? ad[1] : ad[0], k = ta ? ad[0] : ad[1], n = tb ? bd[0] : bd[1];
  if ((tb ? bd[1] : bd[0]) != k) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "contracting sizes differ");
  if (!blas.ilp64 && std::max({m, n, k, ad[1], bd[1]}) > INT32_MAX)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "a dimension exceeds this BLAS's 32-bit integers");
  float* C = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) { std::memset(C, 0, sizeof(float) * m * n); return ffi::Error::Success(); }
  const float *A = a.typed_data(), *Bp = b.typed_data();
  const int64_t lda = ad[1], ldb = bd[1];
  const bool by_cols = n > m;                           // cut the longer side of C
  const int64_t side = by_cols ? n : m, units = (side + 15) / 16;
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), units)));
  auto part = [=, &blas](int p) {
    const int64_t s0 = std::min(side, units * p / parts * 16), s1 = std::min(side, units * (p + 1) / parts * 16);
    if (s1 <= s0) return;
    if (by_cols) {   // C[:, s0:s1] = op(A) op(B)[:, s0:s1]
      Sgemm(blas, ta, tb, m, s1 - s0, k, A, lda, tb ? Bp + s0 * ldb : Bp + s0, ldb, C + s0, n);
    } else {         // C[s0:s1, :] = op(A)[s0:s1, :] op(B)
      Sgemm(blas, ta, tb, s1 - s0, n, k, ta ? A + s0 : A + s0 * lda, lda, Bp, ldb, C + s0 * n, n);
    }
  };
  if (parts == 1) { part(0); return ffi::Error::Success(); }
  struct State { std::atomic<int> next{0}, done{0}; };
  auto st = std::make_shared<State>();
  auto work = [st, part, parts] {
    for (int p; (p = st->next.fetch_add(1)) < parts;) {
      part(p);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int p = 1; p < parts; ++p) { auto w = work; pool.Schedule(std::move(w)); }
  work();
  while (st->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
  return ffi::Error::Success();
}
}  // namespace

// Registers library `library` (0 OpenBLAS, 1 MKL); returns 0, or -1 for an index out of range.
extern "C" int PofxSetBlas(int library, void* sgemm, int ilp64, void* set_num_threads_local) {
  if (library < 0 || library >= kLibraries) return -1;
  g_blas[library].set_local = reinterpret_cast<SetLocal>(set_num_threads_local);
  g_blas[library].ilp64 = ilp64 != 0;
  g_blas[library].sgemm = sgemm;
  return 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxBlasMatmul, Matmul, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Attr<bool>("transpose_a").Attr<bool>("transpose_b")
    .Attr<int64_t>("library").Ret<ffi::Buffer<ffi::F32>>());
