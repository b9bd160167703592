// CPU kernel bodies for the fused MoE ops.
//
// This header is compiled once per instruction set (kernels_generic.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp), each time inside its own namespace
// FUSED_MOE_ISA_NS and with that ISA's compiler flags.
//
// fp32 path (every build, every setting; the only one for float32
// activations): dequantize a few weight rows into an fp32 scratch tile
// (affine scale·q + bias, or the fp modes' codes times their scales), then
// take dot products of that tile with every activation row routed to the
// expert, several rows × several tokens at a time. The arithmetic is written
// once with GCC/Clang vector extensions; only the code unpacking has
// hand-written intrinsics, because compilers do not find those patterns.
//
// Integer paths for half-precision activations: AVX-512 VNNI + VBMI for
// affine 3/4/8 bits (kernels_int_avx512.h); the int16 path for every other
// affine width and for mxfp4/nvfp4 on AVX-512, and for all of those on AVX2
// (kernels_int16_avx2.h). mxfp8 takes the fp32 path everywhere.
//
// Kernel A hands each tile's dot products to the activation's epilogue
// (supported.h's Activation, a compile-time parameter; its float parameters
// at run time); kernel B's epilogue adds expert biases and either combines
// or stores per slot.
//
// Either way each selected expert's rows stream from memory once per call:
// the fp32 path dequantizes a row once for all tokens of its expert; the
// integer path unpacks it into registers once per tile of up to four
// tokens, from cache after the first tile.
#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/kernels.h"
#include "mlx/types/half_types.h"

#ifndef FUSED_MOE_ISA_NS
#error "define FUSED_MOE_ISA_NS before including kernels_impl.h"
#endif

namespace fused_moe::cpu::FUSED_MOE_ISA_NS {

// Lanes of one fp32 vector for this build.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
// Rows dequantized per tile: 4 = two (gate, up) pairs for kernel A.
constexpr int kTileRows = 4;
// Tokens per micro-tile: kTileRows × kTileTokens accumulators must fit in
// the register file (32 zmm on AVX-512, 16 ymm/xmm elsewhere).
constexpr int kTileTokens = kLanes == 16 ? 4 : 2;

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

static inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

static inline float horizontal_sum(vfloat v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) {
    s += v[i];
  }
  return s;
}

static inline float to_float(const void* p, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::f32:
      return static_cast<const float*>(p)[i];
    case FloatType::f16:
      return static_cast<float>(static_cast<const mlx::core::float16_t*>(p)[i]);
    case FloatType::bf16:
      return static_cast<float>(
          static_cast<const mlx::core::bfloat16_t*>(p)[i]);
  }
  return 0.0f;
}

static inline void store_as(void* p, FloatType t, int64_t i, float v) {
  switch (t) {
    case FloatType::f32:
      static_cast<float*>(p)[i] = v;
      break;
    case FloatType::f16:
      static_cast<mlx::core::float16_t*>(p)[i] = mlx::core::float16_t(v);
      break;
    case FloatType::bf16:
      static_cast<mlx::core::bfloat16_t*>(p)[i] = mlx::core::bfloat16_t(v);
      break;
  }
}

// Little-endian load of `n` <= 4 bytes; never touches bytes past p + n.
static inline uint32_t load_le(const uint8_t* p, int n) {
  uint32_t w = 0;
  std::memcpy(&w, p, n);
  return w;
}

// ---------------------------------------------------------------------------
// Dequantization to fp32
// ---------------------------------------------------------------------------

// Writes out[i] = scale·q_i + bias for the `group_size` codes of one group.
// `q` points at the group's first byte. `tail_safe` marks the last group of a
// row, whose final step must not read past the row's last byte.
// Little-endian load of `n` <= 8 bytes; never touches bytes past p + n.
static inline uint64_t load_le64(const uint8_t* p, int n) {
  uint64_t w = 0;
  std::memcpy(&w, p, n);
  return w;
}

// Any bits: MLX packs the codes of a row as one little-endian bit stream,
// so 8 codes fill exactly BITS bytes. Portable; the compiler vectorizes the
// inner loop.
template <int BITS>
static inline void dequant_group_bitstream(
    const uint8_t* q, float scale, float bias, int group_size, float* out) {
  constexpr uint64_t mask = (uint64_t(1) << BITS) - 1;
  for (int s = 0; s < group_size / 8; ++s, q += BITS, out += 8) {
    const uint64_t w = load_le64(q, BITS);
    for (int i = 0; i < 8; ++i) {
      out[i] = static_cast<float>((w >> (BITS * i)) & mask) * scale + bias;
    }
  }
}

template <int BITS>
static inline void dequant_group(
    const uint8_t* q,
    float scale,
    float bias,
    int group_size,
    bool tail_safe,
    float* out) {
  if constexpr (BITS == 8) {
    // One code per byte: widen kLanes bytes at a time (the intrinsics widen
    // in one instruction where GCC's generic widening goes lane by lane).
    for (int i = 0; i < group_size; i += kLanes) {
#if defined(__AVX512F__)
      const vfloat c = (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
#elif defined(__AVX2__)
      const vfloat c = (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i))));
#else
      typedef uint8_t vu8 __attribute__((vector_size(kLanes)));
      vu8 b;
      std::memcpy(&b, q + i, sizeof(b));
      const vfloat c = __builtin_convertvector(b, vfloat);
#endif
      const vfloat v = c * scale + bias;
      std::memcpy(out + i, &v, sizeof(v));
    }
    return;
  } else if constexpr (BITS != 3 && BITS != 4) {
    return dequant_group_bitstream<BITS>(q, scale, bias, group_size, out);
  }
