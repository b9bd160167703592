// fused_moe.norm_rope: an attention projection's RMSNorm (optional) and
// rotary embedding in one op, heads split out, what MiniMax runs on q and k
// between the projections and the attention: mx.fast.rms_norm, the reshape
// to [B, heads, L, head_dim] and mx.fast.rope. CPU evaluation:
// cpu/norm_rope.cpp. On a GPU stream the op is MLX's own three steps.
#pragma once

#include <optional>

#include "ops/common.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

// out[b, h, l] = rope(rmsnorm(x[b, l]) · weight)[h·Dh, (h+1)·Dh), at
// position (offset + l)·scale.
//   x       [B, L, heads*Dh]  float16 | bfloat16 | float32
//   weight  [heads*Dh]        a float dtype, or none (no norm)
// RMSNorm over the whole last axis: x · rsqrt(mean(x²) + eps) · weight. RoPE
// on the first rotary_dim (even, <= Dh) values of each head, angle
// position · base^(-2i/rotary_dim) for pair i; pairs (i, i + rotary_dim/2),
// or (2i, 2i + 1) when traditional. Returns [B, heads, L, Dh] in the dtype
// mx.fast.rms_norm gives (that of x promoted with weight's); fp32 arithmetic,
// angles in fp64.
mx::array norm_rope(
    const mx::array& x,
    const std::optional<mx::array>& weight,
    int heads,
    float eps,
    int rotary_dim,
    bool traditional,
    float base,
    float scale,
    int offset,
    mx::StreamOrDevice s = {});

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs: x [B, L, heads*Dh] row-contiguous, then the weight if any.
class NormRope : public mx::UnaryPrimitive {
 public:
  NormRope(mx::Stream stream, int heads, float eps, int rotary_dim,
           bool traditional, float base, float scale, int offset)
      : mx::UnaryPrimitive(stream), heads_(heads), eps_(eps),
        rotary_dim_(rotary_dim), traditional_(traditional), base_(base),
        scale_(scale), offset_(offset) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "NormRope";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  int heads_;
  float eps_;
  int rotary_dim_;
  bool traditional_;
  float base_;
  float scale_;
  int offset_;
};

} // namespace fused_moe
