// fused_moe ops: the public C++ functions and their MLX Primitives.
//
// Layout of this file follows MLX's extension example: the op, then the
// Primitive. The op functions validate everything; the Primitives only ever
// see contiguous, checked inputs.
#pragma once

#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace fused_moe {

namespace mx = mlx::core;

// ---------------------------------------------------------------------------
// Ops
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

// The inputs the Primitives receive on a GPU stream (the Metal kernels'
// inputs: with the expert-sorted pair order for the prefill variants and
// float32 router weights), checked exactly as the ops check them but
// computed on stream `s`. The Linux Metal emulator (tests/metal_emulator/)
// runs the kernels on these.
std::vector<mx::array> gate_up_swiglu_metal_inputs(
    const mx::array& x,
    const mx::array& gate_up_weight,
    const mx::array& gate_up_scales,
    const mx::array& gate_up_biases,
    const mx::array& indices,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

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
// Primitives
// ---------------------------------------------------------------------------

// Shared by both ops: the quantization of the projection it reads, which is
// all that distinguishes two instances.
class QuantizedExpertsPrimitive : public mx::UnaryPrimitive {
 public:
  QuantizedExpertsPrimitive(mx::Stream stream, int bits, int group_size)
      : mx::UnaryPrimitive(stream), bits_(bits), group_size_(group_size) {}

  bool is_equivalent(const mx::Primitive& other) const override;

 protected:
  int bits_;
  int group_size_;
};

// Inputs: x [T, D], weight, scales, biases, indices [T, k] (uint32 or int32).
class GateUpSwiglu : public QuantizedExpertsPrimitive {
 public:
  using QuantizedExpertsPrimitive::QuantizedExpertsPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "GateUpSwiglu";
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;
};

// Inputs: h [T, k, H], weight, scales, biases, indices [T, k], weights [T, k].
class DownCombine : public QuantizedExpertsPrimitive {
 public:
  using QuantizedExpertsPrimitive::QuantizedExpertsPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "DownCombine";
  }
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;
};

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
