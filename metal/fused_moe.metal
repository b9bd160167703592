// The fused MoE Metal kernels, instantiated over the allow-lists of
// allow_list.h and nothing else. Kernel bodies: gate_up.h, down.h and
// route.h; the quantizations: quantized.h; the activations: activations.h;
// tile shapes: tile_shapes.h.
//
// The build embeds this file, with the headers below inlined, in the
// extension (csrc/metal/embed_source.py). At run time the host compiles one
// kernel at a time: everything outside the marked block, plus the one line
// of the block that instantiates that kernel (csrc/metal/metal_source.cpp
// spells the line from allow_list.h). So the block holds only the allow-list
// expansions, one instantiation per kernel.
#include <metal_stdlib>

using namespace metal;

#include "msl_conventions.h"
#include "allow_list.h"
#include "gate_up.h"
#include "down.h"
#include "route.h"

#define FM_INSTANTIATE_GATE_UP(activation_name, activation, gated, variant, dtype_name, \
                               metal_type, quant_name, mode, bits, group_size)          \
  FM_INSTANTIATE_KERNEL(                                                                 \
      FM_GATE_UP_KERNEL_NAME(activation_name, variant, dtype_name, quant_name),          \
      fused_moe_kernels::gate_up_##variant<metal_type, mode, bits, group_size, activation>)

#define FM_INSTANTIATE_DOWN(variant, dtype_name, metal_type, quant_name, mode, bits, group_size) \
  FM_INSTANTIATE_KERNEL(                                                                         \
      FM_DOWN_KERNEL_NAME(variant, dtype_name, quant_name),                                      \
      fused_moe_kernels::down_##variant<metal_type, mode, bits, group_size>)

#define FM_INSTANTIATE_ROUTE(dtype_name, metal_type, gate_name, family, gate_arg) \
  FM_INSTANTIATE_KERNEL(                                                          \
      FM_ROUTE_KERNEL_NAME(dtype_name, gate_name),                                \
      fused_moe_kernels::route_##family##_gate<metal_type, gate_arg>)

// fused_moe:instantiations-begin
FM_FOR_EACH_GATE_UP_KERNEL(FM_INSTANTIATE_GATE_UP)
FM_FOR_EACH_DOWN_KERNEL(FM_INSTANTIATE_DOWN)
FM_FOR_EACH_ROUTE_KERNEL(FM_INSTANTIATE_ROUTE)
// fused_moe:instantiations-end
