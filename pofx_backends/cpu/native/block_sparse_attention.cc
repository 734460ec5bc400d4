// Block-sparse attention (pofx.sparse_attention) as fused CPU kernels, registered with XLA's FFI.
//
// Same computation as pofx.sparse_attention's XLA op, on the same block lists: for every listed
// (query block, key block) pair of 64 tokens and every head (head dimension 16, 32, 64 or 128),
//   S = Q K^T + bias  (bias 0 where the mask allows, -1e30 elsewhere; the mask is rebuilt here
//                      from segment and branch ids: same segment, key at or before the query,
//                      key branch 0 or the query's branch),
// with the softmax over all listed key blocks of a query block taken online (running row maxima
// m and sums l, FlashAttention, Dao et al. 2022, arXiv:2205.14135, Algorithm 1), so a tile's
// scores never leave the cache. The forward returns O and the row log-sum-exp m + log l; the
// backward recomputes P = exp(S - lse) and applies the FlashAttention identities (ibid.,
// Appendix B.2): dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q, dV = P^T dO.
//
// The loops are register-blocked AVX-512 (4 query rows x 64 keys of scores in 16 registers), the
// exponential is a vector Cephes expf (Cody-Waite range reduction, degree-5 polynomial; relative
// error about 1e-7). Work is split with OpenMP: the forward over (query block, key/value head),
// the backward over key/value heads (each thread owns its heads' dK and dV).
//
// Rotary positions and the query scale are applied inside (attribute rope = 1): the kernels
// read q and k as the projections give them and use q' = scale * rot(q), k' = rot(k), with
// rot(x) = [x1 cos - x2 sin, x2 cos + x1 sin] (x1, x2 the halves of x; cos, sin [N, HD/2] per
// token: Su et al. 2021, arXiv:2104.09864, the efficient form of the rotary matrix product, in
// the half-split layout of Llama). The backward returns the gradients with respect to q and k
// themselves (rot^T applied to those of q' and k'). With rope = 0, q and k are used as given
// (the scale still applied to q).
//
// Layouts (float32, int32): q [N, K, G, HD] (N = rows x row length tokens, K key/value heads,
// G query heads per key/value head); k, v [N, K, HD]; segment and branch ids [N]; query_block,
// key_block [T] (sorted by query block; entries >= N / 64 are padding and skipped); cos, sin
// [N, HD/2] (any shape with rope = 0: not read).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>
#include "xla/ffi/api/ffi.h"
#include "vector_exp.h"
namespace ffi = xla::ffi;
namespace {
constexpr int B = 64;
// S[i][j] = sum_d A[i][d] Bt[d][j] + bias[i][j]   (A 64xHD, Bt HDx64)
template <int HD>
static inline void dot_rows(const float* __restrict A, const float* __restrict Bt, const float* __restrict bias,
                            float* __restrict S) {
  for (int i0 = 0; i0 < B; i0 += 4) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = bias ? _mm512_loadu_ps(bias + (i0 + r) * B + c * 16) : _mm512_setzero_ps();
    for (int d = 0; d < HD; ++d) {
      __m512 k0 = _mm512_load_ps(Bt + d * B), k1 = _mm512_load_ps(Bt + d * B + 16),
             k2 = _mm512_load_ps(Bt + d * B + 32), k3 = _mm512_load_ps(Bt + d * B + 48);
      for (int r = 0; r < 4; ++r) {
        __m512 q = _mm512_set1_ps(A[(i0 + r) * HD + d]);
        acc[r][0] = _mm512_fmadd_ps(q, k0, acc[r][0]); acc[r][1] = _mm512_fmadd_ps(q, k1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(q, k2, acc[r][2]); acc[r][3] = _mm512_fmadd_ps(q, k3, acc[r][3]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) _mm512_store_ps(S + (i0 + r) * B + c * 16, acc[r][c]);
  }
}
// The two products below keep RB rows x HD columns of C in registers (16 for HD >= 32): per
// step HD/16 loads of Bm and RB broadcasts of A feed RB * HD/16 FMAs.
template <int HD>
constexpr int RowBlock() { return HD / 16 >= 2 ? 16 / (HD / 16) : 8; }
// C[i][:] += sum_j A[i][j] Bm[j][:]   (A 64x64, Bm 64xHD, C 64xHD)
template <int HD>
static inline void acc_AB(const float* __restrict A, const float* __restrict Bm, float* __restrict C) {
  constexpr int HV = HD / 16, RB = RowBlock<HD>();
  for (int i0 = 0; i0 < B; i0 += RB) {
    __m512 o[RB][HV];
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < HV; ++v) o[r][v] = _mm512_load_ps(C + (i0 + r) * HD + 16 * v);
    for (int j = 0; j < B; ++j) {
      __m512 bv[HV];
      for (int v = 0; v < HV; ++v) bv[v] = _mm512_load_ps(Bm + j * HD + 16 * v);
      for (int r = 0; r < RB; ++r) {
        __m512 p = _mm512_set1_ps(A[(i0 + r) * B + j]);
        for (int v = 0; v < HV; ++v) o[r][v] = _mm512_fmadd_ps(p, bv[v], o[r][v]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < HV; ++v) _mm512_store_ps(C + (i0 + r) * HD + 16 * v, o[r][v]);
  }
}
// C[j][:] += sum_i A[i][j] Bm[i][:]   (A 64x64, Bm 64xHD, C 64xHD)
template <int HD>
static inline void acc_AtB(const float* __restrict A, const float* __restrict Bm, float* __restrict C) {
  constexpr int HV = HD / 16, RB = RowBlock<HD>();
  for (int j0 = 0; j0 < B; j0 += RB) {
    __m512 o[RB][HV];
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < HV; ++v) o[r][v] = _mm512_load_ps(C + (j0 + r) * HD + 16 * v);
    for (int i = 0; i < B; ++i) {
      __m512 bv[HV];
      for (int v = 0; v < HV; ++v) bv[v] = _mm512_load_ps(Bm + i * HD + 16 * v);
      for (int r = 0; r < RB; ++r) {
        __m512 p = _mm512_set1_ps(A[i * B + j0 + r]);
        for (int v = 0; v < HV; ++v) o[r][v] = _mm512_fmadd_ps(p, bv[v], o[r][v]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < HV; ++v) _mm512_store_ps(C + (j0 + r) * HD + 16 * v, o[r][v]);
  }
}
struct Runs { std::vector<int64_t> start, end; };
Runs MakeRuns(const int32_t* qb, int64_t T, int64_t n_blocks) {
  Runs r; int64_t t = 0;
  while (t < T) {
    if (qb[t] >= n_blocks) { ++t; continue; }
    int64_t s = t; while (t < T && qb[t] == qb[s]) ++t;
    r.start.push_back(s); r.end.push_back(t);
  }
  return r;
}
// Per 64-token block: its segment id and branch id when every token of the block shares them,
// else -1 (ids are >= 0). A tile whose key block ends before its query block starts, with one
// segment on both sides and key branch 0 or the query's branch, allows every entry: it needs no
// bias at all (in a prompt-shared row, every completion block against a prompt block).
struct BlockIds { std::vector<int32_t> seg, br; };
BlockIds MakeBlockIds(const int32_t* seg, const int32_t* br, int64_t n_blocks) {
  BlockIds ids{std::vector<int32_t>(n_blocks), std::vector<int32_t>(n_blocks)};
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int32_t* s = seg + blk * B;
    const int32_t* b = br + blk * B;
    ids.seg[blk] = std::all_of(s, s + B, [&](int32_t x) { return x == s[0]; }) ? s[0] : -1;
    ids.br[blk] = std::all_of(b, b + B, [&](int32_t x) { return x == b[0]; }) ? b[0] : -1;
  }
  return ids;
}
inline bool TileAllAllowed(const BlockIds& ids, int64_t qblk, int64_t kblk) {
  return kblk < qblk && ids.seg[qblk] >= 0 && ids.seg[qblk] == ids.seg[kblk] &&
         (ids.br[kblk] == 0 || (ids.br[kblk] >= 0 && ids.br[kblk] == ids.br[qblk]));
}
// bias[i][j] = 0 where query tq0 + i may see key tk0 + j, else -1e30 (16 keys per instruction).
inline void MakeBias(const int32_t* seg, const int32_t* br, int64_t tq0, int64_t tk0, float* bias) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 zero = _mm512_setzero_ps(), neg = _mm512_set1_ps(-1e30f);
  for (int c = 0; c < B; c += 16) {
    const __m512i sk = _mm512_loadu_si512(seg + tk0 + c), bk = _mm512_loadu_si512(br + tk0 + c);
    const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(int32_t(tk0 - tq0 + c)), lane);  // key - tq0
    const __mmask16 branch0 = _mm512_cmpeq_epi32_mask(bk, _mm512_setzero_si512());
    for (int i = 0; i < B; ++i) {
      __mmask16 ok = _mm512_cmpeq_epi32_mask(sk, _mm512_set1_epi32(seg[tq0 + i]));
      ok &= _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(i));                    // key <= query
      ok &= branch0 | _mm512_cmpeq_epi32_mask(bk, _mm512_set1_epi32(br[tq0 + i]));
      _mm512_store_ps(bias + i * B + c, _mm512_mask_blend_ps(ok, neg, zero));
    }
  }
}
template <int N>
struct alignas(64) Buf { float v[N]; };
using Tile = Buf<B * B>;

// The rotary embedding of one head row, times `scale` (kTranspose: its transpose, the rotation by
// minus the angle, which takes the gradient of a rotated row back to the row).
struct Rope {
  const float *cos, *sin;   // [N, HD/2]; nullptr: no rotation
  float scale;
};
template <int HD, bool kTranspose = false>
inline void RotateRow(const float* __restrict x, int64_t t, const Rope& r, float scale, float* __restrict out) {
  if (r.cos == nullptr) {
    for (int d = 0; d < HD; ++d) out[d] = scale * x[d];
    return;
  }
  constexpr int H = HD / 2;
  constexpr float sign = kTranspose ? -1.0f : 1.0f;
  const float *c = r.cos + t * H, *s = r.sin + t * H;
  for (int d = 0; d < H; ++d) {
    const float a = x[d], b = x[d + H];
    out[d] = scale * (a * c[d] - sign * b * s[d]);
    out[d + H] = scale * (b * c[d] + sign * a * s[d]);
  }
}

template <int HD>
ffi::Error FwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
               ffi::Buffer<ffi::S32> br, ffi::Buffer<ffi::S32> qblk, ffi::Buffer<ffi::S32> kblk, const Rope& rope,
               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse_out) {
  auto qd = q.dimensions();
  const int64_t N = qd[0], K = qd[1], G = qd[2];
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data();
  const int32_t *S_ = seg.typed_data(), *B_ = br.typed_data(), *QB = qblk.typed_data(), *KB = kblk.typed_data();
  float *O = out->typed_data(), *LSE = lse_out->typed_data();
  std::memset(O, 0, sizeof(float) * N * K * G * HD);
  std::memset(LSE, 0, sizeof(float) * N * K * G);
  Runs runs = MakeRuns(QB, qblk.dimensions()[0], N / B);
  const BlockIds ids = MakeBlockIds(S_, B_, N / B);
  const int64_t R = runs.start.size();
#pragma omp parallel
  {
    std::vector<Buf<B * HD>> qt(G), acc(G), vt(1);
    std::vector<Buf<HD * B>> kt(1);   // K^T: [HD x B]
    std::vector<Tile> s(1), bias(1);
    std::vector<float> m(G * B), l(G * B);
#pragma omp for schedule(dynamic)
    for (int64_t w = 0; w < R * K; ++w) {
      const int64_t r = w / K, kh = w % K, tq0 = int64_t(QB[runs.start[r]]) * B;
      for (int64_t g = 0; g < G; ++g)
        for (int i = 0; i < B; ++i)
          RotateRow<HD>(Q + (((tq0 + i) * K + kh) * G + g) * HD, tq0 + i, rope, rope.scale, &qt[g].v[i * HD]);
      for (auto& a : acc) std::fill(a.v, a.v + B * HD, 0.0f);
      std::fill(m.begin(), m.end(), -3e38f); std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t e = runs.start[r]; e < runs.end[r]; ++e) {
        const int64_t tk0 = int64_t(KB[e]) * B;
        for (int j = 0; j < B; ++j) {
          alignas(64) float kr[HD];
          RotateRow<HD>(Kp + ((tk0 + j) * K + kh) * HD, tk0 + j, rope, 1.0f, kr);
          for (int d = 0; d < HD; ++d) kt[0].v[d * B + j] = kr[d];
          std::memcpy(&vt[0].v[j * HD], V + ((tk0 + j) * K + kh) * HD, 4 * HD);
        }
        const bool full = TileAllAllowed(ids, tq0 / B, tk0 / B);
        if (!full) MakeBias(S_, B_, tq0, tk0, bias[0].v);
        for (int64_t g = 0; g < G; ++g) {
          float* S = s[0].v;
          dot_rows<HD>(qt[g].v, kt[0].v, full ? nullptr : bias[0].v, S);
          for (int i = 0; i < B; ++i) {
            __m512 a0 = _mm512_load_ps(S + i * B), a1 = _mm512_load_ps(S + i * B + 16),
                   a2 = _mm512_load_ps(S + i * B + 32), a3 = _mm512_load_ps(S + i * B + 48);
            const float mo = m[g * B + i];
            const float mn = std::max(mo, _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3))));
            const __m512 mv = _mm512_set1_ps(mn);
            a0 = exp512(_mm512_sub_ps(a0, mv)); a1 = exp512(_mm512_sub_ps(a1, mv));
            a2 = exp512(_mm512_sub_ps(a2, mv)); a3 = exp512(_mm512_sub_ps(a3, mv));
            _mm512_store_ps(S + i * B, a0); _mm512_store_ps(S + i * B + 16, a1);
            _mm512_store_ps(S + i * B + 32, a2); _mm512_store_ps(S + i * B + 48, a3);
            const float scale = std::exp(mo - mn);
            l[g * B + i] = l[g * B + i] * scale + _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
            m[g * B + i] = mn;
            float* ai = &acc[g].v[i * HD];
            for (int c = 0; c < HD; c += 16) _mm512_store_ps(ai + c, _mm512_mul_ps(_mm512_load_ps(ai + c), _mm512_set1_ps(scale)));
          }
          acc_AB<HD>(S, vt[0].v, acc[g].v);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int i = 0; i < B; ++i) {
          const float li = l[g * B + i], inv = li > 0 ? 1.0f / li : 0.0f;
          float* o = O + (((tq0 + i) * K + kh) * G + g) * HD;
          for (int d = 0; d < HD; ++d) o[d] = acc[g].v[i * HD + d] * inv;
          LSE[((tq0 + i) * K + kh) * G + g] = m[g * B + i] + std::log(std::max(li, 1e-30f));
        }
    }
  }
  return ffi::Error::Success();
}

