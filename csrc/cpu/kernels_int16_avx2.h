// The int16 integer path for half-precision activations: int16 activations
// against codes widened to int16, by vpmaddwd.
//
// Included by kernels_impl.h in the AVX2 and AVX-512 builds (the latter
// for the settings its VNNI path does not take; kernels.h, int16_path).
// float16 and bfloat16 activations are quantized per weight group to int16
// (x ≈ scale·xq, |xq| <= 32767: finer than the inputs' own 8- or 11-bit
// mantissas); the codes are widened to int16 and vpmaddwd multiplies 16 of
// them per instruction, where an fp32 FMA takes 8 dequantized weights.
// float32 activations never come here. Per row and token:
//
//   row·x = Σ_g s_g·sx_g·Σ_{i∈g} q_i·xq_i + b_g·Σ_{i∈g} x_i
//
// with the integer sums exact (at most 128·255·32767 < 2^31) and the rest in
// fp32, in one fixed order per row and token. Affine codes of any width are
// the unsigned q; mxfp4 and nvfp4 codes become q = 2·e2m1 in -12..12, with
// s_g half the group's scale and no bias term. Since the integer sums are
// exact, widening the codes once per tile (many tokens) or per token (one)
// gives the same bits: a token's result never depends on its batch.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>

namespace fused_moe::cpu::FUSED_MOE_ISA_NS {

constexpr float kAct16Levels = 32767.0f;

// Fills row `row` of `q` from x [rows, q.cols]. Group sizes are multiples
// of 16.
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
  if (q.split4) {
    // Evens, then odds, per block of 32 (Int16Acts::split4).
    for (int b = 0; b < cols; b += 32) {
      int16_t block[32];
      std::memcpy(block, out + b, sizeof(block));
      for (int m = 0; m < 16; ++m) {
        out[b + m] = block[2 * m];
        out[b + 16 + m] = block[2 * m + 1];
      }
    }
  }
}

static inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// The per-lane shuffle control and multipliers of unpack16 for BITS: code c
// (of 16) starts at bit BITS·c of the 2·BITS bytes, byte b = that / 8 and
// offset o = that % 8; lane c gets bytes b and b+1, times 2^(16-BITS-o).
// Both 128-bit lanes hold the same bytes, so b indexes either. o + BITS <=
// 15 for every width up to 8, so each code lies within its two bytes.
struct Unpack16Tables {
  alignas(32) int8_t shuffle[32];
  alignas(32) int16_t mul[16];
};
template <int BITS>
constexpr Unpack16Tables make_unpack16_tables() {
  Unpack16Tables t{};
  for (int c = 0; c < 16; ++c) {
    const int bit = BITS * c, b = bit / 8, o = bit % 8;
    t.shuffle[2 * c] = static_cast<int8_t>(b);
    // A byte past the 2·BITS loaded ones is never needed: zero it.
    t.shuffle[2 * c + 1] = static_cast<int8_t>(b + 1 < 2 * BITS ? b + 1 : 0x80);
    t.mul[c] = static_cast<int16_t>(1 << (16 - BITS - o));
  }
  return t;
}
template <int BITS>
inline constexpr Unpack16Tables kUnpack16 = make_unpack16_tables<BITS>();

