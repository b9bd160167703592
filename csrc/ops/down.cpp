// The ops (argument checking), their Primitive and the GPU entry point. CPU
// evaluation lives in cpu/down.cpp.
#include "ops/down.h"

#include "metal/launch_plan.h"
#if defined(FUSED_MOE_METAL)
#include "metal/eval_gpu.h"
#endif

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

namespace {

// Checks a call; `settings` gets what the arrays say (combine, bias, global
// scale).
PreparedCall prepare_down(
    const mx::array& h,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const std::optional<mx::array>& weights,
    ExpertSettings& settings,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& global_scale,
    mx::Stream stream,
    bool metal_inputs) {
  const char* op = weights.has_value() ? "down_combine" : "down_slots";
  const QuantSpec& q = settings.quant;
  check_grid(op, "down", q);
  if (!is_float(h.dtype())) {
    fail(op, "h must be float16, bfloat16 or float32, got " +
             dtype_str(h.dtype()));
  }
  if (h.ndim() < 2) {
    fail(op, "h must have shape [..., k, H], got " + shape_str(h.shape()));
  }
  const int H = h.shape(-1);
  check_multiple_of_32(op, "H (h.shape[-1])", H);
  if (H % q.group_size != 0) {
    fail(op, "H=" + std::to_string(H) + " is not a multiple of group_size=" +
             std::to_string(q.group_size));
  }
  if (weight.ndim() != 3) {
    fail(op, "down_weight must be [E, D, H*bits/32], got " +
             shape_str(weight.shape()));
  }
  const int D = weight.shape(1);
  check_multiple_of_32(op, "D (down_weight.shape[1])", D);
  const int E = check_quantized_matrix(
      op, QuantNames::prefixed("down"), weight, scales, biases,
      {{"E", -1}, {"", D}}, H, "H", q, DtypeOwner{h.dtype(), "h"})[0];
  mx::Shape lead(h.shape().begin(), h.shape().end() - 2);
  const int k = check_indices(op, indices, lead);
  if (!metal_inputs) {
    check_expert_ids_now(op, indices, E, stream);
  }
  if (h.shape(-2) != k) {
    fail(op, "h has " + std::to_string(h.shape(-2)) + " expert slots (shape " +
             shape_str(h.shape()) + ") but indices has k=" +
             std::to_string(k));
  }
  if (weights.has_value()) {
    if (weights->shape() != indices.shape()) {
      fail(op, "weights must have the shape of indices " +
               shape_str(indices.shape()) + ", got " +
               shape_str(weights->shape()));
    }
    if (weights->dtype() != mx::float32 && weights->dtype() != h.dtype()) {
      fail(op, "weights must be float32 or the dtype of h (" +
               dtype_str(h.dtype()) + "), got " + dtype_str(weights->dtype()));
    }
  }
  if (bias.has_value()) {
    if (bias->shape() != mx::Shape{E, D}) {
      fail(op, "bias must have shape [E, D] = " + shape_str({E, D}) +
               ", got " + shape_str(bias->shape()));
    }
    if (!is_float(bias->dtype())) {
      fail(op, "bias must be float16, bfloat16 or float32, got " +
               dtype_str(bias->dtype()));
    }
  }
  if (global_scale.has_value()) {
    if (q.mode != QuantMode::nvfp4) {
      fail(op, std::string("global_scale is only for mode nvfp4, not ") +
               mode_name(q.mode));
    }
    if (global_scale->shape() != mx::Shape{E} ||
        global_scale->dtype() != mx::float32) {
      fail(op, "global_scale must be float32 " + shape_str({E}) +
               " (one per expert), got " + dtype_str(global_scale->dtype()) +
               " " + shape_str(global_scale->shape()));
    }
  }
  settings.combine = weights.has_value();
  settings.bias = bias.has_value();
  settings.global_scale = global_scale.has_value();
  if (uses_metal(stream) || metal_inputs) {
    check_metal_has_kernel(op, /*down=*/true, settings);
  }

  std::vector<mx::array> inputs = {
      mx::contiguous(mx::reshape(h, {-1, k, H}, stream), false, stream),
      row_contiguous(weight, stream),
      row_contiguous(scales, stream)};
  if (biases.has_value()) {
    inputs.push_back(row_contiguous(*biases, stream));
  }
  inputs.push_back(flatten_rows(indices, k, stream));
  if (weights.has_value()) {
    // The Metal kernels read float32 router weights.
    auto w = flatten_rows(*weights, k, stream);
    inputs.push_back(metal_inputs ? mx::astype(w, mx::float32, stream) : w);
  }
  if (bias.has_value()) {
    // The Metal kernels read the expert bias as float32 (exact).
    inputs.push_back(row_contiguous(
        metal_inputs ? mx::astype(*bias, mx::float32, stream) : *bias, stream));
  }
  if (global_scale.has_value()) {
    inputs.push_back(row_contiguous(*global_scale, stream));
  }
  const int T = inputs[0].shape(0);
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
  if (!settings.combine) {
    out_shape.push_back(k);
  }
  out_shape.push_back(D);
  return {
      std::move(inputs),
      settings.combine ? mx::Shape{T, D} : mx::Shape{T, k, D},
      out_shape};
}

ExpertSettings settings_of(const QuantSpec& quant) {
  ExpertSettings s;
  s.quant = quant;
  return s;
}

} // namespace

