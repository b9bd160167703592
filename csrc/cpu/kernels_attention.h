// Kernel C: scaled dot-product attention over a KV cache, in fp32.
//
// A task takes a tile of query vectors (up to kAttentionHeads heads of one
// GQA group × up to kAttentionRows query rows) over a range of key chunks.
// Each chunk of kAttentionKeyChunk keys gives a partial softmax per query
// vector (its own max, the sum of exp(score - max), the values weighted by
// those), and the chunks fold into the result in chunk order. A task either
// folds its chunks itself or, when the keys are split across threads
// (decode: 8 KV heads × 1 row would be only 8 tasks), writes one chunk's
// partial for attention_merge to fold in the same order with the same
// arithmetic. Either way a result has the same bits at any thread count.
//
// Each key and value row is read once per task and shared by all of the
// tile's query vectors: at decode the cache is read once per token. A float
// cache is read through its strides; a quantized one (MLX's affine format,
// mlx-lm's QuantizedKVCache) is read in place too, its codes converted in
// registers as its rows are read: a key dequantized (scale·code + bias),
// a value's codes weighted by p·scale with the biases summed per group. A
// tile of several rows converts each block of keys and of values to fp32
// once, into a block that stays in L1, and every row reads it from there.
// Included by kernels_impl.h, once per instruction set.
#pragma once

#include <limits>

namespace fused_moe::cpu::FUSED_MOE_ISA_NS {

// Keys whose rows are set up together: row pointers, a quantized row's
// scales and biases, and for a tile of several rows their fp32 copy.
constexpr int kKeyBlock = 32;
static_assert(kAttentionKeyChunk % kKeyBlock == 0, "whole key blocks per chunk");
static_assert(kKeyBlock % kLanes == 0, "whole vectors of scores per key block");

// Every lane x, in one broadcast (vfloat{} + x, the usual spelling, costs
// GCC an add as well).
static inline vfloat splat(float x) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_set1_ps(x);
#elif defined(__AVX2__)
  return (vfloat)_mm256_set1_ps(x);
#else
  static_assert(kLanes == 4);
  return vfloat{x, x, x, x};
#endif
}

// Stores a vector by value, so the caller's accumulator arrays never need
// a home in memory.
static inline void store(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof(v));
}

// exp(x) for x <= 0, which every softmax argument is once the row's maximum
// is taken out. x = n·ln2 + r with |r| <= ln2/2 (ln2 split in two so r is
// exact), e^r by its degree-6 Taylor polynomial (relative error < 2e-7),
// 2^n through the exponent bits. Below -87 the result is about 1e-38,
// which adds nothing to a sum that contains exp(0) = 1.
static inline vfloat exp_nonpositive(vfloat x) {
  typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const vfloat floor_x = splat(-87.0f);
  x = x < floor_x ? floor_x : x;
  // Truncating x·log2(e) - 0.5 toward zero rounds it to nearest for x <= 0.
  const vint n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vint);
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = (x - nf * 0.693145751953125f) - nf * 1.42860682030941723e-6f;
  vfloat p = splat(1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * (vfloat)((n + 127) << 23);
}

static inline float exp_nonpositive(float x) {
  return exp_nonpositive(splat(x))[0];
}

