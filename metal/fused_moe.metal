// The fused MoE Metal kernels, instantiated over the allow-lists of
// allow_list.h and nothing else. Kernel bodies: gate_up_swiglu.h,
// down_combine.h and route.h; tile shapes: tile_shapes.h.
//
// The build embeds this file, with the headers below inlined, in the
// extension (csrc/metal/embed_source.py). At run time the host compiles one
// kernel at a time: everything outside the marked block, plus the one line
// of the block that instantiates that kernel (csrc/metal/metal_source.cpp
// spells the line from allow_list.h). So the block holds only the two
// allow-list expansions, one instantiation per kernel.
#include <metal_stdlib>

using namespace metal;

#include "msl_conventions.h"
#include "allow_list.h"
#include "gate_up_swiglu.h"
#include "down_combine.h"
#include "route.h"

#define FM_INSTANTIATE(op, variant, dtype_name, metal_type, bits, group_size) \
  FM_INSTANTIATE_KERNEL(                                                      \
      FM_KERNEL_NAME(op, variant, dtype_name, bits, group_size),              \
      fused_moe_kernels::op##_##variant<metal_type, bits, group_size>)

#define FM_INSTANTIATE_ROUTE(dtype_name, metal_type, gate_name, family, gate_arg) \
  FM_INSTANTIATE_KERNEL(                                                          \
      FM_ROUTE_KERNEL_NAME(dtype_name, gate_name),                                \
      fused_moe_kernels::route_##family##_gate<metal_type, gate_arg>)

// fused_moe:instantiations-begin
FM_FOR_EACH_KERNEL(FM_INSTANTIATE)
FM_FOR_EACH_ROUTE_KERNEL(FM_INSTANTIATE_ROUTE)
// fused_moe:instantiations-end
