// 3x3 convolutions with one pixel of zero padding on every side, stride 1 or 2, NHWC input, HWIO
// kernel, float32, by AVX-512 register tiles: the kernels behind pofx_backends.cpu.native.conv3x3
// (conv3x3.cc registers them with XLA's FFI).
//
//   forward:         y[b, y, x, co] = sum_{ky, kx, ci} xp[b, S y + ky, S x + kx, ci] w[ky, kx, ci, co]
//   kernel gradient: dw[ky, kx, ci, co] = sum_{b, y, x} xp[b, S y + ky, S x + kx, ci] g[b, y, x, co]
//
// with xp the input padded by one zero pixel on each side and S the stride; the output has
// (H - 1) / S + 1 rows and (W - 1) / S + 1 columns. At stride 1 the input gradient is the forward
// with the kernel flipped in space and its channel axes swapped (conv3x3.cc builds that kernel).
//
// Wide outputs (Co a multiple of 16). Forward: a tile of XB output pixels of one row times 16 NV
// output channels stays in XB * NV vector registers while the 9 Ci input values under each pixel
// are broadcast against one kernel row each (the direct convolution's register blocking). Kernel
// gradient: a tile of CB input channels times 16 NV output channels of one kernel tap accumulates
// over an image's pixels. Any Ci.
//
// Narrow outputs (Co < 16, Ci a multiple of 16: a U-Net's last convolution to one channel, or the
// input gradient of its first one). The three taps of a kernel row read 3 Ci contiguous input
// values, so each output value is a dot product of 3 contiguous vectors of 3 Ci floats with the
// kernel's rows for its channel (the caller passes the kernel as [Co, 3, 3 Ci]); PX pixels at a
// time keep independent accumulators. Kernel gradient: per output channel and kernel row, the 3 Ci
// kernel entries accumulate in vector registers over the pixels, each pixel's gradient broadcast.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>
namespace conv3x3 {

inline int OutSize(int n, int stride) { return (n - 1) / stride + 1; }

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

// out[y:y+R, x0:x0+XB, co0:co0+16 NV] = sum_{ky,kx,ci} pad[S y'+ky, S x+kx, ci] w[ky, kx, ci, co]
// for the R output rows y' from y: R XB pixels share each kernel row loaded.
template <int R, int XB, int NV, int S>
inline void FwdTile(const float* __restrict pad, int Wp, int Ci, const float* __restrict w, int Co,
                    float* __restrict out, int Wo, int y, int x0, int co0) {
  __m512 acc[R][XB][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < XB; ++i)
      for (int v = 0; v < NV; ++v) acc[r][i][v] = _mm512_setzero_ps();
  const int64_t in_row = (int64_t)S * Wp * Ci;
  for (int ky = 0; ky < 3; ++ky)
    for (int kx = 0; kx < 3; ++kx) {
      const float* ip = pad + ((int64_t)(S * y + ky) * Wp + S * x0 + kx) * Ci;
      const float* wp = w + (int64_t)(ky * 3 + kx) * Ci * Co + co0;
      for (int ci = 0; ci < Ci; ++ci) {
        __m512 wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wp + (int64_t)ci * Co + 16 * v);
        for (int r = 0; r < R; ++r)
          for (int i = 0; i < XB; ++i) {
            const __m512 b = _mm512_set1_ps(ip[r * in_row + (int64_t)i * S * Ci + ci]);
            for (int v = 0; v < NV; ++v) acc[r][i][v] = _mm512_fmadd_ps(b, wv[v], acc[r][i][v]);
          }
      }
    }
  for (int r = 0; r < R; ++r) {
    float* op = out + ((int64_t)(y + r) * Wo + x0) * Co + co0;
    for (int i = 0; i < XB; ++i)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(op + (int64_t)i * Co + 16 * v, acc[r][i][v]);
  }
}

// The register tile's pixels: at most 24 accumulators (12 pixels of 32 channels, 24 of 16).
inline int MaxPixels(int nv) { return nv == 2 ? 12 : 24; }
// 16 NV output channels per tile: 32 where Co allows (a wider tile would stream more of the kernel
// per pixel than L1 holds for the 64-channel layers), else 16.
inline int PickNV(int Co) { return Co % 32 == 0 ? 2 : 1; }

