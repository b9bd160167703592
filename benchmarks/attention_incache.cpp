// The CPU attention kernel's compute, with the cache in L2: one thread, one
// KV head of MiniMax's GQA group (6 query heads of 128), timed in thread
// CPU time so that other processes on the host do not count. It separates
// the kernel's arithmetic from memory: the per-core ceiling it prints is
// the cache bytes per second the kernel can take at most, whatever the
// memory gives.
//
// Build against a worktree whose venv has MLX installed (its headers), for
// one instruction set (avx2 here; generic with no -m flags and
// -DISA=generic; avx512 with the AVX-512 flags of CMakeLists.txt):
//
//   g++ -O3 -fno-math-errno -std=c++17 -mavx2 -mfma -mf16c -mbmi2 -DISA=avx2 \
//     -Icsrc -I.venv/lib/python3.11/site-packages/mlx/include \
//     benchmarks/attention_incache.cpp -o /tmp/attention_incache
//   /tmp/attention_incache            # decode, bf16 / 8-bit / 4-bit caches
//   /tmp/attention_incache 1024 1024  # a causal prompt of 1024 rows
//
// Arguments: keys S (default 512), query rows L (default 1; L > 1 is a
// causal prompt, tiles of 8 rows), clock GHz for the cycle count (3.1).
#ifndef ISA
#define ISA avx2
#endif
#define FUSED_MOE_ISA_NS ISA
#include "cpu/kernels_impl.h"

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <random>

using namespace fused_moe::cpu;

namespace {

constexpr int kHeads = 6, kDh = 128, kGroup = 64;

uint16_t bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// Seconds per call over every tile of the L rows (best of 5 runs).
double time_tiles(const AttentionArgs& a, int reps) {
  auto all_tiles = [&] {
    for (int l0 = 0; l0 < a.L; l0 += kAttentionRows) {
      const int l1 = std::min(a.L, l0 + kAttentionRows);
      const int keys = a.causal ? a.S - a.L + l1 : a.S;
      const AttentionTask t{0, 0, 0, a.Hq, l0, l1, 0, (keys + kAttentionKeyChunk - 1) / kAttentionKeyChunk, nullptr};
      ISA::attention_task(a, t);
    }
  };
  all_tiles();
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const double t0 = thread_seconds();
    for (int i = 0; i < reps; ++i) all_tiles();
    best = std::min(best, (thread_seconds() - t0) / reps);
  }
  return best;
}

} // namespace

int main(int argc, char** argv) {
  const int S = argc > 1 ? std::atoi(argv[1]) : 512;
  const int L = argc > 2 ? std::atoi(argv[2]) : 1;
  const double ghz = argc > 3 ? std::atof(argv[3]) : 3.1;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> q(static_cast<size_t>(kHeads) * L * kDh), out(q.size());
  std::vector<uint16_t> k(static_cast<size_t>(S) * kDh), v(k.size());
  for (auto* x : {&q, &k, &v}) {
    for (auto& e : *x) e = bf16(normal(rng));
  }
  std::vector<uint32_t> codes_k(static_cast<size_t>(S) * kDh / 4), codes_v(codes_k.size());
  for (auto* x : {&codes_k, &codes_v}) {
    for (auto& e : *x) e = rng();
  }
  std::vector<uint16_t> scales(static_cast<size_t>(S) * kDh / kGroup, bf16(0.02f)), biases(scales.size(), bf16(-2.5f));

  // (pairs of (row, key) the rows see)
  double pairs = 0;
  for (int l = 0; l < L; ++l) pairs += L > 1 ? S - L + l + 1 : S;
  const int reps = std::max(1, static_cast<int>(2e7 / (pairs * kHeads)));
  std::printf("attention kernel (%s), one thread, cache in L2: %d query heads of %d over one KV head, "
              "%d keys, %d query row(s)%s; thread CPU time, best of 5\n",
              FUSED_MOE_STR(ISA), kHeads, kDh, S, L, L > 1 ? " (causal)" : "");
  for (int bits : {0, 8, 4}) {
    AttentionArgs a{};
    a.q = q.data();
    a.out = out.data();
    a.type = a.cache_type = FloatType::bf16;
    a.bits = bits;
    a.group_size = kGroup;
    a.B = 1, a.Hq = kHeads, a.Hkv = 1, a.L = L, a.S = S, a.Dh = kDh;
    a.scale = 1.0f / std::sqrt(static_cast<float>(kDh));
    a.causal = L > 1;
    double key_bytes; // K and V bytes of one key
    if (bits == 0) {
      const int64_t st[4] = {int64_t(S) * kDh, int64_t(S) * kDh, kDh, 1};
      a.k.data = k.data(), a.v.data = v.data();
      std::memcpy(a.k.stride, st, sizeof st), std::memcpy(a.v.stride, st, sizeof st);
      key_bytes = 2.0 * kDh * 2;
    } else {
      const int W = kDh * bits / 32, G = kDh / kGroup;
      const int64_t cs[4] = {int64_t(S) * W, int64_t(S) * W, W, 1};
      const int64_t ss[4] = {int64_t(S) * G, int64_t(S) * G, G, 1};
      a.k.data = codes_k.data(), a.v.data = codes_v.data();
      a.k.scales = a.v.scales = scales.data();
      a.k.biases = a.v.biases = biases.data();
      for (CacheTensor* t : {&a.k, &a.v}) {
        std::memcpy(t->stride, cs, sizeof cs);
        std::memcpy(t->scale_stride, ss, sizeof ss);
        std::memcpy(t->bias_stride, ss, sizeof ss);
      }
      key_bytes = 2.0 * (W * 4 + G * 2 * 2);
    }
    const double s = time_tiles(a, reps) / pairs;  // per (row, key)
    std::printf("  %-10s %7.2f ns per (head, row, key) = %5.1f cycles at %.1f GHz (FMA-bound: 16)",
                bits ? (bits == 8 ? "8-bit g64" : "4-bit g64") : "bf16", s / kHeads * 1e9, s / kHeads * ghz * 1e9, ghz);
    if (L == 1) {
      std::printf("; per-core ceiling %.1f GB/s of cache", key_bytes / s / 1e9);
    }
    std::printf("\n");
  }
}