mx::array down_combine(
    const mx::array& h,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const mx::array& weights,
    const QuantSpec& quant,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& global_scale,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  raise_pending_error(stream);
  ExpertSettings settings = settings_of(quant);
  auto call = prepare_down(
      h, weight, scales, biases, indices, weights, settings, bias,
      global_scale, stream, /*metal_inputs=*/uses_metal(stream));
  return primitive_output<Down>(std::move(call), h.dtype(), stream, settings);
}

mx::array down_slots(
    const mx::array& h,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const QuantSpec& quant,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& global_scale,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  raise_pending_error(stream);
  ExpertSettings settings = settings_of(quant);
  auto call = prepare_down(
      h, weight, scales, biases, indices, std::nullopt, settings, bias,
      global_scale, stream, /*metal_inputs=*/uses_metal(stream));
  return primitive_output<Down>(std::move(call), h.dtype(), stream, settings);
}

std::vector<mx::array> down_metal_inputs(
    const mx::array& h,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const mx::array& indices,
    const std::optional<mx::array>& weights,
    const QuantSpec& quant,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& global_scale,
    mx::StreamOrDevice s) {
  ExpertSettings settings = settings_of(quant);
  return prepare_down(
             h, weight, scales, biases, indices, weights, settings, bias,
             global_scale, mx::to_stream(s), /*metal_inputs=*/true)
      .inputs;
}

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

std::vector<mx::Shape> Down::output_shapes(
    const std::vector<mx::array>& inputs) {
  const int T = inputs[0].shape(0);
  const int D = inputs[1].shape(1);
  if (settings_.combine) {
    return {{T, D}};
  }
  return {{T, static_cast<int>(inputs[0].shape(1)), D}};
}

// The launch plan comes from plain C++ (metal/launch_plan.cpp); only handing
// it to MLX's Metal command encoder is Apple-only (metal/eval_gpu.cpp, built
// when MLX has Metal). The op has already refused settings Metal lacks.
void Down::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  check_metal_has_kernel(
      settings_.combine ? "down_combine" : "down_slots", /*down=*/true, settings_);
  metal::Problem problem = {
      metal::Op::down, metal_dtype(out.dtype()), settings_.quant.bits,
      settings_.quant.group_size, static_cast<int>(inputs[0].shape(0)),
      static_cast<int>(inputs[0].shape(1)), static_cast<int>(inputs[1].shape(1)),
      static_cast<int>(inputs[0].shape(2)), static_cast<int>(inputs[1].shape(0))};
  problem.mode = settings_.quant.mode;
  problem.bias = settings_.bias;
  problem.global_scale = settings_.global_scale;
  problem.combine = settings_.combine;
#if defined(FUSED_MOE_METAL)
  metal::encode(metal::make_launch_plan(problem), stream(), inputs, out);
#else
  (void)problem;
  no_gpu(name());
#endif
}

} // namespace fused_moe
