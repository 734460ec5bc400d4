// AdamW's update applied to the parameters in one pass over every array, registered with XLA's FFI
// (pofx_backends.cpu.native.adamw_apply; the optimizer is pofx_backends.cpu.optimizers.adamw).
//
// Loshchilov & Hutter 2019 (arXiv:1711.05101, Algorithm 2) in optax's form (`optax.adamw`: the
// moments, their bias corrections, the decoupled weight decay, then the learning rate), for every
// element of every leaf:
//   g  <- g, or (g / norm) max_norm where !(norm < max_norm)   (optax.clip_by_global_norm; the
//         caller passes the gradients' global norm, and max_norm = inf without clipping)
//   mu <- (1 - b1) g + b1 mu,   nu <- (1 - b2) g^2 + b2 nu
//   u  =  (mu / bc1) / (sqrt(nu / bc2) + eps) + weight_decay p,   bc_i = 1 - b_i^t
//   p  <- p + (-lr) u
// The scalars come in one float32 operand `hyper` = [lr, b1, 1 - b1, b2, 1 - b2, eps, weight_decay,
// bc1, bc2, norm, max_norm] (traced values: a schedule's learning rate, the step's bias corrections;
// 1 - b rounded from the caller's double, as optax's constants are). Then the
// L parameter leaves, the L gradients, the L first and the L second moments; the results are the
// L new parameters, first and second moments, which the caller aliases to the inputs (in place).
// XLA would otherwise read and write each leaf in several fusions (and, on one flat vector,
// concatenate the gradients and slice the update back into leaves).
//
// Threads: the leaves' elements, taken as one sequence, are cut into one contiguous range per
// thread of XLA's intra-op pool (thread_parts.h); each range walks the leaves it covers.
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#include "thread_parts.h"
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
namespace {

struct Leaf {
  float *p, *mu, *nu;
  const float *p_in, *g, *mu_in, *nu_in;
  int64_t n;
};

struct Hyper {
  float lr, b1, c1, b2, c2, eps, wd, bc1, bc2, norm, max_norm;
};

// Elements [i0, i1) of one leaf, 16 at a time (the last vector masked). Same operations, in the
// same order, as optax's update; no fused multiply-adds.
template <bool kClip>
void Update(const Leaf& l, int64_t i0, int64_t i1, const Hyper& h) {
  const __m512 b1 = _mm512_set1_ps(h.b1), c1 = _mm512_set1_ps(h.c1), b2 = _mm512_set1_ps(h.b2),
               c2 = _mm512_set1_ps(h.c2), eps = _mm512_set1_ps(h.eps), wd = _mm512_set1_ps(h.wd),
               bc1 = _mm512_set1_ps(h.bc1), bc2 = _mm512_set1_ps(h.bc2), norm = _mm512_set1_ps(h.norm),
               max_norm = _mm512_set1_ps(h.max_norm), neg_lr = _mm512_set1_ps(-h.lr);
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 m = i1 - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (i1 - i)) - 1);
    __m512 g = _mm512_maskz_loadu_ps(m, l.g + i);
    if (kClip) g = _mm512_mul_ps(_mm512_div_ps(g, norm), max_norm);
    const __m512 p = _mm512_maskz_loadu_ps(m, l.p_in + i);
    const __m512 mu = _mm512_add_ps(_mm512_mul_ps(c1, g), _mm512_mul_ps(b1, _mm512_maskz_loadu_ps(m, l.mu_in + i)));
    const __m512 nu = _mm512_add_ps(_mm512_mul_ps(c2, _mm512_mul_ps(g, g)),
                                    _mm512_mul_ps(b2, _mm512_maskz_loadu_ps(m, l.nu_in + i)));
    const __m512 step = _mm512_div_ps(_mm512_div_ps(mu, bc1), _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(nu, bc2)), eps));
    const __m512 u = _mm512_add_ps(step, _mm512_mul_ps(wd, p));
    _mm512_mask_storeu_ps(l.mu + i, m, mu);
    _mm512_mask_storeu_ps(l.nu + i, m, nu);
    _mm512_mask_storeu_ps(l.p + i, m, _mm512_add_ps(p, _mm512_mul_ps(neg_lr, u)));
  }
}

ffi::Error Apply(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hyper, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  if (hyper.element_count() != 11)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "hyper must hold 11 scalars");
  if (args.size() % 4 != 0 || rets.size() * 4 != args.size() * 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "expected 4 L operands (p, g, mu, nu) and 3 L results");
  const float* hv = hyper.typed_data();
  const Hyper h{hv[0], hv[1], hv[2], hv[3], hv[4], hv[5], hv[6], hv[7], hv[8], hv[9], hv[10]};
  const bool clip = !(h.norm < h.max_norm);
  const size_t L = args.size() / 4;
  std::vector<Leaf> leaves(L);
  std::vector<int64_t> start(L + 1, 0);
  for (size_t j = 0; j < L; ++j) {
    const float* in[4];
    int64_t n = -1;
    for (size_t r = 0; r < 4; ++r) {
      auto a = args.get<ffi::Buffer<ffi::F32>>(r * L + j);
      if (a.has_error()) return a.error();
      if (n < 0) n = int64_t(a->element_count());
      if (int64_t(a->element_count()) != n)
        return ffi::Error(ffi::ErrorCode::kInvalidArgument, "a leaf's gradient or moments differ in size");
      in[r] = a->typed_data();
    }
    float* out[3];
    for (size_t r = 0; r < 3; ++r) {
      auto o = rets.get<ffi::Buffer<ffi::F32>>(r * L + j);
      if (o.has_error()) return o.error();
      if (int64_t((*o)->element_count()) != n) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "result size");
      out[r] = (*o)->typed_data();
    }
    leaves[j] = Leaf{out[0], out[1], out[2], in[0], in[1], in[2], in[3], n};
    start[j + 1] = start[j] + n;
  }
  const int64_t total = start[L];
  // Ranges of whole cache lines (16 floats), at least 64K elements per part.
  const int64_t units = (total + 15) / 16;
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), total / 65536)));
  pofx::RunParts(pool, parts, [&](int p) {
    const int64_t a = std::min(total, units * p / parts * 16), b = std::min(total, units * (p + 1) / parts * 16);
    size_t j = size_t(std::upper_bound(start.begin(), start.end(), a) - start.begin()) - 1;
    for (int64_t at = a; at < b && j < L; ++j) {
      const int64_t hi = std::min(b, start[j + 1]);
      if (hi > at) {
        if (clip) Update<true>(leaves[j], at - start[j], hi - start[j], h);
        else Update<false>(leaves[j], at - start[j], hi - start[j], h);
      }
      at = hi;
    }
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PofxAdamwApply, Apply, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets());
