// The router, route: logits = x*W^T in fp32, scores = sigmoid(logits), the k
// experts of highest score + bias (best first), weights = their scores /
// (sum + 1e-20). Same semantics and tie rules as the CPU (csrc/cpu/route.cpp):
// equal biased scores go to the lower expert index, a NaN biased score ranks
// below every number.
//
// One threadgroup per token (threadgroup x = token). Its kRouteSimdgroups
// SIMD groups share the E gate rows, kRouteRowsPerSimdgroup at a time; each
// lane keeps fp32 partial dots of its share of D, one simd_sum per row. The
// logits go to threadgroup memory, then each thread ranks its experts
// against all E (see route_select). No atomics, no host sync.
//
// Parameters are declared in slot order, then the position attributes (see
// gate_up.h). Bias, and a quantized gate's scales and biases, arrive
// as float32: the op function widens them on the GPU stream (exact).
#pragma once

#include "args.h"
#include "tile_shapes.h"

namespace fused_moe_kernels {

using fused_moe_args::RouteArgs;
using namespace fused_moe_tiles;

FM_TILE_CONSTANT uint kRouteThreads = kRouteSimdgroups * kSimdWidth;

// True when biased score a ranks above b: higher first, NaN below every
// number (the CPU's outranks).
inline bool route_outranks(float a, float b) {
  return metal::isnan(b) ? !metal::isnan(a) : a > b;
}

// The SIMD group's logits of rows [e0, e0 + kRouteRowsPerSimdgroup) from the
// lanes' partial dots; rows >= E are summed (uniformly) but not stored.
inline void route_store_logits(thread const float* acc, uint e0, uint experts,
                               uint lane, threadgroup float* logits) {
  for (int r = 0; r < kRouteRowsPerSimdgroup; ++r) {
    const float total = simd_sum(acc[r]);
    if (lane == uint(r) && e0 + r < experts) {
      logits[e0 + r] = total;
    }
  }
}

// From the token's logits to its indices and weights. Expert e goes to slot
// rank(e), the number of experts ranked above it (a better biased score, or
// an equal one, or both NaN, at a lower index): ranks are a permutation of
// [0, E), so each of the k slots is written exactly once, by one thread, with
// no atomics, no reduction tree and no order left to chance. Each thread
// stops counting once its expert is out of the top k.
inline void route_select(threadgroup float* logits, device const float* bias,
                         device uint32_t* indices, device float* weights,
                         constant RouteArgs& args, uint token, uint thread_in_tg,
                         threadgroup float* biased, threadgroup float* by_rank) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint e = thread_in_tg; e < args.experts; e += kRouteThreads) {
    // The precise exp: the fast one is off by more than the CPU's std::exp.
    const float score = 1.0f / (1.0f + metal::precise::exp(-logits[e]));
    logits[e] = score;
    biased[e] = score + bias[e];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint k = args.top_k;
  for (uint e = thread_in_tg; e < args.experts; e += kRouteThreads) {
    const float be = biased[e];
    uint rank = 0;
    for (uint f = 0; f < args.experts && rank < k; ++f) {
      const float bf = biased[f];
      if (route_outranks(bf, be) || (f < e && !route_outranks(be, bf))) {
        ++rank;
      }
    }
    if (rank < k) {
      indices[size_t(token) * k + rank] = e;
      by_rank[rank] = logits[e];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint j = thread_in_tg; j < k; j += kRouteThreads) {
    // Best first, as the CPU sums, so the weights match it bit for bit when
    // the scores do.
    float sum = 0.0f;
    for (uint i = 0; i < k; ++i) {
      sum += by_rank[i];
    }
    weights[size_t(token) * k + j] = by_rank[j] / (sum + 1e-20f);
  }
}

// An unquantized gate [E, D] of element type W; any D >= 1. Lane l reads
// elements l, l + 32, ... of x and of each row.
template <typename T, typename W>
[[kernel]] void route_float_gate(
    device const T* x [[buffer(0)]],
    device const W* gate [[buffer(1)]],
    device const float* bias [[buffer(2)]],
    device uint32_t* indices [[buffer(3)]],
    device float* weights [[buffer(4)]],
    constant RouteArgs& args [[buffer(5)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint thread_in_tg [[thread_index_in_threadgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int kRows = kRouteRowsPerSimdgroup;
  FM_THREADGROUP_ARRAY(float, logits, kRouteMaxExperts);
  FM_THREADGROUP_ARRAY(float, biased, kRouteMaxExperts);
  FM_THREADGROUP_ARRAY(float, by_rank, kRouteMaxExperts);
  const uint token = tg_pos.x;
  device const T* xt = x + size_t(token) * args.hidden;
  for (uint e0 = simd_group * kRows; e0 < args.experts;
       e0 += kRouteSimdgroups * kRows) {
    float acc[kRows];
    for (int r = 0; r < kRows; ++r) {
      acc[r] = 0.0f;
    }
    for (uint c = lane; c < args.hidden; c += kSimdWidth) {
      const float xv = float(xt[c]);
      for (int r = 0; r < kRows; ++r) {
        if (e0 + r < args.experts) {
          acc[r] += xv * float(gate[size_t(e0 + r) * args.hidden + c]);
        }
      }
    }
    route_store_logits(acc, e0, args.experts, lane, logits);
  }
  route_select(logits, bias, indices, weights, args, token, thread_in_tg,
               biased, by_rank);
}

// An 8-bit affine gate: codes [E, D/4] uint32 (code i of a word in bits
// 8i..8i+7), w = scale*q + bias per GROUP codes. D is a multiple of GROUP
// (>= 32), so lane l reads whole words l, l + 32, ...: 4 codes, all of one
// group, and applies scale*sum q*x + bias*sum x per word.
template <typename T, int GROUP>
[[kernel]] void route_quantized_gate(
    device const T* x [[buffer(0)]],
    device const uint32_t* gate [[buffer(1)]],
    device const float* bias [[buffer(2)]],
    device const float* scales [[buffer(3)]],
    device const float* biases [[buffer(4)]],
    device uint32_t* indices [[buffer(5)]],
    device float* weights [[buffer(6)]],
    constant RouteArgs& args [[buffer(7)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint thread_in_tg [[thread_index_in_threadgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int kRows = kRouteRowsPerSimdgroup;
  constexpr uint kCodesPerWord = 4;
  static_assert(GROUP % kCodesPerWord == 0, "a word's codes share a group");
  FM_THREADGROUP_ARRAY(float, logits, kRouteMaxExperts);
  FM_THREADGROUP_ARRAY(float, biased, kRouteMaxExperts);
  FM_THREADGROUP_ARRAY(float, by_rank, kRouteMaxExperts);
  const uint token = tg_pos.x;
  const uint words = args.hidden / kCodesPerWord;
  device const T* xt = x + size_t(token) * args.hidden;
  for (uint e0 = simd_group * kRows; e0 < args.experts;
       e0 += kRouteSimdgroups * kRows) {
    float acc[kRows];
    for (int r = 0; r < kRows; ++r) {
      acc[r] = 0.0f;
    }
    for (uint w = lane; w < words; w += kSimdWidth) {
      float xv[kCodesPerWord];
      float x_sum = 0.0f;
      for (uint i = 0; i < kCodesPerWord; ++i) {
        xv[i] = float(xt[w * kCodesPerWord + i]);
        x_sum += xv[i];
      }
      const uint group = w * kCodesPerWord / GROUP;
      for (int r = 0; r < kRows; ++r) {
        if (e0 + r < args.experts) {
          const size_t row = e0 + r;
          const uint32_t q = gate[row * words + w];
          float dot = 0.0f;
          for (uint i = 0; i < kCodesPerWord; ++i) {
            dot += float((q >> (8 * i)) & 0xffu) * xv[i];
          }
          const size_t g = row * args.groups_per_row + group;
          acc[r] += scales[g] * dot + biases[g] * x_sum;
        }
      }
    }
    route_store_logits(acc, e0, args.experts, lane, logits);
  }
  route_select(logits, bias, indices, weights, args, token, thread_in_tg,
               biased, by_rank);
}

} // namespace fused_moe_kernels
