// CPU evaluation of Attention. The work is cut into tiles: (batch, KV head,
// block of up to kAttentionHeads query heads, up to kAttentionRows query
// rows). When there are few tiles for the threads (decode: one row, so
// B·Hkv tiles), the keys are split too: one task per tile and key chunk,
// each writing its chunk's partial softmax, then one merge per tile folding
// them in chunk order. Tasks that take all their chunks fold them in the
// same order with the same arithmetic, so splitting or not (and the thread
// count that decides it) never changes a bit. K and V are read in place
// through their strides.
#include <algorithm>

#include "cpu/eval_common.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "ops/attention.h"

namespace fused_moe {

namespace {

// Below this many tiles per thread, split the keys across threads.
constexpr int kSplitTilesPerThread = 8;
// The most memory the split's partials may take; past it tasks take all
// their chunks (the same bits, less parallel).
constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;

void copy_strides(const mx::array& a, int64_t* dst) {
  for (int d = 0; d < 4; ++d) {
    dst[d] = a.strides()[d];
  }
}

void run(const cpu::AttentionArgs& a) {
  const int G = a.Hq / a.Hkv;
  const int head_blocks = (G + cpu::kAttentionHeads - 1) / cpu::kAttentionHeads;
  const int R = std::min(a.L, cpu::kAttentionRows);
  const int row_tiles = (a.L + R - 1) / R;
  const int tiles = a.B * a.Hkv * head_blocks * row_tiles;
  // Tile u, all of its chunks. Head blocks split the group evenly.
  auto tile = [&](int u) {
    const int rt = u % row_tiles;
    const int hb = u / row_tiles % head_blocks;
    const int g = u / row_tiles / head_blocks % a.Hkv;
    const int b = u / row_tiles / head_blocks / a.Hkv;
    cpu::AttentionTask t{};
    t.b = b;
    t.g = g;
    t.h0 = g * G + hb * G / head_blocks;
    t.h1 = g * G + (hb + 1) * G / head_blocks;
    t.l0 = rt * R;
    t.l1 = std::min(a.L, t.l0 + R);
    const int keys = a.causal ? a.S - a.L + t.l1 : a.S; // the last row's
    t.c0 = 0;
    t.c1 = (keys + cpu::kAttentionKeyChunk - 1) / cpu::kAttentionKeyChunk;
    return t;
  };
  const auto& kernels = cpu::active_kernels();

  // The split: task offsets and partial offsets per tile.
  std::vector<int> first_task(tiles + 1, 0);
  std::vector<int64_t> first_float(tiles + 1, 0);
  for (int u = 0; u < tiles; ++u) {
    const auto t = tile(u);
    first_task[u + 1] = first_task[u] + t.c1;
    first_float[u + 1] = first_float[u] +
        t.c1 * cpu::attention_partial_floats(t.l1 - t.l0, t.h1 - t.h0, a.Dh);
  }
  const bool split = tiles < kSplitTilesPerThread * cpu::num_threads() &&
      first_task[tiles] > tiles &&
      first_float[tiles] * static_cast<int64_t>(sizeof(float)) <= kMaxPartialBytes;
  if (!split) {
    cpu::parallel_for(tiles, [&](int u) { kernels.attention_task(a, tile(u)); });
    return;
  }
  std::vector<float> partials(first_float[tiles]);
  cpu::parallel_for(first_task[tiles], [&](int i) {
    const int u = static_cast<int>(
        std::upper_bound(first_task.begin(), first_task.end(), i) - first_task.begin() - 1);
    auto t = tile(u);
    const int c = i - first_task[u];
    t.c0 = c;
    t.c1 = c + 1;
    t.partial = partials.data() + first_float[u] +
        c * cpu::attention_partial_floats(t.l1 - t.l0, t.h1 - t.h0, a.Dh);
    kernels.attention_task(a, t);
  });
  cpu::parallel_for(tiles, [&](int u) {
    const auto t = tile(u);
    kernels.attention_merge(a, t, partials.data() + first_float[u], t.c1);
  });
}

} // namespace

void Attention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  cpu::dispatch(
      stream(), inputs, out,
      [scale = scale_, causal = causal_, bits = bits_, group_size = group_size_](
          const std::vector<mx::array>& in, mx::array& y) {
        const auto& q = in[0];
        cpu::AttentionArgs a{};
        a.q = q.data<void>();
        a.out = y.data<void>();
        a.type = cpu::float_type(q.dtype());
        a.bits = bits;
        a.group_size = group_size;
        if (bits == 0) {
          a.k.data = in[1].data<void>();
          a.v.data = in[2].data<void>();
          copy_strides(in[1], a.k.stride);
          copy_strides(in[2], a.v.stride);
          a.cache_type = a.type;
        } else {
          for (auto [t, at] : {std::pair{&a.k, 1}, std::pair{&a.v, 4}}) {
            t->data = in[at].data<void>();
            t->scales = in[at + 1].data<void>();
            t->biases = in[at + 2].data<void>();
            copy_strides(in[at], t->stride);
            copy_strides(in[at + 1], t->scale_stride);
            copy_strides(in[at + 2], t->bias_stride);
          }
          a.cache_type = cpu::float_type(in[2].dtype());
        }
        a.B = q.shape(0);
        a.Hq = q.shape(1);
        a.L = q.shape(2);
        a.Dh = q.shape(3);
        a.Hkv = in[1].shape(1);
        a.S = in[1].shape(2);
        a.scale = scale;
        a.causal = causal;
        run(a);
      });
}

} // namespace fused_moe
