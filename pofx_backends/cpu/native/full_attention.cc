// Full (unmasked) softmax attention over short rows, forward and backward, by AVX-512 vectors,
// registered with XLA's FFI (pofx_backends.cpu.native.full_attention): the attention injection
// point's `mask=None` (every query sees every key; a diffusion U-Net's self- and cross-attention).
//
// q [B, Lq, K, G, D] (K key/value heads, G query heads per key/value head), k, v [B, Lk, K, D]:
//   s_ij = scale q_i . k_j,  lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i),  o_i = sum_j p_ij v_j.
// Backward, from do (Dao et al. 2022, arXiv:2205.14135, Algorithm 4, without the tiling):
//   dv_j = sum_i p_ij do_i,  dp_ij = do_i . v_j,  delta_i = do_i . o_i,  ds_ij = p_ij (dp_ij - delta_i),
//   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i   (summed over the G query heads).
// One (image, key/value head) at a time: its keys and values transposed into [D, Lk] tables that
// stay in L1, blocks of QB queries whose scores row fits in a buffer of Lk floats each. The
// (image, head) items are split over XLA's intra-op threads (thread_parts.h). D in {16, 32, 64},
// Lk <= 512 (the caller sends everything else to XLA).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#include "vector_exp.h"
#include "thread_parts.h"
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
namespace {

constexpr int kMaxKeys = 512;

inline int Padded(int L) { return (L + 15) / 16 * 16; }
inline __mmask16 TailMask(int n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// dst [D, Lp] = rows^T for L rows of width D at stride rs; zero beyond L.
void Transpose(const float* rows, int64_t rs, int L, int D, int Lp, float* dst) {
  for (int d = 0; d < D; ++d) {
    float* o = dst + int64_t(d) * Lp;
    for (int j = 0; j < L; ++j) o[j] = rows[j * rs + d];
    for (int j = L; j < Lp; ++j) o[j] = 0.0f;
  }
}

// out [QB, Lp] = scale * a [QB rows at stride as, width D] . cols [D, Lp].
template <int QB>
void RowsDotCols(const float* a, int64_t as, int D, const float* cols, int Lp, float scale, float* out) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int j0 = 0; j0 < Lp; j0 += 16) {
    __m512 acc[QB];
    for (int i = 0; i < QB; ++i) acc[i] = _mm512_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const __m512 c = _mm512_loadu_ps(cols + int64_t(d) * Lp + j0);
      for (int i = 0; i < QB; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * as + d]), c, acc[i]);
    }
    for (int i = 0; i < QB; ++i) _mm512_storeu_ps(out + int64_t(i) * Lp + j0, _mm512_mul_ps(acc[i], sv));
  }
}

// out_i = rowscale_i * sum_{j < L} w [i, j] rows_j for QB rows of weights (stride Lp) and L rows of
// width 16 DV at stride rs; out_i at out + i * os.
template <int QB, int DV>
void WeightsDotRows(const float* w, int Lp, int L, const float* rows, int64_t rs, const float* rowscale, float* out,
                    int64_t os) {
  __m512 acc[QB][DV];
  for (int i = 0; i < QB; ++i)
    for (int v = 0; v < DV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int j = 0; j < L; ++j) {
    __m512 r[DV];
    for (int v = 0; v < DV; ++v) r[v] = _mm512_loadu_ps(rows + j * rs + 16 * v);
    for (int i = 0; i < QB; ++i) {
      const __m512 b = _mm512_set1_ps(w[int64_t(i) * Lp + j]);
      for (int v = 0; v < DV; ++v) acc[i][v] = _mm512_fmadd_ps(b, r[v], acc[i][v]);
    }
  }
  for (int i = 0; i < QB; ++i) {
    const __m512 s = _mm512_set1_ps(rowscale[i]);
    for (int v = 0; v < DV; ++v) _mm512_storeu_ps(out + i * os + 16 * v, _mm512_mul_ps(acc[i][v], s));
  }
}

