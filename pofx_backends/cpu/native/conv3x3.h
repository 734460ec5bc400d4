// 3x3 convolutions, stride 1, one pixel of zero padding ("SAME"), NHWC input, HWIO kernel,
// float32, by AVX-512 register tiles: the kernels behind pofx_backends.cpu.native.conv3x3
// (conv3x3.cc registers them with XLA's FFI).
//
//   forward:         y[b, y, x, co] = sum_{ky, kx, ci} xp[b, y + ky, x + kx, ci] w[ky, kx, ci, co]
//   kernel gradient: dw[ky, kx, ci, co] = sum_{b, y, x} xp[b, y + ky, x + kx, ci] g[b, y, x, co]
//
// with xp the input padded by one zero pixel on each side. The input gradient is the forward with
// the kernel flipped in space and its channel axes swapped (the caller passes that kernel).
// Forward: a tile of XB output pixels of one row times 16 NV output channels stays in XB * NV
// vector registers while the 9 Ci input values under each pixel are broadcast against one kernel
// row each (the direct convolution's register blocking). Kernel gradient: a tile of CB input
// channels times 16 NV output channels of one kernel tap accumulates over an image's pixels.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <algorithm>
namespace conv3x3 {

// One image's input, zero-padded by one pixel on every side: [(H+2), (W+2), C].
inline void PadImage(const float* x, int H, int W, int C, float* pad) {
  const int Wp = W + 2;
  std::memset(pad, 0, sizeof(float) * Wp * C);
  std::memset(pad + (int64_t)(H + 1) * Wp * C, 0, sizeof(float) * Wp * C);
  for (int y = 0; y < H; ++y) {
    float* row = pad + (int64_t)(y + 1) * Wp * C;
    std::memset(row, 0, sizeof(float) * C);
    std::memcpy(row + C, x + (int64_t)y * W * C, sizeof(float) * W * C);
    std::memset(row + (int64_t)(W + 1) * C, 0, sizeof(float) * C);
  }
}

// out[y, x0:x0+XB, co0:co0+16 NV] = sum_{ky,kx,ci} pad[y+ky, x+kx, ci] w[ky, kx, ci, co]
template <int XB, int NV>
inline void FwdTile(const float* __restrict pad, int Wp, int Ci, const float* __restrict w, int Co, float* __restrict out,
                    int W, int y, int x0, int co0) {
  __m512 acc[XB][NV];
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int ky = 0; ky < 3; ++ky)
    for (int kx = 0; kx < 3; ++kx) {
      const float* ip = pad + ((int64_t)(y + ky) * Wp + x0 + kx) * Ci;
      const float* wp = w + (int64_t)(ky * 3 + kx) * Ci * Co + co0;
      for (int ci = 0; ci < Ci; ++ci) {
        __m512 wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wp + (int64_t)ci * Co + 16 * v);
        for (int i = 0; i < XB; ++i) {
          const __m512 b = _mm512_set1_ps(ip[(int64_t)i * Ci + ci]);
          for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(b, wv[v], acc[i][v]);
        }
      }
    }
  float* op = out + ((int64_t)y * W + x0) * Co + co0;
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(op + (int64_t)i * Co + 16 * v, acc[i][v]);
}

template <int NV>
inline void FwdTileN(int xb, const float* pad, int Wp, int Ci, const float* w, int Co, float* out, int W, int y, int x0,
                     int co0) {
#define POFX_CASE(n) \
  case n:            \
    if constexpr (n * NV <= 28) FwdTile<n, NV>(pad, Wp, Ci, w, Co, out, W, y, x0, co0); \
    break;
  switch (xb) {
    POFX_CASE(1) POFX_CASE(2) POFX_CASE(3) POFX_CASE(4) POFX_CASE(5) POFX_CASE(6) POFX_CASE(7) POFX_CASE(8)
    POFX_CASE(9) POFX_CASE(10) POFX_CASE(11) POFX_CASE(12) POFX_CASE(13) POFX_CASE(14)
  }
#undef POFX_CASE
}

// The widest register tile for NV vectors of output channels.
inline int MaxXB(int nv) { return nv == 4 ? 6 : (nv == 2 ? 12 : 14); }
inline int PickNV(int Co) { return Co % 64 == 0 ? 4 : (Co % 32 == 0 ? 2 : 1); }