template <int NV, int S>
inline void FwdTileN(int rows, int xb, const float* pad, int Wp, int Ci, const float* w, int Co, float* out, int Wo,
                     int y, int x0, int co0) {
#define POFX_CASE(r, n)                                                                             \
  case r * 32 + n:                                                                                  \
    if constexpr (r * n <= (NV == 2 ? 12 : 24) && (r == 1 || (NV == 2 && S == 1)))                       \
      FwdTile<r, n, NV, S>(pad, Wp, Ci, w, Co, out, Wo, y, x0, co0);                                         \
    break;
#define POFX_ROW(r) \
  POFX_CASE(r, 1) POFX_CASE(r, 2) POFX_CASE(r, 3) POFX_CASE(r, 4) POFX_CASE(r, 5) POFX_CASE(r, 6) POFX_CASE(r, 7) \
  POFX_CASE(r, 8) POFX_CASE(r, 9) POFX_CASE(r, 10) POFX_CASE(r, 11) POFX_CASE(r, 12) POFX_CASE(r, 13) POFX_CASE(r, 14)
  switch (rows * 32 + xb) {
    POFX_ROW(1) POFX_ROW(2) POFX_ROW(3)
  }
#undef POFX_ROW
#undef POFX_CASE
}

// The tile's shape for Ho x Wo outputs: xb pixels of a row (the row cut into n equal tiles) times
// rows (at most max_rows), the most pixels per tile on average over the image (MaxPixels at most).
// Several rows only for 32-channel tiles at stride 1 (the U-Net's main layers), which keeps the
// number of tile shapes compiled down.
inline void TileShape(int Ho, int Wo, int nv, int max_rows, int* rows, int* xb) {
  const int most = MaxPixels(nv);
  double best = -1;
  for (int n = 1; n <= Wo; ++n) {
    const int x = (Wo + n - 1) / n;
    if (x > 14) continue;
    const int r = std::max(1, std::min({max_rows, Ho, most / x}));
    if (x * r > most) continue;
    const int tiles = ((Ho + r - 1) / r) * ((Wo + x - 1) / x);
    const double per_tile = double(Ho) * Wo / tiles;
    if (per_tile > best + 1e-9) best = per_tile, *rows = r, *xb = x;
    if (x == 1) break;
  }
}

// One image, Co a multiple of 16: out [Ho, Wo, Co] from pad [(H+2), (W+2), Ci].
template <int S>
inline void FwdImageS(const float* pad, int H, int W, int Ci, const float* w, int Co, float* out) {
  const int nv = PickNV(Co), Wp = W + 2, Ho = OutSize(H, S), Wo = OutSize(W, S);
  int rows, xb;
  TileShape(Ho, Wo, nv, nv == 2 && S == 1 ? 3 : 1, &rows, &xb);
  for (int co0 = 0; co0 < Co; co0 += 16 * nv)
    for (int y = 0; y < Ho; y += rows) {
      const int r = std::min(rows, Ho - y);
      for (int x0 = 0; x0 < Wo; x0 += xb) {
        const int n = std::min(xb, Wo - x0);
        if (nv == 2) FwdTileN<2, S>(r, n, pad, Wp, Ci, w, Co, out, Wo, y, x0, co0);
        else FwdTileN<1, S>(r, n, pad, Wp, Ci, w, Co, out, Wo, y, x0, co0);
      }
    }
}

inline void FwdImage(const float* pad, int H, int W, int Ci, const float* w, int Co, float* out, int stride) {
  if (stride == 2) FwdImageS<2>(pad, H, W, Ci, w, Co, out);
  else FwdImageS<1>(pad, H, W, Ci, w, Co, out);
}

// Narrow forward, PX pixels of one row from x0: out[y, x, co] = sum_ky <pad row (S y+ky) from
// column S x, 3 Ci floats>, wn[co, ky, :]>, with wn [Co, 3, 3 Ci].
template <int PX, int S>
inline void FwdNarrowPixels(const float* __restrict pad, int Wp, int Ci, const float* __restrict wn, int Co,
                            float* __restrict out, int Wo, int y, int x0) {
  const int row = 3 * Ci, nvec = row / 16;
  for (int co = 0; co < Co; ++co) {
    __m512 acc[PX];
    for (int p = 0; p < PX; ++p) acc[p] = _mm512_setzero_ps();
    for (int ky = 0; ky < 3; ++ky) {
      const float* ip = pad + ((int64_t)(S * y + ky) * Wp + S * x0) * Ci;
      const float* wp = wn + ((int64_t)co * 3 + ky) * row;
      for (int j = 0; j < nvec; ++j) {
        const __m512 wv = _mm512_loadu_ps(wp + 16 * j);
        for (int p = 0; p < PX; ++p)
          acc[p] = _mm512_fmadd_ps(_mm512_loadu_ps(ip + (int64_t)p * S * Ci + 16 * j), wv, acc[p]);
      }
    }
    float* op = out + ((int64_t)y * Wo + x0) * Co + co;
    for (int p = 0; p < PX; ++p) op[(int64_t)p * Co] = _mm512_reduce_add_ps(acc[p]);
  }
}