// acc_j [L, 16 DV] += sum_i w [i, j] x_i for QB rows x_i (stride xs) of width 16 DV.
template <int QB, int DV>
void AccumulateRows(const float* w, int Lp, int L, const float* x, int64_t xs, float* acc) {
  __m512 xr[QB][DV];
  for (int i = 0; i < QB; ++i)
    for (int v = 0; v < DV; ++v) xr[i][v] = _mm512_loadu_ps(x + i * xs + 16 * v);
  for (int j = 0; j < L; ++j) {
    float* aj = acc + int64_t(j) * 16 * DV;
    __m512 a[DV];
    for (int v = 0; v < DV; ++v) a[v] = _mm512_loadu_ps(aj + 16 * v);
    for (int i = 0; i < QB; ++i) {
      const __m512 b = _mm512_set1_ps(w[int64_t(i) * Lp + j]);
      for (int v = 0; v < DV; ++v) a[v] = _mm512_fmadd_ps(b, xr[i][v], a[v]);
    }
    for (int v = 0; v < DV; ++v) _mm512_storeu_ps(aj + 16 * v, a[v]);
  }
}

// One scores row s [Lp] (the first L real) -> exp(s - shift) in place, zero beyond L; returns the sum.
inline float ExpRow(float* s, int L, float shift) {
  const __m512 m = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int j0 = 0; j0 < L; j0 += 16) {
    const __mmask16 k = TailMask(L - j0);
    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j0), m)));
    _mm512_storeu_ps(s + j0, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

inline float RowMax(const float* s, int L) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int j0 = 0; j0 < L; j0 += 16)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), TailMask(L - j0), s + j0));
  return _mm512_reduce_max_ps(m);
}

inline float Dot(const float* a, const float* b, int D) {
  __m512 acc = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  return _mm512_reduce_add_ps(acc);
}

// The query block size for D = 16 DV (the WeightsDotRows tile holds QB DV + DV vectors).
constexpr int BlockOf(int DV) { return DV == 4 ? 5 : 8; }

// f(std::integral_constant<int, n>()) for a block of 1 <= n <= QB <= 8 queries: the register tiles
// take the block's size as a template argument.
template <int QB, typename F>
void WithRows(int n, const F& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: if constexpr (QB >= 6) f(std::integral_constant<int, 6>()); break;
    case 7: if constexpr (QB >= 7) f(std::integral_constant<int, 7>()); break;
    case 8: if constexpr (QB >= 8) f(std::integral_constant<int, 8>()); break;
  }
}

struct Shape {
  int64_t B, Lq, K, G, Lk;
  int D;
  int64_t q_row() const { return K * G * D; }   // stride between queries of one head
  int64_t kv_row() const { return K * D; }      // stride between keys of one head
  const float* QHead(const float* q, int64_t b, int64_t kh, int64_t g) const { return q + (b * Lq * K + kh) * G * D + g * D; }
  const float* KvHead(const float* k, int64_t b, int64_t kh) const { return k + b * Lk * K * D + kh * D; }
  int64_t LseHead(int64_t b, int64_t kh, int64_t g) const { return ((b * K + kh) * G + g) * Lq; }
};

template <int DV>
void ForwardItem(const Shape& s, float scale, const float* Q, const float* Kp, const float* V, float* O, float* LSE,
                 int64_t b, int64_t kh, float* kt, float* scores, float* inv) {
  constexpr int QB = BlockOf(DV);
  const int Lk = int(s.Lk), Lp = Padded(Lk), D = s.D;
  Transpose(s.KvHead(Kp, b, kh), s.kv_row(), Lk, D, Lp, kt);
  const float* vh = s.KvHead(V, b, kh);
  for (int64_t g = 0; g < s.G; ++g) {
    const float* qh = s.QHead(Q, b, kh, g);
    float* oh = O + (qh - Q);
    float* lse = LSE + s.LseHead(b, kh, g);
    for (int64_t i0 = 0; i0 < s.Lq; i0 += QB) {
      const int n = int(std::min<int64_t>(QB, s.Lq - i0));
      const float* qi = qh + i0 * s.q_row();
      float* oi = oh + i0 * s.q_row();
      WithRows<QB>(n, [&](auto rows) {
        constexpr int N = decltype(rows)::value;
        RowsDotCols<N>(qi, s.q_row(), D, kt, Lp, scale, scores);
        for (int i = 0; i < N; ++i) {
          const float m = RowMax(scores + i * Lp, Lk), l = ExpRow(scores + i * Lp, Lk, m);
          inv[i] = 1.0f / l;
          lse[i0 + i] = m + std::log(l);
        }
        WeightsDotRows<N, DV>(scores, Lp, Lk, vh, s.kv_row(), inv, oi, s.q_row());
      });
    }
  }
}

