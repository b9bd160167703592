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
// an 8-bit affine gate of group_size; intermediate is unused.
struct Problem {
  Op op;
  Dtype dtype; // activations, scales, biases and output (route: x only)
  int bits;
  int group_size;
  int tokens; // T
  int top_k; // k
  int hidden; // D
  int intermediate; // H
  int experts; // E
  Dtype gate_dtype = Dtype::float32; // route, unquantized gate only
};

// Decode (matrix-vector) for few (token, slot) pairs, prefill (grouped by
// expert) for many. The op functions call this too, to know whether the
// Primitive needs the expert-sorted pair order as an extra input.
Variant choose_variant(int tokens, int top_k);

// The tile of one kernel variant, read from metal/tile_shapes.h. route has
// one kernel per (x dtype, gate form), planned as `decode`: one threadgroup
// per token.
struct TileShape {
  int rows_per_simdgroup; // output rows (rows of h for kernel A, of y for B)
  int simdgroups; // per threadgroup
  int pairs_per_threadgroup; // A prefill: entries of the sorted order; else 0
  int tokens_per_threadgroup; // B prefill: tokens; B decode, route: 1; else 0
  int rows_per_threadgroup() const {
    return rows_per_simdgroup * simdgroups;
  }
};
TileShape tile_shape(Op op, Variant v);

// "<op>_<variant>_<dtype>_b<bits>_gs<group_size>", the grammar of
// metal/allow_list.h. Throws std::invalid_argument naming the kernel and the
// instantiated set when the name is not in the allow-list.
std::string kernel_name(Op op, Variant v, Dtype t, int bits, int group_size);
// "route_<x dtype>_gate_<gate form>", the router grammar of allow_list.h:
// the gate form is gate_dtype's name for bits 0, "b<bits>_gs<group_size>"
// otherwise. Throws std::invalid_argument like kernel_name.
std::string route_kernel_name(Dtype x, int bits, int group_size, Dtype gate);
// Every kernel fused_moe.metal instantiates, in instantiation order.
const std::vector<std::string>& instantiated_kernels();

// Where a kernel buffer slot gets its data from.
enum class Source {
  input, // the Primitive's input number `index`
  output, // the Primitive's output number `index`
  args, // the plan's argument struct (set_bytes)
};

struct Binding {
  int slot; // [[buffer(slot)]]
  const char* name; // for errors, e.g. "gate_up_weight"
  Source source;
  int index; // input or output number; -1 for Source::args
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

// The tokens per threadgroup of the down_combine prefill kernel, which the
// op function needs to sort its pairs block by block.
int down_prefill_tokens_per_threadgroup();

} // namespace fused_moe::metal
