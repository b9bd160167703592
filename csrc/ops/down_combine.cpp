// The op (argument checking), its Primitive and the GPU entry point. CPU
// evaluation lives in cpu/down_combine.cpp.
#include "ops/down_combine.h"

#include "metal/launch_plan.h"
#if defined(FUSED_MOE_METAL)
#include "metal/eval_gpu.h"
#endif

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

std::vector<mx::Shape> DownCombine::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[1].shape(1)}};
}

// The launch plan comes from plain C++ (metal/launch_plan.cpp); only handing
// it to MLX's Metal command encoder is Apple-only (metal/eval_gpu.cpp, built
// when MLX has Metal).
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

} // namespace fused_moe
