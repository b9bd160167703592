#include "ops/common.h"

#include <stdexcept>

namespace fused_moe {

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    os << (i ? ", " : "") << shape[i];
  }
  os << "]";
  return os.str();
}

std::string dtype_str(mx::Dtype t) {
  std::ostringstream os;
  os << t;
  return os.str();
}

void fail(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string("fused_moe.") + op + ": " + msg);
}

bool is_float(mx::Dtype t) {
  return t == mx::float16 || t == mx::bfloat16 || t == mx::float32;
}

int check_quant_matrix(
    const char* op,
    const char* name, // e.g. "gate_up" -> gate_up_weight, ...
    const mx::array& weight,
    const mx::array& scales,
    const mx::array& biases,
    int rows,
    int cols,
    int bits,
    int group_size,
    mx::Dtype act_dtype,
    const char* act_name) {
  const std::string n(name);
  if (weight.dtype() != mx::uint32) {
    fail(op, n + "_weight must be uint32, got " + dtype_str(weight.dtype()));
  }
  if (weight.ndim() != 3 || weight.shape(0) < 1) {
    fail(op, n + "_weight must be [E, " + std::to_string(rows) + ", " +
             std::to_string(cols * bits / 32) + "] with E >= 1, got " +
             shape_str(weight.shape()));
  }
  const int E = weight.shape(0);
  const mx::Shape w_shape = {E, rows, cols * bits / 32};
  const mx::Shape s_shape = {E, rows, cols / group_size};
  if (weight.shape() != w_shape) {
    fail(op, n + "_weight has shape " + shape_str(weight.shape()) +
             " but " + std::to_string(bits) + "-bit rows of " +
             std::to_string(cols) + " inputs need " + shape_str(w_shape));
  }
  for (const auto* a : {&scales, &biases}) {
    const std::string an = n + (a == &scales ? "_scales" : "_biases");
    if (a->shape() != s_shape) {
      fail(op, an + " has shape " + shape_str(a->shape()) + ", expected " +
               shape_str(s_shape) + " for group_size=" +
               std::to_string(group_size));
    }
    if (a->dtype() != act_dtype) {
      fail(op, an + " has dtype " + dtype_str(a->dtype()) + " but " +
               act_name + " has dtype " + dtype_str(act_dtype) + "; " +
               act_name + " must have the dtype of the packed scales and "
               "biases");
    }
  }
  return E;
}

int check_dense_quant_matrix(
    const char* op,
    const mx::array& weight,
    const mx::array& scales,
    const mx::array& biases,
    int K,
    int bits,
    int group_size,
    mx::Dtype scale_dtype,
    const char* dtype_owner) {
  if (weight.dtype() != mx::uint32) {
    fail(op, "w must be uint32, got " + dtype_str(weight.dtype()));
  }
  if (weight.ndim() != 2) {
    fail(op, "w must be [N, " + std::to_string(K) + "*bits/32], got " +
             shape_str(weight.shape()));
  }
  const int N = weight.shape(0);
  const mx::Shape w_shape = {N, K * bits / 32};
  if (weight.shape() != w_shape) {
    fail(op, "w has shape " + shape_str(weight.shape()) + " but " +
             std::to_string(bits) + "-bit rows of K=" + std::to_string(K) +
             " inputs need " + shape_str(w_shape));
  }
  const mx::Shape s_shape = {N, K / group_size};
  for (const auto* a : {&scales, &biases}) {
    const std::string an = a == &scales ? "scales" : "biases";
    if (a->shape() != s_shape) {
      fail(op, an + " has shape " + shape_str(a->shape()) + ", expected " +
               shape_str(s_shape) + " for group_size=" +
               std::to_string(group_size));
    }
    if (a->dtype() != scale_dtype) {
      fail(op, an + " has dtype " + dtype_str(a->dtype()) + " but " +
               dtype_owner + " has dtype " + dtype_str(scale_dtype) +
               "; they must match");
    }
  }
  return N;
}

void check_top_k(const char* op, int k) {
  if (k < kMinTopK || k > kMaxTopK) {
    fail(op, "k=" + std::to_string(k) + " experts per token is not "
             "supported; supported k: " + std::to_string(kMinTopK) + ".." +
             std::to_string(kMaxTopK));
  }
}

int check_indices(const char* op, const mx::array& indices, const mx::Shape& lead) {
  if (indices.dtype() != mx::uint32 && indices.dtype() != mx::int32) {
    fail(op, "indices must be uint32 or int32, got " +
             dtype_str(indices.dtype()));
  }
  mx::Shape got_lead(indices.shape().begin(), indices.shape().end());
  if (indices.ndim() >= 1) {
    got_lead.pop_back();
  }
  if (indices.ndim() < 1 || got_lead != lead) {
    fail(op, "indices must have shape " + shape_str(lead) +
             " + [k], got " + shape_str(indices.shape()));
  }
  const int k = indices.shape(-1);
  check_top_k(op, k);
  return k;
}

void check_multiple_of_32(const char* op, const char* what, int v) {
  if (v % 32 != 0 || v <= 0) {
    fail(op, std::string(what) + "=" + std::to_string(v) +
             " must be a positive multiple of 32");
  }
}

mx::array flatten_rows(const mx::array& a, int cols, mx::StreamOrDevice s) {
  return mx::contiguous(mx::reshape(a, {-1, cols}, s), false, s);
}

mx::array row_contiguous(const mx::array& a, mx::StreamOrDevice s) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, s);
}

bool uses_metal(const mx::Stream& s) {
  return s.device == mx::Device::gpu;
}

metal::Dtype metal_dtype(mx::Dtype t) {
  if (t == mx::float32) {
    return metal::Dtype::float32;
  }
  return t == mx::float16 ? metal::Dtype::float16 : metal::Dtype::bfloat16;
}

void no_gpu(const char* name) {
  throw std::runtime_error(
      std::string(name) + " has no GPU implementation in this build (the "
      "Metal kernels need MLX built with Metal, on macOS).");
}

mx::array pair_experts(const mx::array& indices, mx::StreamOrDevice s) {
  return mx::astype(mx::reshape(indices, {-1}, s), mx::uint32, s);
}

// MLX calls this only after checking both are of the same type.
bool QuantizedPrimitive::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedPrimitive&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_;
}

} // namespace fused_moe
