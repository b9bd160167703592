// Integer dot products for half-precision activations, AVX-512 VNNI + VBMI.
//
// Included by kernels_impl.h in the AVX-512 build only. float16 and bfloat16
// activations are quantized per weight group to ~15 bits, split into two
// int8 planes (x ≈ scale·(128·hi + lo)), and multiplied with the unsigned
// 3/4-bit codes by vpdpbusd, 64 codes per instruction against 16 for an fp32
// FMA. ~15 bits is finer than the inputs' own 8- or 11-bit mantissas; one
// int8 plane alone broke the tolerance rule by about 3×. float32 inputs
// never come here.
//
// Per row and token:  row·x = Σ_g s_g·sx_g·Σ_{i∈g} q_i·xq_i + b_g·Σ_{i∈g} x_i
//
// Cost on Zen 4: vpdpbusd, vpmultishiftqb and the FMA share one pair of
// pipes and vpermb takes from both pairs. The per-chunk instruction mix
// alone measured 4.8 cycles per 64 codes and row; dot_tile, in cache, 6.5.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>

namespace fused_moe::cpu::FUSED_MOE_ISA_NS {

// Largest |128·hi + lo|: hi stays within int8 and lo within [-64, 63].
constexpr float kActLevels = 16256.0f;
constexpr int kChunk = 64; // codes per vpdpbusd

// Where activation i of a 32-code block sits, so that it meets its code: the
// 3- and 8-bit unpackings keep codes in order; the 4-bit one yields the 16 low
// nibbles (even codes) of a block before the 16 high nibbles (odd codes).
// As a byte permutation of the block: byte m takes activation src(m).
// Built once, not per row.
static inline __m256i act_positions(int bits) {
  static const auto tables = [] {
    std::array<std::array<uint8_t, 32>, 2> t{}; // [0]: in order, [1]: 4-bit
    for (int m = 0; m < 32; ++m) {
      t[0][m] = static_cast<uint8_t>(m);
      t[1][m] = static_cast<uint8_t>(m < 16 ? 2 * m : 2 * (m - 16) + 1);
    }
    return t;
  }();
  return _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(tables[bits == 4 ? 1 : 0].data()));
}

// 32 int32 values (lo16, then hi16) as int8 bytes in act_positions order.
static inline __m256i to_plane(__m512i lo16, __m512i hi16, __m256i positions) {
  const __m256i bytes = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm512_cvtepi32_epi8(lo16)),
      _mm512_cvtepi32_epi8(hi16), 1);
  return _mm256_permutexvar_epi8(positions, bytes);
}

// Quantizes one activation row (see QuantizedActs). Group sizes are
// multiples of 32.
static void quantize_acts(const float* x, int64_t row, const QuantizedActs& q) {
  const int cols = q.cols, gs = q.group_size, groups = cols / gs;
  int8_t* hi = q.hi + row * cols;
  int8_t* lo = q.lo + row * cols;
  const __m256i positions = act_positions(q.bits);
  for (int g = 0; g < groups; ++g) {
    const float* xg = x + row * cols + g * gs;
    __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int i = 0; i < gs; i += 16) {
      const __m512 v = _mm512_loadu_ps(xg + i);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      vsum = _mm512_add_ps(vsum, v);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    // max skips NaN; the scale must carry it.
    const float amax = nan ? NAN : _mm512_reduce_max_ps(vmax);
    q.scale[row * groups + g] = amax / kActLevels;
    q.sum[row * groups + g] = _mm512_reduce_add_ps(vsum);
    // Zero, NaN and Inf groups keep zero planes: their scale alone makes the
    // group's product 0, NaN or NaN, which stays inside this token.
    const bool finite_nonzero = amax > 0.0f && std::isfinite(amax);
    const __m512 inv = _mm512_set1_ps(kActLevels / amax);
    for (int i = 0; i < gs; i += 32) {
      __m512i h[2], l[2];
      for (int half = 0; half < 2; ++half) {
        // Rounded to nearest even. x·0 is NaN for Inf or NaN x, so such
        // groups skip the conversion.
        const __m512i v = finite_nonzero
            ? _mm512_cvtps_epi32(
                  _mm512_mul_ps(_mm512_loadu_ps(xg + i + 16 * half), inv))
            : _mm512_setzero_si512();
        h[half] = _mm512_srai_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(64)), 7);
        l[half] = _mm512_sub_epi32(v, _mm512_slli_epi32(h[half], 7));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + g * gs + i),
                          to_plane(h[0], h[1], positions));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + g * gs + i),
                          to_plane(l[0], l[1], positions));
    }
  }
}

