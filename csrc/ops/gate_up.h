// fused_moe.gate_up: kernel A, the gate/up projections of the selected
// experts with the activation applied on the fly (SwiGLU and the zoo's
// other activations, supported.h), for every quantization of the grid. CPU
// evaluation: cpu/gate_up.cpp. The math: docs/kernel_contract.md.
#pragma once

#include <optional>
#include <vector>

#include "ops/common.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

// h[..., j, :] = act(x_j · Gᵀ + bias_g, x_j · Uᵀ + bias_u) for expert
// e = indices[..., j], where x_j is x[..., :] (x shared by the k slots) or
// x[..., j, :] (x per slot); not gated: act(x_j · Wᵀ + bias).
//   x        [..., D] or [..., k, D]   float16 | bfloat16 | float32
//   weight   [E, R, D*bits/32] uint32, MLX's packing; gated activations:
//            R = 2H, gate row r at 2r, up row r at 2r+1; not gated: R = H
//   scales   [E, R, D/group_size]  affine: dtype of x; fp modes: uint8
//   biases   [E, R, D/group_size]  affine: dtype of x; fp modes: none
//   indices  [..., k]              uint32 | int32
//   bias     [E, R] optional expert bias, a float dtype, rows as weight's
//   global_scale  nvfp4 only, optional float32: [E, 2] (gate's, up's)
//            gated, [E] not gated
// Returns h [..., k, H] in the dtype of x.
mx::array gate_up(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const QuantSpec& quant,
    const ActivationParams& activation,
    const std::optional<mx::array>& bias = std::nullopt,
    const std::optional<mx::array>& global_scale = std::nullopt,
    mx::StreamOrDevice s = {});

// The Primitive's inputs as a GPU stream gets them, checked exactly as the
// op checks them but computed on stream `s`. The Linux Metal emulator
// (tests/tools/metal_emulator/) runs the kernels on these.
std::vector<mx::array> gate_up_metal_inputs(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const QuantSpec& quant,
    const ActivationParams& activation,
    const std::optional<mx::array>& bias = std::nullopt,
    const std::optional<mx::array>& global_scale = std::nullopt,
    mx::StreamOrDevice s = {});

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs (expert_slots): x [T, D] (x shared) or [T*k, D] (per slot),
// weight, scales, [biases], indices [T, k] (uint32 or int32), [bias],
// [global_scale]. Output h [T, k, H].
class GateUp : public ExpertPrimitive {
 public:
  using ExpertPrimitive::ExpertPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "GateUp";
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;
};

} // namespace fused_moe
