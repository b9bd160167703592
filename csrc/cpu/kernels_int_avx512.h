// Integer dot products for half-precision activations, AVX-512 VNNI + VBMI.
//
// Included by kernels_impl.h in the AVX-512 build only. float16 and bfloat16
// activations are quantized per weight group to ~15 bits, split into two
// int8 planes (x ≈ scale·(128·hi + lo)), and multiplied with the unsigned
// 3/4-bit codes by vpdpbusd, 64 codes per instruction against 16 for an fp32
// FMA. ~15 bits is finer than the inputs' own 8- or 11-bit mantissas.
// float32 inputs never come here.
//
// Per row and token:  row·x = Σ_g s_g·sx_g·Σ_{i∈g} q_i·xq_i + b_g·Σ_{i∈g} x_i
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace fused_moe::cpu::FUSED_MOE_ISA_NS {

// Largest |128·hi + lo|: hi stays within int8 and lo within [-64, 63].
constexpr float kActLevels = 16256.0f;
constexpr int kChunk = 64; // codes per vpdpbusd
constexpr int kPrefetchRows = 4; // how far ahead the weight rows are fetched

// Where activation i of a 32-code block sits, so that it meets its code: the
// 3-bit unpacking keeps codes in order; the 4-bit one yields the 16 low
// nibbles (even codes) of a block before the 16 high nibbles (odd codes).
static inline int act_position(int i, int bits) {
  if (bits == 3) {
    return i;
  }
  const int base = i & ~31, j = i & 31;
  return base + (j & 1) * 16 + j / 2;
}

// Quantizes one activation row (see QuantizedActs).
static void quantize_acts(const float* x, int64_t row, const QuantizedActs& q) {
  const int cols = q.cols, gs = q.group_size, groups = cols / gs;
  int8_t* hi = q.hi + row * cols;
  int8_t* lo = q.lo + row * cols;
  for (int g = 0; g < groups; ++g) {
    const float* xg = x + row * cols + g * gs;
    float amax = 0.0f, sum = 0.0f;
    bool has_nan = false;
    for (int i = 0; i < gs; ++i) {
      amax = std::max(amax, std::fabs(xg[i]));
      sum += xg[i];
      has_nan |= std::isnan(xg[i]);
    }
    if (has_nan) {
      amax = NAN; // std::max skips NaN; the scale must carry it
    }
    q.scale[row * groups + g] = amax / kActLevels;
    q.sum[row * groups + g] = sum;
    // Zero, NaN and Inf groups keep zero planes: their scale alone makes the
    // group's product 0, NaN or NaN, which stays inside this token.
    const bool finite_nonzero = amax > 0.0f && std::isfinite(amax);
    const float inv = finite_nonzero ? kActLevels / amax : 0.0f;
    for (int i = 0; i < gs; ++i) {
      const int v = finite_nonzero ? static_cast<int>(std::lrintf(xg[i] * inv)) : 0;
      const int h = (v + 64) >> 7;
      const int pos = g * gs + act_position(i, q.bits);
      hi[pos] = static_cast<int8_t>(h);
      lo[pos] = static_cast<int8_t>(v - (h << 7));
    }
  }
}

// 64 codes of a row, as unsigned bytes in act_position order.
template <int BITS, bool kLast = false>
static inline __m512i unpack_chunk(const uint8_t* p) {
  if constexpr (BITS == 3) {
    // Qword j gets source bytes 3j..3j+7; byte i of it then takes the 8 bits
    // starting at bit 3i, of which the low 3 are code 8j+i.
    const __m512i perm = _mm512_set_epi8(
        28, 27, 26, 25, 24, 23, 22, 21, 25, 24, 23, 22, 21, 20, 19, 18,
        22, 21, 20, 19, 18, 17, 16, 15, 19, 18, 17, 16, 15, 14, 13, 12,
        16, 15, 14, 13, 12, 11, 10, 9, 13, 12, 11, 10, 9, 8, 7, 6,
        10, 9, 8, 7, 6, 5, 4, 3, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i shifts = _mm512_set1_epi64(0x15120F0C09060300LL);
    // The row's last chunk uses a masked load, which never reads past its
    // 24 bytes; the others may read a few bytes into the next chunk.
    const __m512i raw = kLast
        ? _mm512_maskz_loadu_epi8(0xFFFFFFull, p)
        : _mm512_castsi256_si512(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i bits = _mm512_multishift_epi64_epi8(
        shifts, _mm512_permutexvar_epi8(perm, raw));
    return _mm512_and_si512(bits, _mm512_set1_epi8(7));
  } else {
    // 128-bit lanes: low nibbles of bytes 0-15, high nibbles of bytes 0-15,
    // then the same for bytes 16-31.
    const __m256i raw =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i dup = _mm512_permutexvar_epi64(
        _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(raw));
    const __m512i shifts = _mm512_setr_epi64(0, 0, 0x0004000400040004LL,
        0x0004000400040004LL, 0, 0, 0x0004000400040004LL,
        0x0004000400040004LL);
    return _mm512_and_si512(
        _mm512_srlv_epi16(dup, shifts), _mm512_set1_epi8(0x0F));
  }
}

template <int BITS>
static void unpack_row(const uint8_t* q, int cols, uint8_t* out) {
  const int last = cols - kChunk;
  for (int c = 0; c < last; c += kChunk) {
    _mm512_storeu_si512(out + c, unpack_chunk<BITS>(q + c * BITS / 8));
  }
  _mm512_storeu_si512(out + last, unpack_chunk<BITS, true>(q + last * BITS / 8));
}

// Lanes [0, n) of a 16-lane vector, n >= 1.
static inline __mmask16 first_lanes(int n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// Up to 16 scales or biases from `i` on, as fp32; lanes past n are zero.
static inline __m512 load_affine(const void* p, FloatType t, int64_t i, int n) {
  const __mmask16 m = first_lanes(n);
  switch (t) {
    case FloatType::f32:
      return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
    case FloatType::f16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
          m, static_cast<const uint16_t*>(p) + i));
    case FloatType::bf16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
              m, static_cast<const uint16_t*>(p) + i)),
          16));
  }
  return _mm512_setzero_ps();
}