template <int HD>
ffi::Error BwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
               ffi::Buffer<ffi::S32> br, ffi::Buffer<ffi::S32> qblk, ffi::Buffer<ffi::S32> kblk,
               ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, const Rope& rope,
               ffi::ResultBuffer<ffi::F32> dq_out, ffi::ResultBuffer<ffi::F32> dk_out, ffi::ResultBuffer<ffi::F32> dv_out) {
  auto qd = q.dimensions();
  const int64_t N = qd[0], K = qd[1], G = qd[2];
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data(), *Op = o.typed_data(),
              *L_ = lse.typed_data(), *DO = dout.typed_data();
  const int32_t *S_ = seg.typed_data(), *B_ = br.typed_data(), *QB = qblk.typed_data(), *KB = kblk.typed_data();
  float *DQ = dq_out->typed_data(), *DK = dk_out->typed_data(), *DV = dv_out->typed_data();
  std::memset(DQ, 0, sizeof(float) * N * K * G * HD);
  std::memset(DK, 0, sizeof(float) * N * K * HD);
  std::memset(DV, 0, sizeof(float) * N * K * HD);
  Runs runs = MakeRuns(QB, qblk.dimensions()[0], N / B);
  const BlockIds ids = MakeBlockIds(S_, B_, N / B);
  const int64_t R = runs.start.size();
#pragma omp parallel
  {
    std::vector<Buf<B * HD>> qt(G), dot_(G), dqa(G), kr(1), dka(1), dva(1);
    std::vector<Buf<HD * B>> kt(1), vtt(1);   // K^T, V^T: [HD x B]
    std::vector<Tile> s(1), dp(1), bias(1);
    std::vector<float> lse_(G * B), D(G * B);
#pragma omp for schedule(static)
    for (int64_t kh = 0; kh < K; ++kh) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t tq0 = int64_t(QB[runs.start[r]]) * B;
        for (int64_t g = 0; g < G; ++g)
          for (int i = 0; i < B; ++i) {
            const int64_t off = (((tq0 + i) * K + kh) * G + g) * HD;
            RotateRow<HD>(Q + off, tq0 + i, rope, rope.scale, &qt[g].v[i * HD]);
            std::memcpy(&dot_[g].v[i * HD], DO + off, 4 * HD);
            float dsum = 0.0f;
            for (int d = 0; d < HD; ++d) dsum += DO[off + d] * Op[off + d];
            D[g * B + i] = dsum;
            lse_[g * B + i] = L_[((tq0 + i) * K + kh) * G + g];
          }
        for (auto& a : dqa) std::fill(a.v, a.v + B * HD, 0.0f);
        for (int64_t e = runs.start[r]; e < runs.end[r]; ++e) {
          const int64_t tk0 = int64_t(KB[e]) * B;
          for (int j = 0; j < B; ++j) {
            const float* vj = V + ((tk0 + j) * K + kh) * HD;
            float* kj = &kr[0].v[j * HD];
            RotateRow<HD>(Kp + ((tk0 + j) * K + kh) * HD, tk0 + j, rope, 1.0f, kj);
            for (int d = 0; d < HD; ++d) { kt[0].v[d * B + j] = kj[d]; vtt[0].v[d * B + j] = vj[d]; }
          }
          const bool full = TileAllAllowed(ids, tq0 / B, tk0 / B);
          if (!full) MakeBias(S_, B_, tq0, tk0, bias[0].v);
          std::fill(dka[0].v, dka[0].v + B * HD, 0.0f);
          std::fill(dva[0].v, dva[0].v + B * HD, 0.0f);
          for (int64_t g = 0; g < G; ++g) {
            float *S = s[0].v, *DP = dp[0].v;
            dot_rows<HD>(qt[g].v, kt[0].v, full ? nullptr : bias[0].v, S);
            dot_rows<HD>(dot_[g].v, vtt[0].v, nullptr, DP);
            for (int i = 0; i < B; ++i) {
              const __m512 li = _mm512_set1_ps(lse_[g * B + i]), Di = _mm512_set1_ps(D[g * B + i]);
              for (int c = 0; c < 4; ++c) {
                __m512 p = exp512(_mm512_sub_ps(_mm512_load_ps(S + i * B + c * 16), li));
                _mm512_store_ps(S + i * B + c * 16, p);
                _mm512_store_ps(DP + i * B + c * 16, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_load_ps(DP + i * B + c * 16), Di)));
              }
            }
            acc_AB<HD>(DP, kr[0].v, dqa[g].v);      // dQ += dS K
            acc_AtB<HD>(DP, qt[g].v, dka[0].v);     // dK += dS^T Q
            acc_AtB<HD>(S, dot_[g].v, dva[0].v);    // dV += P^T dO
          }
          for (int j = 0; j < B; ++j) {
            float* dk = DK + ((tk0 + j) * K + kh) * HD;
            float* dv = DV + ((tk0 + j) * K + kh) * HD;
            for (int d = 0; d < HD; ++d) { dk[d] += dka[0].v[j * HD + d]; dv[d] += dva[0].v[j * HD + d]; }
          }
        }
        for (int64_t g = 0; g < G; ++g)
          for (int i = 0; i < B; ++i)
            RotateRow<HD, true>(&dqa[g].v[i * HD], tq0 + i, rope, rope.scale, DQ + (((tq0 + i) * K + kh) * G + g) * HD);
      }
      // DK holds the gradient of the rotated keys of this head: rotate it back, token by token.
      if (rope.cos != nullptr)
        for (int64_t t = 0; t < N; ++t) {
          float* dk = DK + (t * K + kh) * HD;
          alignas(64) float tmp[HD];
          RotateRow<HD, true>(dk, t, rope, 1.0f, tmp);
          std::memcpy(dk, tmp, 4 * HD);
        }
    }
  }
  return ffi::Error::Success();
}

