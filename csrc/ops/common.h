// Pieces every op shares: the argument checks and their error wording, the
// shaping of inputs for a Primitive, and the GPU hand-off helpers. One place
// for each, so every op words the same fault the same way.
#pragma once

#include <algorithm>
#include <array>
#include <sstream>
#include <string>

#include "supported.h"
#include "metal/launch_plan.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace fused_moe {

namespace mx = mlx::core;

// ---------------------------------------------------------------------------
// Error wording
// ---------------------------------------------------------------------------

std::string shape_str(const mx::Shape& shape);
std::string dtype_str(mx::Dtype t);

template <size_t N>
std::string set_str(const std::array<int, N>& values) {
  std::ostringstream os;
  os << "{";
  for (size_t i = 0; i < N; ++i) {
    os << (i ? ", " : "") << values[i];
  }
  os << "}";
  return os.str();
}


// Raised as ValueError in Python: "fused_moe.<op>: <msg>".
[[noreturn]] void fail(const char* op, const std::string& msg);

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

bool is_float(mx::Dtype t);

// `B`: the bits this op accepts (the experts' by default).
template <size_t N = kSupportedBits.size()>
void check_grid(
    const char* op,
    const char* which,
    int bits,
    int group_size,
    const std::array<int, N>& B = kSupportedBits) {
  const auto& G = kSupportedGroupSizes;
  if (std::find(B.begin(), B.end(), bits) == B.end()) {
    fail(op, std::string(which) + " bits=" + std::to_string(bits) +
             " is not supported; supported bits: " + set_str(B));
  }
  if (std::find(G.begin(), G.end(), group_size) == G.end()) {
    fail(op, std::string(which) + " group_size=" + std::to_string(group_size) +
             " is not supported; supported group sizes: " + set_str(G));
  }
}

// Checks one stacked quantized matrix [E, rows, cols] against the expected
// rows and cols; returns E.
int check_quant_matrix(
    const char* op,
    const char* name, // e.g. "gate_up" -> gate_up_weight, ...
    const mx::array& weight,
    const mx::array& scales,
    const mx::array& biases,
    int rows,
    int cols,
    int bits,
    int group_size,
    mx::Dtype act_dtype,
    const char* act_name);

// Checks one dense quantized matrix: weight [N, K*bits/32] uint32, scales
// and biases [N, K/group_size] of `scale_dtype`; returns N.
int check_dense_quant_matrix(
    const char* op,
    const mx::array& weight,
    const mx::array& scales,
    const mx::array& biases,
    int K,
    int bits,
    int group_size,
    mx::Dtype scale_dtype,
    const char* dtype_owner);

void check_top_k(const char* op, int k);

// Checks indices [..., k] against the leading shape; returns k.
int check_indices(const char* op, const mx::array& indices, const mx::Shape& lead);

// D and H are each the input width of one projection, so a multiple of its
// group size; the kernels rely on that for whole 32-code blocks.
void check_multiple_of_32(const char* op, const char* what, int v);

// ---------------------------------------------------------------------------
// Shaping inputs
// ---------------------------------------------------------------------------

// `a` as row-contiguous [-1, cols].
mx::array flatten_rows(const mx::array& a, int cols, mx::StreamOrDevice s);

// `a` itself when it is already computed and row-contiguous (weights, as a
// rule): a graph node less, which counts in a 30 µs op.
mx::array row_contiguous(const mx::array& a, mx::StreamOrDevice s);

// ---------------------------------------------------------------------------
// GPU
// ---------------------------------------------------------------------------

// GPU streams get the Metal Primitive inputs (the expert-sorted pair order of
// the prefill kernels, float32 router weights).
bool uses_metal(const mx::Stream& s);

metal::Dtype metal_dtype(mx::Dtype t);

// Other GPU backends than Metal refuse loudly, never fall back.
[[noreturn]] void no_gpu(const char* name);

// ---------------------------------------------------------------------------
// Primitives
// ---------------------------------------------------------------------------

// The base of every Primitive that reads one quantized matrix: its bits and
// group size are all that distinguish two instances.
class QuantizedPrimitive : public mx::UnaryPrimitive {
 public:
  QuantizedPrimitive(mx::Stream stream, int bits, int group_size)
      : mx::UnaryPrimitive(stream), bits_(bits), group_size_(group_size) {}

  bool is_equivalent(const mx::Primitive& other) const override;

 protected:
  int bits_;
  int group_size_;
};

// ---------------------------------------------------------------------------
// Shared by the expert ops (gate_up_swiglu, down_combine)
// ---------------------------------------------------------------------------

// A validated call: the Primitive's inputs and the output shapes.
struct PreparedCall {
  std::vector<mx::array> inputs;
  mx::Shape primitive_shape; // [T, k, H] or [T, D]
  mx::Shape out_shape; // the op's result: leading dims restored
};

// The op's result: the Primitive's output, reshaped to the leading dims.
template <typename Primitive>
mx::array primitive_output(
    PreparedCall call,
    mx::Dtype dtype,
    mx::Stream stream,
    int bits,
    int group_size) {
  auto out = mx::array(
      call.primitive_shape,
      dtype,
      std::make_shared<Primitive>(stream, bits, group_size),
      std::move(call.inputs));
  return mx::reshape(out, call.out_shape, stream);
}


// The expert ids as uint32, one per (token, slot) pair. A negative int32
// id becomes a large uint32, which every Metal kernel treats as out of range.
mx::array pair_experts(const mx::array& indices, mx::StreamOrDevice s);

} // namespace fused_moe
