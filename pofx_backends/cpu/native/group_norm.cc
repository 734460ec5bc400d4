// GroupNorm over NHWC images, optionally followed by SiLU, forward and backward in one pass each
// over the data after the statistics, by AVX-512 vectors of 16 channels, registered with XLA's FFI
// (pofx_backends.cpu.native.group_norm).
//
// Per image b and group g of C / G contiguous channels, over its n = H W C / G elements:
//   mean = sum x / n,  var = sum (x - mean)^2 / n (two passes: no E[x^2] - E[x]^2 cancellation),
//   rstd = 1 / sqrt(var + eps),  z = (x - mean) rstd scale_c + bias_c = x a_c + d_c,
//   y = z, or with SiLU y = z sigmoid(z)                            (Wu & He 2018, arXiv:1803.08494)
// Backward, from dy: dz = dy, or with SiLU dz = dy s (1 + z (1 - s)) with s = sigmoid(z) (z
// recomputed from x); with S1_c = sum_hw dz and S2_c = sum_hw dz x per (image, channel),
//   d_bias_c = sum_b S1_c,  d_scale_c = sum_b rstd (S2_c - mean S1_c),
//   d_x = rstd (scale dz - mean_g(scale dz) - xhat mean_g(scale dz xhat)) = dz A_c + x B_c + C_c.
// The images are split over XLA's intra-op threads (thread_parts.h); d_scale and d_bias are
// summed per part, then over the parts.
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include "vector_exp.h"
#include "thread_parts.h"
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
namespace {

inline __m512 Sigmoid(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), z))));
}

