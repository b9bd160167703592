// Kernel D: the attention's q/k RMSNorm and rotary embedding in one pass,
// writing the heads-first layout attention reads. A row is one token's
// projection output, all heads: normalised over the whole row (MiniMax's
// q_norm and k_norm span every head), then each head rotated.
// Included by kernels_impl.h, once per instruction set.
#pragma once

namespace fused_moe::cpu::FUSED_MOE_ISA_NS {

static void norm_rope_rows(const NormRopeArgs& a, int r_begin, int r_end) {
  const int width = a.H * a.Dh;
  const int half = a.rotary_dim / 2;
  float* t = scratch<float, 0>(a.Dh);
  for (int r = r_begin; r < r_end; ++r) {
    const int b = r / a.L, l = r % a.L;
    const int64_t x0 = static_cast<int64_t>(r) * width;
    float inv_rms = 1.0f;
    if (a.weight) {
      float ss = 0.0f;
      for (int i = 0; i < width; ++i) {
        const float v = to_float(a.x, a.type, x0 + i);
        ss += v * v;
      }
      inv_rms = 1.0f / std::sqrt(ss / width + a.eps);
    }
    const float* cs = a.cos_sin + static_cast<int64_t>(l) * a.rotary_dim;
    for (int h = 0; h < a.H; ++h) {
      for (int d = 0; d < a.Dh; ++d) {
        const int64_t i = x0 + h * a.Dh + d;
        float v = to_float(a.x, a.type, i);
        if (a.weight) {
          v = v * inv_rms * to_float(a.weight, a.weight_type, h * a.Dh + d);
        }
        t[d] = v;
      }
      // Pairs (i, i + half), or (2i, 2i + 1) in the traditional layout.
      for (int i = 0; i < half; ++i) {
        const int lo = a.traditional ? 2 * i : i;
        const int hi = a.traditional ? 2 * i + 1 : i + half;
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const float x1 = t[lo], x2 = t[hi];
        t[lo] = x1 * c - x2 * s;
        t[hi] = x1 * s + x2 * c;
      }
      const int64_t o0 = ((static_cast<int64_t>(b) * a.H + h) * a.L + l) * a.Dh;
      for (int d = 0; d < a.Dh; ++d) {
        store_as(a.out, a.type, o0 + d, t[d]);
      }
    }
  }
}

} // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
