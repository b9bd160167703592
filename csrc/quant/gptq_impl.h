// GPTQ's column pass (see gptq.h), compiled once per CPU level
// (gptq_generic.cpp, gptq_avx2.cpp, gptq_avx512.cpp), each inside its own
// namespace FUSED_MOE_ISA_NS. These files are built with -ffp-contract=off:
// every multiply and add rounds on its own, as numpy's do, on every level.
//
// A tile of weight rows, one per lane of this level's float vector, goes
// through every column of the block: the search over each group, the
// rounding of each column and its error's update of the later columns.
#pragma once

#include <cstdint>
#include <cstring>

#include "mlx/types/half_types.h"
#include "quant/gptq.h"

#ifndef FUSED_MOE_ISA_NS
#error "define FUSED_MOE_ISA_NS before including gptq_impl.h"
#endif

namespace fused_moe::quant::FUSED_MOE_ISA_NS {

namespace {

// Lanes of one float vector for this build (GCC lowers wider vectors' lane
// selects to scalar code).
#if defined(__AVX512F__)
constexpr int kT = 16;
#elif defined(__AVX2__)
constexpr int kT = 8;
#else
constexpr int kT = 4;
#endif
static_assert(kGptqTileRows % kT == 0, "a unit of work is whole tiles");
typedef float vf __attribute__((vector_size(kT * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kT * sizeof(float))));
typedef uint32_t vu __attribute__((vector_size(kT * sizeof(float))));

// quantizer.py's MIN_SCALE (mx.quantize's floor on a scale).
constexpr float kMinScale = 1e-7f;
// quantizer.py's CLIP_RATIOS and LS_STEPS.
constexpr float kClipRatios[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f, 0.7f};
constexpr int kLsSteps = 5;

inline vf splat(float x) {
  return vf{} + x;
}

inline vu bits_of(vf x) {
  vu u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

inline vf from_bits(vu u) {
  vf x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

inline vf vabs(vf x) {
  return from_bits(bits_of(x) & 0x7FFFFFFFu);
}

// np.rint / std::rint (round half to even) for every float: below 2^23 the
// add rounds the fraction away in the default mode; above, x is whole.
inline vf rint_even(vf x) {
  const vf big = splat(8388608.0f);
  const vf ax = vabs(x);
  vf r = (ax + big) - big;
  r = ax < big ? r : ax;
  return from_bits(bits_of(r) | (bits_of(x) & 0x80000000u));
}

// x rounded to the stored dtype and back (finite x): round to nearest even,
// as MLX's and numpy's conversions do.
inline vf round_to(vf x, cpu::FloatType t) {
  switch (t) {
    case cpu::FloatType::f32:
      return x;
    case cpu::FloatType::bf16: {
      const vu u = bits_of(x);
      return from_bits((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
    }
    case cpu::FloatType::f16:
      for (int i = 0; i < kT; ++i) {
        x[i] = static_cast<float>(mlx::core::float16_t(x[i]));
      }
      return x;
  }
  return x;
}

// numpy's float32 sum over the last axis of n (a multiple of 8, at most 128)
// values: eight running sums, then a fixed tree.
struct PairwiseSum {
  vf r[8];
  int n = 0;

  void add(vf v) {
    r[n & 7] = n < 8 ? v : r[n & 7] + v;
    ++n;
  }
  vf total() const {
    return ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
  }
};

float pairwise_sum(const float* a, int n) {
  float r[8];
  for (int j = 0; j < 8; ++j) {
    r[j] = a[j];
  }
  for (int i = 8; i < n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      r[j] = r[j] + a[i + j];
    }
  }
  return ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
}

// The weighted search of one group (quantizer.py's `_search`) for a tile.
class GroupSearch {
 public:
  GroupSearch(const vf* w, const float* d, int gs, int bits, cpu::FloatType t)
      : w_(w), d_(d), gs_(gs), top_(static_cast<float>((1 << bits) - 1)), t_(t) {}

  // Returns the best (scale, bias), rounded to the stored dtype.
  void run(vf& scale, vf& bias) {
    vf rtn_s, rtn_b;
    rtn_pair(rtn_s, rtn_b);
    rounded(rtn_s, rtn_b, best_s_, best_b_);
    best_err_ = score(best_s_, best_b_, best_q_);

    vf lo = w_[0], hi = w_[0];
    for (int j = 1; j < gs_; ++j) {
      lo = w_[j] < lo ? w_[j] : lo;
      hi = w_[j] > hi ? w_[j] : hi;
    }
    const vf mid = 0.5f * (lo + hi);
    for (float r : kClipRatios) {
      const vf a = mid - r * (mid - lo);
      const vf b = mid + r * (hi - mid);
      consider((b - a) / top_, a);
    }

    // Weighted least squares with the best codes fixed (the 2x2 normal
    // equations), as `_search` writes them.
    const float sd = pairwise_sum(d_, gs_);
    PairwiseSum sw_sum;
    for (int j = 0; j < gs_; ++j) {
      sw_sum.add(w_[j] * d_[j]);
    }
    const vf sw = sw_sum.total();
    for (int step = 0; step < kLsSteps; ++step) {
      PairwiseSum sq_sum, sqq_sum, sqw_sum;
      for (int j = 0; j < gs_; ++j) {
        const vf qd = best_q_[j] * d_[j];
        sq_sum.add(qd);
        sqq_sum.add(qd * best_q_[j]);
        sqw_sum.add(qd * w_[j]);
      }
      const vf sq = sq_sum.total(), sqq = sqq_sum.total(), sqw = sqw_sum.total();
      const vf det = sqq * sd - sq * sq;
      const vf norm = sqq * sd;
      const vi ok = det > 1e-12f * (norm < 1e-30f ? splat(1e-30f) : norm);
      const vf safe = ok ? det : splat(1.0f);
      const vf s = ok ? (sqw * sd - sq * sw) / safe : best_s_;
      const vf b = ok ? (sqq * sw - sq * sqw) / safe : best_b_;
      consider(s, b);
    }
    scale = best_s_;
    bias = best_b_;
  }

 private:
  // mx.quantize's pair for the group's weights rounded to the stored dtype
  // (MLX's CPU quantize, mlx/backend/cpu/quantized.cpp), as stored.
  void rtn_pair(vf& scale, vf& bias) const {
    const float eps = 1e-7f;
    vf w_max = splat(-__builtin_inff()), w_min = splat(__builtin_inff());
    for (int j = 0; j < gs_; ++j) {
      const vf x = round_to(w_[j], t_);
      w_max = w_max < x ? x : w_max;
      w_min = x < w_min ? x : w_min;
    }
    const vi mask = vabs(w_min) > vabs(w_max);
    vf s = (w_max - w_min) / top_;
    s = s < eps ? splat(eps) : s;
    s = mask ? s : -s;
    const vf edge = mask ? w_min : w_max;
    const vf q0 = rint_even(edge / s);
    const vi nonzero = q0 != 0.0f;
    scale = round_to(nonzero ? edge / q0 : s, t_);
    bias = round_to(nonzero ? edge : splat(0.0f), t_);
  }

  // The pair as stored: the scale kept off zero, both rounded to the dtype.
  void rounded(vf scale, vf bias, vf& s, vf& b) const {
    const vf floor = scale < 0.0f ? splat(-kMinScale) : splat(kMinScale);
    s = round_to(vabs(scale) < kMinScale ? floor : scale, t_);
    b = round_to(bias, t_);
  }

  // Nearest codes (into q) and sum_j d_j (w_j - s q_j - b)^2.
  vf score(vf s, vf b, vf* q) const {
    PairwiseSum err;
    for (int j = 0; j < gs_; ++j) {
      vf c = rint_even((w_[j] - b) / s);
      c = c < 0.0f ? splat(0.0f) : c;
      c = c > top_ ? splat(top_) : c;
      q[j] = c;
      vf t = c * s;
      t = t + b;
      t = w_[j] - t;
      t = t * t;
      err.add(t * d_[j]);
    }
    return err.total();
  }

  void consider(vf scale, vf bias) {
    vf s, b;
    rounded(scale, bias, s, b);
    const vf err = score(s, b, q_);
    const vi better = err < best_err_;
    best_err_ = better ? err : best_err_;
    best_s_ = better ? s : best_s_;
    best_b_ = better ? b : best_b_;
    for (int j = 0; j < gs_; ++j) {
      best_q_[j] = better ? q_[j] : best_q_[j];
    }
  }

  const vf* w_;
  const float* d_;
  const int gs_;
  const float top_;
  const cpu::FloatType t_;
  vf q_[kGptqMaxBlock];
  vf best_q_[kGptqMaxBlock];
  vf best_s_, best_b_, best_err_;
};

// Rows [r0, r0 + n) (n <= kT) through every column of the block.
void run_tile(const GptqBlockArgs& a, int64_t r0, int n) {
  const int cols = a.cols, gs = a.group_size;
  const int64_t rows = a.rows;
  const float top = static_cast<float>((1 << a.bits) - 1);
  vf cur[kGptqMaxBlock], orig[kGptqMaxBlock];
  uint8_t codes[kGptqMaxBlock][kT];
  for (int k = 0; k < cols; ++k) {
    cur[k] = vf{};
    orig[k] = vf{};
    std::memcpy(&cur[k], a.cur + k * rows + r0, n * sizeof(float));
    std::memcpy(&orig[k], a.orig + k * rows + r0, n * sizeof(float));
  }
  vf group[kGptqMaxBlock];
  for (int g0 = 0; g0 < cols; g0 += gs) {
    // The group's weights as GPTQ has them at the group's first column (the
    // columns before it rounded, all later ones compensating): cur[l] adds
    // to w_l the errors of the columns before the group through coef[k, l];
    // the group's own earlier columns, not rounded yet, count with their
    // moves from w (group[m] - w_m) in place of an error. Column g0 is
    // cur[g0] itself.
    for (int l = 0; l < gs; ++l) {
      group[l] = cur[g0 + l];
    }
    for (int m = 0; m < gs; ++m) {
      const vf moved = group[m] - orig[g0 + m];
      const float* c = a.coef + static_cast<int64_t>(g0 + m) * cols + g0;
      for (int l = m + 1; l < gs; ++l) {
        group[l] = group[l] - c[l] * moved;
      }
    }
    vf s, b;
    GroupSearch(group, a.diag + g0, gs, a.bits, a.scale_type).run(s, b);
    const int64_t pair = (g0 / gs) * rows + r0;
    std::memcpy(a.scales + pair, &s, n * sizeof(float));
    std::memcpy(a.biases + pair, &b, n * sizeof(float));
    for (int k = g0; k < g0 + gs; ++k) {
      vf q = rint_even((cur[k] - b) / s);
      q = q < 0.0f ? splat(0.0f) : q;
      q = q > top ? splat(top) : q;
      vf deq = q * s;
      deq = deq + b;
      const vf err = orig[k] - deq;
      for (int i = 0; i < kT; ++i) {
        codes[k][i] = static_cast<uint8_t>(q[i]);
      }
      std::memcpy(a.delta + k * rows + r0, &err, n * sizeof(float));
      const float* c = a.coef + static_cast<int64_t>(k) * cols;
      for (int l = k + 1; l < cols; ++l) {
        cur[l] = cur[l] + c[l] * err;
      }
    }
  }
  // Each row's codes as one little-endian bit stream, code k at bit k*bits.
  for (int i = 0; i < n; ++i) {
    uint32_t* out = a.packed + (r0 + i) * a.packed_words + a.first_word;
    uint64_t stream = 0;
    int filled = 0;
    for (int k = 0; k < cols; ++k) {
      stream |= static_cast<uint64_t>(codes[k][i]) << filled;
      filled += a.bits;
      if (filled >= 32) {
        *out++ = static_cast<uint32_t>(stream);
        stream >>= 32;
        filled -= 32;
      }
    }
  }
}

} // namespace

void gptq_rows(const GptqBlockArgs& args, int64_t r_begin, int64_t r_end) {
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kT) {
    run_tile(args, r0, static_cast<int>(r_end - r0 < kT ? r_end - r0 : kT));
  }
}

} // namespace fused_moe::quant::FUSED_MOE_ISA_NS
