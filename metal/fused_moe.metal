// The fused MoE Metal kernels, instantiated over the allow-lists of
// kernel_grid.h and nothing else. Kernel bodies: gate_up_swiglu.h,
// down_combine.h and route.h; tile shapes: tile_shapes.h.
#include <metal_stdlib>

using namespace metal;

#include "msl_conventions.h"
#include "kernel_grid.h"
#include "gate_up_swiglu.h"
#include "down_combine.h"
#include "route.h"

#define FM_INSTANTIATE(op, variant, dtype_name, metal_type, bits, group_size) \
  FM_INSTANTIATE_KERNEL(                                                      \
      FM_KERNEL_NAME(op, variant, dtype_name, bits, group_size),              \
      fused_moe_kernels::op##_##variant<metal_type, bits, group_size>)

FM_FOR_EACH_KERNEL(FM_INSTANTIATE)

#define FM_INSTANTIATE_ROUTE(dtype_name, metal_type, gate_name, family, gate_arg) \
  FM_INSTANTIATE_KERNEL(                                                          \
      FM_ROUTE_KERNEL_NAME(dtype_name, gate_name),                                \
      fused_moe_kernels::route_##family##_gate<metal_type, gate_arg>)

FM_FOR_EACH_ROUTE_KERNEL(FM_INSTANTIATE_ROUTE)
