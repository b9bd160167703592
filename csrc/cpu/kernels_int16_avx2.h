// The AVX2 build's integer path for half-precision activations: int16
// activations against 3-, 4- and 8-bit codes widened to int16, by vpmaddwd.
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
// fp32, in one fixed order per row and token. Since the integer sums are
// exact, widening the codes once per tile (many tokens) or per token (one)
// gives the same bits: a token's result never depends on its batch.
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

// The per-lane shuffle control and multipliers of unpack16 for BITS: code c
// (of 16) starts at bit BITS·c of the 2·BITS bytes, byte b = that / 8 and
// offset o = that % 8; lane c gets bytes b and b+1, times 2^(16-BITS-o).
// Both 128-bit lanes hold the same bytes, so b indexes either.
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
    t.shuffle[2 * c + 1] = static_cast<int8_t>(b + 1);
    t.mul[c] = static_cast<int16_t>(1 << (16 - BITS - o));
  }
  return t;
}
template <int BITS>
inline constexpr Unpack16Tables kUnpack16 = make_unpack16_tables<BITS>();

// 16 codes of a packed row, from code i (a multiple of 16), widened to int16.
// MLX packs a row's codes as one little-endian bit stream, so 16 codes fill
// 2·BITS bytes: 3 and 4 bits are placed by a byte shuffle, shifted to the
// top of their 16-bit lane by a multiply and brought down by a shift.
// `tail`: the row's last 16 codes, read without passing its last byte.
template <int BITS>
static inline __m256i unpack16(const uint8_t* row, int i, bool tail) {
  const uint8_t* p = row + static_cast<int64_t>(i) * BITS / 8;
  if constexpr (BITS == 8) {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    static_assert(BITS == 3 || BITS == 4, "int16 unpacking for 3, 4 and 8 bits");
    __m128i bytes;
    if (BITS == 3 && tail) {
      uint64_t w = 0;
      std::memcpy(&w, p, 2 * BITS);
      bytes = _mm_cvtsi64_si128(static_cast<long long>(w));
    } else {
      bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); // 8 bytes
    }
    const auto& t = kUnpack16<BITS>;
    __m256i v = _mm256_broadcastsi128_si256(bytes);
    v = _mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.shuffle)));
    v = _mm256_mullo_epi16(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.mul)));
    return _mm256_srli_epi16(v, 16 - BITS);
  }
}

// Where a tile's codes come from: packed rows, widened as they are read, or
// rows already widened into int16 scratch.
template <int BITS>
struct PackedCodes {
  const uint8_t* row[4];
  int cols;
  __m256i at(int r, int i) const {
    return unpack16<BITS>(row[r], i, i + 16 == cols);
  }
};
struct WidenedCodes {
  const int16_t* row[4];
  __m256i at(int r, int i) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + i));
  }
};

// A tile's scales and biases as fp32, converted once for all its tokens.
struct TileScales {
  const float* scale[4]; // [groups] each
  const float* bias[4];
};

// Rows [row0, row0 + rows) of m's scales and biases into `buf` [2][4][groups].
static TileScales tile_scales(const QuantMatrix& m, int64_t row0, int rows, float* buf) {
  const int groups = m.cols / m.group_size;
  TileScales t{};
  for (int r = 0; r < rows; ++r) {
    float* s = buf + static_cast<int64_t>(r) * groups;
    float* b = buf + static_cast<int64_t>(4 + r) * groups;
    for (int g = 0; g < groups; ++g) {
      s[g] = to_float(m.scales, m.scale_type, (row0 + r) * groups + g);
      b[g] = to_float(m.biases, m.scale_type, (row0 + r) * groups + g);
    }
    t.scale[r] = s;
    t.bias[r] = b;
  }
  return t;
}

// out[r] = row r · x for the ROWS rows of a tile (codes and their fp32
// scales), against int16 activation row `t` of `x`. Each row's result
// depends only on its own codes and the token, in one order.
template <int ROWS, typename Codes>
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
  for (int g = 0; g < groups; ++g) {
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
      bias_acc[r] += sb.bias[r][g] * xs[g];
    }
  }
  for (int r = 0; r < ROWS; ++r) out[r] = hsum8(acc[r]) + bias_acc[r];
}

template <int BITS>
static PackedCodes<BITS> packed_rows(const QuantMatrix& m, int64_t row0, int rows) {
  PackedCodes<BITS> c{};
  const int64_t row_bytes = static_cast<int64_t>(m.cols) * BITS / 8;
  for (int r = 0; r < rows; ++r) c.row[r] = m.weight + (row0 + r) * row_bytes;
  c.cols = m.cols;
  return c;
}

