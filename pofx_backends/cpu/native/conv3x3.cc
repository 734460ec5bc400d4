// XLA FFI handlers of the 3x3 convolution kernels (conv3x3.h): pofx_backends.cpu.native.conv3x3.
//
// Threads: the batch's images are cut into as many parts as XLA's intra-op thread pool has
// threads (thread_parts.h). Each part pads its images one at a time into its own buffer. The kernel gradient's parts accumulate into their own [3, 3, Ci, Co]
// buffers, summed by the calling thread at the end.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include "conv3x3.h"
#include "thread_parts.h"
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
namespace {

ffi::Error Fwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3: input [B, H, W, Ci] and kernel [3, 3, Ci, Co] expected");
  if (wd[3] % 16 != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3: output channels must be a multiple of 16");
  const int64_t B = xd[0];
  const int H = int(xd[1]), W = int(xd[2]), Ci = int(xd[3]), Co = int(wd[3]);
  const float* X = x.typed_data();
  const float* K = w.typed_data();
  float* Y = y->typed_data();
  if (B == 0 || H == 0 || W == 0) return ffi::Error::Success();
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), B)));
  pofx::RunParts(pool, parts, [&](int p) {
    std::vector<float> pad(size_t(H + 2) * (W + 2) * Ci);
    for (int64_t b = B * p / parts; b < B * (p + 1) / parts; ++b) {
      conv3x3::PadImage(X + b * H * W * Ci, H, W, Ci, pad.data());
      conv3x3::FwdImage(pad.data(), H, W, Ci, K, Co, Y + b * H * W * Co);
    }
  });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[1] != gd[1] || xd[2] != gd[2])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3: input [B, H, W, Ci] and gradient [B, H, W, Co] differ");
  if (gd[3] % 16 != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3: output channels must be a multiple of 16");
  const int64_t B = xd[0];
  const int H = int(xd[1]), W = int(xd[2]), Ci = int(xd[3]), Co = int(gd[3]);
  const float* X = x.typed_data();
  const float* G = g.typed_data();
  float* DW = dw->typed_data();
  const size_t n = size_t(9) * Ci * Co;
  std::memset(DW, 0, sizeof(float) * n);
  if (B == 0 || H == 0 || W == 0) return ffi::Error::Success();
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), B)));
  std::vector<std::vector<float>> partial(parts - 1);
  pofx::RunParts(pool, parts, [&](int p) {
    float* acc = DW;
    if (p > 0) {
      partial[p - 1].assign(n, 0.0f);
      acc = partial[p - 1].data();
    }
    std::vector<float> pad(size_t(H + 2) * (W + 2) * Ci);
    for (int64_t b = B * p / parts; b < B * (p + 1) / parts; ++b) {
      conv3x3::PadImage(X + b * H * W * Ci, H, W, Ci, pad.data());
      conv3x3::WgradImage(pad.data(), H, W, Ci, G + b * H * W * Co, Co, acc);
    }
  });
  for (auto& part : partial)
    for (size_t i = 0; i < n; ++i) DW[i] += part[i];
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxConv3x3Fwd, Fwd, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxConv3x3KernelGrad, KernelGrad, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