// Per-channel sums over the hw pixels of one image x [hw, C]: out[c] = sum_p (x[p, c] - shift[c])^k, k = 1 or 2.
template <int K>
void ChannelSums(const float* x, int64_t hw, int C, const float* shift, float* out) {
  for (int c = 0; c < C; c += 16) {
    const __m512 m = shift ? _mm512_loadu_ps(shift + c) : _mm512_setzero_ps();
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t p = 0;
    for (; p + 4 <= hw; p += 4) {
      __m512 v0 = _mm512_sub_ps(_mm512_loadu_ps(x + (p + 0) * C + c), m);
      __m512 v1 = _mm512_sub_ps(_mm512_loadu_ps(x + (p + 1) * C + c), m);
      __m512 v2 = _mm512_sub_ps(_mm512_loadu_ps(x + (p + 2) * C + c), m);
      __m512 v3 = _mm512_sub_ps(_mm512_loadu_ps(x + (p + 3) * C + c), m);
      if (K == 1) {
        a0 = _mm512_add_ps(a0, v0); a1 = _mm512_add_ps(a1, v1); a2 = _mm512_add_ps(a2, v2); a3 = _mm512_add_ps(a3, v3);
      } else {
        a0 = _mm512_fmadd_ps(v0, v0, a0); a1 = _mm512_fmadd_ps(v1, v1, a1);
        a2 = _mm512_fmadd_ps(v2, v2, a2); a3 = _mm512_fmadd_ps(v3, v3, a3);
      }
    }
    for (; p < hw; ++p) {
      __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + p * C + c), m);
      a0 = K == 1 ? _mm512_add_ps(a0, v) : _mm512_fmadd_ps(v, v, a0);
    }
    _mm512_storeu_ps(out + c, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

// Per-channel values of the per-group statistics: out[c] = v[c / (C / G)].
void PerChannel(const float* v, int C, int G, float* out) {
  const int cg = C / G;
  for (int c = 0; c < C; ++c) out[c] = v[c / cg];
}

// One image: statistics into mean [G], rstd [G]; the per-channel affine map into a, d [C].
void Statistics(const float* x, int64_t hw, int C, int G, float eps, const float* scale, const float* bias,
                float* mean, float* rstd, float* a, float* d, float* work) {
  const int cg = C / G;
  const double n = double(hw) * cg;
  ChannelSums<1>(x, hw, C, nullptr, work);
  for (int g = 0; g < G; ++g) {
    double s = 0;
    for (int c = g * cg; c < (g + 1) * cg; ++c) s += work[c];
    mean[g] = float(s / n);
  }
  PerChannel(mean, C, G, a);  // a holds the per-channel means for a moment
  ChannelSums<2>(x, hw, C, a, work);
  for (int g = 0; g < G; ++g) {
    double s = 0;
    for (int c = g * cg; c < (g + 1) * cg; ++c) s += work[c];
    rstd[g] = float(1.0 / std::sqrt(s / n + double(eps)));
  }
  for (int c = 0; c < C; ++c) {
    a[c] = rstd[c / cg] * scale[c];
    d[c] = bias[c] - mean[c / cg] * a[c];
  }
}

ffi::Error Fwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
               int64_t groups, float eps, bool silu, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
               ffi::ResultBuffer<ffi::F32> rstd) {
  auto xd = x.dimensions();
  if (xd.size() < 2) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "group_norm: x must be [B, ..., C]");
  const int64_t B = xd[0];
  const int C = int(xd[xd.size() - 1]), G = int(groups);
  if (C % 16 != 0 || G <= 0 || C % G != 0 || scale.element_count() != size_t(C) || bias.element_count() != size_t(C))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "group_norm: C must be a multiple of 16 and of groups");
  const int64_t hw = B ? int64_t(x.element_count()) / B / C : 0;
  const float *X = x.typed_data(), *S = scale.typed_data(), *Bi = bias.typed_data();
  float *Y = y->typed_data(), *M = mean->typed_data(), *R = rstd->typed_data();
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), B)));
  pofx::RunParts(pool, parts, [&](int p) {
    std::vector<float> buf(3 * C);
    float *a = buf.data(), *d = a + C, *work = d + C;
    for (int64_t b = B * p / parts; b < B * (p + 1) / parts; ++b) {
      const float* xb = X + b * hw * C;
      float* yb = Y + b * hw * C;
      Statistics(xb, hw, C, G, eps, S, Bi, M + b * G, R + b * G, a, d, work);
      for (int c = 0; c < C; c += 16) {
        const __m512 av = _mm512_loadu_ps(a + c), dv = _mm512_loadu_ps(d + c);
        for (int64_t q = 0; q < hw; ++q) {
          __m512 z = _mm512_fmadd_ps(_mm512_loadu_ps(xb + q * C + c), av, dv);
          if (silu) z = _mm512_mul_ps(z, Sigmoid(z));
          _mm512_storeu_ps(yb + q * C + c, z);
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
               ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy, int64_t groups,
               bool silu, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
               ffi::ResultBuffer<ffi::F32> dbias) {
  auto xd = x.dimensions();
  if (xd.size() < 2 || dy.element_count() != x.element_count())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "group_norm: x and dy must be [B, ..., C] alike");
  const int64_t B = xd[0];
  const int C = int(xd[xd.size() - 1]), G = int(groups), cg = C / std::max(G, 1);
  if (C % 16 != 0 || G <= 0 || C % G != 0 || mean.element_count() != size_t(B * G))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "group_norm: C must be a multiple of 16 and of groups");
  const int64_t hw = B ? int64_t(x.element_count()) / B / C : 0;
  const double n = double(hw) * cg;
  const float *X = x.typed_data(), *S = scale.typed_data(), *Bi = bias.typed_data(), *M = mean.typed_data(),
              *R = rstd.typed_data(), *DY = dy.typed_data();
  float *DX = dx->typed_data(), *DS = dscale->typed_data(), *DB = dbias->typed_data();
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), B)));
  std::vector<float> partial(size_t(parts) * 2 * C, 0.0f);  // per part: d_scale [C], d_bias [C]
  pofx::RunParts(pool, parts, [&](int p) {
    std::vector<float> buf(8 * C);
    float *a = buf.data(), *d = a + C, *s1 = d + C, *s2 = s1 + C, *mc = s2 + C, *rc = mc + C, *cb = rc + C,
          *cc = cb + C;
    float *ds = partial.data() + size_t(p) * 2 * C, *db = ds + C;
    for (int64_t b = B * p / parts; b < B * (p + 1) / parts; ++b) {
      const float *xb = X + b * hw * C, *gb = DY + b * hw * C;
      float* dxb = DX + b * hw * C;
      PerChannel(M + b * G, C, G, mc);
      PerChannel(R + b * G, C, G, rc);
      for (int c = 0; c < C; ++c) {
        a[c] = rc[c] * S[c];
        d[c] = Bi[c] - mc[c] * a[c];
      }
      // Pass 1: dz (stored in dx), and the per-channel sums of dz and dz x.
      for (int c = 0; c < C; c += 16) {
        const __m512 av = _mm512_loadu_ps(a + c), dv = _mm512_loadu_ps(d + c), one = _mm512_set1_ps(1.0f);
        __m512 t1 = _mm512_setzero_ps(), t2 = t1;
        for (int64_t q = 0; q < hw; ++q) {
          const __m512 xv = _mm512_loadu_ps(xb + q * C + c);
          __m512 g = _mm512_loadu_ps(gb + q * C + c);
          if (silu) {
            const __m512 z = _mm512_fmadd_ps(xv, av, dv), s = Sigmoid(z);
            g = _mm512_mul_ps(_mm512_mul_ps(g, s), _mm512_fmadd_ps(z, _mm512_sub_ps(one, s), one));
          }
          _mm512_storeu_ps(dxb + q * C + c, g);
          t1 = _mm512_add_ps(t1, g);
          t2 = _mm512_fmadd_ps(g, xv, t2);
        }
        _mm512_storeu_ps(s1 + c, t1);
        _mm512_storeu_ps(s2 + c, t2);
      }
      // The per-channel coefficients of d_x = dz A + x B + C.
      for (int g = 0; g < G; ++g) {
        double m1 = 0, m2 = 0;
        for (int c = g * cg; c < (g + 1) * cg; ++c) {
          const double gx = double(rc[c]) * (double(s2[c]) - double(mc[c]) * s1[c]);  // sum_hw dz xhat
          ds[c] += float(gx);
          db[c] += s1[c];
          m1 += double(S[c]) * s1[c];
          m2 += double(S[c]) * gx;
        }
        m1 /= n;
        m2 /= n;
        for (int c = g * cg; c < (g + 1) * cg; ++c) {
          const double r = rc[c];
          cb[c] = float(-r * r * m2);
          cc[c] = float(r * (r * m2 * mc[c] - m1));
        }
      }
      // Pass 2: d_x in place.
      for (int c = 0; c < C; c += 16) {
        const __m512 av = _mm512_loadu_ps(a + c), bv = _mm512_loadu_ps(cb + c), cv = _mm512_loadu_ps(cc + c);
        for (int64_t q = 0; q < hw; ++q) {
          float* o = dxb + q * C + c;
          const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(o), av, _mm512_fmadd_ps(_mm512_loadu_ps(xb + q * C + c), bv, cv));
          _mm512_storeu_ps(o, v);
        }
      }
    }
  });
  for (int c = 0; c < C; ++c) {
    float s = 0, t = 0;
    for (int p = 0; p < parts; ++p) {
      s += partial[size_t(p) * 2 * C + c];
      t += partial[size_t(p) * 2 * C + C + c];
    }
    DS[c] = s;
    DB[c] = t;
  }
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxGroupNormFwd, Fwd, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Attr<int64_t>("groups").Attr<float>("eps").Attr<bool>("silu")
    .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxGroupNormBwd, Bwd, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Attr<int64_t>("groups").Attr<bool>("silu")
    .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
