// Kernel A, gate_up_swiglu: h[p, r] = silu(G_e[r]*x_t) * (U_e[r]*x_t) for
// every (token, slot) pair p = t*k + j with expert e = indices[p].
//
// Packed rows 2r and 2r+1 of an expert are gate row r and up row r
// (docs/FORMAT.md), so one SIMD group reads both from adjacent memory and
// applies SwiGLU in registers. All pairs of the call are in one grid; the
// expert id is read here, on the device. An expert id >= E (a negative int32
// id reads as a large uint32) makes that pair's h row NaN and reads nothing.
//
// Buffer slots are listed in csrc/metal/launch_plan.cpp; the parameters below
// are declared in slot order, then the position attributes (the emulator
// relies on both, tests/test_metal_plan.py checks the order).
#pragma once

#include "args.h"
#include "quantized.h"

namespace fused_moe_kernels {

using fused_moe_args::FusedMoeArgs;

inline float silu_times(float gate, float up) {
  // Precise exp: fast exp costs greedy-decoding parity (DESIGN.md).
  return gate / (1.0f + metal::precise::exp(-gate)) * up;
}

// Decode: threadgroup (x, y) = (block of kGateUpDecodeRowPairs x
// kGateUpDecodeSimdgroups rows of h, pair y). Each lane walks 16 codes of
// all 2*kGateUpDecodeRowPairs rows per step, so each row streams once.
template <typename T, int BITS, int GROUP>
[[kernel]] void gate_up_swiglu_decode(
    device const T* x [[buffer(0)]],
    device const uint8_t* weight [[buffer(1)]],
    device const T* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint32_t* indices [[buffer(4)]],
    device T* h [[buffer(5)]],
    constant FusedMoeArgs& args [[buffer(6)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint thread_in_tg [[thread_index_in_threadgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int kRows = 2 * kGateUpDecodeRowPairs;
  FM_STAGING_ARRAYS(kGateUpDecodeSimdgroups, kRows);
  const uint pair = tg_pos.y;
  const uint r0 =
      (tg_pos.x * kGateUpDecodeSimdgroups + simd_group) * kGateUpDecodeRowPairs;
  device T* out = h + size_t(pair) * args.intermediate + r0;
  const uint expert = indices[pair];
  // The same for every thread of the threadgroup (one pair), so the
  // barriers below are reached by all or none.
  if (expert >= args.experts) {
    if (lane < uint(kGateUpDecodeRowPairs)) {
      out[lane] = T(NAN);
    }
    return;
  }
  const size_t first_row = size_t(expert) * 2 * args.intermediate + 2 * r0;
  device const uint8_t* rows = weight + first_row * args.row_bytes;
  device const T* xt = x + size_t(pair / args.top_k) * args.hidden;

  float acc[kRows];
  for (int r = 0; r < kRows; ++r) {
    acc[r] = 0.0f;
  }
  for (uint c0 = 0; c0 < args.hidden; c0 += kCodesPerStep) {
    const StagedStep step = stage_step<T, BITS, GROUP>(
        rows, scales, biases, first_row, kRows, args.row_bytes,
        args.groups_per_row, args.hidden, c0, staging, lane);
    const uint c = c0 + lane * kCodesPerLane;
    if (c < args.hidden) {
      float xs[kCodesPerLane];
      const float x_sum = load_prescaled<BITS>(xt + c, xs);
      for (int r = 0; r < kRows; ++r) {
        acc[r] += staged_row<BITS, GROUP>(staging, step, r, lane)
                      .dot(xs, x_sum);
      }
    }
  }
  float result = 0.0f;
  for (int p = 0; p < kGateUpDecodeRowPairs; ++p) {
    const float gate = simd_sum(acc[2 * p]);
    const float up = simd_sum(acc[2 * p + 1]);
    if (lane == uint(p)) {
      result = silu_times(gate, up);
    }
  }
  if (lane < uint(kGateUpDecodeRowPairs)) {
    out[lane] = T(result);
  }
}

// Prefill: `order` lists the pairs sorted by expert. Threadgroup (x, y) =
// (block of rows, kGateUpPrefillPairs consecutive entries of `order`). The
// entries of one expert form a segment, taken by the block it starts in;
// each step's codes are loaded once per kGateUpPrefillPairs pairs of it.
template <typename T, int BITS, int GROUP>
[[kernel]] void gate_up_swiglu_prefill(
    device const T* x [[buffer(0)]],
    device const uint8_t* weight [[buffer(1)]],
    device const T* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint32_t* indices [[buffer(4)]],
    device const uint32_t* order [[buffer(5)]],
    device T* h [[buffer(6)]],
    constant FusedMoeArgs& args [[buffer(7)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint thread_in_tg [[thread_index_in_threadgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int kRows = 2 * kGateUpPrefillRowPairs;
  constexpr int kPairs = kGateUpPrefillPairs;
  FM_STAGING_ARRAYS(kGateUpPrefillSimdgroups, kRows);
  const uint r0 = (tg_pos.x * kGateUpPrefillSimdgroups + simd_group) *
      kGateUpPrefillRowPairs;
  const uint begin = tg_pos.y * kPairs;
  const uint end = metal::min(begin + kPairs, args.pairs);

  // A segment (the run of one expert in `order`) belongs to the block it
  // starts in, which takes it whole, kPairs pairs per pass: each pass reads
  // the expert's rows once, and a segment that crosses into the next block
  // is not read again there. Segments depend on tg_pos.y only: every thread
  // walks the same ones.
  uint s = begin;
  if (s > 0) {
    const uint earlier = indices[order[begin - 1]];
    while (s < end && indices[order[s]] == earlier) {
      ++s;
    }
  }
  uint segment_end = s;
  while (s < end || s < segment_end) {
    const uint expert = indices[order[s]];
    if (s == segment_end) {
      segment_end = s + 1;
      while (segment_end < args.pairs && indices[order[segment_end]] == expert) {
        ++segment_end;
      }
    }
    const uint n = metal::min(uint(kPairs), segment_end - s);
    if (expert >= args.experts) {
      for (uint q = 0; q < n; ++q) {
        if (lane < uint(kGateUpPrefillRowPairs)) {
          h[size_t(order[s + q]) * args.intermediate + r0 + lane] = T(NAN);
        }
      }
      s += n;
      continue;
    }
    const size_t first_row = size_t(expert) * 2 * args.intermediate + 2 * r0;
    device const uint8_t* rows = weight + first_row * args.row_bytes;

    float acc[kPairs][kRows];
    for (int q = 0; q < kPairs; ++q) {
      for (int r = 0; r < kRows; ++r) {
        acc[q][r] = 0.0f;
      }
    }
    for (uint c0 = 0; c0 < args.hidden; c0 += kCodesPerStep) {
      const StagedStep step = stage_step<T, BITS, GROUP>(
          rows, scales, biases, first_row, kRows, args.row_bytes,
          args.groups_per_row, args.hidden, c0, staging, lane);
      const uint c = c0 + lane * kCodesPerLane;
      if (c < args.hidden) {
        LaneRow<BITS> row[kRows];
        for (int r = 0; r < kRows; ++r) {
          row[r] = staged_row<BITS, GROUP>(staging, step, r, lane);
        }
        for (int q = 0; q < kPairs; ++q) {
          if (uint(q) < n) {
            const uint token = order[s + q] / args.top_k;
            float xs[kCodesPerLane];
            const float x_sum =
                load_prescaled<BITS>(x + size_t(token) * args.hidden + c, xs);
            for (int r = 0; r < kRows; ++r) {
              acc[q][r] += row[r].dot(xs, x_sum);
            }
          }
        }
      }
    }
    for (int q = 0; q < kPairs; ++q) {
      if (uint(q) < n) {
        float result = 0.0f;
        for (int p = 0; p < kGateUpPrefillRowPairs; ++p) {
          const float gate = simd_sum(acc[q][2 * p]);
          const float up = simd_sum(acc[q][2 * p + 1]);
          if (lane == uint(p)) {
            result = silu_times(gate, up);
          }
        }
        if (lane < uint(kGateUpPrefillRowPairs)) {
          h[size_t(order[s + q]) * args.intermediate + r0 + lane] = T(result);
        }
      }
    }
    s += n;
  }
}

} // namespace fused_moe_kernels
