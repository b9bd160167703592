#include "cpu/probe.h"

#include <atomic>
#include <chrono>

#include "cpu/isa.h"
#include "cpu/thread_pool.h"

namespace fused_moe::cpu {

double timed_read(const void* data, int64_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  const auto& kernels = active_kernels();
  // Several chunks per thread, so a slow thread does not hold the rest.
  const int tasks = 8 * num_threads();
  const int64_t chunk = (bytes / tasks) & ~int64_t{63};
  std::atomic<uint64_t> checksum{0};
  const auto start = std::chrono::steady_clock::now();
  parallel_for(tasks, [&](int i) {
    const int64_t begin = i * chunk;
    const int64_t end = i == tasks - 1 ? (bytes & ~int64_t{63}) : begin + chunk;
    checksum += kernels.read_sum(p + begin, end - begin);
  });
  const auto stop = std::chrono::steady_clock::now();
  // The sum is observed, so the reads cannot be optimised away.
  static volatile uint64_t sink;
  sink = checksum.load();
  return std::chrono::duration<double>(stop - start).count();
}

} // namespace fused_moe::cpu
