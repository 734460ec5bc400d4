// One fused forward tile of block-sparse attention, outside XLA: what the op could cost per tile.
//
//     g++ -O3 -march=native benchmarks/fused_attention_tile.cc -o /tmp/fused_tile && /tmp/fused_tile
//
// A lead for pofx's attention on CPU, not a pofx kernel (x86-64 with AVX-512 only). For one
// (query block, key block, head) tile of the bench model (64 x 64 tokens, head dimension 32) it
// computes S = Q K^T + bias, the online-softmax update of the row maxima m and sums l, and
// O = O * exp(m_old - m_new) + P V, with register-blocked AVX-512 loops (4 query rows x 64 keys
// of scores in 16 registers) and a vector exp (Cephes expf: Cody-Waite reduction, degree-5
// polynomial). It checks one tile against softmax(Q K^T + bias) V in double precision and the
// vector exp against std::exp (exit code 1 if either is off), then times the tile in L1 cache.
// pofx's XLA op spends 10-13 us per tile on the variable workload's forward on two cores
// (`benchmarks/attention_op.py`: 224 block pairs x 8 heads in 18-23 ms); this kernel's figure
// leaves out the gathers of K and V tiles and the mask, which a full kernel adds.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "../pofx/native/vector_exp.h"

// One tile: Q [64 x 32] row-major, Kt [32 x 64] (K transposed), V [64 x 32], bias [64 x 64]
// (0 or -1e30), running row maxima m, sums l and unnormalised output O [64 x 32], updated in place.
__attribute__((noinline)) void tile(const float* __restrict Q, const float* __restrict Kt, const float* __restrict V,
                                    const float* __restrict bias, float* __restrict m, float* __restrict l,
                                    float* __restrict O) {
  alignas(64) float P[4][64];
  for (int i0 = 0; i0 < 64; i0 += 4) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; ++r) for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int d = 0; d < 32; ++d) {
      __m512 k0 = _mm512_load_ps(Kt + d * 64), k1 = _mm512_load_ps(Kt + d * 64 + 16),
             k2 = _mm512_load_ps(Kt + d * 64 + 32), k3 = _mm512_load_ps(Kt + d * 64 + 48);
      for (int r = 0; r < 4; ++r) {
        __m512 q = _mm512_set1_ps(Q[(i0 + r) * 32 + d]);
        acc[r][0] = _mm512_fmadd_ps(q, k0, acc[r][0]); acc[r][1] = _mm512_fmadd_ps(q, k1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(q, k2, acc[r][2]); acc[r][3] = _mm512_fmadd_ps(q, k3, acc[r][3]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      const int i = i0 + r;
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_add_ps(acc[r][c], _mm512_load_ps(bias + i * 64 + c * 16));
      __m512 mx = _mm512_max_ps(_mm512_max_ps(acc[r][0], acc[r][1]), _mm512_max_ps(acc[r][2], acc[r][3]));
      const float m_new = std::max(m[i], _mm512_reduce_max_ps(mx));
      const float scale = std::exp(m[i] - m_new);
      __m512 mn = _mm512_set1_ps(m_new), sum = _mm512_setzero_ps();
      for (int c = 0; c < 4; ++c) { __m512 p = exp512(_mm512_sub_ps(acc[r][c], mn)); _mm512_store_ps(&P[r][c * 16], p); sum = _mm512_add_ps(sum, p); }
      l[i] = l[i] * scale + _mm512_reduce_add_ps(sum);
      m[i] = m_new;
      __m512 sc = _mm512_set1_ps(scale);
      _mm512_store_ps(O + i * 32, _mm512_mul_ps(_mm512_load_ps(O + i * 32), sc));
      _mm512_store_ps(O + i * 32 + 16, _mm512_mul_ps(_mm512_load_ps(O + i * 32 + 16), sc));
    }
    __m512 o[4][2];
    for (int r = 0; r < 4; ++r) { o[r][0] = _mm512_load_ps(O + (i0 + r) * 32); o[r][1] = _mm512_load_ps(O + (i0 + r) * 32 + 16); }
    for (int j = 0; j < 64; ++j) {
      __m512 v0 = _mm512_load_ps(V + j * 32), v1 = _mm512_load_ps(V + j * 32 + 16);
      for (int r = 0; r < 4; ++r) {
        __m512 p = _mm512_set1_ps(P[r][j]);
        o[r][0] = _mm512_fmadd_ps(p, v0, o[r][0]); o[r][1] = _mm512_fmadd_ps(p, v1, o[r][1]);
      }
    }
    for (int r = 0; r < 4; ++r) { _mm512_store_ps(O + (i0 + r) * 32, o[r][0]); _mm512_store_ps(O + (i0 + r) * 32 + 16, o[r][1]); }
  }
}
int main() {
  alignas(64) static float Q[64 * 32], Kt[32 * 64], V[64 * 32], bias[64 * 64], O[64 * 32], m[64], l[64];
  unsigned state = 12345u;
  auto rnd = [&]() { state = state * 1664525u + 1013904223u; return (state >> 8) * (1.0f / 16777216.0f) - 0.5f; };
  for (int i = 0; i < 64 * 32; ++i) { Q[i] = rnd(); Kt[i] = 4.0f * rnd(); V[i] = rnd(); }
  for (int i = 0; i < 64 * 64; ++i) bias[i] = (i % 64) <= (i / 64) ? 0.f : -1e30f;   // causal tile
  for (int i = 0; i < 64; ++i) { m[i] = -3e38f; l[i] = 0; }
  for (int i = 0; i < 64 * 32; ++i) O[i] = 0;
  tile(Q, Kt, V, bias, m, l, O);
  double max_err = 0;   // against softmax(Q K^T + bias) V in double precision
  for (int i = 0; i < 64; ++i) {
    double s[64], mx = -1e300, sum = 0;
    for (int j = 0; j < 64; ++j) {
      s[j] = bias[i * 64 + j];
      for (int d = 0; d < 32; ++d) s[j] += double(Q[i * 32 + d]) * Kt[d * 64 + j];
      mx = std::max(mx, s[j]);
    }
    for (int j = 0; j < 64; ++j) { s[j] = std::exp(s[j] - mx); sum += s[j]; }
    for (int d = 0; d < 32; ++d) {
      double o = 0;
      for (int j = 0; j < 64; ++j) o += s[j] * V[j * 32 + d];
      max_err = std::max(max_err, std::fabs(o / sum - O[i * 32 + d] / l[i]));
    }
  }
  printf("max abs error against double precision: %.2e\n", max_err);
  const int R = 100000;
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < R; ++r) { Q[r % 2048] += 1e-7f; tile(Q, Kt, V, bias, m, l, O); }
  double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  printf("fused forward tile (64 x 64, head dim 32): %.2f us per tile, %.1f GFLOP/s on one core "
         "(2 dots of 2 * 64 * 64 * 32 FLOP counted)\n", sec / R * 1e6, 2.0 * 2 * 64 * 64 * 32 * R / sec / 1e9);
  float maxrel = 0;
  for (float x = -87; x < 0.5f; x += 0.0137f) {
    alignas(64) float buf[16];
    _mm512_store_ps(buf, exp512(_mm512_set1_ps(x)));
    maxrel = std::max(maxrel, float(std::fabs(buf[0] - std::exp(double(x))) / std::exp(double(x))));
  }
  printf("vector exp: max relative error %.2e on [-87, 0.5]\n", maxrel);
  return max_err < 1e-5 && maxrel < 1e-6 ? 0 : 1;
}
