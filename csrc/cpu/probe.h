// Memory-bandwidth probe for the benchmark: how fast this machine streams
// bytes from memory into the cores, on the kernels' own threads.
#pragma once

#include <cstdint>

namespace fused_moe::cpu {

// Reads [data, data + bytes) once, split over the thread pool like the
// kernels' work; returns the wall time in seconds.
double timed_read(const void* data, int64_t bytes);

} // namespace fused_moe::cpu
