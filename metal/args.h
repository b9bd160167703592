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

// Kernel A. Buffers: x [T, D], gate_up weight [E, 2H, D·bits/8 bytes],
// scales and biases [E, 2H, D/group], indices [T·k], (prefill) order [T·k],
// h [T·k, H].
struct GateUpSwigluArgs {
  uint32_t tokens; // T
  uint32_t top_k; // k
  uint32_t hidden; // D: inputs per weight row
  uint32_t intermediate; // H: output rows per gate (and per up) projection
  uint32_t experts; // E: an index >= E marks its output NaN
  uint32_t row_bytes; // D·bits/8: bytes of one packed row
  uint32_t groups_per_row; // D/group_size
  uint32_t pairs; // T·k
};

// Kernel B. Buffers: h [T·k, H], down weight [E, D, H·bits/8 bytes],
// scales and biases [E, D, H/group], indices [T·k], router weights [T·k]
// float32, (prefill) order [T·k], y [T, D].
struct DownCombineArgs {
  uint32_t tokens; // T
  uint32_t top_k; // k
  uint32_t hidden; // D: output rows
  uint32_t intermediate; // H: inputs per weight row
  uint32_t experts; // E: an index >= E makes its token's row NaN
  uint32_t row_bytes; // H·bits/8
  uint32_t groups_per_row; // H/group_size
  uint32_t pairs; // T·k
};

static_assert(sizeof(GateUpSwigluArgs) == 32, "GateUpSwigluArgs layout");
static_assert(sizeof(DownCombineArgs) == 32, "DownCombineArgs layout");

} // namespace fused_moe_args