#if defined(__AVX512F__)
  // 16 codes per step: lanes 0-7 take the 32-bit word holding codes 0-7,
  // lanes 8-15 the word holding codes 8-15; a variable shift isolates each.
  constexpr int kStepBytes = 2 * BITS; // 16 codes
  const __m512i shifts = BITS == 3
      ? _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21)
      : _mm512_setr_epi32(
            0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512 vb = _mm512_set1_ps(bias);
  const int steps = group_size / 16;
  for (int s = 0; s < steps; ++s, q += kStepBytes, out += 16) {
    uint32_t lo, hi;
    if (BITS == 3 && tail_safe && s == steps - 1) {
      lo = load_le(q, 3);
      hi = load_le(q + 3, 3);
    } else {
      lo = load_le(q, 4);
      hi = load_le(q + BITS, 4);
    }
    __m512i v = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(lo))),
        _mm256_set1_epi32(static_cast<int>(hi)),
        1);
    v = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), mask);
    _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), vs, vb));
  }
#elif defined(__AVX2__)
  // 8 codes per step from one 32-bit word.
  const __m256i shifts = BITS == 3
      ? _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)
      : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256 vb = _mm256_set1_ps(bias);
  const int steps = group_size / 8;
  for (int s = 0; s < steps; ++s, q += BITS, out += 8) {
    uint32_t w = (BITS == 3 && tail_safe && s == steps - 1) ? load_le(q, 3)
                                                          : load_le(q, 4);
    __m256i v = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shifts),
        mask);
    _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), vs, vb));
  }
#else
  // Portable: 8 codes per BITS bytes, least-significant bits first.
  (void)tail_safe;
  constexpr uint32_t mask = (1u << BITS) - 1;
  for (int s = 0; s < group_size / 8; ++s, q += BITS, out += 8) {
    const uint32_t w = load_le(q, BITS);
    for (int i = 0; i < 8; ++i) {
      out[i] = static_cast<float>((w >> (BITS * i)) & mask) * scale + bias;
    }
  }
#endif
}

// Dequantizes `n_rows` consecutive rows starting at `row` of expert `e`.
template <int BITS>
static void dequant_rows(
    const QuantMatrix& m,
    int e,
    int row,
    int n_rows,
    float* out) {
  const int64_t row_bytes = static_cast<int64_t>(m.cols) * BITS / 8;
  const int groups = m.cols / m.group_size;
  const int64_t group_bytes = static_cast<int64_t>(m.group_size) * BITS / 8;
  for (int r = 0; r < n_rows; ++r) {
    const int64_t row_id = static_cast<int64_t>(e) * m.rows + row + r;
    const uint8_t* q = m.weight + row_id * row_bytes;
    const int64_t sb = row_id * groups;
    float* o = out + static_cast<int64_t>(r) * m.cols;
    for (int g = 0; g < groups; ++g) {
      dequant_group<BITS>(
          q + g * group_bytes,
          to_float(m.scales, m.scale_type, sb + g),
          to_float(m.biases, m.scale_type, sb + g),
          m.group_size,
          g == groups - 1,
          o + static_cast<int64_t>(g) * m.group_size);
    }
  }
}

// ---------------------------------------------------------------------------
// The fp modes (mxfp4, mxfp8, nvfp4): codes and scales as MLX decodes them
// ---------------------------------------------------------------------------

// e8m0 scale: 2^(s-127) (s = 0: 2^-127, a subnormal; s = 255: +inf).
static inline float e8m0(uint8_t s) {
  const uint32_t bits = s == 0 ? 0x00400000u : uint32_t(s) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// e4m3 as MLX's from_fp8: E = bits 6..3, M = bits 2..0; E = 0: M·2^-9,
// else (8 + M)·2^(E-10); 0x7F and 0xFF are NaN; no infinities.
struct E4m3Table {
  float v[256];
  E4m3Table() {
    for (int b = 0; b < 256; ++b) {
      const int E = (b >> 3) & 15, M = b & 7;
      float mag = E == 0 ? M * 0x1p-9f : std::ldexp(float(8 + M), E - 10);
      if ((b & 0x7F) == 0x7F) mag = NAN;
      v[b] = (b & 0x80) ? -mag : mag;
    }
  }
};
static inline const float* e4m3_table() {
  static const E4m3Table t;
  return t.v;
}

// e2m1: 0, ½, 1, 1½, 2, 3, 4, 6 and their negatives (code 8 is -0).
alignas(64) inline constexpr float kE2m1[16] = {
    0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
    -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// nvfp4: the row's global-scale factor global_scale/2688 (MLX's
// F8E4M3_MAX·F4E2M1_MAX), or 1 without a global scale.
static inline float nvfp4_row_factor(const QuantMatrix& m, int64_t row_id) {
  if (!m.global_scale) {
    return 1.0f;
  }
  const int64_t e = row_id / m.rows, r = row_id % m.rows;
  return m.global_scale[e * m.global_scale_period + r % m.global_scale_period] /
      2688.0f;
}

// The fp32 scale of group g of row `row_id` in an fp mode; `factor` is
// nvfp4_row_factor (ignored by the mx modes).
static inline float fp_group_scale(
    const QuantMatrix& m, int64_t row_id, int g, float factor) {
  const uint8_t s =
      static_cast<const uint8_t*>(m.scales)[row_id * (m.cols / m.group_size) + g];
  return m.mode == QuantMode::nvfp4 ? e4m3_table()[s] * factor : e8m0(s);
}

// Writes out[i] = e2m1(q_i)·scale for `n` codes (a multiple of 16) from `q`.
static inline void dequant_fp4(const uint8_t* q, float scale, int n, float* out) {
#if defined(__AVX512F__)
  // The whole table in one register: the nibble indexes it directly.
  const __m512 lut = _mm512_load_ps(kE2m1);
  const __m512i shifts =
      _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512 vs = _mm512_set1_ps(scale);
  for (int i = 0; i < n; i += 16, q += 8, out += 16) {
    __m512i v = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(load_le(q, 4)))),
        _mm256_set1_epi32(static_cast<int>(load_le(q + 4, 4))), 1);
    v = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32(15));
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutexvar_ps(v, lut), vs));
  }
