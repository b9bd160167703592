// The op (argument checking), its Primitive and the GPU entry point. CPU
// evaluation lives in cpu/route.cpp.
#include "ops/route.h"

#include <optional>

#include "metal/launch_plan.h"
#if defined(FUSED_MOE_METAL)
#include "metal/eval_gpu.h"
#endif

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

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
    check_quantized_matrix(
        op, QuantNames::prefixed("gate"), gate_weight, *gate_scales,
        gate_biases, {{"E", -1}}, D, "D", {QuantMode::affine, *bits, *group_size},
        std::nullopt);
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
// Primitive
// ---------------------------------------------------------------------------

bool Route::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Route&>(other);
  return k_ == o.k_ && bits_ == o.bits_ && group_size_ == o.group_size_;
}

std::vector<mx::Shape> Route::output_shapes(
    const std::vector<mx::array>& inputs) {
  const mx::Shape shape = {inputs[0].shape(0), k_};
  return {shape, shape};
}

// The launch plan comes from plain C++ (metal/launch_plan.cpp); only handing
// it to MLX's Metal command encoder is Apple-only (metal/eval_gpu.cpp, built
// when MLX has Metal).
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
