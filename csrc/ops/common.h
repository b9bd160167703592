// Pieces every op shares: the argument checks and their error wording, the
// shaping of inputs for a Primitive, and the GPU hand-off helpers. One place
// for each, so every op words the same fault the same way.
#pragma once

#include <algorithm>
#include <array>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

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

// One projection's quantization, as a Primitive carries it.
struct QuantSpec {
  QuantMode mode = QuantMode::affine;
  int bits = 0;
  int group_size = 0;
  bool operator==(const QuantSpec&) const = default;
};

// `mode` by name; ValueError naming it and the supported modes otherwise.
QuantMode parse_mode(const char* op, const char* which, const std::string& mode);

// Checks `q` against the supported grid: affine `bits` in `B` (the
// experts' by default) at any of kSupportedGroupSizes; the fp modes at
// exactly MLX's bits and group size (kFpModes). `which` names the
// projection ("gate_up", "down", "w", ...).
template <size_t N = kSupportedBits.size()>
void check_grid(
    const char* op,
    const char* which,
    const QuantSpec& q,
    const std::array<int, N>& B = kSupportedBits) {
  const std::string w(which);
  if (q.mode != QuantMode::affine) {
    const FpModeSpec& m = fp_mode_spec(q.mode);
    const std::string for_mode = " is not supported for mode " +
        std::string(m.name) + "; supported ";
    if (q.bits != m.bits) {
      fail(op, w + " bits=" + std::to_string(q.bits) + for_mode + "bits: {" +
               std::to_string(m.bits) + "}");
    }
    if (q.group_size != m.group_size) {
      fail(op, w + " group_size=" + std::to_string(q.group_size) + for_mode +
               "group sizes: {" + std::to_string(m.group_size) + "}");
    }
    return;
  }
  const auto& G = kSupportedGroupSizes;
  if (std::find(B.begin(), B.end(), q.bits) == B.end()) {
    fail(op, w + " bits=" + std::to_string(q.bits) +
             " is not supported; supported bits: " + set_str(B));
  }
  if (std::find(G.begin(), G.end(), q.group_size) == G.end()) {
    fail(op, w + " group_size=" + std::to_string(q.group_size) +
             " is not supported; supported group sizes: " + set_str(G));
  }
}

// The same for an affine-only op (the dense linears, the router).
template <size_t N = kSupportedBits.size()>
void check_grid(
    const char* op,
    const char* which,
    int bits,
    int group_size,
    const std::array<int, N>& B = kSupportedBits) {
  check_grid(op, which, QuantSpec{QuantMode::affine, bits, group_size}, B);
}

// The names a quantized matrix's arrays have in error messages.
struct QuantNames {
  std::string weight, scales, biases;
  // "gate_up" -> gate_up_weight, gate_up_scales, gate_up_biases.
  static QuantNames prefixed(const std::string& p) {
    return {p + "_weight", p + "_scales", p + "_biases"};
  }
};

// One dimension of a quantized matrix's leading shape: a fixed size, or any
// size >= 1 taken from the weight (size -1: the expert count E, a dense N).
struct LeadDim {
  const char* name;
  int size;
};

// The one check of "a quantized matrix of this leading shape", for every op
// that reads one (the expert ops, quantized_matmul, quantized_embedding,
// route). With `lead` L and rows of `cols` inputs (named `cols_name`, e.g.
// "D"):
//   weight  L + [cols*bits/32]      uint32, MLX's packing
//   scales  L + [cols/group_size]   affine: a float dtype; the fp modes:
//                                   uint8 (e8m0 or e4m3)
//   biases  like scales             affine only; None for the fp modes
// Affine scales and biases have the dtype of `dtype_owner` when one is
// given (e.g. {x.dtype(), "x"}), else any float dtype, the same for both.
// Returns L with every size -1 resolved from the weight.
struct DtypeOwner {
  mx::Dtype dtype;
  const char* name;
};
mx::Shape check_quantized_matrix(
    const char* op,
    const QuantNames& names,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const std::vector<LeadDim>& lead,
    int cols,
    const char* cols_name,
    const QuantSpec& q,
    std::optional<DtypeOwner> dtype_owner);

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

// An error a failed kernel task left on CPU stream `s` (an expert id out of
// range), raised now, before this op adds graph nodes: evaluated, MLX's own
// nodes would meet it inside its encoder's enqueue, where every tenth
// dispatch has already counted a task that then never completes; a few such
// leaks and every later mx.eval waits forever (MLX 0.32.4;
// tests/test_errors.py, test_many_failed_evals_do_not_hang).
void raise_pending_error(const mx::Stream& s);

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
// Shared by the expert ops (gate_up, down)
// ---------------------------------------------------------------------------