#elif defined(__AVX2__)
  // Magnitudes from the low 3 bits, the sign from bit 3.
  const __m256 lut = _mm256_load_ps(kE2m1);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256 vs = _mm256_set1_ps(scale);
  for (int i = 0; i < n; i += 8, q += 4, out += 8) {
    const __m256i v = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(load_le(q, 4))), shifts),
        _mm256_set1_epi32(15));
    const __m256 mag = _mm256_permutevar8x32_ps(lut, v);
    const __m256 val = _mm256_xor_ps(
        mag, _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 28), sign)));
    _mm256_storeu_ps(out, _mm256_mul_ps(val, vs));
  }
#else
  for (int i = 0; i < n; i += 2, ++q) {
    out[i] = kE2m1[*q & 15] * scale;
    out[i + 1] = kE2m1[*q >> 4] * scale;
  }
#endif
}

// Writes out[i] = e4m3(q_i)·scale for `n` codes (a multiple of 16) from `q`.
static inline void dequant_fp8(const uint8_t* q, float scale, int n, float* out) {
#if defined(__AVX512F__) || defined(__AVX2__)
  // An e4m3 code, sign apart, is a float16 with the exponent 8 lower:
  // converted exactly by vcvtph2ps, then times 256. 0x7F/0xFF become NaN.
  const __m128i mag = _mm_set1_epi16(0x7F), sgn = _mm_set1_epi16(0x80);
  for (int i = 0; i < n; i += 8, q += 8, out += 8) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    const __m128i m = _mm_and_si128(b, mag);
    const __m128i h = _mm_or_si128(_mm_slli_epi16(m, 7), _mm_slli_epi16(_mm_and_si128(b, sgn), 8));
    const __m128i nan16 = _mm_cmpeq_epi16(m, mag);
    __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
    v = _mm256_blendv_ps(v, _mm256_set1_ps(NAN), _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan16)));
    _mm256_storeu_ps(out, _mm256_mul_ps(v, _mm256_set1_ps(scale)));
  }
#else
  const float* t = e4m3_table();
  for (int i = 0; i < n; ++i) {
    out[i] = t[q[i]] * scale;
  }
#endif
}

// Dequantizes `n_rows` rows from `row` of expert `e` of a matrix in an fp
// mode.
static void dequant_rows_fp(
    const QuantMatrix& m, int e, int row, int n_rows, float* out) {
  const int64_t row_bytes = static_cast<int64_t>(m.cols) * m.bits / 8;
  const int groups = m.cols / m.group_size;
  const int group_bytes = m.group_size * m.bits / 8;
  for (int r = 0; r < n_rows; ++r) {
    const int64_t row_id = static_cast<int64_t>(e) * m.rows + row + r;
    const uint8_t* q = m.weight + row_id * row_bytes;
    const float factor = nvfp4_row_factor(m, row_id);
    float* o = out + static_cast<int64_t>(r) * m.cols;
    for (int g = 0; g < groups; ++g) {
      const float scale = fp_group_scale(m, row_id, g, factor);
      if (m.bits == 4) {
        dequant_fp4(q + g * group_bytes, scale, m.group_size, o + g * m.group_size);
      } else {
        dequant_fp8(q + g * group_bytes, scale, m.group_size, o + g * m.group_size);
      }
    }
  }
}

// Dequantizes `n` rows from `row` of expert `e`, any setting of the grid.
static void dequant(const QuantMatrix& m, int e, int row, int n, float* out) {
  if (m.mode != QuantMode::affine) {
    return dequant_rows_fp(m, e, row, n, out);
  }
  switch (m.bits) {
    case 2: return dequant_rows<2>(m, e, row, n, out);
    case 3: return dequant_rows<3>(m, e, row, n, out);
    case 4: return dequant_rows<4>(m, e, row, n, out);
    case 5: return dequant_rows<5>(m, e, row, n, out);
    case 6: return dequant_rows<6>(m, e, row, n, out);
    case 8: return dequant_rows<8>(m, e, row, n, out);
  }
}

// ---------------------------------------------------------------------------
// Dot products of a dequantized tile with activation rows.
// ---------------------------------------------------------------------------

// out[r][t] = w[r] · x[t] for kTileRows rows and TOKENS rows of length n
// (a multiple of kLanes). Summation order depends only on n.
template <int TOKENS>
static inline void tile_dot(
    const float* w,
    const float* const* x,
    int n,
    float out[kTileRows][kTileTokens]) {
  vfloat acc[kTileRows][TOKENS] = {};
  for (int i = 0; i < n; i += kLanes) {
    vfloat xv[TOKENS];
    for (int t = 0; t < TOKENS; ++t) {
      xv[t] = load(x[t] + i);
    }
    for (int r = 0; r < kTileRows; ++r) {
      const vfloat wv = load(w + static_cast<int64_t>(r) * n + i);
      for (int t = 0; t < TOKENS; ++t) {
        acc[r][t] += wv * xv[t];
      }
    }
  }
  for (int r = 0; r < kTileRows; ++r) {
    for (int t = 0; t < TOKENS; ++t) {
      out[r][t] = horizontal_sum(acc[r][t]);
    }
  }
}

// Runs `emit(first_pair_index, count, out)` over the pairs [begin, end) in
// micro-tiles of kTileTokens, gathering each pair's activation row.
template <typename RowOf, typename Emit>
static inline void for_each_token_tile(
    const float* w,
    int n,
    const int32_t* pairs,
    int count,
    RowOf row_of,
    Emit emit) {
  float out[kTileRows][kTileTokens];
  const float* x[kTileTokens];
  int i = 0;
  for (; i + kTileTokens <= count; i += kTileTokens) {
    for (int t = 0; t < kTileTokens; ++t) {
      x[t] = row_of(pairs[i + t]);
    }
    tile_dot<kTileTokens>(w, x, n, out);
    emit(i, kTileTokens, out);
  }
  // Each (row, token) accumulator sees the same operations in the same order
  // in tile_dot<1> and tile_dot<kTileTokens>, so tiling never changes bits.
  for (; i < count; ++i) {
    x[0] = row_of(pairs[i]);
    tile_dot<1>(w, x, n, out);
    emit(i, 1, out);
  }
}