template <int S>
inline void FwdNarrowImageS(const float* pad, int H, int W, int Ci, const float* wn, int Co, float* out) {
  const int Wp = W + 2, Ho = OutSize(H, S), Wo = OutSize(W, S);
  for (int y = 0; y < Ho; ++y) {
    int x = 0;
    for (; x + 4 <= Wo; x += 4) FwdNarrowPixels<4, S>(pad, Wp, Ci, wn, Co, out, Wo, y, x);
    for (; x < Wo; ++x) FwdNarrowPixels<1, S>(pad, Wp, Ci, wn, Co, out, Wo, y, x);
  }
}

inline void FwdNarrowImage(const float* pad, int H, int W, int Ci, const float* wn, int Co, float* out, int stride) {
  if (stride == 2) FwdNarrowImageS<2>(pad, H, W, Ci, wn, Co, out);
  else FwdNarrowImageS<1>(pad, H, W, Ci, wn, Co, out);
}

// dw[ky, kx, ci0:ci0+CB, co0:co0+16 NV] += sum_{y,x} pad[S y+ky, S x+kx, ci] g[y, x, co]
template <int CB, int NV, int S>
inline void WgradTile(const float* __restrict pad, int Wp, int Ci, const float* __restrict g, int Ho, int Wo, int Co,
                      float* __restrict dw, int ky, int kx, int ci0, int co0) {
  __m512 acc[CB][NV];
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) acc[c][v] = _mm512_setzero_ps();
  for (int y = 0; y < Ho; ++y) {
    const float* gp = g + (int64_t)y * Wo * Co + co0;
    const float* ip = pad + ((int64_t)(S * y + ky) * Wp + kx) * Ci + ci0;
    for (int x = 0; x < Wo; ++x) {
      __m512 gv[NV];
      for (int v = 0; v < NV; ++v) gv[v] = _mm512_loadu_ps(gp + (int64_t)x * Co + 16 * v);
      for (int c = 0; c < CB; ++c) {
        const __m512 b = _mm512_set1_ps(ip[(int64_t)x * S * Ci + c]);
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

template <int NV, int S>
inline void WgradTileN(int cb, const float* pad, int Wp, int Ci, const float* g, int Ho, int Wo, int Co, float* dw,
                       int ky, int kx, int ci0, int co0) {
#define POFX_CASE(n) \
  case n:            \
    if constexpr (n * NV <= 28) WgradTile<n, NV, S>(pad, Wp, Ci, g, Ho, Wo, Co, dw, ky, kx, ci0, co0); \
    break;
  switch (cb) {
    POFX_CASE(1) POFX_CASE(2) POFX_CASE(3) POFX_CASE(4) POFX_CASE(5) POFX_CASE(6) POFX_CASE(7) POFX_CASE(8)
    POFX_CASE(9) POFX_CASE(10) POFX_CASE(11) POFX_CASE(12) POFX_CASE(13) POFX_CASE(14)
  }
#undef POFX_CASE
}

// One image's contribution, Co a multiple of 16, added to dw [3, 3, Ci, Co].
template <int S>
inline void WgradImageS(const float* pad, int H, int W, int Ci, const float* g, int Co, float* dw) {
  const int nv = Co % 64 == 0 ? 4 : (Co % 32 == 0 ? 2 : 1), maxcb = nv == 4 ? 6 : (nv == 2 ? 12 : 14);
  const int Wp = W + 2, Ho = OutSize(H, S), Wo = OutSize(W, S);
  const int nt = (Ci + maxcb - 1) / maxcb, cb = (Ci + nt - 1) / nt;
  for (int co0 = 0; co0 < Co; co0 += 16 * nv)
    for (int ci0 = 0; ci0 < Ci; ci0 += cb) {
      const int n = std::min(cb, Ci - ci0);
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) {
          if (nv == 4) WgradTileN<4, S>(n, pad, Wp, Ci, g, Ho, Wo, Co, dw, ky, kx, ci0, co0);
          else if (nv == 2) WgradTileN<2, S>(n, pad, Wp, Ci, g, Ho, Wo, Co, dw, ky, kx, ci0, co0);
          else WgradTileN<1, S>(n, pad, Wp, Ci, g, Ho, Wo, Co, dw, ky, kx, ci0, co0);
        }
    }
}

inline void WgradImage(const float* pad, int H, int W, int Ci, const float* g, int Co, float* dw, int stride) {
  if (stride == 2) WgradImageS<2>(pad, H, W, Ci, g, Co, dw);
  else WgradImageS<1>(pad, H, W, Ci, g, Co, dw);
}

// Narrow kernel gradient: dwn[co, ky, j0:j0+16 NJ] += sum_{y,x} pad row (S y+ky) from column S x
// [j] g[y, x, co], over the 3 Ci floats j of a kernel row (dwn [Co, 3, 3 Ci]).
template <int NJ, int S>
inline void WgradNarrowRow(const float* __restrict pad, int Wp, int Ci, const float* __restrict g, int Ho, int Wo,
                           int Co, float* __restrict dwn, int co, int ky, int j0) {
  __m512 acc[NJ];
  for (int j = 0; j < NJ; ++j) acc[j] = _mm512_setzero_ps();
  for (int y = 0; y < Ho; ++y) {
    const float* ip = pad + ((int64_t)(S * y + ky) * Wp) * Ci + j0;
    const float* gp = g + (int64_t)y * Wo * Co + co;
    for (int x = 0; x < Wo; ++x) {
      const __m512 b = _mm512_set1_ps(gp[(int64_t)x * Co]);
      for (int j = 0; j < NJ; ++j)
        acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(ip + (int64_t)x * S * Ci + 16 * j), b, acc[j]);
    }
  }
  float* dp = dwn + ((int64_t)co * 3 + ky) * 3 * Ci + j0;
  for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(dp + 16 * j, _mm512_add_ps(_mm512_loadu_ps(dp + 16 * j), acc[j]));
}

template <int S>
inline void WgradNarrowImageS(const float* pad, int H, int W, int Ci, const float* g, int Co, float* dwn) {
  const int Wp = W + 2, Ho = OutSize(H, S), Wo = OutSize(W, S), nvec = 3 * Ci / 16;
  for (int co = 0; co < Co; ++co)
    for (int ky = 0; ky < 3; ++ky) {
      int j = 0;
      for (; j + 8 <= nvec; j += 8) WgradNarrowRow<8, S>(pad, Wp, Ci, g, Ho, Wo, Co, dwn, co, ky, 16 * j);
      for (; j + 4 <= nvec; j += 4) WgradNarrowRow<4, S>(pad, Wp, Ci, g, Ho, Wo, Co, dwn, co, ky, 16 * j);
      for (; j < nvec; ++j) WgradNarrowRow<1, S>(pad, Wp, Ci, g, Ho, Wo, Co, dwn, co, ky, 16 * j);
    }
}

inline void WgradNarrowImage(const float* pad, int H, int W, int Ci, const float* g, int Co, float* dwn, int stride) {
  if (stride == 2) WgradNarrowImageS<2>(pad, H, W, Ci, g, Co, dwn);
  else WgradNarrowImageS<1>(pad, H, W, Ci, g, Co, dwn);
}


// Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, arXiv:1509.09308, section 4.1) for
// the stride-1 forward on even H and W (WinogradApplies): each 2x2 block of outputs of a
// channel pair is Y = A^T [(G g G^T) . (B^T d B)] A over the 4x4 input block d under it, with
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1],
// so the sum over input channels becomes 16 products [tiles, Ci] x [Ci, Co] (one per position of
// the 4x4 transformed block) of 16 multiply-adds per 2x2 outputs instead of 36: 2.25 times fewer.

