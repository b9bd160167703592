// The fused MoE ops: argument checking, the Primitive objects, and the GPU
// entry points. CPU evaluation lives in cpu/dispatch.cpp and cpu/route.cpp.
#include "ops.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "grid.h"
#include "metal/launch_plan.h"
#if defined(FUSED_MOE_METAL)
#include "metal/eval_gpu.h"
#endif

namespace fused_moe {

// ---------------------------------------------------------------------------
// Argument checking
// ---------------------------------------------------------------------------

namespace {

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    os << (i ? ", " : "") << shape[i];
  }
  os << "]";
  return os.str();
}

std::string dtype_str(mx::Dtype t) {
  std::ostringstream os;
  os << t;
  return os.str();
}

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

// Raised as ValueError in Python.
[[noreturn]] void fail(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string("fused_moe.") + op + ": " + msg);
}

bool is_float(mx::Dtype t) {
  return t == mx::float16 || t == mx::bfloat16 || t == mx::float32;
}

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
    const char* act_name) {
  const std::string n(name);
  if (weight.dtype() != mx::uint32) {
    fail(op, n + "_weight must be uint32, got " + dtype_str(weight.dtype()));
  }
  if (weight.ndim() != 3 || weight.shape(0) < 1) {
    fail(op, n + "_weight must be [E, " + std::to_string(rows) + ", " +
             std::to_string(cols * bits / 32) + "] with E >= 1, got " +
             shape_str(weight.shape()));
  }
  const int E = weight.shape(0);
  const mx::Shape w_shape = {E, rows, cols * bits / 32};
  const mx::Shape s_shape = {E, rows, cols / group_size};
  if (weight.shape() != w_shape) {
    fail(op, n + "_weight has shape " + shape_str(weight.shape()) +
             " but " + std::to_string(bits) + "-bit rows of " +
             std::to_string(cols) + " inputs need " + shape_str(w_shape));
  }
  for (const auto* a : {&scales, &biases}) {
    const std::string an = n + (a == &scales ? "_scales" : "_biases");
    if (a->shape() != s_shape) {
      fail(op, an + " has shape " + shape_str(a->shape()) + ", expected " +
               shape_str(s_shape) + " for group_size=" +
               std::to_string(group_size));
    }
    if (a->dtype() != act_dtype) {
      fail(op, an + " has dtype " + dtype_str(a->dtype()) + " but " +
               act_name + " has dtype " + dtype_str(act_dtype) + "; " +
               act_name + " must have the dtype of the packed scales and "
               "biases");
    }
  }
  return E;
}

void check_top_k(const char* op, int k) {
  if (k < kMinTopK || k > kMaxTopK) {
    fail(op, "k=" + std::to_string(k) + " experts per token is not "
             "supported; supported k: " + std::to_string(kMinTopK) + ".." +
             std::to_string(kMaxTopK));
  }
}

// Checks indices [..., k] against the leading shape; returns k.
int check_indices(const char* op, const mx::array& indices, const mx::Shape& lead) {
  if (indices.dtype() != mx::uint32 && indices.dtype() != mx::int32) {
    fail(op, "indices must be uint32 or int32, got " +
             dtype_str(indices.dtype()));
  }
  mx::Shape got_lead(indices.shape().begin(), indices.shape().end());
  if (indices.ndim() >= 1) {
    got_lead.pop_back();
  }
  if (indices.ndim() < 1 || got_lead != lead) {
    fail(op, "indices must have shape " + shape_str(lead) +
             " + [k], got " + shape_str(indices.shape()));
  }
  const int k = indices.shape(-1);
  check_top_k(op, k);
  return k;
}

void check_multiple_of_32(const char* op, const char* what, int v) {
  // D and H are each the input width of one projection, so a multiple of its
  // group size; the kernels rely on that for whole 32-code blocks.
  if (v % 32 != 0 || v <= 0) {
    fail(op, std::string(what) + "=" + std::to_string(v) +
             " must be a positive multiple of 32");
  }
}

mx::array flatten_rows(const mx::array& a, int cols, mx::StreamOrDevice s) {
  return mx::contiguous(mx::reshape(a, {-1, cols}, s), false, s);
}

