// The Metal kernel allow-list and kernel-name grammar: the one place they are
// written. fused_moe.metal instantiates exactly this list, and the host
// (csrc/metal/launch_plan.cpp, metal_source.cpp) builds its table of kernel
// names and per-kernel sources from the same macros, so a name the host asks
// for is instantiated or the host raises before any lookup. The launch plan
// static_asserts that these lists are csrc/supported.h's grid, and
// tests/test_metal_plan.py checks the names. Included by Metal sources and by
// host C++ alike, so it holds nothing but preprocessor macros.
//
// The list is long (every quantization x activation x dtype x variant), but a
// GPU stream compiles one kernel on its first use, from the embedded source
// with only that kernel's instantiation line (csrc/metal/metal_source.cpp):
// a model compiles the few kernels its layers use.
#pragma once

// Each X(...) below receives the pieces of one kernel name. The `name`
// pieces are the spellings used in kernel names; the other pieces are
// template arguments of the Metal kernels (ignored by the host unless it
// checks them against csrc/supported.h).

// X(dtype_name, metal_type): the activations' dtype (x, h, the output, and
// affine scales and biases).
#define FM_FOR_EACH_DTYPE(X, ...) \
  X(float16, half, __VA_ARGS__)   \
  X(bfloat16, bfloat, __VA_ARGS__) \
  X(float32, float, __VA_ARGS__)

// X(bits): affine codes per weight (supported.h, kSupportedBits).
#define FM_FOR_EACH_BITS(X, ...) \
  X(2, __VA_ARGS__)              \
  X(3, __VA_ARGS__)              \
  X(4, __VA_ARGS__)              \
  X(5, __VA_ARGS__)              \
  X(6, __VA_ARGS__)              \
  X(8, __VA_ARGS__)

// X(group_size): affine codes sharing one scale and bias
// (supported.h, kSupportedGroupSizes).
#define FM_FOR_EACH_GROUP_SIZE(X, ...) \
  X(32, __VA_ARGS__)                   \
  X(64, __VA_ARGS__)                   \
  X(128, __VA_ARGS__)

// X(mode_name, mode, bits, group_size): the floating-point modes at the one
// bits and group size MLX stores them with (supported.h, kFpModes; `mode` is
// the QuantMode value).
#define FM_FOR_EACH_FP_MODE(X, ...) \
  X(mxfp4, 1, 4, 32, __VA_ARGS__)   \
  X(mxfp8, 2, 8, 32, __VA_ARGS__)   \
  X(nvfp4, 3, 4, 16, __VA_ARGS__)

// X(quant_name, mode, bits, group_size): every quantization of one
// projection. Affine spells "b<bits>_gs<group_size>", an fp mode its name.
#define FM_QUANT_AFFINE_GS_(gs, X, bits, ...) X(b##bits##_gs##gs, 0, bits, gs, __VA_ARGS__)
#define FM_QUANT_AFFINE_BITS_(bits, X, ...) \
  FM_FOR_EACH_GROUP_SIZE(FM_QUANT_AFFINE_GS_, X, bits, __VA_ARGS__)
#define FM_FOR_EACH_QUANT(X, ...)                      \
  FM_FOR_EACH_BITS(FM_QUANT_AFFINE_BITS_, X, __VA_ARGS__) \
  FM_FOR_EACH_FP_MODE(X, __VA_ARGS__)

// X(activation_name, activation, gated): the gate/up epilogues
// (supported.h, Activation and kActivations: the same order and ids).
#define FM_FOR_EACH_ACTIVATION(X, ...)           \
  X(swiglu, 0, 1, __VA_ARGS__)                   \
  X(clamped_swiglu, 1, 1, __VA_ARGS__)           \
  X(deepseek_v41_swiglu, 2, 1, __VA_ARGS__)      \
  X(swiglu_oai, 3, 1, __VA_ARGS__)               \
  X(geglu, 4, 1, __VA_ARGS__)                    \
  X(situ, 5, 1, __VA_ARGS__)                     \
  X(gelu_approx, 6, 0, __VA_ARGS__)              \
  X(relu2, 7, 0, __VA_ARGS__)

// X(variant): decode = one SIMD group per (pair or token, rows); prefill =
// pairs grouped by expert so that weight rows are reused across tokens.
#define FM_FOR_EACH_VARIANT(X, ...) \
  X(decode, __VA_ARGS__)            \
  X(prefill, __VA_ARGS__)

// The expert ops. The gate/up kernels are one family per activation
// (kernel template gate_up_<variant>); down is one family, its combine a
// run-time flag (kernel template down_<variant>).
#define FM_FOR_EACH_EXPERT_OP(X, ...) \
  X(gate_up, __VA_ARGS__)             \
  X(down, __VA_ARGS__)

