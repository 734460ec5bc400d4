// The CPU backend's 3x3 convolution kernels alone, one thread, outside XLA: Winograd's F(2x2, 3x3)
// against the direct register-tiled sums (pofx_backends/cpu/native/conv3x3.h), forward and kernel
// gradient, on the shapes of the diffusion benchmark's U-Net.
//
//     g++ -O3 -march=native -std=c++17 benchmarks/conv3x3_winograd.cc -o /tmp/conv3x3_winograd && /tmp/conv3x3_winograd
//
// x86-64 with AVX-512 only. Per shape: 16 images (one thread's half of the benchmark's 32), the
// fastest of 30 repetitions of each form, reported as GFLOP/s of the direct convolution's work
// (2 H W Ci Co 9 per image; Winograd performs 16 of every 36 of those multiply-adds, so its figure
// is a rate of equivalent work) and the ratio. Each form's result is checked against the other's
// (exit code 1 if they differ by more than float32 rounding allows).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../pofx_backends/cpu/native/conv3x3.h"

using namespace conv3x3;
using Clock = std::chrono::steady_clock;

template <typename F>
double Fastest(F&& f) {
  double best = 1e30;
  for (int r = 0; r < 30; ++r) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

double MaxRelative(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, double(std::fabs(a[i] - b[i])));
    scale = std::max(scale, double(std::fabs(b[i])));
  }
  return err / scale;
}

int main() {
  const int B = 16;
  const int shapes[][4] = {{16, 1, 32, 0}, {16, 32, 32, 0}, {16, 64, 32, 0}, {16, 96, 32, 0}, {16, 64, 64, 0}, {8, 32, 64, 0},
                           {8, 64, 64, 0},  {8, 96, 64, 0},  {8, 128, 64, 0}, {4, 64, 64, 0},  {4, 128, 64, 0}};
  bool ok = true;
  std::srand(0);
  printf("one thread, %d images, GFLOP/s of the direct convolution's work\n", B);
  for (const auto& s : shapes) {
    const int H = s[0], W = s[0], Ci = s[1], Co = s[2];
    std::vector<float> x(size_t(B) * H * W * Ci), w(size_t(9) * Ci * Co), g(size_t(B) * H * W * Co);
    for (auto* v : {&x, &w, &g})
      for (auto& e : *v) e = std::rand() / float(RAND_MAX) - 0.5f;
    std::vector<float> y_direct(g.size()), y_winograd(g.size()), dw_direct(w.size()), dw_winograd(w.size());
    std::vector<float> pad(size_t(H + 2) * (W + 2) * Ci), U(size_t(16) * Ci * Co), dU(U.size());
    WinogradScratch scratch;
    const double fwd_direct = Fastest([&] {
      for (int b = 0; b < B; ++b) {
        PadImage(x.data() + size_t(b) * H * W * Ci, H, W, Ci, pad.data());
        FwdImage(pad.data(), H, W, Ci, w.data(), Co, y_direct.data() + size_t(b) * H * W * Co, 1);
      }
    });
    const double fwd_winograd = Fastest([&] {
      WinogradKernel(w.data(), Ci, Co, U.data());
      WinogradImages(x.data(), B, H, W, Ci, U.data(), Co, y_winograd.data(), scratch);
    });
    const double grad_direct = Fastest([&] {
      std::fill(dw_direct.begin(), dw_direct.end(), 0.0f);
      for (int b = 0; b < B; ++b) {
        PadImage(x.data() + size_t(b) * H * W * Ci, H, W, Ci, pad.data());
        WgradImage(pad.data(), H, W, Ci, g.data() + size_t(b) * H * W * Co, Co, dw_direct.data(), 1);
      }
    });
    const double grad_winograd = Fastest([&] {
      std::fill(dU.begin(), dU.end(), 0.0f);
      WinogradWgradImages(x.data(), g.data(), B, H, W, Ci, Co, dU.data(), scratch);
      WinogradKernelGrad(dU.data(), Ci, Co, dw_winograd.data());
    });
    const double flop = 2.0 * B * H * W * 9 * Ci * Co, e_fwd = MaxRelative(y_winograd, y_direct),
                 e_grad = MaxRelative(dw_winograd, dw_direct);
    ok = ok && e_fwd < 1e-5 && e_grad < 1e-5;
    printf("%2dx%-2d %3d->%-3d forward: direct %6.1f winograd %6.1f (%.2fx)  kernel gradient: direct %6.1f "
           "winograd %6.1f (%.2fx)  max relative difference %.1e / %.1e\n",
           H, W, Ci, Co, flop / fwd_direct / 1e9, flop / fwd_winograd / 1e9, fwd_direct / fwd_winograd,
           flop / grad_direct / 1e9, flop / grad_winograd / 1e9, grad_direct / grad_winograd, e_fwd, e_grad);
  }
  return ok ? 0 : 1;
}
