// fused_moe.down_combine and fused_moe.down_slots: kernel B, the down
// projection of the selected experts, either with the router weights and
// the sum over k folded in (down_combine) or one output row per slot
// (down_slots: mlx-lm's SwitchGLU contract, where the model applies its
// scores and sums itself). Every quantization of the grid. CPU evaluation:
// cpu/down.cpp. The math: docs/kernel_contract.md.
#pragma once

#include <optional>
#include <vector>

#include "ops/common.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

// down_combine: y[..., :] = Σ_j weights[..., j] · (h[..., j, :] · Dᵀ + bias),
// accumulated in fp32; D = the down weights of expert e = indices[..., j].
// down_slots:   y[..., j, :] = h[..., j, :] · Dᵀ + bias, in fp32, stored in
// the dtype of h.
//   h        [..., k, H]          float16 | bfloat16 | float32
//   weight   [E, D, H*bits/32]    uint32, MLX's packing
//   scales   [E, D, H/group_size] affine: dtype of h; fp modes: uint8
//   biases   [E, D, H/group_size] affine: dtype of h; fp modes: none
//   indices  [..., k]             uint32 | int32
//   weights  [..., k]             down_combine only: float32 or h's dtype
//   bias     [E, D] optional expert bias, a float dtype
//   global_scale  [E] float32, nvfp4 only, optional
// Returns y [..., D] (down_combine) or [..., k, D] (down_slots) in the dtype
// of h.
mx::array down_combine(
    const mx::array& h,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const mx::array& weights,
    const QuantSpec& quant,
    const std::optional<mx::array>& bias = std::nullopt,
    const std::optional<mx::array>& global_scale = std::nullopt,
    mx::StreamOrDevice s = {});

mx::array down_slots(
    const mx::array& h,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const QuantSpec& quant,
    const std::optional<mx::array>& bias = std::nullopt,
    const std::optional<mx::array>& global_scale = std::nullopt,
    mx::StreamOrDevice s = {});

// The Primitive's inputs as a GPU stream gets them, checked exactly as the
// op checks them but computed on stream `s`; `weights` absent: down_slots.
// The Linux Metal emulator (tests/tools/metal_emulator/) runs the kernels on
// these.
std::vector<mx::array> down_metal_inputs(
    const mx::array& h,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const std::optional<mx::array>& weights,
    const QuantSpec& quant,
    const std::optional<mx::array>& bias = std::nullopt,
    const std::optional<mx::array>& global_scale = std::nullopt,
    mx::StreamOrDevice s = {});

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs (expert_slots): h [T, k, H], weight, scales, [biases], indices
// [T, k], [weights [T, k]: with the combine], [bias], [global_scale].
// Output y [T, D] with the combine, [T, k, D] per slot.
class Down : public ExpertPrimitive {
 public:
  using ExpertPrimitive::ExpertPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return settings_.combine ? "DownCombine" : "DownSlots";
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;
};

} // namespace fused_moe