ffi::Error BadShape(int64_t b, int64_t hd) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "block size 64 and head dimension 16, 32, 64 or 128 only; got block size " + std::to_string(b) +
                        ", head dimension " + std::to_string(hd));
}

// The rotary tables, checked: [N, HD/2] each when rope = 1.
ffi::Error MakeRope(ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, int64_t rope, float q_scale, int64_t n,
                    int64_t hd, Rope* out) {
  out->cos = out->sin = nullptr;
  out->scale = q_scale;
  if (!rope) return ffi::Error::Success();
  auto cd = cos.dimensions(), sd = sin.dimensions();
  if (cd.size() != 2 || sd.size() != 2 || cd[0] != n || cd[1] != hd / 2 || sd[0] != n || sd[1] != hd / 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "rope: cos and sin must be [tokens, head dimension / 2] = [" + std::to_string(n) + ", " +
                          std::to_string(hd / 2) + "]");
  out->cos = cos.typed_data();
  out->sin = sin.typed_data();
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
               ffi::Buffer<ffi::S32> br, ffi::Buffer<ffi::S32> qblk, ffi::Buffer<ffi::S32> kblk,
               ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, int64_t b, int64_t rope_on, float q_scale,
               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse_out) {
  const int64_t hd = q.dimensions()[3];
  if (b != B) return BadShape(b, hd);
  Rope rope;
  if (auto err = MakeRope(cos, sin, rope_on, q_scale, q.dimensions()[0], hd, &rope); !err.success()) return err;
  switch (hd) {
    case 16: return FwdImpl<16>(q, k, v, seg, br, qblk, kblk, rope, out, lse_out);
    case 32: return FwdImpl<32>(q, k, v, seg, br, qblk, kblk, rope, out, lse_out);
    case 64: return FwdImpl<64>(q, k, v, seg, br, qblk, kblk, rope, out, lse_out);
    case 128: return FwdImpl<128>(q, k, v, seg, br, qblk, kblk, rope, out, lse_out);
    default: return BadShape(b, hd);
  }
}

