// Per-lane pieces shared by the expert kernels: staging a SIMD group's weight
// rows in threadgroup memory, loading a lane's 16 packed codes, loading 16
// activations, and the dot product of the two, for every quantization of the
// grid (docs/kernel_contract.md): affine 2, 3, 4, 5, 6 and 8 bits; mxfp4,
// mxfp8 and nvfp4.
//
// Staging: a lane's own codes (2 x bits bytes) and its group's scale (one to
// four bytes, shared with other lanes) make strided or narrow device loads, a
// third to a half of each 32-byte sector used per instruction
// (tests/tools/metal_emulator/traffic.py measured it). So each SIMD group
// first copies its rows' codes for one step, and their scales (and affine
// biases) for up to kStageGroups (fp modes: kStageGroupsFp) groups per row,
// with consecutive lanes on consecutive words or elements (full sectors),
// into threadgroup memory; every lane then reads its own codes and scales
// from there. Only the SIMD group that staged rows reads them; the callers
// put a threadgroup barrier after staging and after use. Every weight byte is
// copied from device memory once per pass over the rows.
//
// Affine codes, the masked dot product (the idea of MLX's qdot, our own
// code): instead of shifting each code down, multiply the code still in
// place, `window & (m << s)` = q * 2^s, by x pre-scaled with 2^-s. Every
// product is exact in fp32 (a code has at most 8 significant bits), so the
// result is sum q_c*x_c with no shifts in the inner loop. The affine part is
// applied once per lane and row: scale*sum q*x + bias*sum x. A lane's 2 x
// bits bytes are cut into 32-bit windows so that no code crosses one (3 and
// 6 bits: 24-bit windows; 5 bits: windows at bytes 0, 3 and 6).
//
// fp codes are decoded in registers with integer operations (no table in
// memory): e2m1 via 2*value (0, 1, 2, 3, 4, 6, 8, 12 and negatives) and
// e4m3 via 2^9*value, integers exact in fp32, then scaled by 1/2 or 2^-9
// (exact) and kept as half, once per row and step however many pairs use
// them. The group scale is staged already decoded as fp32 (e8m0:
// 2^(s-127); nvfp4's e4m3 scale times global_scale/2688 when given).
#pragma once

#include "tile_shapes.h"

