// fused_moe.gate_up_swiglu: kernel A, the gate/up projections of the
// selected experts with SwiGLU applied on the fly. CPU evaluation:
// cpu/gate_up_swiglu.cpp.
#pragma once

#include <vector>

#include "ops/common.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

// h[..., j, :] = silu(x · Gᵀ) ⊙ (x · Uᵀ) for expert e = indices[..., j].
//   x              [..., D]          float16 | bfloat16 | float32
//   gate_up_weight [E, 2H, D*bits/32] uint32, gate row r at 2r, up row r at 2r+1
//   gate_up_scales [E, 2H, D/group]   dtype of x
//   gate_up_biases [E, 2H, D/group]   dtype of x
//   indices        [..., k]          uint32 | int32
// Returns h [..., k, H] in the dtype of x.
mx::array gate_up_swiglu(
    const mx::array& x,
    const mx::array& gate_up_weight,
    const mx::array& gate_up_scales,
    const mx::array& gate_up_biases,
    const mx::array& indices,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// The Primitive's inputs as a GPU stream gets them, checked exactly as the
// op checks them but computed on stream `s`. The Linux Metal emulator
// (tests/tools/metal_emulator/) runs the kernels on these.
std::vector<mx::array> gate_up_swiglu_metal_inputs(
    const mx::array& x,
    const mx::array& gate_up_weight,
    const mx::array& gate_up_scales,
    const mx::array& gate_up_biases,
    const mx::array& indices,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs: x [T, D], weight, scales, biases, indices [T, k] (uint32 or int32).
class GateUpSwiglu : public QuantizedPrimitive {
 public:
  using QuantizedPrimitive::QuantizedPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "GateUpSwiglu";
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;
};

} // namespace fused_moe
