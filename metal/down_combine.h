// Kernel B, down_combine: y[t, d] = sum_j w[t, j] * (D_e[d] * h[t*k + j]) with
// e = indices[t*k + j], accumulated in fp32. Each SIMD group owns output rows
// and sums over the experts itself: no atomics and no [T, k, D] intermediate.
// A token with any expert id >= E gets a NaN output row, and that expert's
// weights are never read.
//
// Parameters are declared in slot order, then the position attributes (see
// gate_up_swiglu.h).
#pragma once

#include "args.h"
#include "quantized.h"

namespace fused_moe_kernels {

using fused_moe_args::FusedMoeArgs;

// Decode: threadgroup (x, y) = (block of kDownDecodeRows x
// kDownDecodeSimdgroups rows of y, token y). A lane keeps its share of
// sum_j w_j * (row * h_j) per row; one simd_sum per row at the end.
template <typename T, int BITS, int GROUP>
[[kernel]] void down_combine_decode(
    device const T* h [[buffer(0)]],
    device const uint8_t* weight [[buffer(1)]],
    device const T* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint32_t* indices [[buffer(4)]],
    device const float* router_weights [[buffer(5)]],
    device T* y [[buffer(6)]],
    constant FusedMoeArgs& args [[buffer(7)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint thread_in_tg [[thread_index_in_threadgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int kRows = kDownDecodeRows;
  FM_STAGING_ARRAYS(kDownDecodeSimdgroups, kRows);
  const uint token = tg_pos.y;
  const uint d0 = (tg_pos.x * kDownDecodeSimdgroups + simd_group) * kRows;

  float acc[kRows];
  for (int r = 0; r < kRows; ++r) {
    acc[r] = 0.0f;
  }
  bool bad_expert = false;
  // The experts are the token's (tg_pos.y): every thread of the threadgroup
  // skips the same ones, so the barriers below are reached by all.
  for (uint j = 0; j < args.top_k; ++j) {
    const uint pair = token * args.top_k + j;
    const uint expert = indices[pair];
    if (expert >= args.experts) {
      bad_expert = true;
      continue;
    }
    const size_t first_row = size_t(expert) * args.hidden + d0;
    device const uint8_t* rows = weight + first_row * args.row_bytes;
    device const T* hp = h + size_t(pair) * args.intermediate;
    float part[kRows];
    for (int r = 0; r < kRows; ++r) {
      part[r] = 0.0f;
    }
    for (uint c0 = 0; c0 < args.intermediate; c0 += kCodesPerStep) {
      const StagedStep step = stage_step<T, BITS, GROUP>(
          rows, scales, biases, first_row, kRows, args.row_bytes,
          args.groups_per_row, args.intermediate, c0, staging,
          lane);
      const uint c = c0 + lane * kCodesPerLane;
      if (c < args.intermediate) {
        float hs[kCodesPerLane];
        const float h_sum = load_prescaled<BITS>(hp + c, hs);
        for (int r = 0; r < kRows; ++r) {
          part[r] += staged_row<BITS, GROUP>(staging, step, r, lane)
                         .dot(hs, h_sum);
        }
      }
    }
    const float w = router_weights[pair];
    for (int r = 0; r < kRows; ++r) {
      acc[r] += w * part[r];
    }
  }
  float result = 0.0f;
  for (int r = 0; r < kRows; ++r) {
    const float total = simd_sum(acc[r]);
    if (lane == uint(r)) {
      result = total;
    }
  }
  if (lane < uint(kRows)) {
    y[size_t(token) * args.hidden + d0 + lane] =
        bad_expert ? T(NAN) : T(result);
  }
}

// Prefill: `order` lists the pairs sorted by (block of kDownPrefillTokens
// tokens, expert), so the pairs of threadgroup y's tokens are entries
// [y*kDownPrefillTokens*k, ...) of it, grouped by expert. Threadgroup (x, y) =
// (block of rows, block of tokens). Each step's codes are loaded once per
// kDownPrefillPairBatch pairs of one expert; the weighted sums collect in
// threadgroup memory and are written out once.
template <typename T, int BITS, int GROUP>
[[kernel]] void down_combine_prefill(
    device const T* h [[buffer(0)]],
    device const uint8_t* weight [[buffer(1)]],
    device const T* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint32_t* indices [[buffer(4)]],
    device const float* router_weights [[buffer(5)]],
    device const uint32_t* order [[buffer(6)]],
    device T* y [[buffer(7)]],
    constant FusedMoeArgs& args [[buffer(8)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint thread_in_tg [[thread_index_in_threadgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int kRows = kDownPrefillRows;
  constexpr int kTgRows = kDownPrefillRows * kDownPrefillSimdgroups;
  constexpr int kTokens = kDownPrefillTokens;
  constexpr int kBatch = kDownPrefillPairBatch;
  constexpr uint kThreads = kDownPrefillSimdgroups * kSimdWidth;
  FM_THREADGROUP_ARRAY(float, y_sum, kTokens * kTgRows);
  FM_THREADGROUP_ARRAY(uint, token_bad, kTokens);
  FM_STAGING_ARRAYS(kDownPrefillSimdgroups, kRows);

  const uint d_tg = tg_pos.x * kTgRows;
  const uint d0 = d_tg + simd_group * kRows;
  const uint t0 = tg_pos.y * kTokens;
  const uint t_end = metal::min(t0 + kTokens, args.tokens);
  for (uint i = thread_in_tg; i < uint(kTokens * kTgRows); i += kThreads) {
    y_sum[i] = 0.0f;
  }
  for (uint i = thread_in_tg; i < uint(kTokens); i += kThreads) {
    token_bad[i] = 0;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  uint s = t0 * args.top_k;
  const uint end = t_end * args.top_k;
  while (s < end) {
    const uint expert = indices[order[s]];
    uint n = 1;
    while (s + n < end && indices[order[s + n]] == expert) {
      ++n;
    }
    if (expert >= args.experts) {
      if (simd_group == 0 && lane == 0) {
        for (uint q = 0; q < n; ++q) {
          token_bad[order[s + q] / args.top_k - t0] = 1;
        }
      }
      s += n;
      continue;
    }
    const size_t first_row = size_t(expert) * args.hidden + d0;
    device const uint8_t* rows = weight + first_row * args.row_bytes;
    for (uint b = 0; b < n; b += kBatch) {
      const uint nb = metal::min(uint(kBatch), n - b);
      float part[kBatch][kRows];
      for (int q = 0; q < kBatch; ++q) {
        for (int r = 0; r < kRows; ++r) {
          part[q][r] = 0.0f;
        }
      }
      for (uint c0 = 0; c0 < args.intermediate; c0 += kCodesPerStep) {
        const StagedStep step = stage_step<T, BITS, GROUP>(
            rows, scales, biases, first_row, kRows, args.row_bytes,
            args.groups_per_row, args.intermediate, c0, staging,
            lane);
        const uint c = c0 + lane * kCodesPerLane;
        if (c < args.intermediate) {
          LaneRow<BITS> row[kRows];
          for (int r = 0; r < kRows; ++r) {
            row[r] = staged_row<BITS, GROUP>(staging, step, r, lane);
          }
          for (int q = 0; q < kBatch; ++q) {
            if (uint(q) < nb) {
              device const T* hp = h + size_t(order[s + b + q]) * args.intermediate;
              float hs[kCodesPerLane];
              const float h_sum = load_prescaled<BITS>(hp + c, hs);
              for (int r = 0; r < kRows; ++r) {
                part[q][r] += row[r].dot(hs, h_sum);
              }
            }
          }
        }
      }
      for (int q = 0; q < kBatch; ++q) {
        if (uint(q) < nb) {
          const uint pair = order[s + b + q];
          const float w = router_weights[pair];
          const uint slot = (pair / args.top_k - t0) * kTgRows +
              simd_group * kRows;
          for (int r = 0; r < kRows; ++r) {
            const float total = simd_sum(part[q][r]);
            // Lane r owns row r's sum: no two threads write one element.
            if (lane == uint(r)) {
              y_sum[slot + r] += w * total;
            }
          }
        }
      }
    }
    s += n;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const uint count = (t_end - t0) * kTgRows;
  for (uint i = thread_in_tg; i < count; i += kThreads) {
    const uint t_local = i / kTgRows;
    y[size_t(t0 + t_local) * args.hidden + d_tg + i % kTgRows] =
        token_bad[t_local] ? T(NAN) : T(y_sum[i]);
  }
}

} // namespace fused_moe_kernels