ffi::Error Bwd(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
               ffi::Buffer<ffi::S32> br, ffi::Buffer<ffi::S32> qblk, ffi::Buffer<ffi::S32> kblk,
               ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
               ffi::Buffer<ffi::F32> dout, int64_t b, int64_t rope_on, float q_scale,
               ffi::ResultBuffer<ffi::F32> dq_out, ffi::ResultBuffer<ffi::F32> dk_out, ffi::ResultBuffer<ffi::F32> dv_out) {
  const int64_t hd = q.dimensions()[3];
  if (b != B) return BadShape(b, hd);
  Rope rope;
  if (auto err = MakeRope(cos, sin, rope_on, q_scale, q.dimensions()[0], hd, &rope); !err.success()) return err;
  switch (hd) {
    case 16: return BwdImpl<16>(q, k, v, seg, br, qblk, kblk, o, lse, dout, rope, dq_out, dk_out, dv_out);
    case 32: return BwdImpl<32>(q, k, v, seg, br, qblk, kblk, o, lse, dout, rope, dq_out, dk_out, dv_out);
    case 64: return BwdImpl<64>(q, k, v, seg, br, qblk, kblk, o, lse, dout, rope, dq_out, dk_out, dv_out);
    case 128: return BwdImpl<128>(q, k, v, seg, br, qblk, kblk, o, lse, dout, rope, dq_out, dk_out, dv_out);
    default: return BadShape(b, hd);
  }
}
}  // namespace
XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxBsaFwd, Fwd, ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()
    .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Attr<int64_t>("block_size").Attr<int64_t>("rope").Attr<float>("q_scale")
    .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxBsaBwd, Bwd, ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()
    .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Attr<int64_t>("block_size").Attr<int64_t>("rope").Attr<float>("q_scale")
    .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
