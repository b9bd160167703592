// fused_moe.quantized_matmul: one dense affine-quantized linear,
// y = x · dequant(w)ᵀ, as MLX's quantized_matmul computes it (transpose=True,
// mode "affine"). CPU evaluation: cpu/quantized_matmul.cpp. On a GPU stream
// the op is MLX's own quantized_matmul.
#pragma once

#include "ops/common.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

// y[..., n] = Σ_i x[..., i] · (scale·q[n, i] + bias), accumulated in fp32.
//   x       [..., K]          float16 | bfloat16 | float32
//   w       [N, K*bits/32]    uint32, MLX's packing (a little-endian bit
//                             stream of codes per row)
//   scales  [N, K/group_size] dtype of x
//   biases  [N, K/group_size] dtype of x
//   bits in kSupportedLinearBits, group_size in kSupportedGroupSizes.
// Returns y [..., N] in the dtype of x.
mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs: x [T, K], w [N, K*bits/32], scales, biases. Output y [T, N].
class QuantizedMatmul : public QuantizedPrimitive {
 public:
  using QuantizedPrimitive::QuantizedPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "QuantizedMatmul";
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;
};

} // namespace fused_moe