namespace fused_moe_kernels {

using namespace fused_moe_tiles;

// QuantMode values (csrc/supported.h).
FM_TILE_CONSTANT int kAffine = 0;
FM_TILE_CONSTANT int kMxfp4 = 1;
FM_TILE_CONSTANT int kMxfp8 = 2;
FM_TILE_CONSTANT int kNvfp4 = 3;

// Groups of scales staged per row at a time (tile_shapes.h).
constexpr int stage_groups(int mode) {
  return mode == kAffine ? kStageGroups : kStageGroupsFp;
}

// ---------------------------------------------------------------------------
// A lane's 16 codes
// ---------------------------------------------------------------------------

// Code c (0..15) of a lane lies in window code_window<BITS>(c) at bit
// code_shift<BITS>(c), whole. 2, 4 and 8 bits: the lane's words; 3 bits: two
// 24-bit windows of 8 codes; 6 bits: four 24-bit windows of 4 codes; 5 bits:
// the 32 bits from bytes 0, 3 and 6 (codes 0-5, 6-10, 11-15).
template <int BITS>
constexpr int code_window(int c) {
  return BITS == 3 ? c / 8
      : BITS == 6  ? c / 4
      : BITS == 5  ? (c < 6 ? 0 : c < 11 ? 1 : 2)
                   : BITS * c / 32;
}

template <int BITS>
constexpr int code_shift(int c) {
  return BITS == 3 ? 3 * (c % 8)
      : BITS == 6  ? 6 * (c % 4)
      : BITS == 5  ? (c < 6 ? 5 * c : c < 11 ? 5 * c - 24 : 5 * c - 48)
                   : BITS * c % 32;
}

// A lane's 16 codes as up to four 32-bit windows (unused ones are never
// read, and cost no register once the compiler sees that).
struct LaneCodes {
  uint32_t w[4];
};

// The code bits of code c (still in place: not shifted down).
template <int BITS>
inline uint32_t code_in_place(LaneCodes codes, int c) {
  return codes.w[code_window<BITS>(c)] & (((1u << BITS) - 1u) << code_shift<BITS>(c));
}

// Code c shifted down.
template <int BITS>
inline uint32_t code_value(LaneCodes codes, int c) {
  return (codes.w[code_window<BITS>(c)] >> code_shift<BITS>(c)) & ((1u << BITS) - 1u);
}

// Codes [first_code, first_code + 16) of one staged row: 2 x BITS bytes from
// byte first_code * BITS / 8, which is word-aligned for even BITS and
// half-word-aligned for odd BITS (first_code is a multiple of 16).
template <int BITS>
inline LaneCodes load_lane_codes(threadgroup const uint8_t* row, uint first_code) {
  LaneCodes codes = {{0u, 0u, 0u, 0u}};
  threadgroup const uint8_t* p = row + first_code * BITS / 8;
  if (BITS == 3) {
    threadgroup const uint16_t* q = (threadgroup const uint16_t*)p;
    const uint32_t a = q[0], b = q[1], c = q[2];
    codes.w[0] = a | (b << 16); // bytes 0-2
    codes.w[1] = (b >> 8) | (c << 8); // bytes 3-5
  } else if (BITS == 5) {
    threadgroup const uint16_t* q = (threadgroup const uint16_t*)p;
    const uint32_t a = q[0], b = q[1], c = q[2], d = q[3], e = q[4];
    codes.w[0] = a | (b << 16); // bytes 0-3
    codes.w[1] = (b >> 8) | (c << 8) | (d << 24); // bytes 3-6
    codes.w[2] = d | (e << 16); // bytes 6-9
  } else if (BITS == 6) {
    threadgroup const uint32_t* q = (threadgroup const uint32_t*)p;
    const uint32_t a = q[0], b = q[1], c = q[2];
    codes.w[0] = a; // bytes 0-2
    codes.w[1] = (a >> 24) | (b << 8); // bytes 3-5
    codes.w[2] = (b >> 16) | (c << 16); // bytes 6-8
    codes.w[3] = c >> 8; // bytes 9-11
  } else {
    threadgroup const uint32_t* q = (threadgroup const uint32_t*)p;
    for (int i = 0; i < BITS / 2; ++i) {
      codes.w[i] = q[i];
    }
  }
  return codes;
}

// ---------------------------------------------------------------------------
// fp codes and scales
// ---------------------------------------------------------------------------

// 2*e2m1(q) for the nibble q (bit 3 the sign): the magnitudes 0, 1, 2, 3, 4,
// 6, 8, 12 are the nibbles of one constant, indexed by the low 3 bits.
inline float e2m1_x2(uint32_t q) {
  const float m = float((0xC8643210u >> ((q & 7u) * 4u)) & 0xFu);
  return (q & 8u) != 0u ? -m : m;
}

// 2^9*e4m3(q) for the byte q (MLX's from_fp8): exponent E = bits 6-3,
// mantissa M = bits 2-0; (8 + M) << (E - 1) for E > 0, M for E = 0 (below
// 2^18: exact in fp32); 0x7F and 0xFF are NaN.
inline float e4m3_x512(uint32_t q) {
  const uint32_t e = (q >> 3) & 15u;
  const uint32_t m = q & 7u;
  const float v = float(e != 0u ? (8u | m) << (e - 1u) : m);
  if ((q & 0x7Fu) == 0x7Fu) {
    return NAN;
  }
  return (q & 0x80u) != 0u ? -v : v;
}

// A code's value: e2m1 (0, 0.5, ..., 6 and negatives) or e4m3 (2^-9 ... 448,
// NaN), exact in fp32 and in half, which holds the decoded codes of a row.
template <int MODE>
inline float fp_code(uint32_t q) {
  return MODE == kMxfp8 ? e4m3_x512(q) * (1.0f / 512.0f) : e2m1_x2(q) * 0.5f;
}

// The group scale of an fp mode from its uint8 `s`: e8m0 2^(s-127) (s = 255:
// +inf, as MLX computes it); nvfp4's e4m3 scale times `global`
// (global_scale/2688 when the layer has one, else 1), one fp32 rounding as
// the contract has it.
template <int MODE>
inline float fp_group_scale(uint32_t s, float global) {
  if (MODE == kNvfp4) {
    return e4m3_x512(s) * (1.0f / 512.0f) * global;
  }
  return metal::ldexp(1.0f, int(s) - 127);
}

// ---------------------------------------------------------------------------
// Activations and the dot product
// ---------------------------------------------------------------------------

// Loads a lane's 16 activations into `xs` as the dot product wants them:
// affine pre-multiplied by 2^-code_shift (exact), fp as they are. Returns
// their plain sum (the affine bias term; unused otherwise).
template <int MODE, int BITS, typename T>
inline float load_lane_x(device const T* x, thread float* xs) {
  float sum = 0.0f;
  for (int c = 0; c < kCodesPerLane; ++c) {
    const float v = float(x[c]);
    sum += v;
    xs[c] = MODE == kAffine ? v / float(1u << code_shift<BITS>(c)) : v;
  }
  return sum;
}

// sum_c q_c * x_c for the 16 codes, from pre-scaled activations.
template <int BITS>
inline float masked_dot(thread const float* scaled, LaneCodes codes) {
  float acc = 0.0f;
  for (int c = 0; c < kCodesPerLane; ++c) {
    acc += scaled[c] * float(code_in_place<BITS>(codes, c));
  }
  return acc;
}

// One quantized row as one lane sees it at one step: affine, its codes (in
// place) and the group's scale and bias; fp, its codes decoded once into
// half (exact: e2m1 and e4m3 values are halves) and the group's scale, so
// that a prefill pass over several pairs decodes each code once.
template <int MODE, int BITS>
struct LaneRow {
  LaneCodes codes; // affine
  half w[kCodesPerLane]; // fp
  float scale;
  float bias; // affine

