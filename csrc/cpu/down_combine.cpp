// CPU evaluation of DownCombine: group (token, slot) pairs by expert, convert
// h and the router weights to fp32, and spread the row-range kernel of the
// active instruction set over the thread pool.
#include <algorithm>
#include <vector>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops/down_combine.h"

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

void DownCombine::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  cpu::dispatch(
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
        const cpu::Grouping grouping("down_combine", indices, in[1].shape(0));
        const std::vector<float> h32 = cpu::to_fp32(h);
        const std::vector<float> w32 = cpu::to_fp32(in[5]);
        std::vector<float> y_acc(static_cast<size_t>(T) * D);
        const auto& kernels = cpu::active_kernels();
        const cpu::ActPlanes hq(
            kernels, h.dtype(), h32, int64_t(T) * k, H, bits, group_size);
        const cpu::Int16Planes h16(
            kernels, h.dtype(), h32, int64_t(T) * k, H, bits, group_size);
        const cpu::DownArgs args = {
            cpu::quant_matrix(in[1], in[2], in[3], H, bits, group_size),
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