// 2·e2m1 of each nibble, as int8: -12..12 (the shuffle's table).
alignas(32) inline constexpr int8_t kTwiceE2m1[32] = {
    0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
    0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// How a matrix's codes become the int16 q of the dot product.
enum class Codes16 { affine, fp4 };

// 16 codes of a packed row, from code i (a multiple of 16), widened to int16.
// MLX packs a row's codes as one little-endian bit stream, so 16 codes fill
// 2·BITS bytes: widths below 8 are placed by a byte shuffle, shifted to the
// top of their 16-bit lane by a multiply and brought down by a shift.
// `tail`: the row's last 16 codes, read without passing its last byte.
// 4-bit codes come in the split4 order, fp4 ones mapped to 2·e2m1.
template <int BITS, Codes16 KIND = Codes16::affine>
static inline __m256i unpack16(const uint8_t* row, int i, bool tail) {
  const uint8_t* p = row + static_cast<int64_t>(i) * BITS / 8;
  if constexpr (BITS == 4) {
    // Int16Acts::split4: codes i .. i+15 of the block of 32 from i & ~31 are
    // its 16 low nibbles (i & 16 == 0: the even codes) or high nibbles (the
    // odd codes); the block's 16 bytes never pass the row.
    (void)tail;
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (i & ~31) / 2));
    if (i & 16) {
      b = _mm_srli_epi16(b, 4);
    }
    b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    if constexpr (KIND == Codes16::fp4) {
      return _mm256_cvtepi8_epi16(
          _mm_shuffle_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(kTwiceE2m1)), b));
    } else {
      return _mm256_cvtepu8_epi16(b);
    }
  } else if constexpr (BITS == 8) {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    __m128i bytes;
    // Loads that may pass the 2·BITS bytes stay inside the row unless
    // these are its last codes, which are copied instead.
    if (BITS <= 4 && (!tail || BITS == 4)) {
      bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); // 8 bytes
    } else if (tail) {
      alignas(16) uint8_t buf[16] = {};
      std::memcpy(buf, p, 2 * BITS);
      bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
    } else {
      bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); // 16 bytes
    }
    const auto& t = kUnpack16<BITS>;
    __m256i v = _mm256_broadcastsi128_si256(bytes);
    v = _mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.shuffle)));
    v = _mm256_mullo_epi16(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.mul)));
    static_assert(KIND == Codes16::affine, "fp4 codes are 4-bit");
    return _mm256_srli_epi16(v, 16 - BITS);
  }
}

// Where a tile's codes come from: packed rows, widened as they are read, or
// rows already widened into int16 scratch.
template <int BITS, Codes16 KIND>
struct PackedCodes {
  const uint8_t* row[4];
  int cols;
  __m256i at(int r, int i) const {
    return unpack16<BITS, KIND>(row[r], i, i + 16 == cols);
  }
};
struct WidenedCodes {
  const int16_t* row[4];
  __m256i at(int r, int i) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + i));
  }
};

// A tile's scales and biases as fp32, converted once for all its tokens.
// fp modes: half each group's scale (the codes are doubled), no biases.
struct TileScales {
  const float* scale[4]; // [groups] each
  const float* bias[4]; // null for the fp modes
};

// Half of each group scale of row `row_id` of a matrix in an fp mode, into
// out[groups]: the codes are 2·e2m1. Eight at a time; e8m0 by placing the
// byte in the exponent (0 is 2^-127, a subnormal), e4m3 by vcvtph2ps.
static inline void fp_half_scales(const QuantMatrix& m, int64_t row_id, float* out) {
  const int groups = m.cols / m.group_size;
  const uint8_t* s = static_cast<const uint8_t*>(m.scales) + row_id * groups;
  int g = 0;
  if (m.mode == QuantMode::nvfp4) {
    const __m256 mul = _mm256_set1_ps(256.0f * 0.5f * nvfp4_row_factor(m, row_id));
    const __m128i mag = _mm_set1_epi16(0x7F), sgn = _mm_set1_epi16(0x80);
    for (; g + 8 <= groups; g += 8) {
      const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + g)));
      const __m128i mg = _mm_and_si128(b, mag);
      const __m128i h = _mm_or_si128(_mm_slli_epi16(mg, 7), _mm_slli_epi16(_mm_and_si128(b, sgn), 8));
      const __m128i nan16 = _mm_cmpeq_epi16(mg, mag);
      __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), mul);
      v = _mm256_blendv_ps(v, _mm256_set1_ps(NAN), _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan16)));
      _mm256_storeu_ps(out + g, v);
    }
  } else {
    for (; g + 8 <= groups; g += 8) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + g)));
      const __m256i bits = _mm256_blendv_epi8(
          _mm256_slli_epi32(b, 23), _mm256_set1_epi32(0x00400000),
          _mm256_cmpeq_epi32(b, _mm256_setzero_si256()));
      _mm256_storeu_ps(out + g, _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0.5f)));
    }
  }
  const float factor = nvfp4_row_factor(m, row_id);
  for (; g < groups; ++g) {
    out[g] = 0.5f * fp_group_scale(m, row_id, g, factor);
  }
}

