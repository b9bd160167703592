// The Metal kernel allow-list and kernel-name grammar: the one place they are
// written. fused_moe.metal instantiates exactly this list, and the host
// (csrc/metal/launch_plan.cpp) builds its table of kernel names from the
// same macros, so a name the host asks for is instantiated or the host
// raises before any lookup. tests/test_metal_plan.py checks that the list
// covers csrc/supported.h. Included by Metal sources and by host C++ alike, so it
// holds nothing but preprocessor macros.
#pragma once

// Each X(...) below receives the pieces of one kernel name. The `name`
// pieces are the spellings used in kernel names; the type pieces are the
// Metal element types and are ignored by the host.

// X(dtype_name, metal_type)
#define FM_FOR_EACH_DTYPE(X, ...) \
  X(float16, half, __VA_ARGS__)   \
  X(bfloat16, bfloat, __VA_ARGS__) \
  X(float32, float, __VA_ARGS__)

// X(bits): codes per weight
#define FM_FOR_EACH_BITS(X, ...) \
  X(3, __VA_ARGS__)              \
  X(4, __VA_ARGS__)

// X(group_size): codes sharing one scale and bias
#define FM_FOR_EACH_GROUP_SIZE(X, ...) \
  X(32, __VA_ARGS__)                   \
  X(64, __VA_ARGS__)                   \
  X(128, __VA_ARGS__)

// X(variant): decode = one SIMD group per (pair or token, rows); prefill =
// pairs grouped by expert so that weight rows are reused across tokens.
#define FM_FOR_EACH_VARIANT(X, ...) \
  X(decode, __VA_ARGS__)            \
  X(prefill, __VA_ARGS__)

// The name grammar: <op>_<variant>_<dtype>_b<bits>_gs<group_size>, e.g.
// "gate_up_swiglu_decode_bfloat16_b3_gs64". The host spells it with
// fused_moe::metal::kernel_name(); tests check both spellings agree.
#define FM_STR_(x) #x
#define FM_STR(x) FM_STR_(x)
#define FM_KERNEL_NAME(op, variant, dtype_name, bits, group_size) \
  FM_STR(op) "_" FM_STR(variant) "_" FM_STR(dtype_name) "_b" FM_STR(bits) \
      "_gs" FM_STR(group_size)

// The expert ops, whose kernels span the grid above: X(op), where `op` is
// the kernel name prefix and the name of the kernel template family in the
// .metal sources.
#define FM_FOR_EACH_EXPERT_OP(X, ...) \
  X(gate_up_swiglu, __VA_ARGS__)      \
  X(down_combine, __VA_ARGS__)

// Every op with Metal kernels: the expert ops and the router (route.h),
// whose kernels span their own list below.
#define FM_FOR_EACH_OP(X, ...)          \
  FM_FOR_EACH_EXPERT_OP(X, __VA_ARGS__) \
  X(route, __VA_ARGS__)

// Calls X(op, variant, dtype_name, metal_type, bits, group_size) once per
// kernel of the allow-list. Nested expansion goes through one helper per
// level because a macro cannot expand itself.
#define FM_GRID_GS_(gs, X, op, variant, dn, mt, bits) X(op, variant, dn, mt, bits, gs)
#define FM_GRID_BITS_(bits, X, op, variant, dn, mt) \
  FM_FOR_EACH_GROUP_SIZE(FM_GRID_GS_, X, op, variant, dn, mt, bits)
#define FM_GRID_DTYPE_(dn, mt, X, op, variant) \
  FM_FOR_EACH_BITS(FM_GRID_BITS_, X, op, variant, dn, mt)
#define FM_GRID_VARIANT_(variant, X, op) \
  FM_FOR_EACH_DTYPE(FM_GRID_DTYPE_, X, op, variant)
#define FM_GRID_OP_(op, X) FM_FOR_EACH_VARIANT(FM_GRID_VARIANT_, X, op)
#define FM_FOR_EACH_KERNEL(X) FM_FOR_EACH_EXPERT_OP(FM_GRID_OP_, X)

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
