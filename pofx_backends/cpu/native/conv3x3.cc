// XLA FFI handlers of the 3x3 convolution kernels (conv3x3.h): pofx_backends.cpu.native.conv3x3.
//
//   pofx_conv3x3_fwd(x [B, H, W, Ci], w [3, 3, Ci, Co]; stride) -> y [B, Ho, Wo, Co]
//   pofx_conv3x3_input_grad(g [B, H, W, Co], w [3, 3, Ci, Co]) -> dx [B, H, W, Ci]   (stride 1)
//   pofx_conv3x3_kernel_grad(x [B, H, W, Ci], g [B, Ho, Wo, Co]; stride) -> dw [3, 3, Ci, Co]
//
// Co a multiple of 16 (the register tiles), or Co < 16 with Ci a multiple of 16 (the narrow
// kernels); the input gradient is the forward of g with the kernel flipped in space and its channel
// axes swapped, built here, so its output channels Ci follow the same rule. Attribute `winograd`:
// Winograd's F(2x2, 3x3) (conv3x3.h) for the stride-1 forward on even sizes with Co a multiple of 16
// and Ci >= 16 (a single input channel is faster by the direct sums), and for the kernel gradient
// where also Ci Co >= 3072 (WinogradKernelGradApplies), instead of the direct sums.
//
// Threads: the batch's images are cut into as many parts as XLA's intra-op thread pool has
// threads (thread_parts.h). Each part pads its images into its own buffer (the direct kernels one
// image at a time, Winograd's all of the part's at once). The kernel gradient's parts accumulate
// into their own buffers, summed by the calling thread at the end.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include "conv3x3.h"
#include "thread_parts.h"
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
namespace {

ffi::Error Invalid(const char* what) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, what); }

bool Wide(int co) { return co % 16 == 0; }
bool Narrow(int co, int ci) { return co < 16 && ci % 16 == 0; }

// The narrow kernels' layout [Co, 3, 3 Ci] of tap t = 3 ky + kx: the offset of (co, t, ci).
size_t NarrowAt(int co, int t, int ci, int Ci) { return (size_t(co) * 3 + t / 3) * 3 * Ci + (t % 3) * Ci + ci; }

// y = conv(x, K) where K [3, 3, Ci, Co] is given as `wide` (HWIO, for Co % 16 == 0) or `narrow`
// ([Co, 3, 3 Ci], for Co < 16); by Winograd's F(2x2, 3x3) where `winograd` and it applies.
void Convolve(ffi::ThreadPool& pool, const float* X, int64_t B, int H, int W, int Ci, const float* wide,
              const float* narrow, int Co, int stride, bool winograd, float* Y) {
  const int64_t out_image = int64_t(conv3x3::OutSize(H, stride)) * conv3x3::OutSize(W, stride) * Co;
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), B)));
  if (wide && winograd && conv3x3::WinogradApplies(H, W, Ci, Co, stride)) {
    std::vector<float> U(size_t(16) * Ci * Co);
    conv3x3::WinogradKernel(wide, Ci, Co, U.data());
    pofx::RunParts(pool, parts, [&](int p) {
      thread_local conv3x3::WinogradScratch scratch;
      const int64_t b0 = B * p / parts, b1 = B * (p + 1) / parts;
      conv3x3::WinogradImages(X + b0 * H * W * Ci, int(b1 - b0), H, W, Ci, U.data(), Co, Y + b0 * out_image, scratch);
    });
    return;
  }
  pofx::RunParts(pool, parts, [&](int p) {
    std::vector<float> pad(size_t(H + 2) * (W + 2) * Ci);
    for (int64_t b = B * p / parts; b < B * (p + 1) / parts; ++b) {
      conv3x3::PadImage(X + b * H * W * Ci, H, W, Ci, pad.data());
      if (wide) conv3x3::FwdImage(pad.data(), H, W, Ci, wide, Co, Y + b * out_image, stride);
      else conv3x3::FwdNarrowImage(pad.data(), H, W, Ci, narrow, Co, Y + b * out_image, stride);
    }
  });
}

