// 8-bit linears with half-precision activations on the AVX2 build: int16
// activations against the 8-bit codes by vpmaddwd.
//
// Included by kernels_impl.h in the AVX2 build only. float16 and bfloat16
// activations are quantized per weight group to int16 (x ≈ scale·xq, |xq| <=
// 32767: finer than the inputs' own 8- or 11-bit mantissas); the codes are
// widened to int16 and vpmaddwd multiplies 16 of them per instruction, where
// an fp32 FMA takes 8 dequantized weights. float32 activations never come
// here. Per row and token:
//
//   row·x = Σ_g s_g·sx_g·Σ_{i∈g} q_i·xq_i + b_g·Σ_{i∈g} x_i
//
// with the integer sums exact (at most 128·255·32767 < 2^31) and the rest in
// fp32, in one fixed order per row and token.
#pragma once

#include <immintrin.h>

#include <cmath>

namespace fused_moe::cpu::FUSED_MOE_ISA_NS {

constexpr float kAct16Levels = 32767.0f;

// Fills row `row` of `q` from x [rows, q.cols]. Group sizes are multiples
// of 32.
static void quantize_acts16(const float* x, int64_t row, const Int16Acts& q) {
  const int cols = q.cols, gs = q.group_size, groups = cols / gs;
  int16_t* out = q.q + row * cols;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int g = 0; g < groups; ++g) {
    const float* xg = x + row * cols + g * gs;
    __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
    int nan = 0;
    for (int i = 0; i < gs; i += 8) {
      const __m256 v = _mm256_loadu_ps(xg + i);
      vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
      vsum = _mm256_add_ps(vsum, v);
      nan |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float m[8], s[8];
    _mm256_store_ps(m, vmax);
    _mm256_store_ps(s, vsum);
    float amax = 0.0f, sum = 0.0f;
    for (int i = 0; i < 8; ++i) {
      amax = std::max(amax, m[i]);
      sum += s[i];
    }
    // max skips NaN; the scale must carry it.
    if (nan) amax = NAN;
    q.scale[row * groups + g] = amax / kAct16Levels;
    q.sum[row * groups + g] = sum;
    // Zero, NaN and Inf groups keep zero codes: their scale alone makes the
    // group's product 0, NaN or NaN, which stays inside this token.
    const bool finite_nonzero = amax > 0.0f && std::isfinite(amax);
    const __m256 inv = _mm256_set1_ps(finite_nonzero ? kAct16Levels / amax : 0.0f);
    for (int i = 0; i < gs; i += 16) {
      __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
      if (finite_nonzero) {
        // Rounded to nearest even.
        a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i), inv));
        b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 8), inv));
      }
      // packs interleaves 128-bit lanes; permute back to element order.
      const __m256i packed =
          _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * gs + i), packed);
    }
  }
}

static inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// y[t, n .. n+ROWS) for one token t: ROWS 8-bit rows against xq row t. Each
// row's result depends only on its own codes and the token, in one order.
template <int ROWS>
static inline void dot8_rows_int16(
    const LinearArgs& a, int n, int t, float* out) {
  const QuantMatrix& m = a.w;
  const int K = m.cols, gs = m.group_size, groups = K / gs;
  const uint8_t* w[ROWS];
  for (int r = 0; r < ROWS; ++r) w[r] = m.weight + static_cast<int64_t>(n + r) * K;
  const int16_t* xq = a.x16->q + static_cast<int64_t>(t) * K;
  const float* sx = a.x16->scale + static_cast<int64_t>(t) * groups;
  const float* xs = a.x16->sum + static_cast<int64_t>(t) * groups;
  __m256 acc[ROWS];
  float bias_acc[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    acc[r] = _mm256_setzero_ps();
    bias_acc[r] = 0.0f;
  }
  for (int g = 0; g < groups; ++g) {
    __m256i isum[ROWS];
    for (int r = 0; r < ROWS; ++r) isum[r] = _mm256_setzero_si256();
    for (int i = g * gs; i < (g + 1) * gs; i += 16) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i));
      for (int r = 0; r < ROWS; ++r) {
        const __m256i c = _mm256_cvtepu8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + i)));
        isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(c, xv));
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const int64_t at = static_cast<int64_t>(n + r) * groups + g;
      const float s = to_float(m.scales, m.scale_type, at);
      const float b = to_float(m.biases, m.scale_type, at);
      acc[r] = _mm256_fmadd_ps(
          _mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(s * sx[g]), acc[r]);
      bias_acc[r] += b * xs[g];
    }
  }
  for (int r = 0; r < ROWS; ++r) out[r] = hsum8(acc[r]) + bias_acc[r];
}

static void linear_rows_int16(
    const LinearArgs& a, int n_begin, int n_end, int t_begin, int t_end) {
  const int64_t N = a.w.rows;
  const int64_t row_bytes = a.w.cols;
  float out[4];
  for (int n = n_begin; n < n_end; n += 4) {
    const int rows = std::min(4, n_end - n);
    // The next rows are fetched into L2 while these are computed.
    if (n + 4 < N) {
      for (int64_t off = 0; off < 4 * row_bytes && n + 4 + off / row_bytes < N; off += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(
                         a.w.weight + (n + 4) * row_bytes + off),
                     _MM_HINT_T1);
      }
    }
    for (int t = t_begin; t < t_end; ++t) {
      if (rows == 4) {
        dot8_rows_int16<4>(a, n, t, out);
      } else {
        for (int r = 0; r < rows; ++r) dot8_rows_int16<1>(a, n + r, t, out + r);
      }
      for (int r = 0; r < rows; ++r) {
        store_as(a.y, a.y_type, t * N + n + r, out[r]);
      }
    }
  }
}

} // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
