// Argument structs of the Metal kernels, shared by the kernels and the host
// launch plan (csrc/metal/launch_plan.cpp), which fills them field by field
// and binds each with one set_bytes. Plain 32-bit fields only, so the layout
// is the same for the Metal compiler and the host C++ compiler.
#pragma once

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
#else
#include <cstdint>
#endif

namespace fused_moe_args {

// The argument struct of the expert kernels. gate_up reads rows of D inputs
// and writes h [T*k, H]; down reads rows of H inputs and writes y [T, D]
// (combine) or [T*k, D] (per slot). Buffer slots:
// csrc/metal/launch_plan.cpp. The settings a kernel is not instantiated per
// (docs/kernel_contract.md) are run-time fields here: the optional inputs,
// x per slot, the combine and the activation's float parameters.
struct FusedMoeArgs {
  uint32_t tokens; // T
  uint32_t top_k; // k
  uint32_t hidden; // D
  uint32_t intermediate; // H
  uint32_t experts; // E: an index >= E marks the rows it feeds NaN
  uint32_t row_bytes; // bytes of one packed row: inputs*bits/8
  uint32_t groups_per_row; // inputs/group_size
  uint32_t pairs; // T*k
  uint32_t has_bias; // 1: an expert bias [E, rows] (float32) is bound
  uint32_t has_global_scale; // 1: nvfp4's per-expert scales (float32) are bound
  uint32_t x_per_slot; // gate_up, 1: x is [T*k, D], one row per pair
  uint32_t combine; // down, 1: y[t] = sum_j w_j * o_j; 0: y[t, j] = o_j
  float limit; // the activation's parameters (0 where it takes none;
  float alpha; // linear_beta 0: situ passes u through)
  float beta;
  float linear_beta;
};

static_assert(sizeof(FusedMoeArgs) == 64, "FusedMoeArgs layout");

// The argument struct of the router kernels (route.h), which read x [T, D]
// and gate rows [E, D] (float, or 8-bit codes with scales and biases
// [E, groups_per_row]) and write indices and weights [T, k].
struct RouteArgs {
  uint32_t tokens; // T
  uint32_t top_k; // k, at most kMaxTopK
  uint32_t hidden; // D
  uint32_t experts; // E, at most kRouteMaxExperts
  uint32_t groups_per_row; // D/group_size for a quantized gate, else 0
};

static_assert(sizeof(RouteArgs) == 20, "RouteArgs layout");

} // namespace fused_moe_args
