// Kernel C: scaled dot-product attention over a KV cache, in fp32, for one
// (batch, KV head, query row) unit and up to kAttentionHeads query heads of
// its GQA group. Each key and value row is read once per unit and shared by
// all of the unit's heads: at decode the cache is read once per token.
// Included by kernels_impl.h, once per instruction set.
#pragma once

namespace fused_moe::cpu::FUSED_MOE_ISA_NS {

// Keys per block: the block's row pointers (and, for a cache whose last axis
// is strided, its gathered rows) are set up once for all its heads.
constexpr int kKeyBlock = 64;

// exp(x) for x <= 0, which every softmax argument is once the row's maximum
// is taken out. x = n·ln2 + r with |r| <= ln2/2 (ln2 split in two so r is
// exact), e^r by its degree-6 Taylor polynomial (relative error < 2e-7),
// 2^n through the exponent bits. Below -87 the result is about 1e-38,
// which adds nothing to a sum that contains exp(0) = 1.
static inline vfloat exp_nonpositive(vfloat x) {
  typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const vfloat floor_x = vfloat{} - 87.0f;
  x = x < floor_x ? floor_x : x;
  // Truncating x·log2(e) - 0.5 toward zero rounds it to nearest for x <= 0.
  const vint n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vint);
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = (x - nf * 0.693145751953125f) - nf * 1.42860682030941723e-6f;
  vfloat p = vfloat{} + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * (vfloat)((n + 127) << 23);
}

// Rows [j0, j0 + n) of one head of a K or V cache, as pointers to Dh
// contiguous values: in place when the last axis is contiguous, otherwise
// gathered into `tmp` (n * Dh values of the storage type).
static inline void cache_rows(
    const void* head, int64_t stride_s, int64_t stride_d, int elem_bytes,
    int Dh, int j0, int n, uint8_t* tmp, const void** rows) {
  const auto* base = static_cast<const uint8_t*>(head);
  for (int j = 0; j < n; ++j) {
    const uint8_t* row = base + (j0 + j) * stride_s * elem_bytes;
    if (stride_d == 1) {
      rows[j] = row;
      continue;
    }
    uint8_t* dst = tmp + static_cast<int64_t>(j) * Dh * elem_bytes;
    for (int d = 0; d < Dh; ++d) {
      std::memcpy(dst + d * elem_bytes, row + d * stride_d * elem_bytes, elem_bytes);
    }
    rows[j] = dst;
  }
}