// `a` itself when it is already computed and row-contiguous (weights, as a
// rule): a graph node less, which counts in a 30 µs op.
mx::array row_contiguous(const mx::array& a, mx::StreamOrDevice s) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, s);
}

} // namespace

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------

namespace {

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

// GPU streams get the Metal Primitive inputs (the expert-sorted pair order of
// the prefill kernels, float32 router weights).
bool uses_metal(const mx::Stream& s) {
  return s.device == mx::Device::gpu;
}

// The expert ids as uint32, one per (token, slot) pair. A negative int32
// id becomes a large uint32, which every Metal kernel treats as out of range.
mx::array pair_experts(const mx::array& indices, mx::StreamOrDevice s) {
  return mx::astype(mx::reshape(indices, {-1}, s), mx::uint32, s);
}

PreparedCall prepare_gate_up_swiglu(
    const mx::array& x,
    const mx::array& gate_up_weight,
    const mx::array& gate_up_scales,
    const mx::array& gate_up_biases,
    const mx::array& indices,
    int bits,
    int group_size,
    mx::Stream stream,
    bool metal_inputs) {
  constexpr const char* op = "gate_up_swiglu";
  check_grid(op, "gate_up", bits, group_size);
  if (!is_float(x.dtype())) {
    fail(op, "x must be float16, bfloat16 or float32, got " +
             dtype_str(x.dtype()));
  }
  if (x.ndim() < 1) {
    fail(op, "x must have shape [..., D], got a scalar");
  }
  const int D = x.shape(-1);
  check_multiple_of_32(op, "D (x.shape[-1])", D);
  if (D % group_size != 0) {
    fail(op, "D=" + std::to_string(D) + " is not a multiple of group_size=" +
             std::to_string(group_size));
  }
  if (gate_up_weight.ndim() != 3 || gate_up_weight.shape(1) % 2 != 0) {
    fail(op, "gate_up_weight must be [E, 2H, D*bits/32] with gate and up "
             "rows interleaved, got " + shape_str(gate_up_weight.shape()));
  }
  const int H = gate_up_weight.shape(1) / 2;
  check_multiple_of_32(op, "H (gate_up_weight.shape[1] / 2)", H);
  check_quant_matrix(
      op, "gate_up", gate_up_weight, gate_up_scales, gate_up_biases, 2 * H, D,
      bits, group_size, x.dtype(), "x");
  mx::Shape lead(x.shape().begin(), x.shape().end() - 1);
  const int k = check_indices(op, indices, lead);

  std::vector<mx::array> inputs = {
      flatten_rows(x, D, stream),
      mx::contiguous(gate_up_weight, false, stream),
      mx::contiguous(gate_up_scales, false, stream),
      mx::contiguous(gate_up_biases, false, stream),
      flatten_rows(indices, k, stream)};
  const int T = inputs[0].shape(0);
  if (metal_inputs && metal::choose_variant(T, k) == metal::Variant::prefill) {
    // Pairs in increasing expert order (ids >= E, and negative int32 ids,
    // last). Pairs are independent in kernel A, so the order among equal
    // ids does not matter. Computed on the device: no sync to the host.
    const int E = gate_up_weight.shape(0);
    auto ids = mx::minimum(
        pair_experts(indices, stream), mx::array(uint32_t(E)), stream);
    inputs.push_back(mx::astype(mx::argsort(ids, stream), mx::uint32, stream));
  }
  mx::Shape out_shape = lead;
  out_shape.push_back(k);
  out_shape.push_back(H);
  return {std::move(inputs), {T, k, H}, out_shape};
}

} // namespace

mx::array gate_up_swiglu(
    const mx::array& x,
    const mx::array& gate_up_weight,
    const mx::array& gate_up_scales,
    const mx::array& gate_up_biases,
    const mx::array& indices,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  auto call = prepare_gate_up_swiglu(
      x, gate_up_weight, gate_up_scales, gate_up_biases, indices, bits,
      group_size, stream, /*metal_inputs=*/uses_metal(stream));
  return primitive_output<GateUpSwiglu>(
      std::move(call), x.dtype(), stream, bits, group_size);
}