// Rows [row0, row0 + rows) of m's scales and biases into `buf` [2][4][groups].
static TileScales tile_scales(const QuantMatrix& m, int64_t row0, int rows, float* buf) {
  const int groups = m.cols / m.group_size;
  TileScales t{};
  for (int r = 0; r < rows; ++r) {
    float* s = buf + static_cast<int64_t>(r) * groups;
    float* b = buf + static_cast<int64_t>(4 + r) * groups;
    if (m.mode == QuantMode::affine) {
      for (int g = 0; g < groups; ++g) {
        s[g] = to_float(m.scales, m.scale_type, (row0 + r) * groups + g);
        b[g] = to_float(m.biases, m.scale_type, (row0 + r) * groups + g);
      }
      t.bias[r] = b;
    } else {
      fp_half_scales(m, row0 + r, s);
      t.bias[r] = nullptr;
    }
    t.scale[r] = s;
  }
  return t;
}

// out[r] = row r · x for the ROWS rows of a tile (codes and their fp32
// scales), against int16 activation row `t` of `x`. Each row's result
// depends only on its own codes and the token, in one order. BIAS: the
// affine bias term (the fp modes have none).
template <int ROWS, bool BIAS, typename Codes>
static inline void dot_rows_int16(
    const QuantMatrix& m, const Codes& codes, const TileScales& sb, const Int16Acts& x,
    int64_t t, float* out) {
  const int K = m.cols, gs = m.group_size, groups = K / gs;
  const int16_t* xq = x.q + t * K;
  const float* sx = x.scale + t * groups;
  const float* xs = x.sum + t * groups;
  __m256 acc[ROWS];
  float bias_acc[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    acc[r] = _mm256_setzero_ps();
    bias_acc[r] = 0.0f;
  }
  if (gs == 16) {
    // nvfp4: a split4 block of 32 codes spans groups g and g + 1; the
    // madd lanes 0-3 hold group g's products, lanes 4-7 group g + 1's.
    for (int i = 0; i < K; i += 32) {
      const int g = i / 16;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i + 16));
      for (int r = 0; r < ROWS; ++r) {
        const __m256i isum = _mm256_add_epi32(_mm256_madd_epi16(codes.at(r, i), x0),
                                              _mm256_madd_epi16(codes.at(r, i + 16), x1));
        const __m256 scale = _mm256_set_m128(_mm_set1_ps(sb.scale[r][g + 1] * sx[g + 1]),
                                             _mm_set1_ps(sb.scale[r][g] * sx[g]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[r]);
        if constexpr (BIAS) {
          bias_acc[r] = std::fma(sb.bias[r][g], xs[g], bias_acc[r]);
          bias_acc[r] = std::fma(sb.bias[r][g + 1], xs[g + 1], bias_acc[r]);
        }
      }
    }
  }
  for (int g = 0; g < groups && gs != 16; ++g) {
    __m256i isum[ROWS];
    for (int r = 0; r < ROWS; ++r) isum[r] = _mm256_setzero_si256();
    for (int i = g * gs; i < (g + 1) * gs; i += 16) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i));
      for (int r = 0; r < ROWS; ++r) {
        isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(codes.at(r, i), xv));
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      acc[r] = _mm256_fmadd_ps(
          _mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(sb.scale[r][g] * sx[g]), acc[r]);
      if constexpr (BIAS) {
        // An explicit fma: left to the compiler, contraction could differ
        // between instantiations (packed or widened codes) and with it the
        // bits of a token alone and in a batch.
        bias_acc[r] = std::fma(sb.bias[r][g], xs[g], bias_acc[r]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    out[r] = BIAS ? hsum8(acc[r]) + bias_acc[r] : hsum8(acc[r]);
  }
}

template <int BITS, Codes16 KIND>
static PackedCodes<BITS, KIND> packed_rows(const QuantMatrix& m, int64_t row0, int rows) {
  PackedCodes<BITS, KIND> c{};
  const int64_t row_bytes = static_cast<int64_t>(m.cols) * BITS / 8;
  for (int r = 0; r < rows; ++r) c.row[r] = m.weight + (row0 + r) * row_bytes;
  c.cols = m.cols;
  return c;
}

// The 4 rows from `row0` widened into `buf` [4][cols].
template <int BITS, Codes16 KIND>
static WidenedCodes widen_rows(const QuantMatrix& m, int64_t row0, int16_t* buf) {
  const PackedCodes<BITS, KIND> packed = packed_rows<BITS, KIND>(m, row0, 4);
  WidenedCodes w{};
  for (int r = 0; r < 4; ++r) {
    int16_t* dst = buf + static_cast<int64_t>(r) * m.cols;
    for (int i = 0; i < m.cols; i += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed.at(r, i));
    }
    w.row[r] = dst;
  }
  return w;
}