ffi::Error Fwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, int64_t stride, bool winograd,
               ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3])
    return Invalid("conv3x3: input [B, H, W, Ci] and kernel [3, 3, Ci, Co] expected");
  if (stride != 1 && stride != 2) return Invalid("conv3x3: stride 1 or 2");
  const int64_t B = xd[0];
  const int H = int(xd[1]), W = int(xd[2]), Ci = int(xd[3]), Co = int(wd[3]);
  if (!Wide(Co) && !Narrow(Co, Ci))
    return Invalid("conv3x3: output channels a multiple of 16, or fewer than 16 with input channels a multiple of 16");
  if (B == 0 || H == 0 || W == 0) return ffi::Error::Success();
  const float* K = w.typed_data();
  std::vector<float> narrow;
  if (!Wide(Co)) {  // [Co, 3, 3 Ci]
    narrow.resize(size_t(9) * Ci * Co);
    for (int t = 0; t < 9; ++t)
      for (int ci = 0; ci < Ci; ++ci)
        for (int co = 0; co < Co; ++co)
          narrow[NarrowAt(co, t, ci, Ci)] = K[(size_t(t) * Ci + ci) * Co + co];
  }
  Convolve(pool, x.typed_data(), B, H, W, Ci, Wide(Co) ? K : nullptr, narrow.data(), Co, int(stride), winograd,
           y->typed_data());
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w, bool winograd,
                     ffi::ResultBuffer<ffi::F32> dx) {
  auto gd = g.dimensions(), wd = w.dimensions();
  if (gd.size() != 4 || wd.size() != 4 || wd[0] != 3 || wd[1] != 3 || wd[3] != gd[3])
    return Invalid("conv3x3: output gradient [B, H, W, Co] and kernel [3, 3, Ci, Co] expected");
  const int64_t B = gd[0];
  const int H = int(gd[1]), W = int(gd[2]), Ci = int(wd[2]), Co = int(gd[3]);
  if (!Wide(Ci) && !Narrow(Ci, Co))
    return Invalid("conv3x3: input channels a multiple of 16, or fewer than 16 with output channels a multiple of 16");
  if (B == 0 || H == 0 || W == 0) return ffi::Error::Success();
  // The flipped, swapped kernel: K'[ky, kx, co, ci] = K[2 - ky, 2 - kx, ci, co], as HWIO [3, 3, Co, Ci]
  // (wide) or as [Ci, 3, 3 Co] (narrow).
  const float* K = w.typed_data();
  std::vector<float> flipped(size_t(9) * Ci * Co);
  for (int t = 0; t < 9; ++t)
    for (int ci = 0; ci < Ci; ++ci)
      for (int co = 0; co < Co; ++co) {
        const float v = K[(size_t(8 - t) * Ci + ci) * Co + co];
        if (Wide(Ci)) flipped[(size_t(t) * Co + co) * Ci + ci] = v;
        else flipped[NarrowAt(ci, t, co, Co)] = v;
      }
  Convolve(pool, g.typed_data(), B, H, W, Co, Wide(Ci) ? flipped.data() : nullptr, flipped.data(), Ci, 1, winograd,
           dx->typed_data());
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, int64_t stride,
                      bool winograd, ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), gd = g.dimensions();
  if (stride != 1 && stride != 2) return Invalid("conv3x3: stride 1 or 2");
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || gd[1] != conv3x3::OutSize(int(xd[1]), int(stride)) ||
      gd[2] != conv3x3::OutSize(int(xd[2]), int(stride)))
    return Invalid("conv3x3: input [B, H, W, Ci] and gradient [B, Ho, Wo, Co] do not match");
  const int64_t B = xd[0];
  const int H = int(xd[1]), W = int(xd[2]), Ci = int(xd[3]), Co = int(gd[3]);
  if (!Wide(Co) && !Narrow(Co, Ci))
    return Invalid("conv3x3: output channels a multiple of 16, or fewer than 16 with input channels a multiple of 16");
  const float* X = x.typed_data();
  const float* G = g.typed_data();
  float* DW = dw->typed_data();
  const size_t n = size_t(9) * Ci * Co;
  std::memset(DW, 0, sizeof(float) * n);
  if (B == 0 || H == 0 || W == 0) return ffi::Error::Success();
  const int64_t g_image = int64_t(gd[1]) * gd[2] * Co;
  const bool wide = Wide(Co);
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), B)));
  if (wide && winograd && conv3x3::WinogradKernelGradApplies(H, W, Ci, Co, int(stride))) {
    // Each part sums its images' dU [16, Ci, Co]; dw = G^T (sum of the parts) G.
    std::vector<std::vector<float>> dU(parts);
    pofx::RunParts(pool, parts, [&](int p) {
      thread_local conv3x3::WinogradScratch scratch;
      dU[p].assign(size_t(16) * Ci * Co, 0.0f);
      const int64_t b0 = B * p / parts, b1 = B * (p + 1) / parts;
      conv3x3::WinogradWgradImages(X + b0 * H * W * Ci, G + b0 * g_image, int(b1 - b0), H, W, Ci, Co, dU[p].data(),
                                   scratch);
    });
    for (int p = 1; p < parts; ++p)
      for (size_t i = 0; i < dU[0].size(); ++i) dU[0][i] += dU[p][i];
    conv3x3::WinogradKernelGrad(dU[0].data(), Ci, Co, DW);
    return ffi::Error::Success();
  }
  // Part 0 of the wide kernel accumulates into dw itself; every other buffer is summed into dw at the end
  // (the narrow kernel's in its [Co, 3, 3 Ci] layout).
  std::vector<std::vector<float>> partial(wide ? parts - 1 : parts);
  pofx::RunParts(pool, parts, [&](int p) {
    float* acc = DW;
    if (!wide || p > 0) {
      auto& buf = partial[wide ? p - 1 : p];
      buf.assign(n, 0.0f);
      acc = buf.data();
    }
    std::vector<float> pad(size_t(H + 2) * (W + 2) * Ci);
    for (int64_t b = B * p / parts; b < B * (p + 1) / parts; ++b) {
      conv3x3::PadImage(X + b * H * W * Ci, H, W, Ci, pad.data());
      if (wide) conv3x3::WgradImage(pad.data(), H, W, Ci, G + b * g_image, Co, acc, int(stride));
      else conv3x3::WgradNarrowImage(pad.data(), H, W, Ci, G + b * g_image, Co, acc, int(stride));
    }
  });
  for (auto& part : partial) {
    if (wide) {
      for (size_t i = 0; i < n; ++i) DW[i] += part[i];
      continue;
    }
    for (int co = 0; co < Co; ++co)
      for (int t = 0; t < 9; ++t)
        for (int ci = 0; ci < Ci; ++ci)
          DW[(size_t(t) * Ci + ci) * Co + co] += part[NarrowAt(co, t, ci, Ci)];
  }
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxConv3x3Fwd, Fwd, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Attr<int64_t>("stride").Attr<bool>("winograd")
    .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxConv3x3InputGrad, InputGrad, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Attr<bool>("winograd").Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxConv3x3KernelGrad, KernelGrad, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Attr<int64_t>("stride").Attr<bool>("winograd")
    .Ret<ffi::Buffer<ffi::F32>>());