std::vector<mx::array> gate_up_swiglu_metal_inputs(
    const mx::array& x,
    const mx::array& gate_up_weight,
    const mx::array& gate_up_scales,
    const mx::array& gate_up_biases,
    const mx::array& indices,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  return prepare_gate_up_swiglu(
             x, gate_up_weight, gate_up_scales, gate_up_biases, indices, bits,
             group_size, mx::to_stream(s), /*metal_inputs=*/true)
      .inputs;
}

namespace {

PreparedCall prepare_down_combine(
    const mx::array& h,
    const mx::array& down_weight,
    const mx::array& down_scales,
    const mx::array& down_biases,
    const mx::array& indices,
    const mx::array& weights,
    int bits,
    int group_size,
    mx::Stream stream,
    bool metal_inputs) {
  constexpr const char* op = "down_combine";
  check_grid(op, "down", bits, group_size);
  if (!is_float(h.dtype())) {
    fail(op, "h must be float16, bfloat16 or float32, got " +
             dtype_str(h.dtype()));
  }
  if (h.ndim() < 2) {
    fail(op, "h must have shape [..., k, H], got " + shape_str(h.shape()));
  }
  const int H = h.shape(-1);
  check_multiple_of_32(op, "H (h.shape[-1])", H);
  if (H % group_size != 0) {
    fail(op, "H=" + std::to_string(H) + " is not a multiple of group_size=" +
             std::to_string(group_size));
  }
  if (down_weight.ndim() != 3) {
    fail(op, "down_weight must be [E, D, H*bits/32], got " +
             shape_str(down_weight.shape()));
  }
  const int D = down_weight.shape(1);
  check_multiple_of_32(op, "D (down_weight.shape[1])", D);
  check_quant_matrix(
      op, "down", down_weight, down_scales, down_biases, D, H, bits,
      group_size, h.dtype(), "h");
  mx::Shape lead(h.shape().begin(), h.shape().end() - 2);
  const int k = check_indices(op, indices, lead);
  if (h.shape(-2) != k) {
    fail(op, "h has " + std::to_string(h.shape(-2)) + " expert slots (shape " +
             shape_str(h.shape()) + ") but indices has k=" +
             std::to_string(k));
  }
  if (weights.shape() != indices.shape()) {
    fail(op, "weights must have the shape of indices " +
             shape_str(indices.shape()) + ", got " +
             shape_str(weights.shape()));
  }
  if (weights.dtype() != mx::float32 && weights.dtype() != h.dtype()) {
    fail(op, "weights must be float32 or the dtype of h (" +
             dtype_str(h.dtype()) + "), got " + dtype_str(weights.dtype()));
  }

  std::vector<mx::array> inputs = {
      mx::contiguous(mx::reshape(h, {-1, k, H}, stream), false, stream),
      mx::contiguous(down_weight, false, stream),
      mx::contiguous(down_scales, false, stream),
      mx::contiguous(down_biases, false, stream),
      flatten_rows(indices, k, stream),
      flatten_rows(weights, k, stream)};
  const int T = inputs[0].shape(0);
  const int E = down_weight.shape(0);
  if (metal_inputs) {
    // The Metal kernels read float32 router weights.
    inputs[5] = mx::astype(inputs[5], mx::float32, stream);
  }
  if (metal_inputs && metal::choose_variant(T, k) == metal::Variant::prefill) {
    // Pairs sorted by (block of tokens, expert, pair): the kernel's
    // threadgroup for a block of tokens finds that block's pairs together,
    // grouped by expert (ids >= E last). The keys are unique, so the order,
    // and with it the fp32 summation order, does not depend on the sort.
    const int block_pairs = metal::down_prefill_tokens_per_threadgroup() * k;
    if (int64_t(T) * k * (int64_t(E) + 1) > int64_t(UINT32_MAX)) {
      fail(op, "T*k=" + std::to_string(int64_t(T) * k) + " pairs with E=" +
               std::to_string(E) + " experts exceed the 32-bit sort keys of "
               "the Metal prefill kernel");
    }
    auto pair = mx::arange(0, T * k, mx::uint32, stream);
    auto block = mx::floor_divide(pair, mx::array(uint32_t(block_pairs)), stream);
    auto within = mx::remainder(pair, mx::array(uint32_t(block_pairs)), stream);
    auto ids = mx::minimum(
        pair_experts(indices, stream), mx::array(uint32_t(E)), stream);
    auto key = mx::add(
        mx::multiply(
            mx::add(
                mx::multiply(block, mx::array(uint32_t(E + 1)), stream), ids,
                stream),
            mx::array(uint32_t(block_pairs)), stream),
        within, stream);
    inputs.push_back(mx::astype(mx::argsort(key, stream), mx::uint32, stream));
  }
  mx::Shape out_shape = lead;
  out_shape.push_back(D);
  return {std::move(inputs), {T, D}, out_shape};
}

} // namespace