// U [16, Ci, Co] = G g G^T of the kernel w [3, 3, Ci, Co].
inline void WinogradKernel(const float* w, int Ci, int Co, float* U) {
  const int64_t plane = (int64_t)Ci * Co;
  for (int64_t i = 0; i < plane; i += 16) {
    __m512 g[3][3];
    for (int ky = 0; ky < 3; ++ky)
      for (int kx = 0; kx < 3; ++kx) g[ky][kx] = _mm512_loadu_ps(w + (ky * 3 + kx) * plane + i);
    const __m512 half = _mm512_set1_ps(0.5f);
    __m512 t[4][3];  // G g
    for (int kx = 0; kx < 3; ++kx) {
      t[0][kx] = g[0][kx];
      t[1][kx] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(g[0][kx], g[1][kx]), g[2][kx]));
      t[2][kx] = _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(g[0][kx], g[1][kx]), g[2][kx]));
      t[3][kx] = g[2][kx];
    }
    for (int r = 0; r < 4; ++r) {  // (G g) G^T
      const __m512 u1 = _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(t[r][0], t[r][1]), t[r][2]));
      const __m512 u2 = _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(t[r][0], t[r][1]), t[r][2]));
      _mm512_storeu_ps(U + (r * 4 + 0) * plane + i, t[r][0]);
      _mm512_storeu_ps(U + (r * 4 + 1) * plane + i, u1);
      _mm512_storeu_ps(U + (r * 4 + 2) * plane + i, u2);
      _mm512_storeu_ps(U + (r * 4 + 3) * plane + i, t[r][2]);
    }
  }
}

