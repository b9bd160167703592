// The op (argument checking) and its Primitive. CPU evaluation lives in
// cpu/quantized_embedding.cpp.
#include "ops/quantized_embedding.h"

#include <stdexcept>

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

mx::array quantized_embedding(
    const mx::array& ids,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  constexpr const char* op = "quantized_embedding";
  check_grid(op, "w", bits, group_size, kSupportedLinearBits);
  if (!mx::issubdtype(ids.dtype(), mx::integer)) {
    fail(op, "ids must have an integer dtype, got " + dtype_str(ids.dtype()));
  }
  if (w.ndim() != 2 || (int64_t(w.shape(1)) * 32) % bits != 0) {
    fail(op, "w must be [N, K*bits/32] uint32, got " + shape_str(w.shape()));
  }
  const int K = static_cast<int>(int64_t(w.shape(1)) * 32 / bits);
  if (K % group_size != 0) {
    fail(op, "w has rows of K=" + std::to_string(K) + " " +
             std::to_string(bits) + "-bit codes, not a multiple of "
             "group_size=" + std::to_string(group_size));
  }
  check_quantized_matrix(
      op, {"w", "scales", "biases"}, w, scales, biases, {{"N", -1}}, K, "K",
      {QuantMode::affine, bits, group_size}, std::nullopt);
  auto stream = mx::to_stream(s);
  if (uses_metal(stream)) {
    // As mlx's QuantizedEmbedding does it, on the GPU.
    return mx::dequantize(
        mx::take(w, ids, 0, stream), mx::take(scales, ids, 0, stream),
        mx::take(biases, ids, 0, stream), group_size, bits, "affine",
        std::nullopt, std::nullopt, stream);
  }
  std::vector<mx::array> inputs = {
      mx::astype(mx::reshape(ids, {-1}, stream), mx::int64, stream),
      row_contiguous(w, stream), row_contiguous(scales, stream),
      row_contiguous(biases, stream)};
  const int T = inputs[0].shape(0);
  auto out = mx::array(
      {T, K}, scales.dtype(),
      std::make_shared<QuantizedEmbedding>(stream, bits, group_size),
      std::move(inputs));
  mx::Shape out_shape = ids.shape();
  out_shape.push_back(K);
  return mx::reshape(out, out_shape, stream);
}

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

std::vector<mx::Shape> QuantizedEmbedding::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[2].shape(1) * group_size_}};
}

// Never reached: on a GPU stream the op returns MLX's gather and dequantize.
void QuantizedEmbedding::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::logic_error("QuantizedEmbedding is not built for a GPU stream");
}

} // namespace fused_moe