mx::array down_combine(
    const mx::array& h,
    const mx::array& down_weight,
    const mx::array& down_scales,
    const mx::array& down_biases,
    const mx::array& indices,
    const mx::array& weights,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  auto call = prepare_down_combine(
      h, down_weight, down_scales, down_biases, indices, weights, bits,
      group_size, stream, /*metal_inputs=*/uses_metal(stream));
  return primitive_output<DownCombine>(
      std::move(call), h.dtype(), stream, bits, group_size);
}

std::vector<mx::array> down_combine_metal_inputs(
    const mx::array& h,
    const mx::array& down_weight,
    const mx::array& down_scales,
    const mx::array& down_biases,
    const mx::array& indices,
    const mx::array& weights,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  return prepare_down_combine(
             h, down_weight, down_scales, down_biases, indices, weights, bits,
             group_size, mx::to_stream(s), /*metal_inputs=*/true)
      .inputs;
}

namespace {

// The Route Primitive's inputs: x [T, D], gate_weight, bias, then
// gate_scales and gate_biases when quantized. For the Metal kernels bias,
// gate_scales and gate_biases are widened to float32 (exact; the CPU widens
// them as it reads), so their dtypes multiply no kernels.
std::vector<mx::array> prepare_route(
    const mx::array& x,
    const mx::array& gate_weight,
    const std::optional<mx::array>& gate_scales,
    const std::optional<mx::array>& gate_biases,
    const mx::array& bias,
    int k,
    std::optional<int> bits,
    std::optional<int> group_size,
    mx::Stream stream,
    bool metal_inputs) {
  constexpr const char* op = "route";
  check_top_k(op, k);
  if (!is_float(x.dtype())) {
    fail(op, "x must be float16, bfloat16 or float32, got " +
             dtype_str(x.dtype()));
  }
  if (x.ndim() < 1 || x.shape(-1) < 1) {
    fail(op, "x must have shape [..., D] with D >= 1, got " +
             shape_str(x.shape()));
  }
  const int D = x.shape(-1);
  const bool quantized = gate_scales.has_value();
  if (gate_biases.has_value() != quantized) {
    fail(op, "a quantized gate needs both gate_scales and gate_biases; got "
             "only " + std::string(quantized ? "gate_scales" : "gate_biases"));
  }
  if (bits.has_value() != quantized || group_size.has_value() != quantized) {
    fail(op, quantized
             ? "a quantized gate needs bits and group_size"
             : "bits and group_size are only for a quantized gate (with "
               "gate_scales and gate_biases)");
  }
  if (gate_weight.ndim() != 2 || gate_weight.shape(0) < 1) {
    fail(op, "gate_weight must be [E, " +
             (quantized ? std::to_string(D) + "*bits/32" : std::to_string(D)) +
             "] with E >= 1, got " + shape_str(gate_weight.shape()));
  }
  const int E = gate_weight.shape(0);
  if (quantized) {
    check_grid(op, "gate", *bits, *group_size, kSupportedRouterBits);
    if (D % *group_size != 0) {
      fail(op, "D=" + std::to_string(D) + " (x.shape[-1]) is not a multiple "
               "of the gate's group_size=" + std::to_string(*group_size));
    }
    if (gate_weight.dtype() != mx::uint32) {
      fail(op, "a quantized gate_weight must be uint32, got " +
               dtype_str(gate_weight.dtype()));
    }
    const mx::Shape w_shape = {E, D * *bits / 32};
    if (gate_weight.shape() != w_shape) {
      fail(op, "gate_weight has shape " + shape_str(gate_weight.shape()) +
               " but " + std::to_string(*bits) + "-bit rows of D=" +
               std::to_string(D) + " inputs need " + shape_str(w_shape));
    }
    const mx::Shape s_shape = {E, D / *group_size};
    for (const auto* a : {&*gate_scales, &*gate_biases}) {
      const std::string an = a == &*gate_scales ? "gate_scales" : "gate_biases";
      if (a->shape() != s_shape) {
        fail(op, an + " has shape " + shape_str(a->shape()) + ", expected " +
                 shape_str(s_shape) + " for group_size=" +
                 std::to_string(*group_size));
      }
      if (!is_float(a->dtype())) {
        fail(op, an + " must be float16, bfloat16 or float32, got " +
                 dtype_str(a->dtype()));
      }
    }
    if (gate_scales->dtype() != gate_biases->dtype()) {
      fail(op, "gate_scales (" + dtype_str(gate_scales->dtype()) +
               ") and gate_biases (" + dtype_str(gate_biases->dtype()) +
               ") must have one dtype");
    }
  } else {
    if (!is_float(gate_weight.dtype())) {
      fail(op, "an unquantized gate_weight must be float16, bfloat16 or "
               "float32, got " + dtype_str(gate_weight.dtype()) +
               " (a quantized one comes with gate_scales and gate_biases)");
    }
    if (gate_weight.shape(1) != D) {
      fail(op, "gate_weight has shape " + shape_str(gate_weight.shape()) +
               " but x has D=" + std::to_string(D) + "; expected [E, " +
               std::to_string(D) + "]");
    }
  }
  if (k > E) {
    fail(op, "k=" + std::to_string(k) + " is more than the E=" +
             std::to_string(E) + " experts of gate_weight");
  }
  if (bias.shape() != mx::Shape{E}) {
    fail(op, "bias must have shape [E] = [" + std::to_string(E) +
             "], got " + shape_str(bias.shape()));
  }
  if (!is_float(bias.dtype())) {
    fail(op, "bias must be float16, bfloat16 or float32, got " +
             dtype_str(bias.dtype()));
  }

  auto float32 = [&](const mx::array& a) {
    return metal_inputs ? mx::astype(a, mx::float32, stream) : a;
  };
  std::vector<mx::array> inputs = {
      row_contiguous(mx::reshape(x, {-1, D}, stream), stream),
      row_contiguous(gate_weight, stream),
      row_contiguous(float32(bias), stream)};
  if (quantized) {
    inputs.push_back(row_contiguous(float32(*gate_scales), stream));
    inputs.push_back(row_contiguous(float32(*gate_biases), stream));
  }
  return inputs;
}

} // namespace