// V [16, P, Ci] at tile p: B^T d B of the 4x4 block of pad [(H+2), (W+2), Ci] from (2 ty, 2 tx).
inline void WinogradInputTile(const float* pad, int Wp, int Ci, int ty, int tx, float* V, int64_t P, int64_t p) {
  const float* d0 = pad + ((int64_t)(2 * ty) * Wp + 2 * tx) * Ci;
  const int64_t row = (int64_t)Wp * Ci, plane = P * Ci;
  for (int c = 0; c < Ci; c += 16) {
    const __mmask16 m = Ci - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (Ci - c)) - 1);
    __m512 d[4][4], t[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) d[i][j] = _mm512_maskz_loadu_ps(m, d0 + i * row + j * Ci + c);
    for (int j = 0; j < 4; ++j) {  // B^T d
      t[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
      t[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
      t[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
      t[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
    }
    float* v = V + p * Ci + c;
    for (int i = 0; i < 4; ++i) {  // (B^T d) B
      _mm512_mask_storeu_ps(v + (i * 4 + 0) * plane, m, _mm512_sub_ps(t[i][0], t[i][2]));
      _mm512_mask_storeu_ps(v + (i * 4 + 1) * plane, m, _mm512_add_ps(t[i][1], t[i][2]));
      _mm512_mask_storeu_ps(v + (i * 4 + 2) * plane, m, _mm512_sub_ps(t[i][2], t[i][1]));
      _mm512_mask_storeu_ps(v + (i * 4 + 3) * plane, m, _mm512_sub_ps(t[i][1], t[i][3]));
    }
  }
}

// out[2 ty : 2 ty + 2, 2 tx : 2 tx + 2, :] = A^T m A of M [16, P, Co] at tile p (out [H, W, Co]).
inline void WinogradOutputTile(const float* M, int64_t P, int64_t p, int Co, float* out, int W, int ty, int tx) {
  const int64_t plane = P * Co;
  float* o = out + ((int64_t)(2 * ty) * W + 2 * tx) * Co;
  for (int c = 0; c < Co; c += 16) {
    __m512 m[4][4], s[2][4];
    for (int k = 0; k < 16; ++k) m[k / 4][k % 4] = _mm512_loadu_ps(M + k * plane + p * Co + c);
    for (int j = 0; j < 4; ++j) {  // A^T m
      s[0][j] = _mm512_add_ps(_mm512_add_ps(m[0][j], m[1][j]), m[2][j]);
      s[1][j] = _mm512_sub_ps(_mm512_sub_ps(m[1][j], m[2][j]), m[3][j]);
    }
    for (int i = 0; i < 2; ++i) {  // (A^T m) A
      _mm512_storeu_ps(o + (int64_t)i * W * Co + c, _mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]));
      _mm512_storeu_ps(o + ((int64_t)i * W + 1) * Co + c, _mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]));
    }
  }
}

// C[p0 : p0 + R, co0 : co0 + 16 NV] = A[p0 : p0 + R, :] B[:, co0 : ...] for A [P, K], B [K, N], C [P, N].
template <int R, int NV>
inline void ProductTile(const float* __restrict A, int K, const float* __restrict B, int N, float* __restrict C,
                        int64_t p0, int co0) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* a = A + p0 * K;
  for (int k = 0; k < K; ++k) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + (int64_t)k * N + co0 + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[(int64_t)r * K + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + (p0 + r) * N + co0 + 16 * v, acc[r][v]);
}

