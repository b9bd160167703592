// The op (argument checking), its Primitive and the GPU entry point. CPU
// evaluation lives in cpu/gate_up_swiglu.cpp.
#include "ops/gate_up_swiglu.h"

#include "metal/launch_plan.h"
#if defined(FUSED_MOE_METAL)
#include "metal/eval_gpu.h"
#endif

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

namespace {

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

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

std::vector<mx::Shape> GateUpSwiglu::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[4].shape(1), inputs[1].shape(1) / 2}};
}

// The launch plan comes from plain C++ (metal/launch_plan.cpp); only handing
// it to MLX's Metal command encoder is Apple-only (metal/eval_gpu.cpp, built
// when MLX has Metal).
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

} // namespace fused_moe