// One image: out [H, W, Co] from pad [(H+2), (W+2), Ci].
inline void FwdImage(const float* pad, int H, int W, int Ci, const float* w, int Co, float* out) {
  const int nv = PickNV(Co), maxxb = MaxXB(nv), Wp = W + 2;
  const int ntiles = (W + maxxb - 1) / maxxb, xb = (W + ntiles - 1) / ntiles;
  for (int co0 = 0; co0 < Co; co0 += 16 * nv)
    for (int y = 0; y < H; ++y)
      for (int x0 = 0; x0 < W; x0 += xb) {
        const int n = std::min(xb, W - x0);
        if (nv == 4) FwdTileN<4>(n, pad, Wp, Ci, w, Co, out, W, y, x0, co0);
        else if (nv == 2) FwdTileN<2>(n, pad, Wp, Ci, w, Co, out, W, y, x0, co0);
        else FwdTileN<1>(n, pad, Wp, Ci, w, Co, out, W, y, x0, co0);
      }
}

// dw[ky, kx, ci0:ci0+CB, co0:co0+16 NV] += sum_{y,x} pad[y+ky, x+kx, ci] g[y, x, co]
template <int CB, int NV>
inline void WgradTile(const float* __restrict pad, int Wp, int Ci, const float* __restrict g, int H, int W, int Co,
                      float* __restrict dw, int ky, int kx, int ci0, int co0) {
  __m512 acc[CB][NV];
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) acc[c][v] = _mm512_setzero_ps();
  for (int y = 0; y < H; ++y) {
    const float* gp = g + (int64_t)y * W * Co + co0;
    const float* ip = pad + ((int64_t)(y + ky) * Wp + kx) * Ci + ci0;
    for (int x = 0; x < W; ++x) {
      __m512 gv[NV];
      for (int v = 0; v < NV; ++v) gv[v] = _mm512_loadu_ps(gp + (int64_t)x * Co + 16 * v);
      for (int c = 0; c < CB; ++c) {
        const __m512 b = _mm512_set1_ps(ip[(int64_t)x * Ci + c]);
        for (int v = 0; v < NV; ++v) acc[c][v] = _mm512_fmadd_ps(b, gv[v], acc[c][v]);
      }
    }
  }
  float* dp = dw + ((int64_t)(ky * 3 + kx) * Ci + ci0) * Co + co0;
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) {
      float* p = dp + (int64_t)c * Co + 16 * v;
      _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), acc[c][v]));
    }
}

template <int NV>
inline void WgradTileN(int cb, const float* pad, int Wp, int Ci, const float* g, int H, int W, int Co, float* dw, int ky,
                       int kx, int ci0, int co0) {
#define POFX_CASE(n) \
  case n:            \
    if constexpr (n * NV <= 28) WgradTile<n, NV>(pad, Wp, Ci, g, H, W, Co, dw, ky, kx, ci0, co0); \
    break;
  switch (cb) {
    POFX_CASE(1) POFX_CASE(2) POFX_CASE(3) POFX_CASE(4) POFX_CASE(5) POFX_CASE(6) POFX_CASE(7) POFX_CASE(8)
    POFX_CASE(9) POFX_CASE(10) POFX_CASE(11) POFX_CASE(12) POFX_CASE(13) POFX_CASE(14)
  }
#undef POFX_CASE
}

// One image's contribution, added to dw [3, 3, Ci, Co].
inline void WgradImage(const float* pad, int H, int W, int Ci, const float* g, int Co, float* dw) {
  const int nv = PickNV(Co), maxcb = MaxXB(nv), Wp = W + 2;
  const int nt = (Ci + maxcb - 1) / maxcb, cb = (Ci + nt - 1) / nt;
  for (int co0 = 0; co0 < Co; co0 += 16 * nv)
    for (int ci0 = 0; ci0 < Ci; ci0 += cb) {
      const int n = std::min(cb, Ci - ci0);
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) {
          if (nv == 4) WgradTileN<4>(n, pad, Wp, Ci, g, H, W, Co, dw, ky, kx, ci0, co0);
          else if (nv == 2) WgradTileN<2>(n, pad, Wp, Ci, g, H, W, Co, dw, ky, kx, ci0, co0);
          else WgradTileN<1>(n, pad, Wp, Ci, g, H, W, Co, dw, ky, kx, ci0, co0);
        }
    }
}

}  // namespace conv3x3
