#include "ops/common.h"

#include "mlx/scheduler.h"

#include <cmath>
#include <iterator>
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

QuantMode parse_mode(const char* op, const char* which, const std::string& mode) {
  for (size_t i = 0; i < kModeNames.size(); ++i) {
    if (mode == kModeNames[i]) {
      return static_cast<QuantMode>(i);
    }
  }
  std::string known;
  for (const char* n : kModeNames) {
    known += (known.empty() ? "" : ", ") + std::string(n);
  }
  fail(op, std::string(which) + " mode='" + mode +
           "' is not supported; supported modes: {" + known + "}");
}

namespace {

// "[E, 256, 48]": named dims where any size goes, numbers elsewhere.
std::string lead_str(const std::vector<LeadDim>& lead, int last) {
  std::ostringstream os;
  os << "[";
  for (const auto& d : lead) {
    if (d.size < 0) {
      os << d.name << ", ";
    } else {
      os << d.size << ", ";
    }
  }
  os << last << "]";
  return os.str();
}

std::string rows_of(const QuantSpec& q, int cols, const char* cols_name) {
  const std::string width = q.mode == QuantMode::affine
      ? std::to_string(q.bits) + "-bit"
      : std::string(mode_name(q.mode));
  return width + " rows of " + (cols_name ? std::string(cols_name) + "=" : "") +
      std::to_string(cols) + " inputs";
}

} // namespace

mx::Shape check_quantized_matrix(
    const char* op,
    const QuantNames& names,
    const mx::array& weight,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const std::vector<LeadDim>& lead,
    int cols,
    const char* cols_name,
    const QuantSpec& q,
    std::optional<DtypeOwner> dtype_owner) {
  if (weight.dtype() != mx::uint32) {
    fail(op, names.weight + " must be uint32, got " + dtype_str(weight.dtype()));
  }
  const int words = static_cast<int>(int64_t(cols) * q.bits / 32);
  const int nd = static_cast<int>(lead.size());
  const int ndim = static_cast<int>(weight.ndim());
  bool any_empty = false;
  for (int i = 0; i < nd && i < ndim; ++i) {
    any_empty |= lead[i].size < 0 && weight.shape(i) < 1;
  }
  if (ndim != nd + 1 || any_empty) {
    std::string need = lead_str(lead, words);
    std::string any;
    for (const auto& d : lead) {
      if (d.size < 0) {
        any += std::string(any.empty() ? " with " : " and ") + d.name + " >= 1";
      }
    }
    fail(op, names.weight + " must be " + need + any + ", got " +
             shape_str(weight.shape()));
  }
  mx::Shape resolved;
  for (int i = 0; i < nd; ++i) {
    resolved.push_back(lead[i].size < 0 ? weight.shape(i) : lead[i].size);
  }
  mx::Shape w_shape = resolved, s_shape = resolved;
  w_shape.push_back(words);
  s_shape.push_back(cols / q.group_size);
  if (weight.shape() != w_shape) {
    fail(op, names.weight + " has shape " + shape_str(weight.shape()) +
             " but " + rows_of(q, cols, cols_name) + " need " +
             shape_str(w_shape));
  }
  if (scales.shape() != s_shape) {
    fail(op, names.scales + " has shape " + shape_str(scales.shape()) +
             ", expected " + shape_str(s_shape) + " for group_size=" +
             std::to_string(q.group_size));
  }
  if (q.mode != QuantMode::affine) {
    const FpModeSpec& m = fp_mode_spec(q.mode);
    if (scales.dtype() != mx::uint8) {
      fail(op, names.scales + " must be uint8 (" + m.scale_format +
               " scales) for mode " + m.name + ", got " +
               dtype_str(scales.dtype()));
    }
    if (biases.has_value()) {
      fail(op, names.biases + " must be None for mode " + m.name +
               ": it has no biases");
    }
    return resolved;
  }
  if (!biases.has_value()) {
    fail(op, names.biases + " is missing: mode affine needs biases");
  }
  if (biases->shape() != s_shape) {
    fail(op, names.biases + " has shape " + shape_str(biases->shape()) +
             ", expected " + shape_str(s_shape) + " for group_size=" +
             std::to_string(q.group_size));
  }
  if (!dtype_owner.has_value()) {
    if (!is_float(scales.dtype())) {
      fail(op, names.scales + " must be float16, bfloat16 or float32, got " +
               dtype_str(scales.dtype()));
    }
    dtype_owner = DtypeOwner{scales.dtype(), names.scales.c_str()};
  }
  for (const auto* a : {&scales, &*biases}) {
    const std::string& an = a == &scales ? names.scales : names.biases;
    if (a->dtype() != dtype_owner->dtype && an != dtype_owner->name) {
      fail(op, an + " has dtype " + dtype_str(a->dtype()) + " but " +
               dtype_owner->name + " has dtype " +
               dtype_str(dtype_owner->dtype) + "; they must match");
    }
  }
  return resolved;
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

void raise_pending_error(const mx::Stream& s) {
  if (s.device == mx::Device::cpu) {
    mx::scheduler::check_error(s);
  }
}

void no_gpu(const char* name) {
  throw std::runtime_error(
      std::string(name) + " has no GPU implementation in this build (the "
      "Metal kernels need MLX built with Metal, on macOS).");
}

// MLX calls this only after checking both are of the same type.
bool QuantizedPrimitive::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedPrimitive&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_;
}