template <int NV>
inline void ProductTileN(int rows, const float* A, int K, const float* B, int N, float* C, int64_t p0, int co0) {
#define POFX_CASE(n) \
  case n:            \
    if constexpr (n * NV <= 24) ProductTile<n, NV>(A, K, B, N, C, p0, co0); \
    break;
  switch (rows) {
    POFX_CASE(1) POFX_CASE(2) POFX_CASE(3) POFX_CASE(4) POFX_CASE(5) POFX_CASE(6) POFX_CASE(7) POFX_CASE(8)
    POFX_CASE(9) POFX_CASE(10) POFX_CASE(11) POFX_CASE(12) POFX_CASE(13) POFX_CASE(14) POFX_CASE(15) POFX_CASE(16)
    POFX_CASE(17) POFX_CASE(18) POFX_CASE(19) POFX_CASE(20) POFX_CASE(21) POFX_CASE(22) POFX_CASE(23) POFX_CASE(24)
  }
#undef POFX_CASE
}

// Whether Winograd's F(2x2, 3x3) applies: stride 1, even H and W, Co a multiple of 16, and at least
// 16 input channels (a first layer's single channel is faster by the direct sums).
inline bool WinogradApplies(int H, int W, int Ci, int Co, int stride) {
  return stride == 1 && H % 2 == 0 && W % 2 == 0 && H > 0 && W > 0 && Co % 16 == 0 && Ci >= 16;
}

// Whether the kernel gradient takes Winograd's form too: only from Ci Co >= 3072. On one thread
// (benchmarks/conv3x3_winograd.cc) its transforms of both the input and the output gradient cost
// more than its products save below that (32 -> 32, 64 -> 32 and 32 -> 64 ran at 0.88-0.96x the
// direct kernel gradient), and it was 1.09-1.48x faster from 96 -> 32 and 64 -> 64 up.
inline bool WinogradKernelGradApplies(int H, int W, int Ci, int Co, int stride) {
  return WinogradApplies(H, W, Ci, Co, stride) && int64_t(Ci) * Co >= 3072;
}

// Buffers of one thread's part: its padded images, and V [16, R, Ci], M [16, R, Co] of one block.
struct WinogradScratch {
  std::vector<float> pad, V, M;
};

// Pads the n images X [n, H, W, Ci] into s.pad and sizes s.V [16, R, Ci] and s.M [16, R, Co] for
// blocks of R tiles; returns the size of one padded image.
inline int64_t WinogradPrepare(const float* X, int n, int H, int W, int Ci, int Co, int R, WinogradScratch& s) {
  const int64_t padded = (int64_t)(H + 2) * (W + 2) * Ci;
  s.pad.resize(size_t(n) * padded);
  s.V.resize(size_t(16) * R * Ci);
  s.M.resize(size_t(16) * R * Co);
  for (int b = 0; b < n; ++b) PadImage(X + (int64_t)b * H * W * Ci, H, W, Ci, s.pad.data() + b * padded);
  return padded;
}

// Y [n, H, W, Co] for the n images X [n, H, W, Ci] with U [16, Ci, Co] (WinogradKernel). The n H W / 4
// tiles are taken in blocks of one register tile's rows (12 tiles for 32 output channels at a time,
// 24 for 16), so that a block's transformed inputs and products stay in cache between the input
// transform, the 16 products and the output transform.
inline void WinogradImages(const float* X, int n, int H, int W, int Ci, const float* U, int Co, float* Y,
                           WinogradScratch& s) {
  const int TH = H / 2, TW = W / 2, Wp = W + 2, T = TH * TW, nv = Co % 32 == 0 ? 2 : 1, R = nv == 2 ? 12 : 24;
  const int64_t padded = WinogradPrepare(X, n, H, W, Ci, Co, R, s), P = (int64_t)n * T;
  for (int64_t p0 = 0; p0 < P; p0 += R) {
    const int r = int(std::min<int64_t>(R, P - p0));
    for (int i = 0; i < r; ++i) {
      const int64_t p = p0 + i, b = p / T, ty = (p % T) / TW, tx = p % TW;
      WinogradInputTile(s.pad.data() + b * padded, Wp, Ci, int(ty), int(tx), s.V.data(), r, i);
    }
    for (int k = 0; k < 16; ++k)
      for (int co0 = 0; co0 < Co; co0 += 16 * nv) {
        const float *A = s.V.data() + (int64_t)k * r * Ci, *B = U + (int64_t)k * Ci * Co;
        float* C = s.M.data() + (int64_t)k * r * Co;
        if (nv == 2) ProductTileN<2>(r, A, Ci, B, Co, C, 0, co0);
        else ProductTileN<1>(r, A, Ci, B, Co, C, 0, co0);
      }
    for (int i = 0; i < r; ++i) {
      const int64_t p = p0 + i, b = p / T, ty = (p % T) / TW, tx = p % TW;
      WinogradOutputTile(s.M.data(), r, i, Co, Y + b * H * W * Co, W, int(ty), int(tx));
    }
  }
}

