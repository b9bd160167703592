// Probe kernels of the traffic build (trace_hooks.cpp, traffic.py): one
// SIMD group per threadgroup copies one uint32 per lane from `src`, lane l
// reading element (threadgroup · 32 + l) · stride. stride 1 is a coalesced
// read (128 bytes in 4 full sectors); stride 8 puts every lane in a sector of
// its own, 4 of its 32 bytes used. tests/test_metal_traffic.py checks that the
// tracer tells them apart, so that its counts can fail.
#include <metal_stdlib>

using namespace metal;

#include "metal/msl_conventions.h"

namespace fused_moe_trace_probes {

[[kernel]] void strided_copy(
    device const uint32_t* src [[buffer(0)]],
    device uint32_t* dst [[buffer(1)]],
    constant uint32_t& stride [[buffer(2)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint thread_in_tg [[thread_index_in_threadgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint i = tg_pos.x * 32 + lane;
  dst[i] = src[size_t(i) * stride];
}

} // namespace fused_moe_trace_probes

FM_INSTANTIATE_KERNEL("trace_probe_strided_copy", fused_moe_trace_probes::strided_copy)