  // This lane's share of row * x: affine scale*sum q*x + bias*sum x; fp
  // scale*sum w*x.
  float dot(thread const float* xs, float x_sum) const thread {
    if (MODE == kAffine) {
      return scale * masked_dot<BITS>(xs, codes) + bias * x_sum;
    }
    float acc = 0.0f;
    for (int c = 0; c < kCodesPerLane; ++c) {
      acc += xs[c] * float(w[c]);
    }
    return scale * acc;
  }
};

// ---------------------------------------------------------------------------
// Staging
// ---------------------------------------------------------------------------

// Copies `words` 32-bit words from each of `rows` packed rows (`row_bytes`
// apart, starting `first_byte` into each) to dst[rows][words]. Lane l moves
// words l, l + 32, ... of that [rows][words] order: every load instruction
// reads 32 consecutive words of a row (or the end of one row and the start
// of the next).
inline void stage_codes(
    device const uint8_t* rows_start,
    uint row_bytes,
    uint first_byte,
    uint words,
    uint rows,
    threadgroup uint32_t* dst,
    uint lane) {
  for (uint i = lane; i < rows * words; i += kSimdWidth) {
    const uint r = i / words;
    device const uint32_t* src =
        (device const uint32_t*)(rows_start + size_t(r) * row_bytes + first_byte);
    dst[i] = src[i - r * words];
  }
}

// Copies groups [first_group, first_group + groups) of the scales (and
// affine biases) of `rows` consecutive rows (`groups_per_row` apart) to
// [rows][groups] as fp32, lane l moving elements l, l + 32, ...: consecutive
// lanes read consecutive elements, and when the groups are whole rows the
// block is one contiguous run. fp scales are decoded here, with
// `global_even` / `global_odd` (nvfp4's global scale / 2688 of even and odd
// rows: gate and up rows of a gated layer).
template <typename T, int MODE>
inline void stage_scales(
    device const uint8_t* scales,
    device const T* biases,
    size_t first_row,
    uint groups_per_row,
    uint first_group,
    uint groups,
    uint rows,
    float global_even,
    float global_odd,
    threadgroup float* scales_dst,
    threadgroup float* biases_dst,
    uint lane) {
  for (uint i = lane; i < rows * groups; i += kSimdWidth) {
    const uint r = i / groups;
    const size_t g = (first_row + r) * groups_per_row + first_group + (i - r * groups);
    if (MODE == kAffine) {
      scales_dst[i] = float(((device const T*)scales)[g]);
      biases_dst[i] = float(biases[g]);
    } else {
      scales_dst[i] = fp_group_scale<MODE>(scales[g], (r & 1u) != 0u ? global_odd : global_even);
    }
  }
}

// One SIMD group's share of a kernel's staging arrays (declared in the
// kernel with FM_THREADGROUP_ARRAY, sized for all its SIMD groups):
// codes [rows][kCodesPerStep*BITS/32], scales and (affine) biases
// [rows][stage_groups(MODE)].
struct Staging {
  threadgroup uint32_t* codes;
  threadgroup float* scales;
  threadgroup float* biases;
};

template <int MODE, int BITS>
inline Staging simdgroup_staging(
    threadgroup uint32_t* codes,
    threadgroup float* scales,
    threadgroup float* biases,
    uint simd_group,
    uint rows) {
  Staging s;
  s.codes = codes + simd_group * rows * (kCodesPerStep * BITS / 32);
  s.scales = scales + simd_group * rows * stage_groups(MODE);
  s.biases = biases + (MODE == kAffine ? simd_group * rows * stage_groups(MODE) : 0u);
  return s;
}

// Declares a kernel's staging arrays for `simdgroups` SIMD groups of `rows`
// rows each, and `staging`, this SIMD group's share (needs MODE, BITS and
// simd_group in scope; threadgroup arrays can only be declared in a kernel).
// The fp modes have no biases: their array is one element, never read.
#define FM_STAGING_ARRAYS(simdgroups, rows)                                      \
  FM_THREADGROUP_ARRAY(uint32_t, staged_codes,                                   \
                       (simdgroups) * (rows) * (kCodesPerStep * BITS / 32));     \
  FM_THREADGROUP_ARRAY(float, staged_scales,                                     \
                       (simdgroups) * (rows) * stage_groups(MODE));              \
  FM_THREADGROUP_ARRAY(float, staged_biases,                                     \
                       MODE == kAffine ? (simdgroups) * (rows) * stage_groups(MODE) : 1); \
  const Staging staging = simdgroup_staging<MODE, BITS>(                         \
      staged_codes, staged_scales, staged_biases, simd_group, (rows))

// What one step staged: codes [first_code, first_code + kCodesPerStep) as
// `words` words per row, and the scales of `groups` groups per row starting
// at group `first_group`.
struct StagedStep {
  uint first_code;
  uint words;
  uint groups;
  uint first_group;
};

// Stages one step of `rows` consecutive rows (the first is row `first_row`
// of the stacked matrix, at `rows_start`), and at the first step of each
// chunk of stage_groups(MODE) groups that chunk's scales (and biases),
// between two threadgroup barriers: the one before waits until the previous
// step is done with the staging (and lines the lanes up before the weight
// loads), the one after makes the staging visible. Every thread of the
// threadgroup calls it the same number of times.
template <typename T, int MODE, int BITS, int GROUP>
inline StagedStep stage_step(
    device const uint8_t* rows_start,
    device const uint8_t* scales,
    device const T* biases,
    size_t first_row,
    uint rows,
    uint row_bytes,
    uint groups_per_row,
    uint inputs,
    uint first_code,
    float global_even,
    float global_odd,
    Staging dst,
    uint lane) {
  static_assert((stage_groups(MODE) * GROUP) % kCodesPerStep == 0,
                "a step must not straddle two scale chunks");
  static_assert(GROUP % kCodesPerLane == 0, "a lane's codes share one group");
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint step_group = first_code / GROUP;
  StagedStep step;
  step.first_code = first_code;
  step.first_group = step_group / stage_groups(MODE) * stage_groups(MODE);
  step.groups = metal::min(uint(stage_groups(MODE)), groups_per_row - step.first_group);
  if (step_group == step.first_group) {
    stage_scales<T, MODE>(scales, biases, first_row, groups_per_row, step.first_group,
                          step.groups, rows, global_even, global_odd, dst.scales,
                          dst.biases, lane);
  }
  // inputs is a multiple of 32, so whole words.
  step.words = metal::min(uint(kCodesPerStep), inputs - first_code) * BITS / 32;
  stage_codes(rows_start, row_bytes, first_code * BITS / 8, step.words, rows,
              dst.codes, lane);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return step;
}

// Row r of a staged step as this lane sees it (lane l: codes
// [16 l, 16 l + 16) of the step).
template <int MODE, int BITS, int GROUP>
inline LaneRow<MODE, BITS> staged_row(Staging st, StagedStep step, uint r, uint lane) {
  const uint code = lane * kCodesPerLane;
  const uint group = (step.first_code + code) / GROUP - step.first_group;
  LaneRow<MODE, BITS> row;
  row.codes = load_lane_codes<BITS>(
      (threadgroup const uint8_t*)(st.codes + r * step.words), code);
  if (MODE != kAffine) {
    for (int c = 0; c < kCodesPerLane; ++c) {
      row.w[c] = half(fp_code<MODE>(code_value<BITS>(row.codes, c)));
    }
  }
  row.scale = st.scales[r * step.groups + group];
  row.bias = MODE == kAffine ? st.biases[r * step.groups + group] : 0.0f;
  return row;
}

// nvfp4's global scale of one expert's rows, divided by 2688 (MLX's
// F8E4M3_MAX * F4E2M1_MAX) as the contract has it; 1 for the other modes or
// without one. `which` picks the gate's (0) or up's (1) of a gated layer.
template <int MODE>
inline float global_scale_of(
    device const float* global_scale, uint has_global_scale, size_t index) {
  if (MODE != kNvfp4 || has_global_scale == 0u) {
    return 1.0f;
  }
  return global_scale[index] / 2688.0f;
}

} // namespace fused_moe_kernels
