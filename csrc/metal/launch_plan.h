// The Metal launch plan: which kernel, what grid, which buffer in which slot
// and the argument struct, for one call of a fused MoE op. Plain C++ with no
// MLX or Metal dependency, so it builds and is tested on every platform; the
// Metal encoder (eval_gpu.cpp, Apple only) and the Linux emulator
// (tests/tools/metal_emulator/) both run exactly these plans.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "metal/allow_list.h"
#include "supported.h"

namespace fused_moe::metal {

// The pieces of a kernel name, spelled as metal/allow_list.h spells them.
#define FM_ENUM_ITEM(name, ...) name,
enum class Op { FM_FOR_EACH_OP(FM_ENUM_ITEM) };
enum class Variant { FM_FOR_EACH_VARIANT(FM_ENUM_ITEM) };
enum class Dtype { FM_FOR_EACH_DTYPE(FM_ENUM_ITEM) };
#undef FM_ENUM_ITEM

const char* op_name(Op op);
const char* variant_name(Variant v);
const char* dtype_name(Dtype t);
// The inverse of op_name and dtype_name; std::invalid_argument listing the
// valid names otherwise.
Op op_from_name(const std::string& name);
Dtype dtype_from_name(const std::string& name);

// One call of an op, as the Primitive sees it (inputs flattened to T tokens).
// route: dtype is x's; bits 0 means an unquantized gate of gate_dtype, bits 8
// an 8-bit affine gate of group_size; intermediate and the expert settings
// are unused. The expert ops: mode, bits and group_size are the projection's
// (gate_up's or down's), the rest the settings of docs/kernel_contract.md.
struct Problem {
  Op op;
  Dtype dtype; // activations, affine scales and biases, and output (route: x only)
  int bits;
  int group_size;
  int tokens; // T
  int top_k; // k
  int hidden; // D
  int intermediate; // H
  int experts; // E
  Dtype gate_dtype = Dtype::float32; // route, unquantized gate only
  QuantMode mode = QuantMode::affine;
  Activation activation = Activation::swiglu; // gate_up
  bool bias = false; // an expert bias input (float32 on a GPU stream)
  bool global_scale = false; // nvfp4's per-expert scales input
  bool x_per_slot = false; // gate_up: x is [T*k, D]
  bool combine = true; // down: the weighted sum over the slots; else per slot
  float limit = 0.0f, alpha = 0.0f, beta = 0.0f, linear_beta = 0.0f;
};

// Decode (matrix-vector) for few (token, slot) pairs, prefill (grouped by
// expert) for many. The op functions call this too, to know whether the
// Primitive needs the expert-sorted pair order as an extra input.
Variant choose_variant(int tokens, int top_k);

// The tile of one kernel variant, read from metal/tile_shapes.h. route has
// one kernel per (x dtype, gate form), planned as `decode`: one threadgroup
// per token. gate_up's rows of h per SIMD group depend on whether its
// activation is gated (two packed rows per row of h) or not.
struct TileShape {
  int rows_per_simdgroup; // output rows (rows of h for gate_up, of y for down)
  int simdgroups; // per threadgroup
  int pairs_per_threadgroup; // gate_up prefill: entries of the sorted order; else 0
  int tokens_per_threadgroup; // down prefill: tokens; down decode, route: 1; else 0
  int rows_per_threadgroup() const {
    return rows_per_simdgroup * simdgroups;
  }
};
TileShape tile_shape(Op op, Variant v, bool gated = true);

// The quantization piece of a kernel name: "b<bits>_gs<group_size>" for
// affine, the mode's name for an fp mode. Throws std::invalid_argument
// naming the supported set for a triple the allow-list does not have.
std::string quant_name(QuantMode mode, int bits, int group_size);

// Whether metal/allow_list.h has expert kernels for this quantization (every
// activation, dtype and variant, and every run-time setting, come with it).
bool has_expert_kernels(QuantMode mode, int bits, int group_size);

// The names of metal/allow_list.h's grammar:
//   gate_up_<activation>_<variant>_<dtype>_<quant>
//   down_<variant>_<dtype>_<quant>
// Throw std::invalid_argument naming the kernel and the instantiated kernels
// of its family when the name is not in the allow-list.
std::string gate_up_kernel_name(
    Activation activation, Variant v, Dtype t, QuantMode mode, int bits, int group_size);
std::string down_kernel_name(Variant v, Dtype t, QuantMode mode, int bits, int group_size);
// "route_<x dtype>_gate_<gate form>", the router grammar of allow_list.h:
// the gate form is gate_dtype's name for bits 0, "b<bits>_gs<group_size>"
// otherwise. Throws std::invalid_argument like the others.
std::string route_kernel_name(Dtype x, int bits, int group_size, Dtype gate);
// Every kernel fused_moe.metal instantiates, in instantiation order.
const std::vector<std::string>& instantiated_kernels();

// Where a kernel buffer slot gets its data from.
enum class Source {
  input, // the Primitive's input number `index`
  output, // the Primitive's output number `index`
  args, // the plan's argument struct (set_bytes)
  // An optional input this call does not have (fp modes' biases, down's
  // router weights per slot, an expert bias, global scales): the kernel
  // never reads it (its flag in the argument struct is off). Metal gets the
  // argument struct there, the emulator a buffer of no bytes, so a read
  // faults.
  absent,
};

struct Binding {
  int slot; // [[buffer(slot)]]
  const char* name; // for errors, e.g. "gate_up_weight"
  Source source;
  int index; // input or output number; -1 for Source::args and absent
};

struct LaunchPlan {
  Problem problem;
  Variant variant;
  std::string kernel;
  // Threadgroups per grid dimension; all 0 when there is nothing to compute.
  std::array<uint32_t, 3> threadgroups;
  std::array<uint32_t, 3> threads_per_threadgroup;
  std::vector<Binding> buffers; // slots 0..n-1 in order
  std::vector<uint8_t> args; // metal/args.h FusedMoeArgs, as bytes
};

// Throws std::invalid_argument for a problem outside what the kernels
// handle, naming the field at fault.
LaunchPlan make_launch_plan(const Problem& problem);

// The tokens per threadgroup of the down prefill kernel, which the
// op function needs to sort its pairs block by block.
int down_prefill_tokens_per_threadgroup();

} // namespace fused_moe::metal
