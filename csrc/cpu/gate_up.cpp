// CPU evaluation of GateUp: group (token, slot) pairs by expert, convert
// activations to fp32 (and, in half precision, to the integer paths' form),
// and spread the row-range kernel of the active instruction set over the
// thread pool.
#include <algorithm>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops/gate_up.h"

namespace fused_moe {

namespace {

// Rows of h per task: enough tasks to balance threads at decode (96 for A
// and 48 for B at one MiniMax token), long enough that each task reads long
// contiguous runs of weights; 32-row tasks were about 7% slower for A.
constexpr int kGateUpRowsPerTask = 128;
// The kernels' tiles are four packed rows (two gate/up pairs when gated);
// with H a multiple of 32 this keeps every tile whole.
static_assert(kGateUpRowsPerTask % 4 == 0);

} // namespace

void GateUp::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  const ExpertSettings st = settings_;
  const ExpertSlots slots = expert_slots(st, /*down=*/false);
  cpu::dispatch(
      stream(), inputs, out,
      [st, slots](const std::vector<mx::array>& in, mx::array& h) {
        const QuantSpec& q = st.quant;
        const bool gated = activation_spec(st.activation.kind).gated;
        const auto& x = in[slots.x];
        const auto& indices = in[slots.indices];
        const auto& weight = in[slots.weight];
        const int D = x.shape(1);
        const int k = indices.shape(1);
        const int H = gated ? weight.shape(1) / 2 : weight.shape(1);
        if (indices.shape(0) == 0) {
          return;
        }
        const cpu::Grouping grouping("gate_up", indices, weight.shape(0));
        const std::vector<float> x32 = cpu::to_fp32(x);
        const auto& kernels = cpu::active_kernels();
        const cpu::ActPlanes xq(
            kernels, x.dtype(), x32, x.shape(0), D, q.mode, q.bits, q.group_size);
        const cpu::Int16Planes x16(
            kernels, x.dtype(), x32, x.shape(0), D, q.mode, q.bits, q.group_size,
            /*allowed=*/!xq.used);
        const mx::array* biases = slots.biases >= 0 ? &in[slots.biases] : nullptr;
        const mx::array* global_scale =
            slots.global_scale >= 0 ? &in[slots.global_scale] : nullptr;
        cpu::GateUpArgs args = {
            cpu::quant_matrix(
                weight, in[slots.scales], biases, D, q.mode, q.bits, q.group_size,
                global_scale, gated ? 2 : 1),
            grouping.view(k), x32.data(), xq.get(), x16.get(), h.data<void>(),
            cpu::float_type(h.dtype())};
        const ActivationParams& p = st.activation;
        args.act = {p.kind, p.limit, p.alpha, p.beta, p.linear_beta};
        args.gated = gated;
        args.x_per_slot = st.x_per_slot;
        args.bias = slots.bias >= 0 ? in[slots.bias].data<void>() : nullptr;
        args.bias_type = slots.bias >= 0 ? cpu::float_type(in[slots.bias].dtype())
                                         : cpu::FloatType::f32;
        const int blocks = (H + kGateUpRowsPerTask - 1) / kGateUpRowsPerTask;
        cpu::parallel_for(args.groups.n_used * blocks, [&](int task) {
          const int r0 = (task % blocks) * kGateUpRowsPerTask;
          kernels.gate_up_rows(
              args, task / blocks, r0, std::min(H, r0 + kGateUpRowsPerTask));
        });
      });
}

} // namespace fused_moe