template <int DV>
void BackwardItem(const Shape& s, float scale, const float* Q, const float* Kp, const float* V, const float* O,
                  const float* LSE, const float* DO, float* DQ, float* DK, float* DVo, int64_t b, int64_t kh,
                  float* kt, float* vt, float* p, float* dp, float* dk, float* dv, float* ones) {
  constexpr int QB = BlockOf(DV);
  const int Lk = int(s.Lk), Lp = Padded(Lk), D = s.D;
  const float* kh_rows = s.KvHead(Kp, b, kh);
  Transpose(kh_rows, s.kv_row(), Lk, D, Lp, kt);
  Transpose(s.KvHead(V, b, kh), s.kv_row(), Lk, D, Lp, vt);
  std::fill(dk, dk + int64_t(Lk) * D, 0.0f);
  std::fill(dv, dv + int64_t(Lk) * D, 0.0f);
  for (int64_t g = 0; g < s.G; ++g) {
    const float* qh = s.QHead(Q, b, kh, g);
    const int64_t off = qh - Q;
    const float* lse = LSE + s.LseHead(b, kh, g);
    for (int64_t i0 = 0; i0 < s.Lq; i0 += QB) {
      const int n = int(std::min<int64_t>(QB, s.Lq - i0));
      const int64_t r0 = off + i0 * s.q_row();
      const float *qi = Q + r0, *oi = O + r0, *doi = DO + r0;
      float* dqi = DQ + r0;
      WithRows<QB>(n, [&](auto rows) {
        constexpr int N = decltype(rows)::value;
        RowsDotCols<N>(qi, s.q_row(), D, kt, Lp, scale, p);
        RowsDotCols<N>(doi, s.q_row(), D, vt, Lp, 1.0f, dp);
        for (int i = 0; i < N; ++i) {  // p = exp(s - lse); dp -> ds = p (dp - delta)
          float *pr = p + i * Lp, *dr = dp + i * Lp;
          ExpRow(pr, Lk, lse[i0 + i]);
          const __m512 delta = _mm512_set1_ps(Dot(doi + i * s.q_row(), oi + i * s.q_row(), D));
          for (int j0 = 0; j0 < Lp; j0 += 16)
            _mm512_storeu_ps(dr + j0, _mm512_mul_ps(_mm512_loadu_ps(pr + j0), _mm512_sub_ps(_mm512_loadu_ps(dr + j0), delta)));
        }
        WeightsDotRows<N, DV>(dp, Lp, Lk, kh_rows, s.kv_row(), ones, dqi, s.q_row());
        AccumulateRows<N, DV>(p, Lp, Lk, doi, s.q_row(), dv);
        AccumulateRows<N, DV>(dp, Lp, Lk, qi, s.q_row(), dk);
      });
    }
  }
  // dq above is sum_j ds_ij k_j (ones as the row scale): the scale is applied here, once.
  for (int64_t g = 0; g < s.G; ++g) {
    float* dqh = DQ + (s.QHead(Q, b, kh, g) - Q);
    for (int64_t i = 0; i < s.Lq; ++i)
      for (int d = 0; d < D; d += 16) {
        float* x = dqh + i * s.q_row() + d;
        _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(scale)));
      }
  }
  float* dkh = DK + (kh_rows - Kp);
  float* dvh = DVo + (kh_rows - Kp);
  for (int j = 0; j < Lk; ++j)
    for (int d = 0; d < D; d += 16) {
      _mm512_storeu_ps(dkh + j * s.kv_row() + d, _mm512_mul_ps(_mm512_loadu_ps(dk + int64_t(j) * D + d), _mm512_set1_ps(scale)));
      _mm512_storeu_ps(dvh + j * s.kv_row() + d, _mm512_loadu_ps(dv + int64_t(j) * D + d));
    }
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                       Shape* s) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "full_attention: q must be [B, Lq, K, G, D], k and v [B, Lk, K, D]");
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "full_attention: k and v differ in shape");
  if (qd[0] != kd[0] || qd[2] != kd[2] || qd[4] != kd[3])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "full_attention: q and k disagree on B, K or D");
  *s = Shape{qd[0], qd[1], qd[2], qd[3], kd[1], int(qd[4])};
  if ((s->D != 16 && s->D != 32 && s->D != 64) || s->Lk < 1 || s->Lk > kMaxKeys)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "full_attention: D must be 16, 32 or 64 and 1 <= Lk <= 512");
  return ffi::Error::Success();
}