// The run-time parameters of the gate/up activation. kActivations says which
// each activation takes; the others stay 0. linear_beta 0 means none (situ
// then passes u through).
struct ActivationParams {
  Activation kind = Activation::swiglu;
  float limit = 0.0f;
  float alpha = 0.0f;
  float beta = 0.0f;
  float linear_beta = 0.0f;
  bool operator==(const ActivationParams&) const = default;
};

// `name` and its parameters, checked: each activation takes exactly the
// parameters kActivations lists (finite; beta and linear_beta nonzero),
// and anything else is a ValueError naming the value and the supported set.
ActivationParams make_activation(
    const char* op,
    const std::string& name,
    std::optional<float> limit,
    std::optional<float> alpha,
    std::optional<float> beta,
    std::optional<float> linear_beta);

// Everything that distinguishes two calls of an expert op besides shapes
// and dtypes.
struct ExpertSettings {
  QuantSpec quant;
  ActivationParams activation; // gate/up only
  bool bias = false; // an expert bias [E, rows] is an input
  bool global_scale = false; // nvfp4's per-expert tensor scale is an input
  bool x_per_slot = false; // gate/up: x is [..., k, D], one row per slot
  bool combine = true; // down: the weighted sum over k; false: per slot
  bool operator==(const ExpertSettings&) const = default;
};

// Where each input of an expert Primitive sits (-1: absent), in this order:
// x (gate/up) or h (down), weight, scales, biases (affine), indices, weights
// (down with the combine), bias, global_scale, and last the Metal prefill
// order where a GPU stream gets one. Today's affine calls keep today's
// positions.
struct ExpertSlots {
  int x = 0, weight = 1, scales = 2, biases = -1, indices = -1, weights = -1,
      bias = -1, global_scale = -1, order = -1;
  int count = 0; // inputs before `order`
};
ExpertSlots expert_slots(const ExpertSettings& s, bool down);

// The base of the expert Primitives: their settings are all that
// distinguish two instances.
class ExpertPrimitive : public mx::UnaryPrimitive {
 public:
  ExpertPrimitive(mx::Stream stream, const ExpertSettings& settings)
      : mx::UnaryPrimitive(stream), settings_(settings) {}

  bool is_equivalent(const mx::Primitive& other) const override;
  const ExpertSettings& settings() const {
    return settings_;
  }

 protected:
  ExpertSettings settings_;
};

// Whether the Metal kernels cover `s` (down: the down op, else gate/up): the
// quantizations of metal/allow_list.h, with every activation, expert bias,
// global scale, x per slot and down with or without the combine. The one
// place that says so; a GPU stream raises for anything else.
bool metal_has_kernel(bool down, const ExpertSettings& s);

// On a GPU stream: "fused_moe.<op>: no Metal kernel for <setting>"
// (ValueError) where metal_has_kernel is false. Never a silent fallback.
void check_metal_has_kernel(const char* op, bool down, const ExpertSettings& s);

// A validated call: the Primitive's inputs and the output shapes.
struct PreparedCall {
  std::vector<mx::array> inputs;
  mx::Shape primitive_shape; // [T, k, H], [T, D] or [T, k, D]
  mx::Shape out_shape; // the op's result: leading dims restored
};

// The op's result: the Primitive's output, reshaped to the leading dims.
template <typename Primitive>
mx::array primitive_output(
    PreparedCall call,
    mx::Dtype dtype,
    mx::Stream stream,
    const ExpertSettings& settings) {
  auto out = mx::array(
      call.primitive_shape,
      dtype,
      std::make_shared<Primitive>(stream, settings),
      std::move(call.inputs));
  // No reshape node when the shapes agree: a node less after the kernel's
  // (see raise_pending_error).
  if (call.out_shape == call.primitive_shape) {
    return out;
  }
  return mx::reshape(out, call.out_shape, stream);
}

// "fused_moe.<op>: indices[t, j] = id is out of range for E experts ...",
// for pair p = t*k + j: the one wording of a bad expert id on the CPU.
std::string expert_id_error(
    const char* op, int64_t pair, int k, int64_t id, int num_experts);

// On a CPU stream, ids already computed (arrays the caller built, as a rule)
// are range-checked at the call, raising RuntimeError with
// expert_id_error's wording. A bad id then never fails a kernel task, which
// would poison the stream (see raise_pending_error). Ids computed in the
// same graph are checked by the kernel task itself.
void check_expert_ids_now(
    const char* op, const mx::array& indices, int num_experts, const mx::Stream& s);

// The expert ids as uint32, one per (token, slot) pair. A negative int32
// id becomes a large uint32, which every Metal kernel treats as out of range.
mx::array pair_experts(const mx::array& indices, mx::StreamOrDevice s);

} // namespace fused_moe