static inline float silu(float g) {
  return g / (1.0f + std::exp(-g));
}

// Per-thread scratch buffer number `slot`, of at least n elements.
template <typename T, int slot = 0>
static T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) {
    buf.resize(n);
  }
  return buf.data();
}

// The integer path for half-precision activations (AVX-512 VNNI + VBMI).
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define FUSED_MOE_INT_PATH 1
}  // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
#include "cpu/kernels_int_avx512.h"
namespace fused_moe::cpu::FUSED_MOE_ISA_NS {
#else
#define FUSED_MOE_INT_PATH 0
#endif

// The int16 path for half-precision activations (AVX2; on AVX-512 for the
// settings the VNNI path does not take: kernels.h, int16_path).
#if defined(__AVX2__)
#define FUSED_MOE_INT16_PATH 1
}  // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
#include "cpu/kernels_int16_avx2.h"
namespace fused_moe::cpu::FUSED_MOE_ISA_NS {
#else
#define FUSED_MOE_INT16_PATH 0
#endif

// ---------------------------------------------------------------------------
// Kernel A: gate_up (the projections, then the activation in the epilogue)
// ---------------------------------------------------------------------------

// One expert's pairs, [count] starting at `pairs`.
struct ExpertSlice {
  int expert;
  const int32_t* pairs;
  int count;
};

static ExpertSlice expert_slice(const ExpertGroups& g, int u) {
  return {g.experts[u], g.pairs + g.offsets[u], g.offsets[u + 1] - g.offsets[u]};
}

static inline float sigmoid(float z) {
  return 1.0f / (1.0f + std::exp(-z));
}

// clip(u, ±limit); NaN stays NaN.
static inline float clip(float u, float limit) {
  return std::min(std::max(u, -limit), limit);
}

static inline float gelu_approx(float z) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * z * (1.0f + std::tanh(kSqrt2OverPi * (z + 0.044715f * z * z * z)));
}

// The activations of supported.h, in fp32, written as mlx-lm writes them
// (docs/kernel_contract.md): gated ones of (g, u), the others of a.
template <Activation A>
static inline float activate(float g, float u, const ActivationArgs& p) {
  if constexpr (A == Activation::swiglu) {
    return silu(g) * u;
  } else if constexpr (A == Activation::clamped_swiglu) {
    return std::min(silu(g), p.limit) * clip(u, p.limit);
  } else if constexpr (A == Activation::deepseek_v41_swiglu) {
    return silu(std::min(g, p.limit)) * clip(u, p.limit);
  } else if constexpr (A == Activation::swiglu_oai) {
    const float gc = std::min(g, p.limit);
    return (clip(u, p.limit) + 1.0f) * (gc * sigmoid(p.alpha * gc));
  } else if constexpr (A == Activation::geglu) {
    return gelu_approx(g) * u;
  } else if constexpr (A == Activation::situ) {
    const float a = p.beta * std::tanh(g / p.beta) * sigmoid(g);
    return a * (p.linear_beta != 0.0f ? p.linear_beta * std::tanh(u / p.linear_beta) : u);
  } else if constexpr (A == Activation::gelu_approx) {
    return gelu_approx(g);
  } else {
    static_assert(A == Activation::relu2);
    const float r = std::max(g, 0.0f);
    return r * r;
  }
}

// Stores h for one tile of 4 packed rows from `row` (of the expert) against
// every pair of `ex`: raw[q * count + i] is row row+q against pair i. Gated:
// rows (gate r, up r, gate r+1, up r+1) give h rows r = row/2 and r+1;
// otherwise rows row..row+3 give h rows row..row+3. Expert biases are added
// to each row's dot product first.
template <Activation A>
static void gate_up_epilogue(
    const GateUpArgs& a, const ExpertSlice& ex, int row, const float* raw) {
  const int rows = a.w.rows;
  const int H = a.gated ? rows / 2 : rows;
  const int n = ex.count;
  float b[kTileRows] = {};
  if (a.bias) {
    for (int q = 0; q < kTileRows; ++q) {
      b[q] = to_float(a.bias, a.bias_type, static_cast<int64_t>(ex.expert) * rows + row + q);
    }
  }
  // Without expert biases the dot products are taken as they are (adding 0
  // would turn a -0 into +0).
  const bool with_bias = a.bias != nullptr;
  auto v = [&](int q, int i) { return with_bias ? raw[q * n + i] + b[q] : raw[q * n + i]; };
  for (int i = 0; i < n; ++i) {
    const int64_t base = static_cast<int64_t>(ex.pairs[i]) * H;
    if (a.gated) {
      const int r = row / 2;
      store_as(a.h, a.h_type, base + r, activate<A>(v(0, i), v(1, i), a.act));
      store_as(a.h, a.h_type, base + r + 1, activate<A>(v(2, i), v(3, i), a.act));
    } else {
      for (int q = 0; q < kTileRows; ++q) {
        store_as(a.h, a.h_type, base + row + q, activate<A>(v(q, i), 0.0f, a.act));
      }
    }
  }
}

using GateUpEpilogue = void (*)(const GateUpArgs&, const ExpertSlice&, int, const float*);

static GateUpEpilogue gate_up_epilogue_for(Activation kind) {
  switch (kind) {
    case Activation::swiglu: return &gate_up_epilogue<Activation::swiglu>;
    case Activation::clamped_swiglu: return &gate_up_epilogue<Activation::clamped_swiglu>;
    case Activation::deepseek_v41_swiglu: return &gate_up_epilogue<Activation::deepseek_v41_swiglu>;
    case Activation::swiglu_oai: return &gate_up_epilogue<Activation::swiglu_oai>;
    case Activation::geglu: return &gate_up_epilogue<Activation::geglu>;
    case Activation::situ: return &gate_up_epilogue<Activation::situ>;
    case Activation::gelu_approx: return &gate_up_epilogue<Activation::gelu_approx>;
    case Activation::relu2: return &gate_up_epilogue<Activation::relu2>;
  }
  return &gate_up_epilogue<Activation::swiglu>;
}

