// fused_moe ops: the public C++ functions and their MLX Primitives.
//
// Layout of this file follows MLX's extension example: the op, then the
// Primitive. The op functions validate everything; the Primitives only ever
// see contiguous, checked inputs.
#pragma once

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

} // namespace fused_moe