// 64 codes of a row, as unsigned bytes in act_position order.
template <int BITS, bool kLast = false>
static inline __m512i unpack_chunk(const uint8_t* p) {
  if constexpr (BITS == 8) {
    // The bytes are the codes.
    return _mm512_loadu_si512(p);
  } else if constexpr (BITS == 3) {
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

// A tile is kTileRows (4) rows × up to kMaxTileTokens tokens. The rows'
// int32 group sums are folded into one vector (lane 4j + r holds row r), so
// each group costs one conversion and one FMA per token for all four rows.
static_assert(kTileRows == 4, "the folds below take four rows");
constexpr int kMaxTileTokens = 4;

// Floats of per-token scale quads for `groups` groups (whole blocks of 16).
static inline int quad_floats(int groups) {
  return (groups + 15) / 16 * 16 * kTileRows;
}

// Where group g's quad (s_g·sx_g of rows 0-3) sits in a token's scales: the
// 4×4 transposes of tile_affine leave blocks of 16 groups in this order.
static inline int quad_at(int g) {
  return (g & ~15) * 4 + (g & 3) * 16 + ((g >> 2) & 3) * 4;
}

// a + b folded so that each 128-bit lane holds [Σ a, Σ b] pairs:
// lanes (a0+a2, b0+b2, a1+a3, b1+b3) of every 128-bit lane.
static inline __m512i fold2(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}

// Four rows' vectors folded to lane 4j + r = the part of row r in 128-bit
// lane j. The same adds in the same order for every row.
static inline __m512i fold4(const __m512i v[kTileRows]) {
  const __m512i a = fold2(v[0], v[1]), b = fold2(v[2], v[3]);
  return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}

static inline __m512 fold4(const __m512 v[kTileRows]) {
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
  const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
  const __m512d ad = _mm512_castps_pd(a), bd = _mm512_castps_pd(b);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ad, bd)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(ad, bd)));
}

// Per token of the tile: the group scale quads s_g·sx_g in quad_at order,
// and the bias part Σ_g b_g·(Σx)_g of every row, folded like the sums.
template <int TOKENS>
static inline void tile_affine(
    const QuantMatrix& m,
    int64_t row_id, // of the tile's first row
    const QuantizedActs& q,
    const int64_t* act_rows,
    float* quads, // [TOKENS][quad_floats(groups)]
    __m512 bias[TOKENS]) {
  const int groups = m.cols / m.group_size;
  const int stride = quad_floats(groups);
  __m512 bias_acc[TOKENS][kTileRows];
  for (int t = 0; t < TOKENS; ++t) {
    for (int r = 0; r < kTileRows; ++r) bias_acc[t][r] = _mm512_setzero_ps();
  }
  for (int g = 0; g < groups; g += 16) {
    const int n = std::min(16, groups - g);
    const __mmask16 mask = first_lanes(n);
    __m512 s[kTileRows], b[kTileRows];
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t at = (row_id + r) * groups + g;
      s[r] = load_affine(m.scales, m.scale_type, at, n);
      b[r] = load_affine(m.biases, m.scale_type, at, n);
    }
    for (int t = 0; t < TOKENS; ++t) {
      const __m512 sx = _mm512_maskz_loadu_ps(mask, q.scale + act_rows[t] * groups + g);
      const __m512 xsum = _mm512_maskz_loadu_ps(mask, q.sum + act_rows[t] * groups + g);
      __m512 p[kTileRows];
      for (int r = 0; r < kTileRows; ++r) {
        p[r] = _mm512_mul_ps(s[r], sx);
        bias_acc[t][r] = _mm512_fmadd_ps(b[r], xsum, bias_acc[t][r]);
      }
      // 4×4 transposes within each 128-bit lane: vector k gets the quads
      // of groups g + 4j + k (quad_at).
      const __m512 t0 = _mm512_unpacklo_ps(p[0], p[1]), t1 = _mm512_unpackhi_ps(p[0], p[1]);
      const __m512 t2 = _mm512_unpacklo_ps(p[2], p[3]), t3 = _mm512_unpackhi_ps(p[2], p[3]);
      auto lo = [](__m512 a, __m512 c) {
        return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
      };
      auto hi = [](__m512 a, __m512 c) {
        return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
      };
      float* out = quads + t * stride + g * kTileRows;
      _mm512_storeu_ps(out, lo(t0, t2));
      _mm512_storeu_ps(out + 16, hi(t0, t2));
      _mm512_storeu_ps(out + 32, lo(t1, t3));
      _mm512_storeu_ps(out + 48, hi(t1, t3));
    }
  }
  for (int t = 0; t < TOKENS; ++t) bias[t] = fold4(bias_acc[t]);
}

