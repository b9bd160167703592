// fused_moe.quantized_embedding: rows of a dense affine-quantized matrix,
// dequantized (mlx's QuantizedEmbedding). CPU evaluation:
// cpu/quantized_embedding.cpp. On a GPU stream the op is MLX's own gather
// and dequantize.
#pragma once

#include "ops/common.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

// out[..., :] = scale·q[ids[...], :] + bias.
//   ids     [...]             any integer dtype; each in [0, N)
//   w       [N, K*bits/32]    uint32, MLX's packing
//   scales  [N, K/group_size] float16 | bfloat16 | float32
//   biases  [N, K/group_size] dtype of scales
// Returns [..., K] in the dtype of scales. A row id outside [0, N) raises
// from mx.eval on the CPU, naming the entry; no out-of-bounds read.
mx::array quantized_embedding(
    const mx::array& ids,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs: ids [T] int64, w, scales, biases. Output [T, K].
class QuantizedEmbedding : public QuantizedPrimitive {
 public:
  using QuantizedPrimitive::QuantizedPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "QuantizedEmbedding";
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;
};

} // namespace fused_moe