// The kernel gradient by the same transforms: with M = U . V per tile and Y = A^T M A,
//   dU = sum_tiles (B^T d B) . (A dY A^T),   dw = G^T dU G,
// so the sum over the batch's pixels becomes 16 products [Ci, tiles] x [tiles, Co].

// Gt [16, R, Co] at tile p: A dY A^T of the 2x2 block of g [H, W, Co] from (2 ty, 2 tx), with
// A dY A^T = [a, a+b, a-b, -b] per row (a, b) of A dY = [g0; g0 + g1; g0 - g1; -g1].
inline void WinogradGradTile(const float* g, int W, int Co, int ty, int tx, float* Gt, int64_t R, int64_t p) {
  const float* g0 = g + ((int64_t)(2 * ty) * W + 2 * tx) * Co;
  const int64_t plane = R * Co;
  for (int c = 0; c < Co; c += 16) {
    const __m512 a0 = _mm512_loadu_ps(g0 + c), b0 = _mm512_loadu_ps(g0 + Co + c);
    const __m512 a1 = _mm512_loadu_ps(g0 + (int64_t)W * Co + c), b1 = _mm512_loadu_ps(g0 + ((int64_t)W + 1) * Co + c);
    const __m512 rows[4][2] = {{a0, b0},
                               {_mm512_add_ps(a0, a1), _mm512_add_ps(b0, b1)},
                               {_mm512_sub_ps(a0, a1), _mm512_sub_ps(b0, b1)},
                               {_mm512_sub_ps(_mm512_setzero_ps(), a1), _mm512_sub_ps(_mm512_setzero_ps(), b1)}};
    float* o = Gt + p * Co + c;
    for (int i = 0; i < 4; ++i) {
      const __m512 a = rows[i][0], b = rows[i][1];
      _mm512_storeu_ps(o + (i * 4 + 0) * plane, a);
      _mm512_storeu_ps(o + (i * 4 + 1) * plane, _mm512_add_ps(a, b));
      _mm512_storeu_ps(o + (i * 4 + 2) * plane, _mm512_sub_ps(a, b));
      _mm512_storeu_ps(o + (i * 4 + 3) * plane, _mm512_sub_ps(_mm512_setzero_ps(), b));
    }
  }
}

// dU[ci0:ci0+CB, co0:co0+16 NV] += sum_p V[p, ci] Gt[p, co] for V [R, Ci], Gt [R, Co], dU [Ci, Co].
template <int CB, int NV>
inline void WinogradWgradTile(const float* __restrict V, int64_t R, int Ci, const float* __restrict Gt, int Co,
                              float* __restrict dU, int ci0, int co0) {
  __m512 acc[CB][NV];
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) acc[c][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < R; ++p) {
    __m512 gv[NV];
    for (int v = 0; v < NV; ++v) gv[v] = _mm512_loadu_ps(Gt + p * Co + co0 + 16 * v);
    const float* vp = V + p * Ci + ci0;
    for (int c = 0; c < CB; ++c) {
      const __m512 b = _mm512_set1_ps(vp[c]);
      for (int v = 0; v < NV; ++v) acc[c][v] = _mm512_fmadd_ps(b, gv[v], acc[c][v]);
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) {
      float* d = dU + (int64_t)(ci0 + c) * Co + co0 + 16 * v;
      _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), acc[c][v]));
    }
}