// ---------------------------------------------------------------------------
// Expert ops
// ---------------------------------------------------------------------------

ActivationParams make_activation(
    const char* op,
    const std::string& name,
    std::optional<float> limit,
    std::optional<float> alpha,
    std::optional<float> beta,
    std::optional<float> linear_beta) {
  const ActivationSpec* spec = nullptr;
  std::string known;
  for (const auto& a : kActivations) {
    known += (known.empty() ? "" : ", ") + std::string(a.name);
    if (name == a.name) {
      spec = &a;
    }
  }
  if (!spec) {
    fail(op, "activation='" + name + "' is not supported; supported "
             "activations: {" + known + "}");
  }
  ActivationParams p;
  p.kind = spec->kind;
  auto take = [&](const char* pname, const std::optional<float>& v,
                  bool takes, bool required, bool nonzero, float& out) {
    if (!takes && v.has_value()) {
      fail(op, std::string(pname) + " is not a parameter of activation '" +
               spec->name + "'");
    }
    if (takes && required && !v.has_value()) {
      fail(op, "activation '" + std::string(spec->name) + "' needs " + pname);
    }
    if (v.has_value()) {
      if (!std::isfinite(*v) || (nonzero && *v == 0.0f)) {
        fail(op, std::string(pname) + "=" + std::to_string(*v) +
                 " must be finite" + (nonzero ? " and nonzero" : ""));
      }
      out = *v;
    }
  };
  take("limit", limit, spec->limit, true, false, p.limit);
  take("alpha", alpha, spec->alpha, true, false, p.alpha);
  take("beta", beta, spec->beta, true, true, p.beta);
  take("linear_beta", linear_beta, spec->linear_beta_optional, false, true,
       p.linear_beta);
  if ((p.kind == Activation::clamped_swiglu ||
       p.kind == Activation::swiglu_oai) && !(p.limit > 0.0f)) {
    fail(op, "limit=" + std::to_string(p.limit) + " of activation '" +
             spec->name + "' must be > 0");
  }
  if (p.kind == Activation::deepseek_v41_swiglu && p.limit <= 0.0f) {
    // mlx-lm's DeepseekV41SwiGLU applies no clamp then: plain SwiGLU.
    p = ActivationParams{};
  }
  return p;
}

ExpertSlots expert_slots(const ExpertSettings& s, bool down) {
  ExpertSlots slots;
  int next = 3;
  if (s.quant.mode == QuantMode::affine) {
    slots.biases = next++;
  }
  slots.indices = next++;
  if (down && s.combine) {
    slots.weights = next++;
  }
  if (s.bias) {
    slots.bias = next++;
  }
  if (s.global_scale) {
    slots.global_scale = next++;
  }
  slots.count = next;
  return slots;
}

// MLX calls this only after checking both are of the same type.
bool ExpertPrimitive::is_equivalent(const mx::Primitive& other) const {
  return settings_ == static_cast<const ExpertPrimitive&>(other).settings_;
}

bool metal_has_kernel(bool down, const ExpertSettings& s) {
  // metal/allow_list.h has every activation for each quantization it has,
  // and the rest of the settings are run-time arguments of those kernels.
  (void)down;
  return metal::has_expert_kernels(s.quant.mode, s.quant.bits, s.quant.group_size);
}

void check_metal_has_kernel(const char* op, bool down, const ExpertSettings& s) {
  if (metal_has_kernel(down, s)) {
    return;
  }
  const QuantSpec& q = s.quant;
  fail(op, std::string("no Metal kernel for mode ") + mode_name(q.mode) +
           " bits=" + std::to_string(q.bits) + " group_size=" +
           std::to_string(q.group_size) + " (metal/allow_list.h)");
}

std::string expert_id_error(
    const char* op, int64_t pair, int k, int64_t id, int num_experts) {
  std::ostringstream msg;
  msg << "fused_moe." << op << ": indices[" << pair / k << ", " << pair % k
      << "] = " << id << " is out of range for " << num_experts
      << " experts (valid: 0.." << num_experts - 1 << ")";
  return msg.str();
}

void check_expert_ids_now(
    const char* op, const mx::array& indices, int num_experts, const mx::Stream& s) {
  if (s.device != mx::Device::cpu || !indices.is_available() ||
      !indices.flags().row_contiguous) {
    return;
  }
  const int64_t n = indices.size();
  const int k = indices.shape(-1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = indices.dtype() == mx::uint32
        ? int64_t(indices.data<uint32_t>()[i])
        : int64_t(indices.data<int32_t>()[i]);
    if (id < 0 || id >= num_experts) {
      throw std::runtime_error(expert_id_error(op, i, k, id, num_experts));
    }
  }
}

mx::array pair_experts(const mx::array& indices, mx::StreamOrDevice s) {
  return mx::astype(mx::reshape(indices, {-1}, s), mx::uint32, s);
}

} // namespace fused_moe