// The lane sums of kLanes vectors as one vector: lane i = Σ a[i], summed
// pairwise ((a0 + a1) + (a2 + a3)) + ... whatever the build's width. A
// score is one such sum, so the score pass never reduces a vector on its own.
static inline vfloat transpose_sum(const vfloat* a) {
#define FM_SHUF(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#if defined(__AVX512F__)
  static_assert(kLanes == 16);
  vfloat s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i) {
    const vfloat x = a[2 * i], y = a[2 * i + 1];
    s1[i] = FM_SHUF(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
        FM_SHUF(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
  for (int i = 0; i < 4; ++i) {
    const vfloat x = s1[2 * i], y = s1[2 * i + 1];
    s2[i] = FM_SHUF(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
        FM_SHUF(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    const vfloat x = s2[2 * i], y = s2[2 * i + 1];
    s3[i] = FM_SHUF(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
        FM_SHUF(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  return FM_SHUF(s3[0], s3[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
      FM_SHUF(s3[0], s3[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
#elif defined(__AVX2__)
  static_assert(kLanes == 8);
  vfloat s1[4], s2[2];
  for (int i = 0; i < 4; ++i) {
    const vfloat x = a[2 * i], y = a[2 * i + 1];
    s1[i] = FM_SHUF(x, y, 0, 8, 2, 10, 4, 12, 6, 14) + FM_SHUF(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {
    const vfloat x = s1[2 * i], y = s1[2 * i + 1];
    s2[i] = FM_SHUF(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + FM_SHUF(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return FM_SHUF(s2[0], s2[1], 0, 1, 2, 3, 8, 9, 10, 11) +
      FM_SHUF(s2[0], s2[1], 4, 5, 6, 7, 12, 13, 14, 15);
#else
  static_assert(kLanes == 4);
  const vfloat s01 = FM_SHUF(a[0], a[1], 0, 4, 2, 6) + FM_SHUF(a[0], a[1], 1, 5, 3, 7);
  const vfloat s23 = FM_SHUF(a[2], a[3], 0, 4, 2, 6) + FM_SHUF(a[2], a[3], 1, 5, 3, 7);
  return FM_SHUF(s01, s23, 0, 1, 4, 5) + FM_SHUF(s01, s23, 2, 3, 6, 7);
#endif
#undef FM_SHUF
}

// ---------------------------------------------------------------------------
// Cache rows: kLanes values of key/value row j at a time, as fp32
// ---------------------------------------------------------------------------

// The first byte of head (b, g) of a [B, Hkv, S, Dh] array at `base` with
// element strides `stride`, for elements of `elem` bytes.
static inline const uint8_t* head_of(
    const void* base, const int64_t* stride, int b, int g, int elem) {
  return static_cast<const uint8_t*>(base) + (b * stride[0] + g * stride[1]) * elem;
}

// Asks for the cache lines of rows [j0, j0 + n), `row_bytes` each and
// `stride` bytes apart, ahead of their use. The values pass reads a block
// a few vectors of every row at a time, an order the hardware prefetchers
// do not follow far enough ahead on their own.
static inline void prefetch_rows(const uint8_t* head, int64_t stride, int j0, int n, int row_bytes) {
  for (int j = j0; j < j0 + n; ++j) {
    const uint8_t* row = head + j * stride;
    for (int b = 0; b < row_bytes; b += 64) {
      __builtin_prefetch(row + b, 0, 3);
    }
  }
}

// A float cache, read in place when its last axis is contiguous, otherwise
// gathered row by row into a per-thread block.
template <FloatType TYPE>
struct FloatRows {
  static constexpr bool kQuantized = false;
  static constexpr int kElem = TYPE == FloatType::f32 ? 4 : 2;
  const uint8_t* head;
  int64_t stride_s, stride_d;
  int Dh;
  uint8_t* tmp; // kKeyBlock rows of Dh elements
  const void* rows[kKeyBlock];

  FloatRows(const AttentionArgs& a, const CacheTensor& t, int b, int g, int slot)
      : head(head_of(t.data, t.stride, b, g, kElem)),
        stride_s(t.stride[2]),
        stride_d(t.stride[3]),
        Dh(a.Dh),
        tmp(t.stride[3] == 1
                ? nullptr
                : (slot ? scratch<uint8_t, 9>(static_cast<size_t>(kKeyBlock) * a.Dh * kElem)
                        : scratch<uint8_t, 8>(static_cast<size_t>(kKeyBlock) * a.Dh * kElem))) {}

  // Rows [j0, j0 + n) become rows 0 .. n-1.
  void set_block(int j0, int n) {
    for (int j = 0; j < n; ++j) {
      const uint8_t* row = head + (j0 + j) * stride_s * kElem;
      if (stride_d == 1) {
        rows[j] = row;
        continue;
      }
      uint8_t* dst = tmp + static_cast<int64_t>(j) * Dh * kElem;
      for (int d = 0; d < Dh; ++d) {
        std::memcpy(dst + d * kElem, row + d * stride_d * kElem, kElem);
      }
      rows[j] = dst;
    }
  }

  vfloat load(int j, int c) const {
    return load_lanes<TYPE>(rows[j], static_cast<int64_t>(c) * kLanes);
  }

  // Asks for rows [j0, j0 + n) ahead of their use.
  void prefetch(int j0, int n) const {
    if (stride_d == 1) {
      prefetch_rows(head, stride_s * kElem, j0, n, Dh * kElem);
    }
  }
};

// A quantized cache: BITS-bit codes in uint32 words, least significant
// bits first, with a scale and a bias per group of group_size values.
// Values are dequantized (scale·code + bias, one fused multiply-add) as
// they are loaded; a block's scales and biases are read into fp32 once.
template <int BITS>
struct QuantRows {
  static_assert(BITS == 4 || BITS == 8, "the kernels unpack 4- and 8-bit codes");
  static constexpr bool kQuantized = true;
  static constexpr int kMaxGroups = kMaxAttentionGroups;
  const uint8_t* head;
  const uint8_t* scale_head;
  const uint8_t* bias_head;
  int64_t stride_s, stride_d, ss_s, ss_d, bs_s, bs_d;
  FloatType scale_type;
  int words, groups;
  int chunk_shift; // chunk c of kLanes values lies in group c >> chunk_shift
  uint32_t* tmp; // kKeyBlock rows of `words` words
  const uint32_t* rows[kKeyBlock];
  // The block's scales and biases in fp32, by group, keys contiguous (the
  // values pass reads them a vector of keys at a time); zero past the
  // block's last key.
  alignas(64) float scale_by_group[kMaxGroups][kKeyBlock];
  alignas(64) float bias_by_group[kMaxGroups][kKeyBlock];

  QuantRows(const AttentionArgs& a, const CacheTensor& t, int b, int g, int slot)
      : head(head_of(t.data, t.stride, b, g, 4)),
        scale_head(head_of(t.scales, t.scale_stride, b, g, a.cache_type == FloatType::f32 ? 4 : 2)),
        bias_head(head_of(t.biases, t.bias_stride, b, g, a.cache_type == FloatType::f32 ? 4 : 2)),
        stride_s(t.stride[2]),
        stride_d(t.stride[3]),
        ss_s(t.scale_stride[2]),
        ss_d(t.scale_stride[3]),
        bs_s(t.bias_stride[2]),
        bs_d(t.bias_stride[3]),
        scale_type(a.cache_type),
        words(a.Dh * BITS / 32),
        groups(a.Dh / a.group_size),
        chunk_shift(__builtin_ctz(a.group_size / kLanes)),
        tmp(t.stride[3] == 1
                ? nullptr
                : (slot ? scratch<uint32_t, 9>(static_cast<size_t>(kKeyBlock) * words)
                        : scratch<uint32_t, 8>(static_cast<size_t>(kKeyBlock) * words))) {}

  void set_block(int j0, int n) {
    for (int j = 0; j < n; ++j) {
      const int64_t r = j0 + j;
      const auto* row = reinterpret_cast<const uint32_t*>(head) + r * stride_s;
      if (stride_d == 1) {
        rows[j] = row;
      } else {
        uint32_t* dst = tmp + static_cast<int64_t>(j) * words;
        for (int w = 0; w < words; ++w) {
          std::memcpy(dst + w, row + w * stride_d, 4);
        }
        rows[j] = dst;
      }
    }
    // One loop per scale type: the conversion is a few instructions, the
    // type's switch would cost more than it.
    auto fill = [&](auto type) {
      constexpr FloatType T = decltype(type)::value;
      for (int q = 0; q < groups; ++q) {
        for (int j = 0; j < n; ++j) {
          const int64_t r = j0 + j;
          scale_by_group[q][j] = to_float(scale_head, T, r * ss_s + q * ss_d);
          bias_by_group[q][j] = to_float(bias_head, T, r * bs_s + q * bs_d);
        }
        for (int j = n; j < kKeyBlock; ++j) {
          scale_by_group[q][j] = bias_by_group[q][j] = 0.0f;
        }
      }
    };
    switch (scale_type) {
      case FloatType::f32: return fill(std::integral_constant<FloatType, FloatType::f32>{});
      case FloatType::f16: return fill(std::integral_constant<FloatType, FloatType::f16>{});
      case FloatType::bf16: return fill(std::integral_constant<FloatType, FloatType::bf16>{});
    }
  }

  // The codes of values [c·kLanes, (c+1)·kLanes) as fp32.
  vfloat codes(int j, int c) const {
    if constexpr (BITS == 8) {
      const auto* p = reinterpret_cast<const uint8_t*>(rows[j]) + c * kLanes;
#if defined(__AVX512F__)
      return (vfloat)_mm512_cvtepi32_ps(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
      return (vfloat)_mm256_cvtepi32_ps(
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
      typedef uint8_t vu8 __attribute__((vector_size(kLanes)));
      vu8 v;
      std::memcpy(&v, p, sizeof(v));
      return __builtin_convertvector(v, vfloat);
#endif
    } else {
      // Eight 4-bit codes per word.
#if defined(__AVX512F__)
      const __m512i shifts = _mm512_setr_epi32(
          0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
      const __m512i w = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(rows[j][2 * c]))),
          _mm256_set1_epi32(static_cast<int>(rows[j][2 * c + 1])), 1);
      return (vfloat)_mm512_cvtepi32_ps(
          _mm512_and_si512(_mm512_srlv_epi32(w, shifts), _mm512_set1_epi32(15)));
#elif defined(__AVX2__)
      const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
      const __m256i w = _mm256_set1_epi32(static_cast<int>(rows[j][c]));
      return (vfloat)_mm256_cvtepi32_ps(
          _mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32(15)));
#else
      typedef uint32_t vu32 __attribute__((vector_size(kLanes * 4)));
      static_assert(kLanes == 4);
      const uint32_t word = rows[j][c / 2];
      const uint32_t base = (c % 2) * 16;
      const vu32 w = vu32{} + word;
      const vu32 shifts = vu32{0, 4, 8, 12} + base;
      return __builtin_convertvector((w >> shifts) & 15u, vfloat);
#endif
    }
  }

  vfloat load(int j, int c) const {
    const int g = c >> chunk_shift;
    return codes(j, c) * scale_by_group[g][j] + bias_by_group[g][j];
  }

  void prefetch(int j0, int n) const {
    if (stride_d == 1) {
      prefetch_rows(head, stride_s * 4, j0, n, words * 4);
    }
  }
};

// A block of fp32 rows, Dh apart: a tile's keys or values converted once.
struct ScratchRows {
  static constexpr bool kQuantized = false;
  const float* base;
  int Dh;

  vfloat load(int j, int c) const {
    return FUSED_MOE_ISA_NS::load(base + static_cast<int64_t>(j) * Dh + c * kLanes);
  }
};

// Rows 0 .. n-1 of `rows`' current block, as fp32, into `dst` [n, Dh].
template <class Rows>
static void convert_block(const Rows& rows, int n, int Dh, float* dst) {
  const int C = Dh / kLanes;
  for (int j = 0; j < n; ++j) {
    for (int c = 0; c < C; ++c) {
      store(dst + static_cast<int64_t>(j) * Dh + c * kLanes, rows.load(j, c));
    }
  }
}

// ---------------------------------------------------------------------------
// Scores, softmax, values
// ---------------------------------------------------------------------------

// Keys dotted at once with QB query vectors: QB·KS accumulators, enough
// independent chains to keep the FMA units busy, few enough for the
// register file (16 vector registers on AVX2 and SSE).
constexpr int key_step(int qb) {
  return qb == 1 ? 8 : qb == 2 ? 6 : qb == 3 ? 4 : qb == 4 ? 3 : qb <= 6 ? 2 : 1;
}

// The lane-wise partial sums of q_i · k_{j+t} for QB query vectors (Dh
// apart in `q`) and keys j .. j+KS-1 of the block, into `part`
// [QB][kKeyBlock][kLanes]. Each accumulator sums its chunks in order, so
// the KS of a key never changes its bits.
template <int QB, int KS, class Rows>
static inline void dot_keys(const Rows& rows, int j, const float* q, int Dh, float* part) {
  const int C = Dh / kLanes;
  vfloat acc[QB][KS] = {};
  for (int c = 0; c < C; ++c) {
    vfloat k[KS];
    for (int t = 0; t < KS; ++t) {
      k[t] = rows.load(j + t, c);
    }
    for (int i = 0; i < QB; ++i) {
      const vfloat qv = load(q + i * Dh + c * kLanes);
      for (int t = 0; t < KS; ++t) {
        acc[i][t] += qv * k[t];
      }
    }
  }
  for (int i = 0; i < QB; ++i) {
    for (int t = 0; t < KS; ++t) {
      store(part + (static_cast<int64_t>(i) * kKeyBlock + j + t) * kLanes, acc[i][t]);
    }
  }
}

// dot_keys for one key of a quantized cache: a group's scale and bias are
// broadcast once for its chunks, and with one key at a time two partial
// sums per query (even and odd chunks) keep enough FMA chains in flight.
template <int QB, int BITS>
static inline void dot_key_quantized(const QuantRows<BITS>& rows, int j, const float* q, int Dh, float* part) {
  constexpr int P = QB <= 6 ? 2 : 1;
  const int group_chunks = 1 << rows.chunk_shift;
  vfloat acc[QB][P] = {};
  for (int g = 0; g < rows.groups; ++g) {
    const vfloat sc = splat(rows.scale_by_group[g][j]), bi = splat(rows.bias_by_group[g][j]);
    for (int c = g * group_chunks; c < (g + 1) * group_chunks; c += P) {
      for (int u = 0; u < P; ++u) {
        const vfloat k = rows.codes(j, c + u) * sc + bi;
        for (int i = 0; i < QB; ++i) {
          acc[i][u] += load(q + i * Dh + (c + u) * kLanes) * k;
        }
      }
    }
  }
  for (int i = 0; i < QB; ++i) {
    vfloat sum = acc[i][0];
    for (int u = 1; u < P; ++u) {
      sum += acc[i][u];
    }
    store(part + (static_cast<int64_t>(i) * kKeyBlock + j) * kLanes, sum);
  }
}

// Scores of QB query vectors against the block's keys 0 .. n-1, into
// sc[i * sc_stride + j] (up to n rounded up to kLanes; past n unspecified).
template <int QB, class Rows>
static void block_scores(
    const Rows& rows, int n, const float* q, int Dh, float* part, float* sc, int sc_stride) {
  if constexpr (Rows::kQuantized) {
    for (int j = 0; j < n; ++j) {
      dot_key_quantized<QB>(rows, j, q, Dh, part);
    }
  } else {
    constexpr int KS = key_step(QB);
    int j = 0;
    for (; j + KS <= n; j += KS) {
      dot_keys<QB, KS>(rows, j, q, Dh, part);
    }
    for (; j < n; ++j) {
      dot_keys<QB, 1>(rows, j, q, Dh, part);
    }
  }
  for (int i = 0; i < QB; ++i) {
    for (int j0 = 0; j0 < n; j0 += kLanes) {
      vfloat v[kLanes];
      for (int t = 0; t < kLanes; ++t) {
        v[t] = load(part + (static_cast<int64_t>(i) * kKeyBlock + j0 + t) * kLanes);
      }
      store(sc + static_cast<int64_t>(i) * sc_stride + j0, transpose_sum(v));
    }
  }
}

// o[i] += Σ_{j < n} p[i * p_stride + j] · v_j for QB query vectors (o rows
// Dh apart), DC vectors of each at a time. Each output value sums its keys
// in order.
template <int QB, class Rows>
static void block_values(const Rows& rows, int n, const float* p, int p_stride, float* o, int Dh) {
  constexpr int DC = QB <= 6 ? 2 : 1;
  const int C = Dh / kLanes;
  auto pass = [&](int c, auto dc) {
    constexpr int W = decltype(dc)::value;
    vfloat acc[QB][W];
    for (int i = 0; i < QB; ++i) {
      for (int d = 0; d < W; ++d) {
        acc[i][d] = load(o + i * Dh + (c + d) * kLanes);
      }
    }
    for (int j = 0; j < n; ++j) {
      vfloat v[W];
      for (int d = 0; d < W; ++d) {
        v[d] = rows.load(j, c + d);
      }
      for (int i = 0; i < QB; ++i) {
        const vfloat pij = splat(p[i * p_stride + j]);
        for (int d = 0; d < W; ++d) {
          acc[i][d] += pij * v[d];
        }
      }
    }
    for (int i = 0; i < QB; ++i) {
      for (int d = 0; d < W; ++d) {
        store(o + i * Dh + (c + d) * kLanes, acc[i][d]);
      }
    }
  };
  int c = 0;
  for (; c + DC <= C; c += DC) {
    pass(c, std::integral_constant<int, DC>{});
  }
  for (; c < C; ++c) {
    pass(c, std::integral_constant<int, 1>{});
  }
}

// block_values for a quantized cache, with the dequantization taken out of
// the loop: Σ_j p_j·(s_j·c_j + b_j) = Σ_j (p_j·s_j)·c_j + Σ_j p_j·b_j per
// group. The weights p·s of the block's keys come first, a vector of keys
// at a time, and the bias terms go to `bias_sums` [QB][groups] (vectors of
// lane partial sums, added to the output once per chunk by add_bias_sums);
// the loop then multiplies codes converted to fp32 by the weights, as the
// float cache's loop does its values. A key the query does not see (past n)
// adds nothing, whatever its scale and bias hold.
template <int QB, int BITS>
static void block_values_quantized(const QuantRows<BITS>& rows, int n, const float* p, int p_stride,
                                   float* o, int Dh, float* w, float* bias_sums) {
  typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
  vint lane = {};
  for (int t = 0; t < kLanes; ++t) {
    lane[t] = t;
  }
  const int G = rows.groups;
  for (int i = 0; i < QB; ++i) {
    for (int j0 = 0; j0 < n; j0 += kLanes) {
      const vfloat pv = load(p + i * p_stride + j0);
      const vint seen = lane < n - j0;
      for (int g = 0; g < G; ++g) {
        store(w + (static_cast<int64_t>(i) * G + g) * kKeyBlock + j0, pv * load(rows.scale_by_group[g] + j0));
        float* sum = bias_sums + (static_cast<int64_t>(i) * G + g) * kLanes;
        const vfloat pb = pv * load(rows.bias_by_group[g] + j0);
        store(sum, load(sum) + (seen ? pb : vfloat{}));
      }
    }
  }
  constexpr int DC = QB <= 6 ? 2 : 1;
  const int C = Dh / kLanes;
  auto pass = [&](int c, auto dc) {
    constexpr int W = decltype(dc)::value;
    const float* wg = w + (c >> rows.chunk_shift) * kKeyBlock; // chunks c .. c+W-1 share a group
    vfloat acc[QB][W];
    for (int i = 0; i < QB; ++i) {
      for (int d = 0; d < W; ++d) {
        acc[i][d] = load(o + i * Dh + (c + d) * kLanes);
      }
    }
    for (int j = 0; j < n; ++j) {
      vfloat v[W];
      for (int d = 0; d < W; ++d) {
        v[d] = rows.codes(j, c + d);
      }
      for (int i = 0; i < QB; ++i) {
        const vfloat wij = splat(wg[static_cast<int64_t>(i) * G * kKeyBlock + j]);
        for (int d = 0; d < W; ++d) {
          acc[i][d] += wij * v[d];
        }
      }
    }
    for (int i = 0; i < QB; ++i) {
      for (int d = 0; d < W; ++d) {
        store(o + i * Dh + (c + d) * kLanes, acc[i][d]);
      }
    }
  };
  int c = 0;
  for (; c + DC <= C; c += DC) {
    pass(c, std::integral_constant<int, DC>{});
  }
  for (; c < C; ++c) {
    pass(c, std::integral_constant<int, 1>{});
  }
}

// Adds each group's bias sum to the group's values of `nq` outputs.
static void add_bias_sums(float* o, int nq, int Dh, int group_size, const float* bias_sums) {
  const int G = Dh / group_size;
  for (int i = 0; i < nq; ++i) {
    for (int g = 0; g < G; ++g) {
      const vfloat b = splat(horizontal_sum(load(bias_sums + (static_cast<int64_t>(i) * G + g) * kLanes)));
      for (int d = g * group_size; d < (g + 1) * group_size; d += kLanes) {
        store(o + static_cast<int64_t>(i) * Dh + d, load(o + static_cast<int64_t>(i) * Dh + d) + b);
      }
    }
  }
}

// Softmax numerators of the first n scores of `s` (n >= 1), in place, with
// their maximum taken out; the rest of the row up to n_pad (a multiple of
// kLanes) is zeroed. Sets the maximum and the sum.
static inline void softmax_numerators(float* s, int n, int n_pad, float& m, float& l) {
  typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
  vint lane = {};
  for (int t = 0; t < kLanes; ++t) {
    lane[t] = t;
  }
  const vfloat minus_inf = splat(-std::numeric_limits<float>::infinity());
  // The last vector's lanes past n are stale: masked out.
  const int j_last = n_pad - kLanes;
  vfloat mv = lane < n - j_last ? load(s + j_last) : minus_inf;
  for (int j = 0; j < j_last; j += kLanes) {
    const vfloat x = load(s + j);
    mv = mv > x ? mv : x;
  }
  m = mv[0];
  for (int t = 1; t < kLanes; ++t) {
    m = m > mv[t] ? m : mv[t];
  }
  vfloat sum = {};
  for (int j = 0; j < n_pad; j += kLanes) {
    vfloat e = exp_nonpositive(load(s + j) - m);
    if (j == j_last) {
      e = lane < n - j_last ? e : vfloat{};
    }
    store(s + j, e);
    sum += e;
  }
  l = horizontal_sum(sum);
}

// Folds one chunk's partial (mc, lc, oc) into the running (m, l, o). A
// chunk none of whose keys the query sees has lc = 0 and is skipped; the
// first one seen is taken as it is. The one fold of the tasks and the merge.
static inline void fold(float& m, float& l, float* o, uint8_t& seen, float mc, float lc,
                        const float* oc, int Dh) {
  if (lc == 0.0f) {
    return;
  }
  if (!seen) {
    seen = 1;
    m = mc;
    l = lc;
    std::memcpy(o, oc, sizeof(float) * Dh);
    return;
  }
  const float M = m > mc ? m : mc;
  const float alpha = exp_nonpositive(m - M), beta = exp_nonpositive(mc - M);
  m = M;
  l = l * alpha + lc * beta;
  for (int d = 0; d < Dh; d += kLanes) {
    store(o + d, load(o + d) * alpha + load(oc + d) * beta);
  }
}

// ---------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------

// Keys query row l sees.
static inline int horizon(const AttentionArgs& a, int l) {
  return a.causal ? a.S - a.L + l + 1 : a.S;
}

// Keys of chunk [j0, j0 + kAttentionKeyChunk) that a query with horizon n
// sees.
static inline int seen_in(int n, int j0, int len) {
  return std::max(0, std::min(len, n - j0));
}

static void write_out(const AttentionArgs& a, int64_t at, const float* o, float l) {
  const float inv = 1.0f / l;
  for (int d = 0; d < a.Dh; ++d) {
    store_as(a.out, a.type, at + d, o[d] * inv);
  }
}

// kLanes values of q from element `at`, as fp32.
static inline vfloat load_query(const AttentionArgs& a, int64_t at) {
  switch (a.type) {
    case FloatType::f32: return load_lanes<FloatType::f32>(a.q, at);
    case FloatType::f16: return load_lanes<FloatType::f16>(a.q, at);
    case FloatType::bf16: break;
  }
  return load_lanes<FloatType::bf16>(a.q, at);
}

// Offset of (b, query head h, row l) in q and in the output.
static inline int64_t out_at(const AttentionArgs& a, int b, int h, int l) {
  return ((static_cast<int64_t>(b) * a.Hq + h) * a.L + l) * a.Dh;
}

template <class Rows, int QB>
static void attend(const AttentionArgs& a, const AttentionTask& t) {
  constexpr int kChunk = kAttentionKeyChunk;
  const int Dh = a.Dh;
  const int R = t.l1 - t.l0;
  const int V = R * QB; // query vectors of the tile, row-major: (r, i)
  const bool tile = R > 1;

  float* q = scratch<float, 0>(static_cast<size_t>(V) * Dh);
  float* sc = scratch<float, 1>(static_cast<size_t>(V) * kChunk);
  float* oc = scratch<float, 2>(static_cast<size_t>(V) * Dh);
  float* o = scratch<float, 3>(static_cast<size_t>(V) * Dh);
  float* part = scratch<float, 4>(static_cast<size_t>(QB) * kKeyBlock * kLanes);
  float* block = scratch<float, 5>(tile ? static_cast<size_t>(kKeyBlock) * Dh : 0);
  float* stat = scratch<float, 6>(static_cast<size_t>(V) * 4); // m, l, mc, lc
  uint8_t* seen = scratch<uint8_t, 7>(V);
  // A quantized cache's values pass: weights p·scale, and bias sums.
  float* weights = scratch<float, 7>(Rows::kQuantized ? static_cast<size_t>(QB) * kMaxAttentionGroups * kKeyBlock : 0);
  float* bias_sums = scratch<float, 8>(Rows::kQuantized ? static_cast<size_t>(V) * kMaxAttentionGroups * kLanes : 0);

  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < QB; ++i) {
      const int64_t at = out_at(a, t.b, t.h0 + i, t.l0 + r);
      for (int c = 0; c < Dh / kLanes; ++c) {
        store(q + (static_cast<int64_t>(r) * QB + i) * Dh + c * kLanes,
              load_query(a, at + c * kLanes) * a.scale);
      }
      seen[r * QB + i] = 0;
    }
  }

  Rows keys(a, a.k, t.b, t.g, 0), values(a, a.v, t.b, t.g, 1);
  const ScratchRows converted{block, Dh};
  const int n_last = horizon(a, t.l1 - 1); // the most keys a row sees
  for (int c = t.c0; c < t.c1; ++c) {
    const int j0 = c * kChunk;
    const int len = std::min(kChunk, n_last - j0);
    // Scores of every row's query vectors, block by block.
    for (int jb = 0; jb < len; jb += kKeyBlock) {
      const int nb = std::min(kKeyBlock, len - jb);
      keys.set_block(j0 + jb, nb);
      if (jb + nb < len) {
        keys.prefetch(j0 + jb + nb, std::min(kKeyBlock, len - jb - nb));
      } else {
        values.prefetch(j0, std::min(kKeyBlock, len));
      }
      if (tile) {
        convert_block(keys, nb, Dh, block);
      }
      for (int r = 0; r < R; ++r) {
        const int n = seen_in(horizon(a, t.l0 + r), j0 + jb, nb);
        if (n == 0) {
          continue;
        }
        const float* qr = q + static_cast<int64_t>(r) * QB * Dh;
        float* sr = sc + static_cast<int64_t>(r) * QB * kChunk + jb;
        if (tile) {
          block_scores<QB>(converted, n, qr, Dh, part, sr, kChunk);
        } else {
          block_scores<QB>(keys, n, qr, Dh, part, sr, kChunk);
        }
      }
    }
    // The chunk's softmax numerators, per query vector.
    for (int r = 0; r < R; ++r) {
      const int n = seen_in(horizon(a, t.l0 + r), j0, len);
      for (int i = 0; i < QB; ++i) {
        float* st = stat + (r * QB + i) * 4;
        st[3] = 0.0f; // lc = 0: the query sees none of the chunk
        if (n > 0) {
          const int n_pad = (n + kLanes - 1) / kLanes * kLanes;
          softmax_numerators(sc + (static_cast<int64_t>(r) * QB + i) * kChunk, n, n_pad, st[2], st[3]);
        }
      }
    }
    // The weighted values.
    std::fill(oc, oc + static_cast<int64_t>(V) * Dh, 0.0f);
    constexpr bool factored = Rows::kQuantized; // a quantized cache, read a row at a time
    if constexpr (factored) {
      if (!tile) {
        std::fill(bias_sums, bias_sums + static_cast<int64_t>(V) * kMaxAttentionGroups * kLanes, 0.0f);
      }
    }
    for (int jb = 0; jb < len; jb += kKeyBlock) {
      const int nb = std::min(kKeyBlock, len - jb);
      values.set_block(j0 + jb, nb);
      if (jb + nb < len) {
        values.prefetch(j0 + jb + nb, std::min(kKeyBlock, len - jb - nb));
      } else if (c + 1 < t.c1) {
        keys.prefetch(j0 + kChunk, std::min(kKeyBlock, n_last - j0 - kChunk));
      }
      if (tile) {
        convert_block(values, nb, Dh, block);
      }
      for (int r = 0; r < R; ++r) {
        const int n = seen_in(horizon(a, t.l0 + r), j0 + jb, nb);
        if (n == 0) {
          continue;
        }
        const float* pr = sc + static_cast<int64_t>(r) * QB * kChunk + jb;
        float* orow = oc + static_cast<int64_t>(r) * QB * Dh;
        if (tile) {
          block_values<QB>(converted, n, pr, kChunk, orow, Dh);
        } else if constexpr (factored) {
          block_values_quantized<QB>(values, n, pr, kChunk, orow, Dh, weights,
                                     bias_sums + static_cast<int64_t>(r) * QB * kMaxAttentionGroups * kLanes);
        } else {
          block_values<QB>(values, n, pr, kChunk, orow, Dh);
        }
      }
    }
    if constexpr (factored) {
      if (!tile) {
        for (int r = 0; r < R; ++r) {
          add_bias_sums(oc + static_cast<int64_t>(r) * QB * Dh, QB, Dh, a.group_size,
                        bias_sums + static_cast<int64_t>(r) * QB * kMaxAttentionGroups * kLanes);
        }
      }
    }
    for (int v = 0; v < V; ++v) {
      float* st = stat + v * 4;
      const float* ocv = oc + static_cast<int64_t>(v) * Dh;
      if (t.partial) {
        float* rec = t.partial + static_cast<int64_t>(v) * (Dh + 2);
        rec[0] = st[2];
        rec[1] = st[3];
        if (st[3] != 0.0f) {
          std::memcpy(rec + 2, ocv, sizeof(float) * Dh);
        }
      } else {
        fold(st[0], st[1], o + static_cast<int64_t>(v) * Dh, seen[v], st[2], st[3], ocv, Dh);
      }
    }
  }
  if (t.partial) {
    return;
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < QB; ++i) {
      const int v = r * QB + i;
      write_out(a, out_at(a, t.b, t.h0 + i, t.l0 + r), o + static_cast<int64_t>(v) * Dh, stat[v * 4 + 1]);
    }
  }
}

template <class Rows>
static void attend_heads(const AttentionArgs& a, const AttentionTask& t) {
  switch (t.h1 - t.h0) {
    case 1: return attend<Rows, 1>(a, t);
    case 2: return attend<Rows, 2>(a, t);
    case 3: return attend<Rows, 3>(a, t);
    case 4: return attend<Rows, 4>(a, t);
    case 5: return attend<Rows, 5>(a, t);
    case 6: return attend<Rows, 6>(a, t);
    case 7: return attend<Rows, 7>(a, t);
    case 8: return attend<Rows, 8>(a, t);
  }
}
static_assert(kAttentionHeads == 8, "attend_heads instantiates 1..8 heads");

static void attention_task(const AttentionArgs& a, const AttentionTask& t) {
  if (a.bits == 8) {
    return attend_heads<QuantRows<8>>(a, t);
  }
  if (a.bits == 4) {
    return attend_heads<QuantRows<4>>(a, t);
  }
  switch (a.cache_type) {
    case FloatType::f32: return attend_heads<FloatRows<FloatType::f32>>(a, t);
    case FloatType::f16: return attend_heads<FloatRows<FloatType::f16>>(a, t);
    case FloatType::bf16: return attend_heads<FloatRows<FloatType::bf16>>(a, t);
  }
}

static void attention_merge(
    const AttentionArgs& a, const AttentionTask& t, const float* partials, int chunks) {
  const int Dh = a.Dh;
  const int nq = t.h1 - t.h0;
  const int64_t record = attention_partial_floats(t.l1 - t.l0, nq, Dh);
  float* o = scratch<float, 3>(Dh);
  for (int r = 0; r < t.l1 - t.l0; ++r) {
    for (int i = 0; i < nq; ++i) {
      const int64_t v = static_cast<int64_t>(r) * nq + i;
      float m = 0.0f, l = 0.0f;
      uint8_t seen = 0;
      for (int c = 0; c < chunks; ++c) {
        const float* rec = partials + c * record + v * (Dh + 2);
        fold(m, l, o, seen, rec[0], rec[1], rec + 2, Dh);
      }
      write_out(a, out_at(a, t.b, t.h0 + i, t.l0 + r), o, l);
    }
  }
}

} // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
