// fused_moe.route: the MiniMax router (gate matmul, sigmoid, biased top-k,
// renormalisation) as one Primitive. CPU evaluation: cpu/route.cpp.
#pragma once

#include <optional>
#include <vector>

#include "ops/common.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

// The MoE router, as mlx-lm's MiniMax block computes it:
//   scores  = sigmoid(x · Wᵀ), in fp32 whatever the dtypes of x and W;
//   indices = the k experts of highest scores + bias;
//   weights = scores[indices] / (Σ scores[indices] + 1e-20).
//   x            [..., D]  float16 | bfloat16 | float32
//   gate_weight  [E, D]    float16 | bfloat16 | float32 (unquantized), or
//                [E, D*bits/32] uint32 (affine quantized, bits in
//                kSupportedRouterBits, w = scale·q + bias per group)
//   gate_scales  [E, D/group_size] float; given iff the gate is quantized,
//   gate_biases  [E, D/group_size] float; as are bits and group_size
//   bias         [E]       float, added in fp32
// Ties: among equal biased scores the lower expert index ranks first; a NaN
// biased score ranks below every number (among NaNs, lower index first).
// Returns {indices [..., k] uint32, weights [..., k] float32}, best first.
std::vector<mx::array> route(
    const mx::array& x,
    const mx::array& gate_weight,
    const std::optional<mx::array>& gate_scales,
    const std::optional<mx::array>& gate_biases,
    const mx::array& bias,
    int k,
    std::optional<int> bits,
    std::optional<int> group_size,
    mx::StreamOrDevice s = {});

// The Primitive's inputs as a GPU stream gets them, checked exactly as the
// op checks them but computed on stream `s`. The Linux Metal emulator
// (tests/tools/metal_emulator/) runs the kernels on these.
std::vector<mx::array> route_metal_inputs(
    const mx::array& x,
    const mx::array& gate_weight,
    const std::optional<mx::array>& gate_scales,
    const std::optional<mx::array>& gate_biases,
    const mx::array& bias,
    int k,
    std::optional<int> bits,
    std::optional<int> group_size,
    mx::StreamOrDevice s = {});

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

// Inputs: x [T, D], gate_weight, bias [E], then gate_scales and gate_biases
// when quantized. Outputs: indices [T, k] uint32, weights [T, k] float32.
class Route : public mx::Primitive {
 public:
  // bits == 0: an unquantized gate.
  Route(mx::Stream stream, int k, int bits, int group_size)
      : mx::Primitive(stream), k_(k), bits_(bits), group_size_(group_size) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "Route";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  int k_;
  int bits_;
  int group_size_;
};

} // namespace fused_moe