// One row's scales and biases as fp32, converted once per row: s[groups]
// then b[groups] in `out`.
static inline void row_affine(const QuantMatrix& m, int64_t row_id, float* out) {
  const int groups = m.cols / m.group_size;
  for (int g = 0; g < groups; g += 16) {
    const int n = std::min(16, groups - g);
    const int64_t at = row_id * groups + g;
    _mm512_mask_storeu_ps(out + g, first_lanes(n),
                          load_affine(m.scales, m.scale_type, at, n));
    _mm512_mask_storeu_ps(out + groups + g, first_lanes(n),
                          load_affine(m.biases, m.scale_type, at, n));
  }
}

// For one row (fp32 scales s, biases b) and one activation row:
// scale[g] = s_g·sx_g for every group, and the returned Σ_g b_g·(Σx)_g.
static inline float row_act_affine(
    const float* s,
    const float* b,
    const float* sx,
    const float* xsum,
    int groups,
    float* scale) {
  __m512 bias_acc = _mm512_setzero_ps();
  for (int g = 0; g < groups; g += 16) {
    const __mmask16 mask = first_lanes(groups - g);
    _mm512_mask_storeu_ps(scale + g, mask,
        _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + g),
                      _mm512_maskz_loadu_ps(mask, sx + g)));
    bias_acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, b + g),
        _mm512_maskz_loadu_ps(mask, xsum + g), bias_acc);
  }
  return _mm512_reduce_add_ps(bias_acc);
}

// A row's codes as 64-byte chunks: unpacked once into a buffer when several
// tokens share the row, or unpacked on the fly when one token uses it.
struct BufferedCodes {
  const uint8_t* codes;
  __m512i operator()(int off) const {
    return _mm512_loadu_si512(codes + off);
  }
};

template <int BITS>
struct PackedCodes {
  const uint8_t* packed; // the row's packed bytes
  int last; // offset of the row's last chunk, read with a masked load
  __m512i operator()(int off) const {
    const uint8_t* p = packed + off * BITS / 8;
    return off == last ? unpack_chunk<BITS, true>(p) : unpack_chunk<BITS>(p);
  }
};