// The activation row of every pair of `ex` into `rows` [count].
static inline void act_rows_of(
    const GateUpArgs& a, const ExpertSlice& ex, int64_t* rows) {
  for (int i = 0; i < ex.count; ++i) {
    rows[i] = a.x_per_slot ? ex.pairs[i] : ex.pairs[i] / a.groups.k;
  }
}

// raw[q * count + i] = row (row + q) of expert e · acts[act_rows[i]] for a
// 4-row tile, dequantized to fp32 first: the fp32 path of every setting.
static void tile_float(
    const QuantMatrix& m, int e, int row, const float* acts,
    const int64_t* act_rows, int count, float* raw) {
  const int n = m.cols;
  float* tile = scratch<float>(static_cast<size_t>(kTileRows) * n);
  dequant(m, e, row, kTileRows, tile);
  float out[kTileRows][kTileTokens];
  const float* x[kTileTokens];
  int i = 0;
  for (; i + kTileTokens <= count; i += kTileTokens) {
    for (int t = 0; t < kTileTokens; ++t) {
      x[t] = acts + act_rows[i + t] * n;
    }
    tile_dot<kTileTokens>(tile, x, n, out);
    for (int q = 0; q < kTileRows; ++q) {
      for (int t = 0; t < kTileTokens; ++t) raw[q * count + i + t] = out[q][t];
    }
  }
  // Each (row, token) accumulator sees the same operations in the same order
  // in tile_dot<1> and tile_dot<kTileTokens>, so tiling never changes bits.
  for (; i < count; ++i) {
    x[0] = acts + act_rows[i] * n;
    tile_dot<1>(tile, x, n, out);
    for (int q = 0; q < kTileRows; ++q) raw[q * count + i] = out[q][0];
  }
}

// Packed rows [w_begin, w_end) of expert slot `u`, four at a time, each tile
// finished by the activation's epilogue.
static void gate_up_rows_float(
    const GateUpArgs& a, const ExpertSlice& ex, int w_begin, int w_end, GateUpEpilogue epi) {
  int64_t* act_rows = scratch<int64_t>(ex.count);
  float* raw = scratch<float, 6>(kTileRows * static_cast<size_t>(ex.count));
  act_rows_of(a, ex, act_rows);
  for (int row = w_begin; row < w_end; row += kTileRows) {
    tile_float(a.w, ex.expert, row, a.x, act_rows, ex.count, raw);
    epi(a, ex, row, raw);
  }
}

#if FUSED_MOE_INT_PATH
static void gate_up_rows_int(
    const GateUpArgs& a, const ExpertSlice& ex, int w_begin, int w_end, GateUpEpilogue epi) {
  float* buf = scratch<float, 0>(dot_rows_scratch(a.w));
  // [4][count]: rows row .. row+3 for every pair.
  float* raw = scratch<float, 1>(kTileRows * static_cast<size_t>(ex.count));
  int64_t* act_rows = scratch<int64_t>(ex.count);
  act_rows_of(a, ex, act_rows);
  const int64_t first = static_cast<int64_t>(ex.expert) * a.w.rows;
  // The ops keep H a multiple of 32 and tasks start at multiples of 32 h
  // rows, so every range holds whole tiles. The next tile is fetched while
  // it stays inside this expert (and so is used).
  for (int row = w_begin; row < w_end; row += kTileRows) {
    const int64_t next = row + 2 * kTileRows <= a.w.rows ? first + row + kTileRows : -1;
    dot_rows_of(a.w, first + row, *a.xq, act_rows, ex.count, next, buf, raw);
    epi(a, ex, row, raw);
  }
}
#endif

static void gate_up_rows(const GateUpArgs& a, int u, int r_begin, int r_end) {
  const ExpertSlice ex = expert_slice(a.groups, u);
  const GateUpEpilogue epi = gate_up_epilogue_for(a.act.kind);
  // h rows [r_begin, r_end) are packed rows [2 r_begin, 2 r_end) when gated.
  const int w_begin = a.gated ? 2 * r_begin : r_begin;
  const int w_end = a.gated ? 2 * r_end : r_end;
#if FUSED_MOE_INT_PATH
  if (a.xq) {
    return gate_up_rows_int(a, ex, w_begin, w_end, epi);
  }
#endif
#if FUSED_MOE_INT16_PATH
  if (a.x16) {
    int64_t* act_rows = scratch<int64_t>(ex.count);
    act_rows_of(a, ex, act_rows);
    float* raw = scratch<float, 6>(kTileRows * static_cast<size_t>(ex.count));
    const int64_t first = static_cast<int64_t>(ex.expert) * a.w.rows;
    for (int row = w_begin; row < w_end; row += kTileRows) {
      tile_int16(a.w, first + row, *a.x16, act_rows, ex.count, raw);
      epi(a, ex, row, raw);
    }
    return;
  }
#endif
  gate_up_rows_float(a, ex, w_begin, w_end, epi);
}

// ---------------------------------------------------------------------------
// Kernel B: down (with the combine, or per slot)
// ---------------------------------------------------------------------------

// Every path visits experts in increasing id order and each expert's pairs
// in increasing order: the sum for every y[t, d] is taken in one fixed order.

