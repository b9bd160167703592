#include "cpu/host.h"

#include <algorithm>

#include "cpu/thread_pool.h"

namespace fused_moe::cpu {

FloatType float_type(mx::Dtype t) {
  if (t == mx::float32) {
    return FloatType::f32;
  }
  if (t == mx::float16) {
    return FloatType::f16;
  }
  return FloatType::bf16;
}

std::vector<float> to_fp32(const mx::array& a) {
  const int64_t n = a.size();
  std::vector<float> out(n);
  constexpr int64_t kBlock = 1 << 16;
  const int blocks = static_cast<int>((n + kBlock - 1) / kBlock);
  parallel_for(blocks, [&](int b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    if (a.dtype() == mx::float32) {
      std::copy(a.data<float>() + lo, a.data<float>() + hi, out.data() + lo);
    } else if (a.dtype() == mx::float16) {
      const auto* p = a.data<mx::float16_t>();
      for (int64_t i = lo; i < hi; ++i) out[i] = static_cast<float>(p[i]);
    } else {
      const auto* p = a.data<mx::bfloat16_t>();
      for (int64_t i = lo; i < hi; ++i) out[i] = static_cast<float>(p[i]);
    }
  });
  return out;
}

} // namespace fused_moe::cpu