// The 4 rows from `row0` widened into `buf` [4][cols].
template <int BITS>
static WidenedCodes widen_rows(const QuantMatrix& m, int64_t row0, int16_t* buf) {
  const PackedCodes<BITS> packed = packed_rows<BITS>(m, row0, 4);
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
template <int BITS, typename Dot>
static inline void with_tile_codes(const QuantMatrix& m, int64_t row0, int pairs, Dot dot) {
  if (pairs > kWidenAbovePairs) {
    int16_t* buf = scratch<int16_t, 4>(4 * static_cast<size_t>(m.cols));
    dot(widen_rows<BITS>(m, row0, buf));
  } else {
    dot(packed_rows<BITS>(m, row0, 4));
  }
}

template <int BITS>
static void linear_rows_int16_of(
    const LinearArgs& a, int n_begin, int n_end, int t_begin, int t_end) {
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
    const auto codes = packed_rows<BITS>(a.w, n, rows);
    const TileScales sb = tile_scales(a.w, n, rows, sb_buf);
    for (int t = t_begin; t < t_end; ++t) {
      if (rows == 4) {
        dot_rows_int16<4>(a.w, codes, sb, *a.x16, t, out);
      } else {
        for (int r = 0; r < rows; ++r) {
          const TileScales one = {{sb.scale[r]}, {sb.bias[r]}};
          dot_rows_int16<1>(a.w, packed_rows<BITS>(a.w, n + r, 1), one, *a.x16, t, out + r);
        }
      }
      for (int r = 0; r < rows; ++r) {
        store_as(a.y, a.y_type, t * N + n + r, out[r]);
      }
    }
  }
}

static void linear_rows_int16(
    const LinearArgs& a, int n_begin, int n_end, int t_begin, int t_end) {
  switch (a.w.bits) {
    case 3: return linear_rows_int16_of<3>(a, n_begin, n_end, t_begin, t_end);
    case 4: return linear_rows_int16_of<4>(a, n_begin, n_end, t_begin, t_end);
    case 8: return linear_rows_int16_of<8>(a, n_begin, n_end, t_begin, t_end);
  }
}

// Kernel A on the int16 path: packed rows 2r .. 2r+3 (gate r, up r, gate
// r+1, up r+1) against every pair of the expert.
template <int BITS>
static void gate_up_rows_int16_of(
    const GateUpArgs& a, int expert, const int32_t* pairs, int count, int r_begin, int r_end) {
  const int H = a.w.rows / 2;
  const int k = a.groups.k;
  const int64_t first = static_cast<int64_t>(expert) * a.w.rows;
  float out[4];
  float* sb_buf = scratch<float, 5>(8 * static_cast<size_t>(a.w.cols / a.w.group_size));
  for (int r = r_begin; r < r_end; r += 2) {
    const TileScales sb = tile_scales(a.w, first + 2 * r, 4, sb_buf);
    with_tile_codes<BITS>(a.w, first + 2 * r, count, [&](const auto& codes) {
      for (int i = 0; i < count; ++i) {
        dot_rows_int16<4>(a.w, codes, sb, *a.x16, pairs[i] / k, out);
        const int64_t base = static_cast<int64_t>(pairs[i]) * H;
        store_as(a.h, a.h_type, base + r, silu(out[0]) * out[1]);
        store_as(a.h, a.h_type, base + r + 1, silu(out[2]) * out[3]);
      }
    });
  }
}

static void gate_up_rows_int16(
    const GateUpArgs& a, int expert, const int32_t* pairs, int count, int r_begin, int r_end) {
  switch (a.w.bits) {
    case 3: return gate_up_rows_int16_of<3>(a, expert, pairs, count, r_begin, r_end);
    case 4: return gate_up_rows_int16_of<4>(a, expert, pairs, count, r_begin, r_end);
    case 8: return gate_up_rows_int16_of<8>(a, expert, pairs, count, r_begin, r_end);
  }
}

// Kernel B on the int16 path: rows [d_begin, d_end) of every used expert, in
// increasing expert order, accumulated into y_acc.
template <int BITS>
static void down_rows_int16_of(const DownArgs& a, int d_begin, int d_end) {
  const int D = a.w.rows;
  const int k = a.groups.k;
  float out[4];
  float* sb_buf = scratch<float, 5>(8 * static_cast<size_t>(a.w.cols / a.w.group_size));
  for (int u = 0; u < a.groups.n_used; ++u) {
    const int expert = a.groups.experts[u];
    const int32_t* pairs = a.groups.pairs + a.groups.offsets[u];
    const int count = a.groups.offsets[u + 1] - a.groups.offsets[u];
    for (int d = d_begin; d < d_end; d += 4) {
      const int64_t row0 = static_cast<int64_t>(expert) * D + d;
      const TileScales sb = tile_scales(a.w, row0, 4, sb_buf);
      with_tile_codes<BITS>(a.w, row0, count, [&](const auto& codes) {
        for (int i = 0; i < count; ++i) {
          const int32_t p = pairs[i];
          dot_rows_int16<4>(a.w, codes, sb, *a.h16, p, out);
          const float wp = a.pair_weights[p];
          float* y = a.y_acc + static_cast<int64_t>(p / k) * D + d;
          for (int r = 0; r < 4; ++r) y[r] += wp * out[r];
        }
      });
    }
  }
}

static void down_rows_int16(const DownArgs& a, int d_begin, int d_end) {
  switch (a.w.bits) {
    case 3: return down_rows_int16_of<3>(a, d_begin, d_end);
    case 4: return down_rows_int16_of<4>(a, d_begin, d_end);
    case 8: return down_rows_int16_of<8>(a, d_begin, d_end);
  }
}

} // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
