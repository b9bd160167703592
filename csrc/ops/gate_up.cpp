// The op (argument checking), its Primitive and the GPU entry point. CPU
// evaluation lives in cpu/gate_up.cpp.
#include "ops/gate_up.h"

#include "metal/launch_plan.h"
#if defined(FUSED_MOE_METAL)
#include "metal/eval_gpu.h"
#endif

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

namespace {

constexpr const char* kOp = "gate_up";

// Checks a call; `settings` gets what the arrays say (bias, global scale,
// x per slot).
PreparedCall prepare_gate_up(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    ExpertSettings& settings,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& global_scale,
    mx::Stream stream,
    bool metal_inputs) {
  const QuantSpec& q = settings.quant;
  const bool gated = activation_spec(settings.activation.kind).gated;
  check_grid(kOp, "gate_up", q);
  if (!is_float(x.dtype())) {
    fail(kOp, "x must be float16, bfloat16 or float32, got " +
              dtype_str(x.dtype()));
  }
  if (x.ndim() < 1) {
    fail(kOp, "x must have shape [..., D] or [..., k, D], got a scalar");
  }
  const int D = x.shape(-1);
  check_multiple_of_32(kOp, "D (x.shape[-1])", D);
  if (D % q.group_size != 0) {
    fail(kOp, "D=" + std::to_string(D) + " is not a multiple of group_size=" +
              std::to_string(q.group_size));
  }
  if (weight.ndim() != 3 || (gated && weight.shape(1) % 2 != 0)) {
    fail(kOp, gated
             ? "weight must be [E, 2H, D*bits/32] with gate and up rows "
               "interleaved, got " + shape_str(weight.shape())
             : "weight must be [E, H, D*bits/32] (fc1, not gated), got " +
               shape_str(weight.shape()));
  }
  const int rows = weight.shape(1);
  const int H = gated ? rows / 2 : rows;
  check_multiple_of_32(
      kOp, gated ? "H (weight.shape[1] / 2)" : "H (weight.shape[1])", H);
  const int E = check_quantized_matrix(
      kOp, QuantNames::prefixed("gate_up"), weight, scales, biases,
      {{"E", -1}, {"", rows}}, D, "D", q, DtypeOwner{x.dtype(), "x"})[0];

  // x shared by the slots ([..., D], lead = indices' lead) or one row per
  // slot ([..., k, D], lead + [k] = indices' shape); the two never both fit.
  const mx::Shape x_lead(x.shape().begin(), x.shape().end() - 1);
  settings.x_per_slot = x_lead == indices.shape();
  mx::Shape lead = x_lead;
  if (settings.x_per_slot) {
    lead.pop_back();
  }
  const int k = check_indices(kOp, indices, lead);
  if (!metal_inputs) {
    check_expert_ids_now(kOp, indices, E, stream);
  }
  if (bias.has_value()) {
    if (bias->shape() != mx::Shape{E, rows}) {
      fail(kOp, "bias must have shape [E, " + std::string(gated ? "2H" : "H") +
                "] = " + shape_str({E, rows}) + ", got " +
                shape_str(bias->shape()));
    }
    if (!is_float(bias->dtype())) {
      fail(kOp, "bias must be float16, bfloat16 or float32, got " +
                dtype_str(bias->dtype()));
    }
  }
  if (global_scale.has_value()) {
    if (q.mode != QuantMode::nvfp4) {
      fail(kOp, std::string("global_scale is only for mode nvfp4, not ") +
                mode_name(q.mode));
    }
    const mx::Shape gs_shape = gated ? mx::Shape{E, 2} : mx::Shape{E};
    if (global_scale->shape() != gs_shape || global_scale->dtype() != mx::float32) {
      fail(kOp, "global_scale must be float32 " + shape_str(gs_shape) +
                (gated ? " (the gate's and the up projection's of each expert)"
                       : " (one per expert)") +
                ", got " + dtype_str(global_scale->dtype()) + " " +
                shape_str(global_scale->shape()));
    }
  }
  settings.bias = bias.has_value();
  settings.global_scale = global_scale.has_value();
  if (uses_metal(stream) || metal_inputs) {
    check_metal_has_kernel(kOp, /*down=*/false, settings);
  }

  std::vector<mx::array> inputs = {
      flatten_rows(x, D, stream), row_contiguous(weight, stream),
      row_contiguous(scales, stream)};
  if (biases.has_value()) {
    inputs.push_back(row_contiguous(*biases, stream));
  }
  inputs.push_back(flatten_rows(indices, k, stream));
  if (bias.has_value()) {
    // The Metal kernels read the expert bias as float32 (exact).
    inputs.push_back(row_contiguous(
        metal_inputs ? mx::astype(*bias, mx::float32, stream) : *bias, stream));
  }
  if (global_scale.has_value()) {
    inputs.push_back(row_contiguous(*global_scale, stream));
  }
  const int T = inputs[expert_slots(settings, false).indices].shape(0);
  if (metal_inputs && metal::choose_variant(T, k) == metal::Variant::prefill) {
    // Pairs in increasing expert order (ids >= E, and negative int32 ids,
    // last). Pairs are independent in kernel A, so the order among equal
    // ids does not matter. Computed on the device: no sync to the host.
    auto ids = mx::minimum(
        pair_experts(indices, stream), mx::array(uint32_t(E)), stream);
    inputs.push_back(mx::astype(mx::argsort(ids, stream), mx::uint32, stream));
  }
  mx::Shape out_shape = lead;
  out_shape.push_back(k);
  out_shape.push_back(H);
  return {std::move(inputs), {T, k, H}, out_shape};
}

ExpertSettings settings_of(const QuantSpec& quant, const ActivationParams& activation) {
  ExpertSettings s;
  s.quant = quant;
  s.activation = activation;
  return s;
}

} // namespace

