// CPU evaluation of GateUp: group (token, slot) pairs by expert, convert
// activations to fp32, and spread the row-range kernel of the active
// instruction set over the thread pool.
#include <algorithm>
#include <stdexcept>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops/gate_up.h"

namespace fused_moe {

namespace {

// Rows of output per task: enough tasks to balance threads at decode (96
// for A and 48 for B at one MiniMax token), long enough that each task reads
// long contiguous runs of weights; 32-row tasks were about 7% slower for A.
constexpr int kGateUpRowsPerTask = 128;
// The AVX-512 kernel's tiles are two gate/up row pairs; with H a multiple
// of 32 this keeps every tile whole.
static_assert(kGateUpRowsPerTask % 2 == 0);

} // namespace

void GateUp::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  const ExpertSettings& st = settings_;
  // Raised in the task, where MLX reports a kernel's errors.
  const bool implemented = st.quant.mode == QuantMode::affine &&
      st.activation.kind == Activation::swiglu && !st.bias && !st.x_per_slot;
  const ExpertSlots slots = expert_slots(st, /*down=*/false);
  cpu::dispatch(
      stream(), inputs, out,
      [bits = st.quant.bits, group_size = st.quant.group_size, slots, implemented](
          const std::vector<mx::array>& in, mx::array& h) {
        if (!implemented) {
          throw std::invalid_argument(
              "fused_moe.gate_up: the CPU kernels for this setting are not "
              "implemented yet");
        }
        const auto& x = in[slots.x];
        const auto& indices = in[slots.indices];
        const auto& weight = in[slots.weight];
        const int D = x.shape(1);
        const int k = indices.shape(1);
        const int H = weight.shape(1) / 2;
        if (x.shape(0) == 0) {
          return;
        }
        const cpu::Grouping grouping("gate_up", indices, weight.shape(0));
        const std::vector<float> x32 = cpu::to_fp32(x);
        const auto& kernels = cpu::active_kernels();
        const cpu::ActPlanes xq(
            kernels, x.dtype(), x32, x.shape(0), D, bits, group_size);
        const cpu::Int16Planes x16(
            kernels, x.dtype(), x32, x.shape(0), D, bits, group_size);
        const cpu::GateUpArgs args = {
            cpu::quant_matrix(
                weight, in[slots.scales], in[slots.biases], D, bits, group_size),
            grouping.view(k), x32.data(), xq.get(), x16.get(), h.data<void>(),
            cpu::float_type(h.dtype())};
        const int blocks = (H + kGateUpRowsPerTask - 1) / kGateUpRowsPerTask;
        cpu::parallel_for(args.groups.n_used * blocks, [&](int task) {
          const int r0 = (task % blocks) * kGateUpRowsPerTask;
          kernels.gate_up_rows(
              args, task / blocks, r0, std::min(H, r0 + kGateUpRowsPerTask));
        });
      });
}

} // namespace fused_moe
