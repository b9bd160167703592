// CPU evaluation of the Route Primitive: the gate's logits from the kernels
// of the active instruction set, spread over the thread pool, then sigmoid,
// biased top-k and renormalisation per token.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "supported.h"
#include "ops/route.h"

namespace fused_moe {

namespace {

// At most this many tokens, the experts are split across threads (decode:
// each thread streams its share of the gate once); above it, tokens are.
constexpr int kRowSplitMaxTokens = 16;
// Tokens per task; also the unit of the per-token selection.
constexpr int kTokensPerTask = 32;
// Experts per task in the expert split: whole 4-row tiles, and several
// tasks per thread, so that a thread that wakes late finds its share taken.
constexpr int kRowsPerTask = 16;

struct Split {
  int rows_per_task;
  int row_tasks;
  int token_tasks;
};

Split plan_split(int T, int E, int threads) {
  const int token_tasks = (T + kTokensPerTask - 1) / kTokensPerTask;
  if (T > kRowSplitMaxTokens || threads <= 1) {
    return {E, 1, token_tasks};
  }
  return {kRowsPerTask, (E + kRowsPerTask - 1) / kRowsPerTask, token_tasks};
}

// True when biased score `a` ranks above `b`: higher first, NaN below every
// number. Experts are offered in increasing index, so an equal score (or a
// second NaN) never displaces an earlier one: ties go to the lower index.
inline bool outranks(float a, float b) {
  return std::isnan(b) ? !std::isnan(a) : a > b;
}

// Top-k of one token's scores + bias, best first, and the renormalised
// unbiased scores of the chosen experts.
void select_top_k(
    const float* logits,
    const float* bias,
    int E,
    int k,
    uint32_t* indices,
    float* weights) {
  float ranked[kMaxTopK]; // biased scores, best first
  float scores[kMaxTopK];
  uint32_t ids[kMaxTopK];
  int n = 0;
  for (int e = 0; e < E; ++e) {
    const float score = 1.0f / (1.0f + std::exp(-logits[e]));
    const float biased = score + bias[e];
    if (n == k && !outranks(biased, ranked[k - 1])) {
      continue;
    }
    int p = n < k ? n++ : k - 1;
    for (; p > 0 && outranks(biased, ranked[p - 1]); --p) {
      ranked[p] = ranked[p - 1];
      scores[p] = scores[p - 1];
      ids[p] = ids[p - 1];
    }
    ranked[p] = biased;
    scores[p] = score;
    ids[p] = static_cast<uint32_t>(e);
  }
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    sum += scores[j];
  }
  // The same guard against an all-zero sum as mlx-lm's router.
  const float denom = sum + 1e-20f;
  for (int j = 0; j < k; ++j) {
    indices[j] = ids[j];
    weights[j] = scores[j] / denom;
  }
}

cpu::RouterGate router_gate(const std::vector<mx::array>& in, int group_size) {
  const auto& w = in[1];
  const int E = w.shape(0);
  const int D = in[0].shape(1);
  if (in.size() == 3) {
    return {w.data<void>(), nullptr, nullptr, cpu::float_type(w.dtype()),
            cpu::FloatType::f32, false, 0, E, D};
  }
  return {w.data<void>(), in[3].data<void>(), in[4].data<void>(),
          cpu::FloatType::f32, cpu::float_type(in[3].dtype()), true,
          group_size, E, D};
}

} // namespace

void Route::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  cpu::dispatch(
      stream(), inputs, outputs,
      [k = k_, group_size = group_size_](
          const std::vector<mx::array>& in, std::vector<mx::array>& out) {
        const auto& x = in[0];
        const int T = x.shape(0);
        const int E = in[1].shape(0);
        if (T == 0) {
          return;
        }
        // float32 activations are read in place.
        std::vector<float> x_copy;
        const float* x32 = x.dtype() == mx::float32
            ? x.data<float>()
            : (x_copy = cpu::to_fp32(x)).data();
        const std::vector<float> bias = cpu::to_fp32(in[2]);
        std::vector<float> logits(static_cast<size_t>(T) * E);
        const cpu::RouteArgs args = {
            router_gate(in, group_size), x32, logits.data()};

        const auto& kernels = cpu::active_kernels();
        const Split split = plan_split(T, E, cpu::num_threads());
        cpu::parallel_for(split.row_tasks * split.token_tasks, [&](int task) {
          const int e0 = (task % split.row_tasks) * split.rows_per_task;
          const int t0 = (task / split.row_tasks) * kTokensPerTask;
          kernels.route_logits(
              args, e0, std::min(E, e0 + split.rows_per_task), t0,
              std::min(T, t0 + kTokensPerTask));
        });

        auto* indices = out[0].data<uint32_t>();
        auto* weights = out[1].data<float>();
        cpu::parallel_for(split.token_tasks, [&](int task) {
          const int t_end = std::min(T, (task + 1) * kTokensPerTask);
          for (int t = task * kTokensPerTask; t < t_end; ++t) {
            const int64_t o = static_cast<int64_t>(t) * k;
            select_top_k(
                logits.data() + static_cast<int64_t>(t) * E, bias.data(), E,
                k, indices + o, weights + o);
          }
        });
      });
}

} // namespace fused_moe
