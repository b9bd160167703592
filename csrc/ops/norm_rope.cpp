// The op (argument checking) and its Primitive. CPU evaluation lives in
// cpu/norm_rope.cpp.
#include "ops/norm_rope.h"

#include <stdexcept>

#include "mlx/fast.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

mx::array norm_rope(
    const mx::array& x,
    const std::optional<mx::array>& weight,
    int heads,
    float eps,
    int rotary_dim,
    bool traditional,
    float base,
    float scale,
    int offset,
    mx::StreamOrDevice s) {
  constexpr const char* op = "norm_rope";
  if (x.ndim() != 3 || !is_float(x.dtype())) {
    fail(op, "x must be float16, bfloat16 or float32 [B, L, heads*head_dim], got " +
             dtype_str(x.dtype()) + " " + shape_str(x.shape()));
  }
  const int width = x.shape(2);
  if (heads < 1 || width % heads != 0) {
    fail(op, "x has rows of " + std::to_string(width) + " values, not a whole "
             "number of heads=" + std::to_string(heads));
  }
  const int Dh = width / heads;
  if (rotary_dim < 2 || rotary_dim % 2 != 0 || rotary_dim > Dh) {
    fail(op, "rotary_dim=" + std::to_string(rotary_dim) + " must be even, from 2 "
             "to head_dim=" + std::to_string(Dh));
  }
  if (!(base > 0.0f) || offset < 0) {
    fail(op, "base must be positive and offset at least 0, got base=" +
             std::to_string(base) + ", offset=" + std::to_string(offset));
  }
  auto out_type = x.dtype();
  if (weight) {
    if (weight->ndim() != 1 || weight->shape(0) != width || !is_float(weight->dtype())) {
      fail(op, "weight must be a float [" + std::to_string(width) + "] array, got " +
               dtype_str(weight->dtype()) + " " + shape_str(weight->shape()));
    }
    out_type = mx::promote_types(x.dtype(), weight->dtype());
  }
  auto stream = mx::to_stream(s);
  const int B = x.shape(0), L = x.shape(1);
  if (uses_metal(stream)) {
    auto y = weight ? mx::fast::rms_norm(x, weight, eps, stream) : x;
    y = mx::transpose(mx::reshape(y, {B, L, heads, Dh}, stream), {0, 2, 1, 3}, stream);
    return mx::fast::rope(y, rotary_dim, traditional, base, scale, offset, std::nullopt, stream);
  }
  std::vector<mx::array> inputs = {row_contiguous(mx::astype(x, out_type, stream), stream)};
  if (weight) {
    inputs.push_back(row_contiguous(*weight, stream));
  }
  return mx::array(
      {B, heads, L, Dh}, out_type,
      std::make_shared<NormRope>(stream, heads, eps, rotary_dim, traditional, base, scale, offset),
      std::move(inputs));
}

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

bool NormRope::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const NormRope&>(other);
  return heads_ == o.heads_ && eps_ == o.eps_ && rotary_dim_ == o.rotary_dim_ &&
      traditional_ == o.traditional_ && base_ == o.base_ && scale_ == o.scale_ &&
      offset_ == o.offset_;
}

std::vector<mx::Shape> NormRope::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& x = inputs[0];
  return {{x.shape(0), heads_, x.shape(1), x.shape(2) / heads_}};
}

// Never reached: on a GPU stream the op returns MLX's own steps.
void NormRope::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::logic_error("NormRope is not built for a GPU stream");
}

} // namespace fused_moe