// out[t] = row · act(t) for TOKENS activation rows (indices into q).
template <int TOKENS, typename Codes>
static inline void row_dot_int(
    const float* affine, // the row's fp32 scales then biases (row_affine)
    Codes codes,
    const QuantizedActs& q,
    const int64_t* act_rows,
    float* scale_buf, // [TOKENS * groups]
    float* out) {
  const int cols = q.cols, gs = q.group_size, groups = cols / gs;
  const int8_t* hi[TOKENS];
  const int8_t* lo[TOKENS];
  const float* scale[TOKENS];
  float bias_part[TOKENS];
  // Two accumulators per token, alternating by group, halve the length of
  // the dependent chain of FMAs. They are separate arrays indexed only by
  // constants, so they stay in registers (an index like `g & 1` sends them
  // through the stack on every group).
  __m512 acc_even[TOKENS], acc_odd[TOKENS];
  for (int t = 0; t < TOKENS; ++t) {
    hi[t] = q.hi + act_rows[t] * cols;
    lo[t] = q.lo + act_rows[t] * cols;
    float* sc = scale_buf + t * groups;
    bias_part[t] = row_act_affine(affine, affine + groups,
                                  q.scale + act_rows[t] * groups,
                                  q.sum + act_rows[t] * groups, groups, sc);
    scale[t] = sc;
    acc_even[t] = acc_odd[t] = _mm512_setzero_ps();
  }
  if (gs == 32) {
    // Lanes 0-7 of a chunk belong to group 2c, lanes 8-15 to group 2c+1.
    auto chunk = [&](int c, __m512(&acc)[TOKENS]) {
      const __m512i w = codes(c * kChunk);
      for (int t = 0; t < TOKENS; ++t) {
        const __m512i ih = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
            _mm512_loadu_si512(hi[t] + c * kChunk));
        const __m512i il = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
            _mm512_loadu_si512(lo[t] + c * kChunk));
        const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(ih, 7), il);
        const __m512 sc = _mm512_mask_blend_ps(0xFF00,
            _mm512_set1_ps(scale[t][2 * c]), _mm512_set1_ps(scale[t][2 * c + 1]));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), sc, acc[t]);
      }
    };
    const int n = cols / kChunk;
    int c = 0;
    for (; c + 2 <= n; c += 2) {
      chunk(c, acc_even);
      chunk(c + 1, acc_odd);
    }
    if (c < n) {
      chunk(c, acc_even);
    }
  } else {
    const int chunks = gs / kChunk;
    auto group = [&](int g, __m512(&acc)[TOKENS]) {
      __m512i ih[TOKENS], il[TOKENS];
      for (int t = 0; t < TOKENS; ++t) {
        ih[t] = il[t] = _mm512_setzero_si512();
      }
      for (int cc = 0; cc < chunks; ++cc) {
        const int off = g * gs + cc * kChunk;
        const __m512i w = codes(off);
        for (int t = 0; t < TOKENS; ++t) {
          ih[t] = _mm512_dpbusd_epi32(ih[t], w, _mm512_loadu_si512(hi[t] + off));
          il[t] = _mm512_dpbusd_epi32(il[t], w, _mm512_loadu_si512(lo[t] + off));
        }
      }
      for (int t = 0; t < TOKENS; ++t) {
        const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(ih[t], 7), il[t]);
        acc[t] = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(v), _mm512_set1_ps(scale[t][g]), acc[t]);
      }
    };
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
      group(g, acc_even);
      group(g + 1, acc_odd);
    }
    if (g < groups) {
      group(g, acc_even);
    }
  }
  for (int t = 0; t < TOKENS; ++t) {
    out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc_even[t], acc_odd[t])) +
        bias_part[t];
  }
}

// out[i] = row · act(act_row_of(pairs[i])) for every pair of one expert.
template <typename ActRowOf>
static void row_dot_pairs_int(
    const QuantMatrix& m,
    int e,
    int row,
    const QuantizedActs& q,
    const int32_t* pairs,
    int count,
    ActRowOf act_row_of,
    uint8_t* codes,
    float* scale_buf, // [6 * cols / group_size]
    float* out) {
  const int64_t row_id = static_cast<int64_t>(e) * m.rows + row;
  const int64_t row_bytes = static_cast<int64_t>(m.cols) * m.bits / 8;
  const uint8_t* packed = m.weight + row_id * row_bytes;
  // Rows are visited in order: fetch a few ahead to hide memory latency.
  if (row + kPrefetchRows < m.rows) {
    const uint8_t* ahead = packed + kPrefetchRows * row_bytes;
    for (int64_t off = 0; off < row_bytes; off += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
    }
  }
  const int groups = m.cols / m.group_size;
  float* affine = scale_buf;
  row_affine(m, row_id, affine);
  scale_buf += 2 * groups;
  int64_t rows[4];
  if (count == 1) {
    // One token (decode): unpacking into a buffer would only add a store
    // and a reload per chunk.
    rows[0] = act_row_of(pairs[0]);
    const int last = m.cols - kChunk;
    if (m.bits == 3) {
      row_dot_int<1>(affine, PackedCodes<3>{packed, last}, q, rows, scale_buf, out);
    } else {
      row_dot_int<1>(affine, PackedCodes<4>{packed, last}, q, rows, scale_buf, out);
    }
    return;
  }
  if (m.bits == 3) {
    unpack_row<3>(packed, m.cols, codes);
  } else {
    unpack_row<4>(packed, m.cols, codes);
  }
  const BufferedCodes buffered{codes};
  int i = 0;
  for (; i + 4 <= count; i += 4) {
    for (int t = 0; t < 4; ++t) rows[t] = act_row_of(pairs[i + t]);
    row_dot_int<4>(affine, buffered, q, rows, scale_buf, out + i);
  }
  for (; i < count; ++i) {
    rows[0] = act_row_of(pairs[i]);
    row_dot_int<1>(affine, buffered, q, rows, scale_buf, out + i);
  }
}

} // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
