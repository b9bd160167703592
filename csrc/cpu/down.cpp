// CPU evaluation of Down (down_combine, down_slots): group (token, slot)
// pairs by expert, convert h and the router weights to fp32, and spread the
// row-range kernel of the active instruction set over the thread pool.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops/down.h"

namespace fused_moe {

namespace {

// Rows of y per task: enough tasks to balance threads at decode (48 at one
// MiniMax token), long enough that each task reads long contiguous runs of
// weights.
constexpr int kDownRowsPerTask = 64;
// The AVX-512 kernel's tiles are four rows of D; with D a multiple of 32
// this keeps every tile whole.
static_assert(kDownRowsPerTask % 4 == 0);

} // namespace

void Down::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  const ExpertSettings& st = settings_;
  // Raised in the task, where MLX reports a kernel's errors.
  const bool implemented =
      st.quant.mode == QuantMode::affine && !st.bias && st.combine;
  const ExpertSlots slots = expert_slots(st, /*down=*/true);
  cpu::dispatch(
      stream(), inputs, out,
      [bits = st.quant.bits, group_size = st.quant.group_size, slots, implemented](
          const std::vector<mx::array>& in, mx::array& y) {
        if (!implemented) {
          throw std::invalid_argument(
              "fused_moe.down: the CPU kernels for this setting are not "
              "implemented yet");
        }
        const auto& h = in[slots.x];
        const auto& indices = in[slots.indices];
        const auto& weight = in[slots.weight];
        const int T = h.shape(0);
        const int k = h.shape(1);
        const int H = h.shape(2);
        const int D = weight.shape(1);
        if (T == 0) {
          return;
        }
        const cpu::Grouping grouping("down_combine", indices, weight.shape(0));
        const std::vector<float> h32 = cpu::to_fp32(h);
        const std::vector<float> w32 = cpu::to_fp32(in[slots.weights]);
        std::vector<float> y_acc(static_cast<size_t>(T) * D);
        const auto& kernels = cpu::active_kernels();
        const cpu::ActPlanes hq(
            kernels, h.dtype(), h32, int64_t(T) * k, H, bits, group_size);
        const cpu::Int16Planes h16(
            kernels, h.dtype(), h32, int64_t(T) * k, H, bits, group_size);
        const cpu::DownArgs args = {
            cpu::quant_matrix(
                weight, in[slots.scales], in[slots.biases], H, bits, group_size),
            grouping.view(k), h32.data(), hq.get(), h16.get(), w32.data(), y_acc.data(),
            y.data<void>(), cpu::float_type(y.dtype()), T};
        const int blocks = (D + kDownRowsPerTask - 1) / kDownRowsPerTask;
        cpu::parallel_for(blocks, [&](int task) {
          const int d0 = task * kDownRowsPerTask;
          kernels.down_rows(args, d0, std::min(D, d0 + kDownRowsPerTask));
        });
      });
}

} // namespace fused_moe