std::vector<mx::array> route(
    const mx::array& x,
    const mx::array& gate_weight,
    const std::optional<mx::array>& gate_scales,
    const std::optional<mx::array>& gate_biases,
    const mx::array& bias,
    int k,
    std::optional<int> bits,
    std::optional<int> group_size,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  auto inputs = prepare_route(
      x, gate_weight, gate_scales, gate_biases, bias, k, bits, group_size,
      stream, /*metal_inputs=*/uses_metal(stream));
  const bool quantized = gate_scales.has_value();
  const int T = inputs[0].shape(0);
  auto outs = mx::array::make_arrays(
      {{T, k}, {T, k}},
      {mx::uint32, mx::float32},
      std::make_shared<Route>(
          stream, k, quantized ? *bits : 0, quantized ? *group_size : 0),
      inputs);
  mx::Shape out_shape(x.shape().begin(), x.shape().end() - 1);
  out_shape.push_back(k);
  return {
      mx::reshape(outs[0], out_shape, stream),
      mx::reshape(outs[1], out_shape, stream)};
}

std::vector<mx::array> route_metal_inputs(
    const mx::array& x,
    const mx::array& gate_weight,
    const std::optional<mx::array>& gate_scales,
    const std::optional<mx::array>& gate_biases,
    const mx::array& bias,
    int k,
    std::optional<int> bits,
    std::optional<int> group_size,
    mx::StreamOrDevice s) {
  return prepare_route(
      x, gate_weight, gate_scales, gate_biases, bias, k, bits, group_size,
      mx::to_stream(s), /*metal_inputs=*/true);
}