template <int NV>
inline void WinogradWgradTileN(int cb, const float* V, int64_t R, int Ci, const float* Gt, int Co, float* dU, int ci0,
                               int co0) {
#define POFX_CASE(n) \
  case n:            \
    if constexpr (n * NV <= 24) WinogradWgradTile<n, NV>(V, R, Ci, Gt, Co, dU, ci0, co0); \
    break;
  switch (cb) {
    POFX_CASE(1) POFX_CASE(2) POFX_CASE(3) POFX_CASE(4) POFX_CASE(5) POFX_CASE(6) POFX_CASE(7) POFX_CASE(8)
    POFX_CASE(9) POFX_CASE(10) POFX_CASE(11) POFX_CASE(12) POFX_CASE(13) POFX_CASE(14) POFX_CASE(15) POFX_CASE(16)
    POFX_CASE(17) POFX_CASE(18) POFX_CASE(19) POFX_CASE(20) POFX_CASE(21) POFX_CASE(22) POFX_CASE(23) POFX_CASE(24)
  }
#undef POFX_CASE
}

// dU [16, Ci, Co] += the n images' contributions (X [n, H, W, Ci], G [n, H, W, Co]), in blocks of
// 48 tiles whose transforms stay in cache through their 16 products.
inline void WinogradWgradImages(const float* X, const float* G, int n, int H, int W, int Ci, int Co, float* dU,
                                WinogradScratch& s) {
  const int TH = H / 2, TW = W / 2, Wp = W + 2, T = TH * TW, nv = Co % 32 == 0 ? 2 : 1;
  const int most = nv == 2 ? 12 : 24, nt = (Ci + most - 1) / most, cb = (Ci + nt - 1) / nt;
  constexpr int R = 48;
  const int64_t padded = WinogradPrepare(X, n, H, W, Ci, Co, R, s), P = (int64_t)n * T;
  for (int64_t p0 = 0; p0 < P; p0 += R) {
    const int r = int(std::min<int64_t>(R, P - p0));
    for (int i = 0; i < r; ++i) {
      const int64_t p = p0 + i, b = p / T, ty = (p % T) / TW, tx = p % TW;
      WinogradInputTile(s.pad.data() + b * padded, Wp, Ci, int(ty), int(tx), s.V.data(), r, i);
      WinogradGradTile(G + b * H * W * Co, W, Co, int(ty), int(tx), s.M.data(), r, i);
    }
    for (int k = 0; k < 16; ++k) {
      const float *V = s.V.data() + (int64_t)k * r * Ci, *Gt = s.M.data() + (int64_t)k * r * Co;
      float* d = dU + (int64_t)k * Ci * Co;
      for (int co0 = 0; co0 < Co; co0 += 16 * nv)
        for (int ci0 = 0; ci0 < Ci; ci0 += cb) {
          const int c = std::min(cb, Ci - ci0);
          if (nv == 2) WinogradWgradTileN<2>(c, V, r, Ci, Gt, Co, d, ci0, co0);
          else WinogradWgradTileN<1>(c, V, r, Ci, Gt, Co, d, ci0, co0);
        }
    }
  }
}

// dw [3, 3, Ci, Co] = G^T dU G of dU [16, Ci, Co], G^T = [1 1/2 1/2 0; 0 1/2 -1/2 0; 0 1/2 1/2 1].
inline void WinogradKernelGrad(const float* dU, int Ci, int Co, float* dw) {
  const int64_t plane = (int64_t)Ci * Co;
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t i = 0; i < plane; i += 16) {
    __m512 u[4][4], t[3][4];
    for (int k = 0; k < 16; ++k) u[k / 4][k % 4] = _mm512_loadu_ps(dU + k * plane + i);
    for (int j = 0; j < 4; ++j) {  // G^T dU
      t[0][j] = _mm512_add_ps(u[0][j], _mm512_mul_ps(half, _mm512_add_ps(u[1][j], u[2][j])));
      t[1][j] = _mm512_mul_ps(half, _mm512_sub_ps(u[1][j], u[2][j]));
      t[2][j] = _mm512_add_ps(_mm512_mul_ps(half, _mm512_add_ps(u[1][j], u[2][j])), u[3][j]);
    }
    for (int r = 0; r < 3; ++r) {  // (G^T dU) G
      _mm512_storeu_ps(dw + (r * 3 + 0) * plane + i,
                       _mm512_add_ps(t[r][0], _mm512_mul_ps(half, _mm512_add_ps(t[r][1], t[r][2]))));
      _mm512_storeu_ps(dw + (r * 3 + 1) * plane + i, _mm512_mul_ps(half, _mm512_sub_ps(t[r][1], t[r][2])));
      _mm512_storeu_ps(dw + (r * 3 + 2) * plane + i,
                       _mm512_add_ps(_mm512_mul_ps(half, _mm512_add_ps(t[r][1], t[r][2])), t[r][3]));
    }
  }
}

}  // namespace conv3x3
