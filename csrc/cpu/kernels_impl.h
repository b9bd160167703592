// CPU kernel bodies for the fused MoE ops.
//
// This header is compiled once per instruction set (kernels_generic.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp), each time inside its own namespace
// FUSED_MOE_ISA_NS and with that ISA's compiler flags.
//
// fp32 path (every build; the only one for float32 activations): dequantize
// a few weight rows into an fp32 scratch tile (w = scale·q + bias), then take
// dot products of that tile with every activation row routed to the expert,
// several rows × several tokens at a time. The arithmetic is written once
// with GCC/Clang vector extensions; only the 3/4-bit unpacking has
// hand-written intrinsics, because compilers do not find that pattern.
//
// Integer path (AVX-512 VNNI + VBMI builds, half-precision activations):
// see kernels_int_avx512.h. The AVX2 build's int16 path for half-precision
// activations (3/4-bit experts, 3/4/8-bit linears): kernels_int16_avx2.h.
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

// The allow-list of bits (kSupportedLinearBits; the experts use 3 and 4).
static void dequant(const QuantMatrix& m, int e, int row, int n, float* out) {
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

// The int16 path for 8-bit linears with half-precision activations (AVX2).
#if defined(__AVX2__) && !defined(__AVX512F__)
#define FUSED_MOE_INT16_PATH 1
}  // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
#include "cpu/kernels_int16_avx2.h"
namespace fused_moe::cpu::FUSED_MOE_ISA_NS {
#else
#define FUSED_MOE_INT16_PATH 0
#endif

// ---------------------------------------------------------------------------
// Kernel A: gate_up_swiglu
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

static void gate_up_rows_float(
    const GateUpArgs& a, ExpertSlice ex, int r_begin, int r_end) {
  const int D = a.w.cols;
  const int H = a.w.rows / 2;
  const int k = a.groups.k;
  float* tile = scratch<float>(static_cast<size_t>(kTileRows) * D);
  auto row_of = [&](int32_t p) {
    return a.x + static_cast<int64_t>(p / k) * D;
  };
  // Tile rows: gate r, up r, gate r+1, up r+1 (packed rows 2r .. 2r+3).
  for (int r = r_begin; r < r_end; r += 2) {
    dequant(a.w, ex.expert, 2 * r, kTileRows, tile);
    for_each_token_tile(
        tile, D, ex.pairs, ex.count, row_of,
        [&](int first, int n, float out[kTileRows][kTileTokens]) {
          for (int t = 0; t < n; ++t) {
            const int64_t base = static_cast<int64_t>(ex.pairs[first + t]) * H;
            store_as(a.h, a.h_type, base + r, silu(out[0][t]) * out[1][t]);
            store_as(
                a.h, a.h_type, base + r + 1, silu(out[2][t]) * out[3][t]);
          }
        });
  }
}

#if FUSED_MOE_INT_PATH
static void gate_up_rows_int(
    const GateUpArgs& a, ExpertSlice ex, int r_begin, int r_end) {
  const int H = a.w.rows / 2;
  const int k = a.groups.k;
  float* buf = scratch<float, 0>(dot_rows_scratch(a.w));
  // [4][count]: gate r, up r, gate r+1, up r+1 for every pair.
  float* out = scratch<float, 1>(4 * static_cast<size_t>(ex.count));
  int64_t* act_rows = scratch<int64_t>(ex.count);
  for (int i = 0; i < ex.count; ++i) act_rows[i] = ex.pairs[i] / k;
  const int64_t first = static_cast<int64_t>(ex.expert) * a.w.rows;
  auto emit = [&](int r, const float* gate, const float* up) {
    for (int i = 0; i < ex.count; ++i) {
      store_as(a.h, a.h_type, static_cast<int64_t>(ex.pairs[i]) * H + r,
               silu(gate[i]) * up[i]);
    }
  };
  // Two (gate, up) row pairs at a time: packed rows 2r .. 2r+3. The ops
  // keep H a multiple of 32 and tasks start at multiples of 32 pairs, so
  // every range holds whole tiles. The next tile is fetched while it stays
  // inside this expert (and so is used).
  for (int r = r_begin; r < r_end; r += 2) {
    const int64_t next = r + 4 <= H ? first + 2 * (r + 2) : -1;
    dot_rows_of(a.w, first + 2 * r, *a.xq, act_rows, ex.count, next, buf, out);
    emit(r, out, out + ex.count);
    emit(r + 1, out + 2 * ex.count, out + 3 * ex.count);
  }
}
#endif

static void gate_up_rows(const GateUpArgs& a, int u, int r_begin, int r_end) {
  const ExpertSlice ex = expert_slice(a.groups, u);
#if FUSED_MOE_INT_PATH
  if (a.xq) {
    return gate_up_rows_int(a, ex, r_begin, r_end);
  }
#endif
#if FUSED_MOE_INT16_PATH
  if (a.x16) {
    return gate_up_rows_int16(a, ex.expert, ex.pairs, ex.count, r_begin, r_end);
  }
#endif
  gate_up_rows_float(a, ex, r_begin, r_end);
}

// ---------------------------------------------------------------------------
// Kernel B: down_combine
// ---------------------------------------------------------------------------

// Both paths visit experts in increasing id order and each expert's pairs in
// increasing order: the sum for every y[t, d] is taken in one fixed order.

static void down_rows_float(const DownArgs& a, int d_begin, int d_end) {
  const int D = a.w.rows;
  const int H = a.w.cols;
  const int k = a.groups.k;
  float* tile = scratch<float>(static_cast<size_t>(kTileRows) * H);
  auto row_of = [&](int32_t p) { return a.h + static_cast<int64_t>(p) * H; };
  for (int u = 0; u < a.groups.n_used; ++u) {
    const ExpertSlice ex = expert_slice(a.groups, u);
    for (int d = d_begin; d < d_end; d += kTileRows) {
      dequant(a.w, ex.expert, d, kTileRows, tile);
      for_each_token_tile(
          tile, H, ex.pairs, ex.count, row_of,
          [&](int first, int n, float out[kTileRows][kTileTokens]) {
            for (int t = 0; t < n; ++t) {
              const int32_t p = ex.pairs[first + t];
              const float wp = a.pair_weights[p];
              float* y = a.y_acc + static_cast<int64_t>(p / k) * D + d;
              for (int r = 0; r < kTileRows; ++r) {
                y[r] += wp * out[r][t];
              }
            }
          });
    }
  }
}

#if FUSED_MOE_INT_PATH
constexpr int kDownPrefetchTiles = 2;
static void down_rows_int(const DownArgs& a, int d_begin, int d_end) {
  const int D = a.w.rows;
  const int k = a.groups.k;
  const int total_pairs = a.groups.offsets[a.groups.n_used];
  float* buf = scratch<float, 0>(dot_rows_scratch(a.w));
  float* out = scratch<float, 1>(4 * static_cast<size_t>(total_pairs));
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
  // Per pair of the expert: where its token's y row starts, and its weight.
  int64_t* y_at = scratch<int64_t, 1>(total_pairs);
  float* weight = scratch<float, 2>(total_pairs);
  for (int u = 0; u < a.groups.n_used; ++u) {
    const ExpertSlice ex = expert_slice(a.groups, u);
    for (int i = 0; i < ex.count; ++i) {
      act_rows[i] = ex.pairs[i];
      y_at[i] = static_cast<int64_t>(ex.pairs[i] / k) * D;
      weight[i] = a.pair_weights[ex.pairs[i]];
    }
    for (int j = 0; j < tiles; ++j) {
      const int d = d_begin + 4 * j;
      const int64_t s = static_cast<int64_t>(u) * tiles + j;
      dot_rows_of(a.w, tile_row(s), *a.hq, act_rows, ex.count,
                  prefetch_row(s + kDownPrefetchTiles), buf, out);
      // out[r * count + i]: row d + r against pair i.
      for (int r = 0; r < kTileRows; ++r) {
        for (int i = 0; i < ex.count; ++i) {
          a.y_acc[y_at[i] + d + r] += weight[i] * out[r * ex.count + i];
        }
      }
    }
  }
}
#endif

static void down_rows(const DownArgs& a, int d_begin, int d_end) {
  const int D = a.w.rows;
  for (int t = 0; t < a.T; ++t) {
    float* y = a.y_acc + static_cast<int64_t>(t) * D;
    std::fill(y + d_begin, y + d_end, 0.0f);
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
  for (int t = 0; t < a.T; ++t) {
    const float* y = a.y_acc + static_cast<int64_t>(t) * D;
    for (int d = d_begin; d < d_end; ++d) {
      store_as(a.y, a.y_type, static_cast<int64_t>(t) * D + d, y[d]);
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