// Takes one tile's results, raw[q * count + i] = row d + q of expert ex
// against pair i, into y: plus the expert bias, then weighted into y_acc
// (the combine) or stored per slot.
static void down_epilogue(const DownArgs& a, const ExpertSlice& ex, int d, const float* raw) {
  const int D = a.w.rows;
  const int n = ex.count;
  float b[kTileRows] = {};
  if (a.bias) {
    for (int q = 0; q < kTileRows; ++q) {
      b[q] = to_float(a.bias, a.bias_type, static_cast<int64_t>(ex.expert) * D + d + q);
    }
  }
  if (!a.pair_weights) {
    for (int i = 0; i < n; ++i) {
      const int64_t base = static_cast<int64_t>(ex.pairs[i]) * D + d;
      for (int q = 0; q < kTileRows; ++q) {
        store_as(a.y, a.y_type, base + q, a.bias ? raw[q * n + i] + b[q] : raw[q * n + i]);
      }
    }
    return;
  }
  const int k = a.groups.k;
  for (int i = 0; i < n; ++i) {
    const int32_t p = ex.pairs[i];
    const float wp = a.pair_weights[p];
    float* y = a.y_acc + static_cast<int64_t>(p / k) * D + d;
    if (a.bias) {
      for (int q = 0; q < kTileRows; ++q) y[q] += wp * (raw[q * n + i] + b[q]);
    } else {
      for (int q = 0; q < kTileRows; ++q) y[q] += wp * raw[q * n + i];
    }
  }
}

static void down_rows_float(const DownArgs& a, int d_begin, int d_end) {
  const int total_pairs = a.groups.offsets[a.groups.n_used];
  int64_t* act_rows = scratch<int64_t>(total_pairs);
  float* raw = scratch<float, 6>(kTileRows * static_cast<size_t>(total_pairs));
  for (int u = 0; u < a.groups.n_used; ++u) {
    const ExpertSlice ex = expert_slice(a.groups, u);
    for (int i = 0; i < ex.count; ++i) act_rows[i] = ex.pairs[i];
    for (int d = d_begin; d < d_end; d += kTileRows) {
      tile_float(a.w, ex.expert, d, a.h, act_rows, ex.count, raw);
      down_epilogue(a, ex, d, raw);
    }
  }
}

#if FUSED_MOE_INT_PATH
constexpr int kDownPrefetchTiles = 2;
static void down_rows_int(const DownArgs& a, int d_begin, int d_end) {
  const int D = a.w.rows;
  const int total_pairs = a.groups.offsets[a.groups.n_used];
  float* buf = scratch<float, 0>(dot_rows_scratch(a.w));
  float* raw = scratch<float, 1>(kTileRows * static_cast<size_t>(total_pairs));
  int64_t* act_rows = scratch<int64_t>(total_pairs);
  // The task's tiles in order: 4 rows of d for each expert in turn (the ops
  // keep D a multiple of 32 and tasks start at multiples of 32 rows, so the
  // tiles are whole). Tile s fetches tile s + kDownPrefetchTiles, across
  // experts too: each expert's run in a task is only a few short rows long.
  const int tiles = (d_end - d_begin) / 4;
  auto tile_row = [&](int64_t s) -> int64_t {
    return static_cast<int64_t>(a.groups.experts[s / tiles]) * D + d_begin +
        4 * (s % tiles);
  };
  auto prefetch_row = [&](int64_t s) -> int64_t {
    return s / tiles < a.groups.n_used ? tile_row(s) : -1;
  };
  for (int u = 0; u < a.groups.n_used; ++u) {
    const ExpertSlice ex = expert_slice(a.groups, u);
    for (int i = 0; i < ex.count; ++i) act_rows[i] = ex.pairs[i];
    for (int j = 0; j < tiles; ++j) {
      const int d = d_begin + 4 * j;
      const int64_t s = static_cast<int64_t>(u) * tiles + j;
      dot_rows_of(a.w, tile_row(s), *a.hq, act_rows, ex.count,
                  prefetch_row(s + kDownPrefetchTiles), buf, raw);
      down_epilogue(a, ex, d, raw);
    }
  }
}
#endif

#if FUSED_MOE_INT16_PATH
static void down_rows_int16(const DownArgs& a, int d_begin, int d_end) {
  const int D = a.w.rows;
  const int total_pairs = a.groups.offsets[a.groups.n_used];
  int64_t* act_rows = scratch<int64_t>(total_pairs);
  float* raw = scratch<float, 6>(kTileRows * static_cast<size_t>(total_pairs));
  for (int u = 0; u < a.groups.n_used; ++u) {
    const ExpertSlice ex = expert_slice(a.groups, u);
    for (int i = 0; i < ex.count; ++i) act_rows[i] = ex.pairs[i];
    for (int d = d_begin; d < d_end; d += kTileRows) {
      tile_int16(a.w, static_cast<int64_t>(ex.expert) * D + d, *a.h16, act_rows, ex.count, raw);
      down_epilogue(a, ex, d, raw);
    }
  }
}
#endif