template <FloatType TYPE, int NQ>
static void attend(const AttentionArgs& a, int b, int g, int l, int h0) {
  constexpr int elem = TYPE == FloatType::f32 ? 4 : 2;
  const int Dh = a.Dh;
  const int C = Dh / kLanes; // Dh is a multiple of 16, so of kLanes
  const int n = a.causal ? a.S - a.L + l + 1 : a.S; // keys this row sees
  const int n_pad = (n + kLanes - 1) / kLanes * kLanes;

  float* q = scratch<float, 0>(static_cast<size_t>(NQ) * Dh);
  float* p = scratch<float, 1>(static_cast<size_t>(NQ) * n_pad);
  float* acc = scratch<float, 2>(static_cast<size_t>(NQ) * Dh);
  uint8_t* tmp = scratch<uint8_t, 3>(static_cast<size_t>(kKeyBlock) * Dh * elem);
  const void* rows[kKeyBlock];

  const int64_t q_row0 = (static_cast<int64_t>(b) * a.Hq + h0) * a.L + l;
  for (int i = 0; i < NQ; ++i) {
    const int64_t at = (q_row0 + static_cast<int64_t>(i) * a.L) * Dh;
    for (int c = 0; c < C; ++c) {
      const vfloat v = load_lanes<TYPE>(a.q, at + c * kLanes) * a.scale;
      std::memcpy(q + i * Dh + c * kLanes, &v, sizeof(v));
    }
  }

  const auto* k_head = static_cast<const uint8_t*>(a.k) +
      (b * a.k_stride[0] + g * a.k_stride[1]) * elem;
  const auto* v_head = static_cast<const uint8_t*>(a.v) +
      (b * a.v_stride[0] + g * a.v_stride[1]) * elem;

  // Scores: one pass over the keys, each row dotted with every head's query.
  for (int j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int nb = std::min(kKeyBlock, n - j0);
    cache_rows(k_head, a.k_stride[2], a.k_stride[3], elem, Dh, j0, nb, tmp, rows);
    for (int j = 0; j < nb; ++j) {
      // Two partial sums per head (even and odd chunks) halve the FMA
      // dependency chains, which otherwise bound this loop.
      vfloat dot[NQ][2] = {};
      int c = 0;
      for (; c + 1 < C; c += 2) {
        const vfloat k0 = load_lanes<TYPE>(rows[j], c * kLanes);
        const vfloat k1 = load_lanes<TYPE>(rows[j], (c + 1) * kLanes);
        for (int i = 0; i < NQ; ++i) {
          dot[i][0] += load(q + i * Dh + c * kLanes) * k0;
          dot[i][1] += load(q + i * Dh + (c + 1) * kLanes) * k1;
        }
      }
      if (c < C) {
        const vfloat k0 = load_lanes<TYPE>(rows[j], c * kLanes);
        for (int i = 0; i < NQ; ++i) {
          dot[i][0] += load(q + i * Dh + c * kLanes) * k0;
        }
      }
      for (int i = 0; i < NQ; ++i) {
        p[i * n_pad + j0 + j] = horizontal_sum(dot[i][0] + dot[i][1]);
      }
    }
  }

  // Softmax numerators with each row's maximum taken out; the padding past
  // n is zeroed so the value pass need not know where a row ends.
  float inv_sum[NQ];
  for (int i = 0; i < NQ; ++i) {
    float* row = p + i * n_pad;
    float m = row[0];
    for (int j = 1; j < n; ++j) {
      m = std::max(m, row[j]);
    }
    vfloat sum = {};
    for (int j = 0; j < n_pad; j += kLanes) {
      vfloat e = exp_nonpositive(load(row + j) - m);
      if (j + kLanes > n) {
        for (int t = n - j; t < kLanes; ++t) {
          e[t] = 0.0f;
        }
      }
      std::memcpy(row + j, &e, sizeof(e));
      sum += e;
    }
    inv_sum[i] = 1.0f / horizontal_sum(sum);
  }

  // Values: the weighted sum, two vectors of every head's output at a time
  // over a block of rows, accumulated in fixed row order.
  std::fill(acc, acc + NQ * Dh, 0.0f);
  for (int j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int nb = std::min(kKeyBlock, n - j0);
    cache_rows(v_head, a.v_stride[2], a.v_stride[3], elem, Dh, j0, nb, tmp, rows);
    for (int c = 0; c < C; c += 2) {
      const int w = std::min(2, C - c);
      vfloat o[NQ][2];
      for (int i = 0; i < NQ; ++i) {
        o[i][0] = load(acc + i * Dh + c * kLanes);
        o[i][1] = w == 2 ? load(acc + i * Dh + (c + 1) * kLanes) : vfloat{};
      }
      for (int j = 0; j < nb; ++j) {
        const vfloat v0 = load_lanes<TYPE>(rows[j], c * kLanes);
        const vfloat v1 = w == 2 ? load_lanes<TYPE>(rows[j], (c + 1) * kLanes) : vfloat{};
        for (int i = 0; i < NQ; ++i) {
          const vfloat pij = vfloat{} + p[i * n_pad + j0 + j];
          o[i][0] += pij * v0;
          o[i][1] += pij * v1;
        }
      }
      for (int i = 0; i < NQ; ++i) {
        std::memcpy(acc + i * Dh + c * kLanes, &o[i][0], sizeof(vfloat));
        if (w == 2) {
          std::memcpy(acc + i * Dh + (c + 1) * kLanes, &o[i][1], sizeof(vfloat));
        }
      }
    }
  }

  for (int i = 0; i < NQ; ++i) {
    const int64_t at = (q_row0 + static_cast<int64_t>(i) * a.L) * Dh;
    for (int d = 0; d < Dh; ++d) {
      store_as(a.out, TYPE, at + d, acc[i * Dh + d] * inv_sum[i]);
    }
  }
}

template <FloatType TYPE>
static void attend_heads(const AttentionArgs& a, int b, int g, int l, int h0, int nq) {
  switch (nq) {
    case 1: return attend<TYPE, 1>(a, b, g, l, h0);
    case 2: return attend<TYPE, 2>(a, b, g, l, h0);
    case 3: return attend<TYPE, 3>(a, b, g, l, h0);
    case 4: return attend<TYPE, 4>(a, b, g, l, h0);
    case 5: return attend<TYPE, 5>(a, b, g, l, h0);
    case 6: return attend<TYPE, 6>(a, b, g, l, h0);
    case 7: return attend<TYPE, 7>(a, b, g, l, h0);
    case 8: return attend<TYPE, 8>(a, b, g, l, h0);
  }
}
static_assert(kAttentionHeads == 8, "attend_heads instantiates 1..8 heads");

static void attention_unit(
    const AttentionArgs& a, int b, int g, int l, int h_begin, int h_end) {
  const int nq = h_end - h_begin;
  switch (a.type) {
    case FloatType::f32: return attend_heads<FloatType::f32>(a, b, g, l, h_begin, nq);
    case FloatType::f16: return attend_heads<FloatType::f16>(a, b, g, l, h_begin, nq);
    case FloatType::bf16: return attend_heads<FloatType::bf16>(a, b, g, l, h_begin, nq);
  }
}

} // namespace fused_moe::cpu::FUSED_MOE_ISA_NS
