// The gate/up kernels: h[p, r] = act(G_e[r]*x_p + b_g, U_e[r]*x_p + b_u) for
// a gated activation, act(W_e[r]*x_p + b) for the others, for every
// (token, slot) pair p = t*k + j with expert e = indices[p] and x_p = x[t]
// (x shared by the slots) or x[p] (x per slot).
//
// Template arguments: T the activations' dtype; MODE, BITS, GROUP the
// projection's quantization (quantized.h); ACT the activation
// (activations.h). Run-time settings come in FusedMoeArgs: the expert bias
// and nvfp4's global scales (slots bound either way: the launch plan binds
// the argument struct to an absent input's slot, and the kernel reads it only
// when its flag is set), x per slot, the activation's parameters.
//
// A gated layer's packed rows 2r and 2r+1 are gate row r and up row r
// (docs/FORMAT.md), so one SIMD group reads both from adjacent memory and
// applies the activation in registers; a non-gated layer's rows are fc1's.
// All pairs of the call are in one grid; the expert id is read here, on the
// device. An expert id >= E (a negative int32 id reads as a large uint32)
// makes that pair's h row NaN and reads nothing.
//
// Buffer slots are listed in csrc/metal/launch_plan.cpp; the parameters below
// are declared in slot order, then the position attributes (the emulator
// relies on both, tests/test_metal_plan.py checks the order).
#pragma once

#include "activations.h"
#include "args.h"
#include "quantized.h"

