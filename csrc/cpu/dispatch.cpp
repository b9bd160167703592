// CPU evaluation of the fused MoE Primitives: group (token, slot) pairs by
// expert, convert activations to fp32, and spread the row-range kernels of
// the active instruction set over the thread pool.
#include <sstream>
#include <stdexcept>
#include <vector>

#include "cpu/host.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops.h"

namespace fused_moe {

namespace {

using cpu::ExpertGroups;
using cpu::FloatType;
using cpu::float_type;
using cpu::launch;
using cpu::to_fp32;

// Rows of output per task: enough tasks to balance threads at decode (96
// for A and 48 for B at one MiniMax token), long enough that each task reads
// long contiguous runs of weights; 32-row tasks were about 7% slower for A.
constexpr int kGateUpRowsPerTask = 128;
constexpr int kDownRowsPerTask = 64;
// The AVX-512 kernels' tiles are 4 rows: two gate/up row pairs in A, four
// rows of D in B. With D and H multiples of 32, these keep every tile whole.
static_assert(kGateUpRowsPerTask % 2 == 0 && kDownRowsPerTask % 4 == 0);
// Activation rows below which quantizing them stays on the calling thread.
constexpr int64_t kParallelActRows = 64;

cpu::QuantMatrix quant_matrix(
    const mx::array& w,
    const mx::array& s,
    const mx::array& b,
    int cols,
    int bits,
    int group_size) {
  return {
      w.data<uint8_t>(), s.data<void>(), b.data<void>(),
      float_type(s.dtype()), static_cast<int>(w.shape(1)), cols, bits,
      group_size};
}

// Counting sort of pairs by expert, with the range check that keeps every
// weight access in bounds.
struct Grouping {
  std::vector<int32_t> experts, offsets, pairs;

  Grouping(const char* op, const mx::array& indices, int num_experts) {
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
        std::ostringstream msg;
        msg << "fused_moe." << op << ": indices[" << i / k << ", " << i % k
            << "] = " << ids[i] << " is out of range for " << num_experts
            << " experts (valid: 0.." << num_experts - 1 << ")";
        throw std::out_of_range(msg.str());
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

  ExpertGroups view(int k) const {
    return {experts.data(), offsets.data(), pairs.data(),
            static_cast<int>(experts.size()), k};
  }
};

// Integer-ready copy of activation rows, for kernel builds that have an
// integer path. float32 inputs always take the exact fp32 path, and so do
// rows whose width is not a whole number of 64-code blocks.
struct ActPlanes {
  std::vector<int8_t> hi, lo;
  std::vector<float> scale, sum;
  cpu::QuantizedActs view{};
  bool used = false;

  ActPlanes(const cpu::KernelTable& kernels, mx::Dtype dtype,
            const std::vector<float>& x, int64_t rows, int cols, int bits,
            int group_size) {
    if (!kernels.quantize_acts || dtype == mx::float32 || cols % 64 != 0) {
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
    // A row takes about a microsecond: waking the pool for a few rows
    // would cost more than it saves.
    if (rows < kParallelActRows) {
      for (int64_t r = 0; r < rows; ++r) kernels.quantize_acts(x.data(), r, view);
    } else {
      cpu::parallel_for(static_cast<int>(rows), [&](int r) {
        kernels.quantize_acts(x.data(), r, view);
      });
    }
  }

  const cpu::QuantizedActs* get() const {
    return used ? &view : nullptr;
  }
};

} // namespace

void GateUpSwiglu::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  launch(
      stream(), inputs, out,
      [bits = bits_, group_size = group_size_](
          const std::vector<mx::array>& in, mx::array& h) {
        const auto& x = in[0];
        const auto& indices = in[4];
        const int D = x.shape(1);
        const int k = indices.shape(1);
        const int H = in[1].shape(1) / 2;
        if (x.shape(0) == 0) {
          return;
        }
        const Grouping grouping("gate_up_swiglu", indices, in[1].shape(0));
        const std::vector<float> x32 = to_fp32(x);
        const auto& kernels = cpu::active_kernels();
        const ActPlanes xq(
            kernels, x.dtype(), x32, x.shape(0), D, bits, group_size);
        const cpu::GateUpArgs args = {
            quant_matrix(in[1], in[2], in[3], D, bits, group_size),
            grouping.view(k), x32.data(), xq.get(), h.data<void>(),
            float_type(h.dtype())};
        const int blocks = (H + kGateUpRowsPerTask - 1) / kGateUpRowsPerTask;
        cpu::parallel_for(args.groups.n_used * blocks, [&](int task) {
          const int r0 = (task % blocks) * kGateUpRowsPerTask;
          kernels.gate_up_rows(
              args, task / blocks, r0, std::min(H, r0 + kGateUpRowsPerTask));
        });
      });
}

void DownCombine::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  launch(
      stream(), inputs, out,
      [bits = bits_, group_size = group_size_](
          const std::vector<mx::array>& in, mx::array& y) {
        const auto& h = in[0];
        const auto& indices = in[4];
        const int T = h.shape(0);
        const int k = h.shape(1);
        const int H = h.shape(2);
        const int D = in[1].shape(1);
        if (T == 0) {
          return;
        }
        const Grouping grouping("down_combine", indices, in[1].shape(0));
        const std::vector<float> h32 = to_fp32(h);
        const std::vector<float> w32 = to_fp32(in[5]);
        std::vector<float> y_acc(static_cast<size_t>(T) * D);
        const auto& kernels = cpu::active_kernels();
        const ActPlanes hq(
            kernels, h.dtype(), h32, int64_t(T) * k, H, bits, group_size);
        const cpu::DownArgs args = {
            quant_matrix(in[1], in[2], in[3], H, bits, group_size),
            grouping.view(k), h32.data(), hq.get(), w32.data(), y_acc.data(),
            y.data<void>(), float_type(y.dtype()), T};
        const int blocks = (D + kDownRowsPerTask - 1) / kDownRowsPerTask;
        cpu::parallel_for(blocks, [&](int task) {
          const int d0 = task * kDownRowsPerTask;
          kernels.down_rows(args, d0, std::min(D, d0 + kDownRowsPerTask));
        });
      });
}

} // namespace fused_moe