// ---------------------------------------------------------------------------
// Primitives: common parts
// ---------------------------------------------------------------------------

// MLX calls this only after checking both are of the same type.
bool QuantizedExpertsPrimitive::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedExpertsPrimitive&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_;
}

std::vector<mx::Shape> GateUpSwiglu::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[4].shape(1), inputs[1].shape(1) / 2}};
}

std::vector<mx::Shape> DownCombine::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[1].shape(1)}};
}

bool Route::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Route&>(other);
  return k_ == o.k_ && bits_ == o.bits_ && group_size_ == o.group_size_;
}

std::vector<mx::Shape> Route::output_shapes(
    const std::vector<mx::array>& inputs) {
  const mx::Shape shape = {inputs[0].shape(0), k_};
  return {shape, shape};
}

// ---------------------------------------------------------------------------
// Primitives: GPU
// ---------------------------------------------------------------------------

// The launch plan comes from plain C++ (metal/launch_plan.cpp); only handing
// it to MLX's Metal command encoder is Apple-only (metal/eval_gpu.cpp, built
// when MLX has Metal). Other GPU backends refuse loudly, never fall back.

namespace {

metal::Dtype metal_dtype(mx::Dtype t) {
  if (t == mx::float32) {
    return metal::Dtype::float32;
  }
  return t == mx::float16 ? metal::Dtype::float16 : metal::Dtype::bfloat16;
}

#if !defined(FUSED_MOE_METAL)
[[noreturn]] void no_gpu(const char* name) {
  throw std::runtime_error(
      std::string(name) + " has no GPU implementation in this build (the "
      "Metal kernels need MLX built with Metal, on macOS).");
}
#endif

} // namespace

void GateUpSwiglu::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const metal::Problem problem = {
      metal::Op::gate_up_swiglu, metal_dtype(out.dtype()), bits_, group_size_,
      static_cast<int>(inputs[0].shape(0)), static_cast<int>(inputs[4].shape(1)),
      static_cast<int>(inputs[0].shape(1)), static_cast<int>(inputs[1].shape(1) / 2),
      static_cast<int>(inputs[1].shape(0))};
#if defined(FUSED_MOE_METAL)
  metal::encode(metal::make_launch_plan(problem), stream(), inputs, out);
#else
  (void)problem;
  no_gpu(name());
#endif
}

void DownCombine::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const metal::Problem problem = {
      metal::Op::down_combine, metal_dtype(out.dtype()), bits_, group_size_,
      static_cast<int>(inputs[0].shape(0)), static_cast<int>(inputs[0].shape(1)),
      static_cast<int>(inputs[1].shape(1)), static_cast<int>(inputs[0].shape(2)),
      static_cast<int>(inputs[1].shape(0))};
#if defined(FUSED_MOE_METAL)
  metal::encode(metal::make_launch_plan(problem), stream(), inputs, out);
#else
  (void)problem;
  no_gpu(name());
#endif
}

void Route::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  metal::Problem problem = {
      metal::Op::route, metal_dtype(inputs[0].dtype()), bits_, group_size_,
      static_cast<int>(inputs[0].shape(0)), k_,
      static_cast<int>(inputs[0].shape(1)), 0,
      static_cast<int>(inputs[1].shape(0))};
  if (bits_ == 0) {
    problem.gate_dtype = metal_dtype(inputs[1].dtype());
  }
#if defined(FUSED_MOE_METAL)
  metal::encode(metal::make_launch_plan(problem), stream(), inputs, outputs);
#else
  (void)problem;
  (void)outputs;
  no_gpu(name());
#endif
}

} // namespace fused_moe
