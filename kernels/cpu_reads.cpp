// The Block AttnRes reads on CPU, fp32: one pass over each token's rows per read.
//
// Same math as reference.py (design §2-3), token by token; loaded by cpu.py,
// which checks shapes and dtypes and calls these through ctypes. All tensors
// are contiguous fp32: a source or gradient is [T, d] (row t at t * d), the
// per-query tensors [S, T, d] and [S, T], the queries [S, d]. Math in fp32,
// per-token statistics in fp32, exp/log in double where a softmax is formed.
//
// Tokens are split over OpenMP threads; a reduction over tokens (the query
// gradient) is summed per thread into its own [S, d] row of `grad_w_parts`
// and the caller adds the threads' rows.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// a . b over d floats. Four vectors of partial sums, so that the adds do not wait on each other
// (one accumulator makes a reduction over d = 256 latency-bound, several times slower).
inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t d) {
  constexpr int64_t kLanes = 32;
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[k + j] * b[k + j];
  }
  float total = 0.f;
  for (; k < d; ++k) total += a[k] * b[k];
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

// Per token: N sources, S queries. Scores s[i * S + q] = r_i * (w_q . v_i), r_i = rsqrt(mean(v_i^2) + eps).
void source_scores(const float* const* v, int64_t t, int64_t n, int64_t s_count, int64_t d,
                   const float* __restrict__ w, float eps, float* __restrict__ r, float* __restrict__ s) {
  for (int64_t i = 0; i < n; ++i) {
    const float* row = v[i] + t * d;
    const float ri = 1.f / std::sqrt(dot(row, row, d) / static_cast<float>(d) + eps);
    r[i] = ri;
    for (int64_t q = 0; q < s_count; ++q) s[i * s_count + q] = ri * dot(row, w + q * d, d);
  }
}

// Softmax over the N sources for each query: a[i * S + q]; lse[q] if asked.
void softmax_over_sources(const float* s, int64_t n, int64_t s_count, float* a, float* lse) {
  for (int64_t q = 0; q < s_count; ++q) {
    float m = s[q];
    for (int64_t i = 1; i < n; ++i) m = std::max(m, s[i * s_count + q]);
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double e = std::exp(static_cast<double>(s[i * s_count + q] - m));
      a[i * s_count + q] = static_cast<float>(e);
      total += e;
    }
    for (int64_t i = 0; i < n; ++i) a[i * s_count + q] = static_cast<float>(a[i * s_count + q] / total);
    if (lse != nullptr) lse[q] = m + static_cast<float>(std::log(total));
  }
}

}  // namespace

extern "C" {

// Phase 1 (and the plain read with S = 1): o[q] = scale * sum_i a_iq v_i, lse[q] (lse may be null).
void attnres_block_read_forward(const float* const* v, int64_t n, const float* w, int64_t s_count,
                                int64_t tokens, int64_t d, float eps, float scale, float* o, float* lse,
                                int64_t threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> r(n), s(n * s_count), a(n * s_count), l(s_count);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      source_scores(v, t, n, s_count, d, w, eps, r.data(), s.data());
      softmax_over_sources(s.data(), n, s_count, a.data(), l.data());
      for (int64_t q = 0; q < s_count; ++q) {
        float* out = o + (q * tokens + t) * d;
        const float a0 = scale * a[q];
        const float* v0 = v[0] + t * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) out[k] = a0 * v0[k];
        for (int64_t i = 1; i < n; ++i) {
          const float ai = scale * a[i * s_count + q];
          const float* vi = v[i] + t * d;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) out[k] += ai * vi[k];
        }
        if (lse != nullptr) lse[q * tokens + t] = l[q];
      }
    }
  }
}

