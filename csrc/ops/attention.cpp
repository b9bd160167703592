// The ops (argument checking) and their Primitive. CPU evaluation lives in
// cpu/attention.cpp.
#include "ops/attention.h"

#include <stdexcept>

#include "mlx/fast.h"
#include "mlx/utils.h"

namespace fused_moe {

// ---------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------

namespace {

// The checks both ops share, on q and the cache's [B, Hkv, S] and head_dim.
void check_attention_shapes(
    const char* op, const mx::array& q, int B, int Hkv, int S, int Dh, bool causal) {
  const int Hq = q.shape(1), L = q.shape(2);
  if (B != q.shape(0) || Dh != q.shape(3)) {
    fail(op, "the cache [" + std::to_string(B) + ", " + std::to_string(Hkv) + ", " +
             std::to_string(S) + "] of head_dim " + std::to_string(Dh) +
             " does not match q " + shape_str(q.shape()) + " in batch and head_dim");
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
}

void check_query(const char* op, const mx::array& q) {
  if (q.ndim() != 4) {
    fail(op, "q must be 4-D [B, heads, length, head_dim], got " + shape_str(q.shape()));
  }
  if (!is_float(q.dtype())) {
    fail(op, "q must be float16, bfloat16 or float32, got " + dtype_str(q.dtype()));
  }
}

} // namespace

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
  if (k.shape(0) != q.shape(0) || k.shape(3) != q.shape(3)) {
    fail(op, "k " + shape_str(k.shape()) + " does not match q " +
             shape_str(q.shape()) + " in batch and head_dim");
  }
  if (v.shape() != k.shape()) {
    fail(op, "v " + shape_str(v.shape()) + " must have the shape of k " +
             shape_str(k.shape()));
  }
  check_attention_shapes(op, q, k.shape(0), k.shape(1), k.shape(2), k.shape(3), causal);
  auto stream = mx::to_stream(s);
  if (uses_metal(stream)) {
    return mx::fast::scaled_dot_product_attention(
        q, k, v, scale, causal ? "causal" : "", {}, {}, false, stream);
  }
  return mx::array(
      q.shape(), q.dtype(), std::make_shared<Attention>(stream, scale, causal),
      {row_contiguous(q, stream), k, v});
}

namespace {

// On a GPU stream: what mlx-lm's quantized_scaled_dot_product_attention
// computes, with MLX's own quantized matmuls (scores in q's dtype).
mx::array quantized_attention_with_mlx_ops(
    const mx::array& q, const std::vector<mx::array>& kv, float scale, bool causal,
    int bits, int group_size, mx::Stream s) {
  const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), Dh = q.shape(3);
  const int Hkv = kv[0].shape(1), S = kv[0].shape(2);
  const int G = Hq / Hkv;
  auto queries = mx::multiply(q, mx::array(scale, q.dtype()), s);
  std::vector<mx::array> parts = kv;
  if (G > 1) {
    queries = mx::reshape(queries, {B, Hkv, G, L, Dh}, s);
    for (auto& p : parts) {
      p = mx::expand_dims(p, -3, s);
    }
  }
  auto scores = mx::quantized_matmul(
      queries, parts[0], parts[1], parts[2], true, group_size, bits, "affine", s);
  if (causal) {
    auto seen = mx::greater_equal(
        mx::expand_dims(mx::arange(S - L, S, s), 1, s),
        mx::expand_dims(mx::arange(0, S, s), 0, s), s);
    scores = mx::where(
        seen, scores, mx::array(mx::finfo(scores.dtype()).min, scores.dtype()), s);
  }
  scores = mx::softmax(scores, -1, true, s);
  auto out = mx::quantized_matmul(
      scores, parts[3], parts[4], parts[5], false, group_size, bits, "affine", s);
  return G > 1 ? mx::reshape(out, {B, Hq, L, Dh}, s) : out;
}

} // namespace

mx::array quantized_scaled_dot_product_attention(
    const mx::array& q,
    const mx::array& k_codes,
    const mx::array& k_scales,
    const mx::array& k_biases,
    const mx::array& v_codes,
    const mx::array& v_scales,
    const mx::array& v_biases,
    float scale,
    bool causal,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  constexpr const char* op = "quantized_scaled_dot_product_attention";
  check_query(op, q);
  check_grid(op, "KV cache", bits, group_size, kSupportedKvCacheBits);
  const int Dh = q.shape(3);
  if (Dh % group_size != 0) {
    fail(op, "head_dim=" + std::to_string(Dh) + " is not a multiple of group_size=" +
             std::to_string(group_size));
  }
  const std::pair<const char*, const mx::array*> codes[] = {
      {"k_codes", &k_codes}, {"v_codes", &v_codes}};
  for (const auto& [name, a] : codes) {
    if (a->ndim() != 4 || a->dtype() != mx::uint32) {
      fail(op, std::string(name) + " must be uint32 [B, Hkv, S, head_dim*bits/32], got " +
               dtype_str(a->dtype()) + shape_str(a->shape()));
    }
  }
  const int B = k_codes.shape(0), Hkv = k_codes.shape(1), S = k_codes.shape(2);
  const mx::Shape code_shape = {B, Hkv, S, Dh * bits / 32};
  const mx::Shape scale_shape = {B, Hkv, S, Dh / group_size};
  if (k_codes.shape() != code_shape || v_codes.shape() != code_shape) {
    fail(op, "k_codes " + shape_str(k_codes.shape()) + " and v_codes " +
             shape_str(v_codes.shape()) + " must both be " + shape_str(code_shape) +
             " for q " + shape_str(q.shape()) + " at bits=" + std::to_string(bits));
  }
  const std::pair<const char*, const mx::array*> groups[] = {
      {"k_scales", &k_scales}, {"k_biases", &k_biases},
      {"v_scales", &v_scales}, {"v_biases", &v_biases}};
  for (const auto& [name, a] : groups) {
    if (a->shape() != scale_shape) {
      fail(op, std::string(name) + " must be " + shape_str(scale_shape) + " (one per " +
               std::to_string(group_size) + " values), got " + shape_str(a->shape()));
    }
    // As QuantizedKVCache makes them (mx.quantize of keys in the dtype of
    // the queries); the result is in that dtype too, as mlx-lm's is.
    if (a->dtype() != q.dtype()) {
      fail(op, std::string(name) + " must be in the dtype of q (" +
               dtype_str(q.dtype()) + "), got " + dtype_str(a->dtype()));
    }
  }
  check_attention_shapes(op, q, B, Hkv, S, Dh, causal);
  auto stream = mx::to_stream(s);
  std::vector<mx::array> kv = {k_codes, k_scales, k_biases, v_codes, v_scales, v_biases};
  if (uses_metal(stream)) {
    return quantized_attention_with_mlx_ops(q, kv, scale, causal, bits, group_size, stream);
  }
  kv.insert(kv.begin(), row_contiguous(q, stream));
  return mx::array(
      q.shape(), q.dtype(),
      std::make_shared<Attention>(stream, scale, causal, bits, group_size), std::move(kv));
}

// ---------------------------------------------------------------------------
// Primitive
// ---------------------------------------------------------------------------

bool Attention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Attention&>(other);
  return scale_ == o.scale_ && causal_ == o.causal_ && bits_ == o.bits_ &&
      group_size_ == o.group_size_;
}

std::vector<mx::Shape> Attention::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

// Never reached: on a GPU stream the ops return MLX's own.
void Attention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::logic_error("Attention is not built for a GPU stream");
}

} // namespace fused_moe
