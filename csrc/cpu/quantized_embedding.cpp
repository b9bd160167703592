// CPU evaluation of QuantizedEmbedding: the row ids are checked, then each
// selected row is dequantized straight into the output.
#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops/quantized_embedding.h"

namespace fused_moe {

namespace {

// Rows per task: a row is a few microseconds of work.
constexpr int kRowsPerTask = 16;

} // namespace

void QuantizedEmbedding::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  cpu::dispatch(
      stream(), inputs, out,
      [bits = bits_, group_size = group_size_](
          const std::vector<mx::array>& in, mx::array& y) {
        const auto& ids = in[0];
        const int T = ids.shape(0);
        const int N = in[1].shape(0);
        const int K = y.shape(1);
        const int64_t* id = ids.data<int64_t>();
        for (int t = 0; t < T; ++t) {
          if (id[t] < 0 || id[t] >= N) {
            std::ostringstream msg;
            msg << "fused_moe.quantized_embedding: ids[" << t << "] = " << id[t]
                << " is out of range for " << N << " rows (valid: 0.."
                << N - 1 << ")";
            throw std::out_of_range(msg.str());
          }
        }
        const cpu::GatherArgs args = {
            cpu::quant_matrix(in[1], in[2], in[3], K, bits, group_size), id,
            y.data<void>(), cpu::float_type(y.dtype())};
        const auto& kernels = cpu::active_kernels();
        const int tasks = (T + kRowsPerTask - 1) / kRowsPerTask;
        cpu::parallel_for(tasks, [&](int task) {
          const int t0 = task * kRowsPerTask;
          kernels.gather_rows(args, t0, std::min(T, t0 + kRowsPerTask));
        });
      });
}

} // namespace fused_moe