// Tokens of one tile above which its codes are widened once into scratch
// rather than again for every token (same bits either way).
constexpr int kWidenAbovePairs = 2;

// Calls dot(codes) for a 4-row tile from `row0`, with the codes packed or
// widened according to `pairs`.
template <int BITS, Codes16 KIND, typename Dot>
static inline void with_tile_codes(const QuantMatrix& m, int64_t row0, int pairs, Dot dot) {
  if (pairs > kWidenAbovePairs) {
    int16_t* buf = scratch<int16_t, 4>(4 * static_cast<size_t>(m.cols));
    dot(widen_rows<BITS, KIND>(m, row0, buf));
  } else {
    dot(packed_rows<BITS, KIND>(m, row0, 4));
  }
}

// Calls fn(bits, kind) with the setting's compile-time code width and kind:
// the allow-list of the int16 path (int16_path).
template <typename Fn>
static inline void with_codes16(const QuantMatrix& m, Fn fn) {
  using A = std::integral_constant<Codes16, Codes16::affine>;
  using F = std::integral_constant<Codes16, Codes16::fp4>;
  if (m.mode != QuantMode::affine) {
    return fn(std::integral_constant<int, 4>{}, F{});
  }
  switch (m.bits) {
    case 2: return fn(std::integral_constant<int, 2>{}, A{});
    case 3: return fn(std::integral_constant<int, 3>{}, A{});
    case 4: return fn(std::integral_constant<int, 4>{}, A{});
    case 5: return fn(std::integral_constant<int, 5>{}, A{});
    case 6: return fn(std::integral_constant<int, 6>{}, A{});
    case 8: return fn(std::integral_constant<int, 8>{}, A{});
  }
}

static void linear_rows_int16(
    const LinearArgs& a, int n_begin, int n_end, int t_begin, int t_end) {
  with_codes16(a.w, [&](auto bits, auto kind) {
    constexpr int BITS = decltype(bits)::value;
    constexpr Codes16 KIND = decltype(kind)::value;
    constexpr bool kBias = KIND == Codes16::affine;
    const int64_t N = a.w.rows;
    const int64_t row_bytes = static_cast<int64_t>(a.w.cols) * BITS / 8;
    float out[4];
    float* sb_buf = scratch<float, 5>(8 * static_cast<size_t>(a.w.cols / a.w.group_size));
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
      const auto codes = packed_rows<BITS, KIND>(a.w, n, rows);
      const TileScales sb = tile_scales(a.w, n, rows, sb_buf);
      for (int t = t_begin; t < t_end; ++t) {
        if (rows == 4) {
          dot_rows_int16<4, kBias>(a.w, codes, sb, *a.x16, t, out);
        } else {
          for (int r = 0; r < rows; ++r) {
            const TileScales one = {{sb.scale[r]}, {sb.bias[r]}};
            dot_rows_int16<1, kBias>(
                a.w, packed_rows<BITS, KIND>(a.w, n + r, 1), one, *a.x16, t, out + r);
          }
        }
        for (int r = 0; r < rows; ++r) {
          store_as(a.y, a.y_type, t * N + n + r, out[r]);
        }
      }
    }
  });
}

// raw[q * count + i] = row (row_id + q) · act(act_rows[i]) for a 4-row tile
// of the expert kernels, on the int16 path.
static void tile_int16(
    const QuantMatrix& m, int64_t row_id, const Int16Acts& x, const int64_t* act_rows,
    int count, float* raw) {
  float* sb_buf = scratch<float, 5>(8 * static_cast<size_t>(m.cols / m.group_size));
  const TileScales sb = tile_scales(m, row_id, 4, sb_buf);
  with_codes16(m, [&](auto bits, auto kind) {
    constexpr int BITS = decltype(bits)::value;
    constexpr Codes16 KIND = decltype(kind)::value;
    with_tile_codes<BITS, KIND>(m, row_id, count, [&](const auto& codes) {
      float out[4];
      for (int i = 0; i < count; ++i) {
        dot_rows_int16<4, KIND == Codes16::affine>(m, codes, sb, x, act_rows[i], out);
        for (int q = 0; q < 4; ++q) raw[q * count + i] = out[q];
      }
    });
  });
}

} // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
