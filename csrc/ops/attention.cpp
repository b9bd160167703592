// The op (argument checking) and its Primitive. CPU evaluation lives in
// cpu/attention.cpp.
#include "ops/attention.h"

#include <stdexcept>

#include "mlx/fast.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

mx::array scaled_dot_product_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    bool causal,
    mx::StreamOrDevice s) {
  constexpr const char* op = "scaled_dot_product_attention";
  const std::pair<const char*, const mx::array*> args[] = {
      {"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, a] : args) {
    if (a->ndim() != 4) {
      fail(op, std::string(name) + " must be 4-D [B, heads, length, head_dim], got " +
               shape_str(a->shape()));
    }
    if (!is_float(a->dtype()) || a->dtype() != q.dtype()) {
      fail(op, std::string(name) + " must be float16, bfloat16 or float32, in "
               "the dtype of q (" + dtype_str(q.dtype()) + "), got " +
               dtype_str(a->dtype()));
    }
  }
  const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), Dh = q.shape(3);
  const int Hkv = k.shape(1), S = k.shape(2);
  if (k.shape(0) != B || k.shape(3) != Dh) {
    fail(op, "k " + shape_str(k.shape()) + " does not match q " +
             shape_str(q.shape()) + " in batch and head_dim");
  }
  if (v.shape() != k.shape()) {
    fail(op, "v " + shape_str(v.shape()) + " must have the shape of k " +
             shape_str(k.shape()));
  }
  if (Hkv < 1 || Hq % Hkv != 0) {
    fail(op, "q has " + std::to_string(Hq) + " heads, not a multiple of k's " +
             std::to_string(Hkv));
  }
  if (Dh % kAttentionHeadDimMultiple != 0 || Dh < kAttentionHeadDimMultiple ||
      Dh > kMaxAttentionHeadDim) {
    fail(op, "head_dim=" + std::to_string(Dh) + " is not supported: a multiple "
             "of " + std::to_string(kAttentionHeadDimMultiple) + " up to " +
             std::to_string(kMaxAttentionHeadDim) + " is");
  }
  if (S < 1) {
    fail(op, "k has no positions (length 0)");
  }
  if (causal && L > S) {
    fail(op, "causal attention needs at most as many queries as keys; q has " +
             std::to_string(L) + ", k " + std::to_string(S));
  }
  auto stream = mx::to_stream(s);
  if (uses_metal(stream)) {
    return mx::fast::scaled_dot_product_attention(
        q, k, v, scale, causal ? "causal" : "", {}, {}, false, stream);
  }
  return mx::array(
      q.shape(), q.dtype(), std::make_shared<Attention>(stream, scale, causal),
      {row_contiguous(q, stream), k, v});
}

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

bool Attention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Attention&>(other);
  return scale_ == o.scale_ && causal_ == o.causal_;
}

std::vector<mx::Shape> Attention::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

// Never reached: on a GPU stream the op returns MLX's fused attention.
void Attention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::logic_error("Attention is not built for a GPU stream");
}

} // namespace fused_moe