template <typename Item>
void ForEachItem(ffi::ThreadPool& pool, const Shape& s, const Item& item) {
  const int64_t items = s.B * s.K;
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), items)));
  pofx::RunParts(pool, parts, [&](int p) {
    for (int64_t it = items * p / parts; it < items * (p + 1) / parts; ++it) item(p, it / s.K, it % s.K);
  });
}

ffi::Error Fwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
               float scale, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  Shape s;
  if (auto e = CheckShapes(q, k, v, &s); e.failure()) return e;
  const int Lp = Padded(int(s.Lk)), D = s.D;
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), s.B * s.K)));
  std::vector<std::vector<float>> work(parts, std::vector<float>(size_t(D) * Lp + 8 * Lp + 8));
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data();
  float *O = o->typed_data(), *L = lse->typed_data();
  ForEachItem(pool, s, [&](int p, int64_t b, int64_t kh) {
    float *kt = work[p].data(), *scores = kt + size_t(D) * Lp, *inv = scores + 8 * Lp;
    if (D == 16) ForwardItem<1>(s, scale, Q, Kp, V, O, L, b, kh, kt, scores, inv);
    else if (D == 32) ForwardItem<2>(s, scale, Q, Kp, V, O, L, b, kh, kt, scores, inv);
    else ForwardItem<4>(s, scale, Q, Kp, V, O, L, b, kh, kt, scores, inv);
  });
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
               ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o, float scale,
               ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shape s;
  if (auto e = CheckShapes(q, k, v, &s); e.failure()) return e;
  if (o.element_count() != q.element_count() || d_o.element_count() != q.element_count() ||
      lse.element_count() != size_t(s.B * s.K * s.G * s.Lq))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "full_attention: o, do or lse of the wrong size");
  const int Lp = Padded(int(s.Lk)), D = s.D;
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), s.B * s.K)));
  const size_t per = 2 * size_t(D) * Lp + 2 * 8 * size_t(Lp) + 2 * size_t(s.Lk) * D + 8;
  std::vector<std::vector<float>> work(parts, std::vector<float>(per));
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data(), *O = o.typed_data(),
              *L = lse.typed_data(), *G = d_o.typed_data();
  float *DQ = dq->typed_data(), *DK = dk->typed_data(), *DV = dv->typed_data();
  ForEachItem(pool, s, [&](int p, int64_t b, int64_t kh) {
    float* w = work[p].data();
    float *kt = w, *vt = kt + size_t(D) * Lp, *pp = vt + size_t(D) * Lp, *dp = pp + 8 * size_t(Lp);
    float *dkl = dp + 8 * size_t(Lp), *dvl = dkl + size_t(s.Lk) * D, *ones = dvl + size_t(s.Lk) * D;
    std::fill(ones, ones + 8, 1.0f);
    if (D == 16) BackwardItem<1>(s, scale, Q, Kp, V, O, L, G, DQ, DK, DV, b, kh, kt, vt, pp, dp, dkl, dvl, ones);
    else if (D == 32) BackwardItem<2>(s, scale, Q, Kp, V, O, L, G, DQ, DK, DV, b, kh, kt, vt, pp, dp, dkl, dvl, ones);
    else BackwardItem<4>(s, scale, Q, Kp, V, O, L, G, DQ, DK, DV, b, kh, kt, vt, pp, dp, dkl, dvl, ones);
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxFullAttentionFwd, Fwd, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Attr<float>("scale")
    .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxFullAttentionBwd, Bwd, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Attr<float>("scale")
    .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
