// fused_moe.scaled_dot_product_attention: softmax(q·kᵀ·scale)·v over a KV
// cache with grouped-query heads, what mx.fast.scaled_dot_product_attention
// computes for a mask of None or "causal"; and
// fused_moe.quantized_scaled_dot_product_attention, the same over mlx-lm's
// quantized KV cache (QuantizedKVCache: MLX's affine format). CPU
// evaluation: cpu/attention.cpp. On a GPU stream the first is MLX's own
// fused attention and the second MLX's quantized matmuls, as mlx-lm runs it.
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

// The same over a quantized KV cache, read where it lies (mlx-lm's
// QuantizedKVCache hands over its buffers' slices): each of k and v is
// (codes, scales, biases) in MLX's affine format along head_dim,
//   codes   [B, Hkv, S, Dh·bits/32]  uint32, `bits`-bit codes, least
//                                    significant bits first
//   scales  [B, Hkv, S, Dh/group_size]  in the dtype of q
//   biases  like scales
// value = scale·code + bias. bits in kSupportedKvCacheBits, group_size in
// kSupportedGroupSizes dividing Dh; q and the result as above.
mx::array quantized_scaled_dot_product_attention(
    const mx::array& q,
    const mx::array& k_codes,
    const mx::array& k_scales,
    const mx::array& k_biases,
    const mx::array& v_codes,
    const mx::array& v_scales,
    const mx::array& v_biases,
    float scale,
    bool causal,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// Head sizes the CPU kernel takes: multiples of this (the widest vector's
// lanes), up to kMaxAttentionHeadDim.
constexpr int kAttentionHeadDimMultiple = 16;
constexpr int kMaxAttentionHeadDim = 512;
// Bits of a quantized KV cache the kernel unpacks (mlx-lm's kv_bits).
inline constexpr std::array<int, 2> kSupportedKvCacheBits = {4, 8};

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs: q (row-contiguous), then k, v (views as given), or with bits > 0
// k_codes, k_scales, k_biases, v_codes, v_scales, v_biases (views as
// given). Output like q.
class Attention : public mx::UnaryPrimitive {
 public:
  Attention(mx::Stream stream, float scale, bool causal, int bits = 0, int group_size = 0)
      : mx::UnaryPrimitive(stream),
        scale_(scale),
        causal_(causal),
        bits_(bits),
        group_size_(group_size) {}

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
  int bits_; // 0: a float cache
  int group_size_;
};

} // namespace fused_moe
