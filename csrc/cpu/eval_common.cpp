#include "cpu/eval_common.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "cpu/thread_pool.h"
#include "ops/common.h"

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

namespace {

// Activation rows below which quantizing them stays on the calling thread.
constexpr int64_t kParallelActRows = 64;

// fn(r) for every activation row: a row takes about a microsecond, so
// waking the pool for a few rows would cost more than it saves.
template <typename Fn>
void for_each_act_row(int64_t rows, Fn fn) {
  if (rows < kParallelActRows) {
    for (int64_t r = 0; r < rows; ++r) fn(r);
  } else {
    parallel_for(static_cast<int>(rows), [&](int r) { fn(r); });
  }
}

} // namespace

QuantMatrix quant_matrix(
    const mx::array& w,
    const mx::array& s,
    const mx::array& b,
    int cols,
    int bits,
    int group_size) {
  return {
      w.data<uint8_t>(), s.data<void>(), b.data<void>(),
      float_type(s.dtype()), static_cast<int>(w.shape(w.ndim() - 2)), cols, bits,
      group_size};
}

QuantMatrix quant_matrix(
    const mx::array& w,
    const mx::array& s,
    const mx::array* b,
    int cols,
    QuantMode mode,
    int bits,
    int group_size,
    const mx::array* global_scale,
    int global_scale_period) {
  QuantMatrix m = {
      w.data<uint8_t>(), s.data<void>(), b ? b->data<void>() : nullptr,
      mode == QuantMode::affine ? float_type(s.dtype()) : FloatType::f32,
      static_cast<int>(w.shape(w.ndim() - 2)), cols, bits, group_size};
  m.mode = mode;
  m.global_scale = global_scale ? global_scale->data<float>() : nullptr;
  m.global_scale_period = global_scale_period;
  return m;
}

Grouping::Grouping(const char* op, const mx::array& indices, int num_experts) {
  const int64_t n = indices.size();
  const int k = indices.shape(1);
  std::vector<int64_t> ids(n);
  if (indices.dtype() == mx::uint32) {
    const uint32_t* p = indices.data<uint32_t>();
    for (int64_t i = 0; i < n; ++i) ids[i] = p[i];
  } else {
    const int32_t* p = indices.data<int32_t>();
    for (int64_t i = 0; i < n; ++i) ids[i] = p[i];
  }
  std::vector<int32_t> count(num_experts, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= num_experts) {
      throw std::out_of_range(expert_id_error(op, i, k, ids[i], num_experts));
    }
    ++count[ids[i]];
  }
  std::vector<int32_t> start(num_experts, 0);
  offsets.push_back(0);
  for (int e = 0; e < num_experts; ++e) {
    if (count[e] > 0) {
      experts.push_back(e);
      start[e] = offsets.back();
      offsets.push_back(offsets.back() + count[e]);
    }
  }
  pairs.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    pairs[start[ids[i]]++] = static_cast<int32_t>(i);
  }
}

ActPlanes::ActPlanes(
    const KernelTable& kernels,
    mx::Dtype dtype,
    const std::vector<float>& x,
    int64_t rows,
    int cols,
    QuantMode mode,
    int bits,
    int group_size,
    bool allowed) {
  if (!allowed || !kernels.quantize_acts || dtype == mx::float32 ||
      cols % 64 != 0 || !vnni_path(mode, bits)) {
    return;
  }
  const int64_t groups = rows * (cols / group_size);
  hi.resize(rows * cols);
  lo.resize(rows * cols);
  scale.resize(groups);
  sum.resize(groups);
  view = {hi.data(), lo.data(), scale.data(), sum.data(), cols, group_size,
          bits};
  used = true;
  for_each_act_row(rows, [&](int64_t r) { kernels.quantize_acts(x.data(), r, view); });
}

Int16Planes::Int16Planes(
    const KernelTable& kernels,
    mx::Dtype dtype,
    const std::vector<float>& x,
    int64_t rows,
    int cols,
    QuantMode mode,
    int bits,
    int group_size,
    bool allowed) {
  if (!allowed || !kernels.quantize_acts16 || dtype == mx::float32 ||
      !int16_path(mode, bits)) {
    return;
  }
  const int64_t groups = rows * (cols / group_size);
  q.resize(rows * cols);
  scale.resize(groups);
  sum.resize(groups);
  view = {q.data(), scale.data(), sum.data(), cols, group_size, /*split4=*/bits == 4};
  used = true;
  for_each_act_row(rows, [&](int64_t r) { kernels.quantize_acts16(x.data(), r, view); });
}

} // namespace fused_moe::cpu
