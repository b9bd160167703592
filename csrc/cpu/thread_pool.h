// A small fixed pool of worker threads for the CPU kernels.
//
// MLX's own CPU stream runs one task at a time on one thread; the kernels
// split their work across this pool instead. The calling thread takes part,
// so set_num_threads(1) runs everything inline.
#pragma once

#include <functional>

namespace fused_moe::cpu {

// Threads used by the next parallel_for: FUSED_MOE_NUM_THREADS if set,
// otherwise the number of hardware threads.
int num_threads();
// n >= 1. Takes effect at the next parallel_for.
void set_num_threads(int n);

// Calls fn(i) for every i in [0, n), spread over the pool; returns when all
// calls are done. The first exception thrown by fn is rethrown here.
void parallel_for(int n, const std::function<void(int)>& fn);

} // namespace fused_moe::cpu
