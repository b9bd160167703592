// Per-lane pieces shared by both kernels: staging a SIMD group's weight rows
// in threadgroup memory, loading 16 packed codes, loading 16 activations
// pre-scaled for the masked dot product, and that product.
//
// Staging: a lane's own codes (6 or 8 bytes, 3 or 2 loads) and its group's
// scale (2 bytes, shared with 3 other lanes) make strided or narrow device
// loads, a third to a half of each 32-byte sector used per instruction
// (tests/tools/metal_emulator/traffic.py measured it). So each SIMD group first
// copies its rows' codes for one step, and their scales and biases for up to
// kStageGroups groups per row, with consecutive lanes on consecutive words
// (full sectors), into threadgroup memory; every lane then reads its own
// codes and scales from there. Only the SIMD group that staged rows reads
// them; the callers put a threadgroup barrier after staging and after use.
//
// The masked dot product (the idea of MLX's qdot, our own code): instead of
// shifting each code down, multiply the code still in place, `word & (m <<
// b*c)` = q_c * 2^(b*c), by x_c pre-scaled with 2^-(b*c). Every product is
// exact in fp32 (a code has at most 4 significant bits), so the result is
// sum q_c*x_c with no shifts in the inner loop. The affine part is applied once
// per lane and row: scale*sum q*x + bias*sum x.
#pragma once

#include "tile_shapes.h"

namespace fused_moe_kernels {

using namespace fused_moe_tiles;

// A lane's 16 codes as two 8-code words: code c of a word at bit BITS*c.
struct LaneCodes {
  uint32_t lo; // codes 0-7
  uint32_t hi; // codes 8-15
};

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

// Copies groups [first_group, first_group + groups) of the scales and biases
// of `rows` consecutive rows (`groups_per_row` apart) to [rows][groups] as
// float, lane l moving elements l, l + 32, ...: consecutive lanes read
// consecutive elements, and when the groups are whole rows the block is one
// contiguous run.
template <typename T>
inline void stage_affine(
    device const T* scales,
    device const T* biases,
    size_t first_row,
    uint groups_per_row,
    uint first_group,
    uint groups,
    uint rows,
    threadgroup float* scales_dst,
    threadgroup float* biases_dst,
    uint lane) {
  for (uint i = lane; i < rows * groups; i += kSimdWidth) {
    const uint r = i / groups;
    const size_t g = (first_row + r) * groups_per_row + first_group + (i - r * groups);
    scales_dst[i] = float(scales[g]);
    biases_dst[i] = float(biases[g]);
  }
}

// Codes [first_code, first_code + 16) of one staged row. first_code is a
// multiple of 16, so the 4-bit read is two aligned words and the 3-bit read
// (6 bytes) three aligned half-words.
template <int BITS>
inline LaneCodes load_lane_codes(threadgroup const uint8_t* row, uint first_code) {
  LaneCodes codes;
  if (BITS == 4) {
    threadgroup const uint32_t* p = (threadgroup const uint32_t*)(row + first_code / 2);
    codes.lo = p[0];
    codes.hi = p[1];
  } else {
    threadgroup const uint16_t* p =
        (threadgroup const uint16_t*)(row + first_code * 3 / 8);
    const uint32_t a = p[0], b = p[1], c = p[2];
    codes.lo = a | ((b & 0xffu) << 16); // bytes 0-2
    codes.hi = (b >> 8) | (c << 8); // bytes 3-5
  }
  return codes;
}

// Loads 16 activations into `scaled` pre-multiplied by 2^-(BITS*(c mod 8))
// and returns their plain sum (for the bias term).
template <int BITS, typename T>
inline float load_prescaled(device const T* x, thread float* scaled) {
  float sum = 0.0f;
  for (int c = 0; c < kCodesPerLane; ++c) {
    const float v = float(x[c]);
    sum += v;
    scaled[c] = v / float(1u << (BITS * (c % 8)));
  }
  return sum;
}

// sum_c q_c * x_c for the 16 codes, from pre-scaled activations.
template <int BITS>
inline float masked_dot(thread const float* scaled, LaneCodes codes) {
  const uint32_t mask = (1u << BITS) - 1u;
  float acc = 0.0f;
  for (int c = 0; c < 8; ++c) {
    acc += scaled[c] * float(codes.lo & (mask << (BITS * c)));
  }
  for (int c = 0; c < 8; ++c) {
    acc += scaled[8 + c] * float(codes.hi & (mask << (BITS * c)));
  }
  return acc;
}

// One quantized row as one lane sees it at one step: codes, scale and bias.
template <int BITS>
struct LaneRow {
  LaneCodes codes;
  float scale;
  float bias;