mx::array gate_up(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const QuantSpec& quant,
    const ActivationParams& activation,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& global_scale,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  raise_pending_error(stream);
  ExpertSettings settings = settings_of(quant, activation);
  auto call = prepare_gate_up(
      x, weight, scales, biases, indices, settings, bias, global_scale, stream,
      /*metal_inputs=*/uses_metal(stream));
  return primitive_output<GateUp>(std::move(call), x.dtype(), stream, settings);
}

std::vector<mx::array> gate_up_metal_inputs(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const QuantSpec& quant,
    const ActivationParams& activation,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& global_scale,
    mx::StreamOrDevice s) {
  ExpertSettings settings = settings_of(quant, activation);
  return prepare_gate_up(
             x, weight, scales, biases, indices, settings, bias, global_scale,
             mx::to_stream(s), /*metal_inputs=*/true)
      .inputs;
}

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

std::vector<mx::Shape> GateUp::output_shapes(
    const std::vector<mx::array>& inputs) {
  const ExpertSlots slots = expert_slots(settings_, false);
  const int rows = inputs[slots.weight].shape(1);
  const bool gated = activation_spec(settings_.activation.kind).gated;
  return {{inputs[slots.indices].shape(0), inputs[slots.indices].shape(1),
           gated ? rows / 2 : rows}};
}

// The launch plan comes from plain C++ (metal/launch_plan.cpp); only handing
// it to MLX's Metal command encoder is Apple-only (metal/eval_gpu.cpp, built
// when MLX has Metal). The op has already refused settings Metal lacks.
void GateUp::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  check_metal_has_kernel(kOp, /*down=*/false, settings_);
  const ExpertSlots slots = expert_slots(settings_, false);
  const bool gated = activation_spec(settings_.activation.kind).gated;
  const int rows = static_cast<int>(inputs[slots.weight].shape(1));
  metal::Problem problem = {
      metal::Op::gate_up, metal_dtype(out.dtype()), settings_.quant.bits,
      settings_.quant.group_size, static_cast<int>(out.shape(0)),
      static_cast<int>(out.shape(1)), static_cast<int>(inputs[slots.x].shape(1)),
      gated ? rows / 2 : rows, static_cast<int>(inputs[slots.weight].shape(0))};
  problem.mode = settings_.quant.mode;
  problem.activation = settings_.activation.kind;
  problem.bias = settings_.bias;
  problem.global_scale = settings_.global_scale;
  problem.x_per_slot = settings_.x_per_slot;
  problem.limit = settings_.activation.limit;
  problem.alpha = settings_.activation.alpha;
  problem.beta = settings_.activation.beta;
  problem.linear_beta = settings_.activation.linear_beta;
#if defined(FUSED_MOE_METAL)
  metal::encode(metal::make_launch_plan(problem), stream(), inputs, out);
#else
  (void)problem;
  no_gpu(name());
#endif
}

} // namespace fused_moe
