// Python bindings: fused_moe._ext. The Python package wraps these in
// fused_moe/ops.py, which takes a PackedExperts instead of raw arrays.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/array.h>

#include "cpu/isa.h"
#include "cpu/probe.h"
#include "cpu/thread_pool.h"
#include "supported.h"
#include "metal/launch_plan.h"
#include "metal/metal_source.h"
#include "ops.h"
#include "quant/gptq.h"

namespace nb = nanobind;
namespace fm = fused_moe;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

using OptArray = std::optional<mx::array>;

fm::QuantSpec quant_spec(
    const char* op,
    const char* which,
    const std::string& mode,
    int bits,
    int group_size) {
  return {fm::parse_mode(op, which, mode), bits, group_size};
}

fm::Activation activation_kind(const std::string& name) {
  for (const auto& a : fm::kActivations) {
    if (name == a.name) {
      return a.kind;
    }
  }
  // make_activation words the error with the supported set.
  return fm::make_activation("gate_up", name, {}, {}, {}, {}).kind;
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "fused_moe native extension: fused low-bit MoE ops for MLX";

  // The expert ops. `biases` is None for the fp modes (they have none);
  // docs/kernel_contract.md gives the math and shapes of every setting.
  m.def(
      "gate_up",
      [](const mx::array& x, const mx::array& w, const mx::array& scales,
         const OptArray& biases, const mx::array& indices, int bits,
         int group_size, const std::string& mode, const std::string& activation,
         std::optional<float> limit, std::optional<float> alpha,
         std::optional<float> beta, std::optional<float> linear_beta,
         const OptArray& bias, const OptArray& global_scale,
         mx::StreamOrDevice s) {
        return fm::gate_up(
            x, w, scales, biases, indices,
            quant_spec("gate_up", "gate_up", mode, bits, group_size),
            fm::make_activation(
                "gate_up", activation, limit, alpha, beta, linear_beta),
            bias, global_scale, s);
      },
      "x"_a, "weight"_a, "scales"_a, "biases"_a.none(), "indices"_a, "bits"_a,
      "group_size"_a, nb::kw_only(), "mode"_a = "affine",
      "activation"_a = "swiglu", "limit"_a = nb::none(), "alpha"_a = nb::none(),
      "beta"_a = nb::none(), "linear_beta"_a = nb::none(),
      "bias"_a = nb::none(), "global_scale"_a = nb::none(),
      "stream"_a = nb::none(),
      "h[..., j, :] = act(x_j·Gᵀ + b_g, x_j·Uᵀ + b_u) for the selected "
      "experts (x_j: x shared [..., D] or per slot [..., k, D]; not gated: "
      "act(x_j·Wᵀ + b)); see docs/kernel_contract.md.");
  m.def(
      "gate_up_swiglu",
      [](const mx::array& x, const mx::array& w, const mx::array& scales,
         const OptArray& biases, const mx::array& indices, int bits,
         int group_size, const std::string& mode, const OptArray& bias,
         const OptArray& global_scale, mx::StreamOrDevice s) {
        return fm::gate_up(
            x, w, scales, biases, indices,
            quant_spec("gate_up", "gate_up", mode, bits, group_size),
            fm::ActivationParams{}, bias, global_scale, s);
      },
      "x"_a, "gate_up_weight"_a, "gate_up_scales"_a, "gate_up_biases"_a.none(),
      "indices"_a, "bits"_a, "group_size"_a, nb::kw_only(),
      "mode"_a = "affine", "bias"_a = nb::none(),
      "global_scale"_a = nb::none(), "stream"_a = nb::none(),
      "h = silu(x·Gᵀ) ⊙ (x·Uᵀ) for the selected experts: gate_up with "
      "activation='swiglu'; see fused_moe.gate_up_swiglu.");

  m.def(
      "down_combine",
      [](const mx::array& h, const mx::array& w, const mx::array& scales,
         const OptArray& biases, const mx::array& indices,
         const mx::array& weights, int bits, int group_size,
         const std::string& mode, const OptArray& bias,
         const OptArray& global_scale, mx::StreamOrDevice s) {
        return fm::down_combine(
            h, w, scales, biases, indices, weights,
            quant_spec("down_combine", "down", mode, bits, group_size), bias,
            global_scale, s);
      },
      "h"_a, "down_weight"_a, "down_scales"_a, "down_biases"_a.none(),
      "indices"_a, "weights"_a, "bits"_a, "group_size"_a, nb::kw_only(),
      "mode"_a = "affine", "bias"_a = nb::none(),
      "global_scale"_a = nb::none(), "stream"_a = nb::none(),
      "y = Σ_j weights[..., j] · (h[..., j, :]·Dᵀ + b); see "
      "fused_moe.down_combine.");
  m.def(
      "down_slots",
      [](const mx::array& h, const mx::array& w, const mx::array& scales,
         const OptArray& biases, const mx::array& indices, int bits,
         int group_size, const std::string& mode, const OptArray& bias,
         const OptArray& global_scale, mx::StreamOrDevice s) {
        return fm::down_slots(
            h, w, scales, biases, indices,
            quant_spec("down_slots", "down", mode, bits, group_size), bias,
            global_scale, s);
      },
      "h"_a, "down_weight"_a, "down_scales"_a, "down_biases"_a.none(),
      "indices"_a, "bits"_a, "group_size"_a, nb::kw_only(),
      "mode"_a = "affine", "bias"_a = nb::none(),
      "global_scale"_a = nb::none(), "stream"_a = nb::none(),
      "y[..., j, :] = h[..., j, :]·Dᵀ + b per slot, no combine (mlx-lm's "
      "SwitchGLU contract); returns [..., k, D] in the dtype of h.");

  m.def(
      "route",
      &fused_moe::route,
      "x"_a, "gate_weight"_a, "gate_scales"_a.none(), "gate_biases"_a.none(),
      "bias"_a, "k"_a, "bits"_a.none(), "group_size"_a.none(), nb::kw_only(),
      "stream"_a = nb::none(),
      "(indices, weights): sigmoid router with biased top-k; see "
      "fused_moe.route.");

  m.def(
      "quantized_matmul",
      &fused_moe::quantized_matmul,
      "x"_a, "w"_a, "scales"_a, "biases"_a, "bits"_a, "group_size"_a,
      nb::kw_only(), "stream"_a = nb::none(),
      "y = x · dequant(w)ᵀ for MLX's affine format; see "
      "fused_moe.quantized_matmul.");
  m.def(
      "quantized_embedding",
      &fused_moe::quantized_embedding,
      "ids"_a, "w"_a, "scales"_a, "biases"_a, "bits"_a, "group_size"_a,
      nb::kw_only(), "stream"_a = nb::none(),
      "The rows ids of an affine-quantized matrix, dequantized; see "
      "fused_moe.quantized_embedding.");
  m.def(
      "scaled_dot_product_attention",
      [](const mlx::core::array& q, const mlx::core::array& k, const mlx::core::array& v,
         float scale, const std::optional<std::string>& mask,
         mlx::core::StreamOrDevice s) {
        if (mask && *mask != "causal") {
          throw std::invalid_argument(
              "fused_moe.scaled_dot_product_attention: mask must be None or "
              "'causal', got '" + *mask + "'");
        }
        return fused_moe::scaled_dot_product_attention(
            q, k, v, scale, mask.has_value(), s);
      },
      "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a, "mask"_a = nb::none(),
      "stream"_a = nb::none(),
      "softmax(q·kᵀ·scale)·v over a KV cache; see "
      "fused_moe.scaled_dot_product_attention.");
  m.def(
      "quantized_scaled_dot_product_attention",
      [](const mlx::core::array& q, const mlx::core::array& k_codes,
         const mlx::core::array& k_scales, const mlx::core::array& k_biases,
         const mlx::core::array& v_codes, const mlx::core::array& v_scales,
         const mlx::core::array& v_biases, float scale,
         const std::optional<std::string>& mask, int bits, int group_size,
         mlx::core::StreamOrDevice s) {
        if (mask && *mask != "causal") {
          throw std::invalid_argument(
              "fused_moe.quantized_scaled_dot_product_attention: mask must be "
              "None or 'causal', got '" + *mask + "'");
        }
        return fused_moe::quantized_scaled_dot_product_attention(
            q, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, scale,
            mask.has_value(), bits, group_size, s);
      },
      "q"_a, "k_codes"_a, "k_scales"_a, "k_biases"_a, "v_codes"_a,
      "v_scales"_a, "v_biases"_a, nb::kw_only(), "scale"_a,
      "mask"_a = nb::none(), "bits"_a, "group_size"_a, "stream"_a = nb::none(),
      "softmax(q·kᵀ·scale)·v over a quantized KV cache (mlx-lm's "
      "QuantizedKVCache); see fused_moe.quantized_scaled_dot_product_attention.");
  m.def(
      "norm_rope",
      &fused_moe::norm_rope,
      "x"_a, "weight"_a.none(), nb::kw_only(), "heads"_a, "eps"_a,
      "rotary_dim"_a, "traditional"_a, "base"_a, "scale"_a, "offset"_a,
      "stream"_a = nb::none(),
      "An attention projection's RMSNorm and RoPE, heads split out; see "
      "fused_moe.norm_rope.");

  m.def("set_num_threads", &fused_moe::cpu::set_num_threads, "n"_a,
        "Threads used by the CPU kernels (default: FUSED_MOE_NUM_THREADS or "
        "the number of hardware threads).");
  m.def("get_num_threads", &fused_moe::cpu::num_threads);
  m.def(
      "cpu_isa",
      [] { return std::string(fused_moe::cpu::active_kernels().isa_name); },
      "The CPU kernel build in use: avx512, avx2 or generic.");
  m.def("available_cpu_isas", &fused_moe::cpu::available_isas,
        "CPU kernel builds this machine can run, best first.");

  m.def(
      "timed_read",
      [](nb::ndarray<nb::c_contig, nb::device::cpu> buffer) {
        const auto* data = static_cast<const uint8_t*>(buffer.data());
        const int64_t bytes = static_cast<int64_t>(buffer.nbytes());
        nb::gil_scoped_release release;
        return fused_moe::cpu::timed_read(data, bytes);
      },
      "buffer"_a.noconvert(),
      "Reads every byte of a C-contiguous CPU buffer (e.g. a numpy array) "
      "once on the CPU kernels' threads; returns the seconds taken (the "
      "benchmark's bandwidth probe).");

  // GPTQ's column pass for the calibrated quantizer (fused_moe/quant).
  using F32 = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
  using U32 = nb::ndarray<uint32_t, nb::c_contig, nb::device::cpu>;
  m.def(
      "gptq_block",
      [](F32 cur, F32 orig, F32 coef, F32 diag, U32 packed, int64_t first_column,
         F32 delta, F32 scales, F32 biases, int bits, int group_size,
         const std::string& scale_dtype) {
        namespace q = fused_moe::quant;
        auto shape = [](const char* name, const auto& a) {
          q::GptqBuffer b{name, {}};
          for (size_t i = 0; i < a.ndim(); ++i) {
            b.shape.push_back(static_cast<int64_t>(a.shape(i)));
          }
          return b;
        };
        using fused_moe::cpu::FloatType;
        FloatType t;
        if (scale_dtype == "float32") {
          t = FloatType::f32;
        } else if (scale_dtype == "float16") {
          t = FloatType::f16;
        } else if (scale_dtype == "bfloat16") {
          t = FloatType::bf16;
        } else {
          throw std::invalid_argument(
              "gptq_block: scale_dtype must be float32, float16 or bfloat16, got '" +
              scale_dtype + "'");
        }
        if (first_column < 0 || (first_column * bits) % 32) {
          throw std::invalid_argument(
              "gptq_block: first_column " + std::to_string(first_column) +
              " does not start a 32-bit word at " + std::to_string(bits) + " bits");
        }
        const std::vector<q::GptqBuffer> given = {
            shape("cur", cur), shape("orig", orig), shape("coef", coef),
            shape("diag", diag), shape("packed", packed), shape("delta", delta),
            shape("scales", scales), shape("biases", biases)};
        auto dim = [](const auto& a, size_t i) {
          return a.ndim() == 2 ? static_cast<int64_t>(a.shape(i)) : int64_t{0};
        };
        q::GptqBlockArgs a{cur.data(), orig.data(), coef.data(), diag.data(),
                           packed.data(), dim(packed, 1), first_column * bits / 32,
                           delta.data(), scales.data(), biases.data(),
                           dim(cur, 1), static_cast<int>(dim(cur, 0)),
                           bits, group_size, t};
        nb::gil_scoped_release release;
        q::gptq_block(a, given);
      },
      "cur"_a.noconvert(), "orig"_a.noconvert(), "coef"_a.noconvert(),
      "diag"_a.noconvert(), "packed"_a.noconvert(), "first_column"_a,
      "delta"_a.noconvert(), "scales"_a.noconvert(), "biases"_a.noconvert(),
      "bits"_a, "group_size"_a, "scale_dtype"_a,
      "GPTQ's column pass over one block of columns, in place, on the CPU "
      "kernels' threads (numpy buffers; see csrc/quant/gptq.h and "
      "fused_moe.quant.quantizer).");
  m.attr("GPTQ_MAX_BLOCK") = fused_moe::quant::kGptqMaxBlock;

  // The Metal launch plan and the Metal Primitive inputs, for the tests and
  // the Linux emulator (tests/tools/metal_emulator/).
  m.def(
      "gate_up_metal_inputs",
      [](const mx::array& x, const mx::array& w, const mx::array& scales,
         const OptArray& biases, const mx::array& indices, int bits,
         int group_size, const std::string& mode, const std::string& activation,
         std::optional<float> limit, std::optional<float> alpha,
         std::optional<float> beta, std::optional<float> linear_beta,
         const OptArray& bias, const OptArray& global_scale,
         mx::StreamOrDevice s) {
        return fm::gate_up_metal_inputs(
            x, w, scales, biases, indices,
            quant_spec("gate_up", "gate_up", mode, bits, group_size),
            fm::make_activation(
                "gate_up", activation, limit, alpha, beta, linear_beta),
            bias, global_scale, s);
      },
      "x"_a, "weight"_a, "scales"_a, "biases"_a.none(), "indices"_a, "bits"_a,
      "group_size"_a, nb::kw_only(), "mode"_a = "affine",
      "activation"_a = "swiglu", "limit"_a = nb::none(), "alpha"_a = nb::none(),
      "beta"_a = nb::none(), "linear_beta"_a = nb::none(),
      "bias"_a = nb::none(), "global_scale"_a = nb::none(),
      "stream"_a = nb::none(),
      "The GateUp Primitive's inputs as a GPU stream gets them.");
  m.def(
      "gate_up_swiglu_metal_inputs",
      [](const mx::array& x, const mx::array& w, const mx::array& scales,
         const OptArray& biases, const mx::array& indices, int bits,
         int group_size, mx::StreamOrDevice s) {
        return fm::gate_up_metal_inputs(
            x, w, scales, biases, indices,
            quant_spec("gate_up", "gate_up", "affine", bits, group_size),
            fm::ActivationParams{}, std::nullopt, std::nullopt, s);
      },
      "x"_a, "gate_up_weight"_a, "gate_up_scales"_a, "gate_up_biases"_a.none(),
      "indices"_a, "bits"_a, "group_size"_a, nb::kw_only(),
      "stream"_a = nb::none(),
      "The GateUp Primitive's inputs (affine, swiglu) as a GPU stream gets "
      "them.");
  m.def(
      "down_metal_inputs",
      [](const mx::array& h, const mx::array& w, const mx::array& scales,
         const OptArray& biases, const mx::array& indices,
         const OptArray& weights, int bits, int group_size,
         const std::string& mode, const OptArray& bias,
         const OptArray& global_scale, mx::StreamOrDevice s) {
        return fm::down_metal_inputs(
            h, w, scales, biases, indices, weights,
            quant_spec(weights ? "down_combine" : "down_slots", "down", mode,
                       bits, group_size),
            bias, global_scale, s);
      },
      "h"_a, "down_weight"_a, "down_scales"_a, "down_biases"_a.none(),
      "indices"_a, "weights"_a.none(), "bits"_a, "group_size"_a, nb::kw_only(),
      "mode"_a = "affine", "bias"_a = nb::none(),
      "global_scale"_a = nb::none(), "stream"_a = nb::none(),
      "The Down Primitive's inputs as a GPU stream gets them; weights None: "
      "down_slots.");
  m.def(
      "down_combine_metal_inputs",
      [](const mx::array& h, const mx::array& w, const mx::array& scales,
         const OptArray& biases, const mx::array& indices,
         const mx::array& weights, int bits, int group_size,
         mx::StreamOrDevice s) {
        return fm::down_metal_inputs(
            h, w, scales, biases, indices, weights,
            quant_spec("down_combine", "down", "affine", bits, group_size),
            std::nullopt, std::nullopt, s);
      },
      "h"_a, "down_weight"_a, "down_scales"_a, "down_biases"_a.none(),
      "indices"_a, "weights"_a, "bits"_a, "group_size"_a, nb::kw_only(),
      "stream"_a = nb::none(),
      "The DownCombine Primitive's inputs (affine) as a GPU stream gets "
      "them.");
  m.def(
      "metal_has_expert_kernel",
      [](const std::string& op, const std::string& mode, int bits,
         int group_size, const std::string& activation, bool bias,
         bool global_scale, bool x_per_slot, bool combine) {
        if (op != "gate_up" && op != "down") {
          throw std::invalid_argument(
              "op must be 'gate_up' or 'down', got '" + op + "'");
        }
        fm::ExpertSettings st;
        st.quant = quant_spec(op.c_str(), op.c_str(), mode, bits, group_size);
        st.activation.kind = activation_kind(activation);
        st.bias = bias;
        st.global_scale = global_scale;
        st.x_per_slot = x_per_slot;
        st.combine = combine;
        return fm::metal_has_kernel(op == "down", st);
      },
      "op"_a, "mode"_a, "bits"_a, "group_size"_a, nb::kw_only(),
      "activation"_a = "swiglu", "bias"_a = false, "global_scale"_a = false,
      "x_per_slot"_a = false, "combine"_a = true,
      "Whether the Metal kernels cover this expert-op setting (op: 'gate_up' "
      "or 'down'); a GPU stream raises 'no Metal kernel for ...' where not.");
  m.def(
      "metal_activation_args",
      [](const std::string& activation, std::optional<float> limit,
         std::optional<float> alpha, std::optional<float> beta,
         std::optional<float> linear_beta) {
        const fm::ActivationParams p = fm::make_activation(
            "gate_up", activation, limit, alpha, beta, linear_beta);
        nb::dict d;
        d["activation"] = std::string(fm::activation_spec(p.kind).name);
        d["limit"] = p.limit;
        d["alpha"] = p.alpha;
        d["beta"] = p.beta;
        d["linear_beta"] = p.linear_beta;
        return d;
      },
      "activation"_a, "limit"_a = nb::none(), "alpha"_a = nb::none(),
      "beta"_a = nb::none(), "linear_beta"_a = nb::none(),
      "The activation and float parameters the Metal kernels get for a "
      "gate_up call with these arguments (checked as gate_up checks them; "
      "e.g. deepseek_v41_swiglu with limit <= 0 is swiglu): a dict with "
      "activation, limit, alpha, beta, linear_beta, for the emulator.");
  m.def(
      "route_metal_inputs",
      &fused_moe::route_metal_inputs,
      "x"_a, "gate_weight"_a, "gate_scales"_a.none(), "gate_biases"_a.none(),
      "bias"_a, "k"_a, "bits"_a.none(), "group_size"_a.none(), nb::kw_only(),
      "stream"_a = nb::none(),
      "The Route Primitive's inputs as a GPU stream gets them (bias, gate "
      "scales and biases widened to float32).");
  m.def("metal_kernel_names", &fused_moe::metal::instantiated_kernels,
        "Every kernel metal/fused_moe.metal instantiates.");
  m.def("metal_source", &fused_moe::metal::metal_source,
        "The Metal kernels' whole translation unit as embedded at build time "
        "(metal/fused_moe.metal with its headers inlined), instantiating "
        "every kernel of the allow-list.");
  m.def("metal_kernel_source", &fused_moe::metal::kernel_source, "kernel"_a,
        "The source a GPU stream compiles `kernel` from on first use: "
        "metal_source() with only that kernel's instantiation. ValueError "
        "for a kernel outside the allow-list.");
  m.def("metal_library_name", &fused_moe::metal::library_name, "kernel"_a,
        "The name MLX caches `kernel`'s compiled library under.");
  m.def(
      "metal_launch_plan",
      [](const std::string& op, const std::string& dtype, int bits,
         int group_size, int tokens, int top_k, int hidden, int intermediate,
         int experts, const std::string& gate_dtype, const std::string& mode,
         const std::string& activation, bool bias, bool global_scale,
         bool x_per_slot, bool combine, float limit, float alpha, float beta,
         float linear_beta) {
        namespace mt = fused_moe::metal;
        mt::Problem p{mt::op_from_name(op), mt::dtype_from_name(dtype), bits,
                      group_size, tokens, top_k, hidden, intermediate, experts,
                      mt::dtype_from_name(gate_dtype)};
        p.mode = fm::parse_mode("metal_launch_plan", op.c_str(), mode);
        p.activation = activation_kind(activation);
        p.bias = bias;
        p.global_scale = global_scale;
        p.x_per_slot = x_per_slot;
        p.combine = combine;
        p.limit = limit;
        p.alpha = alpha;
        p.beta = beta;
        p.linear_beta = linear_beta;
        const auto plan = mt::make_launch_plan(p);
        const auto tile = mt::tile_shape(
            p.op, plan.variant, fm::activation_spec(p.activation).gated);
        nb::dict d;
        d["kernel"] = plan.kernel;
        // The router has a single kernel per (x dtype, gate form).
        d["variant"] = p.op == mt::Op::route
            ? nb::object(nb::none())
            : nb::object(nb::str(mt::variant_name(plan.variant)));
        d["threadgroups"] = plan.threadgroups;
        d["threads_per_threadgroup"] = plan.threads_per_threadgroup;
        nb::list buffers;
        for (const auto& b : plan.buffers) {
          const char* src = b.source == mt::Source::input ? "input"
              : b.source == mt::Source::output            ? "output"
              : b.source == mt::Source::absent            ? "absent"
                                                          : "args";
          buffers.append(nb::make_tuple(b.slot, std::string(b.name),
                                        std::string(src), b.index));
        }
        d["buffers"] = buffers;
        d["args"] = nb::bytes(
            reinterpret_cast<const char*>(plan.args.data()), plan.args.size());
        d["rows_per_simdgroup"] = tile.rows_per_simdgroup;
        d["simdgroups"] = tile.simdgroups;
        d["pairs_per_threadgroup"] = tile.pairs_per_threadgroup;
        d["tokens_per_threadgroup"] = tile.tokens_per_threadgroup;
        return d;
      },
      "op"_a, "dtype"_a, "bits"_a, "group_size"_a, "tokens"_a, "top_k"_a,
      "hidden"_a, "intermediate"_a, "experts"_a, "gate_dtype"_a = "float32",
      nb::kw_only(), "mode"_a = "affine", "activation"_a = "swiglu",
      "bias"_a = false, "global_scale"_a = false, "x_per_slot"_a = false,
      "combine"_a = true, "limit"_a = 0.0f, "alpha"_a = 0.0f, "beta"_a = 0.0f,
      "linear_beta"_a = 0.0f,
      "The Metal launch plan for one call, as a dict (for tests and the "
      "emulator). op: gate_up, down or route. For route: dtype is x's, bits 0 "
      "an unquantized gate of gate_dtype, intermediate and the expert "
      "settings unused.");

  auto to_list = [](const auto& values) {
    nb::list l;
    for (int v : values) l.append(v);
    return l;
  };
  m.attr("SUPPORTED_BITS") = nb::tuple(to_list(fused_moe::kSupportedBits));
  m.attr("SUPPORTED_GROUP_SIZES") =
      nb::tuple(to_list(fused_moe::kSupportedGroupSizes));
  m.attr("SUPPORTED_ROUTER_BITS") =
      nb::tuple(to_list(fused_moe::kSupportedRouterBits));
  m.attr("SUPPORTED_LINEAR_BITS") =
      nb::tuple(to_list(fused_moe::kSupportedLinearBits));
  {
    nb::list modes, activations, gated;
    for (const char* n : fused_moe::kModeNames) modes.append(n);
    for (const auto& a : fused_moe::kActivations) {
      activations.append(a.name);
      if (a.gated) gated.append(a.name);
    }
    m.attr("SUPPORTED_MODES") = nb::tuple(modes);
    m.attr("SUPPORTED_ACTIVATIONS") = nb::tuple(activations);
    m.attr("GATED_ACTIVATIONS") = nb::tuple(gated);
    // name -> (required parameters, optional parameters)
    nb::dict params;
    for (const auto& a : fused_moe::kActivations) {
      nb::list req, opt;
      if (a.limit) req.append("limit");
      if (a.alpha) req.append("alpha");
      if (a.beta) req.append("beta");
      if (a.linear_beta_optional) opt.append("linear_beta");
      params[a.name] = nb::make_tuple(nb::tuple(req), nb::tuple(opt));
    }
    m.attr("ACTIVATION_PARAMETERS") = params;
    // name -> the fp mode's layout, as MLX stores it.
    nb::dict fp;
    for (const auto& f : fused_moe::kFpModes) {
      nb::dict d;
      d["bits"] = f.bits;
      d["group_size"] = f.group_size;
      d["code_format"] = f.code_format;
      d["scale_format"] = f.scale_format;
      d["global_scale"] = f.global_scale;
      fp[f.name] = d;
    }
    m.attr("FP_MODES") = fp;
  }
  m.def(
      "supported_quantizations",
      [] {
        nb::list out;
        for (int b : fused_moe::kSupportedBits) {
          for (int g : fused_moe::kSupportedGroupSizes) {
            out.append(nb::make_tuple("affine", b, g));
          }
        }
        for (const auto& f : fused_moe::kFpModes) {
          out.append(nb::make_tuple(f.name, f.bits, f.group_size));
        }
        return nb::tuple(out);
      },
      "Every (mode, bits, group_size) the expert ops take.");
  m.attr("MIN_TOP_K") = fused_moe::kMinTopK;
  m.attr("MAX_TOP_K") = fused_moe::kMaxTopK;
  m.attr("ATTENTION_HEAD_DIM_MULTIPLE") = fused_moe::kAttentionHeadDimMultiple;
  m.attr("MAX_ATTENTION_HEAD_DIM") = fused_moe::kMaxAttentionHeadDim;
  m.attr("SUPPORTED_KV_CACHE_BITS") =
      nb::tuple(to_list(fused_moe::kSupportedKvCacheBits));
}