// out[r * out_stride + t] = row (row_id + r) · act(act_rows[t]) for the
// tile's kTileRows rows and TOKENS activation rows. Codes are unpacked on the fly,
// once per tile, straight into registers. `next` (or null) is the start of
// the kTileRows rows of the tile that will follow: it is fetched meanwhile,
// a tile ahead, which hides the memory latency that one core's hardware
// prefetcher leaves exposed.
//
// One step covers kChunk codes per row, or a whole group when the group is
// longer: per (row, token) two vpdpbusd chains give the hi and lo plane
// sums, combined as 128·hi + lo; the four rows are folded into one vector,
// converted once and scaled once per group. A row's result does not depend
// on its place in the tile, on the other rows, or on the other tokens.
template <int BITS, int GS, int TOKENS>
static inline void dot_tile(
    const QuantMatrix& m,
    int64_t row_id,
    const QuantizedActs& q,
    const int64_t* act_rows,
    const uint8_t* next,
    float* quads,
    float* out,
    int out_stride) {
  constexpr int kStepChunks = GS > kChunk ? GS / kChunk : 1;
  constexpr int kStep = kStepChunks * kChunk; // codes per step
  const int cols = m.cols;
  const int64_t row_bytes = static_cast<int64_t>(cols) * BITS / 8;
  const int stride = quad_floats(cols / GS);
  const uint8_t* packed[kTileRows];
  for (int r = 0; r < kTileRows; ++r) {
    packed[r] = m.weight + (row_id + r) * row_bytes;
  }
  const int8_t* hi[TOKENS];
  const int8_t* lo[TOKENS];
  for (int t = 0; t < TOKENS; ++t) {
    hi[t] = q.hi + act_rows[t] * cols;
    lo[t] = q.lo + act_rows[t] * cols;
  }
  __m512 acc[TOKENS];
  tile_affine<TOKENS>(m, row_id, q, act_rows, quads, acc);
  // The codes of one step, unpacked. kLast: the row's final step, whose
  // last chunk must not read past the row (a masked load for 3-bit codes).
  using Codes = __m512i[kTileRows][kStepChunks];
  auto unpack_step = [&](int off, auto last_tag, Codes& codes)
      __attribute__((always_inline)) {
    constexpr bool kLast = decltype(last_tag)::value;
    for (int r = 0; r < kTileRows; ++r) {
      for (int c = 0; c < kStepChunks; ++c) {
        const uint8_t* p = packed[r] + (off + c * kChunk) * BITS / 8;
        codes[r][c] = (kLast && c == kStepChunks - 1)
            ? unpack_chunk<BITS, true>(p)
            : unpack_chunk<BITS>(p);
      }
    }
  };
  auto step = [&](int off, const Codes& codes) __attribute__((always_inline)) {
    if (next) {
      // A step of 3/4-bit codes spans at most one cache line; 8-bit steps
      // of a 128-code group span two.
      constexpr int kStepLines = BITS == 8 ? kStep / 64 : 1;
      for (int r = 0; r < kTileRows; ++r) {
        for (int l = 0; l < kStepLines; ++l) {
          // To L2: a software prefetch into L1 holds one of L1's few miss
          // buffers until its line arrives, which capped one core's stream
          // at about 10 GB/s.
          _mm_prefetch(reinterpret_cast<const char*>(
                           next + r * row_bytes + off * BITS / 8 + 64 * l),
                       _MM_HINT_T1);
        }
      }
    }
    const int g = off / GS;
    for (int t = 0; t < TOKENS; ++t) {
      __m512i xh[kStepChunks], xl[kStepChunks];
      for (int c = 0; c < kStepChunks; ++c) {
        xh[c] = _mm512_loadu_si512(hi[t] + off + c * kChunk);
        xl[c] = _mm512_loadu_si512(lo[t] + off + c * kChunk);
      }
      __m512i v[kTileRows];
      for (int r = 0; r < kTileRows; ++r) {
        const __m512i* w = codes[r];
        v[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], xh[0]);
        for (int c = 1; c < kStepChunks; ++c) {
          v[r] = _mm512_dpbusd_epi32(v[r], w[c], xh[c]);
        }
        v[r] = _mm512_slli_epi32(v[r], 7);
        for (int c = 0; c < kStepChunks; ++c) {
          v[r] = _mm512_dpbusd_epi32(v[r], w[c], xl[c]);
        }
      }
      const float* sc = quads + t * stride;
      __m512 scale;
      if constexpr (GS >= kChunk) {
        scale = _mm512_broadcast_f32x4(_mm_loadu_ps(sc + quad_at(g)));
      } else {
        // 128-bit lanes 0-1 of a chunk belong to group g, lanes 2-3 to g+1.
        scale = _mm512_mask_broadcast_f32x4(
            _mm512_broadcast_f32x4(_mm_loadu_ps(sc + quad_at(g))), 0xFF00,
            _mm_loadu_ps(sc + quad_at(g + 1)));
      }
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(fold4(v)), scale, acc[t]);
    }
  };
  // Software-pipelined: the next step's codes are unpacked before this
  // step's dot products (2-4% faster than unpacking in step order).
  const int last = cols - kStep;
  Codes a, b;
  if (last == 0) {
    unpack_step(0, std::true_type{}, a);
    step(0, a);
  } else {
    // Two steps per iteration, alternating buffers a and b.
    unpack_step(0, std::false_type{}, a);
    int off = 0;
    for (; off + 2 * kStep < last; off += 2 * kStep) {
      unpack_step(off + kStep, std::false_type{}, b);
      step(off, a);
      unpack_step(off + 2 * kStep, std::false_type{}, a);
      step(off + kStep, b);
    }
    // off + kStep == last or off + 2·kStep == last.
    if (off + kStep == last) {
      unpack_step(last, std::true_type{}, b);
      step(off, a);
      step(last, b);
    } else {
      unpack_step(off + kStep, std::false_type{}, b);
      step(off, a);
      unpack_step(last, std::true_type{}, a);
      step(off + kStep, b);
      step(last, a);
    }
  }
  for (int t = 0; t < TOKENS; ++t) {
    // The four 128-bit lanes of the folded sums, added pairwise.
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(acc[t]),
                                      _mm512_extractf32x8_ps(acc[t], 1));
    alignas(16) float quad[4];
    _mm_store_ps(quad, _mm_add_ps(_mm256_castps256_ps128(half),
                                  _mm256_extractf128_ps(half, 1)));
    for (int r = 0; r < kTileRows; ++r) out[r * out_stride + t] = quad[r];
  }
}

