// CPU evaluation of Attention: one task per (batch, KV head, query row,
// block of up to kAttentionHeads query heads); K and V are read in place
// through their strides.
#include <algorithm>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops/attention.h"

namespace fused_moe {

void Attention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  cpu::dispatch(
      stream(), inputs, out,
      [scale = scale_, causal = causal_](
          const std::vector<mx::array>& in, mx::array& y) {
        const auto &q = in[0], &k = in[1], &v = in[2];
        cpu::AttentionArgs a{};
        a.q = q.data<void>();
        a.k = k.data<void>();
        a.v = v.data<void>();
        a.out = y.data<void>();
        a.type = cpu::float_type(q.dtype());
        for (int d = 0; d < 4; ++d) {
          a.k_stride[d] = k.strides()[d];
          a.v_stride[d] = v.strides()[d];
        }
        a.B = q.shape(0);
        a.Hq = q.shape(1);
        a.L = q.shape(2);
        a.Dh = q.shape(3);
        a.Hkv = k.shape(1);
        a.S = k.shape(2);
        a.scale = scale;
        a.causal = causal;
        const int G = a.Hq / a.Hkv;
        const int blocks = (G + cpu::kAttentionHeads - 1) / cpu::kAttentionHeads;
        const int units = a.B * a.Hkv * a.L * blocks;
        const auto& kernels = cpu::active_kernels();
        cpu::parallel_for(units, [&](int u) {
          const int hb = u % blocks;
          const int l = u / blocks % a.L;
          const int g = u / blocks / a.L % a.Hkv;
          const int b = u / blocks / a.L / a.Hkv;
          const int h0 = g * G + hb * cpu::kAttentionHeads;
          const int h1 = std::min(g * G + G, h0 + cpu::kAttentionHeads);
          kernels.attention_unit(a, b, g, l, h0, h1);
        });
      });
}

} // namespace fused_moe
