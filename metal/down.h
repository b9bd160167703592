// The down kernels: o[t, j, d] = D_e[d] * h[t*k + j] + b[e, d] with
// e = indices[t*k + j], accumulated in fp32, then either combined,
// y[t, d] = sum_j w[t, j] * o[t, j, d] (args.combine: no atomics and no
// [T, k, D] intermediate, each SIMD group sums over the experts itself), or
// written per slot, y[t*k + j, d] = o[t, j, d] (mlx-lm's SwitchGLU contract).
// An expert id >= E makes NaN the rows that depend on it (with the combine,
// the token's y row; per slot, that pair's) and its weights are never read.
//
// Template arguments: T the activations' dtype; MODE, BITS, GROUP the
// projection's quantization (quantized.h). Run-time settings come in
// FusedMoeArgs (see gate_up.h). Parameters are declared in slot order, then
// the position attributes.
#pragma once

#include "args.h"
#include "quantized.h"

namespace fused_moe_kernels {

using fused_moe_args::FusedMoeArgs;

// Decode: threadgroup (x, y) = (block of kDownDecodeRows x
// kDownDecodeSimdgroups rows of y, token y). With the combine a lane keeps
// its share of sum_j w_j * (row * h_j) per row, one simd_sum per row at the
// end, and lane r the weighted expert biases of row r; per slot each pair's
// rows are summed and written as the loop reaches it.
template <typename T, int MODE, int BITS, int GROUP>
[[kernel]] void down_decode(
    device const T* h [[buffer(0)]],
    device const uint8_t* weight [[buffer(1)]],
    device const uint8_t* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint32_t* indices [[buffer(4)]],
    device const float* router_weights [[buffer(5)]],
    device const float* bias [[buffer(6)]],
    device const float* global_scale [[buffer(7)]],
    device T* y [[buffer(8)]],
    constant FusedMoeArgs& args [[buffer(9)]],
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
  float bias_acc = 0.0f; // lane r < kRows: sum_j w_j * b[e_j, d0 + r]
  bool bad_expert = false;
  // The experts are the token's (tg_pos.y) and args.combine is the call's:
  // every thread of the threadgroup takes the same branches, so the barriers
  // and simd_sums below are reached by all.
  for (uint j = 0; j < args.top_k; ++j) {
    const uint pair = token * args.top_k + j;
    const uint expert = indices[pair];
    if (expert >= args.experts) {
      bad_expert = true;
      if (args.combine == 0u && lane < uint(kRows)) {
        y[size_t(pair) * args.hidden + d0 + lane] = T(NAN);
      }
      continue;
    }
    const size_t first_row = size_t(expert) * args.hidden + d0;
    device const uint8_t* rows = weight + first_row * args.row_bytes;
    device const T* hp = h + size_t(pair) * args.intermediate;
    const float global = global_scale_of<MODE>(global_scale, args.has_global_scale, expert);
    float part[kRows];
    for (int r = 0; r < kRows; ++r) {
      part[r] = 0.0f;
    }
    for (uint c0 = 0; c0 < args.intermediate; c0 += kCodesPerStep) {
      const StagedStep step = stage_step<T, MODE, BITS, GROUP>(
          rows, scales, biases, first_row, kRows, args.row_bytes,
          args.groups_per_row, args.intermediate, c0, global, global, staging,
          lane);
      const uint c = c0 + lane * kCodesPerLane;
      if (c < args.intermediate) {
        float hs[kCodesPerLane];
        const float h_sum = load_lane_x<MODE, BITS>(hp + c, hs);
        for (int r = 0; r < kRows; ++r) {
          part[r] += staged_row<MODE, BITS, GROUP>(staging, step, r, lane)
                         .dot(hs, h_sum);
        }
      }
    }
    const float b = args.has_bias != 0u && lane < uint(kRows)
        ? bias[first_row + lane]
        : 0.0f;
    if (args.combine != 0u) {
      const float w = router_weights[pair];
      for (int r = 0; r < kRows; ++r) {
        acc[r] += w * part[r];
      }
      if (args.has_bias != 0u) {
        bias_acc += w * b;
      }
    } else {
      float result = 0.0f;
      for (int r = 0; r < kRows; ++r) {
        const float total = simd_sum(part[r]);
        if (lane == uint(r)) {
          result = total;
        }
      }
      if (lane < uint(kRows)) {
        y[size_t(pair) * args.hidden + d0 + lane] = T(result + b);
      }
    }
  }
  if (args.combine != 0u) {
    float result = 0.0f;
    for (int r = 0; r < kRows; ++r) {
      const float total = simd_sum(acc[r]);
      if (lane == uint(r)) {
        result = total;
      }
    }
    if (lane < uint(kRows)) {
      y[size_t(token) * args.hidden + d0 + lane] =
          bad_expert ? T(NAN) : T(result + bias_acc);
    }
  }
}

// Prefill: `order` lists the pairs sorted by (block of kDownPrefillTokens
// tokens, expert), so the pairs of threadgroup y's tokens are entries
// [y*kDownPrefillTokens*k, ...) of it, grouped by expert. Threadgroup (x, y) =
// (block of rows, block of tokens). Each step's codes are loaded once per
// kDownPrefillPairBatch pairs of one expert; with the combine the weighted
// sums collect in threadgroup memory and are written out once, per slot each
// pair's rows are written when done.
template <typename T, int MODE, int BITS, int GROUP>
[[kernel]] void down_prefill(
    device const T* h [[buffer(0)]],
    device const uint8_t* weight [[buffer(1)]],
    device const uint8_t* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const uint32_t* indices [[buffer(4)]],
    device const float* router_weights [[buffer(5)]],
    device const float* bias [[buffer(6)]],
    device const float* global_scale [[buffer(7)]],
    device const uint32_t* order [[buffer(8)]],
    device T* y [[buffer(9)]],
    constant FusedMoeArgs& args [[buffer(10)]],
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
      if (args.combine != 0u) {
        if (simd_group == 0 && lane == 0) {
          for (uint q = 0; q < n; ++q) {
            token_bad[order[s + q] / args.top_k - t0] = 1;
          }
        }
      } else if (lane < uint(kRows)) {
        for (uint q = 0; q < n; ++q) {
          y[size_t(order[s + q]) * args.hidden + d0 + lane] = T(NAN);
        }
      }
      s += n;
      continue;
    }
    const size_t first_row = size_t(expert) * args.hidden + d0;
    device const uint8_t* rows = weight + first_row * args.row_bytes;
    const float global = global_scale_of<MODE>(global_scale, args.has_global_scale, expert);
    const float b = args.has_bias != 0u && lane < uint(kRows) ? bias[first_row + lane] : 0.0f;
    for (uint bq = 0; bq < n; bq += kBatch) {
      const uint nb = metal::min(uint(kBatch), n - bq);
      float part[kBatch][kRows];
      for (int q = 0; q < kBatch; ++q) {
        for (int r = 0; r < kRows; ++r) {
          part[q][r] = 0.0f;
        }
      }
      for (uint c0 = 0; c0 < args.intermediate; c0 += kCodesPerStep) {
        const StagedStep step = stage_step<T, MODE, BITS, GROUP>(
            rows, scales, biases, first_row, kRows, args.row_bytes,
            args.groups_per_row, args.intermediate, c0, global, global,
            staging, lane);
        const uint c = c0 + lane * kCodesPerLane;
        if (c < args.intermediate) {
          LaneRow<MODE, BITS> row[kRows];
          for (int r = 0; r < kRows; ++r) {
            row[r] = staged_row<MODE, BITS, GROUP>(staging, step, r, lane);
          }
          for (int q = 0; q < kBatch; ++q) {
            if (uint(q) < nb) {
              device const T* hp = h + size_t(order[s + bq + q]) * args.intermediate;
              float hs[kCodesPerLane];
              const float h_sum = load_lane_x<MODE, BITS>(hp + c, hs);
              for (int r = 0; r < kRows; ++r) {
                part[q][r] += row[r].dot(hs, h_sum);
              }
            }
          }
        }
      }
      for (int q = 0; q < kBatch; ++q) {
        if (uint(q) < nb) {
          const uint pair = order[s + bq + q];
          float result = 0.0f;
          for (int r = 0; r < kRows; ++r) {
            const float total = simd_sum(part[q][r]);
            if (lane == uint(r)) {
              result = total;
            }
          }
          // Lane r owns row r: no two threads write one element.
          if (lane < uint(kRows)) {
            if (args.combine != 0u) {
              y_sum[(pair / args.top_k - t0) * kTgRows + simd_group * kRows + lane] +=
                  router_weights[pair] * (result + b);
            } else {
              y[size_t(pair) * args.hidden + d0 + lane] = T(result + b);
            }
          }
        }
      }
    }
    s += n;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  if (args.combine != 0u) {
    const uint count = (t_end - t0) * kTgRows;
    for (uint i = thread_in_tg; i < count; i += kThreads) {
      const uint t_local = i / kTgRows;
      y[size_t(t0 + t_local) * args.hidden + d_tg + i % kTgRows] =
          token_bad[t_local] ? T(NAN) : T(y_sum[i]);
    }
  }
}

} // namespace fused_moe_kernels