// out[r * count + i] = row (row_id + r) · act(act_rows[i]) for kTileRows
// consecutive rows and `count` activation rows, in tiles of up to
// kMaxTileTokens tokens. `next_row_id` (or -1) starts the rows of the next
// call, fetched meanwhile. The allow-list of instantiated configurations is
// bits {3, 4, 8} (vnni_path) × group size {32, 64, 128}.
static void dot_rows_of(
    const QuantMatrix& m,
    int64_t row_id,
    const QuantizedActs& q,
    const int64_t* act_rows,
    int count,
    int64_t next_row_id,
    float* quads,
    float* out) {
  const uint8_t* next = next_row_id < 0
      ? nullptr
      : m.weight + next_row_id * (static_cast<int64_t>(m.cols) * m.bits / 8);
  auto run = [&](auto bits, auto gs) {
    constexpr int BITS = decltype(bits)::value, GS = decltype(gs)::value;
    int i = 0;
    auto tile = [&](auto tokens) {
      dot_tile<BITS, GS, decltype(tokens)::value>(
          m, row_id, q, act_rows + i, next, quads, out + i, count);
    };
    for (; i + kMaxTileTokens <= count; i += kMaxTileTokens) {
      tile(std::integral_constant<int, kMaxTileTokens>{});
    }
    switch (count - i) {
      case 3: return tile(std::integral_constant<int, 3>{});
      case 2: return tile(std::integral_constant<int, 2>{});
      case 1: return tile(std::integral_constant<int, 1>{});
    }
  };
  using B3 = std::integral_constant<int, 3>;
  using B4 = std::integral_constant<int, 4>;
  using B8 = std::integral_constant<int, 8>;
  using G32 = std::integral_constant<int, 32>;
  using G64 = std::integral_constant<int, 64>;
  using G128 = std::integral_constant<int, 128>;
  switch (m.bits * 1000 + m.group_size) {
    case 3032: return run(B3{}, G32{});
    case 3064: return run(B3{}, G64{});
    case 3128: return run(B3{}, G128{});
    case 4032: return run(B4{}, G32{});
    case 4064: return run(B4{}, G64{});
    case 4128: return run(B4{}, G128{});
    case 8032: return run(B8{}, G32{});
    case 8064: return run(B8{}, G64{});
    case 8128: return run(B8{}, G128{});
  }
}

// Scratch floats dot_rows_of needs for the matrix's rows.
static inline size_t dot_rows_scratch(const QuantMatrix& m) {
  return static_cast<size_t>(kMaxTileTokens) * quad_floats(m.cols / m.group_size);
}

} // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
