// The fused MoE Metal kernels, instantiated over the allow-list of
// kernel_grid.h and nothing else. Kernel bodies: gate_up_swiglu.h and
// down_combine.h; tile shapes: tile_shapes.h.
#include <metal_stdlib>

using namespace metal;

#include "msl_conventions.h"
#include "kernel_grid.h"
#include "gate_up_swiglu.h"
#include "down_combine.h"

#define FM_INSTANTIATE(op, variant, dtype_name, metal_type, bits, group_size) \
  FM_INSTANTIATE_KERNEL(                                                      \
      FM_KERNEL_NAME(op, variant, dtype_name, bits, group_size),              \
      fused_moe_kernels::op##_##variant<metal_type, bits, group_size>)

FM_FOR_EACH_KERNEL(FM_INSTANTIATE)