  // This lane's share of row * x: scale*sum q*x + bias*sum x.
  float dot(thread const float* scaled_x, float x_sum) const thread {
    return scale * masked_dot<BITS>(scaled_x, codes) + bias * x_sum;
  }
};

// One SIMD group's share of a kernel's staging arrays (declared in the
// kernel with FM_THREADGROUP_ARRAY, sized for all its SIMD groups):
// codes [rows][kCodesPerStep*BITS/32], scales and biases [rows][kStageGroups].
struct Staging {
  threadgroup uint32_t* codes;
  threadgroup float* scales;
  threadgroup float* biases;
};

template <int BITS>
inline Staging simdgroup_staging(
    threadgroup uint32_t* codes,
    threadgroup float* scales,
    threadgroup float* biases,
    uint simd_group,
    uint rows) {
  Staging s;
  s.codes = codes + simd_group * rows * (kCodesPerStep * BITS / 32);
  s.scales = scales + simd_group * rows * kStageGroups;
  s.biases = biases + simd_group * rows * kStageGroups;
  return s;
}

// Declares a kernel's staging arrays for `simdgroups` SIMD groups of `rows`
// rows each, and `staging`, this SIMD group's share (needs BITS and
// simd_group in scope; threadgroup arrays can only be declared in a kernel).
#define FM_STAGING_ARRAYS(simdgroups, rows)                                    \
  FM_THREADGROUP_ARRAY(uint32_t, staged_codes,                                 \
                       (simdgroups) * (rows) * (kCodesPerStep * BITS / 32));   \
  FM_THREADGROUP_ARRAY(float, staged_scales, (simdgroups) * (rows) * kStageGroups); \
  FM_THREADGROUP_ARRAY(float, staged_biases, (simdgroups) * (rows) * kStageGroups); \
  const Staging staging = simdgroup_staging<BITS>(                             \
      staged_codes, staged_scales, staged_biases, simd_group, (rows))

// What one step staged: codes [first_code, first_code + kCodesPerStep) as
// `words` words per row, and the scales and biases of `groups` groups per row
// starting at group `first_group`.
struct StagedStep {
  uint first_code;
  uint words;
  uint groups;
  uint first_group;
};

// Stages one step of `rows` consecutive rows (the first is row `first_row`
// of the stacked matrix, at `rows_start`), and at the first step of each
// kStageGroups chunk that chunk's scales and biases, between two
// threadgroup barriers: the one before waits until the previous step is done
// with the staging (and lines the lanes up before the weight loads), the one
// after makes the staging visible. Every thread of the threadgroup calls it
// the same number of times.
template <typename T, int BITS, int GROUP>
inline StagedStep stage_step(
    device const uint8_t* rows_start,
    device const T* scales,
    device const T* biases,
    size_t first_row,
    uint rows,
    uint row_bytes,
    uint groups_per_row,
    uint inputs,
    uint first_code,
    Staging dst,
    uint lane) {
  static_assert((kStageGroups * GROUP) % kCodesPerStep == 0,
                "a step must not straddle two scale chunks");
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint step_group = first_code / GROUP;
  StagedStep step;
  step.first_code = first_code;
  step.first_group = step_group / kStageGroups * kStageGroups;
  step.groups = metal::min(uint(kStageGroups), groups_per_row - step.first_group);
  if (step_group == step.first_group) {
    stage_affine(scales, biases, first_row, groups_per_row, step.first_group,
                 step.groups, rows, dst.scales, dst.biases, lane);
  }
  // inputs is a multiple of the group size (>= 32), so whole words.
  step.words = metal::min(uint(kCodesPerStep), inputs - first_code) * BITS / 32;
  stage_codes(rows_start, row_bytes, first_code * BITS / 8, step.words, rows,
              dst.codes, lane);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return step;
}

// Row r of a staged step as this lane sees it (lane l: codes
// [16 l, 16 l + 16) of the step).
template <int BITS, int GROUP>
inline LaneRow<BITS> staged_row(Staging st, StagedStep step, uint r, uint lane) {
  const uint code = lane * kCodesPerLane;
  const uint group = (step.first_code + code) / GROUP - step.first_group;
  LaneRow<BITS> row;
  row.codes = load_lane_codes<BITS>(
      (threadgroup const uint8_t*)(st.codes + r * step.words), code);
  row.scale = st.scales[r * step.groups + group];
  row.bias = st.biases[r * step.groups + group];
  return row;
}

} // namespace fused_moe_kernels