// Gradients of phase 1 (grad_o scaled by grad_scale; grad_o or grad_lse may be null):
//   ds_iq = a_iq (g_q . v_i - g_q . o_q) + a_iq glse_q
//   dv_i  = sum_q a_iq g_q + sum_q ds_iq r_i w_q - (sum_q ds_iq s_iq) r_i^2 v_i / d
//   dw_q  = sum over tokens and i of ds_iq r_i v_i      (per thread, into grad_w_parts)
void attnres_block_read_backward(const float* grad_o, float grad_scale, const float* grad_lse,
                                 const float* const* v, int64_t n, const float* w, int64_t s_count,
                                 int64_t tokens, int64_t d, float eps, float* const* dv, float* grad_w_parts,
                                 int64_t threads) {
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    float* dw = grad_w_parts + static_cast<int64_t>(omp_get_thread_num()) * s_count * d;
#else
    float* dw = grad_w_parts;
#endif
    std::vector<float> r(n), s(n * s_count), a(n * s_count), gv(n * s_count), ds(n * s_count);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      source_scores(v, t, n, s_count, d, w, eps, r.data(), s.data());
      softmax_over_sources(s.data(), n, s_count, a.data(), nullptr);
      for (int64_t q = 0; q < s_count; ++q) {
        float g_dot_o = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          float dot = 0.f;
          if (grad_o != nullptr) dot = grad_scale * ::dot(grad_o + (q * tokens + t) * d, v[i] + t * d, d);
          gv[i * s_count + q] = dot;
          g_dot_o += a[i * s_count + q] * dot;
        }
        const float glse = grad_lse != nullptr ? grad_lse[q * tokens + t] : 0.f;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t iq = i * s_count + q;
          ds[iq] = a[iq] * (gv[iq] - g_dot_o + glse);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const float* vi = v[i] + t * d;
        float* out = dv[i] + t * d;
        float shrink = 0.f;
        for (int64_t q = 0; q < s_count; ++q) shrink += ds[i * s_count + q] * s[i * s_count + q];
        shrink *= -r[i] * r[i] / static_cast<float>(d);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) out[k] = shrink * vi[k];
        for (int64_t q = 0; q < s_count; ++q) {
          const float ds_r = ds[i * s_count + q] * r[i];
          const float* wq = w + q * d;
          float* dwq = dw + q * d;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) {
            out[k] += ds_r * wq[k];
            dwq[k] += ds_r * vi[k];
          }
          if (grad_o != nullptr) {
            const float ag = grad_scale * a[i * s_count + q];
            const float* g = grad_o + (q * tokens + t) * d;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) out[k] += ag * g[k];
          }
        }
      }
    }
  }
}

// Phase 2 with a partial: h = scale (b_o o + b_p p), s_p = w . rmsnorm(p), b = softmax(lse, s_p).
void attnres_merge_forward(const float* o, const float* lse, const float* p, const float* w, int64_t tokens,
                           int64_t d, float eps, float scale, float* h, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* pt = p + t * d;
    float r_p, s_p;
    source_scores(&p, t, 1, 1, d, w, eps, &r_p, &s_p);
    const float m = std::max(lse[t], s_p);
    const double e_o = std::exp(static_cast<double>(lse[t] - m)), e_p = std::exp(static_cast<double>(s_p - m));
    const float b_o = scale * static_cast<float>(e_o / (e_o + e_p));
    const float b_p = scale * static_cast<float>(e_p / (e_o + e_p));
    const float* ot = o + t * d;
    float* ht = h + t * d;
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) ht[k] = b_o * ot[k] + b_p * pt[k];
  }
}

// Gradients of phase 2 from its output h (reference.merge_backward):
//   ds_p = scale b_p (g . p - g . h / scale), grad_o = scale b_o g, grad_lse = -ds_p,
//   grad_p = scale b_p g + ds_p r_p w - ds_p s_p r_p^2 p / d, grad_w = sum over tokens of ds_p r_p p.
void attnres_merge_backward(const float* g, const float* h, const float* lse, const float* p, const float* w,
                            int64_t tokens, int64_t d, float eps, float scale, float* grad_o, float* grad_lse,
                            float* grad_p, float* grad_w_parts, int64_t threads) {
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    float* dw = grad_w_parts + static_cast<int64_t>(omp_get_thread_num()) * d;
#else
    float* dw = grad_w_parts;
#endif
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const float* gt = g + t * d;
      const float* ht = h + t * d;
      const float* pt = p + t * d;
      float ss = 0.f, pw = 0.f, gp = 0.f, gh = 0.f;
#pragma omp simd reduction(+ : ss, pw, gp, gh)
      for (int64_t k = 0; k < d; ++k) {
        ss += pt[k] * pt[k];
        pw += pt[k] * w[k];
        gp += gt[k] * pt[k];
        gh += gt[k] * ht[k];
      }
      const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
      const float s_p = r * pw;
      const float m = std::max(lse[t], s_p);
      const double e_o = std::exp(static_cast<double>(lse[t] - m)), e_p = std::exp(static_cast<double>(s_p - m));
      const float b_o = static_cast<float>(e_o / (e_o + e_p)), b_p = static_cast<float>(e_p / (e_o + e_p));
      const float ds_p = scale * b_p * (gp - gh / scale);
      const float ds_r = ds_p * r;
      const float shrink = -ds_r * s_p * r / static_cast<float>(d);
      const float go = scale * b_o, gpw = scale * b_p;
      float* got = grad_o + t * d;
      float* gpt = grad_p + t * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) {
        got[k] = go * gt[k];
        gpt[k] = gpw * gt[k] + ds_r * w[k] + shrink * pt[k];
        dw[k] += ds_r * pt[k];
      }
      grad_lse[t] = -ds_p;
    }
  }
}

}  // extern "C"
