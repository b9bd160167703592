// fused_moe.scaled_dot_product_attention: softmax(q·kᵀ·scale)·v over a KV
// cache with grouped-query heads, what mx.fast.scaled_dot_product_attention
// computes for a mask of None or "causal". CPU evaluation: cpu/attention.cpp.
// On a GPU stream the op is MLX's own fused attention.
#pragma once

#include "ops/common.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

// out[b, h, l] = softmax(q[b, h, l] · k[b, h/G]ᵀ · scale) · v[b, h/G], G = Hq/Hkv.
//   q  [B, Hq, L, Dh]   float16 | bfloat16 | float32
//   k  [B, Hkv, S, Dh]  dtype of q; any strides (a cache slice is read in place)
//   v  [B, Hkv, S, Dh]  dtype of q
// Dh is a multiple of kAttentionHeadDimMultiple, at most kMaxAttentionHeadDim;
// Hq a multiple of Hkv.
// causal: query row l sees keys [0, S - L + l] (the last L positions are the
// queries'), so L <= S. Returns [B, Hq, L, Dh] in the dtype of q; the
// arithmetic is fp32.
mx::array scaled_dot_product_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    bool causal,
    mx::StreamOrDevice s = {});

// Head sizes the CPU kernel takes: multiples of this (the widest vector's
// lanes), up to kMaxAttentionHeadDim.
constexpr int kAttentionHeadDimMultiple = 16;
constexpr int kMaxAttentionHeadDim = 512;

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs: q (row-contiguous), k, v (views as given). Output like q.
class Attention : public mx::UnaryPrimitive {
 public:
  Attention(mx::Stream stream, float scale, bool causal)
      : mx::UnaryPrimitive(stream), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "Attention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  float scale_;
  bool causal_;
};

} // namespace fused_moe
