// fused_moe.down_combine: kernel B, the down projection of the selected
// experts with the router weights and the sum over k folded in. CPU
// evaluation: cpu/down_combine.cpp.
#pragma once

#include <vector>

#include "ops/common.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

// y[..., :] = Σ_j weights[..., j] · (h[..., j, :] · Dᵀ), accumulated in fp32.
//   h           [..., k, H]         float16 | bfloat16 | float32
//   down_weight [E, D, H*bits/32]   uint32
//   down_scales [E, D, H/group]     dtype of h
//   down_biases [E, D, H/group]     dtype of h
//   indices     [..., k]            uint32 | int32
//   weights     [..., k]            float32 or the dtype of h
// Returns y [..., D] in the dtype of h.
mx::array down_combine(
    const mx::array& h,
    const mx::array& down_weight,
    const mx::array& down_scales,
    const mx::array& down_biases,
    const mx::array& indices,
    const mx::array& weights,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// The Primitive's inputs as a GPU stream gets them, checked exactly as the
// op checks them but computed on stream `s`. The Linux Metal emulator
// (tests/tools/metal_emulator/) runs the kernels on these.
std::vector<mx::array> down_combine_metal_inputs(
    const mx::array& h,
    const mx::array& down_weight,
    const mx::array& down_scales,
    const mx::array& down_biases,
    const mx::array& indices,
    const mx::array& weights,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs: h [T, k, H], weight, scales, biases, indices [T, k], weights [T, k].
class DownCombine : public QuantizedPrimitive {
 public:
  using QuantizedPrimitive::QuantizedPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "DownCombine";
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;
};

} // namespace fused_moe