// Every op with Metal kernels: the expert ops and the router (route.h),
// whose kernels span their own list below.
#define FM_FOR_EACH_OP(X, ...)          \
  FM_FOR_EACH_EXPERT_OP(X, __VA_ARGS__) \
  X(route, __VA_ARGS__)

// The name grammar:
//   gate_up_<activation>_<variant>_<dtype>_<quant>
//   down_<variant>_<dtype>_<quant>
// e.g. "gate_up_swiglu_decode_bfloat16_b3_gs64",
// "gate_up_swiglu_oai_prefill_float16_mxfp4", "down_decode_float32_nvfp4".
// The host spells them with fused_moe::metal::kernel_name(); tests check
// both spellings agree.
#define FM_STR_(x) #x
#define FM_STR(x) FM_STR_(x)
#define FM_GATE_UP_KERNEL_NAME(activation_name, variant, dtype_name, quant_name) \
  "gate_up_" FM_STR(activation_name) "_" FM_STR(variant) "_" FM_STR(dtype_name) \
      "_" FM_STR(quant_name)
#define FM_DOWN_KERNEL_NAME(variant, dtype_name, quant_name) \
  "down_" FM_STR(variant) "_" FM_STR(dtype_name) "_" FM_STR(quant_name)

// Calls X(activation_name, activation, gated, variant, dtype_name,
// metal_type, quant_name, mode, bits, group_size) once per gate/up kernel,
// and Y(variant, dtype_name, metal_type, quant_name, mode, bits, group_size)
// once per down kernel. Nested expansion goes through one helper per level
// because a macro cannot expand itself.
#define FM_GU_QUANT_(qn, mode, bits, gs, X, an, act, gated, variant, dn, mt) \
  X(an, act, gated, variant, dn, mt, qn, mode, bits, gs)
#define FM_GU_DTYPE_(dn, mt, X, an, act, gated, variant) \
  FM_FOR_EACH_QUANT(FM_GU_QUANT_, X, an, act, gated, variant, dn, mt)
#define FM_GU_VARIANT_(variant, X, an, act, gated) \
  FM_FOR_EACH_DTYPE(FM_GU_DTYPE_, X, an, act, gated, variant)
#define FM_GU_ACT_(an, act, gated, X) FM_FOR_EACH_VARIANT(FM_GU_VARIANT_, X, an, act, gated)
#define FM_FOR_EACH_GATE_UP_KERNEL(X) FM_FOR_EACH_ACTIVATION(FM_GU_ACT_, X)

#define FM_DN_QUANT_(qn, mode, bits, gs, Y, variant, dn, mt) \
  Y(variant, dn, mt, qn, mode, bits, gs)
#define FM_DN_DTYPE_(dn, mt, Y, variant) FM_FOR_EACH_QUANT(FM_DN_QUANT_, Y, variant, dn, mt)
#define FM_DN_VARIANT_(variant, Y) FM_FOR_EACH_DTYPE(FM_DN_DTYPE_, Y, variant)
#define FM_FOR_EACH_DOWN_KERNEL(Y) FM_FOR_EACH_VARIANT(FM_DN_VARIANT_, Y)

// The router's kernels: x dtype x gate form. A gate form is either an
// unquantized gate dtype or 8-bit affine codes with a group size; written out
// one by one because the router's quantization (8 bits, any group size) is
// not the experts' grid.
// X(gate_name, family, gate_arg): kernel template route_<family>_gate, whose
// second template argument is gate_arg (the Metal element type of a float
// gate, the group size of a quantized one).
#define FM_FOR_EACH_ROUTE_GATE(X, ...)  \
  X(float16, float, half, __VA_ARGS__)   \
  X(bfloat16, float, bfloat, __VA_ARGS__) \
  X(float32, float, float, __VA_ARGS__)  \
  X(b8_gs32, quantized, 32, __VA_ARGS__) \
  X(b8_gs64, quantized, 64, __VA_ARGS__) \
  X(b8_gs128, quantized, 128, __VA_ARGS__)

// The router's name grammar: route_<x dtype>_gate_<gate form>, e.g.
// "route_bfloat16_gate_float32" or "route_float16_gate_b8_gs64".
#define FM_ROUTE_KERNEL_NAME(dtype_name, gate_name) \
  "route_" FM_STR(dtype_name) "_gate_" FM_STR(gate_name)

// Calls X(dtype_name, metal_type, gate_name, family, gate_arg) once per
// router kernel.
#define FM_ROUTE_GATE_(gate_name, family, gate_arg, X, dn, mt) \
  X(dn, mt, gate_name, family, gate_arg)
#define FM_ROUTE_DTYPE_(dn, mt, X) FM_FOR_EACH_ROUTE_GATE(FM_ROUTE_GATE_, X, dn, mt)
#define FM_FOR_EACH_ROUTE_KERNEL(X) FM_FOR_EACH_DTYPE(FM_ROUTE_DTYPE_, X)
