// The op (argument checking) and its Primitive. CPU evaluation lives in
// cpu/quantized_matmul.cpp.
#include "ops/quantized_matmul.h"

#include <stdexcept>

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  constexpr const char* op = "quantized_matmul";
  check_grid(op, "w", bits, group_size, kSupportedLinearBits);
  if (!is_float(x.dtype())) {
    fail(op, "x must be float16, bfloat16 or float32, got " +
             dtype_str(x.dtype()));
  }
  if (x.ndim() < 1) {
    fail(op, "x must have shape [..., K], got a scalar");
  }
  const int K = x.shape(-1);
  if (K <= 0 || K % group_size != 0) {
    fail(op, "K=" + std::to_string(K) + " (x.shape[-1]) must be a positive "
             "multiple of group_size=" + std::to_string(group_size));
  }
  const int N = check_quantized_matrix(
      op, {"w", "scales", "biases"}, w, scales, biases, {{"N", -1}}, K, "K",
      {QuantMode::affine, bits, group_size}, DtypeOwner{x.dtype(), "x"})[0];
  auto stream = mx::to_stream(s);
  if (uses_metal(stream)) {
    // MLX's own kernel on the GPU: the same computation, already fast there.
    return mx::quantized_matmul(
        x, w, scales, biases, /*transpose=*/true, group_size, bits, "affine",
        stream);
  }
  std::vector<mx::array> inputs = {
      row_contiguous(mx::reshape(x, {-1, K}, stream), stream),
      row_contiguous(w, stream), row_contiguous(scales, stream),
      row_contiguous(biases, stream)};
  const int T = inputs[0].shape(0);
  auto out = mx::array(
      {T, N}, x.dtype(),
      std::make_shared<QuantizedMatmul>(stream, bits, group_size),
      std::move(inputs));
  mx::Shape out_shape(x.shape().begin(), x.shape().end() - 1);
  out_shape.push_back(N);
  return mx::reshape(out, out_shape, stream);
}

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

std::vector<mx::Shape> QuantizedMatmul::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[1].shape(0)}};
}

// Never reached: on a GPU stream the op returns MLX's quantized_matmul.
void QuantizedMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::logic_error("QuantizedMatmul is not built for a GPU stream");
}

} // namespace fused_moe