static void down_rows(const DownArgs& a, int d_begin, int d_end) {
  const int D = a.w.rows;
  const bool combine = a.pair_weights != nullptr;
  if (combine) {
    for (int t = 0; t < a.T; ++t) {
      float* y = a.y_acc + static_cast<int64_t>(t) * D;
      std::fill(y + d_begin, y + d_end, 0.0f);
    }
  }
#if FUSED_MOE_INT_PATH
  if (a.hq) {
    down_rows_int(a, d_begin, d_end);
  } else
#endif
#if FUSED_MOE_INT16_PATH
  if (a.h16) {
    down_rows_int16(a, d_begin, d_end);
  } else
#endif
  {
    down_rows_float(a, d_begin, d_end);
  }
  if (combine) {
    for (int t = 0; t < a.T; ++t) {
      const float* y = a.y_acc + static_cast<int64_t>(t) * D;
      for (int d = d_begin; d < d_end; ++d) {
        store_as(a.y, a.y_type, static_cast<int64_t>(t) * D + d, y[d]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// One dense linear (quantized_matmul) and the embedding gather
// ---------------------------------------------------------------------------

// Each y[t, n] is one dot product over K in a fixed order, whatever the
// split into row and token ranges: any thread count gives the same bits.

static void linear_rows_float(
    const LinearArgs& a, int n_begin, int n_end, int t_begin, int t_end) {
  const int K = a.w.cols;
  const int64_t N = a.w.rows;
  const int count = t_end - t_begin;
  float* tile = scratch<float>(static_cast<size_t>(kTileRows) * K);
  int32_t* tokens = scratch<int32_t>(count);
  for (int i = 0; i < count; ++i) tokens[i] = t_begin + i;
  auto row_of = [&](int32_t t) { return a.x + static_cast<int64_t>(t) * K; };
  for (int n = n_begin; n < n_end; n += kTileRows) {
    const int rows = std::min(kTileRows, n_end - n);
    dequant(a.w, 0, n, rows, tile);
    // A short last tile: zero rows whose results are never stored.
    std::fill(tile + static_cast<int64_t>(rows) * K,
              tile + static_cast<int64_t>(kTileRows) * K, 0.0f);
    for_each_token_tile(
        tile, K, tokens, count, row_of,
        [&](int first, int cnt, float out[kTileRows][kTileTokens]) {
          for (int t = 0; t < cnt; ++t) {
            const int64_t base = tokens[first + t] * N + n;
            for (int r = 0; r < rows; ++r) {
              store_as(a.y, a.y_type, base + r, out[r][t]);
            }
          }
        });
  }
}

#if FUSED_MOE_INT_PATH
static void linear_rows_int(
    const LinearArgs& a, int n_begin, int n_end, int t_begin, int t_end) {
  const int64_t N = a.w.rows;
  const int count = t_end - t_begin;
  float* buf = scratch<float, 0>(dot_rows_scratch(a.w));
  float* out = scratch<float, 1>(4 * static_cast<size_t>(count));
  int64_t* act_rows = scratch<int64_t>(count);
  for (int i = 0; i < count; ++i) act_rows[i] = t_begin + i;
  for (int n = n_begin; n < n_end; n += kTileRows) {
    // The next tile is fetched while this one is computed, into the next
    // task's rows too (the thread usually takes that task next).
    const int64_t next = n + 2 * kTileRows <= N ? n + kTileRows : -1;
    dot_rows_of(a.w, n, *a.xq, act_rows, count, next, buf, out);
    for (int r = 0; r < kTileRows; ++r) {
      for (int i = 0; i < count; ++i) {
        store_as(a.y, a.y_type, (t_begin + i) * N + n + r, out[r * count + i]);
      }
    }
  }
}
#endif

static void linear_rows(
    const LinearArgs& a, int n_begin, int n_end, int t_begin, int t_end) {
#if FUSED_MOE_INT_PATH
  if (a.xq) {
    return linear_rows_int(a, n_begin, n_end, t_begin, t_end);
  }
#endif
#if FUSED_MOE_INT16_PATH
  if (a.x16) {
    return linear_rows_int16(a, n_begin, n_end, t_begin, t_end);
  }
#endif
  linear_rows_float(a, n_begin, n_end, t_begin, t_end);
}

static void gather_rows(const GatherArgs& a, int t_begin, int t_end) {
  const int K = a.w.cols;
  float* row = scratch<float>(K);
  for (int t = t_begin; t < t_end; ++t) {
    dequant(a.w, 0, static_cast<int>(a.ids[t]), 1, row);
    for (int i = 0; i < K; ++i) {
      store_as(a.out, a.out_type, static_cast<int64_t>(t) * K + i, row[i]);
    }
  }
}

// ---------------------------------------------------------------------------
// Router logits
// ---------------------------------------------------------------------------

// kLanes values of a float array of type TYPE, from element `at`, as fp32.
template <FloatType TYPE>
static inline vfloat load_lanes(const void* base, int64_t at) {
  if constexpr (TYPE == FloatType::f32) {
    return load(static_cast<const float*>(base) + at);
  } else if constexpr (TYPE == FloatType::bf16) {
    // bf16 is the top half of an fp32. The intrinsics widen in one
    // instruction where GCC's generic widening takes four.
    const auto* p = static_cast<const uint16_t*>(base) + at;
#if defined(__AVX512F__)
    return (vfloat)_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
        16);
#elif defined(__AVX2__)
    return (vfloat)_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
        16);
#else
    typedef uint16_t vu16 __attribute__((vector_size(kLanes * 2)));
    typedef uint32_t vu32 __attribute__((vector_size(kLanes * 4)));
    vu16 h;
    std::memcpy(&h, p, sizeof(h));
    return (vfloat)(__builtin_convertvector(h, vu32) << 16);
#endif
  } else {
#if defined(__AVX512F__)
    const auto* p = static_cast<const uint16_t*>(base) + at;
    return (vfloat)_mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__)
    const auto* p = static_cast<const uint16_t*>(base) + at;
    return (vfloat)_mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    vfloat v;
    for (int l = 0; l < kLanes; ++l) {
      v[l] = to_float(base, FloatType::f16, at + l);
    }
    return v;
#endif
  }
}

// The gate rows in each storage format, read kLanes inputs at a time as fp32.
// A row is split into `groups` runs of `width` inputs (quantized: the
// quantization groups; float: one run over the whole vectors of the row),
// and `group(e, g)` gives what a chunk of run g of row e needs.

template <FloatType TYPE>
struct FloatGateRows {
  struct Group {};
  const void* w;
  int64_t D;

  int groups() const {
    return D >= kLanes ? 1 : 0;
  }
  int width() const {
    return static_cast<int>(D - D % kLanes);
  }
  Group group(int, int) const {
    return {};
  }
  vfloat chunk(Group, int e, int i) const {
    return load_lanes<TYPE>(w, e * D + i);
  }
  float at(int e, int i) const {
    return to_float(w, TYPE, e * D + i);
  }
};

struct QuantGateRows {
  struct Group {
    vfloat scale, bias;
  };
  const RouterGate& g;

  int groups() const {
    return g.D / g.group_size;
  }
  int width() const {
    return g.group_size;
  }
  Group group(int e, int gi) const {
    const int64_t at = static_cast<int64_t>(e) * groups() + gi;
    return {
        vfloat{} + to_float(g.scales, g.scale_type, at),
        vfloat{} + to_float(g.biases, g.scale_type, at)};
  }
  vfloat chunk(const Group& gr, int e, int i) const {
    typedef uint8_t vu8 __attribute__((vector_size(kLanes)));
    vu8 q;
    std::memcpy(
        &q,
        static_cast<const uint8_t*>(g.weight) + static_cast<int64_t>(e) * g.D + i,
        sizeof(q));
    return __builtin_convertvector(q, vfloat) * gr.scale + gr.bias;
  }
  float at(int, int) const {
    return 0.0f; // never called: D is a whole number of groups
  }
};

// logits[t + j, e + r] for ROWS rows and TOKENS tokens. Each (row, token)
// sees the same operations in the same order whatever ROWS and TOKENS are.
template <int ROWS, int TOKENS, typename Rows>
static inline void route_tile(const Rows& w, const RouteArgs& a, int e, int t) {
  const int D = a.gate.D;
  const float* x[TOKENS];
  for (int j = 0; j < TOKENS; ++j) {
    x[j] = a.x + static_cast<int64_t>(t + j) * D;
  }
  vfloat acc[ROWS][TOKENS] = {};
  const int width = w.width();
  for (int g = 0; g < w.groups(); ++g) {
    typename Rows::Group gr[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      gr[r] = w.group(e + r, g);
    }
    for (int i = g * width; i < (g + 1) * width; i += kLanes) {
      vfloat xv[TOKENS];
      for (int j = 0; j < TOKENS; ++j) {
        xv[j] = load(x[j] + i);
      }
      for (int r = 0; r < ROWS; ++r) {
        const vfloat wv = w.chunk(gr[r], e + r, i);
        for (int j = 0; j < TOKENS; ++j) {
          acc[r][j] += wv * xv[j];
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int j = 0; j < TOKENS; ++j) {
      float sum = horizontal_sum(acc[r][j]);
      for (int i = w.groups() * width; i < D; ++i) {
        sum += w.at(e + r, i) * x[j][i];
      }
      a.logits[static_cast<int64_t>(t + j) * a.gate.E + e + r] = sum;
    }
  }
}

template <typename Rows>
static void route_logits_of(
    const Rows& w, const RouteArgs& a, int e_begin, int e_end, int t_begin,
    int t_end) {
  // Tokens outside, rows inside: at decode the gate streams once.
  int t = t_begin;
  for (; t + kTileTokens <= t_end; t += kTileTokens) {
    int e = e_begin;
    for (; e + kTileRows <= e_end; e += kTileRows) {
      route_tile<kTileRows, kTileTokens>(w, a, e, t);
    }
    for (; e < e_end; ++e) {
      route_tile<1, kTileTokens>(w, a, e, t);
    }
  }
  for (; t < t_end; ++t) {
    int e = e_begin;
    for (; e + kTileRows <= e_end; e += kTileRows) {
      route_tile<kTileRows, 1>(w, a, e, t);
    }
    for (; e < e_end; ++e) {
      route_tile<1, 1>(w, a, e, t);
    }
  }
}

static void route_logits(
    const RouteArgs& a, int e_begin, int e_end, int t_begin, int t_end) {
  const RouterGate& g = a.gate;
  if (g.quantized) {
    return route_logits_of(QuantGateRows{g}, a, e_begin, e_end, t_begin, t_end);
  }
  switch (g.weight_type) {
    case FloatType::f32:
      return route_logits_of(
          FloatGateRows<FloatType::f32>{g.weight, g.D}, a, e_begin, e_end,
          t_begin, t_end);
    case FloatType::f16:
      return route_logits_of(
          FloatGateRows<FloatType::f16>{g.weight, g.D}, a, e_begin, e_end,
          t_begin, t_end);
    case FloatType::bf16:
      return route_logits_of(
          FloatGateRows<FloatType::bf16>{g.weight, g.D}, a, e_begin, e_end,
          t_begin, t_end);
  }
}

typedef uint64_t U64x8 __attribute__((vector_size(64)));

uint64_t read_sum(const uint8_t* p, int64_t bytes) {
  // Eight independent sums, so the loop is bound by loads, not by adds.
  U64x8 acc = {};
  for (int64_t off = 0; off < bytes; off += 64) {
    U64x8 v;
    std::memcpy(&v, p + off, sizeof(v));
    acc += v;
  }
  uint64_t total = 0;
  for (int i = 0; i < 8; ++i) total += acc[i];
  return total;
}

} // namespace fused_moe::cpu::FUSED_MOE_ISA_NS

#include "cpu/kernels_attention.h"
#include "cpu/kernels_norm_rope.h"

// The table this build exports: fused_moe::cpu::kernels_<isa>().
#define FUSED_MOE_CAT_(a, b) a##b
#define FUSED_MOE_CAT(a, b) FUSED_MOE_CAT_(a, b)
#define FUSED_MOE_STR_(a) #a
#define FUSED_MOE_STR(a) FUSED_MOE_STR_(a)

namespace fused_moe::cpu {

const KernelTable& FUSED_MOE_CAT(kernels_, FUSED_MOE_ISA_NS)() {
  static const KernelTable table = {
      FUSED_MOE_STR(FUSED_MOE_ISA_NS),
      &FUSED_MOE_ISA_NS::gate_up_rows,
      &FUSED_MOE_ISA_NS::down_rows,
#if FUSED_MOE_INT_PATH
      &FUSED_MOE_ISA_NS::quantize_acts,
#else
      nullptr,
#endif
      &FUSED_MOE_ISA_NS::route_logits,
#if FUSED_MOE_INT16_PATH
      &FUSED_MOE_ISA_NS::quantize_acts16,
#else
      nullptr,
#endif
      &FUSED_MOE_ISA_NS::linear_rows,
      &FUSED_MOE_ISA_NS::gather_rows,
      &FUSED_MOE_ISA_NS::attention_task,
      &FUSED_MOE_ISA_NS::attention_merge,
      &FUSED_MOE_ISA_NS::norm_rope_rows,
      &FUSED_MOE_ISA_NS::read_sum,
  };
  return table;
}

} // namespace fused_moe::cpu