namespace fused_moe_kernels {

using fused_moe_args::FusedMoeArgs;

// Packed rows per expert: gate and up rows, or fc1's.
template <int ACT>
inline uint packed_rows(constant FusedMoeArgs& args) {
  return activation_gated(ACT) ? 2 * args.intermediate : args.intermediate;
}

// The epilogue of output row p (of kOut) of a SIMD group whose lane
// accumulators are acc[kRows]: every lane takes part in the simd_sums, lane
// p applies the expert bias and the activation. `first_row` is the stacked
// matrix's row of acc[0].
template <int ACT, int kRows>
inline float gate_up_epilogue(
    thread const float* acc,
    device const float* bias,
    size_t first_row,
    constant FusedMoeArgs& args,
    uint lane) {
  constexpr bool kGated = activation_gated(ACT);
  constexpr int kOut = kGated ? kRows / 2 : kRows;
  float result = 0.0f;
  for (int p = 0; p < kOut; ++p) {
    const int row = kGated ? 2 * p : p;
    float g = simd_sum(acc[row]);
    float u = 0.0f;
    if (kGated) {
      u = simd_sum(acc[row + 1]);
    }
    if (lane == uint(p)) {
      if (args.has_bias != 0u) {
        g += bias[first_row + row];
        if (kGated) {
          u += bias[first_row + row + 1];
        }
      }
      result = activate<ACT>(g, u, args);
    }
  }
  return result;
}

// Decode: threadgroup (x, y) = (block of rows of h, pair y). Each SIMD group
// streams kGateUpDecodeRows packed rows (gated: kGateUpDecodeRows / 2 rows of
// h); each lane walks 16 codes of all of them per step, so each row streams
// once.
template <typename T, int MODE, int BITS, int GROUP, int ACT>
[[kernel]] void gate_up_decode(
    device const T* x [[buffer(0)]],
    device const uint8_t* weight [[buffer(1)]],
    device const uint8_t* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint32_t* indices [[buffer(4)]],
    device const float* bias [[buffer(5)]],
    device const float* global_scale [[buffer(6)]],
    device T* h [[buffer(7)]],
    constant FusedMoeArgs& args [[buffer(8)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint thread_in_tg [[thread_index_in_threadgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr bool kGated = activation_gated(ACT);
  constexpr int kRows = kGateUpDecodeRows;
  constexpr int kOut = kGated ? kRows / 2 : kRows;
  FM_STAGING_ARRAYS(kGateUpDecodeSimdgroups, kRows);
  const uint pair = tg_pos.y;
  const uint r0 = (tg_pos.x * kGateUpDecodeSimdgroups + simd_group) * kOut;
  device T* out = h + size_t(pair) * args.intermediate + r0;
  const uint expert = indices[pair];
  // The same for every thread of the threadgroup (one pair), so the
  // barriers below are reached by all or none.
  if (expert >= args.experts) {
    if (lane < uint(kOut)) {
      out[lane] = T(NAN);
    }
    return;
  }
  const size_t first_row =
      size_t(expert) * packed_rows<ACT>(args) + (kGated ? 2 : 1) * r0;
  device const uint8_t* rows = weight + first_row * args.row_bytes;
  const uint x_row = args.x_per_slot != 0u ? pair : pair / args.top_k;
  device const T* xt = x + size_t(x_row) * args.hidden;
  const float global_even = global_scale_of<MODE>(
      global_scale, args.has_global_scale, kGated ? 2 * expert : expert);
  const float global_odd = global_scale_of<MODE>(
      global_scale, args.has_global_scale, kGated ? 2 * expert + 1 : expert);

  float acc[kRows];
  for (int r = 0; r < kRows; ++r) {
    acc[r] = 0.0f;
  }
  for (uint c0 = 0; c0 < args.hidden; c0 += kCodesPerStep) {
    const StagedStep step = stage_step<T, MODE, BITS, GROUP>(
        rows, scales, biases, first_row, kRows, args.row_bytes,
        args.groups_per_row, args.hidden, c0, global_even, global_odd,
        staging, lane);
    const uint c = c0 + lane * kCodesPerLane;
    if (c < args.hidden) {
      float xs[kCodesPerLane];
      const float x_sum = load_lane_x<MODE, BITS>(xt + c, xs);
      for (int r = 0; r < kRows; ++r) {
        acc[r] += staged_row<MODE, BITS, GROUP>(staging, step, r, lane)
                      .dot(xs, x_sum);
      }
    }
  }
  const float result = gate_up_epilogue<ACT, kRows>(acc, bias, first_row, args, lane);
  if (lane < uint(kOut)) {
    out[lane] = T(result);
  }
}

// Prefill: `order` lists the pairs sorted by expert. Threadgroup (x, y) =
// (block of rows, kGateUpPrefillPairs consecutive entries of `order`). The
// entries of one expert form a segment, taken by the block it starts in;
// each step's codes are loaded once per kGateUpPrefillPairs pairs of it.
template <typename T, int MODE, int BITS, int GROUP, int ACT>
[[kernel]] void gate_up_prefill(
    device const T* x [[buffer(0)]],
    device const uint8_t* weight [[buffer(1)]],
    device const uint8_t* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint32_t* indices [[buffer(4)]],
    device const float* bias [[buffer(5)]],
    device const float* global_scale [[buffer(6)]],
    device const uint32_t* order [[buffer(7)]],
    device T* h [[buffer(8)]],
    constant FusedMoeArgs& args [[buffer(9)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint thread_in_tg [[thread_index_in_threadgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr bool kGated = activation_gated(ACT);
  constexpr int kRows = kGateUpPrefillRows;
  constexpr int kOut = kGated ? kRows / 2 : kRows;
  constexpr int kPairs = kGateUpPrefillPairs;
  FM_STAGING_ARRAYS(kGateUpPrefillSimdgroups, kRows);
  const uint r0 = (tg_pos.x * kGateUpPrefillSimdgroups + simd_group) * kOut;
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
        if (lane < uint(kOut)) {
          h[size_t(order[s + q]) * args.intermediate + r0 + lane] = T(NAN);
        }
      }
      s += n;
      continue;
    }
    const size_t first_row =
        size_t(expert) * packed_rows<ACT>(args) + (kGated ? 2 : 1) * r0;
    device const uint8_t* rows = weight + first_row * args.row_bytes;
    const float global_even = global_scale_of<MODE>(
        global_scale, args.has_global_scale, kGated ? 2 * expert : expert);
    const float global_odd = global_scale_of<MODE>(
        global_scale, args.has_global_scale, kGated ? 2 * expert + 1 : expert);

    float acc[kPairs][kRows];
    for (int q = 0; q < kPairs; ++q) {
      for (int r = 0; r < kRows; ++r) {
        acc[q][r] = 0.0f;
      }
    }
    for (uint c0 = 0; c0 < args.hidden; c0 += kCodesPerStep) {
      const StagedStep step = stage_step<T, MODE, BITS, GROUP>(
          rows, scales, biases, first_row, kRows, args.row_bytes,
          args.groups_per_row, args.hidden, c0, global_even, global_odd,
          staging, lane);
      const uint c = c0 + lane * kCodesPerLane;
      if (c < args.hidden) {
        LaneRow<MODE, BITS> row[kRows];
        for (int r = 0; r < kRows; ++r) {
          row[r] = staged_row<MODE, BITS, GROUP>(staging, step, r, lane);
        }
        for (int q = 0; q < kPairs; ++q) {
          if (uint(q) < n) {
            const uint p = order[s + q];
            const uint x_row = args.x_per_slot != 0u ? p : p / args.top_k;
            float xs[kCodesPerLane];
            const float x_sum = load_lane_x<MODE, BITS>(
                x + size_t(x_row) * args.hidden + c, xs);
            for (int r = 0; r < kRows; ++r) {
              acc[q][r] += row[r].dot(xs, x_sum);
            }
          }
        }
      }
    }
    for (int q = 0; q < kPairs; ++q) {
      if (uint(q) < n) {
        const float result =
            gate_up_epilogue<ACT, kRows>(acc[q], bias, first_row, args, lane);
        if (lane < uint(kOut)) {
          h[size_t(order[s + q]) * args.intermediate + r0 + lane] = T(result);
        }
      }
    }
    s += n;
  }
}

} // namespace fused_moe_kernels
