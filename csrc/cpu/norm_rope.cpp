// CPU evaluation of NormRope: the angles' cos and sin are computed once per
// call in fp64 (one row per position, shared by every head and batch), then
// the token rows are normalised and rotated in parallel blocks.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops/norm_rope.h"

namespace fused_moe {

namespace {

// Token rows per task.
constexpr int kRowsPerTask = 8;

} // namespace

void NormRope::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  cpu::dispatch(
      stream(), inputs, out,
      [heads = heads_, eps = eps_, rotary_dim = rotary_dim_, traditional = traditional_,
       base = base_, scale = scale_, offset = offset_](
          const std::vector<mx::array>& in, mx::array& y) {
        const auto& x = in[0];
        const int B = x.shape(0), L = x.shape(1);
        const int half = rotary_dim / 2;
        std::vector<float> cos_sin(static_cast<size_t>(L) * rotary_dim);
        for (int l = 0; l < L; ++l) {
          const double position = static_cast<double>(offset + l) * scale;
          for (int i = 0; i < half; ++i) {
            const double angle =
                position * std::pow(static_cast<double>(base), -2.0 * i / rotary_dim);
            cos_sin[static_cast<size_t>(l) * rotary_dim + 2 * i] = static_cast<float>(std::cos(angle));
            cos_sin[static_cast<size_t>(l) * rotary_dim + 2 * i + 1] = static_cast<float>(std::sin(angle));
          }
        }
        cpu::NormRopeArgs a{};
        a.x = x.data<void>();
        a.weight = in.size() > 1 ? in[1].data<void>() : nullptr;
        a.weight_type = in.size() > 1 ? cpu::float_type(in[1].dtype()) : cpu::FloatType::f32;
        a.out = y.data<void>();
        a.type = cpu::float_type(y.dtype());
        a.cos_sin = cos_sin.data();
        a.B = B;
        a.L = L;
        a.H = heads;
        a.Dh = x.shape(2) / heads;
        a.rotary_dim = rotary_dim;
        a.eps = eps;
        a.traditional = traditional;
        const auto& kernels = cpu::active_kernels();
        const int rows = B * L;
        const int tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
        cpu::parallel_for(tasks, [&](int task) {
          const int r0 = task * kRowsPerTask;
          kernels.norm_rope_rows(a, r0, std::min(rows, r0 + kRowsPerTask));
        });
      });
}

} // namespace fused_moe
