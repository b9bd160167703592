// CPU evaluation of QuantizedMatmul: one linear as the expert kernels'
// machinery sees it (one expert, every token routed to it). Activations are
// converted to fp32 (and, for half precision, quantized for the integer
// paths: the AVX-512 VNNI planes, or int16 for 8-bit weights on AVX2); the
// output is split into ranges
// of rows and of tokens over the thread pool.
#include <algorithm>
#include <vector>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops/quantized_matmul.h"

namespace fused_moe {

namespace {

// Rows of y per task: a few hundred kilobytes of 8-bit weights, long runs
// for the prefetchers, and enough tasks to balance two threads even at the
// 1024-row k/v projections. Whole 4-row integer tiles.
constexpr int kRowsPerTask = 64;
static_assert(kRowsPerTask % 4 == 0);
// Tokens per task: one block of activations stays in L2 while a task's rows
// pass over it.
constexpr int kTokensPerTask = 64;

} // namespace

void QuantizedMatmul::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  cpu::dispatch(
      stream(), inputs, out,
      [bits = bits_, group_size = group_size_](
          const std::vector<mx::array>& in, mx::array& y) {
        const auto& x = in[0];
        const int T = x.shape(0);
        const int K = x.shape(1);
        const int N = in[1].shape(0);
        if (T == 0 || N == 0) {
          return;
        }
        const std::vector<float> x32 = cpu::to_fp32(x);
        const auto& kernels = cpu::active_kernels();
        // The integer tiles are 4 rows: other N take the fp32 path.
        const cpu::ActPlanes xq(
            kernels, x.dtype(), x32, T, K, QuantMode::affine, bits, group_size,
            /*allowed=*/N % 4 == 0);
        const cpu::Int16Planes x16(
            kernels, x.dtype(), x32, T, K, QuantMode::affine, bits, group_size,
            /*allowed=*/!xq.used);
        const cpu::LinearArgs args = {
            cpu::quant_matrix(in[1], in[2], in[3], K, bits, group_size),
            x32.data(), xq.get(), x16.get(), y.data<void>(),
            cpu::float_type(y.dtype())};
        const int row_tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
        const int token_tasks = (T + kTokensPerTask - 1) / kTokensPerTask;
        // Token blocks inner: a thread's consecutive tasks share their rows.
        cpu::parallel_for(row_tasks * token_tasks, [&](int task) {
          const int n0 = (task / token_tasks) * kRowsPerTask;
          const int t0 = (task % token_tasks) * kTokensPerTask;
          kernels.linear_rows(
              args, n0, std::min(N, n0 + kRowsPerTask), t0,
              std::min(T, t0 + kTokensPerTask));
        });
      });
}

} // namespace fused_moe
