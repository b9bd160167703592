// CPU evaluation of Down (down_combine, down_slots): group (token, slot)
// pairs by expert, convert h (and the router weights) to fp32, and spread
// the row-range kernel of the active instruction set over the thread pool.
#include <algorithm>
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
// The kernels' tiles are four rows of D; with D a multiple of 32 this keeps
// every tile whole.
static_assert(kDownRowsPerTask % 4 == 0);

} // namespace

void Down::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  const ExpertSettings st = settings_;
  const ExpertSlots slots = expert_slots(st, /*down=*/true);
  cpu::dispatch(
      stream(), inputs, out,
      [st, slots](const std::vector<mx::array>& in, mx::array& y) {
        const QuantSpec& q = st.quant;
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
        const cpu::Grouping grouping(
            st.combine ? "down_combine" : "down_slots", indices, weight.shape(0));
        const std::vector<float> h32 = cpu::to_fp32(h);
        std::vector<float> w32, y_acc;
        if (st.combine) {
          w32 = cpu::to_fp32(in[slots.weights]);
          y_acc.resize(static_cast<size_t>(T) * D);
        }
        const auto& kernels = cpu::active_kernels();
        const cpu::ActPlanes hq(
            kernels, h.dtype(), h32, int64_t(T) * k, H, q.mode, q.bits, q.group_size);
        const cpu::Int16Planes h16(
            kernels, h.dtype(), h32, int64_t(T) * k, H, q.mode, q.bits,
            q.group_size, /*allowed=*/!hq.used);
        const mx::array* biases = slots.biases >= 0 ? &in[slots.biases] : nullptr;
        const mx::array* global_scale =
            slots.global_scale >= 0 ? &in[slots.global_scale] : nullptr;
        cpu::DownArgs args = {
            cpu::quant_matrix(
                weight, in[slots.scales], biases, H, q.mode, q.bits, q.group_size,
                global_scale, 1),
            grouping.view(k), h32.data(), hq.get(), h16.get(),
            st.combine ? w32.data() : nullptr, st.combine ? y_acc.data() : nullptr,
            y.data<void>(), cpu::float_type(y.dtype()), T};
        args.bias = slots.bias >= 0 ? in[slots.bias].data<void>() : nullptr;
        args.bias_type = slots.bias >= 0 ? cpu::float_type(in[slots.bias].dtype())
                                         : cpu::FloatType::f32;
        const int blocks = (D + kDownRowsPerTask - 1) / kDownRowsPerTask;
        cpu::parallel_for(blocks, [&](int task) {
          const int d0 = task * kDownRowsPerTask;
          kernels.down_rows(args, d0, std::min(D, d0 + kDownRowsPerTask));
        });
      });
}

} // namespace fused_moe
